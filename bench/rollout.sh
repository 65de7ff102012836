#!/usr/bin/env bash
# Rollout figures: canary share vs configured weight per step (healthy canary, promoted), and
# time + requests from a faulty canary's first request to its rollback, at the default spec
# (steps 5/25/50/100, 60 s interval, 50 requests minimum, 2 failures). A whole stack in one
# process (gateway/examples/bench_rollout.rs). About 6 minutes at the default interval.
#
#   bench/rollout.sh [INTERVAL_SECS]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/loraops-target}"
if [ -z "${BENCH_ROLLOUT_BIN:-}" ]; then
  cargo build -q --workspace --examples >&2
fi
RUST_LOG="${RUST_LOG:-error}" exec "${BENCH_ROLLOUT_BIN:-$CARGO_TARGET_DIR/debug/examples/bench_rollout}" "${1:-60}"
