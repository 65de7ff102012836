//! `[curate]`: the whole curation configuration, read from TOML and checked before any row
//! is read.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::balance::{self, BalanceConfig, MixConfig};
use super::dedup::DedupConfig;
use super::filters::{FilterConfig, LicenseConfig};
use super::judge::JudgeConfig;
use super::pii::PiiConfig;
use super::splits::SplitConfig;
use crate::format::{FormatChoice, UnicodeForm};
use crate::{Error, Result};

/// `[curate.select]`: keep only `train_rows` rows of the train split, chosen by maximal
/// marginal relevance (a second pass over train.jsonl that holds signatures, not texts).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SelectConfig {
    pub train_rows: Option<usize>,
    /// 1: relevance only; 0: diversity only.
    pub lambda: f64,
    /// A numeric row field used as relevance (e.g. a quality score); 1 for every row if unset.
    pub relevance_field: Option<String>,
}

impl Default for SelectConfig {
    fn default() -> Self {
        Self {
            train_rows: None,
            lambda: 0.5,
            relevance_field: None,
        }
    }
}

/// The whole curation configuration (`[curate]` of a TOML file, or the file itself).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CurateConfig {
    pub seed: u64,
    /// `auto` (the first valid row fixes the family), `sft`, `preference` or `kto`.
    pub format: FormatChoice,
    /// `nfc` (default), `nfkc` or `none`.
    pub unicode: UnicodeForm,
    pub splits: SplitConfig,
    pub pii: PiiConfig,
    pub dedup: DedupConfig,
    pub license: LicenseConfig,
    pub filters: FilterConfig,
    pub balance: BalanceConfig,
    /// General rows mixed into the inputs (off unless set).
    pub mix: MixConfig,
    /// Optional LLM judge (off by default).
    pub judge: JudgeConfig,
    /// Optional diversity selection on the train split.
    pub select: SelectConfig,
    /// How many invalid / rejected rows report.json lists (all go to rejected.jsonl).
    pub listed_limit: usize,
    /// Rows processed in parallel per batch.
    pub batch_rows: usize,
}

impl Default for CurateConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            format: FormatChoice::Auto,
            unicode: UnicodeForm::Nfc,
            splits: SplitConfig::default(),
            pii: PiiConfig::default(),
            dedup: DedupConfig::default(),
            license: LicenseConfig::default(),
            filters: FilterConfig::default(),
            balance: BalanceConfig::default(),
            mix: MixConfig::default(),
            judge: JudgeConfig::default(),
            select: SelectConfig::default(),
            listed_limit: 1000,
            batch_rows: 8192,
        }
    }
}

impl CurateConfig {
    /// Read a TOML file: its `[data.curate]` or `[curate]` table (unknown keys there are
    /// errors); without one, the file's top-level curation keys (a shared loraops
    /// configuration file's other sections are left alone).
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        const KEYS: [&str; 14] = [
            "judge",
            "mix",
            "select",
            "seed",
            "format",
            "unicode",
            "splits",
            "pii",
            "dedup",
            "license",
            "filters",
            "balance",
            "listed_limit",
            "batch_rows",
        ];
        let text =
            String::from_utf8(crate::error::read(path)?).map_err(|e| Error::parse(path, e))?;
        let v: toml::Table = toml::from_str(&text).map_err(|e| Error::parse(path, e))?;
        let table = match v
            .get("data")
            .and_then(|d| d.get("curate"))
            .or_else(|| v.get("curate"))
        {
            Some(t) => t.clone(),
            None => toml::Value::Table(
                v.into_iter()
                    .filter(|(k, _)| KEYS.contains(&k.as_str()))
                    .collect(),
            ),
        };
        table.try_into().map_err(|e| Error::parse(path, e))
    }

    pub(super) fn check(&self) -> Result<()> {
        self.splits.validate().map_err(Error::Config)?;
        let d = &self.dedup;
        if d.bands == 0 || d.rows == 0 || d.shingle_size == 0 {
            return Err(Error::Config(
                "dedup: bands, rows and shingle_size must be positive".into(),
            ));
        }
        if !(0.0..=1.0).contains(&d.threshold) {
            return Err(Error::Config("dedup: threshold must be in [0, 1]".into()));
        }
        balance::check_proportions(&self.balance.proportions).map_err(Error::Config)?;
        self.mix.parts().map_err(Error::Config)?;
        if self.select.train_rows == Some(0) {
            return Err(Error::Config(
                "select: train_rows must be at least 1 (an empty train split)".into(),
            ));
        }
        if !(0.0..=1.0).contains(&self.select.lambda) {
            return Err(Error::Config("select: lambda must be in [0, 1]".into()));
        }
        let j = &self.judge;
        if let Some(t) = j.weight_below {
            if !j.enabled {
                return Err(Error::Config(
                    "judge: weight_below needs the judge (judge.enabled, --judge-model)".into(),
                ));
            }
            if t <= j.threshold {
                return Err(Error::Config(format!(
                    "judge: weight_below ({t}) must be above threshold ({}); rows under the threshold are dropped, lower it to keep them down-weighted",
                    j.threshold
                )));
            }
            if !(0.0..=1.0).contains(&j.weight) {
                return Err(Error::Config("judge: weight must be in [0, 1]".into()));
            }
        }
        Ok(())
    }
}
