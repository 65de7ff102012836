//! The LoRA control contract vLLM, mistral.rs and NIM share: `POST /v1/load_lora_adapter` and
//! `POST /v1/unload_lora_adapter` with `{"lora_name": "NAME@V"}`. In loraops the files always
//! come from the registry (sha256-verified), never from a path the caller names, and only an
//! admin token may call them: a gateway without authentication refuses them.

use actix_web::{HttpRequest, HttpResponse, web};
use loraops_registry::api::Role;
use loraops_registry::auth::Principal;
use serde::Deserialize;

use super::{AppState, auth};
use crate::engine::EngineKey;
use crate::error::ApiError;
use crate::routing::RouteError;

/// vLLM's request body; its other fields (`load_inplace`) need nothing here, since a version's
/// files never change.
#[derive(Debug, Deserialize)]
pub struct LoraRequest {
    pub lora_name: String,
    /// Refused when present: loraops reads adapters from the registry, never from a path.
    #[serde(default)]
    pub lora_path: Option<String>,
}

/// The admin caller, or why not.
fn admin(state: &AppState, req: &HttpRequest) -> Result<Principal, ApiError> {
    if state.verifier.is_none() {
        return Err(ApiError::forbidden(
            "adapter control needs authentication: this gateway serves without tokens",
        ));
    }
    match auth::caller(state, req)? {
        Some(p) if p.has(Role::Admin) => Ok(p),
        _ => Err(ApiError::forbidden("adapter control needs the admin role")),
    }
}

/// The version `lora_name` names, with its digest from the routing table or the registry.
async fn version_key(state: &AppState, body: &LoraRequest) -> Result<EngineKey, ApiError> {
    if body.lora_path.is_some() {
        return Err(ApiError::bad_request(
            "lora_path is not accepted: loraops loads NAME@V from its registry, sha256-verified",
        )
        .with_param("lora_path"));
    }
    if !body.lora_name.contains('@') {
        return Err(
            ApiError::bad_request("lora_name must name one version: NAME@V")
                .with_param("lora_name"),
        );
    }
    let target = state
        .router
        .resolve(&body.lora_name, "loraops-control", true)
        .await
        .map_err(|e| match e {
            RouteError::UnknownModel(_) | RouteError::NoCanary(_) => {
                ApiError::model_not_found(&body.lora_name)
            }
            RouteError::Registry { .. } => ApiError::unavailable(e.to_string()),
        })?;
    match target.key {
        EngineKey::Base => Err(ApiError::bad_request(format!(
            "{} is not an adapter version",
            body.lora_name
        ))
        .with_param("lora_name")),
        key => Ok(key),
    }
}

fn may_use(p: &Principal, key: &EngineKey) -> Result<(), ApiError> {
    match key {
        EngineKey::Version { adapter, .. } => auth::may_use(Some(p), adapter.as_str()),
        EngineKey::Base => Ok(()),
    }
}

async fn parse(payload: web::Bytes) -> Result<LoraRequest, ApiError> {
    serde_json::from_slice(&payload)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

pub async fn load_lora_adapter(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let caller = admin(&state, &req)?;
    let body = parse(payload).await?;
    let key = version_key(&state, &body).await?;
    may_use(&caller, &key)?;
    state
        .backend
        .load(key.clone())
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?;
    let EngineKey::Version { digest, .. } = &key else {
        unreachable!("version_key returns versions")
    };
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "lora_name": key.to_string(),
        "digest": digest,
        "status": "loaded",
    })))
}

pub async fn unload_lora_adapter(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let caller = admin(&state, &req)?;
    let body = parse(payload).await?;
    let key = version_key(&state, &body).await?;
    may_use(&caller, &key)?;
    if crate::routing::wanted(&state.router.table()).contains(&key) {
        return Err(ApiError::conflict(format!(
            "{key} is served by the routing table (a stable or canary version): change the rollout instead"
        )));
    }
    if !state.backend.unload(&key) {
        return Err(ApiError::not_found(format!("{key} is not loaded")));
    }
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "lora_name": key.to_string(),
        "status": "unloaded",
    })))
}
