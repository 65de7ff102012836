//! `loraops gateway serve`: the OpenAI-compatible data plane as its own process.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use loraops_gateway::{Application, GatewaySettings};

use super::{ConfigError, Global, init_logging};

#[derive(Debug, Subcommand)]
pub enum GatewayCmd {
    /// Serve a base model and the registry's adapters over the OpenAI API.
    Serve(ServeArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// HOST:PORT to listen on [default: 127.0.0.1:8500; config gateway.listen].
    #[arg(long, env = "LORAOPS_GATEWAY_LISTEN")]
    pub listen: Option<String>,
    /// Base model directory (Hugging Face layout) [config gateway.base_model].
    #[arg(long, env = "LORAOPS_GATEWAY_BASE_MODEL")]
    pub base_model: Option<PathBuf>,
    /// The `model` name that selects the base without adapter (default: the directory name).
    #[arg(long)]
    pub base_name: Option<String>,
    /// Registry to follow for routing and adapters; without it only the base is served.
    #[arg(long = "registry", env = "LORAOPS_REGISTRY_URL")]
    pub registry: Option<String>,
    /// Token for the registry: a JWT with the viewer role (routing) and the evaluator role
    /// (per-arm observations for rollouts).
    #[arg(long, env = "LORAOPS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Adapter cache (default: DATA_DIR/gateway/hub).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// native (one base copy, every adapter unmerged), mistralrs (one merged engine per
    /// version) or remote (an OpenAI-compatible upstream) [default: native, or remote with
    /// --upstream; config gateway.engine].
    #[arg(long)]
    pub engine: Option<String>,
    /// native: hold the base in NF4 (the trainer's QLoRA layout), `nf4`, or `none` [default:
    /// none; config gateway.quantize].
    #[arg(long)]
    pub quantize: Option<String>,
    /// native: memory for the KV cache of all running sequences, in MiB [default: 1024].
    #[arg(long)]
    pub kv_cache_mb: Option<u64>,
    /// native: adapters resident at once [default: 64].
    #[arg(long)]
    pub max_adapters: Option<usize>,
    /// native: memory for resident adapters, in MiB [default: 2048].
    #[arg(long)]
    pub adapter_memory_mb: Option<u64>,
    /// native: sequences decoding together [default: 64].
    #[arg(long)]
    pub max_batch: Option<usize>,
    /// native: prompt tokens read per step while other sequences decode; larger reads long
    /// prompts sooner, smaller keeps running streams' pace [default: 16].
    #[arg(long)]
    pub prefill_chunk: Option<usize>,
    /// mistralrs: most adapter versions (engines) kept loaded [default: 4].
    #[arg(long)]
    pub max_engines: Option<usize>,
    /// mistralrs: weights dtype: auto, bf16, f16 or f32 [default: f32].
    #[arg(long)]
    pub dtype: Option<String>,
    /// Requests served at once; more wait in the queue [default: 64].
    #[arg(long)]
    pub max_concurrent: Option<usize>,
    /// Requests waiting for a slot before 429 [default: 256].
    #[arg(long)]
    pub max_queued: Option<usize>,
    /// mistralrs: quantise every engine's weights in place at load: q8_0, q4k, … [config
    /// gateway.isq].
    #[arg(long)]
    pub isq: Option<String>,
    /// mistralrs: memory for engines in MiB; each holds a copy of the base, so this caps how
    /// many are loaded [config gateway.memory_budget_mb].
    #[arg(long)]
    pub memory_budget_mb: Option<u64>,
    /// remote: the OpenAI-compatible server (`…/v1`) inference goes to.
    #[arg(long)]
    pub upstream: Option<String>,
    /// remote: the upstream's API key.
    #[arg(long, env = "LORAOPS_UPSTREAM_API_KEY", hide_env_values = true)]
    pub upstream_api_key: Option<String>,
    /// remote: where the upstream reads a version's files, with {name}, {version} and {digest}
    /// filled in (e.g. /adapters/{digest}) [config gateway.upstream_lora_path].
    #[arg(long)]
    pub upstream_lora_path: Option<String>,
    /// Online judge: the model (base name or NAME@V) that scores a sample of rollout answers,
    /// reported as judge_score for rollout rules [config gateway.judge_model].
    #[arg(long)]
    pub judge_model: Option<String>,
    /// Fraction of rollout answers judged [default: 0.05; config gateway.judge_sample_rate].
    #[arg(long)]
    pub judge_sample_rate: Option<f64>,
    /// Serve inference without tokens (by default a JWT from the configured key is required).
    #[arg(long)]
    pub no_auth: bool,
    /// Print the effective configuration (secrets hidden) and exit; nothing is loaded.
    #[arg(long)]
    pub check_config: bool,
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
    let mut o: Vec<(&str, String)> = Vec::new();
    let paths = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
    for (key, v) in [
        ("gateway.listen", args.listen.clone()),
        ("gateway.base_model", paths(&args.base_model)),
        ("gateway.base_name", args.base_name.clone()),
        ("gateway.registry_url", args.registry.clone()),
        ("gateway.cache_dir", paths(&args.cache_dir)),
        ("gateway.engine", args.engine.clone()),
        ("gateway.quantize", args.quantize.clone()),
        (
            "gateway.kv_cache_mb",
            args.kv_cache_mb.map(|n| n.to_string()),
        ),
        (
            "gateway.max_adapters",
            args.max_adapters.map(|n| n.to_string()),
        ),
        (
            "gateway.adapter_memory_mb",
            args.adapter_memory_mb.map(|n| n.to_string()),
        ),
        ("gateway.max_batch", args.max_batch.map(|n| n.to_string())),
        (
            "gateway.prefill_chunk",
            args.prefill_chunk.map(|n| n.to_string()),
        ),
        (
            "gateway.upstream_lora_path",
            args.upstream_lora_path.clone(),
        ),
        ("gateway.dtype", args.dtype.clone()),
        (
            "gateway.max_engines",
            args.max_engines.map(|n| n.to_string()),
        ),
        (
            "gateway.max_concurrent",
            args.max_concurrent.map(|n| n.to_string()),
        ),
        ("gateway.max_queued", args.max_queued.map(|n| n.to_string())),
        ("gateway.require_auth", args.no_auth.then(|| "false".into())),
        ("gateway.upstream_url", args.upstream.clone()),
        ("gateway.isq", args.isq.clone()),
        (
            "gateway.memory_budget_mb",
            args.memory_budget_mb.map(|n| n.to_string()),
        ),
        ("gateway.judge_model", args.judge_model.clone()),
        (
            "gateway.judge_sample_rate",
            args.judge_sample_rate.map(|r| r.to_string()),
        ),
    ] {
        if let Some(v) = v {
            o.push((key, v));
        }
    }
    let cfg = global.load_config(&o)?;
    let g = cfg.gateway.clone();
    g.validate()
        .map_err(|e| anyhow::Error::new(ConfigError(e)))?;
    let data_dir = cfg
        .data_dir
        .clone()
        .unwrap_or_else(|| global.data_dir.clone());
    if args.check_config {
        let mut v = serde_json::to_value(&cfg)?;
        if !v["auth"]["hs256_secret"].is_null() {
            v["auth"]["hs256_secret"] = serde_json::json!("***");
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let base_model = g.base_model.clone().ok_or_else(|| {
        anyhow::Error::new(ConfigError(
            "no base model: pass --base-model DIR or set gateway.base_model".into(),
        ))
    })?;
    init_logging(&cfg);
    let cache = cache_dir(&data_dir, g.cache_dir.clone())?;
    prepare_process(&cache);
    let mut s = GatewaySettings::new(base_model, cache);
    g.apply_to(&mut s)
        .map_err(|e| anyhow::Error::new(ConfigError(e)))?;
    s.registry_token = args.token;
    s.upstream_api_key = args.upstream_api_key;
    s.auth = g.require_auth.unwrap_or(true).then(|| cfg.auth.clone());
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
