//! `loraops gate set NAME --file POLICY | show NAME`: the evidence an adapter's versions need
//! before a canary may start. `NAME` may be `*`, the default policy for adapters without one.

use std::path::PathBuf;

use clap::Subcommand;
use loraops_registry::api::{Gate, GatePolicy};

use super::{ClientArgs, Global, UsageError, runtime};
use crate::output::emit;

#[derive(Debug, Subcommand)]
pub enum GateCmd {
    /// Set the policy from a JSON or TOML file (needs the deployer role).
    Set {
        name: String,
        #[arg(long)]
        file: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show the policy.
    Show {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// Read a policy file: TOML when the name ends in `.toml`, else JSON.
pub fn read_policy(path: &std::path::Path) -> Result<GatePolicy, UsageError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| UsageError(format!("{}: {e}", path.display())))?;
    let parsed = if path.extension().is_some_and(|e| e == "toml") {
        toml::from_str(&text).map_err(|e| e.to_string())
    } else {
        serde_json::from_str(&text).map_err(|e| e.to_string())
    };
    parsed.map_err(|e| UsageError(format!("{}: not a gate policy: {e}", path.display())))
}

fn describe(g: &Gate) -> String {
    let p = &g.policy;
    let mut out = format!(
        "gate of {} (updated by {} at {})\n",
        g.adapter, g.updated_by, g.updated_at
    );
    if !p.required_suites.is_empty() {
        out += &format!("  required suites: {}\n", p.required_suites.join(", "));
    }
    for r in &p.rules {
        let op = serde_json::to_value(r.op).unwrap_or_default();
        let op = op.as_str().unwrap_or("?");
        match (r.threshold, r.max_regression) {
            (Some(t), Some(m)) => {
                out += &format!(
                    "  {}/{} {op} {t}, and within {m} of stable\n",
                    r.suite, r.metric
                )
            }
            (Some(t), None) => out += &format!("  {}/{} {op} {t}\n", r.suite, r.metric),
            (None, Some(m)) => {
                out += &format!(
                    "  {}/{} ({op}) no worse than stable by more than {m}\n",
                    r.suite, r.metric
                )
            }
            (None, None) => {}
        }
    }
    if let Some(h) = p.max_evidence_age_hours {
        out += &format!("  evidence at most {h} hours old\n");
    }
    out.trim_end().to_string()
}

pub fn run(cmd: GateCmd, global: &Global) -> anyhow::Result<()> {
    let rt = runtime()?;
    let json = global.json;
    match cmd {
        GateCmd::Set { name, file, client } => {
            let policy = read_policy(&file)?;
            let g = rt.block_on(client.client().put_gate(&name, &policy))?;
            emit(json, &g, || describe(&g));
        }
        GateCmd::Show { name, client } => {
            let g = rt.block_on(client.client().gate(&name))?;
            emit(json, &g, || describe(&g));
        }
    }
    Ok(())
}
