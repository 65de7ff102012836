//! f32 matrix products on the CPU, on candle's own kernels (the `gemm` crate) called directly.
//!
//! Matrix products are most of a training step. Two things candle's matmul does not do:
//! - accumulate into an existing output (`c = β·c + α·a·b`), which lets the fused LoRA linear
//!   add the adapter's product into the base's output and both paths' gradients into one
//!   buffer;
//! - run a batch of small products one per thread: candle runs attention's per-head products
//!   one after another, each split across the threads, which took twice as long (2 × 8 heads of
//!   256×64 · 64×256 on 2 threads: 1.6–1.9 ms against 0.8–1.0 ms).
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
