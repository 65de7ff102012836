#!/usr/bin/env python3
"""Reference greedy outputs for the gateway, from transformers + PEFT on CPU in float32.

    /var/tmp/loraops-py/bin/python scripts/reference/gateway_reference.py [LORAOPS_BIN]

It generates the tiny model with `loraops model init-tiny` (the same bytes the gateway tests
generate), makes a LoRA adapter with PEFT itself (random A and B, seeded, so it changes the
output), saves it in PEFT's format, and records the greedy completions of the base model and
of base + adapter for a few chat prompts. Output: gateway/tests/fixtures/peft-adapter/
(adapter_config.json, adapter_model.safetensors) and gateway/tests/fixtures/reference.json.
The gateway tests serve the adapter through the registry and mistral.rs and must produce the
same text. CI does not run this; the Rust tests compare against the recorded values.
"""

import json
import os
import subprocess
import sys
import tempfile

import peft
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIXTURES = os.path.join(ROOT, "gateway", "tests", "fixtures")
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "How do I reset my password?",
]
MAX_NEW_TOKENS = 8


def main():
    exe = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "debug", "loraops")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = os.path.join(tmp, "tiny-llama")
        subprocess.run([exe, "model", "init-tiny", base_dir], check=True)
        tok = AutoTokenizer.from_pretrained(base_dir)
        base = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32).eval()

        def greedy(model):
            out = []
            for p in PROMPTS:
                ids = tok.apply_chat_template([{"role": "user", "content": p}],
                                              add_generation_prompt=True, return_tensors="pt")
                if not torch.is_tensor(ids):
                    ids = ids["input_ids"]
                with torch.no_grad():
                    gen = model.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                         pad_token_id=tok.eos_token_id)
                new = gen[0, ids.shape[1]:].tolist()
                out.append({"prompt": p, "prompt_ids": ids[0].tolist(), "ids": new,
                            "text": tok.decode(new, skip_special_tokens=True)})
            return out

        base_out = greedy(base)
        cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])
        model = peft.get_peft_model(base, cfg)
        # PEFT's non-default init draws A and B at the usual scale; make the adapter strong
        # enough that it changes the tiny model's greedy tokens.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.mul_(4.0)
        model.eval()
        adapter_out = greedy(model)
        out_dir = os.path.join(FIXTURES, "peft-adapter")
        model.save_pretrained(out_dir)
        # The registry matches adapters to base models by name, not by a local path.
        cfg_path = os.path.join(out_dir, "adapter_config.json")
        with open(cfg_path) as f:
            c = json.load(f)
        c["base_model_name_or_path"] = "tiny-llama"
        with open(cfg_path, "w") as f:
            json.dump(c, f, indent=2, sort_keys=True)
        for junk in ["README.md"]:
            path = os.path.join(out_dir, junk)
            if os.path.exists(path):
                os.remove(path)
    ref = {
        "generator": f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}",
        "max_new_tokens": MAX_NEW_TOKENS,
        "base": base_out,
        "adapter": adapter_out,
    }
    with open(os.path.join(FIXTURES, "reference.json"), "w") as f:
        json.dump(ref, f, indent=2)
    changed = sum(a["ids"] != b["ids"] for a, b in zip(base_out, adapter_out))
    print(f"wrote {FIXTURES}: adapter changes {changed} of {len(PROMPTS)} greedy outputs")
    for b, a in zip(base_out, adapter_out):
        print(repr(b["text"]), "->", repr(a["text"]))


if __name__ == "__main__":
    main()
