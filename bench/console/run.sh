#!/usr/bin/env bash
# Console page timings: starts `loraops up` on free ports over a temporary data dir, seeds it
# over the REST API (seed.cjs: one adapter with 1,000 versions, 100 adapters each with a
# running canary, a training run with 1,000 steps of curves), then loads each console page in
# headless Chromium (timing.cjs) and prints a markdown table of median and p95 milliseconds
# from navigation start to the page rendered, against a 200 ms goal.
#
#   bench/console/run.sh [LOADS]
# BENCH_LORAOPS_BIN: the binary (default ${CARGO_TARGET_DIR:-target}/release/loraops, else
# …/debug/loraops). The console is served from registry/ui on disk (LORAOPS_UI_DIR), so the
# files of this checkout are measured; BENCH_CONSOLE_EMBEDDED=1 measures the binary's copy.
# BENCH_VERSIONS / BENCH_ADAPTERS change the seeded counts; BENCH_CHECK=1 exits 1 on a miss.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
LOADS="${1:-10}"

BIN="${BENCH_LORAOPS_BIN:-}"
if [ -z "$BIN" ]; then
  target="${CARGO_TARGET_DIR:-target}"
  BIN="$target/release/loraops"
  [ -x "$BIN" ] || BIN="$target/debug/loraops"
fi
if [ ! -x "$BIN" ]; then
  echo "bench/console: no loraops binary at $BIN (build one, or set BENCH_LORAOPS_BIN)" >&2
  exit 1
fi
BIN=$(realpath "$BIN")

. scripts/services.sh
ensure_browser
export NODE_PATH="$LORAOPS_TEST_PLAYWRIGHT_NODE_PATH"
export CHROMIUM="$LORAOPS_TEST_CHROMIUM"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/loraops-console-bench.XXXXXX")
UP_PID=""
cleanup() {
  if [ -n "$UP_PID" ]; then kill "$UP_PID" 2>/dev/null || true; wait "$UP_PID" 2>/dev/null || true; fi
  if [ -z "${BENCH_KEEP:-}" ]; then rm -rf "$WORK"; else echo "kept $WORK" >&2; fi
}
trap cleanup EXIT

# Two distinct free ports (both held open while they are picked).
free_ports() {
  node -e 'const net=require("net");const a=net.createServer().listen(0,"127.0.0.1",()=>{const b=net.createServer().listen(0,"127.0.0.1",()=>{console.log(a.address().port,b.address().port);a.close();b.close()})})'
}
export LORAOPS_AUTH__HS256_SECRET="console-bench-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
export RUST_LOG="${RUST_LOG:-warn}"
if [ -z "${BENCH_CONSOLE_EMBEDDED:-}" ]; then export LORAOPS_UI_DIR="$ROOT/registry/ui"; fi

"$BIN" model init-tiny "$WORK/tiny" >/dev/null
read -r RP GP < <(free_ports)
REGISTRY="http://127.0.0.1:$RP"
"$BIN" --data-dir "$WORK/data" up --listen "127.0.0.1:$RP" --gateway-listen "127.0.0.1:$GP" \
  --base-model "$WORK/tiny" >"$WORK/up.log" 2>&1 &
UP_PID=$!
for _ in $(seq 1 600); do
  curl -sf "http://127.0.0.1:$GP/readyz" >/dev/null 2>&1 && break
  kill -0 "$UP_PID" 2>/dev/null || { echo "loraops up exited:" >&2; cat "$WORK/up.log" >&2; exit 1; }
  sleep 0.25
done
curl -sf "$REGISTRY/readyz" >/dev/null || { echo "the registry is not ready:" >&2; cat "$WORK/up.log" >&2; exit 1; }

TOKEN=$("$BIN" --data-dir "$WORK/data" token issue --sub bench --role admin --ttl 1h)
SEED=$(node bench/console/seed.cjs "$REGISTRY" "$TOKEN" "$WORK/tiny" "${BENCH_VERSIONS:-1000}" "${BENCH_ADAPTERS:-100}")
BENCH_GATEWAY_URL="http://127.0.0.1:$GP" node bench/console/timing.cjs "$REGISTRY" "$TOKEN" "$SEED" "$LOADS"
