//! A differentiable Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3
//! text): GQA attention with RoPE, RMSNorm, SwiGLU or GeGLU, tied or untied embeddings,
//! optional q/k/v biases, q/k norms, Gemma's extra norms, soft-capping and sliding windows.
//!
//! Every op here has a backward in candle: candle-nn's fused softmax, rms_norm and rope
//! kernels have none and would cut the graph silently, so they are composed from basic ops,
//! or, for f32 on the CPU, taken from `fused` (one pass each, with their own backward).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{D, DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use crate::config::{ModelConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::kernels::attention::{Heads, causal_attention};
use crate::kernels::fused;
use crate::linear::frozen::{FrozenMatmul, FrozenWeight};
use crate::linear::lora::{DropoutRng, Linear, LoraConfig, LoraPair};
use crate::linear::nf4::Nf4Tensor;

/// How the frozen base weights are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BaseFormat {
    #[default]
    F32,
    Bf16,
    Nf4,
}

impl std::str::FromStr for BaseFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" | "none" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "nf4" => Ok(Self::Nf4),
            other => Err(Error::Config(format!(
                "unknown base format {other:?} (f32, bf16, nf4)"
            ))),
        }
    }
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub format: BaseFormat,
    /// NF4 only: quantise the absmax values too (8-bit, block 256).
    pub double_quant: bool,
    /// NF4 only: hold what stays unquantised (embeddings, lm_head) in bf16 rather than f32.
    pub unquantized_bf16: bool,
    /// The activations' dtype: f32, or bf16 for mixed precision (norms, softmax and the loss
    /// stay in f32; LoRA weights and their optimiser state stay f32).
    pub compute_dtype: DType,
    pub device: Device,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            format: BaseFormat::F32,
            double_quant: true,
            unquantized_bf16: false,
            compute_dtype: DType::F32,
            device: Device::Cpu,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
}

#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub input_layernorm: Tensor,
    pub self_attn: Attention,
    /// Before the MLP; in Gemma's layout, on the attention's output before the residual add.
    pub post_attention_layernorm: Tensor,
    pub mlp: Mlp,
    /// Per-head norms of q and k before RoPE (Qwen3, Gemma 3).
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    /// Gemma: before the MLP, and on its output before the residual add.
    pub pre_feedforward_layernorm: Option<Tensor>,
    pub post_feedforward_layernorm: Option<Tensor>,
    /// Attends within the configured sliding window only, with the local RoPE tables.
    pub sliding: bool,
}

impl DecoderLayer {
    pub fn linear(&self, module: &str) -> Option<&Linear> {
        Some(match module {
            "q_proj" => &self.self_attn.q_proj,
            "k_proj" => &self.self_attn.k_proj,
            "v_proj" => &self.self_attn.v_proj,
            "o_proj" => &self.self_attn.o_proj,
            "gate_proj" => &self.mlp.gate_proj,
            "up_proj" => &self.mlp.up_proj,
            "down_proj" => &self.mlp.down_proj,
            _ => return None,
        })
    }

    pub fn linear_mut(&mut self, module: &str) -> Option<&mut Linear> {
        Some(match module {
            "q_proj" => &mut self.self_attn.q_proj,
            "k_proj" => &mut self.self_attn.k_proj,
            "v_proj" => &mut self.self_attn.v_proj,
            "o_proj" => &mut self.self_attn.o_proj,
            "gate_proj" => &mut self.mlp.gate_proj,
            "up_proj" => &mut self.mlp.up_proj,
            "down_proj" => &mut self.mlp.down_proj,
            _ => return None,
        })
    }
}

/// Inputs shared by all layers of one forward pass.
#[derive(Debug, Clone)]
pub struct Context {
    /// (B, 1, T, head_dim) each.
    pub cos: Tensor,
    pub sin: Tensor,
    /// Additive attention mask (B, 1, T, T): 0 where allowed, f32::MIN elsewhere.
    pub mask: Tensor,
    /// RoPE tables of the sliding-window layers, when their base differs.
    pub local_rope: Option<(Tensor, Tensor)>,
    /// The mask of the sliding-window layers, when the model has any.
    pub local_mask: Option<Tensor>,
}

impl Context {
    /// (cos, sin, mask) for a layer.
    fn for_layer(&self, sliding: bool) -> (&Tensor, &Tensor, &Tensor) {
        let (cos, sin) = match (&self.local_rope, sliding) {
            (Some((c, s)), true) => (c, s),
            _ => (&self.cos, &self.sin),
        };
        let mask = match (&self.local_mask, sliding) {
            (Some(m), true) => m,
            _ => &self.mask,
        };
        (cos, sin, mask)
    }
}

#[derive(Debug, Clone)]
pub struct Llama {
    pub config: ModelConfig,
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: Tensor,
    pub lm_head: FrozenMatmul,
    pub device: Device,
    /// The activations' dtype (see [`LoadOptions::compute_dtype`]).
    pub compute_dtype: DType,
    /// How each decoder layer is run; `None` runs [`layer_forward`] directly. A training loop
    /// installs its own step here (activation checkpointing) without the model knowing.
    pub layer_step: Option<Arc<dyn LayerStep>>,
}

/// Runs one decoder layer in place of [`layer_forward`], e.g. keeping only its output and
/// recomputing it in backward. Gradients such a step computes outside the main graph are
/// handed back through [`LayerStep::take_grad`].
pub trait LayerStep: Send + Sync + std::fmt::Debug {
    fn run(
        &self,
        layer: &DecoderLayer,
        config: &ModelConfig,
        x: &Tensor,
        ctx: &Context,
        rng: &mut DropoutRng,
    ) -> candle_core::Result<Tensor>;

    /// The gradient this step computed for `v` since the last call, if any.
    fn take_grad(&self, _v: &Var) -> Option<Tensor> {
        None
    }
}

/// The base model's weight files, in a stable order.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    let mut files: Vec<PathBuf> = if index.exists() {
        let bytes = crate::error::read(&index)?;
        let v: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| Error::parse(&index, e))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::parse(&index, "no \"weight_map\" object"))?;
        let set: BTreeSet<&str> = map.values().filter_map(|f| f.as_str()).collect();
        set.into_iter().map(|f| dir.join(f)).collect()
    } else {
        let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
        rd.filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect()
    };
    files.sort();
    if files.is_empty() {
        return Err(Error::parse(dir, "no *.safetensors weight files"));
    }
    Ok(files)
}

struct Weights {
    st: MmapedSafetensors,
    opts: LoadOptions,
    /// Gemma's RMSNorm scales by (1 + w): stored as such, so the norm itself is shared.
    norm_plus_one: bool,
    /// A bitsandbytes 4-bit checkpoint (see [`crate::bnb`]).
    prequantized: bool,
}

impl Weights {
    fn get(&self, name: &str) -> Result<Tensor> {
        self.get_on(name, &self.opts.device)
    }

    fn get_on(&self, name: &str, device: &Device) -> Result<Tensor> {
        self.st
            .load(name, device)
            .map_err(|_| Error::MissingWeight { name: name.into() })
    }

    /// Small tensors (norms, biases) always compute in f32.
    fn small(&self, name: &str) -> Result<Tensor> {
        Ok(self.get(name)?.to_dtype(DType::F32)?)
    }

    /// A norm's weight, as the shared RMSNorm multiplies by it (in f32, as transformers adds).
    fn norm(&self, name: &str) -> Result<Tensor> {
        let w = self.small(name)?;
        Ok(if self.norm_plus_one { (w + 1.0)? } else { w })
    }

    /// Whether weights that are not quantised are held in bf16.
    fn dense_bf16(&self) -> bool {
        match self.opts.format {
            BaseFormat::F32 => false,
            BaseFormat::Bf16 => true,
            BaseFormat::Nf4 => self.opts.unquantized_bf16,
        }
    }

    fn frozen(&self, w: Tensor, quantizable: bool) -> Result<FrozenWeight> {
        Ok(match self.opts.format {
            BaseFormat::Nf4 if quantizable => FrozenWeight::Nf4(Arc::new(Nf4Tensor::quantize_to(
                &w,
                self.opts.double_quant,
                &self.opts.device,
            )?)),
            _ if self.dense_bf16() => FrozenWeight::Bf16(w.to_dtype(DType::BF16)?),
            _ => FrozenWeight::Dense(w.to_dtype(DType::F32)?),
        })
    }

    fn linear(&self, prefix: &str, bias: bool) -> Result<Linear> {
        let name = format!("{prefix}.weight");
        let bias = if bias {
            Some(self.small(&format!("{prefix}.bias"))?)
        } else {
            None
        };
        // A pre-quantised checkpoint's linears are held exactly as stored, whatever the
        // format asked: an adapter then trains against the very weights it will serve on.
        let stored = if self.prequantized {
            crate::bnb::read_nf4(&self.st, &name, &self.opts.device)?
        } else {
            None
        };
        let weight = match stored {
            Some(q) => FrozenWeight::Nf4(Arc::new(q)),
            None => {
                // NF4 codes are computed on the host: only the quantised bytes go to the device.
                let w = if self.opts.format == BaseFormat::Nf4 {
                    self.get_on(&name, &Device::Cpu)?
                } else {
                    self.get(&name)?
                };
                self.frozen(w, true)?
            }
        };
        Ok(Linear {
            base: FrozenMatmul::new(weight),
            bias,
            lora: None,
        })
    }
}

impl Llama {
    /// Load a Hugging Face model directory (config.json + safetensors, sharded or not).
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let files = weight_files(dir)?;
        // SAFETY: the files are memory-mapped read-only; loraops never writes a model in place.
        let st = unsafe { MmapedSafetensors::multi(&files)? };
        let w = Weights {
            st,
            opts: opts.clone(),
            norm_plus_one: config.gemma,
            prequantized: config.quantization.is_some(),
        };
        let c = &config;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let opt_norm = |on: bool, name: &str| -> Result<Option<Tensor>> {
                on.then(|| w.norm(&format!("{p}.{name}.weight")))
                    .transpose()
            };
            layers.push(DecoderLayer {
                q_norm: opt_norm(c.qk_norm, "self_attn.q_norm")?,
                k_norm: opt_norm(c.qk_norm, "self_attn.k_norm")?,
                pre_feedforward_layernorm: opt_norm(c.gemma, "pre_feedforward_layernorm")?,
                post_feedforward_layernorm: opt_norm(c.gemma, "post_feedforward_layernorm")?,
                sliding: c.is_sliding(i),
                input_layernorm: w.norm(&format!("{p}.input_layernorm.weight"))?,
                self_attn: Attention {
                    q_proj: w.linear(&format!("{p}.self_attn.q_proj"), c.qkv_bias)?,
                    k_proj: w.linear(&format!("{p}.self_attn.k_proj"), c.qkv_bias)?,
                    v_proj: w.linear(&format!("{p}.self_attn.v_proj"), c.qkv_bias)?,
                    o_proj: w.linear(&format!("{p}.self_attn.o_proj"), c.o_bias)?,
                },
                post_attention_layernorm: w
                    .norm(&format!("{p}.post_attention_layernorm.weight"))?,
                mlp: Mlp {
                    gate_proj: w.linear(&format!("{p}.mlp.gate_proj"), c.mlp_bias)?,
                    up_proj: w.linear(&format!("{p}.mlp.up_proj"), c.mlp_bias)?,
                    down_proj: w.linear(&format!("{p}.mlp.down_proj"), c.mlp_bias)?,
                },
            });
        }
        let embed = w.get("model.embed_tokens.weight")?;
        // bitsandbytes leaves embeddings and lm_head unquantised; so does loraops.
        let embed_tokens = embed.to_dtype(if w.dense_bf16() {
            DType::BF16
        } else {
            DType::F32
        })?;
        let head = if c.tie_word_embeddings {
            embed
        } else {
            w.get("lm_head.weight")?
        };
        let lm_head = FrozenMatmul::new(w.frozen(head, false)?);
        Ok(Self {
            norm: w.norm("model.norm.weight")?,
            config,
            embed_tokens,
            layers,
            lm_head,
            device: opts.device.clone(),
            compute_dtype: opts.compute_dtype,
            layer_step: None,
        })
    }

    /// Attach fresh LoRA pairs to the configured modules of every layer.
    pub fn add_lora(&mut self, cfg: &LoraConfig, rng: &mut StdRng) -> Result<()> {
        let available = self.config.linear_modules();
        for t in &cfg.targets {
            if !available.contains(&t.as_str()) {
                return Err(Error::TargetModuleNotFound {
                    module: t.clone(),
                    available: available.join(", "),
                });
            }
        }
        // Layer by layer, module by module in the model's order: the order PEFT initialises in.
        for layer in self.layers.iter_mut() {
            for m in available {
                if !cfg.targets.contains(*m) {
                    continue;
                }
                let lin = layer.linear_mut(m).expect("known module");
                let (out_f, in_f) = lin.base.weight.dims2()?;
                lin.lora = Some(LoraPair::init(in_f, out_f, cfg, rng, &self.device)?);
            }
        }
        Ok(())
    }

    /// Every LoRA pair with its PEFT tensor names, in key order.
    pub fn lora_params(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            for m in self.config.linear_modules() {
                if let Some(l) = layer.linear(m).and_then(|l| l.lora.as_ref()) {
                    out.push((loraops_registry::peft::lora_key(i, m, true), l.a.clone()));
                    out.push((loraops_registry::peft::lora_key(i, m, false), l.b.clone()));
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The most likely token after `ids` (one sequence, whole forward, no cache): greedy
    /// decoding for checking a serving engine against this model.
    pub fn greedy_next(&self, ids: &[u32]) -> Result<u32> {
        let input = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        let logits = self.logits(&input, None)?.squeeze(0)?;
        Ok(logits
            .get(ids.len().saturating_sub(1))?
            .argmax(D::Minus1)?
            .to_scalar::<u32>()?)
    }

    /// Bytes per parameter of the NF4 frozen linears (None when none is NF4).
    pub fn nf4_bytes_per_param(&self) -> Option<f64> {
        let (mut bytes, mut params) = (0usize, 0usize);
        for layer in &self.layers {
            for m in self.config.linear_modules() {
                if let Some(FrozenWeight::Nf4(q)) = layer.linear(m).map(|l| &l.base.weight) {
                    bytes += q.storage_bytes();
                    params += q.shape[0] * q.shape[1];
                }
            }
        }
        (params > 0).then(|| bytes as f64 / params as f64)
    }

    /// The gradient the installed [`LayerStep`] computed for `v` outside the graph, if any.
    pub fn take_step_grad(&self, v: &Var) -> Option<Tensor> {
        self.layer_step.as_ref().and_then(|s| s.take_grad(v))
    }

    /// RoPE tables and the attention mask for a (B, T) batch. `attention_mask` gives each
    /// token's packed example (0: padding); positions restart at 0 with each example, and a
    /// token attends to earlier tokens of its own example only.
    pub fn context(
        &self,
        b: usize,
        t: usize,
        attention_mask: Option<&[Vec<u32>]>,
    ) -> Result<Context> {
        if let RopeScaling::Dynamic { original_max, .. } = self.config.rope_scaling
            && t > original_max
        {
            return Err(Error::Unsupported(format!(
                "dynamic RoPE scaling beyond {original_max} positions"
            )));
        }
        let seg = |bi: usize, j: usize| attention_mask.map_or(1, |m| m[bi][j]);
        let mut pos = Vec::with_capacity(b * t);
        let window = self
            .config
            .sliding_window
            .filter(|_| self.config.sliding_layers.contains(&true));
        let mut mask = vec![0f32; b * t * t];
        let mut local_mask = window.map(|_| vec![0f32; b * t * t]);
        for bi in 0..b {
            let mut start = 0;
            for i in 0..t {
                if i > 0 && seg(bi, i) != seg(bi, i - 1) && seg(bi, i) != 0 {
                    start = i;
                }
                pos.push((i - start) as f32);
                for j in 0..t {
                    let (si, sj) = (seg(bi, i), seg(bi, j));
                    let at = (bi * t + i) * t + j;
                    if j > i || sj == 0 || (si != 0 && si != sj) {
                        mask[at] = f32::MIN;
                    }
                    if let (Some(w), Some(local)) = (window, local_mask.as_mut())
                        && (mask[at] != 0.0 || i - j >= w)
                    {
                        local[at] = f32::MIN;
                    }
                }
            }
        }
        let tables = |inv: &[f32]| -> Result<(Tensor, Tensor)> {
            let d = 2 * inv.len();
            let mut cos = Vec::with_capacity(b * t * d);
            let mut sin = Vec::with_capacity(b * t * d);
            for &p in &pos {
                // cat(freqs, freqs), as transformers builds `emb`.
                for _ in 0..2 {
                    for &f in inv {
                        let a = p * f;
                        cos.push(a.cos());
                        sin.push(a.sin());
                    }
                }
            }
            let dt = self.compute_dtype;
            Ok((
                Tensor::from_vec(cos, (b, 1, t, d), &self.device)?.to_dtype(dt)?,
                Tensor::from_vec(sin, (b, 1, t, d), &self.device)?.to_dtype(dt)?,
            ))
        };
        let (cos, sin) = tables(&self.config.inv_freq())?;
        let local_rope = self
            .config
            .local_inv_freq()
            .map(|inv| tables(&inv))
            .transpose()?;
        let mask = Tensor::from_vec(mask, (b, 1, t, t), &self.device)?;
        let local_mask = local_mask
            .map(|m| Tensor::from_vec(m, (b, 1, t, t), &self.device))
            .transpose()?;
        Ok(Context {
            cos,
            sin,
            mask,
            local_rope,
            local_mask,
        })
    }

    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let flat = input_ids.flatten_all()?;
        let x = self
            .embed_tokens
            .index_select(&flat, 0)?
            .to_dtype(self.compute_dtype)?
            .reshape((b, t, ()))?;
        Ok(if self.config.gemma {
            // Gemma scales by √hidden rounded to the activations' dtype, as transformers does.
            let s = (self.config.hidden_size as f64).sqrt();
            let s = Tensor::new(s as f32, &self.device)?.to_dtype(self.compute_dtype)?;
            x.broadcast_mul(&s)?
        } else {
            x
        })
    }

    /// Logits (…, vocab) in f32 from final hidden states, soft-capped where configured.
    pub fn head(&self, h: &Tensor) -> Result<Tensor> {
        let logits = self.lm_head.forward(h)?.to_dtype(DType::F32)?;
        Ok(match self.config.final_logit_softcapping {
            Some(cap) => soft_cap(&logits, cap)?,
            None => logits,
        })
    }

    /// Final hidden states (B, T, hidden), after the last norm.
    pub fn hidden(
        &self,
        input_ids: &Tensor,
        ctx: &Context,
        rng: &mut DropoutRng,
    ) -> Result<Tensor> {
        let mut x = self.embed(input_ids)?;
        for layer in &self.layers {
            x = match &self.layer_step {
                Some(step) => step.run(layer, &self.config, &x, ctx, rng)?,
                None => layer_forward(layer, &self.config, &x, ctx, rng)?,
            };
        }
        Ok(rms_norm(&x, &self.norm, self.config.rms_norm_eps)?)
    }

    /// Logits (B, T, vocab), in f32.
    pub fn logits(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&[Vec<u32>]>,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let ctx = self.context(b, t, attention_mask)?;
        let h = self.hidden(input_ids, &ctx, &mut None)?;
        self.head(&h)
    }
}

/// One decoder layer: x + attn(norm(x)), then + mlp(norm(·)).
pub fn layer_forward(
    layer: &DecoderLayer,
    c: &ModelConfig,
    x: &Tensor,
    ctx: &Context,
    rng: &mut DropoutRng,
) -> candle_core::Result<Tensor> {
    let eps = c.rms_norm_eps;
    let h = rms_norm(x, &layer.input_layernorm, eps)?;
    let h = attention(layer, c, &h, ctx, rng)?;
    if let (Some(pre), Some(post)) = (
        &layer.pre_feedforward_layernorm,
        &layer.post_feedforward_layernorm,
    ) {
        // Gemma: each block's output is normed before its residual add.
        let x = (x + rms_norm(&h, &layer.post_attention_layernorm, eps)?)?;
        let h = mlp(&layer.mlp, c, &rms_norm(&x, pre, eps)?, rng)?;
        return x + rms_norm(&h, post, eps)?;
    }
    let x = (x + h)?;
    let h = rms_norm(&x, &layer.post_attention_layernorm, eps)?;
    let h = mlp(&layer.mlp, c, &h, rng)?;
    x + h
}

/// down(act(gate(x)) · up(x)): SwiGLU, or GeGLU with the tanh GELU for Gemma.
fn mlp(m: &Mlp, c: &ModelConfig, h: &Tensor, rng: &mut DropoutRng) -> candle_core::Result<Tensor> {
    let g = m.gate_proj.forward(h, rng)?;
    let u = m.up_proj.forward(h, rng)?;
    let gu = if c.gemma {
        (g.gelu()? * u)?
    } else if fused::applies(&g) {
        fused::swiglu(&g, &u)?
    } else {
        (g.silu()? * u)?
    };
    m.down_proj.forward(&gu, rng)
}

/// cap · tanh(x / cap).
fn soft_cap(x: &Tensor, cap: f64) -> candle_core::Result<Tensor> {
    (x / cap)?.tanh()? * cap
}

/// Per-head RMSNorm of projections (B, T, heads · dim) over each head's dim.
fn head_norm(x: &Tensor, w: &Tensor, heads: usize, eps: f64) -> candle_core::Result<Tensor> {
    let (b, t, n) = x.dims3()?;
    let d = n / heads;
    rms_norm(&x.reshape((b, t * heads, d))?, w, eps)?.reshape((b, t, n))
}

/// RMSNorm in f32: x / √(mean(x²) + ε) · w, returned in x's dtype.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    if fused::applies(x) {
        return fused::rms_norm(x, w, eps);
    }
    rms_norm_composed(x, w, eps)
}

pub(crate) fn rms_norm_composed(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let var = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (var + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv)?.broadcast_mul(w)?.to_dtype(dtype)
}

/// Softmax over the last dimension; the max shift is a constant (its gradient is zero).
pub fn softmax(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// softmax(scores + mask) over the last dimension, computed in f32 (as transformers does in
/// bf16), returned in the scores' dtype.
fn masked_softmax(scores: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if scores.device().is_cuda() {
        return crate::kernels::cuda::masked_softmax(scores, mask);
    }
    let dtype = scores.dtype();
    softmax(&scores.to_dtype(DType::F32)?.broadcast_add(mask)?)?.to_dtype(dtype)
}

/// log-softmax over the last dimension.
pub fn log_softmax(x: &Tensor) -> candle_core::Result<Tensor> {
    if fused::applies(x) {
        return fused::log_softmax(x);
    }
    log_softmax_composed(x)
}

pub(crate) fn log_softmax_composed(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let s = x.broadcast_sub(&max)?;
    let lse = s.exp()?.sum_keepdim(D::Minus1)?.log()?;
    s.broadcast_sub(&lse)
}

/// Rotary embedding in transformers' half-split layout: x·cos + rotate_half(x)·sin.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

fn repeat_kv(x: Tensor, n_rep: usize) -> candle_core::Result<Tensor> {
    if n_rep == 1 {
        return Ok(x);
    }
    let (b, kv, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, kv, n_rep, t, d))?
        .contiguous()?
        .reshape((b, kv * n_rep, t, d))
}

fn attention(
    layer: &DecoderLayer,
    c: &ModelConfig,
    x: &Tensor,
    ctx: &Context,
    rng: &mut DropoutRng,
) -> candle_core::Result<Tensor> {
    let a = &layer.self_attn;
    let heads = Heads {
        q: c.num_attention_heads,
        kv: c.num_key_value_heads,
        dim: c.head_dim,
    };
    let mut q = a.q_proj.forward(x, rng)?;
    let mut k = a.k_proj.forward(x, rng)?;
    let v = a.v_proj.forward(x, rng)?;
    if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
        q = head_norm(&q, qn, heads.q, c.rms_norm_eps)?;
        k = head_norm(&k, kn, heads.kv, c.rms_norm_eps)?;
    }
    let scale = 1.0 / c.query_pre_attn_scalar.unwrap_or(heads.dim as f64).sqrt();
    let qkv = (&q, &k, &v);
    let (cos, sin, mask) = ctx.for_layer(layer.sliding);
    let rope = (cos, sin);
    let softcap = c.attn_logit_softcapping;
    let y = if fused::applies(x) && softcap.is_none() {
        // The mask is always causal (a token never sees later ones); a sliding window only
        // masks more below the diagonal.
        causal_attention(qkv, rope, mask, heads, scale)?
    } else {
        attend_composed(qkv, rope, mask, heads, scale, softcap)?
    };
    a.o_proj.forward(&y, rng)
}

/// Attention from the projections' outputs (B, T, heads · dim) to the merged heads, from
/// candle's ops (for devices and dtypes other than f32 on the CPU).
pub(crate) fn attend_composed(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    (cos, sin): (&Tensor, &Tensor),
    mask: &Tensor,
    heads: Heads,
    scale: f64,
    softcap: Option<f64>,
) -> candle_core::Result<Tensor> {
    let (b, t, _) = q.dims3()?;
    let n_rep = heads.q / heads.kv;
    let split = |x: &Tensor, n: usize| x.reshape((b, t, n, heads.dim))?.transpose(1, 2);
    let q = rope(&split(q, heads.q)?, cos, sin)?;
    let k = repeat_kv(rope(&split(k, heads.kv)?, cos, sin)?, n_rep)?;
    let v = repeat_kv(split(v, heads.kv)?.contiguous()?, n_rep)?;
    let mut scores = (q.contiguous()?.matmul(&k.t()?)? * scale)?;
    if let Some(cap) = softcap {
        scores = soft_cap(&scores, cap)?;
    }
    let p = masked_softmax(&scores, mask)?.to_dtype(v.dtype())?;
    p.matmul(&v.contiguous()?)?
        .transpose(1, 2)?
        .reshape((b, t, heads.q * heads.dim))
}

/// Logits of the selected rows of hidden states (N, vocab), in f32 (the loss is computed there).
pub fn head_rows(model: &Llama, hidden: &Tensor, rows: &Tensor) -> Result<Tensor> {
    let hsz = hidden.dim(D::Minus1)?;
    let h = hidden.reshape(((), hsz))?.index_select(rows, 0)?;
    model.head(&h)
}
