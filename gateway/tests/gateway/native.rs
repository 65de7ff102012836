//! The native engine behind the gateway: one base copy serving every adapter, PEFT parity
//! through HTTP, the LoRA control contract, load failures remembered, readiness, and swaps
//! under load.

use std::time::{Duration, Instant};

use loraops_registry::api::Role;
use loraops_registry::auth::{AuthSettings, Signer};
use loraops_registry::client::no_progress;
use serde_json::{Value, json};

use crate::helpers::{
    ADAPTER, BASE, SECRET, TestGateway, fixture, spawn_gateway, spawn_gateway_with, spawn_registry,
};

fn header(h: &reqwest::header::HeaderMap, name: &str) -> String {
    h.get(name)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

/// An adapter made by Python PEFT, served by the native engine through the gateway, gives
/// transformers + PEFT's greedy text; so does the base (the reference the mistral.rs engine is
/// held to as well, recorded by scripts/reference/gateway_reference.py).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_peft_adapter_serves_what_transformers_and_peft_generate() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let reference: Value =
        serde_json::from_slice(&std::fs::read(fixtures.join("reference.json")).unwrap()).unwrap();
    let reg = spawn_registry().await;
    let client = reg.client();
    client
        .push_dir(
            &fixtures.join("peft-adapter"),
            "peft-bot",
            Some(BASE),
            no_progress(),
        )
        .await
        .unwrap();
    reg.route("peft-bot", Some(1), None).await;
    let rev = client.routing(None, 0).await.unwrap().revision;
    let gw = spawn_gateway(Some(&reg)).await;
    gw.wait_revision(rev).await;
    let max_tokens = reference["max_new_tokens"].as_u64().unwrap();
    for (model, key) in [(BASE, "base"), ("peft-bot", "adapter")] {
        for case in reference[key].as_array().unwrap() {
            let res = gw
                .post(
                    "/v1/chat/completions",
                    &json!({"model": model, "temperature": 0, "max_tokens": max_tokens,
                        "messages": [{"role": "user", "content": case["prompt"]}]}),
                )
                .await;
            assert_eq!(res.status(), 200);
            assert_eq!(header(res.headers(), "x-loraops-engine"), "loraops");
            let v: Value = res.json().await.unwrap();
            let got = v["choices"][0]["message"]["content"].as_str().unwrap();
            let want = case["text"].as_str().unwrap().trim_end_matches('\u{FFFD}');
            assert_eq!(got, want, "{model}: {}", case["prompt"]);
        }
    }
}

async fn greedy(gw: &TestGateway, model: &str) -> (String, String) {
    let res = gw
        .post(
            "/v1/chat/completions",
            &json!({"model": model, "temperature": 0, "max_tokens": 8,
                "messages": [{"role": "user", "content": "What is the capital of France?"}]}),
        )
        .await;
    assert_eq!(res.status(), 200, "{model}");
    let version = header(res.headers(), "x-loraops-version");
    let v: Value = res.json().await.unwrap();
    (
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string(),
        version,
    )
}

/// Concurrent requests on the base and two versions share one engine and each get what they
/// get alone; `/v1/models` lists the versions with the base as their parent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_base_copy_serves_every_version_at_once() {
    let reg = spawn_registry().await;
    reg.route(ADAPTER, Some(1), None).await;
    let rev = reg.client().routing(None, 0).await.unwrap().revision;
    let gw = spawn_gateway(Some(&reg)).await;
    gw.wait_revision(rev).await;
    let models = [BASE, "bot@1", "bot@2"];
    let mut alone = Vec::new();
    for m in models {
        alone.push(greedy(&gw, m).await.0);
    }
    assert_ne!(alone[1], alone[2], "the versions differ");
    assert_ne!(alone[0], alone[1]);
    let together = futures_util::future::join_all((0..12).map(|i| {
        let gw = gw.clone();
        async move { greedy(&gw, models[i % 3]).await.0 }
    }))
    .await;
    for (i, t) in together.iter().enumerate() {
        assert_eq!(*t, alone[i % 3], "{}", models[i % 3]);
    }
    let listed: Value = gw.get("/v1/models").await.json().await.unwrap();
    let cards = listed["data"].as_array().unwrap();
    let find = |id: &str| cards.iter().find(|c| c["id"] == id).cloned();
    assert_eq!(find("bot@1").unwrap()["parent"], BASE);
    assert_eq!(
        find("bot@2").unwrap()["parent"],
        BASE,
        "resident, loaded on demand"
    );
    assert_eq!(find("bot").unwrap()["parent"], BASE);
    assert!(find(BASE).unwrap().get("parent").is_none());
    let ready: Value = gw.get("/readyz").await.json().await.unwrap();
    assert_eq!(ready["ready"], true, "{ready}");
}

/// `/v1/load_lora_adapter` and `/v1/unload_lora_adapter` with an admin token; refusals name
/// what is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lora_control_contract_loads_and_unloads_registry_versions() {
    let reg = spawn_registry().await;
    reg.route(ADAPTER, Some(1), None).await;
    let rev = reg.client().routing(None, 0).await.unwrap().revision;
    let gw = spawn_gateway_with(Some(&reg), |s| {
        s.auth = Some(AuthSettings {
            hs256_secret: Some(SECRET.into()),
            ..AuthSettings::default()
        });
    })
    .await;
    gw.wait_revision(rev).await;
    let dir = tempfile::tempdir().unwrap();
    let signer = Signer::from_settings(
        &AuthSettings {
            hs256_secret: Some(SECRET.into()),
            ..AuthSettings::default()
        },
        dir.path(),
    )
    .unwrap();
    let admin = signer.issue("ops", &[Role::Admin], 600, None).unwrap();
    let viewer = signer.issue("app", &[Role::Viewer], 600, None).unwrap();
    let call = |path: &'static str, token: String, body: Value| {
        let gw = gw.clone();
        async move {
            let res = gw
                .http
                .post(format!("{}{path}", gw.url))
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = res.status().as_u16();
            (status, res.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let models = |token: String| {
        let gw = gw.clone();
        async move {
            let v: Value = gw
                .http
                .get(format!("{}/v1/models", gw.url))
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["id"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        }
    };
    let (s, _) = call(
        "/v1/load_lora_adapter",
        viewer.clone(),
        json!({"lora_name": "bot@2"}),
    )
    .await;
    assert_eq!(s, 403);
    let (s, body) = call(
        "/v1/load_lora_adapter",
        admin.clone(),
        json!({"lora_name": "bot@2"}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert!(body["digest"].as_str().unwrap().starts_with("sha256:"));
    assert!(models(admin.clone()).await.contains(&"bot@2".to_string()));
    for (body, status, param) in [
        (
            json!({"lora_name": "bot@2", "lora_path": "/etc/passwd"}),
            400,
            "lora_path",
        ),
        (json!({"lora_name": "bot"}), 400, "lora_name"),
        (json!({"lora_name": "bot@99"}), 404, "model"),
    ] {
        let (s, v) = call("/v1/load_lora_adapter", admin.clone(), body.clone()).await;
        assert_eq!(s, status, "{body}: {v}");
        assert_eq!(v["error"]["param"], param, "{v}");
    }
    // The routed stable version stays.
    let (s, v) = call(
        "/v1/unload_lora_adapter",
        admin.clone(),
        json!({"lora_name": "bot@1"}),
    )
    .await;
    assert_eq!(s, 409, "{v}");
    let (s, _) = call(
        "/v1/unload_lora_adapter",
        admin.clone(),
        json!({"lora_name": "bot@2"}),
    )
    .await;
    assert_eq!(s, 200);
    assert!(!models(admin.clone()).await.contains(&"bot@2".to_string()));
    let (s, _) = call(
        "/v1/unload_lora_adapter",
        admin,
        json!({"lora_name": "bot@2"}),
    )
    .await;
    assert_eq!(s, 404);
    // A gateway without authentication refuses adapter control.
    let open = spawn_gateway(Some(&reg)).await;
    let res = open
        .post("/v1/load_lora_adapter", &json!({"lora_name": "bot@2"}))
        .await;
    assert_eq!(res.status(), 403);
}

/// A version the engine cannot apply (DoRA) answers 503 naming the cause, and the failure is
/// remembered: the next request gets it at once, without a new download and load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_load_answers_503_with_its_cause_and_is_not_retried_per_request() {
    let f = fixture();
    let reg = spawn_registry().await;
    reg.client()
        .push_dir(&f.dora, "dora-bot", Some(BASE), no_progress())
        .await
        .unwrap();
    let gw = spawn_gateway(Some(&reg)).await;
    let body = json!({"model": "dora-bot@1", "max_tokens": 2,
        "messages": [{"role": "user", "content": "hi"}]});
    let ask = || gw.post("/v1/chat/completions", &body);
    let res = ask().await;
    assert_eq!(res.status(), 503);
    let v: Value = res.json().await.unwrap();
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("use_dora"), "{msg}");
    let start = Instant::now();
    for _ in 0..20 {
        let res = ask().await;
        assert_eq!(res.status(), 503);
    }
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "remembered failures answer at once"
    );
    // The base keeps serving.
    greedy(&gw, BASE).await;
}

/// With every adapter slot holding a routed version, a version named by `NAME@V` is still
/// served (from a copy only its request holds), and stays out of the slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_request_is_served_when_every_slot_holds_a_routed_version() {
    let reg = spawn_registry().await;
    reg.route("bot", Some(1), None).await;
    let rev = reg.client().routing(None, 0).await.unwrap().revision;
    let gw = spawn_gateway_with(Some(&reg), |s| s.native.max_adapters = 1).await;
    gw.wait_revision(rev).await;
    // The routed version fills the one slot before bot@2 is asked for (else bot@2 would take
    // the free slot, and lose it only once bot@1 arrives).
    gw.wait_resident("bot@1").await;
    for _ in 0..2 {
        let res = gw
            .post(
                "/v1/chat/completions",
                &json!({"model": "bot@2", "max_tokens": 4, "temperature": 0,
                    "messages": [{"role": "user", "content": "hi"}]}),
            )
            .await;
        assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
        assert_eq!(header(res.headers(), "x-loraops-version"), "2");
    }
    let ready: Value = gw.get("/readyz").await.json().await.unwrap();
    let adapters = ready["checks"]["adapters"].as_str().unwrap_or_default();
    assert!(!adapters.contains("bot@2"), "{ready}");
}

/// Not ready until the first routing table arrives: before it, every adapter name would 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_waits_for_the_first_routing_table() {
    let gw = spawn_gateway_with(None, |s| {
        // Nothing listens there.
        s.registry_url = Some("http://127.0.0.1:9".into());
    })
    .await;
    let res = gw.get("/readyz").await;
    assert_eq!(res.status(), 503);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["checks"]["base"], "loaded", "{v}");
    let alone = spawn_gateway(None).await;
    assert_eq!(alone.get("/readyz").await.status(), 200);
}

/// Under a steady load, the stable version changes, versions load and unload: no request fails,
/// and each answer is the one its version gives (the version in its headers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_swap_and_load_under_load_without_a_failed_request() {
    let reg = spawn_registry().await;
    reg.route(ADAPTER, Some(1), None).await;
    let rev = reg.client().routing(None, 0).await.unwrap().revision;
    let gw = spawn_gateway(Some(&reg)).await;
    gw.wait_revision(rev).await;
    let mut by_version = std::collections::HashMap::new();
    for v in ["1", "2"] {
        by_version.insert(v.to_string(), greedy(&gw, &format!("bot@{v}")).await.0);
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let gw = gw.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let model = if w == 3 { BASE } else { ADAPTER };
                    seen.push(greedy(&gw, model).await);
                }
                seen
            })
        })
        .collect();
    let c = reg.client();
    for stable in [2, 1, 2] {
        reg.route(ADAPTER, Some(stable), None).await;
        let rev = c.routing(None, 0).await.unwrap().revision;
        gw.wait_revision(rev).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut answered = 0;
    for w in workers {
        for (text, version) in w.await.unwrap() {
            answered += 1;
            if let Some(want) = by_version.get(&version) {
                assert_eq!(&text, want, "bot@{version}");
            }
        }
    }
    assert!(answered > 10, "{answered} requests");
}
