//! The README's first command, `loraops demo`, as a newcomer runs it (the defaults). Each
//! step's claim is checked from the outside: the files curation wrote, the registry the demo
//! leaves behind (versions, evidence, gate reports, the rollout), and, with `--keep`, the
//! gateway's answers. A second run starts clean.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use crate::helpers::{Registry, exe};

/// The house answer to the held-out password question, and that question.
const ANSWER: &str = "Open Settings, choose Security, then Reset password.";
const QUESTION: &str = "What are the steps to reset a password?";

#[test]
fn the_demo_tells_the_whole_story() {
    let data = tempfile::tempdir().unwrap();
    let out = Command::new(exe())
        .args([
            "--data-dir",
            data.path().to_str().unwrap(),
            "--json",
            "demo",
        ])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let steps: Vec<&Value> = events.iter().filter(|e| e["event"] == "step").collect();
    assert_eq!(steps.len(), 11, "{stdout}");
    assert!(
        steps
            .iter()
            .all(|s| s["ok"] == true && s["seconds"].is_f64())
    );
    let step = |name: &str| {
        &steps
            .iter()
            .find(|s| s["name"].as_str().unwrap().starts_with(name))
            .unwrap_or_else(|| panic!("no step {name}: {stdout}"))["details"]
    };
    assert!(events.iter().any(|e| e["event"] == "console"));
    assert_eq!(events.last().unwrap()["event"], "done");

    // Curation found what the export had planted, and no personal data reached training.
    let curated = step("curate");
    assert_eq!(curated["exact_duplicates"], 4, "{curated}");
    assert_eq!(curated["near_duplicates"], 3, "{curated}");
    assert_eq!(curated["pii"], json!({"EMAIL": 3, "PHONE": 2}), "{curated}");
    assert_eq!(curated["held_out"], 6, "{curated}");
    let root = data.path().join("demo");
    let train = std::fs::read_to_string(root.join("work/data/train.jsonl")).unwrap();
    assert!(train.contains("<EMAIL>") && train.contains("<PHONE>"));
    for leaked in ["jane.doe@example.com", "555 0134", "7946 0958"] {
        assert!(!train.contains(leaked), "{leaked} in train.jsonl");
    }
    let report: Value =
        serde_json::from_slice(&std::fs::read(root.join("work/data/report.json")).unwrap())
            .unwrap();
    assert_eq!(report["counts"]["exact_duplicates"], 4);

    // The adapter learnt what the base does not know, and DPO taught it to refuse.
    let scores = &step("evaluate")["scores"];
    let score = |who: &str, m: &str| scores[who][m].as_f64().unwrap();
    assert!(
        score("v2", "contains") >= 0.5 && score("base", "contains") < score("v2", "contains"),
        "{scores}"
    );
    assert!(
        score("v2", "refusal_rate") > score("v1", "refusal_rate"),
        "{scores}"
    );
    assert!(
        score("v3", "completion_tokens_mean") > 1.5 * score("v2", "completion_tokens_mean"),
        "{scores}"
    );
    assert_eq!(step("the gate")["v1_refused"], true);

    // The registry the demo leaves behind holds what the steps claimed.
    let reg = Registry::start_in(&root);
    let viewer = reg.token("viewer");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let http = reqwest::Client::new();
    let get = |path: &str| -> Value {
        rt.block_on(async {
            let res = http
                .get(format!("{}/api/v1{path}", reg.url))
                .bearer_auth(&viewer)
                .send()
                .await
                .unwrap();
            assert!(res.status().is_success(), "{path}: {}", res.status());
            res.json().await.unwrap()
        })
    };
    let adapter = get("/adapters/demo-support");
    assert_eq!(adapter["stable_version"], 2, "{adapter}");
    let v2 = get("/adapters/demo-support/versions/2");
    assert_eq!(v2["lineage"]["method"], "dpo", "{v2}");
    for v in 1..=3 {
        let evidence = get(&format!("/adapters/demo-support/versions/{v}/evidence"));
        let suites: Vec<&str> = evidence
            .as_array()
            .unwrap_or_else(|| panic!("{evidence}"))
            .iter()
            .map(|e| e["suite"]["name"].as_str().unwrap())
            .collect();
        assert!(
            suites.contains(&"demo-heldout") && suites.contains(&"redteam-smoke"),
            "v{v}: {suites:?}"
        );
    }
    let refused = get("/adapters/demo-support/versions/1/gate-report");
    assert_eq!(refused["passed"], false, "{refused}");
    let failed: Vec<&str> = refused["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["passed"] == false)
        .map(|r| r["metric"].as_str().unwrap_or(""))
        .collect();
    assert!(failed.contains(&"refusal_rate"), "{refused}");
    assert_eq!(
        get("/adapters/demo-support/versions/2/gate-report")["passed"],
        true
    );
    let last = get("/adapters/demo-support/rollouts/current");
    assert_eq!(last["rollout"]["version"], 3, "{last}");
    assert_eq!(last["rollout"]["state"], "rolled_back", "{last}");
    assert!(
        last["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "rollback"),
        "{last}"
    );
    drop(reg);

    // A second run starts from a clean slate; with --keep it goes on serving, and the
    // gateway answers with the promoted version until Ctrl-C.
    let mut child = Command::new(exe())
        .args([
            "--data-dir",
            data.path().to_str().unwrap(),
            "demo",
            "--keep",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut text = String::new();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let gateway = loop {
        let Some(Ok(line)) = lines.next() else {
            let _ = child.kill();
            panic!("the demo ended before serving:\n{text}");
        };
        text.push_str(&line);
        text.push('\n');
        if let Some(rest) = line.strip_prefix("serving until Ctrl-C:") {
            break rest.rsplit(' ').next().unwrap().to_string();
        }
    };
    for claim in ["[11/11]", "refused (422", "rollback", "promote", "/ui/"] {
        assert!(text.contains(claim), "missing {claim:?}:\n{text}");
    }
    let ask = |model: &str| -> (String, Option<String>) {
        rt.block_on(async {
            let res = http
                .post(format!("{gateway}/chat/completions"))
                .json(&json!({"model": model, "temperature": 0, "max_tokens": 48,
                    "messages": [{"role": "system", "content": "You are the Acme support assistant."},
                                 {"role": "user", "content": QUESTION}]}))
                .send()
                .await
                .unwrap();
            let version = res
                .headers()
                .get("x-loraops-version")
                .map(|v| v.to_str().unwrap().to_string());
            let body: Value = res.json().await.unwrap();
            let answer = body["choices"][0]["message"]["content"]
                .as_str()
                .unwrap_or_else(|| panic!("{body}"))
                .to_string();
            (answer, version)
        })
    };
    let (answer, version) = ask("demo-support");
    assert!(answer.contains(ANSWER), "{answer:?}");
    assert_eq!(version.as_deref(), Some("2"));
    let (base_answer, _) = ask("demo-base");
    assert!(!base_answer.contains(ANSWER), "{base_answer:?}");
    assert!(
        Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let status = child.wait().unwrap();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(status.success(), "{status}:\n{text}{}", rest.join("\n"));
    assert!(rest.iter().any(|l| l.starts_with("done.")), "{rest:?}");
}
