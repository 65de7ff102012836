//! `/adapters/{name}/rollouts`: start a canary (behind the gate), read the current one with
//! its audit trail, and a deployer's promote / pause / resume / abort. The lifecycle itself
//! lives in `server::rollouts`.

use std::collections::BTreeMap;

use actix_web::{HttpResponse, web};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};

use crate::api::{Name, Page, Role, Rollout, RolloutSeries, RolloutStatus, StartRollout};
use crate::server::AppState;
use crate::server::caller::Caller;
use crate::server::entities::{adapter, rollout};
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

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
pub struct RolloutsQuery {
    /// Only rollouts still in progress (running, paused, awaiting approval).
    #[serde(default)]
    pub active: bool,
}

#[utoipa::path(get, path = "/api/v1/rollouts", params(RolloutsQuery),
    responses((status = 200, description = "the latest rollout of each adapter the caller may see, most recently updated first", body = Page<Rollout>)))]
pub async fn list(
    state: web::Data<AppState>,
    caller: Caller,
    q: web::Query<RolloutsQuery>,
) -> Result<HttpResponse, ApiError> {
    caller.require_read(&state, None)?;
    // The latest rollout per adapter: its highest id (two queries, not one per adapter).
    let latest: Vec<i32> = rollout::Entity::find()
        .select_only()
        .column_as(rollout::Column::Id.max(), "id")
        .group_by(rollout::Column::AdapterId)
        .into_tuple::<i32>()
        .all(&state.db)
        .await?;
    let mut rows = Vec::new();
    for ids in latest.chunks(1000) {
        rows.extend(
            rollout::Entity::find()
                .filter(rollout::Column::Id.is_in(ids.to_vec()))
                .order_by_desc(rollout::Column::UpdatedAt)
                .all(&state.db)
                .await?,
        );
    }
    rows.sort_by(|a, b| b.updated_at.cmp(&a.updated_at).then(b.id.cmp(&a.id)));
    let adapters: BTreeMap<i32, adapter::Model> = adapter::Entity::find()
        .all(&state.db)
        .await?
        .into_iter()
        .map(|a| (a.id, a))
        .collect();
    let mut items = Vec::new();
    for r in rows {
        let Some(a) = adapters.get(&r.adapter_id) else {
            continue;
        };
        if !caller.may_see(&a.name) {
            continue;
        }
        let r = rollouts::to_api(a, r)?;
        if q.active && !r.state.is_active() {
            continue;
        }
        items.push(r);
    }
    Ok(HttpResponse::Ok().json(Page { items, next: None }))
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
pub struct SeriesQuery {
    /// Bucket width in seconds (default: the rollout's span in about 120 buckets, at least 5 s).
    pub bucket_secs: Option<u64>,
}

#[utoipa::path(get, path = "/api/v1/adapters/{name}/rollouts/current/series",
    params(("name" = String, Path, description = "adapter name"), SeriesQuery),
    responses((status = 200, description = "the current rollout's per-arm metrics over time, from the gateways' reports", body = RolloutSeries),
        (status = 404, body = crate::api::ErrorBody)))]
pub async fn series(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
    q: web::Query<SeriesQuery>,
) -> Result<HttpResponse, ApiError> {
    let name = Name::parse(&path)?;
    caller.require_read(&state, Some(name.as_str()))?;
    let a = records::adapter_by_name(&state.db, name.as_str()).await?;
    let r = rollouts::current(&state.db, &a)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("{name} has never had a rollout")))?;
    let now = rollouts::controller::db_now(&state.db).await?;
    let active = r
        .state
        .parse::<crate::api::RolloutState>()
        .is_ok_and(|s| s.is_active());
    let until = if active { now } else { r.updated_at.min(now) };
    let span = (until - r.created_at).num_seconds().max(0) as u64;
    let bucket = q.bucket_secs.unwrap_or((span / 120).max(5));
    let (bucket_secs, points) = rollouts::controller::series(&state.db, &r, until, bucket).await?;
    Ok(HttpResponse::Ok().json(RolloutSeries {
        rollout: r.id as i64,
        bucket_secs,
        points,
    }))
}
