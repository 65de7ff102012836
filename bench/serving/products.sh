#!/usr/bin/env bash
# The decode step's dense products alone (engine/examples/bench_products.rs): one layer of the
# generated ~100M-parameter model's shapes, f32, at 1 to 32 rows; prints a table of time per
# 16 layers and multiply-adds per second.
#
#   bench/serving/products.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/loraops-target}"
# The workspace's features, as the tests build them (see run.sh).
cargo build -q --workspace --examples >&2
exec "$CARGO_TARGET_DIR/debug/examples/bench_products"
