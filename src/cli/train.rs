//! `loraops train …`: fine-tune an adapter. Flags override the TOML file given with
//! `--config` (its `[train.sft]` table, else `[sft]`, else the whole file).

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use loraops_trainer::sft::{Event, SftConfig, read_config_table, train_sft};
use serde_json::{Map, Value, json};

use super::Global;

#[derive(Debug, Subcommand)]
pub enum TrainCmd {
    /// Supervised fine-tuning on chat, prompt/completion or Alpaca JSONL.
    Sft(SftArgs),
}

#[derive(Debug, Args)]
pub struct SftArgs {
    /// Base model directory (Hugging Face layout).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Training data (JSONL).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Validation data (JSONL); enables validation loss and early stopping.
    #[arg(long)]
    val_data: Option<PathBuf>,
    /// Output directory for the PEFT adapter, manifest.json and metrics.jsonl.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Optimizer updates.
    #[arg(long)]
    steps: Option<usize>,
    /// Frozen base weights: nf4 (QLoRA) or none.
    #[arg(long, value_parser = ["nf4", "none"])]
    quantize: Option<String>,
    /// Storage of a non-quantised base: f32 or bf16.
    #[arg(long, value_parser = ["f32", "bf16"])]
    base_dtype: Option<String>,
    /// NF4: keep the absmax values in f32 instead of 8-bit.
    #[arg(long)]
    no_double_quant: bool,
    /// `base_model_name_or_path` to record (default: the --model path).
    #[arg(long)]
    base_model_name: Option<String>,
    #[arg(long)]
    r: Option<usize>,
    #[arg(long)]
    alpha: Option<f64>,
    #[arg(long)]
    dropout: Option<f64>,
    /// Scale by alpha/sqrt(r) (rsLoRA).
    #[arg(long)]
    rslora: bool,
    /// Comma-separated modules (q_proj,…,down_proj) or all-linear.
    #[arg(long, value_delimiter = ',')]
    targets: Option<Vec<String>>,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    warmup_steps: Option<usize>,
    #[arg(long)]
    weight_decay: Option<f64>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    grad_accum: Option<usize>,
    #[arg(long)]
    max_len: Option<usize>,
    #[arg(long)]
    max_grad_norm: Option<f64>,
    #[arg(long)]
    label_smoothing: Option<f64>,
    #[arg(long)]
    seed: Option<u64>,
    /// Validate every N steps.
    #[arg(long)]
    eval_every: Option<usize>,
    /// Early stopping: validations without improvement before stopping.
    #[arg(long)]
    patience: Option<usize>,
    /// Write a resumable checkpoint every N steps.
    #[arg(long)]
    checkpoint_every: Option<usize>,
    /// Continue from OUT/checkpoint.
    #[arg(long)]
    resume: bool,
    /// Also write the merged full model to this directory.
    #[arg(long)]
    merge: Option<PathBuf>,
    /// Recompute decoder layers in backward to save activation memory.
    #[arg(long)]
    activation_checkpointing: bool,
    /// Pack several examples into each max_len row (each attends only to itself).
    #[arg(long)]
    packing: bool,
}

pub fn run(cmd: TrainCmd, global: &Global) -> anyhow::Result<()> {
    match cmd {
        TrainCmd::Sft(args) => sft(args, global),
    }
}

fn sft(a: SftArgs, global: &Global) -> anyhow::Result<()> {
    let mut m = match &global.config {
        Some(p) => read_config_table(p, "sft")?,
        None => Map::new(),
    };
    let mut set = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            m.insert(k.to_string(), v);
        }
    };
    let path = |p: Option<PathBuf>| p.map(|p| json!(p));
    set("model", path(a.model));
    set("data", path(a.data));
    set("val_data", path(a.val_data));
    set("out", path(a.out));
    set("merge", path(a.merge));
    set("steps", a.steps.map(|x| json!(x)));
    set("quantize", a.quantize.map(|x| json!(x)));
    set("base_dtype", a.base_dtype.map(|x| json!(x)));
    set("double_quant", a.no_double_quant.then_some(json!(false)));
    set("base_model_name", a.base_model_name.map(|x| json!(x)));
    set("r", a.r.map(|x| json!(x)));
    set("alpha", a.alpha.map(|x| json!(x)));
    set("dropout", a.dropout.map(|x| json!(x)));
    set("use_rslora", a.rslora.then_some(json!(true)));
    set("targets", a.targets.map(|x| json!(x)));
    set("lr", a.lr.map(|x| json!(x)));
    set("warmup_steps", a.warmup_steps.map(|x| json!(x)));
    set("weight_decay", a.weight_decay.map(|x| json!(x)));
    set("batch_size", a.batch_size.map(|x| json!(x)));
    set("grad_accum", a.grad_accum.map(|x| json!(x)));
    set("max_len", a.max_len.map(|x| json!(x)));
    set("max_grad_norm", a.max_grad_norm.map(|x| json!(x)));
    set("label_smoothing", a.label_smoothing.map(|x| json!(x)));
    set("seed", a.seed.map(|x| json!(x)));
    set("eval_every", a.eval_every.map(|x| json!(x)));
    set("patience", a.patience.map(|x| json!(x)));
    set("checkpoint_every", a.checkpoint_every.map(|x| json!(x)));
    set("resume", a.resume.then_some(json!(true)));
    set("packing", a.packing.then_some(json!(true)));
    set(
        "activation_checkpointing",
        a.activation_checkpointing.then_some(json!(true)),
    );
    let cfg: SftConfig =
        serde_json::from_value(Value::Object(m)).context("training configuration")?;

    let json_out = global.json;
    let bar = ProgressBar::hidden();
    let outcome = train_sft(&cfg, &loraops_trainer::default_device(), &mut |e| match e {
        Event::Start {
            total_steps,
            start_step,
            stats,
        } => {
            if !json_out {
                bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                bar.set_length(total_steps as u64);
                bar.set_position(start_step as u64);
                bar.set_style(
                    ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  ETA {eta}")
                        .expect("valid template"),
                );
                if stats.no_completion > 0 || stats.truncated > 0 {
                    bar.println(format!(
                        "data: {} rows, {} truncated to max_len, {} without completion tokens (not trained on; lines {:?})",
                        stats.rows, stats.truncated, stats.no_completion, stats.no_completion_lines
                    ));
                }
            }
        }
        Event::Step(m) => {
            if json_out {
                println!("{}", json!({"event": "step", "metrics": m}));
            } else {
                bar.set_position(m.step as u64);
                bar.set_message(format!(
                    "loss {:.4}  lr {:.2e}  {:.0} tok/s",
                    m.loss, m.lr, m.tokens_per_s
                ));
            }
        }
        Event::Eval { step, val_loss } => {
            if json_out {
                println!(
                    "{}",
                    json!({"event": "eval", "step": step, "val_loss": val_loss})
                );
            } else {
                bar.println(format!("step {step}: validation loss {val_loss:.4}"));
            }
        }
        Event::EarlyStop {
            step,
            best_val_loss,
        } => {
            if !json_out {
                bar.println(format!(
                    "early stop at step {step}: best validation loss {best_val_loss:.4}"
                ));
            }
        }
        Event::Checkpoint { .. } => {}
    })?;
    bar.finish_and_clear();
    if json_out {
        println!("{}", json!({"event": "done", "outcome": outcome}));
    } else {
        println!(
            "adapter written to {} ({} steps, final loss {:.4}{})",
            outcome.adapter_dir.display(),
            outcome.steps_done,
            outcome.final_loss,
            outcome
                .best_val_loss
                .map(|v| format!(", best validation loss {v:.4}"))
                .unwrap_or_default()
        );
        if let Some(m) = &outcome.merged_dir {
            println!("merged model written to {}", m.display());
        }
    }
    Ok(())
}
