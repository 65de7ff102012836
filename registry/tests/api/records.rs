//! Base models, listings and pagination, evidence and gates storage, the routing table.

use serde_json::{Value, json};

use crate::backends;
use crate::helpers::{Blobs, Db, adapter, error_of, spawn_app};

async fn listings_paginate(db: Db, blobs: Blobs) {
    let app = spawn_app(db, blobs).await;
    app.register_base().await;
    for i in 0..5 {
        assert_eq!(
            app.push(&format!("a{i}"), &adapter(i, 4, &["q_proj"]))
                .await
                .status(),
            201
        );
    }
    for i in 0..3 {
        assert_eq!(
            app.push("a0", &adapter(50 + i, 4, &["q_proj"]))
                .await
                .status(),
            201
        );
    }
    let mut names = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let q = match &after {
            Some(a) => format!("/api/v1/adapters?limit=2&after={a}"),
            None => "/api/v1/adapters?limit=2".into(),
        };
        let page = app.get_json(&q).await;
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 2);
        names.extend(
            items
                .iter()
                .map(|i| i["name"].as_str().unwrap().to_string()),
        );
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => break,
        }
    }
    assert_eq!(names, ["a0", "a1", "a2", "a3", "a4"]);
    let p1 = app.get_json("/api/v1/adapters/a0/versions?limit=3").await;
    let vs: Vec<u64> = p1["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_u64().unwrap())
        .collect();
    assert_eq!((vs, p1["next"].as_str()), (vec![1, 2, 3], Some("3")));
    let p2 = app
        .get_json("/api/v1/adapters/a0/versions?limit=3&after=3")
        .await;
    assert_eq!(p2["items"].as_array().unwrap().len(), 1);
    assert!(p2["next"].is_null());
    let bases = app.get_json("/api/v1/base-models").await;
    assert_eq!(bases["items"][0]["dims"]["hidden_size"], 64);
    app.cleanup().await;
}
backends!(listings_paginate);

async fn evidence_binds_to_the_version_digest(db: Db, blobs: Blobs) {
    let app = spawn_app(db, blobs).await;
    app.register_base().await;
    let v: Value = app
        .push("ev", &adapter(1, 4, &["q_proj"]))
        .await
        .json()
        .await
        .unwrap();
    let digest = v["digest"].as_str().unwrap();
    let suite = app.suite("redteam-smoke", "1", 120).await;
    let mut body = json!({
        "adapter_digest": digest, "suite": {"name": "redteam-smoke", "version": "1", "digest": suite},
        "engine": {"engine": "mistral.rs", "engine_version": "0.8.1", "decoding": {"temperature": 0}},
        "metrics": {"refusal_rate": 0.97}, "cases": 120, "cases_digest": "sha256:bb",
        "started_at": "2026-11-28T00:00:00Z", "finished_at": "2026-11-28T00:05:00Z"
    });
    let res = app
        .http
        .post(app.url("/api/v1/adapters/ev/versions/1/evidence"))
        .bearer_auth(&app.evaluator)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let created: Value = res.json().await.unwrap();
    assert_eq!(created["created_by"], "tester");
    body["adapter_digest"] = json!("sha256:0000");
    let res = app
        .http
        .post(app.url("/api/v1/adapters/ev/versions/1/evidence"))
        .bearer_auth(&app.evaluator)
        .json(&body)
        .send()
        .await
        .unwrap();
    let (s, e) = error_of(res).await;
    assert_eq!((s, e["code"].as_str()), (422, Some("digest_mismatch")));
    let res = app
        .http
        .post(app.url("/api/v1/adapters/ev/versions/1/evidence"))
        .bearer_auth(&app.evaluator)
        .json(&json!({"metrics": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(res).await.0, 400);
    let list = app
        .get_json("/api/v1/adapters/ev/versions/1/evidence")
        .await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["metrics"]["refusal_rate"], 0.97);
    assert_eq!(list[0]["suite"]["name"], "redteam-smoke");
    app.cleanup().await;
}
backends!(evidence_binds_to_the_version_digest);

async fn gate_policies_are_stored_and_checked(db: Db, blobs: Blobs) {
    let app = spawn_app(db, blobs).await;
    let put = |name: &'static str, body: Value| {
        let app = &app;
        // The default policy (`*`) is an admin's; an adapter's a deployer's.
        let token = if name == "*" {
            &app.admin
        } else {
            &app.deployer
        };
        async move {
            app.http
                .put(app.url(&format!("/api/v1/adapters/{name}/gate")))
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    app.suite("redteam-smoke", "1", 3).await;
    app.suite("bench", "1", 3).await;
    let policy = json!({"required_suites": ["redteam-smoke@1"], "rules": [
        {"suite": "bench@1", "metric": "accuracy", "op": ">=", "threshold": 0.7},
        {"suite": "bench@1", "metric": "accuracy", "op": ">=", "max_regression": 0.01}], "max_evidence_age_hours": 72});
    assert_eq!(put("gated", policy.clone()).await.status(), 200);
    let got = app.get_json("/api/v1/adapters/gated/gate").await;
    assert_eq!(got["policy"]["rules"].as_array().unwrap().len(), 2);
    assert_eq!(got["updated_by"], "tester");
    // Replace.
    assert_eq!(
        put("gated", json!({"required_suites": ["bench@1"]}))
            .await
            .status(),
        200
    );
    assert!(
        app.get_json("/api/v1/adapters/gated/gate").await["policy"]["rules"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    // The default policy lives under `*`.
    assert_eq!(put("*", policy).await.status(), 200);
    assert_eq!(
        app.get_json("/api/v1/adapters/*/gate").await["policy"]["required_suites"][0],
        "redteam-smoke@1"
    );
    // A rule with no bound, an unknown operator.
    let (s, e) = error_of(
        put(
            "gated",
            json!({"rules": [{"suite": "s", "metric": "m", "op": ">="}]}),
        )
        .await,
    )
    .await;
    assert_eq!((s, e["code"].as_str()), (422, Some("invalid_gate")));
    assert_eq!(
        error_of(
            put(
                "gated",
                json!({"rules": [{"suite": "s", "metric": "m", "op": "~", "threshold": 1}]})
            )
            .await
        )
        .await
        .0,
        400
    );
    assert_eq!(
        error_of(app.get("/api/v1/adapters/nogate/gate", &app.viewer).await)
            .await
            .0,
        404
    );
    app.cleanup().await;
}
backends!(gate_policies_are_stored_and_checked);

async fn the_routing_table_long_polls(db: Db, blobs: Blobs) {
    let app = spawn_app(db, blobs).await;
    let t = app.get_json("/api/v1/routing").await;
    assert!(t["routes"].as_array().unwrap().is_empty());
    let rev = t["revision"].as_i64().unwrap();
    let start = std::time::Instant::now();
    let t2 = app
        .get_json(&format!("/api/v1/routing?since={rev}&wait=1"))
        .await;
    assert!(
        start.elapsed() >= std::time::Duration::from_millis(900),
        "waited for a change"
    );
    assert_eq!(t2["revision"].as_i64(), Some(rev));
    app.cleanup().await;
}
backends!(the_routing_table_long_polls);
