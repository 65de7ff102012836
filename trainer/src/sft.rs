//! Supervised fine-tuning: the loss, the training loop (gradient accumulation, clipping,
//! learning-rate schedules, validation, best-adapter selection, early stopping, checkpoints,
//! continuing from an adapter) and the adapter output.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{D, Device, Tensor};
use loraops_registry::api::{DatasetRef, MANIFEST_FORMAT, TrainingManifest};
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::data::{
    Batch, DatasetStats, Example, Packed, file_digest, load_sft, make_batch, make_packed_batch,
    pack,
};
use crate::error::{Error, Result};
use crate::init::InitAdapter;
use crate::optim::{AdamW, AdamWConfig, LrScheduler, clip_grad_norm};
use crate::resume;
use loraops_model::adapter::{merge_into, save_adapter, save_manifest};
use loraops_model::linear::lora::{DropoutRng, LoraConfig, derived_rng};
use loraops_model::llama::{BaseFormat, Llama, LoadOptions, head_rows, log_softmax};
use loraops_model::tokenizer::Tokenizer;

/// RNG purposes, so each random stream is independent of the others.
const RNG_LORA_INIT: u64 = 1;
const RNG_SHUFFLE: u64 = 2;
const RNG_DROPOUT: u64 = 3;

/// Everything `loraops train sft` takes; the TOML file and the flags both map onto it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SftConfig {
    pub model: PathBuf,
    pub data: PathBuf,
    pub val_data: Option<PathBuf>,
    pub out: PathBuf,
    /// Recorded as `base_model_name_or_path`; defaults to the model directory.
    pub base_model_name: Option<String>,
    pub steps: usize,
    /// `nf4` or `none`.
    pub quantize: String,
    /// Storage of non-quantised frozen weights: `f32`, `bf16`, or `auto` (bf16 on a GPU, f32
    /// on the CPU).
    pub base_dtype: String,
    /// The activations' dtype: `f32`, `bf16` for mixed precision on a GPU (LoRA weights,
    /// optimiser state, norms, softmax and the loss stay f32), or `auto` (bf16 on a GPU, f32
    /// on the CPU).
    pub compute_dtype: String,
    /// Where the CLI trains: `auto` (the first GPU when built with `cuda`, else the CPU),
    /// `cpu`, `cuda` or `cuda:N`. Library callers pass the device themselves.
    pub device: String,
    pub double_quant: bool,
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub use_rslora: bool,
    pub targets: Vec<String>,
    pub lr: f64,
    /// The learning-rate schedule (transformers' names); warm-up is linear from 0.
    pub lr_scheduler: LrScheduler,
    pub warmup_steps: usize,
    /// `cosine_with_min_lr`: the lowest learning rate, as a share of `lr`.
    pub min_lr_rate: Option<f64>,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_len: usize,
    pub max_grad_norm: f64,
    pub label_smoothing: f64,
    pub seed: u64,
    /// Validate every N steps (0: only at the end, when there is validation data).
    pub eval_every: usize,
    /// Stop after this many validations without improvement (0: never).
    pub patience: usize,
    /// Which adapter to write: `eval_loss` (the one with the lowest validation loss) or `last`.
    /// Unset: `eval_loss` when there is validation data, else `last`.
    pub save_best: Option<SaveBest>,
    /// Continue from this adapter: a directory, or `NAME@V` (pulled from the registry by
    /// `loraops train`). Its r, alpha, rsLoRA and targets are the run's; DPO's and KTO's
    /// reference model is then the base with this adapter, frozen.
    pub init_adapter: Option<String>,
    /// `init_adapter` resolved: its directory and the parent the manifest records. Set by the
    /// caller that resolved `NAME@V`; a directory is resolved when training starts.
    #[serde(skip)]
    pub init: Option<InitAdapter>,
    /// Write a resumable checkpoint every N steps (0: never).
    pub checkpoint_every: usize,
    /// Continue from `OUT/checkpoint` if it exists.
    pub resume: bool,
    /// End this run (with a checkpoint) once this many updates are done, to resume later;
    /// the schedule still runs to `steps`.
    pub stop_after: Option<usize>,
    /// Also write the merged full model here.
    pub merge: Option<PathBuf>,
    /// Recompute each decoder layer in backward rather than keep its activations.
    pub activation_checkpointing: bool,
    /// Pack several examples into each row of `max_len` tokens (each attends only to itself).
    pub packing: bool,
    /// The registry's training run this is (`train --registry`), recorded in the manifest as
    /// `run_id` so the pushed version links to it.
    pub run_id: Option<String>,
}

/// Which adapter a run writes (`save_best`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SaveBest {
    /// The adapter of the validation with the lowest loss (transformers'
    /// `load_best_model_at_end` with `metric_for_best_model="eval_loss"`).
    EvalLoss,
    /// The adapter of the last update.
    Last,
}

impl Default for SftConfig {
    fn default() -> Self {
        let opt = AdamWConfig::default();
        Self {
            model: PathBuf::new(),
            data: PathBuf::new(),
            val_data: None,
            out: PathBuf::new(),
            base_model_name: None,
            run_id: None,
            steps: 100,
            quantize: "none".into(),
            base_dtype: "auto".into(),
            compute_dtype: "auto".into(),
            device: "auto".into(),
            double_quant: true,
            r: 16,
            alpha: 32.0,
            dropout: 0.05,
            use_rslora: false,
            targets: vec!["all-linear".into()],
            lr: opt.lr,
            lr_scheduler: LrScheduler::default(),
            warmup_steps: 0,
            min_lr_rate: None,
            beta1: opt.beta1,
            beta2: opt.beta2,
            eps: opt.eps,
            weight_decay: opt.weight_decay,
            batch_size: 4,
            grad_accum: 1,
            max_len: 512,
            max_grad_norm: 1.0,
            label_smoothing: 0.0,
            seed: 42,
            eval_every: 0,
            patience: 0,
            save_best: None,
            init_adapter: None,
            init: None,
            checkpoint_every: 0,
            resume: false,
            stop_after: None,
            merge: None,
            activation_checkpointing: false,
            packing: false,
        }
    }
}

impl SftConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Config(m.into()));
        if self.model.as_os_str().is_empty() {
            return bad("model is not set (--model DIR)");
        }
        if self.data.as_os_str().is_empty() {
            return bad("data is not set (--data FILE)");
        }
        if self.out.as_os_str().is_empty() {
            return bad("out is not set (--out DIR)");
        }
        if self.steps == 0
            || self.batch_size == 0
            || self.grad_accum == 0
            || self.r == 0
            || self.max_len < 2
        {
            return bad(
                "steps, batch_size, grad_accum and r must be at least 1, max_len at least 2",
            );
        }
        if !(0.0..1.0).contains(&self.dropout) || !(0.0..1.0).contains(&self.label_smoothing) {
            return bad("dropout and label_smoothing must be in [0, 1)");
        }
        match (self.lr_scheduler, self.min_lr_rate) {
            (LrScheduler::CosineWithMinLr, None) => {
                return bad("lr_scheduler cosine_with_min_lr needs min_lr_rate (--min-lr-rate)");
            }
            (LrScheduler::CosineWithMinLr, Some(r)) if !(0.0..=1.0).contains(&r) => {
                return bad("min_lr_rate must be in [0, 1]");
            }
            (LrScheduler::CosineWithMinLr, Some(_)) | (_, None) => {}
            (s, Some(_)) => {
                let name = serde_json::to_value(s).expect("serialisable");
                return Err(Error::Config(format!(
                    "min_lr_rate applies to lr_scheduler cosine_with_min_lr, not {}",
                    name.as_str().unwrap_or_default()
                )));
            }
        }
        if self.lr_scheduler == LrScheduler::Constant && self.warmup_steps > 0 {
            return bad(
                "lr_scheduler constant has no warm-up; use constant_with_warmup with warmup_steps",
            );
        }
        let validating = self.val_data.is_some();
        if self.save_best == Some(SaveBest::EvalLoss) && !validating {
            return bad("save_best eval_loss needs validation data (--val-data)");
        }
        if self.patience > 0 && !validating {
            return bad("patience (early stopping) needs validation data (--val-data)");
        }
        self.base_format()?;
        self.compute_dtype()?;
        Ok(())
    }

    /// `auto` dtypes made concrete for `device`: bf16 on a GPU (the recipe's mixed precision,
    /// shared/seed-finetuning-adaptation.md 3.2 "혼합정밀: bf16/fp16"), f32 on the CPU, whose
    /// matmul has no bf16.
    pub fn for_device(&self, device: &Device) -> Self {
        let pick = |v: &str| match v {
            "auto" if device.is_cpu() => "f32".to_string(),
            "auto" => "bf16".to_string(),
            other => other.to_string(),
        };
        Self {
            base_dtype: pick(&self.base_dtype),
            compute_dtype: pick(&self.compute_dtype),
            ..self.clone()
        }
    }

    pub fn compute_dtype(&self) -> Result<candle_core::DType> {
        match self.compute_dtype.as_str() {
            // Before `for_device`: what the CPU would use.
            "f32" | "auto" => Ok(candle_core::DType::F32),
            "bf16" => Ok(candle_core::DType::BF16),
            other => Err(Error::Config(format!(
                "compute_dtype {other:?}: expected auto, f32 or bf16"
            ))),
        }
    }

    pub fn base_format(&self) -> Result<BaseFormat> {
        match (self.quantize.as_str(), self.base_dtype.as_str()) {
            ("nf4", _) => Ok(BaseFormat::Nf4),
            ("none", "auto") => Ok(BaseFormat::F32),
            ("none", d) => Ok(d.parse()?),
            (q, _) => Err(Error::Config(format!(
                "quantize {q:?}: expected nf4 or none"
            ))),
        }
    }

    /// The adapter to continue from, if any.
    pub fn init_adapter(&self) -> Result<Option<InitAdapter>> {
        if let Some(i) = &self.init {
            return Ok(Some(i.clone()));
        }
        let Some(s) = &self.init_adapter else {
            return Ok(None);
        };
        let dir = Path::new(s);
        if dir.is_dir() {
            return InitAdapter::from_dir(dir).map(Some);
        }
        Err(Error::Config(if s.contains('@') {
            format!(
                "init_adapter {s:?}: a registry version is pulled by `loraops train` (--registry); here it must be a directory"
            )
        } else {
            format!("init_adapter {s:?}: no such directory (expected DIR or NAME@V)")
        }))
    }

    pub fn lora(&self) -> Result<LoraConfig> {
        let resolved = loraops_registry::peft::TargetModules::List(self.targets.clone())
            .resolve()
            .map_err(|_| {
                let unknown = self
                    .targets
                    .iter()
                    .find(|t| {
                        *t != "all-linear"
                            && !loraops_registry::peft::LINEAR_MODULES
                                .iter()
                                .any(|(m, _)| m == t)
                    })
                    .cloned()
                    .unwrap_or_default();
                Error::Model(loraops_model::Error::TargetModuleNotFound {
                    module: unknown,
                    available: "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
                        .into(),
                })
            })?;
        Ok(LoraConfig {
            r: self.r,
            alpha: self.alpha,
            dropout: self.dropout,
            use_rslora: self.use_rslora,
            targets: resolved,
        })
    }

    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            lr: self.lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
        }
    }
}

/// The table for `method` of a TOML config file, as JSON: `[train.<method>]`, else
/// `[<method>]`, else the file's top-level keys that are not tables (a shared loraops
/// config file has tables for other commands).
pub fn read_config_table(
    path: &Path,
    method: &str,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let text = String::from_utf8(crate::error::read(path)?).map_err(|e| Error::parse(path, e))?;
    let v: toml::Value = toml::from_str(&text).map_err(|e| Error::parse(path, e))?;
    let v = serde_json::to_value(v).map_err(|e| Error::parse(path, e))?;
    let table = match v
        .pointer(&format!("/train/{method}"))
        .or_else(|| v.get(method))
    {
        Some(t) => t.as_object().cloned().unwrap_or_default(),
        None => v
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, x)| !x.is_object())
            .map(|(k, x)| (k.clone(), x.clone()))
            .collect(),
    };
    Ok(table)
}

/// log-softmax over the vocabulary at each of the batch's target positions (N, vocab).
pub fn position_log_probs(model: &Llama, batch: &Batch, rng: &mut DropoutRng) -> Result<Tensor> {
    let (b, t) = batch.input_ids.dims2()?;
    let ctx = model.context(b, t, Some(&batch.attention_mask))?;
    let h = model.hidden(&batch.input_ids, &ctx, rng)?;
    let logits = head_rows(model, &h, &batch.positions)?;
    Ok(log_softmax(&logits)?)
}

/// Σ over target positions of weight · cross-entropy (with optional label smoothing), and the
/// number of targets. The caller divides by the targets of the whole accumulated batch.
pub fn loss_sum(
    model: &Llama,
    batch: &Batch,
    label_smoothing: f64,
    rng: &mut DropoutRng,
) -> Result<Tensor> {
    let logp = position_log_probs(model, batch, rng)?;
    let nll = logp
        .gather(&batch.targets.unsqueeze(1)?, 1)?
        .squeeze(1)?
        .neg()?;
    let per = if label_smoothing > 0.0 {
        // torch's label_smoothing: (1-ε)·nll + ε·mean over the vocabulary of -log p.
        let smooth = logp.mean(D::Minus1)?.neg()?;
        ((nll * (1.0 - label_smoothing))? + (smooth * label_smoothing)?)?
    } else {
        nll
    };
    Ok((per * &batch.weights)?.sum_all()?)
}

/// One step's record, as written to metrics.jsonl.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: usize,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    /// Method-specific metrics under TRL's names (`rewards/chosen`, `rewards/margins`, …).
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
}

/// What the loop reports as it goes (for progress bars and logs).
#[derive(Clone, Copy)]
pub enum Event<'a> {
    Start {
        total_steps: usize,
        start_step: usize,
        stats: &'a DatasetStats,
    },
    Step(&'a StepMetrics),
    Eval {
        step: usize,
        val_loss: f64,
    },
    EarlyStop {
        step: usize,
        best_val_loss: f64,
    },
    Checkpoint {
        step: usize,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SftOutcome {
    pub steps_done: usize,
    pub final_loss: f64,
    pub best_val_loss: Option<f64>,
    pub stats: DatasetStats,
    pub adapter_dir: PathBuf,
    pub merged_dir: Option<PathBuf>,
    pub tokens: usize,
    pub seconds: f64,
    /// NF4 runs: bytes per parameter of the quantised frozen weights (codes and absmax).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nf4_bytes_per_param: Option<f64>,
    /// GPU runs: the most memory the run's allocations held at once, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_gpu_bytes: Option<u64>,
}

/// Training state that a checkpoint restores.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoopState {
    pub step: usize,
    pub best_val_loss: Option<f64>,
    /// The update after which the best validation loss was measured.
    #[serde(default)]
    pub best_step: Option<usize>,
    pub bad_evals: usize,
    pub tokens: usize,
    pub last_loss: f64,
    pub seconds: f64,
}

/// Mean validation loss over a dataset (no dropout).
pub fn eval_loss(
    model: &Llama,
    rows: &[Example],
    batch_size: usize,
    pad_id: u32,
    label_smoothing: f64,
) -> Result<f64> {
    let (mut sum, mut n) = (0f64, 0usize);
    for chunk in rows.chunks(batch_size) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let batch = make_batch(&refs, pad_id, &model.device)?;
        let l = loss_sum(model, &batch, label_smoothing, &mut None)?;
        sum += l.to_scalar::<f32>()? as f64;
        n += batch.n_targets;
    }
    Ok(sum / n.max(1) as f64)
}

/// The rows of micro-batch `micro` of update `step`: a fresh seeded permutation every epoch.
struct Sampler {
    n: usize,
    seed: u64,
    epoch: Option<(usize, Vec<usize>)>,
}

impl Sampler {
    fn indices(&mut self, first: usize, count: usize) -> Vec<usize> {
        (first..first + count)
            .map(|k| {
                let (epoch, pos) = (k / self.n, k % self.n);
                if self.epoch.as_ref().is_none_or(|(e, _)| *e != epoch) {
                    let mut perm: Vec<usize> = (0..self.n).collect();
                    perm.shuffle(&mut derived_rng(self.seed, RNG_SHUFFLE, epoch as u64));
                    self.epoch = Some((epoch, perm));
                }
                self.epoch.as_ref().expect("set").1[pos]
            })
            .collect()
    }
}

/// Gradients of `loss` for the parameters, in order (zero where a parameter got none).
pub fn collect_grads(
    model: &Llama,
    loss: &Tensor,
    params: &[candle_core::Var],
) -> Result<Vec<Tensor>> {
    let mut store = loss.backward()?;
    let mut out = Vec::with_capacity(params.len());
    for p in params {
        let mut g = match store.remove(p.as_tensor()) {
            Some(g) => g,
            None => p.zeros_like()?,
        };
        if let Some(extra) = model.take_step_grad(p) {
            g = (g + extra)?;
        }
        out.push(g);
    }
    Ok(out)
}

/// Metric tallies of an update: per name, a sum and a count; the logged value is their mean.
pub type Tally = BTreeMap<String, (f64, f64)>;

/// Add `sum` over `count` items to the tally `name`.
pub fn tally(t: &mut Tally, name: &str, sum: f64, count: f64) {
    let e = t.entry(name.to_string()).or_insert((0.0, 0.0));
    e.0 += sum;
    e.1 += count;
}

/// One micro-batch's share of an update's loss (already divided by the normaliser of the whole
/// accumulated batch, so the micro-batches' losses add up to the update's loss).
pub struct MicroLoss {
    pub loss: Tensor,
    /// Tokens the forward pass with gradients processed (for tokens/s).
    pub tokens: usize,
    pub tally: Tally,
}

/// What a training method brings to the shared loop: its rows, its loss on micro-batches,
/// its validation loss. SFT is one; the preference methods (`preference`) are the others.
pub trait Objective: Send {
    /// Recorded in the manifest: `sft`, `dpo`, `orpo`, `kto`.
    fn method(&self) -> &str;
    /// Training rows the sampler draws from.
    fn rows(&self) -> usize;
    fn stats(&self) -> &DatasetStats;
    /// Statistics of the validation set; `None` without one.
    fn val_stats(&self) -> Option<&DatasetStats>;
    /// Called once, after the model is loaded with the adapter training starts from (fresh, or
    /// `init_adapter`'s weights: then `init` is true) and before a checkpoint is restored.
    fn prepare(&mut self, _model: &Llama, _init: bool) -> Result<()> {
        Ok(())
    }
    /// The loss of micro-batch `micro` of an update whose rows are `step_rows` (one slice per
    /// micro-batch).
    fn micro_loss(
        &mut self,
        model: &Llama,
        step_rows: &[&[usize]],
        micro: usize,
        rng: &mut DropoutRng,
    ) -> Result<MicroLoss>;
    /// The loss on the validation set (no dropout); called only when there is one.
    fn val_loss(&mut self, model: &Llama, batch_size: usize) -> Result<f64>;
    /// The metrics logged for an update, from its tallies (default: each tally's mean).
    fn report(&self, tally: &Tally) -> BTreeMap<String, f64> {
        tally
            .iter()
            .map(|(k, (s, n))| (k.clone(), s / n.max(f64::MIN_POSITIVE)))
            .collect()
    }
}

/// Supervised fine-tuning as an [`Objective`]: token-level cross-entropy on completion tokens,
/// normalised by the targets of the whole accumulated batch.
struct SftObjective {
    train: Vec<Packed>,
    /// Loss targets per training row.
    targets: Vec<usize>,
    stats: DatasetStats,
    val: Option<(Vec<Example>, DatasetStats)>,
    pad_id: u32,
    label_smoothing: f64,
    device: Device,
}

/// Positions of a row whose next token is a target (as `make_packed_batch` gathers them).
fn packed_targets(r: &Packed) -> usize {
    (0..r.ids.len().saturating_sub(1))
        .filter(|&t| r.labels[t + 1] != crate::data::IGNORE && r.segments[t] == r.segments[t + 1])
        .count()
}

impl Objective for SftObjective {
    fn method(&self) -> &str {
        "sft"
    }
    fn rows(&self) -> usize {
        self.train.len()
    }
    fn stats(&self) -> &DatasetStats {
        &self.stats
    }
    fn val_stats(&self) -> Option<&DatasetStats> {
        self.val.as_ref().map(|v| &v.1)
    }
    fn micro_loss(
        &mut self,
        model: &Llama,
        step_rows: &[&[usize]],
        micro: usize,
        rng: &mut DropoutRng,
    ) -> Result<MicroLoss> {
        // Normalise by the targets of the whole accumulated batch, so accumulation equals
        // one big batch.
        let total: usize = step_rows
            .iter()
            .flat_map(|r| r.iter())
            .map(|&i| self.targets[i])
            .sum();
        let rows: Vec<&Packed> = step_rows[micro].iter().map(|&i| &self.train[i]).collect();
        let batch = make_packed_batch(&rows, self.pad_id, &self.device)?;
        let loss = (loss_sum(model, &batch, self.label_smoothing, rng)? / total.max(1) as f64)?;
        Ok(MicroLoss {
            loss,
            tokens: batch.n_tokens,
            tally: Tally::new(),
        })
    }
    fn val_loss(&mut self, model: &Llama, batch_size: usize) -> Result<f64> {
        let (rows, _) = self.val.as_ref().expect("called only with validation data");
        eval_loss(model, rows, batch_size, self.pad_id, self.label_smoothing)
    }
}

pub fn train_sft(
    cfg: &SftConfig,
    device: &Device,
    on_event: &mut (dyn FnMut(Event) + Send),
) -> Result<SftOutcome> {
    cfg.validate()?;
    let tok = Tokenizer::load(&cfg.model)?;
    let (train, stats) = load_sft(&cfg.data, &tok, cfg.max_len)?;
    let train: Vec<Packed> = if cfg.packing {
        pack(&train, cfg.max_len)
    } else {
        train.iter().map(Packed::from).collect()
    };
    let val = match &cfg.val_data {
        Some(p) => Some(load_sft(p, &tok, cfg.max_len)?),
        None => None,
    };
    let mut objective = SftObjective {
        targets: train.iter().map(packed_targets).collect(),
        train,
        stats,
        val,
        pad_id: tok.pad_id,
        label_smoothing: cfg.label_smoothing,
        device: device.clone(),
    };
    let config = serde_json::to_value(cfg).expect("serialisable");
    run_training(cfg, config, device, &mut objective, on_event)
}

/// Keep freed heap memory for reuse instead of returning it to the kernel. A CPU step frees
/// and allocates the same few-MiB activation buffers over and over; glibc's defaults unmap
/// them and the next step faults the pages in again, which cost about 12% of a step on the
/// test machines (system time 1.1 s → 0.4 s per run of bench/trainer, peak RSS unchanged).
/// One arena for all threads: the loop runs on a pool worker (`on_pool`), and a worker's own
/// arena unmaps a heap whenever it empties and maps it again later (75 munmaps a 30-step NF4
/// run, each a TLB shootdown across the threads; 4 with one arena, and NF4 about 8% faster).
fn retain_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; any value is valid for these two.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20); // the largest glibc accepts
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// The training loop every method shares: load the base (f32, bf16 or NF4) and attach a fresh
/// adapter (or the one `init_adapter` names), then per update sample rows, accumulate
/// micro-batch gradients, clip, step AdamW on the learning-rate schedule; validate, stop early,
/// checkpoint and resume; finally write the PEFT adapter (by `save_best`: the best one by
/// validation loss, or the last), the merged model on request, `metrics.jsonl` and the
/// manifest. `config` is recorded in the manifest.
pub fn run_training(
    cfg: &SftConfig,
    config: serde_json::Value,
    device: &Device,
    obj: &mut dyn Objective,
    on_event: &mut (dyn FnMut(Event) + Send),
) -> Result<SftOutcome> {
    if device.is_cpu() {
        retain_freed_memory();
    }
    on_pool(device.is_cpu(), || {
        train_loop(cfg, config, device, obj, on_event)
    })
}

/// [`run_training`], on the calling thread.
fn train_loop(
    cfg: &SftConfig,
    config: serde_json::Value,
    device: &Device,
    obj: &mut dyn Objective,
    on_event: &mut (dyn FnMut(Event) + Send),
) -> Result<SftOutcome> {
    let mut resolved = cfg.for_device(device);
    // A bitsandbytes 4-bit base is held as stored, in NF4: the manifest says so.
    let base = loraops_model::config::ModelConfig::from_file(&cfg.model.join("config.json"))?;
    if let Some(q) = &base.quantization {
        resolved.quantize = "nf4".into();
        resolved.double_quant = q.double_quant;
    }
    let cfg = &resolved;
    let config = resolved_config(config, cfg);
    let lora_cfg = cfg.lora()?;
    let init = cfg.init_adapter()?;
    if let Some(i) = &init {
        crate::init::check_matches(&i.dir, &lora_cfg)?;
    }
    let stats = obj.stats().clone();
    let opts = LoadOptions {
        format: cfg.base_format()?,
        double_quant: cfg.double_quant,
        unquantized_bf16: cfg.base_dtype == "bf16",
        compute_dtype: cfg.compute_dtype()?,
        device: device.clone(),
    };
    if opts.compute_dtype == candle_core::DType::BF16 && device.is_cpu() {
        // candle's CPU matmul has no bf16.
        return Err(Error::Config(
            "compute_dtype \"bf16\" needs a GPU; the CPU computes in f32".into(),
        ));
    }
    let mut model = Llama::load(&cfg.model, &opts)?;
    if cfg.activation_checkpointing {
        model.layer_step = Some(std::sync::Arc::new(
            crate::checkpoint::Checkpointing::default(),
        ));
    }
    model.add_lora(&lora_cfg, &mut derived_rng(cfg.seed, RNG_LORA_INIT, 0))?;
    if let Some(i) = &init {
        crate::init::load_weights(&i.dir, &mut model)?;
    }
    let named = model.lora_params();
    let params: Vec<candle_core::Var> = named.iter().map(|(_, v)| v.clone()).collect();
    let mut opt = AdamW::new(params.clone(), cfg.adamw())?;
    // Before a checkpoint is restored: a reference model is the adapter training started from.
    obj.prepare(&model, init.is_some())?;

    std::fs::create_dir_all(&cfg.out).map_err(|e| Error::io(&cfg.out, e))?;
    let ckpt_dir = cfg.out.join("checkpoint");
    let mut state = LoopState::default();
    let mut best_params: Option<Vec<Tensor>> = None;
    if cfg.resume && ckpt_dir.exists() {
        let (s, best) = resume::load(&ckpt_dir, &named, &mut opt)?;
        state = s;
        best_params = best;
    }
    let keep_best = match cfg.save_best {
        Some(SaveBest::EvalLoss) => true,
        Some(SaveBest::Last) => false,
        None => obj.val_stats().is_some(),
    };
    let metrics_path = cfg.out.join("metrics.jsonl");
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(state.step > 0)
        .write(true)
        .truncate(state.step == 0)
        .open(&metrics_path)
        .map_err(|e| Error::io(&metrics_path, e))?;

    on_event(Event::Start {
        total_steps: cfg.steps,
        start_step: state.step,
        stats: &stats,
    });
    let mut sampler = Sampler {
        n: obj.rows(),
        seed: cfg.seed,
        epoch: None,
    };
    let has_val = obj.val_stats().is_some();
    let started = Instant::now();
    let seconds_before = state.seconds;
    let mut stopped_early = false;
    while state.step < cfg.steps {
        let step = state.step;
        let t0 = Instant::now();
        let lr = cfg.lr
            * cfg.lr_scheduler.factor(
                step,
                cfg.warmup_steps,
                cfg.steps,
                cfg.min_lr_rate.unwrap_or(0.0),
            );
        let per_step = cfg.batch_size * cfg.grad_accum;
        let idx = sampler.indices(step * per_step, per_step);
        let step_rows: Vec<&[usize]> = idx.chunks(cfg.batch_size).collect();
        let rows = StepRows {
            rows: &step_rows,
            step,
            lr,
        };
        let Update {
            loss: loss_value,
            tokens,
            tallies,
            grad_norm,
        } = update(cfg, &model, &params, obj, &mut opt, rows)?;
        state.step += 1;
        state.tokens += tokens;
        state.last_loss = loss_value;
        let dt = t0.elapsed().as_secs_f64();
        state.seconds = seconds_before + started.elapsed().as_secs_f64();
        let mut m = StepMetrics {
            step: state.step,
            loss: loss_value,
            lr,
            grad_norm,
            tokens,
            tokens_per_s: tokens as f64 / dt.max(1e-9),
            elapsed_s: state.seconds,
            val_loss: None,
            metrics: obj.report(&tallies),
        };
        let eval_now = has_val
            && ((cfg.eval_every > 0 && state.step % cfg.eval_every == 0)
                || state.step == cfg.steps);
        if eval_now {
            let vl = obj.val_loss(&model, cfg.batch_size)?;
            m.val_loss = Some(vl);
            on_event(Event::Eval {
                step: state.step,
                val_loss: vl,
            });
            if state.best_val_loss.is_none_or(|b| vl < b) {
                state.best_val_loss = Some(vl);
                state.best_step = Some(state.step);
                state.bad_evals = 0;
                if keep_best {
                    best_params = Some(
                        params
                            .iter()
                            .map(|p| p.as_tensor().copy())
                            .collect::<candle_core::Result<_>>()?,
                    );
                }
            } else {
                state.bad_evals += 1;
            }
        }
        writeln!(
            metrics,
            "{}",
            serde_json::to_string(&m).expect("serialisable")
        )
        .map_err(|e| Error::io(&metrics_path, e))?;
        on_event(Event::Step(&m));
        if cfg.checkpoint_every > 0 && state.step % cfg.checkpoint_every == 0 {
            resume::save(&ckpt_dir, &named, &opt, &state, best_params.as_deref())?;
            on_event(Event::Checkpoint { step: state.step });
        }
        if cfg.stop_after.is_some_and(|n| state.step >= n) && state.step < cfg.steps {
            resume::save(&ckpt_dir, &named, &opt, &state, best_params.as_deref())?;
            on_event(Event::Checkpoint { step: state.step });
            break;
        }
        if cfg.patience > 0 && state.bad_evals >= cfg.patience {
            on_event(Event::EarlyStop {
                step: state.step,
                best_val_loss: state.best_val_loss.unwrap_or(f64::NAN),
            });
            stopped_early = true;
            break;
        }
    }
    // `save_best eval_loss`: the adapter written is the one with the best validation loss.
    if let Some(best) = &best_params {
        for (p, b) in params.iter().zip(best) {
            p.set(b)?;
        }
    }
    let base_name = cfg
        .base_model_name
        .clone()
        .unwrap_or_else(|| cfg.model.display().to_string());
    save_adapter(&cfg.out, &model, &lora_cfg, &base_name)?;
    let merged_dir = match &cfg.merge {
        Some(dir) => {
            merge_into(&cfg.model, &model, dir)?;
            Some(dir.clone())
        }
        None => None,
    };
    let outcome = SftOutcome {
        steps_done: state.step,
        final_loss: state.last_loss,
        best_val_loss: state.best_val_loss,
        stats,
        adapter_dir: cfg.out.clone(),
        merged_dir,
        tokens: state.tokens,
        seconds: state.seconds,
        nf4_bytes_per_param: model.nf4_bytes_per_param(),
        peak_gpu_bytes: peak_gpu_bytes(device),
    };
    let selected = Selected {
        stopped_early,
        best_step: best_params.as_ref().and(state.best_step),
        parent: init.map(|i| i.parent),
    };
    let manifest = manifest(
        cfg,
        obj.method(),
        config,
        &outcome,
        obj.val_stats(),
        selected,
    )?;
    save_manifest(&cfg.out, &manifest)?;
    Ok(outcome)
}

/// Run `f` on a worker of the thread pool when training on the CPU. A step starts hundreds of
/// multi-threaded kernels; from a thread outside the pool each one is handed over and waited
/// for (a wake-up and a sleep per kernel), from a worker it simply splits its work. A CPU
/// step ran about 7% faster (alternating runs: median 3526 against 3293 tokens/s); running
/// only each update there, not the whole loop, gained about 1.5%.
fn on_pool<R: Send>(cpu: bool, f: impl FnOnce() -> R + Send) -> R {
    if cpu { rayon::scope(|_| f()) } else { f() }
}

/// The micro-batches of one update.
struct StepRows<'a> {
    rows: &'a [&'a [usize]],
    step: usize,
    lr: f64,
}

/// What one update reports.
struct Update {
    loss: f64,
    tokens: usize,
    tallies: Tally,
    grad_norm: f64,
}

/// One update: forward and backward over each micro-batch, gradients summed, clipped, and
/// AdamW's step.
fn update(
    cfg: &SftConfig,
    model: &Llama,
    params: &[candle_core::Var],
    obj: &mut dyn Objective,
    opt: &mut AdamW,
    StepRows { rows, step, lr }: StepRows,
) -> Result<Update> {
    let mut grads: Option<Vec<Tensor>> = None;
    let (mut loss, mut tokens, mut tallies) = (0f64, 0, Tally::new());
    for mi in 0..rows.len() {
        let mut rng = derived_rng(cfg.seed, RNG_DROPOUT, (step * cfg.grad_accum + mi) as u64);
        let mut drop: DropoutRng = if cfg.dropout > 0.0 {
            Some(&mut rng)
        } else {
            None
        };
        let out = obj.micro_loss(model, rows, mi, &mut drop)?;
        loss += out.loss.to_scalar::<f32>()? as f64;
        tokens += out.tokens;
        for (k, (s, n)) in out.tally {
            tally(&mut tallies, &k, s, n);
        }
        let g = collect_grads(model, &out.loss, params)?;
        grads = Some(match grads {
            None => g,
            Some(acc) => acc
                .iter()
                .zip(g)
                .map(|(a, b)| a + b)
                .collect::<candle_core::Result<_>>()?,
        });
    }
    let mut grads = grads.expect("at least one micro-batch");
    let grad_norm = clip_grad_norm(&mut grads, cfg.max_grad_norm)?;
    opt.step(&grads, lr)?;
    Ok(Update {
        loss,
        tokens,
        tallies,
        grad_norm,
    })
}

/// The configuration the manifest records, with `auto` dtypes as they were resolved.
fn resolved_config(mut config: serde_json::Value, cfg: &SftConfig) -> serde_json::Value {
    if let Some(m) = config.as_object_mut() {
        for (k, v) in [
            ("base_dtype", &cfg.base_dtype),
            ("compute_dtype", &cfg.compute_dtype),
            ("quantize", &cfg.quantize),
        ] {
            if m.contains_key(k) {
                m.insert(k.into(), serde_json::Value::String(v.clone()));
            }
        }
        if m.contains_key("double_quant") {
            m.insert("double_quant".into(), cfg.double_quant.into());
        }
    }
    config
}

/// What the manifest says of the adapter written and where it came from.
struct Selected {
    stopped_early: bool,
    /// The update whose adapter was written, when it is the best by validation loss.
    best_step: Option<usize>,
    /// The adapter training continued from.
    parent: Option<serde_json::Value>,
}

fn manifest(
    cfg: &SftConfig,
    method: &str,
    config: serde_json::Value,
    o: &SftOutcome,
    val_stats: Option<&DatasetStats>,
    selected: Selected,
) -> Result<TrainingManifest> {
    let mut datasets = vec![DatasetRef {
        role: "train".into(),
        path: cfg.data.display().to_string(),
        digest: file_digest(&cfg.data)?,
        rows: o.stats.rows as u64,
    }];
    if let (Some(p), Some(s)) = (&cfg.val_data, val_stats) {
        datasets.push(DatasetRef {
            role: "val".into(),
            path: p.display().to_string(),
            digest: file_digest(p)?,
            rows: s.rows as u64,
        });
    }
    let mut metrics = BTreeMap::new();
    metrics.insert("steps".to_string(), o.steps_done as f64);
    metrics.insert("final_loss".to_string(), o.final_loss);
    if let Some(v) = o.best_val_loss {
        metrics.insert("best_val_loss".to_string(), v);
    }
    metrics.insert("tokens".to_string(), o.tokens as f64);
    metrics.insert("seconds".to_string(), o.seconds);
    if let Some(b) = o.nf4_bytes_per_param {
        metrics.insert("nf4_bytes_per_param".to_string(), b);
    }
    if let Some(b) = o.peak_gpu_bytes {
        metrics.insert("peak_gpu_bytes".to_string(), b as f64);
    }
    metrics.insert(
        "rows_no_completion".to_string(),
        o.stats.no_completion as f64,
    );
    metrics.insert("rows_truncated".to_string(), o.stats.truncated as f64);
    let mut extra = BTreeMap::new();
    extra.insert(
        "dataset_stats".to_string(),
        serde_json::to_value(&o.stats).expect("serialisable"),
    );
    if let Some(id) = &cfg.run_id {
        extra.insert("run_id".to_string(), serde_json::Value::String(id.clone()));
    }
    extra.insert(
        "stopped_early".to_string(),
        serde_json::Value::Bool(selected.stopped_early),
    );
    extra.insert(
        "adapter_selected".to_string(),
        serde_json::Value::String(
            if selected.best_step.is_some() {
                "best_val_loss"
            } else {
                "final"
            }
            .into(),
        ),
    );
    if let Some(step) = selected.best_step {
        extra.insert("best_step".to_string(), serde_json::json!(step));
    }
    if let Some(p) = selected.parent {
        extra.insert("parent".to_string(), p);
    }
    Ok(TrainingManifest {
        format: MANIFEST_FORMAT.into(),
        method: method.into(),
        trainer_version: format!("loraops-trainer {}", env!("CARGO_PKG_VERSION")),
        base_model: cfg
            .base_model_name
            .clone()
            .unwrap_or_else(|| cfg.model.display().to_string()),
        base_model_digest: Some(model_digest(&cfg.model)?),
        datasets,
        config,
        metrics,
        created_at: chrono::Utc::now(),
        extra,
    })
}

// The GPU memory high-water mark of this process's allocations (None on the CPU).
#[cfg(feature = "cuda")]
use loraops_model::kernels::cuda::peak_memory as peak_gpu_bytes;

#[cfg(not(feature = "cuda"))]
fn peak_gpu_bytes(_device: &Device) -> Option<u64> {
    None
}

/// `sha256:` over the base model's weight files, in name order.
pub fn model_digest(dir: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for f in loraops_model::llama::weight_files(dir)? {
        let mut file = std::fs::File::open(&f).map_err(|e| Error::io(&f, e))?;
        std::io::copy(&mut file, &mut h).map_err(|e| Error::io(&f, e))?;
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> serde_json::Map<String, serde_json::Value> {
        let dir =
            std::env::temp_dir().join(format!("loraops-cfg-{}-{}", std::process::id(), text.len()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("c.toml");
        std::fs::write(&p, text).unwrap();
        read_config_table(&p, "sft").unwrap()
    }

    #[test]
    fn config_table_is_found_where_a_shared_file_keeps_it() {
        let t = table("[registry]\nlisten = \"x\"\n[train.sft]\nsteps = 7\nr = 8\n");
        assert_eq!(t.get("steps"), Some(&serde_json::json!(7)));
        assert!(!t.contains_key("listen"));
        let t = table("[sft]\nlr = 0.001\n");
        assert_eq!(t.get("lr"), Some(&serde_json::json!(0.001)));
        let t = table("steps = 3\nquantize = \"nf4\"\n[gateway]\nlisten = \"y\"\n");
        let cfg: SftConfig = serde_json::from_value(serde_json::Value::Object(t)).unwrap();
        assert_eq!((cfg.steps, cfg.quantize.as_str(), cfg.r), (3, "nf4", 16));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_rejected() {
        assert!(serde_json::from_value::<SftConfig>(serde_json::json!({"stepz": 3})).is_err());
        let cfg = SftConfig {
            model: "m".into(),
            data: "d".into(),
            out: "o".into(),
            quantize: "int8".into(),
            ..Default::default()
        };
        assert!(cfg.validate().unwrap_err().to_string().contains("int8"));
    }
}
