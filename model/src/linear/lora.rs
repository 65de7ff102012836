//! LoRA on frozen linear layers: `y = x·Wᵀ + b + scale · dropout(x)·Aᵀ·Bᵀ`, with PEFT's
//! initialisation (A Kaiming-uniform with a = √5, B zero) and scale α/r (α/√r with rsLoRA).

use std::collections::BTreeSet;
use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Shape, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::kernels::fused::{self, values, with_values};
use crate::kernels::matmul::{Operand, sgemm, sgemm_serial};
use crate::linear::frozen::{FrozenMatmul, FrozenWeight};

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
        let Some(l) = &self.lora else {
            return self.base_forward(x);
        };
        let mask = match rng {
            Some(rng) if l.dropout > 0.0 => Some(dropout_mask(x, l.dropout, rng)?),
            _ => None,
        };
        if fused::applies(x) {
            return fused_lora(x, &self.base, self.bias.as_ref(), l, mask.as_ref());
        }
        let y = self.base_forward(x)?;
        let xd = match &mask {
            Some(m) => (x * m)?,
            None => x.clone(),
        };
        // As 2-D products: (rows, in)·Aᵀ·Bᵀ, so backward needs no broadcast reductions.
        // In mixed precision the f32 pair is used in bf16 for the product (its gradient
        // flows back to the f32 weights through the conversion).
        let in_f = l.a.dim(1)?;
        let (a, b) = (l.a.to_dtype(x.dtype())?, l.b.to_dtype(x.dtype())?);
        let h = xd.reshape(((), in_f))?.matmul(&a.t()?)?.matmul(&b.t()?)?;
        let h = (h.reshape(y.shape())? * l.scale)?;
        y + h
    }

    /// The frozen layer alone: x·Wᵀ + b.
    fn base_forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.base.forward(x)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
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

/// An inverted-dropout mask (0 or 1/keep) for `x`. The seeded generator gives one seed per
/// mask and each value is a hash of (seed, index), so runs are reproducible and the mask is
/// drawn in parallel: on a GPU by a kernel, on the CPU on all threads (one generator draw per
/// value took a quarter of a CPU step at the default dropout).
fn dropout_mask(x: &Tensor, p: f64, rng: &mut StdRng) -> candle_core::Result<Tensor> {
    let keep = 1.0 - p;
    let seed = rng.random::<u64>();
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return crate::kernels::cuda::dropout_mask(x, keep, seed);
    }
    let scale = (1.0 / keep) as f32;
    let mask: Vec<f32> = (0..x.elem_count() as u64)
        .into_par_iter()
        .map(|i| if uniform(seed, i) < keep { scale } else { 0.0 })
        .collect();
    Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())
}

/// A uniform value in [0, 1) for position `i` of the stream `seed` (SplitMix64's finaliser).
fn uniform(seed: u64, i: u64) -> f64 {
    let mut z = seed.wrapping_add(i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
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

/// `x·Wᵀ + scale · (x ⊙ mask)·Aᵀ·Bᵀ` as one op on (x, A, B), for f32 on the CPU: the adapter's
/// product is added into the base's output, and backward writes grad(x) once, with no
/// full-size temporaries for the scaling, the sum or the accumulation of the two paths.
fn fused_lora(
    x: &Tensor,
    base: &FrozenMatmul,
    bias: Option<&Tensor>,
    l: &LoraPair,
    mask: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let op = FusedLora {
        weight: base.weight.clone(),
        bias: bias.map(|b| b.contiguous()).transpose()?,
        scale: l.scale as f32,
        mask: mask.map(|m| m.contiguous()).transpose()?,
        xa: Mutex::default(),
    };
    x.contiguous()?
        .apply_op3(l.a.as_tensor(), l.b.as_tensor(), op)
}

/// Rows per block in the adapter's narrow products: a block's x, y and g stay in cache
/// between the products that read them.
const ROW_BLOCK: usize = 64;
/// Rows per task in the adapter's backward; each task sums its blocks' shares of d A and d B.
const TASK_ROWS: usize = 4 * ROW_BLOCK;

struct FusedLora {
    weight: FrozenWeight,
    /// Frozen, (out,); added before the adapter's product, as PEFT does.
    bias: Option<Tensor>,
    scale: f32,
    /// The dropout mask on the adapter's input, shaped like x.
    mask: Option<Tensor>,
    /// (x ⊙ mask)·Aᵀ from forward, for backward: a narrow product whose wide operand costs
    /// more to pack than to multiply, so it is kept (rows × r) rather than recomputed.
    xa: Mutex<Option<Vec<f32>>>,
}

/// Sizes of one fused LoRA product: rows of x, in, out, rank.
struct Dims {
    rows: usize,
    in_f: usize,
    out_f: usize,
    r: usize,
}

impl FusedLora {
    fn dims(&self, x: &Shape, a: &Shape, b: &Shape) -> candle_core::Result<Dims> {
        let (out_f, in_f) = self.weight.dims2()?;
        let (r, a_in) = a.dims2()?;
        let (b_out, b_r) = b.dims2()?;
        if x.dims().last() != Some(&in_f) || a_in != in_f || b_out != out_f || b_r != r {
            candle_core::bail!(
                "fused LoRA: x {x:?}, A {a:?}, B {b:?} for a weight of ({out_f}, {in_f})"
            );
        }
        Ok(Dims {
            rows: x.elem_count() / in_f,
            in_f,
            out_f,
            r,
        })
    }

    /// Run `f` on the dense f32 weight and the adapter's input (x, or x ⊙ mask).
    fn with_inputs<R>(
        &self,
        x: &[f32],
        f: impl FnOnce(&[f32], &[f32]) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        let w = self.weight.materialize(DType::F32)?;
        with_values("fused LoRA", &w, |w| match &self.mask {
            None => f(w, x),
            Some(m) => with_values("fused LoRA", m, |m| {
                let xd: Vec<f32> = x.par_iter().zip(m).map(|(x, m)| x * m).collect();
                f(w, &xd)
            }),
        })
    }
}

impl CustomOp3 for FusedLora {
    fn name(&self) -> &'static str {
        "fused-lora-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let op = self.name();
        let d = self.dims(xl.shape(), al.shape(), bl.shape())?;
        let (x, a, b) = (
            values(op, xs, xl)?,
            values(op, as_, al)?,
            values(op, bs, bl)?,
        );
        let y = self.with_inputs(x, |w, xd| {
            let mut y = crate::kernels::matmul::linear(x, w, d.rows, d.in_f, d.out_f);
            if let Some(bias) = &self.bias {
                with_values(op, bias, |bias| {
                    for row in y.chunks_mut(d.out_f) {
                        row.iter_mut().zip(bias).for_each(|(y, b)| *y += b);
                    }
                    Ok(())
                })?;
            }
            // The adapter's two narrow products, one block of rows per task, so that the
            // block's x and y stay in cache between them.
            let mut xa = vec![0f32; d.rows * d.r];
            y.par_chunks_mut(ROW_BLOCK * d.out_f)
                .zip(xa.par_chunks_mut(ROW_BLOCK * d.r))
                .zip(xd.par_chunks(ROW_BLOCK * d.in_f))
                .for_each(|((y, xa), xd)| {
                    let n = xd.len() / d.in_f;
                    let a_cols = (a, Operand::transposed(d.in_f));
                    sgemm_serial(
                        xa,
                        0.0,
                        1.0,
                        (n, d.in_f, d.r),
                        (xd, Operand::rows(d.in_f)),
                        a_cols,
                    );
                    let b_cols = (b, Operand::transposed(d.r));
                    sgemm_serial(
                        y,
                        1.0,
                        self.scale,
                        (n, d.r, d.out_f),
                        (xa, Operand::rows(d.r)),
                        b_cols,
                    );
                });
            *self.xa.lock().expect("fused LoRA lock") = Some(xa);
            Ok(y)
        })?;
        let mut shape = xl.dims().to_vec();
        *shape.last_mut().expect("non-empty") = d.out_f;
        Ok((CpuStorage::F32(y), Shape::from(shape)))
    }

    /// With u = g·B: d x = g·W + scale · (u·A) ⊙ mask, d A = scale · uᵀ·(x ⊙ mask),
    /// d B = scale · gᵀ·((x ⊙ mask)·Aᵀ). d x is skipped when x needs no gradient (the first
    /// layer's inputs come from the frozen embeddings), as autograd does.
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = self.name();
        let d = self.dims(x.shape(), a.shape(), b.shape())?;
        let grads = with_values(op, grad, |g| {
            with_values(op, a, |a| {
                with_values(op, b, |b| {
                    with_values(op, x, |xv| {
                        self.with_inputs(xv, |w, xd| self.grads(&d, g, (a, b), w, xd, x.track_op()))
                    })
                })
            })
        })?;
        let dev = x.device();
        Ok((
            grads
                .x
                .map(|gx| Tensor::from_vec(gx, x.shape(), dev))
                .transpose()?,
            Some(Tensor::from_vec(grads.a, a.shape(), dev)?),
            Some(Tensor::from_vec(grads.b, b.shape(), dev)?),
        ))
    }
}

/// A fused LoRA linear's gradients: x's (when wanted), A's and B's.
struct Grads {
    x: Option<Vec<f32>>,
    a: Vec<f32>,
    b: Vec<f32>,
}

impl FusedLora {
    /// (d x if `want_x`, d A, d B) from the incoming gradient `g`, the pair, the dense weight
    /// and the adapter's input `xd`.
    fn grads(
        &self,
        d: &Dims,
        g: &[f32],
        (a, b): (&[f32], &[f32]),
        w: &[f32],
        xd: &[f32],
        want_x: bool,
    ) -> candle_core::Result<Grads> {
        let s = self.scale;
        let kept = self.xa.lock().expect("fused LoRA lock").take();
        let xa = kept.unwrap_or_else(|| {
            let a_cols = (a, Operand::transposed(d.in_f));
            sgemm((d.rows, d.in_f, d.r), (xd, Operand::rows(d.in_f)), a_cols)
        });
        // Per task of TASK_ROWS rows, in parallel: u = g·B and the task's shares of d A and
        // d B. The shares are summed in task order, so the result does not depend on the
        // number of threads.
        let shares: Vec<Share> = g
            .par_chunks(TASK_ROWS * d.out_f)
            .zip(xd.par_chunks(TASK_ROWS * d.in_f))
            .zip(xa.par_chunks(TASK_ROWS * d.r))
            .map(|((g, xd), xa)| Share::of(d, s, (g, xd, xa), b))
            .collect();
        let sum = |len: usize, part: fn(&Share) -> &[f32]| {
            let mut total = vec![0f32; len];
            for sh in &shares {
                total
                    .par_iter_mut()
                    .zip(part(sh))
                    .for_each(|(t, v)| *t += v);
            }
            total
        };
        let (ga, gb) = (
            sum(d.r * d.in_f, |sh| &sh.a),
            sum(d.out_f * d.r, |sh| &sh.b),
        );
        let gx = want_x
            .then(|| self.grad_x(d, g, w, a, &shares))
            .transpose()?;
        Ok(Grads {
            x: gx,
            a: ga,
            b: gb,
        })
    }

    /// d x = g·W + scale · (u·A) ⊙ mask, the adapter's term added block by block.
    fn grad_x(
        &self,
        d: &Dims,
        g: &[f32],
        w: &[f32],
        a: &[f32],
        shares: &[Share],
    ) -> candle_core::Result<Vec<f32>> {
        let s = self.scale;
        let g_rows = (g, Operand::rows(d.out_f));
        let mut gx = sgemm(
            (d.rows, d.out_f, d.in_f),
            g_rows,
            (w, Operand::rows(d.in_f)),
        );
        let blocks = gx.par_chunks_mut(TASK_ROWS * d.in_f).zip(shares);
        let a_rows = (a, Operand::rows(d.in_f));
        match &self.mask {
            None => blocks.for_each(|(gx, sh)| {
                let n = gx.len() / d.in_f;
                sgemm_serial(
                    gx,
                    1.0,
                    s,
                    (n, d.r, d.in_f),
                    (&sh.u, Operand::rows(d.r)),
                    a_rows,
                );
            }),
            Some(m) => with_values(self.name(), m, |m| {
                blocks
                    .zip(m.par_chunks(TASK_ROWS * d.in_f))
                    .for_each(|((gx, sh), m)| {
                        let n = gx.len() / d.in_f;
                        let mut v = vec![0f32; gx.len()];
                        sgemm_serial(
                            &mut v,
                            0.0,
                            1.0,
                            (n, d.r, d.in_f),
                            (&sh.u, Operand::rows(d.r)),
                            a_rows,
                        );
                        gx.iter_mut()
                            .zip(v)
                            .zip(m)
                            .for_each(|((gx, v), m)| *gx += s * v * m);
                    });
                Ok(())
            })?,
        }
        Ok(gx)
    }
}

/// One task's part of the adapter's backward: u = g·B for its rows, and its shares of
/// d A = scale · uᵀ·(x ⊙ mask) and d B = scale · gᵀ·((x ⊙ mask)·Aᵀ), taken ROW_BLOCK rows at a
/// time so that each block's g is read from memory once.
struct Share {
    u: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
}

impl Share {
    fn of(d: &Dims, s: f32, (g, xd, xa): (&[f32], &[f32], &[f32]), b: &[f32]) -> Self {
        let mut u = vec![0f32; g.len() / d.out_f * d.r];
        let mut ga = vec![0f32; d.r * d.in_f];
        let mut gb = vec![0f32; d.out_f * d.r];
        let blocks = g
            .chunks(ROW_BLOCK * d.out_f)
            .zip(xd.chunks(ROW_BLOCK * d.in_f));
        let blocks = blocks.zip(
            xa.chunks(ROW_BLOCK * d.r)
                .zip(u.chunks_mut(ROW_BLOCK * d.r)),
        );
        for (i, ((g, xd), (xa, u))) in blocks.enumerate() {
            let (n, beta) = (g.len() / d.out_f, if i == 0 { 0.0 } else { 1.0 });
            let g_rows = (g, Operand::rows(d.out_f));
            sgemm_serial(
                u,
                0.0,
                1.0,
                (n, d.out_f, d.r),
                g_rows,
                (b, Operand::rows(d.r)),
            );
            let g_cols = (g, Operand::transposed(d.out_f));
            sgemm_serial(
                &mut gb,
                beta,
                s,
                (d.out_f, n, d.r),
                g_cols,
                (xa, Operand::rows(d.r)),
            );
            let u_cols = (&*u, Operand::transposed(d.r));
            sgemm_serial(
                &mut ga,
                beta,
                s,
                (d.r, n, d.in_f),
                u_cols,
                (xd, Operand::rows(d.in_f)),
            );
        }
        Self { u, a: ga, b: gb }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::fused::max_rel_diff;

    /// Masks are 0 or 1/keep, keep about `keep` of the values, and depend only on the seed.
    #[test]
    fn dropout_masks_are_seeded_and_keep_the_right_share() {
        let x = Tensor::zeros((64, 500), DType::F32, &Device::Cpu).unwrap();
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            dropout_mask(&x, 0.2, &mut rng)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let (a, b, c) = (draw(7), draw(7), draw(8));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.iter().all(|&v| v == 0.0 || v == 1.25));
        let kept = a.iter().filter(|&&v| v > 0.0).count() as f64 / a.len() as f64;
        assert!((kept - 0.8).abs() < 0.01, "kept {kept}");
    }

    /// The fused CPU op against the same formula in candle's ops: the output and the
    /// gradients of x, A and B, with a bias, with and without a dropout mask, and with an x
    /// that needs no gradient (A and B still get theirs).
    #[test]
    fn fused_lora_matches_the_composed_formula() {
        let cpu = &Device::Cpu;
        // Within 1e-5 of the largest magnitude: sums over 600 rows round differently.
        let close = |a: &Tensor, b: &Tensor| max_rel_diff(a, b) <= 1e-5;
        let randn = |s: &[usize]| Tensor::randn(0f32, 1.0, s, cpu).unwrap();
        // 600 rows: several backward tasks and a partial block of rows.
        let (in_f, out_f, r, scale, rows) = (20, 12, 4, 2.0, 300);
        let w = randn(&[out_f, in_f]);
        let bias = randn(&[out_f]);
        let pair = LoraPair {
            a: Var::from_tensor(&randn(&[r, in_f])).unwrap(),
            b: Var::from_tensor(&randn(&[out_f, r])).unwrap(),
            scale,
            dropout: 0.5,
        };
        let base = FrozenMatmul::new(FrozenWeight::Dense(w.clone()));
        let keep: Vec<f32> = (0..2 * rows * in_f)
            .map(|i| if i % 3 == 0 { 0.0 } else { 2.0 })
            .collect();
        let mask = Tensor::from_vec(keep, (2, rows, in_f), cpu).unwrap();
        let x = Var::from_tensor(&randn(&[2, rows, in_f])).unwrap();
        let weights = randn(&[2, rows, out_f]);
        let (a, b) = (pair.a.as_tensor(), pair.b.as_tensor());
        let composed = |x: &Tensor, mask: Option<&Tensor>| -> Tensor {
            let xd = match mask {
                Some(m) => (x * m).unwrap(),
                None => x.clone(),
            };
            let lora = xd.broadcast_matmul(&a.t().unwrap()).unwrap();
            let lora = (lora.broadcast_matmul(&b.t().unwrap()).unwrap() * scale).unwrap();
            let y = x.broadcast_matmul(&w.t().unwrap()).unwrap();
            (y.broadcast_add(&bias).unwrap() + lora).unwrap()
        };
        for m in [None, Some(&mask)] {
            let fused = fused_lora(x.as_tensor(), &base, Some(&bias), &pair, m).unwrap();
            let reference = composed(x.as_tensor(), m);
            assert!(close(&fused, &reference));
            let gf = (&fused * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gc = (&reference * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for v in [x.as_tensor(), a, b] {
                let (ours, theirs) = (gf.get(v).unwrap(), gc.get(v).unwrap());
                assert!(close(ours, theirs), "gradient (mask: {})", m.is_some());
            }
        }
        let plain = x.as_tensor().detach();
        let fused = fused_lora(&plain, &base, Some(&bias), &pair, None).unwrap();
        let gf = (&fused * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gc = (&composed(&plain, None) * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(gf.get(&plain).is_none());
        assert!(close(gf.get(a).unwrap(), gc.get(a).unwrap()));
        assert!(close(gf.get(b).unwrap(), gc.get(b).unwrap()));
    }
}
