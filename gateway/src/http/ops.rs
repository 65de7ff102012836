//! `/v1/models` and the operations endpoints.

use actix_web::{HttpRequest, HttpResponse, web};
use loraops_registry::api::Readiness;

use super::{AppState, auth};
use crate::error::ApiError;
use crate::openai::{ModelCard, ModelList};
use crate::pool::EngineKey;

/// The base model, every routed adapter by name, and each routed version pinned (`NAME@V`).
pub async fn models(
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let p = auth::caller(&state, &req)?;
    let created = state.started;
    let card = |id: String, owned_by: &str| ModelCard {
        id,
        object: "model",
        created,
        owned_by: owned_by.to_string(),
    };
    let mut data = vec![card(state.router.base_name().to_string(), "loraops")];
    for r in &state.router.table().routes {
        if p.as_ref().is_some_and(|p| !p.may_touch(r.adapter.as_str())) {
            continue;
        }
        data.push(card(r.adapter.to_string(), r.base_model.as_str()));
        for v in [&r.stable, &r.canary].into_iter().flatten() {
            data.push(card(
                format!("{}@{}", r.adapter, v.version),
                r.base_model.as_str(),
            ));
        }
    }
    Ok(HttpResponse::Ok().json(ModelList {
        object: "list",
        data,
    }))
}

pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

/// Ready once the base engine is loaded. An unreachable registry does not make the gateway
/// unready (it keeps serving the last table) but is reported in the checks.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let mut checks = std::collections::BTreeMap::new();
    let base = state.pool.is_loaded(&EngineKey::Base);
    checks.insert(
        "base_engine".to_string(),
        if base { "loaded" } else { "not loaded" }.to_string(),
    );
    let loaded: Vec<String> = state.pool.loaded().iter().map(|k| k.to_string()).collect();
    checks.insert("engines".to_string(), loaded.join(", "));
    let registry = match &state.feed {
        Some(s) => s.lock().expect("feed lock").describe(),
        None => "not configured (base model only)".to_string(),
    };
    checks.insert("registry".to_string(), registry);
    let body = Readiness {
        ready: base,
        checks,
    };
    if base {
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

pub async fn no_route(req: HttpRequest) -> HttpResponse {
    use actix_web::ResponseError;
    ApiError::not_found(format!(
        "Unknown request URL: {} {}",
        req.method(),
        req.path()
    ))
    .error_response()
}
