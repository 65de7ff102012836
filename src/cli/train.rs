//! `loraops train …`: fine-tune an adapter.

use clap::Subcommand;

use super::Global;

#[derive(Debug, Subcommand)]
pub enum TrainCmd {}

pub fn run(cmd: TrainCmd, _global: &Global) -> anyhow::Result<()> {
    match cmd {}
}
