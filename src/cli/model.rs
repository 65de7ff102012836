//! `loraops model …`: base-model utilities.

use std::path::PathBuf;

use clap::Subcommand;
use loraops_model::tiny::{TinySpec, init_tiny};
use serde_json::json;

use super::Global;

#[derive(Debug, Subcommand)]
pub enum ModelCmd {
    /// Write a small random Llama-layout model with a byte-level BPE tokenizer (deterministic
    /// for a given seed), for demos and tests.
    InitTiny {
        dir: PathBuf,
        #[arg(long, default_value_t = 2)]
        layers: usize,
        #[arg(long, default_value_t = 64)]
        hidden: usize,
        #[arg(long, default_value_t = 4)]
        heads: usize,
        #[arg(long, default_value_t = 2)]
        kv_heads: usize,
        #[arg(long, default_value_t = 512)]
        vocab: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Greedy tokens from the trainer's own forward pass (base, optionally with an adapter),
    /// to compare a serving engine with the training code.
    Generate(super::forward::GenerateArgs),
}

pub fn run(cmd: ModelCmd, global: &Global) -> anyhow::Result<()> {
    match cmd {
        ModelCmd::Generate(args) => super::forward::run(args, global),
        ModelCmd::InitTiny {
            dir,
            layers,
            hidden,
            heads,
            kv_heads,
            vocab,
            seed,
        } => {
            let spec = TinySpec {
                layers,
                hidden,
                heads,
                kv_heads,
                vocab,
                intermediate: None,
                seed,
            };
            init_tiny(&dir, &spec)?;
            if global.json {
                println!("{}", json!({"dir": dir, "spec": spec}));
            } else {
                println!("tiny model written to {}", dir.display());
            }
            Ok(())
        }
    }
}
