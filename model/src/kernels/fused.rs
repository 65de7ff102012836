//! Fused CPU kernels with their own backward, for the decoder's memory-bound steps.
//!
//! Composed from candle's basic ops, RMSNorm, SwiGLU and the log-softmax each take four to
//! eight passes over their tensor, most of them on one thread and each allocating a fresh
//! buffer, and their backward as many again.
//! Here each is one multi-threaded pass forward and one backward. The forward computes the
//! composed formula, with sums in vector lanes and `simd::exp` (within 1.4 ulp of libm's), so
//! values agree with it to a few ulp; the backward is the analytic gradient. Used for f32 on the CPU ([`applies`]); other dtypes and
//! devices keep the composed (or CUDA) ops in `llama`.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Storage, Tensor,
};
use rayon::prelude::*;

use crate::kernels::simd;

/// Values handed to one rayon task by the elementwise kernels.
const CHUNK: usize = 4096;

/// Rows handed to one rayon task at least: fewer tasks than rows keeps scheduling cheap.
const MIN_ROWS: usize = 16;

/// Whether the fused kernels take `t`: f32 on the CPU.
pub fn applies(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

fn err(op: &str, what: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("{op}: {what}"))
}

/// The f32 values of a contiguous CPU operand.
pub(crate) fn values<'a>(
    op: &str,
    s: &'a CpuStorage,
    l: &Layout,
) -> candle_core::Result<&'a [f32]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| err(op, "operand is not contiguous"))?;
    Ok(&s.as_slice::<f32>()?[start..end])
}

/// Run `f` on the f32 values of a tensor the op holds (mask, tables, weights).
pub(crate) fn with_values<R>(
    op: &str,
    t: &Tensor,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    let Storage::Cpu(s) = &*s else {
        return Err(err(op, "operand is not on the CPU"));
    };
    f(values(op, s, l)?)
}

fn last_dim(op: &str, shape: &Shape) -> candle_core::Result<usize> {
    match shape.dims().last() {
        Some(&n) if n > 0 => Ok(n),
        _ => Err(err(op, format!("no rows in shape {shape:?}"))),
    }
}

/// Two operands of one shape (a gradient op's saved tensor and incoming gradient), and the
/// length of their rows.
fn operands2<'a>(
    op: &str,
    (xs, xl): (&'a CpuStorage, &Layout),
    (ys, yl): (&'a CpuStorage, &Layout),
) -> candle_core::Result<(&'a [f32], &'a [f32], usize)> {
    if xl.shape() != yl.shape() {
        return Err(err(
            op,
            format!("shapes {:?} and {:?}", xl.shape(), yl.shape()),
        ));
    }
    Ok((
        values(op, xs, xl)?,
        values(op, ys, yl)?,
        last_dim(op, xl.shape())?,
    ))
}

/// `n` zeros, written on all threads: `vec![0.0; n]` takes freed memory and zeroes it on the
/// calling thread, while the pool waits for the kernel that follows (in a CPU training step
/// that was the largest piece of single-threaded work).
pub(crate) fn zeros(n: usize) -> Vec<f32> {
    if n < 1 << 16 {
        return vec![0f32; n];
    }
    let mut v = Vec::with_capacity(n);
    v.par_extend(rayon::iter::repeat_n(0f32, n));
    v
}

/// `f(out_row, x_row)` for every row of `n` values, on all threads.
fn map_rows(x: &[f32], n: usize, f: impl Fn(&mut [f32], &[f32]) + Sync) -> Vec<f32> {
    let mut out = zeros(x.len());
    out.par_chunks_mut(n)
        .zip(x.par_chunks(n))
        .with_min_len(MIN_ROWS)
        .for_each(|(o, x)| f(o, x));
    out
}

/// `f(out_row, x_row, y_row)` for every row of `n` values of x and y, on all threads.
fn map_rows2(
    x: &[f32],
    y: &[f32],
    n: usize,
    f: impl Fn(&mut [f32], &[f32], &[f32]) + Sync,
) -> Vec<f32> {
    let mut out = zeros(x.len());
    out.par_chunks_mut(n)
        .zip(x.par_chunks(n).zip(y.par_chunks(n)))
        .with_min_len(MIN_ROWS)
        .for_each(|(o, (x, y))| f(o, x, y));
    out
}

// ---------------------------------------------------------------------------------------
// Log-softmax (the loss)

/// log-softmax over the last dimension.
pub fn log_softmax(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(LogSoftmax)
}

struct LogSoftmax;

impl CustomOp1 for LogSoftmax {
    fn name(&self) -> &'static str {
        "fused-log-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = values(self.name(), s, l)?;
        let n = last_dim(self.name(), l.shape())?;
        let out = map_rows(x, n, |o, x| {
            simd::dispatch(|| {
                let max = simd::max(x);
                for (o, &x) in o.iter_mut().zip(x) {
                    *o = x - max;
                }
                let lse = simd::sum_exp(o).ln();
                for o in o.iter_mut() {
                    *o -= lse;
                }
            })
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    /// d x = g − softmax(x) · Σ g, with softmax(x) = exp(result).
    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = grad.contiguous()?;
        Ok(Some(res.apply_op2_no_bwd(&g, &LogSoftmaxGrad)?))
    }
}

struct LogSoftmaxGrad;

impl CustomOp2 for LogSoftmaxGrad {
    fn name(&self) -> &'static str {
        "fused-log-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (y, g, n) = operands2(self.name(), (ys, yl), (gs, gl))?;
        let out = map_rows2(y, g, n, |o, y, g| {
            simd::dispatch(|| {
                let total = simd::sum(g);
                for ((o, &y), &g) in o.iter_mut().zip(y).zip(g) {
                    *o = g - simd::exp(y) * total;
                }
            })
        });
        Ok((CpuStorage::F32(out), yl.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------
// RMSNorm

/// x / √(mean(x²) + ε) · w over the last dimension; `w` is frozen (no gradient).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(RmsNorm {
        w: w.contiguous()?,
        eps,
    })
}

struct RmsNorm {
    w: Tensor,
    eps: f64,
}

/// 1 / √(mean(x²) + ε), with the mean taken as candle's composed ops take it.
#[inline(always)]
fn inv_rms(x: &[f32], eps: f64) -> f32 {
    let inv_n = (1.0 / x.len() as f64) as f32;
    1.0 / (simd::dot(x, x) * inv_n + eps as f32).sqrt()
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let op = self.name();
        let x = values(op, s, l)?;
        let n = last_dim(op, l.shape())?;
        if self.w.dims() != [n] {
            return Err(err(
                op,
                format!("weight {:?} for rows of {n}", self.w.shape()),
            ));
        }
        let out = with_values(op, &self.w, |w| {
            Ok(map_rows(x, n, |o, x| {
                simd::dispatch(|| {
                    let inv = inv_rms(x, self.eps);
                    for ((o, &x), &w) in o.iter_mut().zip(x).zip(w) {
                        *o = x * inv * w;
                    }
                })
            }))
        })?;
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    /// With r = 1/√(mean(x²)+ε): d x_j = r·g_j·w_j − x_j·r³·(Σ_i g_i·w_i·x_i)/n.
    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = grad.contiguous()?;
        let op = RmsNormGrad {
            w: self.w.clone(),
            eps: self.eps,
        };
        Ok(Some(arg.apply_op2_no_bwd(&g, &op)?))
    }
}

struct RmsNormGrad {
    w: Tensor,
    eps: f64,
}

impl CustomOp2 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "fused-rms-norm-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let op = self.name();
        let (x, g, n) = operands2(op, (xs, xl), (gs, gl))?;
        let out = with_values(op, &self.w, |w| {
            Ok(map_rows2(x, g, n, |o, x, g| {
                simd::dispatch(|| {
                    let r = inv_rms(x, self.eps);
                    // Σ g·w·x, with g·w staged in `o` so that the sum vectorises.
                    for ((o, &g), &w) in o.iter_mut().zip(g).zip(w) {
                        *o = g * w;
                    }
                    let c = r * r * r * simd::dot(o, x) / n as f32;
                    for (o, &x) in o.iter_mut().zip(x) {
                        *o = r * *o - x * c;
                    }
                })
            }))
        })?;
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------
// SwiGLU

/// silu(gate) · up, with silu(x) = x / (1 + e^(−x)).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let op = self.name();
        if gl.shape() != ul.shape() {
            return Err(err(
                op,
                format!("gate {:?} and up {:?}", gl.shape(), ul.shape()),
            ));
        }
        let (g, u) = (values(op, gs, gl)?, values(op, us, ul)?);
        let mut out = zeros(g.len());
        out.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
            .for_each(|(o, (g, u))| {
                simd::dispatch(|| {
                    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                        *o = g / (1.0 + simd::exp(-g)) * u;
                    }
                })
            });
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }

    /// d up = g·silu(gate); d gate = g·up·σ(gate)·(1 + gate·(1 − σ(gate))).
    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        // Both gradients from one pass (one exp per value), stacked: [d gate, d up].
        let both = gate.apply_op3_no_bwd(up, &g, &SwiGluGrad)?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

struct SwiGluGrad;

impl CustomOp3 for SwiGluGrad {
    fn name(&self) -> &'static str {
        "fused-swiglu-grad"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let op = self.name();
        if gl.shape() != ul.shape() || gl.shape() != dl.shape() {
            return Err(err(
                op,
                format!(
                    "gate {:?}, up {:?}, gradient {:?}",
                    gl.shape(),
                    ul.shape(),
                    dl.shape()
                ),
            ));
        }
        let (gate, up, grad) = (
            values(op, gs, gl)?,
            values(op, us, ul)?,
            values(op, ds, dl)?,
        );
        let mut out = zeros(2 * gate.len());
        let (d_gate, d_up) = out.split_at_mut(gate.len());
        d_gate
            .par_chunks_mut(CHUNK)
            .zip(d_up.par_chunks_mut(CHUNK))
            .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
            .zip(grad.par_chunks(CHUNK))
            .for_each(|(((dg, du), (x, u)), d)| {
                simd::dispatch(|| {
                    let values = dg.iter_mut().zip(du.iter_mut()).zip(x.iter().zip(u).zip(d));
                    for ((dg, du), ((&x, &u), &d)) in values {
                        let e = simd::exp(-x);
                        let s = 1.0 / (1.0 + e);
                        *dg = d * u * (s * (1.0 + x * (1.0 - s)));
                        *du = d * (x / (1.0 + e));
                    }
                })
            });
        let mut dims = vec![2];
        dims.extend_from_slice(gl.dims());
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// The largest |a − b|, for tests here and in the modules built on these kernels.
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>());
    d.expect("comparable tensors")
}

/// [`max_abs_diff`] relative to b's largest magnitude (or 1 when that is smaller).
#[cfg(test)]
pub(crate) fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let largest = b.abs().and_then(|b| b.max_all()?.to_scalar::<f32>());
    max_abs_diff(a, b) / largest.expect("a tensor").max(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Values and input gradients of `fused` and `composed` on the same input agree.
    fn agree(
        shape: &[usize],
        fused: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
        composed: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
        tol: f32,
    ) {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()).unwrap();
        let (yf, yc) = (
            fused(x.as_tensor()).unwrap(),
            composed(x.as_tensor()).unwrap(),
        );
        assert_eq!(yf.shape(), yc.shape());
        let w = Tensor::randn(0f32, 1.0, yf.shape(), &Device::Cpu).unwrap();
        assert!(
            max_rel_diff(&yf, &yc) <= tol,
            "values differ by {}",
            max_rel_diff(&yf, &yc)
        );
        let gf = (&yf * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (&yc * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let (gf, gc) = (gf.get(&x).unwrap(), gc.get(&x).unwrap());
        assert!(
            max_rel_diff(gf, gc) <= tol,
            "gradients differ by {}",
            max_rel_diff(gf, gc)
        );
    }

    #[test]
    fn log_softmax_matches_the_composed_ops() {
        agree(
            &[5, 33],
            log_softmax,
            crate::llama::log_softmax_composed,
            1e-6,
        );
    }

    #[test]
    fn rms_norm_matches_the_composed_ops() {
        let w = Tensor::randn(1f32, 0.1, 24, &Device::Cpu).unwrap();
        agree(
            &[2, 5, 24],
            |x| rms_norm(x, &w, 1e-5),
            |x| crate::llama::rms_norm_composed(x, &w, 1e-5),
            1e-6,
        );
    }

    #[test]
    fn swiglu_matches_the_composed_ops() {
        let up =
            Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 4100), &Device::Cpu).unwrap()).unwrap();
        agree(
            &[3, 4100],
            |g| swiglu(g, up.as_tensor()),
            |g| g.silu()? * up.as_tensor(),
            1e-6,
        );
        // The gradient reaching `up` as well.
        let gate = Tensor::randn(0f32, 1.0, (3, 4100), &Device::Cpu).unwrap();
        agree(&[3, 4100], |u| swiglu(&gate, u), |u| gate.silu()? * u, 1e-6);
    }

    #[test]
    fn bad_operands_are_refused_by_name() {
        let x = Tensor::zeros((2, 1, 3, 3), DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap();
        let e = rms_norm(&x, &w, 1e-5).unwrap_err();
        assert!(e.to_string().contains("fused-rms-norm: weight"), "{e}");
        let g = Tensor::zeros((2, 1, 3, 4), DType::F32, &Device::Cpu).unwrap();
        let e = x.apply_op3_no_bwd(&x, &g, &SwiGluGrad).unwrap_err();
        assert!(e.to_string().contains("fused-swiglu-grad: gate"), "{e}");
    }
}
