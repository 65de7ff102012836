#!/usr/bin/env bash
# Faults and load during change (see faults.py): prints a table of requests sent/failed and
# why, versions pushed vs visible vs downloadable byte-exact after each phase, and the time a
# gateway takes to follow the routing table after the registry returns.
#
#   bench/faults/run.sh [--down SECS] [--workers N] [--skip-pg-restart] [--check]
# With --check (scripts/test runs it so) it exits 1 when any phase lost a request or a version.
# Builds the binary with cargo unless BENCH_LORAOPS_BIN names one. Restarts the local
# PostgreSQL cluster (phase 4): run it on a machine where that is fine.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/services.sh
ensure_postgres
ensure_s3
# Not exec: the S3 server ensure_s3 started is stopped when this shell exits.
python3 bench/faults/faults.py "$@"
