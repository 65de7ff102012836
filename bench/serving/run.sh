#!/usr/bin/env bash
# Serving: the native engine and mistral.rs side by side on the CPU, on the generated tiny
# model and a generated ~100M-parameter one (gateway/examples/bench_serving.rs); prints one
# table: single-stream decode vs mistral.rs merged, 32 streams over 32 adapters vs the base and
# the batching gain (both while all 32 decode; a whole burst's gain for reference), RSS with 1/10/100 adapters, NF4 vs f32, adapter load time, and the
# inter-token p99 of 16 streams while a 2,000-token prompt arrives, and json_schema-constrained
# decode vs free (`constrained` runs only that; `nf4` only NF4 vs f32 decode; `batching` only
# 32 adapters vs the base and the batching gain).
#
#   bench/serving/run.sh [all|tiny|100m|constrained|nf4|batching]
# Models and adapters are generated once under $BENCH_SERVING_DIR (default /tmp).
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/loraops-target}"
# The workspace's features, as the tests build them: `-p` would unify features differently
# and rebuild the model crates.
cargo build -q --workspace --examples >&2
RUST_LOG="${RUST_LOG:-error}" exec "$CARGO_TARGET_DIR/debug/examples/bench_serving" "${1:-all}"
