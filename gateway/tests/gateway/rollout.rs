//! Canary rollouts through the whole stack: a registry running its controller, a gateway
//! serving with mistral.rs and reporting per-arm observations, and simulated users. A canary
//! as good as stable is promoted on the relative analysis; a canary whose engine cannot load
//! (a DoRA adapter, which the registry accepts and mistral.rs cannot apply) is rolled back on
//! the errors its users saw; a canary without traffic ends at `max_hold`; a shadow phase
//! records evidence while every user gets stable, then waits for a deployer's approval; a
//! deployer's `x-loraops-arm: canary` reaches the candidate and is not counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use loraops_gateway::judge::OnlineJudgeSettings;
use loraops_registry::api::{
    AnalysisRule, Comparison, Role, RolloutSpec, RolloutState, RolloutStatus, ShadowSpec,
    StartRollout,
};
use loraops_registry::auth::AuthSettings;
use loraops_registry::client::{ClientError, RegistryClient, no_progress};
use loraops_registry::server::entities::observation;
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
use serde_json::json;

use crate::helpers::{
    BASE, SECRET, TestGateway, TestRegistry, fixture, spawn_gateway, spawn_gateway_with,
    spawn_registry,
};

/// Users `user-0…` sending chat requests to `bot` until `stop`; counts non-2xx answers, and
/// the versions that answered (in `served`, when given).
fn load(
    gw: &TestGateway,
    stop: Arc<AtomicBool>,
    failures: Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<()>> {
    load_seeing(gw, stop, failures, None)
}

fn load_seeing(
    gw: &TestGateway,
    stop: Arc<AtomicBool>,
    failures: Arc<AtomicU64>,
    served: Option<Arc<std::sync::Mutex<Vec<String>>>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..3)
        .map(|w| {
            let http = gw.http.clone();
            let url = format!("{}/v1/chat/completions", gw.url);
            let stop = stop.clone();
            let failures = failures.clone();
            let served = served.clone();
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
                        Ok(r) if r.status().is_success() => {
                            if let Some(s) = &served {
                                let v = r.headers()["x-loraops-version"].to_str().unwrap();
                                s.lock().unwrap().push(v.to_string());
                            }
                        }
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
    run_until(reg, gw, limit, |s| !s.is_active()).await
}

/// Users send traffic until the rollout reaches a state `done` accepts.
async fn run_until(
    reg: &TestRegistry,
    gw: &TestGateway,
    limit: Duration,
    done: impl Fn(RolloutState) -> bool,
) -> (RolloutStatus, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let workers = load(gw, stop.clone(), failures.clone());
    let deadline = tokio::time::Instant::now() + limit;
    let status = loop {
        let s = reg.client().rollout("bot").await.unwrap();
        if done(s.rollout.state) {
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

/// The canary's error rate no worse than stable's by more than 5 points (95 % confidence):
/// a margin a few dozen requests can show, and at most 5 % errors in any interval.
fn spec(version: u32) -> StartRollout {
    StartRollout {
        version,
        spec: RolloutSpec {
            steps: vec![25.0, 50.0, 100.0],
            interval_secs: 2,
            min_requests: 5,
            failure_limit: 2,
            rules: vec![
                "error_rate: canary - stable <= 0.05 at confidence 0.95"
                    .parse()
                    .unwrap(),
                "error_rate <= 0.05".parse().unwrap(),
            ],
            ..RolloutSpec::default()
        },
    }
}

/// Start a rollout whose rules need a judge once the gateway has announced its judge.
async fn start_judged(c: &RegistryClient, req: &StartRollout) -> RolloutStatus {
    for _ in 0..100 {
        match c.start_rollout("bot", req).await {
            Err(ClientError::Api { body, .. }) if body.error.code == "no_judge" => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other.unwrap(),
        }
    }
    panic!("the gateway never announced its judge");
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
    // The relative rule passed on the cumulative data before each step.
    let advance = s.events.iter().find(|e| e.action == "advance").unwrap();
    let rules = advance.details.as_ref().unwrap()["rules"]
        .as_array()
        .unwrap()
        .clone();
    assert!(
        rules.iter().any(|r| r["window"] == "cumulative"
            && r["outcome"] == "pass"
            && r["test"] == "two-proportion"),
        "{rules:#?}"
    );
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
    assert!(
        arms[0]["effective_users"].as_f64().unwrap() >= 10.0,
        "users are counted: {arms:?}"
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
        s.judge = Some(OnlineJudgeSettings {
            model: BASE.into(),
            sample_rate: 1.0,
            rubric: None,
            max_per_user_per_hour: u32::MAX,
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
            compare: None,
            confidence: None,
        }];
        s
    };

    // Every score is at least 0.1: promoted on scored answers.
    reg.with_evidence("bot", 2).await;
    start_judged(&c, &judged(Comparison::Ge, 0.1, 2)).await;
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
    start_judged(&c, &judged(Comparison::Gt, 1.0, 1)).await;
    let (s, _) = run_until_done(&reg, &gw, Duration::from_secs(180)).await;
    assert_eq!(s.rollout.state, RolloutState::RolledBack, "{s:#?}");
    let last = s.events.last().unwrap();
    assert!(last.reason.contains("judge_score"), "{}", last.reason);
}

/// Without traffic the canary never gets a verdict: at `max_hold` it is rolled back (the
/// default policy), and traffic is back on stable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_without_traffic_is_rolled_back_at_max_hold() {
    let reg = spawn_registry().await;
    reg.route("bot", Some(1), None).await;
    let c = reg.client();
    let gw = spawn_gateway(Some(&reg)).await;
    reg.with_evidence("bot", 2).await;
    let mut req = spec(2);
    req.spec.interval_secs = 1;
    req.spec.min_requests = 50;
    req.spec.max_hold_secs = Some(3);
    c.start_rollout("bot", &req).await.unwrap();
    gw.wait_revision(c.routing(None, 0).await.unwrap().revision)
        .await;
    // A trickle: a request now and then, far from the 50 needed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let s = loop {
        gw.chat("bot", "lonely-user").await;
        let s = c.rollout("bot").await.unwrap();
        if !s.rollout.state.is_active() {
            break s;
        }
        assert!(tokio::time::Instant::now() < deadline, "{s:#?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(s.rollout.state, RolloutState::RolledBack, "{s:#?}");
    let last = s.events.last().unwrap();
    assert!(last.reason.contains("max_hold"), "{}", last.reason);
    assert!(
        s.events
            .iter()
            .any(|e| e.action == "hold" && e.reason.contains("too little data"))
    );
    gw.wait_revision(c.routing(None, 0).await.unwrap().revision)
        .await;
    let (_, h) = gw.chat("bot", "lonely-user").await;
    assert_eq!(h["x-loraops-version"], "1");
}

/// A shadow phase: every user is answered by stable while the gateway mirrors their requests
/// to v2 and the judge compares the answers; the phase's analysis becomes evidence of v2.
/// The next step waits for a deployer's approval, then the canary proceeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_phase_records_evidence_unseen_and_the_next_step_waits_for_approval() {
    let reg = spawn_registry().await;
    reg.route("bot", Some(1), None).await;
    let c = reg.client();
    let gw = spawn_gateway_with(Some(&reg), |s| {
        s.judge = Some(OnlineJudgeSettings {
            model: BASE.into(),
            sample_rate: 1.0,
            rubric: None,
            max_per_user_per_hour: u32::MAX,
        });
    })
    .await;
    gw.wait_revision(c.routing(None, 0).await.unwrap().revision)
        .await;
    reg.with_evidence("bot", 2).await;
    let mut req = spec(2);
    req.spec.steps = vec![50.0, 100.0];
    req.spec.min_requests = 20;
    req.spec.shadow = Some(ShadowSpec { percent: 100.0 });
    req.spec.approve_before = vec![50.0];
    let started = c.start_rollout("bot", &req).await.unwrap();
    assert_eq!(started.rollout.state, RolloutState::Shadowing);

    // Users until the shadow phase passes; it then waits for approval, still unseen.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let served = Arc::new(std::sync::Mutex::new(Vec::new()));
    let workers = load_seeing(&gw, stop.clone(), failures.clone(), Some(served.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let waiting = loop {
        let s = c.rollout("bot").await.unwrap();
        if s.rollout.state != RolloutState::Shadowing {
            break s;
        }
        assert!(tokio::time::Instant::now() < deadline, "{s:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        waiting.rollout.state,
        RolloutState::AwaitingApproval,
        "{waiting:#?}"
    );
    // Awaiting approval, traffic does not move it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let still = c.rollout("bot").await.unwrap();
    assert_eq!(still.rollout.state, RolloutState::AwaitingApproval);
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(failures.load(Ordering::Relaxed), 0);
    let served = served.lock().unwrap().clone();
    assert!(served.len() >= 20, "{}", served.len());
    assert!(
        served.iter().all(|v| v == "1"),
        "a user saw the candidate: {served:?}"
    );

    // The shadow arm was analysed like a canary and recorded as evidence of v2.
    let wait = waiting
        .events
        .iter()
        .find(|e| e.action == "await_approval")
        .unwrap();
    let d = wait.details.as_ref().unwrap();
    assert_eq!(d["arms"][0]["arm"], "shadow");
    assert_eq!(d["verdict"], "pass");
    let ev = c.evidence("bot", 2).await.unwrap();
    let shadow = ev
        .iter()
        .find(|e| e.body.suite.name == "shadow")
        .expect("shadow evidence");
    assert_eq!(shadow.created_by, "controller");
    assert!(
        shadow.body.metrics["shadow_requests"] >= 20.0,
        "{:?}",
        shadow.body.metrics
    );
    assert_eq!(shadow.body.metrics["shadow_error_rate"], 0.0);
    let agreement = shadow.body.metrics.get("judge_agreement").copied();
    assert!(
        agreement.is_some_and(|a| (0.1..=1.0).contains(&a)),
        "the judge compared answers: {:?}",
        shadow.body.metrics
    );
    let metrics = gw.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("loraops_gateway_shadow_total{outcome=\"mirrored\"}"),
        "{metrics}"
    );

    // The deployer approves: users now reach the canary, which completes.
    let approved = c.rollout_action("bot", "approve").await.unwrap();
    assert_eq!(
        (approved.rollout.state, approved.rollout.weight),
        (RolloutState::Running, 50.0)
    );
    let (s, failures) = run_until_done(&reg, &gw, Duration::from_secs(120)).await;
    assert_eq!(s.rollout.state, RolloutState::Promoted, "{s:#?}");
    assert_eq!(failures, 0);
}

/// `x-loraops-arm: canary` from a deployer reaches the candidate whatever the split and is not
/// counted for the rollout; other callers are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployer_forces_the_canary_uncounted() {
    let reg = spawn_registry().await;
    // A canary at 0.01 %: no user lands there by chance in this test.
    reg.route("bot", Some(1), Some((2, 0.01))).await;
    let c = reg.client();
    let gw = spawn_gateway_with(Some(&reg), |s| {
        s.auth = Some(AuthSettings {
            hs256_secret: Some(SECRET.into()),
            ..AuthSettings::default()
        });
    })
    .await;
    gw.wait_revision(c.routing(None, 0).await.unwrap().revision)
        .await;
    let token = |roles: &[Role], adapters: Option<Vec<String>>| {
        reg.signer.issue("smoke", roles, 600, adapters).unwrap()
    };
    let ask = |token: String, forced: bool| {
        let gw = gw.clone();
        async move {
            let mut r = gw
                .http
                .post(format!("{}/v1/chat/completions", gw.url))
                .bearer_auth(token)
                .header("x-loraops-user", "smoke-user");
            if forced {
                r = r.header("x-loraops-arm", "canary");
            }
            r.json(&json!({"model": "bot", "max_tokens": 2,
                    "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
                .unwrap()
        }
    };
    let deployer = token(&[Role::Deployer], Some(vec!["bot".into()]));
    for _ in 0..3 {
        let res = ask(deployer.clone(), true).await;
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["x-loraops-version"], "2");
        assert_eq!(res.headers()["x-loraops-arm"], "canary");
    }
    let res = ask(deployer.clone(), false).await;
    assert_eq!(
        res.headers()["x-loraops-version"],
        "1",
        "unforced: the split"
    );
    for t in [
        token(&[Role::Viewer], None),
        token(&[Role::Deployer], Some(vec!["other-*".into()])),
    ] {
        assert_eq!(ask(t, true).await.status(), 403);
    }
    // Reports reached the registry (the stable request), with no canary row.
    let db = &reg.state.db;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while observation::Entity::find()
        .filter(observation::Column::Arm.eq("stable"))
        .count(db)
        .await
        .unwrap()
        == 0
    {
        assert!(tokio::time::Instant::now() < deadline, "no report arrived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let canary = observation::Entity::find()
        .filter(observation::Column::Arm.eq("canary"))
        .count(db)
        .await
        .unwrap();
    assert_eq!(canary, 0, "forced requests are not analysed");
    let metrics = gw.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("arm=\"forced\""), "{metrics}");
}
