#!/usr/bin/env python3
"""DPO training throughput: loraops-trainer (candle) vs TRL's DPOTrainer (PyTorch + PEFT), on
CPU, same model, same data, same batch, same LoRA, same threads, side by side.

    /var/tmp/loraops-py/bin/python bench/preference/bench.py [--threads 2] [--steps 8] [--repeat 2]

Model: init-tiny with hidden 512, 4 layers, 8 heads (4 KV heads), vocab 2048; LoRA r=16
alpha=32 on all linear layers; AdamW; 2 pairs per batch, each sequence ~200 tokens (prompt
~70, completion ~130). Both sides run the reference as the base with the adapter disabled
(no precomputation), one reference and one policy forward of chosen+rejected per step.
tokens/s counts the real (unpadded) tokens of chosen and rejected sequences per optimizer step,
from the start of the step to the end of the optimizer update, excluding the first two
(warm-up) steps; each side runs --repeat times, alternating, and its best run is reported.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TARGET = os.environ.get("CARGO_TARGET_DIR", "/var/tmp/loraops-target-trainer")
SPEC = dict(layers=4, hidden=512, heads=8, kv_heads=4, vocab=2048, seed=1)
PAIRS, MAX_LEN, R, ALPHA, BETA, LR = 2, 256, 16, 32.0, 0.1, 1e-4


def write_data(path):
    words = open(os.path.join(ROOT, "trainer", "src", "tiny.rs")).read().split()
    with open(path, "w") as f:
        for i in range(16):
            w = words[(i * 53) % 400:]
            f.write(json.dumps({"prompt": " ".join(w[:45]), "chosen": " " + " ".join(w[45:130]),
                                "rejected": " " + " ".join(w[130:215])}) + "\n")


def trl_worker(model_dir, data, steps, threads):
    import torch
    import peft
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
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
            n = (2 * inputs["prompt_attention_mask"].sum() + inputs["chosen_attention_mask"].sum()
                 + inputs["rejected_attention_mask"].sum())
            tokens.append(int(n))
            return super().training_step(model, inputs, *a, **k)

    args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=PAIRS, max_steps=steps,
                     learning_rate=LR, beta=BETA, max_length=MAX_LEN, max_prompt_length=MAX_LEN,
                     logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                     dataloader_num_workers=0, weight_decay=0.0, warmup_steps=0, seed=0, disable_tqdm=True)
    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = Counted(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=cfg,
                      callbacks=[Clock()])
    trainer.train()
    tps = sum(tokens[2:]) / sum(times[2:])
    print(json.dumps({"tokens_per_s": tps, "tokens_per_step": sum(tokens) / len(tokens)}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2, help="runs per side, alternating; the best is reported")
    ap.add_argument("--worker", nargs=2)
    a = ap.parse_args()
    if a.worker:
        return trl_worker(a.worker[0], a.worker[1], a.steps, a.threads)

    env = dict(os.environ, CARGO_TARGET_DIR=TARGET, RAYON_NUM_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads))
    subprocess.run(["cargo", "build", "-q", "-p", "loraops-trainer", "--example", "trainer", "--example", "preference"],
                   cwd=ROOT, env=env, check=True)
    exe = os.path.join(TARGET, "debug", "examples")
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

    best_c = best_t = 0.0
    tok_c = tok_t = 0.0
    for _ in range(a.repeat):
        p = subprocess.run([os.path.join(exe, "preference"), "dpo", conf], stdout=subprocess.PIPE, text=True, env=env, check=True)
        steps = [json.loads(l) for l in p.stdout.splitlines() if l.startswith("{")]
        tok = sum(s["tokens"] for s in steps[2:])
        secs = sum(s["tokens"] / s["tokens_per_s"] for s in steps[2:])
        best_c = max(best_c, tok / secs)
        tok_c = sum(s["tokens"] for s in steps) / len(steps)
        p = subprocess.run([sys.executable, __file__, "--worker", model, data, "--steps", str(a.steps),
                            "--threads", str(a.threads)], stdout=subprocess.PIPE, text=True, env=env, check=True)
        r = json.loads([l for l in p.stdout.splitlines() if l.startswith("{")][-1])
        best_t, tok_t = max(best_t, r["tokens_per_s"]), r["tokens_per_step"]

    print(f"\nDPO, CPU, {a.threads} threads, hidden 512 x 4 layers, vocab 2048, {PAIRS} pairs per step, "
          f"LoRA r={R} all-linear, reference = adapter disabled\n")
    print("| trainer | tokens/step | tokens/s | ratio |")
    print("|---|---|---|---|")
    print(f"| loraops | {tok_c:.0f} | {best_c:.0f} | {best_c / best_t:.2f}x |")
    print(f"| TRL DPOTrainer | {tok_t:.0f} | {best_t:.0f} | 1.00x |")


if __name__ == "__main__":
    main()
