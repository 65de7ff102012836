//! Canary rollouts: starting one (behind the gate), manual actions, and the controller that
//! analyses the gateways' per-arm observations each interval and advances, holds, promotes or
//! rolls back.
//!
//! All state lives in the database, so a restarted registry resumes where it was. Every
//! transition is one transaction guarded by the rollout's `row_version` (a transition that
//! lost a race changes nothing), and only the replica holding the `rollout-controller` lease
//! runs the analysis loop, so several replicas never double-step a rollout.

use std::collections::BTreeMap;
use std::time::Duration;

use actix_web::web;
use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, QueryFilter,
    QueryOrder, Set, TransactionTrait,
};
use serde_json::{Value, json};

use super::AppState;
use super::entities::{adapter, lease, observation, rollout, rollout_event, routing_state};
use super::error::ApiError;
use super::gate;
use super::metrics::Metrics;
use super::records;
use super::webhooks::Webhooks;
use crate::api::{
    AnalysisRule, ArmMetrics, Comparison, Name, Rollout, RolloutEvent, RolloutSpec, RolloutState,
    StartRollout,
};

/// The actor of the controller's own transitions in the audit trail.
pub const CONTROLLER: &str = "controller";
const LEASE: &str = "rollout-controller";

/// Rules used when a rollout names none: the canary's error rate at most 5 %.
pub fn default_rules() -> Vec<AnalysisRule> {
    vec![AnalysisRule {
        metric: "error_rate".into(),
        op: Comparison::Le,
        threshold: 0.05,
    }]
}

fn check_spec(spec: &RolloutSpec) -> Result<(), ApiError> {
    let bad = |m: String| Err(ApiError::unprocessable("invalid_rollout", m));
    if spec.steps.is_empty() {
        return bad("steps must not be empty".into());
    }
    let mut prev = 0.0;
    for &s in &spec.steps {
        if !(s.is_finite() && s > prev && s <= 100.0) {
            return bad(format!(
                "steps must increase within (0, 100] percent; got {:?}",
                spec.steps
            ));
        }
        prev = s;
    }
    if spec.interval_secs == 0 {
        return bad("interval_secs must be at least 1".into());
    }
    if spec.failure_limit == 0 {
        return bad("failure_limit must be at least 1".into());
    }
    for r in &spec.rules {
        if !METRICS.contains(&r.metric.as_str()) {
            return bad(format!(
                "unknown analysis metric {:?} (expected one of {METRICS:?})",
                r.metric
            ));
        }
        if !r.threshold.is_finite() {
            return bad(format!("rule on {} has a non-finite threshold", r.metric));
        }
    }
    Ok(())
}

const METRICS: [&str; 4] = [
    "error_rate",
    "latency_p95_ms",
    "latency_p99_ms",
    "judge_score",
];

pub fn to_api(a: &adapter::Model, r: rollout::Model) -> Result<Rollout, ApiError> {
    let internal = |e: String| ApiError::internal(format!("stored rollout {}: {e}", r.id));
    Ok(Rollout {
        id: r.id as i64,
        adapter: Name::parse(&a.name).map_err(|e| internal(e.to_string()))?,
        version: r.version as u32,
        from_version: r.from_version.map(|v| v as u32),
        state: r.state.parse().map_err(internal)?,
        step_index: r.step_index as u32,
        weight: r.weight,
        failures: r.failures as u32,
        spec: serde_json::from_value(r.spec.clone()).map_err(|e| internal(e.to_string()))?,
        created_by: r.created_by,
        created_at: r.created_at,
        updated_at: r.updated_at,
    })
}

pub fn event_to_api(e: rollout_event::Model) -> Result<RolloutEvent, ApiError> {
    let state = |s: &str| {
        s.parse::<RolloutState>()
            .map_err(|m| ApiError::internal(format!("stored event {}: {m}", e.id)))
    };
    Ok(RolloutEvent {
        id: e.id as i64,
        at: e.at,
        from_state: e.from_state.as_deref().map(state).transpose()?,
        to_state: state(&e.to_state)?,
        actor: e.actor,
        action: e.action,
        weight: e.weight,
        reason: e.reason,
        details: e.observations,
    })
}

pub async fn bump_revision(db: &impl ConnectionTrait) -> Result<(), ApiError> {
    routing_state::Entity::update_many()
        .col_expr(
            routing_state::Column::Revision,
            sea_orm::sea_query::ExprTrait::add(Expr::col(routing_state::Column::Revision), 1),
        )
        .col_expr(routing_state::Column::UpdatedAt, Expr::value(Utc::now()))
        .filter(routing_state::Column::Id.eq(1))
        .exec(db)
        .await?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn record(
    db: &impl ConnectionTrait,
    hooks: &Webhooks,
    rollout_id: i32,
    actor: &str,
    action: &str,
    from: Option<RolloutState>,
    to: RolloutState,
    weight: f64,
    reason: String,
    details: Option<Value>,
) -> Result<(), ApiError> {
    rollout_event::ActiveModel {
        rollout_id: Set(rollout_id),
        at: Set(Utc::now()),
        actor: Set(actor.to_string()),
        action: Set(action.to_string()),
        from_state: Set(from.map(|s| s.as_str().to_string())),
        to_state: Set(to.as_str().to_string()),
        weight: Set(weight),
        reason: Set(reason.clone()),
        observations: Set(details),
        ..Default::default()
    }
    .insert(db)
    .await?;
    if !hooks.is_empty() {
        let r = rollout::Entity::find_by_id(rollout_id).one(db).await?;
        let a = match &r {
            Some(r) => adapter::Entity::find_by_id(r.adapter_id).one(db).await?,
            None => None,
        };
        hooks
            .emit(
                db,
                &format!("rollout.{action}"),
                json!({"rollout_id": rollout_id, "adapter": a.map(|a| a.name),
                    "version": r.map(|r| r.version), "actor": actor,
                    "from": from.map(|s| s.as_str()), "to": to.as_str(), "weight": weight,
                    "reason": reason}),
            )
            .await?;
    }
    Ok(())
}

/// Start a canary of `req.version`, if the gate passes. Errors: 404 unknown version,
/// 409 another rollout is active or the version is already stable, 422 invalid spec or a
/// failing gate (with the per-rule report as details). Nothing changes on error.
pub async fn start(
    db: &DatabaseConnection,
    hooks: &Webhooks,
    name: &Name,
    mut req: StartRollout,
    actor: &str,
) -> Result<Rollout, ApiError> {
    check_spec(&req.spec)?;
    if req.spec.rules.is_empty() {
        req.spec.rules = default_rules();
    }
    let txn = db.begin().await?;
    // Write first: it takes SQLite's write lock before any read (a read-then-write
    // transaction can fail if another writer commits in between) and locks the adapter's row
    // on PostgreSQL, so concurrent starts for one adapter run one after the other.
    adapter::Entity::update_many()
        .col_expr(adapter::Column::Name, Expr::col(adapter::Column::Name))
        .filter(adapter::Column::Name.eq(name.as_str()))
        .exec(&txn)
        .await?;
    let a = records::adapter_by_name(&txn, name.as_str()).await?;
    let v = records::version_row(&txn, &a, req.version).await?;
    if a.active_rollout_id.is_some() {
        return Err(ApiError::conflict(format!(
            "{name} already has an active rollout; promote, abort or wait for it to finish"
        )));
    }
    if a.stable_version == Some(v.version) {
        return Err(ApiError::conflict(format!(
            "{name}@{} is already the stable version",
            v.version
        )));
    }
    let report = gate::report(&txn, &a, &v).await?;
    if !report.passed {
        let failed: Vec<&str> = report
            .rules
            .iter()
            .filter(|r| !r.passed)
            .map(|r| r.rule.as_str())
            .collect();
        return Err(ApiError::unprocessable(
            "gate_failed",
            format!(
                "{name}@{} does not meet its gate ({}): {}",
                v.version,
                report.policy_scope,
                failed.join("; ")
            ),
        )
        .with_details(serde_json::to_value(&report).expect("report serialises")));
    }
    let now = Utc::now();
    let weight = req.spec.steps[0];
    let r = rollout::ActiveModel {
        adapter_id: Set(a.id),
        version: Set(v.version),
        from_version: Set(a.stable_version),
        state: Set(RolloutState::Running.as_str().into()),
        step_index: Set(0),
        weight: Set(weight),
        failures: Set(0),
        spec: Set(serde_json::to_value(&req.spec).expect("spec serialises")),
        row_version: Set(0),
        last_analysis_at: Set(Some(now)),
        created_by: Set(actor.to_string()),
        created_at: Set(now),
        updated_at: Set(now),
        ..Default::default()
    }
    .insert(&txn)
    .await?;
    // The guard makes a concurrent second start lose cleanly (SQLite serialises writers;
    // on PostgreSQL the conditional update blocks on the first one's row lock).
    let claimed = adapter::Entity::update_many()
        .col_expr(adapter::Column::ActiveRolloutId, Expr::value(r.id))
        .filter(adapter::Column::Id.eq(a.id))
        .filter(adapter::Column::ActiveRolloutId.is_null())
        .exec(&txn)
        .await?;
    if claimed.rows_affected != 1 {
        return Err(ApiError::conflict(format!(
            "{name} already has an active rollout"
        )));
    }
    record(
        &txn,
        hooks,
        r.id,
        actor,
        "start",
        None,
        RolloutState::Running,
        weight,
        format!(
            "gate {} passed ({} rules); canary at {weight}%",
            report.policy_scope,
            report.rules.len()
        ),
        Some(json!({ "gate": report })),
    )
    .await?;
    bump_revision(&txn).await?;
    txn.commit().await?;
    to_api(&a, r)
}

/// The adapter's active rollout, else its latest one.
pub async fn current(
    db: &impl ConnectionTrait,
    a: &adapter::Model,
) -> Result<Option<rollout::Model>, ApiError> {
    if let Some(id) = a.active_rollout_id {
        return Ok(rollout::Entity::find_by_id(id).one(db).await?);
    }
    Ok(rollout::Entity::find()
        .filter(rollout::Column::AdapterId.eq(a.id))
        .order_by_desc(rollout::Column::Id)
        .one(db)
        .await?)
}

pub async fn events(
    db: &impl ConnectionTrait,
    rollout_id: i32,
) -> Result<Vec<RolloutEvent>, ApiError> {
    rollout_event::Entity::find()
        .filter(rollout_event::Column::RolloutId.eq(rollout_id))
        .order_by_asc(rollout_event::Column::Id)
        .all(db)
        .await?
        .into_iter()
        .map(event_to_api)
        .collect()
}

/// What a transition changes.
struct Change {
    action: &'static str,
    to: RolloutState,
    step_index: i32,
    weight: f64,
    failures: i32,
    /// Start of the next analysis window.
    window_start: Option<DateTime<Utc>>,
    reason: String,
    details: Option<Value>,
}

/// Apply `ch` to `r` if nobody changed `r` since it was read. Terminal states release the
/// adapter (and promotion makes the canary stable). Returns the new row, or `None` when the
/// rollout changed underneath (the caller re-reads).
async fn transition(
    db: &DatabaseConnection,
    hooks: &Webhooks,
    r: &rollout::Model,
    actor: &str,
    ch: Change,
) -> Result<Option<rollout::Model>, ApiError> {
    let from: RolloutState = r.state.parse().map_err(ApiError::internal)?;
    let txn = db.begin().await?;
    let now = Utc::now();
    let updated = rollout::Entity::update_many()
        .col_expr(rollout::Column::State, Expr::value(ch.to.as_str()))
        .col_expr(rollout::Column::StepIndex, Expr::value(ch.step_index))
        .col_expr(rollout::Column::Weight, Expr::value(ch.weight))
        .col_expr(rollout::Column::Failures, Expr::value(ch.failures))
        .col_expr(
            rollout::Column::LastAnalysisAt,
            Expr::value(ch.window_start),
        )
        .col_expr(rollout::Column::RowVersion, Expr::value(r.row_version + 1))
        .col_expr(rollout::Column::UpdatedAt, Expr::value(now))
        .filter(rollout::Column::Id.eq(r.id))
        .filter(rollout::Column::RowVersion.eq(r.row_version))
        .exec(&txn)
        .await?;
    if updated.rows_affected != 1 {
        return Ok(None);
    }
    if !ch.to.is_active() {
        let mut q = adapter::Entity::update_many()
            .col_expr(adapter::Column::ActiveRolloutId, Expr::value(None::<i32>))
            .filter(adapter::Column::Id.eq(r.adapter_id))
            .filter(adapter::Column::ActiveRolloutId.eq(r.id));
        if ch.to == RolloutState::Promoted {
            q = q.col_expr(adapter::Column::StableVersion, Expr::value(r.version));
        }
        q.exec(&txn).await?;
    }
    record(
        &txn,
        hooks,
        r.id,
        actor,
        ch.action,
        Some(from),
        ch.to,
        ch.weight,
        ch.reason,
        ch.details,
    )
    .await?;
    if ch.weight != r.weight || !ch.to.is_active() {
        bump_revision(&txn).await?;
    }
    txn.commit().await?;
    Ok(rollout::Entity::find_by_id(r.id).one(db).await?)
}

/// A deployer's action on the active rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Promote,
    Pause,
    Resume,
    Abort,
}

impl std::str::FromStr for Action {
    type Err = ApiError;
    fn from_str(s: &str) -> Result<Self, ApiError> {
        Ok(match s {
            "promote" => Self::Promote,
            "pause" => Self::Pause,
            "resume" => Self::Resume,
            "abort" => Self::Abort,
            _ => {
                return Err(ApiError::not_found(format!(
                    "unknown rollout action {s:?} (promote, pause, resume, abort)"
                )));
            }
        })
    }
}

pub async fn act(
    db: &DatabaseConnection,
    hooks: &Webhooks,
    a: &adapter::Model,
    action: Action,
    actor: &str,
) -> Result<rollout::Model, ApiError> {
    let r = match a.active_rollout_id {
        Some(id) => rollout::Entity::find_by_id(id).one(db).await?,
        None => None,
    }
    .ok_or_else(|| ApiError::conflict(format!("{} has no active rollout", a.name)))?;
    let state: RolloutState = r.state.parse().map_err(ApiError::internal)?;
    let now = Utc::now();
    let ch = match (action, state) {
        (Action::Promote, _) => Change {
            action: "promote",
            to: RolloutState::Promoted,
            step_index: r.step_index,
            weight: 100.0,
            failures: r.failures,
            window_start: None,
            reason: format!("promoted by {actor}: v{} is now stable", r.version),
            details: None,
        },
        (Action::Abort, _) => Change {
            action: "abort",
            to: RolloutState::Aborted,
            step_index: r.step_index,
            weight: 0.0,
            failures: r.failures,
            window_start: None,
            reason: format!("aborted by {actor}; traffic back on the stable version"),
            details: None,
        },
        (Action::Pause, RolloutState::Running) => Change {
            action: "pause",
            to: RolloutState::Paused,
            step_index: r.step_index,
            weight: r.weight,
            failures: r.failures,
            window_start: r.last_analysis_at,
            reason: format!("paused by {actor} at {}%", r.weight),
            details: None,
        },
        (Action::Resume, RolloutState::Paused) => Change {
            action: "resume",
            to: RolloutState::Running,
            step_index: r.step_index,
            weight: r.weight,
            failures: r.failures,
            // Data from before the pause does not count toward the next verdict.
            window_start: Some(now),
            reason: format!("resumed by {actor} at {}%", r.weight),
            details: None,
        },
        (Action::Pause, s) | (Action::Resume, s) => {
            return Err(ApiError::conflict(format!(
                "the rollout is {}; cannot {:?} it",
                s.as_str(),
                action
            )));
        }
    };
    transition(db, hooks, &r, actor, ch).await?.ok_or_else(|| {
        ApiError::conflict("the rollout changed while this action was applied; retry")
    })
}

// ---------------------------------------------------------------------------------------------
// Analysis.

/// One arm's counters summed over gateways and reports.
#[derive(Debug, Default, Clone)]
struct Sum {
    version: u32,
    requests: u64,
    errors: u64,
    /// Upper bound (ms, as bits for ordering) → cumulative count.
    buckets: BTreeMap<u64, u64>,
    judge_score_sum: f64,
    judge_scored: u64,
}

impl Sum {
    fn add(&mut self, o: &observation::Model) {
        self.requests += o.requests.max(0) as u64;
        self.errors += o.errors.max(0) as u64;
        self.judge_score_sum += o.judge_score_sum;
        self.judge_scored += o.judge_scored.max(0) as u64;
        let b: Vec<(f64, u64)> = serde_json::from_value(o.latency.clone()).unwrap_or_default();
        for (le, c) in b {
            *self.buckets.entry(le.to_bits()).or_default() += c;
        }
    }

    /// Latency quantile in ms, linearly interpolated within its bucket (as Prometheus does).
    fn quantile(&self, q: f64) -> Option<f64> {
        let mut bounds: Vec<(f64, u64)> = self
            .buckets
            .iter()
            .map(|(b, c)| (f64::from_bits(*b), *c))
            .collect();
        bounds.sort_by(|x, y| x.0.total_cmp(&y.0));
        let total = bounds.last()?.1;
        if total == 0 {
            return None;
        }
        let target = q * total as f64;
        let (mut lo, mut below) = (0.0, 0u64);
        for (le, cum) in bounds {
            if cum as f64 >= target {
                let inside = (cum - below) as f64;
                let frac = if inside > 0.0 {
                    (target - below as f64) / inside
                } else {
                    1.0
                };
                return Some(lo + (le - lo) * frac.clamp(0.0, 1.0));
            }
            lo = le;
            below = cum;
        }
        Some(lo)
    }

    fn metrics(&self, arm: &str, total: u64) -> ArmMetrics {
        ArmMetrics {
            arm: arm.into(),
            version: self.version,
            requests: self.requests,
            errors: self.errors,
            error_rate: if self.requests > 0 {
                self.errors as f64 / self.requests as f64
            } else {
                0.0
            },
            latency_p95_ms: self.quantile(0.95),
            latency_p99_ms: self.quantile(0.99),
            judge_score: (self.judge_scored > 0)
                .then(|| self.judge_score_sum / self.judge_scored as f64),
            judge_scored: self.judge_scored,
            share: if total > 0 {
                100.0 * self.requests as f64 / total as f64
            } else {
                0.0
            },
        }
    }
}

/// The canary's and the stable arm's metrics since `since`.
pub async fn window(
    db: &impl ConnectionTrait,
    r: &rollout::Model,
    since: DateTime<Utc>,
) -> Result<(ArmMetrics, ArmMetrics), ApiError> {
    let rows = observation::Entity::find()
        .filter(observation::Column::AdapterId.eq(r.adapter_id))
        .filter(observation::Column::WindowEnd.gt(since))
        .all(db)
        .await?;
    let mut canary = Sum {
        version: r.version as u32,
        ..Default::default()
    };
    let mut stable = Sum {
        version: r.from_version.unwrap_or(0) as u32,
        ..Default::default()
    };
    for o in &rows {
        match o.arm.as_str() {
            "canary" if o.version == r.version => canary.add(o),
            "stable" => stable.add(o),
            _ => {}
        }
    }
    let total = canary.requests + stable.requests;
    Ok((
        canary.metrics("canary", total),
        stable.metrics("stable", total),
    ))
}

fn metric(m: &ArmMetrics, name: &str) -> Option<f64> {
    match name {
        "error_rate" => (m.requests > 0).then_some(m.error_rate),
        "latency_p95_ms" => m.latency_p95_ms,
        "latency_p99_ms" => m.latency_p99_ms,
        // From the gateways' online judge; without scored answers the rule holds.
        "judge_score" => m.judge_score,
        _ => None,
    }
}

/// What one analysis concluded.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// Too little data (or a rule's metric has none): neither advance nor count a failure.
    Hold(String),
    Pass,
    Fail(Vec<String>),
}

pub fn judge(spec: &RolloutSpec, canary: &ArmMetrics) -> Verdict {
    if canary.requests < spec.min_requests {
        return Verdict::Hold(format!(
            "too little data: the canary served {} of the {} requests needed",
            canary.requests, spec.min_requests
        ));
    }
    let mut failed = Vec::new();
    for rule in &spec.rules {
        let Some(v) = metric(canary, &rule.metric) else {
            return Verdict::Hold(format!("no data yet for {}", rule.metric));
        };
        let ok = match rule.op {
            Comparison::Ge => v >= rule.threshold,
            Comparison::Gt => v > rule.threshold,
            Comparison::Le => v <= rule.threshold,
            Comparison::Lt => v < rule.threshold,
        };
        if !ok {
            failed.push(format!(
                "{} = {v:.4} violates {} {}",
                rule.metric,
                serde_json::to_value(rule.op)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                rule.threshold
            ));
        }
    }
    if failed.is_empty() {
        Verdict::Pass
    } else {
        Verdict::Fail(failed)
    }
}

/// Analyse one running rollout whose interval has elapsed, and apply the verdict.
async fn step(
    db: &DatabaseConnection,
    hooks: &Webhooks,
    metrics: &Metrics,
    r: rollout::Model,
    now: DateTime<Utc>,
) -> Result<(), ApiError> {
    let spec: RolloutSpec =
        serde_json::from_value(r.spec.clone()).map_err(|e| ApiError::internal(e.to_string()))?;
    let since = r.last_analysis_at.unwrap_or(r.created_at);
    if now - since < chrono::Duration::seconds(spec.interval_secs as i64) {
        return Ok(());
    }
    let (canary, stable) = window(db, &r, since).await?;
    let details = json!({ "window_start": since, "window_end": now, "arms": [canary, stable] });
    match judge(&spec, &canary) {
        Verdict::Hold(why) => {
            // One hold record per interval, not one per tick.
            let last = rollout_event::Entity::find()
                .filter(rollout_event::Column::RolloutId.eq(r.id))
                .order_by_desc(rollout_event::Column::Id)
                .one(db)
                .await?;
            let recent = last.is_some_and(|e| {
                e.action == "hold"
                    && now - e.at < chrono::Duration::seconds(spec.interval_secs as i64)
            });
            if !recent {
                let state: RolloutState = r.state.parse().map_err(ApiError::internal)?;
                record(
                    db,
                    hooks,
                    r.id,
                    CONTROLLER,
                    "hold",
                    Some(state),
                    state,
                    r.weight,
                    format!("holding at {}%: {why}", r.weight),
                    Some(details),
                )
                .await?;
            }
        }
        Verdict::Pass => {
            let next = r.step_index as usize + 1;
            let ch = if next >= spec.steps.len() {
                Change {
                    action: "promote",
                    to: RolloutState::Promoted,
                    step_index: r.step_index,
                    weight: 100.0,
                    failures: r.failures,
                    window_start: None,
                    reason: format!(
                        "all steps passed; v{} is now stable (canary {} requests, error rate {:.4})",
                        r.version, canary.requests, canary.error_rate
                    ),
                    details: Some(details),
                }
            } else {
                Change {
                    action: "advance",
                    to: RolloutState::Running,
                    step_index: next as i32,
                    weight: spec.steps[next],
                    failures: r.failures,
                    window_start: Some(now),
                    reason: format!(
                        "analysis passed at {}% (canary {} requests, error rate {:.4}); advancing to {}%",
                        r.weight, canary.requests, canary.error_rate, spec.steps[next]
                    ),
                    details: Some(details),
                }
            };
            let action = ch.action;
            if transition(db, hooks, &r, CONTROLLER, ch).await?.is_some() {
                metrics
                    .rollout_transitions
                    .with_label_values(&[action])
                    .inc();
            }
        }
        Verdict::Fail(why) => {
            let failures = r.failures + 1;
            let ch = if failures as u32 >= spec.failure_limit {
                Change {
                    action: "rollback",
                    to: RolloutState::RolledBack,
                    step_index: r.step_index,
                    weight: 0.0,
                    failures,
                    window_start: None,
                    reason: format!(
                        "rolled back after {failures} failed analyses (limit {}): {}",
                        spec.failure_limit,
                        why.join("; ")
                    ),
                    details: Some(details),
                }
            } else {
                Change {
                    action: "analysis_failed",
                    to: RolloutState::Running,
                    step_index: r.step_index,
                    weight: r.weight,
                    failures,
                    window_start: Some(now),
                    reason: format!(
                        "analysis failed ({failures} of {}): {}",
                        spec.failure_limit,
                        why.join("; ")
                    ),
                    details: Some(details),
                }
            };
            let action = ch.action;
            if transition(db, hooks, &r, CONTROLLER, ch).await?.is_some() {
                metrics
                    .rollout_transitions
                    .with_label_values(&[action])
                    .inc();
                if action == "rollback"
                    && let Some(a) = adapter::Entity::find_by_id(r.adapter_id).one(db).await?
                {
                    metrics
                        .rollouts_rolled_back
                        .with_label_values(&[&a.name])
                        .inc();
                }
            }
        }
    }
    Ok(())
}

/// One pass of the controller over every running rollout.
pub async fn tick(
    db: &DatabaseConnection,
    hooks: &Webhooks,
    metrics: &Metrics,
) -> Result<(), ApiError> {
    let running = rollout::Entity::find()
        .filter(rollout::Column::State.eq(RolloutState::Running.as_str()))
        .all(db)
        .await?;
    let now = Utc::now();
    for r in running {
        let id = r.id;
        if let Err(e) = step(db, hooks, metrics, r, now).await {
            tracing::warn!(rollout = id, error = %e, "rollout analysis failed; retrying next tick");
        }
    }
    Ok(())
}

/// Take or renew the controller lease; true while this replica holds it.
pub async fn hold_lease(
    db: &DatabaseConnection,
    holder: &str,
    ttl: Duration,
) -> Result<bool, ApiError> {
    let now = Utc::now();
    let until = now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::seconds(15));
    lease::Entity::insert(lease::ActiveModel {
        name: Set(LEASE.into()),
        holder: Set(holder.into()),
        expires_at: Set(until),
    })
    .on_conflict(
        OnConflict::column(lease::Column::Name)
            .do_nothing()
            .to_owned(),
    )
    .exec_without_returning(db)
    .await?;
    let renewed = lease::Entity::update_many()
        .col_expr(lease::Column::Holder, Expr::value(holder))
        .col_expr(lease::Column::ExpiresAt, Expr::value(until))
        .filter(lease::Column::Name.eq(LEASE))
        .filter(sea_orm::sea_query::ExprTrait::or(
            lease::Column::Holder.eq(holder),
            lease::Column::ExpiresAt.lt(now),
        ))
        .exec(db)
        .await?;
    Ok(renewed.rows_affected == 1)
}

/// Run the controller until the returned task is aborted.
pub fn spawn(state: web::Data<AppState>) -> tokio::task::JoinHandle<()> {
    let every = Duration::from_millis(state.settings.registry.controller_tick_ms.max(50));
    let ttl = Duration::from_secs(state.settings.registry.controller_lease_secs.max(1));
    let holder = format!(
        "{}-{}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "registry".into()),
        uuid::Uuid::new_v4()
    );
    tokio::spawn(async move {
        let mut leading = false;
        loop {
            match hold_lease(&state.db, &holder, ttl).await {
                Ok(now_leading) => {
                    if now_leading != leading {
                        tracing::info!(holder, leading = now_leading, "rollout controller lease");
                    }
                    leading = now_leading;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot renew the rollout controller lease");
                    leading = false;
                }
            }
            if leading && let Err(e) = tick(&state.db, &state.webhooks, &state.metrics).await {
                tracing::warn!(error = %e, "rollout controller tick failed");
            }
            tokio::time::sleep(every).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arm(requests: u64, errors: u64) -> ArmMetrics {
        ArmMetrics {
            arm: "canary".into(),
            version: 2,
            requests,
            errors,
            error_rate: errors as f64 / requests.max(1) as f64,
            latency_p95_ms: Some(10.0),
            latency_p99_ms: Some(20.0),
            judge_score: None,
            judge_scored: 0,
            share: 5.0,
        }
    }

    #[test]
    fn judge_score_rules_hold_until_answers_are_scored() {
        let spec = RolloutSpec {
            rules: vec![AnalysisRule {
                metric: "judge_score".into(),
                op: Comparison::Ge,
                threshold: 0.6,
            }],
            ..Default::default()
        };
        let mut m = arm(100, 0);
        assert!(matches!(judge(&spec, &m), Verdict::Hold(_)));
        m.judge_score = Some(0.7);
        m.judge_scored = 20;
        assert_eq!(judge(&spec, &m), Verdict::Pass);
        m.judge_score = Some(0.5);
        assert!(matches!(judge(&spec, &m), Verdict::Fail(_)));
    }

    #[test]
    fn too_little_data_holds_never_passes() {
        let spec = RolloutSpec {
            rules: default_rules(),
            ..Default::default()
        };
        assert!(matches!(judge(&spec, &arm(0, 0)), Verdict::Hold(_)));
        assert!(matches!(judge(&spec, &arm(49, 49)), Verdict::Hold(_)));
        assert_eq!(judge(&spec, &arm(50, 0)), Verdict::Pass);
        assert!(matches!(judge(&spec, &arm(50, 10)), Verdict::Fail(_)));
    }

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let mut s = Sum::default();
        for (le, c) in [(10.0f64, 50u64), (20.0, 100)] {
            s.buckets.insert(le.to_bits(), c);
        }
        assert_eq!(s.quantile(0.5), Some(10.0));
        assert!((s.quantile(0.75).unwrap() - 15.0).abs() < 1e-9);
        assert!((s.quantile(0.99).unwrap() - 19.8).abs() < 1e-9);
    }

    #[test]
    fn specs_are_checked() {
        let ok = RolloutSpec::default();
        assert!(check_spec(&ok).is_ok());
        for bad in [
            RolloutSpec {
                steps: vec![],
                ..Default::default()
            },
            RolloutSpec {
                steps: vec![50.0, 25.0],
                ..Default::default()
            },
            RolloutSpec {
                steps: vec![5.0, 150.0],
                ..Default::default()
            },
            RolloutSpec {
                failure_limit: 0,
                ..Default::default()
            },
            RolloutSpec {
                rules: vec![AnalysisRule {
                    metric: "vibes".into(),
                    op: Comparison::Ge,
                    threshold: 1.0,
                }],
                ..Default::default()
            },
        ] {
            assert!(check_spec(&bad).is_err(), "{bad:?}");
        }
    }
}
