//! `loraops data` end to end: `data synth` against `loraops up` serving a generated tiny model
//! (the native engine), and `data curate` with target proportions, general:domain mixing and MMR
//! selection from flags over a configuration file.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

use serde_json::{Value, json};

use crate::helpers::{exe, ok_json};
use crate::stack::Stack;

/// `loraops ARGS` with the gateway's token (or none), without inherited loraops settings.
fn loraops(token: Option<&str>, args: &[&str]) -> Output {
    let mut c = Command::new(exe());
    c.args(args)
        .env("RUST_LOG", "warn")
        .env_remove("LORAOPS_TOKEN")
        .env_remove("LORAOPS_GATEWAY_TOKEN")
        .env_remove("LORAOPS_GATEWAY_URL")
        .env_remove("LORAOPS_CONFIG");
    if let Some(t) = token {
        c.env("LORAOPS_TOKEN", t);
    }
    c.output().unwrap()
}

fn fails_with(out: Output, code: i32, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{err}");
    for n in needles {
        assert!(err.contains(n), "{n:?} not in: {err}");
    }
}

fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn write_rows(path: &Path, rows: &[Value]) {
    std::fs::write(
        path,
        rows.iter()
            .map(|r| r.to_string() + "\n")
            .collect::<String>(),
    )
    .unwrap();
}

#[test]
fn synth_generates_rows_through_the_gateway_with_provenance() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("e2e-tiny");
    let init = Command::new(exe())
        .args(["model", "init-tiny", base.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let up = Stack::up(&dir.path().join("data"), &base);
    let token = up.token("e2e-data", "viewer");

    let topics = [
        "reset a password",
        "download an invoice",
        "change the billing address",
        "close an account",
        "add a team member",
        "export the audit log",
    ];
    let seeds = dir.path().join("seeds.jsonl");
    let seed_rows: Vec<Value> = topics
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({"id": format!("seed-{i}"), "messages": [
                {"role": "user", "content": format!("How do I {t}?")},
                {"role": "assistant", "content": format!("Open Settings, choose the page to {t}, and confirm.")}]})
        })
        .collect();
    write_rows(&seeds, &seed_rows);
    // A random tiny model writes gibberish: let the quality filters pass it.
    let cfg = dir.path().join("synth.toml");
    std::fs::write(
        &cfg,
        "[synth]\ninstruction_max_tokens = 24\n[synth.filters]\nmax_repeated_ngram_fraction = 1.0\nmax_char_run = 100000\n",
    )
    .unwrap();
    let out = dir.path().join("synth");
    let gw = up.gateway.as_str();
    let report = ok_json(loraops(
        Some(&token),
        &[
            "--json",
            "--config",
            cfg.to_str().unwrap(),
            "data",
            "synth",
            seeds.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--gateway",
            gw,
            "--model",
            "e2e-tiny",
            "--rows",
            "3",
            "--few-shot",
            "2",
            "--per-round",
            "4",
            "--max-rounds",
            "2",
            "--concurrency",
            "2",
            "--temperature",
            "1.0",
            "--max-tokens",
            "32",
            "--seed",
            "5",
        ],
    ));
    let c = &report["counts"];
    let n = |k: &str| c[k].as_u64().unwrap();
    assert_eq!(report["generator"], "e2e-tiny");
    assert_eq!(report["url"], format!("{gw}/v1"));
    assert_eq!(report["seeds"]["rows"], 6);
    // Bounded: two rounds of four unless the pool (2 × 3 rows) filled first.
    assert!(n("generated") <= 8 && n("generated") % 4 == 0, "{report}");
    assert_eq!(n("accepted") + n("rejected"), n("generated"), "{report}");
    assert_eq!(n("selected") + n("not_selected"), n("accepted"));
    let selected = n("selected");
    assert!((1..=3).contains(&selected), "{report}");
    let by_reason: u64 = report["rejected_by_reason"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(by_reason, n("rejected"));
    let rows = jsonl(&out.join("synthetic.jsonl"));
    assert_eq!(rows.len() as u64, selected);
    assert_eq!(report["output"]["rows"].as_u64(), Some(selected));
    let seed_ids: Vec<String> = (0..6).map(|i| format!("seed-{i}")).collect();
    for row in &rows {
        let p = &row["provenance"];
        assert_eq!(p["synthetic"], true, "{row}");
        assert_eq!(p["generator"], "e2e-tiny");
        assert!(p["judge_score"].is_null());
        assert!((1..=2).contains(&p["round"].as_u64().unwrap()));
        let ids = p["seed_ids"].as_array().unwrap();
        assert_eq!(ids.len(), 2);
        for id in ids {
            assert!(seed_ids.contains(&id.as_str().unwrap().to_string()), "{id}");
        }
        assert!(chrono_like(p["created_at"].as_str().unwrap()));
        let msgs = row["messages"].as_array().unwrap();
        assert_eq!(
            (msgs[0]["role"].as_str(), msgs[1]["role"].as_str()),
            (Some("user"), Some("assistant"))
        );
        assert!(!msgs[0]["content"].as_str().unwrap().trim().is_empty());
        assert!(!msgs[1]["content"].as_str().unwrap().trim().is_empty());
    }
    assert_eq!(
        jsonl(&out.join("rejected.jsonl")).len() as u64,
        n("rejected")
    );

    // Dedup with the real model: one seed and greedy decoding make every prompt, and so every
    // candidate, the same: the first is kept and the others are its exact duplicates.
    let one = dir.path().join("one-seed.jsonl");
    write_rows(&one, &seed_rows[..1]);
    let out1 = dir.path().join("synth-one");
    let r1 = ok_json(loraops(
        Some(&token),
        &[
            "--json",
            "--config",
            cfg.to_str().unwrap(),
            "data",
            "synth",
            one.to_str().unwrap(),
            "--out",
            out1.to_str().unwrap(),
            "--gateway",
            gw,
            "--model",
            "e2e-tiny",
            "--rows",
            "2",
            "--few-shot",
            "1",
            "--per-round",
            "3",
            "--max-rounds",
            "2",
            "--concurrency",
            "1",
            "--temperature",
            "0",
            "--max-tokens",
            "16",
        ],
    ));
    let c1 = &r1["counts"];
    assert_eq!(c1["generated"], 6, "{r1}");
    assert_eq!(c1["accepted"], 1, "{r1}");
    assert_eq!(c1["exact_duplicates"], 5, "{r1}");
    assert_eq!(c1["selected"], 1);
    assert_eq!(r1["stopped"], "max_rounds");
    assert!(
        r1["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w.as_str().unwrap().starts_with("only 1 of 2 rows")),
        "{r1}"
    );
    let dups = jsonl(&out1.join("rejected.jsonl"));
    assert!(
        dups.iter().all(|d| d["reason"] == "exact_duplicate"
            && d["detail"].as_str().unwrap().contains("candidate 1-0")),
        "{dups:?}"
    );

    // Bad input: a clear error naming the cause, never an empty output.
    let base_args = |out: &Path| -> Vec<String> {
        [
            "data",
            "synth",
            seeds.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--per-round",
            "2",
            "--max-rounds",
            "1",
            "--max-tokens",
            "8",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let run = |token: Option<&str>, extra: &[&str], out: &str| {
        let mut a = base_args(&dir.path().join(out));
        a.extend(extra.iter().map(|s| s.to_string()));
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        loraops(token, &a)
    };
    fails_with(
        run(
            Some(&token),
            &["--gateway", "http://127.0.0.1:9", "--model", "e2e-tiny"],
            "b1",
        ),
        1,
        &["http://127.0.0.1:9/v1", "cannot reach"],
    );
    fails_with(
        run(
            Some(&token),
            &["--gateway", gw, "--model", "no-such-model"],
            "b2",
        ),
        2,
        &["no-such-model"],
    );
    fails_with(
        run(Some(&token), &["--gateway", gw], "b4"),
        2,
        &["`model` is required"],
    );
    // Filters no candidate can pass: the run fails, and the report says why.
    let strict = dir.path().join("strict.toml");
    std::fs::write(&strict, "[synth.filters]\nmin_chars = 100000\n").unwrap();
    fails_with(
        loraops(
            Some(&token),
            &[
                "--config",
                strict.to_str().unwrap(),
                "data",
                "synth",
                seeds.to_str().unwrap(),
                "--out",
                dir.path().join("b5").to_str().unwrap(),
                "--gateway",
                gw,
                "--model",
                "e2e-tiny",
                "--per-round",
                "2",
                "--max-rounds",
                "1",
                "--max-tokens",
                "8",
                "--temperature",
                "0",
            ],
        ),
        2,
        &[
            "synth accepted no candidate: 2 generated in 1 rounds",
            "too_short 2",
        ],
    );
    let r5: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("b5/report.json")).unwrap()).unwrap();
    assert_eq!(r5["counts"]["selected"], 0);
}

/// An RFC 3339 UTC timestamp to the second: YYYY-MM-DDTHH:MM:SSZ.
fn chrono_like(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 20
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[19] == b'Z'
        && s[..4].chars().all(|c| c.is_ascii_digit())
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

fn row(i: usize, source: &str) -> Value {
    json!({"prompt": sentence(i), "completion": sentence(i + 50_000), "source": source})
}

#[test]
fn curate_balances_mixes_and_selects_from_flags() {
    let dir = tempfile::tempdir().unwrap();
    let domain = dir.path().join("domain.jsonl");
    let general = dir.path().join("general.jsonl");
    let mut d: Vec<Value> = (0..30).map(|i| row(i, "support")).collect();
    d.extend((100..120).map(|i| row(i, "forum")));
    d.extend((200..205).map(|i| row(i, "spam")));
    write_rows(&domain, &d);
    write_rows(
        &general,
        &(1000..1040).map(|i| row(i, "web")).collect::<Vec<_>>(),
    );
    // The file asks for 5 rows at lambda 0.9; --select overrides the count, not the lambda.
    let cfg = dir.path().join("curate.toml");
    std::fs::write(
        &cfg,
        "[curate]\nseed = 3\n[curate.select]\ntrain_rows = 5\nlambda = 0.9\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    let args = |out: &Path, extra: &[&str]| -> Output {
        let mut a = vec![
            "--json",
            "--config",
            cfg.to_str().unwrap(),
            "data",
            "curate",
            domain.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--fractions",
            "1,0,0",
        ];
        a.extend_from_slice(extra);
        loraops(None, &a)
    };
    let r = ok_json(args(
        &out,
        &[
            "--proportions",
            "support=0.5,forum=0.5",
            "--general",
            general.to_str().unwrap(),
            "--mix-ratio",
            "1:4",
            "--select",
            "30",
        ],
    ));
    // 20 support + 20 forum meet the proportions; 1:4 adds 10 general rows; MMR keeps 30.
    let b = &r["balance"];
    assert_eq!(b["sampled"], 40, "{r}");
    assert_eq!(b["values"]["support"]["kept"], 20);
    assert_eq!(b["values"]["forum"]["kept"], 20);
    assert_eq!(b["limited_by"], json!(["forum"]));
    assert_eq!(b["unlisted"]["spam"], 5);
    let m = &r["mix"];
    assert_eq!(
        (m["domain_rows"].as_u64(), m["general_kept"].as_u64()),
        (Some(40), Some(10))
    );
    assert_eq!(m["achieved_ratio"], "1:4.00");
    assert_eq!(r["selection"]["from"], 50);
    assert_eq!(r["selection"]["selected"], 30);
    assert_eq!(r["selection"]["lambda"], 0.9);
    assert_eq!(r["counts"]["kept"], 30);
    let train = jsonl(&out.join("train.jsonl"));
    assert_eq!(train.len(), 30);
    let mut origins: BTreeMap<String, u64> = BTreeMap::new();
    for t in &train {
        let o = t["origin"].as_str().unwrap();
        assert_eq!(o == "general", t["source"] == "web", "{t}");
        assert_ne!(t["source"], "spam");
        *origins.entry(o.to_string()).or_default() += 1;
    }
    assert_eq!(origins.values().sum::<u64>(), 30);
    // The split digest describes the file written.
    {
        use sha2::Digest;
        let bytes = std::fs::read(out.join("train.jsonl")).unwrap();
        assert_eq!(
            r["splits"]["train"]["sha256"].as_str().unwrap(),
            hex::encode(sha2::Sha256::digest(&bytes))
        );
    }

    // --mmr-lambda overrides the file's lambda.
    let r2 = ok_json(args(
        &dir.path().join("out2"),
        &["--select", "7", "--mmr-lambda", "0.2"],
    ));
    assert_eq!(r2["selection"]["selected"], 7);
    assert_eq!(r2["selection"]["lambda"], 0.2);

    // Bad input exits 2 with a message that names the problem.
    for (extra, needle) in [
        (
            vec!["--proportions", "support=0.5,forum=0.3"],
            "sum to 0.8000",
        ),
        (vec!["--proportions", "support=0.5,wiki=0.5"], "\"wiki\""),
        (vec!["--proportions", "support"], "VALUE=SHARE"),
        (vec!["--mix-ratio", "1:3"], "no general files"),
        (vec!["--general", general.to_str().unwrap()], "no ratio"),
        (
            vec!["--general", general.to_str().unwrap(), "--mix-ratio", "1:0"],
            "GENERAL:DOMAIN",
        ),
        (vec!["--select", "0"], "train_rows must be at least 1"),
        (vec!["--mmr-lambda", "2"], "lambda must be in [0, 1]"),
    ] {
        let out = args(&dir.path().join("bad"), &extra);
        fails_with(out, 2, &[needle]);
    }
}
