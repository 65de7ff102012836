//! `GET /api/v1/routing?since=REV&wait=SECS`: the routing table gateways serve from. With
//! `since` equal to the current revision the request long-polls until the table changes or
//! `wait` runs out; it reads the database, so every registry replica answers the same.

use std::time::Duration;

use actix_web::{HttpResponse, web};
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter};

use crate::api::{AdapterRoute, Name, RolloutState, RoutedVersion, RoutingTable};
use crate::server::AppState;
use crate::server::caller::Caller;
use crate::server::entities::{adapter, adapter_version, rollout, routing_state};
use crate::server::error::ApiError;

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
pub struct RoutingQuery {
    /// Revision the caller already has; the reply waits for a newer one.
    pub since: Option<i64>,
    /// Longest wait in seconds (default 30, at most 60).
    pub wait: Option<u64>,
}

pub async fn revision(db: &impl ConnectionTrait) -> Result<i64, ApiError> {
    Ok(routing_state::Entity::find_by_id(1)
        .one(db)
        .await?
        .map(|r| r.revision)
        .unwrap_or(0))
}

/// Build the table from adapters' stable versions and their active rollouts.
pub async fn build(db: &impl ConnectionTrait) -> Result<RoutingTable, ApiError> {
    let rev = revision(db).await?;
    let adapters = adapter::Entity::find()
        .filter(adapter::Column::LatestVersion.gt(0))
        .all(db)
        .await?;
    let mut routes = Vec::new();
    for a in adapters {
        let active = match a.active_rollout_id {
            Some(id) => rollout::Entity::find_by_id(id)
                .one(db)
                .await?
                .filter(|r| r.state.parse::<RolloutState>().is_ok_and(|s| s.is_active())),
            None => None,
        };
        if a.stable_version.is_none() && active.is_none() {
            continue;
        }
        let routed = |v: i32| async move {
            let row = adapter_version::Entity::find()
                .filter(adapter_version::Column::AdapterId.eq(a.id))
                .filter(adapter_version::Column::Version.eq(v))
                .one(db)
                .await?;
            Ok::<_, ApiError>(row.map(|r| RoutedVersion {
                version: r.version as u32,
                digest: r.digest,
            }))
        };
        let stable = match a.stable_version {
            Some(v) => routed(v).await?,
            None => None,
        };
        let (canary, weight) = match &active {
            Some(r) => (routed(r.version).await?, r.weight),
            None => (None, 0.0),
        };
        let name = |s: &str| Name::parse(s).map_err(|e| ApiError::internal(e.to_string()));
        routes.push(AdapterRoute {
            adapter: name(&a.name)?,
            base_model: name(&a.base_model)?,
            stable,
            canary,
            canary_weight: weight,
        });
    }
    routes.sort_by(|x, y| x.adapter.cmp(&y.adapter));
    Ok(RoutingTable {
        revision: rev,
        routes,
    })
}

#[utoipa::path(get, path = "/api/v1/routing", params(RoutingQuery), responses((status = 200, body = RoutingTable)))]
pub async fn table(
    state: web::Data<AppState>,
    caller: Caller,
    q: web::Query<RoutingQuery>,
) -> Result<HttpResponse, ApiError> {
    caller.require_read(&state)?;
    if let Some(since) = q.since {
        let deadline =
            tokio::time::Instant::now() + Duration::from_secs(q.wait.unwrap_or(30).min(60));
        while revision(&state.db).await? <= since && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    Ok(HttpResponse::Ok().json(build(&state.db).await?))
}
