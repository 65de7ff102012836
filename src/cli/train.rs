//! `loraops train …`: fine-tune an adapter. Flags override the TOML file given with
//! `--config` (its `[train.<method>]` table, else `[<method>]`, else the whole file).

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use loraops_trainer::preference::{Method, PreferenceConfig, train_preference};
use loraops_trainer::sft::{Event, SftConfig, SftOutcome, read_config_table, train_sft};
use serde_json::{Map, Value, json};

use super::Global;

#[derive(Debug, Subcommand)]
pub enum TrainCmd {
    /// Supervised fine-tuning on chat, prompt/completion or Alpaca JSONL.
    Sft(SftArgs),
    /// Direct preference optimisation on {"prompt","chosen","rejected"} JSONL (sigmoid,
    /// conservative, robust or IPO loss; the reference is the base with the adapter switched off).
    Dpo(PreferenceArgs),
    /// Odds-ratio preference optimisation: NLL on chosen + beta (lambda) x odds-ratio term; no
    /// reference model.
    Orpo(PreferenceArgs),
    /// Kahneman-Tversky optimisation on unpaired {"prompt","completion","label"} JSONL.
    Kto(PreferenceArgs),
}

#[derive(Debug, Args)]
pub struct PreferenceArgs {
    #[command(flatten)]
    common: SftArgs,
    /// DPO and KTO: beta; ORPO: lambda, the weight of the odds-ratio term.
    #[arg(long)]
    beta: Option<f64>,
    /// DPO loss: sigmoid (with --label-smoothing: conservative DPO), robust or ipo.
    #[arg(long, value_parser = ["sigmoid", "robust", "ipo"])]
    loss_type: Option<String>,
    /// DPO, KTO: compute the reference log-probabilities once, before training.
    #[arg(long)]
    precompute_ref_log_probs: bool,
    /// KTO: weight of desirable (label true) examples.
    #[arg(long)]
    desirable_weight: Option<f64>,
    /// KTO: weight of undesirable (label false) examples.
    #[arg(long)]
    undesirable_weight: Option<f64>,
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
    /// Activations: f32, or bf16 on a GPU (mixed precision: LoRA weights, norms, loss in f32).
    #[arg(long, value_parser = ["f32", "bf16"])]
    compute_dtype: Option<String>,
    /// auto (the first GPU when built with cuda, else the CPU), cpu, cuda or cuda:N.
    #[arg(long)]
    device: Option<String>,
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
    /// SFT: cross-entropy label smoothing; DPO: the probability that a pair's labels are
    /// flipped (conservative DPO).
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
        TrainCmd::Dpo(args) => preference(Method::Dpo, args, global),
        TrainCmd::Orpo(args) => preference(Method::Orpo, args, global),
        TrainCmd::Kto(args) => preference(Method::Kto, args, global),
    }
}

fn sft(a: SftArgs, global: &Global) -> anyhow::Result<()> {
    let m = table(a, global, "sft")?;
    let cfg: SftConfig =
        serde_json::from_value(Value::Object(m)).context("training configuration")?;
    let device = loraops_model::select_device(&cfg.device)?;
    let progress = Progress::new(global.json);
    let outcome = train_sft(&cfg, &device, &mut |e| progress.on(e))?;
    progress.done(&outcome);
    Ok(())
}

fn preference(method: Method, a: PreferenceArgs, global: &Global) -> anyhow::Result<()> {
    let mut m = table(a.common, global, method.name())?;
    let mut set = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            m.insert(k.to_string(), v);
        }
    };
    set("beta", a.beta.map(|x| json!(x)));
    set("loss_type", a.loss_type.map(|x| json!(x)));
    set(
        "precompute_ref_log_probs",
        a.precompute_ref_log_probs.then_some(json!(true)),
    );
    set("desirable_weight", a.desirable_weight.map(|x| json!(x)));
    set("undesirable_weight", a.undesirable_weight.map(|x| json!(x)));
    let cfg = PreferenceConfig::from_table(method, m).context("training configuration")?;
    let device = loraops_model::select_device(&cfg.train.device)?;
    let progress = Progress::new(global.json);
    let outcome = train_preference(&cfg, &device, &mut |e| progress.on(e))?;
    progress.done(&outcome);
    Ok(())
}

/// The configuration table of `method`: the file's, then the flags over it.
fn table(a: SftArgs, global: &Global, method: &str) -> anyhow::Result<Map<String, Value>> {
    let mut m = match &global.config {
        Some(p) => read_config_table(p, method)?,
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
    set("compute_dtype", a.compute_dtype.map(|x| json!(x)));
    set("device", a.device.map(|x| json!(x)));
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
    Ok(m)
}

/// Progress bar (or `--json` lines) for a training run.
struct Progress {
    bar: ProgressBar,
    json: bool,
}

impl Progress {
    fn new(json: bool) -> Self {
        Self {
            bar: ProgressBar::hidden(),
            json,
        }
    }

    fn on(&self, e: Event) {
        let (bar, json_out) = (&self.bar, self.json);
        match e {
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
                        ProgressStyle::with_template(
                            "{bar:30} {pos}/{len} steps  {msg}  ETA {eta}",
                        )
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
                    let mut msg = format!(
                        "loss {:.4}  lr {:.2e}  {:.0} tok/s",
                        m.loss, m.lr, m.tokens_per_s
                    );
                    for k in ["rewards/margins", "rewards/accuracies", "kl"] {
                        if let Some(v) = m.metrics.get(k) {
                            msg.push_str(&format!("  {k} {v:.3}"));
                        }
                    }
                    bar.set_message(msg);
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
        }
    }

    fn done(&self, outcome: &SftOutcome) {
        self.bar.finish_and_clear();
        if self.json {
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
    }
}
