//! Split assignment (seeded, by content, so reproducible and independent of row order and
//! thread count) and split writers that hash what they write.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::dedup::mix64;
use crate::format::Split;
use crate::{Error, Result};

/// `[curate.splits]`: fractions (normalised by their sum) and an optional pinned regression set.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SplitConfig {
    pub train: f64,
    pub val: f64,
    pub holdout: f64,
    /// Fraction of input rows drawn into `regression` (besides the pinned file).
    pub regression: f64,
    /// JSONL rows that form the regression set as they are (normalised and masked, not
    /// filtered); input rows that duplicate one of them are dropped, so nothing leaks.
    pub regression_file: Option<PathBuf>,
    /// Honour a row's own `split` field.
    pub respect_split_field: bool,
}

impl Default for SplitConfig {
    fn default() -> Self {
        Self {
            train: 0.9,
            val: 0.05,
            holdout: 0.05,
            regression: 0.0,
            regression_file: None,
            respect_split_field: true,
        }
    }
}

impl SplitConfig {
    pub fn fraction(&self, s: Split) -> f64 {
        match s {
            Split::Train => self.train,
            Split::Val => self.val,
            Split::Holdout => self.holdout,
            Split::Regression => self.regression,
        }
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        let fs = [self.train, self.val, self.holdout, self.regression];
        if fs.iter().any(|f| !f.is_finite() || *f < 0.0) {
            return Err("splits: fractions must be finite and non-negative".into());
        }
        if fs.iter().sum::<f64>() <= 0.0 {
            return Err("splits: the fractions sum to zero".into());
        }
        Ok(())
    }

    /// The split of a row whose cluster representative has exact key `key`.
    pub fn assign(&self, seed: u64, key: u64) -> Split {
        let h = mix64(mix64(seed ^ 0x5eed) ^ mix64(key));
        let u = (h >> 11) as f64 / (1u64 << 53) as f64;
        let total = self.train + self.val + self.holdout + self.regression;
        let mut acc = 0.0;
        for s in Split::ALL {
            acc += self.fraction(s) / total;
            if u < acc {
                return s;
            }
        }
        Split::ALL
            .into_iter()
            .rev()
            .find(|s| self.fraction(*s) > 0.0)
            .unwrap_or(Split::Train)
    }
}

/// A JSONL writer that counts rows and computes the sha256 of the bytes it writes.
pub struct SplitWriter {
    pub path: PathBuf,
    w: BufWriter<File>,
    hash: Sha256,
    pub rows: u64,
}

impl SplitWriter {
    pub fn create(path: &Path) -> Result<Self> {
        let f = File::create(path).map_err(|e| Error::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            w: BufWriter::with_capacity(1 << 20, f),
            hash: Sha256::new(),
            rows: 0,
        })
    }

    pub fn write_line(&mut self, line: &str) -> Result<()> {
        self.hash.update(line.as_bytes());
        self.hash.update(b"\n");
        self.w
            .write_all(line.as_bytes())
            .and_then(|_| self.w.write_all(b"\n"))
            .map_err(|e| Error::io(&self.path, e))?;
        self.rows += 1;
        Ok(())
    }

    /// Flush what was written so far to the file.
    pub fn flush(&mut self) -> Result<()> {
        self.w.flush().map_err(|e| Error::io(&self.path, e))
    }

    /// Flush and return the hex sha256 of the file.
    pub fn finish(mut self) -> Result<String> {
        self.w.flush().map_err(|e| Error::io(&self.path, e))?;
        Ok(hex::encode(self.hash.finalize()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignment_follows_the_fractions_and_the_seed() {
        let c = SplitConfig::default();
        let mut n = [0usize; 4];
        for k in 0..20_000u64 {
            n[c.assign(7, k.wrapping_mul(0x9e37_79b9_7f4a_7c15)) as usize] += 1;
        }
        assert!((17_600..18_400).contains(&n[0]), "{n:?}");
        assert!((800..1_200).contains(&n[1]), "{n:?}");
        assert!((800..1_200).contains(&n[2]), "{n:?}");
        assert_eq!(n[3], 0);
        let moved = (0..1000u64)
            .filter(|k| c.assign(1, *k) != c.assign(2, *k))
            .count();
        assert!(moved > 50, "seed changes the assignment");
        assert!((0..1000u64).all(|k| c.assign(3, k) == c.assign(3, k)));
    }
}
