//! `spawn_app`: a real registry on port 0 over a real database (SQLite file or a fresh
//! PostgreSQL database) and a real object store (temp dir or the S3-compatible test server),
//! plus fixtures: PEFT adapters from the shared test kit (`loraops-testkit`).

use actix_web::web;
use loraops_registry::api::Role;
use loraops_registry::auth::{AuthSettings, Signer};
use loraops_registry::server::{
    AppState, Application, RegistrySettings, S3Settings, ServeSettings,
};
use loraops_testkit::{Lora, PeftAdapter, Shapes};
use reqwest::multipart;
use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Db {
    Sqlite,
    Postgres,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Blobs {
    Local,
    S3,
}

pub const SECRET: &str = "test-secret-0123456789abcdef";
pub const BASE: &str = "tiny-llama";

pub struct TestApp {
    pub address: String,
    pub http: reqwest::Client,
    pub state: web::Data<AppState>,
    pub dir: tempfile::TempDir,
    pub signer: Signer,
    pub admin: String,
    pub publisher: String,
    pub viewer: String,
    pub evaluator: String,
    pub deployer: String,
    /// The data plane's role: routing, adapters, observations.
    pub gateway: String,
    pub handle: actix_web::dev::ServerHandle,
    pub settings: ServeSettings,
    pg_database: Option<String>,
}

fn env_or_fail(key: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| panic!("{key} is not set: run the tests with scripts/test, which starts PostgreSQL and the S3 server"))
}

async fn fresh_postgres_database() -> (String, String) {
    let admin_url = env_or_fail("LORAOPS_TEST_POSTGRES_URL");
    let name = format!("loraops_test_{}", uuid::Uuid::new_v4().simple());
    let conn = sea_orm::Database::connect(admin_url.as_str())
        .await
        .expect("connect to PostgreSQL");
    use sea_orm::ConnectionTrait;
    conn.execute_unprepared(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create test database");
    conn.close().await.ok();
    let (base, _) = admin_url
        .rsplit_once('/')
        .expect("postgres URL names a database");
    (format!("{base}/{name}"), name)
}

async fn fresh_bucket() -> (String, S3Settings) {
    let endpoint = env_or_fail("LORAOPS_TEST_S3_ENDPOINT");
    let bucket = format!("loraops-test-{}", uuid::Uuid::new_v4().simple());
    let res = reqwest::Client::new()
        .put(format!("{endpoint}/{bucket}"))
        .send()
        .await
        .expect("reach the S3 test server");
    assert!(res.status().is_success(), "create bucket: {}", res.status());
    let s3 = S3Settings {
        endpoint: Some(endpoint),
        region: Some("us-east-1".into()),
        access_key_id: Some("test".into()),
        secret_access_key: Some("test".into()),
        allow_http: Some(true),
        virtual_hosted_style: Some(false),
    };
    (format!("s3://{bucket}/registry"), s3)
}

/// The PostgreSQL URL tests create their databases from (it can see every test database).
pub fn admin_postgres_url() -> String {
    env_or_fail("LORAOPS_TEST_POSTGRES_URL")
}

/// A registry whose object store is the S3 test server reached through `via` (a proxy a test
/// can cut); the bucket is created directly at the server.
pub async fn spawn_s3_via(db: Db, via: &str) -> TestApp {
    spawn_inner(db, Blobs::S3, Some(via.to_string()), |_| {}).await
}

pub async fn spawn_app(db: Db, blobs: Blobs) -> TestApp {
    spawn_with(db, blobs, |_| {}).await
}

pub async fn spawn_with(
    db: Db,
    blobs: Blobs,
    tweak: impl FnOnce(&mut RegistrySettings),
) -> TestApp {
    spawn_inner(db, blobs, None, tweak).await
}

async fn spawn_inner(
    db: Db,
    blobs: Blobs,
    s3_via: Option<String>,
    tweak: impl FnOnce(&mut RegistrySettings),
) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let (database_url, pg_database) = match db {
        Db::Sqlite => (None, None),
        Db::Postgres => {
            let (url, name) = fresh_postgres_database().await;
            (Some(url), Some(name))
        }
    };
    let (object_store_url, s3) = match blobs {
        Blobs::Local => (None, S3Settings::default()),
        Blobs::S3 => {
            let (u, mut s) = fresh_bucket().await;
            if let Some(via) = s3_via {
                s.endpoint = Some(via);
            }
            (Some(u), s)
        }
    };
    let mut registry = RegistrySettings {
        listen: "127.0.0.1:0".into(),
        database_url,
        object_store_url,
        // Tests call the sweep themselves.
        sweep_interval_secs: 3600,
        orphan_grace_secs: 3600,
        ..RegistrySettings::default()
    };
    tweak(&mut registry);
    let auth = AuthSettings {
        hs256_secret: Some(SECRET.into()),
        ..AuthSettings::default()
    };
    let settings = ServeSettings {
        data_dir: dir.path().to_path_buf(),
        registry,
        auth: auth.clone(),
        s3,
    };
    let app = Application::build(settings.clone())
        .await
        .expect("registry starts");
    let address = format!("http://127.0.0.1:{}", app.port());
    let state = app.state();
    let handle = app.handle();
    tokio::spawn(app.run_until_stopped());
    let signer = Signer::from_settings(&auth, dir.path()).unwrap();
    let tok = |roles: &[Role]| signer.issue("tester", roles, 3600, None).unwrap();
    TestApp {
        address,
        http: reqwest::Client::new(),
        state,
        admin: tok(&[Role::Admin]),
        publisher: tok(&[Role::Publisher]),
        viewer: tok(&[Role::Viewer]),
        evaluator: tok(&[Role::Evaluator]),
        deployer: tok(&[Role::Deployer]),
        gateway: tok(&[Role::Gateway]),
        signer,
        dir,
        handle,
        settings,
        pg_database,
    }
}

impl TestApp {
    /// A gateway token with its own subject (the fixed tokens all share `tester`).
    pub fn gateway_other(&self) -> String {
        self.signer
            .issue("other-gateway", &[Role::Gateway], 3600, None)
            .unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    pub async fn get(&self, path: &str, token: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    pub async fn get_json(&self, path: &str) -> Value {
        let res = self.get(path, &self.viewer).await;
        assert!(res.status().is_success(), "GET {path}: {}", res.status());
        res.json().await.unwrap()
    }

    pub async fn register_base(&self) {
        let res = self
            .http
            .post(self.url("/api/v1/base-models"))
            .bearer_auth(&self.admin)
            .json(&json!({
                "name": BASE,
                "architecture": "LlamaForCausalLM",
                "dims": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 300}
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201, "{}", res.text().await.unwrap());
    }

    pub async fn push_files(
        &self,
        name: &str,
        files: &[(String, Vec<u8>)],
        token: &str,
    ) -> reqwest::Response {
        let mut form = multipart::Form::new();
        for (n, bytes) in files {
            form = form.part(
                n.clone(),
                multipart::Part::bytes(bytes.clone()).file_name(n.clone()),
            );
        }
        self.http
            .post(self.url(&format!("/api/v1/adapters/{name}/versions")))
            .bearer_auth(token)
            .multipart(form)
            .send()
            .await
            .unwrap()
    }

    pub async fn push(&self, name: &str, adapter: &Adapter) -> reqwest::Response {
        self.push_files(name, &adapter.files(), &self.publisher)
            .await
    }

    /// The name of this test's PostgreSQL database.
    pub fn pg_database(&self) -> Option<&str> {
        self.pg_database.as_deref()
    }

    /// Stop this registry and start a new one on the same database, object store and keys,
    /// as a crashed or redeployed replica would be replaced.
    pub async fn restart(mut self) -> Self {
        self.handle.stop(false).await;
        let mut settings = self.settings.clone();
        settings.registry.listen = "127.0.0.1:0".into();
        let app = Application::build(settings)
            .await
            .expect("registry restarts");
        self.address = format!("http://127.0.0.1:{}", app.port());
        self.state = app.state();
        self.handle = app.handle();
        tokio::spawn(app.run_until_stopped());
        self
    }

    /// The Prometheus exposition of `/metrics`.
    pub async fn metrics(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn post_json(&self, path: &str, token: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// Upload suite `name@version` with `cases` trivial cases (as an evaluator); its digest.
    pub async fn suite(&self, name: &str, version: &str, cases: usize) -> String {
        let lines: String = (0..cases)
            .map(|i| json!({"prompt": format!("q{i}"), "expected": "a"}).to_string() + "\n")
            .collect();
        let res = self
            .post_json(
                "/api/v1/suites",
                &self.evaluator,
                &json!({"manifest": {"name": name, "version": version, "scorer": {"type": "exact"}},
                    "cases": lines}),
            )
            .await;
        assert!(res.status().is_success(), "suite: {}", res.status());
        let v: Value = res.json().await.unwrap();
        v["digest"].as_str().unwrap().to_string()
    }

    /// Drop the PostgreSQL database of this test (after the test passed).
    pub async fn cleanup(self) {
        if let Some(name) = &self.pg_database {
            self.state.db.clone().close().await.ok();
            let conn =
                sea_orm::Database::connect(env_or_fail("LORAOPS_TEST_POSTGRES_URL").as_str())
                    .await
                    .unwrap();
            use sea_orm::ConnectionTrait;
            conn.execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await
                .ok();
        }
    }
}

/// A PEFT LoRA adapter (the shared test kit's).
pub type Adapter = PeftAdapter;

/// A seeded random adapter on `targets` for the `tiny-llama` base (the default tiny model's
/// shapes: hidden 64, 4 heads and 2 KV heads of 16, intermediate 128, 2 layers).
pub fn adapter(seed: u32, r: usize, targets: &[&str]) -> Adapter {
    let base = format!("/models/{BASE}");
    let lora = Lora {
        base_model: &base,
        targets,
        r,
        alpha: 2.0 * r as f64,
        seed: seed.into(),
        amplitude: 1.0,
        dora: false,
    };
    PeftAdapter::random(&lora, &Shapes::tiny())
}

/// The `{"error":{…}}` body of a failed response, with its status.
pub async fn error_of(res: reqwest::Response) -> (u16, Value) {
    let status = res.status().as_u16();
    let body: Value = res.json().await.expect("error body is JSON");
    assert!(
        body["error"]["code"].is_string() && body["error"]["message"].is_string(),
        "error shape: {body}"
    );
    (status, body["error"].clone())
}
