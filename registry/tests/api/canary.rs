//! Statistical rollouts through a real registry: the controller compares the canary with the
//! stable arm (a planted error-rate increase is rolled back, an equal canary promoted), holds
//! when one client dominates or data is short and ends at `max_hold` as the policy says, waits
//! for approvals, runs a shadow phase that records evidence, reverts a promotion; observations
//! come only from gateway tokens, are windowed by the registry's clock, deduplicated and
//! pruned; gates name suites the registry holds. Gateways are played by posting observations.

use std::time::Duration;

use loraops_registry::api::Role;
use loraops_registry::server::entities::{observation, webhook_delivery};
use loraops_registry::server::rollouts::{controller, prune_observations};
use loraops_registry::server::settings::WebhookSettings;
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryTrait};
use serde_json::{Value, json};

use crate::backends;
use crate::helpers::{Blobs, Db, TestApp, error_of, spawn_with};
use crate::rollouts::{
    actions, app, arm, drive, evidence, observe, push, report, route, start, status,
};

/// An adapter `name` with a version `seed` that passes the built-in gate; returns the digest.
async fn version_with_evidence(app: &TestApp, name: &str, version: u32, seed: u32) -> String {
    let d = push(app, name, seed).await;
    evidence(
        app,
        name,
        version,
        &d,
        ("bench", "1"),
        json!({"accuracy": 0.9}),
    )
    .await;
    d
}

async fn act(app: &TestApp, name: &str, action: &str, token: &str) -> (u16, Value) {
    let res = app
        .post_json(
            &format!("/api/v1/adapters/{name}/rollouts/current/{action}"),
            token,
            &json!({}),
        )
        .await;
    (res.status().as_u16(), res.json().await.unwrap())
}

fn error_rule(margin: f64) -> Value {
    json!({"metric": "error_rate", "op": "<=", "threshold": margin, "compare": "difference",
        "confidence": 0.95})
}

/// Feed `arms` every 100 ms for `d`.
async fn feed(app: &TestApp, name: &str, arms: &[(u32, &str, u64, u64)], d: Duration) {
    let until = tokio::time::Instant::now() + d;
    while tokio::time::Instant::now() < until {
        observe(app, name, arms).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn a_worse_canary_is_rolled_back_and_an_equal_one_promoted(db: Db, blobs: Blobs) {
    let app = app(db, blobs).await;
    let spec = |v: u32| {
        json!({"version": v, "steps": [50, 100], "interval_secs": 1, "min_requests": 200,
            "rules": [error_rule(0.005)]})
    };
    version_with_evidence(&app, "bot", 1, 1).await;
    assert_eq!(start(&app, "bot", spec(1)).await.0, 201);
    // v1 against the base model, both at 1 % errors: non-inferiority shows, promoted.
    let done = drive(
        &app,
        "bot",
        &[(1, "canary", 400, 4), (0, "stable", 400, 4)],
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(done["rollout"]["state"], "promoted", "{done:#}");
    let advance = done["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "advance")
        .unwrap();
    let rule = advance["details"]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["window"] == "cumulative")
        .unwrap();
    assert_eq!(rule["outcome"], "pass", "{rule:#}");
    assert_eq!(rule["test"], "two-proportion");
    assert!(rule["interval"][1].as_f64().unwrap() <= 0.005, "{rule:#}");
    assert!(
        advance["details"]["arms"][0]["effective_users"]
            .as_f64()
            .unwrap()
            > 19.0
    );

    // v2 doubles the error rate (2 % against 1 %): significant, beyond the margin: rolled back.
    version_with_evidence(&app, "bot", 2, 2).await;
    assert_eq!(start(&app, "bot", spec(2)).await.0, 201);
    let done = drive(
        &app,
        "bot",
        &[(2, "canary", 400, 8), (1, "stable", 400, 4)],
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(done["rollout"]["state"], "rolled_back", "{done:#}");
    assert_eq!(actions(&done), ["start", "analysis_failed", "rollback"]);
    let last = done["events"].as_array().unwrap().last().unwrap().clone();
    assert!(
        last["reason"]
            .as_str()
            .unwrap()
            .contains("error_rate: canary - stable"),
        "{last:#}"
    );
    assert_eq!(
        app.get_json("/api/v1/adapters/bot").await["stable_version"],
        1
    );
    app.cleanup().await;
}
backends!(a_worse_canary_is_rolled_back_and_an_equal_one_promoted);

async fn one_client_cannot_decide_a_canary(db: Db, blobs: Blobs) {
    let app = app(db, blobs).await;
    version_with_evidence(&app, "bot", 1, 1).await;
    let spec = json!({"version": 1, "steps": [50, 100], "interval_secs": 1, "min_requests": 20,
        "rules": [{"metric": "error_rate", "op": "<=", "threshold": 0.05}]});
    assert_eq!(start(&app, "bot", spec).await.0, 201);
    // Twenty users see 40 % errors; one client floods the canary with cheap successes, which
    // would dilute the error rate to 2 %.
    let mut flooded = arm("bot", 1, "canary", 2_100, 40);
    flooded["users"] = json!(
        (0..20)
            .map(|i| json!([i, 5, 2]))
            .chain([json!([100, 2_000, 0])])
            .collect::<Vec<_>>()
    );
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < until {
        let res = report(&app, vec![flooded.clone()], chrono::Duration::zero()).await;
        assert_eq!(res.status(), 202);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = status(&app, "bot").await;
    assert_eq!(s["rollout"]["state"], "running", "{s:#}");
    assert_eq!(s["rollout"]["step_index"], 0);
    let hold = s["events"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|e| e["action"] == "hold")
        .expect("held");
    assert!(
        hold["reason"].as_str().unwrap().contains("effective users"),
        "{hold:#}"
    );
    let canary = &hold["details"]["arms"][0];
    assert!(
        canary["effective_users"].as_f64().unwrap() < 2.0,
        "{canary}"
    );
    // Without the flood, the users' errors decide.
    let done = drive(
        &app,
        "bot",
        &[(1, "canary", 100, 40)],
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(done["rollout"]["state"], "rolled_back", "{done:#}");
    app.cleanup().await;
}
backends!(one_client_cannot_decide_a_canary);

async fn too_little_traffic_ends_at_max_hold_as_the_policy_says(db: Db, blobs: Blobs) {
    let app = app(db, blobs).await;
    version_with_evidence(&app, "bot", 1, 1).await;
    let spec = |policy: &str| {
        json!({"version": 1, "interval_secs": 1, "min_requests": 100, "max_hold_secs": 2,
            "on_timeout": policy})
    };
    // The default policy: back to stable.
    assert_eq!(start(&app, "bot", spec("rollback")).await.0, 201);
    let done = drive(
        &app,
        "bot",
        &[(1, "canary", 3, 0), (0, "stable", 3, 0)],
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(done["rollout"]["state"], "rolled_back", "{done:#}");
    let last = done["events"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["actor"], "controller");
    assert!(
        last["reason"]
            .as_str()
            .unwrap()
            .contains("max_hold of 2 s reached"),
        "{last:#}"
    );
    assert!(route(&app, "bot").await.is_none(), "no longer routed");

    // `pause` leaves the decision to a deployer.
    assert_eq!(start(&app, "bot", spec("pause")).await.0, 201);
    let done = drive(
        &app,
        "bot",
        &[(1, "canary", 3, 0), (0, "stable", 3, 0)],
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(done["rollout"]["state"], "paused", "{done:#}");
    let last = done["events"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (last["action"].as_str(), last["actor"].as_str()),
        (Some("pause"), Some("controller"))
    );
    app.cleanup().await;
}
backends!(too_little_traffic_ends_at_max_hold_as_the_policy_says);

async fn approvals_block_until_a_deployer_approves(db: Db, blobs: Blobs) {
    let app = spawn_with(db, blobs, |r| {
        r.controller_tick_ms = 50;
        // Nothing listens there: the deliveries stay queued, which is what this test reads.
        r.webhooks = vec![WebhookSettings {
            url: "http://127.0.0.1:9/hooks".into(),
            secret: Some("s".into()),
            secret_env: None,
            events: vec!["rollout.*".into()],
        }];
    })
    .await;
    app.register_base().await;
    version_with_evidence(&app, "bot", 1, 1).await;
    let spec = json!({"version": 1, "steps": [10, 50, 100], "interval_secs": 1,
        "min_requests": 20, "approve_before": [50], "rules": [error_rule(0.05)]});
    assert_eq!(start(&app, "bot", spec).await.0, 201);
    let healthy = [(1, "canary", 100, 0), (0, "stable", 100, 0)];
    let waiting = drive(&app, "bot", &healthy, Duration::from_secs(20)).await;
    assert_eq!(
        waiting["rollout"]["state"], "awaiting_approval",
        "{waiting:#}"
    );
    assert_eq!(waiting["rollout"]["weight"], 10.0);
    // Traffic does not move it while it waits.
    feed(&app, "bot", &healthy, Duration::from_secs(2)).await;
    let s = status(&app, "bot").await;
    assert_eq!(
        (
            s["rollout"]["state"].as_str(),
            s["rollout"]["weight"].as_f64()
        ),
        (Some("awaiting_approval"), Some(10.0))
    );
    // The wait is announced with the analysis so far.
    let hooks = webhook_delivery::Entity::find()
        .filter(webhook_delivery::Column::EventType.eq("rollout.await_approval"))
        .all(&app.state.db)
        .await
        .unwrap();
    assert_eq!(hooks.len(), 1);
    let analysis = &hooks[0].payload["data"]["analysis"];
    assert_eq!(analysis["verdict"], "pass", "{analysis:#}");
    assert!(!analysis["rules"].as_array().unwrap().is_empty());
    assert_eq!(analysis["arms"][0]["arm"], "canary");

    assert_eq!(act(&app, "bot", "approve", &app.publisher).await.0, 403);
    let (st, approved) = act(&app, "bot", "approve", &app.deployer).await;
    assert_eq!(st, 200, "{approved:#}");
    assert_eq!(
        (
            approved["rollout"]["state"].as_str(),
            approved["rollout"]["weight"].as_f64()
        ),
        (Some("running"), Some(50.0))
    );
    assert_eq!(act(&app, "bot", "approve", &app.deployer).await.0, 409);
    let done = drive(&app, "bot", &healthy, Duration::from_secs(20)).await;
    assert_eq!(done["rollout"]["state"], "promoted", "{done:#}");
    assert_eq!(
        actions(&done),
        ["start", "await_approval", "approve", "advance", "promote"]
    );
    app.cleanup().await;
}
backends!(approvals_block_until_a_deployer_approves);

async fn a_promotion_can_be_reverted(db: Db, blobs: Blobs) {
    let app = app(db, blobs).await;
    version_with_evidence(&app, "bot", 1, 1).await;
    assert_eq!(start(&app, "bot", json!({"version": 1})).await.0, 201);
    assert_eq!(act(&app, "bot", "promote", &app.deployer).await.0, 200);
    let (s, e) = act(&app, "bot", "rollback-promotion", &app.deployer).await;
    assert_eq!(s, 409, "a first version has no predecessor: {e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("first version")
    );

    version_with_evidence(&app, "bot", 2, 2).await;
    assert_eq!(start(&app, "bot", json!({"version": 2})).await.0, 201);
    let (s, _) = act(&app, "bot", "rollback-promotion", &app.deployer).await;
    assert_eq!(s, 409, "not while a rollout is active");
    assert_eq!(act(&app, "bot", "promote", &app.deployer).await.0, 200);
    assert_eq!(
        app.get_json("/api/v1/adapters/bot").await["stable_version"],
        2
    );
    assert_eq!(
        act(&app, "bot", "rollback-promotion", &app.viewer).await.0,
        403
    );
    let (s, reverted) = act(&app, "bot", "rollback-promotion", &app.deployer).await;
    assert_eq!(s, 200, "{reverted:#}");
    assert_eq!(reverted["rollout"]["state"], "rolled_back");
    let last = reverted["events"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(
        (
            last["action"].as_str(),
            last["actor"].as_str(),
            last["from_state"].as_str()
        ),
        (Some("rollback_promotion"), Some("tester"), Some("promoted"))
    );
    assert!(
        last["reason"]
            .as_str()
            .unwrap()
            .contains("v1 is stable again")
    );
    assert_eq!(
        app.get_json("/api/v1/adapters/bot").await["stable_version"],
        1
    );
    let rt = route(&app, "bot").await.unwrap();
    assert_eq!(rt["stable"]["version"], 1);
    assert_eq!(
        act(&app, "bot", "rollback-promotion", &app.deployer)
            .await
            .0,
        409
    );
    app.cleanup().await;
}
backends!(a_promotion_can_be_reverted);

async fn a_shadow_phase_records_evidence_before_any_user_sees_the_candidate(db: Db, blobs: Blobs) {
    let app = app(db, blobs).await;
    version_with_evidence(&app, "bot", 1, 1).await;
    let spec = json!({"version": 1, "steps": [50, 100], "interval_secs": 1, "min_requests": 50,
        "shadow": {"percent": 25}, "rules": [error_rule(0.05)]});
    let (s, started) = start(&app, "bot", spec).await;
    assert_eq!(s, 201, "{started:#}");
    assert_eq!(started["rollout"]["state"], "shadowing");
    assert_eq!(started["rollout"]["weight"], 0.0);
    let rt = route(&app, "bot")
        .await
        .expect("routed: its stable arm is the base");
    assert!(rt["canary"].is_null(), "no user sees the candidate: {rt:#}");
    assert_eq!(rt["canary_weight"], 0.0);
    assert_eq!(
        (
            rt["shadow"]["version"].as_u64(),
            rt["shadow_percent"].as_f64()
        ),
        (Some(1), Some(25.0))
    );

    // The shadow arm answers as well as stable: the phase passes, users get the canary.
    let shadowed = [(1, "shadow", 100, 0), (0, "stable", 400, 0)];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let running = loop {
        observe(&app, "bot", &shadowed).await;
        let s = status(&app, "bot").await;
        if s["rollout"]["state"] != "shadowing" {
            break s;
        }
        assert!(tokio::time::Instant::now() < deadline, "{s:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(running["rollout"]["state"], "running", "{running:#}");
    assert_eq!(running["rollout"]["weight"], 50.0);
    let advance = running["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "advance")
        .unwrap()
        .clone();
    assert!(
        advance["reason"]
            .as_str()
            .unwrap()
            .starts_with("shadow analysis passed")
    );
    assert_eq!(advance["details"]["arms"][0]["arm"], "shadow");
    let ev = app
        .get_json("/api/v1/adapters/bot/versions/1/evidence")
        .await;
    let shadow = ev
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["suite"]["name"] == "shadow")
        .expect("shadow evidence")
        .clone();
    assert_eq!(shadow["created_by"], "controller");
    assert_eq!(shadow["metrics"]["passed"], 1.0);
    assert!(shadow["metrics"]["shadow_requests"].as_f64().unwrap() >= 50.0);
    let rt = route(&app, "bot").await.unwrap();
    assert_eq!(
        (rt["canary"]["version"].as_u64(), rt["shadow"].is_null()),
        (Some(1), true)
    );

    // Canary traffic then decides as usual; shadow data does not count for it.
    let done = drive(
        &app,
        "bot",
        &[(1, "canary", 100, 0), (0, "stable", 100, 0)],
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(done["rollout"]["state"], "promoted", "{done:#}");
    app.cleanup().await;
}
backends!(a_shadow_phase_records_evidence_before_any_user_sees_the_candidate);

async fn judge_rules_need_a_gateway_with_a_judge(db: Db, blobs: Blobs) {
    let app = app(db, blobs).await;
    version_with_evidence(&app, "bot", 1, 1).await;
    let spec =
        json!({"version": 1, "rules": [{"metric": "judge_score", "op": ">=", "threshold": 0.5}]});
    let (s, e) = start(&app, "bot", spec.clone()).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (422, Some("no_judge")),
        "{e:#}"
    );
    // A gateway without a judge does not help; one with a judge does.
    let now = chrono::Utc::now();
    for judge in [Value::Null, json!("tiny-llama")] {
        let res = app
            .post_json(
                "/api/v1/routing/observations",
                &app.gateway,
                &json!({"gateway": format!("gw-{}", judge.is_null()), "window_start": now,
                    "window_end": now, "arms": [], "judge": judge}),
            )
            .await;
        assert_eq!(res.status(), 202);
        if judge.is_null() {
            assert_eq!(start(&app, "bot", spec.clone()).await.0, 422);
        }
    }
    assert_eq!(start(&app, "bot", spec).await.0, 201);
    app.cleanup().await;
}
backends!(judge_rules_need_a_gateway_with_a_judge);

async fn forged_future_and_duplicate_observations_are_refused(db: Db, blobs: Blobs) {
    let app = app(db, blobs).await;
    push(&app, "bot", 1).await;
    let arms = vec![arm("bot", 1, "canary", 1_000_000, 0)];
    let body = |end: chrono::DateTime<chrono::Utc>| {
        json!({"gateway": "g", "window_start": end - chrono::Duration::seconds(5),
            "window_end": end, "arms": arms.clone()})
    };
    let now = chrono::Utc::now();
    // Only the data plane's role posts: an evaluator's or another team's gateway token is refused.
    let other_team = app
        .signer
        .issue("gw-a", &[Role::Gateway], 600, Some(vec!["team-a-*".into()]))
        .unwrap();
    for token in [&app.evaluator, &app.deployer, &other_team] {
        let (s, _) = error_of(
            app.post_json("/api/v1/routing/observations", token, &body(now))
                .await,
        )
        .await;
        assert_eq!(s, 403);
    }
    // A window ending in the future (beyond the allowed skew) or long ago is refused.
    for end in [
        now + chrono::Duration::seconds(60),
        now + chrono::Duration::days(365 * 70),
        now - chrono::Duration::hours(1),
    ] {
        let (s, e) = error_of(
            app.post_json("/api/v1/routing/observations", &app.gateway, &body(end))
                .await,
        )
        .await;
        assert_eq!(
            (s, e["code"].as_str()),
            (422, Some("invalid_observations")),
            "{end}"
        );
    }
    // Small skew is fine, and a retry of one report is stored once.
    let skewed = body(now + chrono::Duration::seconds(2));
    for duplicate in [false, true] {
        let res = app
            .post_json("/api/v1/routing/observations", &app.gateway, &skewed)
            .await;
        assert_eq!(res.status(), 202);
        let r: Value = res.json().await.unwrap();
        assert_eq!(r["duplicate"], duplicate, "{r}");
    }
    let rows = observation::Entity::find()
        .count(&app.state.db)
        .await
        .unwrap();
    assert_eq!(rows, 1);
    app.cleanup().await;
}
backends!(forged_future_and_duplicate_observations_are_refused);

async fn the_analysis_windows_reports_by_the_registrys_clock(db: Db, blobs: Blobs) {
    let app = app(db, blobs).await;
    version_with_evidence(&app, "bot", 1, 1).await;
    let spec = json!({"version": 1, "steps": [50, 100], "interval_secs": 1, "min_requests": 20,
        "rules": [{"metric": "error_rate", "op": "<=", "threshold": 0.05}]});
    assert_eq!(start(&app, "bot", spec).await.0, 201);
    // This gateway's clock is two minutes behind: its windows end before the rollout began.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let res = report(
            &app,
            vec![arm("bot", 1, "canary", 30, 0)],
            chrono::Duration::minutes(2),
        )
        .await;
        assert_eq!(res.status(), 202);
        let s = status(&app, "bot").await;
        if s["rollout"]["state"] != "running" {
            assert_eq!(s["rollout"]["state"], "promoted", "{s:#}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{s:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.cleanup().await;
}
backends!(the_analysis_windows_reports_by_the_registrys_clock);

async fn old_observations_are_pruned_and_the_analysis_query_uses_its_index(db: Db, blobs: Blobs) {
    let app = app(db, blobs).await;
    version_with_evidence(&app, "live", 1, 1).await;
    push(&app, "idle", 2).await;
    observe(&app, "idle", &[(1, "stable", 10, 0)]).await;
    // An hour-long interval: the controller does not fold the live report while the test runs.
    let (s, _) = start(&app, "live", json!({"version": 1, "interval_secs": 3600})).await;
    assert_eq!(s, 201);
    observe(&app, "live", &[(1, "canary", 10, 0)]).await;
    // The live adapter's report is its canary arm, the idle one's its stable arm.
    let count = |arm: &'static str| {
        let app = &app;
        async move {
            observation::Entity::find()
                .filter(observation::Column::Arm.eq(arm))
                .count(&app.state.db)
                .await
                .unwrap()
        }
    };
    assert_eq!((count("canary").await, count("stable").await), (1, 1));
    let db = &app.state.db;
    let now = controller::db_now(db).await.unwrap();
    // Within the retention nothing goes.
    assert_eq!(
        prune_observations(db, now, Duration::from_secs(3600))
            .await
            .unwrap(),
        0
    );
    // Eight days later, with a week's retention: the idle adapter's report goes, the active
    // rollout's open interval stays.
    let later = now + chrono::Duration::days(8);
    assert_eq!(
        prune_observations(db, later, Duration::from_secs(7 * 86400))
            .await
            .unwrap(),
        1
    );
    assert_eq!((count("canary").await, count("stable").await), (1, 0));

    // The analysis query is served by the (adapter_id, received_at) index.
    let q = controller::interval_query(1, now - chrono::Duration::hours(1), now);
    let stmt = q.build(db.get_database_backend());
    let plan = match db.get_database_backend() {
        sea_orm::DbBackend::Postgres => {
            use sea_orm::TransactionTrait;
            let txn = db.begin().await.unwrap();
            // Tiny tables are scanned anyway: ask what the planner would use.
            txn.execute_unprepared("SET LOCAL enable_seqscan = off")
                .await
                .unwrap();
            let rows = txn
                .query_all_raw(sea_orm::Statement {
                    sql: format!("EXPLAIN {}", stmt.sql),
                    ..stmt.clone()
                })
                .await
                .unwrap();
            rows.iter()
                .map(|r| r.try_get_by_index::<String>(0).unwrap())
                .collect::<Vec<_>>()
                .join("\n")
        }
        _ => {
            let rows = db
                .query_all_raw(sea_orm::Statement {
                    sql: format!("EXPLAIN QUERY PLAN {}", stmt.sql),
                    ..stmt.clone()
                })
                .await
                .unwrap();
            rows.iter()
                .map(|r| r.try_get::<String>("", "detail").unwrap())
                .collect::<Vec<_>>()
                .join("\n")
        }
    };
    // An index serves the time range, not just the adapter: the read is bounded by the
    // interval, however long the adapter's history.
    let ranged = plan.contains("received_at>?")
        || plan
            .lines()
            .any(|l| l.contains("Index Cond") && l.contains("received_at"));
    assert!(ranged, "{plan}");
    app.cleanup().await;
}
backends!(old_observations_are_pruned_and_the_analysis_query_uses_its_index);

async fn a_gateway_token_reads_what_serving_needs_and_posts_observations_only(
    db: Db,
    blobs: Blobs,
) {
    let app = app(db, blobs).await;
    let digest = version_with_evidence(&app, "bot", 1, 1).await;
    let g = &app.gateway;
    for path in [
        "/api/v1/routing",
        "/api/v1/adapters",
        "/api/v1/adapters/bot",
        "/api/v1/adapters/bot/versions",
        "/api/v1/adapters/bot/versions/1",
        "/api/v1/adapters/bot/versions/1/files/adapter_config.json",
        "/api/v1/base-models",
    ] {
        assert_eq!(app.get(path, g).await.status(), 200, "{path}");
    }
    for path in [
        "/api/v1/suites",
        "/api/v1/adapters/bot/gate",
        "/api/v1/adapters/bot/rollouts/current",
        "/api/v1/adapters/bot/versions/1/evidence",
        "/api/v1/base-models/tiny-llama/evidence",
    ] {
        assert_eq!(app.get(path, g).await.status(), 403, "{path}");
    }
    let suite = app.suite("bench", "1", 10).await;
    for (path, body) in [
        (
            "/api/v1/adapters/bot/versions/1/evidence",
            json!({"adapter_digest": digest, "suite": {"name": "bench", "version": "1", "digest": suite},
                "engine": {"engine": "x", "engine_version": "1"}, "metrics": {"accuracy": 1.0}, "cases": 10,
                "started_at": "2026-11-28T00:00:00Z", "finished_at": "2026-11-28T00:01:00Z"}),
        ),
        ("/api/v1/adapters/bot/rollouts", json!({"version": 1})),
        (
            "/api/v1/suites",
            json!({"manifest": {"name": "x", "version": "1", "scorer": {"type": "exact"}}, "cases": "{}\n"}),
        ),
        ("/api/v1/base-models", json!({"name": "other"})),
    ] {
        assert_eq!(app.post_json(path, g, &body).await.status(), 403, "{path}");
    }
    let res = app
        .http
        .put(app.url("/api/v1/adapters/bot/gate"))
        .bearer_auth(g)
        .json(&json!({"required_suites": ["bench@1"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    assert_eq!(app.push_files("bot", &[], g).await.status(), 403);
    observe(&app, "bot", &[(1, "stable", 3, 0)]).await;
    app.cleanup().await;
}
backends!(a_gateway_token_reads_what_serving_needs_and_posts_observations_only);

async fn gates_name_suites_the_registry_holds(db: Db, blobs: Blobs) {
    let app = app(db, blobs).await;
    let d1 = push(&app, "bot", 1).await;
    let bench = app.suite("bench", "1", 10).await;
    let put = |scope: &'static str, token: String, policy: Value| {
        let app = &app;
        async move {
            let res = app
                .http
                .put(app.url(&format!("/api/v1/adapters/{scope}/gate")))
                .bearer_auth(token)
                .json(&policy)
                .send()
                .await
                .unwrap();
            let s = res.status().as_u16();
            (s, res.json::<Value>().await.unwrap())
        }
    };
    let rule = |suite: &str| json!({"rules": [{"suite": suite, "metric": "accuracy", "op": ">=", "threshold": 0.8}]});
    // A bare name, a suite the registry does not hold, and an empty policy are refused.
    for (policy, needle) in [
        (rule("bench"), "NAME@VERSION"),
        (rule("bench@9"), "holds no suite bench@9"),
        (
            rule(&format!("sha256:{}", "0".repeat(64))),
            "holds no suite",
        ),
        (json!({}), "empty policy"),
    ] {
        let (s, e) = put("bot", app.deployer.clone(), policy).await;
        assert_eq!(
            (s, e["error"]["code"].as_str()),
            (422, Some("invalid_gate")),
            "{e}"
        );
        assert!(
            e["error"]["message"].as_str().unwrap().contains(needle),
            "{e}"
        );
    }
    assert_eq!(
        put("bot", app.deployer.clone(), rule("bench@1")).await.0,
        200
    );
    assert_eq!(
        put("bot", app.deployer.clone(), rule(&bench)).await.0,
        200,
        "by digest"
    );
    // Only an admin sets the default policy.
    let scoped = app
        .signer
        .issue(
            "dep-a",
            &[Role::Deployer],
            600,
            Some(vec!["team-a-*".into()]),
        )
        .unwrap();
    assert_eq!(put("*", scoped, rule("bench@1")).await.0, 403);
    assert_eq!(put("*", app.deployer.clone(), rule("bench@1")).await.0, 403);
    assert_eq!(put("*", app.admin.clone(), rule("bench@1")).await.0, 200);

    // Evidence must cite a suite the registry holds, with its name and number of cases.
    let post = |digest: &str, name: &str, cases: u64| {
        let app = &app;
        let body = json!({"adapter_digest": d1, "suite": {"name": name, "version": "1", "digest": digest},
            "engine": {"engine": "x", "engine_version": "1"}, "metrics": {"accuracy": 0.7}, "cases": cases,
            "started_at": "2026-11-28T00:00:00Z", "finished_at": "2026-11-28T00:01:00Z"});
        async move {
            error_of(
                app.post_json(
                    "/api/v1/adapters/bot/versions/1/evidence",
                    &app.evaluator,
                    &body,
                )
                .await,
            )
            .await
        }
    };
    let (s, e) = post("sha256:00", "bench", 10).await;
    assert_eq!((s, e["code"].as_str()), (422, Some("unknown_suite")));
    let (s, e) = post(&bench, "redteam", 10).await;
    assert_eq!(
        (s, e["code"].as_str()),
        (422, Some("invalid_evidence")),
        "{e}"
    );
    let (s, e) = post(&bench, "bench", 3).await;
    assert!(e["message"].as_str().unwrap().contains("10 cases"), "{e}");
    assert_eq!(s, 422);

    // A first version compared with the base model's evidence on the same suite.
    let base = |metric: f64| {
        json!({"adapter_digest": "base:tiny-llama", "suite": {"name": "bench", "version": "1", "digest": bench},
            "engine": {"engine": "x", "engine_version": "1"}, "metrics": {"accuracy": metric}, "cases": 10,
            "started_at": "2026-11-28T00:00:00Z", "finished_at": "2026-11-28T00:01:00Z"})
    };
    let mut wrong = base(0.8);
    wrong["adapter_digest"] = json!("sha256:abc");
    let res = app
        .post_json(
            "/api/v1/base-models/tiny-llama/evidence",
            &app.evaluator,
            &wrong,
        )
        .await;
    assert_eq!(error_of(res).await.1["code"], "digest_mismatch");
    let res = app
        .post_json(
            "/api/v1/base-models/tiny-llama/evidence",
            &app.evaluator,
            &base(0.8),
        )
        .await;
    assert_eq!(res.status(), 201);
    let vs_base = json!({"rules": [{"suite": "bench@1", "metric": "accuracy", "op": ">=",
        "max_regression": 0.0, "vs": "base"}]});
    assert_eq!(put("bot", app.deployer.clone(), vs_base).await.0, 200);
    evidence(
        &app,
        "bot",
        1,
        &d1,
        ("bench", "1"),
        json!({"accuracy": 0.7}),
    )
    .await;
    let (s, e) = start(&app, "bot", json!({"version": 1})).await;
    assert_eq!(s, 422, "{e:#}");
    let note = e["error"]["details"]["rules"][0]["note"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(note.contains("base model tiny-llama"), "{note}");
    evidence(
        &app,
        "bot",
        1,
        &d1,
        ("bench", "1"),
        json!({"accuracy": 0.85}),
    )
    .await;
    assert_eq!(start(&app, "bot", json!({"version": 1})).await.0, 201);
    app.cleanup().await;
}
backends!(gates_name_suites_the_registry_holds);
