//! Preference training: DPO (sigmoid, IPO, and the label-smoothed conservative and robust losses), ORPO and
//! KTO, with TRL's formulas and metric names, on the SFT training loop ([`run_training`]).
//!
//! - The reference model of DPO and KTO is the base with the adapter switched off
//!   ([`without_adapter`]): the same frozen weights, no second copy. When training continues
//!   from an adapter (`init_adapter`), it is the base with that adapter, frozen
//!   ([`crate::init::frozen_copy`]): at the first step the policy is the reference, as in TRL
//!   with the adapter loaded a second time as `ref_adapter_name`. Its log-probabilities can be
//!   computed once per dataset before training (`precompute_ref_log_probs`); those of the
//!   validation set are always computed once.
//! - Sequence log-probabilities are sums over completion tokens (prompt tokens are masked), or
//!   means where TRL takes means (IPO, ORPO).
//! - Batches hold each row's two sequences, as TRL's concatenated forward does: chosen then
//!   rejected for DPO and ORPO; for KTO the completion, and, for the KL estimate, the row's
//!   prompt with the previous row's completion (a mismatched pair, fixed when the data loads).
//! - Losses are averaged over the rows (pairs) of the whole accumulated batch, ORPO's NLL over
//!   its chosen completion tokens, so gradient accumulation equals one large batch. A row's
//!   `weight` (default 1) multiplies its loss, as in SFT; a row of weight 0 adds nothing (KTO's
//!   KL estimate is the weighted mean over the batch). (TRL's
//!   ORPOTrainer also counts the prompt tokens in the NLL; here prompts are masked in every
//!   method. KTO's KL estimate is per micro-batch, as TRL's is per device batch.)
//! - Checked against TRL 1.16 (scripts/reference/preference_reference.py): losses, gradients
//!   and logged metrics, on fixed log-probabilities and on a tiny model.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::data::{
    Batch, DatasetStats, Example, IGNORE, chat_messages, chat_segments, encode_segments,
    make_batch, row_weight, segments,
};
use crate::error::{Error, Result};
use crate::sft::{
    Event, MicroLoss, Objective, SftConfig, SftOutcome, Tally, position_log_probs, run_training,
    tally,
};
use loraops_data::row::{self, Kto, Text};
use loraops_model::linear::lora::DropoutRng;
use loraops_model::llama::Llama;
use loraops_model::tokenizer::Tokenizer;

/// The preference method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Dpo,
    Orpo,
    Kto,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Self::Dpo => "dpo",
            Self::Orpo => "orpo",
            Self::Kto => "kto",
        }
    }
}

impl std::str::FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "dpo" => Ok(Self::Dpo),
            "orpo" => Ok(Self::Orpo),
            "kto" => Ok(Self::Kto),
            other => Err(Error::Config(format!(
                "unknown preference method {other:?} (dpo, orpo, kto)"
            ))),
        }
    }
}

/// DPO's loss on the reward margin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DpoLoss {
    /// −log σ(β·m); with label smoothing ε, conservative DPO (cDPO):
    /// −(1−ε)·log σ(β·m) − ε·log σ(−β·m).
    #[default]
    Sigmoid,
    /// Robust DPO (rDPO, TRL's `robust`), unbiased under labels flipped with probability ε:
    /// (−(1−ε)·log σ(β·m) + ε·log σ(−β·m)) / (1 − 2ε).
    Robust,
    /// (m − 1/(2β))² on mean (not summed) log-probabilities.
    Ipo,
}

/// The options preference training adds to the SFT ones (same TOML table, same names as TRL).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PreferenceOptions {
    /// DPO and KTO: β, the strength of the pull towards the reference. ORPO: λ, the weight of
    /// the odds-ratio term (TRL calls it `beta` too).
    pub beta: f64,
    /// DPO: `sigmoid`, `robust` or `ipo`.
    pub loss_type: DpoLoss,
    /// DPO (`sigmoid`: conservative DPO; `robust`): the probability that a pair's labels are
    /// flipped.
    pub label_smoothing: f64,
    /// DPO and KTO: compute the reference log-probabilities of the training set once, before
    /// the first update, instead of a reference forward pass per batch.
    pub precompute_ref_log_probs: bool,
    /// KTO: weights of the desirable (label true) and undesirable (label false) losses.
    pub desirable_weight: f64,
    pub undesirable_weight: f64,
}

impl Default for PreferenceOptions {
    fn default() -> Self {
        Self {
            beta: 0.1,
            loss_type: DpoLoss::Sigmoid,
            label_smoothing: 0.0,
            precompute_ref_log_probs: false,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
        }
    }
}

const OPTION_KEYS: &[&str] = &[
    "beta",
    "loss_type",
    "label_smoothing",
    "precompute_ref_log_probs",
    "desirable_weight",
    "undesirable_weight",
];

/// Everything `loraops train dpo|orpo|kto` takes: the SFT settings (model, data, LoRA, NF4,
/// optimiser, schedule, accumulation, validation, checkpoints) and the preference options.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferenceConfig {
    pub method: Method,
    pub train: SftConfig,
    pub options: PreferenceOptions,
}

impl PreferenceConfig {
    /// From one flat table of keys (a TOML table or flags): the preference keys go to the
    /// options, the others to the SFT settings; unknown keys are errors.
    pub fn from_table(method: Method, table: serde_json::Map<String, Value>) -> Result<Self> {
        let (opts, rest): (serde_json::Map<_, _>, serde_json::Map<_, _>) = table
            .into_iter()
            .partition(|(k, _)| OPTION_KEYS.contains(&k.as_str()));
        let train: SftConfig = serde_json::from_value(Value::Object(rest))
            .map_err(|e| Error::Config(e.to_string()))?;
        let options: PreferenceOptions = serde_json::from_value(Value::Object(opts))
            .map_err(|e| Error::Config(e.to_string()))?;
        Ok(Self {
            method,
            train,
            options,
        })
    }

    /// The flat table again (what the manifest records).
    pub fn to_value(&self) -> Value {
        let mut m = match serde_json::to_value(&self.train).expect("serialisable") {
            Value::Object(m) => m,
            _ => unreachable!("a struct serialises to an object"),
        };
        m.remove("label_smoothing");
        m.remove("packing");
        if let Value::Object(o) = serde_json::to_value(&self.options).expect("serialisable") {
            m.extend(o);
        }
        Value::Object(m)
    }

    pub fn validate(&self) -> Result<()> {
        self.train.validate()?;
        let bad = |m: String| Err(Error::Config(m));
        let o = &self.options;
        let m = self.method.name();
        if self.train.packing {
            return bad(format!(
                "{m}: packing is not supported for preference training"
            ));
        }
        if self.train.label_smoothing != 0.0 {
            return bad("label_smoothing of the SFT settings is not used here".into());
        }
        if !(o.beta.is_finite() && o.beta > 0.0) {
            return bad(format!("{m}: beta must be positive"));
        }
        if !(0.0..0.5).contains(&o.label_smoothing) {
            return bad(format!("{m}: label_smoothing must be in [0, 0.5)"));
        }
        if o.label_smoothing > 0.0 && (self.method != Method::Dpo || o.loss_type == DpoLoss::Ipo) {
            return bad("label_smoothing applies to DPO's sigmoid and robust losses only".into());
        }
        if self.method != Method::Dpo && o.loss_type != DpoLoss::Sigmoid {
            return bad(format!("loss_type applies to DPO only, not {m}"));
        }
        if self.method == Method::Orpo && o.precompute_ref_log_probs {
            return bad("ORPO has no reference model (precompute_ref_log_probs)".into());
        }
        if !(o.desirable_weight >= 0.0 && o.undesirable_weight >= 0.0) {
            return bad("desirable_weight and undesirable_weight must not be negative".into());
        }
        if self.method == Method::Kto && self.train.batch_size < 2 {
            return bad("KTO needs batch_size of at least 2 for its KL estimate".into());
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Losses, as TRL computes them (on per-sequence log-probabilities).

/// log σ(x), stably: min(x, 0) − log(1 + e^{−|x|}), with min(x, 0) written (x − |x|) / 2 so
/// the gradient at x = 0 is σ(0) = 1/2 whatever subgradient |x| takes there (candle's
/// `minimum` and `abs` gave 1: twice TRL's gradient at the first DPO step, where the policy is
/// the reference and every margin is exactly 0).
fn log_sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    let abs = x.abs()?;
    ((x - &abs)? * 0.5)? - (abs.neg()?.exp()? + 1.0)?.log()?
}

/// σ(x) = 1 / (1 + e^{−x}).
fn sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

/// TRL's DPO loss: per-pair losses, and the chosen and rejected rewards β·(π − ref)
/// (detached). Inputs are the summed completion log-probs of the policy and the reference, and
/// the completion tokens of each sequence (IPO compares per-token means; the rewards are always
/// on sums, as TRL logs them).
#[allow(clippy::too_many_arguments)]
pub fn dpo_losses(
    policy_chosen: &Tensor,
    policy_rejected: &Tensor,
    ref_chosen: &Tensor,
    ref_rejected: &Tensor,
    chosen_tokens: &Tensor,
    rejected_tokens: &Tensor,
    beta: f64,
    loss_type: DpoLoss,
    label_smoothing: f64,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let chosen_logratios = (policy_chosen - ref_chosen)?;
    let rejected_logratios = (policy_rejected - ref_rejected)?;
    let logits = (&chosen_logratios - &rejected_logratios)?;
    let losses = match loss_type {
        DpoLoss::Sigmoid => {
            let l = (log_sigmoid(&(&logits * beta)?)?.neg()? * (1.0 - label_smoothing))?;
            if label_smoothing > 0.0 {
                (l - (log_sigmoid(&(&logits * -beta)?)? * label_smoothing)?)?
            } else {
                l
            }
        }
        DpoLoss::Robust => {
            let e = label_smoothing;
            let clean = (log_sigmoid(&(&logits * beta)?)? * -(1.0 - e))?;
            let flipped = (log_sigmoid(&(&logits * -beta)?)? * -e)?;
            ((clean - flipped)? / (1.0 - 2.0 * e))?
        }
        DpoLoss::Ipo => {
            let d = (chosen_logratios.div(chosen_tokens)?
                - rejected_logratios.div(rejected_tokens)?)?;
            (d - 1.0 / (2.0 * beta))?.sqr()?
        }
    };
    let chosen = (chosen_logratios * beta)?.detach();
    let rejected = (rejected_logratios * beta)?.detach();
    Ok((losses, chosen, rejected))
}

/// TRL's `odds_ratio_loss` on mean log-probs: the per-pair term −λ·log σ(log-odds) that ORPO
/// adds to the NLL, log σ(log-odds) (`log_odds_ratio`) and the log-odds (`log_odds_chosen`).
pub fn orpo_odds_ratio(
    policy_chosen_mean: &Tensor,
    policy_rejected_mean: &Tensor,
    lambda: f64,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    // log(1 − e^x) for x < 0.
    let log1m_exp =
        |x: &Tensor| -> candle_core::Result<Tensor> { x.exp()?.neg()?.affine(1.0, 1.0)?.log() };
    let log_odds = ((policy_chosen_mean - policy_rejected_mean)?
        - (log1m_exp(policy_chosen_mean)? - log1m_exp(policy_rejected_mean)?)?)?;
    let ratio = log_sigmoid(&log_odds)?;
    let losses = (&ratio * -lambda)?;
    Ok((losses, ratio.detach(), log_odds.detach()))
}

/// TRL's KL estimate for KTO: the mean of policy − reference log-probs over the batch's
/// mismatched pairs, at least 0 (a constant for the gradient).
pub fn kto_kl(policy_kl: &Tensor, ref_kl: &Tensor) -> candle_core::Result<f64> {
    let kl = (policy_kl - ref_kl)?
        .mean_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    Ok(kl.max(0.0))
}

/// [`kto_kl`] with row weights: the weighted mean, so a row of weight 0 does not count.
fn kto_kl_weighted(policy_kl: &Tensor, ref_kl: &Tensor, weights: &[f64]) -> Result<f64> {
    if weights.iter().all(|&w| w == 1.0) {
        return Ok(kto_kl(policy_kl, ref_kl)?);
    }
    let d = values(&(policy_kl - ref_kl)?)?;
    let total: f64 = weights.iter().sum();
    if total == 0.0 {
        return Ok(0.0);
    }
    let kl = d.iter().zip(weights).map(|(d, w)| d * w).sum::<f64>() / total;
    Ok(kl.max(0.0))
}

/// TRL's `kto_loss`: per-row losses (weighted) and rewards β·(π − ref) (detached).
/// `desirable` is 1 for a desirable row, 0 for an undesirable one (same dtype as the log-probs).
pub fn kto_losses(
    policy: &Tensor,
    reference: &Tensor,
    desirable: &Tensor,
    kl: f64,
    beta: f64,
    desirable_weight: f64,
    undesirable_weight: f64,
) -> candle_core::Result<(Tensor, Tensor)> {
    let logratios = (policy - reference)?;
    // 1 − σ(β(r − kl)) for desirable rows, 1 − σ(β(kl − r)) for undesirable ones.
    let chosen = (sigmoid(&((&logratios - kl)? * beta)?)?.neg()? + 1.0)?;
    let rejected = (sigmoid(&((&logratios - kl)? * -beta)?)?.neg()? + 1.0)?;
    let undesirable = desirable.neg()?.affine(1.0, 1.0)?;
    let losses = ((chosen * desirable)? * desirable_weight)?
        .add(&((rejected * undesirable)? * undesirable_weight)?)?;
    let rewards = (logratios * beta)?.detach();
    Ok((losses, rewards))
}

// ---------------------------------------------------------------------------------------
// Data.

/// One training row: two sequences (chosen and rejected; for KTO the completion and its
/// mismatched KL pair) and, for KTO, its label.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferenceRow {
    pub seqs: [Example; 2],
    pub desirable: bool,
    /// The row's `weight` (default 1): its loss is multiplied by it.
    pub weight: f64,
    /// Line number in the JSONL file.
    pub line: usize,
}

/// A prompt and a completion, tokenised: the prompt's ids (all masked) and the completion's
/// ids with labels.
#[derive(Debug, Clone)]
struct Tokenised {
    prompt: Vec<u32>,
    completion: Vec<u32>,
    labels: Vec<i64>,
}

impl Tokenised {
    /// prompt + completion, cut to max_len; and whether it was cut.
    fn join(prompt: &[u32], c: &Tokenised, max_len: usize) -> (Example, bool) {
        let mut ids: Vec<u32> = prompt.iter().chain(&c.completion).copied().collect();
        let mut labels: Vec<i64> = std::iter::repeat_n(IGNORE, prompt.len())
            .chain(c.labels.iter().copied())
            .collect();
        let truncated = ids.len() > max_len;
        ids.truncate(max_len);
        labels.truncate(max_len);
        (
            Example {
                ids,
                labels,
                weight: 1.0,
            },
            truncated,
        )
    }
}

/// Tokenise prompt + completion as SFT does (chat template for message lists; the completion
/// text plus EOS for strings), split where the completion starts.
fn tokenise(
    prompt: Option<&Text>,
    completion: &Text,
    key: &str,
    tok: &Tokenizer,
) -> std::result::Result<Tokenised, String> {
    let segs = match (prompt, completion) {
        (None, Text::Plain(c)) => {
            segments(&serde_json::json!({"prompt": "", "completion": c}), tok)?
        }
        (Some(Text::Plain(p)), Text::Plain(c)) => {
            segments(&serde_json::json!({"prompt": p, "completion": c}), tok)?
        }
        (p, Text::Chat(c)) => {
            let mut msgs = match p {
                None => vec![],
                Some(Text::Chat(p)) => chat_messages(p)?,
                Some(Text::Plain(_)) => {
                    return Err(format!(
                        "\"prompt\" is a string but \"{key}\" is a message list; use both strings or both message lists"
                    ));
                }
            };
            let from = msgs.len();
            if !c.iter().any(|m| m.role == "assistant") {
                return Err(format!("\"{key}\" has no assistant message"));
            }
            msgs.extend(chat_messages(c)?);
            chat_segments(&msgs, tok, from)?
        }
        (Some(Text::Chat(_)), Text::Plain(_)) => {
            return Err(format!(
                "\"prompt\" is a message list but \"{key}\" is a string; use both strings or both message lists"
            ));
        }
    };
    let (ids, labels) = encode_segments(&segs, tok)?;
    let start = labels
        .iter()
        .position(|&l| l != IGNORE)
        .unwrap_or(ids.len());
    Ok(Tokenised {
        prompt: ids[..start].to_vec(),
        completion: ids[start..].to_vec(),
        labels: labels[start..].to_vec(),
    })
}

/// Without a prompt, chosen and rejected message lists share their first messages: those are
/// the prompt (TRL's implicit prompt).
fn implicit_prompt(chosen: &mut Text, rejected: &mut Text) -> Option<Text> {
    let (Text::Chat(c), Text::Chat(r)) = (chosen, rejected) else {
        return None;
    };
    let k = c.iter().zip(r.iter()).take_while(|(a, b)| a == b).count();
    if k == 0 {
        return None;
    }
    let prompt: Vec<row::Message> = c.drain(..k).collect();
    r.drain(..k);
    Some(Text::Chat(prompt))
}

fn count(stats: &mut DatasetStats, e: &Example) {
    stats.tokens += e.ids.len();
    stats.trainable_tokens += e.trainable();
}

fn no_completion(stats: &mut DatasetStats, line: usize) {
    stats.no_completion += 1;
    if stats.no_completion_lines.len() < 10 {
        stats.no_completion_lines.push(line);
    }
}

fn read_rows(path: &Path) -> Result<Vec<(usize, Value)>> {
    let text = String::from_utf8(crate::error::read(path)?).map_err(|e| Error::parse(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line).map_err(|e| Error::Data {
            path: path.to_path_buf(),
            line: i + 1,
            message: e.to_string(),
        })?;
        out.push((i + 1, v));
    }
    Ok(out)
}

/// Read and tokenise `{"prompt","chosen","rejected"}` rows (strings or message lists; the
/// prompt may be left out when chosen and rejected are conversations sharing their start).
/// A pair whose chosen and rejected completions are the same is an error naming its line;
/// pairs left without a completion token on either side after truncation are counted, not kept.
pub fn load_pairs(
    path: &Path,
    tok: &Tokenizer,
    max_len: usize,
) -> Result<(Vec<PreferenceRow>, DatasetStats)> {
    let mut stats = DatasetStats::default();
    let mut out = Vec::new();
    for (line, v) in read_rows(path)? {
        let data_err = |message: String| Error::Data {
            path: path.to_path_buf(),
            line,
            message,
        };
        stats.rows += 1;
        if v.get("chosen").is_some() && v.get("chosen") == v.get("rejected") {
            return Err(data_err(
                "chosen and rejected are identical; a preference pair needs two different completions"
                    .into(),
            ));
        }
        let row::Preference {
            prompt,
            mut chosen,
            mut rejected,
        } = row::Preference::from_json(&v).map_err(data_err)?;
        let prompt = match prompt {
            Some(p) => Some(p),
            None => implicit_prompt(&mut chosen, &mut rejected),
        };
        let weight = row_weight(&v).map_err(data_err)?;
        let c = tokenise(prompt.as_ref(), &chosen, "chosen", tok).map_err(data_err)?;
        let r = tokenise(prompt.as_ref(), &rejected, "rejected", tok).map_err(data_err)?;
        if c.completion == r.completion {
            return Err(data_err(
                "chosen and rejected are the same completion; a preference pair needs two different ones"
                    .into(),
            ));
        }
        let (ce, ct) = Tokenised::join(&c.prompt, &c, max_len);
        let (re, rt) = Tokenised::join(&r.prompt, &r, max_len);
        stats.truncated += usize::from(ct || rt);
        if ce.trainable() == 0 || re.trainable() == 0 {
            no_completion(&mut stats, line);
            continue;
        }
        stats.kept += 1;
        count(&mut stats, &ce);
        count(&mut stats, &re);
        out.push(PreferenceRow {
            seqs: [ce, re],
            desirable: true,
            weight: f64::from(weight),
            line,
        });
    }
    if out.is_empty() {
        return Err(Error::NoTrainableRows {
            path: path.to_path_buf(),
            rows: stats.rows,
            max_len,
        });
    }
    Ok((out, stats))
}

/// Read and tokenise KTO's `{"prompt","completion","label"}` rows (label true: desirable).
/// Each row's KL sequence is its prompt with the previous kept row's completion (the first
/// row takes the last one's). With `need_both_labels`, a set with only one label is an error
/// that names its first row.
pub fn load_kto(
    path: &Path,
    tok: &Tokenizer,
    max_len: usize,
    need_both_labels: bool,
) -> Result<(Vec<PreferenceRow>, DatasetStats)> {
    let mut stats = DatasetStats::default();
    let mut kept: Vec<(Tokenised, bool, usize, f32)> = Vec::new();
    for (line, v) in read_rows(path)? {
        let data_err = |message: String| Error::Data {
            path: path.to_path_buf(),
            line,
            message,
        };
        stats.rows += 1;
        let Kto {
            prompt,
            completion,
            label,
        } = Kto::from_json(&v).map_err(data_err)?;
        let weight = row_weight(&v).map_err(data_err)?;
        let t = tokenise(prompt.as_ref(), &completion, "completion", tok).map_err(data_err)?;
        let (e, truncated) = Tokenised::join(&t.prompt, &t, max_len);
        stats.truncated += usize::from(truncated);
        if e.trainable() == 0 {
            no_completion(&mut stats, line);
            continue;
        }
        stats.kept += 1;
        count(&mut stats, &e);
        kept.push((t, label, line, weight));
    }
    if kept.is_empty() {
        return Err(Error::NoTrainableRows {
            path: path.to_path_buf(),
            rows: stats.rows,
            max_len,
        });
    }
    if need_both_labels && (kept.iter().all(|k| k.1) || kept.iter().all(|k| !k.1)) {
        let (label, line) = (kept[0].1, kept[0].2);
        return Err(Error::Data {
            path: path.to_path_buf(),
            line,
            message: format!(
                "every row from this one on is labelled {label} ({} rows): KTO needs both desirable (true) and undesirable (false) examples",
                kept.len()
            ),
        });
    }
    let n = kept.len();
    let out = (0..n)
        .map(|i| {
            let (t, label, line, weight) = &kept[i];
            let prev = &kept[(i + n - 1) % n].0;
            let (e, _) = Tokenised::join(&t.prompt, t, max_len);
            let (kl, _) = Tokenised::join(&t.prompt, prev, max_len);
            PreferenceRow {
                seqs: [e, kl],
                desirable: *label,
                weight: f64::from(*weight),
                line: *line,
            }
        })
        .collect();
    Ok((out, stats))
}

// ---------------------------------------------------------------------------------------
// Sequence log-probabilities.

/// The model with every LoRA pair removed: the reference model of DPO and KTO. It shares the
/// frozen base weights (reference-counted tensors) with `model`; nothing is copied.
pub fn without_adapter(model: &Llama) -> Llama {
    let mut m = model.clone();
    m.layer_step = None;
    for layer in &mut m.layers {
        for (name, _) in loraops_registry::peft::LINEAR_MODULES {
            if let Some(l) = layer.linear_mut(name) {
                l.lora = None;
            }
        }
    }
    m
}

/// Per-sequence sums of the target tokens' log-probabilities (R,), in f64, and the number of
/// target tokens of each sequence.
pub fn sequence_log_probs(
    model: &Llama,
    rows: &[&Example],
    pad_id: u32,
    rng: &mut DropoutRng,
) -> Result<(Tensor, Vec<usize>, usize)> {
    let batch: Batch = make_batch(rows, pad_id, &model.device)?;
    let logp = position_log_probs(model, &batch, rng)?;
    let tgt = logp
        .gather(&batch.targets.unsqueeze(1)?, 1)?
        .to_dtype(DType::F64)?;
    // Which sequence each target belongs to: a (R, N) one-hot matrix, so the sum is a matmul.
    let t = batch.input_ids.dim(1)?;
    let pos: Vec<u32> = batch.positions.to_vec1()?;
    let r = rows.len();
    let mut onehot = vec![0f64; r * pos.len()];
    let mut counts = vec![0usize; r];
    for (j, p) in pos.iter().enumerate() {
        let row = *p as usize / t;
        onehot[row * pos.len() + j] = 1.0;
        counts[row] += 1;
    }
    let onehot = Tensor::from_vec(onehot, (r, pos.len()), &model.device)?;
    let sums = onehot.matmul(&tgt)?.squeeze(1)?;
    Ok((sums, counts, batch.n_tokens))
}

fn counts_tensor(counts: &[usize], device: &Device) -> Result<Tensor> {
    let c: Vec<f64> = counts.iter().map(|&c| c.max(1) as f64).collect();
    Ok(Tensor::from_vec(c, counts.len(), device)?)
}

fn values(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.to_vec1()?)
}

fn sum(v: &[f64]) -> f64 {
    v.iter().sum()
}

// ---------------------------------------------------------------------------------------
// The objective.

/// The rows of one split with their reference log-probs, once computed: per row, the sums
/// for its two sequences.
struct LoadedSplit {
    rows: Vec<PreferenceRow>,
    stats: DatasetStats,
    reference: Option<Vec<[f64; 2]>>,
}

/// Which split a batch comes from.
#[derive(Clone, Copy)]
enum Which {
    Train,
    Val,
}

struct PreferenceObjective {
    method: Method,
    opts: PreferenceOptions,
    train: LoadedSplit,
    val: Option<LoadedSplit>,
    /// The frozen reference of DPO and KTO, built in `prepare` (or on first use).
    reference: Option<Llama>,
    pad_id: u32,
    batch_size: usize,
}

impl PreferenceObjective {
    fn uses_reference(&self) -> bool {
        self.method != Method::Orpo
    }

    fn split(&self, w: Which) -> &LoadedSplit {
        match w {
            Which::Train => &self.train,
            Which::Val => self.val.as_ref().expect("validation split"),
        }
    }

    fn reference_model(&mut self, model: &Llama) -> &Llama {
        self.reference.get_or_insert_with(|| without_adapter(model))
    }

    /// Reference log-prob sums of every row of a split, in batches.
    fn precompute(&mut self, model: &Llama, w: Which) -> Result<()> {
        let n = self.split(w).rows.len();
        let mut out = Vec::with_capacity(n);
        let (pad, bs) = (self.pad_id, self.batch_size);
        self.reference_model(model);
        let reference = self.reference.as_ref().expect("set");
        let split = match w {
            Which::Train => &self.train,
            Which::Val => self.val.as_ref().expect("validation split"),
        };
        for chunk in split.rows.chunks(bs) {
            let seqs: Vec<&Example> = (0..2)
                .flat_map(|s| chunk.iter().map(move |r| &r.seqs[s]))
                .collect();
            let (sums, _, _) = sequence_log_probs(reference, &seqs, pad, &mut None)?;
            let v = values(&sums)?;
            let b = chunk.len();
            out.extend((0..b).map(|i| [v[i], v[b + i]]));
        }
        match w {
            Which::Train => self.train.reference = Some(out),
            Which::Val => self.val.as_mut().expect("validation split").reference = Some(out),
        }
        Ok(())
    }

    /// The loss of `rows` of split `w`, as a share of an average over `total_rows` rows (and,
    /// for ORPO's NLL, `total_tokens` chosen tokens).
    fn batch_loss(
        &mut self,
        model: &Llama,
        w: Which,
        rows: &[usize],
        total_rows: usize,
        total_tokens: usize,
        rng: &mut DropoutRng,
    ) -> Result<MicroLoss> {
        let device = model.device.clone();
        let (pad, o) = (self.pad_id, self.opts.clone());
        let b = rows.len();
        if self.uses_reference() {
            self.reference_model(model);
        }
        let split = self.split(w);
        let get =
            |s: usize| -> Vec<&Example> { rows.iter().map(|&i| &split.rows[i].seqs[s]).collect() };
        let (first, second) = (get(0), get(1));
        let cached: Option<Vec<[f64; 2]>> = split
            .reference
            .as_ref()
            .map(|r| rows.iter().map(|&i| r[i]).collect());
        let desirable: Vec<f64> = rows
            .iter()
            .map(|&i| f64::from(u8::from(split.rows[i].desirable)))
            .collect();
        let weights: Vec<f64> = rows.iter().map(|&i| split.rows[i].weight).collect();
        let w = Tensor::from_vec(weights.clone(), b, &device)?;
        let mut t = Tally::new();
        let denom = total_rows.max(1) as f64;

        // Policy log-probs: both sequences with gradients (DPO, ORPO); KTO's KL pair without.
        let (policy, counts, tokens, policy_kl) = if self.method == Method::Kto {
            let (p, c, n) = sequence_log_probs(model, &first, pad, rng)?;
            let (kl, _, _) = sequence_log_probs(model, &second, pad, &mut None)?;
            (p, c, n, Some(kl.detach()))
        } else {
            let all: Vec<&Example> = first.iter().chain(&second).copied().collect();
            let (p, c, n) = sequence_log_probs(model, &all, pad, rng)?;
            (p, c, n, None)
        };
        // Reference log-probs of both sequences (DPO, KTO).
        let reference = if !self.uses_reference() {
            None
        } else if let Some(c) = cached {
            let flat: Vec<f64> = (0..2).flat_map(|s| c.iter().map(move |r| r[s])).collect();
            Some(Tensor::from_vec(flat, 2 * b, &device)?)
        } else {
            let all: Vec<&Example> = first.iter().chain(&second).copied().collect();
            let reference = self.reference.as_ref().expect("built above");
            Some(
                sequence_log_probs(reference, &all, pad, &mut None)?
                    .0
                    .detach(),
            )
        };

        let loss = match self.method {
            Method::Dpo => {
                let r = reference.expect("DPO has a reference");
                let c = counts_tensor(&counts, &device)?;
                let (pc, pr) = (policy.narrow(0, 0, b)?, policy.narrow(0, b, b)?);
                let (rc, rr) = (r.narrow(0, 0, b)?, r.narrow(0, b, b)?);
                let (losses, cr, rr_) = dpo_losses(
                    &pc,
                    &pr,
                    &rc,
                    &rr,
                    &c.narrow(0, 0, b)?,
                    &c.narrow(0, b, b)?,
                    o.beta,
                    o.loss_type,
                    o.label_smoothing,
                )?;
                let (cr, rr_) = (values(&cr)?, values(&rr_)?);
                let n = b as f64;
                tally(&mut t, "rewards/chosen", sum(&cr), n);
                tally(&mut t, "rewards/rejected", sum(&rr_), n);
                let acc = cr.iter().zip(&rr_).filter(|(c, r)| c > r).count();
                tally(&mut t, "rewards/accuracies", acc as f64, n);
                let margins: f64 = cr.iter().zip(&rr_).map(|(c, r)| c - r).sum();
                tally(&mut t, "rewards/margins", margins, n);
                tally(&mut t, "logps/chosen", sum(&values(&pc)?), n);
                tally(&mut t, "logps/rejected", sum(&values(&pr)?), n);
                ((losses * &w)?.sum_all()? / denom)?
            }
            Method::Orpo => {
                let c = counts_tensor(&counts, &device)?;
                let mean = policy.div(&c)?;
                let (pc, pr) = (mean.narrow(0, 0, b)?, mean.narrow(0, b, b)?);
                let (or_losses, ratio, log_odds) = orpo_odds_ratio(&pc, &pr, o.beta)?;
                // NLL on the chosen completions: minus their summed log-probs (weighted by row),
                // per chosen token of the whole accumulated batch.
                let chosen_sum = (policy.narrow(0, 0, b)? * &w)?.sum_all()?;
                let chosen_tokens: usize = counts[..b].iter().sum();
                let nll = (chosen_sum.neg()? / total_tokens.max(1) as f64)?;
                let (pcv, prv) = (values(&pc)?, values(&pr)?);
                let n = b as f64;
                let rc: Vec<f64> = pcv.iter().map(|x| o.beta * x).collect();
                let rr: Vec<f64> = prv.iter().map(|x| o.beta * x).collect();
                tally(&mut t, "rewards/chosen", sum(&rc), n);
                tally(&mut t, "rewards/rejected", sum(&rr), n);
                let acc = rc.iter().zip(&rr).filter(|(c, r)| c > r).count();
                tally(&mut t, "rewards/accuracies", acc as f64, n);
                tally(&mut t, "rewards/margins", sum(&rc) - sum(&rr), n);
                tally(&mut t, "logps/chosen", sum(&pcv), n);
                tally(&mut t, "logps/rejected", sum(&prv), n);
                let nll_sum = -chosen_sum.to_scalar::<f64>()?;
                tally(&mut t, "nll_loss", nll_sum, chosen_tokens as f64);
                tally(&mut t, "log_odds_ratio", sum(&values(&ratio)?), n);
                tally(&mut t, "log_odds_chosen", sum(&values(&log_odds)?), n);
                (nll + ((or_losses * &w)?.sum_all()? / denom)?)?
            }
            Method::Kto => {
                let reference = reference.expect("KTO has a reference");
                let (rp, rkl) = (reference.narrow(0, 0, b)?, reference.narrow(0, b, b)?);
                let kl = kto_kl_weighted(policy_kl.as_ref().expect("KTO"), &rkl, &weights)?;
                let d = Tensor::from_vec(desirable.clone(), b, &device)?;
                let (losses, rewards) = kto_losses(
                    &policy,
                    &rp,
                    &d,
                    kl,
                    o.beta,
                    o.desirable_weight,
                    o.undesirable_weight,
                )?;
                let (rw, lp) = (values(&rewards)?, values(&policy)?);
                let nd = desirable.iter().sum::<f64>();
                let pick = |v: &[f64], want: f64| -> f64 {
                    v.iter()
                        .zip(&desirable)
                        .filter(|(_, d)| **d == want)
                        .map(|(x, _)| x)
                        .sum()
                };
                tally(&mut t, "rewards/chosen", pick(&rw, 1.0), nd);
                tally(&mut t, "rewards/rejected", pick(&rw, 0.0), b as f64 - nd);
                tally(&mut t, "logps/chosen", pick(&lp, 1.0), nd);
                tally(&mut t, "logps/rejected", pick(&lp, 0.0), b as f64 - nd);
                tally(&mut t, "kl", kl, 1.0);
                tally(&mut t, "count/chosen", nd, 1.0);
                tally(&mut t, "count/rejected", b as f64 - nd, 1.0);
                ((losses * &w)?.sum_all()? / denom)?
            }
        };
        Ok(MicroLoss {
            loss: loss.to_dtype(DType::F32)?,
            tokens,
            tally: t,
        })
    }

    /// Chosen completion tokens of `rows` (ORPO's NLL normaliser).
    fn chosen_tokens(&self, w: Which, rows: &[usize]) -> usize {
        let split = self.split(w);
        rows.iter()
            .map(|&i| split.rows[i].seqs[0].trainable())
            .sum()
    }
}

impl Objective for PreferenceObjective {
    fn method(&self) -> &str {
        self.method.name()
    }
    fn rows(&self) -> usize {
        self.train.rows.len()
    }
    fn stats(&self) -> &DatasetStats {
        &self.train.stats
    }
    fn val_stats(&self) -> Option<&DatasetStats> {
        self.val.as_ref().map(|v| &v.stats)
    }
    fn prepare(&mut self, model: &Llama, init: bool) -> Result<()> {
        if self.uses_reference() {
            self.reference = Some(if init {
                crate::init::frozen_copy(model)?
            } else {
                without_adapter(model)
            });
        }
        if self.opts.precompute_ref_log_probs && self.uses_reference() {
            self.precompute(model, Which::Train)?;
        }
        Ok(())
    }
    fn micro_loss(
        &mut self,
        model: &Llama,
        step_rows: &[&[usize]],
        micro: usize,
        rng: &mut DropoutRng,
    ) -> Result<MicroLoss> {
        let all: Vec<usize> = step_rows.iter().flat_map(|r| r.iter().copied()).collect();
        let tokens = self.chosen_tokens(Which::Train, &all);
        self.batch_loss(
            model,
            Which::Train,
            step_rows[micro],
            all.len(),
            tokens,
            rng,
        )
    }
    fn val_loss(&mut self, model: &Llama, batch_size: usize) -> Result<f64> {
        // The reference never changes: its validation log-probs are computed once.
        if self.uses_reference() && self.split(Which::Val).reference.is_none() {
            self.precompute(model, Which::Val)?;
        }
        let n = self.split(Which::Val).rows.len();
        let all: Vec<usize> = (0..n).collect();
        let tokens = self.chosen_tokens(Which::Val, &all);
        let mut loss = 0f64;
        for chunk in all.chunks(batch_size) {
            let l = self.batch_loss(model, Which::Val, chunk, n, tokens, &mut None)?;
            loss += l.loss.to_scalar::<f32>()? as f64;
        }
        Ok(loss)
    }
    fn report(&self, t: &Tally) -> BTreeMap<String, f64> {
        let mut out: BTreeMap<String, f64> = t
            .iter()
            .filter(|(_, (_, n))| *n > 0.0)
            .map(|(k, (s, n))| (k.clone(), s / n))
            .collect();
        if self.method == Method::Kto {
            for k in ["count/chosen", "count/rejected"] {
                if let Some((s, _)) = t.get(k) {
                    out.insert(k.into(), *s);
                }
            }
            if let (Some(c), Some(r)) = (out.get("rewards/chosen"), out.get("rewards/rejected")) {
                out.insert("rewards/margins".into(), c - r);
            }
        }
        out
    }
}

/// The loss of `rows` as one batch (no dropout), with the metrics logged for it: the same
/// computation a training step does, for checks against reference implementations. The
/// reference model is the base without the adapter.
pub fn batch_loss(
    model: &Llama,
    method: Method,
    opts: &PreferenceOptions,
    rows: Vec<PreferenceRow>,
    pad_id: u32,
) -> Result<(Tensor, BTreeMap<String, f64>)> {
    batch_loss_against(model, None, method, opts, rows, pad_id)
}

/// [`batch_loss`] against a given reference model (`None`: the base without the adapter), such
/// as [`crate::init::frozen_copy`] of the adapter training continues from.
pub fn batch_loss_against(
    model: &Llama,
    reference: Option<Llama>,
    method: Method,
    opts: &PreferenceOptions,
    rows: Vec<PreferenceRow>,
    pad_id: u32,
) -> Result<(Tensor, BTreeMap<String, f64>)> {
    let n = rows.len();
    let mut obj = PreferenceObjective {
        method,
        opts: opts.clone(),
        train: LoadedSplit {
            rows,
            stats: DatasetStats::default(),
            reference: None,
        },
        val: None,
        reference,
        pad_id,
        batch_size: n.max(1),
    };
    let all: Vec<usize> = (0..n).collect();
    let tokens = obj.chosen_tokens(Which::Train, &all);
    let out = obj.batch_loss(model, Which::Train, &all, n, tokens, &mut None)?;
    Ok((out.loss, obj.report(&out.tally)))
}

/// Load a split for `method`.
pub fn load_split(
    method: Method,
    path: &Path,
    tok: &Tokenizer,
    max_len: usize,
    training: bool,
) -> Result<(Vec<PreferenceRow>, DatasetStats)> {
    match method {
        Method::Kto => load_kto(path, tok, max_len, training),
        Method::Dpo | Method::Orpo => load_pairs(path, tok, max_len),
    }
}

/// `loraops train dpo|orpo|kto`: load the data, then run the shared training loop with the
/// method's loss. Writes the PEFT adapter, `metrics.jsonl` (with TRL's metric names) and the
/// manifest to `cfg.train.out`.
pub fn train_preference(
    cfg: &PreferenceConfig,
    device: &Device,
    on_event: &mut (dyn FnMut(Event) + Send),
) -> Result<SftOutcome> {
    cfg.validate()?;
    let t = &cfg.train;
    let tok = Tokenizer::load(&t.model)?;
    let (rows, stats) = load_split(cfg.method, &t.data, &tok, t.max_len, true)?;
    let val = match &t.val_data {
        Some(p) => {
            let (rows, stats) = load_split(cfg.method, p, &tok, t.max_len, false)?;
            Some(LoadedSplit {
                rows,
                stats,
                reference: None,
            })
        }
        None => None,
    };
    let mut objective = PreferenceObjective {
        method: cfg.method,
        opts: cfg.options.clone(),
        train: LoadedSplit {
            rows,
            stats,
            reference: None,
        },
        val,
        reference: None,
        pad_id: tok.pad_id,
        batch_size: t.batch_size,
    };
    run_training(t, cfg.to_value(), device, &mut objective, on_event)
}

/// Read `[train.<method>]` (else `[<method>]`, else the top level) of a TOML file.
pub fn read_config(path: &Path, method: Method) -> Result<PreferenceConfig> {
    let table = crate::sft::read_config_table(path, method.name())?;
    PreferenceConfig::from_table(method, table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_sigmoid_has_the_gradient_of_sigma_everywhere_and_at_zero() {
        let x = candle_core::Var::new(&[-800.0f64, -3.0, 0.0, 2.0, 800.0], &Device::Cpu).unwrap();
        let y = log_sigmoid(x.as_tensor()).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        let g: Vec<f64> = g.get(x.as_tensor()).unwrap().to_vec1().unwrap();
        let want = |x: f64| 1.0 / (1.0 + x.exp()); // σ(−x)
        for (i, &xv) in [-800.0, -3.0, 0.0, 2.0, 800.0].iter().enumerate() {
            assert!(
                (g[i] - want(xv)).abs() < 1e-12,
                "at {xv}: {} vs {}",
                g[i],
                want(xv)
            );
        }
        let v: Vec<f64> = y.to_vec1().unwrap();
        assert_eq!(v[0], -800.0);
        assert_eq!(v[2], -std::f64::consts::LN_2);
        assert!(v[4].abs() < 1e-300);
    }

    #[test]
    fn config_splits_preference_keys_from_training_keys() {
        let t = serde_json::json!({"beta": 0.2, "loss_type": "ipo", "steps": 3, "r": 8,
            "label_smoothing": 0.0, "precompute_ref_log_probs": true});
        let cfg =
            PreferenceConfig::from_table(Method::Dpo, t.as_object().unwrap().clone()).unwrap();
        assert_eq!(cfg.options.beta, 0.2);
        assert_eq!(cfg.options.loss_type, DpoLoss::Ipo);
        assert_eq!((cfg.train.steps, cfg.train.r), (3, 8));
        let v = cfg.to_value();
        assert_eq!(v["beta"], 0.2);
        assert_eq!(v["steps"], 3);
        let bad = serde_json::json!({"betta": 0.2});
        assert!(
            PreferenceConfig::from_table(Method::Dpo, bad.as_object().unwrap().clone()).is_err()
        );
    }

    #[test]
    fn validation_rejects_options_of_other_methods() {
        let base = |m: Method, o: serde_json::Value| {
            let mut t = serde_json::json!({"model": "m", "data": "d", "out": "o"});
            t.as_object_mut()
                .unwrap()
                .extend(o.as_object().unwrap().clone());
            PreferenceConfig::from_table(m, t.as_object().unwrap().clone()).unwrap()
        };
        assert!(
            base(Method::Dpo, serde_json::json!({"label_smoothing": 0.1}))
                .validate()
                .is_ok()
        );
        assert!(
            base(Method::Orpo, serde_json::json!({"label_smoothing": 0.1}))
                .validate()
                .is_err()
        );
        assert!(
            base(Method::Kto, serde_json::json!({"loss_type": "ipo"}))
                .validate()
                .is_err()
        );
        assert!(
            base(
                Method::Orpo,
                serde_json::json!({"precompute_ref_log_probs": true})
            )
            .validate()
            .is_err()
        );
        assert!(
            base(Method::Kto, serde_json::json!({"batch_size": 1}))
                .validate()
                .is_err()
        );
        assert!(
            base(Method::Dpo, serde_json::json!({"beta": 0.0}))
                .validate()
                .is_err()
        );
    }
}
