//! Authentication and the RBAC matrix.

use loraops_registry::api::Role;
use loraops_registry::auth::{AuthSettings, Signer};
use serde_json::json;

use crate::backends;
use crate::helpers::{Adapter, Blobs, Db, TestApp, error_of, spawn_app, spawn_with};

async fn push_status(app: &TestApp, name: &str, token: Option<&str>) -> u16 {
    let files = Adapter::new(1, 4, &["q_proj"]).files();
    let mut form = reqwest::multipart::Form::new();
    for (n, b) in files {
        form = form.part(n.clone(), reqwest::multipart::Part::bytes(b).file_name(n));
    }
    let mut rb = app
        .http
        .post(app.url(&format!("/api/v1/adapters/{name}/versions")))
        .multipart(form);
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    let res = rb.send().await.unwrap();
    let status = res.status().as_u16();
    if status >= 400 {
        error_of(res).await;
    }
    status
}

async fn bad_tokens_get_401(db: Db, blobs: Blobs) {
    let app = spawn_app(db, blobs).await;
    app.register_base().await;
    let expired = app
        .signer
        .issue("old", &[Role::Admin], -3600, None)
        .unwrap();
    let forged = Signer::from_settings(
        &AuthSettings {
            hs256_secret: Some("another-secret-0123456789".into()),
            ..AuthSettings::default()
        },
        app.dir.path(),
    )
    .unwrap()
    .issue("mallory", &[Role::Admin], 3600, None)
    .unwrap();
    let wrong_aud = Signer::from_settings(
        &AuthSettings {
            hs256_secret: Some(crate::helpers::SECRET.into()),
            audience: "elsewhere".into(),
            ..AuthSettings::default()
        },
        app.dir.path(),
    )
    .unwrap()
    .issue("x", &[Role::Admin], 3600, None)
    .unwrap();
    let claims = app.admin.split('.').nth(1).unwrap();
    let none_alg = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{claims}.");
    for (what, token) in [
        ("none", None),
        ("expired", Some(expired.as_str())),
        ("forged", Some(forged.as_str())),
        ("audience", Some(wrong_aud.as_str())),
        ("alg none", Some(none_alg.as_str())),
        ("garbage", Some("abc.def.ghi")),
    ] {
        assert_eq!(push_status(&app, "guarded", token).await, 401, "{what}");
        let mut rb = app.http.get(app.url("/api/v1/adapters"));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        let res = rb.send().await.unwrap();
        assert_eq!(
            res.headers()
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap()),
            Some("Bearer"),
            "{what}"
        );
        assert_eq!(error_of(res).await.0, 401, "{what}");
    }
    let res = app
        .http
        .get(app.url("/api/v1/adapters"))
        .header("Authorization", "Basic dXNlcjpwdw==")
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(res).await.0, 401);
    app.cleanup().await;
}
backends!(bad_tokens_get_401);

async fn each_write_needs_its_role(db: Db, blobs: Blobs) {
    let app = spawn_app(db, blobs).await;
    app.register_base().await;
    // Pushing: publisher and admin only.
    for (who, token, want) in [
        ("viewer", &app.viewer, 403),
        ("evaluator", &app.evaluator, 403),
        ("deployer", &app.deployer, 403),
        ("publisher", &app.publisher, 201),
    ] {
        assert_eq!(
            push_status(&app, "rbac", Some(token)).await,
            want,
            "{who} push"
        );
    }
    // Base models: admin only.
    for (who, token, want) in [
        ("publisher", &app.publisher, 403),
        ("deployer", &app.deployer, 403),
        ("admin", &app.admin, 201),
    ] {
        let res = app
            .http
            .post(app.url("/api/v1/base-models"))
            .bearer_auth(token)
            .json(&json!({"name": format!("base-{who}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), want, "{who} base model");
    }
    // Evidence: evaluator (and admin).
    let digest = app.get_json("/api/v1/adapters/rbac/versions/1").await["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let suite = app.suite("smoke", "1", 10).await;
    let evidence = json!({
        "adapter_digest": digest, "suite": {"name": "smoke", "version": "1", "digest": suite},
        "engine": {"engine": "mistral.rs", "engine_version": "0.8.1"}, "metrics": {"accuracy": 0.9}, "cases": 10,
        "started_at": "2026-11-28T00:00:00Z", "finished_at": "2026-11-28T00:01:00Z"
    });
    for (who, token, want) in [
        ("publisher", &app.publisher, 403),
        ("deployer", &app.deployer, 403),
        ("evaluator", &app.evaluator, 201),
        ("admin", &app.admin, 201),
    ] {
        let res = app
            .http
            .post(app.url("/api/v1/adapters/rbac/versions/1/evidence"))
            .bearer_auth(token)
            .json(&evidence)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), want, "{who} evidence");
    }
    // Gates: deployer (and admin).
    let policy = json!({"rules": [{"suite": "smoke@1", "metric": "accuracy", "op": ">=", "threshold": 0.8}]});
    for (who, token, want) in [
        ("publisher", &app.publisher, 403),
        ("evaluator", &app.evaluator, 403),
        ("deployer", &app.deployer, 200),
    ] {
        let res = app
            .http
            .put(app.url("/api/v1/adapters/rbac/gate"))
            .bearer_auth(token)
            .json(&policy)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), want, "{who} gate");
    }
    // Every role may read.
    for token in [
        &app.viewer,
        &app.publisher,
        &app.evaluator,
        &app.deployer,
        &app.admin,
    ] {
        assert_eq!(app.get("/api/v1/adapters/rbac", token).await.status(), 200);
    }
    app.cleanup().await;
}
backends!(each_write_needs_its_role);

async fn adapter_patterns_limit_a_token(db: Db, blobs: Blobs) {
    let app = spawn_app(db, blobs).await;
    app.register_base().await;
    let team_a = app
        .signer
        .issue(
            "ci-team-a",
            &[Role::Publisher],
            600,
            Some(vec!["team-a-*".into()]),
        )
        .unwrap();
    assert_eq!(push_status(&app, "team-a-bot", Some(&team_a)).await, 201);
    assert_eq!(push_status(&app, "team-b-bot", Some(&team_a)).await, 403);
    app.cleanup().await;
}
backends!(adapter_patterns_limit_a_token);

async fn reads_can_be_open(db: Db, blobs: Blobs) {
    let app = spawn_with(db, blobs, |r| r.anonymous_reads = true).await;
    app.register_base().await;
    assert_eq!(
        app.http
            .get(app.url("/api/v1/adapters"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(push_status(&app, "open", None).await, 401);
    app.cleanup().await;
}
backends!(reads_can_be_open);
