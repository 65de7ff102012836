//! Embedded-engine benchmark (bench/gateway/engine.sh runs it), everything in one process:
//!
//! (b) decode tokens/s of mistral.rs called directly vs through the gateway's HTTP API, for the
//!     base model and a merged adapter, on the tiny model and a ~100M-parameter one;
//! (c) time from a routing change (a rollout sending 100 % to a new version) to every user
//!     being served by the new version, under load, and the failed requests meanwhile.
//!
//!     cargo run --example bench_engine -- [REQUESTS]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use loraops_gateway::adapters::AdapterStore;
use loraops_gateway::engine::mistral::{LoadSpec, MistralEngine};
use loraops_gateway::engine::{Engine, Event, GenerateRequest, Prompt, Sampling};
use loraops_gateway::{Application, GatewaySettings};
use loraops_model::tiny::{TinySpec, init_tiny};
use loraops_registry::api::{NewBaseModel, Role, RolloutSpec, StartRollout};
use loraops_registry::auth::{AuthSettings, Signer};
use loraops_registry::client::{RegistryClient, no_progress};
use loraops_registry::peft::ModelDims;
use loraops_registry::server::{Application as Registry, RegistrySettings, ServeSettings};
use serde_json::{Value, json};

#[path = "../tests/gateway/kit.rs"]
mod kit;

use loraops_testkit::{Lora, PeftAdapter, Shapes};

const PROMPT: &str = "Once upon a time, in a land far away,";
const MAX_TOKENS: usize = 64;

/// Completion tokens per second over `n` sequential requests, directly on an engine.
async fn direct(engine: &MistralEngine, n: usize) -> f64 {
    let start = Instant::now();
    let mut tokens = 0;
    for _ in 0..n {
        let mut ev = engine.generate(GenerateRequest {
            prompt: Prompt::Text(PROMPT.into()),
            sampling: Sampling {
                max_tokens: MAX_TOKENS,
                ..Sampling::default()
            },
        });
        while let Some(e) = ev.next().await {
            if let Event::Done { usage, .. } = e.unwrap() {
                tokens += usage.completion_tokens;
            }
        }
    }
    tokens as f64 / start.elapsed().as_secs_f64()
}

/// The same through the gateway's `/v1/completions`.
async fn via_gateway(http: &reqwest::Client, url: &str, model: &str, n: usize) -> f64 {
    let start = Instant::now();
    let mut tokens = 0;
    for _ in 0..n {
        let v: Value = http
            .post(format!("{url}/v1/completions"))
            .json(&json!({"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        tokens += v["usage"]["completion_tokens"].as_u64().unwrap();
    }
    tokens as f64 / start.elapsed().as_secs_f64()
}

async fn roll_to(c: &RegistryClient, version: u32) {
    kit::post_evidence(c, "bot", version, "bench_engine").await;
    let req = StartRollout {
        version,
        spec: RolloutSpec {
            steps: vec![100.0],
            interval_secs: 3600,
            ..RolloutSpec::default()
        },
    };
    c.start_rollout("bot", &req).await.unwrap();
}

fn engine_load_seconds(metrics: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with("loraops_gateway_engine_load_seconds_sum"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

struct Model {
    label: &'static str,
    spec: TinySpec,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(8);
    let root = tempfile::tempdir().unwrap();
    let hub = root.path().join("hub");
    std::fs::create_dir_all(&hub).unwrap();
    // SAFETY: before any other thread of ours exists.
    unsafe { loraops_gateway::adapters::set_hub_cache_env(&hub) };
    let models = [
        Model {
            label: "tiny (0.3M)",
            spec: TinySpec::default(),
        },
        Model {
            label: "~100M",
            spec: TinySpec {
                layers: 12,
                hidden: 768,
                heads: 12,
                kv_heads: 4,
                vocab: 512,
                intermediate: Some(2048),
                seed: 0,
            },
        },
    ];
    println!(
        "(b) decode tokens/s, {n} sequential requests of up to {MAX_TOKENS} tokens, greedy, f32 on CPU"
    );
    println!(
        "{:<12} | {:<8} | {:>10} | {:>10} | {:>6}",
        "model", "weights", "direct", "gateway", "ratio"
    );
    let mut last = None;
    for m in &models {
        let base = root.path().join(format!("base-{}", m.spec.hidden));
        init_tiny(&base, &m.spec).unwrap();
        let cfg: Value =
            serde_json::from_slice(&std::fs::read(base.join("config.json")).unwrap()).unwrap();
        // A registry holding the adapter versions.
        let data = root.path().join(format!("registry-{}", m.spec.hidden));
        let auth = AuthSettings {
            hs256_secret: Some("bench-secret-0123456789abcdef".into()),
            ..AuthSettings::default()
        };
        let reg = Registry::build(ServeSettings {
            data_dir: data.clone(),
            registry: RegistrySettings {
                listen: "127.0.0.1:0".into(),
                controller_tick_ms: 100,
                ..RegistrySettings::default()
            },
            auth: auth.clone(),
            s3: Default::default(),
        })
        .await
        .unwrap();
        let reg_url = format!("http://127.0.0.1:{}", reg.port());
        tokio::spawn(reg.run_until_stopped());
        let token = Signer::from_settings(&auth, &data)
            .unwrap()
            .issue("bench", &[Role::Admin], 3600, None)
            .unwrap();
        let c = RegistryClient::new(&reg_url, Some(token.clone()));
        c.create_base_model(&NewBaseModel {
            name: "bench-base".parse().unwrap(),
            architecture: Some("LlamaForCausalLM".into()),
            dims: ModelDims::from_hf_config(&cfg),
            digest: None,
            description: None,
        })
        .await
        .unwrap();
        for seed in [1, 2] {
            let dir = root
                .path()
                .join(format!("adapter-{}-{seed}", m.spec.hidden));
            let a = Lora {
                base_model: "bench-base",
                targets: &["q_proj", "v_proj"],
                seed,
                r: 8,
                alpha: 16.0,
                amplitude: 0.1,
                dora: false,
            };
            PeftAdapter::random(&a, &Shapes::of_config(&cfg)).write(&dir);
            c.push_dir(&dir, "bot", Some("bench-base"), no_progress())
                .await
                .unwrap();
        }
        let v1 = c.version("bot", 1).await.unwrap();
        let store = AdapterStore::new(hub.clone(), Some(c.clone()));
        store
            .ensure(&"bot".parse().unwrap(), 1, &v1.digest)
            .await
            .unwrap();
        let hub_id = AdapterStore::hub_id(&v1.digest);
        let spec = |adapter_id: Option<String>| LoadSpec {
            base_dir: std::fs::canonicalize(&base).unwrap(),
            adapter_id,
            dtype: mistralrs::ModelDType::F32,
            max_num_seqs: 16,
            isq: None,
        };
        let direct_base = direct(&MistralEngine::load(spec(None)).await.unwrap(), n).await;
        let direct_adapter =
            direct(&MistralEngine::load(spec(Some(hub_id))).await.unwrap(), n).await;

        roll_to(&c, 1).await;
        c.rollout_action("bot", "promote").await.unwrap();
        let mut s = GatewaySettings::new(base.clone(), hub.clone());
        s.engine = loraops_gateway::settings::EngineKind::Mistralrs;
        s.listen = "127.0.0.1:0".into();
        s.base_model_name = Some("bench-base".into());
        s.registry_url = Some(reg_url.clone());
        s.registry_token = Some(token.clone());
        s.poll_wait_secs = 5;
        s.report_interval = Duration::from_millis(500);
        let gw = Application::build(s).await.unwrap();
        let gw_url = format!("http://127.0.0.1:{}", gw.port());
        tokio::spawn(gw.run_until_stopped());
        let http = reqwest::Client::new();
        // Wait until the gateway serves v1.
        loop {
            let r = http
                .post(format!("{gw_url}/v1/completions"))
                .json(&json!({"model": "bot", "prompt": "x", "max_tokens": 1}))
                .send()
                .await
                .unwrap();
            if r.headers()
                .get("x-loraops-version")
                .is_some_and(|v| v == "1")
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let gw_base = via_gateway(&http, &gw_url, "bench-base", n).await;
        let gw_adapter = via_gateway(&http, &gw_url, "bot", n).await;
        for (w, d, g) in [
            ("base", direct_base, gw_base),
            ("adapter", direct_adapter, gw_adapter),
        ] {
            println!(
                "{:<12} | {:<8} | {:>10.1} | {:>10.1} | {:>5.2}x",
                m.label,
                w,
                d,
                g,
                g / d
            );
        }
        last = Some((c, http, gw_url, m.label));
    }

    // (c) on the last model: load running, then all traffic moves to v2.
    let (c, http, gw_url, label) = last.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let requests = Arc::new(AtomicU64::new(0));
    let switched_at = Arc::new(std::sync::Mutex::new(Vec::<Option<Instant>>::new()));
    let users = 4;
    switched_at.lock().unwrap().resize(users, None);
    let metrics_before = http
        .get(format!("{gw_url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let workers: Vec<_> = (0..users)
        .map(|u| {
            let (http, url, stop, failures, requests, switched) = (
                http.clone(),
                gw_url.clone(),
                stop.clone(),
                failures.clone(),
                requests.clone(),
                switched_at.clone(),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let r = http
                        .post(format!("{url}/v1/completions"))
                        .header("x-loraops-user", format!("user-{u}"))
                        .json(&json!({"model": "bot", "prompt": PROMPT, "max_tokens": 4}))
                        .send()
                        .await;
                    requests.fetch_add(1, Ordering::Relaxed);
                    match r {
                        Ok(r) if r.status().is_success() => {
                            if r.headers()
                                .get("x-loraops-version")
                                .is_some_and(|v| v == "2")
                            {
                                switched.lock().unwrap()[u].get_or_insert_with(Instant::now);
                            }
                        }
                        _ => {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = requests.load(Ordering::Relaxed);
    let t0 = Instant::now();
    roll_to(&c, 2).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while switched_at.lock().unwrap().iter().any(|s| s.is_none()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let all = switched_at
        .lock()
        .unwrap()
        .iter()
        .flatten()
        .max()
        .map(|t| *t - t0);
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let metrics_after = http
        .get(format!("{gw_url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let load = engine_load_seconds(&metrics_after) - engine_load_seconds(&metrics_before);
    println!();
    println!("(c) routing change under load ({label} model, {users} users, max_tokens 4)");
    println!("{:<34} | {:>10}", "measure", "value");
    match all {
        Some(d) => println!(
            "{:<34} | {:>8.3} s",
            "change -> every user on v2",
            d.as_secs_f64()
        ),
        None => println!("{:<34} | {:>10}", "change -> every user on v2", "timed out"),
    }
    println!("{:<34} | {:>8.3} s", "of which engine load (v2)", load);
    if let Some(d) = all {
        println!(
            "{:<34} | {:>8.3} s",
            "gateway + registry part",
            d.as_secs_f64() - load
        );
    }
    println!(
        "{:<34} | {:>10}",
        "requests during the run",
        requests.load(Ordering::Relaxed) - before
    );
    println!(
        "{:<34} | {:>10}",
        "failed requests",
        failures.load(Ordering::Relaxed)
    );
}
