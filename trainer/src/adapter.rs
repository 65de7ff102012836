//! PEFT adapter directories: `adapter_config.json` + `adapter_model.safetensors` with PEFT's
//! key names, the training manifest next to them, and merging an adapter into the base.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use loraops_registry::api::TrainingManifest;
use loraops_registry::peft::{
    AdapterConfig, CONFIG_FILE, LINEAR_MODULES, LoraKey, MANIFEST_FILE, WEIGHTS_FILE,
};

use crate::error::{Error, Result, write};
use crate::llama::{Llama, weight_files};
use crate::lora::{LoraConfig, LoraPair};

/// Write tensors as safetensors with the `format: pt` metadata transformers and PEFT expect.
pub fn save_safetensors(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let mut owned = Vec::with_capacity(tensors.len());
    for (k, v) in tensors {
        owned.push((k.as_str(), v.contiguous()?));
    }
    safetensors::serialize_to_file(owned.iter().map(|(k, v)| (*k, v)), Some(meta), path)
        .map_err(|e| Error::parse(path, e))
}

/// The PEFT config for the model's adapters.
pub fn adapter_config(cfg: &LoraConfig, base_model: &str) -> AdapterConfig {
    let targets: Vec<String> = LINEAR_MODULES
        .iter()
        .filter(|(m, _)| cfg.targets.contains(*m))
        .map(|(m, _)| m.to_string())
        .collect();
    let mut a = AdapterConfig::new_lora(base_model, cfg.r, cfg.alpha, targets);
    a.lora_dropout = cfg.dropout;
    a.use_rslora = cfg.use_rslora;
    a
}

/// Write `adapter_config.json` and `adapter_model.safetensors` (f32 LoRA weights).
pub fn save_adapter(dir: &Path, model: &Llama, cfg: &LoraConfig, base_model: &str) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let acfg = adapter_config(cfg, base_model);
    acfg.check()?;
    let tensors: BTreeMap<String, Tensor> = model
        .lora_params()
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().to_dtype(DType::F32).expect("f32")))
        .collect();
    save_safetensors(&dir.join(WEIGHTS_FILE), &tensors)?;
    write(
        &dir.join(CONFIG_FILE),
        serde_json::to_vec_pretty(&acfg).expect("serialisable"),
    )
}

pub fn save_manifest(dir: &Path, manifest: &TrainingManifest) -> Result<()> {
    write(
        &dir.join(MANIFEST_FILE),
        serde_json::to_vec_pretty(manifest).expect("serialisable"),
    )
}

/// Attach a PEFT adapter from `dir` to the model (replacing any adapters it has).
pub fn load_adapter(dir: &Path, model: &mut Llama) -> Result<AdapterConfig> {
    let cpath = dir.join(CONFIG_FILE);
    let acfg = AdapterConfig::parse(&crate::error::read(&cpath)?)?;
    if let Some(f) = acfg.unsupported_for_merge().filter(|f| *f != "use_rslora") {
        return Err(Error::Unsupported(format!("adapter feature {f}")));
    }
    let wpath = dir.join(WEIGHTS_FILE);
    let tensors = candle_core::safetensors::load(&wpath, &model.device)?;
    let mut pairs: BTreeMap<(usize, String), (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
    for (name, t) in tensors {
        let key = LoraKey::parse(&name)
            .ok_or_else(|| Error::parse(&wpath, format!("{name} is not a LoRA tensor")))?;
        let e = pairs.entry((key.layer, key.module)).or_default();
        if key.is_a {
            e.0 = Some(t.to_dtype(DType::F32)?);
        } else {
            e.1 = Some(t.to_dtype(DType::F32)?);
        }
    }
    let n_layers = model.layers.len();
    for layer in &mut model.layers {
        for (m, _) in LINEAR_MODULES {
            if let Some(l) = layer.linear_mut(m) {
                l.lora = None;
            }
        }
    }
    for ((layer, module), (a, b)) in pairs {
        let (Some(a), Some(b)) = (a, b) else {
            return Err(Error::parse(
                &wpath,
                format!("layer {layer} {module}: lora_A or lora_B is missing"),
            ));
        };
        if layer >= n_layers {
            return Err(Error::parse(
                &wpath,
                format!("layer {layer} does not exist"),
            ));
        }
        let lin = model.layers[layer]
            .linear_mut(&module)
            .expect("known module");
        lin.lora = Some(LoraPair {
            a: candle_core::Var::from_tensor(&a)?,
            b: candle_core::Var::from_tensor(&b)?,
            scale: acfg.scaling(),
            dropout: 0.0,
        });
    }
    Ok(acfg)
}

/// Write a full model with the adapters folded in: every adapted linear weight becomes
/// W + scale·B·A (W as the training saw it, so NF4 bases are dequantised first), stored in
/// the dtype of the base's own file; everything else is copied. Nothing is re-quantised.
pub fn merge_into(base_dir: &Path, model: &Llama, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let files = weight_files(base_dir)?;
    let mut merged: BTreeMap<String, Tensor> = BTreeMap::new();
    for f in &files {
        for (name, t) in candle_core::safetensors::load(f, &Device::Cpu)? {
            merged.insert(name, t);
        }
    }
    for (i, layer) in model.layers.iter().enumerate() {
        for (m, block) in LINEAR_MODULES {
            let lin = layer.linear(m).expect("known module");
            if lin.lora.is_none() {
                continue;
            }
            let name = format!("model.layers.{i}.{block}.{m}.weight");
            let dtype = merged
                .get(&name)
                .map(|t| t.dtype())
                .ok_or(Error::MissingWeight { name: name.clone() })?;
            merged.insert(
                name,
                lin.merged_weight()?
                    .to_device(&Device::Cpu)?
                    .to_dtype(dtype)?,
            );
        }
    }
    save_safetensors(&out.join("model.safetensors"), &merged)?;
    for entry in std::fs::read_dir(base_dir).map_err(|e| Error::io(base_dir, e))? {
        let p = entry.map_err(|e| Error::io(base_dir, e))?.path();
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let is_weights = name.ends_with(".safetensors") || name == "model.safetensors.index.json";
        if p.is_file() && !is_weights {
            std::fs::copy(&p, out.join(&name)).map_err(|e| Error::io(&p, e))?;
        }
    }
    Ok(())
}
