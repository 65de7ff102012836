//! The small-batch product at the heart of decoding: one weight row against a few input rows.
//! A decode step multiplies every weight by only as many rows as sequences are decoding, so
//! the weight's trip from memory is the cost; each weight value is loaded once into a register
//! and multiplied with up to four input rows from cache. Each 64 values are summed apart and
//! then added, so that a row's product is not one chain of dependent FMAs.
//!
//! NF4 rows are expanded in registers and never written out, 32 bytes (a block) at a time: the
//! four bytes of each code book value's f32 bits are looked up by `vpshufb` (a 16-entry table,
//! one nibble per byte) and interleaved into f32s, exactly the book's values; the block's
//! absmax scales its sum once. The input is put in the order the interleaving yields
//! ([`nf4_layout`]), once per product. Compiled for AVX2 and FMA where the CPU has them, with
//! a plain loop elsewhere.

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

/// `out[r] = w0 · x[r]` and `out[rows + r] = w1 · x[r]` (rows of `w0.len()` values): two weight
/// rows at once, so that each input value loaded is used twice. With many rows, the input is
/// read from the L2 cache, and one load per FMA would bound the product at half the FMA rate.
pub fn dense_pair(w0: &[f32], w1: &[f32], x: &[f32], out: &mut [f32]) {
    assert_eq!(w0.len(), w1.len(), "dense pair product: rows of one length");
    let rows = out.len() / 2;
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 and FMA; lengths are checked inside.
        unsafe { x86::dense_pair(w0, w1, x, out) };
        return;
    }
    let (o0, o1) = out.split_at_mut(rows);
    dense_row(w0, x, o0);
    dense_row(w1, x, o1);
}

/// `out[o * rows + r] = w[o] · x[r]` for every row `o` of `w` (`out.len() / rows` rows) and
/// every row `r` of `x`: one task's block of a small-batch product, each weight row read from
/// memory once. With AVX-512 and several input rows, four weight rows go against six input
/// rows at a time (24 accumulators): each input value loaded is used four times, not two,
/// which halves the input's traffic from L2, the bound of the pair kernel at 32 rows.
pub fn dense_rows(w: &[f32], x: &[f32], rows: usize, out: &mut [f32]) {
    let n = x.len() / rows;
    assert_eq!(w.len() / n * rows, out.len(), "dense rows product: shapes");
    #[cfg(target_arch = "x86_64")]
    if rows > 1 && avx512() {
        // SAFETY: the CPU has AVX-512F; the shapes were checked above.
        unsafe { x86::dense_rows(w, x, n, rows, out) };
        return;
    }
    // One row alone: the single-row kernel, whose partial sums hide FMA latency.
    let step = if rows > 1 { 2 } else { 1 };
    for (i, o) in out.chunks_mut(step * rows).enumerate() {
        let w0 = &w[i * step * n..(i * step + 1) * n];
        if o.len() == 2 * rows {
            dense_pair(w0, &w[(i * step + 1) * n..(i * step + 2) * n], x, o);
        } else {
            dense_row(w0, x, o);
        }
    }
}

/// Start bringing `v` into the caches, a line at a time, for a product that reads it soon:
/// a second stream from memory while the current one is being multiplied.
pub fn prefetch(v: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in v.chunks(16) {
        // SAFETY: a prefetch is a hint; it never faults and changes no program state.
        #[allow(unused_unsafe)]
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                line.as_ptr().cast(),
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = v;
}

// The kernels read a block as one 32-byte load and order its input by NF4_ORDER.
const _: () = assert!(NF4_BLOCK == 64);

/// Where each value of an NF4 block's input sits in [`nf4_layout`]: the block's 32 bytes are
/// expanded in the order the AVX2 kernel's in-lane unpacks produce (positions 0-3 and 16-19,
/// then 4-7 and 20-23, ...), so the input is put in that order once per product instead of
/// the weights being put back in order for every row.
const NF4_ORDER: [usize; 32] = {
    let mut order = [0; 32];
    let mut t = 0;
    while t < 32 {
        // Quarter q of 8 outputs: positions 4q..4q+4 of the low lane, then of the high lane.
        let (q, i) = (t / 8, t % 8);
        order[t] = if i < 4 { 4 * q + i } else { 16 + 4 * q + i - 4 };
        t += 1;
    }
    order
};

/// Input rows (of `in_f` values, whole NF4 blocks) in the order [`nf4_row`] reads them: per
/// block of 64, the values that meet high nibbles (even indices) in [`NF4_ORDER`], then those
/// that meet low nibbles (odd indices).
pub fn nf4_layout(x: &[f32], in_f: usize) -> Vec<f32> {
    assert!(
        in_f.is_multiple_of(NF4_BLOCK),
        "NF4 row product: rows of whole blocks"
    );
    let mut out = vec![0f32; x.len()];
    for (src, dst) in x
        .chunks_exact(NF4_BLOCK)
        .zip(out.chunks_exact_mut(NF4_BLOCK))
    {
        for (t, &p) in NF4_ORDER.iter().enumerate() {
            dst[t] = src[2 * p];
            dst[32 + t] = src[2 * p + 1];
        }
    }
    out
}

/// `out[r] = W[row] · x[r]` for an NF4 weight whose rows are whole blocks; `xp` holds the
/// input rows as [`nf4_layout`] orders them.
pub fn nf4_row(q: &Nf4Tensor, row: usize, xp: &[f32], out: &mut [f32]) {
    let in_f = q.shape[1];
    assert!(
        in_f.is_multiple_of(NF4_BLOCK),
        "NF4 row product: rows of whole blocks"
    );
    assert!(
        xp.len() >= out.len() * in_f,
        "NF4 row product: input too short"
    );
    let bytes = &q.packed[row * in_f / 2..(row + 1) * in_f / 2];
    let first = row * in_f / NF4_BLOCK;
    let absmax = |b| q.block_absmax(first + b);
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 and FMA; lengths are checked above.
        unsafe { x86::nf4_row(bytes, absmax, xp, out) };
        return;
    }
    nf4_row_plain(bytes, absmax, xp, out);
}

/// The portable NF4 row product (and the reference the AVX2 kernel is tested against).
fn nf4_row_plain(bytes: &[u8], absmax: impl Fn(usize) -> f32, xp: &[f32], out: &mut [f32]) {
    let in_f = 2 * bytes.len();
    for (r, o) in out.iter_mut().enumerate() {
        let x = &xp[r * in_f..(r + 1) * in_f];
        *o = 0.0;
        for (b, (bytes, x)) in bytes
            .chunks_exact(NF4_BLOCK / 2)
            .zip(x.chunks_exact(NF4_BLOCK))
            .enumerate()
        {
            let mut sum = 0.0;
            for (t, &p) in NF4_ORDER.iter().enumerate() {
                let byte = bytes[p];
                sum += NF4_CODE[(byte >> 4) as usize] * x[t]
                    + NF4_CODE[(byte & 15) as usize] * x[32 + t];
            }
            *o += sum * absmax(b);
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

#[cfg(target_arch = "x86_64")]
fn avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{GROUP, NF4_BLOCK, NF4_CODE};

    /// Values of a dense row summed into one partial sum (a block of NF4's length).
    const SPAN: usize = 64;

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
        let blocks = n - n % SPAN;
        let full = n - n % 8;
        let mut acc = [_mm256_setzero_ps(); R];
        // SAFETY: rows r0 .. r0 + R lie inside x (the caller's contract).
        let rows: [*const f32; R] =
            std::array::from_fn(|r| unsafe { x.as_ptr().add((r0 + r) * n) });
        // A span's products go into a fresh partial sum, added to the row's total once: the
        // only dependency from one span to the next is that add, so spans overlap in the
        // core instead of waiting on one FMA chain (latency bound: half the speed).
        for k0 in (0..blocks).step_by(SPAN) {
            // SAFETY: k0 + SPAN <= n, inside w and inside each row.
            unsafe {
                let mut part = [_mm256_setzero_ps(); R];
                for k in (k0..k0 + SPAN).step_by(8) {
                    let wv = _mm256_loadu_ps(w.as_ptr().add(k));
                    for (p, row) in part.iter_mut().zip(rows) {
                        *p = _mm256_fmadd_ps(wv, _mm256_loadu_ps(row.add(k)), *p);
                    }
                }
                for (a, p) in acc.iter_mut().zip(part) {
                    *a = _mm256_add_ps(*a, p);
                }
            }
        }
        for k in (blocks..full).step_by(8) {
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

    /// Weight rows and input rows of one AVX-512 block.
    const BLOCK_W: usize = 4;
    const BLOCK_X: usize = 6;

    /// # Safety
    /// AVX-512F must be present; `w` holds `out.len() / rows` rows and `x` `rows` rows of `n`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dense_rows(w: &[f32], x: &[f32], n: usize, rows: usize, out: &mut [f32]) {
        let out_rows = out.len() / rows;
        let mut o = 0;
        while o < out_rows {
            let width = if out_rows - o >= BLOCK_W { BLOCK_W } else { 1 };
            let mut r = 0;
            while r < rows {
                let height = (rows - r).min(BLOCK_X);
                // SAFETY: AVX-512F is present; rows o .. o + width of w and r .. r + height
                // of x exist (the caller's contract).
                unsafe {
                    match (width, height) {
                        (BLOCK_W, 6) => block::<BLOCK_W, 6>(w, x, n, rows, o, r, out),
                        (BLOCK_W, 5) => block::<BLOCK_W, 5>(w, x, n, rows, o, r, out),
                        (BLOCK_W, 4) => block::<BLOCK_W, 4>(w, x, n, rows, o, r, out),
                        (BLOCK_W, 3) => block::<BLOCK_W, 3>(w, x, n, rows, o, r, out),
                        (BLOCK_W, 2) => block::<BLOCK_W, 2>(w, x, n, rows, o, r, out),
                        (BLOCK_W, _) => block::<BLOCK_W, 1>(w, x, n, rows, o, r, out),
                        (_, 6) => block::<1, 6>(w, x, n, rows, o, r, out),
                        (_, 5) => block::<1, 5>(w, x, n, rows, o, r, out),
                        (_, 4) => block::<1, 4>(w, x, n, rows, o, r, out),
                        (_, 3) => block::<1, 3>(w, x, n, rows, o, r, out),
                        (_, 2) => block::<1, 2>(w, x, n, rows, o, r, out),
                        (_, _) => block::<1, 1>(w, x, n, rows, o, r, out),
                    }
                }
                r += height;
            }
            o += width;
        }
    }

    /// Weight rows o0 .. o0 + W against input rows r0 .. r0 + R, W × R accumulators; the
    /// last partial 16 values by masked loads.
    ///
    /// # Safety
    /// AVX-512F must be present; those rows must lie inside `w` and `x`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<const W: usize, const R: usize>(
        w: &[f32],
        x: &[f32],
        n: usize,
        rows: usize,
        o0: usize,
        r0: usize,
        out: &mut [f32],
    ) {
        assert!((o0 + W) * n <= w.len() && (r0 + R) * n <= x.len());
        // SAFETY: inside w and x, checked above.
        let wp: [*const f32; W] = std::array::from_fn(|i| unsafe { w.as_ptr().add((o0 + i) * n) });
        let xp: [*const f32; R] = std::array::from_fn(|r| unsafe { x.as_ptr().add((r0 + r) * n) });
        let mut acc = [[_mm512_setzero_ps(); R]; W];
        let full = n - n % 16;
        let mut wv = [_mm512_setzero_ps(); W];
        for k in (0..full).step_by(16) {
            // SAFETY: k + 16 <= n: inside every row.
            unsafe {
                for i in 0..W {
                    wv[i] = _mm512_loadu_ps(wp[i].add(k));
                }
                for r in 0..R {
                    let xv = _mm512_loadu_ps(xp[r].add(k));
                    for i in 0..W {
                        acc[i][r] = _mm512_fmadd_ps(wv[i], xv, acc[i][r]);
                    }
                }
            }
        }
        if full < n {
            let m: __mmask16 = (1u16 << (n - full)) - 1;
            // SAFETY: the mask loads only the n - full values left in each row.
            unsafe {
                for i in 0..W {
                    wv[i] = _mm512_maskz_loadu_ps(m, wp[i].add(full));
                }
                for r in 0..R {
                    let xv = _mm512_maskz_loadu_ps(m, xp[r].add(full));
                    for i in 0..W {
                        acc[i][r] = _mm512_fmadd_ps(wv[i], xv, acc[i][r]);
                    }
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            for (r, a) in acc.iter().enumerate() {
                out[(o0 + i) * rows + r0 + r] = _mm512_reduce_add_ps(*a);
            }
        }
    }

    /// # Safety
    /// AVX2 and FMA must be present.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dense_pair(w0: &[f32], w1: &[f32], x: &[f32], out: &mut [f32]) {
        let rows = out.len() / 2;
        assert!(
            x.len() >= rows * w0.len(),
            "dense pair product: input too short"
        );
        let (o0, o1) = out.split_at_mut(rows);
        for (g, (a, b)) in o0.chunks_mut(GROUP).zip(o1.chunks_mut(GROUP)).enumerate() {
            let r0 = g * GROUP;
            // SAFETY: AVX2 and FMA are present; x holds every row the groups read.
            unsafe {
                match a.len() {
                    4 => dense_pair_group::<4>(r0, a, b, w0, w1, x),
                    3 => dense_pair_group::<3>(r0, a, b, w0, w1, x),
                    2 => dense_pair_group::<2>(r0, a, b, w0, w1, x),
                    _ => dense_pair_group::<1>(r0, a, b, w0, w1, x),
                }
            }
        }
    }

    /// # Safety
    /// AVX2 and FMA must be present, and x must hold rows r0 .. r0 + R of w0.len() values.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn dense_pair_group<const R: usize>(
        r0: usize,
        out0: &mut [f32],
        out1: &mut [f32],
        w0: &[f32],
        w1: &[f32],
        x: &[f32],
    ) {
        let n = w0.len();
        let full = n - n % 8;
        let (mut acc0, mut acc1) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
        // SAFETY: rows r0 .. r0 + R lie inside x (the caller's contract).
        let rows: [*const f32; R] =
            std::array::from_fn(|r| unsafe { x.as_ptr().add((r0 + r) * n) });
        for k in (0..full).step_by(8) {
            // SAFETY: k + 8 <= n, inside both weight rows and inside each input row.
            unsafe {
                let a = _mm256_loadu_ps(w0.as_ptr().add(k));
                let b = _mm256_loadu_ps(w1.as_ptr().add(k));
                for r in 0..R {
                    let xv = _mm256_loadu_ps(rows[r].add(k));
                    acc0[r] = _mm256_fmadd_ps(a, xv, acc0[r]);
                    acc1[r] = _mm256_fmadd_ps(b, xv, acc1[r]);
                }
            }
        }
        for r in 0..R {
            let xr = &x[(r0 + r) * n + full..(r0 + r + 1) * n];
            let tail = |w: &[f32]| -> f32 { w[full..].iter().zip(xr).map(|(a, b)| a * b).sum() };
            out0[r] = hsum(acc0[r]) + tail(w0);
            out1[r] = hsum(acc1[r]) + tail(w1);
        }
    }

    /// # Safety
    /// AVX2 and FMA must be present; `bytes` must be whole blocks, and `xp` hold `out.len()`
    /// rows of `2 * bytes.len()` values in `nf4_layout`'s order.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn nf4_row(
        bytes: &[u8],
        absmax: impl Fn(usize) -> f32,
        xp: &[f32],
        out: &mut [f32],
    ) {
        // SAFETY: AVX2 and FMA are present; the caller's contract covers the rows.
        unsafe { by_groups!(out, nf4_group, bytes, &absmax, xp) }
    }

    /// Byte `j` of each code book value's f32 bits, in both 128-bit lanes: `vpshufb` looks up
    /// sixteen entries by the low four bits of each byte, which is exactly a nibble.
    #[target_feature(enable = "avx2")]
    fn book_bytes(j: usize) -> __m256i {
        let bytes: [u8; 16] = std::array::from_fn(|i| (NF4_CODE[i].to_bits() >> (8 * j)) as u8);
        // SAFETY: 16 bytes are read from a 16-byte array.
        _mm256_broadcastsi128_si256(unsafe { _mm_loadu_si128(bytes.as_ptr() as *const __m128i) })
    }

    /// The code book values of 32 nibbles (one per byte of `idx`), as four vectors of f32 in
    /// the order of `NF4_ORDER`: four byte lookups, interleaved into words and then dwords.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn expand(idx: __m256i, book: &[__m256i; 4]) -> [__m256; 4] {
        let [b0, b1, b2, b3] = book.map(|t| _mm256_shuffle_epi8(t, idx));
        let (l01, h01) = (_mm256_unpacklo_epi8(b0, b1), _mm256_unpackhi_epi8(b0, b1));
        let (l23, h23) = (_mm256_unpacklo_epi8(b2, b3), _mm256_unpackhi_epi8(b2, b3));
        [
            _mm256_castsi256_ps(_mm256_unpacklo_epi16(l01, l23)),
            _mm256_castsi256_ps(_mm256_unpackhi_epi16(l01, l23)),
            _mm256_castsi256_ps(_mm256_unpacklo_epi16(h01, h23)),
            _mm256_castsi256_ps(_mm256_unpackhi_epi16(h01, h23)),
        ]
    }

    /// # Safety
    /// AVX2 and FMA must be present; `bytes` whole blocks; xp holds rows r0 .. r0 + R.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn nf4_group<const R: usize>(
        r0: usize,
        out: &mut [f32],
        bytes: &[u8],
        absmax: &impl Fn(usize) -> f32,
        xp: &[f32],
    ) {
        let in_f = 2 * bytes.len();
        let book = [book_bytes(0), book_bytes(1), book_bytes(2), book_bytes(3)];
        let nibble = _mm256_set1_epi8(0x0f);
        let mut acc = [_mm256_setzero_ps(); R];
        // SAFETY: rows r0 .. r0 + R of xp lie inside it (the caller's contract); every load
        // below reads 32 bytes of a block of `bytes`, or 8 values of a block of a row.
        unsafe {
            let rows: [*const f32; R] = std::array::from_fn(|r| xp.as_ptr().add((r0 + r) * in_f));
            for b in 0..bytes.len() / (NF4_BLOCK / 2) {
                let v = _mm256_loadu_si256(bytes.as_ptr().add(b * NF4_BLOCK / 2) as *const __m256i);
                let hi = expand(_mm256_and_si256(_mm256_srli_epi16(v, 4), nibble), &book);
                let lo = expand(_mm256_and_si256(v, nibble), &book);
                let m = _mm256_set1_ps(absmax(b));
                for (a, row) in acc.iter_mut().zip(rows) {
                    let x = row.add(b * NF4_BLOCK);
                    let ld = |i: usize| _mm256_loadu_ps(x.add(8 * i));
                    // Two chains, so the eight products don't wait on one another.
                    let mut p0 = _mm256_mul_ps(hi[0], ld(0));
                    let mut p1 = _mm256_mul_ps(hi[1], ld(1));
                    p0 = _mm256_fmadd_ps(hi[2], ld(2), p0);
                    p1 = _mm256_fmadd_ps(hi[3], ld(3), p1);
                    p0 = _mm256_fmadd_ps(lo[0], ld(4), p0);
                    p1 = _mm256_fmadd_ps(lo[1], ld(5), p1);
                    p0 = _mm256_fmadd_ps(lo[2], ld(6), p0);
                    p1 = _mm256_fmadd_ps(lo[3], ld(7), p1);
                    // The block's absmax scales its sum once.
                    *a = _mm256_fmadd_ps(_mm256_add_ps(p0, p1), m, *a);
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
    fn dense_rows_and_pairs_of_any_width_match_the_plain_sum() {
        for n in [5, 8, 64, 72, 203] {
            let rows = 5;
            let w: Vec<f32> = (0..n).map(|i| ((i * 7) % 13) as f32 / 6.0 - 1.0).collect();
            let x: Vec<f32> = (0..rows * n)
                .map(|i| ((i * 5) % 11) as f32 / 5.0 - 1.0)
                .collect();
            let w1: Vec<f32> = w.iter().map(|v| 0.5 - v).collect();
            let mut out = vec![0f32; rows];
            dense_row(&w, &x, &mut out);
            let mut pair = vec![0f32; 2 * rows];
            dense_pair(&w, &w1, &x, &mut pair);
            for r in 0..rows {
                let dot =
                    |w: &[f32]| -> f32 { w.iter().zip(&x[r * n..]).map(|(a, b)| a * b).sum() };
                let (want, want1) = (dot(&w), dot(&w1));
                assert!((out[r] - want).abs() < 1e-4, "width {n}, row {r}");
                assert!((pair[r] - want).abs() < 1e-4, "pair, width {n}, row {r}");
                assert!(
                    (pair[rows + r] - want1).abs() < 1e-4,
                    "pair, width {n}, row {r}"
                );
            }
        }
    }

    #[test]
    fn blocks_of_rows_of_any_shape_match_the_plain_sum() {
        for (out_f, rows, n) in [
            (16, 32, 768),
            (7, 13, 203),
            (5, 2, 16),
            (1, 7, 9),
            (9, 1, 40),
        ] {
            let w: Vec<f32> = (0..out_f * n)
                .map(|i| ((i * 7) % 13) as f32 / 6.0 - 1.0)
                .collect();
            let x: Vec<f32> = (0..rows * n)
                .map(|i| ((i * 5) % 11) as f32 / 5.0 - 1.0)
                .collect();
            let mut out = vec![0f32; out_f * rows];
            dense_rows(&w, &x, rows, &mut out);
            for o in 0..out_f {
                for r in 0..rows {
                    let want: f32 = w[o * n..(o + 1) * n]
                        .iter()
                        .zip(&x[r * n..(r + 1) * n])
                        .map(|(a, b)| a * b)
                        .sum();
                    let got = out[o * rows + r];
                    assert!(
                        (got - want).abs() < 1e-3 * want.abs().max(1.0),
                        "{out_f}x{rows}x{n}: ({o},{r}) {got} vs {want}"
                    );
                }
            }
        }
    }

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
        let xp = nf4_layout(&x, in_f);
        for o in 0..out_f {
            let mut dense = vec![0f32; rows];
            dense_row(&w[o * in_f..(o + 1) * in_f], &x, &mut dense);
            let mut nf4 = vec![0f32; rows];
            nf4_row(&q, o, &xp, &mut nf4);
            // The portable loop too, where the AVX2 kernel is the one chosen.
            let mut plain = vec![0f32; rows];
            let bytes = &q.packed[o * in_f / 2..(o + 1) * in_f / 2];
            nf4_row_plain(
                bytes,
                |b| q.block_absmax(o * in_f / NF4_BLOCK + b),
                &xp,
                &mut plain,
            );
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
                assert!((plain[r] - want_q).abs() < 1e-4, "plain nf4 {o},{r}");
            }
        }
    }
}
