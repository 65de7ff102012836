//! `loraops run list | show ID | sync DIR`: training runs recorded in the registry
//! (`loraops train … --registry URL`), and delivering a run's metrics that were kept locally
//! while the registry was unreachable.

use std::path::PathBuf;

use clap::Subcommand;
use loraops_registry::api::Run;

use super::{ClientArgs, Global, runtime};
use crate::output::emit;
use crate::run_report;

#[derive(Debug, Subcommand)]
pub enum RunCmd {
    /// Runs, newest first.
    List {
        /// Only the runs of this adapter.
        #[arg(long)]
        adapter: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// A run: configuration, datasets, versions made from it, and its last metrics.
    Show {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Send what a run left in DIR/run-pending.json (the registry was away when it ended).
    Sync {
        /// The run's output directory (`train --out`).
        dir: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
}

fn line(r: &Run) -> String {
    format!(
        "{}  {:<11} {:<4} {:<16} step {}/{}  {}",
        r.id,
        r.status.as_str(),
        r.method,
        r.adapter.as_ref().map(|a| a.as_str()).unwrap_or("-"),
        r.last_step,
        r.total_steps,
        r.created_at.format("%Y-%m-%d %H:%M:%S")
    )
}

pub fn run(cmd: RunCmd, global: &Global) -> anyhow::Result<()> {
    let rt = runtime()?;
    let json = global.json;
    match cmd {
        RunCmd::List { adapter, client } => {
            let runs = rt.block_on(client.client().runs(adapter.as_deref()))?;
            emit(json, &runs, || {
                if runs.is_empty() {
                    "no runs".into()
                } else {
                    runs.iter().map(line).collect::<Vec<_>>().join("\n")
                }
            });
        }
        RunCmd::Show { id, client } => {
            let c = client.client();
            let (run, metrics) = rt.block_on(async {
                Ok::<_, loraops_registry::client::ClientError>((
                    c.run(&id).await?,
                    c.run_metrics(&id).await?,
                ))
            })?;
            let value = serde_json::json!({"run": run, "metrics": metrics.series});
            emit(json, &value, || {
                let mut out = line(&run);
                out += &format!("\n  base model: {}", run.base_model);
                for d in &run.datasets {
                    out += &format!(
                        "\n  {} data: {} ({}, {} rows)",
                        d.role, d.path, d.digest, d.rows
                    );
                }
                for v in &run.versions {
                    out += &format!("\n  produced {}@{}", v.adapter, v.version);
                }
                for (name, points) in &metrics.series {
                    if let Some((step, value)) = points.last() {
                        out += &format!(
                            "\n  {name:<16} {value:.6} (step {step}, {} points)",
                            points.len()
                        );
                    }
                }
                out
            });
        }
        RunCmd::Sync { dir, client } => {
            let sent = rt.block_on(run_report::sync(&dir, &client.client()))?;
            emit(
                json,
                &serde_json::json!({"synced": sent.as_ref().map(|p| &p.id), "points": sent.as_ref().map_or(0, |p| p.points.len())}),
                || match &sent {
                    Some(p) => format!("run {}: {} metric points delivered", p.id, p.points.len()),
                    None => format!("nothing pending in {}", dir.display()),
                },
            );
        }
    }
    Ok(())
}
