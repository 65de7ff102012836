//! Authentication and the RBAC matrix.

use loraops_registry::api::Role;
use loraops_registry::auth::{AuthSettings, Signer};
use serde_json::json;

use crate::backends;
use crate::helpers::{Blobs, Db, TestApp, adapter, error_of, spawn_app, spawn_with};

async fn push_status(app: &TestApp, name: &str, token: Option<&str>) -> u16 {
    let files = adapter(1, 4, &["q_proj"]).files();
    let mut form = reqwest::multipart::Form::new();
    for (n, b) in files {
        form = form.part(n.clone(), reqwest::multipart::Part::bytes(b).file_name(n));
    }
    let mut rb = app
        .http
        .post(app.url(&format!("/api/v1/adapters/{name}/versions")))
        .multipart(form);
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    let res = rb.send().await.unwrap();
    let status = res.status().as_u16();
    if status >= 400 {
        error_of(res).await;
    }
    status
}

async fn bad_tokens_get_401(db: Db, blobs: Blobs) {
    let app = spawn_app(db, blobs).await;
    app.register_base().await;
    let expired = app
        .signer
        .issue("old", &[Role::Admin], -3600, None)
        .unwrap();
    let forged = Signer::from_settings(
        &AuthSettings {
            hs256_secret: Some("another-secret-0123456789".into()),
            ..AuthSettings::default()
        },
        app.dir.path(),
    )
    .unwrap()
    .issue("mallory", &[Role::Admin], 3600, None)
    .unwrap();
    let wrong_aud = Signer::from_settings(
        &AuthSettings {
            hs256_secret: Some(crate::helpers::SECRET.into()),
            audience: "elsewhere".into(),
            ..AuthSettings::default()
        },
        app.dir.path(),
    )
    .unwrap()
    .issue("x", &[Role::Admin], 3600, None)
    .unwrap();
    let claims = app.admin.split('.').nth(1).unwrap();
    let none_alg = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{claims}.");
    for (what, token) in [
        ("none", None),
        ("expired", Some(expired.as_str())),
        ("forged", Some(forged.as_str())),
        ("audience", Some(wrong_aud.as_str())),
        ("alg none", Some(none_alg.as_str())),
        ("garbage", Some("abc.def.ghi")),
    ] {
        assert_eq!(push_status(&app, "guarded", token).await, 401, "{what}");
        let mut rb = app.http.get(app.url("/api/v1/adapters"));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        let res = rb.send().await.unwrap();
        assert_eq!(
            res.headers()
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap()),
            Some("Bearer"),
            "{what}"
        );
        assert_eq!(error_of(res).await.0, 401, "{what}");
    }
    let res = app
        .http
        .get(app.url("/api/v1/adapters"))
        .header("Authorization", "Basic dXNlcjpwdw==")
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(res).await.0, 401);
    app.cleanup().await;
}
backends!(bad_tokens_get_401);

async fn each_write_needs_its_role(db: Db, blobs: Blobs) {
    let app = spawn_app(db, blobs).await;
    app.register_base().await;
    // Pushing: publisher and admin only.
    for (who, token, want) in [
        ("viewer", &app.viewer, 403),
        ("evaluator", &app.evaluator, 403),
        ("deployer", &app.deployer, 403),
        ("publisher", &app.publisher, 201),
    ] {
        assert_eq!(
            push_status(&app, "rbac", Some(token)).await,
            want,
            "{who} push"
        );
    }
    // Base models: admin only.
    for (who, token, want) in [
        ("publisher", &app.publisher, 403),
        ("deployer", &app.deployer, 403),
        ("admin", &app.admin, 201),
    ] {
        let res = app
            .http
            .post(app.url("/api/v1/base-models"))
            .bearer_auth(token)
            .json(&json!({"name": format!("base-{who}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), want, "{who} base model");
    }
    // Evidence: evaluator (and admin).
    let digest = app.get_json("/api/v1/adapters/rbac/versions/1").await["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let suite = app.suite("smoke", "1", 10).await;
    let evidence = json!({
        "adapter_digest": digest, "suite": {"name": "smoke", "version": "1", "digest": suite},
        "engine": {"engine": "mistral.rs", "engine_version": "0.8.1"}, "metrics": {"accuracy": 0.9}, "cases": 10,
        "started_at": "2026-11-28T00:00:00Z", "finished_at": "2026-11-28T00:01:00Z"
    });
    for (who, token, want) in [
        ("publisher", &app.publisher, 403),
        ("deployer", &app.deployer, 403),
        ("evaluator", &app.evaluator, 201),
        ("admin", &app.admin, 201),
    ] {
        let res = app
            .http
            .post(app.url("/api/v1/adapters/rbac/versions/1/evidence"))
            .bearer_auth(token)
            .json(&evidence)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), want, "{who} evidence");
    }
    // Gates: deployer (and admin).
    let policy = json!({"rules": [{"suite": "smoke@1", "metric": "accuracy", "op": ">=", "threshold": 0.8}]});
    for (who, token, want) in [
        ("publisher", &app.publisher, 403),
        ("evaluator", &app.evaluator, 403),
        ("deployer", &app.deployer, 200),
    ] {
        let res = app
            .http
            .put(app.url("/api/v1/adapters/rbac/gate"))
            .bearer_auth(token)
            .json(&policy)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), want, "{who} gate");
    }
    // Every role may read.
    for token in [
        &app.viewer,
        &app.publisher,
        &app.evaluator,
        &app.deployer,
        &app.admin,
    ] {
        assert_eq!(app.get("/api/v1/adapters/rbac", token).await.status(), 200);
    }
    app.cleanup().await;
}
backends!(each_write_needs_its_role);

async fn adapter_patterns_limit_a_token(db: Db, blobs: Blobs) {
    let app = spawn_app(db, blobs).await;
    app.register_base().await;
    let team_a = app
        .signer
        .issue(
            "ci-team-a",
            &[Role::Publisher],
            600,
            Some(vec!["team-a-*".into()]),
        )
        .unwrap();
    assert_eq!(push_status(&app, "team-a-bot", Some(&team_a)).await, 201);
    assert_eq!(push_status(&app, "team-b-bot", Some(&team_a)).await, 403);
    app.cleanup().await;
}
backends!(adapter_patterns_limit_a_token);

async fn reads_can_be_open(db: Db, blobs: Blobs) {
    let app = spawn_with(db, blobs, |r| r.anonymous_reads = true).await;
    app.register_base().await;
    assert_eq!(
        app.http
            .get(app.url("/api/v1/adapters"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(push_status(&app, "open", None).await, 401);
    app.cleanup().await;
}
backends!(reads_can_be_open);

/// Reads need a role that reads the registry, and a token limited to some adapters reads and
/// downloads only those.
async fn reads_are_scoped_to_the_tokens_adapters(db: Db, blobs: Blobs) {
    let app = spawn_app(db, blobs).await;
    app.register_base().await;
    let a = adapter(21, 4, &["q_proj"]);
    assert_eq!(app.push("team-a-bot", &a).await.status(), 201);
    assert_eq!(
        app.push("team-b-bot", &adapter(22, 4, &["q_proj"]))
            .await
            .status(),
        201
    );
    let scoped = app
        .signer
        .issue(
            "a-viewer",
            &[Role::Viewer],
            600,
            Some(vec!["team-a-*".into()]),
        )
        .unwrap();
    let list: serde_json::Value = app
        .get("/api/v1/adapters", &scoped)
        .await
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["team-a-bot"]);
    let own = "/api/v1/adapters/team-a-bot/versions/1/files/adapter_model.safetensors";
    let other = "/api/v1/adapters/team-b-bot/versions/1/files/adapter_model.safetensors";
    assert_eq!(app.get(own, &scoped).await.status(), 200);
    assert_eq!(app.get(other, &scoped).await.status(), 404);
    assert_eq!(
        app.get("/api/v1/adapters/team-b-bot/versions", &scoped)
            .await
            .status(),
        404
    );
    assert_eq!(
        app.get("/api/v1/adapters/team-b-bot", &scoped)
            .await
            .status(),
        404
    );
    let routing: serde_json::Value = app
        .get("/api/v1/routing", &scoped)
        .await
        .json()
        .await
        .unwrap();
    assert!(
        routing["routes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["adapter"] == "team-a-bot"),
        "{routing}"
    );

    // No role, or only `inference`: nothing to read.
    for roles in [&[][..], &[Role::Inference][..]] {
        let t = app.signer.issue("end-user", roles, 600, None).unwrap();
        for path in ["/api/v1/adapters", own, "/api/v1/routing", "/api/v1/suites"] {
            assert_eq!(app.get(path, &t).await.status(), 403, "{roles:?} {path}");
        }
    }
    // The viewer reads everything.
    assert_eq!(app.get(other, &app.viewer).await.status(), 200);
    app.cleanup().await;
}
backends!(reads_are_scoped_to_the_tokens_adapters);

mod idp {
    //! Tokens from an identity provider: keys from a JWKS URL served here (rotated mid-test),
    //! RS256/PS256/ES256/EdDSA, `aud` arrays, roles under a claim path with a group mapping,
    //! and a maximum lifetime.

    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use actix_web::{App, HttpResponse, HttpServer, web};
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use loraops_registry::api::Role;
    use loraops_registry::auth::{AuthSettings, Verifier};
    use serde_json::{Value, json};

    const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/testdata");

    #[derive(Clone, Default)]
    struct Jwks {
        doc: Arc<Mutex<String>>,
        hits: Arc<AtomicUsize>,
    }

    fn serve(jwks: Jwks) -> String {
        let data = web::Data::new(jwks);
        let server = HttpServer::new(move || {
            App::new().app_data(data.clone()).route(
                "/certs",
                web::get().to(|j: web::Data<Jwks>| async move {
                    j.hits.fetch_add(1, Ordering::SeqCst);
                    HttpResponse::Ok()
                        .content_type("application/json")
                        .body(j.doc.lock().unwrap().clone())
                }),
            )
        })
        .workers(1)
        .bind("127.0.0.1:0")
        .unwrap();
        let port = server.addrs()[0].port();
        tokio::spawn(server.run());
        format!("http://127.0.0.1:{port}/certs")
    }

    fn doc(name: &str) -> String {
        std::fs::read_to_string(format!("{DATA}/{name}")).unwrap()
    }

    fn key(alg: Algorithm) -> EncodingKey {
        let pem = |f: &str| std::fs::read(format!("{DATA}/{f}")).unwrap();
        match alg {
            Algorithm::RS256 | Algorithm::PS256 => {
                EncodingKey::from_rsa_pem(&pem("rs256-private.pem")).unwrap()
            }
            Algorithm::ES256 => EncodingKey::from_ec_pem(&pem("es256-private.pem")).unwrap(),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem("ed25519-private.pem")).unwrap(),
            _ => unreachable!(),
        }
    }

    /// A token as an IdP would mint it: Keycloak-style roles, `aud` an array.
    fn token(alg: Algorithm, kid: &str, claims: Value) -> String {
        let mut h = Header::new(alg);
        h.kid = Some(kid.into());
        jsonwebtoken::encode(&h, &claims, &key(alg)).unwrap()
    }

    fn claims(roles: &[&str], lifetime: i64) -> Value {
        let now = chrono::Utc::now().timestamp();
        json!({"sub": "alice@example.com", "iss": "https://idp.example/realms/ml",
            "aud": ["account", "loraops"], "iat": now, "exp": now + lifetime,
            "realm_access": {"roles": roles}})
    }

    fn settings(url: &str) -> AuthSettings {
        AuthSettings {
            jwks_url: Some(url.into()),
            jwks_min_refresh_secs: 1,
            issuer: Some("https://idp.example/realms/ml".into()),
            roles_claim: "realm_access.roles".into(),
            role_mapping: [(
                "ml-platform".to_string(),
                vec!["deployer".to_string(), "viewer".to_string()],
            )]
            .into_iter()
            .collect(),
            max_token_lifetime_secs: 3600,
            ..AuthSettings::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keys_from_a_jwks_url_rotate_and_refreshes_are_bounded() {
        let jwks = Jwks::default();
        *jwks.doc.lock().unwrap() = doc("jwks-rsa.json");
        let url = serve(jwks.clone());
        let dir = tempfile::tempdir().unwrap();
        let v = Verifier::from_settings(&settings(&url), dir.path(), false).unwrap();
        let verify = |t: String| {
            let v = &v;
            tokio::task::block_in_place(|| v.verify(&t))
        };

        let p = verify(token(
            Algorithm::RS256,
            "rsa-1",
            claims(&["ml-platform"], 600),
        ))
        .unwrap();
        assert_eq!(p.sub, "alice@example.com");
        assert!(p.has(Role::Deployer) && p.has(Role::Viewer) && !p.has(Role::Publisher));
        assert!(
            verify(token(Algorithm::PS256, "ps-1", claims(&["publisher"], 600)))
                .unwrap()
                .has(Role::Publisher)
        );
        // Wrong issuer, wrong audience, too long a life, an HS256 token: refused.
        let mut c = claims(&["viewer"], 600);
        c["iss"] = json!("https://evil.example");
        assert!(verify(token(Algorithm::RS256, "rsa-1", c)).is_err());
        let mut c = claims(&["viewer"], 600);
        c["aud"] = json!(["account"]);
        assert!(verify(token(Algorithm::RS256, "rsa-1", c)).is_err());
        assert!(
            verify(token(
                Algorithm::RS256,
                "rsa-1",
                claims(&["viewer"], 2 * 86400)
            ))
            .is_err()
        );
        let hs = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims(&["admin"], 600),
            &EncodingKey::from_secret(b"0123456789abcdef0123"),
        )
        .unwrap();
        assert!(verify(hs).is_err());

        // Tokens naming keys the document does not have: one fetch per refresh bound, not one
        // per token.
        let before = jwks.hits.load(Ordering::SeqCst);
        for _ in 0..20 {
            assert!(verify(token(Algorithm::ES256, "ec-1", claims(&["viewer"], 600))).is_err());
        }
        assert!(jwks.hits.load(Ordering::SeqCst) - before <= 1);

        // The IdP rotates its keys: after the refresh bound, the new keys verify and the old
        // ones no longer do.
        *jwks.doc.lock().unwrap() = doc("jwks-rotated.json");
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        assert!(
            verify(token(Algorithm::ES256, "ec-1", claims(&["viewer"], 600)))
                .unwrap()
                .has(Role::Viewer)
        );
        assert!(
            verify(token(Algorithm::EdDSA, "ed-1", claims(&["viewer"], 600)))
                .unwrap()
                .has(Role::Viewer)
        );
        assert!(verify(token(Algorithm::RS256, "rsa-1", claims(&["viewer"], 600))).is_err());
    }

    /// The registry end to end with IdP tokens: a mapped group may deploy, reads work, and an
    /// unmapped, unknown group reads nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_registry_accepts_idp_tokens() {
        let jwks = Jwks::default();
        *jwks.doc.lock().unwrap() = doc("jwks-rsa.json");
        let url = serve(jwks);
        let dir = tempfile::tempdir().unwrap();
        let settings = loraops_registry::server::ServeSettings {
            data_dir: dir.path().to_path_buf(),
            registry: loraops_registry::server::RegistrySettings {
                listen: "127.0.0.1:0".into(),
                ..Default::default()
            },
            auth: settings(&url),
            s3: Default::default(),
        };
        let app = loraops_registry::server::Application::build(settings)
            .await
            .unwrap();
        let base = format!("http://127.0.0.1:{}", app.port());
        tokio::spawn(app.run_until_stopped());
        let http = reqwest::Client::new();
        let get = |t: String| {
            http.get(format!("{base}/api/v1/adapters"))
                .bearer_auth(t)
                .send()
        };
        let ok = get(token(
            Algorithm::RS256,
            "rsa-1",
            claims(&["ml-platform"], 600),
        ))
        .await
        .unwrap();
        assert_eq!(ok.status(), 200);
        let none = get(token(
            Algorithm::RS256,
            "rsa-1",
            claims(&["offline_access"], 600),
        ))
        .await
        .unwrap();
        assert_eq!(none.status(), 403);
        let gate = http
            .put(format!("{base}/api/v1/adapters/bot/gate"))
            .bearer_auth(token(
                Algorithm::RS256,
                "rsa-1",
                claims(&["ml-platform"], 600),
            ))
            .json(&json!({"rules": [], "required_suites": []}))
            .send()
            .await
            .unwrap();
        // The deployer role got through (the body is judged on its merits, not refused as 401/403).
        assert!(
            ![401, 403].contains(&gate.status().as_u16()),
            "{}",
            gate.status()
        );
    }
}
