//! The Hugging Face `config.json` of a Llama-family model (Llama, Mistral, Qwen2).

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// Which layout the weights follow; they differ only in biases and defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

impl Architecture {
    pub fn from_hf(name: &str) -> Result<Self> {
        match name {
            "LlamaForCausalLM" | "llama" => Ok(Self::Llama),
            "MistralForCausalLM" | "mistral" => Ok(Self::Mistral),
            "Qwen2ForCausalLM" | "qwen2" => Ok(Self::Qwen2),
            other => Err(Error::UnknownArchitecture(other.to_string())),
        }
    }
}

/// RoPE frequency scaling, as transformers' `rope_scaling` / `rope_parameters` describe it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum RopeScaling {
    Default,
    Linear {
        factor: f64,
    },
    /// Dynamic NTK: identical to the default below `original_max_position_embeddings`,
    /// which is where training sequences stay (checked at run time).
    Dynamic {
        factor: f64,
        original_max: usize,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max: usize,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v (Qwen2 always; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama with `attention_bias`).
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = crate::error::read(path)?;
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| Error::parse(path, e))?;
        Self::from_json(&v).map_err(|e| match e {
            Error::Config(m) => Error::parse(path, m),
            other => other,
        })
    }

    pub fn from_json(v: &Value) -> Result<Self> {
        let arch_name = v
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .or_else(|| v.get("model_type").and_then(Value::as_str))
            .ok_or_else(|| {
                Error::Config("neither \"architectures\" nor \"model_type\" is set".into())
            })?;
        let architecture = Architecture::from_hf(arch_name)?;
        let req = |k: &str| -> Result<usize> {
            v.get(k)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| Error::Config(format!("missing or invalid \"{k}\"")))
        };
        let opt_usize = |k: &str| v.get(k).and_then(Value::as_u64).map(|x| x as usize);
        let opt_f64 = |k: &str| v.get(k).and_then(Value::as_f64);
        let opt_bool = |k: &str| v.get(k).and_then(Value::as_bool);
        let hidden_size = req("hidden_size")?;
        let num_attention_heads = req("num_attention_heads")?;
        // transformers 5.x moves rope_theta (and the scaling) under `rope_parameters`.
        let rope_params = v.get("rope_parameters").filter(|p| p.is_object());
        let rope_theta = opt_f64("rope_theta")
            .or_else(|| {
                rope_params
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(Value::as_f64)
            })
            .unwrap_or(10_000.0);
        let max_position_embeddings = opt_usize("max_position_embeddings").unwrap_or(4096);
        let scaling = v
            .get("rope_scaling")
            .filter(|s| s.is_object())
            .or(rope_params);
        let rope_scaling = parse_rope_scaling(scaling, max_position_embeddings)?;
        let eos = match v.get("eos_token_id") {
            Some(Value::Array(a)) => a.first().and_then(Value::as_u64),
            Some(x) => x.as_u64(),
            None => None,
        };
        let attention_bias = opt_bool("attention_bias").unwrap_or(false);
        Ok(Self {
            architecture,
            hidden_size,
            intermediate_size: req("intermediate_size")?,
            num_hidden_layers: req("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads: opt_usize("num_key_value_heads").unwrap_or(num_attention_heads),
            head_dim: opt_usize("head_dim").unwrap_or(hidden_size / num_attention_heads),
            vocab_size: req("vocab_size")?,
            rms_norm_eps: opt_f64("rms_norm_eps").unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings,
            tie_word_embeddings: opt_bool("tie_word_embeddings").unwrap_or(false),
            qkv_bias: architecture == Architecture::Qwen2 || attention_bias,
            o_bias: architecture != Architecture::Qwen2 && attention_bias,
            mlp_bias: opt_bool("mlp_bias").unwrap_or(false),
            bos_token_id: opt_usize("bos_token_id").map(|x| x as u32),
            eos_token_id: eos.map(|x| x as u32),
        })
    }

    /// The RoPE inverse frequencies (head_dim / 2 of them), scaled as configured.
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        // transformers computes these in float32 from an int64 arange; mirror that order.
        let base: Vec<f32> = (0..d)
            .step_by(2)
            .map(|i| 1.0 / (self.rope_theta as f32).powf(i as f32 / d as f32))
            .collect();
        match &self.rope_scaling {
            RopeScaling::Default | RopeScaling::Dynamic { .. } => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / *factor as f32).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max,
            } => {
                let (factor, low, high, old) = (
                    *factor,
                    *low_freq_factor,
                    *high_freq_factor,
                    *original_max as f64,
                );
                let low_wavelen = old / low;
                let high_wavelen = old / high;
                base.iter()
                    .map(|&f| {
                        let f64f = f as f64;
                        let wavelen = 2.0 * std::f64::consts::PI / f64f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            (f64f / factor) as f32
                        } else {
                            let smooth = (old / wavelen - low) / (high - low);
                            ((1.0 - smooth) * f64f / factor + smooth * f64f) as f32
                        }
                    })
                    .collect()
            }
        }
    }

    /// Names of the linear modules every decoder layer has.
    pub fn linear_modules(&self) -> &'static [&'static str] {
        &[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
    }

    /// (in_features, out_features) of a decoder layer's linear module.
    pub fn linear_shape(&self, module: &str) -> Option<(usize, usize)> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        Some(match module {
            "q_proj" => (h, q),
            "k_proj" | "v_proj" => (h, kv),
            "o_proj" => (q, h),
            "gate_proj" | "up_proj" => (h, i),
            "down_proj" => (i, h),
            _ => return None,
        })
    }
}

fn parse_rope_scaling(s: Option<&Value>, max_pos: usize) -> Result<RopeScaling> {
    let Some(s) = s else {
        return Ok(RopeScaling::Default);
    };
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let f = |k: &str| s.get(k).and_then(Value::as_f64);
    let factor = || {
        f("factor").ok_or_else(|| Error::Config(format!("rope scaling {kind:?} needs \"factor\"")))
    };
    let original_max = s
        .get("original_max_position_embeddings")
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .unwrap_or(max_pos);
    Ok(match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: factor()? },
        "dynamic" => RopeScaling::Dynamic {
            factor: factor()?,
            original_max,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: factor()?,
            low_freq_factor: f("low_freq_factor").unwrap_or(1.0),
            high_freq_factor: f("high_freq_factor").unwrap_or(4.0),
            original_max,
        },
        other => {
            return Err(Error::Unsupported(format!(
                "rope scaling {other:?} (supported: default, linear, dynamic, llama3)"
            )));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_theta_under_rope_parameters() {
        let v = serde_json::json!({
            "architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 300, "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}
        });
        let c = ModelConfig::from_json(&v).unwrap();
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!(c.rope_scaling, RopeScaling::Default);
        assert!(c.qkv_bias && !c.o_bias);
        assert_eq!(c.head_dim, 16);
    }

    #[test]
    fn unknown_architecture_is_named() {
        let v = serde_json::json!({"architectures": ["GPT2LMHeadModel"]});
        let e = ModelConfig::from_json(&v).unwrap_err().to_string();
        assert!(
            e.contains("GPT2LMHeadModel") && e.contains("LlamaForCausalLM"),
            "{e}"
        );
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let v = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 128, "intermediate_size": 256,
            "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 10, "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        });
        let c = ModelConfig::from_json(&v).unwrap();
        let plain = ModelConfig {
            rope_scaling: RopeScaling::Default,
            ..c.clone()
        }
        .inv_freq();
        let scaled = c.inv_freq();
        assert_eq!(scaled[0], plain[0]);
        let last = plain.len() - 1;
        assert!((scaled[last] - plain[last] / 8.0).abs() < 1e-12);
    }
}
