//! `/v1/models` and the operations endpoints.

use actix_web::{HttpRequest, HttpResponse, web};
use loraops_registry::api::Readiness;

use super::{AppState, auth};
use crate::error::ApiError;
use crate::openai::{ModelCard, ModelList};

/// The base model, every routed adapter by name, each routed version pinned (`NAME@V`), and
/// any other version resident in the engine; adapters name the base as their `parent`.
pub async fn models(
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let p = auth::caller(&state, &req)?;
    let created = state.started;
    let base = state.router.base_name().to_string();
    let card = |id: String, owned_by: &str, parent: Option<&str>| ModelCard {
        id,
        object: "model",
        created,
        owned_by: owned_by.to_string(),
        parent: parent.map(str::to_string),
    };
    let mut data = vec![card(base.clone(), "loraops", None)];
    let mut listed = std::collections::HashSet::new();
    let may = |adapter: &str| p.as_ref().is_none_or(|p| p.may_touch(adapter));
    for r in &state.router.table().routes {
        if !may(r.adapter.as_str()) {
            continue;
        }
        data.push(card(r.adapter.to_string(), "loraops", Some(&base)));
        for v in [&r.stable, &r.canary].into_iter().flatten() {
            let id = format!("{}@{}", r.adapter, v.version);
            listed.insert(id.clone());
            data.push(card(id, "loraops", Some(&base)));
        }
    }
    for id in state.backend.resident() {
        let adapter = id.rsplit_once('@').map_or(id.as_str(), |(a, _)| a);
        if may(adapter) && listed.insert(id.clone()) {
            data.push(card(id, "loraops", Some(&base)));
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

/// Ready once the base is loaded and, with a registry, the first routing table has arrived
/// (before that every adapter name would answer 404). An unreachable registry later does not
/// make the gateway unready (it keeps serving the last table) but is reported in the checks.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let mut checks = std::collections::BTreeMap::new();
    let base = state.backend.base_ready();
    checks.insert(
        "base".to_string(),
        if base { "loaded" } else { "not loaded" }.to_string(),
    );
    let id = state.backend.identity();
    checks.insert(
        "engine".to_string(),
        format!("{} {} ({})", id.name, id.version, id.quantization),
    );
    checks.insert("adapters".to_string(), state.backend.resident().join(", "));
    let (registry, routed) = match &state.feed {
        Some(s) => {
            let s = s.lock().expect("feed lock");
            (s.describe(), s.revision.is_some())
        }
        None => ("not configured (base model only)".to_string(), true),
    };
    checks.insert("registry".to_string(), registry);
    let ready = base && routed;
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

pub async fn no_route(req: HttpRequest) -> HttpResponse {
    use actix_web::ResponseError;
    ApiError::not_found(format!(
        "Unknown request URL: {} {}",
        req.method(),
        req.path()
    ))
    .error_response()
}
