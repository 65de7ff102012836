//! A training run reported to the registry (`loraops train … --registry URL`), as MLflow
//! tracks runs: created when training starts, metric points sent in batches as it trains, its
//! end recorded.
//!
//! Reporting must never slow or fail training: the training loop only puts points on a channel,
//! and one thread of its own talks to the registry. When the registry is unreachable the points
//! wait in memory and are resent with backoff; a run that ends while the registry is still away
//! leaves what was not sent in `OUT/run-pending.json`, which `loraops run sync OUT` (or the next
//! `adapter push OUT`) delivers. Every write is idempotent on the registry's side (the run's id
//! is chosen here, a point is keyed by step and name), so resending is always safe.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use loraops_registry::api::{EndRun, NewRun, RunPoint, RunPoints, RunStatus};
use loraops_registry::client::{ClientError, RegistryClient};
use serde::{Deserialize, Serialize};

/// The run's identity, kept in the output directory so a `--resume` continues the same run.
pub const RUN_FILE: &str = "run.json";
/// What was not delivered when the run ended.
pub const PENDING_FILE: &str = "run-pending.json";

/// Points in one request.
const BATCH: usize = 2000;
/// Sent at least this often while training.
const FLUSH_EVERY: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunFile {
    pub id: String,
    pub registry: String,
}

/// Everything not yet delivered, in the order it must arrive.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Pending {
    pub registry: String,
    pub id: String,
    /// Still to be created.
    #[serde(default)]
    pub create: Option<NewRun>,
    #[serde(default)]
    pub points: Vec<RunPoint>,
    #[serde(default)]
    pub end: Option<EndRun>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.create.is_none() && self.points.is_empty() && self.end.is_none()
    }

    /// Deliver as much as the registry takes, in order: the run, its points, its end. Stops at
    /// the first failure, leaving the rest here.
    pub async fn deliver(&mut self, client: &RegistryClient) -> Result<(), ClientError> {
        if let Some(c) = &self.create {
            client.create_run(c).await?;
            self.create = None;
        }
        while !self.points.is_empty() {
            let n = self.points.len().min(BATCH);
            let batch = RunPoints {
                points: self.points[..n].to_vec(),
            };
            client.post_run_metrics(&self.id, &batch).await?;
            self.points.drain(..n);
        }
        if let Some(e) = &self.end {
            client.end_run(&self.id, e).await?;
            self.end = None;
        }
        Ok(())
    }
}

/// A failure that resending cannot fix (a refused token, a run the registry rejects).
fn permanent(e: &ClientError) -> bool {
    e.status()
        .is_some_and(|s| s.is_client_error() && s.as_u16() != 429 && s.as_u16() != 408)
}

enum Msg {
    Create(Box<NewRun>),
    Points(Vec<RunPoint>),
    End(EndRun),
    /// Ctrl-C: record the run as interrupted, deliver what can be in a few seconds, exit 130.
    Interrupt,
}

/// How long an interrupted run may take to say so before the process exits.
const INTERRUPT_LINGER: Duration = Duration::from_secs(5);

/// What reporting achieved, said to the user at the end.
#[derive(Debug, Clone, Serialize)]
pub struct Delivery {
    pub run: String,
    pub registry: String,
    /// Points that did not reach the registry (kept in [`PENDING_FILE`]).
    pub pending_points: usize,
    pub pending_file: Option<PathBuf>,
    /// Why reporting stopped for good, if it did.
    pub refused: Option<String>,
}

pub struct RunReporter {
    id: String,
    tx: mpsc::Sender<Msg>,
    thread: std::thread::JoinHandle<Delivery>,
}

impl RunReporter {
    /// Start reporting run `id` (kept in `OUT/run.json`: a resumed run keeps its id) to
    /// `client`. `linger` is how long [`Self::finish`] waits for an unreachable registry.
    pub fn start(out: &Path, client: RegistryClient, linger: Duration) -> std::io::Result<Self> {
        std::fs::create_dir_all(out)?;
        let id = match std::fs::read(out.join(RUN_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice::<RunFile>(&b).ok())
        {
            Some(f) if f.registry == client.base_url() => f.id,
            _ => uuid::Uuid::new_v4().to_string(),
        };
        let file = RunFile {
            id: id.clone(),
            registry: client.base_url().to_string(),
        };
        std::fs::write(
            out.join(RUN_FILE),
            serde_json::to_vec_pretty(&file).expect("serialisable"),
        )?;
        let (tx, rx) = mpsc::channel();
        let pending = Pending {
            registry: client.base_url().to_string(),
            id: id.clone(),
            ..Default::default()
        };
        let spool = out.join(PENDING_FILE);
        // Ctrl-C while training: the run ends as interrupted rather than running forever.
        let on_signal = tx.clone();
        std::thread::Builder::new()
            .name("run-report-signal".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                if let Ok(rt) = rt
                    && rt.block_on(tokio::signal::ctrl_c()).is_ok()
                {
                    let _ = on_signal.send(Msg::Interrupt);
                }
            })?;
        let thread = std::thread::Builder::new()
            .name("run-report".into())
            .spawn(move || report(client, rx, pending, spool, linger))?;
        Ok(Self { id, tx, thread })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn create(&self, run: NewRun) {
        let _ = self.tx.send(Msg::Create(Box::new(run)));
    }

    pub fn points(&self, points: Vec<RunPoint>) {
        let points: Vec<RunPoint> = points.into_iter().filter(|p| p.value.is_finite()).collect();
        if !points.is_empty() {
            let _ = self.tx.send(Msg::Points(points));
        }
    }

    /// Record the end and wait (up to the linger) for everything to be delivered.
    pub fn finish(self, status: RunStatus, summary: Option<serde_json::Value>) -> Delivery {
        let _ = self.tx.send(Msg::End(EndRun { status, summary }));
        drop(self.tx);
        self.thread.join().unwrap_or_else(|_| Delivery {
            run: self.id.clone(),
            registry: String::new(),
            pending_points: 0,
            pending_file: None,
            refused: Some("the reporting thread panicked".into()),
        })
    }
}

fn report(
    client: RegistryClient,
    rx: mpsc::Receiver<Msg>,
    mut pending: Pending,
    spool: PathBuf,
    linger: Duration,
) -> Delivery {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let mut refused: Option<String> = None;
    let mut backoff = Duration::from_millis(500);
    let mut next_try = Instant::now();
    let mut last_flush = Instant::now();
    let mut closed_at: Option<Instant> = None;
    let mut interrupted = false;
    let mut linger = linger;
    loop {
        // Gather what training produced since the last pass.
        let wait = if closed_at.is_some() {
            Duration::ZERO
        } else {
            FLUSH_EVERY.saturating_sub(last_flush.elapsed())
        };
        match rx.recv_timeout(wait) {
            Ok(m) => {
                let mut msgs = vec![m];
                msgs.extend(rx.try_iter());
                for m in msgs {
                    match m {
                        Msg::Create(c) => pending.create = Some(*c),
                        Msg::Points(pts) => pending.points.extend(pts),
                        Msg::End(e) => {
                            pending.end = Some(e);
                            closed_at.get_or_insert_with(Instant::now);
                        }
                        Msg::Interrupt => {
                            pending.end = Some(EndRun {
                                status: RunStatus::Interrupted,
                                summary: Some(
                                    serde_json::json!({"reason": "interrupted (SIGINT)"}),
                                ),
                            });
                            interrupted = true;
                            linger = linger.min(INTERRUPT_LINGER);
                            closed_at.get_or_insert_with(Instant::now);
                        }
                    }
                }
                if closed_at.is_none() && pending.points.len() < BATCH {
                    continue;
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                closed_at.get_or_insert_with(Instant::now);
            }
        }
        last_flush = Instant::now();
        if refused.is_none() && !pending.is_empty() && Instant::now() >= next_try {
            match rt.block_on(pending.deliver(&client)) {
                Ok(()) => backoff = Duration::from_millis(500),
                Err(e) if permanent(&e) => {
                    tracing::warn!(run = %pending.id, error = %e, "the registry refused the run; its metrics stay local");
                    refused = Some(e.to_string());
                }
                Err(e) => {
                    tracing::debug!(run = %pending.id, error = %e, retry_in = ?backoff, "run metrics not delivered yet");
                    next_try = Instant::now() + backoff;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        if let Some(at) = closed_at {
            let done = pending.is_empty() || refused.is_some() || at.elapsed() >= linger;
            if done {
                break;
            }
            std::thread::sleep(
                next_try
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(200)),
            );
        }
    }
    let pending_points = pending.points.len();
    let pending_file = if pending.is_empty() {
        let _ = std::fs::remove_file(&spool);
        None
    } else {
        match std::fs::write(&spool, serde_json::to_vec(&pending).expect("serialisable")) {
            Ok(()) => Some(spool),
            Err(e) => {
                tracing::warn!(path = %spool.display(), error = %e, "cannot keep the undelivered run metrics");
                None
            }
        }
    };
    if interrupted {
        match &pending_file {
            Some(f) => eprintln!(
                "interrupted: run {} is recorded as interrupted once `loraops run sync {}` delivers it",
                pending.id,
                f.parent()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ),
            None => eprintln!("interrupted: run {} recorded as interrupted", pending.id),
        }
        std::process::exit(130);
    }
    Delivery {
        run: pending.id,
        registry: pending.registry,
        pending_points,
        pending_file,
        refused,
    }
}

/// Deliver `DIR/run-pending.json` (left by a run that ended while the registry was away).
/// `Ok(None)`: nothing was pending.
pub async fn sync(dir: &Path, client: &RegistryClient) -> anyhow::Result<Option<Pending>> {
    let path = dir.join(PENDING_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(anyhow::anyhow!("{}: {e}", path.display())),
    };
    let mut pending: Pending =
        serde_json::from_slice(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let sent = pending.clone();
    let res = pending.deliver(client).await;
    if pending.is_empty() {
        std::fs::remove_file(&path)?;
    } else {
        std::fs::write(&path, serde_json::to_vec(&pending)?)?;
    }
    res?;
    Ok(Some(sent))
}

/// This process's resident memory in bytes (Linux), for the run's memory curve.
pub fn resident_bytes() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024.0)
}
