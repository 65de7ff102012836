//! Gates and canary rollouts: the gate admits or refuses a canary (422 with the per-rule
//! report, nothing changed), the controller advances a healthy canary to promotion, rolls a
//! faulty one back, holds without traffic, resumes after a restart; observations are checked.
//! Gateways are played by posting observations directly (with a `gateway` token); the whole
//! stack is in the gateway's tests and tests/e2e. `canary.rs` has the statistical analysis.

use std::time::Duration;

use serde_json::{Value, json};

use crate::backends;
use crate::helpers::{Blobs, Db, TestApp, adapter, error_of, spawn_with};

pub async fn app(db: Db, blobs: Blobs) -> TestApp {
    let app = spawn_with(db, blobs, |r| r.controller_tick_ms = 50).await;
    app.register_base().await;
    app
}

/// Push a version and return its digest.
pub async fn push(app: &TestApp, name: &str, seed: u32) -> String {
    let res = app.push(name, &adapter(seed, 4, &["q_proj"])).await;
    assert!(res.status().is_success(), "push: {}", res.status());
    let v: Value = res.json().await.unwrap();
    v["digest"].as_str().unwrap().to_string()
}

/// Evidence for `name@version` on suite `(suite, suite_version)` (uploaded if new, 10 cases).
pub async fn evidence(
    app: &TestApp,
    name: &str,
    version: u32,
    digest: &str,
    suite: (&str, &str),
    metrics: Value,
) {
    let suite_digest = app.suite(suite.0, suite.1, 10).await;
    let res = app
        .post_json(
            &format!("/api/v1/adapters/{name}/versions/{version}/evidence"),
            &app.evaluator,
            &json!({
                "adapter_digest": digest,
                "suite": {"name": suite.0, "version": suite.1, "digest": suite_digest},
                "engine": {"engine": "mistral.rs", "engine_version": "0.8.1", "decoding": {}},
                "metrics": metrics, "cases": 10,
                "started_at": "2026-11-28T00:00:00Z", "finished_at": "2026-11-28T00:01:00Z"
            }),
        )
        .await;
    assert_eq!(res.status(), 201, "{}", res.text().await.unwrap());
}

pub async fn start(app: &TestApp, name: &str, body: Value) -> (u16, Value) {
    let res = app
        .post_json(
            &format!("/api/v1/adapters/{name}/rollouts"),
            &app.deployer,
            &body,
        )
        .await;
    let status = res.status().as_u16();
    (status, res.json().await.unwrap())
}

/// `requests` and `errors` spread over `users` user groups, as `[group, requests, errors]`.
/// Which users see the errors rotates from one report to the next, as independent errors
/// would (errors that always hit the same users count as theirs, not the canary's).
pub fn users(requests: u64, errors: u64, users: u32) -> Vec<Value> {
    static ROTATE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let turn = ROTATE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let share =
        |total: u64, i: u32| total / users as u64 + u64::from((i as u64) < total % users as u64);
    (0..users)
        .map(|i| json!([i, share(requests, i), share(errors, (i + turn) % users)]))
        .filter(|g| g[1] != 0)
        .collect()
}

/// One arm's report: counts from 20 users, half at 10 ms and half at 100 ms.
pub fn arm(name: &str, version: u32, arm: &str, requests: u64, errors: u64) -> Value {
    json!({"adapter": name, "version": version, "arm": arm, "requests": requests,
        "errors": errors, "latency_ms_buckets": [[10.0, requests / 2], [100.0, requests]],
        "users": users(requests, errors, 20)})
}

/// Post one gateway report of `arms` for a window ending `ago` before now.
pub async fn report(app: &TestApp, arms: Vec<Value>, ago: chrono::Duration) -> reqwest::Response {
    let end = chrono::Utc::now() - ago;
    app.post_json(
        "/api/v1/routing/observations",
        &app.gateway,
        &json!({"gateway": "gw-test", "window_start": end - chrono::Duration::milliseconds(200),
                "window_end": end, "arms": arms}),
    )
    .await
}

pub async fn observe(app: &TestApp, name: &str, arms: &[(u32, &str, u64, u64)]) {
    let arms: Vec<Value> = arms
        .iter()
        .map(|&(version, a, requests, errors)| arm(name, version, a, requests, errors))
        .collect();
    let res = report(app, arms, chrono::Duration::zero()).await;
    assert_eq!(res.status(), 202, "{}", res.text().await.unwrap());
}

pub async fn status(app: &TestApp, name: &str) -> Value {
    app.get_json(&format!("/api/v1/adapters/{name}/rollouts/current"))
        .await
}

pub async fn route(app: &TestApp, name: &str) -> Option<Value> {
    let t = app.get_json("/api/v1/routing").await;
    t["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["adapter"] == name)
        .cloned()
}

/// Feed observations every 100 ms until the rollout is no longer running (or in its shadow
/// phase), or panic after `limit`.
pub async fn drive(
    app: &TestApp,
    name: &str,
    arms: &[(u32, &str, u64, u64)],
    limit: Duration,
) -> Value {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let s = status(app, name).await;
        if !matches!(
            s["rollout"]["state"].as_str(),
            Some("running" | "shadowing")
        ) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "rollout still running: {s:#}"
        );
        observe(app, name, arms).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn actions(s: &Value) -> Vec<String> {
    s["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_string())
        .filter(|a| a != "hold")
        .collect()
}

pub const FAST: fn(u32) -> Value = |v| json!({"version": v, "steps": [10, 50, 100], "interval_secs": 1, "min_requests": 20, "failure_limit": 2});

async fn the_gate_decides_whether_a_canary_may_start(db: Db, blobs: Blobs) {
    let app = app(db, blobs).await;
    let digest = push(&app, "bot", 1).await;
    let rev = app.get_json("/api/v1/routing").await["revision"].clone();

    // No policy and no evidence: the built-in gate wants evidence for this digest.
    let (s, e) = start(&app, "bot", FAST(1)).await;
    assert_eq!((s, e["error"]["code"].as_str()), (422, Some("gate_failed")));
    assert_eq!(e["error"]["details"]["policy_scope"], "builtin");

    app.suite("redteam", "1", 10).await;
    app.suite("bench", "1", 10).await;
    let policy = json!({"required_suites": ["redteam@1"],
        "rules": [{"suite": "bench@1", "metric": "accuracy", "op": ">=", "threshold": 0.8}]});
    let res = app
        .http
        .put(app.url("/api/v1/adapters/bot/gate"))
        .bearer_auth(&app.deployer)
        .json(&policy)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    evidence(
        &app,
        "bot",
        1,
        &digest,
        ("bench", "1"),
        json!({"accuracy": 0.7}),
    )
    .await;
    let (s, e) = start(&app, "bot", FAST(1)).await;
    assert_eq!(s, 422);
    let report = &e["error"]["details"];
    assert_eq!(report["passed"], false);
    let failed: Vec<&str> = report["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["passed"] == false)
        .map(|r| r["rule"].as_str().unwrap())
        .collect();
    assert_eq!(
        failed,
        ["redteam@1 required", "bench@1/accuracy >= 0.8"],
        "{report:#}"
    );
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("bench@1/accuracy >= 0.8")
    );
    // Nothing changed.
    assert_eq!(app.get_json("/api/v1/routing").await["revision"], rev);
    assert_eq!(
        error_of(
            app.get("/api/v1/adapters/bot/rollouts/current", &app.viewer)
                .await
        )
        .await
        .0,
        404
    );

    evidence(
        &app,
        "bot",
        1,
        &digest,
        ("bench", "1"),
        json!({"accuracy": 0.85}),
    )
    .await;
    evidence(
        &app,
        "bot",
        1,
        &digest,
        ("redteam", "1"),
        json!({"refusal_rate": 1.0}),
    )
    .await;
    // Only a deployer may start one.
    let res = app
        .post_json("/api/v1/adapters/bot/rollouts", &app.publisher, &FAST(1))
        .await;
    assert_eq!(res.status(), 403);
    let (s, r) = start(&app, "bot", FAST(1)).await;
    assert_eq!(s, 201, "{r:#}");
    assert_eq!(r["rollout"]["state"], "running");
    assert_eq!(r["rollout"]["weight"], 10.0);
    assert_eq!(r["events"][0]["action"], "start");
    assert_eq!(r["events"][0]["details"]["gate"]["passed"], true);
    let rt = route(&app, "bot").await.expect("routed");
    assert_eq!(
        (
            rt["canary"]["version"].as_u64(),
            rt["canary_weight"].as_f64()
        ),
        (Some(1), Some(10.0))
    );
    assert!(rt["stable"].is_null(), "first version: no stable");
    // One active rollout per adapter.
    let (s, e) = start(&app, "bot", FAST(1)).await;
    assert_eq!((s, e["error"]["code"].as_str()), (409, Some("conflict")));
    // Bad specs are named.
    let (s, e) = start(&app, "bot", json!({"version": 1, "steps": [50, 10]})).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (422, Some("invalid_rollout"))
    );
    let (s, _) = start(&app, "bot", json!({"version": 9})).await;
    assert_eq!(s, 404);
    app.cleanup().await;
}
backends!(the_gate_decides_whether_a_canary_may_start);

async fn a_healthy_canary_is_promoted_and_a_faulty_one_rolled_back(db: Db, blobs: Blobs) {
    let app = app(db, blobs).await;
    let d1 = push(&app, "bot", 1).await;
    evidence(
        &app,
        "bot",
        1,
        &d1,
        ("bench", "1"),
        json!({"accuracy": 0.9}),
    )
    .await;
    let (s, _) = start(&app, "bot", FAST(1)).await;
    assert_eq!(s, 201);
    // Canary v1 against the base model (stable arm, version 0): healthy.
    let done = drive(
        &app,
        "bot",
        &[(1, "canary", 30, 0), (0, "stable", 60, 0)],
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(done["rollout"]["state"], "promoted", "{done:#}");
    assert_eq!(
        actions(&done),
        ["start", "advance", "advance", "promote"],
        "{done:#}"
    );
    let advance = &done["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "advance")
        .unwrap();
    assert_eq!(advance["actor"], "controller");
    let canary = &advance["details"]["arms"][0];
    assert_eq!(canary["arm"], "canary");
    assert!(canary["requests"].as_u64().unwrap() >= 20);
    assert_eq!(
        app.get_json("/api/v1/adapters/bot").await["stable_version"],
        1
    );
    let rt = route(&app, "bot").await.unwrap();
    assert_eq!(rt["stable"]["version"], 1);
    assert!(rt["canary"].is_null());

    // v2 fails 40 % of its requests: two failed analyses, then back to v1.
    let d2 = push(&app, "bot", 2).await;
    evidence(
        &app,
        "bot",
        2,
        &d2,
        ("bench", "1"),
        json!({"accuracy": 0.9}),
    )
    .await;
    let (s, _) = start(&app, "bot", FAST(2)).await;
    assert_eq!(s, 201);
    let done = drive(
        &app,
        "bot",
        &[(2, "canary", 30, 12), (1, "stable", 60, 0)],
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(done["rollout"]["state"], "rolled_back", "{done:#}");
    assert_eq!(actions(&done), ["start", "analysis_failed", "rollback"]);
    assert_eq!(done["rollout"]["weight"], 0.0);
    assert!(
        done["events"][2]["reason"]
            .as_str()
            .unwrap()
            .contains("error_rate")
    );
    let rt = route(&app, "bot").await.unwrap();
    assert_eq!(
        (rt["stable"]["version"].as_u64(), rt["canary"].is_null()),
        (Some(1), true)
    );
    assert_eq!(
        app.get_json("/api/v1/adapters/bot").await["stable_version"],
        1
    );
    app.cleanup().await;
}
backends!(a_healthy_canary_is_promoted_and_a_faulty_one_rolled_back);

async fn without_traffic_a_rollout_holds_and_a_restart_resumes_it(db: Db, blobs: Blobs) {
    let app = app(db, blobs).await;
    let d1 = push(&app, "bot", 1).await;
    evidence(
        &app,
        "bot",
        1,
        &d1,
        ("bench", "1"),
        json!({"accuracy": 0.9}),
    )
    .await;
    assert_eq!(start(&app, "bot", FAST(1)).await.0, 201);
    // Too little data for three intervals: it holds at the first step, never advances.
    observe(&app, "bot", &[(1, "canary", 5, 0)]).await;
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let s = status(&app, "bot").await;
    assert_eq!(
        (
            s["rollout"]["state"].as_str(),
            s["rollout"]["step_index"].as_u64()
        ),
        (Some("running"), Some(0))
    );
    let holds: Vec<&Value> = s["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "hold")
        .collect();
    assert!(
        !holds.is_empty() && holds.len() <= 4,
        "one hold per interval: {s:#}"
    );
    assert!(
        holds[0]["reason"]
            .as_str()
            .unwrap()
            .contains("too little data")
    );

    // The registry restarts mid-rollout; the next one picks it up where it was.
    let app = app.restart().await;
    let done = drive(
        &app,
        "bot",
        &[(1, "canary", 30, 0), (0, "stable", 60, 0)],
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(done["rollout"]["state"], "promoted", "{done:#}");
    app.cleanup().await;
}
backends!(without_traffic_a_rollout_holds_and_a_restart_resumes_it);

async fn deployers_pause_resume_promote_and_abort(db: Db, blobs: Blobs) {
    let app = app(db, blobs).await;
    let d1 = push(&app, "bot", 1).await;
    evidence(
        &app,
        "bot",
        1,
        &d1,
        ("bench", "1"),
        json!({"accuracy": 0.9}),
    )
    .await;
    let act = |a: &'static str| {
        let app = &app;
        async move {
            let res = app
                .post_json(
                    &format!("/api/v1/adapters/bot/rollouts/current/{a}"),
                    &app.deployer,
                    &json!({}),
                )
                .await;
            (res.status().as_u16(), res.json::<Value>().await.unwrap())
        }
    };
    assert_eq!(act("pause").await.0, 409, "nothing to pause");
    assert_eq!(start(&app, "bot", FAST(1)).await.0, 201);
    let (s, p) = act("pause").await;
    assert_eq!((s, p["rollout"]["state"].as_str()), (200, Some("paused")));
    // Paused: healthy traffic does not advance it.
    for _ in 0..12 {
        observe(&app, "bot", &[(1, "canary", 30, 0)]).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(status(&app, "bot").await["rollout"]["step_index"], 0);
    assert_eq!(act("pause").await.0, 409, "already paused");
    assert_eq!(act("resume").await.1["rollout"]["state"], "running");
    assert_eq!(act("nonsense").await.0, 404);
    let (s, p) = act("promote").await;
    assert_eq!((s, p["rollout"]["state"].as_str()), (200, Some("promoted")));
    assert_eq!(
        app.get_json("/api/v1/adapters/bot").await["stable_version"],
        1
    );

    let d2 = push(&app, "bot", 2).await;
    evidence(
        &app,
        "bot",
        2,
        &d2,
        ("bench", "1"),
        json!({"accuracy": 0.9}),
    )
    .await;
    assert_eq!(start(&app, "bot", FAST(2)).await.0, 201);
    let (s, p) = act("abort").await;
    assert_eq!((s, p["rollout"]["state"].as_str()), (200, Some("aborted")));
    let s = status(&app, "bot").await;
    let who: Vec<&str> = s["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["actor"].as_str().unwrap())
        .collect();
    assert_eq!(who, ["tester", "tester"]);
    let rt = route(&app, "bot").await.unwrap();
    assert_eq!(
        (rt["stable"]["version"].as_u64(), rt["canary"].is_null()),
        (Some(1), true)
    );
    app.cleanup().await;
}
backends!(deployers_pause_resume_promote_and_abort);

async fn a_non_regression_gate_compares_with_the_stable_version(db: Db, blobs: Blobs) {
    let app = app(db, blobs).await;
    app.suite("bench", "1", 10).await;
    let res = app
        .http
        .put(app.url("/api/v1/adapters/bot/gate"))
        .bearer_auth(&app.deployer)
        .json(&json!({"rules": [{"suite": "bench@1", "metric": "accuracy", "op": ">=", "max_regression": 0.02}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let d1 = push(&app, "bot", 1).await;
    evidence(
        &app,
        "bot",
        1,
        &d1,
        ("bench", "1"),
        json!({"accuracy": 0.90}),
    )
    .await;
    // First version: relative rules do not apply.
    assert_eq!(start(&app, "bot", FAST(1)).await.0, 201);
    let res = app
        .post_json(
            "/api/v1/adapters/bot/rollouts/current/promote",
            &app.deployer,
            &json!({}),
        )
        .await;
    assert_eq!(res.status(), 200);

    let d2 = push(&app, "bot", 2).await;
    evidence(
        &app,
        "bot",
        2,
        &d2,
        ("bench", "1"),
        json!({"accuracy": 0.85}),
    )
    .await;
    let (s, e) = start(&app, "bot", FAST(2)).await;
    assert_eq!(s, 422);
    let rule = &e["error"]["details"]["rules"][0];
    assert_eq!(
        (rule["passed"].as_bool(), rule["observed"].as_f64()),
        (Some(false), Some(0.85))
    );
    assert_eq!(e["error"]["details"]["stable_version"], 1);
    assert!(
        rule["note"].as_str().unwrap().contains("stable v1"),
        "{rule:#}"
    );
    // A different suite digest is a different measurement: no baseline, no pass.
    evidence(
        &app,
        "bot",
        2,
        &d2,
        ("bench", "2"),
        json!({"accuracy": 0.95}),
    )
    .await;
    let (s, e) = start(&app, "bot", FAST(2)).await;
    assert_eq!(s, 422);
    // bench@2 is another suite: the rule names bench@1, which v2 has evidence for (0.85).
    assert_eq!(e["error"]["details"]["rules"][0]["observed"], 0.85);
    evidence(
        &app,
        "bot",
        2,
        &d2,
        ("bench", "1"),
        json!({"accuracy": 0.89}),
    )
    .await;
    assert_eq!(start(&app, "bot", FAST(2)).await.0, 201);
    app.cleanup().await;
}
backends!(a_non_regression_gate_compares_with_the_stable_version);

async fn observations_are_checked(db: Db, blobs: Blobs) {
    let app = app(db, blobs).await;
    push(&app, "bot", 1).await;
    let now = chrono::Utc::now();
    let post = |token: String, body: Value| {
        let app = &app;
        async move {
            error_of(
                app.post_json("/api/v1/routing/observations", &token, &body)
                    .await,
            )
            .await
        }
    };
    let arm = json!({"adapter": "bot", "version": 1, "arm": "canary", "requests": 3, "errors": 0});
    let ok = json!({"gateway": "g", "window_start": now, "window_end": now, "arms": [arm]});
    assert_eq!(post(app.viewer.clone(), ok.clone()).await.0, 403);
    let mut bad = ok.clone();
    bad["arms"][0]["arm"] = json!("blue");
    let (s, e) = post(app.gateway.clone(), bad).await;
    assert_eq!((s, e["code"].as_str()), (422, Some("invalid_observations")));
    assert!(e["message"].as_str().unwrap().contains("blue"));
    let mut bad = ok.clone();
    bad["arms"][0]["adapter"] = json!("ghost");
    assert!(
        post(app.gateway.clone(), bad).await.1["message"]
            .as_str()
            .unwrap()
            .contains("ghost")
    );
    let mut bad = ok.clone();
    bad["arms"][0]["errors"] = json!(4);
    assert_eq!(post(app.gateway.clone(), bad).await.0, 422);
    let mut bad = ok.clone();
    bad["arms"][0]["latency_ms_buckets"] = json!([[10.0, 3], [5.0, 3]]);
    assert_eq!(post(app.gateway.clone(), bad).await.0, 422);
    let mut bad = ok.clone();
    bad["window_start"] = json!(now + chrono::Duration::seconds(5));
    assert_eq!(post(app.gateway.clone(), bad).await.0, 422);
    let mut bad = ok.clone();
    bad["arms"][0]["users"] = json!([[3, 2, 0], [200, 1, 0]]);
    assert_eq!(
        post(app.gateway.clone(), bad).await.0,
        422,
        "group out of range"
    );
    let mut bad = ok.clone();
    bad["arms"][0]["users"] = json!([[3, 2, 0]]);
    assert_eq!(
        post(app.gateway.clone(), bad).await.0,
        422,
        "groups must add up"
    );
    let mut bad = ok.clone();
    bad["arms"][0]["requests"] = json!(u64::MAX);
    assert_eq!(
        post(app.gateway.clone(), bad).await.0,
        422,
        "bounded counters"
    );
    let res = app
        .post_json("/api/v1/routing/observations", &app.gateway, &ok)
        .await;
    assert_eq!(res.status(), 202);
    app.cleanup().await;
}
backends!(observations_are_checked);

/// Retention: an admin deletes versions the adapter no longer needs (row, files, evidence and
/// blobs), never the stable version nor an active rollout's candidate, and numbers are not
/// reused.
async fn admins_delete_old_versions_but_not_what_is_served(db: Db, blobs: Blobs) {
    let app = app(db, blobs).await;
    let delete = |v: u32, token: String| {
        let http = app.http.clone();
        let url = app.url(&format!("/api/v1/adapters/bot/versions/{v}"));
        async move {
            let res = http.delete(url).bearer_auth(token).send().await.unwrap();
            let status = res.status().as_u16();
            (status, res.text().await.unwrap())
        }
    };
    let d1 = push(&app, "bot", 1).await;
    push(&app, "bot", 2).await;
    let d3 = push(&app, "bot", 3).await;
    evidence(
        &app,
        "bot",
        1,
        &d1,
        ("bench", "1"),
        json!({"accuracy": 0.9}),
    )
    .await;
    evidence(
        &app,
        "bot",
        3,
        &d3,
        ("bench", "1"),
        json!({"accuracy": 0.9}),
    )
    .await;
    assert_eq!(start(&app, "bot", FAST(1)).await.0, 201);

    // The active rollout's candidate.
    let (s, e) = delete(1, app.admin.clone()).await;
    assert_eq!(s, 409, "{e}");
    assert!(e.contains("active rollout"), "{e}");
    let res = app
        .post_json(
            "/api/v1/adapters/bot/rollouts/current/promote",
            &app.deployer,
            &json!({}),
        )
        .await;
    assert_eq!(res.status(), 200);
    // Now the stable version.
    let (s, e) = delete(1, app.admin.clone()).await;
    assert_eq!(s, 409, "{e}");
    assert!(e.contains("stable version"), "{e}");

    // Only an admin deletes.
    assert_eq!(delete(2, app.publisher.clone()).await.0, 403);
    assert_eq!(delete(2, app.deployer.clone()).await.0, 403);
    let file = "/api/v1/adapters/bot/versions/2/files/adapter_model.safetensors";
    assert_eq!(app.get(file, &app.viewer).await.status(), 200);
    let (s, e) = delete(2, app.admin.clone()).await;
    assert_eq!(s, 204, "{e}");
    assert_eq!(delete(2, app.admin.clone()).await.0, 404);
    assert_eq!(
        app.get("/api/v1/adapters/bot/versions/2", &app.viewer)
            .await
            .status(),
        404
    );
    assert_eq!(app.get(file, &app.viewer).await.status(), 404);
    // Version 3 and its evidence are untouched, and serving is unchanged.
    let v3 = app
        .get_json("/api/v1/adapters/bot/versions/3/evidence")
        .await;
    assert_eq!(v3.as_array().map(Vec::len), Some(1), "{v3}");
    assert_eq!(route(&app, "bot").await.unwrap()["stable"]["version"], 1);
    // The blobs are gone: nothing for the sweep to find under version 2's upload.
    let report =
        loraops_registry::server::sweep::sweep_orphans(&app.state, std::time::Duration::ZERO)
            .await
            .unwrap();
    assert_eq!(report.blobs_deleted, 0, "{report:?}");
    // Numbers are never reused.
    push(&app, "bot", 4).await;
    let versions: Vec<u64> = app.get_json("/api/v1/adapters/bot/versions").await["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, [1, 3, 4]);
    app.cleanup().await;
}
backends!(admins_delete_old_versions_but_not_what_is_served, s3);
