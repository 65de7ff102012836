//! Webhooks: events are delivered to a real HTTP receiver, signed (HMAC-SHA256 over
//! `TIMESTAMP.BODY`), retried with the same delivery id while the receiver fails, resumed by a
//! restarted registry, and only for what was committed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use hmac::{Hmac, Mac};
use loraops_registry::server::settings::WebhookSettings;
use serde_json::{Value, json};
use sha2::Sha256;

use crate::backends;
use crate::helpers::{Blobs, Db, adapter, spawn_with};

const SECRET: &str = "whsec-loraops-test";

#[derive(Debug, Clone)]
struct Received {
    event: String,
    delivery: String,
    timestamp: String,
    signature: String,
    body: Vec<u8>,
    answered: u16,
}

#[derive(Clone, Default)]
struct Receiver {
    seen: Arc<Mutex<Vec<Received>>>,
    failing: Arc<AtomicBool>,
}

async fn receive(req: HttpRequest, body: web::Bytes, rx: web::Data<Receiver>) -> HttpResponse {
    let h = |k: &str| {
        req.headers()
            .get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let answered = if rx.failing.load(Ordering::SeqCst) {
        503
    } else {
        200
    };
    rx.seen.lock().unwrap().push(Received {
        event: h("x-loraops-event"),
        delivery: h("x-loraops-delivery"),
        timestamp: h("x-loraops-timestamp"),
        signature: h("x-loraops-signature"),
        body: body.to_vec(),
        answered,
    });
    HttpResponse::build(actix_web::http::StatusCode::from_u16(answered).unwrap()).finish()
}

/// A receiver on a free port; returns its URL.
fn spawn_receiver(rx: Receiver) -> String {
    let data = web::Data::new(rx);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .route("/hook", web::post().to(receive))
    })
    .workers(1)
    .bind("127.0.0.1:0")
    .unwrap();
    let port = server.addrs()[0].port();
    tokio::spawn(server.run());
    format!("http://127.0.0.1:{port}/hook")
}

fn verified(r: &Received) -> bool {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{}.", r.timestamp).as_bytes());
    mac.update(&r.body);
    r.signature == format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

async fn wait_for(rx: &Receiver, what: &str, done: impl Fn(&[Received]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if done(&rx.seen.lock().unwrap()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {:?}",
            rx.seen
                .lock()
                .unwrap()
                .iter()
                .map(|r| (&r.event, r.answered))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn webhooks_are_signed_retried_and_survive_restarts(db: Db, blobs: Blobs) {
    let rx = Receiver::default();
    rx.failing.store(true, Ordering::SeqCst);
    let url = spawn_receiver(rx.clone());
    let app = spawn_with(db, blobs, |r| {
        r.controller_tick_ms = 50;
        r.webhook_retry_base_ms = 50;
        r.webhook_timeout_secs = 2;
        r.webhooks = vec![WebhookSettings {
            url: url.clone(),
            secret: Some(SECRET.into()),
            secret_env: None,
            events: vec![
                "version.created".into(),
                "evidence.created".into(),
                "rollout.*".into(),
            ],
        }];
    })
    .await;
    app.register_base().await;

    // A refused push makes no event; an accepted one does, retried while the receiver fails.
    let mut bad = adapter(1, 4, &["q_proj"]);
    bad.config["peft_type"] = json!("IA3");
    assert_eq!(app.push("hooked", &bad).await.status(), 422);
    let res = app.push("hooked", &adapter(1, 4, &["q_proj"])).await;
    assert_eq!(res.status(), 201);
    let pushed: Value = res.json().await.unwrap();
    wait_for(&rx, "two failed attempts", |s| s.len() >= 2).await;

    // A replacement replica resumes the pending delivery from the database.
    let app = app.restart().await;
    rx.failing.store(false, Ordering::SeqCst);
    let suite = app.suite("smoke", "1", 10).await;
    let res = app
        .post_json(
            "/api/v1/adapters/hooked/versions/1/evidence",
            &app.evaluator,
            &json!({
                "adapter_digest": pushed["digest"], "suite": {"name": "smoke", "digest": suite},
                "engine": {"engine": "mistral.rs", "engine_version": "0.8.1", "decoding": {}},
                "metrics": {"pass_rate": 1.0}, "cases": 10,
                "started_at": "2026-11-28T00:00:00Z", "finished_at": "2026-11-28T00:01:00Z"
            }),
        )
        .await;
    assert_eq!(res.status(), 201);
    let res = app
        .post_json(
            "/api/v1/adapters/hooked/rollouts",
            &app.deployer,
            &json!({"version": 1}),
        )
        .await;
    assert_eq!(res.status(), 201, "{}", res.text().await.unwrap());
    let res = app
        .post_json(
            "/api/v1/adapters/hooked/rollouts/current/abort",
            &app.deployer,
            &json!({}),
        )
        .await;
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());

    let wanted = [
        "version.created",
        "evidence.created",
        "rollout.start",
        "rollout.abort",
    ];
    wait_for(&rx, "every event delivered", |s| {
        wanted
            .iter()
            .all(|w| s.iter().any(|r| r.event == *w && r.answered == 200))
    })
    .await;
    // Let any stray duplicate arrive before counting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = rx.seen.lock().unwrap().clone();
    let ok: Vec<&Received> = seen.iter().filter(|r| r.answered == 200).collect();
    let mut delivered: Vec<&str> = ok.iter().map(|r| r.event.as_str()).collect();
    delivered.sort();
    let mut expected = wanted.to_vec();
    expected.sort();
    assert_eq!(delivered, expected, "each event delivered once");
    let find = |event: &str| *ok.iter().find(|r| r.event == event).unwrap();
    for r in &seen {
        assert!(verified(r), "bad signature on {}", r.event);
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["type"], r.event.as_str());
        assert_eq!(body["id"], r.delivery.as_str());
    }
    // Every failed attempt was the version event, retried under one delivery id.
    let created = find("version.created");
    let failed: Vec<&Received> = seen.iter().filter(|r| r.answered != 200).collect();
    assert!(failed.len() >= 2);
    assert!(failed.iter().all(|r| r.delivery == created.delivery));
    let body: Value = serde_json::from_slice(&created.body).unwrap();
    assert_eq!(body["data"]["adapter"], "hooked");
    assert_eq!(body["data"]["version"], 1);
    assert_eq!(body["data"]["digest"], pushed["digest"]);
    let abort: Value = serde_json::from_slice(&find("rollout.abort").body).unwrap();
    assert_eq!(abort["data"]["adapter"], "hooked");
    assert_eq!(abort["data"]["to"], "aborted");
    assert_eq!(abort["data"]["actor"], "tester");

    // A tampered body fails verification.
    let mut forged = created.clone();
    forged.body = br#"{"type":"version.created","data":{"adapter":"evil"}}"#.to_vec();
    assert!(!verified(&forged));

    let metrics = app.metrics().await;
    assert!(
        metrics.contains("loraops_registry_webhook_deliveries_total{result=\"delivered\"} 4"),
        "{metrics}"
    );
    app.cleanup().await;
}
backends!(webhooks_are_signed_retried_and_survive_restarts);

/// A dead endpoint (accepts connections, never answers) delays only its own events; an
/// endpoint that redirects gets no delivery elsewhere; delivered rows are pruned after their
/// retention.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_are_isolated_redirects_refused_and_rows_pruned() {
    let rx = Receiver::default();
    let healthy = spawn_receiver(rx.clone());
    // Blackhole: accepts and holds connections.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = format!("http://{}/hook", hole.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hole.accept().await {
            held.push(s);
        }
    });
    // Redirects every POST to the healthy receiver.
    let redirect_to = healthy.clone();
    let server = HttpServer::new(move || {
        let to = redirect_to.clone();
        App::new().route(
            "/hook",
            web::post().to(move || {
                let to = to.clone();
                async move {
                    HttpResponse::TemporaryRedirect()
                        .insert_header(("location", to))
                        .finish()
                }
            }),
        )
    })
    .workers(1)
    .bind("127.0.0.1:0")
    .unwrap();
    let bouncer = format!("http://127.0.0.1:{}/hook", server.addrs()[0].port());
    tokio::spawn(server.run());
    let hook = |url: &str, events: &[&str]| WebhookSettings {
        url: url.into(),
        secret: Some(SECRET.into()),
        secret_env: None,
        events: events.iter().map(|e| e.to_string()).collect(),
    };
    let app = spawn_with(Db::Sqlite, Blobs::Local, |r| {
        r.webhook_timeout_secs = 5;
        r.webhook_retry_base_ms = 60_000;
        r.webhooks = vec![
            hook(&dead, &["version.created"]),
            hook(&bouncer, &["version.created"]),
            hook(&healthy, &["version.created"]),
        ];
    })
    .await;
    app.register_base().await;
    let t = Instant::now();
    for i in 0..4 {
        assert_eq!(
            app.push(&format!("iso-{i}"), &adapter(40 + i, 4, &["q_proj"]))
                .await
                .status(),
            201
        );
    }
    wait_for(&rx, "four deliveries to the healthy endpoint", |s| {
        s.len() >= 4
    })
    .await;
    // Behind a dead endpoint with a 5 s timeout, four events would take 20 s in one queue.
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    // Give the bouncer time to be tried: nothing arrives through its redirect.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rx.seen.lock().unwrap().len(), 4);

    use loraops_registry::server::entities::webhook_delivery;
    use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
    let delivered = || async {
        webhook_delivery::Entity::find()
            .filter(webhook_delivery::Column::DeliveredAt.is_not_null())
            .count(&app.state.db)
            .await
            .unwrap()
    };
    assert_eq!(delivered().await, 4);
    // Retention 0 h would be refused; prune as the sweep does with a cutoff in the future.
    let gone = loraops_registry::server::webhooks::prune(
        &app.state.db,
        chrono::Utc::now() + chrono::Duration::hours(1),
    )
    .await
    .unwrap();
    assert!(gone >= 4, "{gone}");
    assert_eq!(delivered().await, 0);
}
