#!/usr/bin/env python3
"""DPO training throughput: loraops-trainer (candle) vs TRL's DPOTrainer (PyTorch + PEFT), on
CPU, same model, same data, same batch, same LoRA, same threads, side by side.

    /var/tmp/loraops-py/bin/python bench/preference/bench.py [--threads 2] [--steps 6] [--repeat 2] [--exe-dir DIR]

TRL runs twice: in f32 like the other sides, and as DPOConfig comes (bf16 autocast, also on a
CPU; on one with AVX512-BF16 that is faster than f32). Activation checkpointing is off on both
(loraops' default) unless TRL_GRADIENT_CHECKPOINTING=1 (TRL's own default). The PyTorch sides use
SDPA attention (transformers' default; BENCH_ATTN=eager for eager). On a loaded machine the
PyTorch sides swing by up to 5x between runs (seen here): run it on a quiet one.

Model: init-tiny with hidden 512, 4 layers, 8 heads (4 KV heads), vocab 2048; LoRA r=16
alpha=32 on all linear layers; AdamW; 2 pairs per batch, sequences of about 100-200 tokens
(no truncation on either side). Both sides run the reference as the base with the adapter disabled
(no precomputation), one reference and one policy forward of chosen+rejected per step.
tokens/s counts the real (unpadded) tokens of chosen and rejected sequences (prompt included)
per optimizer step, from the start of the step to the end of the optimizer update, excluding
the first two (warm-up) steps; each side runs --repeat times, alternating, and its best run is
reported. Another row runs the same DPO step hand-written in PyTorch + PEFT (no TRL), to show
how much of the difference is TRL's own overhead.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TARGET = os.environ.get("CARGO_TARGET_DIR", "/var/tmp/loraops-target")
SPEC = dict(layers=4, hidden=512, heads=8, kv_heads=4, vocab=2048, seed=1)
PAIRS, MAX_LEN, R, ALPHA, BETA, LR = 2, 256, 16, 32.0, 0.1, 1e-4
GC = os.environ.get("TRL_GRADIENT_CHECKPOINTING", "0") == "1"
# transformers' default attention, what users get.
ATTN = os.environ.get("BENCH_ATTN", "sdpa")


def write_data(path):
    # Rows well under MAX_LEN tokens, so neither side truncates and both see the same sequences.
    words = open(os.path.join(ROOT, "model", "src", "tiny.rs")).read().split()
    with open(path, "w") as f:
        for i in range(16):
            w = words[(i * 53) % 400:]
            f.write(json.dumps({"prompt": " ".join(w[:14]), "chosen": " " + " ".join(w[14:40]),
                                "rejected": " " + " ".join(w[40:66])}) + "\n")


def torch_worker(model_dir, data, steps, threads):
    """The same DPO step written directly in PyTorch + PEFT, without TRL: one policy forward of
    chosen+rejected with gradients, one reference forward with the adapter disabled, TRL's
    sigmoid loss, backward, clipping, AdamW."""
    import torch
    import torch.nn.functional as F
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=ATTN)
    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), weight_decay=0.0)
    rows = [json.loads(l) for l in open(data)]
    seqs = []
    for r in rows:
        p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        c = tok(r["chosen"] + tok.eos_token, add_special_tokens=False)["input_ids"]
        j = tok(r["rejected"] + tok.eos_token, add_special_tokens=False)["input_ids"]
        seqs.append(((p + c)[:MAX_LEN], len(p), (p + j)[:MAX_LEN]))

    def batch(group):
        items = [(x[0], x[1]) for x in group] + [(x[2], x[1]) for x in group]
        t = max(len(i) for i, _ in items)
        ids = torch.zeros(len(items), t, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for k, (i, n) in enumerate(items):
            ids[k, :len(i)] = torch.tensor(i)
            mask[k, :len(i)] = 1
            labels[k, n:len(i)] = torch.tensor(i[n:])
        return ids, mask, labels

    def logps(ids, mask, labels):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        lab = labels[:, 1:]
        m = lab != -100
        lp = torch.gather(logits.log_softmax(-1), 2, lab.clamp(min=0).unsqueeze(2)).squeeze(2)
        return (lp * m).sum(-1)

    times, tokens = [], []
    for step in range(steps):
        group = [seqs[(step * PAIRS + k) % len(seqs)] for k in range(PAIRS)]
        ids, mask, labels = batch(group)
        t0 = time.perf_counter()
        lp = logps(ids, mask, labels)
        with torch.no_grad(), model.disable_adapter():
            ref = logps(ids, mask, labels)
        c, r = lp.chunk(2)
        rc, rr = ref.chunk(2)
        loss = -F.logsigmoid(BETA * ((c - r) - (rc - rr))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
        tokens.append(int(mask.sum()))
    tps = sum(tokens[2:]) / sum(times[2:])
    print(json.dumps({"tokens_per_s": tps, "tokens_per_step": sum(tokens) / len(tokens)}))


def trl_worker(model_dir, data, steps, threads, bf16):
    import torch
    import peft
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=ATTN)
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    ds = load_dataset("json", data_files=data, split="train")
    times, tokens = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    class Counted(DPOTrainer):
        def training_step(self, model, inputs, *a, **k):
            # Chosen and rejected rows, prompt included, without padding.
            tokens.append(int(inputs["attention_mask"].sum()))
            return super().training_step(model, inputs, *a, **k)

    args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=PAIRS, max_steps=steps,
                     learning_rate=LR, beta=BETA, max_length=MAX_LEN,
                     logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                     dataloader_num_workers=0, weight_decay=0.0, warmup_steps=0, seed=0, disable_tqdm=True,
                     # TRL turns activation checkpointing on by default; loraops (and the hand-written
                     # PyTorch step) keep activations, so compare like with like.
                     gradient_checkpointing=GC,
                     # DPOConfig's default is bf16 autocast; the f32 run matches the other sides.
                     bf16=bf16)
    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = Counted(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=cfg,
                      callbacks=[Clock()])
    trainer.train()
    tps = sum(tokens[2:]) / sum(times[2:])
    print(json.dumps({"tokens_per_s": tps, "tokens_per_step": sum(tokens) / len(tokens)}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeat", type=int, default=2, help="runs per side, alternating; the best is reported")
    ap.add_argument("--worker", nargs=3, help="TRL: MODEL DATA bf16|f32")
    ap.add_argument("--torch-worker", nargs=2)
    ap.add_argument("--exe-dir", help="use the trainer and preference examples in this directory instead of building them")
    a = ap.parse_args()
    if a.worker:
        return trl_worker(a.worker[0], a.worker[1], a.steps, a.threads, a.worker[2] == "bf16")
    if a.torch_worker:
        return torch_worker(a.torch_worker[0], a.torch_worker[1], a.steps, a.threads)

    env = dict(os.environ, CARGO_TARGET_DIR=TARGET, RAYON_NUM_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads))
    exe = a.exe_dir or os.path.join(TARGET, "debug", "examples")
    if not a.exe_dir:
        # The workspace's own feature set, so the test build's dependencies are reused.
        subprocess.run(["cargo", "build", "-q", "--workspace", "--examples"], cwd=ROOT, env=env, check=True)
    work = tempfile.mkdtemp(prefix="loraops-bench-dpo-")
    model = os.path.join(work, "model")
    subprocess.run([os.path.join(exe, "trainer"), "init-tiny", model,
                    *sum([[f"--{k.replace('_', '-')}", str(v)] for k, v in SPEC.items()], [])], check=True)
    data = os.path.join(work, "pairs.jsonl")
    write_data(data)
    conf = os.path.join(work, "dpo.toml")
    with open(conf, "w") as f:
        f.write(f'model = "{model}"\ndata = "{data}"\nout = "{work}/out"\nsteps = {a.steps}\nr = {R}\nalpha = {ALPHA}\n'
                f"dropout = 0.0\nbatch_size = {PAIRS}\nmax_len = {MAX_LEN}\nlr = {LR}\nweight_decay = 0.0\nbeta = {BETA}\n")

    best = {"loraops": 0.0, "trl": 0.0, "trl-bf16": 0.0, "torch": 0.0}
    per_step = {}
    for _ in range(a.repeat):
        p = subprocess.run([os.path.join(exe, "preference"), "dpo", conf], stdout=subprocess.PIPE, text=True, env=env, check=True)
        steps = [json.loads(l) for l in p.stdout.splitlines() if l.startswith("{")]
        tok = sum(s["tokens"] for s in steps[2:])
        secs = sum(s["tokens"] / s["tokens_per_s"] for s in steps[2:])
        best["loraops"] = max(best["loraops"], tok / secs)
        per_step["loraops"] = sum(s["tokens"] for s in steps) / len(steps)
        for side, flag in [("trl", ["--worker", model, data, "f32"]), ("trl-bf16", ["--worker", model, data, "bf16"]),
                           ("torch", ["--torch-worker", model, data])]:
            p = subprocess.run([sys.executable, __file__, *flag, "--steps", str(a.steps),
                                "--threads", str(a.threads)], stdout=subprocess.PIPE, text=True, env=env, check=True)
            r = json.loads([l for l in p.stdout.splitlines() if l.startswith("{")][-1])
            best[side] = max(best[side], r["tokens_per_s"])
            per_step[side] = r["tokens_per_step"]

    print(f"\nDPO, CPU, {a.threads} threads, hidden 512 x 4 layers, vocab 2048, {PAIRS} pairs per step, "
          f"LoRA r={R} all-linear, reference = adapter disabled, {a.steps} steps (first 2 not timed), best of {a.repeat}\n")
    print("| trainer | tokens/step | tokens/s | loraops speed-up |")
    print("|---|---|---|---|")
    gc = "on" if GC else "off"
    trl = f"TRL {trl_version()} DPOTrainer"
    names = {"loraops": "loraops (candle), f32",
             "torch": f"PyTorch + PEFT, hand-written DPO step, f32, {ATTN}",
             "trl": f"{trl}, f32, {ATTN} (activation checkpointing {gc})",
             "trl-bf16": f"{trl}, its default bf16 autocast, {ATTN} (activation checkpointing {gc})"}
    for side in ["loraops", "torch", "trl", "trl-bf16"]:
        print(f"| {names[side]} | {per_step[side]:.0f} | {best[side]:.1f} | {best['loraops'] / best[side]:.2f}x |")


def trl_version():
    out = subprocess.run([sys.executable, "-c", "import trl; print(trl.__version__)"], stdout=subprocess.PIPE, text=True)
    return out.stdout.strip()


if __name__ == "__main__":
    main()
