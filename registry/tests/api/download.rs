//! Downloads: streamed, ETag = sha256, conditional and range requests.

use sha2::{Digest, Sha256};

use crate::backends;
use crate::helpers::{Blobs, Db, adapter, error_of, spawn_app};

async fn downloads_stream_with_etag_and_ranges(db: Db, blobs: Blobs) {
    let app = spawn_app(db, blobs).await;
    app.register_base().await;
    let a = adapter(9, 8, &["q_proj", "k_proj", "v_proj", "o_proj"]);
    let bytes = a.safetensors();
    assert_eq!(app.push("dl", &a).await.status(), 201);
    let path = "/api/v1/adapters/dl/versions/1/files/adapter_model.safetensors";
    let sha = hex::encode(Sha256::digest(&bytes));

    let res = app.get(path, &app.viewer).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["etag"], format!("\"{sha}\"").as_str());
    assert_eq!(res.headers()["accept-ranges"], "bytes");
    assert_eq!(res.bytes().await.unwrap().as_ref(), bytes.as_slice());

    // Conditional GET.
    let res = app
        .http
        .get(app.url(path))
        .bearer_auth(&app.viewer)
        .header("If-None-Match", format!("\"{sha}\""))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 304);

    // Ranges: a middle slice, a suffix, an open end.
    let n = bytes.len();
    for (range, want) in [
        ("bytes=10-99".to_string(), &bytes[10..100]),
        ("bytes=-16".to_string(), &bytes[n - 16..]),
        (format!("bytes={}-", n - 5), &bytes[n - 5..]),
    ] {
        let res = app
            .http
            .get(app.url(path))
            .bearer_auth(&app.viewer)
            .header("Range", &range)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 206, "{range}");
        assert!(
            res.headers()["content-range"]
                .to_str()
                .unwrap()
                .ends_with(&format!("/{n}"))
        );
        assert_eq!(res.bytes().await.unwrap().as_ref(), want, "{range}");
    }
    let res = app
        .http
        .get(app.url(path))
        .bearer_auth(&app.viewer)
        .header("Range", format!("bytes={n}-"))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(res).await.0, 416);

    // Unknown version / file / adapter.
    for p in [
        "/api/v1/adapters/dl/versions/2/files/adapter_model.safetensors",
        "/api/v1/adapters/dl/versions/1/files/nope.bin",
        "/api/v1/adapters/nope/versions/1/files/adapter_model.safetensors",
        "/api/v1/adapters/dl/versions/2",
    ] {
        assert_eq!(error_of(app.get(p, &app.viewer).await).await.0, 404, "{p}");
    }
    assert_eq!(
        error_of(
            app.get("/api/v1/adapters/dl/versions/zero", &app.viewer)
                .await
        )
        .await
        .0,
        400
    );
    app.cleanup().await;
}
backends!(downloads_stream_with_etag_and_ranges, s3);

async fn the_client_pulls_and_verifies(db: Db, blobs: Blobs) {
    let app = spawn_app(db, blobs).await;
    app.register_base().await;
    let a = adapter(11, 4, &["gate_proj", "up_proj", "down_proj"]);
    let dir = tempfile::tempdir().unwrap();
    for (n, b) in a.files() {
        std::fs::write(dir.path().join(n), b).unwrap();
    }
    let client =
        loraops_registry::client::RegistryClient::new(&app.address, Some(app.publisher.clone()));
    let pushed = client
        .push_dir(
            dir.path(),
            "mlp-only",
            None,
            loraops_registry::client::no_progress(),
        )
        .await
        .unwrap();
    assert!(pushed.created);
    assert_eq!(
        pushed.version.summary.target_modules,
        vec!["down_proj", "gate_proj", "up_proj"]
    );
    let out = tempfile::tempdir().unwrap();
    let v = client
        .pull(
            "mlp-only",
            1,
            out.path(),
            loraops_registry::client::no_progress(),
        )
        .await
        .unwrap();
    assert_eq!(v.digest, pushed.version.digest);
    for (n, b) in a.files() {
        assert_eq!(std::fs::read(out.path().join(&n)).unwrap(), b, "{n}");
    }
    // A version whose recorded sha256 disagrees with the bytes is refused and not written.
    let mut f = v.files[0].clone();
    f.sha256 = "0".repeat(64);
    let dest = out.path().join("tampered");
    let err = client
        .download_file(
            "mlp-only",
            1,
            &f,
            &dest,
            loraops_registry::client::no_progress(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, loraops_registry::client::ClientError::Integrity { .. }),
        "{err}"
    );
    assert!(!dest.exists());
    app.cleanup().await;
}
backends!(the_client_pulls_and_verifies, s3);
