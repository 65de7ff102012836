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
    /// Quantise a Hugging Face model's decoder linears to NF4 and write them as bitsandbytes
    /// does (a `*-bnb-4bit` directory that transformers loads too); embeddings, norms and
    /// lm_head stay as they are. Trainer and gateway load the result without re-quantising.
    Quantize {
        /// The unquantised model directory (config.json + safetensors).
        dir: PathBuf,
        /// Where to write the quantised model (must not exist, or be empty).
        #[arg(long)]
        out: PathBuf,
        /// Keep the absmax values in f32 instead of 8-bit (double quantisation is the default,
        /// as in QLoRA).
        #[arg(long)]
        no_double_quant: bool,
        /// Largest safetensors shard, in MiB.
        #[arg(long, default_value_t = 4096)]
        max_shard_mb: u64,
    },
    /// Greedy tokens from the trainer's own forward pass (base, optionally with an adapter),
    /// to compare a serving engine with the training code.
    Generate(super::forward::GenerateArgs),
}

pub fn run(cmd: ModelCmd, global: &Global) -> anyhow::Result<()> {
    match cmd {
        ModelCmd::Generate(args) => super::forward::run(args, global),
        ModelCmd::Quantize {
            dir,
            out,
            no_double_quant,
            max_shard_mb,
        } => {
            let started = std::time::Instant::now();
            let r = loraops_model::bnb::quantize_dir(
                &dir,
                &out,
                !no_double_quant,
                max_shard_mb.max(1) << 20,
            )?;
            if global.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{} linears ({:.1}M parameters) quantised to NF4{}, {} tensors kept; \
                     {:.1} MiB -> {:.1} MiB in {:.1}s; written to {}",
                    r.quantized,
                    r.quantized_params as f64 / 1e6,
                    if no_double_quant {
                        ""
                    } else {
                        " (double quantisation)"
                    },
                    r.kept,
                    r.bytes_before as f64 / 1048576.0,
                    r.bytes_after as f64 / 1048576.0,
                    started.elapsed().as_secs_f64(),
                    out.display()
                );
            }
            Ok(())
        }
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
