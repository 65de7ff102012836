//! The web console in a real browser: `loraops up` with an adapter whose second version, trained
//! with `--registry` (so it has a run), is in a canary against the first; then
//! `tests/console/console.cjs` drives headless Chromium through it (Playwright): log in, find
//! the adapter, read the evidence and gate report, watch the live rollout chart grow while the
//! gateway takes traffic, pause the rollout, and check what a viewer and a scoped token see.
//! Screenshots of every page are written under `console-screenshots/` in the target directory.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

use crate::helpers::{chat_data, exe, init_tiny, ok_json as ok, run_ok};
use crate::stack::Stack;

fn post(url: &str, token: &str, body: &Value) -> Value {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let res = reqwest::Client::new()
            .post(url)
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .unwrap();
        let status = res.status();
        let v: Value = res.json().await.unwrap_or(Value::Null);
        assert!(status.is_success(), "POST {url}: {status} {v}");
        v
    })
}

fn train(base: &Path, data: &Path, out: &Path, steps: &str, extra: &[&str], token: &str) {
    run_ok(
        Command::new(exe())
            .args(["train", "sft", "--model", base.to_str().unwrap()])
            .args([
                "--data",
                data.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ])
            .args(["--steps", steps])
            .args(extra)
            .env("LORAOPS_TOKEN", token)
            .env_remove("LORAOPS_REGISTRY_URL"),
    );
}

fn screenshots() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let dir = target.join("console-screenshots");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn the_console_in_a_browser() {
    let modules = std::env::var("LORAOPS_TEST_PLAYWRIGHT_NODE_PATH").expect(
        "LORAOPS_TEST_PLAYWRIGHT_NODE_PATH is not set: run the tests with scripts/test, which installs Chromium and playwright-core",
    );
    let chromium = std::env::var("LORAOPS_TEST_CHROMIUM").expect(
        "LORAOPS_TEST_CHROMIUM is not set: run the tests with scripts/test, which installs Chromium",
    );
    let dir = tempfile::tempdir().unwrap();
    let base = init_tiny(&dir.path().join("console-tiny"));
    let data = chat_data(
        &dir.path().join("train.jsonl"),
        8,
        |i| format!("ticket {i}: password reset?"),
        "Settings, then Security, then Reset password.",
    );

    let stack = Stack::up(&dir.path().join("data"), &base);
    let admin = stack.token("console-admin", "admin");
    let deployer = stack.token("sre", "deployer");
    let viewer = stack.token("ml-lead", "viewer");
    let gateway_user = stack.token("app", "inference");
    let scoped = String::from_utf8(
        run_ok(&mut {
            let mut c = Command::new(exe());
            c.args(["--data-dir", stack.data.to_str().unwrap()])
                .args(["token", "issue", "--sub", "other-team", "--role", "viewer"])
                .args(["--adapters", "billing-*", "--ttl", "30m"])
                .env("LORAOPS_AUTH__HS256_SECRET", crate::helpers::SECRET);
            c
        })
        .stdout,
    )
    .unwrap()
    .trim()
    .to_string();

    // v1 without a run, v2 trained with the registry watching.
    let v1 = dir.path().join("v1");
    let v2 = dir.path().join("v2");
    train(&base, &data, &v1, "2", &[], &admin);
    train(
        &base,
        &data,
        &v2,
        "20",
        &[
            "--registry",
            &stack.registry,
            "--name",
            "support",
            "--seed",
            "7",
        ],
        &admin,
    );
    let push = |dir: &Path| {
        ok(stack.cli(
            Some(&admin),
            &[
                "--json",
                "adapter",
                "push",
                dir.to_str().unwrap(),
                "--name",
                "support",
                "--base-model",
                "console-tiny",
            ],
        ))
    };
    let p1 = push(&v1);
    let p2 = push(&v2);
    let run_id = p2["run"].as_str().expect("v2 links to its run").to_string();

    // A suite, evidence for both versions, and a gate they pass.
    let api = format!("{}/api/v1", stack.registry);
    let suite = post(
        &format!("{api}/suites"),
        &admin,
        &json!({"manifest": {"name": "support-bench", "version": "1", "scorer": {"type": "contains"}},
            "cases": "{\"prompt\": \"password?\", \"expected\": \"Settings\"}\n"}),
    );
    for (v, p, acc) in [(1, &p1, 0.82), (2, &p2, 0.9)] {
        post(
            &format!("{api}/adapters/support/versions/{v}/evidence"),
            &admin,
            &json!({"adapter_digest": p["digest"],
                "suite": {"name": "support-bench", "version": "1", "digest": suite["digest"]},
                "engine": {"engine": "native", "engine_version": "test", "decoding": {"temperature": 0}},
                "metrics": {"accuracy": acc}, "cases": 1,
                "started_at": "2026-12-06T00:00:00Z", "finished_at": "2026-12-06T00:01:00Z"}),
        );
    }
    let gate = dir.path().join("gate.json");
    std::fs::write(
        &gate,
        json!({"rules": [{"suite": "support-bench@1", "metric": "accuracy", "op": ">=", "threshold": 0.8}]})
            .to_string(),
    )
    .unwrap();
    ok(stack.cli(
        Some(&deployer),
        &[
            "--json",
            "gate",
            "set",
            "support",
            "--file",
            gate.to_str().unwrap(),
        ],
    ));
    // v1 becomes stable; v2 is the canary, with an interval long enough to stay put.
    post(
        &format!("{api}/adapters/support/rollouts"),
        &deployer,
        &json!({"version": 1}),
    );
    post(
        &format!("{api}/adapters/support/rollouts/current/promote"),
        &deployer,
        &json!({}),
    );
    post(
        &format!("{api}/adapters/support/rollouts"),
        &deployer,
        &json!({"version": 2, "steps": [50.0, 100.0], "interval_secs": 3600}),
    );

    let shots = screenshots();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/console/console.cjs");
    let out = Command::new("node")
        .arg(&script)
        .env("NODE_PATH", modules)
        .env("CHROMIUM", chromium)
        .env("CONSOLE_URL", &stack.registry)
        .env("GATEWAY_URL", &stack.gateway)
        .env("GATEWAY_TOKEN", &gateway_user)
        .env("DEPLOYER_TOKEN", &deployer)
        .env("VIEWER_TOKEN", &viewer)
        .env("SCOPED_TOKEN", &scoped)
        .env("ADAPTER", "support")
        .env("VERSION", "2")
        .env("STABLE_VERSION", "1")
        .env("RUN_ID", &run_id)
        .env("SCREENSHOT_DIR", &shots)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the browser walkthrough failed (screenshots in {}):\n{}\n{}",
        shots.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // What the browser did is the registry's state now, not only what the page said.
    let status = ok(stack.cli(Some(&viewer), &["--json", "rollout", "status", "support"]));
    assert_eq!(status["rollout"]["state"], "paused", "{status}");
    let paused = status["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "pause")
        .expect("a pause event");
    assert_eq!(paused["actor"], "sre");
    let n = std::fs::read_dir(&shots).unwrap().count();
    assert!(n >= 6, "{n} screenshots in {}", shots.display());
}
