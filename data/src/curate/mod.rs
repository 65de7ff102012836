//! Data curation: raw JSONL in, train/val/holdout/regression splits and `report.json` out.
//!
//! [`curate`] is a list of stages, each in the file that owns it:
//!
//! 1. `config.rs`: the configuration is checked before any row is read.
//! 2. `run.rs`: one streaming pass over the inputs, in batches. Each batch goes through
//!    `screen.rs` in parallel (rayon): parsed, validated, normalised, PII-masked (`pii.rs`),
//!    license- and quality-filtered (`filters.rs`) and MinHashed. Then, in input order, rows
//!    are deduplicated (`dedup.rs`: exact key, then MinHash LSH), scored by the optional
//!    curation judge (`judge.rs`), capped by the balance rules, assigned a split from their
//!    content and the seed (`splits.rs`) and written. Memory holds one batch of rows plus,
//!    per kept row, its exact key and its LSH entries, never the texts.
//! 3. `balance.rs`: target proportions and general:domain mixing rewrite the split files
//!    from what was recorded per row (a rank and a group), again without holding texts.
//! 4. `select.rs`: diversity selection of the train split by maximal marginal relevance.
//! 5. `report.rs`: report.json, its summary, and the reasons rows were not kept.
//!
//! `loraops data synth` (`crate::synth`) screens and dedups its candidates with the same
//! [`screen::Screen`] and [`dedup::Index`].
//!
//! Duplicates are dropped and only one representative of a cluster is written, so no cluster
//! spans two splits; pinned regression rows are indexed first, so input rows that duplicate
//! them are dropped rather than leaking into train.
//!
//! Configuration (`loraops data curate --config FILE`; every key optional; the main keys and
//! their defaults, the others are documented on the fields of `CurateConfig` and its parts):
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
//! languages = []              # e.g. ["eng", "kor"]; empty: all
//! banned_terms = []           # e.g. ["..."]
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
pub mod config;
pub mod dedup;
pub mod filters;
pub mod judge;
pub mod pii;
pub mod report;
mod run;
pub mod screen;
pub mod select;
pub mod splits;

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::{Error, Result};
pub use balance::{BalanceConfig, MixConfig};
pub use config::{CurateConfig, SelectConfig};
use report::Report;
use run::{PartialOutputs, Run};
use screen::Stage;

/// Progress of a run: bytes of the inputs read so far, of `total`, and rows read.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub bytes: u64,
    pub total: u64,
    pub rows: u64,
}

/// Curate `inputs` into `out`: `train.jsonl`, `val.jsonl`, `holdout.jsonl`,
/// `regression.jsonl`, `rejected.jsonl` (every row not kept, with its reason) and
/// `report.json`. Returns the report; when no row is left, writes the report and fails.
/// The general files of `[curate.mix]` are read after the inputs.
pub fn curate(
    inputs: &[PathBuf],
    out: &Path,
    cfg: &CurateConfig,
    on: &mut dyn FnMut(Progress),
) -> Result<Report> {
    let started = Instant::now();
    cfg.check()?;
    let total = run::input_bytes(inputs, cfg)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    // Until the splits are complete, a failure removes what was written: no half-written
    // split is ever left to be trained on.
    let partial = PartialOutputs::of(out);
    let stage = Stage::new(cfg)?;
    let mut run = Run::open(inputs, out, cfg, total)?;
    run.read_all(inputs, &stage, on)?;
    balance::apply(&mut run)?;
    if let Some(n) = cfg.select.train_rows {
        select::apply(&mut run, &stage.screen, n)?;
    }
    drop(stage);
    let mut report = run.finish(out)?;
    partial.keep();
    report.elapsed_s = started.elapsed().as_secs_f64();
    let path = out.join("report.json");
    let json = serde_json::to_vec_pretty(&report).expect("report serialises");
    crate::error::write(&path, json)?;
    if report.counts.kept == 0 {
        return Err(Error::NothingKept {
            report: path,
            why: report.why_nothing_kept(),
        });
    }
    Ok(report)
}
