//! Balanced sampling and general:domain mixing.
//!
//! Caps per value of a field apply while streaming (the first rows up to a cap are kept).
//! Target proportions and mixing need the whole picture, so they run after the streaming pass
//! on the rows already written: every candidate row gets a seeded rank from its content (so the
//! sample does not depend on row order or thread count), and each group keeps its lowest-ranked
//! rows.
//!
//! - Proportions (`[curate.balance] proportions`) apply to the domain rows (the inputs): the
//!   largest sample whose shares per value equal the targets, optionally no larger than
//!   `total`. A value without a target is dropped; a target for a value no row has is an error
//!   (the only sample meeting it would be empty).
//! - Mixing (`[curate.mix]`) adds general rows to the domain rows at `general:domain`: every
//!   domain row stays (it is what is being curated) and general rows are sampled to the ratio;
//!   when there are too few, all are kept and the report says which ratio was reached.
//!
//! `apply` is curation's stage after the streaming pass; the rest is its arithmetic.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::report::{BalanceReport, MixReport, Reason, ValueShare};
use super::run::Run;
use crate::Error;
use crate::format::Split;

use super::dedup::mix64;

/// `[curate.balance]`: caps per value of a field, and target proportions.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BalanceConfig {
    /// The field to balance on (`source` by default; rows without it count as `(none)`).
    pub field: String,
    /// Cap for every value.
    pub max_per_value: Option<u64>,
    /// Caps for particular values (override `max_per_value`).
    pub caps: BTreeMap<String, u64>,
    /// Target share per value (summing to 1): the largest seeded sample of the domain rows
    /// with these shares is kept. Values not listed are dropped.
    pub proportions: BTreeMap<String, f64>,
    /// With `proportions`: the sample size wanted; shortfalls are reported.
    pub total: Option<u64>,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        Self {
            field: "source".into(),
            max_per_value: None,
            caps: BTreeMap::new(),
            proportions: BTreeMap::new(),
            total: None,
        }
    }
}

/// `[curate.mix]`: general-purpose rows mixed into the domain rows.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MixConfig {
    /// JSONL files of general rows, curated like the inputs (duplicates of domain rows are
    /// dropped, since the inputs are read first).
    pub general: Vec<PathBuf>,
    /// `general:domain`, e.g. `"1:3"` (one general row per three domain rows).
    pub ratio: Option<String>,
    /// The field every written row's origin (`general` or `domain`) goes into.
    pub origin_field: String,
}

impl Default for MixConfig {
    fn default() -> Self {
        Self {
            general: Vec::new(),
            ratio: None,
            origin_field: "origin".into(),
        }
    }
}

impl MixConfig {
    pub fn enabled(&self) -> bool {
        !self.general.is_empty() || self.ratio.is_some()
    }

    /// The parsed ratio; an error when mixing is half configured.
    pub fn parts(&self) -> Result<Option<(f64, f64)>, String> {
        match (&self.ratio, self.general.is_empty()) {
            (None, true) => Ok(None),
            (Some(r), false) => parse_ratio(r).map(Some),
            (None, false) => Err("mix: general files are given but no ratio (e.g. 1:3)".into()),
            (Some(_), true) => Err("mix: a ratio is given but no general files".into()),
        }
    }
}

/// Parse `general:domain` (positive numbers, e.g. `1:3` or `0.5:1`).
pub fn parse_ratio(s: &str) -> Result<(f64, f64), String> {
    let bad =
        || format!("mix ratio {s:?}: expected GENERAL:DOMAIN with positive numbers, e.g. 1:3");
    let (a, b) = s.split_once(':').ok_or_else(bad)?;
    let a: f64 = a.trim().parse().map_err(|_| bad())?;
    let b: f64 = b.trim().parse().map_err(|_| bad())?;
    if !(a.is_finite() && b.is_finite() && a > 0.0 && b > 0.0) {
        return Err(bad());
    }
    Ok((a, b))
}

/// How far the proportions' sum may be from 1.
pub const SUM_TOLERANCE: f64 = 0.01;

/// Check target proportions: finite, non-negative, one positive, summing to 1 (± 0.01).
pub fn check_proportions(p: &BTreeMap<String, f64>) -> Result<(), String> {
    if p.is_empty() {
        return Ok(());
    }
    if let Some((k, v)) = p.iter().find(|(_, v)| !v.is_finite() || **v < 0.0) {
        return Err(format!(
            "balance.proportions: {k:?} = {v} (must be a finite non-negative share)"
        ));
    }
    let sum: f64 = p.values().sum();
    if (sum - 1.0).abs() > SUM_TOLERANCE {
        return Err(format!(
            "balance.proportions sum to {sum:.4}, not 1 (± {SUM_TOLERANCE}): {}",
            p.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(())
}

/// Rows to keep per value under target proportions.
#[derive(Debug, Clone, PartialEq)]
pub struct Targets {
    /// Rows kept per listed value.
    pub keep: BTreeMap<String, u64>,
    /// Their sum.
    pub total: u64,
    /// Values all of whose rows are kept (they bound the sample), listed ones only.
    pub limited_by: Vec<String>,
}

/// The largest sample meeting `proportions` given `available` rows per value, no larger than
/// `total`; `Err` when a value with a positive share has no rows.
pub fn proportion_targets(
    proportions: &BTreeMap<String, f64>,
    available: &BTreeMap<String, u64>,
    total: Option<u64>,
) -> Result<Targets, String> {
    check_proportions(proportions)?;
    let sum: f64 = proportions.values().sum();
    let share = |v: f64| v / sum;
    let avail = |k: &str| available.get(k).copied().unwrap_or(0);
    let missing: Vec<&String> = proportions
        .iter()
        .filter(|(k, v)| **v > 0.0 && avail(k) == 0)
        .map(|(k, _)| k)
        .collect();
    if !missing.is_empty() {
        let seen: Vec<String> = available
            .iter()
            .map(|(k, n)| format!("{k} ({n})"))
            .collect();
        return Err(format!(
            "balance.proportions name {} but no kept row has that value (values seen: {})",
            missing
                .iter()
                .map(|m| format!("{m:?}"))
                .collect::<Vec<_>>()
                .join(", "),
            if seen.is_empty() {
                "none".into()
            } else {
                seen.join(", ")
            }
        ));
    }
    // Each value with share p allows a sample of at most available / p rows.
    let cap = proportions
        .iter()
        .filter(|(_, v)| **v > 0.0)
        .map(|(k, v)| ((avail(k) as f64 / share(*v)) + 1e-9).floor() as u64)
        .min()
        .unwrap_or(0);
    let t = total.map_or(cap, |n| n.min(cap));
    // Largest remainder, so the counts sum to the sample size.
    let mut keep: BTreeMap<String, u64> = BTreeMap::new();
    let mut fracs: Vec<(f64, &String)> = Vec::new();
    for (k, v) in proportions {
        let exact = share(*v) * t as f64;
        let base = (exact.floor() as u64).min(avail(k));
        keep.insert(k.clone(), base);
        fracs.push((exact - base as f64, k));
    }
    let mut left = t.saturating_sub(keep.values().sum());
    fracs.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(b.1)));
    for (f, k) in fracs {
        if left == 0 || f <= 0.0 {
            break;
        }
        let n = keep.get_mut(k).expect("listed");
        if *n < avail(k) {
            *n += 1;
            left -= 1;
        }
    }
    let limited_by = keep
        .iter()
        .filter(|(k, n)| proportions[*k] > 0.0 && **n == avail(k))
        .map(|(k, _)| k.clone())
        .collect();
    Ok(Targets {
        total: keep.values().sum(),
        keep,
        limited_by,
    })
}

/// General rows to mix into `domain` rows at `general:domain` = `a:b`, given `available`.
pub fn general_target(domain: u64, (a, b): (f64, f64), available: u64) -> u64 {
    (((domain as f64) * a / b + 1e-9).floor() as u64).min(available)
}

/// `a:x` where `x` makes `general:domain` equal the achieved counts (`0:1` without general rows).
pub fn format_ratio(a: f64, general: u64, domain: u64) -> String {
    if general == 0 {
        return "0:1".into();
    }
    format!("{a}:{:.2}", a * domain as f64 / general as f64)
}

/// A row's seeded sampling rank: a function of the seed and its content key only.
pub fn rank(seed: u64, key: u64) -> u64 {
    mix64(mix64(seed ^ 0xba1a_2ce5) ^ key)
}

/// Which of `ranks` to keep so that the `k` lowest stay (ties: the earlier row).
pub fn keep_lowest(ranks: &[u64], k: usize) -> Vec<bool> {
    if k >= ranks.len() {
        return vec![true; ranks.len()];
    }
    let mut idx: Vec<usize> = (0..ranks.len()).collect();
    idx.sort_unstable_by_key(|&i| (ranks[i], i));
    let mut keep = vec![false; ranks.len()];
    for &i in &idx[..k] {
        keep[i] = true;
    }
    keep
}

/// Why the sampling pass dropped a row.
#[derive(Clone, Copy, PartialEq)]
enum Sampled {
    Keep,
    Proportion,
    Unlisted,
    Mix,
}

/// The stage after streaming: apply `balance.proportions` to the domain rows, then mix
/// general rows in at the ratio, by rewriting the split files.
pub(super) fn apply(run: &mut Run<'_>) -> crate::Result<()> {
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
        let targets =
            proportion_targets(props, &available, cfg.balance.total).map_err(Error::Config)?;
        let mut rep = BalanceReport {
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
            for ((sp, i, _), keep) in g.iter().zip(keep_lowest(&ranks, k as usize)) {
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
                ValueShare {
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
        let want = general_target(domain_rows, (a, b), u64::MAX);
        let k = want.min(available);
        let ranks: Vec<u64> = general.iter().map(|x| x.2).collect();
        for ((sp, i, _), keep) in general.iter().zip(keep_lowest(&ranks, k as usize)) {
            if !keep {
                verdict.get_mut(sp).expect("split")[*i] = Sampled::Mix;
            }
        }
        let achieved = format_ratio(a, k, domain_rows);
        if k < want {
            run.report.warnings.push(format!(
                "mix: {want} general rows wanted at {} for {domain_rows} domain rows, only {available} available; achieved {achieved}",
                cfg.mix.ratio.as_deref().unwrap_or_default()
            ));
        }
        run.report.mix = Some(MixReport {
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
                    Reason::Proportions,
                    format!(
                        "{} {:?}: not in the sample meeting balance.proportions",
                        cfg.balance.field, s.names[t.value as usize]
                    ),
                ),
                Sampled::Unlisted => (
                    Reason::Proportions,
                    format!(
                        "{} {:?} has no share in balance.proportions",
                        cfg.balance.field, s.names[t.value as usize]
                    ),
                ),
                Sampled::Mix => (Reason::Mix, "general row over the mix ratio".to_string()),
            };
            keep[t.pos as usize] = false;
            if *d == Sampled::Mix {
                run.report.counts.mix_dropped += 1;
            } else {
                run.report.counts.proportion_dropped += 1;
            }
            run.report.counts.kept -= 1;
            run.count_reason(reason);
            if let Some(n) = run.report.sources.get_mut(&s.names[t.value as usize]) {
                *n -= 1;
            }
            run.issue(t.file, t.line as u64, reason, detail, false)?;
        }
        run.rewrite_split(*sp, &keep)?;
    }
    run.report.sources.retain(|_, n| *n > 0);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map<T: Copy>(kv: &[(&str, T)]) -> BTreeMap<String, T> {
        kv.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn proportions_must_sum_to_one_and_be_shares() {
        assert!(check_proportions(&map(&[("a", 0.5), ("b", 0.5)])).is_ok());
        assert!(check_proportions(&map(&[("a", 0.333), ("b", 0.333), ("c", 0.333)])).is_ok());
        let e = check_proportions(&map(&[("a", 0.5), ("b", 0.3)])).unwrap_err();
        assert!(e.contains("sum to 0.8000"), "{e}");
        let e = check_proportions(&map(&[("a", 1.5), ("b", -0.5)])).unwrap_err();
        assert!(e.contains("\"b\" = -0.5"), "{e}");
        assert!(check_proportions(&map(&[("a", f64::NAN)])).is_err());
    }

    #[test]
    fn the_largest_sample_meeting_the_proportions_is_taken() {
        let p = map(&[("web", 0.5), ("forum", 0.3), ("docs", 0.2)]);
        // docs bounds the sample: 40 / 0.2 = 200 rows.
        let avail = map(&[("web", 500u64), ("forum", 90), ("docs", 40), ("extra", 7)]);
        let t = proportion_targets(&p, &avail, None).unwrap();
        assert_eq!(t.total, 200);
        assert_eq!(t.keep, map(&[("web", 100u64), ("forum", 60), ("docs", 40)]));
        assert_eq!(t.limited_by, vec!["docs".to_string()]);
        // A requested total below the maximum is met exactly.
        let t = proportion_targets(&p, &avail, Some(100)).unwrap();
        assert_eq!(t.keep, map(&[("web", 50u64), ("forum", 30), ("docs", 20)]));
        assert!(t.limited_by.is_empty());
        // Above it, the sample stays at the maximum.
        assert_eq!(
            proportion_targets(&p, &avail, Some(1000)).unwrap().total,
            200
        );
        // Rounding: the counts still sum to the sample size.
        let p3 = map(&[("a", 1.0 / 3.0), ("b", 1.0 / 3.0), ("c", 1.0 / 3.0)]);
        let t =
            proportion_targets(&p3, &map(&[("a", 10u64), ("b", 10), ("c", 10)]), Some(10)).unwrap();
        assert_eq!(t.total, 10);
        assert!(t.keep.values().all(|n| (3..=4).contains(n)), "{t:?}");
        // A zero share drops the value and does not bound the sample.
        let t = proportion_targets(
            &map(&[("a", 1.0), ("b", 0.0)]),
            &map(&[("a", 5u64), ("b", 0)]),
            None,
        )
        .unwrap();
        assert_eq!(t.keep, map(&[("a", 5u64), ("b", 0)]));
    }

    #[test]
    fn a_proportion_for_a_value_no_row_has_is_an_error() {
        let p = map(&[("web", 0.5), ("wiki", 0.5)]);
        let e = proportion_targets(&p, &map(&[("web", 10u64), ("forum", 3)]), None).unwrap_err();
        assert!(e.contains("\"wiki\""), "{e}");
        assert!(
            e.contains("web (10), forum (3)") || e.contains("forum (3), web (10)"),
            "{e}"
        );
    }

    #[test]
    fn ratios_are_parsed_and_applied() {
        assert_eq!(parse_ratio("1:3").unwrap(), (1.0, 3.0));
        assert_eq!(parse_ratio(" 0.5 : 2 ").unwrap(), (0.5, 2.0));
        for bad in ["3", "1:0", "-1:2", "a:b", "1:3:4", ""] {
            assert!(parse_ratio(bad).is_err(), "{bad}");
        }
        assert_eq!(general_target(300, (1.0, 3.0), 1000), 100);
        assert_eq!(general_target(300, (1.0, 3.0), 40), 40);
        assert_eq!(general_target(10, (1.0, 3.0), 1000), 3);
        assert_eq!(format_ratio(1.0, 100, 300), "1:3.00");
        assert_eq!(format_ratio(1.0, 40, 300), "1:7.50");
        assert_eq!(format_ratio(1.0, 0, 300), "0:1");
        let half = MixConfig {
            general: vec!["g.jsonl".into()],
            ..Default::default()
        };
        assert!(half.parts().unwrap_err().contains("no ratio"));
        let half = MixConfig {
            ratio: Some("1:3".into()),
            ..Default::default()
        };
        assert!(half.parts().unwrap_err().contains("no general files"));
    }

    #[test]
    fn sampling_keeps_the_lowest_ranks_whatever_the_order() {
        let keys: Vec<u64> = (0..100u64).map(|i| i * 7919).collect();
        let ranks: Vec<u64> = keys.iter().map(|k| rank(5, *k)).collect();
        let keep = keep_lowest(&ranks, 10);
        assert_eq!(keep.iter().filter(|k| **k).count(), 10);
        // Reversing the rows keeps the same rows.
        let rev: Vec<u64> = ranks.iter().rev().copied().collect();
        let keep_rev = keep_lowest(&rev, 10);
        let a: Vec<u64> = (0..100).filter(|i| keep[*i]).map(|i| keys[i]).collect();
        let mut b: Vec<u64> = (0..100)
            .filter(|i| keep_rev[*i])
            .map(|i| keys[99 - i])
            .collect();
        b.sort();
        assert_eq!(a, b);
        // Another seed, another sample.
        let other: Vec<u64> = keys.iter().map(|k| rank(6, *k)).collect();
        assert_ne!(keep_lowest(&other, 10), keep);
        assert_eq!(keep_lowest(&ranks, 200), vec![true; 100]);
    }
}
