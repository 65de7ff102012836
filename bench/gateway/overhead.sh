#!/usr/bin/env bash
# Gateway overhead: latency (p50, p99) and throughput of a trivial OpenAI-compatible upstream
# called directly vs through `loraops gateway serve --upstream`, side by side in one run, with
# wrk on loopback (streamed chat completions, as clients send them). Prints a table.
#
# Two kinds of rows: closed loops at 2, 8 and 32 connections (each sends its next request as
# soon as the last one ended: throughput at saturation, where latency is mostly queueing on
# the shared cores), and paced rows ("16x4ms": 16 connections, each waiting 4 ms between
# requests), where both sides serve the same moderate rate and the added latency is the
# gateway's own.
#
#   bench/gateway/overhead.sh            # needs wrk (apt-get install wrk); builds if needed
#
# The image ships the release profile; for its figure build it and point the script at it:
#   cargo build --release --bin loraops
#   BENCH_LORAOPS_BIN=$CARGO_TARGET_DIR/release/loraops bench/gateway/overhead.sh
#   DURATION=10 CONNS="2 8 32" PACED="16x4 32x8" bench/gateway/overhead.sh
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
PACED="${PACED:-16x4}"
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

up=$(port); gw=$(port)
WORKERS=1 "$ECHO" "127.0.0.1:$up" 2>/dev/null & pids+=($!); echo_pid=$!
"$BIN" --data-dir "$tmp" model init-tiny "$tmp/tiny" >/dev/null
RUST_LOG=warn "$BIN" --data-dir "$tmp" gateway serve --base-model "$tmp/tiny" --base-name tiny \
  --upstream "http://127.0.0.1:$up/v1" --no-auth --listen "127.0.0.1:$gw" --max-concurrent 1024 --max-queued 4096 2>"$tmp/gw.log" & pids+=($!); gw_pid=$!
wait_port "$up"; wait_port "$gw"

cat >"$tmp/post.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"tiny","stream":true,"max_tokens":2,"messages":[{"role":"user","content":"hi"}]}'
LUA
# The same request, each connection waiting DELAY_MS between its requests.
sed 's/^wrk.method/local pause = tonumber(os.getenv("DELAY_MS") or "0")\nfunction delay() return pause end\nwrk.method/' \
  "$tmp/post.lua" >"$tmp/paced.lua"
# CPU time (user + system) a process has used, in clock ticks.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
run() { # url conns [delay_ms] -> "rps p50_ms p99_ms errors requests"
  local script="$tmp/post.lua"
  [ -n "${3:-}" ] && script="$tmp/paced.lua"
  DELAY_MS="${3:-0}" wrk -t2 -c"$2" -d"${DURATION}s" --latency -s "$script" "$1" | python3 -c '
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
total = int(re.search(r"(\d+) requests in", t).group(1))
print("%.0f %.3f %.3f %d %d" % (rps, ms("50%"), ms("99%"), errors, total))'
}
run "http://127.0.0.1:$up/v1/chat/completions" 2 >/dev/null   # warm-up
run "http://127.0.0.1:$gw/v1/chat/completions" 2 >/dev/null
printf "%-6s | %-28s | %-28s | %-26s | %s\n" conns "direct: req/s p50 p99 (ms)" "gateway: req/s p50 p99 (ms)" "overhead p50 p99 (ms), rps" \
  "CPU us/req: upstream, gateway"
for c in $CONNS $PACED; do
  conns="${c%%x*}"; delay=""
  [ "$conns" != "$c" ] && delay="${c#*x}"
  e0=$(ticks "$echo_pid")
  read -r d_rps d_p50 d_p99 d_err d_n <<<"$(run "http://127.0.0.1:$up/v1/chat/completions" "$conns" $delay)"
  e1=$(ticks "$echo_pid"); g0=$(ticks "$gw_pid")
  read -r g_rps g_p50 g_p99 g_err g_n <<<"$(run "http://127.0.0.1:$gw/v1/chat/completions" "$conns" $delay)"
  g1=$(ticks "$gw_pid")
  python3 - "$c" "$d_rps" "$d_p50" "$d_p99" "$d_err" "$g_rps" "$g_p50" "$g_p99" "$g_err" \
    "$((e1 - e0))" "$d_n" "$((g1 - g0))" "$g_n" "$(getconf CLK_TCK)" <<'PY'
import sys
c, d_rps, d50, d99, derr, g_rps, g50, g99, gerr, e_t, d_n, g_t, g_n, hz = sys.argv[1:]
d_rps, d50, d99, g_rps, g50, g99 = map(float, (d_rps, d50, d99, g_rps, g50, g99))
up_us = int(e_t) / int(hz) * 1e6 / max(int(d_n), 1)
gw_us = int(g_t) / int(hz) * 1e6 / max(int(g_n), 1)
c = c + "ms" if "x" in c else c
print(f"{c:<6} | {d_rps:>7.0f} {d50:>8.3f} {d99:>8.3f} e{derr:<2} | {g_rps:>7.0f} {g50:>8.3f} {g99:>8.3f} e{gerr:<2} | "
      f"{g50 - d50:>+7.3f} {g99 - d99:>+7.3f} {g_rps / d_rps:>5.2f}x   | {up_us:>5.0f} {gw_us:>5.0f}")
PY
done
echo "(2 cores shared by wrk, the upstream and the gateway; gateway: $BIN."
echo " CPU us/req: the upstream's CPU time per request served directly, the gateway's per request it proxied.)"
