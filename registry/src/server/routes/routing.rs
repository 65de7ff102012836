//! `GET /api/v1/routing?since=REV&wait=SECS`: the routing table gateways serve from, and
//! `POST /api/v1/routing/observations`: the per-arm counters gateways report back. With
//! `since` equal to the current revision the request long-polls until the table changes or
//! `wait` runs out; it reads the database, so every registry replica answers the same.
//! Waiters do not poll the database each: one watcher per replica reads the revision while
//! anyone waits and wakes them all, the built table is cached per revision, and one caller
//! may hold only a few long-polls at once (429 beyond).
//!
//! Observations decide rollouts, so only `gateway` tokens (and admins) post them, each arm
//! for an adapter the token may touch; a window may not end in the future (beyond a small
//! clock skew) nor long ago, counters are bounded, and a retried report (same gateway and
//! window) is stored once.

use std::time::Duration;

use actix_web::{HttpResponse, web};
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, Set, TransactionTrait};

use sea_orm::sea_query::OnConflict;
use sha2::{Digest, Sha256};

use crate::api::{
    AdapterRoute, Name, Observations, Role, RolloutSpec, RolloutState, RoutedVersion, RoutingTable,
    USER_GROUPS,
};
use crate::server::AppState;
use crate::server::caller::Caller;
use crate::server::entities::{
    adapter, adapter_version, gateway_seen, observation, rollout, routing_state,
};
use crate::server::error::ApiError;
use crate::server::rollouts::controller::db_now;

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
        // In its shadow phase the candidate takes no users, only mirrored requests.
        let (canary, weight, shadow, shadow_percent) = match &active {
            Some(r) if r.canary_since.is_none() => {
                let percent = serde_json::from_value::<RolloutSpec>(r.spec.clone())
                    .ok()
                    .and_then(|s| s.shadow)
                    .map_or(0.0, |s| s.percent);
                (None, 0.0, routed(r.version).await?, percent)
            }
            Some(r) => (routed(r.version).await?, r.weight, None, 0.0),
            None => (None, 0.0, None, 0.0),
        };
        let name = |s: &str| Name::parse(s).map_err(|e| ApiError::internal(e.to_string()));
        routes.push(AdapterRoute {
            adapter: name(&a.name)?,
            base_model: name(&a.base_model)?,
            stable,
            canary,
            canary_weight: weight,
            shadow,
            shadow_percent,
        });
    }
    routes.sort_by(|x, y| x.adapter.cmp(&y.adapter));
    Ok(RoutingTable {
        revision: rev,
        routes,
    })
}

/// The replica's view of the routing revision, shared by every long-poll.
pub struct RoutingWatch {
    rev: tokio::sync::watch::Sender<i64>,
    cache: tokio::sync::Mutex<Option<(i64, RoutingTable)>>,
    waiters: std::sync::Mutex<std::collections::HashMap<String, u32>>,
    max_per_caller: u32,
}

/// How often the watcher reads the revision while someone waits.
const WATCH_EVERY: Duration = Duration::from_millis(250);

impl RoutingWatch {
    pub fn new(max_per_caller: u32) -> Self {
        Self {
            rev: tokio::sync::watch::channel(-1).0,
            cache: tokio::sync::Mutex::new(None),
            waiters: Default::default(),
            max_per_caller: max_per_caller.max(1),
        }
    }

    /// One pass of the watcher: read the revision if anyone waits. Returns the pause until
    /// the next pass.
    pub async fn watch_once(&self, db: &impl ConnectionTrait) -> Result<Duration, ApiError> {
        if self.rev.receiver_count() > 0 {
            let r = revision(db).await?;
            self.rev.send_if_modified(|old| {
                let changed = *old != r;
                *old = r;
                changed
            });
        }
        Ok(WATCH_EVERY)
    }

    /// The table at the current revision, built once per revision.
    async fn table(&self, db: &impl ConnectionTrait) -> Result<RoutingTable, ApiError> {
        let rev = revision(db).await?;
        let mut cache = self.cache.lock().await;
        if let Some((r, t)) = cache.as_ref()
            && *r == rev
        {
            return Ok(t.clone());
        }
        let t = build(db).await?;
        *cache = Some((t.revision, t.clone()));
        Ok(t)
    }
}

/// A long-poll's place in its caller's quota, given back on drop.
struct WaitSlot<'a> {
    watch: &'a RoutingWatch,
    who: String,
}

impl<'a> WaitSlot<'a> {
    fn take(watch: &'a RoutingWatch, who: &str) -> Result<Self, ApiError> {
        let mut w = watch.waiters.lock().expect("waiters lock");
        let n = w.entry(who.to_string()).or_insert(0);
        if *n >= watch.max_per_caller {
            return Err(ApiError::new(
                actix_web::http::StatusCode::TOO_MANY_REQUESTS,
                "too_many_waiters",
                format!(
                    "{who} already holds {} routing long-polls; wait for one to return",
                    watch.max_per_caller
                ),
            ));
        }
        *n += 1;
        Ok(Self {
            watch,
            who: who.to_string(),
        })
    }
}

impl Drop for WaitSlot<'_> {
    fn drop(&mut self) {
        let mut w = self.watch.waiters.lock().expect("waiters lock");
        if let Some(n) = w.get_mut(&self.who) {
            *n -= 1;
            if *n == 0 {
                w.remove(&self.who);
            }
        }
    }
}

#[utoipa::path(get, path = "/api/v1/routing", params(RoutingQuery), responses((status = 200, body = RoutingTable), (status = 429, body = crate::api::ErrorBody)))]
pub async fn table(
    state: web::Data<AppState>,
    caller: Caller,
    q: web::Query<RoutingQuery>,
) -> Result<HttpResponse, ApiError> {
    caller.require_serving_read(&state, None)?;
    let watch = &state.routing;
    if let Some(since) = q.since {
        let _slot = WaitSlot::take(watch, caller.sub())?;
        let mut rx = watch.rev.subscribe();
        let deadline =
            tokio::time::Instant::now() + Duration::from_secs(q.wait.unwrap_or(30).min(60));
        if revision(&state.db).await? <= since {
            loop {
                tokio::select! {
                    changed = rx.changed() => {
                        if changed.is_err() || *rx.borrow_and_update() > since {
                            break;
                        }
                    }
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
        }
    }
    let mut table = watch.table(&state.db).await?;
    // A token limited to some adapters sees only their routes.
    table.routes.retain(|r| caller.may_see(r.adapter.as_str()));
    Ok(HttpResponse::Ok().json(table))
}

/// Longest reporting window a gateway may send, so one report cannot span a whole rollout.
const MAX_WINDOW: chrono::Duration = chrono::Duration::minutes(10);
/// Most requests one arm may report in one window (far above what one gateway serves).
const MAX_REQUESTS: u64 = 10_000_000;

/// What makes a retried report the same report: the gateway and its window.
fn report_id(o: &Observations) -> String {
    let mut h = Sha256::new();
    h.update(o.gateway.as_bytes());
    h.update([0u8]);
    h.update(o.window_start.to_rfc3339().as_bytes());
    h.update([0u8]);
    h.update(o.window_end.to_rfc3339().as_bytes());
    hex::encode(&h.finalize()[..16])
}

#[utoipa::path(post, path = "/api/v1/routing/observations", request_body = Observations,
    responses((status = 202, description = "stored for the rollout analysis (a retried report is stored once)"),
        (status = 403, description = "not a gateway token, or an arm of an adapter the token may not touch", body = crate::api::ErrorBody),
        (status = 422, body = crate::api::ErrorBody)))]
pub async fn observe(
    state: web::Data<AppState>,
    caller: Caller,
    body: web::Json<Observations>,
) -> Result<HttpResponse, ApiError> {
    // Live per-arm metrics decide rollouts: only the data plane's own role posts them.
    let who = caller.require(Role::Gateway, None)?;
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
    let settings = &state.settings.registry;
    let now = db_now(&state.db).await?;
    let skew = chrono::Duration::seconds(settings.observation_max_skew_secs.min(3600) as i64);
    if o.window_end > now + skew {
        return bad(format!(
            "window_end {} is in the future (the registry's clock says {now}; {} s of skew allowed)",
            o.window_end,
            skew.num_seconds()
        ));
    }
    let max_age = chrono::Duration::seconds(settings.observation_max_age_secs.min(86_400) as i64);
    if o.window_end < now - max_age {
        return bad(format!(
            "window_end {} is more than {} s old: stale counts would be analysed as current",
            o.window_end,
            max_age.num_seconds()
        ));
    }
    if let Some(j) = &o.judge
        && (j.is_empty() || j.len() > 200)
    {
        return bad("judge must be a non-empty model name of at most 200 characters".into());
    }
    // Check and resolve everything first; the transaction then only writes.
    let mut ids = std::collections::HashMap::new();
    for (i, arm) in o.arms.iter().enumerate() {
        if !who.may_touch(arm.adapter.as_str()) {
            return Err(ApiError::forbidden(format!(
                "arms[{i}]: this token may not report for adapter {:?}",
                arm.adapter.as_str()
            )));
        }
        if !matches!(arm.arm.as_str(), "stable" | "canary" | "pinned" | "shadow") {
            return bad(format!(
                "arms[{i}].arm {:?}: expected stable, canary, pinned or shadow",
                arm.arm
            ));
        }
        if arm.requests > MAX_REQUESTS {
            return bad(format!(
                "arms[{i}] reports {} requests; at most {MAX_REQUESTS} per window",
                arm.requests
            ));
        }
        if arm.errors > arm.requests || arm.answers > arm.requests {
            return bad(format!(
                "arms[{i}] has more errors or answers than requests"
            ));
        }
        // Judged answers may land in a later window than their requests, but not in bulk.
        if arm.judge_scored > MAX_REQUESTS || arm.agreement_scored > MAX_REQUESTS {
            return bad(format!("arms[{i}] reports too many judged answers"));
        }
        // Scores are in [0, 1].
        let in_unit = |sum: f64, sq: f64, n: u64| {
            sum.is_finite()
                && sq.is_finite()
                && sum >= 0.0
                && sum <= n as f64
                && sq >= 0.0
                && sq <= n as f64
        };
        if !in_unit(
            arm.judge_score_sum,
            arm.judge_score_sq_sum,
            arm.judge_scored,
        ) || !in_unit(arm.agreement_sum, 0.0, arm.agreement_scored)
        {
            return bad(format!(
                "arms[{i}]: judge sums must be between 0 and the number scored (scores are in [0, 1])"
            ));
        }
        if !(arm.tokens_sq_sum.is_finite() && arm.tokens_sq_sum >= 0.0) {
            return bad(format!(
                "arms[{i}].tokens_sq_sum must be a finite non-negative number"
            ));
        }
        let mut prev = (f64::NEG_INFINITY, 0u64);
        for &(le, c) in &arm.latency_ms_buckets {
            if !(le.is_finite() && le > prev.0 && le > 0.0 && c >= prev.1 && c <= arm.requests) {
                return bad(format!(
                    "arms[{i}].latency_ms_buckets must be cumulative counts at increasing positive bounds"
                ));
            }
            prev = (le, c);
        }
        let (mut in_groups, mut last) = (0u64, None);
        for &(g, r, e) in &arm.users {
            if g >= USER_GROUPS || e > r || last.is_some_and(|l| l >= g) {
                return bad(format!(
                    "arms[{i}].users must be [group, requests, errors] with increasing groups below {USER_GROUPS} and errors <= requests"
                ));
            }
            in_groups = in_groups.saturating_add(r);
            last = Some(g);
        }
        if !arm.users.is_empty() && in_groups != arm.requests {
            return bad(format!(
                "arms[{i}].users count {in_groups} requests, the arm {}",
                arm.requests
            ));
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
    let report = report_id(&o);
    let rows: Vec<observation::ActiveModel> =
        o.arms
            .iter()
            .map(|arm| observation::ActiveModel {
                gateway: Set(o.gateway.clone()),
                adapter_id: Set(ids[arm.adapter.as_str()]),
                version: Set(arm.version as i32),
                arm: Set(arm.arm.clone()),
                window_start: Set(o.window_start),
                window_end: Set(o.window_end),
                requests: Set(arm.requests as i64),
                errors: Set(arm.errors as i64),
                tokens: Set(arm.tokens.min(i64::MAX as u64) as i64),
                latency: Set(serde_json::to_value(&arm.latency_ms_buckets).expect("buckets")),
                received_at: Set(now),
                judge_score_sum: Set(arm.judge_score_sum),
                judge_scored: Set(arm.judge_scored as i64),
                report_id: Set(report.clone()),
                answers: Set(arm.answers as i64),
                tokens_sq: Set(arm.tokens_sq_sum),
                judge_score_sq: Set(arm.judge_score_sq_sum),
                agreement_scored: Set(arm.agreement_scored as i64),
                agreement_sum: Set(arm.agreement_sum),
                users: Set((!arm.users.is_empty())
                    .then(|| serde_json::to_value(&arm.users).expect("users"))),
                ..Default::default()
            })
            .collect();
    let txn = state.db.begin().await?;
    let mut stored = 0;
    if !rows.is_empty() {
        // A retry of a report already stored (its answer was lost) changes nothing.
        stored = observation::Entity::insert_many(rows)
            .on_conflict(
                OnConflict::columns([
                    observation::Column::ReportId,
                    observation::Column::AdapterId,
                    observation::Column::Version,
                    observation::Column::Arm,
                ])
                .do_nothing()
                .to_owned(),
            )
            .exec_without_returning(&txn)
            .await?;
    }
    gateway_seen::Entity::insert(gateway_seen::ActiveModel {
        id: Set(o.gateway.clone()),
        judge: Set(o.judge.clone()),
        last_seen: Set(now),
    })
    .on_conflict(
        OnConflict::column(gateway_seen::Column::Id)
            .update_columns([gateway_seen::Column::Judge, gateway_seen::Column::LastSeen])
            .to_owned(),
    )
    .exec_without_returning(&txn)
    .await?;
    txn.commit().await?;
    Ok(HttpResponse::Accepted().json(serde_json::json!({
        "stored": stored,
        "duplicate": stored == 0 && !o.arms.is_empty(),
    })))
}
