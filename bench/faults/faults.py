#!/usr/bin/env python3
"""Faults and load during change, end to end through the `loraops` binary: a registry on
PostgreSQL and the S3-compatible test server, a gateway (native engine, tiny model) under a
steady load generator on loopback, while versions are pushed, canaries started, promoted and
aborted, pinned versions loaded and evicted, and then faults: the registry killed (SIGKILL)
mid-push and restarted, the registry down while gateways serve, PostgreSQL restarted under
load. After each phase: requests sent and failed (and why), versions pushed vs visible vs
downloadable byte-exact, and after the outage the time the gateway took to follow a routing
change made as soon as the registry was back.

Run through bench/faults/run.sh (it starts PostgreSQL and the S3 server). Options:
  --down SECS   how long the registry stays down (default 60)
  --workers N   concurrent load generator clients (default 4)
  --skip-pg-restart   leave PostgreSQL alone (phase 4 restarts the local cluster)
"""
import argparse, hashlib, json, os, random, signal, socket, struct, subprocess, sys, tempfile, threading, time
import urllib.error, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SECRET = "bench-faults-secret-0123456789"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def http(method, url, token=None, body=None, raw=None, headers=None, timeout=30):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method)
    if body is not None:
        req.add_header("content-type", "application/json")
    if token:
        req.add_header("authorization", f"Bearer {token}")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def binary():
    if os.environ.get("BENCH_LORAOPS_BIN"):
        return os.environ["BENCH_LORAOPS_BIN"]
    subprocess.run(["cargo", "build", "-q", "--bin", "loraops"], cwd=ROOT, check=True)
    out = subprocess.run(["cargo", "metadata", "--format-version", "1", "--no-deps"], cwd=ROOT,
                         check=True, capture_output=True, text=True)
    return os.path.join(json.loads(out.stdout)["target_directory"], "debug", "loraops")


def adapter(model_cfg, seed, r=4):
    """A random PEFT LoRA adapter (q_proj, v_proj) for the tiny model: (files, sha256 per file)."""
    rng = random.Random(seed)
    hidden = model_cfg["hidden_size"]
    heads, kv = model_cfg["num_attention_heads"], model_cfg.get("num_key_value_heads", model_cfg["num_attention_heads"])
    head_dim = model_cfg.get("head_dim") or hidden // heads
    outs = {"q_proj": heads * head_dim, "v_proj": kv * head_dim}
    header, blobs, off = {}, [], 0
    for layer in range(model_cfg["num_hidden_layers"]):
        for m, fout in outs.items():
            for ab, shape in (("A", [r, hidden]), ("B", [fout, r])):
                n = shape[0] * shape[1]
                data = struct.pack(f"<{n}f", *[(rng.random() - 0.5) * 0.02 for _ in range(n)])
                header[f"base_model.model.model.layers.{layer}.self_attn.{m}.lora_{ab}.weight"] = {
                    "dtype": "F32", "shape": shape, "data_offsets": [off, off + len(data)]}
                blobs.append(data)
                off += len(data)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    weights = struct.pack("<Q", len(h)) + h + b"".join(blobs)
    cfg = json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r,
                      "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
                      "base_model_name_or_path": "tiny-llama", "bias": "none"}).encode()
    files = {"adapter_config.json": cfg, "adapter_model.safetensors": weights}
    return files, {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}


def multipart(files):
    b = "loraopsbench"
    out = b""
    for name, data in files.items():
        out += (f"--{b}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}\"\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    return out + f"--{b}--\r\n".encode(), f"multipart/form-data; boundary={b}"


class Stack:
    def __init__(self, args):
        self.bin = binary()
        self.dir = tempfile.mkdtemp(prefix="loraops-faults-")
        self.env = dict(os.environ, LORAOPS_AUTH__HS256_SECRET=SECRET, RUST_LOG="warn")
        self.model = os.path.join(self.dir, "tiny")
        subprocess.run([self.bin, "model", "init-tiny", self.model], check=True, capture_output=True)
        self.model_cfg = json.load(open(os.path.join(self.model, "config.json")))
        pg = os.environ["LORAOPS_TEST_POSTGRES_URL"]
        db = f"loraops_faults_{os.getpid()}"
        subprocess.run(["psql", pg, "-qc", f"CREATE DATABASE {db}"], check=True, capture_output=True)
        self.db_url = pg.rsplit("/", 1)[0] + "/" + db
        s3 = os.environ["LORAOPS_TEST_S3_ENDPOINT"]
        bucket = f"loraops-faults-{os.getpid()}"
        http("PUT", f"{s3}/{bucket}")
        self.rport, self.gport = free_port(), free_port()
        self.registry_url = f"http://127.0.0.1:{self.rport}"
        self.gateway_url = f"http://127.0.0.1:{self.gport}"
        with open(os.path.join(self.dir, "registry.toml"), "w") as f:
            f.write(f"""[registry]
listen = "127.0.0.1:{self.rport}"
database_url = "{self.db_url}"
object_store_url = "s3://{bucket}/registry"
orphan_grace_secs = 5
sweep_interval_secs = 2
controller_tick_ms = 200
[s3]
endpoint = "{s3}"
region = "us-east-1"
access_key_id = "test"
secret_access_key = "test"
allow_http = true
""")
        self.token = {r: self.mint(r) for r in ("admin", "publisher", "deployer", "evaluator", "viewer", "gateway")}
        token_file = os.path.join(self.dir, "gateway.token")
        open(token_file, "w").write(self.token["gateway"])
        with open(os.path.join(self.dir, "gateway.toml"), "w") as f:
            f.write(f"""[gateway]
listen = "127.0.0.1:{self.gport}"
base_model = "{self.model}"
base_name = "tiny-llama"
registry_url = "{self.registry_url}"
registry_token_file = "{token_file}"
require_auth = false
max_adapters = 2
cache_dir = "{self.dir}/hub"
""")
        self.registry = None
        self.start_registry()
        st, body, _ = http("POST", f"{self.registry_url}/api/v1/base-models", self.token["admin"], {
            "name": "tiny-llama", "architecture": "LlamaForCausalLM", "dims": {
                k: self.model_cfg.get(k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                   "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")
                if self.model_cfg.get(k) is not None}})
        assert st == 201, body
        self.gateway = subprocess.Popen([self.bin, "--config", os.path.join(self.dir, "gateway.toml"),
                                         "--data-dir", os.path.join(self.dir, "gw"), "gateway", "serve"],
                                        env=self.env, stdout=subprocess.DEVNULL,
                                        stderr=open(os.path.join(self.dir, "gateway.log"), "w"))
        self.wait(f"{self.gateway_url}/readyz", 600)
        self.pushed = {}  # (name, version) -> sha256 per file

    def mint(self, role):
        return subprocess.run([self.bin, "--data-dir", self.dir, "token", "issue", "--sub", f"bench-{role}",
                               "--role", role, "--ttl", "1d"], env=self.env, check=True,
                              capture_output=True, text=True).stdout.strip()

    def start_registry(self):
        self.registry = subprocess.Popen([self.bin, "--config", os.path.join(self.dir, "registry.toml"),
                                          "--data-dir", os.path.join(self.dir, "reg"), "registry", "serve"],
                                         env=self.env, stdout=subprocess.DEVNULL,
                                         stderr=open(os.path.join(self.dir, "registry.log"), "a"))
        self.wait(f"{self.registry_url}/readyz", 120)

    def kill_registry(self, sig=signal.SIGKILL):
        self.registry.send_signal(sig)
        self.registry.wait()

    @staticmethod
    def wait(url, secs):
        end = time.time() + secs
        while time.time() < end:
            try:
                if http("GET", url, timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"{url} never became ready")

    def push(self, name, seed):
        files, sums = adapter(self.model_cfg, seed)
        body, ctype = multipart(files)
        try:
            st, out, _ = http("POST", f"{self.registry_url}/api/v1/adapters/{name}/versions",
                              self.token["publisher"], raw=body, headers={"content-type": ctype}, timeout=60)
        except OSError as e:
            return None, str(e)
        if st in (200, 201):
            v = json.loads(out)["version"]
            self.pushed[(name, v)] = sums
            return v, None
        return None, f"{st}"

    def evidence(self, name, version):
        st, out, _ = http("GET", f"{self.registry_url}/api/v1/adapters/{name}/versions/{version}", self.token["viewer"])
        digest = json.loads(out)["digest"]
        cases = "".join(json.dumps({"prompt": f"q{i}", "expected": "a"}) + "\n" for i in range(5))
        st, out, _ = http("POST", f"{self.registry_url}/api/v1/suites", self.token["evaluator"],
                          {"manifest": {"name": "bench", "version": "1", "scorer": {"type": "exact"}}, "cases": cases})
        sdig = json.loads(out)["digest"]
        st, out, _ = http("POST", f"{self.registry_url}/api/v1/adapters/{name}/versions/{version}/evidence",
                          self.token["evaluator"], {
                              "adapter_digest": digest, "suite": {"name": "bench", "version": "1", "digest": sdig},
                              "engine": {"engine": "loraops", "engine_version": "bench", "decoding": {}},
                              "metrics": {"accuracy": 1.0}, "cases": 5,
                              "started_at": "2026-01-01T00:00:00Z", "finished_at": "2026-01-01T00:00:01Z"})
        assert st == 201, out

    def rollout(self, name, version, action=None, steps=(50, 100)):
        if action is None:
            self.evidence(name, version)
            st, out, _ = http("POST", f"{self.registry_url}/api/v1/adapters/{name}/rollouts", self.token["deployer"],
                              {"version": version, "steps": list(steps), "interval_secs": 3600})
        else:
            st, out, _ = http("POST", f"{self.registry_url}/api/v1/adapters/{name}/rollouts/current/{action}",
                              self.token["deployer"])
        assert st in (200, 201), (action, st, out)

    def audit(self):
        """(pushed, visible, byte-exact) over every version acknowledged so far."""
        visible = exact = 0
        for (name, v), sums in sorted(self.pushed.items()):
            st, _, _ = http("GET", f"{self.registry_url}/api/v1/adapters/{name}/versions/{v}", self.token["viewer"])
            if st != 200:
                continue
            visible += 1
            ok = True
            for f, want in sums.items():
                st, data, _ = http("GET", f"{self.registry_url}/api/v1/adapters/{name}/versions/{v}/files/{f}",
                                   self.token["viewer"], timeout=60)
                ok &= st == 200 and hashlib.sha256(data).hexdigest() == want
            exact += ok
        return len(self.pushed), visible, exact

    def routing_revision(self):
        return json.loads(http("GET", f"{self.registry_url}/api/v1/routing", self.token["viewer"])[1])["revision"]

    def gateway_revision(self):
        try:
            st, out, _ = http("GET", f"{self.gateway_url}/readyz", timeout=5)
            line = json.loads(out)["checks"].get("registry", "")
            return int(line.split("revision ")[1].split()[0].rstrip(")").rstrip(";")) if "revision " in line else -1
        except (OSError, ValueError, IndexError, KeyError):
            return -1

    def close(self):
        for p in (self.gateway, self.registry):
            if p and p.poll() is None:
                p.terminate()
                p.wait(timeout=30)
        pg = os.environ["LORAOPS_TEST_POSTGRES_URL"]
        db = self.db_url.rsplit("/", 1)[1]
        subprocess.run(["psql", pg, "-qc", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)"], capture_output=True)
        import shutil
        shutil.rmtree(self.dir, ignore_errors=True)


class Load:
    """Clients sending chat completions to the gateway in a loop; counts per phase."""

    def __init__(self, url, workers, models):
        self.url, self.models = url, models
        self.lock = threading.Lock()
        self.reset()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(workers)]
        for t in self.threads:
            t.start()

    def reset(self):
        with getattr(self, "lock", threading.Lock()):
            self.sent, self.failed, self.why = 0, 0, {}

    def run(self, i):
        n = 0
        while not self.stop.is_set():
            n += 1
            model = self.models()[n % len(self.models())]
            body = {"model": model, "max_tokens": 4, "temperature": 0, "user": f"user-{i}-{n % 50}",
                    "messages": [{"role": "user", "content": "hi"}]}
            why = None
            try:
                st, out, _ = http("POST", f"{self.url}/v1/chat/completions", body=body, timeout=60)
                if st != 200:
                    try:
                        why = f"{st} {json.loads(out)['error'].get('code') or ''}".strip()
                    except (ValueError, KeyError, TypeError):
                        why = str(st)
            except OSError as e:
                why = type(e).__name__
            with self.lock:
                self.sent += 1
                if why:
                    self.failed += 1
                    self.why[why] = self.why.get(why, 0) + 1

    def take(self):
        with self.lock:
            out = (self.sent, self.failed, dict(self.why))
            self.sent, self.failed, self.why = 0, 0, {}
        return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--down", type=int, default=60)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--skip-pg-restart", action="store_true",
                    help="leave PostgreSQL alone (it is shared with other work)")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 unless every phase lost no request and no version (the test suite's use)")
    args = ap.parse_args()
    stack = Stack(args)
    rows = []
    try:
        v, err = stack.push("bot", 1)
        assert v == 1, err
        stack.rollout("bot", 1)
        stack.rollout("bot", 1, "promote")
        models = ["bot", "tiny-llama"]
        load = Load(stack.gateway_url, args.workers, lambda: models)
        time.sleep(3)
        load.take()

        # 1. Change under load: pushes, a canary promoted, one aborted, pinned versions loaded
        #    and evicted (the gateway keeps 2 adapters resident).
        for seed in (2, 3, 4):
            stack.push("bot", seed)
        stack.rollout("bot", 2)
        time.sleep(2)
        stack.rollout("bot", 2, "promote")
        time.sleep(1)
        stack.rollout("bot", 3)
        time.sleep(2)
        stack.rollout("bot", 3, "abort")
        models[:] = ["bot", "tiny-llama", "bot@1", "bot@3", "bot@4"]
        time.sleep(5)
        models[:] = ["bot", "tiny-llama"]
        rows.append(("change: push, canary, promote, abort, load/evict", *load.take(), *stack.audit(), ""))

        # 2. Registry killed (SIGKILL) mid-push, restarted; the sweep cleans up.
        files, _ = adapter(stack.model_cfg, 99, r=64)
        body, ctype = multipart(files)
        t = threading.Thread(target=lambda: http_safe("POST", f"{stack.registry_url}/api/v1/adapters/bot/versions",
                                                     stack.token["publisher"], body, ctype), daemon=True)
        t.start()
        time.sleep(0.05)
        stack.kill_registry()
        t.join()
        stack.start_registry()
        time.sleep(8)  # past the grace period and a sweep
        pushed, visible, exact = stack.audit()
        leftover = subprocess.run(["psql", stack.db_url, "-tAc", "SELECT count(*) FROM uploads"],
                                  capture_output=True, text=True).stdout.strip()
        rows.append(("registry SIGKILL mid-push, restart", *load.take(), pushed, visible, exact,
                     f"pending uploads after sweep: {leftover}"))

        # 3. Registry down while the gateway serves; on return, a routing change is made at
        #    once and timed until the gateway follows it.
        stack.kill_registry(signal.SIGTERM)
        time.sleep(args.down)
        stack.start_registry()
        v, err = stack.push("bot", 5)
        t0 = time.time()
        stack.rollout("bot", v)
        stack.rollout("bot", v, "promote")
        rev = stack.routing_revision()
        while stack.gateway_revision() < rev and time.time() - t0 < 120:
            time.sleep(0.05)
        follow = time.time() - t0
        rows.append((f"registry down {args.down} s while serving", *load.take(), *stack.audit(),
                     f"gateway follows routing {follow:.1f} s after the registry returned"))

        # 4. PostgreSQL restarted under load, pushes running.
        if args.skip_pg_restart:
            load.stop.set()
            return finish(rows, args.check)
        results = []
        pusher = threading.Thread(target=lambda: results.extend(stack.push("bot", 100 + i) for i in range(10)), daemon=True)
        pusher.start()
        time.sleep(0.3)
        cluster = os.listdir("/etc/postgresql")[0]
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", cluster, "main", "restart"],
                       check=True, capture_output=True)
        pusher.join()
        refused = sum(1 for v, e in results if v is None)
        rows.append(("PostgreSQL restarted under load", *load.take(), *stack.audit(),
                     f"pushes refused during the restart: {refused} of {len(results)} (clients retry)"))
        load.stop.set()
    finally:
        stack.close()
    finish(rows, args.check)


def finish(rows, check):
    print_table(rows)
    if not check:
        return
    def lost(r):
        leftover = (r[7] or "").startswith("pending uploads") and not r[7].endswith(": 0")
        return r[2] != 0 or not (r[4] == r[5] == r[6]) or leftover
    bad = [r[0] for r in rows if lost(r)]
    if bad:
        raise SystemExit(f"faults: requests or versions lost in: {', '.join(bad)}")
    print("faults: no request failed, every pushed version visible and byte-exact")


def print_table(rows):
    head = ("phase", "requests", "failed", "why", "versions pushed", "visible", "byte-exact", "notes")
    table = [head] + [(r[0], str(r[1]), str(r[2]), ", ".join(f"{k}: {n}" for k, n in sorted(r[3].items())) or "-",
                       str(r[4]), str(r[5]), str(r[6]), r[7] or "-") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for i, row in enumerate(table):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def http_safe(method, url, token, body, ctype):
    try:
        http(method, url, token, raw=body, headers={"content-type": ctype}, timeout=30)
    except OSError:
        pass


if __name__ == "__main__":
    main()
