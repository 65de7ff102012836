//! The streaming pass: [`Run`] reads every file in batches, runs the parallel [`Stage`] on each
//! batch, then, in input order, dedups, judges, caps, assigns a split and writes each row,
//! keeping the report's books as it goes.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::Progress;
use super::balance;
use super::config::CurateConfig;
use super::dedup::{IdMap, Index, Seen};
use super::filters::MissingLicense;
use super::pii::PiiCounts;
use super::pii::PiiKind;
use super::report::{Cluster, DupMember, InputReport, Loc, Reason, Report, RowIssue, SplitReport};
use super::screen::{Kept, Outcome, Stage};
use super::splits::SplitWriter;
use crate::format::{Family, Split};
use crate::{Error, Result};

/// Where a representative came from.
struct RepInfo {
    file: u32,
    line: u32,
}

/// What proportions and mixing need of one written row.
pub(super) struct RowTag {
    pub rank: u64,
    /// Its row index in its split file.
    pub pos: u64,
    pub file: u32,
    pub line: u32,
    /// Index of its balance value in [`Sampling::names`].
    pub value: u32,
    pub general: bool,
}

/// Rows recorded for the pass after streaming (only when proportions or mixing are set).
#[derive(Default)]
pub(super) struct Sampling {
    pub ids: HashMap<String, u32>,
    pub names: Vec<String>,
    pub tags: BTreeMap<Split, Vec<RowTag>>,
}

/// A curation run's state: its open outputs, the dedup index and the report so far.
pub(super) struct Run<'a> {
    pub cfg: &'a CurateConfig,
    pub report: Report,
    pub family: Option<(Family, String)>,
    index: Index,
    /// Representative → index of its example cluster in the report.
    clusters: IdMap<u32, u32>,
    /// Input bytes in all, for sizing the index after the first batch.
    total_bytes: u64,
    reserved: bool,
    reps: Vec<RepInfo>,
    files: Vec<String>,
    pub writers: BTreeMap<Split, SplitWriter>,
    pub labels: BTreeMap<Split, (u64, u64)>,
    balance: HashMap<String, u64>,
    pub rejected: SplitWriter,
    pub pii: PiiCounts,
    n_pinned_reps: u32,
    pub judge_scores: f64,
    pub sampling: Option<Sampling>,
}

/// The bytes of every file a run reads (inputs, the pinned regression rows, general rows).
pub(super) fn input_bytes(inputs: &[PathBuf], cfg: &CurateConfig) -> Result<u64> {
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
    Ok(total)
}

/// The path of a split's file.
fn split_path(out: &Path, s: Split) -> PathBuf {
    out.join(format!("{}.jsonl", s.name()))
}

/// Output files removed on drop (with their `.all` rewrite temporaries) unless kept.
pub(super) struct PartialOutputs(Vec<PathBuf>);

impl PartialOutputs {
    /// Every file a run writes but report.json.
    pub fn of(out: &Path) -> Self {
        Self(
            Split::ALL
                .iter()
                .map(|s| split_path(out, *s))
                .chain([out.join("rejected.jsonl")])
                .collect(),
        )
    }

    /// The run is complete: leave its files.
    pub fn keep(mut self) {
        self.0.clear();
    }
}

impl Drop for PartialOutputs {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
            let _ = std::fs::remove_file(p.with_extension("jsonl.all"));
        }
    }
}

impl<'a> Run<'a> {
    /// Open the outputs under `out` and start the report from the configuration.
    pub fn open(inputs: &[PathBuf], out: &Path, cfg: &'a CurateConfig, total: u64) -> Result<Self> {
        let mut writers = BTreeMap::new();
        for s in Split::ALL {
            writers.insert(s, SplitWriter::create(&split_path(out, s))?);
        }
        let mut files: Vec<String> = inputs.iter().map(|p| p.display().to_string()).collect();
        files.extend(
            cfg.splits
                .regression_file
                .iter()
                .map(|r| r.display().to_string()),
        );
        files.extend(cfg.mix.general.iter().map(|p| p.display().to_string()));
        let mut report = Report {
            seed: cfg.seed,
            listed_limit: cfg.listed_limit,
            ..Default::default()
        };
        report.dedup.threshold = cfg.dedup.threshold;
        report.dedup.margin = cfg.dedup.margin;
        report.license.allow = cfg.license.allow.clone();
        report.license.missing_policy = cfg.license.missing;
        if cfg.judge.enabled {
            report.judge.model = Some(cfg.judge.model.clone());
            report.judge.threshold = Some(cfg.judge.threshold);
            report.judge.weight_below = cfg.judge.weight_below;
            if cfg.judge.weight_below.is_some() {
                report.judge.weight = Some(cfg.judge.weight);
            }
        }
        Ok(Run {
            cfg,
            report,
            family: cfg
                .format
                .family()
                .map(|f| (f, "the configuration".to_string())),
            index: Index::new(&cfg.dedup),
            clusters: IdMap::default(),
            total_bytes: total,
            reserved: false,
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
        })
    }

    /// Stream the pinned regression rows (indexed first, so that input rows duplicating them
    /// are dropped), then the inputs, then the general rows of `[curate.mix]`.
    pub fn read_all(
        &mut self,
        inputs: &[PathBuf],
        stage: &Stage,
        on: &mut dyn FnMut(Progress),
    ) -> Result<()> {
        let cfg = self.cfg;
        let total = self.total_bytes;
        let reg_idx = inputs.len() as u32;
        let general_idx = reg_idx + u32::from(cfg.splits.regression_file.is_some());
        let mut done = 0u64;
        let mut rows = 0u64;
        if let Some(r) = &cfg.splits.regression_file {
            let rep = self.stream_file(r, reg_idx, true, false, stage, &mut |b, l| {
                on(Progress {
                    bytes: b,
                    total,
                    rows: l,
                })
            })?;
            done += rep.bytes;
            self.report.regression_file = Some(rep);
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
            let rep = self.stream_file(p, idx, false, is_general, stage, &mut |b, l| {
                on(Progress {
                    bytes: base + b,
                    total,
                    rows: base_rows + l,
                })
            })?;
            done += rep.bytes;
            rows += rep.lines;
            if is_general {
                self.report.general_inputs.push(rep);
            } else {
                self.report.inputs.push(rep);
            }
        }
        Ok(())
    }

    /// Read one file in batches, run the parallel stage on each batch and take the results
    /// in order.
    fn stream_file(
        &mut self,
        path: &Path,
        file: u32,
        pinned: bool,
        general: bool,
        stage: &Stage,
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
            if !self.reserved && !pinned {
                // Size the index for the whole input once, instead of growing it by doubling.
                let batch_bytes: usize = buf.iter().map(Vec::len).sum();
                let est = self.total_bytes as f64 * buf.len() as f64 / batch_bytes.max(1) as f64;
                let est = (est * 1.05) as usize;
                self.index.reserve(est, stage.cfg.dedup.near);
                self.reps.reserve(est);
                self.reserved = true;
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
                    self.report.counts.read += 1;
                }
                let line = first + i as u64;
                if let Some(k) = self.take(o, file, line, pinned)? {
                    kept.push((k, line));
                }
            }
            if pinned {
                for (k, line) in kept {
                    self.emit(*k, file, line, pinned)?;
                }
            } else {
                self.judge_and_emit(kept, file, stage)?;
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

    /// The judge's stage: it sees only rows that survived everything else, a batch at a
    /// time; rows it scores under the threshold are dropped, rows under `weight_below` are
    /// written down-weighted.
    fn judge_and_emit(
        &mut self,
        kept: Vec<(Box<Kept>, u64)>,
        file: u32,
        stage: &Stage,
    ) -> Result<()> {
        let Some(j) = stage.judge.as_ref().filter(|_| !kept.is_empty()) else {
            for (k, line) in kept {
                self.emit(*k, file, line, false)?;
            }
            return Ok(());
        };
        let texts: Vec<&str> = kept.iter().map(|(k, _)| k.content.as_str()).collect();
        let scores = j.score_all(&texts).map_err(|e| e.into_error())?;
        for ((mut k, line), s) in kept.into_iter().zip(scores) {
            self.judge_scores += s.score;
            self.report.judge.scored += 1;
            if s.score < j.threshold() {
                self.report.judge.rejected += 1;
                self.report.counts.judge_rejected += 1;
                self.count_reason(Reason::Judge);
                let detail = format!("judge score {} < {}: {}", s.score, j.threshold(), s.reason);
                self.issue(file, line, Reason::Judge, detail, true)?;
                continue;
            }
            let factor = j.weight_for(s.score);
            if factor != 1.0 {
                self.report.judge.weighted += 1;
                k.line = reweighted(&k.line, factor);
            }
            self.emit(*k, file, line, false)?;
        }
        Ok(())
    }

    /// One more row dropped for `reason` in report.json's `rejected_by_reason`.
    pub fn count_reason(&mut self, reason: Reason) {
        *self
            .report
            .rejected_by_reason
            .entry(reason.as_str().into())
            .or_default() += 1;
    }

    /// Record a row not kept in rejected.jsonl, and in report.json's lists when `list`.
    pub fn issue(
        &mut self,
        file: u32,
        line: u64,
        reason: Reason,
        detail: String,
        list: bool,
    ) -> Result<()> {
        let issue = RowIssue {
            file: self.files[file as usize].clone(),
            line,
            reason,
            detail,
        };
        self.rejected
            .write_line(&serde_json::to_string(&issue).expect("JSON"))?;
        if list {
            let lim = self.cfg.listed_limit;
            let v = if reason == Reason::Invalid {
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

    fn add_dup(&mut self, rep: u32, file: u32, line: u64, jaccard: Option<f64>) -> Result<()> {
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
                    kind: if jaccard.is_some() { "near" } else { "exact" }.to_string(),
                    jaccard: jaccard.unwrap_or(1.0),
                });
            }
        }
        let (reason, detail) = match jaccard {
            None => (
                Reason::ExactDuplicate,
                format!("exact duplicate of {rep_loc}"),
            ),
            Some(j) => (
                Reason::NearDuplicate,
                format!("near duplicate of {rep_loc} (estimated Jaccard {j:.2})"),
            ),
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
                self.issue(file, line, Reason::Invalid, msg, true)?;
            }
            Outcome::Rejected {
                family,
                reason,
                detail,
                license,
            } => {
                if let Err(msg) = self.family_ok(family, file, line) {
                    self.report.counts.invalid += 1;
                    return self
                        .issue(file, line, Reason::Invalid, msg, true)
                        .map(|_| None);
                }
                if reason == Reason::License {
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
                self.count_reason(reason);
                self.issue(file, line, reason, detail, true)?;
            }
            Outcome::Keep(k) => {
                if let Err(msg) = self.family_ok(k.family, file, line) {
                    self.report.counts.invalid += 1;
                    return self
                        .issue(file, line, Reason::Invalid, msg, true)
                        .map(|_| None);
                }
                // Exact, then near dedup; a new row becomes a representative.
                match self
                    .index
                    .check(k.key, k.sig.as_deref(), self.cfg.dedup.exact)
                {
                    Seen::Exact { rep } => {
                        self.report.counts.exact_duplicates += 1;
                        return self.add_dup(rep, file, line, None).map(|_| None);
                    }
                    Seen::Near { rep, jaccard } => {
                        self.report.counts.near_duplicates += 1;
                        return self.add_dup(rep, file, line, Some(jaccard)).map(|_| None);
                    }
                    Seen::New { rep: Some(_) } => {
                        self.reps.push(RepInfo {
                            file,
                            line: line as u32,
                        });
                        if pinned {
                            self.n_pinned_reps = self.index.len();
                        }
                    }
                    Seen::New { rep: None } => {}
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
                self.count_reason(Reason::Balance);
                let detail = format!("{} {:?} is over its cap", b.field, k.balance);
                return self.issue(file, line, Reason::Balance, detail, true);
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

    /// Rewrite a split file keeping only the rows whose `keep` flag is set (rows past its end
    /// stay), recounting its rows, labels and digest.
    pub fn rewrite_split(&mut self, split: Split, keep: &[bool]) -> Result<()> {
        let w = self.writers.remove(&split).expect("split open");
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
        self.writers.insert(split, w);
        self.labels.insert(split, labels);
        Ok(())
    }

    /// Close the outputs and complete the report from what they hold.
    pub fn finish(self, out: &Path) -> Result<Report> {
        let mut run = self;
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
}

/// The row `line` with its `weight` (1 when it has none) multiplied by `factor`.
fn reweighted(line: &str, factor: f64) -> String {
    let mut v: Value = serde_json::from_str(line).expect("a row written by this run");
    let w = v.get("weight").and_then(Value::as_f64).unwrap_or(1.0) * factor;
    v["weight"] = Value::from(w);
    serde_json::to_string(&v).expect("JSON serialises")
}
