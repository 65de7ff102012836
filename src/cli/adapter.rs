//! `loraops adapter push DIR --name NAME | list | show NAME[@V] | pull NAME@V DIR`.

use std::path::PathBuf;

use clap::Subcommand;
use loraops_registry::api::AdapterRef;
use loraops_registry::peft;

use super::{ClientArgs, Global, UsageError, runtime};
use crate::output::{emit, transfer_bar};

#[derive(Debug, Subcommand)]
pub enum AdapterCmd {
    /// Upload an adapter directory as a new version (identical bytes return the existing one).
    Push {
        dir: PathBuf,
        #[arg(long)]
        name: String,
        /// Registered base model (default: matched from adapter_config.json).
        #[arg(long)]
        base_model: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List adapters.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show an adapter and its versions, or one version (`NAME@V`).
    Show {
        adapter: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Download `NAME@V` into DIR, verifying every file's sha256.
    Pull {
        adapter: String,
        dir: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete `NAME@V` for good: its files, evidence and blobs (admin token). The stable
    /// version and an active rollout's candidate are refused; numbers are never reused.
    Delete {
        adapter: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

fn parse_ref(s: &str) -> Result<AdapterRef, UsageError> {
    s.parse().map_err(UsageError)
}

pub fn run(cmd: AdapterCmd, global: &Global) -> anyhow::Result<()> {
    let rt = runtime()?;
    let json = global.json;
    match cmd {
        AdapterCmd::Push {
            dir,
            name,
            base_model,
            client,
        } => {
            let name = loraops_registry::api::Name::parse(&name)
                .map_err(|e| UsageError(format!("--name: {e}")))?;
            let total: u64 = [
                peft::CONFIG_FILE,
                peft::WEIGHTS_FILE,
                peft::MANIFEST_FILE,
                peft::README_FILE,
            ]
            .iter()
            .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
            .map(|m| m.len())
            .sum();
            let c = client.client();
            // The run that trained this adapter, if its metrics are still waiting here: the
            // version will link to it, so deliver them first (a failure does not stop the push).
            if dir.join(crate::run_report::PENDING_FILE).exists()
                && let Err(e) = rt.block_on(crate::run_report::sync(&dir, &c))
            {
                eprintln!("warning: the training run's pending metrics were not delivered: {e:#}");
            }
            let (bar, progress) = transfer_bar(total, &format!("push {name}"), json);
            let res = rt.block_on(c.push_dir(&dir, name.as_str(), base_model.as_deref(), progress));
            bar.finish_and_clear();
            let res = res?;
            emit(json, &res, || {
                let verb = if res.created {
                    "pushed"
                } else {
                    "already registered as"
                };
                format!(
                    "{verb} {}@{} {}",
                    res.version.adapter, res.version.version, res.version.digest
                )
            });
        }
        AdapterCmd::List { client } => {
            let all = rt.block_on(client.client().adapters())?;
            emit(json, &all, || {
                let mut lines = vec!["NAME\tBASE MODEL\tLATEST\tSTABLE".to_string()];
                lines.extend(all.iter().map(|a| {
                    let opt =
                        |v: Option<u32>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
                    format!(
                        "{}\t{}\t{}\t{}",
                        a.name,
                        a.base_model,
                        opt(a.latest_version),
                        opt(a.stable_version)
                    )
                }));
                lines.join("\n")
            });
        }
        AdapterCmd::Show { adapter, client } => {
            let r = parse_ref(&adapter)?;
            let c = client.client();
            match r.version {
                Some(v) => {
                    let ver = rt.block_on(c.version(r.name.as_str(), v))?;
                    emit(json, &ver, || {
                        let mut s = format!(
                            "{}@{}  {}\nbase model: {}\nr={} alpha={} targets={} layers={} params={}\ncreated {} by {}\n",
                            ver.adapter,
                            ver.version,
                            ver.digest,
                            ver.base_model,
                            ver.summary.r,
                            ver.summary.lora_alpha,
                            ver.summary.target_modules.join(","),
                            ver.summary.layers,
                            ver.summary.trainable_params,
                            ver.created_at,
                            ver.created_by
                        );
                        for f in &ver.files {
                            s.push_str(&format!("  {}\t{}\t{}\n", f.name, f.size, f.sha256));
                        }
                        s.trim_end().to_string()
                    });
                }
                None => {
                    let (a, versions) = rt.block_on(async {
                        Ok::<_, anyhow::Error>((
                            c.adapter(r.name.as_str()).await?,
                            c.versions(r.name.as_str()).await?,
                        ))
                    })?;
                    let value = serde_json::json!({"adapter": a, "versions": versions});
                    emit(json, &value, || {
                        let mut s = format!(
                            "{} (base model {}, stable {:?})\n",
                            a.name, a.base_model, a.stable_version
                        );
                        for v in &versions {
                            s.push_str(&format!(
                                "  @{}\t{}\t{} bytes\t{}\n",
                                v.version, v.digest, v.size_bytes, v.created_at
                            ));
                        }
                        s.trim_end().to_string()
                    });
                }
            }
        }
        AdapterCmd::Pull {
            adapter,
            dir,
            client,
        } => {
            let r = parse_ref(&adapter)?;
            let v = r
                .version
                .ok_or_else(|| UsageError(format!("{adapter:?}: pull needs a version, NAME@V")))?;
            let c = client.client();
            let ver = rt.block_on(c.version(r.name.as_str(), v))?;
            let (bar, progress) =
                transfer_bar(ver.size_bytes, &format!("pull {}@{v}", r.name), json);
            let res = rt.block_on(c.pull(r.name.as_str(), v, &dir, progress));
            bar.finish_and_clear();
            let ver = res?;
            emit(json, &ver, || {
                format!(
                    "pulled {}@{} into {} (sha256 verified)",
                    ver.adapter,
                    ver.version,
                    dir.display()
                )
            });
        }
        AdapterCmd::Delete { adapter, client } => {
            let r = parse_ref(&adapter)?;
            let v = r.version.ok_or_else(|| {
                UsageError(format!("{adapter:?}: delete needs a version, NAME@V"))
            })?;
            rt.block_on(client.client().delete_version(r.name.as_str(), v))?;
            let done = serde_json::json!({"adapter": r.name, "version": v, "deleted": true});
            emit(json, &done, || format!("deleted {}@{v}", r.name));
        }
    }
    Ok(())
}
