#!/usr/bin/env python3
"""Training throughput and peak memory: loraops-trainer (candle) vs PyTorch + PEFT, on CPU,
same model, same LoRA, same threads, f32 and NF4 bases, side by side. PyTorch runs with
transformers' default attention (SDPA), the comparison users get; eager attention is a second
column.

    /var/tmp/loraops-py/bin/python bench/trainer/bench.py [--threads 2] [--steps 20] [--repeat 4]

Model: init-tiny with hidden 512, 4 layers, 8 heads (4 KV heads), vocab 2048; batch 2 x 256
tokens; LoRA r=16 alpha=32 on all linear layers; AdamW. Each side runs in its own process;
peak RSS is the process's ru_maxrss. tokens/s excludes the first two (warm-up) steps; each side runs --repeat times, alternating,
and its best run is reported.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TARGET = os.environ.get("CARGO_TARGET_DIR", "/var/tmp/loraops-target")
SPEC = dict(layers=4, hidden=512, heads=8, kv_heads=4, vocab=2048, seed=1)
BATCH, SEQ, R, ALPHA = 2, 256, 16, 32.0


def child_peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def run_measured(cmd, env):
    """Run cmd in a fresh process and return (stdout, peak RSS of that process in MiB)."""
    wrapper = [sys.executable, "-c",
               "import resource,subprocess,sys;"
               "p=subprocess.run(sys.argv[1:],stdout=subprocess.PIPE,text=True);"
               "sys.stdout.write(p.stdout);"
               "print('PEAK_RSS_KB',resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss);"
               "sys.exit(p.returncode)", *cmd]
    p = subprocess.run(wrapper, stdout=subprocess.PIPE, text=True, env=env, check=True)
    lines = p.stdout.splitlines()
    rss = float([l for l in lines if l.startswith("PEAK_RSS_KB")][-1].split()[1]) / 1024
    return [l for l in lines if not l.startswith("PEAK_RSS_KB")], rss


def torch_worker(model_dir, quantize, attn, steps, threads):
    import torch
    import peft
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    kw = dict(dtype=torch.float32, attn_implementation=attn)
    if quantize == "nf4":
        kw["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
        kw["device_map"] = "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kw)
    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    ids = torch.randint(0, 1800, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    tps = BATCH * SEQ * (steps - 2) / sum(times[2:])
    print(json.dumps({"tokens_per_s": tps, "loss": loss.item()}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=4, help="runs per side, alternating; the best is reported")
    ap.add_argument("--worker", nargs=3)
    a = ap.parse_args()
    if a.worker:
        return torch_worker(a.worker[0], a.worker[1], a.worker[2], a.steps, a.threads)

    env = dict(os.environ, CARGO_TARGET_DIR=TARGET, RAYON_NUM_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads))
    # The workspace's own feature set, so the test build's dependencies are reused.
    subprocess.run(["cargo", "build", "-q", "--workspace", "--examples"], cwd=ROOT, env=env, check=True)
    exe = os.path.join(TARGET, "debug", "examples", "trainer")
    work = tempfile.mkdtemp(prefix="loraops-bench-")
    model = os.path.join(work, "model")
    subprocess.run([exe, "init-tiny", model, *sum([[f"--{k.replace('_', '-')}", str(v)] for k, v in SPEC.items()], [])], check=True)
    # Rows long enough to fill SEQ tokens, with (almost) every token a completion token, so
    # both sides compute the loss over the whole sequence.
    words = open(os.path.join(ROOT, "model", "src", "tiny.rs")).read().split()
    data = os.path.join(work, "data.jsonl")
    with open(data, "w") as f:
        for i in range(16):
            text = " ".join(words[(i * 37) % 500:][:400])
            f.write(json.dumps({"prompt": "x", "completion": " " + text}) + "\n")

    rows = []
    for quantize in ["none", "nf4"]:
        out = os.path.join(work, f"out-{quantize}")
        conf = os.path.join(work, f"{quantize}.toml")
        with open(conf, "w") as f:
            f.write(f'model = "{model}"\ndata = "{data}"\nout = "{out}"\nsteps = {a.steps}\nquantize = "{quantize}"\n'
                    f"r = {R}\nalpha = {ALPHA}\ndropout = 0.0\nbatch_size = {BATCH}\nmax_len = {SEQ}\nlr = 1e-4\n")
        tps = {"loraops": 0.0, "sdpa": 0.0, "eager": 0.0}
        rss = {k: float("inf") for k in tps}
        # Alternate the sides and keep each one's best run: on a shared machine, other load
        # only ever slows a run down.
        for _ in range(a.repeat):
            lines, peak = run_measured([exe, "sft", conf], env)
            steps = [json.loads(l) for l in lines if l.startswith("{")]
            tok = sum(s["tokens"] for s in steps[2:])
            secs = sum(s["tokens"] / s["tokens_per_s"] for s in steps[2:])
            tps["loraops"], rss["loraops"] = max(tps["loraops"], tok / secs), min(rss["loraops"], peak)
            for attn in ("sdpa", "eager"):
                lines, peak = run_measured([sys.executable, __file__, "--worker", model, quantize, attn,
                                            "--steps", str(a.steps), "--threads", str(a.threads)], env)
                t = json.loads([l for l in lines if l.startswith("{")][-1])["tokens_per_s"]
                tps[attn], rss[attn] = max(tps[attn], t), min(rss[attn], peak)
        rows.append((quantize, tps, rss))

    print(f"\nCPU, {a.threads} threads, hidden 512 x 4 layers, vocab 2048, batch {BATCH}x{SEQ}, LoRA r={R} all-linear\n")
    print("| base | loraops tok/s | PyTorch+PEFT SDPA tok/s | ratio | PyTorch+PEFT eager tok/s | ratio "
          "| loraops peak RSS MiB | PyTorch SDPA peak RSS MiB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for q, t, m in rows:
        name = "f32" if q == "none" else "NF4"
        print(f"| {name} | {t['loraops']:.0f} | {t['sdpa']:.0f} | {t['loraops'] / t['sdpa']:.2f}x "
              f"| {t['eager']:.0f} | {t['loraops'] / t['eager']:.2f}x "
              f"| {m['loraops']:.0f} | {m['sdpa']:.0f} | {m['loraops'] / m['sdpa']:.2f}x |")

if __name__ == "__main__":
    main()
