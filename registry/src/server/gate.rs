//! Gate evaluation: does a version's evidence meet its adapter's policy? Pure over loaded
//! evidence, so the rules are tested without a database; `report` does the loading.
//!
//! Evidence counts only when it was posted for the version's exact digest (the evidence
//! route refuses others, and the query here filters on it again). A relative rule compares
//! with the stable version's latest evidence on the *same suite digest*: a changed suite is a
//! different measurement. An adapter's first version has no stable version, so relative
//! rules do not apply to it (DESIGN.md: absolute rules only).

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder};

use super::entities::{adapter, adapter_version, evidence, gate};
use super::error::ApiError;
use super::records;
use crate::api::{Comparison, GatePolicy, GateReport, GateRule, Name, RuleOutcome};

/// One evidence record, as gate rules see it.
#[derive(Debug, Clone)]
pub struct Measured {
    pub id: i64,
    pub suite: String,
    pub suite_digest: String,
    pub metrics: BTreeMap<String, f64>,
    pub created_at: DateTime<Utc>,
}

/// The policy that applies to an adapter: its own, else the default (`*`), else the built-in
/// one (any evidence for the version's digest).
pub async fn policy_for(
    db: &impl ConnectionTrait,
    adapter: &str,
) -> Result<(String, Option<GatePolicy>), ApiError> {
    for scope in [adapter, "*"] {
        if let Some(row) = gate::Entity::find_by_id(scope.to_string()).one(db).await? {
            let p = serde_json::from_value(row.policy)
                .map_err(|e| ApiError::internal(format!("stored gate {scope:?}: {e}")))?;
            return Ok((scope.to_string(), Some(p)));
        }
    }
    Ok(("builtin".into(), None))
}

/// Evidence of one version for its own digest, newest first.
async fn evidence_of(
    db: &impl ConnectionTrait,
    v: &adapter_version::Model,
) -> Result<Vec<Measured>, ApiError> {
    let rows = evidence::Entity::find()
        .filter(evidence::Column::VersionId.eq(v.id))
        .filter(evidence::Column::AdapterDigest.eq(v.digest.clone()))
        .order_by_desc(evidence::Column::Id)
        .all(db)
        .await?;
    rows.into_iter()
        .map(|e| {
            let metrics = e
                .body
                .get("metrics")
                .cloned()
                .map(serde_json::from_value)
                .transpose()
                .map_err(|err| ApiError::internal(format!("stored evidence {}: {err}", e.id)))?
                .unwrap_or_default();
            Ok(Measured {
                id: e.id as i64,
                suite: e.suite_name,
                suite_digest: e.suite_digest,
                metrics,
                created_at: e.created_at,
            })
        })
        .collect()
}

/// Evaluate the adapter's gate for `version`.
pub async fn report(
    db: &impl ConnectionTrait,
    a: &adapter::Model,
    version: &adapter_version::Model,
) -> Result<GateReport, ApiError> {
    let (scope, policy) = policy_for(db, &a.name).await?;
    let candidate = evidence_of(db, version).await?;
    let stable = match a.stable_version {
        Some(s) if s != version.version => {
            let row = records::version_row(db, a, s as u32).await?;
            Some((s as u32, evidence_of(db, &row).await?))
        }
        _ => None,
    };
    let rules = evaluate(
        policy.as_ref(),
        &candidate,
        stable.as_ref().map(|(v, e)| (*v, e.as_slice())),
        Utc::now(),
    );
    Ok(GateReport {
        adapter: Name::parse(&a.name).map_err(|e| ApiError::internal(e.to_string()))?,
        version: version.version as u32,
        adapter_digest: version.digest.clone(),
        policy_scope: scope,
        stable_version: stable.map(|(v, _)| v),
        passed: rules.iter().all(|r| r.passed),
        rules,
    })
}

fn holds(op: Comparison, observed: f64, bound: f64) -> bool {
    match op {
        Comparison::Ge => observed >= bound,
        Comparison::Gt => observed > bound,
        Comparison::Le => observed <= bound,
        Comparison::Lt => observed < bound,
    }
}

fn op_str(op: Comparison) -> &'static str {
    match op {
        Comparison::Ge => ">=",
        Comparison::Gt => ">",
        Comparison::Le => "<=",
        Comparison::Lt => "<",
    }
}

/// Every rule's outcome. `candidate` and the stable evidence are newest first.
pub fn evaluate(
    policy: Option<&GatePolicy>,
    candidate: &[Measured],
    stable: Option<(u32, &[Measured])>,
    now: DateTime<Utc>,
) -> Vec<RuleOutcome> {
    let Some(policy) = policy else {
        let latest = candidate.first();
        return vec![RuleOutcome {
            rule: "any evidence".into(),
            suite: "*".into(),
            metric: None,
            required: "at least one evidence record for this digest".into(),
            observed: Some(candidate.len() as f64),
            passed: latest.is_some(),
            evidence_id: latest.map(|e| e.id),
            note: latest.is_none().then(|| {
                "no evidence was posted for this version's digest (and no gate policy is set)"
                    .into()
            }),
        }];
    };
    let fresh = |e: &&Measured| match policy.max_evidence_age_hours {
        Some(h) => now - e.created_at <= Duration::milliseconds((h * 3_600_000.0) as i64),
        None => true,
    };
    let latest = |suite: &str| candidate.iter().filter(fresh).find(|e| e.suite == suite);
    let stale_note = |suite: &str| {
        if candidate.iter().any(|e| e.suite == suite) {
            format!("evidence for suite {suite:?} is older than the policy's maximum age")
        } else {
            format!("no evidence for suite {suite:?} on this version's digest")
        }
    };

    let mut out = Vec::new();
    let mut required: Vec<&str> = policy.required_suites.iter().map(String::as_str).collect();
    required.dedup();
    for suite in required {
        let e = latest(suite);
        out.push(RuleOutcome {
            rule: format!("{suite} required"),
            suite: suite.into(),
            metric: None,
            required: "fresh evidence".into(),
            observed: None,
            passed: e.is_some(),
            evidence_id: e.map(|e| e.id),
            note: e.is_none().then(|| stale_note(suite)),
        });
    }
    for r in &policy.rules {
        let e = latest(&r.suite);
        let observed = e.and_then(|e| e.metrics.get(&r.metric).copied());
        let missing = |what: String| RuleOutcome {
            rule: rule_name(r),
            suite: r.suite.clone(),
            metric: Some(r.metric.clone()),
            required: what,
            observed,
            passed: false,
            evidence_id: e.map(|e| e.id),
            note: Some(match e {
                None => stale_note(&r.suite),
                Some(_) => format!("the evidence has no metric {:?}", r.metric),
            }),
        };
        if let Some(t) = r.threshold {
            let required = format!("{} {t}", op_str(r.op));
            out.push(match (e, observed) {
                (Some(e), Some(o)) => {
                    let passed = holds(r.op, o, t);
                    RuleOutcome {
                        rule: rule_name(r),
                        suite: r.suite.clone(),
                        metric: Some(r.metric.clone()),
                        required,
                        observed: Some(o),
                        passed,
                        evidence_id: Some(e.id),
                        note: (!passed)
                            .then(|| format!("{} = {o}, needs {} {t}", r.metric, op_str(r.op))),
                    }
                }
                _ => missing(required),
            });
        }
        if let Some(slack) = r.max_regression {
            out.push(relative(r, slack, e, observed, stable, &missing));
        }
    }
    out
}

fn rule_name(r: &GateRule) -> String {
    match (r.threshold, r.max_regression) {
        (Some(t), _) => format!("{}/{} {} {t}", r.suite, r.metric, op_str(r.op)),
        (None, Some(m)) => format!(
            "{}/{} no worse than stable by more than {m}",
            r.suite, r.metric
        ),
        (None, None) => format!("{}/{}", r.suite, r.metric),
    }
}

/// Non-regression: the candidate may be worse than the stable version by at most `slack`
/// ("worse" is the direction the rule's comparison forbids).
fn relative(
    r: &GateRule,
    slack: f64,
    e: Option<&Measured>,
    observed: Option<f64>,
    stable: Option<(u32, &[Measured])>,
    missing: &dyn Fn(String) -> RuleOutcome,
) -> RuleOutcome {
    let name = format!("{}/{} non-regression (slack {slack})", r.suite, r.metric);
    let Some((sv, stable_ev)) = stable else {
        return RuleOutcome {
            rule: name,
            suite: r.suite.clone(),
            metric: Some(r.metric.clone()),
            required: "no stable version: relative rules do not apply".into(),
            observed,
            passed: true,
            evidence_id: e.map(|e| e.id),
            note: None,
        };
    };
    let (Some(e), Some(o)) = (e, observed) else {
        return RuleOutcome {
            rule: name,
            ..missing(format!("within {slack} of stable v{sv}"))
        };
    };
    let base = stable_ev
        .iter()
        .find(|s| s.suite == r.suite && s.suite_digest == e.suite_digest)
        .and_then(|s| s.metrics.get(&r.metric).copied());
    let Some(base) = base else {
        return RuleOutcome {
            rule: name,
            suite: r.suite.clone(),
            metric: Some(r.metric.clone()),
            required: format!("within {slack} of stable v{sv}"),
            observed: Some(o),
            passed: false,
            evidence_id: Some(e.id),
            note: Some(format!(
                "stable v{sv} has no {:?} evidence on suite digest {}; evaluate it with the same suite",
                r.metric, e.suite_digest
            )),
        };
    };
    let bound = match r.op {
        Comparison::Ge | Comparison::Gt => base - slack,
        Comparison::Le | Comparison::Lt => base + slack,
    };
    let passed = holds(r.op, o, bound);
    RuleOutcome {
        rule: name,
        suite: r.suite.clone(),
        metric: Some(r.metric.clone()),
        required: format!(
            "{} {bound} (stable v{sv}: {base}, slack {slack})",
            op_str(r.op)
        ),
        observed: Some(o),
        passed,
        evidence_id: Some(e.id),
        note: (!passed).then(|| {
            format!(
                "{} = {o} regresses past {bound} (stable v{sv}: {base})",
                r.metric
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: i64, suite: &str, digest: &str, metric: &str, v: f64, age_h: i64) -> Measured {
        Measured {
            id,
            suite: suite.into(),
            suite_digest: digest.into(),
            metrics: [(metric.to_string(), v)].into(),
            created_at: Utc::now() - Duration::hours(age_h),
        }
    }

    fn rule(suite: &str, metric: &str, op: Comparison, t: Option<f64>, m: Option<f64>) -> GateRule {
        GateRule {
            suite: suite.into(),
            metric: metric.into(),
            op,
            threshold: t,
            max_regression: m,
        }
    }

    #[test]
    fn builtin_policy_needs_any_evidence() {
        let none = evaluate(None, &[], None, Utc::now());
        assert!(!none[0].passed);
        let some = evaluate(None, &[ev(1, "s", "d", "acc", 0.1, 0)], None, Utc::now());
        assert!(some[0].passed);
        assert_eq!(some[0].evidence_id, Some(1));
    }

    #[test]
    fn absolute_rules_name_what_failed() {
        let p = GatePolicy {
            required_suites: vec!["redteam".into()],
            rules: vec![rule("bench", "accuracy", Comparison::Ge, Some(0.8), None)],
            max_evidence_age_hours: None,
        };
        let out = evaluate(
            Some(&p),
            &[ev(7, "bench", "d", "accuracy", 0.7, 0)],
            None,
            Utc::now(),
        );
        assert_eq!(out.len(), 2);
        assert!(!out[0].passed, "redteam has no evidence");
        assert!(out[0].note.as_deref().unwrap().contains("redteam"));
        assert!(!out[1].passed);
        assert_eq!(out[1].observed, Some(0.7));
        assert_eq!(out[1].evidence_id, Some(7));
        let ok = evaluate(
            Some(&p),
            &[
                ev(8, "bench", "d", "accuracy", 0.85, 0),
                ev(9, "redteam", "r", "refusal", 1.0, 0),
            ],
            None,
            Utc::now(),
        );
        assert!(ok.iter().all(|r| r.passed), "{ok:?}");
    }

    #[test]
    fn stale_evidence_does_not_count() {
        let p = GatePolicy {
            required_suites: vec![],
            rules: vec![rule("bench", "accuracy", Comparison::Ge, Some(0.5), None)],
            max_evidence_age_hours: Some(24.0),
        };
        let out = evaluate(
            Some(&p),
            &[ev(1, "bench", "d", "accuracy", 0.9, 48)],
            None,
            Utc::now(),
        );
        assert!(!out[0].passed);
        assert!(out[0].note.as_deref().unwrap().contains("older"));
    }

    #[test]
    fn non_regression_compares_with_stable_on_the_same_suite_digest() {
        let p = GatePolicy {
            required_suites: vec![],
            rules: vec![rule("bench", "accuracy", Comparison::Ge, None, Some(0.02))],
            max_evidence_age_hours: None,
        };
        let cand = [ev(2, "bench", "d1", "accuracy", 0.90, 0)];
        // First version: relative rules do not apply.
        assert!(evaluate(Some(&p), &cand, None, Utc::now())[0].passed);
        let stable_same = [ev(1, "bench", "d1", "accuracy", 0.91, 0)];
        assert!(evaluate(Some(&p), &cand, Some((1, &stable_same)), Utc::now())[0].passed);
        let stable_better = [ev(1, "bench", "d1", "accuracy", 0.95, 0)];
        let out = evaluate(Some(&p), &cand, Some((1, &stable_better)), Utc::now());
        assert!(!out[0].passed);
        assert!(out[0].note.as_deref().unwrap().contains("regresses"));
        // A different suite digest is a different measurement.
        let stable_other = [ev(1, "bench", "d0", "accuracy", 0.5, 0)];
        let out = evaluate(Some(&p), &cand, Some((1, &stable_other)), Utc::now());
        assert!(!out[0].passed);
        assert!(out[0].note.as_deref().unwrap().contains("d1"));
        // Lower-is-better metrics regress upwards.
        let p = GatePolicy {
            required_suites: vec![],
            rules: vec![rule("bench", "ppl", Comparison::Le, None, Some(0.5))],
            max_evidence_age_hours: None,
        };
        let cand = [ev(2, "bench", "d1", "ppl", 10.4, 0)];
        let stable = [ev(1, "bench", "d1", "ppl", 10.0, 0)];
        assert!(evaluate(Some(&p), &cand, Some((1, &stable)), Utc::now())[0].passed);
        let cand = [ev(2, "bench", "d1", "ppl", 10.6, 0)];
        assert!(!evaluate(Some(&p), &cand, Some((1, &stable)), Utc::now())[0].passed);
    }
}
