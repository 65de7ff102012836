//! Continuing from an adapter (`init_adapter`): training starts from its LoRA weights, with
//! its rank, alpha, rsLoRA and target modules, and the manifest names it as the parent.
//!
//! `loraops train` resolves `NAME@V` by pulling the version from the registry (the library
//! takes the directory it was pulled into and what the registry says of it).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use loraops_model::adapter::read_adapter;
use loraops_model::llama::Llama;
use loraops_registry::api::{VersionFile, version_digest};
use loraops_registry::peft::{
    AdapterConfig, CONFIG_FILE, MANIFEST_FILE, README_FILE, WEIGHTS_FILE,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// An adapter to continue from: its directory, and what the manifest records as its parent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InitAdapter {
    pub dir: PathBuf,
    /// `{"adapter","version","digest"}` for a registry version, `{"path","digest"}` for a
    /// directory.
    pub parent: Value,
}

impl InitAdapter {
    /// A directory on disk; its digest is the one the registry would give it if it were pushed.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if !dir.join(CONFIG_FILE).is_file() || !dir.join(WEIGHTS_FILE).is_file() {
            return Err(Error::Config(format!(
                "init_adapter {}: not an adapter directory (it needs {CONFIG_FILE} and {WEIGHTS_FILE})",
                dir.display()
            )));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            parent: json!({"path": dir.display().to_string(), "digest": dir_digest(dir)?}),
        })
    }

    /// A registry version, already pulled (and its files' sha256 checked) into `dir`.
    pub fn from_registry(dir: &Path, adapter: &str, version: u32, digest: &str) -> Self {
        Self {
            dir: dir.to_path_buf(),
            parent: json!({"adapter": adapter, "version": version, "digest": digest}),
        }
    }
}

/// The registry's version digest of an adapter directory: over the files a push uploads.
pub fn dir_digest(dir: &Path) -> Result<String> {
    let mut files = Vec::new();
    for name in [CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE, README_FILE] {
        let p = dir.join(name);
        if !p.is_file() {
            continue;
        }
        let bytes = crate::error::read(&p)?;
        files.push(VersionFile {
            name: name.to_string(),
            sha256: hex::encode(Sha256::digest(&bytes)),
            size: bytes.len() as u64,
        });
    }
    Ok(version_digest(&files))
}

fn read_config(dir: &Path) -> Result<AdapterConfig> {
    let p = dir.join(CONFIG_FILE);
    let cfg = AdapterConfig::parse(&crate::error::read(&p)?)?;
    // Per-module ranks and alphas cannot be trained on: every pair here shares r and alpha.
    if !cfg.rank_pattern.is_empty() || !cfg.alpha_pattern.is_empty() {
        return Err(Error::Unsupported(format!(
            "{}: init_adapter with rank_pattern or alpha_pattern (training uses one r and alpha for every module)",
            p.display()
        )));
    }
    Ok(cfg)
}

/// The LoRA settings of the adapter in `dir` as training-configuration keys (`r`, `alpha`,
/// `use_rslora`, `targets`, `dropout`).
pub fn lora_settings(dir: &Path) -> Result<Map<String, Value>> {
    let cfg = read_config(dir)?;
    let targets: Vec<String> = cfg.target_modules.resolve()?.into_iter().collect();
    let mut m = Map::new();
    m.insert("r".into(), json!(cfg.r));
    m.insert("alpha".into(), json!(cfg.lora_alpha));
    m.insert("use_rslora".into(), json!(cfg.use_rslora));
    m.insert("targets".into(), json!(targets));
    m.insert("dropout".into(), json!(cfg.lora_dropout));
    Ok(m)
}

/// Take the adapter's LoRA settings for the keys `table` leaves out; the keys it sets are
/// checked against the adapter when training starts.
pub fn fill_lora_settings(table: &mut Map<String, Value>, dir: &Path) -> Result<()> {
    for (k, v) in lora_settings(dir)? {
        table.entry(k).or_insert(v);
    }
    Ok(())
}

/// Refuse settings that differ from the adapter's: a continued adapter keeps its shapes and
/// scale.
pub(crate) fn check_matches(
    dir: &Path,
    lora: &loraops_model::linear::lora::LoraConfig,
) -> Result<()> {
    let cfg = read_config(dir)?;
    let targets = cfg.target_modules.resolve()?;
    let mut diffs = Vec::new();
    if cfg.r != lora.r {
        diffs.push(format!("r {} (this run: {})", cfg.r, lora.r));
    }
    if cfg.lora_alpha != lora.alpha {
        diffs.push(format!(
            "alpha {} (this run: {})",
            cfg.lora_alpha, lora.alpha
        ));
    }
    if cfg.use_rslora != lora.use_rslora {
        diffs.push(format!(
            "use_rslora {} (this run: {})",
            cfg.use_rslora, lora.use_rslora
        ));
    }
    if targets != lora.targets {
        let list = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>().join(",");
        diffs.push(format!(
            "targets {} (this run: {})",
            list(&targets),
            list(&lora.targets)
        ));
    }
    if diffs.is_empty() {
        return Ok(());
    }
    Err(Error::Config(format!(
        "init_adapter {} has {}: leave out --r, --alpha, --rslora and --targets to take the adapter's, or give the same values",
        dir.display(),
        diffs.join(", ")
    )))
}

/// Set the model's fresh LoRA pairs to the adapter's weights. Every pair the model has must be
/// in the adapter and the other way round.
pub(crate) fn load_weights(dir: &Path, model: &mut Llama) -> Result<()> {
    let adapter = read_adapter(dir, &model.config, &model.device)?;
    let mut pairs: BTreeMap<(usize, String), _> = adapter.pairs;
    for (i, layer) in model.layers.iter_mut().enumerate() {
        for (m, _) in loraops_registry::peft::LINEAR_MODULES {
            let Some(lora) = layer.linear_mut(m).and_then(|l| l.lora.as_mut()) else {
                continue;
            };
            let p = pairs.remove(&(i, m.to_string())).ok_or_else(|| {
                Error::Config(format!(
                    "init_adapter {}: no weights for layer {i} {m} (an adapter of some layers only cannot be continued)",
                    dir.display()
                ))
            })?;
            lora.a.set(&p.a.to_dtype(lora.a.dtype())?)?;
            lora.b.set(&p.b.to_dtype(lora.b.dtype())?)?;
        }
    }
    if let Some((layer, m)) = pairs.keys().next() {
        return Err(Error::Config(format!(
            "init_adapter {}: has weights for layer {layer} {m}, which this run does not train",
            dir.display()
        )));
    }
    Ok(())
}

/// The model as training starts, frozen: the same base weights (shared, not copied) and a
/// copy of the adapter's current values, which later updates do not touch. The reference
/// model of DPO and KTO when training continues from an adapter.
pub fn frozen_copy(model: &Llama) -> Result<Llama> {
    let mut m = model.clone();
    m.layer_step = None;
    for layer in &mut m.layers {
        for (name, _) in loraops_registry::peft::LINEAR_MODULES {
            if let Some(l) = layer.linear_mut(name).and_then(|l| l.lora.as_mut()) {
                // A cloned Var shares its storage with the policy's; copy it.
                l.a = candle_core::Var::from_tensor(&l.a.as_tensor().copy()?)?;
                l.b = candle_core::Var::from_tensor(&l.b.as_tensor().copy()?)?;
            }
        }
    }
    Ok(m)
}
