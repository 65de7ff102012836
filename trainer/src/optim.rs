//! AdamW as torch.optim.AdamW computes it (decoupled weight decay, bias correction), the
//! learning-rate schedules of transformers' `get_scheduler`, and global-norm gradient clipping.

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

// The defaults are the recipe's (shared/seed-finetuning-adaptation.md, 3.2 "하이퍼파라미터
// 레시피": AdamW β1 0.9, β2 0.95, weight decay 0.1, cosine schedule), not torch's (β2 0.999,
// weight decay 0.01) nor transformers' (weight decay 0).
impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 2e-4,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

pub struct AdamW {
    pub config: AdamWConfig,
    pub params: Vec<Var>,
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
    /// Updates done so far.
    pub step: usize,
}

impl AdamW {
    pub fn new(params: Vec<Var>, config: AdamWConfig) -> candle_core::Result<Self> {
        let m = params
            .iter()
            .map(|p| p.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(Self {
            config,
            params,
            m,
            v,
            step: 0,
        })
    }

    /// One update with learning rate `lr` and the gradients of `params`, in order.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> candle_core::Result<()> {
        let c = self.config;
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        for (i, (p, g)) in self.params.iter().zip(grads).enumerate() {
            let decayed = (p.as_tensor() * (1.0 - lr * c.weight_decay))?;
            // exp_avg.lerp_(grad, 1 - β1); exp_avg_sq.mul_(β2).addcmul_(grad, grad, 1 - β2)
            let m = (&self.m[i] + ((g - &self.m[i])? * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((v.sqrt()? / bc2_sqrt)? + c.eps)?;
            let update = (m.div(&denom)? * (lr / bc1))?;
            p.set(&(decayed - update)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

/// A learning-rate schedule, by transformers' `SchedulerType` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrScheduler {
    /// The peak rate throughout (no warm-up).
    Constant,
    /// Linear warm-up, then the peak rate.
    ConstantWithWarmup,
    /// Linear warm-up, then linear decay to 0 at the last update.
    Linear,
    /// Linear warm-up, then half a cosine period down to 0 (the recipe's).
    #[default]
    Cosine,
    /// As `cosine`, but down to `min_lr_rate` × the peak rate.
    CosineWithMinLr,
}

impl LrScheduler {
    pub const NAMES: [&'static str; 5] = [
        "constant",
        "constant_with_warmup",
        "linear",
        "cosine",
        "cosine_with_min_lr",
    ];

    /// The factor of the peak learning rate for the update with index `step` (0-based) of
    /// `total`, as transformers' `lr_lambda` of the same name computes it (`num_cycles` 0.5).
    pub fn factor(self, step: usize, warmup: usize, total: usize, min_lr_rate: f64) -> f64 {
        if self != Self::Constant && step < warmup {
            return step as f64 / warmup.max(1) as f64;
        }
        let after = (total.saturating_sub(warmup)).max(1) as f64;
        let progress = step.saturating_sub(warmup) as f64 / after;
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        match self {
            Self::Constant | Self::ConstantWithWarmup => 1.0,
            Self::Linear => (total.saturating_sub(step) as f64 / after).max(0.0),
            Self::Cosine => cosine.max(0.0),
            Self::CosineWithMinLr => (cosine * (1.0 - min_lr_rate) + min_lr_rate).max(0.0),
        }
    }
}

/// transformers' `get_cosine_schedule_with_warmup` (half a cosine period), as a factor of
/// the peak learning rate for the update with index `step` (0-based).
pub fn cosine_with_warmup(step: usize, warmup: usize, total: usize) -> f64 {
    LrScheduler::Cosine.factor(step, warmup, total, 0.0)
}

/// Scale gradients so their global L2 norm is at most `max_norm` (torch's clip_grad_norm_:
/// coefficient max_norm / (norm + 1e-6), capped at 1). Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> candle_core::Result<f64> {
    let mut sq = 0f64;
    for g in grads.iter() {
        sq += g
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
    }
    let norm = sq.sqrt();
    if max_norm > 0.0 {
        let coef = (max_norm / (norm + 1e-6)).min(1.0);
        for g in grads.iter_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_linearly_then_decays_to_zero() {
        assert_eq!(cosine_with_warmup(0, 10, 100), 0.0);
        assert_eq!(cosine_with_warmup(5, 10, 100), 0.5);
        assert_eq!(cosine_with_warmup(10, 10, 100), 1.0);
        assert!((cosine_with_warmup(55, 10, 100) - 0.5).abs() < 1e-12);
        assert!(cosine_with_warmup(100, 10, 100).abs() < 1e-12);
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    /// Values of transformers' lr_lambda functions, worked out by hand from their formulas
    /// (10 warm-up updates of 100; min_lr_rate 0.1).
    #[test]
    fn schedules_match_transformers() {
        use LrScheduler::*;
        let f = |s: LrScheduler, step| s.factor(step, 10, 100, 0.1);
        // constant: 1 everywhere, warm-up or not (get_scheduler passes it no warm-up).
        for step in [0, 5, 10, 99] {
            assert_eq!(f(Constant, step), 1.0);
        }
        // Warm-up is step / warmup for every other schedule.
        for s in [ConstantWithWarmup, Linear, Cosine, CosineWithMinLr] {
            assert_eq!(f(s, 0), 0.0);
            assert_eq!(f(s, 3), 0.3);
            assert_eq!(f(s, 10), 1.0);
        }
        assert_eq!(f(ConstantWithWarmup, 50), 1.0);
        assert_eq!(f(ConstantWithWarmup, 99), 1.0);
        // linear: (100 - step) / 90.
        assert!(close(f(Linear, 55), 0.5));
        assert!(close(f(Linear, 91), 1.0 / 10.0));
        assert!(close(f(Linear, 99), 1.0 / 90.0));
        assert_eq!(f(Linear, 100), 0.0);
        // cosine: 0.5 (1 + cos(π (step - 10) / 90)).
        assert!(close(f(Cosine, 55), 0.5));
        assert!(close(f(Cosine, 40), 0.75)); // cos(π/3) = 0.5
        assert!(close(f(Cosine, 70), 0.25)); // cos(2π/3) = -0.5
        assert!(f(Cosine, 100).abs() < 1e-12);
        // cosine_with_min_lr: cosine · (1 - 0.1) + 0.1.
        assert!(close(f(CosineWithMinLr, 55), 0.55));
        assert!(close(f(CosineWithMinLr, 40), 0.775));
        assert!(close(f(CosineWithMinLr, 100), 0.1));
        // No warm-up: the first update is at the peak.
        assert_eq!(Linear.factor(0, 0, 4, 0.0), 1.0);
        assert_eq!(Linear.factor(3, 0, 4, 0.0), 0.25);
        assert!(close(Cosine.factor(2, 0, 4, 0.0), 0.5));
        let names: Vec<String> = [
            Constant,
            ConstantWithWarmup,
            Linear,
            Cosine,
            CosineWithMinLr,
        ]
        .iter()
        .map(|s| {
            serde_json::to_value(s)
                .unwrap()
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
        assert_eq!(names, LrScheduler::NAMES);
    }

    #[test]
    fn adamw_first_step_moves_each_weight_by_lr_against_the_gradient_sign() {
        let p = Var::new(&[1.0f32, -2.0], &candle_core::Device::Cpu).unwrap();
        let cfg = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.0,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![p.clone()], cfg).unwrap();
        let g = Tensor::new(&[0.5f32, -3.0], &candle_core::Device::Cpu).unwrap();
        opt.step(&[g], 0.1).unwrap();
        let v = p.as_tensor().to_vec1::<f32>().unwrap();
        assert!(
            (v[0] - 0.9).abs() < 1e-6 && (v[1] + 1.9).abs() < 1e-6,
            "{v:?}"
        );
    }
}
