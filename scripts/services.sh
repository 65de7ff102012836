# Services the tests need, started when missing. Sourced by scripts/test and the benchmarks.
#   ensure_postgres: PostgreSQL on 127.0.0.1:5432 (exports LORAOPS_TEST_POSTGRES_URL)
#   ensure_s3:       an S3-compatible server (moto) on loopback (exports LORAOPS_TEST_S3_ENDPOINT)
#   ensure_openai:   the official `openai` clients, Python and npm (exports
#                    LORAOPS_TEST_OPENAI_PYTHON and LORAOPS_TEST_OPENAI_NODE_PATH)
#   ensure_browser:  Chromium (Debian's package) and playwright-core for the console's browser
#                    test (exports LORAOPS_TEST_CHROMIUM and LORAOPS_TEST_PLAYWRIGHT_NODE_PATH)

LORAOPS_CACHE="${LORAOPS_CACHE:-$HOME/.cache/loraops}"

ensure_postgres() {
  if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
    echo "starting PostgreSQL" >&2
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
    for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
  fi
  pg_isready -h 127.0.0.1 -p 5432 >&2
  export LORAOPS_TEST_POSTGRES_URL="${LORAOPS_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}"
}

ensure_s3() {
  if [ -n "${LORAOPS_TEST_S3_ENDPOINT:-}" ]; then return; fi
  local venv="$LORAOPS_CACHE/moto-venv"
  if [ ! -x "$venv/bin/moto_server" ]; then
    echo "installing moto (S3-compatible test server) into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q 'moto[server]==5.*'
  fi
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  "$venv/bin/moto_server" -H 127.0.0.1 -p "$port" >"${TMPDIR:-/tmp}/loraops-moto-$port.log" 2>&1 &
  LORAOPS_MOTO_PID=$!
  trap 'kill $LORAOPS_MOTO_PID 2>/dev/null || true' EXIT
  for _ in $(seq 1 60); do
    curl -sf "http://127.0.0.1:$port/" >/dev/null 2>&1 && break
    sleep 0.5
  done
  curl -sf "http://127.0.0.1:$port/" >/dev/null || { echo "moto did not start" >&2; return 1; }
  export LORAOPS_TEST_S3_ENDPOINT="http://127.0.0.1:$port"
  export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_DEFAULT_REGION=us-east-1
}

ensure_openai() {
  if [ -z "${LORAOPS_TEST_OPENAI_PYTHON:-}" ]; then
    local venv="$LORAOPS_CACHE/openai-venv"
    if ! "$venv/bin/python" -c 'import openai' 2>/dev/null; then
      echo "installing the openai Python client into $venv" >&2
      python3 -m venv "$venv"
      "$venv/bin/pip" install -q 'openai>=1.50,<3'
    fi
    export LORAOPS_TEST_OPENAI_PYTHON="$venv/bin/python"
  fi
  if [ -n "${LORAOPS_TEST_OPENAI_NODE_PATH:-}" ]; then return; fi
  # The official npm client too (Node.js from the distribution).
  local npm_dir="$LORAOPS_CACHE/openai-npm"
  if [ ! -d "$npm_dir/node_modules/openai" ]; then
    echo "installing the openai npm client into $npm_dir" >&2
    mkdir -p "$npm_dir"
    npm install --silent --no-audit --no-fund --prefix "$npm_dir" 'openai@^6' >&2
  fi
  export LORAOPS_TEST_OPENAI_NODE_PATH="$npm_dir/node_modules"
}

ensure_browser() {
  if [ -z "${LORAOPS_TEST_CHROMIUM:-}" ]; then
    if [ ! -x /usr/bin/chromium ]; then
      echo "installing chromium with apt-get" >&2
      if ! apt-cache show chromium >/dev/null 2>&1; then
        apt-get update -qq >&2
      fi
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
    fi
    export LORAOPS_TEST_CHROMIUM=/usr/bin/chromium
  fi
  if [ -n "${LORAOPS_TEST_PLAYWRIGHT_NODE_PATH:-}" ]; then return; fi
  # playwright-core only: it drives the system Chromium and downloads no browser of its own.
  local npm_dir="$LORAOPS_CACHE/console-npm"
  if [ ! -d "$npm_dir/node_modules/playwright-core" ]; then
    echo "installing playwright-core into $npm_dir" >&2
    mkdir -p "$npm_dir"
    npm install --silent --no-audit --no-fund --prefix "$npm_dir" 'playwright-core@^1.50' >&2
  fi
  export LORAOPS_TEST_PLAYWRIGHT_NODE_PATH="$npm_dir/node_modules"
}

ensure_schemathesis() {
  if [ -n "${LORAOPS_SCHEMATHESIS:-}" ]; then return; fi
  local venv="$LORAOPS_CACHE/schemathesis-venv"
  if [ ! -x "$venv/bin/schemathesis" ]; then
    echo "installing schemathesis (API fuzzing) into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q 'schemathesis>=4,<5'
  fi
  export LORAOPS_SCHEMATHESIS="$venv/bin/schemathesis"
}
