//! `bench/rollout-stats`: the rollout controller's analysis (`server::rollouts::analysis`, the
//! code the controller runs) on simulated per-arm traffic, and the controller's own `tick` on
//! PostgreSQL with 1,000 active rollouts. Prints tables.
//!
//! Traffic model (per 60 s interval of the default spec): 4,000 requests to the adapter from
//! 1,000 users (each request from a user drawn at random), split by the canary's weight;
//! errors independent with the arm's rate; latency log-normal, median 500 ms, σ 0.5 (the
//! canary's scaled where a row says so), reported on the gateway's histogram grid (ten
//! buckets per decade).
//!
//!     bench_rollout_stats [ROLLOUTS_PER_ROW]     (LORAOPS_TEST_POSTGRES_URL for the last table)

use std::time::Instant;

use chrono::{DateTime, Duration, Utc};
use loraops_registry::api::{ArmObservation, Name, RolloutSpec, user_group};
use loraops_registry::server::rollouts::analysis::{
    self, ArmSample, Arms, Decision, Next, Phase, Progress, Verdict,
};
use loraops_registry::server::rollouts::default_rules;
use rand::{Rng, SeedableRng, rngs::StdRng};

const USERS: usize = 1000;
const PER_INTERVAL: u64 = 4000;
const MEDIAN_MS: f64 = 500.0;
const SIGMA: f64 = 0.5;

struct Traffic {
    groups: Vec<u32>,
    bounds: Vec<f64>,
    name: Name,
}

impl Traffic {
    fn new() -> Self {
        let mut bounds: Vec<f64> = (0..=65).map(|k| 10f64.powf(k as f64 / 10.0)).collect();
        bounds.push(3.6e6);
        Self {
            groups: (0..USERS)
                .map(|u| user_group(&format!("user-{u}")))
                .collect(),
            bounds,
            name: Name::parse("bench").unwrap(),
        }
    }

    /// One arm's report of `n` requests: errors at `p`, latency × `scale`.
    fn arm(&self, rng: &mut StdRng, n: u64, p: f64, scale: f64) -> ArmObservation {
        let mut buckets = vec![0u64; self.bounds.len()];
        let mut users = std::collections::BTreeMap::<u32, (u64, u64)>::new();
        let mut errors = 0;
        for _ in 0..n {
            let g = self.groups[rng.random_range(0..USERS)];
            let e = rng.random::<f64>() < p;
            errors += u64::from(e);
            let u = users.entry(g).or_default();
            u.0 += 1;
            u.1 += u64::from(e);
            // Box-Muller.
            let (a, b): (f64, f64) = (rng.random::<f64>().max(1e-300), rng.random());
            let z = (-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos();
            let ms = MEDIAN_MS * scale * (SIGMA * z).exp();
            let i = self
                .bounds
                .iter()
                .position(|&le| ms <= le)
                .unwrap_or(self.bounds.len() - 1);
            buckets[i] += 1;
        }
        let mut cum = 0;
        let last = buckets.iter().rposition(|&c| c > 0).unwrap_or(0);
        ArmObservation {
            adapter: self.name.clone(),
            version: 1,
            arm: "canary".into(),
            requests: n,
            errors,
            latency_ms_buckets: self.bounds[..=last]
                .iter()
                .zip(&buckets)
                .map(|(&le, &c)| {
                    cum += c;
                    (le, cum)
                })
                .collect(),
            tokens: 0,
            answers: 0,
            tokens_sq_sum: 0.0,
            judge_scored: 0,
            judge_score_sum: 0.0,
            judge_score_sq_sum: 0.0,
            agreement_scored: 0,
            agreement_sum: 0.0,
            users: users.into_iter().map(|(g, (r, e))| (g, r, e)).collect(),
        }
    }

    fn sample(&self, rng: &mut StdRng, n: u64, p: f64, scale: f64) -> ArmSample {
        let mut s = ArmSample::default();
        s.add(&self.arm(rng, n, p, scale));
        s
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum End {
    Promoted,
    /// By failed analyses.
    RolledBack,
    /// At max_hold or max_duration.
    TimedOut,
    Undecided,
}

/// One rollout under the default spec, stepped exactly as the controller steps it; the end,
/// and how many canary requests it had served by then.
fn rollout(
    t: &Traffic,
    rng: &mut StdRng,
    spec: &RolloutSpec,
    canary: (f64, f64),
    stable: (f64, f64),
    cap: u64,
) -> (End, u64) {
    let t0: DateTime<Utc> = Utc::now();
    let (mut phase, mut failures, mut step_started) = (Phase::Step(0), 0u32, t0);
    let (mut cumulative, mut open) = (Arms::default(), Arms::default());
    let mut served = 0u64;
    for k in 1..=1000 {
        let now = t0 + Duration::seconds(spec.interval_secs as i64 * k);
        let Phase::Step(i) = phase else {
            unreachable!()
        };
        let nc = (PER_INTERVAL as f64 * spec.steps[i] / 100.0).round() as u64;
        let ns = PER_INTERVAL - nc;
        served += nc;
        open.candidate.merge(&t.sample(rng, nc, canary.0, canary.1));
        open.stable.merge(&t.sample(rng, ns, stable.0, stable.1));
        let mut now_cum = cumulative.clone();
        now_cum.merge(&open);
        let a = analysis::analyse(spec, "canary", &open, &now_cum);
        let p = Progress {
            phase,
            failures,
            started_at: t0,
            step_started_at: step_started,
            now,
        };
        match analysis::decide(spec, &p, &a.verdict) {
            Decision::Wait(_) => {}
            d => {
                cumulative = now_cum;
                open = Arms::default();
                match d {
                    Decision::Inconclusive(_) => {}
                    Decision::Go(Next::Step(j)) | Decision::AwaitApproval(Next::Step(j)) => {
                        phase = Phase::Step(j);
                        step_started = now;
                    }
                    Decision::Go(Next::Promote) | Decision::AwaitApproval(Next::Promote) => {
                        return (End::Promoted, served);
                    }
                    Decision::Failed { failures: f, .. } => failures = f,
                    Decision::Rollback { .. } => return (End::RolledBack, served),
                    Decision::Timeout { .. } => return (End::TimedOut, served),
                    Decision::Wait(_) => unreachable!(),
                }
            }
        }
        if served >= cap {
            return (End::Undecided, served);
        }
    }
    (End::Undecided, served)
}

fn pct(n: usize, of: usize) -> String {
    format!("{:.1}%", 100.0 * n as f64 / of as f64)
}

/// One analysis of `n` canary requests against 19 n stable ones (the 5 % step): the verdict.
fn one_analysis(
    t: &Traffic,
    rng: &mut StdRng,
    spec: &RolloutSpec,
    n: u64,
    canary: (f64, f64),
) -> Verdict {
    let a = Arms {
        candidate: t.sample(rng, n, canary.0, canary.1),
        stable: t.sample(rng, 19 * n, 0.01, 1.0),
    };
    analysis::analyse(spec, "canary", &a, &a).verdict
}

type Error = Box<dyn std::error::Error>;

async fn decisions_per_minute(url: &str) -> Result<(usize, f64, f64), Error> {
    use loraops_registry::server::entities::{adapter, adapter_version, observation, rollout};
    use loraops_registry::server::metrics::Metrics;
    use loraops_registry::server::rollouts::tick;
    use loraops_registry::server::webhooks::Webhooks;
    use sea_orm::{ActiveModelTrait, ConnectionTrait, EntityTrait, Set};

    let name = format!("loraops_bench_{}", uuid::Uuid::new_v4().simple());
    let admin = sea_orm::Database::connect(url).await?;
    admin
        .execute_unprepared(&format!("CREATE DATABASE {name}"))
        .await?;
    let (base, _) = url.rsplit_once('/').expect("a database in the URL");
    let db = loraops_registry::server::connect_and_migrate(&format!("{base}/{name}"), 20).await?;
    let t = Traffic::new();
    let mut rng = StdRng::seed_from_u64(7);
    let n = 1000;
    let now = Utc::now();
    let spec = RolloutSpec {
        interval_secs: 1,
        rules: default_rules(),
        max_hold_secs: Some(3600),
        ..RolloutSpec::default()
    };
    let mut ids = Vec::new();
    for i in 0..n {
        let a = adapter::ActiveModel {
            name: Set(format!("bench-{i}")),
            base_model: Set("base".into()),
            latest_version: Set(2),
            stable_version: Set(Some(1)),
            created_by: Set("bench".into()),
            created_at: Set(now),
            ..Default::default()
        }
        .insert(&db)
        .await?;
        for v in [1, 2] {
            adapter_version::ActiveModel {
                adapter_id: Set(a.id),
                version: Set(v),
                digest: Set(format!("sha256:{i:060}{v:04}")),
                base_model: Set("base".into()),
                config: Set(serde_json::json!({})),
                summary: Set(serde_json::json!({})),
                lineage: Set(None),
                size_bytes: Set(0),
                upload_id: Set(format!("bench-{i}-{v}")),
                created_by: Set("bench".into()),
                created_at: Set(now),
                ..Default::default()
            }
            .insert(&db)
            .await?;
        }
        let r = rollout::ActiveModel {
            adapter_id: Set(a.id),
            version: Set(2),
            from_version: Set(Some(1)),
            state: Set("running".into()),
            step_index: Set(0),
            weight: Set(5.0),
            failures: Set(0),
            spec: Set(serde_json::to_value(&spec)?),
            row_version: Set(0),
            last_analysis_at: Set(Some(now - Duration::hours(1))),
            created_by: Set("bench".into()),
            created_at: Set(now - Duration::hours(1)),
            updated_at: Set(now),
            step_started_at: Set(Some(now)),
            canary_since: Set(Some(now - Duration::hours(1))),
            cumulative: Set(None),
            ..Default::default()
        }
        .insert(&db)
        .await?;
        ids.push((a.id, r.id));
    }
    // Each interval: one report per arm and rollout (as from one gateway), then one tick.
    let report = |adapter_id: i32, version: i32, arm: &str, o: &ArmObservation, k: usize| {
        observation::ActiveModel {
            gateway: Set("bench".into()),
            adapter_id: Set(adapter_id),
            version: Set(version),
            arm: Set(arm.into()),
            window_start: Set(Utc::now()),
            window_end: Set(Utc::now()),
            requests: Set(o.requests as i64),
            errors: Set(o.errors as i64),
            tokens: Set(0),
            latency: Set(serde_json::to_value(&o.latency_ms_buckets).unwrap()),
            received_at: Set(Utc::now()),
            judge_score_sum: Set(0.0),
            judge_scored: Set(0),
            report_id: Set(format!("{adapter_id}-{k}")),
            answers: Set(0),
            tokens_sq: Set(0.0),
            judge_score_sq: Set(0.0),
            agreement_scored: Set(0),
            agreement_sum: Set(0.0),
            users: Set(Some(serde_json::to_value(&o.users).unwrap())),
            ..Default::default()
        }
    };
    let hooks = Webhooks::default();
    let metrics = Metrics::new();
    let (rounds, mut spent, mut decided) = (3, 0.0, 0);
    for k in 0..rounds {
        let mut rows = Vec::new();
        for &(adapter_id, _) in &ids {
            rows.push(report(
                adapter_id,
                2,
                "canary",
                &t.arm(&mut rng, 200, 0.01, 1.0),
                k,
            ));
            rows.push(report(
                adapter_id,
                1,
                "stable",
                &t.arm(&mut rng, 3800, 0.01, 1.0),
                k,
            ));
        }
        for chunk in rows.chunks(500) {
            observation::Entity::insert_many(chunk.to_vec())
                .exec_without_returning(&db)
                .await?;
        }
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        let start = Instant::now();
        decided += tick(&db, &hooks, &metrics).await?;
        spent += start.elapsed().as_secs_f64();
    }
    let transitions: u64 = ["hold", "advance", "analysis_failed", "rollback", "promote"]
        .iter()
        .map(|a| metrics.rollout_transitions.with_label_values(&[a]).get())
        .sum();
    db.close().await?;
    admin
        .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await?;
    let _ = transitions;
    Ok((n, decided as f64 / spent * 60.0, spent / rounds as f64))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let per_row: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    let t = Traffic::new();
    let spec = RolloutSpec {
        rules: default_rules(),
        ..RolloutSpec::default()
    };
    println!(
        "default spec: steps {:?}, {} s interval, {} requests and {} users per arm, failure limit {}, max hold {} s; rules:",
        spec.steps,
        spec.interval_secs,
        spec.min_requests,
        spec.min_users,
        spec.failure_limit,
        spec.max_hold()
    );
    for r in &spec.rules {
        println!("  {r}");
    }
    println!(
        "traffic: {PER_INTERVAL} requests per interval from {USERS} users; latency log-normal, median {MEDIAN_MS} ms, sigma {SIGMA}; {per_row} rollouts per row\n"
    );

    println!(
        "| scenario | goal | rolled back (analysis) | at max_hold | promoted | canary requests at the end (median) |"
    );
    println!("|---|---|---|---|---|---|");
    let mut rng = StdRng::seed_from_u64(42);
    let rows: [(&str, &str, (f64, f64), u64); 4] = [
        (
            "equal canary (1% vs 1% errors)",
            "<= 5% rolled back",
            (0.01, 1.0),
            u64::MAX,
        ),
        (
            "canary 2% vs stable 1% errors, first 2,000 canary requests",
            ">= 90% rolled back",
            (0.02, 1.0),
            2000,
        ),
        (
            "canary latency x1.2 (p95 +20%)",
            ">= 90% rolled back",
            (0.01, 1.2),
            u64::MAX,
        ),
        (
            "canary 1.6% vs 1% errors (past the 0.005 margin)",
            "rarely promoted",
            (0.016, 1.0),
            u64::MAX,
        ),
    ];
    for (label, goal, canary, cap) in rows {
        let mut ends = Vec::new();
        for _ in 0..per_row {
            ends.push(rollout(&t, &mut rng, &spec, canary, (0.01, 1.0), cap));
        }
        let count = |e: End| ends.iter().filter(|x| x.0 == e).count();
        let mut served: Vec<u64> = ends.iter().map(|x| x.1).collect();
        served.sort_unstable();
        println!(
            "| {label} | {goal} | {} | {} | {} | {} |",
            pct(count(End::RolledBack), per_row),
            pct(count(End::TimedOut), per_row),
            pct(count(End::Promoted), per_row),
            served[served.len() / 2]
        );
    }

    println!(
        "\ndetection power of one analysis: n canary requests against 19 n stable ones (the 5% step); share of {per_row} analyses that fail, under the default error-rate rule (first two columns) or latency rule (last two):\n"
    );
    println!(
        "| canary requests | error 2% vs 1% | error 1% vs 1% (false alarm) | latency x1.2 | latency x1.0 (false alarm) |"
    );
    println!("|---|---|---|---|---|");
    let only = |metric: &str| RolloutSpec {
        rules: default_rules()
            .into_iter()
            .filter(|r| r.metric == metric && r.compare.is_some())
            .collect(),
        ..RolloutSpec::default()
    };
    let (errors, latency) = (only("error_rate"), only("latency"));
    for n in [50u64, 100, 200, 500, 1000, 2000, 4000] {
        let mut cells = Vec::new();
        for (spec, canary) in [
            (&errors, (0.02, 1.0)),
            (&errors, (0.01, 1.0)),
            (&latency, (0.01, 1.2)),
            (&latency, (0.01, 1.0)),
        ] {
            let fails = (0..per_row)
                .filter(|_| {
                    matches!(
                        one_analysis(&t, &mut rng, spec, n, canary),
                        Verdict::Fail(_)
                    )
                })
                .count();
            cells.push(pct(fails, per_row));
        }
        println!(
            "| {n} | {} | {} | {} | {} |",
            cells[0], cells[1], cells[2], cells[3]
        );
    }

    match std::env::var("LORAOPS_TEST_POSTGRES_URL") {
        Ok(url) => {
            let (n, per_min, tick) = decisions_per_minute(&url).await?;
            println!("\ncontroller on PostgreSQL:\n");
            println!(
                "| active rollouts | decisions per minute | goal | seconds per tick (all rollouts) |"
            );
            println!("|---|---|---|---|");
            println!("| {n} | {per_min:.0} | >= 1,000 | {tick:.2} |");
        }
        Err(_) => println!("\n(LORAOPS_TEST_POSTGRES_URL unset: no PostgreSQL row)"),
    }
    Ok(())
}
