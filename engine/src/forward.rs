//! One forward step over a heterogeneous batch: every sequence contributes its next tokens (one
//! when decoding, a chunk of its prompt when prefilling), each with its own position, cache and
//! adapter. The base's products run once over all rows; each adapter's `x·Aᵀ·Bᵀ·scale` is
//! added to the rows of the sequences that use it (the segments arrive grouped by adapter), so
//! one base copy serves every adapter unmerged. Attention runs per sequence and head against
//! that sequence's cache.
//!
//! The math is the model's (`loraops_model::llama`) on plain f32 buffers: the same RMSNorm,
//! RoPE in transformers' half-split layout, grouped-query attention and SwiGLU, so the engine's
//! logits agree with the trainer's forward pass.

use std::ops::Range;

use loraops_model::kernels::matmul::{Operand, SendPtr, gemm_block, sgemm_serial};
use loraops_model::kernels::simd;
use rayon::prelude::*;

use crate::adapters::{AdapterWeights, Pair};
use crate::base::{Base, DOWN, GATE, K, Layer, O, Q, UP, V};
use crate::dots;
use crate::kv::KvCache;

/// One sequence's part of a step.
pub struct Segment<'a> {
    /// The tokens fed this step, at positions `cache.len ..`.
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    pub adapter: Option<&'a AdapterWeights>,
    /// Whether the logits after its last token are wanted.
    pub logits: bool,
}

/// Rows per task of the adapters' products.
const LORA_ROWS: usize = 64;
/// Up to this many rows, an adapter's term is taken by row kernels (dot products with A's rows,
/// then with B's), which read each weight once; beyond, by gemm, whose packing only many rows
/// repay. Decoding over many adapters gives groups of one row each, and gemm's packing was
/// most of such a step's adapter time.
const LORA_ROW_KERNEL: usize = 4;
/// Multiply-adds below which one thread takes several adapters' tasks in a row: a small
/// model's one-row task is a few thousand, less than handing it to another thread costs.
const LORA_MIN_WORK: usize = 1 << 16;

/// Run the step: feed every segment's tokens, advance the caches, and return the logits (vocab
/// values) of each segment that asked for them, in order. Segments using the same adapter
/// must be adjacent (the caller groups them); any order works, grouping only saves work.
pub fn step(base: &Base, segs: &mut [Segment]) -> Vec<Vec<f32>> {
    let c = &base.config;
    let hidden = c.hidden_size;
    let mut starts = Vec::with_capacity(segs.len());
    let mut positions = Vec::new();
    let mut tokens = Vec::new();
    for s in segs.iter() {
        starts.push(tokens.len());
        positions.extend(s.cache.len..s.cache.len + s.tokens.len());
        tokens.extend_from_slice(s.tokens);
    }
    let rows = tokens.len();
    let groups = adapter_groups(segs, &starts, rows);
    let rope = Rope::new(&base.inv_freq, &positions);

    let mut x = vec![0f32; rows * hidden];
    for (row, &t) in x.chunks_exact_mut(hidden).zip(&tokens) {
        let t = t as usize;
        row.copy_from_slice(&base.embed[t * hidden..(t + 1) * hidden]);
    }
    for (li, layer) in base.layers.iter().enumerate() {
        let lora = Adapters {
            groups: &groups,
            layer: li,
        };
        let h = rms_norm(&x, &layer.input_norm, c.rms_norm_eps);
        let [mut q, mut k, v] = [Q, K, V].map(|m| project(layer, m, &h, rows, &lora));
        // Per-head norms: rms_norm normalises each head_dim-long chunk.
        if let Some(w) = &layer.q_norm {
            q = rms_norm(&q, w, c.rms_norm_eps);
        }
        if let Some(w) = &layer.k_norm {
            k = rms_norm(&k, w, c.rms_norm_eps);
        }
        rope.apply(&mut q, c.num_attention_heads, c.head_dim);
        rope.apply(&mut k, c.num_key_value_heads, c.head_dim);
        let kv_width = c.num_key_value_heads * c.head_dim;
        for (s, &r0) in segs.iter_mut().zip(&starts) {
            for i in 0..s.tokens.len() {
                let r = (r0 + i) * kv_width..(r0 + i + 1) * kv_width;
                let pos = s.cache.len + i;
                s.cache.write(li, pos, &k[r.clone()], &v[r]);
            }
        }
        let a = attention(base, segs, &starts, &q, li);
        let o = project(layer, O, &a, rows, &lora);
        add(&mut x, &o);
        let h = rms_norm(&x, &layer.post_norm, c.rms_norm_eps);
        let g = project(layer, GATE, &h, rows, &lora);
        let u = project(layer, UP, &h, rows, &lora);
        let gu = swiglu(&g, &u);
        let d = project(layer, DOWN, &gu, rows, &lora);
        add(&mut x, &d);
    }
    for s in segs.iter_mut() {
        s.cache.len += s.tokens.len();
    }

    let wanted: Vec<usize> = segs
        .iter()
        .zip(&starts)
        .filter(|(s, _)| s.logits && !s.tokens.is_empty())
        .map(|(s, &r0)| r0 + s.tokens.len() - 1)
        .collect();
    if wanted.is_empty() {
        return Vec::new();
    }
    let mut last = Vec::with_capacity(wanted.len() * hidden);
    for &r in &wanted {
        last.extend_from_slice(&x[r * hidden..(r + 1) * hidden]);
    }
    let h = rms_norm(&last, &base.norm, c.rms_norm_eps);
    let logits = base.head(&h, wanted.len());
    let vocab = logits.len() / wanted.len();
    logits.chunks_exact(vocab).map(<[f32]>::to_vec).collect()
}

/// Runs of rows that share an adapter.
fn adapter_groups<'a>(
    segs: &[Segment<'a>],
    starts: &[usize],
    rows: usize,
) -> Vec<(&'a AdapterWeights, Range<usize>)> {
    let mut out: Vec<(&'a AdapterWeights, Range<usize>)> = Vec::new();
    for (i, s) in segs.iter().enumerate() {
        let Some(a) = s.adapter else { continue };
        let end = starts.get(i + 1).copied().unwrap_or(rows);
        match out.last_mut() {
            Some((prev, r)) if std::ptr::eq(*prev, a) && r.end == starts[i] => r.end = end,
            _ => out.push((a, starts[i]..end)),
        }
    }
    out
}

/// The adapters of one step's rows, at one layer.
struct Adapters<'a> {
    groups: &'a [(&'a AdapterWeights, Range<usize>)],
    layer: usize,
}

/// A base linear layer's product plus the adapters' terms.
fn project(layer: &Layer, m: usize, x: &[f32], rows: usize, lora: &Adapters) -> Vec<f32> {
    let mut y = layer.linears[m].forward(x, rows);
    add_adapters(lora.groups, lora.layer, m, x, &mut y);
    y
}

/// y[rows of a group] += scale · x·Aᵀ·Bᵀ for every group whose adapter adapts module `m` of
/// layer `li`, in blocks of rows on all threads.
fn add_adapters(
    groups: &[(&AdapterWeights, Range<usize>)],
    li: usize,
    m: usize,
    x: &[f32],
    y: &mut [f32],
) {
    let mut tasks = Vec::new();
    for (a, range) in groups {
        if let Some(p) = a.pairs.get(li).and_then(|l| l[m].as_ref()) {
            for start in range.clone().step_by(LORA_ROWS) {
                tasks.push((p, start..(start + LORA_ROWS).min(range.end)));
            }
        }
    }
    if tasks.is_empty() {
        return;
    }
    let in_f = tasks[0].0.a.len() / tasks[0].0.r;
    let out_f = tasks[0].0.b.len() / tasks[0].0.r;
    let work = tasks[0].0.r * (in_f + out_f);
    let yp = SendPtr(y.as_mut_ptr());
    tasks
        .par_iter()
        .with_min_len(LORA_MIN_WORK.div_ceil(work))
        .for_each(|(p, rows)| {
            let n = rows.len();
            let x = &x[rows.start * in_f..rows.end * in_f];
            // SAFETY: tasks cover disjoint row ranges of y, which outlives the parallel loop.
            let out = unsafe { yp.slice(rows.start * out_f, n * out_f) };
            if n <= LORA_ROW_KERNEL {
                return lora_rows(p, x, out);
            }
            let mut xa = vec![0f32; n * p.r];
            sgemm_serial(
                &mut xa,
                0.0,
                1.0,
                (n, in_f, p.r),
                (x, Operand::rows(in_f)),
                (&p.a, Operand::transposed(in_f)),
            );
            sgemm_serial(
                out,
                1.0,
                p.scale,
                (n, p.r, out_f),
                (&xa, Operand::rows(p.r)),
                (&p.b, Operand::transposed(p.r)),
            );
        });
}

/// `y += scale · x·Aᵀ·Bᵀ` for a few rows of x (at most [`LORA_ROW_KERNEL`]): r dot products
/// with A's rows, then one per row of B, so that each weight is read once, in order. B is
/// fetched while A is multiplied, so that two streams come from memory at once.
fn lora_rows(p: &Pair, x: &[f32], y: &mut [f32]) {
    let in_f = p.a.len() / p.r;
    let out_f = p.b.len() / p.r;
    let n = x.len() / in_f;
    let mut dots = [0f32; LORA_ROW_KERNEL];
    // Row i's x·Aᵀ, scaled.
    let mut xa = vec![0f32; n * p.r];
    for (k, a) in p.a.chunks_exact(in_f).enumerate() {
        dots::prefetch(share(&p.b, k, p.r));
        dots::dense_row(a, x, &mut dots[..n]);
        for (i, d) in dots[..n].iter().enumerate() {
            xa[i * p.r + k] = d * p.scale;
        }
    }
    let mut term = vec![0f32; out_f];
    for (yr, xa) in y.chunks_exact_mut(out_f).zip(xa.chunks_exact(p.r)) {
        dots::dense_row(xa, &p.b, &mut term);
        yr.iter_mut().zip(&term).for_each(|(y, t)| *y += t);
    }
}

/// Part `k` of `parts` equal parts of `v` (the last ones may be short or empty).
fn share(v: &[f32], k: usize, parts: usize) -> &[f32] {
    let len = v.len().div_ceil(parts);
    &v[(k * len).min(v.len())..((k + 1) * len).min(v.len())]
}

/// Causal attention of every segment's new tokens over its cache (positions up to and
/// including each token's own), one task per (segment, query head).
fn attention(base: &Base, segs: &[Segment], starts: &[usize], q: &[f32], li: usize) -> Vec<f32> {
    let c = &base.config;
    let (hq, hkv, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
    let width = hq * d;
    let rows = q.len() / width;
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0f32; rows * width];
    let op = SendPtr(out.as_mut_ptr());
    // Query heads per key/value head.
    let group = hq / hkv;
    // (segment, first query head): a decoding segment's task takes the query heads that share
    // a key/value head, so that each cached row is read once for all of them.
    let tasks: Vec<(usize, usize)> = (0..segs.len())
        .filter(|&s| !segs[s].tokens.is_empty())
        .flat_map(|s| {
            let per = if segs[s].tokens.len() == 1 { group } else { 1 };
            (0..hq).step_by(per).map(move |h| (s, h))
        })
        .collect();
    tasks.par_iter().for_each(|&(si, h)| {
        let s = &segs[si];
        let (r0, n, p0) = (starts[si], s.tokens.len(), s.cache.len);
        let len = p0 + n;
        let (keys, values) = s.cache.head(li, h / group, len);
        if n == 1 {
            // Decoding: one query per head, a few rows that the row kernels take better than
            // gemm, whose packing only many rows repay.
            let cols = r0 * width + h * d..r0 * width + (h + group) * d;
            // SAFETY: this task owns the columns of heads h..h + group of row r0 of `out`.
            let o = unsafe { op.slice(cols.start, cols.len()) };
            attend_group(&q[cols], keys, values, d, scale, o);
            return;
        }
        let mut scores = vec![0f32; n * len];
        sgemm_serial(
            &mut scores,
            0.0,
            scale,
            (n, d, len),
            (&q[r0 * width + h * d..], Operand::rows(width)),
            (keys, Operand::transposed(d)),
        );
        for (i, row) in scores.chunks_exact_mut(len).enumerate() {
            let (seen, future) = row.split_at_mut(p0 + i + 1);
            softmax(seen);
            future.fill(0.0);
        }
        // SAFETY: each task writes its own head's columns of its own segment's rows of `out`,
        // which outlives the parallel loop.
        unsafe {
            gemm_block(
                (op.get().add(r0 * width + h * d), width),
                0.0,
                (n, len, d),
                (&scores, Operand::rows(len)),
                (values, Operand::rows(d)),
            )
        }
    });
    out
}

/// One query for each of the heads in `q` (heads × d) that share a key/value head, against
/// `len` keys and values (len × d each), into `out` (heads × d). The scores are one
/// small-batch product (each key row read once for every head), and each value row is read
/// once for every head too: decoding, the cache is the attention's traffic.
fn attend_group(q: &[f32], keys: &[f32], values: &[f32], d: usize, scale: f32, out: &mut [f32]) {
    let heads = q.len() / d;
    let len = keys.len() / d;
    // Key-major: the scores of key j are at j·heads.
    let mut scores = vec![0f32; len * heads];
    dots::dense_rows(keys, q, heads, &mut scores);
    simd::dispatch(|| {
        // Head-major, scaled: one row of probabilities per head.
        let mut p = vec![0f32; heads * len];
        for (j, s) in scores.chunks_exact(heads).enumerate() {
            for (i, &s) in s.iter().enumerate() {
                p[i * len + j] = s * scale;
            }
        }
        for row in p.chunks_exact_mut(len) {
            softmax(row);
        }
        out.fill(0.0);
        for (j, v) in values.chunks_exact(d).enumerate() {
            for (i, out) in out.chunks_exact_mut(d).enumerate() {
                let w = p[i * len + j];
                for (o, v) in out.iter_mut().zip(v) {
                    *o += w * v;
                }
            }
        }
    })
}

fn softmax(x: &mut [f32]) {
    simd::dispatch(|| {
        let m = simd::max(x);
        for v in x.iter_mut() {
            *v = simd::exp(*v - m);
        }
        let inv = 1.0 / simd::sum(x);
        for v in x.iter_mut() {
            *v *= inv;
        }
    })
}

/// x / √(mean(x²) + ε) · w, per row.
fn rms_norm(x: &[f32], w: &[f32], eps: f64) -> Vec<f32> {
    let n = w.len();
    let mut out = vec![0f32; x.len()];
    let norm = |(o, x): (&mut [f32], &[f32])| {
        simd::dispatch(|| {
            let ss = simd::dot(x, x) / n as f32;
            let inv = 1.0 / (ss + eps as f32).sqrt();
            for ((o, &x), &w) in o.iter_mut().zip(x).zip(w) {
                *o = x * inv * w;
            }
        })
    };
    if x.len() >= 64 * n {
        out.par_chunks_mut(n)
            .zip(x.par_chunks(n))
            .with_min_len(16)
            .for_each(norm);
    } else {
        out.chunks_mut(n).zip(x.chunks(n)).for_each(norm);
    }
    out
}

fn add(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(x, y)| *x += y);
}

/// silu(g) · u.
fn swiglu(g: &[f32], u: &[f32]) -> Vec<f32> {
    let f = |(o, (&g, &u)): (&mut f32, (&f32, &f32))| *o = g / (1.0 + simd::exp(-g)) * u;
    let mut out = vec![0f32; g.len()];
    simd::dispatch(|| {
        if g.len() >= 1 << 16 {
            out.par_iter_mut()
                .zip(g.par_iter().zip(u.par_iter()))
                .with_min_len(4096)
                .for_each(f);
        } else {
            out.iter_mut().zip(g.iter().zip(u)).for_each(f);
        }
    });
    out
}

/// RoPE tables for the step's rows.
struct Rope {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    fn new(inv_freq: &[f32], positions: &[usize]) -> Self {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            // As the model computes it: the position in f32 times the frequency.
            let p = p as f32;
            for &f in inv_freq {
                let a = p * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Self { half, cos, sin }
    }

    /// Rotate every head of every row of `x` (rows × heads·head_dim) in place, in
    /// transformers' half-split layout: x·cos + rotate_half(x)·sin.
    fn apply(&self, x: &mut [f32], heads: usize, head_dim: usize) {
        let half = self.half;
        debug_assert_eq!(2 * half, head_dim);
        for (r, row) in x.chunks_exact_mut(heads * head_dim).enumerate() {
            let (cos, sin) = (
                &self.cos[r * half..(r + 1) * half],
                &self.sin[r * half..(r + 1) * half],
            );
            for head in row.chunks_exact_mut(head_dim) {
                let (x1, x2) = head.split_at_mut(half);
                for j in 0..half {
                    let (a, b) = (x1[j], x2[j]);
                    x1[j] = a * cos[j] - b * sin[j];
                    x2[j] = b * cos[j] + a * sin[j];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_adapters_few_rows_get_the_term_a_plain_sum_gives() {
        let (r, in_f, out_f) = (3, 13, 21);
        let p = Pair {
            a: (0..r * in_f)
                .map(|i| ((i * 7) % 11) as f32 / 5.0 - 1.0)
                .collect(),
            b: (0..out_f * r)
                .map(|i| ((i * 5) % 13) as f32 / 6.0 - 1.0)
                .collect(),
            r,
            scale: 0.75,
        };
        for n in 1..=LORA_ROW_KERNEL {
            let x: Vec<f32> = (0..n * in_f).map(|i| ((i * 3) % 7) as f32 - 3.0).collect();
            let y0: Vec<f32> = (0..n * out_f).map(|i| (i % 4) as f32).collect();
            let mut y = y0.clone();
            lora_rows(&p, &x, &mut y);
            for i in 0..n {
                for o in 0..out_f {
                    let term: f32 = (0..r)
                        .map(|k| {
                            let xa: f32 =
                                (0..in_f).map(|j| x[i * in_f + j] * p.a[k * in_f + j]).sum();
                            xa * p.b[o * r + k]
                        })
                        .sum();
                    let want = y0[i * out_f + o] + p.scale * term;
                    assert!(
                        (y[i * out_f + o] - want).abs() < 1e-3,
                        "rows {n}: ({i}, {o})"
                    );
                }
            }
        }
    }
}
