#!/usr/bin/env bash
# Gateway overhead: latency (p50, p99) and throughput of a trivial OpenAI-compatible upstream
# called directly vs through `loraops gateway serve --upstream`, side by side in one run, with
# wrk on loopback (streamed chat completions, as clients send them). Prints a table.
#
#   bench/gateway/overhead.sh            # needs wrk (apt-get install wrk); builds if needed
#   DURATION=10 CONNS="2 8 32" bench/gateway/overhead.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/loraops-target}"
command -v wrk >/dev/null || { echo "wrk is needed: apt-get install wrk" >&2; exit 1; }
if [ -z "${BENCH_LORAOPS_BIN:-}" ]; then
  cargo build -q --workspace --examples --bins >&2
fi
BIN="${BENCH_LORAOPS_BIN:-$CARGO_TARGET_DIR/debug/loraops}"
ECHO="${BENCH_ECHO_BIN:-$CARGO_TARGET_DIR/debug/examples/echo_upstream}"
DURATION="${DURATION:-8}"
CONNS="${CONNS:-2 8 32}"
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

up=$(port); gw=$(port)
WORKERS=1 "$ECHO" "127.0.0.1:$up" 2>/dev/null & pids+=($!)
"$BIN" --data-dir "$tmp" model init-tiny "$tmp/tiny" >/dev/null
RUST_LOG=warn "$BIN" --data-dir "$tmp" gateway serve --base-model "$tmp/tiny" --base-name tiny \
  --upstream "http://127.0.0.1:$up/v1" --no-auth --listen "127.0.0.1:$gw" --max-concurrent 1024 --max-queued 4096 2>"$tmp/gw.log" & pids+=($!)
wait_port "$up"; wait_port "$gw"

cat >"$tmp/post.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"tiny","stream":true,"max_tokens":2,"messages":[{"role":"user","content":"hi"}]}'
LUA
run() { # url conns -> "rps p50_ms p99_ms errors"
  wrk -t2 -c"$2" -d"${DURATION}s" --latency -s "$tmp/post.lua" "$1" | python3 -c '
import re, sys
t = sys.stdin.read()
def ms(label):
    m = re.search(r"^\s*" + label + r"\s+([\d.]+)(us|ms|s)\s*$", t, re.M)
    v, u = float(m.group(1)), m.group(2)
    return v / 1000 if u == "us" else v * 1000 if u == "s" else v
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
err = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", t)
errors = (int(err.group(1)) if err else 0) + (sum(map(int, sock.groups())) if sock else 0)
print("%.0f %.3f %.3f %d" % (rps, ms("50%"), ms("99%"), errors))'
}
run "http://127.0.0.1:$up/v1/chat/completions" 2 >/dev/null   # warm-up
run "http://127.0.0.1:$gw/v1/chat/completions" 2 >/dev/null
printf "%-6s | %-28s | %-28s | %-24s\n" conns "direct: req/s p50 p99 (ms)" "gateway: req/s p50 p99 (ms)" "overhead p50 p99 (ms), rps"
for c in $CONNS; do
  read -r d_rps d_p50 d_p99 d_err <<<"$(run "http://127.0.0.1:$up/v1/chat/completions" "$c")"
  read -r g_rps g_p50 g_p99 g_err <<<"$(run "http://127.0.0.1:$gw/v1/chat/completions" "$c")"
  python3 - "$c" "$d_rps" "$d_p50" "$d_p99" "$d_err" "$g_rps" "$g_p50" "$g_p99" "$g_err" <<'PY'
import sys
c, d_rps, d50, d99, derr, g_rps, g50, g99, gerr = sys.argv[1:]
d_rps, d50, d99, g_rps, g50, g99 = map(float, (d_rps, d50, d99, g_rps, g50, g99))
print(f"{c:<6} | {d_rps:>7.0f} {d50:>8.3f} {d99:>8.3f} e{derr:<2} | {g_rps:>7.0f} {g50:>8.3f} {g99:>8.3f} e{gerr:<2} | "
      f"{g50 - d50:>+7.3f} {g99 - d99:>+7.3f} {g_rps / d_rps:>5.2f}x")
PY
done
echo "(2 cores shared by wrk, the upstream and the gateway; dev profile with optimised dependencies and gateway)"
