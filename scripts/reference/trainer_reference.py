#!/usr/bin/env python3
"""Reference values for loraops-trainer, computed with PyTorch + transformers + PEFT
(+ bitsandbytes for NF4) on CPU in float32, recorded as test fixtures.

    python3 -m venv /var/tmp/loraops-py && /var/tmp/loraops-py/bin/pip install torch transformers peft safetensors bitsandbytes
    /var/tmp/loraops-py/bin/python scripts/reference/trainer_reference.py

It builds the tiny model with the trainer's own `init-tiny` (so both sides use the same
bytes), then writes trainer/tests/fixtures/reference.{json,safetensors}. CI does not run
this; the Rust tests compare against the recorded values.
"""

import json
import math
import os
import subprocess
import sys
import tempfile
import warnings

import torch
import transformers
import peft
from safetensors.torch import save_file, load_file
from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIXTURES = os.path.join(ROOT, "trainer", "tests", "fixtures")
TINY = dict(layers=2, hidden=64, heads=4, kv_heads=2, vocab=320, seed=7)
LORA = dict(r=4, alpha=8.0)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TRAJ = dict(steps=50, lr=2e-3, warmup=5, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, max_grad_norm=1.0)
# The end-to-end run whose adapter PEFT must load (same values in the Rust test).
E2E = dict(steps=6, r=4, alpha=8.0, dropout=0.0, lr=1e-2, batch_size=2, seed=11, max_len=256, warmup_steps=1)

torch.set_num_threads(2)
torch.use_deterministic_algorithms(True)


def trainer_cli(*args):
    cmd = ["cargo", "run", "-q", "-p", "loraops-trainer", "--example", "trainer", "--", *map(str, args)]
    env = dict(os.environ)
    env.setdefault("CARGO_TARGET_DIR", "/var/tmp/loraops-target-trainer")
    subprocess.run(cmd, cwd=ROOT, check=True, env=env)


def peft_key(name):
    return name.replace(".default", "")


def inputs(vocab):
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, vocab, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding on the second row
    labels = ids.clone()
    labels[0, :5] = -100  # prompt tokens
    labels[1, :3] = -100
    labels[mask == 0] = -100
    return ids, mask, labels


def loss_of(model, ids, mask, labels):
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    return out.logits, out.loss


def main():
    tensors, meta = {}, {"versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}}
    work = tempfile.mkdtemp(prefix="loraops-ref-")
    model_dir = os.path.join(work, "tiny")
    trainer_cli("init-tiny", model_dir, "--layers", TINY["layers"], "--hidden", TINY["hidden"], "--heads", TINY["heads"],
                "--kv-heads", TINY["kv_heads"], "--vocab", TINY["vocab"], "--seed", TINY["seed"])
    meta["tiny"] = TINY
    tok_vocab = len(json.load(open(os.path.join(model_dir, "tokenizer.json")))["model"]["vocab"])

    ids, mask, labels = inputs(tok_vocab)
    tensors["input_ids"] = ids.to(torch.int64)
    tensors["attention_mask"] = mask.to(torch.int64)
    tensors["labels"] = labels.to(torch.int64)

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    base.eval()
    with torch.no_grad():
        logits, loss = loss_of(base, ids, mask, labels)
    tensors["base_logits"] = logits.contiguous()
    meta["base_loss"] = loss.item()

    # LoRA with PEFT's initialisation, then B set to non-zero values so the adapter matters.
    cfg = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    torch.manual_seed(99)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager"), cfg)
    params = {peft_key(n): p for n, p in model.named_parameters() if p.requires_grad}
    init = {k: p.detach().clone() for k, p in params.items()}
    for k, v in init.items():
        tensors["init." + k] = v.contiguous()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for k, p in params.items():
            if ".lora_B." in k:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            tensors["lora." + k] = p.detach().clone().contiguous()
    logits, loss = loss_of(model, ids, mask, labels)
    loss.backward()
    tensors["lora_logits"] = logits.detach().contiguous()
    meta["lora_loss"] = loss.item()
    for k, p in params.items():
        tensors["grad." + k] = p.grad.detach().clone().contiguous()

    # rsLoRA scaling (alpha / sqrt(r)) with the same A and B.
    rs_cfg = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules=TARGETS,
                             task_type="CAUSAL_LM", use_rslora=True)
    rs = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager"), rs_cfg)
    with torch.no_grad():
        for n, p in rs.named_parameters():
            if p.requires_grad:
                p.copy_(tensors["lora." + peft_key(n)])
        tensors["rslora_logits"] = loss_of(rs, ids, mask, labels)[0].contiguous()

    # The AdamW trajectory from PEFT's init (B = 0), one fixed batch.
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(init[k])
            p.grad = None
    plist = [params[k] for k in sorted(params)]
    opt = torch.optim.AdamW(plist, lr=TRAJ["lr"], betas=(TRAJ["beta1"], TRAJ["beta2"]), eps=TRAJ["eps"], weight_decay=TRAJ["weight_decay"])
    sched = get_cosine_schedule_with_warmup(opt, TRAJ["warmup"], TRAJ["steps"])
    traj = []
    for _ in range(TRAJ["steps"]):
        _, loss = loss_of(model, ids, mask, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plist, TRAJ["max_grad_norm"])
        opt.step()
        sched.step()
        opt.zero_grad()
        traj.append(loss.item())
    meta["trajectory"] = dict(TRAJ, losses=traj)

    # NF4, against bitsandbytes.
    try:
        import bitsandbytes
        import bitsandbytes.functional as F

        w = load_file(os.path.join(model_dir, "model.safetensors"))["model.layers.0.mlp.gate_proj.weight"]
        rnd = torch.randn(512, 136, generator=torch.Generator().manual_seed(3))  # 1088 blocks: 5 absmax blocks, the last partial
        for name, x in [("gate", w), ("randn", rnd)]:
            tensors[f"nf4.{name}.input"] = x.contiguous()
            q, st = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=False)
            tensors[f"nf4.{name}.packed"] = q.flatten().contiguous()
            tensors[f"nf4.{name}.absmax"] = st.absmax.contiguous()
            if name == "gate":
                tensors[f"nf4.{name}.dequant"] = F.dequantize_4bit(q, st).contiguous()
            q2, st2 = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
            assert torch.equal(q, q2)
            tensors[f"nf4.{name}.dq.qabsmax"] = st2.absmax.contiguous()
            tensors[f"nf4.{name}.dq.absmax2"] = st2.state2.absmax.contiguous()
            tensors[f"nf4.{name}.dq.offset"] = st2.offset.reshape(1).contiguous()
            if name == "gate":
                tensors[f"nf4.{name}.dq.dequant"] = F.dequantize_4bit(q2, st2).contiguous()
        tensors["nf4.dynamic_code"] = F.create_dynamic_map(signed=True).contiguous()
        meta["versions"]["bitsandbytes"] = bitsandbytes.__version__

        # The NF4 base model's logits: every decoder linear weight replaced by what bitsandbytes
        # dequantises from its NF4 form (absmax in f32), computed in f32. (transformers' own
        # Linear4bit forward on CPU is not f32-exact: it deviates from x @ dequant(W).T by
        # ~5e-3 here, recorded below, so it cannot serve as an f32 reference.)
        q_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
        with torch.no_grad():
            for n, m in q_model.named_modules():
                if isinstance(m, torch.nn.Linear) and n != "lm_head":
                    q, st = F.quantize_4bit(m.weight.data, blocksize=64, quant_type="nf4", compress_statistics=False)
                    m.weight.copy_(F.dequantize_4bit(q, st))
            logits, loss = loss_of(q_model, ids, mask, labels)
        tensors["nf4_logits"] = logits.contiguous()
        meta["nf4_loss"] = loss.item()
        bnb_cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                  bnb_4bit_use_double_quant=False, bnb_4bit_compute_dtype=torch.float32)
        try:
            q4 = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb_cfg, dtype=torch.float32,
                                                      attn_implementation="eager", device_map="cpu")
            with torch.no_grad():
                l4, _ = loss_of(q4, ids, mask, labels)
            meta["nf4_bnb_linear4bit_logits_max_dev"] = (l4 - logits)[mask.bool()].abs().max().item()
        except Exception as e:
            meta["nf4_bnb_model_error"] = repr(e)
    except ImportError as e:
        meta["nf4_error"] = repr(e)

    # A Qwen2-layout model as transformers saves it: q/k/v biases, tied embeddings, sharded
    # safetensors with an index, rope_theta under rope_parameters. Checked in whole (tiny).
    qdir = os.path.join(FIXTURES, "qwen2-tiny")
    # Llama 3 RoPE scaling with a short original context, so all three frequency bands occur.
    rope = {"rope_type": "llama3", "rope_theta": 1e6, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}
    qcfg = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=96, tie_word_embeddings=True, rope_parameters=rope,
                                    rms_norm_eps=1e-6, max_position_embeddings=128)
    torch.manual_seed(21)
    qm = transformers.Qwen2ForCausalLM(qcfg).to(torch.float32)
    with torch.no_grad():
        for n, p in qm.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape))
            elif n.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape))
            elif "embed_tokens" in n:
                p.copy_(torch.randn(p.shape))
            else:
                p.copy_(torch.randn(p.shape) / math.sqrt(p.shape[1]))
    if os.path.exists(qdir):
        for f in os.listdir(qdir):
            os.remove(os.path.join(qdir, f))
    qm.save_pretrained(qdir, max_shard_size="40KB")
    qm = AutoModelForCausalLM.from_pretrained(qdir, dtype=torch.float32, attn_implementation="eager")
    qids = torch.randint(0, 96, (1, 24), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        tensors["qwen2.input_ids"] = qids.to(torch.int64)
        tensors["qwen2.logits"] = qm(input_ids=qids).logits.contiguous()
    meta["qwen2_files"] = sorted(os.listdir(qdir))

    # PEFT loads an adapter trained by loraops, with identical logits.
    data = os.path.join(FIXTURES, "sft_small.jsonl")
    out = os.path.join(work, "adapter")
    conf = os.path.join(work, "sft.toml")
    with open(conf, "w") as f:
        f.write(f'model = "{model_dir}"\ndata = "{data}"\nout = "{out}"\n')
        for k, v in E2E.items():
            f.write(f"{k} = {json.dumps(v)}\n")
    trainer_cli("sft", conf)
    pm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager"), out)
    sd = load_file(os.path.join(out, "adapter_model.safetensors"))
    loaded = {peft_key(n) for n, _ in pm.named_parameters() if "lora_" in n}
    meta["e2e"] = dict(E2E, peft_missing=sorted(loaded - set(sd)), peft_unexpected=sorted(set(sd) - loaded),
                       adapter_config=json.load(open(os.path.join(out, "adapter_config.json"))))
    with warnings.catch_warnings():
        pm.eval()
        with torch.no_grad():
            logits, loss = loss_of(pm, ids, mask, labels)
    tensors["e2e.peft_logits"] = logits.contiguous()
    meta["e2e"]["peft_loss"] = loss.item()

    os.makedirs(FIXTURES, exist_ok=True)
    save_file(tensors, os.path.join(FIXTURES, "reference.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(FIXTURES, "reference.json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    print("wrote", FIXTURES, file=sys.stderr)


if __name__ == "__main__":
    main()
