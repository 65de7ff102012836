//! Per-arm counters reported to the registry, whose rollout controller decides on them.
//!
//! Every adapter request ends in [`Recorder::record`]; a task drains the counters every few
//! seconds into one `POST /api/v1/routing/observations`. A report that fails is kept and sent
//! again unchanged (same window), so a registry outage delays the analysis but loses nothing,
//! and a retry whose first attempt did reach the registry is stored once. Errors are
//! server-side failures (5xx): a client's bad request says nothing about a canary.
//!
//! Each arm also counts its requests per user group (a hash of the sticky key), so the
//! registry sees how many users an arm served and how evenly: one client's traffic alone
//! cannot decide a rollout.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use loraops_registry::api::{ArmObservation, Name, Observations, user_group};
use loraops_registry::client::{ClientError, RegistryClient};

/// Latency bucket upper bounds in milliseconds: ten per decade from 1 ms to about an hour, so
/// a latency change of 10–20 % moves requests across bounds (the analysis compares arms' whole
/// distributions). The last one catches everything.
pub static BUCKETS_MS: LazyLock<Vec<f64>> = LazyLock::new(|| {
    let mut b: Vec<f64> = (0..=65).map(|k| 10f64.powf(k as f64 / 10.0)).collect();
    b.push(3.6e6);
    b
});

/// Reports kept for a retry at most (about ten minutes at the default interval).
const MAX_PENDING: usize = 120;
/// Older reports are dropped: the registry refuses windows that ended long ago.
const MAX_AGE: chrono::Duration = chrono::Duration::minutes(14);
/// A gateway without traffic still reports (no arms) this often, announcing its judge.
const HEARTBEAT: chrono::Duration = chrono::Duration::seconds(30);

#[derive(Debug, Default, Clone)]
struct Counts {
    requests: u64,
    errors: u64,
    answers: u64,
    tokens: u64,
    tokens_sq: f64,
    /// Per-bucket (not cumulative) counts.
    buckets: BTreeMap<usize, u64>,
    judge_scored: u64,
    judge_score_sum: f64,
    judge_score_sq: f64,
    agreement_scored: u64,
    agreement_sum: f64,
    /// Requests and errors per user group.
    users: BTreeMap<u32, (u64, u64)>,
}

type Key = (Name, u32, &'static str);

struct Window {
    start: DateTime<Utc>,
    arms: HashMap<Key, Counts>,
}

pub struct Recorder {
    window: Mutex<Window>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    pub fn new() -> Self {
        Self {
            window: Mutex::new(Window {
                start: Utc::now(),
                arms: HashMap::new(),
            }),
        }
    }

    /// One finished request of `adapter` (version 0: the base serving an adapter's stable arm),
    /// from the user `user` (the sticky key), with its completion tokens when it answered.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        adapter: &Name,
        version: u32,
        arm: &'static str,
        status: u16,
        latency: Duration,
        tokens: Option<u64>,
        user: &str,
    ) {
        let ms = latency.as_secs_f64() * 1000.0;
        let bucket = BUCKETS_MS
            .iter()
            .position(|&le| ms <= le)
            .unwrap_or(BUCKETS_MS.len() - 1);
        let group = user_group(user);
        let error = status >= 500;
        let mut w = self.window.lock().expect("recorder lock");
        let c = w.arms.entry((adapter.clone(), version, arm)).or_default();
        c.requests += 1;
        c.errors += u64::from(error);
        if let Some(t) = tokens {
            c.answers += 1;
            c.tokens += t;
            c.tokens_sq += (t as f64) * (t as f64);
        }
        *c.buckets.entry(bucket).or_default() += 1;
        let u = c.users.entry(group).or_default();
        u.0 += 1;
        u.1 += u64::from(error);
    }

    /// One answer of `adapter`'s `arm` scored by the online judge (`score` in [0, 1]).
    pub fn record_judge(&self, adapter: &Name, version: u32, arm: &'static str, score: f64) {
        let s = score.clamp(0.0, 1.0);
        let mut w = self.window.lock().expect("recorder lock");
        let c = w.arms.entry((adapter.clone(), version, arm)).or_default();
        c.judge_scored += 1;
        c.judge_score_sum += s;
        c.judge_score_sq += s * s;
    }

    /// How far a shadow answer agrees with the stable answer, as the judge saw it (in [0, 1]).
    pub fn record_agreement(&self, adapter: &Name, version: u32, score: f64) {
        let mut w = self.window.lock().expect("recorder lock");
        let c = w
            .arms
            .entry((adapter.clone(), version, "shadow"))
            .or_default();
        c.agreement_scored += 1;
        c.agreement_sum += score.clamp(0.0, 1.0);
    }

    /// Take everything recorded since the last drain, as one report.
    pub fn drain(&self, gateway: &str) -> Option<Observations> {
        let now = Utc::now();
        let (start, arms) = {
            let mut w = self.window.lock().expect("recorder lock");
            let start = std::mem::replace(&mut w.start, now);
            (start, std::mem::take(&mut w.arms))
        };
        if arms.is_empty() {
            return None;
        }
        let mut arms: Vec<ArmObservation> = arms
            .into_iter()
            .map(|((adapter, version, arm), c)| {
                // Cumulative counts up to the last non-empty bucket.
                let last = c.buckets.keys().next_back().copied().unwrap_or(0);
                let mut cum = 0;
                let latency_ms_buckets = BUCKETS_MS[..=last]
                    .iter()
                    .enumerate()
                    .map(|(i, &le)| {
                        cum += c.buckets.get(&i).copied().unwrap_or(0);
                        (le, cum)
                    })
                    .collect();
                ArmObservation {
                    adapter,
                    version,
                    arm: arm.to_string(),
                    requests: c.requests,
                    errors: c.errors,
                    latency_ms_buckets,
                    tokens: c.tokens,
                    answers: c.answers,
                    tokens_sq_sum: c.tokens_sq,
                    judge_scored: c.judge_scored,
                    judge_score_sum: c.judge_score_sum,
                    judge_score_sq_sum: c.judge_score_sq,
                    agreement_scored: c.agreement_scored,
                    agreement_sum: c.agreement_sum,
                    users: c.users.into_iter().map(|(g, (r, e))| (g, r, e)).collect(),
                }
            })
            .collect();
        arms.sort_by(|a, b| (&a.adapter, a.version, &a.arm).cmp(&(&b.adapter, b.version, &b.arm)));
        Some(Observations {
            gateway: gateway.to_string(),
            window_start: start,
            window_end: now,
            arms,
            judge: None,
        })
    }
}

/// Reports waiting to be sent, oldest first; each is resent unchanged until the registry
/// takes it (or refuses it for good), so its retries are recognisable as one report.
#[derive(Default)]
pub struct Outbox {
    pending: VecDeque<Observations>,
    last_sent: Option<DateTime<Utc>>,
}

impl Outbox {
    /// Queue this interval's report, or a heartbeat when there was no traffic for a while.
    pub fn push(&mut self, report: Option<Observations>, gateway: &str, judge: Option<&str>) {
        let now = Utc::now();
        let report = report.or_else(|| {
            let quiet = self.last_sent.is_none_or(|t| now - t >= HEARTBEAT);
            (quiet && self.pending.is_empty()).then(|| Observations {
                gateway: gateway.to_string(),
                window_start: now,
                window_end: now,
                arms: Vec::new(),
                judge: None,
            })
        });
        if let Some(mut r) = report {
            r.judge = judge.map(str::to_string);
            self.pending.push_back(r);
        }
        while self.pending.len() > MAX_PENDING
            || self
                .pending
                .front()
                .is_some_and(|r| now - r.window_end > MAX_AGE)
        {
            let dropped = self.pending.pop_front().expect("non-empty");
            tracing::warn!(
                window_end = %dropped.window_end,
                "dropping an observation report the registry did not take in time"
            );
        }
    }

    /// Send what is pending, oldest first, until one attempt fails.
    pub async fn flush(&mut self, client: &RegistryClient) -> Result<(), ClientError> {
        while let Some(r) = self.pending.front() {
            match client.post_observations(r).await {
                Ok(()) => {
                    self.last_sent = Some(Utc::now());
                    self.pending.pop_front();
                }
                // Refused for good (invalid, or stale): retrying cannot help.
                Err(e) if e.status().is_some_and(|s| s == 422) => {
                    tracing::warn!(error = %e, "the registry refused an observation report; dropped");
                    self.pending.pop_front();
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

/// Send reports every `every` until the process stops.
pub async fn run(
    recorder: std::sync::Arc<Recorder>,
    client: RegistryClient,
    gateway: String,
    every: Duration,
    judge: Option<String>,
) {
    let mut outbox = Outbox::default();
    let mut failing = false;
    loop {
        tokio::time::sleep(every).await;
        outbox.push(recorder.drain(&gateway), &gateway, judge.as_deref());
        match outbox.flush(&client).await {
            Ok(()) => {
                if failing {
                    tracing::info!("observations reach the registry again");
                }
                failing = false;
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, pending = outbox.len(), "cannot report observations; keeping them for the next report");
                }
                failing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_reports_cumulative_buckets_users_and_judge_scores() {
        let r = Recorder::new();
        let bot = Name::parse("bot").unwrap();
        r.record(
            &bot,
            2,
            "canary",
            200,
            Duration::from_millis(3),
            Some(5),
            "alice",
        );
        r.record(
            &bot,
            2,
            "canary",
            500,
            Duration::from_millis(40),
            None,
            "bob",
        );
        r.record(
            &bot,
            1,
            "stable",
            200,
            Duration::from_millis(3),
            Some(7),
            "carol",
        );
        r.record_judge(&bot, 2, "canary", 0.8);
        r.record_judge(&bot, 2, "canary", 0.4);
        let o = r.drain("gw-1").unwrap();
        assert_eq!(o.arms.len(), 2);
        let canary = o.arms.iter().find(|a| a.arm == "canary").unwrap();
        assert_eq!(
            (
                canary.requests,
                canary.errors,
                canary.answers,
                canary.tokens
            ),
            (2, 1, 1, 5)
        );
        assert_eq!(canary.tokens_sq_sum, 25.0);
        assert_eq!(canary.judge_scored, 2);
        assert!((canary.judge_score_sum - 1.2).abs() < 1e-12);
        assert!((canary.judge_score_sq_sum - 0.8).abs() < 1e-12);
        let cum: Vec<u64> = canary.latency_ms_buckets.iter().map(|b| b.1).collect();
        assert!(cum.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*cum.last().unwrap(), 2);
        // 3 ms is in the bucket up to 10^0.5 ≈ 3.16 ms.
        let (le, c) = canary.latency_ms_buckets[5];
        assert!((le - 10f64.powf(0.5)).abs() < 1e-9 && c == 1, "{le} {c}");
        // Two users, each in their group, errors with bob.
        let groups: Vec<(u32, u64, u64)> = canary.users.clone();
        assert_eq!(groups.iter().map(|g| g.1).sum::<u64>(), 2);
        assert!(groups.contains(&(user_group("bob"), 1, 1)), "{groups:?}");
        assert!(r.drain("gw-1").is_none(), "drained");
    }

    #[test]
    fn an_unsent_report_is_kept_unchanged_and_idle_gateways_send_heartbeats() {
        let r = Recorder::new();
        let bot = Name::parse("bot").unwrap();
        let mut out = Outbox::default();
        out.push(None, "gw", Some("judge-model"));
        assert_eq!(out.len(), 1, "a first heartbeat");
        assert!(out.pending[0].arms.is_empty());
        assert_eq!(out.pending[0].judge.as_deref(), Some("judge-model"));
        r.record(
            &bot,
            2,
            "canary",
            200,
            Duration::from_millis(3),
            Some(1),
            "a",
        );
        out.push(r.drain("gw"), "gw", None);
        assert_eq!(out.len(), 2);
        let first = out.pending[1].clone();
        // Nothing was sent: the next interval's report queues behind, the first stays as is.
        r.record(
            &bot,
            2,
            "canary",
            200,
            Duration::from_millis(3),
            Some(1),
            "a",
        );
        out.push(r.drain("gw"), "gw", None);
        assert_eq!(out.len(), 3);
        assert_eq!(out.pending[1], first);
        assert_eq!(out.pending[2].arms[0].requests, 1);
    }
}
