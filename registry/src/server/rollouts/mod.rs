//! Canary rollouts: starting one (behind the gate), deployers' actions (promote, pause,
//! resume, abort, approve, rollback-promotion), and the controller that analyses the gateways'
//! per-arm observations each interval and advances, holds, promotes or rolls back.
//!
//! All state lives in the database, so a restarted registry resumes where it was. Every
//! transition is one transaction guarded by the rollout's `row_version` (a transition that
//! lost a race changes nothing), and only the replica holding the `rollout-controller` lease
//! runs the analysis loop, so several replicas never double-step a rollout.
//!
//! `analysis.rs` is the statistics, pure; `controller.rs` the loop that feeds it from the
//! database and applies its decisions; this module the lifecycle they share.

pub mod analysis;
pub mod controller;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, QueryFilter,
    QueryOrder, Set, TransactionTrait,
};
use serde_json::{Value, json};

pub use controller::{CONTROLLER_TASK, hold_lease, prune_observations, spawn, tick};

use super::entities::{adapter, evidence, gateway_seen, rollout, rollout_event, routing_state};
use super::error::ApiError;
use super::gate;
use super::records;
use super::webhooks::Webhooks;
use crate::api::{
    AnalysisRule, Comparison, Name, Relation, Rollout, RolloutEvent, RolloutSpec, RolloutState,
    StartRollout,
};

/// The actor of the controller's own transitions in the audit trail.
pub const CONTROLLER: &str = "controller";

/// Rules used when a rollout names none: the canary's error rate no worse than stable's by
/// more than half a point, its latency no more than 10 % slower (both at 95 % confidence), and,
/// as before, at most 5 % errors in any interval.
pub fn default_rules() -> Vec<AnalysisRule> {
    vec![
        AnalysisRule {
            metric: "error_rate".into(),
            op: Comparison::Le,
            threshold: 0.005,
            compare: Some(Relation::Difference),
            confidence: Some(0.95),
        },
        AnalysisRule {
            metric: "latency".into(),
            op: Comparison::Le,
            threshold: 1.1,
            compare: Some(Relation::Ratio),
            confidence: Some(0.95),
        },
        AnalysisRule {
            metric: "error_rate".into(),
            op: Comparison::Le,
            threshold: 0.05,
            compare: None,
            confidence: None,
        },
    ]
}

/// Longest interval, hold and duration a spec may name: a week (beyond it, chrono's durations
/// and the database's timestamps stay far from overflow).
const MAX_SECS: u64 = 7 * 24 * 3600;

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
    if spec.interval_secs > MAX_SECS {
        return bad(format!("interval_secs must be at most {MAX_SECS} (a week)"));
    }
    if spec.failure_limit == 0 {
        return bad("failure_limit must be at least 1".into());
    }
    if spec.min_users > 100 {
        return bad(format!(
            "min_users is {} but users are counted in {} groups: at most 100",
            spec.min_users,
            crate::api::USER_GROUPS
        ));
    }
    for (name, v) in [
        ("max_hold_secs", spec.max_hold_secs),
        ("max_duration_secs", spec.max_duration_secs),
    ] {
        if let Some(v) = v
            && !(spec.interval_secs..=MAX_SECS * 4).contains(&v)
        {
            return bad(format!(
                "{name} must be between interval_secs ({}) and {} s; got {v}",
                spec.interval_secs,
                MAX_SECS * 4
            ));
        }
    }
    for w in &spec.approve_before {
        if !(spec.steps.contains(w) || *w == 100.0) {
            return bad(format!(
                "approve_before {w} is neither one of the steps {:?} nor 100 (the promotion)",
                spec.steps
            ));
        }
    }
    if let Some(sh) = &spec.shadow
        && !(sh.percent.is_finite() && sh.percent > 0.0 && sh.percent <= 100.0)
    {
        return bad(format!(
            "shadow.percent must be within (0, 100]; got {}",
            sh.percent
        ));
    }
    for r in &spec.rules {
        if !r.threshold.is_finite() {
            return bad(format!("rule on {} has a non-finite threshold", r.metric));
        }
        match r.compare {
            None => {
                if !analysis::ABSOLUTE.contains(&r.metric.as_str()) {
                    return bad(format!(
                        "unknown analysis metric {:?} (absolute rules: {:?})",
                        r.metric,
                        analysis::ABSOLUTE
                    ));
                }
                if r.confidence.is_some() {
                    return bad(format!(
                        "rule {r}: a confidence applies to relative rules only"
                    ));
                }
            }
            Some(rel) => {
                let Some((_, want)) = analysis::RELATIVE.iter().find(|(m, _)| *m == r.metric)
                else {
                    return bad(format!(
                        "unknown relative metric {:?} (relative rules: {})",
                        r.metric,
                        analysis::RELATIVE
                            .iter()
                            .map(|(m, rel)| format!("{m} ({rel:?})").to_lowercase())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                };
                if rel != *want {
                    return bad(format!(
                        "{} compares as a {}, not a {}",
                        r.metric,
                        format!("{want:?}").to_lowercase(),
                        format!("{rel:?}").to_lowercase()
                    ));
                }
                if !(r.confidence() > 0.5 && r.confidence() < 1.0) {
                    return bad(format!("rule {r}: confidence must be within (0.5, 1)"));
                }
            }
        }
    }
    Ok(())
}

/// A gateway must have reported an online judge this recently for judge rules to start.
const JUDGE_SEEN: chrono::Duration = chrono::Duration::minutes(10);

/// Judge rules without a judge would hold until `max_hold`: refuse them at start instead.
async fn check_judge(
    db: &impl ConnectionTrait,
    spec: &RolloutSpec,
    now: DateTime<Utc>,
) -> Result<(), ApiError> {
    let Some(rule) = spec
        .rules
        .iter()
        .find(|r| analysis::JUDGED.contains(&r.metric.as_str()))
    else {
        return Ok(());
    };
    let judged = gateway_seen::Entity::find()
        .filter(gateway_seen::Column::Judge.is_not_null())
        .filter(gateway_seen::Column::LastSeen.gt(now - JUDGE_SEEN))
        .one(db)
        .await?;
    if judged.is_none() {
        return Err(ApiError::unprocessable(
            "no_judge",
            format!(
                "rule {rule} needs an online judge, and no gateway with one (gateway.judge) has \
                 reported in the last {} minutes",
                JUDGE_SEEN.num_minutes()
            ),
        ));
    }
    Ok(())
}

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
    let announce = if action == "await_approval" {
        details.clone()
    } else {
        None
    };
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
        let mut payload = json!({"rollout_id": rollout_id, "adapter": a.map(|a| a.name),
            "version": r.map(|r| r.version), "actor": actor,
            "from": from.map(|s| s.as_str()), "to": to.as_str(), "weight": weight,
            "reason": reason});
        // A wait for approval carries the analysis so far: what the approver decides on.
        if let Some(a) = announce {
            payload["analysis"] = a;
        }
        hooks
            .emit(db, &format!("rollout.{action}"), payload)
            .await?;
    }
    Ok(())
}

/// Start a canary of `req.version` (or its shadow phase, when the spec has one), if the gate
/// passes. Errors: 404 unknown version, 409 another rollout is active or the version is
/// already stable, 422 invalid spec, a judge rule without a judge, or a failing gate (with the
/// per-rule report as details). Nothing changes on error.
pub async fn start(
    db: &DatabaseConnection,
    hooks: &Webhooks,
    name: &Name,
    mut req: StartRollout,
    actor: &str,
) -> Result<Rollout, ApiError> {
    if req.spec.rules.is_empty() {
        req.spec.rules = default_rules();
    }
    check_spec(&req.spec)?;
    let now = controller::db_now(db).await?;
    check_judge(db, &req.spec, now).await?;
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
        let failed = report.failed_rules();
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
    let shadow = req.spec.shadow.clone();
    let (state, weight) = match &shadow {
        Some(_) => (RolloutState::Shadowing, 0.0),
        None => (RolloutState::Running, req.spec.steps[0]),
    };
    let r = rollout::ActiveModel {
        adapter_id: Set(a.id),
        version: Set(v.version),
        from_version: Set(a.stable_version),
        state: Set(state.as_str().into()),
        step_index: Set(0),
        weight: Set(weight),
        failures: Set(0),
        spec: Set(serde_json::to_value(&req.spec).expect("spec serialises")),
        row_version: Set(0),
        last_analysis_at: Set(Some(now)),
        created_by: Set(actor.to_string()),
        created_at: Set(now),
        updated_at: Set(now),
        step_started_at: Set(Some(now)),
        canary_since: Set(shadow.is_none().then_some(now)),
        cumulative: Set(None),
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
    let what = match &shadow {
        Some(sh) => format!(
            "shadow phase: {}% of stable requests mirrored to v{}, no user sees it",
            sh.percent, v.version
        ),
        None => format!("canary at {weight}%"),
    };
    record(
        &txn,
        hooks,
        r.id,
        actor,
        "start",
        None,
        state,
        weight,
        format!(
            "gate {} passed ({} rules); {what}",
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
pub(crate) struct Change {
    pub action: &'static str,
    pub to: RolloutState,
    pub step_index: i32,
    pub weight: f64,
    pub failures: i32,
    /// Start of the next analysis interval.
    pub window_start: Option<DateTime<Utc>>,
    /// A new step (or phase) begins: `max_hold` counts from now.
    pub new_step: bool,
    /// The canary phase begins (after the shadow phase).
    pub canary_from: Option<DateTime<Utc>>,
    /// The folded cumulative sample: `Some(Value::Null)` clears it, `None` keeps it.
    pub cumulative: Option<Value>,
    /// Evidence to store with the transition (the shadow phase's analysis).
    pub evidence: Option<evidence::ActiveModel>,
    pub reason: String,
    pub details: Option<Value>,
}

impl Change {
    pub(crate) fn new(action: &'static str, to: RolloutState, r: &rollout::Model) -> Self {
        Self {
            action,
            to,
            step_index: r.step_index,
            weight: r.weight,
            failures: r.failures,
            window_start: r.last_analysis_at,
            new_step: false,
            canary_from: None,
            cumulative: None,
            evidence: None,
            reason: String::new(),
            details: None,
        }
    }
}

/// Apply `ch` to `r` if nobody changed `r` since it was read. Terminal states release the
/// adapter (and promotion makes the canary stable). Returns the new row, or `None` when the
/// rollout changed underneath (the caller re-reads).
pub(crate) async fn transition(
    db: &DatabaseConnection,
    hooks: &Webhooks,
    r: &rollout::Model,
    actor: &str,
    ch: Change,
    now: DateTime<Utc>,
) -> Result<Option<rollout::Model>, ApiError> {
    let from: RolloutState = r.state.parse().map_err(ApiError::internal)?;
    let txn = db.begin().await?;
    let mut q = rollout::Entity::update_many()
        .col_expr(rollout::Column::State, Expr::value(ch.to.as_str()))
        .col_expr(rollout::Column::StepIndex, Expr::value(ch.step_index))
        .col_expr(rollout::Column::Weight, Expr::value(ch.weight))
        .col_expr(rollout::Column::Failures, Expr::value(ch.failures))
        .col_expr(
            rollout::Column::LastAnalysisAt,
            Expr::value(ch.window_start),
        )
        .col_expr(rollout::Column::RowVersion, Expr::value(r.row_version + 1))
        .col_expr(rollout::Column::UpdatedAt, Expr::value(now));
    if ch.new_step {
        q = q.col_expr(rollout::Column::StepStartedAt, Expr::value(Some(now)));
    }
    if let Some(t) = ch.canary_from {
        q = q.col_expr(rollout::Column::CanarySince, Expr::value(Some(t)));
    }
    if let Some(c) = ch.cumulative {
        let c = (!c.is_null()).then_some(c);
        q = q.col_expr(rollout::Column::Cumulative, Expr::value(c));
    }
    let updated = q
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
    if let Some(e) = ch.evidence {
        e.insert(&txn).await?;
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
    // Routing changes with the weight, the end, and the shadow phase's end.
    if ch.weight != r.weight || !ch.to.is_active() || ch.canary_from.is_some() {
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
    Approve,
    /// On the latest (promoted) rollout: make its previous stable version stable again.
    RollbackPromotion,
}

impl std::str::FromStr for Action {
    type Err = ApiError;
    fn from_str(s: &str) -> Result<Self, ApiError> {
        Ok(match s {
            "promote" => Self::Promote,
            "pause" => Self::Pause,
            "resume" => Self::Resume,
            "abort" => Self::Abort,
            "approve" => Self::Approve,
            "rollback-promotion" => Self::RollbackPromotion,
            _ => {
                return Err(ApiError::not_found(format!(
                    "unknown rollout action {s:?} (promote, pause, resume, abort, approve, \\
                     rollback-promotion)"
                )));
            }
        })
    }
}

/// The change that moves a rollout to the step (or promotion) after its current phase.
pub(crate) fn go(
    r: &rollout::Model,
    spec: &RolloutSpec,
    next: analysis::Next,
    action: &'static str,
    now: DateTime<Utc>,
) -> Change {
    let from_shadow = r.canary_since.is_none();
    let mut ch = match next {
        analysis::Next::Promote => Change {
            weight: 100.0,
            window_start: None,
            ..Change::new("promote", RolloutState::Promoted, r)
        },
        analysis::Next::Step(i) => Change {
            step_index: i as i32,
            weight: spec.steps[i],
            window_start: Some(now),
            new_step: true,
            ..Change::new(action, RolloutState::Running, r)
        },
    };
    if from_shadow {
        // The canary phase's analysis starts empty: shadow data is not user traffic.
        ch.canary_from = Some(now);
        ch.cumulative = Some(Value::Null);
    }
    ch
}

pub async fn act(
    db: &DatabaseConnection,
    hooks: &Webhooks,
    a: &adapter::Model,
    action: Action,
    actor: &str,
) -> Result<rollout::Model, ApiError> {
    if action == Action::RollbackPromotion {
        return rollback_promotion(db, hooks, a, actor).await;
    }
    let r = match a.active_rollout_id {
        Some(id) => rollout::Entity::find_by_id(id).one(db).await?,
        None => None,
    }
    .ok_or_else(|| ApiError::conflict(format!("{} has no active rollout", a.name)))?;
    let state: RolloutState = r.state.parse().map_err(ApiError::internal)?;
    let spec: RolloutSpec =
        serde_json::from_value(r.spec.clone()).map_err(|e| ApiError::internal(e.to_string()))?;
    let now = controller::db_now(db).await?;
    let ch = match (action, state) {
        (Action::Promote, _) => Change {
            weight: 100.0,
            window_start: None,
            reason: format!("promoted by {actor}: v{} is now stable", r.version),
            ..Change::new("promote", RolloutState::Promoted, &r)
        },
        (Action::Abort, _) => Change {
            weight: 0.0,
            window_start: None,
            reason: format!("aborted by {actor}; traffic back on the stable version"),
            ..Change::new("abort", RolloutState::Aborted, &r)
        },
        (Action::Pause, RolloutState::Running | RolloutState::Shadowing) => Change {
            reason: format!("paused by {actor} at {}%", r.weight),
            ..Change::new("pause", RolloutState::Paused, &r)
        },
        (Action::Resume, RolloutState::Paused) => {
            let to = if r.canary_since.is_none() {
                RolloutState::Shadowing
            } else {
                RolloutState::Running
            };
            Change {
                // Data from before the pause does not count toward the next verdict, and
                // max_hold counts from the resume.
                window_start: Some(now),
                new_step: true,
                reason: format!("resumed by {actor} at {}%", r.weight),
                ..Change::new("resume", to, &r)
            }
        }
        (Action::Approve, RolloutState::AwaitingApproval) => {
            let phase = if r.canary_since.is_none() {
                analysis::Phase::Shadow
            } else {
                analysis::Phase::Step(r.step_index as usize)
            };
            let next = analysis::next_after(&spec, phase);
            let mut ch = go(&r, &spec, next, "approve", now);
            ch.action = "approve";
            ch.reason = match next {
                analysis::Next::Step(i) => {
                    format!("approved by {actor}: canary to {}%", spec.steps[i])
                }
                analysis::Next::Promote => {
                    format!("approved by {actor}: v{} is now stable", r.version)
                }
            };
            ch
        }
        (Action::Pause | Action::Resume | Action::Approve, s) => {
            return Err(ApiError::conflict(format!(
                "the rollout is {}; cannot {} it",
                s.as_str(),
                format!("{action:?}").to_lowercase()
            )));
        }
        (Action::RollbackPromotion, _) => unreachable!("handled above"),
    };
    transition(db, hooks, &r, actor, ch, now)
        .await?
        .ok_or_else(|| {
            ApiError::conflict("the rollout changed while this action was applied; retry")
        })
}

/// Revert the latest rollout's promotion: its previous stable version is stable again, in one
/// transaction with the audit event. Refused (409) while a rollout is active, when the stable
/// version is no longer the one that rollout promoted, or when it promoted a first version.
async fn rollback_promotion(
    db: &DatabaseConnection,
    hooks: &Webhooks,
    a: &adapter::Model,
    actor: &str,
) -> Result<rollout::Model, ApiError> {
    if a.active_rollout_id.is_some() {
        return Err(ApiError::conflict(format!(
            "{} has an active rollout; finish or abort it before reverting a promotion",
            a.name
        )));
    }
    let r = current(db, a)
        .await?
        .ok_or_else(|| ApiError::conflict(format!("{} has never had a rollout", a.name)))?;
    if r.state != RolloutState::Promoted.as_str() || a.stable_version != Some(r.version) {
        return Err(ApiError::conflict(format!(
            "the latest rollout of {} (v{}, {}) is not the promotion that made the stable \\
             version; nothing to revert",
            a.name, r.version, r.state
        )));
    }
    let Some(previous) = r.from_version else {
        return Err(ApiError::conflict(format!(
            "v{} was {}'s first version: there is no previous stable version to restore",
            r.version, a.name
        )));
    };
    let now = controller::db_now(db).await?;
    let txn = db.begin().await?;
    let reverted = adapter::Entity::update_many()
        .col_expr(adapter::Column::StableVersion, Expr::value(previous))
        .filter(adapter::Column::Id.eq(a.id))
        .filter(adapter::Column::StableVersion.eq(r.version))
        .filter(adapter::Column::ActiveRolloutId.is_null())
        .exec(&txn)
        .await?;
    let guarded = rollout::Entity::update_many()
        .col_expr(
            rollout::Column::State,
            Expr::value(RolloutState::RolledBack.as_str()),
        )
        .col_expr(rollout::Column::Weight, Expr::value(0.0))
        .col_expr(rollout::Column::RowVersion, Expr::value(r.row_version + 1))
        .col_expr(rollout::Column::UpdatedAt, Expr::value(now))
        .filter(rollout::Column::Id.eq(r.id))
        .filter(rollout::Column::RowVersion.eq(r.row_version))
        .exec(&txn)
        .await?;
    if reverted.rows_affected != 1 || guarded.rows_affected != 1 {
        return Err(ApiError::conflict(
            "the adapter changed while the promotion was reverted; retry",
        ));
    }
    record(
        &txn,
        hooks,
        r.id,
        actor,
        "rollback_promotion",
        Some(RolloutState::Promoted),
        RolloutState::RolledBack,
        0.0,
        format!(
            "promotion of v{} reverted by {actor}: v{previous} is stable again",
            r.version
        ),
        None,
    )
    .await?;
    bump_revision(&txn).await?;
    txn.commit().await?;
    rollout::Entity::find_by_id(r.id)
        .one(db)
        .await?
        .ok_or_else(|| ApiError::internal("the reverted rollout vanished"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ShadowSpec;

    #[test]
    fn specs_are_checked() {
        let ok = RolloutSpec {
            rules: default_rules(),
            ..Default::default()
        };
        assert!(check_spec(&ok).is_ok());
        let rule = |s: &str| -> AnalysisRule { s.parse().unwrap() };
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
                rules: vec![rule("vibes >= 1")],
                ..Default::default()
            },
            // Each relative metric compares one way.
            RolloutSpec {
                rules: vec![rule("error_rate: canary / stable <= 2")],
                ..Default::default()
            },
            RolloutSpec {
                rules: vec![rule("latency: canary - stable <= 20")],
                ..Default::default()
            },
            RolloutSpec {
                rules: vec![rule("latency: canary / stable <= 1.1 at confidence 1.5")],
                ..Default::default()
            },
            RolloutSpec {
                min_users: 500,
                ..Default::default()
            },
            RolloutSpec {
                approve_before: vec![30.0],
                ..Default::default()
            },
            RolloutSpec {
                shadow: Some(ShadowSpec { percent: 0.0 }),
                ..Default::default()
            },
            RolloutSpec {
                interval_secs: 60,
                max_hold_secs: Some(30),
                ..Default::default()
            },
            RolloutSpec {
                interval_secs: u64::MAX / 2,
                ..Default::default()
            },
        ] {
            assert!(check_spec(&bad).is_err(), "{bad:?}");
        }
        let approvals = RolloutSpec {
            approve_before: vec![25.0, 100.0],
            shadow: Some(ShadowSpec { percent: 10.0 }),
            ..Default::default()
        };
        assert!(check_spec(&approvals).is_ok());
    }
}
