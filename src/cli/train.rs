//! `loraops train …`: fine-tune an adapter. Flags override the TOML file given with
//! `--config` (its `[train.<method>]` table, else `[<method>]`, else the whole file).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use loraops_registry::api::{DatasetRef, NewRun, RunPoint, RunStatus};
use loraops_trainer::init::{InitAdapter, fill_lora_settings};
use loraops_trainer::preference::{Method, PreferenceConfig, train_preference};
use loraops_trainer::sft::{Event, SftConfig, SftOutcome, read_config_table, train_sft};
use serde_json::{Map, Value, json};

use super::{Global, UsageError};
use crate::run_report::{self, RunReporter};

/// What every train command's help ends with: the optional fields of a data row.
const ROW_FIELDS: &str = "Every row may carry \"weight\": a non-negative number that multiplies the \
row's loss (default 1; 0 leaves the row out of the gradient), as `loraops data curate \
--judge-weight-below` sets it for rows the judge doubts.";

#[derive(Debug, Subcommand)]
pub enum TrainCmd {
    /// Supervised fine-tuning on chat, prompt/completion or Alpaca JSONL.
    #[command(after_help = ROW_FIELDS)]
    Sft {
        #[command(flatten)]
        args: SftArgs,
        #[command(flatten)]
        report: ReportArgs,
    },
    /// Direct preference optimisation on {"prompt","chosen","rejected"} JSONL (sigmoid,
    /// conservative, robust or IPO loss; the reference is the base with the adapter switched
    /// off, or with --init-adapter that adapter, frozen).
    #[command(after_help = ROW_FIELDS)]
    Dpo(PreferenceArgs),
    /// Odds-ratio preference optimisation: NLL on chosen + beta (lambda) x odds-ratio term; no
    /// reference model.
    #[command(after_help = ROW_FIELDS)]
    Orpo(PreferenceArgs),
    /// Kahneman-Tversky optimisation on unpaired {"prompt","completion","label"} JSONL (the
    /// reference as for DPO).
    #[command(after_help = ROW_FIELDS)]
    Kto(PreferenceArgs),
}

#[derive(Debug, Args)]
pub struct PreferenceArgs {
    #[command(flatten)]
    common: SftArgs,
    #[command(flatten)]
    report: ReportArgs,
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

/// Where the run is reported (as MLflow tracks runs): nothing is sent without a registry.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Registry to record the run in: hyperparameters, datasets, metrics as it trains, its
    /// end; the pushed version links to it. Token from LORAOPS_TOKEN (publisher role).
    #[arg(long = "registry", env = "LORAOPS_REGISTRY_URL")]
    registry: Option<String>,
    #[arg(long, env = "LORAOPS_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The adapter this run trains (the name it will be pushed under): the run is listed with
    /// it, and tokens limited to that adapter see it.
    #[arg(long)]
    name: Option<String>,
    /// At the end, how long to keep trying an unreachable registry before leaving the
    /// undelivered metrics in OUT/run-pending.json (`loraops run sync OUT` sends them).
    #[arg(long, default_value_t = 60)]
    registry_wait_secs: u64,
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
    /// Frozen base weights: nf4 (QLoRA) or none. A bitsandbytes 4-bit base (`*-bnb-4bit`, or
    /// `loraops model quantize` output) is NF4 as stored whatever this says.
    #[arg(long, value_parser = ["nf4", "none"])]
    quantize: Option<String>,
    /// Storage of a non-quantised base: f32, bf16, or auto (bf16 on a GPU, f32 on the CPU)
    /// [default: auto].
    #[arg(long, value_parser = ["auto", "f32", "bf16"])]
    base_dtype: Option<String>,
    /// Activations: f32, bf16 on a GPU (mixed precision: LoRA weights, norms, loss in f32), or
    /// auto (bf16 on a GPU, f32 on the CPU) [default: auto].
    #[arg(long, value_parser = ["auto", "f32", "bf16"])]
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
    /// Continue from an adapter: a directory, or NAME@V pulled from --registry (token
    /// LORAOPS_TOKEN) into DATA_DIR/cache and verified. Its r, alpha, rsLoRA and targets are
    /// taken (flags that differ are refused); for DPO and KTO the reference model is the base
    /// with this adapter, frozen. The manifest records it as the parent.
    #[arg(long, value_name = "DIR|NAME@V")]
    init_adapter: Option<String>,
    /// Comma-separated modules (q_proj,…,down_proj) or all-linear.
    #[arg(long, value_delimiter = ',')]
    targets: Option<Vec<String>>,
    /// Peak learning rate [default: 2e-4].
    #[arg(long)]
    lr: Option<f64>,
    /// Learning-rate schedule, as transformers names them [default: cosine].
    #[arg(long, value_parser = [
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_min_lr"
    ])]
    lr_scheduler: Option<String>,
    /// Updates of linear warm-up from 0 [default: 0].
    #[arg(long)]
    warmup_steps: Option<usize>,
    /// cosine_with_min_lr: the final learning rate as a share of --lr.
    #[arg(long)]
    min_lr_rate: Option<f64>,
    /// AdamW beta1 [default: 0.9].
    #[arg(long)]
    adam_beta1: Option<f64>,
    /// AdamW beta2 [default: 0.95, the recipe's].
    #[arg(long)]
    adam_beta2: Option<f64>,
    /// AdamW decoupled weight decay [default: 0.1, the recipe's].
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
    /// Early stopping: validations without improvement before stopping (needs --val-data).
    #[arg(long)]
    patience: Option<usize>,
    /// The adapter to write: eval_loss (the one with the lowest validation loss; its step is
    /// the manifest's best_step) or last. Default: eval_loss with --val-data, else last.
    #[arg(long, value_parser = ["eval_loss", "last"])]
    save_best: Option<String>,
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
        TrainCmd::Sft { args, report } => sft(args, report, global),
        TrainCmd::Dpo(args) => preference(Method::Dpo, args, global),
        TrainCmd::Orpo(args) => preference(Method::Orpo, args, global),
        TrainCmd::Kto(args) => preference(Method::Kto, args, global),
    }
}

fn sft(a: SftArgs, report: ReportArgs, global: &Global) -> anyhow::Result<()> {
    let mut m = table(a, global, "sft")?;
    let init = resolve_init(&mut m, &report, global)?;
    let tracking = Tracking::start(report, &mut m)?;
    let mut cfg: SftConfig =
        serde_json::from_value(Value::Object(m)).context("training configuration")?;
    cfg.init = init;
    let device = loraops_model::select_device(&cfg.device)?;
    let progress = Progress::new(global.json);
    let effective = serde_json::to_value(&cfg).context("training configuration")?;
    let run = tracking
        .as_ref()
        .map(|t| t.describe("sft", &cfg, effective));
    let result = train_sft(&cfg, &device, &mut |e| {
        if let Some(t) = &tracking {
            t.on(e, run.as_ref());
        }
        progress.on(e)
    });
    finish(tracking, &progress, result)
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
    let init = resolve_init(&mut m, &a.report, global)?;
    let tracking = Tracking::start(a.report, &mut m)?;
    let mut cfg = PreferenceConfig::from_table(method, m).context("training configuration")?;
    cfg.train.init = init;
    let device = loraops_model::select_device(&cfg.train.device)?;
    let progress = Progress::new(global.json);
    let run = tracking
        .as_ref()
        .map(|t| t.describe(method.name(), &cfg.train, cfg.to_value()));
    let result = train_preference(&cfg, &device, &mut |e| {
        if let Some(t) = &tracking {
            t.on(e, run.as_ref());
        }
        progress.on(e)
    });
    finish(tracking, &progress, result)
}

/// The run's end: the outcome (or the error) to the registry, then to the user.
fn finish(
    tracking: Option<Tracking>,
    progress: &Progress,
    result: loraops_trainer::Result<SftOutcome>,
) -> anyhow::Result<()> {
    if let Some(t) = tracking {
        let (status, summary) = match &result {
            Ok(o) => (
                RunStatus::Succeeded,
                json!({"steps": o.steps_done, "final_loss": o.final_loss,
                    "best_val_loss": o.best_val_loss, "tokens": o.tokens, "seconds": o.seconds,
                    "peak_gpu_bytes": o.peak_gpu_bytes}),
            ),
            Err(e) => (RunStatus::Failed, json!({"error": e.to_string()})),
        };
        progress.bar.suspend(|| {
            if !progress.json {
                eprintln!("reporting run {} to {} …", t.reporter.id(), t.registry);
            }
        });
        let d = t.reporter.finish(status, Some(summary));
        progress.delivered(&d);
    }
    let outcome = result?;
    progress.done(&outcome);
    Ok(())
}

/// A run recorded in the registry while it trains.
struct Tracking {
    reporter: RunReporter,
    registry: String,
    adapter: Option<loraops_registry::api::Name>,
}

impl Tracking {
    /// With `--registry`: the run's id goes into the configuration (and so the manifest).
    fn start(args: ReportArgs, m: &mut Map<String, Value>) -> anyhow::Result<Option<Self>> {
        let Some(registry) = args.registry else {
            return Ok(None);
        };
        let adapter = args
            .name
            .as_deref()
            .map(loraops_registry::api::Name::parse)
            .transpose()
            .context("--name")?;
        let out = m
            .get("out")
            .and_then(Value::as_str)
            .map(std::path::PathBuf::from)
            .context("--out is required")?;
        let client = loraops_registry::client::RegistryClient::new(&registry, args.token);
        let reporter = RunReporter::start(
            &out,
            client,
            std::time::Duration::from_secs(args.registry_wait_secs),
        )
        .with_context(|| format!("{}: run file", out.display()))?;
        m.insert("run_id".into(), json!(reporter.id()));
        Ok(Some(Self {
            reporter,
            registry,
            adapter,
        }))
    }

    /// The run as the registry records it: the effective configuration (defaults included),
    /// and its datasets' digests, computed once here.
    fn describe(&self, method: &str, cfg: &SftConfig, effective: Value) -> NewRun {
        let dataset = |role: &str, path: &std::path::Path| DatasetRef {
            role: role.into(),
            path: path.display().to_string(),
            digest: loraops_trainer::data::file_digest(path).unwrap_or_default(),
            rows: 0,
        };
        let mut datasets = vec![dataset("train", &cfg.data)];
        if let Some(v) = &cfg.val_data {
            datasets.push(dataset("val", v));
        }
        let mut config = match effective {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        config.remove("run_id");
        NewRun {
            id: self.reporter.id().parse().expect("a UUID"),
            adapter: self.adapter.clone(),
            method: method.into(),
            base_model: cfg
                .base_model_name
                .clone()
                .unwrap_or_else(|| cfg.model.display().to_string()),
            config: Value::Object(config),
            datasets,
            total_steps: cfg.steps as u64,
        }
    }

    fn on(&self, e: Event, run: Option<&NewRun>) {
        let point = |step: usize, name: &str, value: f64| RunPoint {
            step: step as u64,
            name: name.into(),
            value,
        };
        match e {
            Event::Start { stats, .. } => {
                if let Some(r) = run {
                    let mut r = r.clone();
                    if let Some(d) = r.datasets.first_mut() {
                        d.rows = stats.rows as u64;
                    }
                    self.reporter.create(r);
                }
            }
            Event::Step(m) => {
                let mut pts = vec![
                    point(m.step, "loss", m.loss),
                    point(m.step, "lr", m.lr),
                    point(m.step, "grad_norm", m.grad_norm),
                    point(m.step, "tokens_per_s", m.tokens_per_s),
                ];
                if let Some(rss) = run_report::resident_bytes() {
                    pts.push(point(m.step, "memory_bytes", rss));
                }
                pts.extend(m.metrics.iter().map(|(k, v)| point(m.step, k, *v)));
                self.reporter.points(pts);
            }
            Event::Eval { step, val_loss } => {
                self.reporter
                    .points(vec![point(step, "val_loss", val_loss)]);
            }
            Event::EarlyStop { .. } | Event::Checkpoint { .. } => {}
        }
    }
}

/// `init_adapter` (flag or file): a directory as it is; `NAME@V` pulled from the registry into
/// DATA_DIR/cache/init-adapters/NAME/V, every file's sha256 checked (a copy there whose files
/// still match the version's is used again). The adapter's LoRA settings fill the keys the
/// table leaves out; the trainer refuses those it sets differently.
fn resolve_init(
    m: &mut Map<String, Value>,
    report: &ReportArgs,
    global: &Global,
) -> anyhow::Result<Option<InitAdapter>> {
    let Some(spec) = m.get("init_adapter").and_then(Value::as_str) else {
        return Ok(None);
    };
    let spec = spec.to_string();
    let init = if Path::new(&spec).is_dir() {
        InitAdapter::from_dir(Path::new(&spec))?
    } else {
        let r: loraops_registry::api::AdapterRef = spec.parse().map_err(|e| {
            UsageError(format!(
                "--init-adapter {spec:?}: no such directory, and not NAME@V ({e})"
            ))
        })?;
        let Some(version) = r.version else {
            return Err(UsageError(format!(
                "--init-adapter {spec:?}: no such directory; a registry adapter needs its version, NAME@V"
            ))
            .into());
        };
        let Some(registry) = report.registry.as_deref() else {
            return Err(UsageError(format!(
                "--init-adapter {spec}: pulling a registry version needs --registry (or LORAOPS_REGISTRY_URL)"
            ))
            .into());
        };
        let client = loraops_registry::client::RegistryClient::new(registry, report.token.clone());
        let name = r.name.as_str();
        let dir = global
            .data_dir
            .join("cache")
            .join("init-adapters")
            .join(name)
            .join(version.to_string());
        let rt = super::runtime()?;
        let v = rt
            .block_on(client.version(name, version))
            .with_context(|| format!("--init-adapter {spec}"))?;
        if loraops_registry::api::version_digest(&v.files) != v.digest {
            anyhow::bail!(
                "--init-adapter {spec}: the registry's file list does not give its digest {}",
                v.digest
            );
        }
        if !cached(&dir, &v.files) {
            // Into a fresh directory, renamed when complete: a cache entry is whole or absent.
            let partial = dir.with_extension("partial");
            let _ = std::fs::remove_dir_all(&partial);
            rt.block_on(client.pull(
                name,
                version,
                &partial,
                loraops_registry::client::no_progress(),
            ))
            .with_context(|| format!("--init-adapter {spec}: pull"))?;
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::rename(&partial, &dir).with_context(|| format!("{}: cache", dir.display()))?;
        }
        InitAdapter::from_registry(&dir, name, version, &v.digest)
    };
    fill_lora_settings(m, &init.dir)?;
    Ok(Some(init))
}

/// Whether `dir` holds exactly the bytes of `files` (by sha256).
fn cached(dir: &Path, files: &[loraops_registry::api::VersionFile]) -> bool {
    use sha2::{Digest, Sha256};
    files.iter().all(|f| {
        std::fs::read(dir.join(&f.name)).is_ok_and(|b| hex::encode(Sha256::digest(&b)) == f.sha256)
    })
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
    set("init_adapter", a.init_adapter.map(|x| json!(x)));
    set("targets", a.targets.map(|x| json!(x)));
    set("lr", a.lr.map(|x| json!(x)));
    set("lr_scheduler", a.lr_scheduler.map(|x| json!(x)));
    set("warmup_steps", a.warmup_steps.map(|x| json!(x)));
    set("min_lr_rate", a.min_lr_rate.map(|x| json!(x)));
    set("beta1", a.adam_beta1.map(|x| json!(x)));
    set("beta2", a.adam_beta2.map(|x| json!(x)));
    set("weight_decay", a.weight_decay.map(|x| json!(x)));
    set("batch_size", a.batch_size.map(|x| json!(x)));
    set("grad_accum", a.grad_accum.map(|x| json!(x)));
    set("max_len", a.max_len.map(|x| json!(x)));
    set("max_grad_norm", a.max_grad_norm.map(|x| json!(x)));
    set("label_smoothing", a.label_smoothing.map(|x| json!(x)));
    set("seed", a.seed.map(|x| json!(x)));
    set("eval_every", a.eval_every.map(|x| json!(x)));
    set("patience", a.patience.map(|x| json!(x)));
    set("save_best", a.save_best.map(|x| json!(x)));
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

    /// What reached the registry.
    fn delivered(&self, d: &run_report::Delivery) {
        if self.json {
            println!("{}", json!({"event": "run", "delivery": d}));
            return;
        }
        match (&d.refused, &d.pending_file) {
            (Some(why), _) => eprintln!(
                "run {} was not recorded: the registry refused it ({why})",
                d.run
            ),
            (None, Some(f)) => eprintln!(
                "the registry at {} is unreachable: {} metric points of run {} kept in {}; `loraops run sync {}` sends them",
                d.registry,
                d.pending_points,
                d.run,
                f.display(),
                f.parent()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ),
            (None, None) => eprintln!("run {} recorded in {}", d.run, d.registry),
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
