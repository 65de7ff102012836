//! Health, readiness, metrics, OpenAPI.

use serde_json::Value;

use crate::helpers::{Adapter, Blobs, Db, spawn_app};

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
    let a = Adapter::new(1, 4, &["q_proj"]);
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
