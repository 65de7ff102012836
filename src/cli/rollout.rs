//! `loraops rollout start NAME@V | status NAME | promote | pause | resume | abort | approve |
//! rollback-promotion NAME`. A start whose gate fails prints the per-rule report and exits 2;
//! nothing changes.

use clap::{Args, Subcommand, ValueEnum};
use loraops_registry::api::{
    AdapterRef, AnalysisRule, GateReport, RolloutSpec, RolloutStatus, ShadowSpec, StartRollout,
    TimeoutPolicy,
};
use loraops_registry::client::ClientError;

use super::{ClientArgs, Global, UsageError, runtime};
use crate::output::emit;

#[derive(Debug, Subcommand)]
pub enum RolloutCmd {
    /// Start a canary of NAME@V (needs the deployer role and a passing gate).
    Start {
        adapter: String,
        #[command(flatten)]
        spec: SpecArgs,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The active (else the latest) rollout and its audit trail.
    Status {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Make the canary stable now.
    Promote {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Stop analysing and stepping; traffic stays where it is.
    Pause {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Continue a paused rollout with a fresh analysis window.
    Resume {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// End the rollout and send all traffic back to the stable version.
    Abort {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Let a rollout awaiting approval take its next step (see its analysis with `status`).
    Approve {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Revert the latest promotion: the version stable before it is stable again.
    RollbackPromotion {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OnTimeout {
    Rollback,
    Pause,
}

#[derive(Debug, Args)]
pub struct SpecArgs {
    /// Canary weights in percent.
    #[arg(long, value_delimiter = ',', default_values_t = [5.0, 25.0, 50.0, 100.0])]
    pub steps: Vec<f64>,
    /// Seconds between analyses.
    #[arg(long, default_value_t = 60)]
    pub interval: u64,
    /// Requests each compared arm needs before any verdict.
    #[arg(long, default_value_t = 50)]
    pub min_requests: u64,
    /// Effective users each compared arm needs before any verdict (one client cannot decide).
    #[arg(long, default_value_t = 10)]
    pub min_users: u64,
    /// Failed analyses before rolling back.
    #[arg(long, default_value_t = 2)]
    pub failure_limit: u32,
    /// Analysis rule (repeatable): absolute, `error_rate<=0.01` or `latency_p99_ms<800`, or
    /// relative, `error_rate: canary - stable <= 0.005 at confidence 0.95` or
    /// `latency: canary / stable <= 1.1`. Default: error rate and latency no worse than stable
    /// (by 0.005 and 10 %), and error_rate<=0.05.
    #[arg(long = "rule", value_parser = parse_rule)]
    pub rules: Vec<AnalysisRule>,
    /// Longest time at one step without a verdict, in seconds (default: 30 intervals, at
    /// least 1800).
    #[arg(long)]
    pub max_hold: Option<u64>,
    /// Longest time for the whole rollout, in seconds.
    #[arg(long)]
    pub max_duration: Option<u64>,
    /// What happens at max_hold or max_duration.
    #[arg(long, value_enum, default_value = "rollback")]
    pub on_timeout: OnTimeout,
    /// Start with a shadow phase: mirror this percentage of stable requests to the candidate
    /// (answers discarded) until its analysis passes; no user sees it before.
    #[arg(long)]
    pub shadow: Option<f64>,
    /// Step weights (or 100 for the promotion) that wait for `loraops rollout approve`.
    #[arg(long, value_delimiter = ',')]
    pub approve_before: Vec<f64>,
}

fn parse_rule(s: &str) -> Result<AnalysisRule, String> {
    s.parse()
}

/// The gate report as a table, one rule a line.
pub fn report_table(r: &GateReport) -> String {
    let mut out = format!(
        "gate for {}@{} ({} policy{}): {}\n",
        r.adapter,
        r.version,
        r.policy_scope,
        r.stable_version
            .map(|v| format!(", stable v{v}"))
            .unwrap_or_default(),
        if r.passed { "PASS" } else { "FAIL" }
    );
    for rule in &r.rules {
        out += &format!(
            "  {} {:<48} required {:<28} observed {:<10} {}\n",
            if rule.passed { "ok  " } else { "FAIL" },
            rule.rule,
            rule.required,
            rule.observed
                .map(|o| format!("{o:.4}"))
                .unwrap_or_else(|| "-".into()),
            rule.note.as_deref().unwrap_or("")
        );
    }
    out.trim_end().to_string()
}

fn describe(s: &RolloutStatus) -> String {
    let r = &s.rollout;
    let mut out = format!(
        "{}@{} rollout #{}: {} at {}% (step {} of {}, {} failed analyses of {}), from {}\n",
        r.adapter,
        r.version,
        r.id,
        r.state.as_str(),
        r.weight,
        r.step_index + 1,
        r.spec.steps.len(),
        r.failures,
        r.spec.failure_limit,
        r.from_version
            .map(|v| format!("v{v}"))
            .unwrap_or_else(|| "the base model (first version)".into()),
    );
    let rules: Vec<String> = r.spec.rules.iter().map(ToString::to_string).collect();
    out += &format!(
        "  steps {:?}, every {} s, at least {} requests from {} users per arm, max hold {} s{}{}{}, on timeout {:?}\n  rules: {}\n",
        r.spec.steps,
        r.spec.interval_secs,
        r.spec.min_requests,
        r.spec.min_users,
        r.spec.max_hold(),
        r.spec
            .max_duration_secs
            .map(|d| format!(", max duration {d} s"))
            .unwrap_or_default(),
        r.spec
            .shadow
            .as_ref()
            .map(|s| format!(", shadow phase mirroring {}%", s.percent))
            .unwrap_or_default(),
        if r.spec.approve_before.is_empty() {
            String::new()
        } else {
            format!(", approval before {:?}", r.spec.approve_before)
        },
        r.spec.on_timeout,
        rules.join("; ")
    );
    for e in &s.events {
        out += &format!(
            "  {} {:<16} {:<10} {:>5}%  {}: {}\n",
            e.at.format("%Y-%m-%d %H:%M:%S"),
            e.action,
            e.actor,
            e.weight,
            e.to_state.as_str(),
            e.reason
        );
    }
    // The latest analysis, rule by rule: what an approver (or anyone) decides on.
    if let Some((e, rules)) = s.events.iter().rev().find_map(|e| {
        let rules = e.details.as_ref()?.get("rules")?.as_array()?.clone();
        (!rules.is_empty()).then_some((e, rules))
    }) {
        out += &format!(
            "  latest analysis ({}):\n",
            e.at.format("%Y-%m-%d %H:%M:%S")
        );
        for r in rules {
            let num = |v: &serde_json::Value| v.as_f64().map(|x| format!("{x:.4}"));
            let interval = r["interval"]
                .as_array()
                .map(|a| {
                    format!(
                        " [{}, {}]",
                        num(&a[0]).unwrap_or("-".into()),
                        num(&a[1]).unwrap_or("-".into())
                    )
                })
                .unwrap_or_default();
            out += &format!(
                "    {:<13} {:<10} {:<58} {}{}{}\n",
                r["outcome"].as_str().unwrap_or(""),
                r["window"].as_str().unwrap_or(""),
                r["rule"].as_str().unwrap_or(""),
                num(&r["estimate"]).unwrap_or("-".into()),
                interval,
                num(&r["p_value"])
                    .map(|p| format!(" p {p}"))
                    .unwrap_or_default()
            );
        }
    }
    out.trim_end().to_string()
}

pub fn run(cmd: RolloutCmd, global: &Global) -> anyhow::Result<()> {
    let rt = runtime()?;
    let json = global.json;
    let status = match cmd {
        RolloutCmd::Start {
            adapter,
            spec,
            client,
        } => {
            let r: AdapterRef = adapter.parse().map_err(UsageError)?;
            let version = r
                .version
                .ok_or_else(|| UsageError(format!("{adapter}: name a version, NAME@V")))?;
            let req = StartRollout {
                version,
                spec: RolloutSpec {
                    steps: spec.steps,
                    interval_secs: spec.interval,
                    min_requests: spec.min_requests,
                    failure_limit: spec.failure_limit,
                    rules: spec.rules,
                    min_users: spec.min_users,
                    max_hold_secs: spec.max_hold,
                    max_duration_secs: spec.max_duration,
                    on_timeout: match spec.on_timeout {
                        OnTimeout::Rollback => TimeoutPolicy::Rollback,
                        OnTimeout::Pause => TimeoutPolicy::Pause,
                    },
                    approve_before: spec.approve_before,
                    shadow: spec.shadow.map(|percent| ShadowSpec { percent }),
                },
            };
            match rt.block_on(client.client().start_rollout(r.name.as_str(), &req)) {
                Ok(s) => s,
                Err(ClientError::Api { status, body }) if body.error.code == "gate_failed" => {
                    if let Ok(report) =
                        serde_json::from_value::<GateReport>(body.error.details.clone())
                    {
                        emit(json, &report, || report_table(&report));
                    }
                    return Err(ClientError::Api { status, body }.into());
                }
                Err(e) => return Err(e.into()),
            }
        }
        RolloutCmd::Status { name, client } => rt.block_on(client.client().rollout(&name))?,
        RolloutCmd::Promote { name, client } => {
            rt.block_on(client.client().rollout_action(&name, "promote"))?
        }
        RolloutCmd::Pause { name, client } => {
            rt.block_on(client.client().rollout_action(&name, "pause"))?
        }
        RolloutCmd::Resume { name, client } => {
            rt.block_on(client.client().rollout_action(&name, "resume"))?
        }
        RolloutCmd::Abort { name, client } => {
            rt.block_on(client.client().rollout_action(&name, "abort"))?
        }
        RolloutCmd::Approve { name, client } => {
            rt.block_on(client.client().rollout_action(&name, "approve"))?
        }
        RolloutCmd::RollbackPromotion { name, client } => {
            rt.block_on(client.client().rollout_action(&name, "rollback-promotion"))?
        }
    };
    emit(json, &status, || describe(&status));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use loraops_registry::api::{Comparison, Relation};

    #[test]
    fn rules_parse_from_flags() {
        let r = parse_rule("error_rate<=0.01").unwrap();
        assert_eq!(
            (r.metric.as_str(), r.op, r.threshold, r.compare),
            ("error_rate", Comparison::Le, 0.01, None)
        );
        let r = parse_rule("latency_p99_ms < 800").unwrap();
        assert_eq!((r.op, r.threshold), (Comparison::Lt, 800.0));
        let r = parse_rule("error_rate: canary - stable <= 0.005 at confidence 0.95").unwrap();
        assert_eq!(
            (r.metric.as_str(), r.compare, r.threshold, r.confidence),
            ("error_rate", Some(Relation::Difference), 0.005, Some(0.95))
        );
        assert_eq!(
            r.to_string(),
            "error_rate: canary - stable <= 0.005 at confidence 0.95"
        );
        let r = parse_rule("latency: canary/stable<=1.1").unwrap();
        assert_eq!((r.compare, r.confidence()), (Some(Relation::Ratio), 0.95));
        assert!(parse_rule("error_rate=0.1").is_err());
        assert!(parse_rule("error_rate<=x").is_err());
        assert!(parse_rule("error_rate: stable - canary <= 0.1").is_err());
        assert!(parse_rule("error_rate <= 0.1 at confidence 0.9").is_err());
    }
}
