//! Training runs (`/runs`) and what the console reads beside them: `/me`, a version's gate
//! report, the rollouts overview, a rollout's live series, and `/ui` itself.

use loraops_registry::api::Role;
use serde_json::{Value, json};

use crate::backends;
use crate::helpers::{Blobs, Db, adapter, error_of};
use crate::rollouts::{app, evidence, observe, push, start};

fn new_run(id: &str, adapter: &str) -> Value {
    json!({"id": id, "adapter": adapter, "method": "sft", "base_model": "tiny-llama",
        "config": {"lr": 0.0002, "r": 8}, "total_steps": 3,
        "datasets": [{"role": "train", "path": "train.jsonl", "digest": "sha256:00", "rows": 12}]})
}

fn points(steps: std::ops::RangeInclusive<u64>) -> Value {
    let pts: Vec<Value> = steps
        .flat_map(|s| {
            [
                json!({"step": s, "name": "loss", "value": 3.0 / s as f64}),
                json!({"step": s, "name": "rewards/margins", "value": s as f64}),
            ]
        })
        .collect();
    json!({ "points": pts })
}

async fn runs_are_recorded_idempotently_and_scoped(db: Db, blobs: Blobs) {
    let app = app(db, blobs).await;
    let id = "6f1c1f38-5d1e-4b7e-9d53-0a3c2b1d9e01";
    let other = "0b6e2a8e-1c4f-4f5e-8a61-3c2d4e5f6a7b";

    // Created once; a resent create is the same run (200); another owner's id is a conflict.
    let res = app
        .post_json("/api/v1/runs", &app.publisher, &new_run(id, "helpdesk"))
        .await;
    assert_eq!(res.status(), 201, "{}", res.text().await.unwrap());
    let res = app
        .post_json("/api/v1/runs", &app.publisher, &new_run(id, "helpdesk"))
        .await;
    assert_eq!(res.status(), 200);
    let res = app
        .post_json("/api/v1/runs", &app.admin, &new_run(id, "other"))
        .await;
    assert_eq!(error_of(res).await.0, 409);
    // Writing needs the publisher role, on the run's adapter.
    let res = app
        .post_json("/api/v1/runs", &app.viewer, &new_run(other, "helpdesk"))
        .await;
    assert_eq!(error_of(res).await.0, 403);
    let scoped_pub = app
        .signer
        .issue(
            "scoped",
            &[Role::Publisher],
            600,
            Some(vec!["billing-*".into()]),
        )
        .unwrap();
    let res = app
        .post_json("/api/v1/runs", &scoped_pub, &new_run(other, "helpdesk"))
        .await;
    assert_eq!(error_of(res).await.0, 403);
    let res = app
        .post_json("/api/v1/runs", &scoped_pub, &new_run(other, "billing-bot"))
        .await;
    assert_eq!(res.status(), 201);

    // Points: a batch sent twice is stored once; the run's last step follows.
    let path = format!("/api/v1/runs/{id}/metrics");
    for _ in 0..2 {
        let res = app.post_json(&path, &app.publisher, &points(1..=3)).await;
        assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
    }
    let m = app.get_json(&path).await;
    assert_eq!(m["series"]["loss"], json!([[1, 3.0], [2, 1.5], [3, 1.0]]));
    assert_eq!(m["series"]["rewards/margins"].as_array().unwrap().len(), 3);
    let newer = app.get_json(&format!("{path}?after_step=2")).await;
    assert_eq!(newer["series"]["loss"], json!([[3, 1.0]]));
    assert_eq!(
        app.get_json(&format!("/api/v1/runs/{id}")).await["last_step"],
        3
    );
    // Bad points are refused by name, and nothing of the batch is stored.
    let res = app
        .post_json(
            &path,
            &app.publisher,
            &json!({"points": [{"step": 4, "name": "loss", "value": 1.0},
            {"step": 4, "name": "bad name!", "value": 1.0}]}),
        )
        .await;
    let (status, body) = error_of(res).await;
    assert_eq!(status, 422);
    assert!(
        body["message"].as_str().unwrap().contains("bad name!"),
        "{body}"
    );
    assert_eq!(
        app.get_json(&format!("/api/v1/runs/{id}")).await["last_step"],
        3
    );
    let res = app
        .post_json(
            "/api/v1/runs/not-a-uuid/metrics",
            &app.publisher,
            &points(1..=1),
        )
        .await;
    assert_eq!(error_of(res).await.0, 400);
    let res = app
        .post_json(
            "/api/v1/runs/11111111-2222-4333-8444-555555555555/metrics",
            &app.publisher,
            &points(1..=1),
        )
        .await;
    assert_eq!(error_of(res).await.0, 404);

    // The end: recorded once; the same end again is answered, a different one refused.
    let end = json!({"status": "succeeded", "summary": {"final_loss": 1.0}});
    let res = app
        .post_json(&format!("/api/v1/runs/{id}/end"), &app.publisher, &end)
        .await;
    assert_eq!(res.status(), 200);
    let r: Value = res.json().await.unwrap();
    assert_eq!(r["status"], "succeeded");
    assert!(r["ended_at"].is_string());
    let res = app
        .post_json(&format!("/api/v1/runs/{id}/end"), &app.publisher, &end)
        .await;
    assert_eq!(res.status(), 200);
    let res = app
        .post_json(
            &format!("/api/v1/runs/{id}/end"),
            &app.publisher,
            &json!({"status": "failed"}),
        )
        .await;
    assert_eq!(error_of(res).await.0, 409);

    // Reads: a token limited to other adapters neither lists nor opens this run.
    let all = app.get_json("/api/v1/runs").await;
    assert_eq!(all["items"].as_array().unwrap().len(), 2);
    let mine = app.get_json("/api/v1/runs?adapter=helpdesk").await;
    assert_eq!(mine["items"].as_array().unwrap().len(), 1);
    assert_eq!(mine["items"][0]["id"], id);
    let scoped = app
        .signer
        .issue(
            "scoped",
            &[Role::Viewer],
            600,
            Some(vec!["billing-*".into()]),
        )
        .unwrap();
    let res = app.get("/api/v1/runs", &scoped).await;
    let listed: Value = res.json().await.unwrap();
    let ids: Vec<&str> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![other]);
    for p in [
        format!("/api/v1/runs/{id}"),
        format!("/api/v1/runs/{id}/metrics"),
    ] {
        assert_eq!(app.get(&p, &scoped).await.status(), 404, "{p}");
    }
    assert_eq!(
        app.get(&format!("/api/v1/runs/{other}"), &scoped)
            .await
            .status(),
        200
    );
    let inference = app
        .signer
        .issue("user", &[Role::Inference], 600, None)
        .unwrap();
    assert_eq!(app.get("/api/v1/runs", &inference).await.status(), 403);

    // A version pushed with the run's manifest links both ways.
    let mut adapter = adapter(7, 4, &["q_proj"]);
    adapter.manifest = Some(json!({"format": "loraops.training/v1", "method": "sft",
        "trainer_version": "t", "base_model": "tiny-llama", "config": {},
        "created_at": "2026-12-06T00:00:00Z", "run_id": id}));
    let res = app.push("helpdesk", &adapter).await;
    assert_eq!(res.status(), 201, "{}", res.text().await.unwrap());
    let v = app.get_json("/api/v1/adapters/helpdesk/versions/1").await;
    assert_eq!(v["run"], id);
    let r = app.get_json(&format!("/api/v1/runs/{id}")).await;
    assert_eq!(
        r["versions"],
        json!([{"adapter": "helpdesk", "version": 1}])
    );
    app.cleanup().await;
}
backends!(runs_are_recorded_idempotently_and_scoped);

async fn console_reads_who_gates_rollouts_and_series(db: Db, blobs: Blobs) {
    let app = app(db, blobs).await;

    // Who the token is, as the registry maps it.
    let scoped = app
        .signer
        .issue(
            "ml-lead",
            &[Role::Viewer],
            600,
            Some(vec!["support".into()]),
        )
        .unwrap();
    let me: Value = app.get("/api/v1/me", &scoped).await.json().await.unwrap();
    assert_eq!(
        me,
        json!({"sub": "ml-lead", "roles": ["viewer"], "adapters": ["support"]})
    );
    assert_eq!(
        error_of(app.http.get(app.url("/api/v1/me")).send().await.unwrap())
            .await
            .0,
        401
    );

    // A version's gate report, evaluated without side effects: failing, then passing.
    let d1 = push(&app, "support", 1).await;
    app.suite("bench", "1", 10).await;
    let gate = json!({"rules": [{"suite": "bench@1", "metric": "accuracy", "op": ">=", "threshold": 0.8}]});
    let res = app
        .http
        .put(app.url("/api/v1/adapters/support/gate"))
        .bearer_auth(&app.deployer)
        .json(&gate)
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "{}", res.text().await.unwrap());
    let report = app
        .get_json("/api/v1/adapters/support/versions/1/gate-report")
        .await;
    assert_eq!(report["passed"], false);
    assert_eq!(report["rules"][0]["passed"], false);
    evidence(
        &app,
        "support",
        1,
        &d1,
        ("bench", "1"),
        json!({"accuracy": 0.9}),
    )
    .await;
    let report = app
        .get_json("/api/v1/adapters/support/versions/1/gate-report")
        .await;
    assert_eq!(report["passed"], true, "{report}");
    assert_eq!(report["rules"][0]["observed"], 0.9);
    assert_eq!(
        app.get(
            "/api/v1/adapters/support/versions/9/gate-report",
            &app.viewer
        )
        .await
        .status(),
        404
    );

    // The rollouts overview: the latest rollout of each adapter the caller sees.
    let (status, body) = start(
        &app,
        "support",
        json!({"version": 1, "interval_secs": 3600}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let d2 = push(&app, "billing", 2).await;
    evidence(
        &app,
        "billing",
        1,
        &d2,
        ("bench", "1"),
        json!({"accuracy": 0.9}),
    )
    .await;
    let (status, body) = start(
        &app,
        "billing",
        json!({"version": 1, "interval_secs": 3600}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let res = app
        .http
        .post(app.url("/api/v1/adapters/billing/rollouts/current/abort"))
        .bearer_auth(&app.deployer)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let all = app.get_json("/api/v1/rollouts").await;
    let names: Vec<&str> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["adapter"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        vec!["billing", "support"],
        "most recently updated first"
    );
    let active = app.get_json("/api/v1/rollouts?active=true").await;
    assert_eq!(active["items"].as_array().unwrap().len(), 1);
    assert_eq!(active["items"][0]["adapter"], "support");
    let seen: Value = app
        .get("/api/v1/rollouts", &scoped)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(seen["items"].as_array().unwrap().len(), 1);

    // The live series: the gateways' reports per arm, bucketed by when they arrived.
    observe(&app, "support", &[(1, "canary", 40, 2)]).await;
    let s = app
        .get_json("/api/v1/adapters/support/rollouts/current/series?bucket_secs=1")
        .await;
    let pts = s["points"].as_array().unwrap();
    assert_eq!(pts.len(), 1, "{s}");
    let canary = &pts[0]["arms"][0];
    assert_eq!(canary["arm"], "canary");
    assert_eq!(canary["requests"], 40);
    assert_eq!(canary["errors"], 2);
    assert_eq!(canary["share"], 100.0);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    observe(&app, "support", &[(1, "canary", 10, 0)]).await;
    let s = app
        .get_json("/api/v1/adapters/support/rollouts/current/series?bucket_secs=1")
        .await;
    assert_eq!(s["points"].as_array().unwrap().len(), 2, "{s}");
    assert_eq!(s["points"][1]["arms"][0]["requests"], 10);
    let other = app
        .signer
        .issue("x", &[Role::Viewer], 600, Some(vec!["billing".into()]))
        .unwrap();
    assert_eq!(
        app.get("/api/v1/adapters/support/rollouts/current/series", &other)
            .await
            .status(),
        404
    );
    app.cleanup().await;
}
backends!(console_reads_who_gates_rollouts_and_series);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_is_served_from_the_binary_with_a_strict_policy() {
    let app = app(Db::Sqlite, Blobs::Local).await;
    let res = app.http.get(app.url("/ui/")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let csp = res.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("default-src 'none'"),
        "{csp}"
    );
    let etag = res.headers()["etag"].clone();
    let html = res.text().await.unwrap();
    assert!(html.contains("app.js"), "{html}");
    for (path, kind) in [
        ("/ui/app.js", "javascript"),
        ("/ui/app.css", "css"),
        ("/ui/vendor/uPlot.iife.min.js", "javascript"),
    ] {
        let res = app.http.get(app.url(path)).send().await.unwrap();
        assert_eq!(res.status(), 200, "{path}");
        let ct = res.headers()["content-type"].to_str().unwrap().to_string();
        assert!(ct.contains(kind), "{path}: {ct}");
        assert!(!res.bytes().await.unwrap().is_empty(), "{path} is empty");
    }
    let res = app
        .http
        .get(app.url("/ui/"))
        .header("if-none-match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 304);
    for missing in ["/ui/../Cargo.toml", "/ui/nothing.js"] {
        assert_eq!(
            app.http
                .get(app.url(missing))
                .send()
                .await
                .unwrap()
                .status(),
            404
        );
    }
}
