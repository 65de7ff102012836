//! Background loops under supervision (the rollout controller, webhook delivery, the orphan
//! sweep). Each pass runs as its own task: a panic or an error ends that pass only, is logged
//! and counted, and the loop goes on after a short backoff. Every pass that starts records a
//! heartbeat, exported as `loraops_registry_background_last_tick_seconds{task}` and read by
//! `/readyz`, so a loop that stopped (or hangs) is visible rather than silently gone.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus::{GaugeVec, IntCounterVec, Opts, Registry};

/// Longest pause after consecutive failed passes.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What one pass of a loop reports.
pub enum Pass {
    /// Wait this long before the next pass.
    Sleep(Duration),
}

struct Beat {
    last: Instant,
    /// A heartbeat older than this means the loop is not running.
    stale_after: Duration,
}

/// Heartbeats and restart counts of the supervised loops.
pub struct Supervisor {
    beats: Mutex<BTreeMap<String, Beat>>,
    last_tick: GaugeVec,
    failures: IntCounterVec,
}

impl Supervisor {
    pub fn new(registry: &Registry) -> Self {
        let last_tick = GaugeVec::new(
            Opts::new(
                "loraops_registry_background_last_tick_seconds",
                "Unix time a supervised background loop last started a pass, by task",
            ),
            &["task"],
        )
        .expect("valid metric");
        let failures = IntCounterVec::new(
            Opts::new(
                "loraops_registry_background_failures_total",
                "Passes of a background loop that panicked or failed and were restarted, by task and kind",
            ),
            &["task", "kind"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(last_tick.clone()))
            .expect("metric registered once");
        registry
            .register(Box::new(failures.clone()))
            .expect("metric registered once");
        Self {
            beats: Mutex::new(BTreeMap::new()),
            last_tick,
            failures,
        }
    }

    fn beat(&self, task: &str, stale_after: Duration) {
        self.beats.lock().expect("beats lock").insert(
            task.to_string(),
            Beat {
                last: Instant::now(),
                stale_after,
            },
        );
        let now = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
        self.last_tick.with_label_values(&[task]).set(now);
    }

    /// Per task: `"ok"`, or why it is not (for `/readyz`).
    pub fn checks(&self) -> BTreeMap<String, String> {
        self.beats
            .lock()
            .expect("beats lock")
            .iter()
            .map(|(task, b)| {
                let age = b.last.elapsed();
                let status = if age <= b.stale_after {
                    "ok".to_string()
                } else {
                    format!(
                        "stalled: no pass for {} s (expected within {} s)",
                        age.as_secs(),
                        b.stale_after.as_secs()
                    )
                };
                (task.to_string(), status)
            })
            .collect()
    }

    /// Run `pass` forever, each pass as its own task. A pass that returns an error or panics is
    /// counted and followed by a backoff that doubles up to 30 s; `stale_after` is how long
    /// a pass (with its sleep) may take before `/readyz` reports the loop stalled.
    pub fn spawn<F, Fut, E>(
        self: &std::sync::Arc<Self>,
        task: impl Into<String>,
        stale_after: Duration,
        mut pass: F,
    ) -> tokio::task::JoinHandle<()>
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Pass, E>> + Send + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        let sup = self.clone();
        let task: String = task.into();
        tokio::spawn(async move {
            let task = task.as_str();
            let mut backoff = Duration::from_millis(500);
            loop {
                sup.beat(task, stale_after);
                let wait = match tokio::spawn(pass()).await {
                    Ok(Ok(Pass::Sleep(d))) => {
                        backoff = Duration::from_millis(500);
                        d
                    }
                    Ok(Err(e)) => {
                        sup.failures.with_label_values(&[task, "error"]).inc();
                        tracing::warn!(task, error = %e, "background pass failed; retrying");
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        backoff
                    }
                    Err(join) => {
                        let kind = if join.is_panic() {
                            "panic"
                        } else {
                            "cancelled"
                        };
                        sup.failures.with_label_values(&[task, kind]).inc();
                        tracing::error!(task, kind, error = %join, "background pass died; restarting");
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        backoff
                    }
                };
                tokio::time::sleep(wait).await;
            }
        })
    }

    /// How many passes of `task` failed with `kind` (`error`, `panic`).
    pub fn failures(&self, task: &str, kind: &str) -> u64 {
        self.failures.with_label_values(&[task, kind]).get()
    }
}
