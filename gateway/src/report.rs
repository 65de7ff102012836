//! Per-arm counters reported to the registry, whose rollout controller decides on them.
//!
//! Every adapter request ends in [`Recorder::record`]; a task drains the counters every few
//! seconds into one `POST /api/v1/routing/observations`. A report that fails is merged back
//! and sent with the next one, so a registry outage delays the analysis but loses nothing.
//! Errors are server-side failures (5xx): a client's bad request says nothing about a canary.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use loraops_registry::api::{ArmObservation, Name, Observations};
use loraops_registry::client::RegistryClient;

/// Latency bucket upper bounds in milliseconds (the last one catches everything).
pub const BUCKETS_MS: [f64; 17] = [
    1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 3.6e6,
];

#[derive(Debug, Default, Clone)]
struct Counts {
    requests: u64,
    errors: u64,
    tokens: u64,
    /// Per-bucket (not cumulative) counts.
    buckets: [u64; BUCKETS_MS.len()],
    judge_scored: u64,
    judge_score_sum: f64,
}

impl Counts {
    fn merge(&mut self, o: &Counts) {
        self.requests += o.requests;
        self.errors += o.errors;
        self.tokens += o.tokens;
        self.judge_scored += o.judge_scored;
        self.judge_score_sum += o.judge_score_sum;
        for (a, b) in self.buckets.iter_mut().zip(o.buckets) {
            *a += b;
        }
    }
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

    /// One finished request of `adapter` (version 0: the base serving an adapter's stable arm).
    pub fn record(
        &self,
        adapter: &Name,
        version: u32,
        arm: &'static str,
        status: u16,
        latency: Duration,
        tokens: u64,
    ) {
        let ms = latency.as_secs_f64() * 1000.0;
        let bucket = BUCKETS_MS
            .iter()
            .position(|&le| ms <= le)
            .unwrap_or(BUCKETS_MS.len() - 1);
        let mut w = self.window.lock().expect("recorder lock");
        let c = w.arms.entry((adapter.clone(), version, arm)).or_default();
        c.requests += 1;
        c.errors += u64::from(status >= 500);
        c.tokens += tokens;
        c.buckets[bucket] += 1;
    }

    /// One answer of `adapter`'s `arm` scored by the online judge (`score` in [0, 1]).
    pub fn record_judge(&self, adapter: &Name, version: u32, arm: &'static str, score: f64) {
        let mut w = self.window.lock().expect("recorder lock");
        let c = w.arms.entry((adapter.clone(), version, arm)).or_default();
        c.judge_scored += 1;
        c.judge_score_sum += score.clamp(0.0, 1.0);
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
                let mut cum = 0;
                let latency_ms_buckets = BUCKETS_MS
                    .iter()
                    .zip(c.buckets)
                    .map(|(&le, n)| {
                        cum += n;
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
                    judge_scored: c.judge_scored,
                    judge_score_sum: c.judge_score_sum,
                }
            })
            .collect();
        arms.sort_by(|a, b| (&a.adapter, a.version, &a.arm).cmp(&(&b.adapter, b.version, &b.arm)));
        Some(Observations {
            gateway: gateway.to_string(),
            window_start: start,
            window_end: now,
            arms,
        })
    }

    /// Put back a report that could not be sent.
    pub fn restore(&self, o: Observations) {
        let mut w = self.window.lock().expect("recorder lock");
        w.start = w.start.min(o.window_start);
        for a in o.arms {
            let Some(arm) = ["stable", "canary", "pinned"]
                .into_iter()
                .find(|x| *x == a.arm)
            else {
                continue;
            };
            let mut c = Counts {
                requests: a.requests,
                errors: a.errors,
                tokens: a.tokens,
                judge_scored: a.judge_scored,
                judge_score_sum: a.judge_score_sum,
                ..Default::default()
            };
            let mut prev = 0;
            for (i, (_, cum)) in a
                .latency_ms_buckets
                .iter()
                .enumerate()
                .take(BUCKETS_MS.len())
            {
                c.buckets[i] = cum - prev;
                prev = *cum;
            }
            w.arms
                .entry((a.adapter, a.version, arm))
                .or_default()
                .merge(&c);
        }
    }
}

/// Send reports every `every` until the process stops.
pub async fn run(
    recorder: std::sync::Arc<Recorder>,
    client: RegistryClient,
    gateway: String,
    every: Duration,
) {
    let mut failing = false;
    loop {
        tokio::time::sleep(every).await;
        let Some(o) = recorder.drain(&gateway) else {
            continue;
        };
        // A window longer than the registry accepts (a long outage) is cut short: the
        // counts stay, the window start moves up.
        let o = Observations {
            window_start: o
                .window_start
                .max(o.window_end - chrono::Duration::minutes(9)),
            ..o
        };
        match client.post_observations(&o).await {
            Ok(()) => {
                if failing {
                    tracing::info!("observations reach the registry again");
                }
                failing = false;
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot report observations; keeping them for the next report");
                }
                failing = true;
                recorder.restore(o);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_reports_cumulative_buckets_and_restore_keeps_counts() {
        let r = Recorder::new();
        let bot = Name::parse("bot").unwrap();
        r.record(&bot, 2, "canary", 200, Duration::from_millis(3), 5);
        r.record(&bot, 2, "canary", 500, Duration::from_millis(40), 0);
        r.record(&bot, 1, "stable", 200, Duration::from_millis(3), 7);
        r.record_judge(&bot, 2, "canary", 0.8);
        r.record_judge(&bot, 2, "canary", 0.4);
        let o = r.drain("gw-1").unwrap();
        assert_eq!(o.arms.len(), 2);
        let canary = o.arms.iter().find(|a| a.arm == "canary").unwrap();
        assert_eq!((canary.requests, canary.errors, canary.tokens), (2, 1, 5));
        assert_eq!(canary.judge_scored, 2);
        assert!((canary.judge_score_sum - 1.2).abs() < 1e-12);
        let cum: Vec<u64> = canary.latency_ms_buckets.iter().map(|b| b.1).collect();
        assert!(cum.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*cum.last().unwrap(), 2);
        assert_eq!(canary.latency_ms_buckets[2], (5.0, 1));
        assert!(r.drain("gw-1").is_none(), "drained");
        r.restore(o);
        r.record(&bot, 2, "canary", 200, Duration::from_millis(3), 1);
        let o = r.drain("gw-1").unwrap();
        let canary = o.arms.iter().find(|a| a.arm == "canary").unwrap();
        assert_eq!((canary.requests, canary.errors, canary.tokens), (3, 1, 6));
        assert_eq!(
            canary.judge_scored, 2,
            "judge scores survive a failed report"
        );
    }
}
