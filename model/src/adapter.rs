//! PEFT adapter directories: `adapter_config.json` + `adapter_model.safetensors` with PEFT's
//! key names, the training manifest next to them, and merging an adapter into the base.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use loraops_registry::api::TrainingManifest;
use loraops_registry::peft::{
    AdapterConfig, CONFIG_FILE, LINEAR_MODULES, LoraKey, MANIFEST_FILE, WEIGHTS_FILE,
};

use crate::config::ModelConfig;
use crate::error::{Error, Result, write};
use crate::linear::lora::{LoraConfig, LoraPair};
use crate::llama::{Llama, weight_files};

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

/// One adapted linear module of a PEFT adapter: A (r × in) and B (out × r) in f32, and the
/// scale PEFT applies to B·A for that module.
#[derive(Debug, Clone)]
pub struct AdapterPair {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
}

/// A PEFT LoRA adapter read from its directory and checked against a model's shapes.
#[derive(Debug, Clone)]
pub struct PeftAdapter {
    pub config: AdapterConfig,
    /// By (layer, module name).
    pub pairs: BTreeMap<(usize, String), AdapterPair>,
}

impl PeftAdapter {
    /// Bytes of the adapter's weights (f32).
    pub fn bytes(&self) -> usize {
        self.pairs
            .values()
            .map(|p| 4 * (p.a.elem_count() + p.b.elem_count()))
            .sum()
    }
}

/// Read a PEFT LoRA adapter for a model with `model`'s shapes: every tensor must be a LoRA pair
/// of a decoder layer's linear module, with the module's shapes and the rank its config (or
/// `rank_pattern`) gives; the scale follows `lora_alpha`, `alpha_pattern` and `use_rslora`.
/// What loraops cannot apply exactly (DoRA, `modules_to_save`, trained biases,
/// `fan_in_fan_out`) is refused by name rather than served wrong.
pub fn read_adapter(dir: &Path, model: &ModelConfig, device: &Device) -> Result<PeftAdapter> {
    let cpath = dir.join(CONFIG_FILE);
    let config = AdapterConfig::parse(&crate::error::read(&cpath)?)?;
    let refused = if config.use_dora {
        Some("use_dora (DoRA)")
    } else if config
        .modules_to_save
        .as_ref()
        .is_some_and(|m| !m.is_empty())
    {
        Some("modules_to_save")
    } else if config.bias != "none" {
        Some("bias (trained biases)")
    } else if config.fan_in_fan_out {
        Some("fan_in_fan_out")
    } else {
        None
    };
    if let Some(f) = refused {
        return Err(Error::Unsupported(format!(
            "{}: adapter feature {f} is not supported",
            cpath.display()
        )));
    }
    let wpath = dir.join(WEIGHTS_FILE);
    let tensors = candle_core::safetensors::load(&wpath, device)?;
    let mut halves: BTreeMap<(usize, String), (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
    for (name, t) in tensors {
        let key = LoraKey::parse(&name)
            .ok_or_else(|| Error::parse(&wpath, format!("{name} is not a LoRA tensor")))?;
        let e = halves.entry((key.layer, key.module)).or_default();
        let t = t.to_dtype(DType::F32)?;
        if key.is_a {
            e.0 = Some(t);
        } else {
            e.1 = Some(t);
        }
    }
    let mut pairs = BTreeMap::new();
    for ((layer, module), (a, b)) in halves {
        let bad = |m: String| Error::parse(&wpath, format!("layer {layer} {module}: {m}"));
        let (Some(a), Some(b)) = (a, b) else {
            return Err(bad("lora_A or lora_B is missing".into()));
        };
        if layer >= model.num_hidden_layers {
            return Err(bad(format!(
                "the model has {} layers",
                model.num_hidden_layers
            )));
        }
        let (in_f, out_f) = model
            .linear_shape(&module)
            .ok_or_else(|| bad("not a linear module of the model".into()))?;
        let (r, a_in) = a.dims2()?;
        let (b_out, b_r) = b.dims2()?;
        if a_in != in_f || b_out != out_f || b_r != r {
            return Err(bad(format!(
                "A {:?} and B {:?} do not fit a ({out_f}, {in_f}) weight",
                a.dims(),
                b.dims()
            )));
        }
        let path = loraops_registry::peft::module_path(layer, &module);
        let want_r = config.rank_of(&path)?;
        if r != want_r {
            return Err(bad(format!("rank {r}, but the config gives {want_r}")));
        }
        let scale = config.scale_of(&path, r)?;
        pairs.insert((layer, module), AdapterPair { a, b, scale });
    }
    Ok(PeftAdapter { config, pairs })
}

/// Attach a PEFT adapter from `dir` to the model (replacing any adapters it has).
pub fn load_adapter(dir: &Path, model: &mut Llama) -> Result<AdapterConfig> {
    let adapter = read_adapter(dir, &model.config, &model.device)?;
    for layer in &mut model.layers {
        for (m, _) in LINEAR_MODULES {
            if let Some(l) = layer.linear_mut(m) {
                l.lora = None;
            }
        }
    }
    for ((layer, module), p) in adapter.pairs {
        let lin = model.layers[layer]
            .linear_mut(&module)
            .expect("checked module");
        lin.lora = Some(LoraPair {
            a: candle_core::Var::from_tensor(&p.a)?,
            b: candle_core::Var::from_tensor(&p.b)?,
            scale: p.scale,
            dropout: 0.0,
        });
    }
    Ok(adapter.config)
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
