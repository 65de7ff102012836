//! Causal self-attention as one op on the CPU (f32): from the projections' outputs q, k, v
//! to the merged heads that o_proj takes, with RoPE, grouped-query attention, the masked
//! softmax and both products inside, and an analytic backward.
//!
//! Why one op: composed, attention is seven tensors per layer (three rotated and repeated
//! head copies, scores, probabilities, the product and its merged copy), each written in
//! forward and, in candle's backward, zero-filled and summed into on one thread. Here
//! forward keeps only the rotated heads and the probabilities (for backward), and works in
//! blocks of `BLOCK` query rows: blocks of scores wholly above the diagonal are never computed
//! (37.5% of the products at 256 tokens, approaching half for long sequences), and a row's
//! softmax stops at the diagonal. The values and the order of every sum are those of the
//! composed ops, so results agree with them to the last bit or nearly.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::fused::{values, with_values};
use crate::matmul::{Operand, SendPtr, gemm_raw};

/// Query rows per task (and key rows per task in backward).
const BLOCK: usize = 64;

/// Below this, f32 `exp` is 0 (the smallest subnormal is e^-103.28).
const UNDERFLOW: f32 = -104.0;

/// How the heads are laid out: query heads, key/value heads (grouped-query attention when
/// fewer), and the head dimension.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub q: usize,
    pub kv: usize,
    pub dim: usize,
}

/// softmax(scale · q·kᵀ + mask) · v for q (B, T, heads.q · dim), k and v (B, T, heads.kv ·
/// dim), with q and k rotated by RoPE (cos, sin: (B, 1, T, dim)); mask (B, 1, T, T) additive
/// (0 or f32::MIN) and causal (every entry above the diagonal is masked). Returns (B, T,
/// heads.q · dim).
pub fn causal_attention(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    (cos, sin): (&Tensor, &Tensor),
    mask: &Tensor,
    heads: Heads,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let op = CausalAttention {
        cos: cos.contiguous()?,
        sin: sin.contiguous()?,
        mask: mask.contiguous()?,
        heads,
        scale: scale as f32,
        saved: Mutex::default(),
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

struct CausalAttention {
    cos: Tensor,
    sin: Tensor,
    mask: Tensor,
    heads: Heads,
    scale: f32,
    /// What forward computed that backward needs; taken by backward.
    saved: Mutex<Option<Saved>>,
}

/// Forward's intermediates, heads first: q and k rotated (B, H, T, D), v (B, Hkv, T, D), and
/// the probabilities (B, H, T, T), zero above the diagonal.
struct Saved {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    p: Vec<f32>,
}

/// Batch and sequence length.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
}

/// One head row: out = x·cos + rotate_half(x)·sin (transformers' half-split form).
fn rotate(o: &mut [f32], x: &[f32], cos: &[f32], sin: &[f32]) {
    let half = x.len() / 2;
    for d in 0..x.len() {
        let rot = if d < half { -x[d + half] } else { x[d - half] };
        o[d] = x[d] * cos[d] + rot * sin[d];
    }
}

/// The gradient of [`rotate`] for one head row, written to `o`.
fn rotate_grad(o: &mut [f32], g: &[f32], cos: &[f32], sin: &[f32]) {
    let half = g.len() / 2;
    for d in 0..g.len() {
        let rot = if d < half {
            g[d + half] * sin[d + half]
        } else {
            -(g[d - half] * sin[d - half])
        };
        o[d] = g[d] * cos[d] + rot;
    }
}

impl CausalAttention {
    fn name_(&self) -> &'static str {
        "causal-attention"
    }

    fn dims(&self, q: &Shape, k: &Shape, v: &Shape) -> candle_core::Result<Dims> {
        let h = self.heads;
        let (b, t, qw) = q.dims3()?;
        let fits = k.dims() == v.dims()
            && k.dims() == [b, t, h.kv * h.dim]
            && qw == h.q * h.dim
            && h.kv > 0
            && h.q.is_multiple_of(h.kv)
            && h.dim.is_multiple_of(2)
            && self.cos.dims() == [b, 1, t, h.dim]
            && self.sin.dims() == [b, 1, t, h.dim]
            && self.mask.dims() == [b, 1, t, t];
        if !fits {
            candle_core::bail!(
                "{}: q {q:?}, k {k:?}, v {v:?}, RoPE tables {:?} and mask {:?} for {h:?}",
                self.name_(),
                self.cos.shape(),
                self.mask.shape()
            );
        }
        Ok(Dims { b, t })
    }

    /// Run `f` with the cos and sin tables and the mask.
    fn with_tables<R>(
        &self,
        f: impl FnOnce(&[f32], &[f32], &[f32]) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        let op = self.name_();
        with_values(op, &self.cos, |c| {
            with_values(op, &self.sin, |s| {
                with_values(op, &self.mask, |m| f(c, s, m))
            })
        })
    }

    /// (B, T, H·D) → (B, H, T, D), rotated when `rope` holds the tables.
    fn heads_first(
        &self,
        x: &[f32],
        d: Dims,
        h: usize,
        rope: Option<(&[f32], &[f32])>,
    ) -> Vec<f32> {
        let (t, hd) = (d.t, self.heads.dim);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(hd)
            .enumerate()
            .with_min_len(16)
            .for_each(|(row, o)| {
                let (bi, head, ti) = (row / (h * t), (row / t) % h, row % t);
                let src = &x[((bi * t + ti) * h + head) * hd..][..hd];
                match rope {
                    Some((cos, sin)) => {
                        let at = (bi * t + ti) * hd;
                        rotate(o, src, &cos[at..at + hd], &sin[at..at + hd]);
                    }
                    None => o.copy_from_slice(src),
                }
            });
        out
    }

    /// Forward: the output (B, T, H·D) and what backward needs.
    fn run_forward(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        d: Dims,
    ) -> candle_core::Result<(Vec<f32>, Saved)> {
        let Heads {
            q: nh,
            kv: nkv,
            dim: hd,
        } = self.heads;
        let (t, rep, scale) = (d.t, nh / nkv, self.scale);
        self.with_tables(|cos, sin, mask| {
            let q = self.heads_first(q, d, nh, Some((cos, sin)));
            let k = self.heads_first(k, d, nkv, Some((cos, sin)));
            let v = self.heads_first(v, d, nkv, None);
            let mut p = vec![0f32; d.b * nh * t * t];
            let mut out = vec![0f32; d.b * t * nh * hd];
            let (pp, op) = (SendPtr(p.as_mut_ptr()), SendPtr(out.as_mut_ptr()));
            let blocks = t.div_ceil(BLOCK);
            (0..d.b * nh * blocks).into_par_iter().for_each(|task| {
                let (bh, r0) = (task / blocks, (task % blocks) * BLOCK);
                let (bi, h) = (bh / nh, bh % nh);
                let r1 = (r0 + BLOCK).min(t);
                let qh = &q[(bh * t + r0) * hd..];
                let kh = &k[(bi * nkv + h / rep) * t * hd..];
                let vh = &v[(bi * nkv + h / rep) * t * hd..];
                // SAFETY: this task alone writes rows r0..r1 of head (bi, h) of p (columns
                // < r1) and of the output (this head's columns); the operands' blocks lie
                // inside q, k, v, whose sizes are checked by `dims`.
                unsafe {
                    let prow = pp.get().add((bh * t + r0) * t);
                    gemm_raw(
                        prow,
                        t,
                        (0.0, 1.0),
                        (r1 - r0, hd, r1),
                        (qh.as_ptr(), Operand::rows(hd)),
                        (kh.as_ptr(), Operand::transposed(hd)),
                        gemm::Parallelism::None,
                    );
                    for i in r0..r1 {
                        let row = std::slice::from_raw_parts_mut(prow.add((i - r0) * t), r1);
                        softmax_row(&mut row[..=i], &mask[(bi * t + i) * t..][..=i], scale);
                        row[i + 1..].fill(0.0);
                    }
                    gemm_raw(
                        op.get().add((bi * t + r0) * nh * hd + h * hd),
                        nh * hd,
                        (0.0, 1.0),
                        (r1 - r0, r1, hd),
                        (prow, Operand::rows(t)),
                        (vh.as_ptr(), Operand::rows(hd)),
                        gemm::Parallelism::None,
                    );
                }
            });
            Ok((out, Saved { q, k, v, p }))
        })
    }
}

/// softmax(scale · x + mask) of one row, in place, up to the diagonal (the rest is masked).
fn softmax_row(x: &mut [f32], mask: &[f32], scale: f32) {
    let mut max = f32::NEG_INFINITY;
    for (x, &m) in x.iter_mut().zip(mask) {
        *x = *x * scale + m;
        max = max.max(*x);
    }
    let mut sum = 0f32;
    for x in x.iter_mut() {
        // Masked entries sit ~f32::MAX below the maximum: exp gives exactly 0 for anything
        // under UNDERFLOW, but through libm's slow path.
        let e = *x - max;
        *x = if e < UNDERFLOW { 0.0 } else { e.exp() };
        sum += *x;
    }
    for x in x.iter_mut() {
        *x /= sum;
    }
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        self.name_()
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let op = self.name_();
        let d = self.dims(ql.shape(), kl.shape(), vl.shape())?;
        let (q, k, v) = (
            values(op, qs, ql)?,
            values(op, ks, kl)?,
            values(op, vs, vl)?,
        );
        let (out, saved) = self.run_forward(q, k, v, d)?;
        *self.saved.lock().expect("attention lock") = Some(saved);
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }

    /// With P the probabilities and g the incoming gradient (per head): d P = g·vᵀ,
    /// d S = scale · P ⊙ (d P − rowsum(P ⊙ d P)), d q = RoPEᵀ(d S · k), d k = RoPEᵀ(d Sᵀ · q)
    /// and d v = Pᵀ · g, the last two summed over each key/value head's group of query heads.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = self.name_();
        let d = self.dims(q.shape(), k.shape(), v.shape())?;
        let kept = self.saved.lock().expect("attention lock").take();
        let saved = match kept {
            Some(s) => s,
            // Only when backward runs twice over one graph: recompute.
            None => with_values(op, q, |qv| {
                with_values(op, k, |kv| {
                    with_values(op, v, |vv| Ok(self.run_forward(qv, kv, vv, d)?.1))
                })
            })?,
        };
        let (dq, dk, dv) = with_values(op, grad, |g| self.grads(g, &saved, d))?;
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}

impl CausalAttention {
    /// (d q, d k, d v) in the inputs' layouts from the incoming gradient `g` (B, T, H·D).
    fn grads(
        &self,
        g: &[f32],
        s: &Saved,
        d: Dims,
    ) -> candle_core::Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let Heads {
            q: nh,
            kv: nkv,
            dim: hd,
        } = self.heads;
        let (t, rep, scale) = (d.t, nh / nkv, self.scale);
        let blocks = t.div_ceil(BLOCK);
        let g_row = nh * hd;
        self.with_tables(|cos, sin, _| {
            // Per query head and block of rows: d S (in place of d P), then d q.
            let mut ds = vec![0f32; s.p.len()];
            let mut dq = vec![0f32; g.len()];
            let (dsp, dqp) = (SendPtr(ds.as_mut_ptr()), SendPtr(dq.as_mut_ptr()));
            (0..d.b * nh * blocks).into_par_iter().for_each(|task| {
                let (bh, r0) = (task / blocks, (task % blocks) * BLOCK);
                let (bi, h) = (bh / nh, bh % nh);
                let r1 = (r0 + BLOCK).min(t);
                let kv_head = (bi * nkv + h / rep) * t * hd;
                let mut dqh = vec![0f32; (r1 - r0) * hd];
                // SAFETY: this task alone writes rows r0..r1 of head (bi, h) of d S and this
                // head's columns of rows r0..r1 of d q; the operands lie inside g and `s`.
                unsafe {
                    let dsrow = dsp.get().add((bh * t + r0) * t);
                    gemm_raw(
                        dsrow,
                        t,
                        (0.0, 1.0),
                        (r1 - r0, hd, r1),
                        (
                            g[(bi * t + r0) * g_row + h * hd..].as_ptr(),
                            Operand::rows(g_row),
                        ),
                        (s.v[kv_head..].as_ptr(), Operand::transposed(hd)),
                        gemm::Parallelism::None,
                    );
                    for i in r0..r1 {
                        let row = std::slice::from_raw_parts_mut(dsrow.add((i - r0) * t), r1);
                        let p = &s.p[(bh * t + i) * t..][..=i];
                        let dot: f32 = p.iter().zip(&row[..=i]).map(|(p, g)| p * g).sum();
                        for (o, &p) in row[..=i].iter_mut().zip(p) {
                            *o = p * (*o - dot) * scale;
                        }
                        row[i + 1..].fill(0.0);
                    }
                    gemm_raw(
                        dqh.as_mut_ptr(),
                        hd,
                        (0.0, 1.0),
                        (r1 - r0, r1, hd),
                        (dsrow, Operand::rows(t)),
                        (s.k[kv_head..].as_ptr(), Operand::rows(hd)),
                        gemm::Parallelism::None,
                    );
                    for i in r0..r1 {
                        let at = (bi * t + i) * hd;
                        let o = std::slice::from_raw_parts_mut(
                            dqp.get().add((bi * t + i) * g_row + h * hd),
                            hd,
                        );
                        rotate_grad(
                            o,
                            &dqh[(i - r0) * hd..][..hd],
                            &cos[at..at + hd],
                            &sin[at..at + hd],
                        );
                    }
                }
            });
            // Per key/value head and block of key rows: d k and d v, summed over the group.
            let kv_row = nkv * hd;
            let mut dk = vec![0f32; d.b * t * kv_row];
            let mut dv = vec![0f32; d.b * t * kv_row];
            let (dkp, dvp) = (SendPtr(dk.as_mut_ptr()), SendPtr(dv.as_mut_ptr()));
            (0..d.b * nkv * blocks).into_par_iter().for_each(|task| {
                let (bk, c0) = (task / blocks, (task % blocks) * BLOCK);
                let (bi, kvh) = (bk / nkv, bk % nkv);
                let c1 = (c0 + BLOCK).min(t);
                let mut dkh = vec![0f32; (c1 - c0) * hd];
                for h in kvh * rep..(kvh + 1) * rep {
                    let bh = bi * nh + h;
                    let beta = if h == kvh * rep { 0.0 } else { 1.0 };
                    // Rows c0.. of d S and P (those below are zero in these columns).
                    let at = (bh * t + c0) * t + c0;
                    // SAFETY: this task alone writes rows c0..c1 of d k's and d v's columns
                    // of head (bi, kvh); the operands lie inside `ds`, `s` and g.
                    unsafe {
                        gemm_raw(
                            dkh.as_mut_ptr(),
                            hd,
                            (beta, 1.0),
                            (c1 - c0, t - c0, hd),
                            (dsp.get().add(at).cast_const(), Operand::transposed(t)),
                            (s.q[(bh * t + c0) * hd..].as_ptr(), Operand::rows(hd)),
                            gemm::Parallelism::None,
                        );
                        gemm_raw(
                            dvp.get().add((bi * t + c0) * kv_row + kvh * hd),
                            kv_row,
                            (beta, 1.0),
                            (c1 - c0, t - c0, hd),
                            (s.p[at..].as_ptr(), Operand::transposed(t)),
                            (
                                g[(bi * t + c0) * g_row + h * hd..].as_ptr(),
                                Operand::rows(g_row),
                            ),
                            gemm::Parallelism::None,
                        );
                    }
                }
                for j in c0..c1 {
                    let at = (bi * t + j) * hd;
                    // SAFETY: as above, row j of head kvh of d k is this task's alone.
                    let o = unsafe {
                        std::slice::from_raw_parts_mut(
                            dkp.get().add((bi * t + j) * kv_row + kvh * hd),
                            hd,
                        )
                    };
                    rotate_grad(
                        o,
                        &dkh[(j - c0) * hd..][..hd],
                        &cos[at..at + hd],
                        &sin[at..at + hd],
                    );
                }
            });
            drop(ds);
            Ok((dq, dk, dv))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Values and gradients against the composed ops (RoPE, repeated heads, full products,
    /// softmax), with grouped-query heads, a partial last block, two packed examples and
    /// padding in one row.
    #[test]
    fn matches_the_composed_ops() {
        let cpu = &Device::Cpu;
        let (b, t) = (2, BLOCK * 2 + 22);
        let heads = Heads {
            q: 4,
            kv: 2,
            dim: 8,
        };
        let angles = Tensor::randn(0f32, 1.0, (b, 1, t, heads.dim), cpu).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        // Row 0: two packed examples; row 1: one example, then padding.
        let seg = |bi: usize, j: usize| match (bi, j) {
            (0, j) => 1 + usize::from(j >= 90),
            (_, j) => usize::from(j < 130),
        };
        let mask: Vec<f32> = (0..b * t * t)
            .map(|n| {
                let (bi, i, j) = (n / (t * t), (n / t) % t, n % t);
                let (si, sj) = (seg(bi, i), seg(bi, j));
                if j > i || sj == 0 || (si != 0 && si != sj) {
                    f32::MIN
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (b, 1, t, t), cpu).unwrap();
        let var = |w: usize| {
            Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, w), cpu).unwrap()).unwrap()
        };
        let (q, k, v) = (
            var(heads.q * heads.dim),
            var(heads.kv * heads.dim),
            var(heads.kv * heads.dim),
        );
        let scale = 0.3;
        let ours = causal_attention((&q, &k, &v), (&cos, &sin), &mask, heads, scale).unwrap();
        let composed =
            crate::llama::attend_composed((&q, &k, &v), (&cos, &sin), &mask, heads, scale).unwrap();
        let close = |a: &Tensor, b: &Tensor, what: &str| {
            let d = crate::fused::max_abs_diff(a, b);
            assert!(d < 1e-5, "{what} differs by {d}");
        };
        close(&ours, &composed, "output");
        let w = Tensor::randn(0f32, 1.0, ours.shape(), cpu).unwrap();
        let g1 = (&ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&composed * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (x, name) in [(&q, "d q"), (&k, "d k"), (&v, "d v")] {
            close(g1.get(x).unwrap(), g2.get(x).unwrap(), name);
        }
    }

    #[test]
    fn mismatched_shapes_are_refused_by_name() {
        let cpu = &Device::Cpu;
        let heads = Heads {
            q: 4,
            kv: 2,
            dim: 8,
        };
        let z = |s: &[usize]| Tensor::zeros(s, candle_core::DType::F32, cpu).unwrap();
        let (q, kv) = (z(&[1, 5, 32]), z(&[1, 5, 16]));
        let e = causal_attention(
            (&q, &kv, &kv),
            (&z(&[1, 1, 5, 8]), &z(&[1, 1, 5, 8])),
            &z(&[1, 1, 5, 4]),
            heads,
            1.0,
        )
        .unwrap_err();
        assert!(e.to_string().contains("causal-attention: q"), "{e}");
    }
}
