#!/usr/bin/env bash
# `loraops model quantize` on one thread and on all cores, side by side: a generated model with
# hidden 2048 x 4 layers (about 190M quantised parameters, 0.8 GB in f32), best of 3 each.
#
#     bench/quantize/bench.sh [LORAOPS_BIN]
set -euo pipefail
cd "$(dirname "$0")/../.."
bin="${1:-${CARGO_TARGET_DIR:-target}/debug/loraops}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$bin" model init-tiny "$work/model" --layers 4 --hidden 2048 --heads 16 --kv-heads 8 --vocab 32000 >/dev/null
best() { # threads -> best wall seconds of 3 runs
    local b=""
    for _ in 1 2 3; do
        rm -rf "$work/q"
        local s e
        s=$(date +%s.%N)
        RAYON_NUM_THREADS=$1 "$bin" model quantize "$work/model" --out "$work/q" >/dev/null
        e=$(date +%s.%N)
        b=$(echo "$s $e ${b:-1e9}" | awk '{d=$2-$1; print (d<$3)?d:$3}')
    done
    echo "$b"
}
cores=$(nproc)
one=$(best 1)
all=$(best "$cores")
params=$("$bin" --json model quantize "$work/model" --out "$work/q2" | python3 -c 'import json,sys; print(json.load(sys.stdin)["quantized_params"])')
echo
echo "| threads | seconds | M params/s | speed-up |"
echo "|---|---|---|---|"
awk -v p="$params" -v one="$one" -v all="$all" -v c="$cores" 'BEGIN {
    printf "| 1 | %.2f | %.0f | 1.00x |\n", one, p / one / 1e6;
    printf "| %d | %.2f | %.0f | %.2fx |\n", c, all, p / all / 1e6, one / all }'
