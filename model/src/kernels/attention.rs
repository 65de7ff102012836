//! Causal self-attention as one op on the CPU (f32): from the projections' outputs q, k, v
//! to the merged heads that o_proj takes, with RoPE, grouped-query attention, the masked
//! softmax and both products inside, and an analytic backward.
//!
//! Why one op: composed, attention is seven tensors per layer (three rotated and repeated
//! head copies, scores, probabilities, the product and its merged copy), each written in
//! forward and, in candle's backward, zero-filled and summed into on one thread. Here
//! forward keeps only the rotated heads and the probabilities (for backward), and works in
//! blocks of `BLOCK` query rows, one task each: blocks of scores wholly above the diagonal are
//! never computed (37.5% of the products at 256 tokens, approaching half for long sequences),
//! and a row's softmax stops at the diagonal.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::kernels::fused::{values, with_values, zeros};
use crate::kernels::matmul::{Operand, SendPtr, gemm_block};
use crate::kernels::simd;

/// Query rows per task (and key rows per task in backward).
const BLOCK: usize = 64;

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

/// One task's share: rows r0..r1 of head `h` of batch row `b`.
#[derive(Clone, Copy)]
struct Block {
    b: usize,
    h: usize,
    r0: usize,
    r1: usize,
}

impl Block {
    fn rows(self) -> usize {
        self.r1 - self.r0
    }
}

/// Every (batch row, head, block of BLOCK rows), in parallel.
fn blocks(d: Dims, heads: usize) -> impl ParallelIterator<Item = Block> {
    let per_head = d.t.div_ceil(BLOCK);
    (0..d.b * heads * per_head).into_par_iter().map(move |i| {
        let (bh, r0) = (i / per_head, (i % per_head) * BLOCK);
        Block {
            b: bh / heads,
            h: bh % heads,
            r0,
            r1: (r0 + BLOCK).min(d.t),
        }
    })
}

/// One head row: out = x·cos + rotate_half(x)·sin (transformers' half-split form), with
/// rotate_half(x) = (−x₂, x₁) for the halves x₁, x₂.
#[inline(always)]
fn rotate(o: &mut [f32], x: &[f32], cos: &[f32], sin: &[f32]) {
    let half = x.len() / 2;
    let (x1, x2) = x.split_at(half);
    let (o1, o2) = o.split_at_mut(half);
    let ((c1, c2), (s1, s2)) = (cos.split_at(half), sin.split_at(half));
    let first = o1.iter_mut().zip(x1.iter().zip(x2)).zip(c1.iter().zip(s1));
    for ((o, (&a, &b)), (&c, &s)) in first {
        *o = a * c + -b * s;
    }
    let second = o2.iter_mut().zip(x2.iter().zip(x1)).zip(c2.iter().zip(s2));
    for ((o, (&b, &a)), (&c, &s)) in second {
        *o = b * c + a * s;
    }
}

/// The gradient of [`rotate`] for one head row, written to `o`.
#[inline(always)]
fn rotate_grad(o: &mut [f32], g: &[f32], cos: &[f32], sin: &[f32]) {
    let half = g.len() / 2;
    let (g1, g2) = g.split_at(half);
    let (o1, o2) = o.split_at_mut(half);
    let ((c1, c2), (s1, s2)) = (cos.split_at(half), sin.split_at(half));
    let first = o1.iter_mut().zip(g1.iter().zip(g2)).zip(c1.iter().zip(s2));
    for ((o, (&a, &b)), (&c, &s)) in first {
        *o = a * c + b * s;
    }
    let second = o2.iter_mut().zip(g2.iter().zip(g1)).zip(c2.iter().zip(s1));
    for ((o, (&b, &a)), (&c, &s)) in second {
        *o = b * c + -(a * s);
    }
}

/// softmax(scale · x + mask) of one row, in place, up to the diagonal (the rest is masked).
/// Masked entries sit ~f32::MAX below the maximum: their `exp` is exactly 0.
#[inline(always)]
fn softmax_row(x: &mut [f32], mask: &[f32], scale: f32) {
    for (x, &m) in x.iter_mut().zip(mask) {
        *x = *x * scale + m;
    }
    let max = simd::max(x);
    for x in x.iter_mut() {
        *x = simd::exp(*x - max);
    }
    let sum = simd::sum(x);
    for x in x.iter_mut() {
        *x /= sum;
    }
}

/// d scores = scale · p ⊙ (d p − Σ p ⊙ d p) for one row, in place of d p.
#[inline(always)]
fn softmax_grad_row(dp: &mut [f32], p: &[f32], scale: f32) {
    let dot = simd::dot(p, dp);
    for (o, &p) in dp.iter_mut().zip(p) {
        *o = p * (*o - dot) * scale;
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

    /// The first rows of `blk`'s head in (B, H, T, ·) and of its key/value head in
    /// (B, Hkv, T, ·).
    fn head_rows(&self, blk: Block, t: usize) -> (usize, usize) {
        let Heads { q: nh, kv: nkv, .. } = self.heads;
        (
            (blk.b * nh + blk.h) * t,
            (blk.b * nkv + blk.h / (nh / nkv)) * t,
        )
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
        let mut out = zeros(x.len());
        out.par_chunks_mut(hd)
            .enumerate()
            .with_min_len(16)
            .for_each(|(row, o)| {
                let (bi, head, ti) = (row / (h * t), (row / t) % h, row % t);
                let src = &x[((bi * t + ti) * h + head) * hd..][..hd];
                simd::dispatch(|| match rope {
                    Some((cos, sin)) => {
                        let at = (bi * t + ti) * hd;
                        rotate(o, src, &cos[at..][..hd], &sin[at..][..hd]);
                    }
                    None => o.copy_from_slice(src),
                })
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
        let (nh, hd) = (self.heads.q, self.heads.dim);
        let (t, scale) = (d.t, self.scale);
        self.with_tables(|cos, sin, mask| {
            let q = self.heads_first(q, d, nh, Some((cos, sin)));
            let k = self.heads_first(k, d, self.heads.kv, Some((cos, sin)));
            let v = self.heads_first(v, d, self.heads.kv, None);
            let mut p = zeros(d.b * nh * t * t);
            let mut out = zeros(d.b * t * nh * hd);
            let (pp, op) = (SendPtr(p.as_mut_ptr()), SendPtr(out.as_mut_ptr()));
            blocks(d, nh).for_each(|blk| {
                let (head, kv) = self.head_rows(blk, t);
                // SAFETY: rows r0..r1 of this head of p are this task's alone.
                let probs = unsafe { pp.slice((head + blk.r0) * t, blk.rows() * t) };
                let q_rows = (&q[(head + blk.r0) * hd..], Operand::rows(hd));
                // Scores up to column r1 only: later ones are masked in every row here.
                // SAFETY: `probs` holds the rows × r1 block at row stride t.
                unsafe {
                    gemm_block(
                        (probs.as_mut_ptr(), t),
                        0.0,
                        (blk.rows(), hd, blk.r1),
                        q_rows,
                        (&k[kv * hd..], Operand::transposed(hd)),
                    )
                };
                simd::dispatch(|| {
                    for (i, row) in (blk.r0..blk.r1).zip(probs.chunks_mut(t)) {
                        softmax_row(&mut row[..=i], &mask[(blk.b * t + i) * t..][..=i], scale);
                        row[i + 1..blk.r1].fill(0.0);
                    }
                });
                // SAFETY: this head's columns of rows r0..r1 of the output are this task's
                // alone, and lie inside it.
                unsafe {
                    gemm_block(
                        (
                            op.get().add((blk.b * t + blk.r0) * nh * hd + blk.h * hd),
                            nh * hd,
                        ),
                        0.0,
                        (blk.rows(), blk.r1, hd),
                        (&*probs, Operand::rows(t)),
                        (&v[kv * hd..], Operand::rows(hd)),
                    )
                };
            });
            Ok((out, Saved { q, k, v, p }))
        })
    }

    /// (d q, d k, d v) in the inputs' layouts from the incoming gradient `g` (B, T, H·D).
    /// With P the probabilities, per head: d P = g·vᵀ, d S = scale · P ⊙ (d P − rowsum(P ⊙
    /// d P)), d q = RoPEᵀ(d S · k), d k = RoPEᵀ(d Sᵀ · q) and d v = Pᵀ · g, the last two
    /// summed over each key/value head's group of query heads.
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
        let (t, scale) = (d.t, self.scale);
        let (g_row, kv_row) = (nh * hd, nkv * hd);
        self.with_tables(|cos, sin, _| {
            // Per query head and block of rows: d S, then d q.
            let mut ds = zeros(s.p.len());
            let mut dq = zeros(g.len());
            let (dsp, dqp) = (SendPtr(ds.as_mut_ptr()), SendPtr(dq.as_mut_ptr()));
            blocks(d, nh).for_each(|blk| {
                let (head, kv) = self.head_rows(blk, t);
                let g_at = (blk.b * t + blk.r0) * g_row + blk.h * hd;
                // SAFETY: rows r0..r1 of this head of d S are this task's alone.
                let ds_rows = unsafe { dsp.slice((head + blk.r0) * t, blk.rows() * t) };
                // SAFETY: `ds_rows` holds the rows × r1 block at row stride t.
                unsafe {
                    gemm_block(
                        (ds_rows.as_mut_ptr(), t),
                        0.0,
                        (blk.rows(), hd, blk.r1),
                        (&g[g_at..], Operand::rows(g_row)),
                        (&s.v[kv * hd..], Operand::transposed(hd)),
                    )
                };
                let p_rows = s.p[(head + blk.r0) * t..].chunks(t);
                simd::dispatch(|| {
                    let rows = (blk.r0..blk.r1).zip(ds_rows.chunks_mut(t)).zip(p_rows);
                    for ((i, ds), p) in rows {
                        softmax_grad_row(&mut ds[..=i], &p[..=i], scale);
                        ds[i + 1..blk.r1].fill(0.0);
                    }
                });
                let mut dqh = vec![0f32; blk.rows() * hd];
                // SAFETY: `dqh` holds the rows × hd block.
                unsafe {
                    gemm_block(
                        (dqh.as_mut_ptr(), hd),
                        0.0,
                        (blk.rows(), blk.r1, hd),
                        (&*ds_rows, Operand::rows(t)),
                        (&s.k[kv * hd..], Operand::rows(hd)),
                    )
                };
                simd::dispatch(|| {
                    for (i, dqh) in (blk.r0..blk.r1).zip(dqh.chunks(hd)) {
                        let at = (blk.b * t + i) * hd;
                        // SAFETY: this head's columns of row i of d q are this task's alone.
                        let o = unsafe { dqp.slice((blk.b * t + i) * g_row + blk.h * hd, hd) };
                        rotate_grad(o, dqh, &cos[at..][..hd], &sin[at..][..hd]);
                    }
                });
            });
            // Per key/value head and block of key rows: d k and d v, summed over the group.
            let mut dk = zeros(d.b * t * kv_row);
            let mut dv = zeros(d.b * t * kv_row);
            let (dkp, dvp) = (SendPtr(dk.as_mut_ptr()), SendPtr(dv.as_mut_ptr()));
            let ds = &ds;
            blocks(d, nkv).for_each(|blk| {
                let (c0, n) = (blk.r0, t - blk.r0);
                let rep = nh / nkv;
                let mut dkh = vec![0f32; blk.rows() * hd];
                for h in blk.h * rep..(blk.h + 1) * rep {
                    let head = (blk.b * nh + h) * t;
                    let beta = if h == blk.h * rep { 0.0 } else { 1.0 };
                    // Rows c0.. of d S and P in columns c0..c1: the rows above are zero there.
                    let at = (head + c0) * t + c0;
                    let g_rows = (
                        &g[(blk.b * t + c0) * g_row + h * hd..],
                        Operand::rows(g_row),
                    );
                    // SAFETY: `dkh` holds the rows × hd block; this head's columns of rows
                    // c0..c1 of d v are this task's alone, and lie inside it.
                    unsafe {
                        gemm_block(
                            (dkh.as_mut_ptr(), hd),
                            beta,
                            (blk.rows(), n, hd),
                            (&ds[at..], Operand::transposed(t)),
                            (&s.q[(head + c0) * hd..], Operand::rows(hd)),
                        );
                        gemm_block(
                            (
                                dvp.get().add((blk.b * t + c0) * kv_row + blk.h * hd),
                                kv_row,
                            ),
                            beta,
                            (blk.rows(), n, hd),
                            (&s.p[at..], Operand::transposed(t)),
                            g_rows,
                        );
                    }
                }
                simd::dispatch(|| {
                    for (j, dkh) in (blk.r0..blk.r1).zip(dkh.chunks(hd)) {
                        let at = (blk.b * t + j) * hd;
                        // SAFETY: this head's columns of row j of d k are this task's alone.
                        let o = unsafe { dkp.slice((blk.b * t + j) * kv_row + blk.h * hd, hd) };
                        rotate_grad(o, dkh, &cos[at..][..hd], &sin[at..][..hd]);
                    }
                });
            });
            Ok((dq, dk, dv))
        })
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
            crate::llama::attend_composed((&q, &k, &v), (&cos, &sin), &mask, heads, scale, None)
                .unwrap();
        let close = |a: &Tensor, b: &Tensor, what: &str| {
            let d = crate::kernels::fused::max_abs_diff(a, b);
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
