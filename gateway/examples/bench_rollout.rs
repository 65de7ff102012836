//! Rollout figures (bench/rollout.sh runs it): a registry running its controller and a
//! gateway serving a generated tiny model with mistral.rs, in one process, with simulated
//! users (distinct sticky keys) sending chat requests to `bot`.
//!
//! 1. A healthy canary at the default steps: per step, the share of users the gateway
//!    observed on the canary vs the configured weight, until promotion.
//! 2. A faulty canary (a DoRA adapter: the registry accepts it, mistral.rs cannot apply it):
//!    time from its first request to the rollback, and the requests it took.
//!
//!     cargo run --example bench_rollout -- [INTERVAL_SECS (default 60, the default spec)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use loraops_gateway::{Application, GatewaySettings};
use loraops_model::tiny::{TinySpec, init_tiny};
use loraops_registry::api::{NewBaseModel, Role, RolloutSpec, RolloutState, StartRollout};
use loraops_registry::auth::{AuthSettings, Signer};
use loraops_registry::client::{RegistryClient, no_progress};
use loraops_registry::peft::ModelDims;
use loraops_registry::server::{Application as Registry, RegistrySettings, ServeSettings};
use serde_json::{Value, json};

#[path = "../tests/gateway/kit.rs"]
mod kit;

use loraops_testkit::{Lora, PeftAdapter, Shapes};

async fn start(c: &RegistryClient, version: u32, interval: u64) {
    kit::post_evidence(c, "bot", version, "bench_rollout").await;
    let spec = RolloutSpec {
        interval_secs: interval,
        ..RolloutSpec::default()
    };
    c.start_rollout("bot", &StartRollout { version, spec })
        .await
        .unwrap();
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let interval: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(60);
    let root = tempfile::tempdir().unwrap();
    let hub = root.path().join("hub");
    std::fs::create_dir_all(&hub).unwrap();
    // SAFETY: before any other thread of ours exists.
    unsafe { loraops_gateway::adapters::set_hub_cache_env(&hub) };
    let base = root.path().join("tiny");
    init_tiny(&base, &TinySpec::default()).unwrap();
    let cfg: Value =
        serde_json::from_slice(&std::fs::read(base.join("config.json")).unwrap()).unwrap();
    let auth = AuthSettings {
        hs256_secret: Some("bench-secret-0123456789abcdef".into()),
        ..AuthSettings::default()
    };
    let data = root.path().join("registry");
    let reg = Registry::build(ServeSettings {
        data_dir: data.clone(),
        registry: RegistrySettings {
            listen: "127.0.0.1:0".into(),
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
        .issue("bench", &[Role::Admin], 7200, None)
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
    for (seed, dora) in [(1, false), (2, false), (3, true)] {
        let dir = root.path().join(format!("adapter-{seed}"));
        let a = Lora {
            base_model: "bench-base",
            targets: &["q_proj", "v_proj"],
            seed,
            r: 4,
            alpha: 8.0,
            amplitude: 0.1,
            dora,
        };
        PeftAdapter::random(&a, &Shapes::of_config(&cfg)).write(&dir);
        c.push_dir(&dir, "bot", Some("bench-base"), no_progress())
            .await
            .unwrap();
    }
    let mut s = GatewaySettings::new(base.clone(), hub.clone());
    s.listen = "127.0.0.1:0".into();
    s.base_model_name = Some("bench-base".into());
    s.registry_url = Some(reg_url.clone());
    s.registry_token = Some(token);
    let gw = Application::build(s).await.unwrap();
    let gw_url = format!("http://127.0.0.1:{}", gw.port());
    tokio::spawn(gw.run_until_stopped());

    // v1 stable.
    start(&c, 1, interval).await;
    c.rollout_action("bot", "promote").await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let canary_first = Arc::new(std::sync::Mutex::new(None::<(Instant, u64)>));
    let canary_sent = Arc::new(AtomicU64::new(0));
    let watching = Arc::new(std::sync::Mutex::new(String::new()));
    let http = reqwest::Client::new();
    let workers: Vec<_> = (0..4u64)
        .map(|w| {
            let (http, url, stop, sent, first, canary_sent, watching) = (
                http.clone(), gw_url.clone(), stop.clone(), sent.clone(), canary_first.clone(), canary_sent.clone(), watching.clone(),
            );
            tokio::spawn(async move {
                let mut i = w;
                while !stop.load(Ordering::Relaxed) {
                    let r = http
                        .post(format!("{url}/v1/chat/completions"))
                        .header("x-loraops-user", format!("user-{}", i % 1000))
                        .json(&json!({"model": "bot", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}))
                        .send()
                        .await;
                    let n = sent.fetch_add(1, Ordering::Relaxed) + 1;
                    if let Ok(r) = r {
                        let arm = r.headers().get("x-loraops-arm").and_then(|v| v.to_str().ok()).unwrap_or("");
                        let watched = watching.lock().unwrap().clone();
                        // A failing canary's 503 carries no arm header; the version being
                        // rolled out is known, so count every non-stable answer.
                        if !watched.is_empty() && (arm == "canary" || !r.status().is_success()) {
                            canary_sent.fetch_add(1, Ordering::Relaxed);
                            first.lock().unwrap().get_or_insert((Instant::now(), n));
                        }
                    }
                    i += 4;
                }
            })
        })
        .collect();

    // 1. Healthy canary v2.
    *watching.lock().unwrap() = "2".into();
    let t = Instant::now();
    start(&c, 2, interval).await;
    let status = loop {
        let s = c.rollout("bot").await.unwrap();
        if !s.rollout.state.is_active() {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    println!(
        "1. healthy canary, steps {:?}, interval {interval} s, min {} requests: {} after {:.0} s",
        status.rollout.spec.steps,
        status.rollout.spec.min_requests,
        status.rollout.state.as_str(),
        t.elapsed().as_secs_f64()
    );
    println!(
        "{:<10} | {:>14} | {:>16} | {:>16}",
        "weight %", "canary share %", "canary requests", "stable requests"
    );
    for e in status
        .events
        .iter()
        .filter(|e| matches!(e.action.as_str(), "advance" | "promote"))
    {
        let arms = &e.details.as_ref().unwrap()["arms"];
        let weight = status
            .events
            .iter()
            .take_while(|x| x.id < e.id)
            .filter(|x| x.action != "hold")
            .last()
            .map(|x| x.weight)
            .unwrap_or(0.0);
        println!(
            "{:<10} | {:>14.1} | {:>16} | {:>16}",
            weight,
            arms[0]["share"].as_f64().unwrap_or(0.0),
            arms[0]["requests"],
            arms[1]["requests"]
        );
    }

    // 2. Faulty canary v3.
    *canary_first.lock().unwrap() = None;
    canary_sent.store(0, Ordering::Relaxed);
    *watching.lock().unwrap() = "3".into();
    start(&c, 3, interval).await;
    let status = loop {
        let s = c.rollout("bot").await.unwrap();
        if !s.rollout.state.is_active() {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let ended = Instant::now();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let first = canary_first.lock().unwrap().unwrap();
    println!();
    println!(
        "2. faulty canary (engine cannot load): {}",
        status.rollout.state.as_str()
    );
    println!("{:<44} | {:>10}", "measure", "value");
    println!(
        "{:<44} | {:>8.1} s",
        "first canary request -> rolled back",
        (ended - first.0).as_secs_f64()
    );
    println!(
        "{:<44} | {:>10}",
        "canary requests until rollback (all users)",
        canary_sent.load(Ordering::Relaxed)
    );
    println!(
        "{:<44} | {:>10}",
        "all requests until rollback",
        sent.load(Ordering::Relaxed) - first.1
    );
    assert_eq!(status.rollout.state, RolloutState::RolledBack);
    for e in status.events.iter().filter(|e| e.action != "hold") {
        println!(
            "   {} {:<16} {}",
            e.at.format("%H:%M:%S"),
            e.action,
            e.reason
        );
    }
}
