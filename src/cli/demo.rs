//! `loraops demo`: the lifecycle end to end on embedded defaults — generate a tiny base model,
//! fine-tune a LoRA adapter on a built-in dataset, start a registry, register the base model,
//! push the adapter (twice: same version), pull it back and verify every byte, serve it
//! through the gateway, show the gate refusing a canary without evidence, evaluate it through
//! the gateway and post the evidence, then canary it under simulated users until the
//! controller promotes it.
//!
//! Everything lives under `<data-dir>/demo`, emptied when the demo starts, so a second run, or
//! one after Ctrl-C, starts clean; the generated base model is kept beside it. The registry is
//! always the embedded one (SQLite and local blobs there), whatever the configuration names.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use loraops_gateway::{Application as GatewayApp, GatewaySettings};
use loraops_registry::api::{
    Comparison, EngineIdentity, GatePolicy, GateReport, GateRule, Name, NewEvidence, NewSuite,
    Relation, Role, RolloutSpec, StartRollout, SuiteManifest, SuiteRef,
};
use loraops_registry::auth::Signer;
use loraops_registry::client::{ClientError, RegistryClient, no_progress};
use loraops_registry::server::{Application, RegistrySettings, ServeSettings};
use loraops_trainer::sft::{Event, SftConfig, train_sft};
use serde_json::{Value, json};

use super::{Global, base_model, rollout::report_table, up::ensure_tiny_model};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Optimizer steps of the demo fine-tune.
    /// (At 30 steps the tiny model has learnt only that spaces are frequent, and answers with
    /// nothing else; by 120 it answers with words of the training answers.)
    #[arg(long, default_value_t = 120)]
    pub steps: usize,
    /// After the story, keep the registry (and its web console) and the gateway serving
    /// until Ctrl-C.
    #[arg(long)]
    pub keep: bool,
}

/// What the demo tells: a numbered line per step and how long it took, or (`--json`) one
/// event per step with what it established.
struct Story {
    json: bool,
    total: usize,
    current: RefCell<Option<Step>>,
    done: RefCell<usize>,
}

/// The step being told: its number, name, start and the lines said so far.
struct Step(usize, String, Instant, Vec<String>);

impl Story {
    fn new(json: bool, total: usize) -> Self {
        Self {
            json,
            total,
            current: RefCell::new(None),
            done: RefCell::new(0),
        }
    }

    fn begin(&self, name: impl Into<String>) {
        let n = *self.done.borrow() + 1;
        let name = name.into();
        if !self.json {
            println!("[{n}/{}] {name}", self.total);
        }
        *self.current.borrow_mut() = Some(Step(n, name, Instant::now(), Vec::new()));
    }

    /// A line of what the step found.
    fn say(&self, line: impl Into<String>) {
        let line = line.into();
        if !self.json {
            println!("      {line}");
        }
        if let Some(c) = self.current.borrow_mut().as_mut() {
            c.3.push(line);
        }
    }

    fn end(&self, details: Value) {
        let Some(Step(n, name, at, lines)) = self.current.borrow_mut().take() else {
            return;
        };
        let secs = at.elapsed().as_secs_f64();
        *self.done.borrow_mut() = n;
        if self.json {
            println!(
                "{}",
                json!({"event": "step", "index": n, "total": self.total, "name": name, "ok": true,
                    "seconds": secs, "details": details, "lines": lines})
            );
        } else {
            println!("      ({secs:.1} s)");
        }
    }

    /// The step that was running when the demo failed.
    fn failed(&self, e: &anyhow::Error) {
        if let Some(Step(n, name, at, lines)) = self.current.borrow_mut().take()
            && self.json
        {
            println!(
                "{}",
                json!({"event": "step", "index": n, "total": self.total, "name": name, "ok": false,
                    "seconds": at.elapsed().as_secs_f64(), "error": format!("{e:#}"), "lines": lines})
            );
        }
    }
}

const PAIRS: [(&str, &str); 6] = [
    (
        "How do I reset my password?",
        "Open Settings, choose Security, then Reset password. A link arrives by email.",
    ),
    (
        "Where can I see my invoices?",
        "Invoices are under Billing, then History. Each one can be downloaded as PDF.",
    ),
    (
        "How do I add a team member?",
        "Go to Team, press Invite, and enter their email address.",
    ),
    (
        "Can I change my plan?",
        "Yes: Billing, then Plan. Changes apply from the next cycle.",
    ),
    (
        "How do I delete my account?",
        "Settings, then Account, then Delete. This cannot be undone.",
    ),
    (
        "Is there an API?",
        "Yes. Create a key under Settings, then API keys, and see the reference docs.",
    ),
];

/// A small chat dataset: the adapter learns to answer in one house style.
fn dataset() -> String {
    let mut out = String::new();
    for round in 0..4 {
        for (q, a) in PAIRS {
            let row = json!({"messages": [
                {"role": "system", "content": "You are the support assistant."},
                {"role": "user", "content": if round % 2 == 0 { q.to_string() } else { q.to_lowercase() }},
                {"role": "assistant", "content": a}]});
            out.push_str(&row.to_string());
            out.push('\n');
        }
    }
    out
}

pub fn run(args: DemoArgs, global: &Global) -> anyhow::Result<()> {
    let story = Story::new(global.json, 8);
    let res = tell(&args, global, &story);
    if let Err(e) = &res {
        story.failed(e);
    }
    res
}

fn tell(args: &DemoArgs, global: &Global, story: &Story) -> anyhow::Result<()> {
    let cfg = global.load_config(&[])?;
    let data_dir = cfg
        .data_dir
        .clone()
        .unwrap_or_else(|| global.data_dir.clone());
    // The demo's own corner of the data dir, emptied first: a run after another one, or after
    // Ctrl-C at any step, starts from nothing.
    let root = data_dir.join("demo");
    if root.exists() {
        std::fs::remove_dir_all(&root)
            .with_context(|| format!("emptying {} for a fresh run", root.display()))?;
    }
    let work = root.join("work");
    std::fs::create_dir_all(&work)?;
    // Before any thread starts: the gateway's engine finds adapters through the environment.
    let cache = super::gateway::cache_dir(&root, None)?;
    super::gateway::prepare_process(&cache);

    story.begin("base model");
    let base_dir = ensure_tiny_model(&data_dir.join("models").join("tiny-llama"))?;
    story.say(format!(
        "generated tiny Llama-layout model in {}",
        base_dir.display()
    ));
    story.end(json!({"dir": base_dir}));

    story.begin(format!(
        "fine-tune LoRA adapters: a first try ({FIRST_TRY_STEPS} steps) and the real one ({} steps)",
        args.steps
    ));
    let data = work.join("train.jsonl");
    std::fs::write(&data, dataset())?;
    let train = |out: &std::path::Path, steps: usize| -> anyhow::Result<(f64, f64)> {
        let sft: SftConfig = serde_json::from_value(json!({
            "model": base_dir, "data": data, "out": out, "steps": steps, "lr": 2e-3, "r": 8,
            "alpha": 16.0, "batch_size": 4, "seed": 1,
        }))?;
        let mut first = None;
        let outcome = train_sft(&sft, &loraops_model::default_device(), &mut |e| {
            if let Event::Step(m) = e {
                first.get_or_insert(m.loss);
            }
        })?;
        Ok((first.unwrap_or(f64::NAN), outcome.final_loss))
    };
    let first_try = work.join("adapter-first-try");
    let (f0, f1) = train(&first_try, FIRST_TRY_STEPS)?;
    story.say(format!("first try: loss {f0:.3} -> {f1:.3}"));
    let adapter = work.join("adapter");
    let (a0, a1) = train(&adapter, args.steps)?;
    story.say(format!(
        "real one:  loss {a0:.3} -> {a1:.3}, adapter in {}",
        adapter.display()
    ));
    story.end(
        json!({"first_try": {"steps": FIRST_TRY_STEPS, "first_loss": f0, "final_loss": f1},
        "adapter": {"steps": args.steps, "first_loss": a0, "final_loss": a1, "dir": adapter}}),
    );

    story.begin(format!(
        "registry (SQLite + local blobs under {})",
        root.display()
    ));
    // Always the embedded registry: a demo never writes to a configured production database.
    let settings = ServeSettings {
        data_dir: root.clone(),
        registry: RegistrySettings {
            listen: "127.0.0.1:0".into(),
            database_url: None,
            object_store_url: None,
            ..cfg.registry.clone()
        },
        auth: cfg.auth.clone(),
        s3: cfg.s3.clone(),
    };
    let signer = Signer::from_settings(&cfg.auth, &root)?;
    let token = signer.issue("loraops-demo", &[Role::Admin], 3600, None)?;
    // The gateway's own token: the data plane never holds admin.
    let gateway_token = signer.issue("loraops-demo-gateway", &[Role::Gateway], 3600, None)?;
    actix_web::rt::System::new().block_on(async move {
        let app = Application::build(settings).await?;
        let url = format!("http://127.0.0.1:{}", app.port());
        let handle = app.handle();
        actix_web::rt::spawn(app.run_until_stopped());
        let token_file = root.join("admin.token");
        std::fs::write(&token_file, &token)?;
        story.say(format!("web console: {url}/ui/ (log in with the token in {})", token_file.display()));
        if global.json {
            println!("{}", json!({"event": "console", "url": format!("{url}/ui/"), "token_file": token_file}));
        }
        let client = RegistryClient::new(&url, Some(token.clone()));
        let base = base_model::describe(&base_dir, None)?;
        if !client
            .base_models()
            .await?
            .into_iter()
            .any(|b| b.name == base.name)
        {
            client.create_base_model(&base).await?;
        }
        story.say(format!("base model {} registered", base.name));
        story.end(json!({"url": url, "console": format!("{url}/ui/"), "base_model": base.name}));

        story.begin("push both (the same bytes again: the same version)");
        let tried = client
            .push_dir(&first_try, "demo-support", None, no_progress())
            .await?;
        story.say(format!(
            "first try  demo-support@{} {}",
            tried.version.version, tried.version.digest
        ));
        let pushed = client
            .push_dir(&adapter, "demo-support", None, no_progress())
            .await?;
        story.say(format!(
            "real one   demo-support@{} {}",
            pushed.version.version, pushed.version.digest
        ));
        let again = client
            .push_dir(&adapter, "demo-support", None, no_progress())
            .await?;
        anyhow::ensure!(
            !again.created && again.version.version == pushed.version.version,
            "re-push made a new version"
        );
        story.say(format!(
            "pushing the same bytes again returns @{} (new: {})",
            again.version.version, again.created
        ));
        story.end(json!({"adapter": "demo-support", "first_try": tried.version.version,
            "version": pushed.version.version, "digest": pushed.version.digest,
            "repush_created": again.created}));

        story.begin("pull and verify");
        let pulled = work.join("pulled");
        let v = client
            .pull(
                "demo-support",
                pushed.version.version,
                &pulled,
                no_progress(),
            )
            .await?;
        for f in &v.files {
            anyhow::ensure!(
                std::fs::read(pulled.join(&f.name))? == std::fs::read(adapter.join(&f.name))?,
                "{} differs",
                f.name
            );
        }
        story.say(format!(
            "{} files, sha256 verified, identical to what was trained",
            v.files.len()
        ));
        if let Some(lineage) = &v.lineage {
            story.say(format!(
                "lineage: method {}, base {}",
                lineage["method"], lineage["base_model"]
            ));
        }
        story.end(json!({"files": v.files.len(), "verified": true}));

        story.begin("gateway");
        let mut gw = GatewaySettings::new(base_dir.clone(), cache);
        gw.listen = "127.0.0.1:0".into();
        gw.base_model_name = Some(base.name.to_string());
        gw.registry_url = Some(url.clone());
        gw.registry_token = Some(gateway_token.clone());
        gw.data_dir = root.clone();
        gw.report_interval = Duration::from_millis(500);
        let gateway = GatewayApp::build(gw).await?;
        let engine = gateway.state().backend.identity().clone();
        story.say(format!(
            "{} {} engine, in-process",
            engine.name, engine.version
        ));
        let gw_url = format!("http://127.0.0.1:{}/v1", gateway.port());
        let gw_handle = gateway.handle();
        actix_web::rt::spawn(gateway.run_until_stopped());
        let http = reqwest::Client::new();
        let version = pushed.version.version;
        let pinned = format!("demo-support@{version}");
        let tried_pinned = format!("demo-support@{}", tried.version.version);
        let question = PAIRS[0].0;
        let mut answers = serde_json::Map::new();
        for model in [base.name.as_str(), tried_pinned.as_str(), pinned.as_str()] {
            let (answer, _) = chat(&http, &gw_url, model, question, "demo").await?;
            story.say(format!("{model:<16} {question:?} -> {answer:?}"));
            answers.insert(model.to_string(), json!(answer));
        }
        story.end(json!({"url": gw_url, "engine": engine.name, "engine_version": engine.version,
            "question": question, "answers": answers}));

        story.begin("evidence and the gate");
        let suite = client.push_suite(&regression_suite()).await?.suite;
        let named = format!("{}@{}", suite.name, suite.version);
        let suite_ref = SuiteRef {
            name: suite.name.to_string(),
            version: Some(suite.version.clone()),
            digest: suite.digest.clone(),
        };
        // Every question answered, and answers that share words with the house answers.
        let rule = |metric: &str, threshold: f64| GateRule {
            suite: named.clone(),
            metric: metric.into(),
            op: Comparison::Ge,
            threshold: Some(threshold),
            max_regression: None,
            vs: None,
        };
        let policy = GatePolicy {
            required_suites: vec![named.clone()],
            rules: vec![rule("answered", 0.9), rule("token_f1", 0.1)],
            max_evidence_age_hours: Some(24.0),
        };
        client.put_gate("demo-support", &policy).await?;
        story.say(format!("gate: {named} answered >= 0.9 and token_f1 >= 0.1"));
        // The same suite through the gateway for the base, the first try and the real one;
        // the adapters' results are their evidence.
        let mut scores = serde_json::Map::new();
        for (model, digest) in [
            (base.name.to_string(), None),
            (tried_pinned.clone(), Some((tried.version.version, &tried.version.digest))),
            (pinned.clone(), Some((version, &pushed.version.digest))),
        ] {
            let e = evaluate(
                &http,
                &gw_url,
                &engine,
                &model,
                digest.map(|d| d.1.as_str()).unwrap_or_default(),
                suite_ref.clone(),
            )
            .await?;
            story.say(format!(
                "{model:<16} answered {:.2}, token F1 {:.2}",
                e.metrics["answered"], e.metrics["token_f1"]
            ));
            scores.insert(model.clone(), json!(e.metrics));
            if let Some((v, _)) = digest {
                client.post_evidence("demo-support", v, &e).await?;
            }
        }
        let f1 = |m: &str| scores[m]["token_f1"].as_f64().unwrap_or(0.0);
        let margin = f1(&pinned) - f1(base.name.as_str());
        story.say(format!(
            "the adapter beats the base by {margin:.2} token F1 on the demo's questions"
        ));
        // The adapter's first rollout: its stable arm is the base model, whose answers differ
        // in length, so the demo compares error rates only (its canary answers a handful of
        // questions).
        let spec = |version: u32| StartRollout {
            version,
            spec: RolloutSpec {
                steps: vec![50.0, 100.0],
                interval_secs: 2,
                min_requests: 10,
                rules: vec![
                    loraops_registry::api::AnalysisRule {
                        metric: "error_rate".into(),
                        op: Comparison::Le,
                        threshold: 0.05,
                        compare: Some(Relation::Difference),
                        confidence: Some(0.9),
                    },
                    loraops_registry::api::AnalysisRule {
                        metric: "error_rate".into(),
                        op: Comparison::Le,
                        threshold: 0.05,
                        compare: None,
                        confidence: None,
                    },
                ],
                ..RolloutSpec::default()
            },
        };
        match client
            .start_rollout("demo-support", &spec(tried.version.version))
            .await
        {
            Err(ClientError::Api { status, body }) if body.error.code == "gate_failed" => {
                let report: GateReport = serde_json::from_value(body.error.details)?;
                story.say(format!(
                    "a canary of the first try {tried_pinned} is refused ({status}):"
                ));
                for line in report_table(&report).lines() {
                    story.say(line);
                }
            }
            other => anyhow::bail!("expected the gate to refuse {tried_pinned}, got {other:?}"),
        }
        story.end(json!({"first_try_refused": true, "scores": scores, "margin_token_f1": margin}));

        story.begin("canary rollout under simulated users");
        let started = client.start_rollout("demo-support", &spec(version)).await?;
        story.say(format!(
            "gate passed; canary {pinned} at {}% (the stable arm is the base model: no version is stable yet)",
            started.rollout.weight
        ));
        let traffic = tokio::spawn(simulate_users(http.clone(), gw_url.clone()));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        let status = loop {
            let s = client.rollout("demo-support").await?;
            if !s.rollout.state.is_active() || tokio::time::Instant::now() > deadline {
                break s;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        traffic.abort();
        for e in status.events.iter().filter(|e| e.action != "hold") {
            story.say(format!(
                "{} {:<10} {:>5}%  {}",
                e.at.format("%H:%M:%S"),
                e.action,
                e.weight,
                e.reason
            ));
        }
        anyhow::ensure!(
            status.rollout.state == loraops_registry::api::RolloutState::Promoted,
            "the rollout ended {:?}",
            status.rollout.state
        );
        story.end(json!({"state": status.rollout.state, "weight": status.rollout.weight,
            "events": status.events.iter().filter(|e| e.action != "hold").map(|e| &e.action).collect::<Vec<_>>()}));
        if args.keep {
            let msg = format!(
                "serving until Ctrl-C: web console {url}/ui/ (token in {}), gateway {gw_url}",
                root.join("admin.token").display()
            );
            if global.json {
                println!("{}", json!({"event": "serving", "console": format!("{url}/ui/"), "gateway": gw_url}));
            } else {
                println!("{msg}");
            }
            tokio::signal::ctrl_c().await?;
        }
        gw_handle.stop(true).await;
        handle.stop(true).await;
        if global.json {
            println!("{}", json!({"event": "done", "ok": true}));
        } else {
            println!("done. `loraops up` keeps a registry and a gateway running; see README.md.");
        }
        Ok(())
    })
}

/// One chat completion; returns the answer and the arm that served it.
async fn chat(
    http: &reqwest::Client,
    gw: &str,
    model: &str,
    question: &str,
    user: &str,
) -> anyhow::Result<(String, String)> {
    let res = http
        .post(format!("{gw}/chat/completions"))
        .header("x-loraops-user", user)
        .json(&json!({"model": model, "temperature": 0, "max_tokens": 24,
            "messages": [{"role": "system", "content": "You are the support assistant."},
                         {"role": "user", "content": question}]}))
        .send()
        .await?;
    let arm = res
        .headers()
        .get("x-loraops-arm")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let status = res.status();
    let body: Value = res.json().await?;
    anyhow::ensure!(status.is_success(), "gateway answered {status}: {body}");
    let text = body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    Ok((text, arm))
}

fn words(s: &str) -> Vec<String> {
    s.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// Token-level F1 between an answer and the reference (SQuAD's measure).
fn token_f1(answer: &str, reference: &str) -> f64 {
    let (a, r) = (words(answer), words(reference));
    let mut pool = r.clone();
    let mut common = 0usize;
    for w in &a {
        if let Some(i) = pool.iter().position(|x| x == w) {
            pool.swap_remove(i);
            common += 1;
        }
    }
    if common == 0 {
        return 0.0;
    }
    let p = common as f64 / a.len() as f64;
    let rec = common as f64 / r.len() as f64;
    2.0 * p * rec / (p + rec)
}

/// Steps of the demo's first try: the tiny model has then learnt only that spaces are frequent,
/// so its answers are empty and the gate refuses it.
const FIRST_TRY_STEPS: usize = 30;

/// The demo's regression suite: the training questions and their answers.
fn regression_suite() -> NewSuite {
    NewSuite {
        manifest: SuiteManifest {
            name: Name::parse("demo-regression").expect("valid name"),
            version: "1".into(),
            description: Some("the demo's training questions".into()),
            scorer: json!({"type": "contains"}),
            thresholds: vec![],
            decoding: json!({"max_tokens": 24}),
        },
        cases: PAIRS
            .iter()
            .map(|(q, a)| json!({"prompt": q, "expected": a}).to_string() + "\n")
            .collect(),
        digest: None,
    }
}

/// The demo's regression suite (the training questions) run through the gateway with the
/// version pinned, as evidence bound to the version's digest.
async fn evaluate(
    http: &reqwest::Client,
    gw: &str,
    engine: &loraops_gateway::engine::EngineInfo,
    model: &str,
    digest: &str,
    suite: SuiteRef,
) -> anyhow::Result<NewEvidence> {
    let started = chrono::Utc::now();
    let (mut answered, mut f1) = (0usize, 0.0);
    for (q, a) in PAIRS {
        let (text, _) = chat(http, gw, model, q, "evaluator").await?;
        answered += usize::from(!text.trim().is_empty());
        f1 += token_f1(&text, a);
    }
    let n = PAIRS.len() as f64;
    Ok(NewEvidence {
        adapter_digest: digest.to_string(),
        suite,
        engine: EngineIdentity {
            engine: engine.name.clone(),
            engine_version: engine.version.clone(),
            model_digest: None,
            decoding: json!({"temperature": 0, "max_tokens": 24}),
        },
        metrics: [
            ("answered".to_string(), answered as f64 / n),
            ("token_f1".to_string(), f1 / n),
        ]
        .into(),
        cases: PAIRS.len() as u64,
        cases_digest: None,
        produced_by: Some(format!("loraops demo {}", env!("CARGO_PKG_VERSION"))),
        started_at: started,
        finished_at: chrono::Utc::now(),
    })
}

/// Users `user-0…user-199` asking the training questions of `demo-support` (its routing
/// decides the arm), until aborted.
async fn simulate_users(http: reqwest::Client, gw: String) {
    let mut i = 0usize;
    loop {
        let user = format!("user-{}", i % 200);
        let (q, _) = PAIRS[i % PAIRS.len()];
        if let Err(e) = chat(&http, &gw, "demo-support", q, &user).await {
            tracing::warn!(error = %e, "simulated request failed");
        }
        i += 1;
    }
}
