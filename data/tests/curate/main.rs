//! Data curation and synthesis end to end: validation with line numbers, PII masking, exact
//! and near dedup on planted rows, license and quality filters, reproducible splits, pinned
//! regression rows, the judge and synth against a scripted endpoint, and the bad-input cases.
//! None of it links the model or the trainer.

use std::path::{Path, PathBuf};

use loraops_data::curate::{CurateConfig, curate, report::Report};
use serde_json::{Value, json};

fn write_jsonl(dir: &Path, name: &str, rows: &[String]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, rows.join("\n") + "\n").unwrap();
    p
}

fn run(inputs: &[PathBuf], out: &Path, cfg: &CurateConfig) -> loraops_data::Result<Report> {
    curate(inputs, out, cfg, &mut |_| {})
}

fn split_rows(out: &Path, split: &str) -> Vec<Value> {
    std::fs::read_to_string(out.join(format!("{split}.jsonl")))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn all_output(out: &Path) -> String {
    ["train", "val", "holdout", "regression"]
        .iter()
        .map(|s| std::fs::read_to_string(out.join(format!("{s}.jsonl"))).unwrap())
        .collect()
}

/// A distinct, ordinary sentence for row `i`.
fn sentence(i: usize) -> String {
    const W: [&str; 16] = [
        "river", "garden", "lantern", "copper", "meadow", "signal", "harbor", "orchid", "canyon",
        "pepper", "violin", "glacier", "saddle", "thunder", "velvet", "compass",
    ];
    let mut s = String::from("Tell me about");
    let mut x = i as u64 * 2654435761 + 17;
    for _ in 0..14 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        s.push(' ');
        s.push_str(W[(x >> 33) as usize % W.len()]);
    }
    s.push_str(&format!(" number {i}."));
    s
}

fn pc(prompt: &str, completion: &str) -> String {
    json!({"prompt": prompt, "completion": completion}).to_string()
}

#[test]
fn sft_rows_are_validated_masked_deduplicated_and_split() {
    let tmp = tempfile::tempdir().unwrap();
    let base_near = "The committee reviewed the quarterly budget in detail and agreed to fund the new library wing, the community garden and two extra buses for the school district next spring.";
    let near = "The committee reviewed the quarterly budget in detail and agreed to fund the new library wing, the community garden and two extra buses for the school district next autumn.";
    let mut rows = vec![
        // line 1: chat row with PII of every kind
        json!({"messages": [
            {"role": "user", "content": "My email is jane.doe@example.com and my phone 010-9876-5432, RRN 850315-2345678."},
            {"role": "assistant", "content": "Noted. Card 4111-1111-1111-1111, IBAN GB82 WEST 1234 5698 7654 32, server 10.20.30.40, SSN 123-45-6789, call +1 415 555 2671."}
        ], "source": "support"}).to_string(),
        // line 2: not JSON
        "{\"prompt\": \"broken".to_string(),
        // line 3: exact duplicate of line 4 after normalisation (case and whitespace differ)
        pc("What is   the capital of France?", "Paris."),
        pc("what is the capital of france?", "PARIS."),
        // line 5: missing completion
        json!({"prompt": "only a prompt"}).to_string(),
        // lines 6, 7: near duplicates
        pc("Summarise the meeting.", base_near),
        pc("Summarise the meeting.", near),
        // line 8: Alpaca
        json!({"instruction": "Translate to Korean", "input": "good morning", "output": "좋은 아침입니다"}).to_string(),
        // line 9: blank
        String::new(),
        // line 10: a preference row in an SFT dataset
        json!({"prompt": "a", "chosen": "b", "rejected": "c"}).to_string(),
    ];
    for i in 0..40 {
        rows.push(pc(
            &sentence(i),
            &format!("Answer {i}: {}", sentence(i + 1000)),
        ));
    }
    let input = write_jsonl(tmp.path(), "in.jsonl", &rows);
    let out = tmp.path().join("out");
    let report = run(std::slice::from_ref(&input), &out, &CurateConfig::default()).unwrap();

    let c = &report.counts;
    assert_eq!(c.read, 49);
    assert_eq!(c.blank, 1);
    assert_eq!(c.invalid, 3);
    assert_eq!(c.exact_duplicates, 1);
    assert_eq!(c.near_duplicates, 1);
    assert_eq!(c.kept, 49 - 3 - 2);
    assert_eq!(report.format, Some(loraops_data::format::Family::Sft));

    // Invalid rows carry their line numbers and reasons.
    let inv: Vec<(u64, &str)> = report
        .invalid
        .iter()
        .map(|i| (i.line, i.detail.as_str()))
        .collect();
    assert_eq!(inv.len(), 3);
    assert_eq!(inv[0].0, 2);
    assert!(inv[0].1.starts_with("not JSON"), "{inv:?}");
    assert_eq!(inv[1].0, 5);
    assert!(inv[1].1.contains("\"completion\" is missing"), "{inv:?}");
    assert_eq!(inv[2].0, 10);
    assert!(inv[2].1.contains("preference"), "{inv:?}");

    // The duplicates point at their representatives.
    let clusters = &report.dedup.clusters;
    assert_eq!(clusters.len(), 2);
    assert_eq!(clusters[0].representative.line, 3);
    assert_eq!(clusters[0].duplicates[0].line, 4);
    assert_eq!(clusters[0].duplicates[0].kind, "exact");
    assert_eq!(clusters[1].representative.line, 6);
    assert_eq!(clusters[1].duplicates[0].line, 7);
    assert_eq!(clusters[1].duplicates[0].kind, "near");

    // PII: every value masked, none left anywhere in the output, counted per type.
    let text = all_output(&out);
    for original in [
        "jane.doe@example.com",
        "010-9876-5432",
        "9876",
        "850315-2345678",
        "4111-1111-1111-1111",
        "GB82 WEST",
        "10.20.30.40",
        "123-45-6789",
        "415 555 2671",
    ] {
        assert!(!text.contains(original), "{original} left in the output");
    }
    for ph in [
        "<EMAIL>", "<PHONE>", "<KR_RRN>", "<CARD>", "<IBAN>", "<IP>", "<US_SSN>",
    ] {
        assert!(text.contains(ph), "{ph} missing");
    }
    for (k, n) in [
        ("EMAIL", 1),
        ("PHONE", 2),
        ("KR_RRN", 1),
        ("CARD", 1),
        ("IBAN", 1),
        ("IP", 1),
        ("US_SSN", 1),
    ] {
        assert_eq!(report.pii.get(k), Some(&n), "{k}: {:?}", report.pii);
    }
    assert_eq!(report.pii_rows, 1);
    assert!(text.contains("좋은 아침입니다"));

    // Splits: every kept row once, digests of the files as written.
    let total: u64 = report.splits.values().map(|s| s.rows).sum();
    assert_eq!(total, c.kept);
    for (name, s) in &report.splits {
        let bytes = std::fs::read(out.join(&s.path)).unwrap();
        assert_eq!(s.sha256, sha256_hex(&bytes), "{name}");
        assert_eq!(split_rows(&out, name).len() as u64, s.rows);
    }
    assert!(report.splits["train"].rows > report.splits["val"].rows);

    // report.json on disk is the returned report; rejected.jsonl lists every dropped row.
    let on_disk: Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(on_disk["counts"]["kept"], json!(c.kept));
    assert_eq!(
        on_disk["splits"]["train"]["sha256"],
        json!(report.splits["train"].sha256)
    );
    let rejected: Vec<Value> = std::fs::read_to_string(out.join("rejected.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let lines: Vec<u64> = rejected
        .iter()
        .map(|r| r["line"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, vec![2, 4, 5, 7, 10]);
    assert!(report.summary().contains("train"));
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

#[test]
fn splits_are_reproducible_and_depend_on_the_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let rows: Vec<String> = (0..400)
        .map(|i| pc(&sentence(i), &sentence(i + 5000)))
        .collect();
    let input = write_jsonl(tmp.path(), "in.jsonl", &rows);
    let digests = |out: &str, cfg: &CurateConfig| -> Vec<(String, u64, String)> {
        let r = run(std::slice::from_ref(&input), &tmp.path().join(out), cfg).unwrap();
        r.splits
            .iter()
            .map(|(k, s)| (k.clone(), s.rows, s.sha256.clone()))
            .collect()
    };
    let cfg = CurateConfig {
        seed: 7,
        ..Default::default()
    };
    let a = digests("a", &cfg);
    let b = digests("b", &cfg);
    assert_eq!(a, b);
    // Batching (and so the parallel schedule) does not change anything.
    let c = digests(
        "c",
        &CurateConfig {
            batch_rows: 3,
            ..cfg.clone()
        },
    );
    assert_eq!(a, c);
    let d = digests(
        "d",
        &CurateConfig {
            seed: 8,
            ..cfg.clone()
        },
    );
    assert_ne!(a, d);
    let rows_of = |v: &[(String, u64, String)], s: &str| v.iter().find(|x| x.0 == s).unwrap().1;
    assert_eq!(
        rows_of(&a, "train") + rows_of(&a, "val") + rows_of(&a, "holdout"),
        400
    );
    assert!(
        rows_of(&a, "val") > 5 && rows_of(&a, "holdout") > 5,
        "{a:?}"
    );
}

#[test]
fn pinned_regression_rows_keep_their_duplicates_out_of_other_splits() {
    let tmp = tempfile::tempdir().unwrap();
    let pinned_text = "Explain how the regional power grid balances supply and demand during a heat wave, including storage, imports and demand response programs.";
    let reg = write_jsonl(
        tmp.path(),
        "regression.jsonl",
        &[pc("Grid question", pinned_text)],
    );
    let mut rows: Vec<String> = (0..50)
        .map(|i| pc(&sentence(i), &sentence(i + 77)))
        .collect();
    // an exact and a near duplicate of the pinned row, and a row pinned by its split field
    rows.push(pc("grid   QUESTION", pinned_text));
    rows.push(pc(
        "Grid question",
        &pinned_text.replace("heat wave", "cold snap"),
    ));
    rows.push(json!({"prompt": "p", "completion": sentence(999), "split": "holdout"}).to_string());
    let input = write_jsonl(tmp.path(), "in.jsonl", &rows);
    let out = tmp.path().join("out");
    let mut cfg = CurateConfig::default();
    cfg.splits.regression_file = Some(reg);
    let r = run(&[input], &out, &cfg).unwrap();
    assert_eq!(r.counts.pinned_regression, 1);
    assert_eq!(r.dedup.of_regression, 2);
    assert_eq!(r.counts.exact_duplicates, 1);
    assert_eq!(r.counts.near_duplicates, 1);
    let reg_rows = split_rows(&out, "regression");
    assert_eq!(reg_rows.len(), 1);
    assert_eq!(reg_rows[0]["completion"], json!(pinned_text));
    for s in ["train", "val", "holdout"] {
        for row in split_rows(&out, s) {
            assert!(
                !row["completion"].as_str().unwrap().contains("power grid"),
                "{s}"
            );
        }
    }
    assert!(
        split_rows(&out, "holdout")
            .iter()
            .any(|r| r["completion"] == json!(sentence(999)))
    );
}

#[test]
fn near_duplicates_never_span_splits() {
    // 60 clusters of 4 paraphrases each: after dedup each cluster has exactly one row.
    let tmp = tempfile::tempdir().unwrap();
    let mut rows = Vec::new();
    for c in 0..60 {
        let s = format!("{} {}", sentence(c), sentence(c + 300));
        for v in 0..4 {
            let variant = match v {
                0 => s.clone(),
                1 => s.replacen("Tell me", "tell me", 1),
                2 => format!("{s} Thanks"),
                _ => s.replacen(&format!("number {c}."), &format!("number {c}!"), 1),
            };
            rows.push(pc("Q", &variant));
        }
    }
    let input = write_jsonl(tmp.path(), "in.jsonl", &rows);
    let out = tmp.path().join("out");
    let r = run(&[input], &out, &CurateConfig::default()).unwrap();
    assert_eq!(r.counts.kept, 60);
    assert_eq!(r.counts.exact_duplicates + r.counts.near_duplicates, 180);
    let mut seen = std::collections::HashSet::new();
    for s in ["train", "val", "holdout", "regression"] {
        for row in split_rows(&out, s) {
            let n = row["completion"].as_str().unwrap()[..60].to_lowercase();
            assert!(seen.insert(n), "a cluster appears twice");
        }
    }
}

#[test]
fn license_and_quality_filters_report_their_reasons() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rows = vec![
        json!({"prompt": sentence(1), "completion": "ok", "license": "MIT"}).to_string(),
        json!({"prompt": sentence(2), "completion": "ok", "license": "cc-by-nc-4.0"}).to_string(),
        json!({"prompt": sentence(3), "completion": "ok"}).to_string(),
        json!({"prompt": sentence(4), "completion": "this mentions a secretword here"}).to_string(),
        json!({"prompt": "hi", "completion": "yo", "license": "mit"}).to_string(),
        json!({"prompt": sentence(5), "completion": "spam ".repeat(40), "license": "MIT"})
            .to_string(),
    ];
    rows.push(
        json!({"prompt": sentence(6), "completion": "fine", "license": "Apache-2.0"}).to_string(),
    );
    let input = write_jsonl(tmp.path(), "in.jsonl", &rows);
    let cfg_text = r#"
[curate]
seed = 3
[curate.license]
allow = ["MIT", "Apache-2.0"]
missing = "flag"
[curate.filters]
min_chars = 20
banned_terms = ["secretword"]
[curate.splits]
train = 1.0
val = 0.0
holdout = 0.0
"#;
    let cfg_path = tmp.path().join("curate.toml");
    std::fs::write(&cfg_path, cfg_text).unwrap();
    let cfg = CurateConfig::from_toml_file(&cfg_path).unwrap();
    assert_eq!(cfg.seed, 3);
    let out = tmp.path().join("out");
    let r = run(std::slice::from_ref(&input), &out, &cfg).unwrap();
    assert_eq!(r.counts.license_rejected, 1);
    assert_eq!(r.license.rejected.get("cc-by-nc-4.0"), Some(&1));
    assert_eq!(r.counts.filtered, 3);
    assert_eq!(r.rejected_by_reason.get("banned_term"), Some(&1));
    assert_eq!(r.rejected_by_reason.get("too_short"), Some(&1));
    assert_eq!(r.rejected_by_reason.get("repetition"), Some(&1));
    let lines: Vec<(u64, &str)> = r
        .rejected
        .iter()
        .map(|i| (i.line, i.reason.as_str()))
        .collect();
    assert_eq!(
        lines,
        vec![
            (2, "license"),
            (4, "banned_term"),
            (5, "too_short"),
            (6, "repetition")
        ]
    );
    assert_eq!(r.counts.kept, 3);
    assert_eq!(r.license.missing, 1);
    assert_eq!(r.license.flagged.len(), 1);
    assert_eq!(r.license.flagged[0].line, 3);
    assert_eq!(r.splits["train"].rows, 3);
    // `val` and `holdout` have fraction 0: empty, and no warning about them.
    assert!(
        r.warnings.iter().all(|w| !w.contains("split val")),
        "{:?}",
        r.warnings
    );

    // Policy drop: the unlicensed row goes too.
    let mut cfg2 = cfg.clone();
    cfg2.license.missing = loraops_data::curate::filters::MissingLicense::Drop;
    let r2 = run(&[input], &tmp.path().join("out2"), &cfg2).unwrap();
    assert_eq!(r2.counts.license_rejected, 3); // lines 2, 3 and 4 (4 has no license either)
    assert_eq!(r2.counts.kept, 2);

    // Unknown keys in the configuration are errors, not ignored.
    std::fs::write(&cfg_path, "[curate]\nsed = 1\n").unwrap();
    let e = CurateConfig::from_toml_file(&cfg_path)
        .unwrap_err()
        .to_string();
    assert!(e.contains("sed"), "{e}");
}

#[test]
fn bad_input_fails_loudly_or_is_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = CurateConfig::default();

    // Unreadable file.
    let e = run(
        &[tmp.path().join("nope.jsonl")],
        &tmp.path().join("o1"),
        &cfg,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("nope.jsonl"), "{e}");

    // Wrong format: CSV.
    let csv = tmp.path().join("data.csv");
    std::fs::write(&csv, "prompt,completion\nhello,world\nfoo,bar\n").unwrap();
    let e = run(&[csv], &tmp.path().join("o2"), &cfg)
        .unwrap_err()
        .to_string();
    assert!(e.contains("all 3 rows are invalid"), "{e}");
    assert!(e.contains("data.csv:1: not JSON"), "{e}");
    assert!(tmp.path().join("o2/report.json").exists());

    // Wrong family for the configured format.
    let sft = write_jsonl(tmp.path(), "sft.jsonl", &[pc("a", "b"), pc("c", "d")]);
    let mut pref = cfg.clone();
    pref.format = loraops_data::format::FormatChoice::Preference;
    let e = run(&[sft], &tmp.path().join("o3"), &pref)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("all 2 rows are invalid") && e.contains("preference"),
        "{e}"
    );

    // Nothing left after filtering.
    let short = write_jsonl(tmp.path(), "short.jsonl", &[pc("a", "b"), pc("c", "d")]);
    let mut strict = cfg.clone();
    strict.filters.min_chars = 1000;
    let e = run(&[short], &tmp.path().join("o4"), &strict)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no rows left") && e.contains("2 filtered"),
        "{e}"
    );

    // chosen == rejected is an invalid row with its line number.
    let prefs = write_jsonl(
        tmp.path(),
        "pref.jsonl",
        &[
            json!({"prompt": sentence(1), "chosen": "Yes, because of A.", "rejected": "No."}).to_string(),
            json!({"prompt": sentence(2), "chosen": "Same answer.", "rejected": "Same answer. "}).to_string(),
            json!({"prompt": sentence(3), "chosen": [{"role": "assistant", "content": "x"}], "rejected": [{"role": "assistant", "content": "y"}]}).to_string(),
        ],
    );
    let r = run(&[prefs], &tmp.path().join("o5"), &cfg).unwrap();
    assert_eq!(r.counts.invalid, 1);
    assert_eq!(r.invalid[0].line, 2);
    assert!(
        r.invalid[0]
            .detail
            .contains("chosen and rejected are identical")
    );
    assert_eq!(r.counts.kept, 2);

    // A KTO set with only one label: a counted warning.
    let kto = write_jsonl(
        tmp.path(),
        "kto.jsonl",
        &(0..30)
            .map(|i| {
                json!({"prompt": sentence(i), "completion": sentence(i + 50), "label": true})
                    .to_string()
            })
            .collect::<Vec<_>>(),
    );
    let r = run(&[kto], &tmp.path().join("o6"), &cfg).unwrap();
    assert_eq!(r.format, Some(loraops_data::format::Family::Kto));
    assert!(
        r.warnings
            .iter()
            .any(|w| w.contains("KTO split train has only desirable")),
        "{:?}",
        r.warnings
    );
    assert_eq!(r.splits["train"].undesirable, Some(0));

    // An empty split that was asked for is a warning, not silence.
    let tiny = write_jsonl(tmp.path(), "tiny.jsonl", &[pc(&sentence(1), "an answer")]);
    let r = run(&[tiny], &tmp.path().join("o7"), &cfg).unwrap();
    assert_eq!(r.counts.kept, 1);
    assert!(
        r.warnings.iter().any(|w| w.starts_with("split ")),
        "{:?}",
        r.warnings
    );
}

#[test]
fn balance_caps_limit_rows_per_source() {
    let tmp = tempfile::tempdir().unwrap();
    let rows: Vec<String> = (0..30)
        .map(|i| {
            json!({"prompt": sentence(i), "completion": sentence(i + 100),
                   "source": if i % 3 == 0 { "web" } else { "forum" }})
            .to_string()
        })
        .collect();
    let input = write_jsonl(tmp.path(), "in.jsonl", &rows);
    let mut cfg = CurateConfig::default();
    cfg.balance.max_per_value = Some(5);
    cfg.balance.caps.insert("web".into(), 7);
    let r = run(&[input], &tmp.path().join("out"), &cfg).unwrap();
    assert_eq!(r.sources.get("forum"), Some(&5));
    assert_eq!(r.sources.get("web"), Some(&7));
    assert_eq!(r.counts.balance_dropped, 18);
}

#[test]
fn a_shared_configuration_file_is_read_for_its_curation_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("loraops.toml");
    std::fs::write(
        &p,
        "seed = 11\n[registry]\nlisten = \"0.0.0.0:1\"\n[dedup]\nthreshold = 0.9\n",
    )
    .unwrap();
    let cfg = CurateConfig::from_toml_file(&p).unwrap();
    assert_eq!(cfg.seed, 11);
    assert_eq!(cfg.dedup.threshold, 0.9);
    std::fs::write(
        &p,
        "[data.curate]\nformat = \"kto\"\n[data.curate.pii]\nemail = false\n",
    )
    .unwrap();
    let cfg = CurateConfig::from_toml_file(&p).unwrap();
    assert_eq!(cfg.format, loraops_data::format::FormatChoice::Kto);
    assert!(!cfg.pii.email && cfg.pii.phone);
}

/// The default curation, judged by the stand-in server at `url`.
fn judged_by(url: String) -> CurateConfig {
    let mut cfg = CurateConfig::default();
    cfg.judge.enabled = true;
    cfg.judge.url = url;
    cfg.judge.model = "judge-model".into();
    cfg
}

/// A stand-in OpenAI-compatible server: scores 2 when the example contains "bad answer",
/// else 9; counts requests.
fn judge_server() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    judge_server_failing(false)
}

/// The same, or (`failing`) one that answers every request 503.
fn judge_server_failing(failing: bool) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = count.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { break };
            let c = c.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(stream.try_clone().unwrap());
                let (mut len, mut path) = (0usize, String::new());
                let mut first = String::new();
                r.read_line(&mut first).unwrap();
                path.push_str(first.split(' ').nth(1).unwrap_or(""));
                loop {
                    let mut h = String::new();
                    r.read_line(&mut h).unwrap();
                    if h == "\r\n" || h.is_empty() {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0; len];
                r.read_exact(&mut body).unwrap();
                let req: Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(path, "/v1/chat/completions");
                assert_eq!(req["model"], json!("judge-model"));
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if failing {
                    let _ = write!(
                        stream,
                        "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 7\r\nConnection: close\r\n\r\nloading"
                    );
                    return;
                }
                let text = req["messages"][1]["content"].as_str().unwrap();
                let score = if text.contains("bad answer") { 2 } else { 9 };
                let content = format!("{{\"score\": {score}, \"reason\": \"graded\"}}");
                let resp =
                    json!({"choices": [{"message": {"role": "assistant", "content": content}}]})
                        .to_string();
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                    resp.len(),
                    resp
                );
            });
        }
    });
    (url, count)
}

#[test]
fn the_llm_judge_rejects_rows_below_its_threshold() {
    let tmp = tempfile::tempdir().unwrap();
    let (url, count) = judge_server();
    let mut rows: Vec<String> = (0..12)
        .map(|i| pc(&sentence(i), &format!("A fine reply {}", sentence(i + 40))))
        .collect();
    rows[3] = pc(&sentence(3), &format!("bad answer {}", sentence(200)));
    rows[8] = pc(&sentence(8), &format!("bad answer {}", sentence(201)));
    rows.push(rows[0].clone()); // a duplicate is never sent to the judge
    let input = write_jsonl(tmp.path(), "in.jsonl", &rows);
    let mut cfg = judged_by(url);
    cfg.judge.threshold = 5.0;
    cfg.judge.concurrency = 3;
    let out = tmp.path().join("out");
    let r = run(std::slice::from_ref(&input), &out, &cfg).unwrap();
    assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 12);
    assert_eq!(r.judge.scored, 12);
    assert_eq!(r.judge.rejected, 2);
    assert_eq!(r.counts.judge_rejected, 2);
    assert_eq!(r.counts.kept, 10);
    let judged: Vec<u64> = r
        .rejected
        .iter()
        .filter(|i| i.reason == "judge")
        .map(|i| i.line)
        .collect();
    assert_eq!(judged, vec![4, 9]);
    assert!(r.rejected[0].detail.contains("judge score 2 < 5"));
    assert!((r.judge.mean_score.unwrap() - (10.0 * 9.0 + 2.0 * 2.0) / 12.0).abs() < 1e-9);
    assert!(!all_output(&out).contains("bad answer"));

    // An unreachable judge fails the run and names the endpoint.
    cfg.judge.url = "http://127.0.0.1:9/v1".into();
    cfg.judge.retries = 0;
    let e = run(&[input], &tmp.path().join("out2"), &cfg)
        .unwrap_err()
        .to_string();
    assert!(e.contains("127.0.0.1:9/v1/chat/completions"), "{e}");
}

#[test]
fn a_failing_judge_fails_the_run_after_one_rows_retries_not_every_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let (url, count) = judge_server_failing(true);
    let rows: Vec<String> = (0..40)
        .map(|i| pc(&sentence(i), &format!("A fine reply {}", sentence(i + 40))))
        .collect();
    let input = write_jsonl(tmp.path(), "in.jsonl", &rows);
    let mut cfg = judged_by(url);
    cfg.judge.concurrency = 2;
    cfg.judge.retries = 1;
    let out = tmp.path().join("out");
    let e = run(&[input], &out, &cfg).unwrap_err().to_string();
    assert!(e.contains("HTTP 503") && e.contains("loading"), "{e}");
    // Each of the two workers' rows is tried twice; every row's tries would be 80.
    let sent = count.load(std::sync::atomic::Ordering::SeqCst);
    assert!(sent <= 8, "{sent} requests to a judge that was failing");
    assert!(
        !out.join("train.jsonl").exists(),
        "a failed run writes no split"
    );
}

#[test]
fn the_llm_judge_down_weights_rows_it_doubts_instead_of_dropping_them() {
    let tmp = tempfile::tempdir().unwrap();
    let (url, _) = judge_server();
    let mut rows: Vec<String> = (0..8)
        .map(|i| pc(&sentence(i), &format!("A fine reply {}", sentence(i + 40))))
        .collect();
    rows[2] = pc(&sentence(2), &format!("bad answer {}", sentence(200)));
    // A row that already has a weight: the judge's factor multiplies it.
    rows[5] = json!({"prompt": sentence(5), "completion": format!("bad answer {}", sentence(201)),
        "weight": 2.0})
    .to_string();
    let input = write_jsonl(tmp.path(), "in.jsonl", &rows);
    let mut cfg = judged_by(url);
    cfg.splits.train = 1.0;
    cfg.splits.val = 0.0;
    cfg.splits.holdout = 0.0;
    cfg.judge.threshold = 1.0;
    cfg.judge.weight_below = Some(5.0);
    cfg.judge.weight = 0.25;
    let out = tmp.path().join("out");
    let r = run(std::slice::from_ref(&input), &out, &cfg).unwrap();
    assert_eq!(
        (r.judge.scored, r.judge.rejected, r.judge.weighted),
        (8, 0, 2)
    );
    assert_eq!(r.counts.kept, 8);
    assert_eq!(
        (r.judge.weight_below, r.judge.weight),
        (Some(5.0), Some(0.25))
    );
    assert!(
        r.summary()
            .contains("2 rows below 5 kept with weight x0.25"),
        "{}",
        r.summary()
    );
    let weights: std::collections::BTreeMap<String, Option<f64>> = split_rows(&out, "train")
        .iter()
        .map(|v| {
            (
                v["prompt"].as_str().unwrap().to_string(),
                v.get("weight").and_then(Value::as_f64),
            )
        })
        .collect();
    assert_eq!(weights[&sentence(2)], Some(0.25));
    assert_eq!(weights[&sentence(5)], Some(0.5));
    assert_eq!(
        weights[&sentence(0)],
        None,
        "rows the judge trusts are unchanged"
    );

    // The trainer reads the weights curation wrote (it reads them through `row::weight`;
    // trainer/tests/train/workflows.rs trains on such rows).
    let mut w: Vec<f32> = split_rows(&out, "train")
        .iter()
        .map(|v| loraops_data::row::weight(v).unwrap())
        .collect();
    w.sort_by(f32::total_cmp);
    assert_eq!(w, [0.25, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]);

    // Settings that cannot work are refused before any row is read.
    for (below, threshold, weight, want) in [
        (5.0, 6.0, 0.5, "must be above threshold"),
        (5.0, 1.0, 1.5, "weight must be in [0, 1]"),
    ] {
        let mut c = cfg.clone();
        c.judge.weight_below = Some(below);
        c.judge.threshold = threshold;
        c.judge.weight = weight;
        let e = run(std::slice::from_ref(&input), &tmp.path().join("o2"), &c)
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{e}");
    }
    let mut c = cfg.clone();
    c.judge.enabled = false;
    let e = run(&[input], &tmp.path().join("o3"), &c)
        .unwrap_err()
        .to_string();
    assert!(e.contains("needs the judge"), "{e}");

    // A row whose weight the trainer would refuse is invalid here already.
    let bad = write_jsonl(
        tmp.path(),
        "bad.jsonl",
        &[
            pc(&sentence(1), "ok"),
            json!({"prompt": sentence(2), "completion": "x", "weight": -1}).to_string(),
        ],
    );
    let r = run(&[bad], &tmp.path().join("o4"), &CurateConfig::default()).unwrap();
    assert_eq!(r.counts.invalid, 1);
    assert!(
        r.invalid.iter().any(|i| i
            .detail
            .contains("\"weight\" must be a non-negative number")),
        "{:?}",
        r.invalid
    );
}

#[test]
fn mmr_selection_keeps_a_diverse_train_subset() {
    let tmp = tempfile::tempdir().unwrap();
    let topics = [
        "The train to Busan leaves from Seoul station every twenty minutes during the morning rush hour",
        "Sourdough bread needs a mature starter, a long cold fermentation and a very hot oven to rise well",
        "The borrow checker rejects programs where a mutable reference aliases a shared reference at once",
    ];
    let mut rows = Vec::new();
    for v in 0..8 {
        for t in topics {
            rows.push(pc("Tell me something.", &format!("{t}, note {v}.")));
        }
    }
    let input = write_jsonl(tmp.path(), "in.jsonl", &rows);
    let mut cfg = CurateConfig::default();
    cfg.dedup.near = false;
    cfg.splits.train = 1.0;
    cfg.splits.val = 0.0;
    cfg.splits.holdout = 0.0;
    cfg.select.train_rows = Some(3);
    let out = tmp.path().join("out");
    let r = run(std::slice::from_ref(&input), &out, &cfg).unwrap();
    let sel = r.selection.as_ref().unwrap();
    assert_eq!((sel.from, sel.selected), (24, 3));
    assert_eq!(r.counts.kept, 3);
    assert_eq!(r.counts.not_selected, 21);
    let train = split_rows(&out, "train");
    assert_eq!(train.len(), 3);
    for t in topics {
        let head = &t[..30];
        assert_eq!(
            train
                .iter()
                .filter(|row| row["completion"].as_str().unwrap().starts_with(head))
                .count(),
            1,
            "{head}"
        );
    }
    let bytes = std::fs::read(out.join("train.jsonl")).unwrap();
    assert_eq!(r.splits["train"].sha256, sha256_hex(&bytes));
    assert!(!out.join("train.jsonl.all").exists());
}

fn sourced(i: usize, source: &str) -> String {
    json!({"prompt": sentence(i), "completion": sentence(i + 20_000), "source": source}).to_string()
}

fn all_rows(out: &Path) -> Vec<Value> {
    ["train", "val", "holdout", "regression"]
        .iter()
        .flat_map(|s| split_rows(out, s))
        .collect()
}

fn count_by(rows: &[Value], field: &str) -> std::collections::BTreeMap<String, u64> {
    let mut m = std::collections::BTreeMap::new();
    for r in rows {
        *m.entry(r[field].as_str().unwrap_or("(none)").to_string())
            .or_insert(0) += 1;
    }
    m
}

#[test]
fn target_proportions_keep_the_largest_seeded_sample() {
    let tmp = tempfile::tempdir().unwrap();
    // 120 web, 60 forum, 20 docs, 10 spam rows.
    let mut rows = Vec::new();
    for i in 0..210 {
        let s = match i {
            0..120 => "web",
            120..180 => "forum",
            180..200 => "docs",
            _ => "spam",
        };
        rows.push(sourced(i, s));
    }
    let input = write_jsonl(tmp.path(), "in.jsonl", &rows);
    let mut cfg = CurateConfig::default();
    cfg.balance.proportions = [("web", 0.5), ("forum", 0.3), ("docs", 0.2)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let out = tmp.path().join("a");
    let r = run(std::slice::from_ref(&input), &out, &cfg).unwrap();
    // docs bounds the sample: 20 / 0.2 = 100 rows, 50 web and 30 forum.
    let got = count_by(&all_rows(&out), "source");
    let want: std::collections::BTreeMap<String, u64> =
        [("web", 50u64), ("forum", 30), ("docs", 20)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
    assert_eq!(got, want);
    assert_eq!(r.sources, want);
    assert_eq!(r.counts.kept, 100);
    assert_eq!(r.counts.proportion_dropped, 110);
    assert_eq!(r.rejected_by_reason["proportions"], 110);
    let b = r.balance.as_ref().unwrap();
    assert_eq!(b.sampled, 100);
    assert_eq!(b.limited_by, vec!["docs".to_string()]);
    assert_eq!(b.unlisted.get("spam"), Some(&10));
    assert_eq!((b.values["web"].available, b.values["web"].kept), (120, 50));
    assert!((b.values["forum"].achieved - 0.3).abs() < 1e-9);
    assert!(
        r.warnings.iter().any(|w| w.contains("spam (10)")),
        "{:?}",
        r.warnings
    );
    // Split digests describe the rewritten files, and every dropped row is in rejected.jsonl.
    for (name, s) in &r.splits {
        let bytes = std::fs::read(out.join(format!("{name}.jsonl"))).unwrap();
        assert_eq!(s.sha256, sha256_hex(&bytes), "{name}");
        assert_eq!(
            s.rows as usize,
            bytes.iter().filter(|b| **b == b'\n').count()
        );
    }
    let rejected = std::fs::read_to_string(out.join("rejected.jsonl")).unwrap();
    assert_eq!(rejected.matches("\"proportions\"").count(), 110);

    // Reproducible; another seed draws another sample with the same counts.
    let again = tmp.path().join("b");
    run(std::slice::from_ref(&input), &again, &cfg).unwrap();
    assert_eq!(all_output(&out), all_output(&again));
    let other = tmp.path().join("c");
    let r2 = run(
        std::slice::from_ref(&input),
        &other,
        &CurateConfig {
            seed: 99,
            ..cfg.clone()
        },
    )
    .unwrap();
    assert_eq!(r2.sources, want);
    let ids = |o: &Path| {
        let mut v: Vec<String> = all_rows(o)
            .iter()
            .map(|r| r["prompt"].as_str().unwrap().to_string())
            .collect();
        v.sort();
        v
    };
    assert_ne!(ids(&out), ids(&other));

    // A total below the maximum is met exactly; above it, the shortfall is reported.
    cfg.balance.total = Some(40);
    let r = run(std::slice::from_ref(&input), &tmp.path().join("d"), &cfg).unwrap();
    assert_eq!(r.counts.kept, 40);
    assert_eq!(r.sources["web"], 20);
    cfg.balance.total = Some(150);
    let r = run(std::slice::from_ref(&input), &tmp.path().join("e"), &cfg).unwrap();
    assert_eq!(r.counts.kept, 100);
    let b = r.balance.as_ref().unwrap();
    assert_eq!(
        (b.values["web"].requested, b.values["web"].shortfall),
        (Some(75), 25)
    );
    assert!(
        r.warnings.iter().any(|w| w.contains("short by 50")),
        "{:?}",
        r.warnings
    );

    // Bad proportions: a clear error, never an empty output.
    cfg.balance.total = None;
    cfg.balance.proportions.insert("wiki".into(), 0.1);
    let e = run(std::slice::from_ref(&input), &tmp.path().join("f"), &cfg)
        .unwrap_err()
        .to_string();
    assert!(e.contains("sum to 1.1000"), "{e}");
    cfg.balance.proportions.remove("web");
    cfg.balance.proportions.insert("web".into(), 0.4);
    let e = run(std::slice::from_ref(&input), &tmp.path().join("g"), &cfg)
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"wiki\"") && e.contains("web (120)"), "{e}");
    // Found only after the streaming pass, yet no split is left half-written.
    let left: Vec<_> = std::fs::read_dir(tmp.path().join("g"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn general_rows_are_mixed_in_at_the_ratio_and_tagged() {
    let tmp = tempfile::tempdir().unwrap();
    let domain: Vec<String> = (0..60).map(|i| sourced(i, "support")).collect();
    let mut general: Vec<String> = (1000..1100).map(|i| sourced(i, "web")).collect();
    // A general row that duplicates a domain row is dropped as a duplicate, not mixed in.
    general.push(domain[0].clone());
    let d = write_jsonl(tmp.path(), "domain.jsonl", &domain);
    let g = write_jsonl(tmp.path(), "general.jsonl", &general);
    let mut cfg = CurateConfig::default();
    cfg.mix.general = vec![g.clone()];
    cfg.mix.ratio = Some("1:3".into());
    let out = tmp.path().join("out");
    let r = run(std::slice::from_ref(&d), &out, &cfg).unwrap();
    let rows = all_rows(&out);
    let origins = count_by(&rows, "origin");
    assert_eq!(origins.get("domain"), Some(&60));
    assert_eq!(origins.get("general"), Some(&20));
    assert_eq!(rows.len(), 80, "every row is tagged");
    for row in &rows {
        let want = if row["source"] == "web" {
            "general"
        } else {
            "domain"
        };
        assert_eq!(row["origin"], want, "{row}");
    }
    let m = r.mix.as_ref().unwrap();
    assert_eq!(
        (m.domain_rows, m.general_available, m.general_kept),
        (60, 100, 20)
    );
    assert_eq!(m.achieved_ratio, "1:3.00");
    assert!((m.achieved_general_share - 0.25).abs() < 1e-9);
    assert_eq!(r.counts.mix_dropped, 80);
    assert_eq!(r.counts.exact_duplicates, 1);
    assert_eq!(r.counts.kept, 80);
    assert_eq!(r.general_inputs.len(), 1);
    assert_eq!(r.general_inputs[0].lines, 101);

    // Too few general rows: all are kept, the achieved ratio is reported with a warning.
    cfg.mix.ratio = Some("3:1".into());
    let r = run(std::slice::from_ref(&d), &tmp.path().join("out2"), &cfg).unwrap();
    let m = r.mix.as_ref().unwrap();
    assert_eq!(m.general_kept, 100);
    assert_eq!(m.achieved_ratio, "3:1.80");
    assert!(
        r.warnings
            .iter()
            .any(|w| w.starts_with("mix: 180 general rows wanted")),
        "{:?}",
        r.warnings
    );

    // Proportions apply to the domain rows, then the general rows follow the ratio.
    let mut domain2 = domain.clone();
    domain2.extend((200..240).map(|i| sourced(i, "forum")));
    let d2 = write_jsonl(tmp.path(), "domain2.jsonl", &domain2);
    cfg.mix.ratio = Some("1:4".into());
    cfg.balance.proportions = [("support".to_string(), 0.5), ("forum".to_string(), 0.5)]
        .into_iter()
        .collect();
    let out3 = tmp.path().join("out3");
    let r = run(&[d2], &out3, &cfg).unwrap();
    let by_source = count_by(&all_rows(&out3), "source");
    assert_eq!(
        (by_source["support"], by_source["forum"], by_source["web"]),
        (40, 40, 20)
    );
    assert_eq!(r.mix.as_ref().unwrap().domain_rows, 80);

    // Half a mix configuration is an error before anything is read.
    cfg.mix.ratio = None;
    let e = run(std::slice::from_ref(&d), &tmp.path().join("out4"), &cfg)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no ratio"), "{e}");
}

type Handler = dyn Fn(&Value, Option<&str>) -> (u16, String) + Send + Sync;

/// A stand-in OpenAI-compatible chat server answering with `handler(request, bearer token)`:
/// (status, message content, or the whole body for a non-200 status).
fn chat_server(handler: std::sync::Arc<Handler>) -> String {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { break };
            let h = handler.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(stream.try_clone().unwrap());
                let mut len = 0usize;
                let mut bearer = None;
                let mut first = String::new();
                r.read_line(&mut first).unwrap();
                loop {
                    let mut h = String::new();
                    r.read_line(&mut h).unwrap();
                    if h == "\r\n" || h.is_empty() {
                        break;
                    }
                    let lower = h.to_ascii_lowercase();
                    if let Some(v) = lower.strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                    if lower.starts_with("authorization: bearer ") {
                        bearer = Some(h["authorization: bearer ".len()..].trim().to_string());
                    }
                }
                let mut body = vec![0; len];
                r.read_exact(&mut body).unwrap();
                let req: Value = serde_json::from_slice(&body).unwrap();
                let (status, content) = h(&req, bearer.as_deref());
                let resp = if status == 200 {
                    json!({"choices": [{"message": {"role": "assistant", "content": content}}]})
                        .to_string()
                } else {
                    content
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                    resp.len(),
                    resp
                );
            });
        }
    });
    url
}

#[test]
fn synth_filters_deduplicates_judges_and_selects_with_provenance() {
    use loraops_data::synth::{SynthConfig, synth};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let tmp = tempfile::tempdir().unwrap();
    let seed_rows: Vec<String> = (0..6)
        .map(|i| {
            json!({"id": format!("s{i}"), "prompt": format!("Seed task {i}: {}", sentence(i)),
                   "completion": format!("Seed answer {}", sentence(i + 500))})
            .to_string()
        })
        .chain([json!({"prompt": "p", "chosen": "a", "rejected": "b"}).to_string()])
        .collect();
    let seeds = write_jsonl(tmp.path(), "seeds.jsonl", &seed_rows);
    // The n-th instruction asked for (in arrival order): every 5th repeats seed 0's task (its
    // answer then equals seed 0's answer), every 7th is blank, every 4th carries an e-mail
    // address; the answer to instruction 3 is poor, and the judge scores it 2.
    let n = std::sync::Arc::new(AtomicUsize::new(0));
    let judged = std::sync::Arc::new(AtomicUsize::new(0));
    let (n2, j2) = (n.clone(), judged.clone());
    let url = chat_server(std::sync::Arc::new(
        move |req: &Value, bearer: Option<&str>| {
            assert_eq!(req["model"], "gen-model");
            // The generator's token reaches the judge too.
            assert_eq!(bearer, Some("tok-123"));
            let msgs = req["messages"].as_array().unwrap();
            if msgs[0]["role"] == "system" {
                j2.fetch_add(1, Ordering::SeqCst);
                let text = msgs[1]["content"].as_str().unwrap();
                let score = if text.contains("poor") { 2 } else { 8 };
                return (200, format!("{{\"score\": {score}, \"reason\": \"ok\"}}"));
            }
            let content = msgs[0]["content"].as_str().unwrap();
            if content.contains("### Example") {
                assert!(content.contains("Seed task"), "examples are shown");
                let i = n2.fetch_add(1, Ordering::SeqCst) + 1;
                let task = if i % 5 == 0 {
                    format!("Seed task 0: {}", sentence(0))
                } else if i % 7 == 0 {
                    "   ".to_string()
                } else if i % 4 == 0 {
                    format!(
                        "Task: write to bob{i}@example.com about {}",
                        sentence(3000 + i)
                    )
                } else {
                    format!("Task: describe {}", sentence(1000 + i))
                };
                return (200, task);
            }
            if content.starts_with("Seed task 0:") {
                return (200, format!("Seed answer {}", sentence(500)));
            }
            let quality = if content.contains("number 1003") {
                "poor"
            } else {
                "fine"
            };
            (
                200,
                format!(
                    "A {quality} answer about {}",
                    sentence(content.len() + 7000)
                ),
            )
        },
    ));
    let cfg = SynthConfig {
        url: url.clone(),
        model: "gen-model".into(),
        api_key: Some("tok-123".into()),
        rows: 5,
        per_round: 8,
        max_rounds: 3,
        few_shot: 2,
        concurrency: 3,
        pool_factor: 100.0,
        retries: 0,
        judge: loraops_data::synth::SynthJudge {
            enabled: true,
            threshold: 5.0,
            ..Default::default()
        },
        ..Default::default()
    };
    let out = tmp.path().join("out");
    let r = synth(std::slice::from_ref(&seeds), &out, &cfg, &mut |_| {}).unwrap();
    let c = &r.counts;
    assert_eq!(n.load(Ordering::SeqCst), 24, "three rounds of eight");
    assert_eq!(
        (c.generated, r.rounds, r.stopped.as_str()),
        (24, 3, "max_rounds")
    );
    assert_eq!((r.seeds.rows, r.seeds.invalid), (6, 1));
    // Instructions 5, 10, 15 and 20 repeat seed 0; 7, 14 and 21 are blank.
    assert_eq!(r.rejected_by_reason.get("empty_instruction"), Some(&3));
    assert_eq!(c.exact_duplicates, 4);
    assert_eq!(c.duplicates_of_seeds, 4);
    assert_eq!(c.judge_rejected, 1, "{:?}", r.rejected);
    assert_eq!(judged.load(Ordering::SeqCst) as u64, r.judge.scored);
    assert_eq!(c.accepted, 24 - 3 - 4 - 1 - c.near_duplicates);
    assert_eq!(c.rejected, 24 - c.accepted);
    assert_eq!((c.selected, c.not_selected), (5, c.accepted - 5));
    let rows: Vec<Value> = std::fs::read_to_string(out.join("synthetic.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 5);
    assert_eq!(
        r.output.sha256,
        sha256_hex(&std::fs::read(out.join("synthetic.jsonl")).unwrap())
    );
    for row in &rows {
        let p = &row["provenance"];
        assert_eq!(p["synthetic"], true);
        assert_eq!(p["generator"], "gen-model");
        assert_eq!(p["judge_score"], 8.0);
        let ids = p["seed_ids"].as_array().unwrap();
        assert_eq!(ids.len(), 2);
        assert!(
            ids.iter().all(|i| i.as_str().unwrap().starts_with('s')),
            "{ids:?}"
        );
        assert!((1..=3).contains(&p["round"].as_u64().unwrap()));
        assert!(p["created_at"].as_str().unwrap().ends_with('Z'));
        assert_eq!(row["source"], "synthetic");
        let user = row["messages"][0]["content"].as_str().unwrap();
        assert!(!user.starts_with("Task:"), "{user}");
        assert!(!user.contains("@example.com"), "{user}");
        assert!(!row.to_string().contains("poor"));
    }
    let rejected = std::fs::read_to_string(out.join("rejected.jsonl")).unwrap();
    assert_eq!(rejected.lines().count() as u64, c.rejected);
    assert!(rejected.contains("duplicate of seed s0"), "{rejected}");
    let on_disk: Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(on_disk["counts"]["selected"], 5);

    let mut distinct: Vec<String> = rows.iter().map(|r| r["messages"].to_string()).collect();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 5);
}

#[test]
fn synth_fails_loudly_without_usable_output() {
    use loraops_data::synth::{SynthConfig, synth};
    let tmp = tempfile::tempdir().unwrap();
    let seeds = write_jsonl(
        tmp.path(),
        "seeds.jsonl",
        &[
            pc(&sentence(1), &sentence(2)),
            pc(&sentence(3), &sentence(4)),
        ],
    );
    let base = SynthConfig {
        model: "m".into(),
        rows: 3,
        per_round: 4,
        max_rounds: 2,
        retries: 0,
        ..Default::default()
    };
    // Unreachable gateway: the error names the URL.
    let cfg = SynthConfig {
        url: "http://127.0.0.1:9/v1".into(),
        ..base.clone()
    };
    let e = synth(
        std::slice::from_ref(&seeds),
        &tmp.path().join("o1"),
        &cfg,
        &mut |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("127.0.0.1:9/v1/chat/completions") && e.contains("cannot reach"),
        "{e}"
    );

    // An unknown model (404) stops the run with the gateway's message.
    let url = chat_server(std::sync::Arc::new(|_: &Value, _: Option<&str>| {
        (
            404,
            json!({"error": {"message": "model m not found"}}).to_string(),
        )
    }));
    let cfg = SynthConfig {
        url,
        ..base.clone()
    };
    let e = synth(
        std::slice::from_ref(&seeds),
        &tmp.path().join("o2"),
        &cfg,
        &mut |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("HTTP 404") && e.contains("model m not found"),
        "{e}"
    );

    // Everything the model writes is a copy of a seed: no row, an error, and a report.
    let url = chat_server(std::sync::Arc::new(|req: &Value, _: Option<&str>| {
        let content = req["messages"][0]["content"].as_str().unwrap();
        if content.contains("### Example") {
            (200, sentence(1))
        } else {
            (200, sentence(2))
        }
    }));
    let cfg = SynthConfig {
        url,
        ..base.clone()
    };
    let out = tmp.path().join("o3");
    let e = synth(std::slice::from_ref(&seeds), &out, &cfg, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("synth accepted no candidate: 8 generated in 2 rounds"),
        "{e}"
    );
    assert!(e.contains("exact_duplicate 8"), "{e}");
    let rep: Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(rep["counts"]["duplicates_of_seeds"], 8);

    // Seeds that are not SFT rows.
    let prefs = write_jsonl(
        tmp.path(),
        "prefs.jsonl",
        &[json!({"prompt": "a", "chosen": "b", "rejected": "c"}).to_string()],
    );
    let e = synth(&[prefs], &tmp.path().join("o4"), &base, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no usable seed rows (1 invalid)") && e.contains("synth needs SFT"),
        "{e}"
    );
}
