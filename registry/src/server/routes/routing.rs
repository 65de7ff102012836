//! `GET /api/v1/routing?since=REV&wait=SECS`: the routing table gateways serve from, and
//! `POST /api/v1/routing/observations`: the per-arm counters gateways report back. With
//! `since` equal to the current revision the request long-polls until the table changes or
//! `wait` runs out; it reads the database, so every registry replica answers the same.

use std::time::Duration;

use actix_web::{HttpResponse, web};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, Set, TransactionTrait,
};

use crate::api::{
    AdapterRoute, Name, Observations, Role, RolloutState, RoutedVersion, RoutingTable,
};
use crate::server::AppState;
use crate::server::caller::Caller;
use crate::server::entities::{adapter, adapter_version, observation, rollout, routing_state};
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

/// Longest reporting window a gateway may send, so one report cannot span a whole rollout.
const MAX_WINDOW: chrono::Duration = chrono::Duration::minutes(10);

#[utoipa::path(post, path = "/api/v1/routing/observations", request_body = Observations,
    responses((status = 202, description = "stored for the rollout analysis"), (status = 422, body = crate::api::ErrorBody)))]
pub async fn observe(
    state: web::Data<AppState>,
    caller: Caller,
    body: web::Json<Observations>,
) -> Result<HttpResponse, ApiError> {
    // Live per-arm metrics decide rollouts, so they need a writing role: the evaluator's.
    caller.require(Role::Evaluator, None)?;
    let o = body.into_inner();
    let bad = |m: String| Err(ApiError::unprocessable("invalid_observations", m));
    if o.gateway.is_empty() || o.gateway.len() > 200 {
        return bad("gateway must be a non-empty id of at most 200 characters".into());
    }
    if o.window_end < o.window_start || o.window_end - o.window_start > MAX_WINDOW {
        return bad(format!(
            "window {} .. {} must be ordered and at most {} minutes long",
            o.window_start,
            o.window_end,
            MAX_WINDOW.num_minutes()
        ));
    }
    // Check and resolve everything first; the transaction then only writes.
    let mut ids = std::collections::HashMap::new();
    for (i, arm) in o.arms.iter().enumerate() {
        if !matches!(arm.arm.as_str(), "stable" | "canary" | "pinned") {
            return bad(format!(
                "arms[{i}].arm {:?}: expected stable, canary or pinned",
                arm.arm
            ));
        }
        if arm.errors > arm.requests {
            return bad(format!("arms[{i}] has more errors than requests"));
        }
        // Scores are in [0, 1]; a judged answer may land in a later window than its request.
        let s = arm.judge_score_sum;
        if !(s.is_finite() && s >= 0.0 && s <= arm.judge_scored as f64) {
            return bad(format!(
                "arms[{i}].judge_score_sum must be between 0 and judge_scored (scores are in [0, 1])"
            ));
        }
        let mut prev = (f64::NEG_INFINITY, 0u64);
        for &(le, c) in &arm.latency_ms_buckets {
            if !(le.is_finite() && le > prev.0 && c >= prev.1 && c <= arm.requests) {
                return bad(format!(
                    "arms[{i}].latency_ms_buckets must be cumulative counts at increasing bounds"
                ));
            }
            prev = (le, c);
        }
        if !ids.contains_key(arm.adapter.as_str()) {
            let a = adapter::Entity::find()
                .filter(adapter::Column::Name.eq(arm.adapter.as_str()))
                .one(&state.db)
                .await?
                .ok_or_else(|| {
                    ApiError::unprocessable(
                        "invalid_observations",
                        format!("arms[{i}]: unknown adapter {}", arm.adapter),
                    )
                })?;
            ids.insert(arm.adapter.to_string(), a.id);
        }
    }
    let now = chrono::Utc::now();
    let txn = state.db.begin().await?;
    for arm in &o.arms {
        observation::ActiveModel {
            gateway: Set(o.gateway.clone()),
            adapter_id: Set(ids[arm.adapter.as_str()]),
            version: Set(arm.version as i32),
            arm: Set(arm.arm.clone()),
            window_start: Set(o.window_start),
            window_end: Set(o.window_end),
            requests: Set(arm.requests as i64),
            errors: Set(arm.errors as i64),
            tokens: Set(arm.tokens as i64),
            latency: Set(serde_json::to_value(&arm.latency_ms_buckets).expect("buckets")),
            received_at: Set(now),
            judge_score_sum: Set(arm.judge_score_sum),
            judge_scored: Set(arm.judge_scored as i64),
            ..Default::default()
        }
        .insert(&txn)
        .await?;
    }
    txn.commit().await?;
    Ok(HttpResponse::Accepted().finish())
}
