//! f32 matrix products on the CPU, on candle's own kernels (the `gemm` crate) called directly.
//!
//! Matrix products are most of a training step. Three things candle's matmul does not do:
//! - accumulate into an existing output (`c = β·c + α·a·b`), which lets the fused LoRA linear
//!   add the adapter's product into the base's output and both paths' gradients into one
//!   buffer;
//! - run a batch of small products one per thread: candle runs attention's per-head products
//!   one after another, each split across the threads, which took twice as long (2 × 8 heads of
//!   256×64 · 64×256 on 2 threads: 1.6–1.9 ms against 0.8–1.0 ms);
//! - skip the blocks of causal attention above the diagonal ([`causal_scores`],
//!   [`causal_mix`]): masked scores and zero probabilities, 37.5% of attention's products
//!   at 256 tokens and approaching half for long sequences.
//!
//! Operands are read through their strides, so transposed views cost no copy. Other dtypes and
//! devices, and batch layouts this does not cover, use candle's matmul.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// `a · b` with a gradient for both, batched over the leading dimensions (same on both sides).
pub fn matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if applies(a, b) {
        a.apply_op2(b, MatMul)
    } else {
        a.matmul(b)
    }
}

/// `a · b` without a graph (for use inside backward passes).
pub fn matmul_no_grad(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if applies(a, b) {
        a.apply_op2_no_bwd(b, &MatMul)
    } else {
        a.detach().matmul(&b.detach())
    }
}

fn applies(a: &Tensor, b: &Tensor) -> bool {
    a.device().is_cpu()
        && b.device().is_cpu()
        && a.dtype() == DType::F32
        && b.dtype() == DType::F32
        && a.rank() >= 2
        && a.rank() == b.rank()
        && a.dims()[..a.rank() - 2] == b.dims()[..b.rank() - 2]
        && batch_stride(a.layout()).is_some()
        && batch_stride(b.layout()).is_some()
}

/// The one stride that steps through all leading (batch) dimensions, if there is one.
fn batch_stride(l: &Layout) -> Option<usize> {
    let (dims, strides) = (l.dims(), l.stride());
    let r = dims.len();
    if r == 2 {
        return Some(0);
    }
    for i in 0..r - 3 {
        if dims[i + 1] > 1 && strides[i] != strides[i + 1] * dims[i + 1] {
            return None;
        }
    }
    Some(strides[r - 3])
}

/// A strided operand: where it starts, the batch stride, and its row and column strides.
#[derive(Clone, Copy)]
pub(crate) struct Operand {
    start: usize,
    batch: usize,
    row: isize,
    col: isize,
}

impl Operand {
    fn of(l: &Layout) -> candle_core::Result<Self> {
        let s = l.stride();
        let r = s.len();
        Ok(Self {
            start: l.start_offset(),
            batch: batch_stride(l)
                .ok_or_else(|| candle_core::Error::Msg("matmul: batch is not strided".into()))?,
            row: s[r - 2] as isize,
            col: s[r - 1] as isize,
        })
    }

    /// A row-major matrix with `cols` columns, as it is.
    pub(crate) fn rows(cols: usize) -> Self {
        Self {
            start: 0,
            batch: 0,
            row: cols as isize,
            col: 1,
        }
    }

    /// A row-major matrix with `cols` columns, read as its transpose.
    pub(crate) fn transposed(cols: usize) -> Self {
        Self {
            start: 0,
            batch: 0,
            row: 1,
            col: cols as isize,
        }
    }
}

/// `a · b` for `batch` (m × k)·(k × n) products into a fresh row-major buffer.
pub(crate) fn sgemm(
    batch: usize,
    mkn: (usize, usize, usize),
    (a, al): (&[f32], Operand),
    (b, bl): (&[f32], Operand),
) -> Vec<f32> {
    let mut c = vec![0f32; batch * mkn.0 * mkn.2];
    sgemm_into(&mut c, 0.0, 1.0, batch, mkn, (a, al), (b, bl));
    c
}

/// `c = beta · c + alpha · a · b` for `batch` (m × k)·(k × n) products, `c` row-major.
pub(crate) fn sgemm_into(
    c: &mut [f32],
    beta: f32,
    alpha: f32,
    batch: usize,
    (m, k, n): (usize, usize, usize),
    (a, al): (&[f32], Operand),
    (b, bl): (&[f32], Operand),
) {
    assert_eq!(c.len(), batch * m * n, "sgemm: output size");
    if k == 0 {
        c.iter_mut()
            .for_each(|v| *v = if beta == 0.0 { 0.0 } else { beta * *v });
        return;
    }
    if m == 0 || n == 0 {
        return;
    }
    let out = SendPtr(c.as_mut_ptr());
    let threads = rayon::current_num_threads();
    let product = |i: usize, parallelism: gemm::Parallelism| {
        // SAFETY: the operands' layouts describe `a` and `b` (candle tensors or the row-major
        // buffers of the callers), so every strided index below (m, k) and (k, n) of every
        // batch is in bounds; `c` holds batch · m · n values and concurrent calls write
        // disjoint products of it.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                out.get().add(i * m * n),
                1,
                n as isize,
                beta != 0.0,
                a.as_ptr().add(al.start + i * al.batch),
                al.col,
                al.row,
                b.as_ptr().add(bl.start + i * bl.batch),
                bl.col,
                bl.row,
                // gemm's own naming: dst = alpha · dst + beta · lhs · rhs.
                beta,
                alpha,
                false,
                false,
                false,
                parallelism,
            )
        }
    };
    // Many small products (attention heads): one per task. Otherwise gemm splits each one.
    if batch >= threads {
        (0..batch)
            .into_par_iter()
            .for_each(|i| product(i, gemm::Parallelism::None));
    } else {
        (0..batch).for_each(|i| product(i, gemm::Parallelism::Rayon(threads)));
    }
}

/// The output buffer, shared by the tasks that write its disjoint blocks.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: tasks write disjoint blocks only, and the buffer outlives them (rayon joins).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `x (rows × in) · W (out × in)ᵀ` for the frozen linears: both row-major, W read transposed.
pub(crate) fn linear(x: &[f32], w: &[f32], rows: usize, in_f: usize, out_f: usize) -> Vec<f32> {
    sgemm(
        1,
        (rows, in_f, out_f),
        (x, Operand::rows(in_f)),
        (w, Operand::transposed(in_f)),
    )
}

struct MatMul;

impl CustomOp2 for MatMul {
    fn name(&self) -> &'static str {
        "cpu-matmul"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (ad, bd) = (al.dims(), bl.dims());
        let r = ad.len();
        let (m, k, n) = (ad[r - 2], ad[r - 1], bd[r - 1]);
        if bd[r - 2] != k || ad[..r - 2] != bd[..r - 2] {
            candle_core::bail!(
                "matmul: shapes {:?} and {:?} do not match",
                al.shape(),
                bl.shape()
            );
        }
        let batch = ad[..r - 2].iter().product();
        let c = sgemm(
            batch,
            (m, k, n),
            (xs.as_slice::<f32>()?, Operand::of(al)?),
            (bs.as_slice::<f32>()?, Operand::of(bl)?),
        );
        let mut dims = ad.to_vec();
        dims[r - 1] = n;
        Ok((CpuStorage::F32(c), Shape::from(dims)))
    }

    /// d a = g · bᵀ, d b = aᵀ · g.
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let ga = matmul_no_grad(grad, &b.t()?)?;
        let gb = matmul_no_grad(&a.t()?, grad)?;
        Ok((Some(ga), Some(gb)))
    }
}

// ---------------------------------------------------------------------------------------
// Causal attention

/// Rows per block of the causal products: blocks wholly above the diagonal are skipped.
const CAUSAL_BLOCK: usize = 64;

/// `q · kᵀ` (q, k: (…, T, D)) for causal attention: only the blocks on or below the diagonal
/// are computed, the rest is 0 (every score above the diagonal is masked).
pub fn causal_scores(q: &Tensor, k: &Tensor) -> candle_core::Result<Tensor> {
    q.contiguous()?.apply_op2(&k.contiguous()?, Causal::Scores)
}

/// `p · v` (p: (…, T, T), zero above the diagonal; v: (…, T, D)), skipping p's zero blocks.
pub fn causal_mix(p: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
    p.contiguous()?.apply_op2(&v.contiguous()?, Causal::Mix)
}

/// The three block-triangular products of causal attention and its backward. With X, Y the
/// operands (per batch: X (T × D) or (T × T), Y (T × D)):
#[derive(Clone, Copy)]
enum Causal {
    /// X · Yᵀ, lower blocks only (scores; and d p in backward).
    Scores,
    /// X · Y with X zero above the diagonal (probabilities times values; and d q).
    Mix,
    /// Xᵀ · Y with X zero above the diagonal (d v and d k).
    MixT,
}

impl Causal {
    fn run(self, x: &[f32], y: &[f32], batch: usize, t: usize, d: usize) -> Vec<f32> {
        let (xs, ys) = (x.len() / batch, y.len() / batch);
        let out_cols = if matches!(self, Causal::Scores) { t } else { d };
        let mut out = vec![0f32; batch * t * out_cols];
        let ptr = SendPtr(out.as_mut_ptr());
        let blocks = t.div_ceil(CAUSAL_BLOCK);
        (0..batch * blocks).into_par_iter().for_each(|task| {
            let (i, r0) = (task / blocks, (task % blocks) * CAUSAL_BLOCK);
            let r1 = (r0 + CAUSAL_BLOCK).min(t);
            let (x, y) = (&x[i * xs..][..xs], &y[i * ys..][..ys]);
            // (m, k, n), A's (start, row stride, column stride), B's likewise.
            let ((k, n), a, b) = match self {
                Causal::Scores => ((d, r1), (r0 * d, d, 1), (0, 1, d)),
                Causal::Mix => ((r1, d), (r0 * t, t, 1), (0, d, 1)),
                Causal::MixT => ((t - r0, d), (r0 * t + r0, 1, t), (r0 * d, d, 1)),
            };
            // SAFETY: every index of the (r1 − r0) × k block of A and the k × n block of B
            // lies inside this batch's x and y (T × D or T × T, row-major); the task writes
            // rows r0..r1 of batch i of `out` only, which no other task writes.
            unsafe {
                gemm::gemm(
                    r1 - r0,
                    n,
                    k,
                    ptr.get().add((i * t + r0) * out_cols),
                    1,
                    out_cols as isize,
                    false,
                    x.as_ptr().add(a.0),
                    a.2 as isize,
                    a.1 as isize,
                    y.as_ptr().add(b.0),
                    b.2 as isize,
                    b.1 as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                )
            }
        });
        out
    }
}

impl CustomOp2 for Causal {
    fn name(&self) -> &'static str {
        "causal-matmul"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (xd, yd) = (xl.dims(), yl.dims());
        let r = xd.len();
        let t = xd[r - 2];
        let d = yd[r - 1];
        let square = |dims: &[usize]| dims[r - 1] == dims[r - 2];
        let fits = r >= 2
            && yd.len() == r
            && xd[..r - 2] == yd[..r - 2]
            && yd[r - 2] == t
            && match self {
                Causal::Scores => xd[r - 1] == d,
                Causal::Mix | Causal::MixT => square(xd),
            };
        if !fits {
            candle_core::bail!(
                "causal matmul: shapes {:?} and {:?}",
                xl.shape(),
                yl.shape()
            );
        }
        let op = self.name();
        let (x, y) = (
            crate::fused::values(op, xs, xl)?,
            crate::fused::values(op, ys, yl)?,
        );
        let batch = xd[..r - 2].iter().product();
        let out = self.run(x, y, batch, t, d);
        let mut dims = xd.to_vec();
        dims[r - 1] = if matches!(self, Causal::Scores) { t } else { d };
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    /// Scores (q, k): d q = dS · k, d k = dSᵀ · q (dS is zero above the diagonal: the softmax
    /// gradient is zero where the probability is). Mix (p, v): d p = g · vᵀ on and below the
    /// diagonal (above it the softmax backward multiplies by p = 0), d v = pᵀ · g.
    fn bwd(
        &self,
        x: &Tensor,
        y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let (gx, gy) = match self {
            Causal::Scores => (
                g.apply_op2_no_bwd(y, &Causal::Mix)?,
                g.apply_op2_no_bwd(x, &Causal::MixT)?,
            ),
            Causal::Mix => (
                g.apply_op2_no_bwd(y, &Causal::Scores)?,
                x.apply_op2_no_bwd(&g, &Causal::MixT)?,
            ),
            Causal::MixT => candle_core::bail!("causal matmul: MixT is only used in backward"),
        };
        Ok((Some(gx), Some(gy)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn close(a: &Tensor, b: &Tensor) {
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-4, "differ by {d}");
    }

    /// Products and gradients agree with candle's matmul, for strided (transposed) operands,
    /// batches, and single products split across threads by rows or by columns.
    #[test]
    fn matches_candle_matmul_values_and_gradients() {
        let cpu = &Device::Cpu;
        let cases: Vec<(Vec<usize>, Vec<usize>, bool)> = vec![
            (vec![37, 19], vec![19, 70], false),
            (vec![70, 19], vec![19, 37], false),
            (vec![33, 8], vec![21, 8], true),
            (vec![2, 3, 9, 5], vec![2, 3, 9, 5], true),
            (vec![1, 1, 4, 6], vec![1, 1, 6, 3], false),
        ];
        for (sa, sb, transpose_b) in cases {
            let a =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, sa.as_slice(), cpu).unwrap()).unwrap();
            let b =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, sb.as_slice(), cpu).unwrap()).unwrap();
            let rhs = |b: &Tensor| {
                if transpose_b {
                    b.t().unwrap()
                } else {
                    b.clone()
                }
            };
            let ours = matmul(a.as_tensor(), &rhs(b.as_tensor())).unwrap();
            let theirs = a.as_tensor().matmul(&rhs(b.as_tensor())).unwrap();
            close(&ours, &theirs);
            let w = Tensor::randn(0f32, 1.0, ours.shape(), cpu).unwrap();
            let g1 = (&ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&theirs * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            close(g1.get(&a).unwrap(), g2.get(&a).unwrap());
            close(g1.get(&b).unwrap(), g2.get(&b).unwrap());
        }
    }

    /// Causal attention's products against full products of causally masked operands:
    /// values, and the gradients through a masked softmax, with a partial last block.
    #[test]
    fn causal_products_match_full_products() {
        let cpu = &Device::Cpu;
        let (b, t, d) = (3, CAUSAL_BLOCK * 2 + 22, 8);
        let mask: Vec<f32> = (0..b * t * t)
            .map(|k| if k % t > (k / t) % t { f32::MIN } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(mask, (b, 1, t, t), cpu).unwrap();
        let var =
            |s: &[usize]| Var::from_tensor(&Tensor::randn(0f32, 1.0, s, cpu).unwrap()).unwrap();
        let (q, k, v) = (var(&[b, 1, t, d]), var(&[b, 1, t, d]), var(&[b, 1, t, d]));
        let attend = |causal: bool| {
            let (q, k, v) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
            let scores = if causal {
                causal_scores(q, k).unwrap()
            } else {
                q.matmul(&k.t().unwrap()).unwrap()
            };
            let p = crate::fused::masked_softmax(&scores, &mask, 0.3).unwrap();
            if causal {
                causal_mix(&p, v).unwrap()
            } else {
                p.matmul(v).unwrap()
            }
        };
        let (ours, full) = (attend(true), attend(false));
        close(&ours, &full);
        let w = Tensor::randn(0f32, 1.0, ours.shape(), cpu).unwrap();
        let g1 = (&ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&full * &w).unwrap().sum_all().unwrap().backward().unwrap();
        for x in [&q, &k, &v] {
            close(g1.get(x).unwrap(), g2.get(x).unwrap());
        }
    }

    #[test]
    fn other_layouts_fall_back_to_candle() {
        let cpu = &Device::Cpu;
        let a = Tensor::randn(0f32, 1.0, (2, 4, 3), cpu).unwrap();
        let b = Tensor::randn(0f32, 1.0, (3, 5), cpu).unwrap();
        // Broadcast batch: not this module's case; candle's broadcast_matmul gives the answer.
        assert!(!applies(&a, &b));
        let b16 = b.to_dtype(DType::BF16).unwrap();
        assert!(!applies(&a.get(0).unwrap(), &b16));
    }
}
