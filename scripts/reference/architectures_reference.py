"""Records transformers' logits for tiny generated models of the architectures loraops loads
beyond Llama/Mistral/Qwen2 (Qwen3, Gemma 2, Gemma 3 text), into model/tests/fixtures/.

Each model directory holds config.json, model.safetensors and reference.safetensors (the
input ids and transformers' f32 logits, eager attention). Sequences are longer than the
sliding window so the local layers' mask matters. CI does not run this script.

    python scripts/reference/architectures_reference.py
"""

import math
import os

import torch
import transformers
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(ROOT, "model", "tests", "fixtures")
VOCAB = 96
SEQ = 20


def randomise(model, seed):
    """Weights far from init (norms too), so every term shows in the logits."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                # Gemma norms scale by (1 + w): both forms get a non-trivial weight.
                p.copy_(0.1 * torch.randn(p.shape) + (0.0 if "gemma" in type(model).__name__.lower() else 1.0))
            elif "embed_tokens" in n:
                p.copy_(torch.randn(p.shape))
            elif p.dim() == 2:
                p.copy_(torch.randn(p.shape) / math.sqrt(p.shape[1]))


def record(name, cls, cfg, seed):
    out = os.path.join(FIXTURES, name)
    os.makedirs(out, exist_ok=True)
    for f in os.listdir(out):
        os.remove(os.path.join(out, f))
    model = cls(cfg).to(torch.float32)
    randomise(model, seed)
    model.save_pretrained(out)
    # generation_config.json is not needed by loraops and only adds bytes.
    gen = os.path.join(out, "generation_config.json")
    if os.path.exists(gen):
        os.remove(gen)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    ids = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        logits = model(input_ids=ids).logits.contiguous()
    save_file({"input_ids": ids.to(torch.int64), "logits": logits}, os.path.join(out, "reference.safetensors"))
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"{name}: {sorted(os.listdir(out))}, {size} bytes, logits {tuple(logits.shape)}")


def main():
    common = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128)
    # head_dim 16 with hidden 32 / 4 heads = 8: the config's head_dim must be honoured.
    record("qwen3-tiny", transformers.Qwen3ForCausalLM,
           transformers.Qwen3Config(**common, head_dim=16, tie_word_embeddings=True, rms_norm_eps=1e-6,
                                    rope_parameters={"rope_type": "default", "rope_theta": 1e6}), 31)
    record("gemma2-tiny", transformers.Gemma2ForCausalLM,
           transformers.Gemma2Config(**common, head_dim=16, query_pre_attn_scalar=12, sliding_window=6,
                                     attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                                     hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
                                     tie_word_embeddings=True), 41)
    record("gemma3-tiny", transformers.Gemma3ForCausalLM,
           transformers.Gemma3TextConfig(**common, head_dim=16, query_pre_attn_scalar=12, sliding_window=6,
                                         layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                         rope_parameters={
                                             "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                "rope_theta": 1e6},
                                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                         },
                                         hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
                                         tie_word_embeddings=True), 51)


if __name__ == "__main__":
    main()
