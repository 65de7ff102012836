//! README.md's walkthrough, run as written, so that it cannot rot: its commands are read out of
//! the README's section "From your data to a canary" and run in order with bash, each one's
//! output compared with the excerpt the README shows under it, and each step's claim checked
//! from the outside: files on disk, the registry's state, the gateway answering.
//!
//! In the README a command is a `$ ` line of a ```sh block (with `> ` lines continuing it, as a
//! shell's second prompt shows them); the lines under it are an excerpt of what it prints, `…`
//! standing for what is left out, and a line of its own `…` for lines left out. The commands
//! run in a scratch HOME, from a scratch checkout holding `examples/`, with the `loraops` under
//! test first on PATH; exports and the working directory carry from one command to the next,
//! as in one terminal. A command ending in `&` runs in the background until the test ends.
//! The only change to what the README says: its ports 8400 (registry) and 8500 (gateway)
//! become free ports, and `loraops up` is told them, so tests in parallel never collide.

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::helpers::{exe, free_port};

const README: &str = include_str!("../../README.md");
const SECTION: &str = "## From your data to a canary";

/// Longest a foreground command may run.
const COMMAND_LIMIT: Duration = Duration::from_secs(300);
/// Longest a background command may take to print what the README shows.
const BACKGROUND_LIMIT: Duration = Duration::from_secs(120);

/// One `$ ` command of the README and the excerpt of its output shown under it.
#[derive(Debug)]
struct Step {
    /// Line number in README.md.
    line: usize,
    command: String,
    expected: Vec<String>,
}

impl Step {
    fn background(&self) -> Option<&str> {
        self.command.trim_end().strip_suffix('&').map(str::trim_end)
    }
}

/// The section's commands, in order.
fn walkthrough(readme: &str) -> Vec<Step> {
    let mut lines = readme
        .lines()
        .enumerate()
        .skip_while(|(_, l)| l.trim_end() != SECTION);
    assert!(lines.next().is_some(), "README.md has no {SECTION:?}");
    let mut steps: Vec<Step> = Vec::new();
    // Inside a fence: whether it is a ```sh one.
    let mut fence: Option<bool> = None;
    for (i, l) in lines {
        if fence.is_none() && l.starts_with("## ") {
            break;
        }
        if l.starts_with("```") {
            fence = match fence {
                Some(_) => None,
                None => Some(l.trim_end() == "```sh"),
            };
            continue;
        }
        if fence != Some(true) || l.trim().is_empty() {
            continue;
        }
        if let Some(c) = l.strip_prefix("$ ") {
            steps.push(Step {
                line: i + 1,
                command: c.to_string(),
                expected: Vec::new(),
            });
            continue;
        }
        let step = steps
            .last_mut()
            .unwrap_or_else(|| panic!("README.md:{}: output before any `$ ` command", i + 1));
        match l
            .strip_prefix("> ")
            .or(if l == ">" { Some("") } else { None })
        {
            Some(c) if step.expected.is_empty() => {
                step.command.push('\n');
                step.command.push_str(c);
            }
            _ => step.expected.push(l.trim_end().to_string()),
        }
    }
    steps
}

/// Whether one output line shows an excerpt line: its pieces between `…` in order, the first
/// at the line's start and the last at its end unless the excerpt starts or ends with `…`.
fn line_shows(line: &str, excerpt: &str) -> bool {
    let line = line.trim_end();
    let pieces: Vec<&str> = excerpt.split('…').collect();
    let mut rest = line;
    for (i, p) in pieces.iter().enumerate() {
        if p.is_empty() {
            continue;
        }
        let at = if i == 0 {
            rest.starts_with(p).then_some(0)
        } else if i == pieces.len() - 1 {
            rest.ends_with(p).then(|| rest.len() - p.len())
        } else {
            rest.find(p)
        };
        let Some(at) = at else { return false };
        rest = &rest[at + p.len()..];
    }
    // Without `…` the excerpt is the whole line.
    pieces.len() > 1 || rest.is_empty()
}

/// Where the output stops showing the excerpt, if it does not: the first excerpt line that no
/// later output line shows.
fn unshown<'a>(output: &str, expected: &'a [String]) -> Option<&'a str> {
    let lines: Vec<&str> = output.lines().map(|l| l.trim_end_matches('\r')).collect();
    let mut at = 0;
    for e in expected.iter().filter(|e| e.as_str() != "…") {
        match lines[at..].iter().position(|l| line_shows(l, e)) {
            Some(k) => at += k + 1,
            None => return Some(e),
        }
    }
    None
}

/// A process group started in the background, ended when the walk ends.
struct Background {
    child: Child,
    log: PathBuf,
}

impl Drop for Background {
    fn drop(&mut self) {
        kill_group(&mut self.child);
    }
}

fn kill_group(child: &mut Child) {
    let group = format!("-{}", child.id());
    for signal in ["-TERM", "-KILL"] {
        let _ = Command::new("kill").args([signal, "--", &group]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let _ = child.wait();
}

/// The terminal the README's commands run in, and what the test knows of their effects.
struct Walk {
    home: PathBuf,
    /// The exported environment (`export -p`) and working directory after the last command.
    env_file: PathBuf,
    cwd_file: PathBuf,
    logs: PathBuf,
    registry_port: u16,
    gateway_port: u16,
    background: Vec<Background>,
    rt: tokio::runtime::Runtime,
    http: reqwest::Client,
    /// A viewer token of the walk's registry, for the checks.
    viewer: Option<String>,
    /// The claims checked so far, by the command that makes them.
    checked: BTreeSet<&'static str>,
    /// Adapter name and version pushed; suite pushed.
    adapter: Option<(String, u64)>,
    suite: Option<String>,
    _tmp: tempfile::TempDir,
}

impl Walk {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let checkout = tmp.path().join("checkout");
        let home = tmp.path().join("home");
        let logs = tmp.path().join("logs");
        for d in [&checkout.join("examples"), &home, &logs] {
            std::fs::create_dir_all(d).unwrap();
        }
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        for e in std::fs::read_dir(repo.join("examples")).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), checkout.join("examples").join(e.file_name())).unwrap();
        }
        let cwd_file = tmp.path().join("cwd");
        std::fs::write(&cwd_file, checkout.to_str().unwrap()).unwrap();
        let env_file = tmp.path().join("env");
        std::fs::write(&env_file, "").unwrap();
        Self {
            home,
            env_file,
            cwd_file,
            logs,
            registry_port: free_port(),
            gateway_port: free_port(),
            background: Vec::new(),
            rt: tokio::runtime::Runtime::new().unwrap(),
            http: reqwest::Client::new(),
            viewer: None,
            checked: BTreeSet::new(),
            adapter: None,
            suite: None,
            _tmp: tmp,
        }
    }

    /// The README's text with this walk's ports.
    fn ported(&self, text: &str) -> String {
        text.replace("8400", &self.registry_port.to_string())
            .replace("8500", &self.gateway_port.to_string())
    }

    /// The command as it runs here: this walk's ports, and `loraops up` told them.
    fn runnable(&self, command: &str) -> String {
        self.ported(command).replace(
            "loraops up",
            &format!(
                "loraops up --listen 127.0.0.1:{} --gateway-listen 127.0.0.1:{}",
                self.registry_port, self.gateway_port
            ),
        )
    }

    fn cwd(&self) -> PathBuf {
        PathBuf::from(std::fs::read_to_string(&self.cwd_file).unwrap().trim_end())
    }

    /// bash running `body` in the walk's terminal state, its output (both streams) in `log`.
    fn bash(&self, body: &str, log: &Path) -> Command {
        let bin = Path::new(exe()).parent().unwrap();
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let script = format!(
            "set -o pipefail\nsource {env}\ncd \"$(cat {cwd})\" || exit 1\n{body}\n",
            env = self.env_file.display(),
            cwd = self.cwd_file.display(),
        );
        let out = File::create(log).unwrap();
        let mut c = Command::new("bash");
        c.args(["-c", &script])
            .env("HOME", &self.home)
            .env("PATH", path)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        // The README's reader has no loraops settings of their own.
        for (k, _) in std::env::vars() {
            if k.starts_with("LORAOPS_") {
                c.env_remove(k);
            }
        }
        std::os::unix::process::CommandExt::process_group(&mut c, 0);
        c
    }

    /// Run one step: in the foreground to its end, or in the background until it prints what
    /// the README shows. Returns its output.
    fn run(&mut self, n: usize, step: &Step) -> String {
        let log = self.logs.join(format!("{n:02}.log"));
        if let Some(command) = step.background() {
            return self.run_background(step, command, &log);
        }
        let command = self.runnable(&step.command);
        let body = format!(
            "{command}\nrc=$?\nexport -p > {env}\npwd > {cwd}\nexit $rc",
            env = self.env_file.display(),
            cwd = self.cwd_file.display()
        );
        let mut child = self.bash(&body, &log).spawn().unwrap();
        let deadline = Instant::now() + COMMAND_LIMIT;
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                kill_group(&mut child);
                panic!(
                    "README.md:{}: `{command}` ran longer than {COMMAND_LIMIT:?}:\n{}",
                    step.line,
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let output = std::fs::read_to_string(&log).unwrap();
        assert!(
            status.success(),
            "README.md:{}: `{command}` failed ({status}):\n{output}",
            step.line
        );
        self.assert_shows(step, &command, &output);
        output
    }

    fn run_background(&mut self, step: &Step, command: &str, log: &Path) -> String {
        // Another test may take a free port before `up` binds it: then it starts again on others.
        let mut last = String::new();
        for _ in 0..3 {
            let command = self.runnable(command);
            let child = self.bash(&command, log).spawn().unwrap();
            let mut bg = Background {
                child,
                log: log.to_path_buf(),
            };
            let expected: Vec<String> = step.expected.iter().map(|e| self.ported(e)).collect();
            let deadline = Instant::now() + BACKGROUND_LIMIT;
            loop {
                let output = std::fs::read_to_string(&bg.log).unwrap_or_default();
                if unshown(&output, &expected).is_none() {
                    self.background.push(bg);
                    return output;
                }
                // Ended before showing it: most likely a port taken meanwhile (the reason is
                // wherever the command sends its errors); the last try reports it.
                if bg.child.try_wait().unwrap().is_some() {
                    last = output;
                    break;
                }
                if Instant::now() > deadline {
                    self.assert_shows(step, &command, &output);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            drop(bg);
            self.registry_port = free_port();
            self.gateway_port = free_port();
        }
        panic!(
            "README.md:{}: `{command}` ended three times before printing what the README \
             shows; the last time it printed:\n{last}",
            step.line
        );
    }

    fn assert_shows(&self, step: &Step, command: &str, output: &str) {
        let expected: Vec<String> = step.expected.iter().map(|e| self.ported(e)).collect();
        if let Some(missing) = unshown(output, &expected) {
            panic!(
                "README.md:{}: `{command}` does not print what the README shows.\n\
                 No line (after the ones matched before it) shows\n  {missing}\n\
                 The README shows:\n{}\nIt printed:\n{output}",
                step.line,
                expected.join("\n")
            );
        }
    }

    /// A variable the walk's terminal exported.
    fn exported(&self, name: &str) -> Option<String> {
        let env = std::fs::read_to_string(&self.env_file).unwrap();
        let prefix = format!("declare -x {name}=\"");
        env.lines()
            .find_map(|l| l.strip_prefix(&prefix)?.strip_suffix('"'))
            .map(str::to_string)
    }

    fn registry(&self) -> String {
        format!("http://127.0.0.1:{}", self.registry_port)
    }

    fn gateway(&self) -> String {
        format!("http://127.0.0.1:{}", self.gateway_port)
    }

    /// GET on the registry's API with the checks' viewer token: the JSON of a 200.
    fn api(&self, path: &str) -> Value {
        let token = self.viewer.as_deref().expect("a viewer token");
        let url = format!("{}/api/v1{path}", self.registry());
        self.rt.block_on(async {
            let res = self.http.get(&url).bearer_auth(token).send().await.unwrap();
            let status = res.status();
            let body: Value = res.json().await.unwrap_or(Value::Null);
            assert_eq!(status, 200, "GET {url}: {body}");
            body
        })
    }

    /// Wait until `ready` holds, at most `limit`.
    fn eventually(&self, what: &str, limit: Duration, mut ready: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + limit;
        while !ready(self) {
            assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn status_of(&self, url: &str) -> Option<u16> {
        self.rt.block_on(async {
            let res = self.http.get(url).send().await.ok()?;
            Some(res.status().as_u16())
        })
    }

    /// Check from the outside what the step's command claims to have done.
    fn check(&mut self, command: &str, output: &str) {
        let words: Vec<&str> = command.split_whitespace().collect();
        let flag = |name: &str| -> Option<String> {
            let i = words.iter().position(|w| *w == name)?;
            words.get(i + 1).map(|v| v.to_string())
        };
        let cwd = self.cwd();
        let path = |p: String| cwd.join(p);
        let claim = if command.contains("loraops up") {
            "up"
        } else if command.contains("loraops token issue") {
            "token"
        } else if command.contains("loraops data curate") {
            "curate"
        } else if command.contains("loraops train sft") {
            "train"
        } else if command.contains("loraops adapter push") {
            "push"
        } else if command.contains("loraops eval suite from-split") {
            "suite"
        } else if command.contains("loraops eval run") {
            "eval"
        } else if command.contains("loraops gate set") {
            "gate"
        } else if command.contains("loraops rollout start") {
            "rollout"
        } else if command.contains("loraops rollout status") {
            "status"
        } else if command.contains("/v1/chat/completions") {
            "chat"
        } else {
            return;
        };
        self.checked.insert(claim);
        match claim {
            // The registry and the gateway answer; the base model is registered.
            "up" => {
                let (reg, gw) = (self.registry(), self.gateway());
                self.eventually("the registry's /healthz", Duration::from_secs(30), |w| {
                    w.status_of(&format!("{reg}/healthz")) == Some(200)
                });
                self.eventually("the gateway's /readyz", Duration::from_secs(60), |w| {
                    w.status_of(&format!("{gw}/readyz")) == Some(200)
                });
                let data = cwd.join("loraops-data");
                let out = Command::new(exe())
                    .args(["--data-dir", data.to_str().unwrap(), "token", "issue"])
                    .args(["--sub", "walkthrough-check", "--role", "viewer"])
                    .env_remove("LORAOPS_CONFIG")
                    .env_remove("LORAOPS_AUTH__HS256_SECRET")
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{out:?}");
                self.viewer = Some(String::from_utf8(out.stdout).unwrap().trim().to_string());
                let bases = self.api("/base-models");
                assert_eq!(bases["items"].as_array().map(Vec::len), Some(1), "{bases}");
            }
            // The exported token is one the registry accepts.
            "token" => {
                let token = self
                    .exported("LORAOPS_TOKEN")
                    .expect("LORAOPS_TOKEN exported");
                let me: Value = self.rt.block_on(async {
                    let res = self
                        .http
                        .get(format!("{}/api/v1/me", self.registry()))
                        .bearer_auth(token)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(res.status(), 200);
                    res.json().await.unwrap()
                });
                assert!(!me["roles"].as_array().unwrap().is_empty(), "{me}");
            }
            // The splits and the report, every kept row in exactly one split.
            "curate" => {
                let out = path(flag("--out").expect("--out"));
                let report: Value =
                    serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap())
                        .unwrap();
                let rows = |split: &str| {
                    std::fs::read_to_string(out.join(format!("{split}.jsonl")))
                        .unwrap()
                        .lines()
                        .count() as u64
                };
                let splits = ["train", "val", "holdout", "regression"];
                let written: u64 = splits.iter().map(|s| rows(s)).sum();
                assert_eq!(Some(written), report["counts"]["kept"].as_u64(), "{report}");
                assert!(rows("train") > 0 && rows("regression") > 0, "{report}");
                assert!(rows("rejected") > 0, "the example shows rows not kept");
            }
            // A PEFT adapter trained for the steps asked, its run recorded in the registry.
            "train" => {
                let out = path(flag("--out").expect("--out"));
                for f in ["adapter_config.json", "adapter_model.safetensors"] {
                    assert!(out.join(f).exists(), "{f}");
                }
                let manifest: Value =
                    serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap())
                        .unwrap();
                let steps: u64 = flag("--steps").expect("--steps").parse().unwrap();
                let name = flag("--name").expect("--name");
                let runs = self.api(&format!("/runs?adapter={name}"));
                let run = &runs["items"][0];
                assert_eq!(run["status"], "succeeded", "{run}");
                assert_eq!(manifest["run_id"], run["id"], "{manifest}");
                assert_eq!(
                    manifest["metrics"]["steps"].as_f64(),
                    Some(steps as f64),
                    "{manifest}"
                );
            }
            // The version holds exactly the bytes trained.
            "push" => {
                let name = flag("--name").expect("--name");
                let dir = path(words[3].to_string());
                let a = self.api(&format!("/adapters/{name}"));
                let v = a["latest_version"].as_u64().expect("a version");
                let version = self.api(&format!("/adapters/{name}/versions/{v}"));
                let weights = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
                let sha = hex::encode(Sha256::digest(&weights));
                let file = version["files"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|f| f["name"] == "adapter_model.safetensors")
                    .expect("the weights");
                assert!(file["sha256"].as_str().unwrap().ends_with(&sha), "{file}");
                assert!(output.contains(version["digest"].as_str().unwrap()));
                self.adapter = Some((name, v));
            }
            // The suite is the registry's, with every case of the split.
            "suite" => {
                let name = flag("--name").expect("--name");
                let split = path(words[4].to_string());
                let cases = std::fs::read_to_string(split).unwrap().lines().count() as u64;
                let s = self.api(&format!("/suites/{name}"));
                assert_eq!(s["cases"].as_u64(), Some(cases), "{s}");
                self.suite = Some(name);
            }
            // Evidence for the version's digest, citing the suite.
            "eval" => {
                let (name, v) = self.adapter.clone().expect("a pushed version");
                let version = self.api(&format!("/adapters/{name}/versions/{v}"));
                let evidence = self.api(&format!("/adapters/{name}/versions/{v}/evidence"));
                let e = evidence
                    .as_array()
                    .expect("evidence")
                    .last()
                    .expect("evidence posted");
                assert_eq!(e["adapter_digest"], version["digest"], "{e}");
                assert_eq!(
                    Some(&e["suite"]["name"]),
                    self.suite.as_ref().map(|s| json!(s)).as_ref()
                );
                assert_eq!(e["metrics"]["errors"].as_f64(), Some(0.0), "{e}");
            }
            // The policy is set, and the version passes it.
            "gate" => {
                let (name, v) = self.adapter.clone().expect("a pushed version");
                let gate = self.api(&format!("/adapters/{name}/gate"));
                assert!(
                    !gate["policy"]["required_suites"]
                        .as_array()
                        .unwrap()
                        .is_empty()
                );
                let report = self.api(&format!("/adapters/{name}/versions/{v}/gate-report"));
                assert_eq!(report["passed"], true, "{report}");
            }
            // A canary of the version, and the gateway following it.
            "rollout" => {
                let (name, v) = self.adapter.clone().expect("a pushed version");
                let r = self.api(&format!("/adapters/{name}/rollouts/current"));
                assert_eq!(r["rollout"]["version"].as_u64(), Some(v), "{r}");
                let state = r["rollout"]["state"].as_str().unwrap_or_default();
                assert!(
                    ["running", "awaiting_approval", "promoted"].contains(&state),
                    "{r}"
                );
                let routing = self.api("/routing");
                let route = routing["routes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|r| r["adapter"] == name.as_str())
                    .unwrap_or_else(|| panic!("no route for {name}: {routing}"));
                assert_eq!(route["canary"]["version"].as_u64(), Some(v), "{route}");
                assert!(route["canary_weight"].as_f64().unwrap() > 0.0, "{route}");
                let models = format!("{}/v1/models", self.gateway());
                self.eventually(
                    "the gateway serving the canary",
                    Duration::from_secs(30),
                    |w| {
                        w.rt.block_on(async {
                            let Ok(res) = w.http.get(&models).send().await else {
                                return false;
                            };
                            let body: Value = res.json().await.unwrap_or_default();
                            body["data"]
                                .as_array()
                                .is_some_and(|d| d.iter().any(|m| m["id"] == name.as_str()))
                        })
                    },
                );
            }
            "status" => {}
            // The gateway answers the adapter's name through its split.
            "chat" => {
                let (name, _) = self.adapter.clone().expect("a pushed version");
                let url = format!("{}/v1/chat/completions", self.gateway());
                let (status, arm) = self.rt.block_on(async {
                    let res = self
                        .http
                        .post(&url)
                        .header("x-loraops-user", "walkthrough-check")
                        .json(&json!({"model": name, "max_tokens": 8,
                            "messages": [{"role": "user", "content": "Is there a dark mode?"}]}))
                        .send()
                        .await
                        .unwrap();
                    let arm = res
                        .headers()
                        .get("x-loraops-arm")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    (res.status(), arm)
                });
                assert_eq!(status, 200);
                assert!(
                    matches!(arm.as_deref(), Some("stable" | "canary")),
                    "{arm:?}"
                );
            }
            _ => unreachable!(),
        }
    }
}

/// The README's walkthrough, from `loraops up` to a canary taking traffic.
#[test]
fn the_readme_walkthrough_runs_as_written() {
    let steps = walkthrough(README);
    assert!(steps.len() >= 8, "{steps:#?}");
    let mut walk = Walk::new();
    let started = Instant::now();
    for (n, step) in steps.iter().enumerate() {
        let output = walk.run(n + 1, step);
        let command = walk.runnable(&step.command);
        walk.check(&command, &output);
        eprintln!(
            "README.md:{} ok after {:.0?}: {}",
            step.line,
            started.elapsed(),
            step.command.lines().next().unwrap_or_default()
        );
    }
    let all: BTreeSet<&str> = [
        "up", "token", "curate", "train", "push", "suite", "eval", "gate", "rollout", "status",
        "chat",
    ]
    .into();
    let missing: Vec<_> = all.difference(&walk.checked).collect();
    assert!(
        missing.is_empty(),
        "the walkthrough no longer shows {missing:?}"
    );
}

#[test]
fn excerpts_match_lines_by_their_pieces() {
    assert!(line_shows(
        "pushed support@1 sha256:ab12",
        "pushed support@1 sha256:…"
    ));
    assert!(line_shows("  loss 1.2 -> 0.5", "  loss … -> …"));
    assert!(!line_shows("xpushed support@1", "pushed …"));
    assert!(!line_shows("pushed support@12", "pushed support@1"));
    assert!(line_shows("a b c", "…b…"));
    let out = "one\ntwo\nthree\n";
    let ex = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(unshown(out, &ex(&["one", "…", "three"])), None);
    assert_eq!(unshown(out, &ex(&["three", "one"])), Some("one"));
    let steps = walkthrough(
        "## From your data to a canary\n```sh\n$ cat > f <<'EOF'\n> a = 1\n> EOF\n$ echo hi\nhi\n```\n```toml\n$ not a command\n```\n## Next\n```sh\n$ later\n```\n",
    );
    assert_eq!(steps.len(), 2);
    assert_eq!(steps[0].command, "cat > f <<'EOF'\na = 1\nEOF");
    assert_eq!(steps[1].expected, ["hi"]);
}
