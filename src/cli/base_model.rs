//! `loraops base-model add DIR | list`: register the base models adapters are checked against.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use loraops_registry::api::{Name, NewBaseModel};
use loraops_registry::peft::ModelDims;
use sha2::{Digest, Sha256};

use super::{ClientArgs, Global, UsageError, runtime};
use crate::output::emit;

#[derive(Debug, Subcommand)]
pub enum BaseModelCmd {
    /// Register a Hugging Face model directory (reads config.json; hashes the weights).
    Add {
        dir: PathBuf,
        /// Name adapters refer to (default: the directory's name).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List registered base models.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// `sha256:` over the model's `*.safetensors` files, in name order.
pub fn weights_digest(dir: &std::path::Path) -> anyhow::Result<Option<String>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    if files.is_empty() {
        return Ok(None);
    }
    files.sort();
    let mut all = Sha256::new();
    for f in files {
        let mut h = Sha256::new();
        std::io::copy(&mut std::fs::File::open(&f)?, &mut h)?;
        all.update(format!(
            "{} {}\n",
            f.file_name().unwrap_or_default().to_string_lossy(),
            hex::encode(h.finalize())
        ));
    }
    Ok(Some(format!("sha256:{}", hex::encode(all.finalize()))))
}

/// Describe a model directory for registration.
pub fn describe(dir: &std::path::Path, name: Option<&str>) -> anyhow::Result<NewBaseModel> {
    let cfg_path = dir.join("config.json");
    let cfg: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&cfg_path).with_context(|| format!("{}", cfg_path.display()))?,
    )
    .with_context(|| format!("{} is not JSON", cfg_path.display()))?;
    let dir_name = dir
        .canonicalize()?
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let name = name.unwrap_or(&dir_name);
    Ok(NewBaseModel {
        name: Name::parse(name).map_err(|e| UsageError(format!("--name: {e}")))?,
        architecture: cfg["architectures"][0].as_str().map(str::to_string),
        dims: ModelDims::from_hf_config(&cfg),
        digest: weights_digest(dir)?,
        description: None,
    })
}

pub fn run(cmd: BaseModelCmd, global: &Global) -> anyhow::Result<()> {
    let rt = runtime()?;
    match cmd {
        BaseModelCmd::Add { dir, name, client } => {
            let b = describe(&dir, name.as_deref())?;
            let created = rt.block_on(client.client().create_base_model(&b))?;
            emit(global.json, &created, || {
                format!("registered base model {}", created.name)
            });
        }
        BaseModelCmd::List { client } => {
            let all = rt.block_on(client.client().base_models())?;
            emit(global.json, &all, || {
                all.iter()
                    .map(|b| {
                        format!(
                            "{}\t{}\thidden={:?}",
                            b.name,
                            b.architecture.as_deref().unwrap_or("-"),
                            b.dims.hidden_size
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
    }
    Ok(())
}
