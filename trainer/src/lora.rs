//! LoRA on frozen linear layers: `y = x·Wᵀ + b + scale · dropout(x)·Aᵀ·Bᵀ`, with PEFT's
//! initialisation (A Kaiming-uniform with a = √5, B zero) and scale α/r (α/√r with rsLoRA).

use std::collections::BTreeSet;

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::frozen::FrozenMatmul;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default)]
    pub use_rslora: bool,
    /// Linear module names (q_proj … down_proj); `all-linear` selects all seven.
    pub targets: BTreeSet<String>,
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

/// The trainable pair of one adapted linear layer.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// (r, in)
    pub a: Var,
    /// (out, r)
    pub b: Var,
    pub scale: f64,
    pub dropout: f64,
}

impl LoraPair {
    /// PEFT's default init, drawn from `rng`.
    pub fn init(
        in_f: usize,
        out_f: usize,
        cfg: &LoraConfig,
        rng: &mut StdRng,
        device: &Device,
    ) -> candle_core::Result<Self> {
        // kaiming_uniform_(a=√5) on (r, in): bound = gain·√(3/fan_in) with gain = √(2/(1+5)).
        let bound = (1.0 / in_f as f64).sqrt() as f32;
        let a: Vec<f32> = (0..cfg.r * in_f)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        let a = Tensor::from_vec(a, (cfg.r, in_f), device)?;
        let b = Tensor::zeros((out_f, cfg.r), DType::F32, device)?;
        Ok(Self {
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            scale: cfg.scale(),
            dropout: cfg.dropout,
        })
    }
}

/// A linear layer of the base model, frozen, with an optional bias and LoRA pair.
#[derive(Debug, Clone)]
pub struct Linear {
    pub base: FrozenMatmul,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraPair>,
}

/// Per-forward randomness for dropout; `None` means evaluation (no dropout).
pub type DropoutRng<'a> = Option<&'a mut StdRng>;

impl Linear {
    pub fn forward(&self, x: &Tensor, rng: &mut DropoutRng) -> candle_core::Result<Tensor> {
        let mut y = self.base.forward(x)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let Some(l) = &self.lora {
            let xd = match rng {
                Some(rng) if l.dropout > 0.0 => dropout(x, l.dropout, rng)?,
                _ => x.clone(),
            };
            // As 2-D products: (rows, in)·Aᵀ·Bᵀ, so backward needs no broadcast reductions.
            // In mixed precision the f32 pair is used in bf16 for the product (its gradient
            // flows back to the f32 weights through the conversion).
            let in_f = l.a.dim(1)?;
            let (a, b) = (l.a.to_dtype(x.dtype())?, l.b.to_dtype(x.dtype())?);
            let h = xd.reshape(((), in_f))?.matmul(&a.t()?)?.matmul(&b.t()?)?;
            let h = (h.reshape(y.shape())? * l.scale)?;
            y = (y + h)?;
        }
        Ok(y)
    }

    /// The dense weight with the adapter folded in: W + scale · B·A (for merging).
    pub fn merged_weight(&self) -> candle_core::Result<Tensor> {
        let w = self.base.weight.materialize(DType::F32)?;
        match &self.lora {
            None => Ok(w),
            Some(l) => w + (l.b.as_tensor().matmul(l.a.as_tensor())? * l.scale)?,
        }
    }
}

/// Inverted dropout with a mask drawn from a seeded generator, so runs are reproducible. On a
/// GPU the generator gives one seed and the mask is drawn there (no host round trip per layer).
fn dropout(x: &Tensor, p: f64, rng: &mut StdRng) -> candle_core::Result<Tensor> {
    let keep = 1.0 - p;
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return x * crate::cuda::dropout_mask(x, keep, rng.random::<u64>())?;
    }
    let scale = (1.0 / keep) as f32;
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| {
            if rng.random::<f64>() < keep {
                scale
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x * mask
}

/// A generator for one purpose at one step, derived from the run's seed, so a resumed run
/// draws exactly what an uninterrupted one would.
pub fn derived_rng(seed: u64, purpose: u64, step: u64) -> StdRng {
    let mix = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(purpose.wrapping_mul(0xBF58_476D_1CE4_E5B9))
        .wrapping_add(step.wrapping_mul(0x94D0_49BB_1331_11EB));
    StdRng::seed_from_u64(mix)
}
