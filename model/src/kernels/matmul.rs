//! f32 matrix products on the CPU, on candle's own kernels (the `gemm` crate) called directly,
//! for what candle's matmul does not do: accumulate into an existing output (`c = β·c +
//! α·a·b`), which lets the fused LoRA linear add the adapter's product into the base's output
//! and its gradient; run on one thread, for tasks that each own a block of rows (the LoRA
//! linear's narrow products, causal attention); and write strided blocks of a shared buffer.
//!
//! Operands are row-major buffers read as they are or transposed, through their strides.

/// How a row-major matrix is read: its row and column strides.
#[derive(Clone, Copy)]
pub struct Operand {
    row: usize,
    col: usize,
}

impl Operand {
    /// A row-major matrix with `cols` columns, as it is.
    pub fn rows(cols: usize) -> Self {
        Self { row: cols, col: 1 }
    }

    /// A row-major matrix with `cols` columns, read as its transpose.
    pub fn transposed(cols: usize) -> Self {
        Self { row: 1, col: cols }
    }
}

/// `a · b` ((m × k)·(k × n)) into a fresh row-major buffer, split across the threads. The
/// buffer is not zeroed first: gemm writes every value without reading it (zeroing the
/// outputs of a step's products took the calling thread milliseconds while the pool waited).
pub fn sgemm(
    (m, k, n): (usize, usize, usize),
    a: (&[f32], Operand),
    b: (&[f32], Operand),
) -> Vec<f32> {
    check_operands((m, k, n), a, b);
    let mut c = Vec::with_capacity(m * n);
    let threads = gemm::Parallelism::Rayon(rayon::current_num_threads());
    // SAFETY: a and b are checked above; c's capacity holds the m · n values, which gemm
    // (with beta 0, through a raw pointer) writes without reading, so all are set when the
    // length is.
    unsafe {
        gemm_raw(
            c.as_mut_ptr(),
            n,
            (0.0, 1.0),
            (m, k, n),
            (a.0.as_ptr(), a.1),
            (b.0.as_ptr(), b.1),
            threads,
        );
        c.set_len(m * n);
    }
    c
}

/// `c = beta · c + alpha · a · b` ((m × k)·(k × n)), `c` row-major, on this thread only: for
/// tasks that each own a block of rows.
pub fn sgemm_serial(
    c: &mut [f32],
    beta: f32,
    alpha: f32,
    (m, k, n): (usize, usize, usize),
    (a, al): (&[f32], Operand),
    (b, bl): (&[f32], Operand),
) {
    assert_eq!(c.len(), m * n, "sgemm: output size");
    check_operands((m, k, n), (a, al), (b, bl));
    // SAFETY: `check_operands` keeps every strided index of a and b in bounds, and c holds
    // the m · n values written.
    unsafe {
        gemm_raw(
            c.as_mut_ptr(),
            n,
            (beta, alpha),
            (m, k, n),
            (a.as_ptr(), al),
            (b.as_ptr(), bl),
            gemm::Parallelism::None,
        )
    }
}

/// `c = beta · c + a · b` ((m × k)·(k × n)) on this thread, `c` given as a pointer and its row
/// stride: for tasks that each write their own block of a shared buffer.
///
/// # Safety
/// The m × n block of `c` at that stride must be valid for writes, and no one else may access
/// it meanwhile.
pub unsafe fn gemm_block(
    (c, c_row): (*mut f32, usize),
    beta: f32,
    (m, k, n): (usize, usize, usize),
    (a, al): (&[f32], Operand),
    (b, bl): (&[f32], Operand),
) {
    check_operands((m, k, n), (a, al), (b, bl));
    // SAFETY: a and b are checked above, c by the caller.
    unsafe {
        gemm_raw(
            c,
            c_row,
            (beta, 1.0),
            (m, k, n),
            (a.as_ptr(), al),
            (b.as_ptr(), bl),
            gemm::Parallelism::None,
        )
    }
}

/// Panics unless every (i < m, p < k) of `a` and (p < k, j < n) of `b` at their strides is in
/// bounds.
fn check_operands(
    (m, k, n): (usize, usize, usize),
    (a, al): (&[f32], Operand),
    (b, bl): (&[f32], Operand),
) {
    assert!(
        m == 0 || k == 0 || a.len() > (m - 1) * al.row + (k - 1) * al.col,
        "sgemm: a is too short"
    );
    assert!(
        k == 0 || n == 0 || b.len() > (k - 1) * bl.row + (n - 1) * bl.col,
        "sgemm: b is too short"
    );
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
                // SAFETY: in bounds by the contract; with beta 0, c is written, never read.
                unsafe {
                    let v = c.add(i * c_row + j);
                    v.write(if beta == 0.0 { 0.0 } else { beta * v.read() });
                }
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

/// An output buffer, shared by the tasks that write its disjoint blocks.
#[derive(Clone, Copy)]
pub struct SendPtr(pub *mut f32);
// SAFETY: tasks write disjoint blocks only, and the buffer outlives them (rayon joins).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    pub fn get(self) -> *mut f32 {
        self.0
    }

    /// `len` values from index `at`.
    ///
    /// # Safety
    /// They must lie inside the buffer, and no one else may access them while the slice lives.
    pub unsafe fn slice<'a>(self, at: usize, len: usize) -> &'a mut [f32] {
        // SAFETY: by the contract.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(at), len) }
    }
}

/// `x (rows × in) · W (out × in)ᵀ` for the frozen linears: both row-major, W read transposed.
pub fn linear(x: &[f32], w: &[f32], rows: usize, in_f: usize, out_f: usize) -> Vec<f32> {
    sgemm(
        (rows, in_f, out_f),
        (x, Operand::rows(in_f)),
        (w, Operand::transposed(in_f)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn close(a: &Tensor, b: &Tensor) {
        let d = crate::kernels::fused::max_abs_diff(a, b);
        assert!(d < 1e-4, "differ by {d}");
    }

    /// Transposed reads, fresh outputs and accumulation agree with candle's matmul.
    #[test]
    fn products_match_candle() {
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
        let (a_rows, b_cols) = (
            (&av[..], Operand::rows(k)),
            (&bv[..], Operand::transposed(k)),
        );
        sgemm_serial(&mut c, 0.5, 2.0, (m, k, n), a_rows, b_cols);
        let product = a.matmul(&bt.t().unwrap()).unwrap();
        let ours = Tensor::from_vec(c, (m, n), cpu).unwrap();
        let theirs = ((c0 * 0.5).unwrap() + (&product * 2.0).unwrap()).unwrap();
        close(&ours, &theirs);
        let fresh = sgemm((m, k, n), a_rows, b_cols);
        close(&Tensor::from_vec(fresh, (m, n), cpu).unwrap(), &product);
    }
}
