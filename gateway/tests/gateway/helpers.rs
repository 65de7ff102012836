//! Fixtures: a generated tiny Llama model, PEFT adapters written with the safetensors crate,
//! a real registry on port 0 holding them, and a real gateway (mistral.rs) in front.

use std::path::PathBuf;
use std::sync::OnceLock;

use loraops_gateway::validate::Limits;
use loraops_gateway::{Application, GatewaySettings};
use loraops_registry::api::{NewBaseModel, Role, RolloutSpec, StartRollout};
use loraops_registry::auth::{AuthSettings, Signer};
use loraops_registry::client::{RegistryClient, no_progress};
use loraops_registry::peft::ModelDims;
use loraops_registry::server::{Application as Registry, RegistrySettings, ServeSettings};
use serde_json::Value;

use crate::kit::post_evidence;
use loraops_testkit::{Lora, PeftAdapter, Shapes};

pub const SECRET: &str = "gateway-test-secret-0123456789";
pub const BASE: &str = "tiny-llama";
pub const ADAPTER: &str = "bot";

pub struct Fixture {
    pub base: PathBuf,
    pub hub_cache: PathBuf,
    /// Adapter directories: v1, v2 (different weights), and one using DoRA.
    pub v1: PathBuf,
    pub v2: PathBuf,
    pub dora: PathBuf,
}

/// Generated once per test process. Sets HF_HUB_CACHE before any server thread exists: every
/// test calls this first, and the OnceLock makes the others wait until it is done.
pub fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let root = tempfile::tempdir().unwrap().keep();
        let base = root.join(BASE);
        loraops_model::tiny::init_tiny(&base, &loraops_model::tiny::TinySpec::default()).unwrap();
        let hub_cache = root.join("hub");
        std::fs::create_dir_all(&hub_cache).unwrap();
        // SAFETY: runs once, inside the OnceLock, before any test starts a server or engine.
        unsafe { loraops_gateway::adapters::set_hub_cache_env(&hub_cache) };
        let cfg: Value =
            serde_json::from_slice(&std::fs::read(base.join("config.json")).unwrap()).unwrap();
        let v1 = root.join("v1");
        let v2 = root.join("v2");
        let dora = root.join("dora");
        // Large weights, so that merging an adapter changes the tiny model's greedy tokens.
        for (dir, seed, dora) in [(&v1, 1, false), (&v2, 2, false), (&dora, 3, true)] {
            let a = Lora {
                base_model: BASE,
                targets: &["q_proj", "v_proj"],
                seed,
                r: 4,
                alpha: 16.0,
                amplitude: 1.6,
                dora,
            };
            PeftAdapter::random(&a, &Shapes::of_config(&cfg)).write(dir);
        }
        Fixture {
            base,
            hub_cache,
            v1,
            v2,
            dora,
        }
    })
}

pub struct TestRegistry {
    pub url: String,
    pub admin: String,
    /// What gateways use: the `gateway` role only.
    pub gateway: String,
    pub signer: Signer,
    pub state: actix_web::web::Data<loraops_registry::server::AppState>,
    pub handle: actix_web::dev::ServerHandle,
    _dir: tempfile::TempDir,
}

pub async fn spawn_registry() -> TestRegistry {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let auth = AuthSettings {
        hs256_secret: Some(SECRET.into()),
        ..AuthSettings::default()
    };
    let settings = ServeSettings {
        data_dir: dir.path().to_path_buf(),
        registry: RegistrySettings {
            listen: "127.0.0.1:0".into(),
            sweep_interval_secs: 3600,
            controller_tick_ms: 100,
            ..RegistrySettings::default()
        },
        auth: auth.clone(),
        s3: Default::default(),
    };
    let app = Registry::build(settings).await.expect("registry starts");
    let url = format!("http://127.0.0.1:{}", app.port());
    let handle = app.handle();
    let state = app.state();
    tokio::spawn(app.run_until_stopped());
    let signer = Signer::from_settings(&auth, dir.path()).unwrap();
    let admin = signer.issue("tester", &[Role::Admin], 3600, None).unwrap();
    let gateway = signer
        .issue("gateway", &[Role::Gateway], 3600, None)
        .unwrap();
    let client = RegistryClient::new(&url, Some(admin.clone()));
    let cfg: Value =
        serde_json::from_slice(&std::fs::read(f.base.join("config.json")).unwrap()).unwrap();
    client
        .create_base_model(&NewBaseModel {
            name: BASE.parse().unwrap(),
            architecture: Some("LlamaForCausalLM".into()),
            dims: ModelDims::from_hf_config(&cfg),
            digest: None,
            description: None,
        })
        .await
        .unwrap();
    for dir in [&f.v1, &f.v2] {
        client
            .push_dir(dir, ADAPTER, Some(BASE), no_progress())
            .await
            .unwrap();
    }
    TestRegistry {
        url,
        admin,
        gateway,
        signer,
        state,
        handle,
        _dir: dir,
    }
}

impl TestRegistry {
    pub fn client(&self) -> RegistryClient {
        RegistryClient::new(&self.url, Some(self.admin.clone()))
    }

    /// Route `adapter` through the registry's rollout API: `stable` becomes the stable
    /// version (a rollout promoted at once) and `canary` a running rollout held at its weight
    /// (an hour-long analysis interval, so the controller never moves it during a test).
    pub async fn route(&self, adapter: &str, stable: Option<u32>, canary: Option<(u32, f64)>) {
        let c = self.client();
        if let Ok(s) = c.rollout(adapter).await
            && s.rollout.state.is_active()
        {
            c.rollout_action(adapter, "abort").await.unwrap();
        }
        let current = c.adapter(adapter).await.unwrap().stable_version;
        if let Some(v) = stable
            && current != Some(v)
        {
            self.with_evidence(adapter, v).await;
            self.start(adapter, v, vec![100.0]).await;
            c.rollout_action(adapter, "promote").await.unwrap();
        }
        if let Some((v, weight)) = canary {
            self.with_evidence(adapter, v).await;
            self.start(adapter, v, vec![weight, 100.0]).await;
        }
    }

    async fn start(&self, adapter: &str, version: u32, steps: Vec<f64>) {
        let req = StartRollout {
            version,
            spec: RolloutSpec {
                steps,
                interval_secs: 3600,
                ..RolloutSpec::default()
            },
        };
        self.client().start_rollout(adapter, &req).await.unwrap();
    }

    /// Evidence for `adapter@version`'s digest, so the default gate lets it start.
    pub async fn with_evidence(&self, adapter: &str, version: u32) {
        post_evidence(&self.client(), adapter, version, "gateway tests").await;
    }
}

#[derive(Clone)]
pub struct TestGateway {
    pub url: String,
    pub http: reqwest::Client,
}

pub fn settings() -> GatewaySettings {
    let f = fixture();
    let mut s = GatewaySettings::new(f.base.clone(), f.hub_cache.clone());
    s.listen = "127.0.0.1:0".into();
    s.poll_wait_secs = 2;
    s.report_interval = std::time::Duration::from_millis(200);
    s.limits = Limits {
        default_max_tokens: 8,
        ..Limits::default()
    };
    s
}

pub async fn spawn_gateway(registry: Option<&TestRegistry>) -> TestGateway {
    spawn_gateway_with(registry, |_| {}).await
}

pub async fn spawn_gateway_with(
    registry: Option<&TestRegistry>,
    tweak: impl FnOnce(&mut GatewaySettings),
) -> TestGateway {
    let mut s = settings();
    if let Some(r) = registry {
        s.registry_url = Some(r.url.clone());
        s.registry_token = Some(r.gateway.clone());
    }
    tweak(&mut s);
    let app = Application::build(s).await.expect("gateway starts");
    let url = format!("http://127.0.0.1:{}", app.port());
    tokio::spawn(app.run_until_stopped());
    TestGateway {
        url,
        http: reqwest::Client::new(),
    }
}

impl TestGateway {
    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.url))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap()
    }

    /// Greedy chat completion text for `model`.
    pub async fn chat(&self, model: &str, user: &str) -> (String, reqwest::header::HeaderMap) {
        let res = self
            .post(
                "/v1/chat/completions",
                &serde_json::json!({
                    "model": model, "temperature": 0, "max_tokens": 8, "user": user,
                    "messages": [{"role": "user", "content": "What is the capital of France?"}]
                }),
            )
            .await;
        assert_eq!(res.status(), 200, "{model}");
        let headers = res.headers().clone();
        let v: Value = res.json().await.unwrap();
        (
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string(),
            headers,
        )
    }

    /// Wait until `/readyz` reports the routing revision `rev` or later.
    pub async fn wait_revision(&self, rev: i64) {
        for _ in 0..200 {
            let v: Value = self.get("/readyz").await.json().await.unwrap();
            let line = v["checks"]["registry"].as_str().unwrap_or("").to_string();
            if let Some(n) = line
                .split("revision ")
                .nth(1)
                .and_then(|s| s.trim_end_matches(')').parse::<i64>().ok())
                && n >= rev
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("routing revision {rev} never applied");
    }

    /// Wait until `/readyz` lists adapter `id` (`NAME@V`) as resident: a routing table applies
    /// at once, and its versions load in the background.
    pub async fn wait_resident(&self, id: &str) {
        for _ in 0..200 {
            let v: Value = self.get("/readyz").await.json().await.unwrap();
            let adapters = v["checks"]["adapters"].as_str().unwrap_or("");
            if adapters.split(", ").any(|a| a == id) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("adapter {id} never became resident");
    }
}

/// Parse an SSE body into its `data:` payloads.
pub fn sse_events(body: &str) -> Vec<String> {
    assert!(body.ends_with("\n\n"), "SSE events end with a blank line");
    body.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {e:?}"))
                .to_string()
        })
        .collect()
}
