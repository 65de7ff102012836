//! Evaluation suites: content-addressed uploads, listings, cases download, roles.

use loraops_registry::api::{NewSuite, SuiteManifest, canonical_cases, suite_digest};
use loraops_registry::client::RegistryClient;
use object_store::ObjectStoreExt;
use serde_json::{Value, json};

use crate::backends;
use crate::helpers::{Blobs, Db, error_of, spawn_app};

fn manifest(version: &str) -> SuiteManifest {
    serde_json::from_value(json!({
        "name": "capitals",
        "version": version,
        "scorer": {"type": "exact", "lowercase": true},
        "thresholds": [{"metric": "exact_match", "op": ">=", "value": 0.5}],
    }))
    .unwrap()
}

const CASES: &str = "{\"id\":\"fr\",\"prompt\":\"Capital of France?\",\"expected\":\"Paris\"}\n{\"id\":\"it\",\"prompt\":\"Capital of Italy?\",\"expected\":\"Rome\"}\n";
/// The same cases with other key order, spacing and blank lines.
const CASES_REFORMATTED: &str = "\n{ \"expected\": \"Paris\", \"id\": \"fr\", \"prompt\": \"Capital of France?\" }\n\n{\"prompt\":\"Capital of Italy?\",  \"expected\":\"Rome\",\"id\":\"it\"}";

async fn suites_are_content_addressed(db: Db, blobs: Blobs) {
    let app = spawn_app(db, blobs).await;
    let evaluator = RegistryClient::new(&app.address, Some(app.evaluator.clone()));
    let viewer = RegistryClient::new(&app.address, Some(app.viewer.clone()));
    let new = |version: &str, cases: &str| NewSuite {
        manifest: manifest(version),
        cases: cases.into(),
        digest: None,
    };

    let first = evaluator.push_suite(&new("1", CASES)).await.unwrap();
    assert!(first.created);
    let (canon, n) = canonical_cases(CASES).unwrap();
    assert_eq!(n, 2);
    assert_eq!(first.suite.digest, suite_digest(&manifest("1"), &canon));
    assert_eq!(
        (first.suite.cases, first.suite.size_bytes),
        (2, canon.len() as u64)
    );
    assert_eq!(first.suite.created_by, "tester");

    // Formatting is not content: the same suite, not a new one.
    let again = evaluator
        .push_suite(&new("1", CASES_REFORMATTED))
        .await
        .unwrap();
    assert!(!again.created);
    assert_eq!(again.suite.digest, first.suite.digest);

    // The cases are stored once, canonical, in the object store under the digest.
    let hex = first.suite.digest.strip_prefix("sha256:").unwrap();
    let stored = app
        .state
        .store
        .get(&object_store::path::Path::from(format!(
            "suites/{hex}/cases.jsonl"
        )))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(stored.as_ref(), canon.as_bytes());

    // Readers get the suite and its cases, verified against the digest.
    let shown = viewer.suite("capitals", Some("1")).await.unwrap();
    assert_eq!(shown.digest, first.suite.digest);
    assert_eq!(shown.manifest, manifest("1"));
    assert_eq!(viewer.suite_cases(&shown).await.unwrap(), canon);
    let res = app
        .get("/api/v1/suites/capitals/versions/1/cases", &app.viewer)
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()["etag"].to_str().unwrap(),
        format!("\"{}\"", first.suite.digest)
    );

    // Same name and version, other content: refused; a new version is fine and is the latest.
    let changed = "{\"id\":\"fr\",\"prompt\":\"Capital of France?\",\"expected\":\"Lyon\"}\n";
    let err = evaluator.push_suite(&new("1", changed)).await.unwrap_err();
    assert_eq!(err.status().map(|s| s.as_u16()), Some(409), "{err}");
    let second = evaluator.push_suite(&new("2", changed)).await.unwrap();
    assert!(second.created);
    assert_ne!(second.suite.digest, first.suite.digest);
    assert_eq!(viewer.suite("capitals", None).await.unwrap().version, "2");

    // Listings: all, by name, paged.
    let other = NewSuite {
        manifest: serde_json::from_value(
            json!({"name": "other", "version": "1", "scorer": {"type": "contains"}}),
        )
        .unwrap(),
        cases: CASES.into(),
        digest: None,
    };
    evaluator.push_suite(&other).await.unwrap();
    let all = viewer.suites(None).await.unwrap();
    assert_eq!(
        all.iter()
            .map(|s| format!("{}@{}", s.name, s.version))
            .collect::<Vec<_>>(),
        ["capitals@1", "capitals@2", "other@1"]
    );
    assert_eq!(viewer.suites(Some("capitals")).await.unwrap().len(), 2);
    let page = app.get_json("/api/v1/suites?limit=1").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    let next = page["next"].as_str().unwrap();
    let page2 = app
        .get_json(&format!("/api/v1/suites?limit=1&after={next}"))
        .await;
    assert_eq!(page2["items"][0]["version"], "2");

    let (status, body) = error_of(app.get("/api/v1/suites/nope", &app.viewer).await).await;
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));
    app.cleanup().await;
}
backends!(suites_are_content_addressed, s3);

async fn suite_uploads_are_checked(db: Db, blobs: Blobs) {
    let app = spawn_app(db, blobs).await;
    let body = |scorer: Value, cases: &str, digest: Option<&str>| json!({"manifest": {"name": "s", "version": "1", "scorer": scorer}, "cases": cases, "digest": digest});
    let good = body(json!({"type": "exact"}), CASES, None);
    // Roles: uploading needs evaluator; reads need a token.
    for token in [&app.viewer, &app.publisher] {
        let (status, _) = error_of(app.post_json("/api/v1/suites", token, &good).await).await;
        assert_eq!(status, 403);
    }
    let res = app
        .http
        .post(app.url("/api/v1/suites"))
        .json(&good)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let res = app
        .http
        .get(app.url("/api/v1/suites"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);

    let bad: Vec<(Value, &str)> = vec![
        (
            body(json!({"type": "exact"}), "not json\n", None),
            "invalid_suite",
        ),
        (
            body(json!({"type": "exact"}), "[1, 2]\n", None),
            "invalid_suite",
        ),
        (
            body(json!({"type": "exact"}), "\n\n", None),
            "invalid_suite",
        ),
        (
            body(json!({"lowercase": true}), CASES, None),
            "invalid_suite",
        ),
        (
            body(json!({"type": "exact"}), CASES, Some("sha256:00")),
            "digest_mismatch",
        ),
        (
            json!({"manifest": {"name": "s", "version": "1/2", "scorer": {"type": "exact"}}, "cases": CASES}),
            "invalid_suite",
        ),
    ];
    for (b, code) in bad {
        let (status, err) =
            error_of(app.post_json("/api/v1/suites", &app.evaluator, &b).await).await;
        assert_eq!((status, err["code"].as_str()), (422, Some(code)), "{b}");
    }
    // A name that is not a name never gets that far.
    let (status, _) = error_of(
        app.post_json(
            "/api/v1/suites",
            &app.evaluator,
            &json!({"manifest": {"name": "../x", "version": "1", "scorer": {"type": "exact"}}, "cases": CASES}),
        )
        .await,
    )
    .await;
    assert_eq!(status, 400);

    // The digest the client computed is accepted when it matches.
    let (canon, _) = canonical_cases(CASES).unwrap();
    let m: SuiteManifest = serde_json::from_value(good["manifest"].clone()).unwrap();
    let digest = suite_digest(&m, &canon);
    let res = app
        .post_json(
            "/api/v1/suites",
            &app.evaluator,
            &body(json!({"type": "exact"}), CASES, Some(&digest)),
        )
        .await;
    assert_eq!(res.status(), 201);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["digest"], digest);
    assert_eq!(v["created"], true);
    app.cleanup().await;
}
backends!(suite_uploads_are_checked);
