//! `loraops rollout start NAME@V | status NAME | promote | pause | resume | abort NAME`.
//! A start whose gate fails prints the per-rule report and exits 2; nothing changes.

use clap::{Args, Subcommand};
use loraops_registry::api::{
    AdapterRef, AnalysisRule, Comparison, GateReport, RolloutSpec, RolloutStatus, StartRollout,
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
}

#[derive(Debug, Args)]
pub struct SpecArgs {
    /// Canary weights in percent.
    #[arg(long, value_delimiter = ',', default_values_t = [5.0, 25.0, 50.0, 100.0])]
    pub steps: Vec<f64>,
    /// Seconds between analyses.
    #[arg(long, default_value_t = 60)]
    pub interval: u64,
    /// Canary requests needed before any verdict.
    #[arg(long, default_value_t = 50)]
    pub min_requests: u64,
    /// Failed analyses before rolling back.
    #[arg(long, default_value_t = 2)]
    pub failure_limit: u32,
    /// Analysis rule, e.g. `error_rate<=0.01` or `latency_p99_ms<800` (repeatable; default
    /// error_rate<=0.05).
    #[arg(long = "rule", value_parser = parse_rule)]
    pub rules: Vec<AnalysisRule>,
}

fn parse_rule(s: &str) -> Result<AnalysisRule, String> {
    for (tok, op) in [
        ("<=", Comparison::Le),
        (">=", Comparison::Ge),
        ("<", Comparison::Lt),
        (">", Comparison::Gt),
    ] {
        if let Some((m, t)) = s.split_once(tok) {
            let threshold = t
                .trim()
                .parse::<f64>()
                .map_err(|_| format!("{s:?}: {t:?} is not a number"))?;
            return Ok(AnalysisRule {
                metric: m.trim().to_string(),
                op,
                threshold,
            });
        }
    }
    Err(format!("{s:?}: expected METRIC<=N, <N, >=N or >N"))
}

fn op_str(op: Comparison) -> &'static str {
    match op {
        Comparison::Ge => ">=",
        Comparison::Gt => ">",
        Comparison::Le => "<=",
        Comparison::Lt => "<",
    }
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
    let rules: Vec<String> = r
        .spec
        .rules
        .iter()
        .map(|x| format!("{} {} {}", x.metric, op_str(x.op), x.threshold))
        .collect();
    out += &format!(
        "  steps {:?}, every {} s, at least {} canary requests, rules: {}\n",
        r.spec.steps,
        r.spec.interval_secs,
        r.spec.min_requests,
        rules.join(", ")
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
    };
    emit(json, &status, || describe(&status));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_from_flags() {
        let r = parse_rule("error_rate<=0.01").unwrap();
        assert_eq!(
            (r.metric.as_str(), r.op, r.threshold),
            ("error_rate", Comparison::Le, 0.01)
        );
        let r = parse_rule("latency_p99_ms < 800").unwrap();
        assert_eq!((r.op, r.threshold), (Comparison::Lt, 800.0));
        assert!(parse_rule("error_rate=0.1").is_err());
        assert!(parse_rule("error_rate<=x").is_err());
    }
}
