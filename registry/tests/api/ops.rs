//! Health, readiness, metrics, OpenAPI.

use serde_json::Value;

use crate::helpers::{Blobs, Db, adapter, spawn_app};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_ready_metrics_and_openapi() {
    let app = spawn_app(Db::Sqlite, Blobs::Local).await;
    let h: Value = app
        .http
        .get(app.url("/healthz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h["status"], "ok");
    let r = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r: Value = r.json().await.unwrap();
    assert_eq!(
        (
            r["checks"]["database"].as_str(),
            r["checks"]["object_store"].as_str()
        ),
        (Some("ok"), Some("ok"))
    );

    app.register_base().await;
    let a = adapter(1, 4, &["q_proj"]);
    let size: usize = a.files().iter().map(|(_, b)| b.len()).sum();
    assert_eq!(app.push("m", &a).await.status(), 201);
    let m = app.metrics().await;
    assert!(m.contains(r#"loraops_registry_http_requests_total{method="POST",route="/api/v1/adapters/{name}/versions",status="201"} 1"#), "{m}");
    assert!(
        m.contains("loraops_registry_versions_created_total 1"),
        "{m}"
    );
    assert!(
        m.contains(&format!("loraops_registry_upload_bytes_total {size}")),
        "{m}"
    );
    assert!(
        m.contains("loraops_registry_http_request_duration_seconds_bucket"),
        "{m}"
    );

    let spec: Value = app
        .http
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        spec["paths"]["/api/v1/adapters/{name}/versions"]["post"].is_object(),
        "{spec}"
    );
    assert!(spec["components"]["schemas"]["AdapterVersion"].is_object());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_fails_when_the_store_is_gone() {
    let app = spawn_app(Db::Sqlite, Blobs::Local).await;
    // Replace the blob directory with a file: the store can no longer answer.
    let blobs = app.dir.path().join("blobs");
    std::fs::remove_dir_all(&blobs).unwrap();
    std::fs::write(&blobs, b"not a directory").unwrap();
    let r = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["ready"], false);
    assert_ne!(body["checks"]["object_store"], "ok");
}

/// A rollout controller that stops ticking (here: its lease query blocked by a lock held in
/// PostgreSQL) makes `/readyz` fail and name it; it recovers when the database does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_reports_a_stalled_rollout_controller() {
    use sea_orm::{ConnectionTrait, TransactionTrait};
    let app = crate::helpers::spawn_with(Db::Postgres, Blobs::Local, |r| {
        r.controller_tick_ms = 100;
        r.controller_lease_secs = 1;
    })
    .await;
    let ready = |app: &crate::helpers::TestApp| {
        let req = app.http.get(app.url("/readyz"));
        async move {
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap();
            (status, body)
        }
    };
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let (status, body) = ready(&app).await;
    assert_eq!(
        (status, body["checks"]["rollout_controller"].as_str()),
        (200, Some("ok")),
        "{body}"
    );

    let url = app.settings.registry.database_url.clone().unwrap();
    let other = sea_orm::Database::connect(url.as_str()).await.unwrap();
    let txn = other.begin().await.unwrap();
    txn.execute_unprepared("LOCK TABLE leases IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let (status, body) = ready(&app).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["checks"]["rollout_controller"]
            .as_str()
            .unwrap()
            .starts_with("stalled"),
        "{body}"
    );
    assert_eq!(body["checks"]["database"], "ok");
    txn.rollback().await.unwrap();
    other.close().await.ok();
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    let (status, body) = ready(&app).await;
    assert_eq!(status, 200, "{body}");
    let m = app.metrics().await;
    assert!(
        m.contains("loraops_registry_background_last_tick_seconds{task=\"rollout_controller\"}"),
        "{m}"
    );
    app.cleanup().await;
}

/// A supervised loop whose pass panics or fails is restarted and counted, not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_background_loop_survives_panics_and_errors() {
    use loraops_registry::server::supervisor::{Pass, Supervisor};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    let sup = Arc::new(Supervisor::new(&prometheus::Registry::new()));
    let passes = Arc::new(AtomicU32::new(0));
    let p = passes.clone();
    let task = sup.spawn("flaky", std::time::Duration::from_secs(60), move || {
        let n = p.fetch_add(1, Ordering::SeqCst);
        async move {
            match n {
                0 => panic!("first pass panics"),
                1 => Err("second pass fails".to_string()),
                _ => Ok(Pass::Sleep(std::time::Duration::from_millis(10))),
            }
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while passes.load(Ordering::SeqCst) < 5 {
        assert!(std::time::Instant::now() < deadline, "the loop stopped");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(sup.failures("flaky", "panic"), 1);
    assert_eq!(sup.failures("flaky", "error"), 1);
    assert_eq!(sup.checks()["flaky"], "ok");
    task.abort();
}

/// Settings that would break a loop are refused at start-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_settings_are_refused() {
    use loraops_registry::server::RegistrySettings;
    let tweaks: [fn(&mut RegistrySettings); 3] = [
        |r| r.orphan_grace_secs = u64::MAX,
        |r| r.controller_lease_secs = 0,
        |r| r.webhook_timeout_secs = u64::MAX,
    ];
    for tweak in tweaks {
        let dir = tempfile::tempdir().unwrap();
        let mut registry = loraops_registry::server::RegistrySettings {
            listen: "127.0.0.1:0".into(),
            ..Default::default()
        };
        tweak(&mut registry);
        let settings = loraops_registry::server::ServeSettings {
            data_dir: dir.path().to_path_buf(),
            registry,
            auth: Default::default(),
            s3: Default::default(),
        };
        let err = loraops_registry::server::Application::build(settings)
            .await
            .err()
            .expect("refused");
        assert!(err.to_string().contains("[registry]"), "{err}");
    }
}

/// Method tokens clients invent are counted as `other`, not as new series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invented_methods_do_not_grow_the_metrics() {
    let app = spawn_app(Db::Sqlite, Blobs::Local).await;
    for i in 0..20 {
        let m = reqwest::Method::from_bytes(format!("M{i}X").as_bytes()).unwrap();
        app.http
            .request(m, app.url("/healthz"))
            .send()
            .await
            .unwrap();
    }
    let m = app.metrics().await;
    assert!(!m.contains("M3X"), "{m}");
    assert!(m.contains("method=\"other\""), "{m}");
}
