//! The registry's commands through the CLI: push, list, show and pull; bad input and
//! configuration; migrations; gates and rollouts.

use std::process::Command;

use serde_json::{Value, json};

use crate::helpers::{Registry, exe, fixtures, ok_json};

#[test]
fn push_list_show_pull_through_the_cli() {
    let reg = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let (base, adapter) = fixtures(dir.path());
    let admin = reg.token("admin");
    let publisher = reg.token("publisher");
    let viewer = reg.token("viewer");

    let b = ok_json(reg.cli(
        Some(&admin),
        &["--json", "base-model", "add", base.to_str().unwrap()],
    ));
    assert_eq!(b["name"], "e2e-base");
    assert!(b["digest"].as_str().unwrap().starts_with("sha256:"));

    let pushed = ok_json(reg.cli(
        Some(&publisher),
        &[
            "--json",
            "adapter",
            "push",
            adapter.to_str().unwrap(),
            "--name",
            "helpdesk",
        ],
    ));
    assert_eq!(
        (pushed["version"].as_u64(), pushed["created"].as_bool()),
        (Some(1), Some(true))
    );
    let again = ok_json(reg.cli(
        Some(&publisher),
        &[
            "--json",
            "adapter",
            "push",
            adapter.to_str().unwrap(),
            "--name",
            "helpdesk",
        ],
    ));
    assert_eq!(
        (again["version"].as_u64(), again["created"].as_bool()),
        (Some(1), Some(false))
    );

    let human = reg.cli(Some(&viewer), &["adapter", "list"]);
    assert!(
        String::from_utf8_lossy(&human.stdout).contains("helpdesk\te2e-base\t1\t-"),
        "{}",
        String::from_utf8_lossy(&human.stdout)
    );
    let shown = ok_json(reg.cli(Some(&viewer), &["--json", "adapter", "show", "helpdesk@1"]));
    assert_eq!(shown["digest"], pushed["digest"]);

    let out = dir.path().join("pulled");
    ok_json(reg.cli(
        Some(&viewer),
        &[
            "--json",
            "adapter",
            "pull",
            "helpdesk@1",
            out.to_str().unwrap(),
        ],
    ));
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
    ] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(adapter.join(f)).unwrap(),
            "{f}"
        );
    }

    // Deleting a version takes an admin; afterwards it is gone for good.
    let denied = reg.cli(Some(&viewer), &["adapter", "delete", "helpdesk@1"]);
    assert!(!denied.status.success());
    assert!(String::from_utf8_lossy(&denied.stderr).contains("admin"));
    let admin = reg.token("admin");
    let deleted = ok_json(reg.cli(Some(&admin), &["--json", "adapter", "delete", "helpdesk@1"]));
    assert_eq!(deleted["deleted"], true, "{deleted}");
    let gone = reg.cli(Some(&viewer), &["adapter", "show", "helpdesk@1"]);
    assert!(!gone.status.success());
}

#[test]
fn bad_input_exits_with_a_clear_error() {
    let reg = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let (_, adapter) = fixtures(dir.path());
    let publisher = reg.token("publisher");
    let viewer = reg.token("viewer");
    let cases: Vec<(Option<&str>, Vec<&str>, &str)> = vec![
        (
            Some(&publisher),
            vec![
                "adapter",
                "push",
                adapter.to_str().unwrap(),
                "--name",
                "../etc",
            ],
            "--name",
        ),
        (
            Some(&publisher),
            vec![
                "adapter",
                "push",
                dir.path().to_str().unwrap(),
                "--name",
                "x",
            ],
            "adapter_config.json is missing",
        ),
        // The base model was never registered.
        (
            Some(&publisher),
            vec!["adapter", "push", adapter.to_str().unwrap(), "--name", "x"],
            "unknown_base_model",
        ),
        (
            Some(&viewer),
            vec!["adapter", "push", adapter.to_str().unwrap(), "--name", "x"],
            "publisher role",
        ),
        (None, vec!["adapter", "list"], "missing bearer token"),
        (Some(&viewer), vec!["adapter", "show", "nope"], "not found"),
        (
            Some(&viewer),
            vec!["adapter", "pull", "nope", "/tmp/x"],
            "needs a version",
        ),
        (
            None,
            vec!["token", "issue", "--sub", "x", "--role", "wizard"],
            "unknown role",
        ),
    ];
    for (token, args, needle) in cases {
        let out = reg.cli(token, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    // The registry is unreachable: exit 1, and the message says where it looked.
    let out = Command::new(exe())
        .args(["adapter", "list", "--registry", "http://127.0.0.1:9"])
        .env("LORAOPS_TOKEN", &viewer)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the registry"));
}

#[test]
fn check_config_reads_file_and_environment_and_rejects_unknown_keys() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("loraops.toml");
    std::fs::write(&cfg, "[registry]\nlisten = \"0.0.0.0:9000\"\ndatabase_url = \"postgres://u:pw@db/loraops\"\nobject_store_url = \"s3://bucket/prefix\"\n[s3]\nendpoint = \"http://minio:9000\"\n").unwrap();
    let out = Command::new(exe())
        .args([
            "--config",
            cfg.to_str().unwrap(),
            "registry",
            "serve",
            "--check-config",
        ])
        .env("LORAOPS_REGISTRY__MAX_UPLOAD_BYTES", "1234")
        .env("LORAOPS_AUTH__AUDIENCE", "prod")
        .output()
        .unwrap();
    let v = ok_json(out);
    assert_eq!(v["registry"]["listen"], "0.0.0.0:9000");
    assert_eq!(v["registry"]["max_upload_bytes"], 1234);
    assert_eq!(v["registry"]["database_url"], "postgres://u:***@db/loraops");
    assert_eq!(v["auth"]["audience"], "prod");
    assert_eq!(v["s3"]["endpoint"], "http://minio:9000");

    let out = Command::new(exe())
        .args([
            "--config",
            cfg.to_str().unwrap(),
            "registry",
            "serve",
            "--check-config",
        ])
        .env("LORAOPS_REGISTRY__LISTEN_ADRESS", "typo")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("listen_adress"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn migrate_creates_the_schema() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(exe())
        .args([
            "--data-dir",
            dir.path().to_str().unwrap(),
            "registry",
            "migrate",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.path().join("registry.db").exists());
}

#[test]
fn gate_and_rollout_through_the_cli() {
    let reg = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let (base, adapter) = fixtures(dir.path());
    let admin = reg.token("admin");
    let deployer = reg.token("deployer");
    ok_json(reg.cli(
        Some(&admin),
        &["--json", "base-model", "add", base.to_str().unwrap()],
    ));
    let pushed = ok_json(reg.cli(
        Some(&admin),
        &[
            "--json",
            "adapter",
            "push",
            adapter.to_str().unwrap(),
            "--name",
            "helpdesk",
        ],
    ));

    // The suites the gate names, held by the registry.
    let evaluator = reg.token("evaluator");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = reqwest::Client::new();
    let mut digests = std::collections::HashMap::new();
    for suite in ["bench", "redteam"] {
        let res = rt
            .block_on(
                client
                    .post(format!("{}/api/v1/suites", reg.url))
                    .bearer_auth(&evaluator)
                    .json(&json!({"manifest": {"name": suite, "version": "1", "scorer": {"type": "exact"}},
                        "cases": "{\"prompt\": \"q\", \"expected\": \"a\"}\n"}))
                    .send(),
            )
            .unwrap();
        assert_eq!(res.status(), 201);
        let v: Value = rt.block_on(res.json()).unwrap();
        digests.insert(suite, v["digest"].as_str().unwrap().to_string());
    }
    let policy = dir.path().join("gate.toml");
    std::fs::write(
        &policy,
        "required_suites = [\"redteam@1\"]\n[[rules]]\nsuite = \"bench@1\"\nmetric = \"accuracy\"\nop = \">=\"\nthreshold = 0.8\n",
    )
    .unwrap();
    let g = ok_json(reg.cli(
        Some(&deployer),
        &[
            "--json",
            "gate",
            "set",
            "helpdesk",
            "--file",
            policy.to_str().unwrap(),
        ],
    ));
    assert_eq!(g["policy"]["rules"][0]["threshold"], 0.8);
    let shown = reg.cli(Some(&deployer), &["gate", "show", "helpdesk"]);
    assert!(String::from_utf8_lossy(&shown.stdout).contains("bench@1/accuracy >= 0.8"));
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{\"rules\": 3}").unwrap();
    let out = reg.cli(
        Some(&deployer),
        &["gate", "set", "helpdesk", "--file", bad.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a gate policy"));

    // No evidence: the gate refuses, the report names each rule, exit code 2.
    let out = reg.cli(
        Some(&deployer),
        &["rollout", "start", "helpdesk@1", "--interval", "1"],
    );
    assert_eq!(out.status.code(), Some(2));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("FAIL redteam@1 required"), "{stdout}");
    assert!(stdout.contains("bench@1/accuracy >= 0.8"), "{stdout}");
    let out = reg.cli(Some(&deployer), &["rollout", "start", "helpdesk"]);
    assert_eq!(out.status.code(), Some(2), "a version is required");

    for (suite, metric, value) in [("bench", "accuracy", 0.9), ("redteam", "refusal_rate", 1.0)] {
        let res = rt
            .block_on(
                client
                    .post(format!("{}/api/v1/adapters/helpdesk/versions/1/evidence", reg.url))
                    .bearer_auth(&evaluator)
                    .json(&json!({"adapter_digest": pushed["digest"], "suite": {"name": suite, "version": "1", "digest": digests[suite]},
                        "engine": {"engine": "mistral.rs", "engine_version": "0.8.1"}, "metrics": {metric: value},
                        "cases": 1, "started_at": "2026-11-28T00:00:00Z", "finished_at": "2026-11-28T00:01:00Z"}))
                    .send(),
            )
            .unwrap();
        assert_eq!(res.status(), 201);
    }
    let started = ok_json(reg.cli(
        Some(&deployer),
        &[
            "--json",
            "rollout",
            "start",
            "helpdesk@1",
            "--steps",
            "10,100",
            "--rule",
            "error_rate<=0.01",
            "--rule",
            "latency: canary / stable <= 1.2 at confidence 0.9",
            "--approve-before",
            "100",
            "--max-hold",
            "600",
        ],
    ));
    assert_eq!(started["rollout"]["weight"], 10.0);
    assert_eq!(started["rollout"]["spec"]["rules"][0]["threshold"], 0.01);
    let latency = &started["rollout"]["spec"]["rules"][1];
    assert_eq!(
        (
            latency["compare"].as_str(),
            latency["threshold"].as_f64(),
            latency["confidence"].as_f64()
        ),
        (Some("ratio"), Some(1.2), Some(0.9))
    );
    assert_eq!(started["rollout"]["spec"]["approve_before"], json!([100.0]));
    let out = reg.cli(Some(&deployer), &["rollout", "approve", "helpdesk"]);
    assert_eq!(out.status.code(), Some(2), "nothing awaits approval: 409");
    let paused = ok_json(reg.cli(Some(&deployer), &["--json", "rollout", "pause", "helpdesk"]));
    assert_eq!(paused["rollout"]["state"], "paused");
    let out = reg.cli(Some(&deployer), &["rollout", "pause", "helpdesk"]);
    assert_eq!(out.status.code(), Some(2), "already paused is a 409");
    let promoted = ok_json(reg.cli(
        Some(&deployer),
        &["--json", "rollout", "promote", "helpdesk"],
    ));
    assert_eq!(promoted["rollout"]["state"], "promoted");
    let status = reg.cli(Some(&deployer), &["rollout", "status", "helpdesk"]);
    let text = String::from_utf8_lossy(&status.stdout);
    for action in ["start", "pause", "promote"] {
        assert!(text.contains(action), "{text}");
    }
    let shown = ok_json(reg.cli(Some(&deployer), &["--json", "adapter", "show", "helpdesk"]));
    assert_eq!(shown["adapter"]["stable_version"], 1, "{shown}");
    // v1 was the first version: there is no earlier stable version to restore.
    let out = reg.cli(
        Some(&deployer),
        &["rollout", "rollback-promotion", "helpdesk"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("first version"));
}
