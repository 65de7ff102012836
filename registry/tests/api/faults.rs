//! Faults: slow clients against the sweep, a registry that accepts connections but never
//! answers, the database and the object store failing under a push.

use std::time::{Duration, Instant};

use crate::backends;
use crate::helpers::{Adapter, Blobs, Db, adapter, spawn_with};

/// The multipart body of a push (config first, then weights), and its boundary.
pub fn multipart_body(a: &Adapter) -> (String, Vec<u8>) {
    let boundary = "loraopsboundary".to_string();
    let mut body = Vec::new();
    for (name, bytes) in [
        (
            "adapter_config.json",
            serde_json::to_vec(&a.config).unwrap(),
        ),
        ("adapter_model.safetensors", a.safetensors()),
    ] {
        body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes());
        body.extend_from_slice(&bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (boundary, body)
}

/// A push that streams for longer than the orphan grace period while the sweep runs: the
/// upload stays alive (its row is touched as bytes arrive) and the version is whole.
async fn a_slow_push_outlives_the_sweep(db: Db, blobs: Blobs) {
    let app = spawn_with(db, blobs, |r| r.orphan_grace_secs = 1).await;
    app.register_base().await;
    let a = adapter(11, 8, &["q_proj", "k_proj", "v_proj", "o_proj"]);
    let (boundary, body) = multipart_body(&a);
    // The config arrives at once; the weights trickle in over ~3 s.
    let split = body.len() - a.safetensors().len();
    let mut chunks = vec![body[..split].to_vec()];
    chunks.extend(
        body[split..]
            .chunks(body[split..].len() / 30 + 1)
            .map(<[u8]>::to_vec),
    );
    let stream = futures_util::stream::unfold(chunks.into_iter(), |mut it| async move {
        let c = it.next()?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        Some((Ok::<_, std::io::Error>(c), it))
    });
    let push = app
        .http
        .post(app.url("/api/v1/adapters/slow/versions"))
        .bearer_auth(&app.publisher)
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(reqwest::Body::wrap_stream(stream))
        .send();
    let sweeping = async {
        let until = Instant::now() + Duration::from_secs(4);
        while Instant::now() < until {
            loraops_registry::server::sweep::sweep_orphans(&app.state, Duration::from_secs(1))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let (res, ()) = tokio::join!(push, sweeping);
    let res = res.unwrap();
    assert_eq!(res.status(), 201, "{}", res.text().await.unwrap());
    for (file, bytes) in [
        (
            "adapter_config.json",
            serde_json::to_vec(&a.config).unwrap(),
        ),
        ("adapter_model.safetensors", a.safetensors()),
    ] {
        let got = app
            .get(
                &format!("/api/v1/adapters/slow/versions/1/files/{file}"),
                &app.viewer,
            )
            .await;
        assert_eq!(got.status(), 200, "{file}");
        assert_eq!(got.bytes().await.unwrap().to_vec(), bytes, "{file}");
    }
    app.cleanup().await;
}
backends!(a_slow_push_outlives_the_sweep, s3);

/// An upload the sweep already took never becomes a version.
async fn a_swept_upload_is_refused_at_publish(db: Db, blobs: Blobs) {
    let app = spawn_with(db, blobs, |r| r.orphan_grace_secs = 3600).await;
    app.register_base().await;
    let a = adapter(12, 4, &["q_proj"]);
    let (boundary, body) = multipart_body(&a);
    let split = body.len() - 64;
    let (head, tail) = (body[..split].to_vec(), body[split..].to_vec());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let stream = futures_util::stream::unfold(
        (Some(head), Some(tail), Some(rx)),
        |(h, t, rx)| async move {
            if let Some(h) = h {
                return Some((Ok::<_, std::io::Error>(h), (None, t, rx)));
            }
            let t = t?;
            rx.unwrap().await.ok();
            Some((Ok(t), (None, None, None)))
        },
    );
    let push = tokio::spawn(
        app.http
            .post(app.url("/api/v1/adapters/swept/versions"))
            .bearer_auth(&app.publisher)
            .header(
                "content-type",
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(reqwest::Body::wrap_stream(stream))
            .send(),
    );
    // Once the upload is pending, the sweep (grace 0) takes it; then the rest arrives.
    use sea_orm::{EntityTrait, PaginatorTrait};
    let deadline = Instant::now() + Duration::from_secs(10);
    while loraops_registry::server::entities::upload::Entity::find()
        .count(&app.state.db)
        .await
        .unwrap()
        == 0
    {
        assert!(Instant::now() < deadline, "the upload never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let report = loraops_registry::server::sweep::sweep_orphans(&app.state, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(report.uploads_removed, 1);
    tx.send(()).unwrap();
    let res = push.await.unwrap().unwrap();
    assert_eq!(res.status(), 409, "{}", res.text().await.unwrap());
    let list = app.get_json("/api/v1/adapters").await;
    assert!(list["items"].as_array().unwrap().is_empty(), "{list}");
    app.cleanup().await;
}
backends!(a_swept_upload_is_refused_at_publish);

/// A registry that accepts connections and never answers: every client call fails within its
/// timeout instead of hanging (a gateway would otherwise stop following routing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_calls_time_out_against_a_silent_registry() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    // Accept and hold every connection, reading nothing back.
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    use loraops_registry::client::{RegistryClient, Timeouts};
    let client = RegistryClient::with_timeouts(
        &url,
        Some("t".into()),
        Timeouts {
            connect: Duration::from_secs(1),
            request: Duration::from_secs(1),
            idle: Duration::from_secs(1),
        },
    );
    let t = Instant::now();
    assert!(client.routing(None, 0).await.is_err());
    assert!(client.adapters().await.is_err());
    // A long-poll may take its wait, and not much more.
    assert!(client.routing(Some(0), 1).await.is_err());
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
}

/// A kept-alive connection that the registry timed out before its first request (actix
/// answers 408 after 5 s and closes): the client sends the call again on a new connection,
/// and the registry carries it out once, even a POST.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_answered_408_on_a_timed_out_connection_is_sent_again() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = crate::helpers::spawn_app(Db::Sqlite, Blobs::Local).await;
    let registry = app.address.trim_start_matches("http://").to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = connections.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            if seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                // What actix writes when its request timer fires on an idle connection.
                let mut buf = [0u8; 4096];
                let _ = client.read(&mut buf).await;
                let _ = client
                    .write_all(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
                continue;
            }
            let mut server = tokio::net::TcpStream::connect(&registry).await.unwrap();
            tokio::spawn(async move {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    });
    let client = loraops_registry::client::RegistryClient::new(&url, Some(app.admin.clone()));
    let base: loraops_registry::api::NewBaseModel =
        serde_json::from_value(serde_json::json!({"name": "retried"})).unwrap();
    let made = client.create_base_model(&base).await.expect("sent again");
    assert_eq!(made.name.as_str(), "retried");
    assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 2);
    let all = client.base_models().await.unwrap();
    assert_eq!(
        all.iter().filter(|b| b.name.as_str() == "retried").count(),
        1
    );
    app.cleanup().await;
}

/// A registry that answers the headers of a download and then goes silent: the download
/// fails after the idle timeout and leaves no partial file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_download_fails_and_leaves_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nabc")
                .await;
            held.push(s);
        }
    });
    use loraops_registry::client::{RegistryClient, Timeouts};
    let client = RegistryClient::with_timeouts(
        &url,
        None,
        Timeouts {
            connect: Duration::from_secs(1),
            request: Duration::from_secs(1),
            idle: Duration::from_secs(1),
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("w.safetensors");
    let file = loraops_registry::api::VersionFile {
        name: "adapter_model.safetensors".into(),
        sha256: "00".into(),
        size: 1000,
    };
    let t = Instant::now();
    let err = client
        .download_file(
            "a",
            1,
            &file,
            &dest,
            loraops_registry::client::no_progress(),
        )
        .await
        .expect_err("stalled");
    assert!(err.to_string().contains("stalled"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// One caller holds only a few routing long-polls at once; the rest are refused at once
/// instead of each polling the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_long_polls_are_capped_per_caller() {
    let app = spawn_with(Db::Sqlite, Blobs::Local, |r| {
        r.max_routing_waiters_per_caller = 2
    })
    .await;
    let rev = app.get_json("/api/v1/routing").await["revision"]
        .as_i64()
        .unwrap();
    let poll = || {
        app.http
            .get(app.url(&format!("/api/v1/routing?since={rev}&wait=2")))
            .bearer_auth(&app.viewer)
            .send()
    };
    let (a, b) = (tokio::spawn(poll()), tokio::spawn(poll()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    let third = poll().await.unwrap();
    assert_eq!(third.status(), 429);
    assert!(t.elapsed() < Duration::from_secs(1));
    // Another caller is not affected.
    let other = app
        .http
        .get(app.url(&format!("/api/v1/routing?since={rev}&wait=1")))
        .bearer_auth(app.gateway_other())
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 200);
    assert_eq!(a.await.unwrap().unwrap().status(), 200);
    assert_eq!(b.await.unwrap().unwrap().status(), 200);
    // Their places are given back.
    let again = app
        .http
        .get(app.url(&format!("/api/v1/routing?since={rev}&wait=0")))
        .bearer_auth(&app.viewer)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
}

/// Every version a client was told about downloads byte-exact, and nothing else is listed.
async fn audit(app: &crate::helpers::TestApp, acknowledged: &[(u64, Adapter)], name: &str) {
    let list = app
        .get_json(&format!("/api/v1/adapters/{name}/versions?limit=100"))
        .await;
    let visible: Vec<u64> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_u64().unwrap())
        .collect();
    for (v, a) in acknowledged {
        assert!(
            visible.contains(v),
            "acknowledged version {v} is not listed: {visible:?}"
        );
        let got = app
            .get(
                &format!("/api/v1/adapters/{name}/versions/{v}/files/adapter_model.safetensors"),
                &app.viewer,
            )
            .await;
        assert_eq!(got.status(), 200, "version {v}");
        assert_eq!(
            got.bytes().await.unwrap().to_vec(),
            a.safetensors(),
            "version {v}"
        );
    }
    // Every listed version is whole, acknowledged or not (a commit whose answer was lost).
    for v in visible {
        for file in ["adapter_config.json", "adapter_model.safetensors"] {
            let got = app
                .get(
                    &format!("/api/v1/adapters/{name}/versions/{v}/files/{file}"),
                    &app.viewer,
                )
                .await;
            assert_eq!(got.status(), 200, "listed version {v} lacks {file}");
        }
    }
}

/// PostgreSQL connections killed again and again while pushes commit: a push either answers
/// with a whole version or fails; no listed version lacks a blob; a retry of a failed push
/// succeeds.
async fn database_connections_dropped_during_pushes(db: Db, blobs: Blobs) {
    use sea_orm::ConnectionTrait;
    let app = spawn_with(db, blobs, |r| r.max_db_connections = 4).await;
    app.register_base().await;
    let url = crate::helpers::admin_postgres_url();
    let admin = sea_orm::Database::connect(url.as_str()).await.unwrap();
    let target = app.pg_database().unwrap().to_string();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let killer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = admin
                    .execute_unprepared(&format!(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                         WHERE datname = '{target}' AND pid <> pg_backend_pid()"
                    ))
                    .await;
                tokio::time::sleep(Duration::from_millis(37)).await;
            }
        })
    };
    let mut acknowledged = Vec::new();
    let mut failed = Vec::new();
    for seed in 0..24u32 {
        let a = adapter(500 + seed, 4, &["q_proj", "v_proj"]);
        let res = app.push("flaky", &a).await;
        if res.status().is_success() {
            let v: serde_json::Value = res.json().await.unwrap();
            acknowledged.push((v["version"].as_u64().unwrap(), a));
        } else {
            assert!(
                res.status().is_server_error() || res.status() == 409,
                "{}",
                res.status()
            );
            failed.push(a);
        }
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    killer.await.unwrap();
    // Retries of the failed pushes succeed (created now, or found already committed).
    for a in failed {
        let mut res = app.push("flaky", &a).await;
        for _ in 0..5 {
            if res.status().is_success() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            res = app.push("flaky", &a).await;
        }
        assert!(res.status().is_success(), "retry: {}", res.status());
        let v: serde_json::Value = res.json().await.unwrap();
        acknowledged.push((v["version"].as_u64().unwrap(), a));
    }
    audit(&app, &acknowledged, "flaky").await;
    app.cleanup().await;
}

mod database_connections_dropped_during_pushes {
    use crate::helpers::{Blobs, Db};
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_local() {
        super::database_connections_dropped_during_pushes(Db::Postgres, Blobs::Local).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_s3() {
        super::database_connections_dropped_during_pushes(Db::Postgres, Blobs::S3).await
    }
}

/// A TCP proxy in front of the S3 server that can be cut: every connection is dropped while
/// it is down.
struct Cut {
    addr: String,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

async fn cuttable_proxy(upstream: &str) -> Cut {
    use std::sync::atomic::Ordering;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let down = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let upstream = upstream.trim_start_matches("http://").to_string();
    let flag = down.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let upstream = upstream.clone();
            let flag = flag.clone();
            tokio::spawn(async move {
                if flag.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                let copy = tokio::io::copy_bidirectional(&mut client, &mut server);
                tokio::pin!(copy);
                loop {
                    tokio::select! {
                        _ = &mut copy => return,
                        _ = tokio::time::sleep(Duration::from_millis(20)) => {
                            if flag.load(Ordering::SeqCst) {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    Cut { addr, down }
}

/// The object store failing mid-upload and mid-download: the push fails and leaves nothing
/// visible (the sweep removes what the store kept), a download fails rather than delivering
/// wrong bytes, and both work again once the store is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_object_store_failing_mid_upload_and_mid_download() {
    use std::sync::atomic::Ordering;
    let endpoint = std::env::var("LORAOPS_TEST_S3_ENDPOINT")
        .expect("LORAOPS_TEST_S3_ENDPOINT: run with scripts/test");
    let proxy = cuttable_proxy(&endpoint).await;
    let proxied = format!("http://{}", proxy.addr);
    let app = crate::helpers::spawn_s3_via(Db::Postgres, &proxied).await;
    app.register_base().await;
    // ~12 MB of weights (more than one multipart part), sent slowly so the store fails while
    // the upload is in progress.
    let big = adapter(
        600,
        1536,
        &[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
    );
    let (boundary, body) = multipart_body(&big);
    let chunks: Vec<Vec<u8>> = body
        .chunks(body.len() / 40 + 1)
        .map(<[u8]>::to_vec)
        .collect();
    let stream = futures_util::stream::unfold(chunks.into_iter(), |mut it| async move {
        let c = it.next()?;
        tokio::time::sleep(Duration::from_millis(50)).await;
        Some((Ok::<_, std::io::Error>(c), it))
    });
    let pushing = tokio::spawn(
        app.http
            .post(app.url("/api/v1/adapters/big/versions"))
            .bearer_auth(&app.publisher)
            .header(
                "content-type",
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(reqwest::Body::wrap_stream(stream))
            .send(),
    );
    // The store goes away for 2 s while the upload is in progress (the first multipart part
    // is out), then comes back: object_store retries, or the push fails. Either way nothing
    // half-written becomes visible.
    tokio::time::sleep(Duration::from_millis(1700)).await;
    proxy.down.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.down.store(false, Ordering::SeqCst);
    let res = pushing.await.unwrap().unwrap();
    let weights = big.safetensors();
    if res.status().is_success() {
        let got = app
            .get(
                "/api/v1/adapters/big/versions/1/files/adapter_model.safetensors",
                &app.viewer,
            )
            .await;
        assert_eq!(got.bytes().await.unwrap().to_vec(), weights);
    } else {
        assert!(res.status().is_server_error(), "{}", res.status());
        let list = app.get_json("/api/v1/adapters").await;
        assert!(list["items"].as_array().unwrap().is_empty(), "{list}");
        let res = app.push("big", &big).await;
        assert_eq!(res.status(), 201);
    }
    // The sweep leaves exactly the published upload.
    loraops_registry::server::sweep::sweep_orphans(&app.state, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(
        loraops_registry::server::blobs::list_uploads(&app.state.store)
            .await
            .unwrap()
            .len(),
        1
    );

    // Mid-download: the store goes away for 2 s; what arrives is the file or a prefix of it,
    // never other bytes, and the verified pull ends with the exact file.
    let res = app
        .get(
            "/api/v1/adapters/big/versions/1/files/adapter_model.safetensors",
            &app.viewer,
        )
        .await;
    assert_eq!(res.status(), 200);
    let mut stream = res.bytes_stream();
    use futures_util::StreamExt;
    let mut got = Vec::new();
    if let Some(Ok(first)) = stream.next().await {
        got.extend_from_slice(&first);
    }
    proxy.down.store(true, Ordering::SeqCst);
    let restore = {
        let down = proxy.down.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            down.store(false, Ordering::SeqCst);
        })
    };
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => got.extend_from_slice(&c),
            Err(_) => break,
        }
    }
    restore.await.unwrap();
    assert!(got.len() <= weights.len());
    assert_eq!(
        &weights[..got.len()],
        &got[..],
        "a prefix of the file, nothing else"
    );
    let dir = tempfile::tempdir().unwrap();
    let client =
        loraops_registry::client::RegistryClient::new(&app.address, Some(app.viewer.clone()));
    client
        .pull(
            "big",
            1,
            dir.path(),
            loraops_registry::client::no_progress(),
        )
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("adapter_model.safetensors")).unwrap(),
        weights
    );
    app.cleanup().await;
}
