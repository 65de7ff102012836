//! Perplexity of an adapter version on held-out SFT rows (a `perplexity` suite, usually built
//! from the `holdout` split of `loraops data curate`).
//!
//! The gateway's OpenAI API returns no prompt log-probabilities, so these cases run through the
//! trainer's own forward pass, the model code that trained the adapter: base + adapter, f32,
//! teacher-forced, counting only completion tokens exactly as SFT's loss does.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use loraops_model::llama::{Llama, LoadOptions};
use loraops_model::tokenizer::Tokenizer;
use loraops_trainer::data::tokenize_row;
use loraops_trainer::sft::eval_loss;
use serde_json::{Value, json};

use super::runner::CaseResult;
use super::suite::Case;

/// A model that computes the loss of perplexity cases: a base with an adapter applied, and
/// its tokenizer.
pub struct PerplexityRunner {
    model: Llama,
    tok: Tokenizer,
    max_seq_len: usize,
}

impl PerplexityRunner {
    /// Load `base_dir` with the adapter in `adapter_dir` applied.
    pub fn load(base_dir: &Path, adapter_dir: &Path, max_seq_len: usize) -> anyhow::Result<Self> {
        let opts = LoadOptions {
            device: loraops_model::default_device(),
            ..LoadOptions::default()
        };
        let mut model = Llama::load(base_dir, &opts)
            .with_context(|| format!("loading the base model from {}", base_dir.display()))?;
        loraops_model::adapter::load_adapter(adapter_dir, &mut model)
            .with_context(|| format!("applying the adapter in {}", adapter_dir.display()))?;
        let tok = Tokenizer::load(base_dir)?;
        Ok(Self {
            model,
            tok,
            max_seq_len,
        })
    }

    /// One case: the summed negative log-likelihood of its completion tokens. A row that
    /// cannot be read, or has no completion token left after truncation, is an error result.
    pub fn score(&self, index: usize, c: &Case) -> CaseResult {
        let start = Instant::now();
        let row = c.row.clone().unwrap_or(Value::Null);
        let mut result = CaseResult {
            id: c.id_or(index),
            category: c.category.clone(),
            prompt: row.clone(),
            output: None,
            expected: Value::Null,
            passed: false,
            score: 0.0,
            signals: BTreeMap::new(),
            detail: Value::Null,
            latency_ms: 0.0,
            usage: None,
            finish_reason: None,
            served: Default::default(),
            error: None,
        };
        match self.nll(row) {
            Ok((nll_sum, tokens, truncated)) => {
                let mean = nll_sum / tokens as f64;
                result.passed = true;
                result.score = (-mean).exp();
                result.signals = BTreeMap::from([
                    ("nll_sum".to_string(), nll_sum),
                    ("tokens".to_string(), tokens as f64),
                ]);
                result.detail =
                    json!({"mean_nll": mean, "perplexity": mean.exp(), "truncated": truncated});
            }
            Err(e) => result.error = Some(format!("{e:#}")),
        }
        result.latency_ms = start.elapsed().as_secs_f64() * 1000.0;
        result
    }

    fn nll(&self, mut row: Value) -> anyhow::Result<(f64, usize, bool)> {
        // Every held-out token counts once, whatever training weight the row carried.
        if let Some(o) = row.as_object_mut() {
            o.remove("weight");
        }
        let (ex, truncated) =
            tokenize_row(&row, &self.tok, self.max_seq_len).map_err(anyhow::Error::msg)?;
        let tokens = ex.trainable();
        anyhow::ensure!(
            tokens > 0,
            "no completion token within the first {} tokens",
            self.max_seq_len
        );
        let mean = eval_loss(
            &self.model,
            std::slice::from_ref(&ex),
            1,
            self.tok.pad_id,
            0.0,
        )?;
        Ok((mean * tokens as f64, tokens, truncated))
    }
}

/// The suite's metrics: `perplexity` = exp(Σ NLL / Σ tokens) over every scored completion
/// token (so long rows weigh by their length, as in the training loss), `mean_nll`, `tokens`,
/// and the same bookkeeping metrics as generated-text suites.
pub fn summarise(results: &[CaseResult]) -> BTreeMap<String, f64> {
    let n = results.len().max(1) as f64;
    let ok: Vec<&CaseResult> = results.iter().filter(|r| r.error.is_none()).collect();
    let sum = |k: &str| -> f64 { ok.iter().filter_map(|r| r.signals.get(k)).sum() };
    let (nll, tokens) = (sum("nll_sum"), sum("tokens"));
    let errors = (results.len() - ok.len()) as f64;
    let mean_nll = if tokens > 0.0 { nll / tokens } else { f64::NAN };
    let mut m = BTreeMap::from([
        ("cases".to_string(), results.len() as f64),
        ("errors".to_string(), errors),
        ("error_rate".to_string(), errors / n),
        ("pass_rate".to_string(), ok.len() as f64 / n),
        ("tokens".to_string(), tokens),
        ("mean_nll".to_string(), mean_nll),
        ("perplexity".to_string(), mean_nll.exp()),
        (
            "latency_ms_mean".to_string(),
            ok.iter().map(|r| r.latency_ms).sum::<f64>() / ok.len().max(1) as f64,
        ),
    ]);
    m.insert("score".into(), (-mean_nll).exp());
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scored(nll_sum: f64, tokens: f64) -> CaseResult {
        CaseResult {
            id: "x".into(),
            category: None,
            prompt: Value::Null,
            output: None,
            expected: Value::Null,
            passed: true,
            score: 0.0,
            signals: BTreeMap::from([
                ("nll_sum".to_string(), nll_sum),
                ("tokens".to_string(), tokens),
            ]),
            detail: Value::Null,
            latency_ms: 1.0,
            usage: None,
            finish_reason: None,
            served: Default::default(),
            error: None,
        }
    }

    #[test]
    fn perplexity_weighs_cases_by_their_tokens() {
        let mut failed = scored(0.0, 0.0);
        failed.error = Some("no completion token".into());
        let m = summarise(&[scored(10.0, 10.0), scored(30.0, 10.0), failed]);
        assert_eq!(m["tokens"], 20.0);
        assert!((m["mean_nll"] - 2.0).abs() < 1e-12);
        assert!((m["perplexity"] - 2f64.exp()).abs() < 1e-9);
        assert_eq!(m["errors"], 1.0);
        assert!((m["pass_rate"] - 2.0 / 3.0).abs() < 1e-12);
    }
}
