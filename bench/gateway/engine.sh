#!/usr/bin/env bash
# Embedded engine: decode tokens/s of mistral.rs directly vs through the gateway (base and
# adapter, tiny and ~100M models), and routing change -> new version serving under load.
# Everything runs in one process (gateway/examples/bench_engine.rs); prints tables.
#
#   bench/gateway/engine.sh [REQUESTS]
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/loraops-target}"
if [ -z "${BENCH_ENGINE_BIN:-}" ]; then
  cargo build -q --workspace --examples >&2
fi
RUST_LOG="${RUST_LOG:-error}" exec "${BENCH_ENGINE_BIN:-$CARGO_TARGET_DIR/debug/examples/bench_engine}" "${1:-8}"
