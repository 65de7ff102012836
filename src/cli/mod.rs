//! The `loraops` command line: one module per command group.

pub mod model;
pub mod train;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "loraops", version, about = "Curate, fine-tune, register, gate and roll out LoRA adapters")]
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
    #[arg(long, global = true, env = "LORAOPS_DATA_DIR", default_value = "./loraops-data")]
    pub data_dir: PathBuf,
    /// TOML configuration file (file < LORAOPS_* environment < flags).
    #[arg(long, global = true, env = "LORAOPS_CONFIG")]
    pub config: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Base-model utilities.
    #[command(subcommand)]
    Model(model::ModelCmd),
    /// Fine-tune a LoRA / QLoRA adapter.
    #[command(subcommand)]
    Train(train::TrainCmd),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Model(cmd) => model::run(cmd, &cli.global),
        Command::Train(cmd) => train::run(cmd, &cli.global),
    }
}
