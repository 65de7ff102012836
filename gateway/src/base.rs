//! The base model directory as mistral.rs 0.8.1 needs it, and what one engine costs.
//!
//! transformers 5.x writes `rope_theta` (and the scaling) under `rope_parameters`; 0.8.1 reads
//! only a top-level `rope_theta` and fails to load such a model. [`prepare`] then serves a
//! copy of the directory made of symlinks plus a normalised `config.json`, leaving the
//! user's directory untouched. [`engine_bytes`] sizes one engine (base weights, merged adapter
//! included) for the memory budget: every engine holds a full copy of the base.

use std::io::Read;
use std::path::{Path, PathBuf};

use loraops_registry::peft::SafetensorsHeader;
use serde_json::Value;
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
#[error("base model {path}: {message}")]
pub struct BaseError {
    pub path: PathBuf,
    pub message: String,
}

fn err(path: &Path, message: impl ToString) -> BaseError {
    BaseError {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// `config.json` with `rope_parameters` lifted to the top level, or `None` if it needs nothing.
pub fn normalised_config(cfg: &Value) -> Option<Value> {
    if cfg.get("rope_theta").is_some() {
        return None;
    }
    let params = cfg.get("rope_parameters")?.as_object()?;
    let mut out = cfg.clone();
    let theta = params.get("rope_theta")?.clone();
    out["rope_theta"] = theta;
    let kind = params
        .get("rope_type")
        .and_then(Value::as_str)
        .unwrap_or("default");
    if kind != "default" && out.get("rope_scaling").is_none_or(Value::is_null) {
        let mut scaling = params.clone();
        scaling.remove("rope_theta");
        out["rope_scaling"] = Value::Object(scaling);
    }
    Some(out)
}

/// The directory to load: `dir` itself, or a normalised view of it under `work`.
pub fn prepare(dir: &Path, work: &Path) -> Result<PathBuf, BaseError> {
    let cfg_path = dir.join("config.json");
    let cfg: Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).map_err(|e| err(&cfg_path, e))?)
            .map_err(|e| err(&cfg_path, e))?;
    let Some(fixed) = normalised_config(&cfg) else {
        return Ok(dir.to_path_buf());
    };
    // Content-addressed, so gateways sharing `work` agree on it, and built aside then renamed
    // into place, so none ever sees a half-made view.
    let fixed_bytes = serde_json::to_vec_pretty(&fixed).expect("json");
    let mut h = Sha256::new();
    h.update(dir.as_os_str().as_encoded_bytes());
    h.update(&fixed_bytes);
    let views = work.join("base-views");
    let view = views.join(&format!("{:x}", h.finalize())[..16]);
    if view.join("config.json").exists() {
        return Ok(view);
    }
    let tmp = views.join(format!(".tmp-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&tmp).map_err(|e| err(&tmp, e))?;
    for entry in std::fs::read_dir(dir).map_err(|e| err(dir, e))? {
        let entry = entry.map_err(|e| err(dir, e))?;
        let name = entry.file_name();
        if name == "config.json" {
            continue;
        }
        std::os::unix::fs::symlink(entry.path(), tmp.join(&name)).map_err(|e| err(&tmp, e))?;
    }
    let out = tmp.join("config.json");
    std::fs::write(&out, &fixed_bytes).map_err(|e| err(&out, e))?;
    if std::fs::rename(&tmp, &view).is_err() {
        // Another gateway made the same view first.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    tracing::info!(base = %dir.display(), view = %view.display(), "rope_parameters lifted to rope_theta for the engine");
    Ok(view)
}

/// Parameters of the base model, from its safetensors headers.
pub fn parameters(dir: &Path) -> Result<u64, BaseError> {
    let mut total = 0u64;
    for entry in std::fs::read_dir(dir).map_err(|e| err(dir, e))? {
        let path = entry.map_err(|e| err(dir, e))?.path();
        if path.extension().is_none_or(|e| e != "safetensors") {
            continue;
        }
        let mut f = std::fs::File::open(&path).map_err(|e| err(&path, e))?;
        let mut prefix = [0u8; 8];
        f.read_exact(&mut prefix).map_err(|e| err(&path, e))?;
        let len = SafetensorsHeader::header_len(&prefix).map_err(|e| err(&path, e))?;
        let mut head = prefix.to_vec();
        head.resize(len as usize, 0);
        f.read_exact(&mut head[8..]).map_err(|e| err(&path, e))?;
        let h = SafetensorsHeader::parse(&head).map_err(|e| err(&path, e))?;
        total += h
            .tensors
            .iter()
            .map(|t| t.shape.iter().product::<usize>() as u64)
            .sum::<u64>();
    }
    Ok(total)
}

/// Bytes one engine's weights take: parameters × bytes per weight of the dtype, or of the
/// ISQ format when weights are quantised in place.
pub fn engine_bytes(params: u64, dtype: &str, isq: Option<&str>) -> u64 {
    let per_weight = match isq.map(str::to_ascii_lowercase).as_deref() {
        Some("q8_0" | "q8_1" | "q8k" | "hqq8") => 1.0625,
        Some("q6k") => 0.82,
        Some("q5_0" | "q5_1" | "q5k") => 0.69,
        Some("q4_0" | "q4_1" | "q4k" | "hqq4") => 0.5625,
        Some("q3k") => 0.43,
        Some("q2k") => 0.33,
        _ => match dtype {
            "bf16" | "f16" => 2.0,
            // CPU `auto` loads BF16.
            "auto" => 2.0,
            _ => 4.0,
        },
    };
    (params as f64 * per_weight) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn transformers_5_rope_parameters_are_lifted() {
        let v5 = json!({"hidden_size": 64, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}});
        let out = normalised_config(&v5).unwrap();
        assert_eq!(out["rope_theta"], 500000.0);
        assert!(out.get("rope_scaling").is_none());
        let scaled =
            json!({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}});
        let out = normalised_config(&scaled).unwrap();
        assert_eq!(
            out["rope_scaling"],
            json!({"rope_type": "llama3", "factor": 8.0})
        );
        assert!(normalised_config(&json!({"rope_theta": 1e4})).is_none());
    }

    #[test]
    fn engine_sizes_follow_dtype_and_isq() {
        assert_eq!(engine_bytes(1000, "f32", None), 4000);
        assert_eq!(engine_bytes(1000, "bf16", None), 2000);
        assert_eq!(engine_bytes(1000, "f32", Some("Q4K")), 562);
    }
}
