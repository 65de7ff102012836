//! Exact and near-duplicate detection.
//!
//! Exact: a 64-bit key (sha256 prefix) of the normalised text. Near: MinHash signatures over
//! character or word shingles, banded LSH to find candidates, and a Jaccard estimate from the
//! signatures to confirm them. Only representatives are indexed, and for each only its 32-bit
//! LSH band keys and an 8-bit-per-value signature are kept (no text), so memory grows with the
//! number of kept rows at roughly 300 bytes each with the defaults, whatever the row size.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// `[curate.dedup]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DedupConfig {
    /// Drop rows whose normalised text equals a kept row's.
    pub exact: bool,
    /// Drop rows whose estimated Jaccard similarity to a kept row is at least `threshold`.
    pub near: bool,
    pub threshold: f64,
    /// `char` (language-agnostic, the default) or `word` shingles.
    pub shingle: ShingleKind,
    /// Shingle length in characters or words.
    pub shingle_size: usize,
    /// MinHash permutations (`bands * rows`).
    pub bands: usize,
    pub rows: usize,
    /// A candidate whose estimate is within this margin below `threshold` still counts (the
    /// estimate has a standard deviation of about sqrt(J(1-J)/(bands*rows))).
    pub margin: f64,
    /// How many example clusters the report lists.
    pub example_clusters: usize,
}

impl Default for DedupConfig {
    fn default() -> Self {
        Self {
            exact: true,
            near: true,
            threshold: 0.8,
            shingle: ShingleKind::Char,
            shingle_size: 5,
            bands: 16,
            rows: 7,
            margin: 0.05,
            example_clusters: 20,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShingleKind {
    Char,
    Word,
}

/// A hasher for keys that already are hashes.
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x100000001b3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
    fn write_u128(&mut self, n: u128) {
        self.0 = (n as u64) ^ ((n >> 64) as u64);
    }
}

pub type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;

/// splitmix64: a good 64-bit mixer.
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e3779b97f4a7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    h
}

/// The text dedup compares: lower-cased, whitespace collapsed.
pub fn dedup_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    if s.is_ascii() {
        for w in s.split_ascii_whitespace() {
            if !out.is_empty() {
                out.push(' ');
            }
            out.extend(w.bytes().map(|b| b.to_ascii_lowercase() as char));
        }
        return out;
    }
    for w in s.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        for c in w.chars() {
            out.extend(c.to_lowercase());
        }
    }
    out
}

/// The exact-dedup key of a dedup text: 64 bits of its sha256 (a chance collision among
/// 100 million rows is about 3e-4).
pub fn exact_key(text: &str) -> u64 {
    let d = Sha256::digest(text.as_bytes());
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}

/// MinHash over 32-bit shingle hashes with `bands * rows` values per signature.
#[derive(Debug, Clone)]
pub struct MinHasher {
    a: Vec<u64>,
    b: Vec<u64>,
    kind: ShingleKind,
    size: usize,
}

impl MinHasher {
    pub fn new(cfg: &DedupConfig) -> Self {
        let k = cfg.bands * cfg.rows;
        let a = (0..k).map(|i| mix64(0xA5A5 + 2 * i as u64) | 1).collect();
        let b = (0..k).map(|i| mix64(0x5A5A + 2 * i as u64 + 1)).collect();
        Self {
            a,
            b,
            kind: cfg.shingle,
            size: cfg.shingle_size.max(1),
        }
    }

    /// Call `f` with the 32-bit hash of every shingle of a dedup text (repeats included).
    fn each_shingle(&self, text: &str, mut f: impl FnMut(u32)) {
        let fold = |h: u64| (h ^ (h >> 32)) as u32;
        match self.kind {
            ShingleKind::Char if text.is_ascii() => {
                let b = text.as_bytes();
                if b.len() <= self.size {
                    f(fold(fnv1a(b)));
                } else {
                    b.windows(self.size).for_each(|w| f(fold(fnv1a(w))));
                }
            }
            ShingleKind::Char => {
                let idx: Vec<usize> = text
                    .char_indices()
                    .map(|(i, _)| i)
                    .chain(std::iter::once(text.len()))
                    .collect();
                let n = idx.len() - 1;
                if n <= self.size {
                    f(fold(fnv1a(text.as_bytes())));
                } else {
                    for i in 0..=n - self.size {
                        f(fold(fnv1a(&text.as_bytes()[idx[i]..idx[i + self.size]])));
                    }
                }
            }
            ShingleKind::Word => {
                let words: Vec<u64> = text.split(' ').map(|w| fnv1a(w.as_bytes())).collect();
                let win = self.size.min(words.len());
                for w in words.windows(win) {
                    f(w.iter().fold(0u64, |h, w| mix64(h ^ w)) as u32);
                }
            }
        }
    }

    /// The distinct 32-bit shingle hashes of a dedup text, sorted.
    pub fn shingles(&self, text: &str) -> Vec<u32> {
        let mut out: Vec<u32> = Vec::new();
        self.each_shingle(text, |h| out.push(h));
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The MinHash signature of a dedup text: one-permutation hashing into `bands * rows`
    /// bins with optimal densification (Shrivastava 2017), so the cost is one hash per
    /// shingle instead of one per shingle and permutation; each bin collides with probability
    /// equal to the Jaccard similarity, as a k-permutation MinHash does.
    pub fn signature(&self, text: &str) -> Vec<u32> {
        let k = self.a.len() as u64;
        let mut mins = vec![u32::MAX; k as usize];
        let mut filled = vec![false; k as usize];
        let salt = self.b[0];
        self.each_shingle(text, |x| {
            let h = mix64(x as u64 ^ salt);
            let bin = (((h >> 32) * k) >> 32) as usize;
            let v = h as u32;
            if !filled[bin] || v < mins[bin] {
                mins[bin] = v;
                filled[bin] = true;
            }
        });
        for i in 0..k as usize {
            if filled[i] {
                continue;
            }
            let mut attempt = 0u64;
            loop {
                let h = mix64(self.a[i] ^ attempt.wrapping_mul(0x9e3779b97f4a7c15));
                let j = (((h >> 32) * k) >> 32) as usize;
                if filled[j] {
                    mins[i] = mins[j];
                    break;
                }
                attempt += 1;
            }
        }
        mins
    }
}

/// Exact Jaccard similarity of two texts' shingle sets (for tests and benchmarks).
pub fn jaccard(h: &MinHasher, a: &str, b: &str) -> f64 {
    let (x, y) = (h.shingles(&dedup_text(a)), h.shingles(&dedup_text(b)));
    let (mut i, mut j, mut inter) = (0, 0, 0usize);
    while i < x.len() && j < y.len() {
        match x[i].cmp(&y[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                inter += 1;
                i += 1;
                j += 1;
            }
        }
    }
    inter as f64 / (x.len() + y.len() - inter) as f64
}

/// What the index says about a new row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NearResult {
    /// A new representative with this id.
    New(u32),
    /// A near duplicate of representative `rep`, with the estimated Jaccard similarity.
    Dup { rep: u32, jaccard: f64 },
}

/// Banded LSH over representatives' signatures.
pub struct NearIndex {
    bands: usize,
    rows: usize,
    threshold: f64,
    tables: Vec<IdMap<u32, u32>>,
    sigs: Vec<u8>,
}

impl NearIndex {
    pub fn new(cfg: &DedupConfig) -> Self {
        Self {
            bands: cfg.bands,
            rows: cfg.rows,
            threshold: cfg.threshold - cfg.margin,
            tables: (0..cfg.bands).map(|_| IdMap::default()).collect(),
            sigs: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.sigs.len() / (self.bands * self.rows)
    }

    pub fn is_empty(&self) -> bool {
        self.sigs.is_empty()
    }

    /// Room for `n` more representatives without rehashing.
    pub fn reserve(&mut self, n: usize) {
        self.sigs.reserve(n * self.bands * self.rows);
        for t in &mut self.tables {
            t.reserve(n);
        }
    }

    /// 32 bits of the hash of one band (a chance collision only adds a candidate, which the
    /// signature estimate then rejects).
    fn band_key(&self, sig: &[u32], band: usize) -> u32 {
        sig[band * self.rows..(band + 1) * self.rows]
            .iter()
            .fold(band as u64, |h, &v| mix64(h ^ v as u64)) as u32
    }

    fn estimate(&self, rep: u32, sig: &[u32]) -> f64 {
        let k = self.bands * self.rows;
        let stored = &self.sigs[rep as usize * k..(rep as usize + 1) * k];
        let same = stored
            .iter()
            .zip(sig)
            .filter(|(a, b)| **a == **b as u8)
            .count();
        // 8-bit values also agree by chance (1/256) where the minima differ: correct for it.
        let m = same as f64 / k as f64;
        ((m - 1.0 / 256.0) / (1.0 - 1.0 / 256.0)).max(0.0)
    }

    /// Look `sig` up; when no representative is similar enough, make it one.
    pub fn query_insert(&mut self, sig: &[u32]) -> NearResult {
        let keys: Vec<u32> = (0..self.bands).map(|b| self.band_key(sig, b)).collect();
        let mut best: Option<(u32, f64)> = None;
        let mut seen: Vec<u32> = Vec::new();
        for (b, key) in keys.iter().enumerate() {
            if let Some(&rep) = self.tables[b].get(key) {
                if seen.contains(&rep) {
                    continue;
                }
                seen.push(rep);
                let j = self.estimate(rep, sig);
                if j >= self.threshold && best.is_none_or(|(_, bj)| j > bj) {
                    best = Some((rep, j));
                }
            }
        }
        if let Some((rep, jaccard)) = best {
            return NearResult::Dup { rep, jaccard };
        }
        let id = self.len() as u32;
        self.sigs.extend(sig.iter().map(|&v| v as u8));
        for (b, key) in keys.into_iter().enumerate() {
            self.tables[b].entry(key).or_insert(id);
        }
        NearResult::New(id)
    }
}

/// What [`Index::check`] found for a row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Seen {
    /// Its exact key is representative `rep`'s.
    Exact { rep: u32 },
    /// A near duplicate of representative `rep`, with the estimated Jaccard similarity.
    Near { rep: u32, jaccard: f64 },
    /// A new row; it is representative `rep` when some later lookup can find it (exact
    /// dedup on, or a signature given), else None.
    New { rep: Option<u32> },
}

/// Exact and MinHash near dedup over the representatives kept so far, numbered 0, 1, … in
/// the order they came: curation's rows (pinned regression rows first) and synth's seeds and
/// candidates go through the same index.
pub struct Index {
    exact: IdMap<u64, u32>,
    near: NearIndex,
    reps: u32,
}

impl Index {
    pub fn new(cfg: &DedupConfig) -> Self {
        Self {
            exact: IdMap::default(),
            near: NearIndex::new(cfg),
            reps: 0,
        }
    }

    /// Representatives so far.
    pub fn len(&self) -> u32 {
        self.reps
    }

    pub fn is_empty(&self) -> bool {
        self.reps == 0
    }

    /// Room for `n` more representatives (and their signatures when `near`).
    pub fn reserve(&mut self, n: usize, near: bool) {
        self.exact.reserve(n);
        if near {
            self.near.reserve(n);
        }
    }

    /// Look a row up by its exact `key` (when `exact`), then by its signature (when given);
    /// a row that is neither becomes a representative.
    pub fn check(&mut self, key: u64, sig: Option<&[u32]>, exact: bool) -> Seen {
        if exact && let Some(&rep) = self.exact.get(&key) {
            return Seen::Exact { rep };
        }
        if let Some(sig) = sig {
            match self.near.query_insert(sig) {
                NearResult::Dup { rep, jaccard } => return Seen::Near { rep, jaccard },
                NearResult::New(id) => debug_assert_eq!(id, self.reps),
            }
        }
        if !exact && sig.is_none() {
            return Seen::New { rep: None };
        }
        let rep = self.reps;
        self.exact.insert(key, rep);
        self.reps += 1;
        Seen::New { rep: Some(rep) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn near_duplicates_are_found_and_unrelated_texts_are_not() {
        let cfg = DedupConfig::default();
        let h = MinHasher::new(&cfg);
        let mut idx = NearIndex::new(&cfg);
        let base = "The quick brown fox jumps over the lazy dog while the farmer watches from the porch and drinks his morning coffee slowly.";
        let near = "The quick brown fox jumps over the lazy dog while the farmer watches from the porch and drinks his evening coffee slowly.";
        let other = "Rust programs manage memory through ownership and borrowing, checked at compile time without a garbage collector at all.";
        assert!(jaccard(&h, base, near) > 0.8);
        assert!(matches!(
            idx.query_insert(&h.signature(&dedup_text(base))),
            NearResult::New(0)
        ));
        assert!(matches!(
            idx.query_insert(&h.signature(&dedup_text(other))),
            NearResult::New(1)
        ));
        match idx.query_insert(&h.signature(&dedup_text(near))) {
            NearResult::Dup { rep, jaccard } => {
                assert_eq!(rep, 0);
                assert!(jaccard > 0.7, "{jaccard}");
            }
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn dedup_text_collapses_case_and_space() {
        assert_eq!(dedup_text("  Hello\n\tWORLD  "), "hello world");
        assert_eq!(
            exact_key("hello world"),
            exact_key(&dedup_text("Hello   World"))
        );
    }
}
