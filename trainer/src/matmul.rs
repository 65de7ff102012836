//! f32 matrix products on the CPU, on candle's own kernels (the `gemm` crate) called directly,
//! for what candle's matmul does not do:
//! - accumulate into an existing output (`c = β·c + α·a·b`), which lets the fused LoRA linear
//!   add the adapter's product into the base's output and both paths' gradients into one
//!   buffer;
//! - skip the blocks of causal attention above the diagonal ([`causal_scores`],
//!   [`causal_mix`]): masked scores and zero probabilities, 37.5% of attention's products
//!   at 256 tokens and approaching half for long sequences. Each (head, block) product is one
//!   task: candle runs the per-head products one after another, each split across the
//!   threads, which took twice as long (2 × 8 heads of 256×64 · 64×256 on 2 threads: 1.6–1.9
//!   ms against 0.8–1.0 ms).
//!
//! Operands are row-major buffers read as they are or transposed, through their strides.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

/// How a row-major matrix is read: its row and column strides.
#[derive(Clone, Copy)]
pub(crate) struct Operand {
    row: usize,
    col: usize,
}

impl Operand {
    /// A row-major matrix with `cols` columns, as it is.
    pub(crate) fn rows(cols: usize) -> Self {
        Self { row: cols, col: 1 }
    }

    /// A row-major matrix with `cols` columns, read as its transpose.
    pub(crate) fn transposed(cols: usize) -> Self {
        Self { row: 1, col: cols }
    }
}

/// `a · b` ((m × k)·(k × n)) into a fresh row-major buffer.
pub(crate) fn sgemm(
    mkn: (usize, usize, usize),
    a: (&[f32], Operand),
    b: (&[f32], Operand),
) -> Vec<f32> {
    let mut c = vec![0f32; mkn.0 * mkn.2];
    sgemm_into(&mut c, 0.0, 1.0, mkn, a, b);
    c
}

/// `c = beta · c + alpha · a · b` ((m × k)·(k × n)), `c` row-major, split across the threads.
pub(crate) fn sgemm_into(
    c: &mut [f32],
    beta: f32,
    alpha: f32,
    (m, k, n): (usize, usize, usize),
    (a, al): (&[f32], Operand),
    (b, bl): (&[f32], Operand),
) {
    assert_eq!(c.len(), m * n, "sgemm: output size");
    assert!(
        m == 0 || k == 0 || a.len() > (m - 1) * al.row + (k - 1) * al.col,
        "sgemm: a is too short"
    );
    assert!(
        k == 0 || n == 0 || b.len() > (k - 1) * bl.row + (n - 1) * bl.col,
        "sgemm: b is too short"
    );
    let threads = gemm::Parallelism::Rayon(rayon::current_num_threads());
    // SAFETY: the asserts above keep every strided index of a and b in bounds, and c holds
    // the m · n values written.
    unsafe {
        gemm_raw(
            c.as_mut_ptr(),
            n,
            (beta, alpha),
            (m, k, n),
            (a.as_ptr(), al),
            (b.as_ptr(), bl),
            threads,
        )
    }
}

/// One gemm call: `c = beta · c + alpha · a · b`, `c` with rows `c_row` apart.
///
/// # Safety
/// Every (i < m, p < k) of `a`, (p < k, j < n) of `b` and (i < m, j < n) of `c` at the given
/// strides must be in bounds, and no one else may access that part of `c` meanwhile.
unsafe fn gemm_raw(
    c: *mut f32,
    c_row: usize,
    (beta, alpha): (f32, f32),
    (m, k, n): (usize, usize, usize),
    (a, al): (*const f32, Operand),
    (b, bl): (*const f32, Operand),
    parallelism: gemm::Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for i in 0..m {
            for j in 0..n {
                // SAFETY: in bounds by the contract.
                let v = unsafe { &mut *c.add(i * c_row + j) };
                *v = if beta == 0.0 { 0.0 } else { beta * *v };
            }
        }
        return;
    }
    // SAFETY: in bounds by the contract; gemm's own naming is dst = alpha · dst + beta · lhs ·
    // rhs, and it reads dst only when told to.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            c_row as isize,
            beta != 0.0,
            a,
            al.col as isize,
            al.row as isize,
            b,
            bl.col as isize,
            bl.row as isize,
            beta,
            alpha,
            false,
            false,
            false,
            parallelism,
        )
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
        (rows, in_f, out_f),
        (x, Operand::rows(in_f)),
        (w, Operand::transposed(in_f)),
    )
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
            // (k, n), then A's and B's start, row stride and column stride.
            let ((k, n), a, b) = match self {
                Causal::Scores => ((d, r1), (r0 * d, d, 1), (0, 1, d)),
                Causal::Mix => ((r1, d), (r0 * t, t, 1), (0, d, 1)),
                Causal::MixT => ((t - r0, d), (r0 * t + r0, 1, t), (r0 * d, d, 1)),
            };
            let operand = |(start, row, col): (usize, usize, usize), of: &[f32]| {
                (of[start..].as_ptr(), Operand { row, col })
            };
            // SAFETY: every index of the (r1 − r0) × k block of A and the k × n block of B
            // lies inside this batch's x and y (T × D or T × T, row-major); the task writes
            // rows r0..r1 of batch i of `out` only, which no other task writes.
            unsafe {
                gemm_raw(
                    ptr.get().add((i * t + r0) * out_cols),
                    out_cols,
                    (0.0, 1.0),
                    (r1 - r0, k, n),
                    operand(a, x),
                    operand(b, y),
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
        let d = crate::fused::max_abs_diff(a, b);
        assert!(d < 1e-4, "differ by {d}");
    }

    /// Transposed reads and accumulation agree with candle's matmul.
    #[test]
    fn sgemm_into_accumulates_transposed_products() {
        let cpu = &Device::Cpu;
        let (m, k, n) = (37, 19, 70);
        let a = Tensor::randn(0f32, 1.0, (m, k), cpu).unwrap();
        let bt = Tensor::randn(0f32, 1.0, (n, k), cpu).unwrap();
        let c0 = Tensor::randn(0f32, 1.0, (m, n), cpu).unwrap();
        let mut c = c0.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (av, bv) = (
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            bt.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        sgemm_into(
            &mut c,
            0.5,
            2.0,
            (m, k, n),
            (&av, Operand::rows(k)),
            (&bv, Operand::transposed(k)),
        );
        let ours = Tensor::from_vec(c, (m, n), cpu).unwrap();
        let theirs =
            ((c0 * 0.5).unwrap() + (a.matmul(&bt.t().unwrap()).unwrap() * 2.0).unwrap()).unwrap();
        close(&ours, &theirs);
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
}
