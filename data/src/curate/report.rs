//! `report.json` and the readable summary.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::filters::MissingLicense;
use crate::row::Family;

/// Why a row, or a synthetic candidate, was not kept: the `reason` of `rejected.jsonl` and of
/// report.json, which names it in snake case (`exact_duplicate`, `too_short`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Not a row of a supported format (or of the run's family).
    Invalid,
    /// Its license is not allowed, or it has none and the policy drops such rows.
    License,
    // The quality filters (`filters.rs`).
    TooShort,
    TooLong,
    CharRun,
    Repetition,
    BannedTerm,
    Language,
    ExactDuplicate,
    NearDuplicate,
    /// The judge scored it below the threshold (or, in synth, gave no score).
    Judge,
    /// Over its `balance` cap.
    Balance,
    /// Outside the sample meeting `balance.proportions`.
    Proportions,
    /// A general row over the mix ratio.
    Mix,
    // Synthetic candidates only.
    GenerationError,
    EmptyInstruction,
    EmptyAnswer,
}

impl Reason {
    /// The name report.json uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Invalid => "invalid",
            Reason::License => "license",
            Reason::TooShort => "too_short",
            Reason::TooLong => "too_long",
            Reason::CharRun => "char_run",
            Reason::Repetition => "repetition",
            Reason::BannedTerm => "banned_term",
            Reason::Language => "language",
            Reason::ExactDuplicate => "exact_duplicate",
            Reason::NearDuplicate => "near_duplicate",
            Reason::Judge => "judge",
            Reason::Balance => "balance",
            Reason::Proportions => "proportions",
            Reason::Mix => "mix",
            Reason::GenerationError => "generation_error",
            Reason::EmptyInstruction => "empty_instruction",
            Reason::EmptyAnswer => "empty_answer",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for Reason {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// A row's place in the input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Loc {
    pub file: String,
    pub line: u64,
}

/// A row that was not kept, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RowIssue {
    pub file: String,
    pub line: u64,
    pub reason: Reason,
    pub detail: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct InputReport {
    pub path: PathBuf,
    pub lines: u64,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Counts {
    /// Non-blank lines read from the inputs (not counting the pinned regression file).
    pub read: u64,
    pub blank: u64,
    pub invalid: u64,
    pub license_rejected: u64,
    pub filtered: u64,
    pub balance_dropped: u64,
    pub judge_rejected: u64,
    /// Train rows left out by diversity selection.
    pub not_selected: u64,
    /// Domain rows left out of the sample meeting `balance.proportions`.
    pub proportion_dropped: u64,
    /// General rows left out to meet the mix ratio.
    pub mix_dropped: u64,
    pub exact_duplicates: u64,
    pub near_duplicates: u64,
    /// Rows written to a split (pinned regression rows included).
    pub kept: u64,
    pub pinned_regression: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DupMember {
    pub file: String,
    pub line: u64,
    /// `exact` or `near`.
    pub kind: String,
    /// Estimated Jaccard similarity to the representative (1 for exact).
    pub jaccard: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cluster {
    pub representative: Loc,
    pub size: u64,
    pub duplicates: Vec<DupMember>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DedupReport {
    pub exact: u64,
    pub near: u64,
    pub threshold: f64,
    /// Estimates this far below `threshold` still count.
    pub margin: f64,
    /// Duplicates of pinned regression rows dropped from the input.
    pub of_regression: u64,
    pub clusters: Vec<Cluster>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LicenseReport {
    pub allow: Vec<String>,
    pub missing_policy: MissingLicense,
    /// Kept rows per license value (`(none)` for rows without one).
    pub kept: BTreeMap<String, u64>,
    pub rejected: BTreeMap<String, u64>,
    pub missing: u64,
    /// Rows kept without a license under the `flag` policy.
    pub flagged: Vec<Loc>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SelectionReport {
    pub split: String,
    pub from: u64,
    pub selected: u64,
    pub lambda: f64,
}

/// One value of the balance field under target proportions.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ValueShare {
    /// The target share.
    pub target: f64,
    /// Domain rows with this value after dedup, filters and caps.
    pub available: u64,
    pub kept: u64,
    /// `kept` over all rows kept by the proportions.
    pub achieved: f64,
    /// With `balance.total`: rows asked for (`target * total`), and how many are missing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requested: Option<u64>,
    pub shortfall: u64,
}

/// Target proportions, when configured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BalanceReport {
    pub field: String,
    /// `balance.total`, if set.
    pub requested_total: Option<u64>,
    /// Domain rows kept by the proportions.
    pub sampled: u64,
    pub values: BTreeMap<String, ValueShare>,
    /// Values all of whose rows are kept: they bound the sample.
    pub limited_by: Vec<String>,
    /// Rows dropped because their value has no target, per value.
    pub unlisted: BTreeMap<String, u64>,
}

/// General:domain mixing, when configured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MixReport {
    /// The requested `general:domain`.
    pub ratio: String,
    /// The requested share of general rows among all mixed rows.
    pub target_general_share: f64,
    pub domain_rows: u64,
    /// General rows after dedup (against the domain rows too), filters and caps.
    pub general_available: u64,
    pub general_kept: u64,
    /// The achieved `general:domain`, scaled to the requested general part.
    pub achieved_ratio: String,
    pub achieved_general_share: f64,
    /// The field holding each written row's origin.
    pub origin_field: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct JudgeReport {
    pub model: Option<String>,
    pub threshold: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_below: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
    pub scored: u64,
    pub rejected: u64,
    /// Rows kept with their weight multiplied by `weight` (scored under `weight_below`).
    #[serde(default)]
    pub weighted: u64,
    pub mean_score: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SplitReport {
    pub path: PathBuf,
    pub rows: u64,
    pub sha256: String,
    /// KTO: rows with label true / false.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub desirable: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub undesirable: Option<u64>,
}

/// Everything a curation run did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub format: Option<Family>,
    pub seed: u64,
    pub inputs: Vec<InputReport>,
    pub regression_file: Option<InputReport>,
    /// General files mixed in (`[curate.mix]`).
    #[serde(default)]
    pub general_inputs: Vec<InputReport>,
    pub counts: Counts,
    /// Invalid rows with line numbers (the first `listed_limit`; all are in rejected.jsonl).
    pub invalid: Vec<RowIssue>,
    /// Rows dropped by the license or quality filters, per reason code.
    pub rejected_by_reason: BTreeMap<String, u64>,
    /// The first `listed_limit` of them.
    pub rejected: Vec<RowIssue>,
    pub dedup: DedupReport,
    /// Masked values per PII type in the kept rows.
    pub pii: BTreeMap<String, u64>,
    pub pii_rows: u64,
    pub license: LicenseReport,
    /// The LLM judge, when enabled.
    pub judge: JudgeReport,
    /// Diversity selection, when configured.
    pub selection: Option<SelectionReport>,
    /// Target proportions, when configured.
    pub balance: Option<BalanceReport>,
    /// General:domain mixing, when configured.
    pub mix: Option<MixReport>,
    /// Kept rows per balance value (the `balance.field`, `source` by default).
    pub sources: BTreeMap<String, u64>,
    pub splits: BTreeMap<String, SplitReport>,
    pub warnings: Vec<String>,
    pub listed_limit: usize,
    pub elapsed_s: f64,
}

impl Report {
    /// A human-readable summary.
    pub fn summary(&self) -> String {
        let c = &self.counts;
        let mut s = String::new();
        let fam = self.format.map(|f| f.describe()).unwrap_or("(none)");
        let _ = writeln!(s, "format: {fam}   seed: {}", self.seed);
        let _ = writeln!(
            s,
            "read {} rows from {} file(s) in {:.1}s: {} kept, {} invalid, {} license-rejected, {} filtered, {} exact dups, {} near dups, {} over balance caps",
            c.read,
            self.inputs.len(),
            self.elapsed_s,
            c.kept,
            c.invalid,
            c.license_rejected,
            c.filtered,
            c.exact_duplicates,
            c.near_duplicates,
            c.balance_dropped
        );
        if c.pinned_regression > 0 {
            let _ = writeln!(
                s,
                "pinned regression rows: {} ({} input rows dropped as their duplicates)",
                c.pinned_regression, self.dedup.of_regression
            );
        }
        for i in self.invalid.iter().take(5) {
            let _ = writeln!(s, "  invalid {}:{}: {}", i.file, i.line, i.detail);
        }
        if c.invalid > 5 {
            let _ = writeln!(
                s,
                "  … {} more invalid rows (report.json, rejected.jsonl)",
                c.invalid - 5
            );
        }
        if !self.rejected_by_reason.is_empty() {
            let r: Vec<String> = self
                .rejected_by_reason
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            let _ = writeln!(s, "rejected: {}", r.join(", "));
        }
        if let (Some(m), Some(t)) = (&self.judge.model, self.judge.threshold) {
            let _ = writeln!(
                s,
                "judge {m}: {} scored, {} below {t}, mean score {:.2}",
                self.judge.scored,
                self.judge.rejected,
                self.judge.mean_score.unwrap_or(0.0)
            );
            if let (Some(below), Some(w)) = (self.judge.weight_below, self.judge.weight) {
                let _ = writeln!(
                    s,
                    "judge: {} rows below {below} kept with weight x{w}",
                    self.judge.weighted
                );
            }
        }
        if let Some(b) = &self.balance {
            let v: Vec<String> = b
                .values
                .iter()
                .map(|(k, v)| {
                    format!(
                        "{k} {}/{} ({:.3}, target {:.3})",
                        v.kept, v.available, v.achieved, v.target
                    )
                })
                .collect();
            let _ = writeln!(
                s,
                "proportions by {}: {} rows: {}",
                b.field,
                b.sampled,
                v.join(", ")
            );
        }
        if let Some(m) = &self.mix {
            let _ = writeln!(
                s,
                "mix general:domain {} requested, {} achieved ({} general of {} available, {} domain)",
                m.ratio, m.achieved_ratio, m.general_kept, m.general_available, m.domain_rows
            );
        }
        if let Some(sel) = &self.selection {
            let _ = writeln!(
                s,
                "MMR selection (lambda {}): {} of {} {} rows",
                sel.lambda, sel.selected, sel.from, sel.split
            );
        }
        if !self.pii.is_empty() {
            let p: Vec<String> = self.pii.iter().map(|(k, v)| format!("{k} {v}")).collect();
            let _ = writeln!(s, "PII masked in {} rows: {}", self.pii_rows, p.join(", "));
        }
        let _ = writeln!(s, "{:<11} {:>9}  sha256", "split", "rows");
        let order = crate::format::Split::ALL.map(|s| s.name());
        let mut splits: Vec<(&String, &SplitReport)> = self.splits.iter().collect();
        splits.sort_by_key(|(n, _)| order.iter().position(|o| o == n));
        for (name, r) in splits {
            let labels = match (r.desirable, r.undesirable) {
                (Some(d), Some(u)) => format!("  (label true {d}, false {u})"),
                _ => String::new(),
            };
            let _ = writeln!(s, "{name:<11} {:>9}  {}{labels}", r.rows, r.sha256);
        }
        for w in &self.warnings {
            let _ = writeln!(s, "warning: {w}");
        }
        s
    }
}

impl Report {
    /// Why no row was kept, for the error of a run that kept none.
    pub fn why_nothing_kept(&self) -> String {
        let c = &self.counts;
        let why = if c.read == 0 {
            "the inputs have no rows".to_string()
        } else if c.invalid == c.read {
            let first = self
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
        format!("no rows left after curation: {why}")
    }
}
