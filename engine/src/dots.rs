//! The small-batch product at the heart of decoding: one weight row against a few input rows.
//! A decode step multiplies every weight by only as many rows as sequences are decoding, so
//! the weight's trip from memory is the cost; each weight value is loaded once into a register
//! and multiplied with up to eight input rows from cache. NF4 rows are expanded eight bytes at
//! a time in registers (two permutes and a blend per eight codes) and never written out.
//! Compiled for AVX2 and FMA where the CPU has them, with a plain loop elsewhere.

use loraops_model::linear::nf4::{NF4_BLOCK, NF4_CODE, Nf4Tensor};

/// Input rows multiplied together per pass over a weight row (one accumulator register each).
const GROUP: usize = 4;

/// `out[r] = w · x[r]` for every row of `x` (rows of `w.len()` values).
pub fn dense_row(w: &[f32], x: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 and FMA; lengths are checked inside.
        unsafe { x86::dense_row(w, x, out) };
        return;
    }
    let n = w.len();
    for (r, o) in out.iter_mut().enumerate() {
        *o = w
            .iter()
            .zip(&x[r * n..(r + 1) * n])
            .map(|(a, b)| a * b)
            .sum();
    }
}

/// `out[r] = W[row] · x[r]` for an NF4 weight whose rows are whole blocks; `xe` and `xo` hold
/// the input rows' even- and odd-indexed values (rows × in/2 each).
pub fn nf4_row(q: &Nf4Tensor, row: usize, xe: &[f32], xo: &[f32], out: &mut [f32]) {
    let in_f = q.shape[1];
    assert!(
        in_f.is_multiple_of(NF4_BLOCK),
        "NF4 row product: rows of whole blocks"
    );
    let half = in_f / 2;
    assert!(xe.len() >= out.len() * half && xo.len() >= out.len() * half);
    let bytes = &q.packed[row * half..(row + 1) * half];
    let first = row * in_f / NF4_BLOCK;
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 and FMA; lengths are checked above.
        unsafe { x86::nf4_row(bytes, |b| q.block_absmax(first + b), xe, xo, out) };
        return;
    }
    out.fill(0.0);
    for (b, bytes) in bytes.chunks_exact(NF4_BLOCK / 2).enumerate() {
        let m = q.block_absmax(first + b);
        for (k, &byte) in bytes.iter().enumerate() {
            let (hi, lo) = (
                NF4_CODE[(byte >> 4) as usize] * m,
                NF4_CODE[(byte & 15) as usize] * m,
            );
            let at = b * NF4_BLOCK / 2 + k;
            for (r, o) in out.iter_mut().enumerate() {
                *o += hi * xe[r * half + at] + lo * xo[r * half + at];
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{GROUP, NF4_BLOCK, NF4_CODE};

    /// Sum of the eight lanes.
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Run `f::<R>` for each group of up to [`GROUP`] rows of `out`, R known at compile time so
    /// that the accumulators live in registers: (first row, the group's outputs).
    macro_rules! by_groups {
        ($out:expr, $f:ident, $($arg:expr),*) => {
            for (g, out) in $out.chunks_mut(GROUP).enumerate() {
                let r0 = g * GROUP;
                match out.len() {
                    4 => $f::<4>(r0, out, $($arg),*),
                    3 => $f::<3>(r0, out, $($arg),*),
                    2 => $f::<2>(r0, out, $($arg),*),
                    _ => $f::<1>(r0, out, $($arg),*),
                }
            }
        };
    }

    /// # Safety
    /// AVX2 and FMA must be present.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dense_row(w: &[f32], x: &[f32], out: &mut [f32]) {
        assert!(
            x.len() >= out.len() * w.len(),
            "dense row product: input too short"
        );
        // SAFETY: AVX2 and FMA are present; x holds every row the groups read.
        unsafe { by_groups!(out, dense_group, w, x) }
    }

    /// # Safety
    /// AVX2 and FMA must be present, and x must hold rows r0 .. r0 + R of w.len() values.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn dense_group<const R: usize>(r0: usize, out: &mut [f32], w: &[f32], x: &[f32]) {
        let n = w.len();
        let full = n - n % 8;
        let mut acc = [_mm256_setzero_ps(); R];
        // SAFETY: rows r0 .. r0 + R lie inside x (the caller's contract).
        let rows: [*const f32; R] =
            std::array::from_fn(|r| unsafe { x.as_ptr().add((r0 + r) * n) });
        for k in (0..full).step_by(8) {
            // SAFETY: k + 8 <= n, inside w and inside each row.
            unsafe {
                let wv = _mm256_loadu_ps(w.as_ptr().add(k));
                for (a, row) in acc.iter_mut().zip(rows) {
                    *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(row.add(k)), *a);
                }
            }
        }
        for (r, o) in out.iter_mut().enumerate() {
            let xr = &x[(r0 + r) * n..(r0 + r + 1) * n];
            let tail: f32 = w[full..].iter().zip(&xr[full..]).map(|(a, b)| a * b).sum();
            *o = hsum(acc[r]) + tail;
        }
    }

    /// # Safety
    /// AVX2 and FMA must be present; `bytes` must be whole blocks, and `xe` / `xo` hold
    /// `out.len()` rows of one value per byte each.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn nf4_row(
        bytes: &[u8],
        absmax: impl Fn(usize) -> f32,
        xe: &[f32],
        xo: &[f32],
        out: &mut [f32],
    ) {
        // SAFETY: AVX2 and FMA are present; the caller's contract covers the rows.
        unsafe { by_groups!(out, nf4_group, bytes, &absmax, xe, xo) }
    }

    /// # Safety
    /// AVX2 and FMA must be present; `bytes` whole blocks; xe / xo hold rows r0 .. r0 + R.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn nf4_group<const R: usize>(
        r0: usize,
        out: &mut [f32],
        bytes: &[u8],
        absmax: &impl Fn(usize) -> f32,
        xe: &[f32],
        xo: &[f32],
    ) {
        let half = bytes.len();
        // SAFETY: every load reads 8 bytes of `bytes` or 8 values of a row of xe / xo inside
        // its half-row, by the caller's contract and the loop bounds.
        unsafe {
            let low = _mm256_loadu_ps(NF4_CODE.as_ptr());
            let high = _mm256_loadu_ps(NF4_CODE.as_ptr().add(8));
            let nibble = _mm256_set1_epi32(0x0f);
            let mut acc = [_mm256_setzero_ps(); R];
            let even: [*const f32; R] = std::array::from_fn(|r| xe.as_ptr().add((r0 + r) * half));
            let odd: [*const f32; R] = std::array::from_fn(|r| xo.as_ptr().add((r0 + r) * half));
            for (b, start) in (0..half).step_by(NF4_BLOCK / 2).enumerate() {
                let m = _mm256_set1_ps(absmax(b));
                for k in (start..start + NF4_BLOCK / 2).step_by(8) {
                    let v = _mm_loadl_epi64(bytes.as_ptr().add(k) as *const __m128i);
                    let w = _mm256_cvtepu8_epi32(v);
                    let hi_idx = _mm256_srli_epi32(w, 4);
                    let lo_idx = _mm256_and_si256(w, nibble);
                    // Bit 3 of an index, moved to the sign bit, picks the upper half of the book.
                    let hi = _mm256_blendv_ps(
                        _mm256_permutevar8x32_ps(low, hi_idx),
                        _mm256_permutevar8x32_ps(high, hi_idx),
                        _mm256_castsi256_ps(_mm256_slli_epi32(hi_idx, 28)),
                    );
                    let lo = _mm256_blendv_ps(
                        _mm256_permutevar8x32_ps(low, lo_idx),
                        _mm256_permutevar8x32_ps(high, lo_idx),
                        _mm256_castsi256_ps(_mm256_slli_epi32(lo_idx, 28)),
                    );
                    let (hi, lo) = (_mm256_mul_ps(hi, m), _mm256_mul_ps(lo, m));
                    for ((a, e), o) in acc.iter_mut().zip(even).zip(odd) {
                        let e = _mm256_loadu_ps(e.add(k));
                        let o = _mm256_loadu_ps(o.add(k));
                        *a = _mm256_fmadd_ps(lo, o, _mm256_fmadd_ps(hi, e, *a));
                    }
                }
            }
            for (r, o) in out.iter_mut().enumerate() {
                *o = hsum(acc[r]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn row_products_match_the_expanded_weights() {
        let (out_f, in_f, rows) = (3, 192, 11);
        let w: Vec<f32> = (0..out_f * in_f)
            .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let x: Vec<f32> = (0..rows * in_f)
            .map(|i| ((i * 13) % 29) as f32 / 14.0 - 1.0)
            .collect();
        let q = Nf4Tensor::quantize(
            &Tensor::from_vec(w.clone(), (out_f, in_f), &Device::Cpu).unwrap(),
            true,
        )
        .unwrap();
        let wq = q.dequantize_vec();
        let (xe, xo): (Vec<f32>, Vec<f32>) = x.chunks_exact(2).map(|p| (p[0], p[1])).unzip();
        for o in 0..out_f {
            let mut dense = vec![0f32; rows];
            dense_row(&w[o * in_f..(o + 1) * in_f], &x, &mut dense);
            let mut nf4 = vec![0f32; rows];
            nf4_row(&q, o, &xe, &xo, &mut nf4);
            for r in 0..rows {
                let xr = &x[r * in_f..(r + 1) * in_f];
                let want: f32 = w[o * in_f..(o + 1) * in_f]
                    .iter()
                    .zip(xr)
                    .map(|(a, b)| a * b)
                    .sum();
                let want_q: f32 = wq[o * in_f..(o + 1) * in_f]
                    .iter()
                    .zip(xr)
                    .map(|(a, b)| a * b)
                    .sum();
                assert!((dense[r] - want).abs() < 1e-4, "dense {o},{r}");
                assert!((nf4[r] - want_q).abs() < 1e-4, "nf4 {o},{r}");
            }
        }
    }
}
