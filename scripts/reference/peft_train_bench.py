#!/usr/bin/env python3
"""PyTorch + transformers + PEFT side of scripts/gpu-check: LoRA training throughput, peak
memory and loss on the same model, data, batch and LoRA settings as the loraops run.

    python scripts/reference/peft_train_bench.py --model DIR --data FILE.jsonl --out RESULT.json \
        [--device cuda|cpu] [--dtype bf16|f32] [--attn sdpa|eager] [--quantize none|nf4] \
        [--steps 60] [--batch-size 8] [--max-len 512] [--r 16] [--alpha 32] [--dropout 0.05] \
        [--lr 2e-4] [--skip 5]

Rows are {"prompt", "completion"} JSONL, tokenised as prompt + completion + EOS (BOS first
where the tokenizer adds one) and cut to max_len, as loraops does; gpu-check makes them long
enough that every row fills max_len, so both sides see batch x max_len tokens per step.
`--quantize nf4` needs bitsandbytes (QLoRA: NF4, double quantisation, compute in --dtype).
tokens/s leaves out the first --skip (warm-up) steps. Peak memory: torch.cuda's
max_memory_allocated (and max_memory_reserved); on the CPU, the process's peak RSS.
"""

import argparse
import json
import resource
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--quantize", default="none", choices=["none", "nf4"])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--skip", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    a = ap.parse_args()

    import peft
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dev = torch.device(a.device)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    # `torch_dtype` is what transformers 4 takes and 5 still accepts.
    kw = dict(torch_dtype=dtype, attn_implementation=a.attn)
    if a.quantize == "nf4":
        kw["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
        kw["device_map"] = {"": a.device}
    model = AutoModelForCausalLM.from_pretrained(a.model, **kw)
    if a.quantize == "none":
        model.to(device=dev, dtype=dtype)
    n_params = sum(p.numel() for p in model.parameters())
    cfg = peft.LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout,
                          target_modules="all-linear", task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    tok = AutoTokenizer.from_pretrained(a.model)
    bos = [tok.bos_token_id] if tok.bos_token_id is not None and (
        tok("x", add_special_tokens=True)["input_ids"][:1] == [tok.bos_token_id]) else []
    eos = tok.eos_token or ""
    rows = []
    with open(a.data) as f:
        for line in f:
            r = json.loads(line)
            ids = bos + tok(r["prompt"], add_special_tokens=False)["input_ids"] + \
                tok(r["completion"] + eos, add_special_tokens=False)["input_ids"]
            rows.append(ids[:a.max_len])
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def batch(step):
        chosen = [rows[(step * a.batch_size + i) % len(rows)] for i in range(a.batch_size)]
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in chosen], device=dev)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in chosen], device=dev)
        labels = ids.masked_fill(mask == 0, -100)
        return ids, mask, labels, int(mask.sum())

    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    losses, times, tokens = [], [], []
    for step in range(a.steps):
        ids, mask, labels, n = batch(step)
        if cuda:
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.item()  # synchronises, as loraops' per-step loss read does
        times.append(time.perf_counter() - t0)
        losses.append(value)
        tokens.append(n)
    skip = min(a.skip, max(a.steps - 1, 0))
    out = {
        "engine": "pytorch+peft",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__,
        "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
        "config": {k: v for k, v in vars(a).items() if k not in ("out",)},
        "params": n_params,
        "tokens_per_s": sum(tokens[skip:]) / max(sum(times[skip:]), 1e-9),
        "losses": losses,
        "step_s": times,
        "peak_allocated_bytes": torch.cuda.max_memory_allocated(dev) if cuda else None,
        "peak_reserved_bytes": torch.cuda.max_memory_reserved(dev) if cuda else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"pytorch+peft: {out['tokens_per_s']:.0f} tokens/s, loss {losses[0]:.4f} -> "
          f"{losses[-1]:.4f}")


if __name__ == "__main__":
    main()
