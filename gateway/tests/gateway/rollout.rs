//! Canary rollouts through the whole stack: a registry running its controller, a gateway
//! serving with mistral.rs and reporting per-arm observations, and simulated users. A healthy
//! canary is promoted; a canary whose engine cannot load (a DoRA adapter, which the registry
//! accepts and mistral.rs cannot apply) is rolled back on the errors its users saw.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use loraops_gateway::judge::JudgeSettings;
use loraops_registry::api::{
    AnalysisRule, Comparison, RolloutSpec, RolloutState, RolloutStatus, StartRollout,
};
use loraops_registry::client::no_progress;
use serde_json::json;

use crate::helpers::{
    BASE, TestGateway, TestRegistry, fixture, spawn_gateway, spawn_gateway_with, spawn_registry,
};

/// Users `user-0…` sending chat requests to `bot` until `stop`; counts non-2xx answers.
fn load(
    gw: &TestGateway,
    stop: Arc<AtomicBool>,
    failures: Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..3)
        .map(|w| {
            let http = gw.http.clone();
            let url = format!("{}/v1/chat/completions", gw.url);
            let stop = stop.clone();
            let failures = failures.clone();
            tokio::spawn(async move {
                let mut i = w;
                while !stop.load(Ordering::Relaxed) {
                    let res = http
                        .post(&url)
                        .header("x-loraops-user", format!("user-{i}"))
                        .json(&json!({"model": "bot", "max_tokens": 2, "temperature": 0,
                            "messages": [{"role": "user", "content": "hi"}]}))
                        .send()
                        .await;
                    match res {
                        Ok(r) if r.status().is_success() => {}
                        Ok(r) => {
                            if failures.fetch_add(1, Ordering::Relaxed) == 0 {
                                eprintln!(
                                    "first failure: {} {}",
                                    r.status(),
                                    r.text().await.unwrap_or_default()
                                );
                            }
                        }
                        Err(e) => {
                            if failures.fetch_add(1, Ordering::Relaxed) == 0 {
                                eprintln!("first failure: {e}");
                            }
                        }
                    }
                    i += 3;
                }
            })
        })
        .collect()
}

async fn run_until_done(
    reg: &TestRegistry,
    gw: &TestGateway,
    limit: Duration,
) -> (RolloutStatus, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let workers = load(gw, stop.clone(), failures.clone());
    let deadline = tokio::time::Instant::now() + limit;
    let status = loop {
        let s = reg.client().rollout("bot").await.unwrap();
        if !s.rollout.state.is_active() {
            break s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still running: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    (status, failures.load(Ordering::Relaxed))
}

fn spec(version: u32) -> StartRollout {
    StartRollout {
        version,
        spec: RolloutSpec {
            steps: vec![25.0, 50.0, 100.0],
            interval_secs: 2,
            min_requests: 5,
            failure_limit: 2,
            rules: vec![],
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_canary_is_promoted_and_a_failing_one_rolled_back_on_live_traffic() {
    let reg = spawn_registry().await;
    reg.route("bot", Some(1), None).await;
    let c = reg.client();
    let gw = spawn_gateway(Some(&reg)).await;
    gw.wait_revision(c.routing(None, 0).await.unwrap().revision)
        .await;

    reg.with_evidence("bot", 2).await;
    c.start_rollout("bot", &spec(2)).await.unwrap();
    let (s, failures) = run_until_done(&reg, &gw, Duration::from_secs(120)).await;
    assert_eq!(s.rollout.state, RolloutState::Promoted, "{s:#?}");
    assert_eq!(failures, 0, "no request failed during the rollout");
    let steps: Vec<&str> = s
        .events
        .iter()
        .map(|e| e.action.as_str())
        .filter(|a| *a != "hold")
        .collect();
    assert_eq!(steps, ["start", "advance", "advance", "promote"]);
    // The gateway's observations are what the controller judged: both arms served.
    let advance = s.events.iter().find(|e| e.action == "advance").unwrap();
    let arms = advance.details.as_ref().unwrap()["arms"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(arms[0]["arm"], "canary");
    assert!(arms[0]["requests"].as_u64().unwrap() >= 5);
    assert!(
        arms[1]["requests"].as_u64().unwrap() > 0,
        "stable served too: {arms:?}"
    );
    assert_eq!(c.adapter("bot").await.unwrap().stable_version, Some(2));

    // v3 is DoRA: the registry takes it, the gateway's engine cannot apply it, so canary
    // users get 503s, the gateway reports them, and the controller rolls back.
    let f = fixture();
    let v3 = c
        .push_dir(&f.dora, "bot", Some(BASE), no_progress())
        .await
        .unwrap();
    reg.with_evidence("bot", v3.version.version).await;
    c.start_rollout("bot", &spec(v3.version.version))
        .await
        .unwrap();
    let (s, failures) = run_until_done(&reg, &gw, Duration::from_secs(60)).await;
    assert_eq!(s.rollout.state, RolloutState::RolledBack, "{s:#?}");
    assert!(failures > 0, "canary users saw the failures");
    let last = s.events.last().unwrap();
    assert_eq!(last.actor, "controller");
    assert!(last.reason.contains("error_rate"), "{}", last.reason);
    assert_eq!(c.adapter("bot").await.unwrap().stable_version, Some(2));
    // Back on v2 for everyone.
    let rev = c.routing(None, 0).await.unwrap().revision;
    gw.wait_revision(rev).await;
    let (_, h) = gw.chat("bot", "user-1").await;
    assert_eq!(h["x-loraops-version"], "2");
}

/// The online judge (the base model, constrained to answer 1–10) scores rollout answers; the
/// scores reach the registry per arm and decide `judge_score` rules both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_online_judge_scores_answers_for_rollout_rules() {
    let reg = spawn_registry().await;
    reg.route("bot", Some(1), None).await;
    let c = reg.client();
    let gw = spawn_gateway_with(Some(&reg), |s| {
        s.judge = Some(JudgeSettings {
            model: BASE.into(),
            sample_rate: 1.0,
            rubric: None,
        });
    })
    .await;
    gw.wait_revision(c.routing(None, 0).await.unwrap().revision)
        .await;
    let judged = |op, threshold, version| {
        let mut s = spec(version);
        s.spec.steps = vec![50.0, 100.0];
        s.spec.rules = vec![AnalysisRule {
            metric: "judge_score".into(),
            op,
            threshold,
        }];
        s
    };

    // Every score is at least 0.1: promoted on scored answers.
    reg.with_evidence("bot", 2).await;
    c.start_rollout("bot", &judged(Comparison::Ge, 0.1, 2))
        .await
        .unwrap();
    let (s, failures) = run_until_done(&reg, &gw, Duration::from_secs(180)).await;
    assert_eq!(s.rollout.state, RolloutState::Promoted, "{s:#?}");
    assert_eq!(failures, 0);
    let advance = s.events.iter().find(|e| e.action == "advance").unwrap();
    let canary = &advance.details.as_ref().unwrap()["arms"][0];
    assert_eq!(canary["arm"], "canary");
    assert!(canary["judge_scored"].as_u64().unwrap() > 0, "{canary}");
    let score = canary["judge_score"].as_f64().unwrap();
    assert!((0.1..=1.0).contains(&score), "{canary}");
    let metrics = gw.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("loraops_gateway_judge_total{outcome=\"scored\"}"),
        "{metrics}"
    );

    // No score exceeds 1.0: the same canary fails its rule and is rolled back.
    c.start_rollout("bot", &judged(Comparison::Gt, 1.0, 1))
        .await
        .unwrap();
    let (s, _) = run_until_done(&reg, &gw, Duration::from_secs(180)).await;
    assert_eq!(s.rollout.state, RolloutState::RolledBack, "{s:#?}");
    let last = s.events.last().unwrap();
    assert!(last.reason.contains("judge_score"), "{}", last.reason);
}
