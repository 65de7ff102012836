//! The `loraops` command line: one module per command group.

pub mod adapter;
pub mod base_model;
pub mod data;
pub mod demo;
pub mod eval;
pub mod forward;
pub mod gate;
pub mod gateway;
pub mod model;
pub mod registry;
pub mod rollout;
pub mod run;
pub mod token;
pub mod train;
pub mod up;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use loraops_registry::client::{ClientError, RegistryClient};

use crate::config::{self, Config};

#[derive(Debug, Parser)]
#[command(
    name = "loraops",
    version,
    about = "Curate, fine-tune, register, gate and roll out LoRA adapters"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every command takes.
#[derive(Debug, Clone, Args)]
pub struct Global {
    /// Embedded database, blobs, keys and caches live here.
    #[arg(
        long,
        global = true,
        env = "LORAOPS_DATA_DIR",
        default_value = "./loraops-data"
    )]
    pub data_dir: PathBuf,
    /// TOML configuration file (file < LORAOPS_* environment < flags).
    #[arg(long, global = true, env = "LORAOPS_CONFIG")]
    pub config: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long, global = true)]
    pub json: bool,
    /// Log as JSON lines.
    #[arg(long, global = true)]
    pub log_json: bool,
}

impl Global {
    /// The layered configuration, with `overrides` (`section.key`, value) from flags on top.
    pub fn load_config(&self, overrides: &[(&str, String)]) -> anyhow::Result<Config> {
        let mut c = config::load(self.config.as_deref(), overrides)
            .map_err(|e| anyhow::Error::new(ConfigError(e.to_string())))?;
        // `--data-dir` (or LORAOPS_DATA_DIR) is a flag; the file may also set it.
        if c.data_dir.is_none() || self.data_dir != std::path::Path::new("./loraops-data") {
            c.data_dir = Some(self.data_dir.clone());
        }
        if self.log_json {
            c.log.json = true;
        }
        Ok(c)
    }
}

/// Flags of commands that talk to the registry.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Registry base URL.
    #[arg(
        long = "registry",
        env = "LORAOPS_REGISTRY_URL",
        default_value = "http://127.0.0.1:8400"
    )]
    pub registry: String,
    /// Bearer token (a JWT from `loraops token issue`).
    #[arg(long, env = "LORAOPS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl ClientArgs {
    pub fn client(&self) -> RegistryClient {
        RegistryClient::new(&self.registry, self.token.clone())
    }
}

// Parsed once per process; boxing the big training-flag variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Registry on embedded defaults (SQLite, local blobs) with a base model and an admin token.
    Up(up::UpArgs),
    /// The lifecycle end to end on a generated tiny model: train, push, re-push, pull, verify.
    Demo(demo::DemoArgs),
    /// Run the registry service, or migrate its database.
    #[command(subcommand)]
    Registry(registry::RegistryCmd),
    /// Serve base model and adapters over the OpenAI API.
    #[command(subcommand)]
    Gateway(gateway::GatewayCmd),
    /// Push, list, show and pull adapter versions.
    #[command(subcommand)]
    Adapter(adapter::AdapterCmd),
    /// Evaluate an adapter version with a suite through the gateway and post the evidence;
    /// upload, list and build suites.
    #[command(subcommand)]
    Eval(eval::EvalCmd),
    /// Set and show the evidence an adapter's versions need before a canary.
    #[command(subcommand)]
    Gate(gate::GateCmd),
    /// Start, watch and steer canary rollouts.
    #[command(subcommand)]
    Rollout(rollout::RolloutCmd),
    /// Register and list the base models adapters are trained on.
    #[command(subcommand, name = "base-model")]
    BaseModel(base_model::BaseModelCmd),
    /// Mint JWTs with the configured key.
    #[command(subcommand)]
    Token(token::TokenCmd),
    /// Base-model utilities.
    #[command(subcommand)]
    Model(model::ModelCmd),
    /// Fine-tune a LoRA / QLoRA adapter.
    #[command(subcommand)]
    Train(train::TrainCmd),
    /// Training runs recorded in the registry (`train --registry`).
    #[command(subcommand)]
    Run(run::RunCmd),
    /// Curate datasets (validate, mask PII, deduplicate, filter, balance, split JSONL) and
    /// generate synthetic rows through the gateway.
    #[command(subcommand)]
    Data(data::DataCmd),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Up(args) => up::run(args, &cli.global),
        Command::Demo(args) => demo::run(args, &cli.global),
        Command::Registry(cmd) => registry::run(cmd, &cli.global),
        Command::Gateway(cmd) => gateway::run(cmd, &cli.global),
        Command::Adapter(cmd) => adapter::run(cmd, &cli.global),
        Command::Eval(cmd) => eval::run(cmd, &cli.global),
        Command::Gate(cmd) => gate::run(cmd, &cli.global),
        Command::Rollout(cmd) => rollout::run(cmd, &cli.global),
        Command::BaseModel(cmd) => base_model::run(cmd, &cli.global),
        Command::Token(cmd) => token::run(cmd, &cli.global),
        Command::Model(cmd) => model::run(cmd, &cli.global),
        Command::Train(cmd) => train::run(cmd, &cli.global),
        Command::Run(cmd) => run::run(cmd, &cli.global),
        Command::Data(cmd) => data::run(cmd, &cli.global),
    }
}

/// A configuration problem (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

/// Bad input (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// 2 for bad input (configuration, usage, a 4xx from the registry), 1 for everything else.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if cause.is::<ConfigError>() || cause.is::<UsageError>() {
            return 2;
        }
        if cause.is::<eval::ThresholdsMissed>() {
            return 3;
        }
        if let Some(c) = cause.downcast_ref::<ClientError>() {
            return match (c, c.status()) {
                (ClientError::Invalid(_), _) => 2,
                (_, Some(s)) if s.is_client_error() => 2,
                _ => 1,
            };
        }
    }
    1
}

/// A tokio runtime for one client command.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Initialise logging once: human-readable or JSON lines, filter from RUST_LOG or the config.
pub fn init_logging(cfg: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(cfg.log.level.as_deref().unwrap_or("info")))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if cfg.log.json {
        b.json().try_init()
    } else {
        b.try_init()
    };
}
