//! The rollout controller: each interval it reads the gateways' reports received since the
//! last verdict, adds them to the phase's folded sample, runs the analysis (`analysis.rs`) and
//! applies its decision as one guarded transition. It runs on the replica that holds the
//! `rollout-controller` lease, and prunes observations past their retention.
//!
//! Time is the database's (`db_now`): reports are windowed by when the registry received them,
//! and the lease compares one clock, so neither a gateway's nor a replica's clock skew moves
//! data between intervals or hands the lease to two replicas.

use std::collections::BTreeMap;
use std::time::Duration;

use actix_web::web;
use chrono::{DateTime, TimeDelta, Utc};
use futures_util::StreamExt;
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect, Set, Statement,
};
use serde_json::json;

use super::analysis::{self, ArmSample, Arms, Decision, Next, Phase, Progress, Verdict};
use super::{CONTROLLER, Change, go, record, transition};
use crate::api::{
    ArmObservation, EngineIdentity, Name, NewEvidence, RolloutSpec, RolloutState, SeriesPoint,
    SuiteRef, TimeoutPolicy,
};
use crate::server::AppState;
use crate::server::entities::{
    adapter, adapter_version, evidence, lease, observation, rollout, rollout_event,
};
use crate::server::error::ApiError;
use crate::server::metrics::Metrics;
use crate::server::webhooks::Webhooks;

const LEASE: &str = "rollout-controller";
/// Rollouts analysed at once in one tick.
const CONCURRENCY: usize = 16;
/// How often the leader prunes observations.
const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// The database's clock. On PostgreSQL every replica asks the server; an SQLite file is only
/// ever used by one machine, whose clock it is.
pub async fn db_now(db: &impl ConnectionTrait) -> Result<DateTime<Utc>, ApiError> {
    if db.get_database_backend() != DbBackend::Postgres {
        return Ok(Utc::now());
    }
    let row = db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT CURRENT_TIMESTAMP AS now",
        ))
        .await?
        .ok_or_else(|| ApiError::internal("SELECT CURRENT_TIMESTAMP returned no row"))?;
    Ok(row.try_get::<DateTime<Utc>>("", "now")?)
}

fn secs(s: u64) -> TimeDelta {
    TimeDelta::try_seconds(i64::try_from(s).unwrap_or(i64::MAX)).unwrap_or(TimeDelta::MAX)
}

/// A stored report as the analysis reads it.
pub fn to_observation(o: &observation::Model, name: &Name) -> ArmObservation {
    ArmObservation {
        adapter: name.clone(),
        version: o.version.max(0) as u32,
        arm: o.arm.clone(),
        requests: o.requests.max(0) as u64,
        errors: o.errors.max(0) as u64,
        latency_ms_buckets: serde_json::from_value(o.latency.clone()).unwrap_or_default(),
        tokens: o.tokens.max(0) as u64,
        answers: o.answers.max(0) as u64,
        tokens_sq_sum: o.tokens_sq,
        judge_scored: o.judge_scored.max(0) as u64,
        judge_score_sum: o.judge_score_sum,
        judge_score_sq_sum: o.judge_score_sq,
        agreement_scored: o.agreement_scored.max(0) as u64,
        agreement_sum: o.agreement_sum,
        users: o
            .users
            .clone()
            .and_then(|u| serde_json::from_value(u).ok())
            .unwrap_or_default(),
    }
}

/// An adapter's reports received in `(since, until]`: the analysis's one query, served by
/// the index on `(adapter_id, received_at)`.
pub fn interval_query(
    adapter_id: i32,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
) -> sea_orm::Select<observation::Entity> {
    observation::Entity::find()
        .filter(observation::Column::AdapterId.eq(adapter_id))
        .filter(observation::Column::ReceivedAt.gt(since))
        .filter(observation::Column::ReceivedAt.lte(until))
}

/// The candidate's and the stable arm's reports received in `(since, until]`.
pub async fn interval(
    db: &impl ConnectionTrait,
    r: &rollout::Model,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<Arms, ApiError> {
    let rows = interval_query(r.adapter_id, since, until).all(db).await?;
    let candidate = if r.canary_since.is_none() {
        "shadow"
    } else {
        "canary"
    };
    let stable = r.from_version.unwrap_or(0);
    let name = Name::parse("observed").expect("valid name");
    let mut arms = Arms::default();
    for o in &rows {
        if o.arm == candidate && o.version == r.version {
            arms.candidate.add(&to_observation(o, &name));
        } else if o.arm == "stable" && o.version == stable {
            arms.stable.add(&to_observation(o, &name));
        }
    }
    Ok(arms)
}

fn verdict_str(v: &Verdict) -> &'static str {
    match v {
        Verdict::Hold(_) => "hold",
        Verdict::Inconclusive(_) => "inconclusive",
        Verdict::Pass => "pass",
        Verdict::Fail(_) => "fail",
    }
}

/// Buckets of a live series at most: a chart has no use for more points than pixels.
const MAX_SERIES_POINTS: i64 = 2000;

/// The rollout's reports from its start to `until`, summed per arm in buckets of
/// `bucket_secs` by receive time (the analysis's clock): what a live chart draws. The bucket
/// is widened when the span would need more than [`MAX_SERIES_POINTS`].
pub async fn series(
    db: &impl ConnectionTrait,
    r: &rollout::Model,
    until: DateTime<Utc>,
    bucket_secs: u64,
) -> Result<(u64, Vec<SeriesPoint>), ApiError> {
    let start = r.created_at;
    let span = (until - start).num_seconds().max(1);
    let bucket = (bucket_secs.clamp(1, 86_400) as i64)
        .max((span + MAX_SERIES_POINTS - 1) / MAX_SERIES_POINTS);
    let rows = interval_query(r.adapter_id, start, until)
        .order_by_asc(observation::Column::ReceivedAt)
        .all(db)
        .await?;
    let stable = r.from_version.unwrap_or(0);
    let name = Name::parse("observed").expect("valid name");
    // bucket index → (candidate arm, candidate, stable)
    let mut buckets: BTreeMap<i64, (&str, ArmSample, ArmSample)> = BTreeMap::new();
    for o in &rows {
        let i = (o.received_at - start).num_seconds().max(0) / bucket;
        let b = buckets
            .entry(i)
            .or_insert_with(|| ("canary", ArmSample::default(), ArmSample::default()));
        if (o.arm == "canary" || o.arm == "shadow") && o.version == r.version {
            b.0 = if o.arm == "shadow" {
                "shadow"
            } else {
                "canary"
            };
            b.1.add(&to_observation(o, &name));
        } else if o.arm == "stable" && o.version == stable {
            b.2.add(&to_observation(o, &name));
        }
    }
    let points = buckets
        .into_iter()
        .filter(|(_, (_, c, s))| c.requests + s.requests > 0)
        .map(|(i, (arm, c, s))| {
            let total = c.requests + s.requests;
            SeriesPoint {
                at: (start + chrono::Duration::seconds((i + 1) * bucket)).min(until),
                arms: vec![
                    c.metrics(arm, r.version as u32, total),
                    s.metrics("stable", stable as u32, total),
                ],
            }
        })
        .collect();
    Ok((bucket as u64, points))
}

/// The shadow phase's analysis, stored as evidence of the version (suite `shadow`, digest
/// `rollout:ID`, which no gate can name: it documents, it does not admit).
async fn shadow_evidence(
    db: &impl ConnectionTrait,
    r: &rollout::Model,
    spec: &RolloutSpec,
    cumulative: &Arms,
    passed: bool,
    now: DateTime<Utc>,
) -> Result<evidence::ActiveModel, ApiError> {
    let v = adapter_version::Entity::find()
        .filter(adapter_version::Column::AdapterId.eq(r.adapter_id))
        .filter(adapter_version::Column::Version.eq(r.version))
        .one(db)
        .await?
        .ok_or_else(|| ApiError::internal(format!("rollout {} has no version row", r.id)))?;
    let (c, s) = (&cumulative.candidate, &cumulative.stable);
    let mut metrics = std::collections::BTreeMap::new();
    let mut put = |k: &str, v: Option<f64>| {
        if let Some(v) = v.filter(|v| v.is_finite()) {
            metrics.insert(k.to_string(), v);
        }
    };
    put("passed", Some(f64::from(u8::from(passed))));
    put("shadow_requests", Some(c.requests as f64));
    put("shadow_error_rate", c.error_rate());
    put("shadow_latency_p95_ms", c.quantile(0.95));
    put("shadow_tokens_per_answer", c.tokens_mean());
    put("stable_requests", Some(s.requests as f64));
    put("stable_error_rate", s.error_rate());
    put("stable_latency_p95_ms", s.quantile(0.95));
    put("stable_tokens_per_answer", s.tokens_mean());
    put("judge_agreement", c.agreement_mean());
    put("judge_agreement_scored", Some(c.agreement_n as f64));
    put("effective_users", c.effective_users());
    let body = NewEvidence {
        adapter_digest: v.digest.clone(),
        suite: SuiteRef {
            name: "shadow".into(),
            version: Some(format!("rollout-{}", r.id)),
            digest: format!("rollout:{}", r.id),
        },
        engine: EngineIdentity {
            engine: "loraops-gateway".into(),
            engine_version: "shadow".into(),
            model_digest: None,
            decoding: json!({
                "mirrored_percent": spec.shadow.as_ref().map(|s| s.percent),
                "rules": spec.rules.iter().map(ToString::to_string).collect::<Vec<_>>(),
            }),
        },
        metrics,
        cases: c.requests,
        cases_digest: None,
        produced_by: Some(format!(
            "loraops {} rollout controller",
            env!("CARGO_PKG_VERSION")
        )),
        started_at: r.created_at,
        finished_at: now,
    };
    Ok(evidence::ActiveModel {
        version_id: Set(v.id),
        adapter_digest: Set(v.digest),
        suite_name: Set(body.suite.name.clone()),
        suite_digest: Set(body.suite.digest.clone()),
        body: Set(serde_json::to_value(&body).expect("evidence serialises")),
        created_by: Set(CONTROLLER.into()),
        created_at: Set(now),
        ..Default::default()
    })
}

/// Analyse one active rollout whose interval has elapsed, and apply the decision.
async fn step(
    db: &DatabaseConnection,
    hooks: &Webhooks,
    metrics: &Metrics,
    r: rollout::Model,
    now: DateTime<Utc>,
) -> Result<(), ApiError> {
    let spec: RolloutSpec =
        serde_json::from_value(r.spec.clone()).map_err(|e| ApiError::internal(e.to_string()))?;
    let state: RolloutState = r.state.parse().map_err(ApiError::internal)?;
    let shadow = r.canary_since.is_none();
    let progress = Progress {
        phase: if shadow {
            Phase::Shadow
        } else {
            Phase::Step(r.step_index.max(0) as usize)
        },
        failures: r.failures.max(0) as u32,
        started_at: r.created_at,
        step_started_at: r.step_started_at.unwrap_or(r.created_at),
        now,
    };
    if state == RolloutState::AwaitingApproval {
        // While a deployer decides, only max_duration applies.
        if let Some(max) = spec.max_duration_secs
            && now - r.created_at >= secs(max)
        {
            let why = format!("max_duration of {max} s reached while awaiting approval");
            apply(
                db,
                hooks,
                metrics,
                &r,
                timeout(&r, spec.on_timeout, why),
                now,
            )
            .await?;
        }
        return Ok(());
    }
    let since = r.last_analysis_at.unwrap_or(r.created_at);
    if now - since < secs(spec.interval_secs) {
        return Ok(());
    }
    let arm = if shadow { "shadow" } else { "canary" };
    let interval = interval(db, &r, since, now).await?;
    let mut cumulative: Arms = r
        .cumulative
        .clone()
        .and_then(|c| serde_json::from_value(c).ok())
        .unwrap_or_default();
    cumulative.merge(&interval);
    let a = analysis::analyse(&spec, arm, &interval, &cumulative);
    let decision = analysis::decide(&spec, &progress, &a.verdict);
    let stable_version = r.from_version.unwrap_or(0) as u32;
    let arms = |x: &Arms| {
        let total = x.candidate.requests + x.stable.requests;
        json!([
            x.candidate.metrics(arm, r.version as u32, total),
            x.stable.metrics("stable", stable_version, total)
        ])
    };
    let details = json!({
        "phase": arm,
        "window_start": since,
        "window_end": now,
        "arms": arms(&interval),
        "cumulative": {"since": r.canary_since.unwrap_or(r.created_at), "arms": arms(&cumulative)},
        "rules": a.rules,
        "verdict": verdict_str(&a.verdict),
    });
    let folded = serde_json::to_value(&cumulative).expect("sample serialises");
    let c = &interval.candidate;
    let summary = format!(
        "{arm} {} requests, error rate {:.4}",
        c.requests,
        c.error_rate().unwrap_or(0.0)
    );
    let ch = match decision {
        Decision::Wait(why) => {
            // One hold record per interval, not one per tick; the interval stays open.
            let last = rollout_event::Entity::find()
                .filter(rollout_event::Column::RolloutId.eq(r.id))
                .order_by_desc(rollout_event::Column::Id)
                .one(db)
                .await?;
            let recent =
                last.is_some_and(|e| e.action == "hold" && now - e.at < secs(spec.interval_secs));
            if !recent {
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
            return Ok(());
        }
        Decision::Inconclusive(why) => Change {
            window_start: Some(now),
            cumulative: Some(folded),
            reason: format!("holding at {}%: {why}", r.weight),
            details: Some(details),
            ..Change::new("hold", state, &r)
        },
        Decision::Go(next) => {
            let mut ch = go(&r, &spec, next, "advance", now);
            if !shadow {
                ch.cumulative = Some(folded);
            } else {
                ch.evidence = Some(shadow_evidence(db, &r, &spec, &cumulative, true, now).await?);
            }
            ch.reason = match next {
                Next::Promote => {
                    format!("all steps passed; v{} is now stable ({summary})", r.version)
                }
                Next::Step(i) if shadow => format!(
                    "shadow analysis passed ({summary}); canary at {}%",
                    spec.steps[i]
                ),
                Next::Step(i) => format!(
                    "analysis passed at {}% ({summary}); advancing to {}%",
                    r.weight, spec.steps[i]
                ),
            };
            ch.details = Some(details);
            ch
        }
        Decision::AwaitApproval(next) => {
            let evidence = if shadow {
                Some(shadow_evidence(db, &r, &spec, &cumulative, true, now).await?)
            } else {
                None
            };
            let to = match next {
                Next::Step(i) => format!("the canary moves to {}%", spec.steps[i]),
                Next::Promote => format!("v{} is promoted", r.version),
            };
            Change {
                window_start: Some(now),
                cumulative: Some(folded),
                evidence,
                reason: format!(
                    "analysis passed at {}% ({summary}); waiting for a deployer's approve before {to}",
                    r.weight
                ),
                details: Some(details),
                ..Change::new("await_approval", RolloutState::AwaitingApproval, &r)
            }
        }
        Decision::Failed { failures, reasons } => Change {
            failures: failures as i32,
            window_start: Some(now),
            cumulative: Some(folded),
            reason: format!(
                "analysis failed ({failures} of {}): {}",
                spec.failure_limit,
                reasons.join("; ")
            ),
            details: Some(details),
            ..Change::new("analysis_failed", state, &r)
        },
        Decision::Rollback { failures, reasons } => {
            let evidence = if shadow {
                Some(shadow_evidence(db, &r, &spec, &cumulative, false, now).await?)
            } else {
                None
            };
            Change {
                weight: 0.0,
                failures: failures as i32,
                window_start: None,
                cumulative: Some(folded),
                evidence,
                reason: format!(
                    "rolled back after {failures} failed analyses (limit {}): {}",
                    spec.failure_limit,
                    reasons.join("; ")
                ),
                details: Some(details),
                ..Change::new("rollback", RolloutState::RolledBack, &r)
            }
        }
        Decision::Timeout { policy, why } => Change {
            cumulative: Some(folded),
            details: Some(details),
            ..timeout(&r, policy, why)
        },
    };
    apply(db, hooks, metrics, &r, ch, now).await
}

/// The change `on_timeout` asks for.
fn timeout(r: &rollout::Model, policy: TimeoutPolicy, why: String) -> Change {
    match policy {
        TimeoutPolicy::Rollback => Change {
            weight: 0.0,
            window_start: None,
            reason: format!("{why}; rolled back (on_timeout: rollback)"),
            ..Change::new("rollback", RolloutState::RolledBack, r)
        },
        TimeoutPolicy::Pause => Change {
            reason: format!("{why}; paused for a deployer (on_timeout: pause)"),
            ..Change::new("pause", RolloutState::Paused, r)
        },
    }
}

async fn apply(
    db: &DatabaseConnection,
    hooks: &Webhooks,
    metrics: &Metrics,
    r: &rollout::Model,
    ch: Change,
    now: DateTime<Utc>,
) -> Result<(), ApiError> {
    let action = ch.action;
    if transition(db, hooks, r, CONTROLLER, ch, now)
        .await?
        .is_some()
    {
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
    Ok(())
}

/// One pass of the controller over every rollout it analyses; returns how many it looked at.
pub async fn tick(
    db: &DatabaseConnection,
    hooks: &Webhooks,
    metrics: &Metrics,
) -> Result<usize, ApiError> {
    let active = rollout::Entity::find()
        .filter(rollout::Column::State.is_in([
            RolloutState::Running.as_str(),
            RolloutState::Shadowing.as_str(),
            RolloutState::AwaitingApproval.as_str(),
        ]))
        .all(db)
        .await?;
    let now = db_now(db).await?;
    let n = active.len();
    futures_util::stream::iter(active)
        .for_each_concurrent(CONCURRENCY, |r| async move {
            use futures_util::FutureExt;
            let id = r.id;
            // One rollout whose analysis panics (a spec stored before today's bounds, a bug)
            // must not stop the analysis, and so the rollbacks, of every other one.
            match std::panic::AssertUnwindSafe(step(db, hooks, metrics, r, now))
                .catch_unwind()
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(rollout = id, error = %e, "rollout analysis failed; retrying next tick")
                }
                Err(_) => {
                    metrics.rollout_panics.inc();
                    tracing::error!(rollout = id, "rollout analysis panicked; retrying next tick")
                }
            }
        })
        .await;
    Ok(n)
}

/// Delete observations received before `now - retention`, except those an active rollout's
/// open interval still needs (older ones are folded into its cumulative sample). Returns the
/// rows deleted.
pub async fn prune_observations(
    db: &impl ConnectionTrait,
    now: DateTime<Utc>,
    retention: Duration,
) -> Result<u64, ApiError> {
    let mut cutoff = now - TimeDelta::from_std(retention).unwrap_or(TimeDelta::MAX);
    let oldest_open: Option<Option<DateTime<Utc>>> = rollout::Entity::find()
        .select_only()
        .column_as(rollout::Column::LastAnalysisAt.min(), "oldest")
        .filter(rollout::Column::State.is_in([
            RolloutState::Running.as_str(),
            RolloutState::Shadowing.as_str(),
            RolloutState::AwaitingApproval.as_str(),
            RolloutState::Paused.as_str(),
        ]))
        .into_tuple()
        .one(db)
        .await?;
    if let Some(Some(t)) = oldest_open {
        cutoff = cutoff.min(t);
    }
    let res = observation::Entity::delete_many()
        .filter(observation::Column::ReceivedAt.lt(cutoff))
        .exec(db)
        .await?;
    Ok(res.rows_affected)
}

/// Take or renew the controller lease; true while this replica holds it.
pub async fn hold_lease(
    db: &DatabaseConnection,
    holder: &str,
    ttl: Duration,
) -> Result<bool, ApiError> {
    let now = db_now(db).await?;
    let until = now + TimeDelta::from_std(ttl).unwrap_or(TimeDelta::seconds(15));
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

/// Run the controller until the returned task is aborted: one supervised pass per tick
/// (renew the lease; if leading, analyse and now and then prune), so a pass that panics or
/// fails is retried rather than ending the controller.
pub fn spawn(state: web::Data<AppState>) -> tokio::task::JoinHandle<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use crate::server::supervisor::Pass;

    let cfg = &state.settings.registry;
    let every = Duration::from_millis(cfg.controller_tick_ms.max(50));
    let ttl = Duration::from_secs(cfg.controller_lease_secs.max(1));
    let retention = Duration::from_secs(cfg.observation_retention_hours.saturating_mul(3600));
    let holder = format!(
        "{}-{}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "registry".into()),
        uuid::Uuid::new_v4()
    );
    let leading = Arc::new(AtomicBool::new(false));
    let pruned: Arc<std::sync::Mutex<Option<tokio::time::Instant>>> = Arc::default();
    let supervisor = state.supervisor.clone();
    supervisor.spawn(CONTROLLER_TASK, controller_stale_after(cfg), move || {
        let state = state.clone();
        let holder = holder.clone();
        let leading = leading.clone();
        let pruned = pruned.clone();
        async move {
            let was = leading.load(Ordering::Relaxed);
            let now_leading = match hold_lease(&state.db, &holder, ttl).await {
                Ok(l) => l,
                Err(e) => {
                    leading.store(false, Ordering::Relaxed);
                    return Err(format!("cannot renew the rollout controller lease: {e}"));
                }
            };
            if now_leading != was {
                tracing::info!(holder, leading = now_leading, "rollout controller lease");
            }
            leading.store(now_leading, Ordering::Relaxed);
            if now_leading {
                if let Err(e) = tick(&state.db, &state.webhooks, &state.metrics).await {
                    tracing::warn!(error = %e, "rollout controller tick failed");
                }
                let due = {
                    let mut p = pruned.lock().expect("prune lock");
                    let due = p.is_none_or(|t| t.elapsed() >= PRUNE_EVERY);
                    if due {
                        *p = Some(tokio::time::Instant::now());
                    }
                    due
                };
                if due {
                    let res = match db_now(&state.db).await {
                        Ok(now) => prune_observations(&state.db, now, retention).await,
                        Err(e) => Err(e),
                    };
                    match res {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(rows = n, "pruned old observations"),
                        Err(e) => tracing::warn!(error = %e, "pruning observations failed"),
                    }
                }
            }
            Ok::<_, String>(Pass::Sleep(every))
        }
    })
}

/// The supervisor's name of the controller loop (a `/readyz` check).
pub const CONTROLLER_TASK: &str = "rollout_controller";

/// How long the controller may go without starting a pass before `/readyz` says it stopped:
/// two lease periods (a replica that long without a pass has lost the lease anyway), and
/// never less than ten ticks.
pub fn controller_stale_after(cfg: &crate::server::RegistrySettings) -> Duration {
    let tick = Duration::from_millis(cfg.controller_tick_ms.max(50));
    (Duration::from_secs(cfg.controller_lease_secs.max(1)) * 2).max(tick * 10)
}
