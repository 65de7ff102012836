//! `loraops model …`: base-model utilities.

use clap::Subcommand;

use super::Global;

#[derive(Debug, Subcommand)]
pub enum ModelCmd {}

pub fn run(cmd: ModelCmd, _global: &Global) -> anyhow::Result<()> {
    match cmd {}
}
