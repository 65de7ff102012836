//! `/adapters/{name}/rollouts`: start a canary (behind the gate), read the current one with
//! its audit trail, and a deployer's promote / pause / resume / abort. The lifecycle itself
//! lives in `server::rollouts`.

use actix_web::{HttpResponse, web};

use crate::api::{Name, Role, RolloutStatus, StartRollout};
use crate::server::AppState;
use crate::server::caller::Caller;
use crate::server::error::ApiError;
use crate::server::records;
use crate::server::rollouts::{self, Action};

#[utoipa::path(post, path = "/api/v1/adapters/{name}/rollouts", params(("name" = String, Path, description = "adapter, base model or suite name")), request_body = StartRollout,
    responses((status = 201, body = RolloutStatus), (status = 409, body = crate::api::ErrorBody),
        (status = 422, description = "invalid spec, or the gate failed (details: the per-rule report)", body = crate::api::ErrorBody)))]
pub async fn start(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
    body: web::Json<StartRollout>,
) -> Result<HttpResponse, ApiError> {
    let name = Name::parse(&path)?;
    let who = caller.require(Role::Deployer, Some(name.as_str()))?;
    let r = rollouts::start(
        &state.db,
        &state.webhooks,
        &name,
        body.into_inner(),
        &who.sub,
    )
    .await?;
    state
        .metrics
        .rollout_transitions
        .with_label_values(&["start"])
        .inc();
    let events = rollouts::events(&state.db, r.id as i32).await?;
    Ok(HttpResponse::Created().json(RolloutStatus { rollout: r, events }))
}

async fn status(state: &AppState, name: &Name) -> Result<RolloutStatus, ApiError> {
    let a = records::adapter_by_name(&state.db, name.as_str()).await?;
    let r = rollouts::current(&state.db, &a)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("{name} has never had a rollout")))?;
    let events = rollouts::events(&state.db, r.id).await?;
    Ok(RolloutStatus {
        rollout: rollouts::to_api(&a, r)?,
        events,
    })
}

#[utoipa::path(get, path = "/api/v1/adapters/{name}/rollouts/current", params(("name" = String, Path, description = "adapter, base model or suite name")),
    responses((status = 200, description = "the active rollout, else the latest", body = RolloutStatus), (status = 404, body = crate::api::ErrorBody)))]
pub async fn current(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let name = Name::parse(&path)?;
    caller.require_read(&state, Some(name.as_str()))?;
    Ok(HttpResponse::Ok().json(status(&state, &name).await?))
}

#[utoipa::path(post, path = "/api/v1/adapters/{name}/rollouts/current/{action}",
    params(("name" = String, Path, description = "adapter, base model or suite name"), ("action" = String, Path, description = "promote, pause, resume, abort, approve (a step awaiting approval), or rollback-promotion (the latest promotion: its previous stable version is stable again)")),
    responses((status = 200, body = RolloutStatus), (status = 409, body = crate::api::ErrorBody)))]
pub async fn act(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let name = Name::parse(&path.0)?;
    let action: Action = path.1.parse()?;
    let who = caller.require(Role::Deployer, Some(name.as_str()))?;
    let a = records::adapter_by_name(&state.db, name.as_str()).await?;
    rollouts::act(&state.db, &state.webhooks, &a, action, &who.sub).await?;
    state
        .metrics
        .rollout_transitions
        .with_label_values(&[path.1.as_str()])
        .inc();
    Ok(HttpResponse::Ok().json(status(&state, &name).await?))
}
