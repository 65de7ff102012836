//! Diversity selection: pick `n` rows by maximal marginal relevance over MinHash similarity.
//!
//! Greedy MMR: each step takes the row maximising
//! `lambda * relevance - (1 - lambda) * max similarity to the rows already taken`, where
//! similarity is the Jaccard estimate of two MinHash signatures. Each step updates every
//! candidate's similarity to the newest pick only, so the cost is O(rows × n × signature).

use std::fs::File;
use std::io::{BufRead, BufReader};

use serde_json::Value;

use super::dedup::{DedupConfig, MinHasher, dedup_text};
use super::report::SelectionReport;
use super::run::Run;
use super::screen::Screen;
use crate::format::{self, Split};
use crate::{Error, Result};

/// Indices of the `n` rows MMR selects, in selection order. `relevance` (same length as
/// `texts`, higher is better) defaults to 1 for every row, which makes the selection
/// farthest-first: the most mutually dissimilar rows. Ties go to the earlier row.
pub fn mmr_select(texts: &[&str], n: usize, lambda: f64, relevance: Option<&[f64]>) -> Vec<usize> {
    let hasher = MinHasher::new(&DedupConfig::default());
    let sigs: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| hasher.signature(&dedup_text(t)))
        .collect();
    mmr_select_signatures(&sigs, n, lambda, relevance)
}

/// [`mmr_select`] on precomputed signatures.
pub fn mmr_select_signatures(
    sigs: &[Vec<u32>],
    n: usize,
    lambda: f64,
    relevance: Option<&[f64]>,
) -> Vec<usize> {
    let m = sigs.len();
    let n = n.min(m);
    let rel = |i: usize| relevance.map_or(1.0, |r| r[i]);
    let sim = |a: &[u32], b: &[u32]| {
        a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / a.len().max(1) as f64
    };
    let mut max_sim = vec![0.0f64; m];
    let mut taken = vec![false; m];
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let mut best: Option<(usize, f64)> = None;
        for i in 0..m {
            if taken[i] {
                continue;
            }
            let score = lambda * rel(i) - (1.0 - lambda) * max_sim[i];
            if best.is_none_or(|(_, b)| score > b) {
                best = Some((i, score));
            }
        }
        let Some((pick, _)) = best else { break };
        taken[pick] = true;
        out.push(pick);
        for i in 0..m {
            if !taken[i] {
                max_sim[i] = max_sim[i].max(sim(&sigs[i], &sigs[pick]));
            }
        }
    }
    out
}

/// The stage after balancing: replace train.jsonl by the `n` rows MMR selects from it (kept
/// in their order), holding signatures, not texts.
pub(super) fn apply(run: &mut Run<'_>, screen: &Screen, n: usize) -> Result<()> {
    let path = run.writers[&Split::Train].path.clone();
    let from = run.writers[&Split::Train].rows;
    run.writers
        .get_mut(&Split::Train)
        .expect("train split open")
        .flush()?;
    let mut sigs = Vec::with_capacity(from as usize);
    let mut rel = Vec::with_capacity(from as usize);
    let cfg: &super::SelectConfig = &run.cfg.select;
    let field = cfg.relevance_field.as_deref();
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
            sigs.push(screen.signature(&format::content_text(&row)));
        }
    }
    let picks = mmr_select_signatures(&sigs, n, cfg.lambda, Some(&rel));
    drop(sigs);
    let mut keep = vec![false; from as usize];
    for p in &picks {
        keep[*p] = true;
    }
    run.rewrite_split(Split::Train, &keep)?;
    let selected = run.writers[&Split::Train].rows;
    run.report.counts.kept -= from - selected;
    run.report.counts.not_selected = from - selected;
    run.report.selection = Some(SelectionReport {
        split: "train".into(),
        from,
        selected,
        lambda: run.cfg.select.lambda,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mmr_spreads_picks_over_clusters() {
        let topics = [
            "The train to Busan leaves from Seoul station every twenty minutes during the morning rush",
            "Sourdough bread needs a mature starter, a long cold fermentation and a very hot oven to rise",
            "Rust's borrow checker rejects programs where a mutable reference aliases a shared reference",
        ];
        let mut texts = Vec::new();
        for v in 0..4 {
            for t in topics {
                texts.push(format!("{t} (variant {v})"));
            }
        }
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let picks = mmr_select(&refs, 3, 0.5, None);
        let mut clusters: Vec<usize> = picks.iter().map(|i| i % 3).collect();
        clusters.sort();
        assert_eq!(clusters, vec![0, 1, 2], "{picks:?}");
        // With relevance only (lambda 1), the most relevant rows win regardless of diversity.
        let rel: Vec<f64> = (0..refs.len())
            .map(|i| if i < 2 { 2.0 } else { 1.0 })
            .collect();
        assert_eq!(&mmr_select(&refs, 2, 1.0, Some(&rel)), &[0, 1]);
    }
}
