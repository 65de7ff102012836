//! Routing from the registry's table: sticky stable/canary split, pinned versions, changes
//! under load, and a registry that goes away.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use serde_json::{Value, json};

use crate::helpers::{BASE, TestGateway, spawn_gateway, spawn_gateway_with, spawn_registry};

fn header(h: &reqwest::header::HeaderMap, name: &str) -> String {
    h.get(name)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

async fn pinned_outputs(gw: &TestGateway) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for v in ["1", "2"] {
        let (text, h) = gw.chat(&format!("bot@{v}"), "x").await;
        assert_eq!(header(&h, "x-loraops-arm"), "pinned");
        assert_eq!(header(&h, "x-loraops-version"), v);
        assert_eq!(header(&h, "x-loraops-adapter"), "bot");
        assert_eq!(header(&h, "x-loraops-engine"), "loraops");
        assert_eq!(
            header(&h, "x-loraops-engine-version"),
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(header(&h, "x-loraops-engine-quantization"), "none");
        assert!(header(&h, "x-loraops-digest").starts_with("sha256:"));
        out.insert(v.to_string(), text);
    }
    let (base, h) = gw.chat(BASE, "x").await;
    assert!(h.get("x-loraops-adapter").is_none());
    assert_ne!(out["1"], out["2"]);
    assert_ne!(out["1"], base);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_split_is_sticky_serves_each_arm_its_version_and_follows_changes() {
    let reg = spawn_registry().await;
    reg.route("bot", Some(1), Some((2, 30.0))).await;
    let rev = reg.client().routing(None, 0).await.unwrap().revision;
    let gw = spawn_gateway(Some(&reg)).await;
    gw.wait_revision(rev).await;
    let outputs = pinned_outputs(&gw).await;

    let models: Value = gw.get("/v1/models").await.json().await.unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![BASE, "bot", "bot@1", "bot@2"]);

    let users = 120;
    let mut canary = 0;
    for i in 0..users {
        let user = format!("user-{i}");
        let res = gw
            .http
            .post(format!("{}/v1/chat/completions", gw.url))
            .header("x-loraops-user", &user)
            .json(&json!({"model": "bot", "temperature": 0, "max_tokens": 8, "user": "ignored-when-header-set",
                          "messages": [{"role": "user", "content": "What is the capital of France?"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let h = res.headers().clone();
        let v: Value = res.json().await.unwrap();
        let arm = header(&h, "x-loraops-arm");
        let version = header(&h, "x-loraops-version");
        assert_eq!(
            (arm.as_str(), version.as_str()),
            match arm.as_str() {
                "canary" => ("canary", "2"),
                _ => ("stable", "1"),
            }
        );
        // The arm is the version it claims to be: same greedy text as the pinned version.
        assert_eq!(
            v["choices"][0]["message"]["content"], outputs[&version],
            "{user}"
        );
        if arm == "canary" {
            canary += 1;
        }
        // The same key keeps its arm.
        let (_, h2) = {
            let res = gw
                .http
                .post(format!("{}/v1/chat/completions", gw.url))
                .json(&json!({"model": "bot", "max_tokens": 1, "user": user,
                              "messages": [{"role": "user", "content": "again"}]}))
                .send()
                .await
                .unwrap();
            (0, res.headers().clone())
        };
        assert_eq!(header(&h2, "x-loraops-arm"), arm, "{user} changed arm");
    }
    // 30% of 120 has a standard deviation of 5 keys.
    assert!(
        (20..=52).contains(&canary),
        "canary got {canary} of {users}"
    );

    // Promote v2 while requests are running: none may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for t in 0..3 {
        let (stop, failures, done) = (stop.clone(), failures.clone(), done.clone());
        let url = gw.url.clone();
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let res = http
                    .post(format!("{url}/v1/chat/completions"))
                    .json(
                        &json!({"model": "bot", "max_tokens": 2, "user": format!("load-{t}-{i}"),
                                  "messages": [{"role": "user", "content": "hi"}]}),
                    )
                    .send()
                    .await;
                match res {
                    Ok(r) if r.status() == 200 => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                i += 1;
            }
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    reg.route("bot", Some(2), None).await;
    gw.wait_revision(reg.client().routing(None, 0).await.unwrap().revision)
        .await;
    for i in 0..10 {
        let (_, h) = gw.chat("bot", &format!("after-{i}")).await;
        assert_eq!(header(&h, "x-loraops-arm"), "stable");
        assert_eq!(header(&h, "x-loraops-version"), "2");
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(failures.load(Ordering::Relaxed), 0);
    assert!(done.load(Ordering::Relaxed) > 0);

    let metrics = gw.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(
            r#"loraops_gateway_requests_total{adapter="bot",arm="pinned",status="200",version="1"}"#
        ),
        "{metrics}"
    );
    assert!(metrics.contains("loraops_gateway_time_to_first_token_seconds_bucket"));
    assert!(metrics.contains("loraops_gateway_registry_up 1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_registry_down_the_last_table_keeps_serving() {
    let reg = spawn_registry().await;
    reg.route("bot", Some(1), None).await;
    let rev = reg.client().routing(None, 0).await.unwrap().revision;
    let gw = spawn_gateway(Some(&reg)).await;
    gw.wait_revision(rev).await;
    let (before, _) = gw.chat("bot", "u").await;
    reg.handle.stop(false).await;

    let mut ready = Value::Null;
    for _ in 0..100 {
        ready = gw.get("/readyz").await.json().await.unwrap();
        if ready["checks"]["registry"]
            .as_str()
            .is_some_and(|s| s.starts_with("unreachable"))
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let line = ready["checks"]["registry"].as_str().unwrap();
    assert!(line.starts_with("unreachable"), "{ready}");
    assert!(line.contains(&format!("revision {rev}")), "{ready}");
    assert_eq!(ready["ready"], true);

    let (after, h) = gw.chat("bot", "u").await;
    assert_eq!(after, before);
    assert_eq!(header(&h, "x-loraops-version"), "1");
    let metrics = gw.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("loraops_gateway_registry_up 0"),
        "{metrics}"
    );
    // A version never pulled cannot be fetched now: 503, not a hang or a 500.
    let res = gw
        .post(
            "/v1/chat/completions",
            &json!({"model": "bot@2", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(res.status(), 503);
}

/// `NAME@V` for a version the registry does not have costs one registry call per version
/// and period, not one per request; with `pinned_versions = routed` only routed versions
/// may be pinned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_misses_are_cached_and_pinning_can_be_limited_to_routed_versions() {
    let reg = spawn_registry().await;
    reg.route("bot", Some(1), None).await;
    let rev = reg.client().routing(None, 0).await.unwrap().revision;
    let gw = spawn_gateway(Some(&reg)).await;
    gw.wait_revision(rev).await;
    let ask = |gw: &TestGateway, model: &str| {
        let gw = gw.clone();
        let model = model.to_string();
        async move {
            gw.post(
                "/v1/chat/completions",
                &json!({"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}),
            )
            .await
            .status()
            .as_u16()
        }
    };
    for _ in 0..5 {
        assert_eq!(ask(&gw, "bot@99").await, 404);
    }
    let m = reg.state.metrics.render();
    assert!(
        m.contains(r#"loraops_registry_http_requests_total{method="GET",route="/api/v1/adapters/{name}/versions/{version}",status="404"} 1"#),
        "{m}"
    );

    let strict = spawn_gateway_with(Some(&reg), |s| {
        s.pinned_versions = loraops_gateway::routing::PinnedVersions::Routed
    })
    .await;
    strict.wait_revision(rev).await;
    assert_eq!(ask(&strict, "bot@1").await, 200);
    assert_eq!(ask(&strict, "bot@2").await, 404);
    assert_eq!(ask(&gw, "bot@2").await, 200);
}

/// With `pinned_versions = routed`, only an evaluator or deployer of the adapter may pin a
/// version outside the routing table (to evaluate or smoke-test it before its rollout);
/// every other caller, and one scoped to other adapters, gets 404 as for an unknown model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_evaluators_and_deployers_pin_versions_outside_the_routing_table() {
    use loraops_registry::api::Role;
    use loraops_registry::auth::AuthSettings;

    let reg = spawn_registry().await;
    reg.route("bot", Some(1), None).await;
    let rev = reg.client().routing(None, 0).await.unwrap().revision;
    let gw = spawn_gateway_with(Some(&reg), |s| {
        s.pinned_versions = loraops_gateway::routing::PinnedVersions::Routed;
        s.auth = Some(AuthSettings {
            hs256_secret: Some(crate::helpers::SECRET.into()),
            ..AuthSettings::default()
        });
    })
    .await;
    gw.wait_revision(rev).await;
    let ask = |roles: &[Role], adapters: Option<Vec<String>>, model: &str| {
        let token = reg.signer.issue("pin", roles, 600, adapters).unwrap();
        let gw = gw.clone();
        let model = model.to_string();
        async move {
            gw.http
                .post(format!("{}/v1/chat/completions", gw.url))
                .bearer_auth(token)
                .json(&json!({"model": model, "max_tokens": 2,
                    "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let bot = Some(vec!["bot".to_string()]);
    // The routed version: anyone who may use the gateway.
    assert_eq!(ask(&[Role::Inference], None, "bot@1").await, 200);
    // A version the table does not serve.
    assert_eq!(ask(&[Role::Inference], None, "bot@2").await, 404);
    assert_eq!(ask(&[Role::Viewer], None, "bot@2").await, 404);
    assert_eq!(ask(&[Role::Evaluator], bot.clone(), "bot@2").await, 200);
    assert_eq!(ask(&[Role::Deployer], bot, "bot@2").await, 200);
    assert_eq!(ask(&[Role::Admin], None, "bot@2").await, 200);
    assert_eq!(
        ask(&[Role::Evaluator], Some(vec!["other-*".into()]), "bot@2").await,
        404
    );
}
