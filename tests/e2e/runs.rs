//! Training runs in the registry: `loraops train sft --registry` records the run and streams
//! its metrics; when the registry goes away mid-run, training goes on and finishes, and the
//! metrics arrive once the registry is back. The pushed version links to the run.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::{Registry, chat_data, exe, init_tiny, ok_json};

fn get(url: &str, token: &str) -> Option<Value> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let res = reqwest::Client::new()
            .get(url)
            .bearer_auth(token)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
        if !res.status().is_success() {
            return None;
        }
        res.json().await.ok()
    })
}

#[test]
fn a_run_survives_a_registry_outage_and_its_metrics_arrive() {
    let mut reg = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let base = init_tiny(&dir.path().join("tiny"));
    let data = chat_data(
        &dir.path().join("train.jsonl"),
        16,
        |i| format!("order {i}: where is it?"),
        "It ships within two days.",
    );
    let adapter = dir.path().join("adapter");
    let publisher = reg.token("publisher");
    // Long enough (seconds on the tiny model) for the outage to fall in the middle of the run.
    let steps = 600;
    let mut train = Command::new(exe())
        .args([
            "train",
            "sft",
            "--model",
            base.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            adapter.to_str().unwrap(),
            "--steps",
            &steps.to_string(),
            "--registry",
            &reg.url,
            "--name",
            "orders",
            "--registry-wait-secs",
            "120",
        ])
        .env("LORAOPS_TOKEN", &publisher)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // The run appears with its first points; then the registry goes away for a while.
    let deadline = Instant::now() + Duration::from_secs(120);
    let id = loop {
        let runs = get(
            &format!("{}/api/v1/runs?adapter=orders", reg.url),
            &publisher,
        );
        if let Some(r) = runs.as_ref().and_then(|r| r["items"].get(0))
            && r["last_step"].as_u64().unwrap_or(0) >= 1
        {
            assert_eq!(r["status"], "running");
            assert_eq!(r["method"], "sft");
            assert_eq!(r["total_steps"], steps);
            assert_eq!(r["datasets"][0]["rows"], 16);
            assert!(
                r["datasets"][0]["digest"]
                    .as_str()
                    .unwrap()
                    .starts_with("sha256:")
            );
            break r["id"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "the run never appeared");
        assert!(
            train.try_wait().unwrap().is_none(),
            "training ended before the run appeared"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    reg.kill();
    std::thread::sleep(Duration::from_secs(3));
    reg.restart();

    // Training finished successfully whatever the registry did.
    let done = train.wait_with_output().unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(
        !adapter.join("run-pending.json").exists(),
        "everything was delivered: {}",
        String::from_utf8_lossy(&done.stderr)
    );
    let run = get(&format!("{}/api/v1/runs/{id}", reg.url), &publisher).unwrap();
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["last_step"], steps);
    assert!(run["summary"]["final_loss"].as_f64().unwrap().is_finite());
    let m = get(&format!("{}/api/v1/runs/{id}/metrics", reg.url), &publisher).unwrap();
    for name in ["loss", "lr", "grad_norm", "tokens_per_s", "memory_bytes"] {
        let steps_seen: Vec<u64> = m["series"][name]
            .as_array()
            .unwrap_or_else(|| panic!("no {name} series: {m}"))
            .iter()
            .map(|p| p[0].as_u64().unwrap())
            .collect();
        assert_eq!(steps_seen, (1..=steps).collect::<Vec<_>>(), "{name}");
    }

    // The manifest names the run, so the pushed version links to it, both ways.
    let admin = reg.token("admin");
    ok_json(reg.cli(
        Some(&admin),
        &["--json", "base-model", "add", base.to_str().unwrap()],
    ));
    let pushed = ok_json(reg.cli(
        Some(&publisher),
        &[
            "--json",
            "adapter",
            "push",
            adapter.to_str().unwrap(),
            "--name",
            "orders",
            "--base-model",
            "tiny",
        ],
    ));
    assert_eq!(pushed["run"], id.as_str());
    let run = get(&format!("{}/api/v1/runs/{id}", reg.url), &publisher).unwrap();
    assert_eq!(
        run["versions"],
        json!([{"adapter": "orders", "version": 1}])
    );
    let shown = reg.cli(Some(&publisher), &["run", "show", &id]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        text.contains("produced orders@1") && text.contains("loss"),
        "{text}"
    );
}

#[test]
fn a_run_whose_registry_stays_away_is_kept_and_synced_later() {
    let mut reg = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let base = init_tiny(&dir.path().join("tiny"));
    let data = dir.path().join("train.jsonl");
    std::fs::write(
        &data,
        json!({"prompt": "hello", "completion": " world"}).to_string() + "\n",
    )
    .unwrap();
    let publisher = reg.token("publisher");
    let url = reg.url.clone();
    reg.kill();
    let adapter = dir.path().join("adapter");
    let out = Command::new(exe())
        .args([
            "train",
            "sft",
            "--model",
            base.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            adapter.to_str().unwrap(),
            "--steps",
            "3",
            "--registry",
            &url,
            "--registry-wait-secs",
            "1",
        ])
        .env("LORAOPS_TOKEN", &publisher)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("run sync"), "{stderr}");
    assert!(adapter.join("run-pending.json").exists());

    reg.restart();
    let synced = ok_json(reg.cli(
        Some(&publisher),
        &["--json", "run", "sync", adapter.to_str().unwrap()],
    ));
    assert!(synced["points"].as_u64().unwrap() >= 3 * 4, "{synced}");
    assert!(!adapter.join("run-pending.json").exists());
    let id = synced["synced"].as_str().unwrap();
    let run = get(&format!("{url}/api/v1/runs/{id}"), &publisher).unwrap();
    assert_eq!(run["status"], "succeeded");
    assert_eq!(run["last_step"], 3);
    let m = get(&format!("{url}/api/v1/runs/{id}/metrics"), &publisher).unwrap();
    assert_eq!(m["series"]["loss"].as_array().unwrap().len(), 3);
}
