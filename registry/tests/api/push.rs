//! Publishing versions: numbering, idempotent re-push, concurrency, atomicity.

use serde_json::Value;

use crate::backends;
use crate::helpers::{Blobs, Db, adapter, error_of, spawn_app, spawn_with};

async fn versions_are_numbered_and_identical_bytes_return_the_same_version(db: Db, blobs: Blobs) {
    let app = spawn_app(db, blobs).await;
    app.register_base().await;
    let a1 = adapter(1, 4, &["q_proj", "v_proj"]);
    let res = app.push("support-bot", &a1).await;
    assert_eq!(res.status(), 201);
    let v1: Value = res.json().await.unwrap();
    assert_eq!(
        (v1["version"].as_u64(), v1["created"].as_bool()),
        (Some(1), Some(true))
    );
    assert!(v1["digest"].as_str().unwrap().starts_with("sha256:"));
    assert_eq!(v1["summary"]["r"], 4);
    assert_eq!(v1["summary"]["layers"], 2);
    assert_eq!(
        v1["summary"]["target_modules"],
        serde_json::json!(["q_proj", "v_proj"])
    );

    let res = app
        .push("support-bot", &adapter(2, 4, &["q_proj", "v_proj"]))
        .await;
    assert_eq!(res.status(), 201);
    let v2: Value = res.json().await.unwrap();
    assert_eq!(v2["version"], 2);
    assert_ne!(v1["digest"], v2["digest"]);

    // The same bytes as version 1: version 1 again, nothing new.
    let res = app.push("support-bot", &a1).await;
    assert_eq!(res.status(), 200);
    let again: Value = res.json().await.unwrap();
    assert_eq!(
        (again["version"].as_u64(), again["created"].as_bool()),
        (Some(1), Some(false))
    );
    assert_eq!(again["digest"], v1["digest"]);

    let list = app.get_json("/api/v1/adapters/support-bot/versions").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 2);
    let adapter = app.get_json("/api/v1/adapters/support-bot").await;
    assert_eq!(adapter["latest_version"], 2);
    assert_eq!(adapter["base_model"], "tiny-llama");
    // The re-push's blobs were deleted: only two uploads remain in the store.
    let uploads = loraops_registry::server::blobs::list_uploads(&app.state.store)
        .await
        .unwrap();
    assert_eq!(uploads.len(), 2, "{uploads:?}");
    app.cleanup().await;
}
backends!(
    versions_are_numbered_and_identical_bytes_return_the_same_version,
    s3
);

async fn concurrent_pushes_get_distinct_versions(db: Db, blobs: Blobs) {
    let app = spawn_app(db, blobs).await;
    app.register_base().await;
    let pushes = (0..6).map(|i| {
        let app = &app;
        async move { app.push("racer", &adapter(100 + i, 4, &["q_proj"])).await }
    });
    let results = futures_util::future::join_all(pushes).await;
    let mut versions = Vec::new();
    for r in results {
        assert_eq!(r.status(), 201);
        let v: Value = r.json().await.unwrap();
        versions.push(v["version"].as_u64().unwrap());
    }
    versions.sort();
    assert_eq!(versions, vec![1, 2, 3, 4, 5, 6]);
    let list = app.get_json("/api/v1/adapters/racer/versions").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 6);
    app.cleanup().await;
}
backends!(concurrent_pushes_get_distinct_versions, s3);

async fn concurrent_identical_pushes_make_one_version(db: Db, blobs: Blobs) {
    let app = spawn_app(db, blobs).await;
    app.register_base().await;
    let a = adapter(7, 4, &["q_proj", "k_proj"]);
    let pushes = (0..4).map(|_| app.push("twin", &a));
    let results = futures_util::future::join_all(pushes).await;
    let mut created = 0;
    for r in results {
        let status = r.status().as_u16();
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["version"], 1, "{v}");
        if status == 201 {
            created += 1;
        } else {
            assert_eq!(status, 200);
        }
    }
    assert_eq!(created, 1);
    let list = app.get_json("/api/v1/adapters/twin/versions").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    app.cleanup().await;
}
backends!(concurrent_identical_pushes_make_one_version);

async fn a_failed_push_leaves_nothing_behind(db: Db, blobs: Blobs) {
    let app = spawn_app(db, blobs).await;
    app.register_base().await;
    // Valid files, but the tensors disagree with r: rejected after the blobs were written.
    let mut bad = adapter(3, 4, &["q_proj"]);
    bad.config["r"] = serde_json::json!(8);
    let (status, err) = error_of(app.push("ghost", &bad).await).await;
    assert_eq!(status, 422);
    assert_eq!(err["code"], "invalid_adapter");
    // Not listed, not found, no blobs, no pending upload.
    let list = app.get_json("/api/v1/adapters").await;
    assert!(list["items"].as_array().unwrap().is_empty());
    assert_eq!(
        app.get("/api/v1/adapters/ghost", &app.viewer)
            .await
            .status(),
        404
    );
    assert!(
        loraops_registry::server::blobs::list_uploads(&app.state.store)
            .await
            .unwrap()
            .is_empty()
    );
    let report =
        loraops_registry::server::sweep::sweep_orphans(&app.state, std::time::Duration::ZERO)
            .await
            .unwrap();
    assert_eq!(report.uploads_removed, 0);
    app.cleanup().await;
}
backends!(a_failed_push_leaves_nothing_behind, s3);

async fn an_interrupted_upload_is_swept(db: Db, blobs: Blobs) {
    let app = spawn_app(db, blobs).await;
    app.register_base().await;
    let ok = app.push("keep", &adapter(1, 4, &["q_proj"])).await;
    assert_eq!(ok.status(), 201);

    // Simulate a registry that died mid-upload: a pending row and blobs, no version.
    use object_store::ObjectStoreExt;
    use sea_orm::{ActiveModelTrait, Set};
    let old = chrono::Utc::now() - chrono::Duration::hours(2);
    loraops_registry::server::entities::upload::ActiveModel {
        id: Set("dead-upload".into()),
        adapter: Set("keep".into()),
        started_at: Set(old),
    }
    .insert(&app.state.db)
    .await
    .unwrap();
    let key = loraops_registry::server::blobs::version_prefix("keep", "dead-upload")
        .join("adapter_model.safetensors");
    app.state
        .store
        .put(&key, vec![1u8; 1000].into())
        .await
        .unwrap();
    // And a stray directory no row knows about.
    let stray = loraops_registry::server::blobs::version_prefix("keep", "stray")
        .join("adapter_config.json");
    app.state
        .store
        .put(&stray, b"{}".to_vec().into())
        .await
        .unwrap();

    let report =
        loraops_registry::server::sweep::sweep_orphans(&app.state, std::time::Duration::ZERO)
            .await
            .unwrap();
    assert_eq!(report.uploads_removed, 1);
    assert_eq!(report.blobs_deleted, 2);
    let left = loraops_registry::server::blobs::list_uploads(&app.state.store)
        .await
        .unwrap();
    assert_eq!(
        left.len(),
        1,
        "only the published version's blobs remain: {left:?}"
    );
    // The published version still downloads.
    let res = app
        .get(
            "/api/v1/adapters/keep/versions/1/files/adapter_model.safetensors",
            &app.viewer,
        )
        .await;
    assert_eq!(res.status(), 200);
    app.cleanup().await;
}
backends!(an_interrupted_upload_is_swept, s3);

async fn oversize_uploads_are_rejected(db: Db, blobs: Blobs) {
    let app = spawn_with(db, blobs, |r| r.max_upload_bytes = 2000).await;
    app.register_base().await;
    let (status, err) = error_of(
        app.push("big", &adapter(1, 8, &["q_proj", "v_proj", "o_proj"]))
            .await,
    )
    .await;
    assert_eq!(status, 413);
    assert!(err["message"].as_str().unwrap().contains("2000"), "{err}");
    assert!(
        loraops_registry::server::blobs::list_uploads(&app.state.store)
            .await
            .unwrap()
            .is_empty()
    );
    app.cleanup().await;
}
backends!(oversize_uploads_are_rejected);

async fn lineage_from_the_manifest_is_kept(db: Db, blobs: Blobs) {
    let app = spawn_app(db, blobs).await;
    app.register_base().await;
    let mut a = adapter(5, 4, &["q_proj"]);
    a.manifest = Some(
        serde_json::json!({"format": "loraops.training/v1", "method": "sft", "datasets": [{"role": "train", "digest": "sha256:ab"}]}),
    );
    let res = app.push("lineage", &a).await;
    assert_eq!(res.status(), 201);
    let v = app.get_json("/api/v1/adapters/lineage/versions/1").await;
    assert_eq!(v["lineage"]["method"], "sft");
    assert_eq!(v["files"].as_array().unwrap().len(), 3);
    app.cleanup().await;
}
backends!(lineage_from_the_manifest_is_kept);

async fn a_client_that_disconnects_mid_upload_leaves_nothing(db: Db, blobs: Blobs) {
    use tokio::io::AsyncWriteExt;
    let app = spawn_app(db, blobs).await;
    app.register_base().await;
    let a = adapter(4, 8, &["q_proj", "k_proj", "v_proj", "o_proj"]);
    let weights = a.safetensors();
    let boundary = "loraopsboundary";
    let mut body = Vec::new();
    for (name, bytes) in [
        (
            "adapter_config.json",
            serde_json::to_vec(&a.config).unwrap(),
        ),
        ("adapter_model.safetensors", weights.clone()),
    ] {
        body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes());
        body.extend_from_slice(&bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    let port = app.address.rsplit(':').next().unwrap();
    let mut stream = tokio::net::TcpStream::connect(format!("127.0.0.1:{port}"))
        .await
        .unwrap();
    let head = format!(
        "POST /api/v1/adapters/cut/versions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {}\r\n\r\n",
        app.publisher,
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // Send the config and half of the weights, then vanish.
    let cut = body.len() - weights.len() / 2;
    stream.write_all(&body[..cut]).await.unwrap();
    stream.flush().await.unwrap();
    use sea_orm::{EntityTrait, PaginatorTrait};
    let pending = || async {
        loraops_registry::server::entities::upload::Entity::find()
            .count(&app.state.db)
            .await
            .unwrap()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while pending().await == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the upload never started"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    drop(stream);

    // The handler notices the broken body, deletes the upload's blobs and its pending row.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let pending = pending().await;
        let blobs = loraops_registry::server::blobs::list_uploads(&app.state.store)
            .await
            .unwrap();
        if pending == 0 && blobs.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "upload not cleaned up: {pending} pending rows, blobs {blobs:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        app.get_json("/api/v1/adapters").await["items"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    app.cleanup().await;
}
backends!(a_client_that_disconnects_mid_upload_leaves_nothing, s3);

/// A version whose blobs went missing (what a failed post-commit step used to leave behind) is
/// repaired by pushing the same bytes again, not answered with the broken version.
async fn a_version_with_missing_blobs_is_healed_by_a_repush(db: Db, blobs: Blobs) {
    let app = spawn_app(db, blobs).await;
    app.register_base().await;
    let adapter = adapter(7, 4, &["q_proj", "v_proj"]);
    assert_eq!(app.push("healme", &adapter).await.status(), 201);
    let file = "/api/v1/adapters/healme/versions/1/files/adapter_model.safetensors";

    // Lose the weights blob of version 1.
    use loraops_registry::server::entities::version_file;
    use object_store::ObjectStoreExt;
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
    let row = version_file::Entity::find()
        .filter(version_file::Column::Name.eq("adapter_model.safetensors"))
        .one(&app.state.db)
        .await
        .unwrap()
        .unwrap();
    app.state
        .store
        .delete(&object_store::path::Path::from(row.blob_key.as_str()))
        .await
        .unwrap();
    assert!(!app.get(file, &app.viewer).await.status().is_success());

    // The same bytes again: still version 1, and now it downloads byte-exact.
    let res = app.push("healme", &adapter).await;
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    assert_eq!(
        (v["version"].as_u64(), v["created"].as_bool()),
        (Some(1), Some(false))
    );
    let res = app.get(file, &app.viewer).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.bytes().await.unwrap().to_vec(), adapter.safetensors());
    let list = app.get_json("/api/v1/adapters/healme/versions").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);

    // The broken upload's remaining blobs are now orphans the sweep removes; the healed
    // version keeps working.
    loraops_registry::server::sweep::sweep_orphans(&app.state, std::time::Duration::ZERO)
        .await
        .unwrap();
    let res = app.get(file, &app.viewer).await;
    assert_eq!(res.status(), 200);
    let cfg = app
        .get(
            "/api/v1/adapters/healme/versions/1/files/adapter_config.json",
            &app.viewer,
        )
        .await;
    assert_eq!(cfg.status(), 200);
    app.cleanup().await;
}
backends!(a_version_with_missing_blobs_is_healed_by_a_repush, s3);

/// `registry.max_adapter_bytes`: a version that would take an adapter past its quota is
/// refused with 507 and leaves nothing; re-pushing a version it holds, and other adapters,
/// are not affected.
async fn a_push_past_the_adapters_quota_is_refused(db: Db, blobs: Blobs) {
    let first = adapter(11, 4, &["q_proj", "v_proj"]);
    let second = adapter(12, 4, &["q_proj", "v_proj"]);
    let weights = first.safetensors().len() as u64;
    // Room for one version (its weights and small JSON files), not two.
    let app = spawn_with(db, blobs, |r| r.max_adapter_bytes = weights * 3 / 2).await;
    app.register_base().await;
    assert_eq!(app.push("quota", &first).await.status(), 201);
    let res = app.push("quota", &second).await;
    assert_eq!(res.status(), 507);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "quota_exceeded", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_adapter_bytes"),
        "{body}"
    );
    let list = app.get_json("/api/v1/adapters/quota/versions").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1, "{list}");
    // The same bytes again are the version it has: not counted twice.
    assert_eq!(app.push("quota", &first).await.status(), 200);
    // The quota is per adapter.
    assert_eq!(app.push("other", &second).await.status(), 201);
    // The refused upload's blobs are gone (or left to the sweep, which finds nothing to keep).
    loraops_registry::server::sweep::sweep_orphans(&app.state, std::time::Duration::ZERO)
        .await
        .unwrap();
    let res = app
        .get(
            "/api/v1/adapters/quota/versions/1/files/adapter_model.safetensors",
            &app.viewer,
        )
        .await;
    assert_eq!(res.bytes().await.unwrap().to_vec(), first.safetensors());
    app.cleanup().await;
}
backends!(a_push_past_the_adapters_quota_is_refused);
