//! `loraops eval` end to end: `loraops up` (registry + gateway with the native engine) on a generated
//! tiny model, an adapter trained by `loraops train sft` and pushed, a suite run through the
//! gateway with the version pinned, and the evidence checked in the registry.

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::helpers::{chat_data, exe, init_tiny, ok_json, run_ok};
use crate::stack::Stack;

fn get_json(url: &str, token: &str) -> Value {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let res = reqwest::Client::new()
            .get(url)
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert!(res.status().is_success(), "GET {url}: {}", res.status());
        res.json().await.unwrap()
    })
}

#[test]
fn eval_run_posts_evidence_bound_to_the_served_version() {
    let dir = tempfile::tempdir().unwrap();
    let base = init_tiny(&dir.path().join("e2e-tiny"));
    let train = chat_data(
        &dir.path().join("train.jsonl"),
        8,
        |i| format!("ticket {i}: password reset?"),
        "Settings, then Security, then Reset password.",
    );
    let adapter = dir.path().join("adapter");
    run_ok(Command::new(exe()).args([
        "train",
        "sft",
        "--model",
        base.to_str().unwrap(),
        "--data",
        train.to_str().unwrap(),
        "--out",
        adapter.to_str().unwrap(),
        "--steps",
        "2",
    ]));

    let stack = Stack::up(&dir.path().join("data"), &base);
    let publisher = stack.token("e2e-eval", "publisher");
    let evaluator = stack.token("e2e-eval", "evaluator");
    let viewer = stack.token("e2e-eval", "viewer");
    let pushed = ok_json(stack.cli(
        Some(&publisher),
        &[
            "--json",
            "adapter",
            "push",
            adapter.to_str().unwrap(),
            "--name",
            "e2e-bot",
            "--base-model",
            "e2e-tiny",
        ],
    ));
    let digest = pushed["digest"].as_str().unwrap().to_string();

    // A small suite whose verdicts do not depend on what the tiny model says: one pattern
    // every answer matches, one no answer can match; chat and raw-text prompts.
    let suite = dir.path().join("suite");
    std::fs::create_dir_all(&suite).unwrap();
    std::fs::write(
        suite.join("suite.json"),
        json!({"name": "e2e-smoke", "version": "1", "scorer": {"type": "regex"},
            "thresholds": [{"metric": "regex_match", "op": ">=", "value": 0.5}],
            "decoding": {"max_tokens": 6}})
        .to_string(),
    )
    .unwrap();
    let cases = [
        json!({"id": "any-1", "category": "any", "prompt": "How do I reset my password?", "pattern": "(?s)^.*$"}),
        json!({"id": "any-2", "category": "any", "system": "Be brief.", "prompt": "Where are invoices?", "pattern": "(?s)^.*$"}),
        json!({"id": "never", "category": "never", "prompt": "Say hi.", "pattern": "^IMPOSSIBLE-[0-9]{40}$"}),
        json!({"id": "text", "category": "any", "text": "Q: password reset?\nA:", "pattern": "(?s)^.*$"}),
    ];
    std::fs::write(
        suite.join("cases.jsonl"),
        cases
            .iter()
            .map(|c| c.to_string() + "\n")
            .collect::<String>(),
    )
    .unwrap();

    let out = dir.path().join("out");
    let summary = ok_json(stack.cli(
        Some(&evaluator),
        &[
            "--json",
            "eval",
            "run",
            "--suite",
            suite.to_str().unwrap(),
            "--adapter",
            "e2e-bot@1",
            "--concurrency",
            "2",
            "--out",
            out.to_str().unwrap(),
        ],
    ));
    let m = &summary["metrics"];
    assert_eq!(m["cases"], 4.0, "{summary}");
    assert_eq!(m["errors"], 0.0, "{summary}");
    assert_eq!(m["regex_match"], 0.75);
    assert_eq!(m["regex_match/any"], 1.0);
    assert_eq!(m["regex_match/never"], 0.0);
    assert!(
        m["completion_tokens_mean"].as_f64().unwrap() > 0.0,
        "{summary}"
    );
    assert!(m["latency_ms_p95"].as_f64().unwrap() > 0.0);
    assert_eq!(summary["thresholds"][0]["passed"], true);

    // Per-case results: every answer came from the pinned version.
    let results = std::fs::read(out.join("results.jsonl")).unwrap();
    let lines: Vec<Value> = String::from_utf8_lossy(&results)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines
            .iter()
            .map(|l| l["id"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["any-1", "any-2", "never", "text"]
    );
    for l in &lines {
        assert_eq!(
            l["served"],
            json!({"adapter": "e2e-bot", "version": "1", "arm": "pinned"}),
            "{l}"
        );
        assert!(l["output"].is_string());
        assert!(l["usage"]["completion_tokens"].as_u64().unwrap() <= 6);
    }
    let results_digest = format!("sha256:{}", hex::encode(Sha256::digest(&results)));

    // The evidence in the registry: this version's digest, the suite's digest, the results'.
    let ev = get_json(
        &format!(
            "{}/api/v1/adapters/e2e-bot/versions/1/evidence",
            stack.registry
        ),
        &viewer,
    );
    let ev = ev.as_array().unwrap();
    assert_eq!(ev.len(), 1);
    let e = &ev[0];
    assert_eq!(e["adapter_digest"], digest.as_str());
    assert_eq!(e["suite"]["name"], "e2e-smoke");
    assert_eq!(e["suite"]["digest"], summary["suite"]["digest"]);
    assert_eq!(e["cases"], 4);
    assert_eq!(e["cases_digest"], results_digest.as_str());
    assert_eq!(e["metrics"]["regex_match"], 0.75);
    assert_eq!(e["engine"]["decoding"]["model"], "e2e-bot@1");
    assert_eq!(e["engine"]["decoding"]["temperature"], 0.0);
    assert_eq!(e["engine"]["engine"], "loraops");
    assert_eq!(e["engine"]["engine_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(e["engine"]["decoding"]["quantization"], "none");
    assert!(
        e["engine"]["model_digest"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    assert!(
        e["produced_by"]
            .as_str()
            .unwrap()
            .starts_with("loraops eval ")
    );
    assert_eq!(e["created_by"], "e2e-eval");

    // The suite was uploaded; by name it runs again from the registry, with the same digest.
    let listed = ok_json(stack.cli(Some(&viewer), &["--json", "eval", "suite", "list"]));
    assert_eq!(listed[0]["digest"], summary["suite"]["digest"]);
    let again = ok_json(stack.cli(
        Some(&evaluator),
        &[
            "--json",
            "eval",
            "run",
            "--suite",
            "e2e-smoke@1",
            "--adapter",
            "e2e-bot@1",
            "--no-post",
            "--out",
            dir.path().join("out2").to_str().unwrap(),
        ],
    ));
    assert_eq!(again["suite"]["digest"], summary["suite"]["digest"]);
    assert_eq!(again["metrics"]["regex_match"], 0.75);
    assert!(again["evidence"].is_null());
    let ev = get_json(
        &format!(
            "{}/api/v1/adapters/e2e-bot/versions/1/evidence",
            stack.registry
        ),
        &viewer,
    );
    assert_eq!(ev.as_array().unwrap().len(), 1);

    // Bad input exits 2: no version, a version that does not exist, a viewer posting.
    for (token, args, needle) in [
        (
            &evaluator,
            vec!["--suite", "e2e-smoke", "--adapter", "e2e-bot"],
            "needs a version",
        ),
        (
            &evaluator,
            vec!["--suite", "e2e-smoke", "--adapter", "e2e-bot@9"],
            "no version 9",
        ),
        (
            &viewer,
            vec!["--suite", suite.to_str().unwrap(), "--adapter", "e2e-bot@1"],
            "evaluator role",
        ),
    ] {
        let mut full = vec!["eval", "run"];
        full.extend(args);
        let out = stack.cli(Some(token.as_str()), &full);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{full:?}: {err}");
        assert!(err.contains(needle), "{full:?}: {err}");
    }

    // The base model itself, on the same suite: evidence for the base (`vs: base` gates).
    let on_base = ok_json(stack.cli(
        Some(&evaluator),
        &[
            "--json",
            "eval",
            "run",
            "--suite",
            "e2e-smoke@1",
            "--base",
            "e2e-tiny",
            "--out",
            dir.path().join("out-base").to_str().unwrap(),
        ],
    ));
    assert_eq!(
        on_base["evidence"]["of"], "base model e2e-tiny",
        "{on_base}"
    );
    let ev = get_json(
        &format!("{}/api/v1/base-models/e2e-tiny/evidence", stack.registry),
        &evaluator,
    );
    assert_eq!(ev.as_array().unwrap().len(), 1, "{ev}");
    assert_eq!(ev[0]["suite"]["digest"], summary["suite"]["digest"]);
    assert_eq!(ev[0]["engine"]["decoding"]["model"], "e2e-tiny");

    // A suite whose own threshold is missed: evidence posted, exit status 3.
    let strict = dir.path().join("strict");
    std::fs::create_dir_all(&strict).unwrap();
    std::fs::write(
        strict.join("suite.json"),
        json!({"name": "e2e-strict", "version": "1", "scorer": {"type": "regex"},
            "thresholds": [{"metric": "regex_match", "op": ">=", "value": 0.9}],
            "decoding": {"max_tokens": 6}})
        .to_string(),
    )
    .unwrap();
    std::fs::copy(suite.join("cases.jsonl"), strict.join("cases.jsonl")).unwrap();
    let out = stack.cli(
        Some(&evaluator),
        &[
            "eval",
            "run",
            "--suite",
            strict.to_str().unwrap(),
            "--adapter",
            "e2e-bot@1",
            "--out",
            dir.path().join("out-strict").to_str().unwrap(),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("regex_match >= 0.9"), "{err}");
    let ev = get_json(
        &format!(
            "{}/api/v1/adapters/e2e-bot/versions/1/evidence",
            stack.registry
        ),
        &viewer,
    );
    assert!(
        ev.as_array()
            .unwrap()
            .iter()
            .any(|e| e["suite"]["name"] == "e2e-strict"),
        "the evidence was posted: {ev}"
    );

    perplexity_on_a_holdout_split(&stack, dir.path(), &base, &adapter, &evaluator, &viewer);
}

/// A perplexity suite from a holdout split runs base + adapter through the trainer's forward
/// pass and posts evidence that says so; the number equals the trainer's own eval loss.
fn perplexity_on_a_holdout_split(
    stack: &Stack,
    dir: &Path,
    base: &Path,
    adapter: &Path,
    evaluator: &str,
    viewer: &str,
) {
    let holdout = dir.join("holdout.jsonl");
    let rows = [
        json!({"id": "h1", "source": "tickets", "messages": [{"role": "user", "content": "How do I reset my password?"},
            {"role": "assistant", "content": "Settings, then Security, then Reset password."}]}),
        json!({"id": "h2", "source": "tickets", "prompt": "Where are my invoices?\n", "completion": "Under Billing, then Invoices.", "weight": 3.0}),
        json!({"id": "h3", "source": "faq", "instruction": "Name the plan with SSO.", "output": "Enterprise."}),
    ];
    let text: String = rows.iter().map(|r| r.to_string() + "\n").collect();
    std::fs::write(&holdout, &text).unwrap();
    let suite = dir.join("ppl-suite");
    let built = ok_json(stack.cli(
        None,
        &[
            "--json",
            "eval",
            "suite",
            "from-split",
            holdout.to_str().unwrap(),
            "--name",
            "e2e-ppl",
            "--scorer",
            "perplexity",
            "--out",
            suite.to_str().unwrap(),
        ],
    ));
    assert_eq!(built["cases"], 3);

    let ok_dir = dir.join("ppl-out");
    let run = |extra: &[&str]| {
        let out_dir = dir.join("ppl-out");
        let mut args = vec![
            "eval",
            "run",
            "--suite",
            suite.to_str().unwrap(),
            "--adapter",
            "e2e-bot@1",
            "--out",
            out_dir.to_str().unwrap(),
        ];
        args.extend(extra);
        stack.cli(Some(evaluator), &args)
    };
    // Without the base weights, or with another model's, it refuses (exit 2) and posts nothing.
    let out = run(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--base-dir"), "{err}");
    let other = dir.join("other-tiny");
    run_ok(Command::new(exe()).args([
        "model",
        "init-tiny",
        other.to_str().unwrap(),
        "--seed",
        "7",
    ]));
    let out = run(&["--base-dir", other.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("is not the registered base model"), "{err}");

    let out = run(&["--base-dir", base.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(ok_dir.join("summary.json")).unwrap())
            .unwrap();
    let m = &summary["metrics"];
    assert_eq!(m["cases"], 3.0, "{summary}");
    assert_eq!(m["errors"], 0.0, "{summary}");

    // The same number from the trainer's API, on the adapter directory that was pushed.
    use loraops_model::{adapter, llama, tokenizer};
    use loraops_trainer::{data, sft};
    let mut model = llama::Llama::load(base, &llama::LoadOptions::default()).unwrap();
    adapter::load_adapter(adapter, &mut model).unwrap();
    let tok = tokenizer::Tokenizer::load(base).unwrap();
    let (mut nll, mut tokens) = (0f64, 0usize);
    for r in &rows {
        let (mut ex, _) = data::tokenize_row(r, &tok, 2048).unwrap();
        ex.weight = 1.0;
        let n = ex.trainable();
        nll += sft::eval_loss(&model, std::slice::from_ref(&ex), 1, tok.pad_id, 0.0).unwrap()
            * n as f64;
        tokens += n;
    }
    assert_eq!(m["tokens"].as_f64().unwrap(), tokens as f64);
    let want = (nll / tokens as f64).exp();
    let got = m["perplexity"].as_f64().unwrap();
    assert!(
        (got - want).abs() <= 1e-6 * want,
        "perplexity {got} vs {want}"
    );
    // And the adapter matters: the base alone scores differently.
    let base_only = llama::Llama::load(base, &llama::LoadOptions::default()).unwrap();
    let mut base_nll = 0f64;
    for r in &rows {
        let (mut ex, _) = data::tokenize_row(r, &tok, 2048).unwrap();
        ex.weight = 1.0;
        base_nll += sft::eval_loss(&base_only, std::slice::from_ref(&ex), 1, tok.pad_id, 0.0)
            .unwrap()
            * ex.trainable() as f64;
    }
    assert!((base_nll - nll).abs() > 1e-6, "the adapter changed nothing");

    let ev = get_json(
        &format!(
            "{}/api/v1/adapters/e2e-bot/versions/1/evidence",
            stack.registry
        ),
        viewer,
    );
    let e = ev
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["suite"]["name"] == "e2e-ppl")
        .expect("perplexity evidence posted");
    assert_eq!(e["engine"]["engine"], "loraops-trainer");
    assert_eq!(e["engine"]["decoding"]["mode"], "teacher-forced");
    assert_eq!(e["metrics"]["perplexity"].as_f64().unwrap(), got);
}
