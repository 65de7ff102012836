#!/usr/bin/env python3
"""Data curation benchmark: generate synthetic JSONL rows with planted exact duplicates, near
duplicates and PII (plus PII look-alikes: dates, times, prices, versions, ISBNs, order numbers),
run `loraops data curate` on them, and print throughput, peak RSS, and precision/recall of
near-dup detection and of PII masking per type on the planted items.

    python3 bench/curate/bench.py [--rows 1000000] [--loraops PATH] [--keep DIR [--reuse]]
                                  [--margin 0.05] [--curate-args "--proportions web=0.5,..."]

PATH is the `loraops` binary: $LORAOPS_BIN, else $CARGO_TARGET_DIR (default ./target)
/release/loraops, else .../debug/loraops (what `cargo build --workspace` and `cargo test`
build). The script checks that it is the real CLI (`--version`, `data curate --help`) and
names it in the table. Only the standard library is needed.

Definitions. Exact/near-dup recall: planted duplicates reported as duplicates (rejected.jsonl)
over planted duplicates; near-dup recall counts only planted near duplicates whose true
Jaccard similarity (character 5-gram sets of the normalised text, as the pipeline shingles it)
is >= the threshold. Precision: reported duplicates that were planted duplicates. PII recall:
planted values that are gone from the output row with a placeholder of the right type in their
place; precision: placeholders of a type that stand for a planted value of that type.
"""

import argparse
import json
import os
import random
import resource
import shlex
import subprocess
import sys
import tempfile
import time
import unicodedata

TYPES = ["EMAIL", "PHONE", "CARD", "IP", "IBAN", "KR_RRN", "US_SSN"]
SYL = ["ka", "ro", "mi", "sen", "tal", "vor", "ne", "lu", "qi", "dra", "pe", "so", "gan", "ti",
       "mo", "bel", "ri", "zu", "fa", "hon", "we", "cy", "las", "tor", "ex", "ul", "pri", "den"]
COMMON = ("the of and to in is that for it as with was on be by this are from or have an they "
          "which one you were all we when there can more if out so what about how some would "
          "into time has like them other then its our two first new these any may water long "
          "people work part use day good each").split()


def luhn_complete(prefix, n):
    digits = [int(c) for c in prefix]
    while len(digits) < n - 1:
        digits.append(random.randrange(10))
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return "".join(map(str, digits)) + str((10 - total % 10) % 10)


def iban(cc, length):
    bban = "".join(random.choice("0123456789") for _ in range(length - 4))
    if cc == "GB":
        bban = "".join(random.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(4)) + bban[4:]
    num = "".join(str(int(c, 36)) for c in bban + cc + "00")
    check = 98 - int(num) % 97
    s = f"{cc}{check:02d}{bban}"
    if random.random() < 0.5:
        s = " ".join(s[i:i + 4] for i in range(0, len(s), 4))
    return s


def pii_value(t):
    r = random.random
    if t == "EMAIL":
        user = random.choice(["kim", "lee", "park", "john.smith", "a.b", "dev+ops", "jane_doe"])
        return f"{user}{random.randrange(1000)}@{random.choice(['example.com', 'mail.co.kr', 'corp.io', 'uni.ac.uk'])}"
    if t == "PHONE":
        k = random.randrange(6)
        if k == 0:
            return f"010-{random.randrange(1000, 10000)}-{random.randrange(10000):04d}"
        if k == 1:
            return f"010{random.randrange(1000, 10000)}{random.randrange(10000):04d}"
        if k == 2:
            return f"02-{random.randrange(100, 10000)}-{random.randrange(10000):04d}"
        if k == 3:
            return f"+82 10-{random.randrange(1000, 10000)}-{random.randrange(10000):04d}"
        if k == 4:
            return f"+44 20 {random.randrange(1000, 10000)} {random.randrange(10000):04d}"
        return f"({random.randrange(200, 1000)}) {random.randrange(100, 1000)}-{random.randrange(10000):04d}"
    if t == "CARD":
        n = luhn_complete(random.choice(["4", "51", "55", "37", "6011"]), 15 if r() < 0.2 else 16)
        if len(n) == 16:
            sep = random.choice(["", " ", "-"])
            return sep.join(n[i:i + 4] for i in range(0, 16, 4))
        return n
    if t == "IP":
        if r() < 0.7:
            return ".".join(str(random.randrange(1, 255)) for _ in range(4))
        return "2001:db8:" + ":".join(f"{random.randrange(65536):x}" for _ in range(3)) + "::" + f"{random.randrange(1, 65536):x}"
    if t == "IBAN":
        cc, ln = random.choice([("DE", 22), ("GB", 22), ("FR", 27), ("NL", 18)])
        return iban(cc, ln)
    if t == "KR_RRN":
        return f"{random.randrange(100):02d}{random.randrange(1, 13):02d}{random.randrange(1, 29):02d}-{random.randrange(1, 5)}{random.randrange(10**6):06d}"
    if t == "US_SSN":
        return f"{random.choice([random.randrange(1, 666), random.randrange(667, 900)]):03d}-{random.randrange(1, 100):02d}-{random.randrange(1, 10000):04d}"
    raise ValueError(t)


def decoy():
    return random.choice([
        f"on 20{random.randrange(10, 30)}-0{random.randrange(1, 10)}-{random.randrange(10, 29)}",
        f"at {random.randrange(24):02d}:{random.randrange(60):02d}:{random.randrange(60):02d}",
        f"for ${random.randrange(1, 10)},{random.randrange(1000):03d}.{random.randrange(100):02d}",
        f"version {random.randrange(10)}.{random.randrange(20)}.{random.randrange(50)}",
        "ISBN 978-3-16-148410-0",
        f"order #{random.randrange(10**6, 10**7)}",
        f"between {random.randrange(1950, 2000)}-{random.randrange(2000, 2025)}",
        f"pi is 3.14159 and e is 2.71828",
        f"tracking {random.randrange(10**9, 10**10)}",
        f"room {random.randrange(100, 999)} floor {random.randrange(1, 30)}",
    ])


def make_vocab(n):
    random.seed(12345)
    words = set()
    while len(words) < n:
        words.add("".join(random.choice(SYL) for _ in range(random.randrange(2, 4))))
    return sorted(words) + COMMON * 20


def sentence(vocab, n):
    return " ".join(random.choice(vocab) for _ in range(n))


def shingles(text, n=5):
    t = " ".join(text.split()).lower()
    if len(t) <= n:
        return {t}
    return {t[i:i + n] for i in range(len(t) - n + 1)}


def content(row):
    return unicodedata.normalize("NFC", row["prompt"]).strip() + "\n" + unicodedata.normalize("NFC", row["completion"]).strip() + "\n"


def jaccard(a, b):
    x, y = shingles(content(a)), shingles(content(b))
    return len(x & y) / len(x | y)


def generate(path, rows, seed):
    vocab = make_vocab(6000)
    random.seed(seed)
    plan = {"pii": {}, "exact": set(), "near": {}, "rows": rows}
    base = []  # indices usable as duplicate sources (no PII)
    data = []
    with open(path, "w") as f:
        for i in range(rows):
            roll = random.random()
            if roll < 0.03 and len(base) > 100:
                j = random.choice(base)
                src = data[j] if j < len(data) else None
                row = dict(src)
                row["id"] = f"r{i}"
                row["prompt"] = "  " + row["prompt"].upper() + " "
                row["completion"] = row["completion"].replace(" ", "  ", 3)
                plan["exact"].add(i)
            elif roll < 0.06 and len(base) > 100:
                j = random.choice(base)
                row = dict(data[j])
                row["id"] = f"r{i}"
                words = row["completion"].split(" ")
                for _ in range(random.choice([1, 1, 2, 2, 3, 4, 6])):
                    k = random.randrange(len(words))
                    words[k] = random.choice(vocab)
                row["completion"] = " ".join(words)
                plan["near"][i] = round(jaccard(row, data[j]), 4)
            else:
                row = {
                    "id": f"r{i}",
                    "prompt": sentence(vocab, random.randrange(8, 16)) + "?",
                    "completion": sentence(vocab, random.randrange(30, 50)) + ".",
                    "source": random.choice(["web", "forum", "docs", "chat"]),
                }
                if random.random() < 0.1:
                    row["completion"] += f" It was done {decoy()}."
                if roll > 0.95:
                    planted = []
                    for t in random.sample(TYPES, random.choice([1, 1, 2])):
                        v = pii_value(t)
                        planted.append([t, v])
                        field = random.choice(["prompt", "completion"])
                        row[field] += f" Contact details: {v} thanks."
                    plan["pii"][i] = planted
                else:
                    base.append(i)
            data.append(row)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return plan


def evaluate(out, plan, threshold):
    flagged = {}
    with open(os.path.join(out, "rejected.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            flagged[r["line"] - 1] = r["reason"]
    res = {}
    exact_planted = plan["exact"]
    exact_hit = sum(1 for i in exact_planted if flagged.get(i) == "exact_duplicate")
    exact_flagged = [i for i, r in flagged.items() if r == "exact_duplicate"]
    res["exact"] = (exact_hit / max(1, len(exact_planted)),
                    sum(1 for i in exact_flagged if i in exact_planted or i in plan["near"]) / max(1, len(exact_flagged)),
                    len(exact_planted))
    near = {i: j for i, j in plan["near"].items() if j >= threshold}
    near_hit = sum(1 for i in near if flagged.get(i) in ("near_duplicate", "exact_duplicate"))
    near_flagged = [i for i, r in flagged.items() if r == "near_duplicate"]
    res["near"] = (near_hit / max(1, len(near)),
                   sum(1 for i in near_flagged if i in plan["near"] or i in exact_planted) / max(1, len(near_flagged)),
                   len(near))
    res["near_below"] = (sum(1 for j in plan["near"].values() if j < threshold),
                         sum(1 for i, j in plan["near"].items() if j < threshold and i in flagged))
    # Strict precision: a reported near duplicate counts only if its true Jaccard >= threshold.
    res["near_strict"] = sum(1 for i in near_flagged if i in near or i in exact_planted) / max(1, len(near_flagged))
    # PII: read the kept rows back by id.
    kept = {}
    for split in ["train", "val", "holdout", "regression"]:
        with open(os.path.join(out, f"{split}.jsonl")) as f:
            for line in f:
                r = json.loads(line)
                kept[int(r["id"][1:])] = r["prompt"] + "\n" + r["completion"]
    tp = {t: 0 for t in TYPES}
    fn = {t: 0 for t in TYPES}
    fp = {t: 0 for t in TYPES}
    for i, text in kept.items():
        planted = plan["pii"].get(i, [])
        for t in TYPES:
            want = sum(1 for pt, _ in planted if pt == t)
            got = text.count(f"<{t}>")
            leaked = sum(1 for pt, v in planted if pt == t and v in text)
            hit = min(want - leaked, got)
            tp[t] += hit
            fn[t] += want - hit
            fp[t] += got - hit
    for t in TYPES:
        res[t] = (tp[t] / max(1, tp[t] + fn[t]), tp[t] / max(1, tp[t] + fp[t]), tp[t] + fn[t])
    return res


def default_binary():
    if os.environ.get("LORAOPS_BIN"):
        return os.environ["LORAOPS_BIN"]
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "target"))
    for profile in ["release", "debug"]:
        p = os.path.join(target, profile, "loraops")
        if os.path.exists(p):
            return p
    return os.path.join(target, "debug", "loraops")


def check_binary(path):
    """The version line of the real `loraops` CLI at `path`; exits when it is something else."""
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        sys.exit(f"{path}: no loraops binary (build it: cargo build --workspace [--release], or pass --loraops)")
    version = subprocess.run([path, "--version"], stdout=subprocess.PIPE, text=True)
    helptext = subprocess.run([path, "data", "curate", "--help"], stdout=subprocess.PIPE, text=True)
    if version.returncode != 0 or not version.stdout.startswith("loraops ") or "--near-dup-threshold" not in helptext.stdout:
        sys.exit(f"{path} is not the loraops CLI with `data curate` ({version.stdout.strip()!r})")
    return version.stdout.strip()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--loraops", default=default_binary())
    ap.add_argument("--keep", help="work in this directory and keep it")
    ap.add_argument("--reuse", action="store_true", help="reuse the data generated in --keep")
    ap.add_argument("--margin", type=float, help="dedup.margin to curate with (default: its default)")
    ap.add_argument("--curate-args", default="", help="more `data curate` flags, e.g. --proportions or --select")
    args = ap.parse_args()
    binary = os.path.abspath(args.loraops)
    version = check_binary(binary)
    work = args.keep or tempfile.mkdtemp(prefix="curate-bench-")
    os.makedirs(work, exist_ok=True)
    data = os.path.join(work, "in.jsonl")
    t0 = time.time()
    plan_path = os.path.join(work, "plan.json")
    if args.reuse:
        with open(plan_path) as f:
            plan = json.load(f)
        plan["exact"] = set(plan["exact"])
        plan["pii"] = {int(k): v for k, v in plan["pii"].items()}
        plan["near"] = {int(k): v for k, v in plan["near"].items()}
        args.rows = plan["rows"]
    else:
        plan = generate(data, args.rows, args.seed)
        with open(plan_path, "w") as f:
            json.dump(dict(plan, exact=sorted(plan["exact"])), f)
    size = os.path.getsize(data)
    print(f"generated {args.rows} rows ({size / 1e6:.0f} MB) in {time.time() - t0:.0f}s: "
          f"{len(plan['exact'])} exact dups, {len(plan['near'])} near dups, {len(plan['pii'])} rows with PII",
          file=sys.stderr)
    cfg = os.path.join(work, "curate.toml")
    with open(cfg, "w") as f:
        f.write("[curate]\nseed = 1\n")
        if args.margin is not None:
            f.write(f"[curate.dedup]\nmargin = {args.margin}\n")
    out = os.path.join(work, "out")
    t0 = time.time()
    extra = shlex.split(args.curate_args)
    p = subprocess.run([binary, "data", "curate", data, "--out", out, "--config", cfg, "--json"] + extra,
                       stdout=subprocess.PIPE)
    wall = time.time() - t0
    if p.returncode != 0:
        sys.exit(f"curate failed with {p.returncode}")
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    rss = ru.ru_maxrss / 1024
    cpu = ru.ru_utime + ru.ru_stime
    report = json.loads(p.stdout)
    threshold = report["dedup"]["threshold"]
    res = evaluate(out, plan, threshold)
    c = report["counts"]
    print(f"\n| metric | value |\n|---|---|")
    print(f"| binary | {binary} ({version}) |")
    print(f"| rows | {args.rows:,} ({size / 1e6:.0f} MB) |")
    print(f"| wall time | {wall:.1f} s |")
    print(f"| throughput | {args.rows / wall:,.0f} rows/s ({size / 1e6 / wall:.1f} MB/s) |")
    print(f"| CPU time (user+sys) | {cpu:.1f} s ({args.rows / cpu:,.0f} rows per CPU-second) |")
    print(f"| peak RSS | {rss:.0f} MiB |")
    threads = os.environ.get("RAYON_NUM_THREADS") or os.cpu_count()
    print(f"| CPU threads | {threads} (of {os.cpu_count()}) |")
    print(f"| dedup margin | {report['dedup'].get('margin', args.margin)} |")
    if extra:
        print(f"| extra flags | `{' '.join(extra)}` |")
    print(f"| kept / exact dups / near dups / filtered / invalid | {c['kept']:,} / {c['exact_duplicates']:,} / "
          f"{c['near_duplicates']:,} / {c['filtered']:,} / {c['invalid']:,} |")
    if c.get("proportion_dropped") or c.get("not_selected"):
        print(f"| left out by proportions / by MMR selection | {c.get('proportion_dropped', 0):,} / {c.get('not_selected', 0):,} |")
    print(f"\n| planted item | count | recall | precision |\n|---|---|---|---|")
    r, pr, n = res["exact"]
    print(f"| exact duplicates | {n:,} | {r:.4f} | {pr:.4f} |")
    r, pr, n = res["near"]
    print(f"| near duplicates (true Jaccard >= {threshold}) | {n:,} | {r:.4f} | {pr:.4f} |")
    below, below_flagged = res["near_below"]
    print(f"| near duplicates below {threshold} (flagged) | {below:,} ({below_flagged:,}) | | |")
    print(f"| near-dup precision counting planted pairs below {threshold} as false | | | {res['near_strict']:.4f} |")
    for t in TYPES:
        r, pr, n = res[t]
        print(f"| PII {t} | {n:,} | {r:.4f} | {pr:.4f} |")


if __name__ == "__main__":
    main()
