//! The Hugging Face `config.json` of a Llama-family model (Llama, Mistral, Qwen2, Qwen3,
//! Gemma 2, Gemma 3 text).

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// Which layout the weights follow: Llama, Mistral and Qwen2 differ only in biases and
/// defaults; Qwen3 adds q/k norms; Gemma 2/3 add the pieces [`ModelConfig`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma2,
    Gemma3,
}

impl Architecture {
    pub fn from_hf(name: &str) -> Result<Self> {
        match name {
            "LlamaForCausalLM" | "llama" => Ok(Self::Llama),
            "MistralForCausalLM" | "mistral" => Ok(Self::Mistral),
            "Qwen2ForCausalLM" | "qwen2" => Ok(Self::Qwen2),
            "Qwen3ForCausalLM" | "qwen3" => Ok(Self::Qwen3),
            "Gemma2ForCausalLM" | "gemma2" => Ok(Self::Gemma2),
            "Gemma3ForCausalLM" | "gemma3_text" => Ok(Self::Gemma3),
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
    /// Per-head RMSNorm on q and k before RoPE (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// Gemma: RMSNorm scales by (1 + w), the embeddings by √hidden, the MLP is GeGLU (tanh
    /// GELU), and attention and MLP outputs are normed before the residual add.
    pub gemma: bool,
    /// tanh soft-capping of the attention scores (Gemma 2).
    pub attn_logit_softcapping: Option<f64>,
    /// tanh soft-capping of the final logits (Gemma 2).
    pub final_logit_softcapping: Option<f64>,
    /// Attention scores scale by 1/√this (Gemma); otherwise 1/√head_dim.
    pub query_pre_attn_scalar: Option<f64>,
    /// Tokens a sliding-window layer sees (itself included).
    pub sliding_window: Option<usize>,
    /// Per layer: whether it attends within `sliding_window` only (empty: none does).
    pub sliding_layers: Vec<bool>,
    /// RoPE base of the sliding-window layers when it differs from `rope_theta` (Gemma 3's
    /// local base, unscaled).
    pub local_rope_theta: Option<f64>,
    /// A bitsandbytes 4-bit checkpoint: its decoder linears are stored as NF4 codes.
    pub quantization: Option<crate::bnb::Bnb4bit>,
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
        // transformers 5.x moves rope_theta (and the scaling) under `rope_parameters`; Gemma 3
        // keeps one set per layer type there.
        let by_type = v
            .get("rope_parameters")
            .and_then(|p| p.get("full_attention"))
            .is_some();
        let rope_params = if by_type {
            v.get("rope_parameters")
                .and_then(|p| p.get("full_attention"))
        } else {
            v.get("rope_parameters")
        }
        .filter(|p| p.is_object());
        let local_params = v
            .get("rope_parameters")
            .and_then(|p| p.get("sliding_attention"));
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
        let num_hidden_layers = req("num_hidden_layers")?;
        let gemma = matches!(architecture, Architecture::Gemma2 | Architecture::Gemma3);
        // Only Gemma's windows are applied; the others' are ignored as before.
        let sliding_window = opt_usize("sliding_window").filter(|_| gemma);
        let sliding_layers = sliding_layers(v, architecture, num_hidden_layers, sliding_window)?;
        let local_rope_theta = match local_params {
            Some(p) => {
                let kind = p
                    .get("rope_type")
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                if kind != "default" {
                    return Err(Error::Unsupported(format!(
                        "rope scaling {kind:?} on sliding-window layers"
                    )));
                }
                p.get("rope_theta").and_then(Value::as_f64)
            }
            None if architecture == Architecture::Gemma3 => {
                Some(opt_f64("rope_local_base_freq").unwrap_or(10_000.0))
            }
            None => None,
        };
        if gemma {
            let act = v
                .get("hidden_activation")
                .or_else(|| v.get("hidden_act"))
                .and_then(Value::as_str)
                .unwrap_or("gelu_pytorch_tanh");
            if act != "gelu_pytorch_tanh" {
                return Err(Error::Unsupported(format!(
                    "Gemma hidden activation {act:?} (supported: gelu_pytorch_tanh)"
                )));
            }
        }
        let (attn_logit_softcapping, final_logit_softcapping, query_pre_attn_scalar) = if gemma {
            (
                opt_f64("attn_logit_softcapping"),
                opt_f64("final_logit_softcapping"),
                Some(opt_f64("query_pre_attn_scalar").unwrap_or(256.0)),
            )
        } else {
            (None, None, None)
        };
        Ok(Self {
            architecture,
            hidden_size,
            intermediate_size: req("intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: opt_usize("num_key_value_heads").unwrap_or(num_attention_heads),
            head_dim: opt_usize("head_dim").unwrap_or(hidden_size / num_attention_heads),
            vocab_size: req("vocab_size")?,
            rms_norm_eps: opt_f64("rms_norm_eps").unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings,
            // Gemma ties by default (its configs often leave the key out).
            tie_word_embeddings: opt_bool("tie_word_embeddings").unwrap_or(gemma),
            qkv_bias: architecture == Architecture::Qwen2 || attention_bias,
            o_bias: architecture != Architecture::Qwen2 && attention_bias,
            mlp_bias: opt_bool("mlp_bias").unwrap_or(false),
            bos_token_id: opt_usize("bos_token_id").map(|x| x as u32),
            eos_token_id: eos.map(|x| x as u32),
            qk_norm: matches!(architecture, Architecture::Qwen3 | Architecture::Gemma3),
            gemma,
            attn_logit_softcapping,
            final_logit_softcapping,
            query_pre_attn_scalar,
            sliding_window,
            sliding_layers,
            local_rope_theta,
            quantization: crate::bnb::Bnb4bit::from_config(v)?,
        })
    }

    /// Whether layer `i` attends within the sliding window only.
    pub fn is_sliding(&self, i: usize) -> bool {
        self.sliding_layers.get(i).copied().unwrap_or(false)
    }

    /// The RoPE inverse frequencies of the sliding-window layers, when they differ.
    pub fn local_inv_freq(&self) -> Option<Vec<f32>> {
        self.local_rope_theta.map(|theta| {
            ModelConfig {
                rope_theta: theta,
                rope_scaling: RopeScaling::Default,
                ..self.clone()
            }
            .inv_freq()
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

/// Which layers use sliding-window attention: `layer_types` when given, else each
/// architecture's default pattern.
fn sliding_layers(
    v: &Value,
    arch: Architecture,
    n: usize,
    window: Option<usize>,
) -> Result<Vec<bool>> {
    if window.is_none() {
        return Ok(Vec::new());
    }
    if let Some(types) = v.get("layer_types").and_then(Value::as_array) {
        if types.len() != n {
            return Err(Error::Config(format!(
                "\"layer_types\" has {} entries for {n} layers",
                types.len()
            )));
        }
        return types
            .iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") => Ok(true),
                Some("full_attention") => Ok(false),
                other => Err(Error::Unsupported(format!("layer type {other:?}"))),
            })
            .collect();
    }
    Ok(match arch {
        // transformers' Gemma 2: even layers slide.
        Architecture::Gemma2 => (0..n).map(|i| i % 2 == 0).collect(),
        Architecture::Gemma3 => {
            let pattern = v
                .get("sliding_window_pattern")
                .or_else(|| v.get("_sliding_window_pattern"))
                .and_then(Value::as_u64)
                .unwrap_or(6) as usize;
            (0..n).map(|i| (i + 1) % pattern.max(1) != 0).collect()
        }
        _ => Vec::new(),
    })
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
    fn gemma3_before_layer_types_uses_its_pattern_and_local_base() {
        let v = serde_json::json!({
            "architectures": ["Gemma3ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 7, "num_attention_heads": 4, "num_key_value_heads": 1,
            "head_dim": 32, "vocab_size": 300, "rope_theta": 1000000.0,
            "rope_local_base_freq": 10000.0, "sliding_window": 512, "sliding_window_pattern": 6,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0}
        });
        let c = ModelConfig::from_json(&v).unwrap();
        assert!(c.gemma && c.qk_norm && c.tie_word_embeddings);
        assert_eq!(
            c.sliding_layers,
            [true, true, true, true, true, false, true]
        );
        assert_eq!(c.local_rope_theta, Some(1e4));
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 8.0 });
        assert_eq!(c.query_pre_attn_scalar, Some(256.0));
        // The local tables are unscaled, at the local base.
        assert_eq!(
            c.local_inv_freq().unwrap()[1],
            1.0 / 10000f32.powf(2.0 / 32.0)
        );
    }

    #[test]
    fn gemma_with_another_activation_is_refused() {
        let v = serde_json::json!({
            "architectures": ["Gemma2ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 300,
            "hidden_activation": "gelu"
        });
        let e = ModelConfig::from_json(&v).unwrap_err().to_string();
        assert!(e.contains("\"gelu\""), "{e}");
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
