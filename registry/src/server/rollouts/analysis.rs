//! The statistics of a rollout, pure (no database): per-arm samples summed from the gateways'
//! observations, the tests that compare a candidate arm (canary or shadow) with the stable arm,
//! one analysis's verdict, and what the controller does with it. The controller
//! (`controller.rs`) and `bench/rollout-stats` run exactly this code.
//!
//! A relative rule `METRIC: canary - stable <= m at confidence c` has three outcomes:
//! - **fail**: the canary is worse than stable with one-sided significance `1 - c` *and* its
//!   estimated effect is beyond the margin `m` (significant and material);
//! - **pass**: the upper confidence bound (level `c`) of the effect is within `m`
//!   (non-inferiority shown);
//! - **inconclusive** otherwise: the controller holds and collects more data.
//!
//! Every interval looks at the data again, so a fail must clear a stricter level than `1 - c`:
//! `(1 - c) / 4` on the cumulative window (about Pocock's boundary for seven looks) and
//! `(1 - c) / 10` on an interval alone (Bonferroni over ten independent intervals), so that a
//! canary no worse than stable is rolled back over a whole rollout with probability near
//! `1 - c` or less (`bench/rollout-stats` measures it), while a pass needs the plain level-`c`
//! bound within the margin.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use statrs::distribution::{ContinuousCDF, DiscreteCDF, Hypergeometric, Normal, StudentsT};

use crate::api::{
    AnalysisRule, ArmMetrics, ArmObservation, Relation, RolloutSpec, RuleResult, TimeoutPolicy,
    USER_GROUPS,
};

/// Metrics an absolute rule may name (the candidate's value over the interval).
pub const ABSOLUTE: [&str; 6] = [
    "error_rate",
    "latency_p95_ms",
    "latency_p99_ms",
    "judge_score",
    "judge_agreement",
    "tokens_per_answer",
];

/// Metrics a relative rule may name, and how each compares.
pub const RELATIVE: [(&str, Relation); 4] = [
    ("error_rate", Relation::Difference),
    ("latency", Relation::Ratio),
    ("judge_score", Relation::Difference),
    ("tokens_per_answer", Relation::Ratio),
];

/// Metrics that need an online judge.
pub const JUDGED: [&str; 2] = ["judge_score", "judge_agreement"];

/// A relative rule fails on the cumulative window only at a one-sided p below
/// `(1 - confidence) / CUMULATIVE_LOOKS`: the analysis looks again every interval.
pub const CUMULATIVE_LOOKS: f64 = 4.0;
/// And on one interval's data alone below `(1 - confidence) / INTERVAL_LOOKS`.
pub const INTERVAL_LOOKS: f64 = 10.0;
/// Below this many expected errors in an arm the two-proportion test's normal approximation
/// is too generous; the exact conditional (Fisher) test takes over.
pub const MIN_EXPECTED_ERRORS: f64 = 5.0;

// ---------------------------------------------------------------------------------------------
// Samples.

/// One arm's counters summed over gateways and reports.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ArmSample {
    pub requests: u64,
    pub errors: u64,
    pub answers: u64,
    pub tokens: f64,
    pub tokens_sq: f64,
    /// Latency histogram: `(lower_ms, upper_ms, count)`, sorted, one entry per distinct bucket.
    pub latency: Vec<(f64, f64, u64)>,
    pub judge_n: u64,
    pub judge_sum: f64,
    pub judge_sq: f64,
    pub agreement_n: u64,
    pub agreement_sum: f64,
    /// Requests and errors per user group.
    pub groups: BTreeMap<u32, (u64, u64)>,
}

impl ArmSample {
    /// Add one gateway report of this arm.
    pub fn add(&mut self, o: &ArmObservation) {
        self.requests = self.requests.saturating_add(o.requests);
        self.errors = self.errors.saturating_add(o.errors);
        // Reports without `answers` predate it: every successful request answered.
        self.answers = self
            .answers
            .saturating_add(if o.answers > 0 || o.tokens == 0 {
                o.answers
            } else {
                o.requests.saturating_sub(o.errors)
            });
        self.tokens += o.tokens as f64;
        self.tokens_sq += o.tokens_sq_sum;
        self.judge_n = self.judge_n.saturating_add(o.judge_scored);
        self.judge_sum += o.judge_score_sum;
        self.judge_sq += o.judge_score_sq_sum;
        self.agreement_n = self.agreement_n.saturating_add(o.agreement_scored);
        self.agreement_sum += o.agreement_sum;
        let mut prev: Option<(f64, u64)> = None;
        for &(le, cum) in &o.latency_ms_buckets {
            let (lo, below) = prev.unwrap_or((le / 2.0, 0));
            let n = cum.saturating_sub(below);
            if n > 0 {
                self.add_bucket(lo, le, n);
            }
            prev = Some((le, cum));
        }
        for &(g, r, e) in &o.users {
            let x = self.groups.entry(g).or_default();
            x.0 = x.0.saturating_add(r);
            x.1 = x.1.saturating_add(e);
        }
    }

    fn add_bucket(&mut self, lo: f64, hi: f64, n: u64) {
        let key = |b: &(f64, f64, u64)| (b.1.total_cmp(&hi), b.0.total_cmp(&lo));
        match self.latency.binary_search_by(|b| key(b).0.then(key(b).1)) {
            Ok(i) => self.latency[i].2 = self.latency[i].2.saturating_add(n),
            Err(i) => self.latency.insert(i, (lo, hi, n)),
        }
    }

    pub fn merge(&mut self, o: &ArmSample) {
        self.requests = self.requests.saturating_add(o.requests);
        self.errors = self.errors.saturating_add(o.errors);
        self.answers = self.answers.saturating_add(o.answers);
        self.tokens += o.tokens;
        self.tokens_sq += o.tokens_sq;
        self.judge_n = self.judge_n.saturating_add(o.judge_n);
        self.judge_sum += o.judge_sum;
        self.judge_sq += o.judge_sq;
        self.agreement_n = self.agreement_n.saturating_add(o.agreement_n);
        self.agreement_sum += o.agreement_sum;
        for &(lo, hi, n) in &o.latency {
            self.add_bucket(lo, hi, n);
        }
        for (g, (r, e)) in &o.groups {
            let x = self.groups.entry(*g).or_default();
            x.0 = x.0.saturating_add(*r);
            x.1 = x.1.saturating_add(*e);
        }
    }

    pub fn error_rate(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.errors as f64 / self.requests as f64)
    }

    /// Latency quantile in ms, linearly interpolated within its bucket (as Prometheus does).
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total: u64 = self.latency.iter().map(|b| b.2).sum();
        if total == 0 {
            return None;
        }
        let target = q * total as f64;
        let mut below = 0u64;
        for &(lo, hi, n) in &self.latency {
            if (below + n) as f64 >= target {
                let frac = (target - below as f64) / n as f64;
                return Some(lo + (hi - lo) * frac.clamp(0.0, 1.0));
            }
            below += n;
        }
        self.latency.last().map(|b| b.1)
    }

    pub fn judge_mean(&self) -> Option<f64> {
        (self.judge_n > 0).then(|| self.judge_sum / self.judge_n as f64)
    }

    pub fn agreement_mean(&self) -> Option<f64> {
        (self.agreement_n > 0).then(|| self.agreement_sum / self.agreement_n as f64)
    }

    pub fn tokens_mean(&self) -> Option<f64> {
        (self.answers > 0).then(|| self.tokens / self.answers as f64)
    }

    /// Whether the user groups account for every request (reports from gateways that count
    /// users); otherwise user counts are unknown.
    fn groups_cover(&self) -> bool {
        self.groups.values().map(|g| g.0).sum::<u64>() == self.requests && self.requests > 0
    }

    /// Kish's effective number of users, (Σ n)² / Σ n² over user groups: the number of
    /// equally active users that would give the same concentration.
    pub fn effective_users(&self) -> Option<f64> {
        if !self.groups_cover() {
            return None;
        }
        let sum: f64 = self.groups.values().map(|g| g.0 as f64).sum();
        let sq: f64 = self.groups.values().map(|g| (g.0 as f64).powi(2)).sum();
        Some(sum * sum / sq)
    }

    /// Distinct users, estimated by linear counting over the user groups (exact for a few
    /// users, saturating near `USER_GROUPS · ln USER_GROUPS`).
    pub fn distinct_users(&self) -> Option<f64> {
        if !self.groups_cover() {
            return None;
        }
        let k = USER_GROUPS as f64;
        let filled = self.groups.values().filter(|g| g.0 > 0).count() as f64;
        Some(if filled >= k {
            k * k.ln()
        } else {
            k * (k / (k - filled)).ln()
        })
    }

    /// The design effect of the error rate: the cluster-robust variance over user groups
    /// divided by the binomial one, at least 1. Requests of one user are not independent; a
    /// client that sends most of an arm's traffic makes this large, so it widens the interval
    /// instead of deciding it.
    pub fn error_design_effect(&self) -> f64 {
        if !self.groups_cover() {
            return 1.0;
        }
        let n = self.requests as f64;
        let p = self.errors as f64 / n;
        let v_bin = p * (1.0 - p) / n;
        let k = self.groups.values().filter(|g| g.0 > 0).count() as f64;
        if v_bin == 0.0 {
            return 1.0;
        }
        if k < 2.0 {
            return n;
        }
        let ss: f64 = self
            .groups
            .values()
            .map(|&(r, e)| (e as f64 - p * r as f64).powi(2))
            .sum();
        let v_cr = k / (k - 1.0) * ss / (n * n);
        (v_cr / v_bin).max(1.0)
    }

    /// The arm's metrics for the audit trail and the API.
    pub fn metrics(&self, arm: &str, version: u32, total: u64) -> ArmMetrics {
        ArmMetrics {
            arm: arm.into(),
            version,
            requests: self.requests,
            errors: self.errors,
            error_rate: self.error_rate().unwrap_or(0.0),
            latency_p95_ms: self.quantile(0.95),
            latency_p99_ms: self.quantile(0.99),
            judge_score: self.judge_mean(),
            judge_scored: self.judge_n,
            judge_agreement: self.agreement_mean(),
            tokens_per_answer: self.tokens_mean(),
            users: self.distinct_users(),
            effective_users: self.effective_users(),
            share: if total > 0 {
                100.0 * self.requests as f64 / total as f64
            } else {
                0.0
            },
        }
    }

    /// Enough data for a verdict: `min_requests` requests from `min_users` effective users.
    pub fn shortfall(&self, spec: &RolloutSpec) -> Option<Shortfall> {
        if self.requests < spec.min_requests {
            return Some(Shortfall::Requests(format!(
                "{} of the {} requests needed",
                self.requests, spec.min_requests
            )));
        }
        if spec.min_users > 0 {
            match self.effective_users() {
                None => {
                    return Some(Shortfall::Users(format!(
                        "no user counts for its {} requests (gateways that predate them)",
                        self.requests
                    )));
                }
                Some(u) if u < spec.min_users as f64 => {
                    return Some(Shortfall::Users(format!(
                        "{u:.1} effective users of the {} needed (one client may not decide alone)",
                        spec.min_users
                    )));
                }
                _ => {}
            }
        }
        None
    }
}

/// Why a sample cannot decide yet.
#[derive(Debug, Clone, PartialEq)]
pub enum Shortfall {
    /// Too few requests: the interval stays open until there are enough.
    Requests(String),
    /// Enough requests from too few (effective) users: this interval cannot decide, and the
    /// next one starts fresh, so one client's burst does not keep blocking the analysis.
    Users(String),
}

/// The candidate (canary, or shadow in the shadow phase) and the stable arm.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Arms {
    pub candidate: ArmSample,
    pub stable: ArmSample,
}

impl Arms {
    pub fn merge(&mut self, o: &Arms) {
        self.candidate.merge(&o.candidate);
        self.stable.merge(&o.stable);
    }
}

// ---------------------------------------------------------------------------------------------
// Tests.

fn std_normal() -> Normal {
    Normal::new(0.0, 1.0).expect("standard normal")
}

/// The one-sided critical value of a confidence level.
pub fn z_for(confidence: f64) -> f64 {
    std_normal().inverse_cdf(confidence)
}

/// An effect of the candidate relative to stable, its confidence interval, and the one-sided
/// p-values of "the candidate is larger" and "smaller".
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Effect {
    pub estimate: f64,
    pub lo: f64,
    pub hi: f64,
    pub p_larger: f64,
    pub p_smaller: f64,
}

/// Wilson's score interval of `x` successes in `n` (both may be effective, fractional counts).
pub fn wilson(x: f64, n: f64, z: f64) -> (f64, f64) {
    let p = x / n;
    let z2 = z * z;
    let denom = 1.0 + z2 / n;
    let center = (p + z2 / (2.0 * n)) / denom;
    let half = z / denom * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    ((center - half).max(0.0), (center + half).min(1.0))
}

/// `p1 - p2` with Newcombe's hybrid score interval (two Wilson intervals; good at small
/// rates, where the Wald interval collapses) at one-sided level `confidence` on each side,
/// and the pooled two-proportion z-test's one-sided p-values — or, when an arm expects fewer
/// than [`MIN_EXPECTED_ERRORS`], Fisher's exact test's (on the counts rounded).
pub fn two_proportions(x1: f64, n1: f64, x2: f64, n2: f64, confidence: f64) -> Option<Effect> {
    if n1 <= 0.0 || n2 <= 0.0 {
        return None;
    }
    let z = z_for(confidence);
    let (p1, p2) = (x1 / n1, x2 / n2);
    let (l1, u1) = wilson(x1, n1, z);
    let (l2, u2) = wilson(x2, n2, z);
    let d = p1 - p2;
    let lo = d - ((p1 - l1).powi(2) + (u2 - p2).powi(2)).sqrt();
    let hi = d + ((u1 - p1).powi(2) + (p2 - l2).powi(2)).sqrt();
    let pooled = (x1 + x2) / (n1 + n2);
    let se = (pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2)).sqrt();
    let expected = pooled.min(1.0 - pooled) * n1.min(n2);
    let (p_larger, p_smaller) = if se == 0.0 {
        (1.0, 1.0)
    } else if expected < MIN_EXPECTED_ERRORS {
        fisher(x1, n1, x2, n2)
    } else {
        let n = std_normal();
        (n.sf(d / se), n.cdf(d / se))
    };
    Some(Effect {
        estimate: d,
        lo,
        hi,
        p_larger,
        p_smaller,
    })
}

/// Fisher's exact test, one-sided both ways: `P(X >= x1)` and `P(X <= x1)` for the first
/// arm's count given the margins (as scipy's `fisher_exact(alternative="greater"|"less")`).
pub fn fisher(x1: f64, n1: f64, x2: f64, n2: f64) -> (f64, f64) {
    let (x1, n1, x2, n2) = (
        x1.round() as u64,
        n1.round() as u64,
        x2.round() as u64,
        n2.round() as u64,
    );
    match Hypergeometric::new(n1 + n2, x1 + x2, n1) {
        Ok(h) => (if x1 == 0 { 1.0 } else { h.sf(x1 - 1) }, h.cdf(x1)),
        Err(_) => (1.0, 1.0),
    }
}

/// The Mann-Whitney U test of two histograms (`(value, count)`; equal values are ties),
/// normal approximation with tie and continuity corrections, as scipy's
/// `mannwhitneyu(method="asymptotic")`. `u` is the candidate's U statistic.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MannWhitney {
    pub u: f64,
    pub p_larger: f64,
    pub p_smaller: f64,
}

pub fn mann_whitney(a: &[(f64, u64)], b: &[(f64, u64)]) -> Option<MannWhitney> {
    let mut values: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    // Non-negative finite floats order like their bit patterns.
    for &(v, c) in a {
        values.entry(v.max(0.0).to_bits()).or_default().0 += c as f64;
    }
    for &(v, c) in b {
        values.entry(v.max(0.0).to_bits()).or_default().1 += c as f64;
    }
    let n1: f64 = a.iter().map(|x| x.1 as f64).sum();
    let n2: f64 = b.iter().map(|x| x.1 as f64).sum();
    if n1 == 0.0 || n2 == 0.0 {
        return None;
    }
    let n = n1 + n2;
    let (mut below, mut r1, mut ties) = (0.0, 0.0, 0.0);
    for (ca, cb) in values.values() {
        let t = ca + cb;
        r1 += ca * (below + (t + 1.0) / 2.0);
        ties += t * t * t - t;
        below += t;
    }
    let u1 = r1 - n1 * (n1 + 1.0) / 2.0;
    let u2 = n1 * n2 - u1;
    let mu = n1 * n2 / 2.0;
    let s = (n1 * n2 / 12.0 * ((n + 1.0) - ties / (n * (n - 1.0)))).sqrt();
    let (p_larger, p_smaller) = if s > 0.0 {
        let nd = std_normal();
        (nd.sf((u1 - mu - 0.5) / s), nd.sf((u2 - mu - 0.5) / s))
    } else {
        (1.0, 1.0)
    };
    Some(MannWhitney {
        u: u1,
        p_larger,
        p_smaller,
    })
}

/// `∫_{-∞}^{x} F(t) dt` for `F` the CDF of the uniform distribution on `[a, b]`.
fn uniform_cdf_integral(x: f64, a: f64, b: f64) -> f64 {
    let w = b - a;
    if x <= a {
        0.0
    } else if w <= 0.0 {
        x - a
    } else if x <= b {
        (x - a) * (x - a) / (2.0 * w)
    } else {
        w / 2.0 + (x - b)
    }
}

/// `P(X - Y <= t)` for independent `X ~ U[a1, b1]`, `Y ~ U[a2, b2]`.
fn diff_cdf(t: f64, (a1, b1): (f64, f64), (a2, b2): (f64, f64)) -> f64 {
    let w2 = b2 - a2;
    if w2 <= 0.0 {
        let x = t + a2;
        return if b1 - a1 <= 0.0 {
            f64::from(x >= a1)
        } else {
            ((x - a1) / (b1 - a1)).clamp(0.0, 1.0)
        };
    }
    ((uniform_cdf_integral(t + b2, a1, b1) - uniform_cdf_integral(t + a2, a1, b1)) / w2)
        .clamp(0.0, 1.0)
}

/// The Hodges-Lehmann estimate of the shift in log latency (candidate − stable) and its
/// distribution-free confidence interval (Moses: the pairwise differences at the ranks where
/// the Mann-Whitney test would reject), from histograms. Within a bucket latency is taken as
/// log-uniform, so the pairwise differences are continuous and the interval is not limited
/// to the bucket grid. Returned on the ratio scale (`exp`).
pub fn latency_ratio(
    a: &[(f64, f64, u64)],
    b: &[(f64, f64, u64)],
    confidence: f64,
) -> Option<Effect> {
    let logs = |h: &[(f64, f64, u64)]| -> Vec<((f64, f64), f64)> {
        h.iter()
            .filter(|x| x.2 > 0)
            .map(|&(lo, hi, n)| {
                let lo = lo.max(1e-6);
                ((lo.ln(), hi.max(lo).ln()), n as f64)
            })
            .collect()
    };
    let (la, lb) = (logs(a), logs(b));
    let n1: f64 = la.iter().map(|x| x.1).sum();
    let n2: f64 = lb.iter().map(|x| x.1).sum();
    if n1 == 0.0 || n2 == 0.0 {
        return None;
    }
    /// A bucket's range of log latency.
    type Range = (f64, f64);
    let pairs: Vec<(Range, Range, f64)> = la
        .iter()
        .flat_map(|&(ra, wa)| lb.iter().map(move |&(rb, wb)| (ra, rb, wa * wb)))
        .collect();
    let total = n1 * n2;
    let cdf = |t: f64| -> f64 {
        pairs
            .iter()
            .map(|&(ra, rb, w)| w * diff_cdf(t, ra, rb))
            .sum::<f64>()
            / total
    };
    let lo_t = pairs
        .iter()
        .map(|(ra, rb, _)| ra.0 - rb.1)
        .fold(f64::INFINITY, f64::min);
    let hi_t = pairs
        .iter()
        .map(|(ra, rb, _)| ra.1 - rb.0)
        .fold(f64::NEG_INFINITY, f64::max);
    let quantile = |q: f64| -> f64 {
        let (mut lo, mut hi) = (lo_t, hi_t);
        for _ in 0..60 {
            let mid = 0.5 * (lo + hi);
            if cdf(mid) < q {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        0.5 * (lo + hi)
    };
    let sigma = (n1 * n2 * (n1 + n2 + 1.0) / 12.0).sqrt();
    let k = n1 * n2 / 2.0 - z_for(confidence) * sigma;
    let q = k / total;
    let (lo, hi) = if q > 0.0 {
        (quantile(q).exp(), quantile(1.0 - q).exp())
    } else {
        (0.0, f64::INFINITY)
    };
    let mids =
        |h: &[(f64, f64, u64)]| -> Vec<(f64, u64)> { h.iter().map(|x| (x.1, x.2)).collect() };
    let mw = mann_whitney(&mids(a), &mids(b))?;
    Some(Effect {
        estimate: quantile(0.5).exp(),
        lo,
        hi,
        p_larger: mw.p_larger,
        p_smaller: mw.p_smaller,
    })
}

/// Welch's t-test and interval for the difference of two means, from counts, sums and sums of
/// squares (as scipy's `ttest_ind(equal_var=False)`).
pub fn welch(
    (n1, s1, q1): (f64, f64, f64),
    (n2, s2, q2): (f64, f64, f64),
    confidence: f64,
) -> Option<Effect> {
    if n1 < 2.0 || n2 < 2.0 {
        return None;
    }
    let (m1, m2) = (s1 / n1, s2 / n2);
    let v1 = ((q1 - n1 * m1 * m1) / (n1 - 1.0)).max(0.0);
    let v2 = ((q2 - n2 * m2 * m2) / (n2 - 1.0)).max(0.0);
    let d = m1 - m2;
    let (e1, e2) = (v1 / n1, v2 / n2);
    let se = (e1 + e2).sqrt();
    if se == 0.0 {
        let (p_larger, p_smaller) = if d > 0.0 {
            (0.0, 1.0)
        } else if d < 0.0 {
            (1.0, 0.0)
        } else {
            (1.0, 1.0)
        };
        return Some(Effect {
            estimate: d,
            lo: d,
            hi: d,
            p_larger,
            p_smaller,
        });
    }
    let df = (e1 + e2).powi(2) / (e1 * e1 / (n1 - 1.0) + e2 * e2 / (n2 - 1.0));
    let t = StudentsT::new(0.0, 1.0, df).ok()?;
    let tq = t.inverse_cdf(confidence);
    Some(Effect {
        estimate: d,
        lo: d - tq * se,
        hi: d + tq * se,
        p_larger: t.sf(d / se),
        p_smaller: t.cdf(d / se),
    })
}

/// The ratio of two means with a delta-method interval on the log scale.
pub fn ratio_of_means(
    (n1, s1, q1): (f64, f64, f64),
    (n2, s2, q2): (f64, f64, f64),
    confidence: f64,
) -> Option<Effect> {
    if n1 < 2.0 || n2 < 2.0 || s1 <= 0.0 || s2 <= 0.0 {
        return None;
    }
    let (m1, m2) = (s1 / n1, s2 / n2);
    let v1 = ((q1 - n1 * m1 * m1) / (n1 - 1.0)).max(0.0);
    let v2 = ((q2 - n2 * m2 * m2) / (n2 - 1.0)).max(0.0);
    let r = (m1 / m2).ln();
    let se = (v1 / (n1 * m1 * m1) + v2 / (n2 * m2 * m2)).sqrt();
    let z = z_for(confidence);
    let nd = std_normal();
    let (p_larger, p_smaller) = if se > 0.0 {
        (nd.sf(r / se), nd.cdf(r / se))
    } else {
        (f64::from(r <= 0.0), f64::from(r >= 0.0))
    };
    Some(Effect {
        estimate: r.exp(),
        lo: (r - z * se).exp(),
        hi: (r + z * se).exp(),
        p_larger,
        p_smaller,
    })
}

// ---------------------------------------------------------------------------------------------
// Rules and verdicts.

/// One rule's outcome over one window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Pass,
    Fail,
    Inconclusive,
    NoData,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::Fail => "fail",
            Self::Inconclusive => "inconclusive",
            Self::NoData => "no_data",
        }
    }
}

fn absolute_value(metric: &str, s: &ArmSample) -> Option<f64> {
    match metric {
        "error_rate" => s.error_rate(),
        "latency_p95_ms" => s.quantile(0.95),
        "latency_p99_ms" => s.quantile(0.99),
        // From the gateways' online judge; without scored answers the rule holds.
        "judge_score" => s.judge_mean(),
        "judge_agreement" => s.agreement_mean(),
        "tokens_per_answer" => s.tokens_mean(),
        _ => None,
    }
}

/// The effect a relative rule measures, with the test that measured it.
pub fn effect(rule: &AnalysisRule, c: &ArmSample, s: &ArmSample) -> (Option<Effect>, &'static str) {
    let conf = rule.confidence();
    match rule.metric.as_str() {
        "error_rate" => {
            // Effective sample sizes: requests of one user are not independent.
            let (d1, d2) = (c.error_design_effect(), s.error_design_effect());
            let (n1, n2) = (c.requests as f64 / d1, s.requests as f64 / d2);
            let p1 = c.error_rate().unwrap_or(0.0);
            let p2 = s.error_rate().unwrap_or(0.0);
            (
                two_proportions(p1 * n1, n1, p2 * n2, n2, conf),
                "two-proportion",
            )
        }
        "latency" => (latency_ratio(&c.latency, &s.latency, conf), "mann-whitney"),
        "judge_score" => (
            welch(
                (c.judge_n as f64, c.judge_sum, c.judge_sq),
                (s.judge_n as f64, s.judge_sum, s.judge_sq),
                conf,
            ),
            "welch",
        ),
        "tokens_per_answer" => {
            // Reports without squares cannot give a variance.
            let ok = |a: &ArmSample| {
                a.answers == 0
                    || a.tokens_sq * a.answers as f64 >= a.tokens * a.tokens * (1.0 - 1e-9)
            };
            let e = (ok(c) && ok(s))
                .then(|| {
                    ratio_of_means(
                        (c.answers as f64, c.tokens, c.tokens_sq),
                        (s.answers as f64, s.tokens, s.tokens_sq),
                        conf,
                    )
                })
                .flatten();
            (e, "ratio-of-means")
        }
        _ => (None, "unknown"),
    }
}

/// Evaluate one rule over one window.
pub fn evaluate(
    rule: &AnalysisRule,
    c: &ArmSample,
    s: &ArmSample,
    window: &str,
) -> (Outcome, RuleResult) {
    let mut out = RuleResult {
        rule: rule.to_string(),
        window: window.into(),
        outcome: String::new(),
        estimate: None,
        interval: None,
        p_value: None,
        test: "threshold".into(),
    };
    let outcome = match rule.compare {
        None => match absolute_value(&rule.metric, c) {
            None => Outcome::NoData,
            Some(v) => {
                out.estimate = Some(v);
                if rule.op.holds(v, rule.threshold) {
                    Outcome::Pass
                } else {
                    Outcome::Fail
                }
            }
        },
        Some(_) => {
            let (e, test) = effect(rule, c, s);
            out.test = test.into();
            match e {
                None => Outcome::NoData,
                Some(e) => {
                    let worse = rule.op.larger_is_worse();
                    let p_worse = if worse { e.p_larger } else { e.p_smaller };
                    let bound = if worse { e.hi } else { e.lo };
                    out.estimate = Some(e.estimate);
                    out.interval = Some((e.lo, e.hi));
                    out.p_value = Some(p_worse);
                    let looks = if window == "interval" {
                        INTERVAL_LOOKS
                    } else {
                        CUMULATIVE_LOOKS
                    };
                    if p_worse < (1.0 - rule.confidence()) / looks
                        && !rule.op.holds(e.estimate, rule.threshold)
                    {
                        Outcome::Fail
                    } else if rule.op.holds(bound, rule.threshold) {
                        Outcome::Pass
                    } else {
                        Outcome::Inconclusive
                    }
                }
            }
        }
    };
    out.outcome = outcome.as_str().into();
    (outcome, out)
}

/// What one analysis concluded.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Too little data (or a rule's metric has none): keep the window open.
    Hold(String),
    /// Enough data, but a relative rule can neither pass nor fail yet.
    Inconclusive(String),
    Pass,
    Fail(Vec<String>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Analysis {
    pub verdict: Verdict,
    pub rules: Vec<RuleResult>,
}

fn describe(r: &RuleResult) -> String {
    match (r.estimate, r.interval) {
        (Some(e), Some((lo, hi))) => format!(
            "{} ({}): {e:.4} in [{lo:.4}, {hi:.4}], p {:.4}",
            r.rule,
            r.window,
            r.p_value.unwrap_or(1.0)
        ),
        (Some(e), None) => format!("{} ({}): observed {e:.4}", r.rule, r.window),
        _ => format!("{} ({}): no data", r.rule, r.window),
    }
}

/// Analyse one interval. `cumulative` holds every report since the phase began, this
/// interval's included. Absolute rules judge the interval; relative rules judge the
/// cumulative window (and the interval too, when the stable arm had enough data in it, so a
/// sudden regression is not diluted). Any failure fails the analysis; a pass needs every
/// relative rule to pass cumulatively.
pub fn analyse(spec: &RolloutSpec, arm: &str, interval: &Arms, cumulative: &Arms) -> Analysis {
    let short = |arm: &str, s: Shortfall| Analysis {
        verdict: match s {
            Shortfall::Requests(why) => {
                Verdict::Hold(format!("too little data: the {arm} arm served {why}"))
            }
            Shortfall::Users(why) => {
                Verdict::Inconclusive(format!("too few users: the {arm} arm had {why}"))
            }
        },
        rules: Vec::new(),
    };
    if let Some(s) = interval.candidate.shortfall(spec) {
        return short(arm, s);
    }
    let relative = spec.rules.iter().any(|r| r.compare.is_some());
    if relative && let Some(s) = cumulative.stable.shortfall(spec) {
        return short("stable", s);
    }
    let interval_stable = interval.stable.shortfall(spec).is_none();
    let mut rules = Vec::new();
    let (mut failed, mut no_data, mut open) = (Vec::new(), Vec::new(), Vec::new());
    for rule in &spec.rules {
        let mut windows = vec![];
        if rule.compare.is_none() {
            windows.push(("interval", interval));
        } else {
            windows.push(("cumulative", cumulative));
            if interval_stable {
                windows.push(("interval", interval));
            }
        }
        for (w, arms) in windows {
            let (o, r) = evaluate(rule, &arms.candidate, &arms.stable, w);
            match o {
                Outcome::Fail => failed.push(describe(&r)),
                Outcome::NoData if w != "interval" || rule.compare.is_none() => {
                    no_data.push(rule.metric.clone())
                }
                Outcome::Inconclusive if w == "cumulative" => open.push(describe(&r)),
                _ => {}
            }
            rules.push(r);
        }
    }
    let verdict = if !failed.is_empty() {
        Verdict::Fail(failed)
    } else if !no_data.is_empty() {
        Verdict::Hold(format!("no data yet for {}", no_data.join(", ")))
    } else if !open.is_empty() {
        Verdict::Inconclusive(format!("inconclusive: {}", open.join("; ")))
    } else {
        Verdict::Pass
    };
    Analysis { verdict, rules }
}

// ---------------------------------------------------------------------------------------------
// Decisions.

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Shadow,
    Step(usize),
}

/// What the controller knows when it decides.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub phase: Phase,
    pub failures: u32,
    pub started_at: DateTime<Utc>,
    /// When the current step (or the shadow phase) began, or was last resumed.
    pub step_started_at: DateTime<Utc>,
    pub now: DateTime<Utc>,
}

/// Where a pass leads: the next step, or the promotion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Step(usize),
    Promote,
}

pub fn next_after(spec: &RolloutSpec, phase: Phase) -> Next {
    let next = match phase {
        Phase::Shadow => 0,
        Phase::Step(i) => i + 1,
    };
    if next < spec.steps.len() {
        Next::Step(next)
    } else {
        Next::Promote
    }
}

/// Whether moving to `next` needs a deployer's approval first.
pub fn needs_approval(spec: &RolloutSpec, next: Next) -> bool {
    let weight = match next {
        Next::Step(i) => spec.steps[i],
        Next::Promote if spec.steps.last() == Some(&100.0) => return false,
        Next::Promote => 100.0,
    };
    spec.approve_before.contains(&weight)
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Too little data: keep the interval open.
    Wait(String),
    /// Enough data, no verdict yet: record it and start a new interval.
    Inconclusive(String),
    Go(Next),
    AwaitApproval(Next),
    /// A failed analysis below the limit.
    Failed {
        failures: u32,
        reasons: Vec<String>,
    },
    Rollback {
        failures: u32,
        reasons: Vec<String>,
    },
    Timeout {
        policy: TimeoutPolicy,
        why: String,
    },
}

/// What to do with a verdict.
pub fn decide(spec: &RolloutSpec, p: &Progress, verdict: &Verdict) -> Decision {
    if let Verdict::Fail(reasons) = verdict {
        let failures = p.failures + 1;
        return if failures >= spec.failure_limit {
            Decision::Rollback {
                failures,
                reasons: reasons.clone(),
            }
        } else {
            Decision::Failed {
                failures,
                reasons: reasons.clone(),
            }
        };
    }
    let secs = |a: DateTime<Utc>| (p.now - a).num_seconds().max(0) as u64;
    if let Some(max) = spec.max_duration_secs
        && secs(p.started_at) >= max
    {
        return Decision::Timeout {
            policy: spec.on_timeout,
            why: format!("max_duration of {max} s reached"),
        };
    }
    match verdict {
        Verdict::Pass => {
            let next = next_after(spec, p.phase);
            if needs_approval(spec, next) {
                Decision::AwaitApproval(next)
            } else {
                Decision::Go(next)
            }
        }
        Verdict::Hold(why) | Verdict::Inconclusive(why) => {
            let max = spec.max_hold();
            if secs(p.step_started_at) >= max {
                return Decision::Timeout {
                    policy: spec.on_timeout,
                    why: format!("max_hold of {max} s reached without a verdict ({why})"),
                };
            }
            match verdict {
                Verdict::Hold(_) => Decision::Wait(why.clone()),
                _ => Decision::Inconclusive(why.clone()),
            }
        }
        Verdict::Fail(_) => unreachable!("handled above"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Name, RolloutSpec};

    // Known values from scipy 1.17 and statsmodels 0.15, printed by
    // scripts/reference/rollout_stats_reference.py.

    fn close(a: f64, b: f64, tol: f64) {
        assert!((a - b).abs() <= tol, "{a} vs {b}");
    }

    #[test]
    fn critical_values_match_scipy() {
        close(z_for(0.95), 1.6448536269514722, 1e-12);
        close(z_for(0.99), 2.3263478740408408, 1e-12);
    }

    #[test]
    fn wilson_intervals_match_statsmodels() {
        let z = z_for(0.95);
        let (lo, hi) = wilson(7.0, 250.0, z);
        close(lo, 0.015251144207328121, 1e-12);
        close(hi, 0.05085561081575676, 1e-12);
        let (lo, hi) = wilson(0.0, 600.0, z);
        close(lo, 0.0, 1e-12);
        close(hi, 0.004488997128830092, 1e-12);
    }

    #[test]
    fn two_proportions_match_statsmodels_newcombe_and_z_test() {
        for ((x1, n1, x2, n2), (lo, hi, pl, ps)) in [
            (
                (40.0, 2000.0, 20.0, 2000.0),
                (
                    0.0036941045077114815,
                    0.016586056094772914,
                    0.004639846323802248,
                    0.9953601536761978,
                ),
            ),
            (
                (8.0, 200.0, 30.0, 1000.0),
                (
                    -0.01010784253870644,
                    0.04057761914426769,
                    0.2304872421517315,
                    0.7695127578482686,
                ),
            ),
        ] {
            let e = two_proportions(x1, n1, x2, n2, 0.95).unwrap();
            close(e.estimate, x1 / n1 - x2 / n2, 1e-12);
            close(e.lo, lo, 1e-12);
            close(e.hi, hi, 1e-12);
            // statrs' normal tail agrees with scipy's to about 1e-11.
            close(e.p_larger, pl, 1e-9);
            close(e.p_smaller, ps, 1e-9);
        }
        // No errors anywhere: the interval still has width; the z-test has no evidence.
        let e = two_proportions(0.0, 600.0, 0.0, 1200.0, 0.95).unwrap();
        close(e.lo, -0.002249547670933039, 1e-12);
        close(e.hi, 0.004488997128830092, 1e-12);
        assert_eq!((e.p_larger, e.p_smaller), (1.0, 1.0));
        // Few expected errors: Fisher's exact test, not the generous normal approximation.
        let e = two_proportions(2.0, 50.0, 10.0, 950.0, 0.95).unwrap();
        close(e.p_larger, 0.11745732859807298, 1e-9);
        close(e.p_smaller, 0.9811886213595478, 1e-9);
        let e = two_proportions(25.0, 50.0, 10.0, 950.0, 0.95).unwrap();
        assert!(e.p_larger < 1e-20, "{e:?}");
    }

    #[test]
    fn mann_whitney_on_histograms_matches_scipy_with_ties() {
        // x = [1,1,2,2,2,3,5,8,8,9], y = [1,2,2,3,3,4,4,4,6,7,7,7] as value counts.
        let x = [(1.0, 2), (2.0, 3), (3.0, 1), (5.0, 1), (8.0, 2), (9.0, 1)];
        let y = [(1.0, 1), (2.0, 2), (3.0, 2), (4.0, 3), (6.0, 1), (7.0, 3)];
        let m = mann_whitney(&x, &y).unwrap();
        close(m.u, 55.0, 1e-9);
        close(m.p_larger, 0.6430069926579023, 1e-12);
        close(m.p_smaller, 0.3821380775199568, 1e-12);
    }

    #[test]
    fn welch_matches_scipy() {
        let e = welch(
            (8.0, 5.9, 4.49),
            (10.0, 5.699999999999999, 3.3299999999999996),
            0.95,
        )
        .unwrap();
        close(e.estimate, 5.9 / 8.0 - 0.57, 1e-12);
        close(e.p_larger, 0.006994394759972812, 1e-9);
        close(e.lo, 0.06376958000022345, 1e-9);
        close(e.hi, 0.27123041999977665, 1e-9);
    }

    #[test]
    fn hodges_lehmann_ratio_matches_the_pairwise_median_and_moses_interval() {
        // Near-point buckets: the interpolation reduces to the classical estimator.
        let point = |v: &[f64]| -> Vec<(f64, f64, u64)> {
            v.iter().map(|&x| (x * (1.0 - 1e-12), x, 1)).collect()
        };
        let e = latency_ratio(
            &point(&[10.0, 12.0, 15.0, 20.0, 30.0]),
            &point(&[9.0, 11.0, 14.0]),
            0.95,
        )
        .unwrap();
        close(e.estimate, 1.3636363636363635, 1e-6);
        close(e.lo, 0.8571428571428573, 1e-6);
        close(e.hi, 2.727272727272727, 1e-6);
    }

    #[test]
    fn a_scaled_latency_distribution_is_estimated_within_its_interval() {
        // Ten buckets per decade; the canary's latencies are the stable ones × 1.25.
        let bounds: Vec<f64> = (0..=50).map(|k| 10f64.powf(k as f64 / 10.0)).collect();
        let hist = |scale: f64| -> Vec<(f64, f64, u64)> {
            let mut h = Vec::new();
            for w in bounds.windows(2) {
                // A log-normal around 100 ms, 400 requests.
                let cdf = |x: f64| {
                    let z = ((x / scale).ln() - 100f64.ln()) / 0.5;
                    std_normal().cdf(z)
                };
                let n = ((cdf(w[1]) - cdf(w[0])) * 400.0).round() as u64;
                if n > 0 {
                    h.push((w[0], w[1], n));
                }
            }
            h
        };
        let e = latency_ratio(&hist(1.25), &hist(1.0), 0.95).unwrap();
        assert!(e.lo < 1.25 && 1.25 < e.hi, "{e:?}");
        close(e.estimate, 1.25, 0.06);
        assert!(e.p_larger < 1e-6, "{e:?}");
        let same = latency_ratio(&hist(1.0), &hist(1.0), 0.95).unwrap();
        close(same.estimate, 1.0, 1e-6);
        assert!(same.lo < 1.0 && same.hi > 1.0 && same.hi < 1.1, "{same:?}");
    }

    fn obs(requests: u64, errors: u64, users: &[(u32, u64, u64)]) -> ArmObservation {
        ArmObservation {
            adapter: Name::parse("bot").unwrap(),
            version: 2,
            arm: "canary".into(),
            requests,
            errors,
            latency_ms_buckets: vec![(10.0, requests / 2), (100.0, requests)],
            tokens: 0,
            answers: 0,
            tokens_sq_sum: 0.0,
            judge_scored: 0,
            judge_score_sum: 0.0,
            judge_score_sq_sum: 0.0,
            agreement_scored: 0,
            agreement_sum: 0.0,
            users: users.to_vec(),
        }
    }

    /// `requests` and `errors` spread evenly over `users` groups.
    fn even(requests: u64, errors: u64, users: u32) -> ArmSample {
        let share = |total: u64, i: u32| {
            total / users as u64 + u64::from((i as u64) < total % users as u64)
        };
        let g: Vec<(u32, u64, u64)> = (0..users)
            .map(|i| (i, share(requests, i), share(errors, i)))
            .collect();
        let mut s = ArmSample::default();
        s.add(&obs(requests, errors, &g));
        s
    }

    #[test]
    fn the_equal_and_the_doubled_error_rate_at_the_2000_request_mark() {
        // The benchmark's row: 2 % vs 1 % fails one analysis at 2,000 canary requests.
        let sp = spec(&["error_rate: canary - stable <= 0.005 at confidence 0.95"]);
        let a = arms(even(2_000, 40, 40), even(38_000, 380, 40));
        assert!(matches!(
            analyse(&sp, "canary", &a, &a).verdict,
            Verdict::Fail(_)
        ));
        // One error more than expected in 600 requests is no reason to fail.
        let a = arms(even(600, 9, 40), even(11_400, 114, 40));
        assert!(!matches!(
            analyse(&sp, "canary", &a, &a).verdict,
            Verdict::Fail(_)
        ));
    }

    #[test]
    fn samples_merge_and_count_users() {
        let mut s = ArmSample::default();
        s.add(&obs(10, 1, &[(3, 6, 1), (7, 4, 0)]));
        s.add(&obs(10, 0, &[(3, 10, 0)]));
        assert_eq!((s.requests, s.errors), (20, 1));
        assert_eq!(s.groups[&3], (16, 1));
        close(s.effective_users().unwrap(), 400.0 / (256.0 + 16.0), 1e-12);
        close(
            s.distinct_users().unwrap(),
            128.0 * (128.0f64 / 126.0).ln(),
            1e-12,
        );
        // Cumulative buckets became per-bucket counts, merged by bounds.
        assert_eq!(s.latency, vec![(5.0, 10.0, 10), (10.0, 100.0, 10)]);
        close(s.quantile(0.75).unwrap(), 55.0, 1e-9);
        // Reports without user groups leave the users unknown.
        let mut old = ArmSample::default();
        old.add(&obs(10, 0, &[]));
        assert_eq!(old.effective_users(), None);
    }

    fn spec(rules: &[&str]) -> RolloutSpec {
        RolloutSpec {
            rules: rules.iter().map(|r| r.parse().unwrap()).collect(),
            min_requests: 50,
            min_users: 10,
            ..Default::default()
        }
    }

    fn arms(c: ArmSample, s: ArmSample) -> Arms {
        Arms {
            candidate: c,
            stable: s,
        }
    }

    #[test]
    fn relative_error_rules_pass_fail_or_stay_inconclusive() {
        let sp = spec(&["error_rate: canary - stable <= 0.005 at confidence 0.95"]);
        let verdict = |c: ArmSample, s: ArmSample| {
            let a = arms(c, s);
            analyse(&sp, "canary", &a, &a).verdict
        };
        // Equal and plentiful: non-inferiority shown.
        assert_eq!(
            verdict(even(20_000, 200, 40), even(20_000, 200, 40)),
            Verdict::Pass
        );
        // Doubled error rate on 2,000 requests: significant and beyond the margin.
        assert!(matches!(
            verdict(even(2_000, 40, 40), even(38_000, 380, 40)),
            Verdict::Fail(_)
        ));
        // Equal but small: neither shown yet.
        assert!(matches!(
            verdict(even(200, 2, 20), even(3_800, 38, 40)),
            Verdict::Inconclusive(_)
        ));
    }

    #[test]
    fn too_little_data_or_too_few_users_never_decides() {
        let sp = spec(&["error_rate <= 0.05"]);
        let hold = |c: ArmSample| {
            let a = arms(c, ArmSample::default());
            matches!(analyse(&sp, "canary", &a, &a).verdict, Verdict::Hold(_))
        };
        assert!(hold(ArmSample::default()));
        assert!(hold(even(49, 0, 20)));
        let inconclusive = |c: ArmSample| {
            let a = arms(c, ArmSample::default());
            matches!(
                analyse(&sp, "canary", &a, &a).verdict,
                Verdict::Inconclusive(_)
            )
        };
        assert!(inconclusive(even(500, 0, 5)), "five users are not ten");
        // One client sending most of the traffic: 20 users, but effectively about one.
        let mut heavy = even(100, 20, 20);
        heavy.add(&obs(5_000, 0, &[(99, 5_000, 0)]));
        assert!(heavy.effective_users().unwrap() < 1.1);
        assert!(inconclusive(heavy));
        let a = arms(even(500, 0, 20), ArmSample::default());
        assert_eq!(analyse(&sp, "canary", &a, &a).verdict, Verdict::Pass);
        let a = arms(even(500, 50, 20), ArmSample::default());
        assert!(matches!(
            analyse(&sp, "canary", &a, &a).verdict,
            Verdict::Fail(_)
        ));
    }

    #[test]
    fn one_clients_requests_widen_the_error_interval() {
        // Same counts; in one case the errors all come from one user's many requests.
        let spread = even(4_000, 80, 40);
        let mut clustered = even(3_000, 0, 39);
        clustered.add(&obs(1_000, 80, &[(60, 1_000, 80)]));
        assert!(
            spread.error_design_effect() < 2.0,
            "{}",
            spread.error_design_effect()
        );
        assert!(
            clustered.error_design_effect() > 10.0,
            "{}",
            clustered.error_design_effect()
        );
    }

    #[test]
    fn judge_score_rules_hold_until_answers_are_scored() {
        let sp = spec(&["judge_score >= 0.6"]);
        let mut c = even(100, 0, 20);
        let a = arms(c.clone(), ArmSample::default());
        assert!(matches!(
            analyse(&sp, "canary", &a, &a).verdict,
            Verdict::Hold(_)
        ));
        c.judge_n = 20;
        c.judge_sum = 14.0;
        let a = arms(c.clone(), ArmSample::default());
        assert_eq!(analyse(&sp, "canary", &a, &a).verdict, Verdict::Pass);
        c.judge_sum = 10.0;
        let a = arms(c, ArmSample::default());
        assert!(matches!(
            analyse(&sp, "canary", &a, &a).verdict,
            Verdict::Fail(_)
        ));
    }

    #[test]
    fn decisions_follow_steps_approvals_failures_and_time_bounds() {
        let t0 = chrono::Utc::now();
        let mut sp = spec(&["error_rate <= 0.05"]);
        sp.steps = vec![10.0, 50.0];
        sp.approve_before = vec![50.0];
        sp.interval_secs = 60;
        let p = |phase, failures, held: i64| Progress {
            phase,
            failures,
            started_at: t0,
            step_started_at: t0,
            now: t0 + chrono::Duration::seconds(held),
        };
        assert_eq!(
            decide(&sp, &p(Phase::Shadow, 0, 60), &Verdict::Pass),
            Decision::Go(Next::Step(0))
        );
        assert_eq!(
            decide(&sp, &p(Phase::Step(0), 0, 60), &Verdict::Pass),
            Decision::AwaitApproval(Next::Step(1))
        );
        assert_eq!(
            decide(&sp, &p(Phase::Step(1), 0, 60), &Verdict::Pass),
            Decision::Go(Next::Promote)
        );
        let fail = Verdict::Fail(vec!["x".into()]);
        assert!(matches!(
            decide(&sp, &p(Phase::Step(0), 0, 60), &fail),
            Decision::Failed { failures: 1, .. }
        ));
        assert!(matches!(
            decide(&sp, &p(Phase::Step(0), 1, 60), &fail),
            Decision::Rollback { failures: 2, .. }
        ));
        // Holding: fine until max_hold (default: 30 intervals, at least 1800 s).
        let hold = Verdict::Hold("quiet".into());
        assert!(matches!(
            decide(&sp, &p(Phase::Step(0), 0, 1799), &hold),
            Decision::Wait(_)
        ));
        assert!(matches!(
            decide(&sp, &p(Phase::Step(0), 0, 1800), &hold),
            Decision::Timeout {
                policy: TimeoutPolicy::Rollback,
                ..
            }
        ));
        sp.max_duration_secs = Some(120);
        sp.on_timeout = TimeoutPolicy::Pause;
        assert!(matches!(
            decide(&sp, &p(Phase::Step(0), 0, 120), &Verdict::Pass),
            Decision::Timeout {
                policy: TimeoutPolicy::Pause,
                ..
            }
        ));
    }
}
