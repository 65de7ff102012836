//! `/healthz` (the process answers), `/readyz` (database and object store reachable),
//! `/metrics` (Prometheus text format).

use std::collections::BTreeMap;

use actix_web::{HttpResponse, web};
use object_store::ObjectStoreExt;
use sea_orm::ConnectionTrait;

use crate::api::Readiness;
use crate::server::AppState;

pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

#[utoipa::path(get, path = "/readyz", responses((status = 200, body = Readiness), (status = 503, body = Readiness)))]
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let mut checks = BTreeMap::new();
    let db = state.db.execute_unprepared("SELECT 1").await;
    checks.insert(
        "database".to_string(),
        db.as_ref()
            .map(|_| "ok".to_string())
            .unwrap_or_else(|e| e.to_string()),
    );
    // A missing probe object is fine: it proves the store answered.
    let probe = state
        .store
        .head(&object_store::path::Path::from("readyz-probe"))
        .await;
    let store = match probe {
        Ok(_) | Err(object_store::Error::NotFound { .. }) => "ok".to_string(),
        Err(e) => e.to_string(),
    };
    checks.insert("object_store".to_string(), store);
    // Background loops: each reports "ok" or how long it has been silent. A stopped rollout
    // controller makes the replica unready (it can neither advance nor roll back); a stalled
    // sweep or webhook loop is reported but does not take the API out of service.
    let background = state.supervisor.checks();
    let ready = checks.values().all(|v| v == "ok")
        && background
            .get(crate::server::rollouts::CONTROLLER_TASK)
            .is_none_or(|v| v == "ok");
    checks.extend(background);
    let body = Readiness { ready, checks };
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render())
}
