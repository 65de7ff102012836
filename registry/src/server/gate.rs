//! Gate evaluation: does a version's evidence meet its adapter's policy? Pure over loaded
//! evidence, so the rules are tested without a database; `report` does the loading.
//!
//! A policy names suites by digest or `NAME@VERSION` (which the registry resolves to the
//! digest it holds: a name and version always mean the same bytes), and evidence counts only
//! when it was posted for the version's exact digest and cites that suite digest (the evidence
//! route refuses suites the registry does not hold). A relative rule compares with the stable
//! version's latest evidence on the same suite digest, or with the base model's (`vs: base`).
//! An adapter's first version has no stable version, so `vs: stable` rules do not apply to it
//! (DESIGN.md: absolute rules only); `vs: base` rules do.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Duration, Utc};
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder};

use super::entities::{adapter, adapter_version, base_evidence, base_model, evidence, gate, suite};
use super::error::ApiError;
use super::records;
use crate::api::{
    Baseline, Comparison, GatePolicy, GateReport, GateRule, Name, RuleOutcome, SuiteSpec,
    base_evidence_digest,
};

/// One evidence record, as gate rules see it.
#[derive(Debug, Clone)]
pub struct Measured {
    pub id: i64,
    pub suite: String,
    pub suite_digest: String,
    pub metrics: BTreeMap<String, f64>,
    pub created_at: DateTime<Utc>,
}

/// What each suite a policy names resolves to: the digest the registry holds, or why not.
pub type Resolved = HashMap<String, Result<String, String>>;

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

/// The digest the registry holds for a suite reference, or why it has none.
pub async fn resolve_suite(
    db: &impl ConnectionTrait,
    raw: &str,
) -> Result<Result<String, String>, ApiError> {
    let spec: SuiteSpec = match raw.parse() {
        Ok(s) => s,
        Err(why) => return Ok(Err(why)),
    };
    let q = suite::Entity::find();
    let row = match &spec {
        SuiteSpec::Digest(d) => q.filter(suite::Column::Digest.eq(d.as_str())),
        SuiteSpec::Version { name, version } => q
            .filter(suite::Column::Name.eq(name.as_str()))
            .filter(suite::Column::Version.eq(version.as_str())),
    }
    .one(db)
    .await?;
    Ok(row
        .map(|r| r.digest)
        .ok_or_else(|| format!("the registry holds no suite {spec}")))
}

/// Every suite a policy names, resolved.
pub async fn resolve_policy(
    db: &impl ConnectionTrait,
    policy: &GatePolicy,
) -> Result<Resolved, ApiError> {
    let mut out = Resolved::new();
    for raw in policy
        .required_suites
        .iter()
        .chain(policy.rules.iter().map(|r| &r.suite))
    {
        if !out.contains_key(raw) {
            out.insert(raw.clone(), resolve_suite(db, raw).await?);
        }
    }
    Ok(out)
}

fn measured(
    id: i32,
    suite: String,
    suite_digest: String,
    body: &serde_json::Value,
    created_at: DateTime<Utc>,
) -> Result<Measured, ApiError> {
    let metrics = body
        .get("metrics")
        .cloned()
        .map(serde_json::from_value)
        .transpose()
        .map_err(|err| ApiError::internal(format!("stored evidence {id}: {err}")))?
        .unwrap_or_default();
    Ok(Measured {
        id: id as i64,
        suite,
        suite_digest,
        metrics,
        created_at,
    })
}

/// Evidence of one version for its own digest, newest first. Evidence the controller records
/// (a shadow phase, `rollout:ID`) documents the version but is no evaluation on a suite.
async fn evidence_of(
    db: &impl ConnectionTrait,
    v: &adapter_version::Model,
) -> Result<Vec<Measured>, ApiError> {
    let rows = evidence::Entity::find()
        .filter(evidence::Column::VersionId.eq(v.id))
        .filter(evidence::Column::AdapterDigest.eq(v.digest.clone()))
        .filter(evidence::Column::SuiteDigest.not_like("rollout:%"))
        .order_by_desc(evidence::Column::Id)
        .all(db)
        .await?;
    rows.into_iter()
        .map(|e| measured(e.id, e.suite_name, e.suite_digest, &e.body, e.created_at))
        .collect()
}

/// The base model's evidence for its current digest, newest first.
async fn base_evidence_of(
    db: &impl ConnectionTrait,
    base: &str,
) -> Result<Vec<Measured>, ApiError> {
    let Some(b) = base_model::Entity::find()
        .filter(base_model::Column::Name.eq(base))
        .one(db)
        .await?
    else {
        return Ok(Vec::new());
    };
    let name = Name::parse(&b.name).map_err(|e| ApiError::internal(e.to_string()))?;
    let rows = base_evidence::Entity::find()
        .filter(base_evidence::Column::BaseModel.eq(b.name.as_str()))
        .filter(
            base_evidence::Column::ModelDigest.eq(base_evidence_digest(&name, b.digest.as_deref())),
        )
        .order_by_desc(base_evidence::Column::Id)
        .all(db)
        .await?;
    rows.into_iter()
        .map(|e| measured(e.id, e.suite_name, e.suite_digest, &e.body, e.created_at))
        .collect()
}

/// The baselines relative rules compare with.
#[derive(Debug, Default, Clone, Copy)]
pub struct Baselines<'a> {
    /// The stable version and its evidence (none for a first version).
    pub stable: Option<(u32, &'a [Measured])>,
    /// The base model's name and evidence.
    pub base: Option<(&'a str, &'a [Measured])>,
}

/// Evaluate the adapter's gate for `version`.
pub async fn report(
    db: &impl ConnectionTrait,
    a: &adapter::Model,
    version: &adapter_version::Model,
) -> Result<GateReport, ApiError> {
    let (scope, policy) = policy_for(db, &a.name).await?;
    let resolved = match &policy {
        Some(p) => resolve_policy(db, p).await?,
        None => Resolved::new(),
    };
    let candidate = evidence_of(db, version).await?;
    let stable = match a.stable_version {
        Some(s) if s != version.version => {
            let row = records::version_row(db, a, s as u32).await?;
            Some((s as u32, evidence_of(db, &row).await?))
        }
        _ => None,
    };
    let wants_base = policy
        .as_ref()
        .is_some_and(|p| p.rules.iter().any(|r| r.vs == Some(Baseline::Base)));
    let base = if wants_base {
        base_evidence_of(db, &a.base_model).await?
    } else {
        Vec::new()
    };
    let rules = evaluate(
        policy.as_ref(),
        &resolved,
        &candidate,
        Baselines {
            stable: stable.as_ref().map(|(v, e)| (*v, e.as_slice())),
            base: Some((a.base_model.as_str(), base.as_slice())),
        },
        Utc::now(),
    );
    Ok(GateReport {
        adapter: Name::parse(&a.name).map_err(|e| ApiError::internal(e.to_string()))?,
        version: version.version as u32,
        adapter_digest: version.digest.clone(),
        policy_scope: scope,
        stable_version: stable.map(|(v, _)| v),
        passed: !rules.is_empty() && rules.iter().all(|r| r.passed),
        rules,
    })
}

fn holds(op: Comparison, observed: f64, bound: f64) -> bool {
    op.holds(observed, bound)
}

fn op_str(op: Comparison) -> &'static str {
    op.as_str()
}

/// Every rule's outcome. `candidate` and the baselines' evidence are newest first.
pub fn evaluate(
    policy: Option<&GatePolicy>,
    resolved: &Resolved,
    candidate: &[Measured],
    baselines: Baselines,
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
    let digest = |suite: &str| -> Result<&str, String> {
        match resolved.get(suite) {
            Some(Ok(d)) => Ok(d.as_str()),
            Some(Err(why)) => Err(why.clone()),
            None => Err(format!("suite {suite:?} was not resolved")),
        }
    };
    let latest = |suite: &str| {
        let d = digest(suite).ok()?;
        candidate.iter().filter(fresh).find(|e| e.suite_digest == d)
    };
    let missing_note = |suite: &str| match digest(suite) {
        // A policy stored before suites were named exactly, or naming a suite since removed.
        Err(why) => format!("{why}; set the gate again naming NAME@VERSION or sha256:…"),
        Ok(d) if candidate.iter().any(|e| e.suite_digest == d) => {
            format!("evidence for suite {suite} is older than the policy's maximum age")
        }
        Ok(d) => format!("no evidence for suite {suite} ({d}) on this version's digest"),
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
            note: e.is_none().then(|| missing_note(suite)),
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
                None => missing_note(&r.suite),
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
            let baseline = match r.vs.unwrap_or(Baseline::Stable) {
                Baseline::Stable => baselines.stable.map(|(v, ev)| (format!("stable v{v}"), ev)),
                Baseline::Base => baselines
                    .base
                    .map(|(name, ev)| (format!("base model {name}"), ev)),
            };
            out.push(relative(r, slack, e, observed, baseline, &missing));
        }
    }
    out
}

fn rule_name(r: &GateRule) -> String {
    match (r.threshold, r.max_regression) {
        (Some(t), _) => format!("{}/{} {} {t}", r.suite, r.metric, op_str(r.op)),
        (None, Some(m)) => format!(
            "{}/{} no worse than {} by more than {m}",
            r.suite,
            r.metric,
            match r.vs {
                Some(Baseline::Base) => "the base model",
                _ => "stable",
            }
        ),
        (None, None) => format!("{}/{}", r.suite, r.metric),
    }
}

/// Non-regression: the candidate may be worse than its baseline by at most `slack`
/// ("worse" is the direction the rule's comparison forbids).
fn relative(
    r: &GateRule,
    slack: f64,
    e: Option<&Measured>,
    observed: Option<f64>,
    baseline: Option<(String, &[Measured])>,
    missing: &dyn Fn(String) -> RuleOutcome,
) -> RuleOutcome {
    let name = format!("{}/{} non-regression (slack {slack})", r.suite, r.metric);
    let Some((who, base_ev)) = baseline else {
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
            ..missing(format!("within {slack} of {who}"))
        };
    };
    let base = base_ev
        .iter()
        .find(|s| s.suite_digest == e.suite_digest)
        .and_then(|s| s.metrics.get(&r.metric).copied());
    let Some(base) = base else {
        return RuleOutcome {
            rule: name,
            suite: r.suite.clone(),
            metric: Some(r.metric.clone()),
            required: format!("within {slack} of {who}"),
            observed: Some(o),
            passed: false,
            evidence_id: Some(e.id),
            note: Some(format!(
                "{who} has no {:?} evidence on suite digest {}; evaluate it with the same suite",
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
        required: format!("{} {bound} ({who}: {base}, slack {slack})", op_str(r.op)),
        observed: Some(o),
        passed,
        evidence_id: Some(e.id),
        note: (!passed)
            .then(|| format!("{} = {o} regresses past {bound} ({who}: {base})", r.metric)),
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
            vs: None,
        }
    }

    /// `bench@1` is digest `d1`, `redteam@1` is `r1`, `bench@2` is `d2`.
    fn resolved() -> Resolved {
        [
            ("bench@1", Ok("d1".to_string())),
            ("bench@2", Ok("d2".to_string())),
            ("redteam@1", Ok("r1".to_string())),
            (
                "bench",
                Err("suite \"bench\": name a suite version".to_string()),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    fn stable(e: &[Measured]) -> Baselines<'_> {
        Baselines {
            stable: Some((1, e)),
            base: None,
        }
    }

    #[test]
    fn builtin_policy_needs_any_evidence() {
        let r = resolved();
        let none = evaluate(None, &r, &[], Baselines::default(), Utc::now());
        assert!(!none[0].passed);
        let some = evaluate(
            None,
            &r,
            &[ev(1, "s", "d", "acc", 0.1, 0)],
            Baselines::default(),
            Utc::now(),
        );
        assert!(some[0].passed);
        assert_eq!(some[0].evidence_id, Some(1));
    }

    #[test]
    fn absolute_rules_name_what_failed() {
        let p = GatePolicy {
            required_suites: vec!["redteam@1".into()],
            rules: vec![rule("bench@1", "accuracy", Comparison::Ge, Some(0.8), None)],
            max_evidence_age_hours: None,
        };
        let r = resolved();
        let out = evaluate(
            Some(&p),
            &r,
            &[ev(7, "bench", "d1", "accuracy", 0.7, 0)],
            Baselines::default(),
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
            &r,
            &[
                ev(8, "bench", "d1", "accuracy", 0.85, 0),
                ev(9, "redteam", "r1", "refusal", 1.0, 0),
            ],
            Baselines::default(),
            Utc::now(),
        );
        assert!(ok.iter().all(|r| r.passed), "{ok:?}");
    }

    #[test]
    fn evidence_counts_only_for_the_named_suite_digest() {
        // Same suite name, another version (another digest): a different measurement.
        let p = GatePolicy {
            required_suites: vec![],
            rules: vec![rule("bench@1", "accuracy", Comparison::Ge, Some(0.8), None)],
            max_evidence_age_hours: None,
        };
        let r = resolved();
        let out = evaluate(
            Some(&p),
            &r,
            &[ev(1, "bench", "d2", "accuracy", 0.99, 0)],
            Baselines::default(),
            Utc::now(),
        );
        assert!(!out[0].passed);
        assert!(out[0].note.as_deref().unwrap().contains("d1"), "{out:?}");
        // A policy stored with a bare name fails loudly instead of matching any suite.
        let legacy = GatePolicy {
            required_suites: vec![],
            rules: vec![rule("bench", "accuracy", Comparison::Ge, Some(0.8), None)],
            max_evidence_age_hours: None,
        };
        let out = evaluate(
            Some(&legacy),
            &r,
            &[ev(1, "bench", "d1", "accuracy", 0.99, 0)],
            Baselines::default(),
            Utc::now(),
        );
        assert!(!out[0].passed);
        assert!(out[0].note.as_deref().unwrap().contains("NAME@VERSION"));
    }

    #[test]
    fn stale_evidence_does_not_count() {
        let p = GatePolicy {
            required_suites: vec![],
            rules: vec![rule("bench@1", "accuracy", Comparison::Ge, Some(0.5), None)],
            max_evidence_age_hours: Some(24.0),
        };
        let out = evaluate(
            Some(&p),
            &resolved(),
            &[ev(1, "bench", "d1", "accuracy", 0.9, 48)],
            Baselines::default(),
            Utc::now(),
        );
        assert!(!out[0].passed);
        assert!(out[0].note.as_deref().unwrap().contains("older"));
    }

    #[test]
    fn non_regression_compares_with_its_baseline_on_the_same_suite_digest() {
        let p = GatePolicy {
            required_suites: vec![],
            rules: vec![rule(
                "bench@1",
                "accuracy",
                Comparison::Ge,
                None,
                Some(0.02),
            )],
            max_evidence_age_hours: None,
        };
        let r = resolved();
        let cand = [ev(2, "bench", "d1", "accuracy", 0.90, 0)];
        // First version: relative rules against stable do not apply.
        assert!(evaluate(Some(&p), &r, &cand, Baselines::default(), Utc::now())[0].passed);
        let stable_same = [ev(1, "bench", "d1", "accuracy", 0.91, 0)];
        assert!(evaluate(Some(&p), &r, &cand, stable(&stable_same), Utc::now())[0].passed);
        let stable_better = [ev(1, "bench", "d1", "accuracy", 0.95, 0)];
        let out = evaluate(Some(&p), &r, &cand, stable(&stable_better), Utc::now());
        assert!(!out[0].passed);
        assert!(out[0].note.as_deref().unwrap().contains("regresses"));
        // A different suite digest is a different measurement.
        let stable_other = [ev(1, "bench", "d0", "accuracy", 0.5, 0)];
        let out = evaluate(Some(&p), &r, &cand, stable(&stable_other), Utc::now());
        assert!(!out[0].passed);
        assert!(out[0].note.as_deref().unwrap().contains("d1"));
        // Lower-is-better metrics regress upwards.
        let p = GatePolicy {
            required_suites: vec![],
            rules: vec![rule("bench@1", "ppl", Comparison::Le, None, Some(0.5))],
            max_evidence_age_hours: None,
        };
        let cand = [ev(2, "bench", "d1", "ppl", 10.4, 0)];
        let st = [ev(1, "bench", "d1", "ppl", 10.0, 0)];
        assert!(evaluate(Some(&p), &r, &cand, stable(&st), Utc::now())[0].passed);
        let cand = [ev(2, "bench", "d1", "ppl", 10.6, 0)];
        assert!(!evaluate(Some(&p), &r, &cand, stable(&st), Utc::now())[0].passed);
    }

    #[test]
    fn a_first_version_compares_with_the_base_model_when_asked() {
        let mut rl = rule("bench@1", "accuracy", Comparison::Ge, None, Some(0.0));
        rl.vs = Some(Baseline::Base);
        let p = GatePolicy {
            required_suites: vec![],
            rules: vec![rl],
            max_evidence_age_hours: None,
        };
        let r = resolved();
        let cand = [ev(2, "bench", "d1", "accuracy", 0.60, 0)];
        let base_better = [ev(1, "bench", "d1", "accuracy", 0.70, 0)];
        let b = Baselines {
            stable: None,
            base: Some(("tiny", &base_better)),
        };
        let out = evaluate(Some(&p), &r, &cand, b, Utc::now());
        assert!(!out[0].passed, "{out:?}");
        assert!(out[0].note.as_deref().unwrap().contains("base model tiny"));
        let base_worse = [ev(1, "bench", "d1", "accuracy", 0.50, 0)];
        let b = Baselines {
            stable: None,
            base: Some(("tiny", &base_worse)),
        };
        assert!(evaluate(Some(&p), &r, &cand, b, Utc::now())[0].passed);
        // No base evidence on that suite: no pass.
        let b = Baselines {
            stable: None,
            base: Some(("tiny", &[])),
        };
        assert!(!evaluate(Some(&p), &r, &cand, b, Utc::now())[0].passed);
    }
}
