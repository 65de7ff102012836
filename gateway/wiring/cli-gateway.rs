//! `loraops gateway serve`: the OpenAI-compatible data plane as its own process.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use loraops_gateway::{Application, GatewaySettings};

use super::{Global, init_logging};

#[derive(Debug, Subcommand)]
pub enum GatewayCmd {
    /// Serve a base model and the registry's adapters over the OpenAI API.
    Serve(ServeArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// HOST:PORT to listen on.
    #[arg(long, env = "LORAOPS_GATEWAY_LISTEN", default_value = "127.0.0.1:8500")]
    pub listen: String,
    /// Base model directory (Hugging Face layout).
    #[arg(long, env = "LORAOPS_GATEWAY_BASE_MODEL")]
    pub base_model: PathBuf,
    /// The `model` name that selects the base without adapter (default: the directory name).
    #[arg(long)]
    pub base_name: Option<String>,
    /// Registry to follow for routing and adapters; without it only the base is served.
    #[arg(long = "registry", env = "LORAOPS_REGISTRY_URL")]
    pub registry: Option<String>,
    /// Token for the registry (a JWT with the viewer role).
    #[arg(long, env = "LORAOPS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Adapter cache (default: DATA_DIR/gateway/hub).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Most adapter versions (engines) kept loaded.
    #[arg(long, default_value_t = 4)]
    pub max_engines: usize,
    /// Weights dtype: auto, bf16, f16 or f32.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Requests served at once; more wait in the queue.
    #[arg(long, default_value_t = 64)]
    pub max_concurrent: usize,
    /// Requests waiting for a slot before 429.
    #[arg(long, default_value_t = 256)]
    pub max_queued: usize,
    /// Serve inference without tokens (by default a JWT from the configured key is required).
    #[arg(long)]
    pub no_auth: bool,
}

pub fn run(cmd: GatewayCmd, global: &Global) -> anyhow::Result<()> {
    match cmd {
        GatewayCmd::Serve(args) => serve(args, global),
    }
}

/// The adapter cache under the data dir, created, as an absolute path.
pub fn cache_dir(data_dir: &Path, explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let dir = explicit.unwrap_or_else(|| data_dir.join("gateway").join("hub"));
    std::fs::create_dir_all(&dir)?;
    Ok(std::fs::canonicalize(&dir)?)
}

/// Point mistral.rs at the adapter cache. Must run before any thread starts (before the
/// runtime), since it changes the process environment.
pub fn prepare_process(cache: &Path) {
    // SAFETY: called from `main`'s thread before any runtime or server thread exists.
    unsafe { loraops_gateway::adapters::set_hub_cache_env(cache) };
}

fn serve(args: ServeArgs, global: &Global) -> anyhow::Result<()> {
    let cfg = global.load_config(&[])?;
    init_logging(&cfg);
    let data_dir = cfg
        .data_dir
        .clone()
        .unwrap_or_else(|| global.data_dir.clone());
    let cache = cache_dir(&data_dir, args.cache_dir)?;
    prepare_process(&cache);
    let mut s = GatewaySettings::new(args.base_model, cache);
    s.listen = args.listen;
    s.base_model_name = args.base_name;
    s.registry_url = args.registry;
    s.registry_token = args.token;
    s.max_engines = args.max_engines;
    s.dtype = args.dtype;
    s.max_concurrent = args.max_concurrent;
    s.max_queued = args.max_queued;
    s.auth = (!args.no_auth).then(|| cfg.auth.clone());
    s.data_dir = data_dir;
    actix_web::rt::System::new().block_on(async move {
        let app = Application::build(s).await?;
        eprintln!(
            "gateway listening on http://127.0.0.1:{} (OpenAI API under /v1)",
            app.port()
        );
        app.run_until_stopped().await?;
        Ok(())
    })
}
