//! Data curation: raw JSONL in, train/val/holdout/regression splits and `report.json` out.
//!
//! One streaming pass over the inputs, in batches: each batch is parsed, validated,
//! normalised, PII-masked, license- and quality-filtered and MinHashed in parallel (rayon);
//! then, in input order, rows are deduplicated (exact key, then MinHash LSH), capped by the
//! balance rules, assigned a split from their content and the seed, and written. Memory holds
//! one batch of rows plus, per kept row, its exact key and its LSH entries, never the texts.
//! Target proportions, general:domain mixing and diversity selection then rewrite the split
//! files from what was recorded per row (a rank and a group), again without holding texts.
//!
//! - `format`: schema validation and normalisation per format
//! - `pii`: typed PII masking; `dedup`: exact and MinHash/LSH near dedup
//! - `filters`: license allow-list, length, repetition, language, banned terms
//! - `splits`: seeded split assignment and hashing writers; `report`: report.json + summary
//! - `judge`: optional LLM judge on an OpenAI-compatible endpoint (rubric + threshold)
//! - `select`: diversity selection by maximal marginal relevance over MinHash similarity
//! - `balance`: caps, target proportions and general:domain mixing
//! - `chat`: the OpenAI-compatible client of the judge and of `synth`
//! - `synth`: synthetic rows generated from seed rows through a gateway (`loraops data synth`)
//!
//! Duplicates are dropped and only one representative of a cluster is written, so no cluster
//! spans two splits; pinned regression rows are indexed first, so input rows that duplicate
//! them are dropped rather than leaking into train.
//!
//! Configuration (`loraops data curate --config FILE`; every key optional, defaults shown):
//!
//! ```toml
//! [curate]
//! seed = 0
//! format = "auto"              # or sft | preference | kto
//! unicode = "nfc"              # or nfkc | none
//! [curate.splits]
//! train = 0.9
//! val = 0.05
//! holdout = 0.05
//! regression = 0.0
//! regression_file = "pinned.jsonl"   # optional
//! [curate.pii]                 # each type on by default
//! email = true                 # also phone, card, ip, iban, kr_rrn, us_ssn, enabled
//! [curate.dedup]
//! threshold = 0.8              # Jaccard on character 5-gram shingles
//! bands = 16
//! rows = 7
//! margin = 0.05
//! [curate.license]
//! allow = ["MIT", "Apache-2.0", "CC-BY-4.0"]   # empty: all allowed
//! missing = "keep"             # or drop | flag
//! [curate.filters]
//! min_chars = 1
//! max_chars = 200000
//! languages = ["eng", "kor"]   # empty: all
//! banned_terms = ["..."]
//! [curate.balance]
//! field = "source"
//! max_per_value = 10000
//! proportions = { web = 0.5, forum = 0.3, docs = 0.2 }   # shares of the domain rows, sum 1
//! total = 50000                # optional: the sample size wanted (shortfalls are reported)
//! [curate.mix]                 # general rows mixed into the domain rows (the inputs)
//! general = ["general.jsonl"]
//! ratio = "1:3"                # general:domain
//! origin_field = "origin"      # every written row says "general" or "domain" here
//! [curate.judge]               # off unless enabled
//! enabled = true
//! url = "http://127.0.0.1:8080/v1"
//! model = "base-model-or-adapter"
//! rubric = "The response is correct, helpful, safe and follows the instruction."
//! threshold = 6.0              # rows scoring below are dropped
//! weight_below = 8.0           # optional: rows scoring below are kept with their "weight"
//! weight = 0.5                 #   multiplied by this (the loss of a row is weighted by it)
//! [curate.select]
//! train_rows = 5000            # MMR-select a diverse train subset
//! lambda = 0.5
//! ```

pub mod balance;
pub mod chat;
pub mod dedup;
pub mod filters;
pub mod format;
pub mod judge;
pub mod pii;
pub mod report;
pub mod select;
pub mod splits;
pub mod synth;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::{Error, Result};
pub use balance::{BalanceConfig, MixConfig};
use dedup::{DedupConfig, IdMap, MinHasher, NearIndex, NearResult};
use filters::{FilterConfig, Filters, LicenseConfig, LicenseVerdict, MissingLicense};
use format::{Family, FormatChoice, Split, UnicodeForm};
use judge::{Judge, JudgeConfig};
use pii::{Masker, PiiConfig, PiiCounts, PiiKind};
use report::{Cluster, DupMember, InputReport, Loc, Report, RowIssue, SplitReport};
use splits::{SplitConfig, SplitWriter};

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

    fn check(&self) -> Result<()> {
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

/// Progress of a run.
#[derive(Debug, Clone, Copy)]
pub enum Event {
    /// Bytes of the inputs read so far, of `total`, and rows read.
    Progress { bytes: u64, total: u64, rows: u64 },
}

/// The per-row result of the parallel stage.
enum Outcome {
    Blank,
    Invalid(String),
    Rejected {
        family: Family,
        reason: &'static str,
        detail: String,
        license: Option<String>,
    },
    Keep(Box<Kept>),
}

struct Kept {
    family: Family,
    line: String,
    key: u64,
    sig: Option<Vec<u32>>,
    pii: PiiCounts,
    split: Option<Split>,
    license: Option<String>,
    balance: String,
    label: Option<bool>,
    /// The row's text for the judge (empty when there is none).
    content: String,
    /// From a general file (`[curate.mix]`).
    general: bool,
}

struct Stage {
    cfg: CurateConfig,
    masker: Masker,
    filters: Filters,
    hasher: MinHasher,
    judge: Option<Judge>,
}

impl Stage {
    /// Parse, validate, normalise, mask, filter and hash one line. `pinned` rows skip the
    /// license and quality filters; `general` rows come from a file mixed in.
    fn process(&self, raw: &[u8], pinned: bool, general: bool) -> Outcome {
        let Ok(text) = std::str::from_utf8(raw) else {
            return Outcome::Invalid("not valid UTF-8".into());
        };
        let text = text.trim();
        if text.is_empty() {
            return Outcome::Blank;
        }
        let v: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => return Outcome::Invalid(format!("not JSON: {e}")),
        };
        let mut row = match format::validate(v) {
            Ok(r) => r,
            Err(e) => return Outcome::Invalid(e),
        };
        if let Some(f) = self.cfg.format.family()
            && f != row.family
        {
            return Outcome::Invalid(format!(
                "a {} row, but the format is {}",
                row.family.describe(),
                f.describe()
            ));
        }
        let form = self.cfg.unicode;
        let mut pii = PiiCounts::default();
        format::map_text(&mut row.obj, &mut |s: &mut String| {
            let n = format::normalize_str(s, form);
            *s = match self.masker.mask(&n, &mut pii) {
                Some(m) => m,
                None => n,
            };
        });
        if format::chosen_equals_rejected(&row) {
            return Outcome::Invalid("chosen and rejected are identical".into());
        }
        let content = format::content_text(&row);
        if !pinned {
            match self.cfg.license.check(row.license.as_deref()) {
                LicenseVerdict::NotAllowed(l) => {
                    return Outcome::Rejected {
                        family: row.family,
                        reason: "license",
                        detail: format!("license {l:?} is not in the allow-list"),
                        license: Some(l),
                    };
                }
                LicenseVerdict::Missing if self.cfg.license.missing == MissingLicense::Drop => {
                    return Outcome::Rejected {
                        family: row.family,
                        reason: "license",
                        detail: "no license (policy: drop)".into(),
                        license: None,
                    };
                }
                _ => {}
            }
            if let Err((reason, detail)) = self.filters.check(&content) {
                return Outcome::Rejected {
                    family: row.family,
                    reason,
                    detail,
                    license: row.license,
                };
            }
        }
        let dtext = dedup::dedup_text(&content);
        let key = dedup::exact_key(&dtext);
        let sig = self.cfg.dedup.near.then(|| self.hasher.signature(&dtext));
        // Pinned regression rows stay as given; every other row says where it came from.
        if self.cfg.mix.enabled() && !pinned {
            let origin = if general { "general" } else { "domain" };
            row.obj
                .insert(self.cfg.mix.origin_field.clone(), Value::from(origin));
        }
        let balance = row
            .obj
            .get(&self.cfg.balance.field)
            .map(|v| match v {
                Value::String(s) => s.clone(),
                v => v.to_string(),
            })
            .unwrap_or_else(|| "(none)".into());
        let line = serde_json::to_string(&Value::Object(row.obj)).expect("JSON serialises");
        Outcome::Keep(Box::new(Kept {
            family: row.family,
            line,
            key,
            sig,
            pii,
            split: row.split,
            license: row.license,
            balance,
            label: row.label,
            content: if self.judge.is_some() {
                content
            } else {
                String::new()
            },
            general,
        }))
    }
}

/// Where a representative came from, and its example cluster (if listed).
struct RepInfo {
    file: u32,
    line: u32,
}

/// What proportions and mixing need of one written row.
struct RowTag {
    rank: u64,
    /// Its row index in its split file.
    pos: u64,
    file: u32,
    line: u32,
    /// Index of its balance value in [`Sampling::names`].
    value: u32,
    general: bool,
}

/// Rows recorded for the pass after streaming (only when proportions or mixing are set).
#[derive(Default)]
struct Sampling {
    ids: HashMap<String, u32>,
    names: Vec<String>,
    tags: BTreeMap<Split, Vec<RowTag>>,
}

struct Run<'a> {
    cfg: &'a CurateConfig,
    report: Report,
    family: Option<(Family, String)>,
    exact: IdMap<u64, u32>,
    /// Representative → index of its example cluster in the report.
    clusters: IdMap<u32, u32>,
    /// Input bytes in all, for sizing the index after the first batch.
    total_bytes: u64,
    reserved: bool,
    near: NearIndex,
    reps: Vec<RepInfo>,
    files: Vec<String>,
    writers: BTreeMap<Split, SplitWriter>,
    labels: BTreeMap<Split, (u64, u64)>,
    balance: HashMap<String, u64>,
    rejected: SplitWriter,
    pii: PiiCounts,
    n_pinned_reps: u32,
    judge_scores: f64,
    sampling: Option<Sampling>,
}

impl Run<'_> {
    fn issue(
        &mut self,
        file: u32,
        line: u64,
        reason: &str,
        detail: String,
        list: bool,
    ) -> Result<()> {
        let issue = RowIssue {
            file: self.files[file as usize].clone(),
            line,
            reason: reason.to_string(),
            detail,
        };
        self.rejected
            .write_line(&serde_json::to_string(&issue).expect("JSON"))?;
        if list {
            let lim = self.cfg.listed_limit;
            let v = if reason == "invalid" {
                &mut self.report.invalid
            } else {
                &mut self.report.rejected
            };
            if v.len() < lim {
                v.push(issue);
            }
        }
        Ok(())
    }

    fn family_ok(&mut self, f: Family, file: u32, line: u64) -> std::result::Result<(), String> {
        match &self.family {
            None => {
                self.family = Some((f, format!("{}:{line}", self.files[file as usize])));
                Ok(())
            }
            Some((g, _)) if *g == f => Ok(()),
            Some((g, at)) => Err(format!(
                "a {} row, but the dataset is {} (fixed by {at})",
                f.describe(),
                g.describe()
            )),
        }
    }

    fn add_dup(&mut self, rep: u32, file: u32, line: u64, kind: &str, jaccard: f64) -> Result<()> {
        let pinned = rep < self.n_pinned_reps;
        if pinned {
            self.report.dedup.of_regression += 1;
        }
        let r = &self.reps[rep as usize];
        let rep_loc = format!("{}:{}", self.files[r.file as usize], r.line);
        let max_clusters = self.cfg.dedup.example_clusters;
        let cluster = match self.clusters.get(&rep).copied() {
            Some(c) => Some(c),
            None if self.report.dedup.clusters.len() < max_clusters => {
                let c = self.report.dedup.clusters.len() as u32;
                self.report.dedup.clusters.push(Cluster {
                    representative: Loc {
                        file: self.files[r.file as usize].clone(),
                        line: r.line as u64,
                    },
                    size: 1,
                    duplicates: Vec::new(),
                });
                self.clusters.insert(rep, c);
                Some(c)
            }
            None => None,
        };
        if let Some(c) = cluster {
            let cl = &mut self.report.dedup.clusters[c as usize];
            cl.size += 1;
            if cl.duplicates.len() < 10 {
                cl.duplicates.push(DupMember {
                    file: self.files[file as usize].clone(),
                    line,
                    kind: kind.to_string(),
                    jaccard,
                });
            }
        }
        let detail = if kind == "exact" {
            format!("exact duplicate of {rep_loc}")
        } else {
            format!("near duplicate of {rep_loc} (estimated Jaccard {jaccard:.2})")
        };
        let reason = if kind == "exact" {
            "exact_duplicate"
        } else {
            "near_duplicate"
        };
        self.issue(file, line, reason, detail, false)
    }

    /// The sequential stage for one row: bookkeeping for rows not kept; dedup for the others,
    /// handing back the new representatives for [`Run::emit`].
    fn take(
        &mut self,
        o: Outcome,
        file: u32,
        line: u64,
        pinned: bool,
    ) -> Result<Option<Box<Kept>>> {
        match o {
            Outcome::Blank => self.report.counts.blank += 1,
            Outcome::Invalid(msg) => {
                self.report.counts.invalid += 1;
                self.issue(file, line, "invalid", msg, true)?;
            }
            Outcome::Rejected {
                family,
                reason,
                detail,
                license,
            } => {
                if let Err(msg) = self.family_ok(family, file, line) {
                    self.report.counts.invalid += 1;
                    return self.issue(file, line, "invalid", msg, true).map(|_| None);
                }
                if reason == "license" {
                    self.report.counts.license_rejected += 1;
                    *self
                        .report
                        .license
                        .rejected
                        .entry(license.unwrap_or_else(|| "(none)".into()))
                        .or_default() += 1;
                } else {
                    self.report.counts.filtered += 1;
                }
                *self
                    .report
                    .rejected_by_reason
                    .entry(reason.to_string())
                    .or_default() += 1;
                self.issue(file, line, reason, detail, true)?;
            }
            Outcome::Keep(k) => {
                if let Err(msg) = self.family_ok(k.family, file, line) {
                    self.report.counts.invalid += 1;
                    return self.issue(file, line, "invalid", msg, true).map(|_| None);
                }
                // Exact, then near dedup; a new row becomes a representative.
                let rep = self.reps.len() as u32;
                if self.cfg.dedup.exact
                    && let Some(&r) = self.exact.get(&k.key)
                {
                    self.report.counts.exact_duplicates += 1;
                    return self.add_dup(r, file, line, "exact", 1.0).map(|_| None);
                }
                if let Some(sig) = &k.sig {
                    match self.near.query_insert(sig) {
                        NearResult::Dup { rep: r, jaccard } => {
                            self.report.counts.near_duplicates += 1;
                            return self.add_dup(r, file, line, "near", jaccard).map(|_| None);
                        }
                        NearResult::New(id) => debug_assert_eq!(id, rep),
                    }
                }
                if self.cfg.dedup.exact || k.sig.is_some() {
                    self.exact.insert(k.key, rep);
                    self.reps.push(RepInfo {
                        file,
                        line: line as u32,
                    });
                    if pinned {
                        self.n_pinned_reps = self.reps.len() as u32;
                    }
                }
                return Ok(Some(k));
            }
        }
        Ok(None)
    }

    /// Cap, assign a split and write one kept row.
    fn emit(&mut self, k: Kept, file: u32, line: u64, pinned: bool) -> Result<()> {
        if !pinned {
            let b = &self.cfg.balance;
            let cap = b.caps.get(&k.balance).copied().or(b.max_per_value);
            let n = self.balance.entry(k.balance.clone()).or_default();
            if cap.is_some_and(|c| *n >= c) {
                self.report.counts.balance_dropped += 1;
                *self
                    .report
                    .rejected_by_reason
                    .entry("balance".into())
                    .or_default() += 1;
                let detail = format!("{} {:?} is over its cap", b.field, k.balance);
                return self.issue(file, line, "balance", detail, true);
            }
            *n += 1;
        }
        let split = if pinned {
            Split::Regression
        } else {
            match k.split {
                Some(s) if self.cfg.splits.respect_split_field => s,
                _ => self.cfg.splits.assign(self.cfg.seed, k.key),
            }
        };
        let w = self.writers.get_mut(&split).expect("all splits open");
        if let (Some(s), false) = (&mut self.sampling, pinned) {
            let next = s.names.len() as u32;
            let value = *s.ids.entry(k.balance.clone()).or_insert(next);
            if value == next {
                s.names.push(k.balance.clone());
            }
            s.tags.entry(split).or_default().push(RowTag {
                rank: balance::rank(self.cfg.seed, k.key),
                pos: w.rows,
                file,
                line: line as u32,
                value,
                general: k.general,
            });
        }
        w.write_line(&k.line)?;
        if let Some(l) = k.label {
            let e = self.labels.entry(split).or_default();
            if l { e.0 += 1 } else { e.1 += 1 }
        }
        self.report.counts.kept += 1;
        if pinned {
            self.report.counts.pinned_regression += 1;
        } else {
            *self.report.sources.entry(k.balance).or_default() += 1;
        }
        if k.pii.total() > 0 {
            self.report.pii_rows += 1;
            self.pii.add(&k.pii);
        }
        let lic = &mut self.report.license;
        match &k.license {
            Some(l) => *lic.kept.entry(l.clone()).or_default() += 1,
            None => {
                lic.missing += 1;
                *lic.kept.entry("(none)".into()).or_default() += 1;
                if self.cfg.license.missing == MissingLicense::Flag
                    && !pinned
                    && lic.flagged.len() < self.cfg.listed_limit
                {
                    lic.flagged.push(Loc {
                        file: self.files[file as usize].clone(),
                        line,
                    });
                }
            }
        }
        Ok(())
    }
}

/// Read one file in batches, run the parallel stage on each batch and feed the results to
/// `run` in order.
fn stream_file(
    path: &Path,
    file: u32,
    pinned: bool,
    general: bool,
    stage: &Stage,
    run: &mut Run<'_>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<InputReport> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    if f.metadata().map(|m| m.is_dir()).unwrap_or(false) {
        return Err(Error::parse(path, "is a directory, not a JSONL file"));
    }
    let mut r = BufReader::with_capacity(1 << 20, f);
    let mut hash = Sha256::new();
    let (mut lines, mut bytes) = (0u64, 0u64);
    let batch = stage.cfg.batch_rows.max(1);
    loop {
        let mut buf: Vec<Vec<u8>> = Vec::with_capacity(batch);
        while buf.len() < batch {
            let mut l = Vec::new();
            let n = r
                .read_until(b'\n', &mut l)
                .map_err(|e| Error::io(path, e))?;
            if n == 0 {
                break;
            }
            hash.update(&l);
            bytes += n as u64;
            buf.push(l);
        }
        if buf.is_empty() {
            break;
        }
        if !run.reserved && !pinned {
            // Size the index for the whole input once, instead of growing it by doubling.
            let batch_bytes: usize = buf.iter().map(Vec::len).sum();
            let est = run.total_bytes as f64 * buf.len() as f64 / batch_bytes.max(1) as f64;
            let est = (est * 1.05) as usize;
            run.exact.reserve(est);
            if stage.cfg.dedup.near {
                run.near.reserve(est);
            }
            run.reps.reserve(est);
            run.reserved = true;
        }
        let outs: Vec<Outcome> = buf
            .par_iter()
            .map(|l| stage.process(l, pinned, general))
            .collect();
        let first = lines + 1;
        lines += buf.len() as u64;
        let mut kept: Vec<(Box<Kept>, u64)> = Vec::new();
        for (i, o) in outs.into_iter().enumerate() {
            if !pinned && !matches!(o, Outcome::Blank) {
                run.report.counts.read += 1;
            }
            let line = first + i as u64;
            if let Some(k) = run.take(o, file, line, pinned)? {
                kept.push((k, line));
            }
        }
        // The judge sees only rows that survived everything else, a batch at a time.
        let verdicts = match (&stage.judge, pinned) {
            (Some(j), false) if !kept.is_empty() => {
                let texts: Vec<&str> = kept.iter().map(|(k, _)| k.content.as_str()).collect();
                let v = j.score_all(&texts).map_err(|e| e.into_error())?;
                Some(v)
            }
            _ => None,
        };
        for (n, (k, line)) in kept.into_iter().enumerate() {
            if let (Some(v), Some(j)) = (&verdicts, &stage.judge) {
                let v = &v[n];
                run.judge_scores += v.score;
                run.report.judge.scored += 1;
                if v.score < j.threshold() {
                    run.report.judge.rejected += 1;
                    run.report.counts.judge_rejected += 1;
                    *run.report
                        .rejected_by_reason
                        .entry("judge".into())
                        .or_default() += 1;
                    let detail =
                        format!("judge score {} < {}: {}", v.score, j.threshold(), v.reason);
                    run.issue(file, line, "judge", detail, true)?;
                    continue;
                }
                let factor = j.weight_for(v.score);
                if factor != 1.0 {
                    run.report.judge.weighted += 1;
                    let mut k = k;
                    k.line = reweighted(&k.line, factor);
                    run.emit(*k, file, line, pinned)?;
                    continue;
                }
            }
            run.emit(*k, file, line, pinned)?;
        }
        progress(bytes, lines);
    }
    Ok(InputReport {
        path: path.to_path_buf(),
        lines,
        bytes,
        sha256: hex::encode(hash.finalize()),
    })
}

/// The row `line` with its `weight` (1 when it has none) multiplied by `factor`.
fn reweighted(line: &str, factor: f64) -> String {
    let mut v: Value = serde_json::from_str(line).expect("a row written by this run");
    let w = v.get("weight").and_then(Value::as_f64).unwrap_or(1.0) * factor;
    v["weight"] = Value::from(w);
    serde_json::to_string(&v).expect("JSON serialises")
}

/// Curate `inputs` into `out`: `train.jsonl`, `val.jsonl`, `holdout.jsonl`,
/// `regression.jsonl`, `rejected.jsonl` (every row not kept, with its reason) and
/// `report.json`. Returns the report; when no row is left, writes the report and fails.
/// The general files of `[curate.mix]` are read after the inputs.
pub fn curate(
    inputs: &[PathBuf],
    out: &Path,
    cfg: &CurateConfig,
    on: &mut dyn FnMut(Event),
) -> Result<Report> {
    let started = Instant::now();
    cfg.check()?;
    if inputs.is_empty() {
        return Err(Error::Config("no input files".into()));
    }
    let mut total = 0u64;
    for p in inputs
        .iter()
        .chain(cfg.splits.regression_file.as_ref())
        .chain(&cfg.mix.general)
    {
        let m = std::fs::metadata(p).map_err(|e| Error::io(p, e))?;
        if m.is_dir() {
            return Err(Error::parse(p, "is a directory, not a JSONL file"));
        }
        total += m.len();
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    // Until the splits are complete, a failure removes what was written: no half-written
    // split is ever left to be trained on.
    let mut partial = PartialOutputs(
        Split::ALL
            .iter()
            .map(|s| out.join(format!("{}.jsonl", s.name())))
            .chain([out.join("rejected.jsonl")])
            .collect(),
    );
    let stage = Stage {
        masker: Masker::new(cfg.pii.clone()),
        filters: Filters::new(cfg.filters.clone()).map_err(Error::Config)?,
        hasher: MinHasher::new(&cfg.dedup),
        judge: if cfg.judge.enabled {
            Some(Judge::new(&cfg.judge).map_err(Error::Config)?)
        } else {
            None
        },
        cfg: cfg.clone(),
    };
    let mut writers = BTreeMap::new();
    for s in Split::ALL {
        writers.insert(
            s,
            SplitWriter::create(&out.join(format!("{}.jsonl", s.name())))?,
        );
    }
    let mut files: Vec<String> = inputs.iter().map(|p| p.display().to_string()).collect();
    let reg_idx = files.len() as u32;
    if let Some(r) = &cfg.splits.regression_file {
        files.push(r.display().to_string());
    }
    let general_idx = files.len() as u32;
    files.extend(cfg.mix.general.iter().map(|p| p.display().to_string()));
    let mut run = Run {
        cfg,
        report: Report {
            seed: cfg.seed,
            listed_limit: cfg.listed_limit,
            ..Default::default()
        },
        family: cfg
            .format
            .family()
            .map(|f| (f, "the configuration".to_string())),
        exact: IdMap::default(),
        clusters: IdMap::default(),
        total_bytes: total,
        reserved: false,
        near: NearIndex::new(&cfg.dedup),
        reps: Vec::new(),
        files,
        writers,
        labels: BTreeMap::new(),
        balance: HashMap::new(),
        rejected: SplitWriter::create(&out.join("rejected.jsonl"))?,
        pii: PiiCounts::default(),
        n_pinned_reps: 0,
        judge_scores: 0.0,
        sampling: (!cfg.balance.proportions.is_empty() || cfg.mix.enabled())
            .then(Sampling::default),
    };
    run.report.dedup.threshold = cfg.dedup.threshold;
    run.report.dedup.margin = cfg.dedup.margin;
    run.report.license.allow = cfg.license.allow.clone();
    run.report.license.missing_policy = cfg.license.missing;
    if cfg.judge.enabled {
        run.report.judge.model = Some(cfg.judge.model.clone());
        run.report.judge.threshold = Some(cfg.judge.threshold);
        run.report.judge.weight_below = cfg.judge.weight_below;
        if cfg.judge.weight_below.is_some() {
            run.report.judge.weight = Some(cfg.judge.weight);
        }
    }

    let mut done = 0u64;
    let mut rows = 0u64;
    if let Some(r) = &cfg.splits.regression_file {
        let rep = stream_file(r, reg_idx, true, false, &stage, &mut run, &mut |b, l| {
            on(Event::Progress {
                bytes: b,
                total,
                rows: l,
            })
        })?;
        done += rep.bytes;
        run.report.regression_file = Some(rep);
    }
    let general = cfg
        .mix
        .general
        .iter()
        .enumerate()
        .map(|(i, p)| (p, true, general_idx + i as u32));
    for (p, is_general, idx) in inputs
        .iter()
        .enumerate()
        .map(|(i, p)| (p, false, i as u32))
        .chain(general)
    {
        let base = done;
        let base_rows = rows;
        let rep = stream_file(p, idx, false, is_general, &stage, &mut run, &mut |b, l| {
            on(Event::Progress {
                bytes: base + b,
                total,
                rows: base_rows + l,
            })
        })?;
        done += rep.bytes;
        rows += rep.lines;
        if is_general {
            run.report.general_inputs.push(rep);
        } else {
            run.report.inputs.push(rep);
        }
    }
    sample(&mut run)?;
    if let Some(n) = cfg.select.train_rows {
        select_train(&mut run, &stage, n)?;
    }
    drop(stage);

    let mut report = finish(run, out)?;
    partial.0.clear();
    report.elapsed_s = started.elapsed().as_secs_f64();
    let json = serde_json::to_vec_pretty(&report).expect("report serialises");
    crate::error::write(&out.join("report.json"), json)?;
    if report.counts.kept == 0 {
        let c = &report.counts;
        let why = if c.read == 0 {
            "the inputs have no rows".to_string()
        } else if c.invalid == c.read {
            let first = report
                .invalid
                .first()
                .map(|i| format!("; first: {}:{}: {}", i.file, i.line, i.detail))
                .unwrap_or_default();
            format!("all {} rows are invalid (wrong format?){first}", c.read)
        } else {
            format!(
                "{} rows read: {} invalid, {} license-rejected, {} filtered, {} judged below threshold, {} duplicates, {} over balance caps, {} outside the proportions, {} general rows over the mix ratio",
                c.read,
                c.invalid,
                c.license_rejected,
                c.filtered,
                c.judge_rejected,
                c.exact_duplicates + c.near_duplicates,
                c.balance_dropped,
                c.proportion_dropped,
                c.mix_dropped
            )
        };
        return Err(Error::parse(
            out.join("report.json"),
            format!("no rows left after curation: {why}"),
        ));
    }
    Ok(report)
}

/// Output files removed on drop (with their `.all` rewrite temporaries) unless emptied first.
struct PartialOutputs(Vec<PathBuf>);

impl Drop for PartialOutputs {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
            let _ = std::fs::remove_file(p.with_extension("jsonl.all"));
        }
    }
}

/// Rewrite a split file keeping only the rows whose `keep` flag is set (rows past its end
/// stay), recounting its rows, labels and digest.
fn rewrite_split(run: &mut Run<'_>, split: Split, keep: &[bool]) -> Result<()> {
    let w = run.writers.remove(&split).expect("split open");
    let path = w.path.clone();
    w.finish()?;
    let all = path.with_extension("jsonl.all");
    std::fs::rename(&path, &all).map_err(|e| Error::io(&path, e))?;
    let mut w = SplitWriter::create(&path)?;
    let mut labels = (0u64, 0u64);
    let f = File::open(&all).map_err(|e| Error::io(&all, e))?;
    for (i, l) in BufReader::with_capacity(1 << 20, f).lines().enumerate() {
        let l = l.map_err(|e| Error::io(&all, e))?;
        if !keep.get(i).copied().unwrap_or(true) {
            continue;
        }
        // Only KTO rows carry a boolean label; skip parsing the others.
        if l.contains("\"label\"")
            && let Ok(v) = serde_json::from_str::<Value>(&l)
            && let Some(b) = v.get("label").and_then(Value::as_bool)
        {
            if b { labels.0 += 1 } else { labels.1 += 1 }
        }
        w.write_line(&l)?;
    }
    std::fs::remove_file(&all).map_err(|e| Error::io(&all, e))?;
    run.writers.insert(split, w);
    run.labels.insert(split, labels);
    Ok(())
}

/// Why the sampling pass dropped a row.
#[derive(Clone, Copy, PartialEq)]
enum Sampled {
    Keep,
    Proportion,
    Unlisted,
    Mix,
}

/// Apply `balance.proportions` to the domain rows, then mix general rows in at the ratio, by
/// rewriting the split files (see [`balance`]).
fn sample(run: &mut Run<'_>) -> Result<()> {
    let Some(s) = run.sampling.take() else {
        return Ok(());
    };
    let cfg = run.cfg;
    let mut verdict: BTreeMap<Split, Vec<Sampled>> = s
        .tags
        .iter()
        .map(|(k, v)| (*k, vec![Sampled::Keep; v.len()]))
        .collect();
    // (split, index in its tags, rank) of the rows of each group.
    let mut groups: Vec<Vec<(Split, usize, u64)>> = vec![Vec::new(); s.names.len()];
    let mut general: Vec<(Split, usize, u64)> = Vec::new();
    for (sp, tags) in &s.tags {
        for (i, t) in tags.iter().enumerate() {
            if t.general {
                general.push((*sp, i, t.rank));
            } else {
                groups[t.value as usize].push((*sp, i, t.rank));
            }
        }
    }
    let mut domain_rows: u64 = groups.iter().map(|g| g.len() as u64).sum();
    let props = &cfg.balance.proportions;
    if !props.is_empty() {
        let available: BTreeMap<String, u64> = s
            .names
            .iter()
            .zip(&groups)
            .filter(|(_, g)| !g.is_empty())
            .map(|(n, g)| (n.clone(), g.len() as u64))
            .collect();
        let targets = balance::proportion_targets(props, &available, cfg.balance.total)
            .map_err(Error::Config)?;
        let mut rep = report::BalanceReport {
            field: cfg.balance.field.clone(),
            requested_total: cfg.balance.total,
            sampled: targets.total,
            limited_by: targets.limited_by.clone(),
            ..Default::default()
        };
        for (name, g) in s.names.iter().zip(&groups) {
            if g.is_empty() {
                continue;
            }
            let listed = props.contains_key(name);
            let k = targets.keep.get(name).copied().unwrap_or(0);
            let ranks: Vec<u64> = g.iter().map(|x| x.2).collect();
            for ((sp, i, _), keep) in g.iter().zip(balance::keep_lowest(&ranks, k as usize)) {
                if !keep {
                    verdict.get_mut(sp).expect("split")[*i] = if listed {
                        Sampled::Proportion
                    } else {
                        Sampled::Unlisted
                    };
                }
            }
            if !listed {
                rep.unlisted.insert(name.clone(), g.len() as u64);
            }
        }
        for (name, share) in props {
            let kept = targets.keep.get(name).copied().unwrap_or(0);
            let requested = cfg
                .balance
                .total
                .map(|t| (share * t as f64 / props.values().sum::<f64>()).round() as u64);
            rep.values.insert(
                name.clone(),
                report::ValueShare {
                    target: *share,
                    available: available.get(name).copied().unwrap_or(0),
                    kept,
                    achieved: kept as f64 / targets.total.max(1) as f64,
                    requested,
                    shortfall: requested.map_or(0, |r| r.saturating_sub(kept)),
                },
            );
        }
        if let Some(t) = cfg.balance.total
            && targets.total < t
        {
            run.report.warnings.push(format!(
                "balance: {} rows meet the proportions, {t} were asked for (short by {}); limited by {}",
                targets.total,
                t - targets.total,
                targets.limited_by.join(", ")
            ));
        }
        if !rep.unlisted.is_empty() {
            let u: Vec<String> = rep
                .unlisted
                .iter()
                .map(|(k, n)| format!("{k} ({n})"))
                .collect();
            run.report.warnings.push(format!(
                "balance: rows whose {} has no proportion were dropped: {}",
                cfg.balance.field,
                u.join(", ")
            ));
        }
        domain_rows = targets.total;
        run.report.balance = Some(rep);
    }
    if let Some((a, b)) = cfg.mix.parts().map_err(Error::Config)? {
        let available = general.len() as u64;
        let want = balance::general_target(domain_rows, (a, b), u64::MAX);
        let k = want.min(available);
        let ranks: Vec<u64> = general.iter().map(|x| x.2).collect();
        for ((sp, i, _), keep) in general.iter().zip(balance::keep_lowest(&ranks, k as usize)) {
            if !keep {
                verdict.get_mut(sp).expect("split")[*i] = Sampled::Mix;
            }
        }
        let achieved = balance::format_ratio(a, k, domain_rows);
        if k < want {
            run.report.warnings.push(format!(
                "mix: {want} general rows wanted at {} for {domain_rows} domain rows, only {available} available; achieved {achieved}",
                cfg.mix.ratio.as_deref().unwrap_or_default()
            ));
        }
        run.report.mix = Some(report::MixReport {
            ratio: cfg.mix.ratio.clone().unwrap_or_default(),
            target_general_share: a / (a + b),
            domain_rows,
            general_available: available,
            general_kept: k,
            achieved_ratio: achieved,
            achieved_general_share: k as f64 / (k + domain_rows).max(1) as f64,
            origin_field: cfg.mix.origin_field.clone(),
        });
    }
    for (sp, tags) in &s.tags {
        let v = &verdict[sp];
        if v.iter().all(|d| *d == Sampled::Keep) {
            continue;
        }
        let rows = run.writers[sp].rows as usize;
        let mut keep = vec![true; rows];
        for (t, d) in tags.iter().zip(v) {
            let (reason, detail) = match d {
                Sampled::Keep => continue,
                Sampled::Proportion => (
                    "proportions",
                    format!(
                        "{} {:?}: not in the sample meeting balance.proportions",
                        cfg.balance.field, s.names[t.value as usize]
                    ),
                ),
                Sampled::Unlisted => (
                    "proportions",
                    format!(
                        "{} {:?} has no share in balance.proportions",
                        cfg.balance.field, s.names[t.value as usize]
                    ),
                ),
                Sampled::Mix => ("mix", "general row over the mix ratio".to_string()),
            };
            keep[t.pos as usize] = false;
            if *d == Sampled::Mix {
                run.report.counts.mix_dropped += 1;
            } else {
                run.report.counts.proportion_dropped += 1;
            }
            run.report.counts.kept -= 1;
            *run.report
                .rejected_by_reason
                .entry(reason.into())
                .or_default() += 1;
            if let Some(n) = run.report.sources.get_mut(&s.names[t.value as usize]) {
                *n -= 1;
            }
            run.issue(t.file, t.line as u64, reason, detail, false)?;
        }
        rewrite_split(run, *sp, &keep)?;
    }
    run.report.sources.retain(|_, n| *n > 0);
    Ok(())
}

/// Replace train.jsonl by the `n` rows MMR selects from it (kept in their order).
fn select_train(run: &mut Run<'_>, stage: &Stage, n: usize) -> Result<()> {
    let path = run.writers[&Split::Train].path.clone();
    let from = run.writers[&Split::Train].rows;
    run.writers
        .get_mut(&Split::Train)
        .expect("train split open")
        .flush()?;
    let mut sigs = Vec::with_capacity(from as usize);
    let mut rel = Vec::with_capacity(from as usize);
    let field = stage.cfg.select.relevance_field.as_deref();
    {
        let f = File::open(&path).map_err(|e| Error::io(&path, e))?;
        for l in BufReader::new(f).lines() {
            let l = l.map_err(|e| Error::io(&path, e))?;
            let v: Value = serde_json::from_str(&l).map_err(|e| Error::parse(&path, e))?;
            rel.push(
                field
                    .and_then(|k| v.get(k))
                    .and_then(Value::as_f64)
                    .unwrap_or(1.0),
            );
            let row = format::validate(v).map_err(|e| Error::parse(&path, e))?;
            let text = dedup::dedup_text(&format::content_text(&row));
            sigs.push(stage.hasher.signature(&text));
        }
    }
    let picks = select::mmr_select_signatures(&sigs, n, stage.cfg.select.lambda, Some(&rel));
    drop(sigs);
    let mut keep = vec![false; from as usize];
    for p in &picks {
        keep[*p] = true;
    }
    rewrite_split(run, Split::Train, &keep)?;
    let selected = run.writers[&Split::Train].rows;
    run.report.counts.kept -= from - selected;
    run.report.counts.not_selected = from - selected;
    run.report.selection = Some(report::SelectionReport {
        split: "train".into(),
        from,
        selected,
        lambda: stage.cfg.select.lambda,
    });
    Ok(())
}

fn finish(mut run: Run<'_>, out: &Path) -> Result<Report> {
    if run.report.judge.scored > 0 {
        run.report.judge.mean_score = Some(run.judge_scores / run.report.judge.scored as f64);
    }
    let Run {
        cfg,
        mut report,
        family,
        writers,
        labels,
        rejected,
        pii,
        ..
    } = run;
    rejected.finish()?;
    report.format = family.map(|(f, _)| f);
    for k in PiiKind::ALL {
        if pii.get(k) > 0 {
            report.pii.insert(k.name().to_string(), pii.get(k));
        }
    }
    let kto = report.format == Some(Family::Kto);
    for (split, w) in writers {
        let rows = w.rows;
        let path = w.path.clone();
        let sha256 = w.finish()?;
        let (d, u) = labels.get(&split).copied().unwrap_or_default();
        let expected = cfg.splits.fraction(split) > 0.0
            || (split == Split::Regression && cfg.splits.regression_file.is_some());
        if rows == 0 && expected && report.counts.kept > 0 {
            report.warnings.push(format!(
                "split {} is empty ({} rows kept in all; fraction {})",
                split.name(),
                report.counts.kept,
                cfg.splits.fraction(split)
            ));
        }
        if kto && rows > 0 && (d == 0 || u == 0) {
            report.warnings.push(format!(
                "KTO split {} has only {} examples ({} rows)",
                split.name(),
                if d == 0 {
                    "undesirable (label false)"
                } else {
                    "desirable (label true)"
                },
                rows
            ));
        }
        report.splits.insert(
            split.name().to_string(),
            SplitReport {
                path: path
                    .strip_prefix(out)
                    .map(Path::to_path_buf)
                    .unwrap_or(path),
                rows,
                sha256,
                desirable: kto.then_some(d),
                undesirable: kto.then_some(u),
            },
        );
    }
    if report.counts.invalid > 0 {
        report.warnings.push(format!(
            "{} invalid rows (see report.json \"invalid\" and rejected.jsonl)",
            report.counts.invalid
        ));
    }
    report.dedup.exact = report.counts.exact_duplicates;
    report.dedup.near = report.counts.near_duplicates;
    Ok(report)
}
