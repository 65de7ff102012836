//! The HTTP server (actix-web): OpenAI-compatible inference under `/v1`, operations endpoints
//! at the root. Handlers stay thin: validation, routing and inference live in their modules.

mod auth;
mod control;
mod inference;
mod ops;

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use actix_web::dev::Server;
use actix_web::{App, HttpServer, web};
use loraops_registry::auth::{AuthError, Verifier};
use loraops_registry::client::RegistryClient;

use crate::adapters::AdapterStore;
use crate::engine::mistral::{MistralBackend, MistralLoader, parse_dtype, parse_isq};
use crate::engine::native::NativeBackend;
use crate::engine::remote::{RemoteBackend, RemoteSettings};
use crate::engine::{EngineError, EngineKey, SharedBackend};
use crate::feed::{Feed, FeedStatus};
use crate::limiter::Limiter;
use crate::metrics::Metrics;
use crate::pool::EnginePool;
use crate::report::Recorder;
use crate::routing::Router;
use crate::settings::{EngineKind, GatewaySettings};
use crate::validate::Limits;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("base model {path}: {message}")]
    BaseModel { path: PathBuf, message: String },
    #[error("dtype {0:?}: expected auto, bf16, f16 or f32")]
    Dtype(String),
    #[error("isq {0:?}: expected q4_0, q4_1, q5_0, q5_1, q8_0, q8_1, q2k … q8k, hqq4 or hqq8")]
    Isq(String),
    #[error(
        "a memory budget of {budget_mb} MiB holds no engine: one needs about {engine_mb} MiB (use a smaller dtype or isq)"
    )]
    Budget { budget_mb: u64, engine_mb: u64 },
    #[error(transparent)]
    Base(#[from] crate::base::BaseError),
    #[error(
        "HF_HUB_CACHE is {found:?} but the adapter cache is {expected}: set it before start (adapters::set_hub_cache_env)"
    )]
    HubCache {
        expected: PathBuf,
        found: Option<String>,
    },
    #[error("auth: {0}")]
    Auth(#[from] AuthError),
    #[error("starting the engine: {0}")]
    Engine(#[from] EngineError),
    #[error("the remote engine needs an upstream URL (--upstream)")]
    NoUpstream,
}

pub struct AppState {
    pub router: Arc<Router>,
    pub backend: SharedBackend,
    pub metrics: Arc<Metrics>,
    pub limiter: Limiter,
    pub verifier: Option<Verifier>,
    pub feed: Option<Arc<Mutex<FeedStatus>>>,
    pub limits: Limits,
    pub started: i64,
    /// Per-arm counters for the registry's rollout analysis.
    pub recorder: Arc<Recorder>,
    /// Scores a sample of rollout answers (`judge_score`), when configured.
    pub judge: Option<Arc<crate::judge::OnlineJudge>>,
    /// Mirrors a share of stable requests to a candidate in its shadow phase.
    pub shadow: crate::shadow::Mirror,
}

/// Mount the gateway's routes. Bodies are read and parsed by the handlers themselves, after
/// authentication, so every failure answers in OpenAI's error shape.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route(
        "/v1/chat/completions",
        web::post().to(inference::chat_completions),
    )
    .route("/v1/completions", web::post().to(inference::completions))
    .route("/v1/models", web::get().to(ops::models))
    .route(
        "/v1/load_lora_adapter",
        web::post().to(control::load_lora_adapter),
    )
    .route(
        "/v1/unload_lora_adapter",
        web::post().to(control::unload_lora_adapter),
    )
    .route("/healthz", web::get().to(ops::healthz))
    .route("/readyz", web::get().to(ops::readyz))
    .route("/metrics", web::get().to(ops::metrics));
}

/// A gateway bound to its port, ready to run.
pub struct Application {
    port: u16,
    server: Server,
    state: web::Data<AppState>,
}

impl Application {
    pub async fn build(settings: GatewaySettings) -> Result<Self, StartError> {
        let base_dir =
            std::fs::canonicalize(&settings.base_model_dir).map_err(|e| StartError::BaseModel {
                path: settings.base_model_dir.clone(),
                message: e.to_string(),
            })?;
        if !base_dir.join("config.json").exists() {
            return Err(StartError::BaseModel {
                path: base_dir,
                message: "no config.json (expected a Hugging Face model directory)".into(),
            });
        }
        let base_name = settings.base_model_name.clone().unwrap_or_else(|| {
            base_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "base".into())
        });
        std::fs::create_dir_all(&settings.cache_dir).map_err(|e| StartError::BaseModel {
            path: settings.cache_dir.clone(),
            message: e.to_string(),
        })?;
        let cache_dir =
            std::fs::canonicalize(&settings.cache_dir).unwrap_or(settings.cache_dir.clone());
        let registry = settings.registry_url.as_deref().map(|u| {
            let c = RegistryClient::new(u, settings.registry_token.clone());
            match &settings.registry_token_file {
                Some(f) => c.with_token_file(f.clone()),
                None => c,
            }
        });
        let metrics = Arc::new(Metrics::new());
        let store = AdapterStore::new(cache_dir.clone(), registry.clone());
        let backend: SharedBackend = match settings.engine {
            EngineKind::Native => {
                let n = &settings.native;
                let mut o = loraops_engine::EngineOptions::new(&base_dir);
                o.quantize = n.quantize;
                o.kv_cache_bytes = (n.kv_cache_mb as usize) << 20;
                o.batch = loraops_engine::BatchLimits {
                    max_running: n.max_batch.max(1),
                    prefill_chunk: n.prefill_chunk.max(1),
                };
                o.max_waiting = settings.max_queued + settings.max_concurrent;
                o.slots = loraops_engine::SlotLimits {
                    max_adapters: n.max_adapters.max(1),
                    max_bytes: (n.adapter_memory_mb as usize) << 20,
                };
                let max_prompt = settings.limits.max_prompt_tokens;
                let started =
                    tokio::task::spawn_blocking(move || NativeBackend::start(o, store, max_prompt))
                        .await;
                Arc::new(started.map_err(|e| {
                    StartError::Engine(EngineError::Internal(format!("engine start: {e}")))
                })??)
            }
            EngineKind::Mistralrs => {
                Arc::new(mistral_backend(&settings, &base_dir, &cache_dir, store, &metrics).await?)
            }
            EngineKind::Remote => {
                let url = settings
                    .upstream_url
                    .as_deref()
                    .ok_or(StartError::NoUpstream)?;
                let mut r = RemoteSettings::new(url, &base_name);
                r.api_key = settings.upstream_api_key.clone();
                r.lora_path = settings.upstream_lora_path.clone();
                Arc::new(RemoteBackend::new(r)?)
            }
        };
        let router = Arc::new(
            Router::new(base_name, registry.clone()).with_pinned_versions(settings.pinned_versions),
        );
        let verifier = match &settings.auth {
            Some(a) => Some(Verifier::from_settings(a, &settings.data_dir, false)?),
            None => None,
        };
        let recorder = Arc::new(Recorder::new());
        if let Some(client) = &registry {
            let id = format!(
                "{}-{}",
                std::env::var("HOSTNAME").unwrap_or_else(|_| "gateway".into()),
                &uuid::Uuid::new_v4().to_string()[..8]
            );
            tokio::spawn(crate::report::run(
                recorder.clone(),
                client.clone(),
                id,
                settings.report_interval,
                settings.judge.as_ref().map(|j| j.model.clone()),
            ));
        }
        let feed = registry.map(|client| {
            let status = Arc::new(Mutex::new(FeedStatus::default()));
            let feed = Feed {
                client,
                router: router.clone(),
                backend: backend.clone(),
                metrics: metrics.clone(),
                status: status.clone(),
                wait_secs: settings.poll_wait_secs,
            };
            tokio::spawn(feed.run());
            status
        });
        let state = web::Data::new(AppState {
            router,
            backend,
            metrics,
            limiter: Limiter::new(settings.max_concurrent, settings.max_queued),
            verifier,
            feed,
            limits: settings.limits.clone(),
            started: chrono::Utc::now().timestamp(),
            recorder,
            judge: settings
                .judge
                .clone()
                .map(|j| Arc::new(crate::judge::OnlineJudge::new(j))),
            shadow: crate::shadow::Mirror::default(),
        });

        let listen = settings.listen.clone();
        let listen_err = |source| StartError::Listen {
            addr: listen.clone(),
            source,
        };
        let listener = TcpListener::bind(&listen).map_err(listen_err)?;
        let port = listener.local_addr().map_err(listen_err)?.port();
        let data = state.clone();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .configure(configure)
                .default_service(web::to(ops::no_route))
        })
        // SSE writes one small chunk per event: without TCP_NODELAY, Nagle holds each one
        // back until the client's (delayed, ~40 ms) ACK of the previous.
        .tcp_nodelay(true)
        .listen(listener)
        .map_err(listen_err)?
        .run();
        Ok(Self {
            port,
            server,
            state,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn handle(&self) -> actix_web::dev::ServerHandle {
        self.server.handle()
    }

    pub fn state(&self) -> web::Data<AppState> {
        self.state.clone()
    }

    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.server.await
    }
}

/// mistral.rs: one merged engine per version, as many as the memory budget holds; the base
/// engine loaded before traffic when asked.
async fn mistral_backend(
    settings: &GatewaySettings,
    base_dir: &std::path::Path,
    cache_dir: &std::path::Path,
    store: AdapterStore,
    metrics: &Arc<Metrics>,
) -> Result<MistralBackend, StartError> {
    let dtype = parse_dtype(&settings.dtype).ok_or(StartError::Dtype(settings.dtype.clone()))?;
    // mistral.rs finds adapters only through HF_HUB_CACHE: a mismatch would fail every
    // adapter load later, so refuse to start instead.
    let found = std::env::var("HF_HUB_CACHE").ok();
    if found
        .as_deref()
        .and_then(|f| std::fs::canonicalize(f).ok())
        .as_deref()
        != Some(cache_dir)
    {
        return Err(StartError::HubCache {
            expected: cache_dir.to_path_buf(),
            found,
        });
    }
    let isq = match &settings.isq {
        Some(q) => Some(parse_isq(q).ok_or_else(|| StartError::Isq(q.clone()))?),
        None => None,
    };
    // Every engine holds a full copy of the base: the budget is a number of engines.
    let mut max_engines = settings.max_engines;
    if let Some(budget_mb) = settings.memory_budget_mb {
        let params = crate::base::parameters(base_dir)?;
        let engine = crate::base::engine_bytes(params, &settings.dtype, settings.isq.as_deref());
        let fit = (budget_mb << 20) / engine.max(1);
        if fit == 0 {
            return Err(StartError::Budget {
                budget_mb,
                engine_mb: engine >> 20,
            });
        }
        max_engines = max_engines.min(fit as usize);
        tracing::info!(
            params,
            engine_mb = engine >> 20,
            budget_mb,
            max_engines,
            "engine memory budget"
        );
    }
    let loader = MistralLoader {
        base_dir: crate::base::prepare(base_dir, cache_dir)?,
        store,
        dtype,
        max_num_seqs: settings.max_num_seqs,
        isq,
    };
    let pool = EnginePool::new(Arc::new(loader), max_engines, metrics.clone());
    let backend = MistralBackend::new(pool, isq);
    if settings.preload_base {
        use crate::engine::Backend;
        backend.load(EngineKey::Base).await?;
    }
    Ok(backend)
}
