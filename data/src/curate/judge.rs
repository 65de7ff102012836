//! The curation judge ([`RowJudge`], optional): each kept row is scored against a rubric by
//! a model served behind an OpenAI-compatible chat endpoint (the loraops gateway, or any
//! other), and rows scoring under the threshold are rejected with the judge's score and
//! reason. `loraops data synth` judges its candidates with it too.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::chat::{ChatClient, ChatError, ChatSettings, resolve_token};

/// `[curate.judge]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JudgeConfig {
    /// Off unless set.
    pub enabled: bool,
    /// Base URL of the OpenAI-compatible API (`…/v1`); `/chat/completions` is appended.
    pub url: String,
    /// `model` of the requests (a base model, `ADAPTER` or `ADAPTER@V` on the gateway).
    pub model: String,
    /// What a good row looks like; the judge scores each row from 1 to 10 against it.
    pub rubric: String,
    /// Rows scoring below this are rejected.
    pub threshold: f64,
    /// Rows scoring at least `threshold` but below this are kept, down-weighted: their
    /// `weight` (default 1) is multiplied by `weight`. Unset: no row is down-weighted.
    pub weight_below: Option<f64>,
    /// The factor for the rows under `weight_below` (0 keeps them out of the gradient).
    pub weight: f64,
    /// Environment variable holding a bearer token (e.g. LORAOPS_TOKEN), if any.
    pub api_key_env: Option<String>,
    /// A bearer token given on the command line (never read from or written to a file).
    #[serde(skip)]
    pub api_key: Option<String>,
    /// Requests in flight at once.
    pub concurrency: usize,
    pub timeout_s: u64,
    /// Retries per row on transport errors, 429 and 5xx answers.
    pub retries: usize,
    /// Longer rows are cut to this many characters in the prompt.
    pub max_chars: usize,
}

impl Default for JudgeConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            url: "http://127.0.0.1:8080/v1".into(),
            model: String::new(),
            rubric: "The response is correct, helpful, safe and follows the instruction.".into(),
            threshold: 6.0,
            weight_below: None,
            weight: 0.5,
            api_key_env: None,
            api_key: None,
            concurrency: 8,
            timeout_s: 60,
            retries: 2,
            max_chars: 6000,
        }
    }
}

/// The curation judge's score of one row, and its reason.
#[derive(Debug, Clone, PartialEq)]
pub struct RowScore {
    pub score: f64,
    pub reason: String,
}

/// Why a row got no verdict.
#[derive(Debug, thiserror::Error)]
pub enum JudgeError {
    #[error("judge {0}")]
    Chat(#[from] ChatError),
    #[error("judge {url}: no score in answer {answer:?}")]
    NoScore { url: String, answer: String },
}

impl JudgeError {
    /// As this crate's error, naming the endpoint.
    pub fn into_error(self) -> crate::Error {
        match self {
            JudgeError::Chat(e) => e.into_error(),
            JudgeError::NoScore { url, answer } => crate::Error::Endpoint {
                url,
                status: None,
                detail: format!("judge: no score in answer {answer:?}"),
            },
        }
    }
}

/// The curation judge: a client of its endpoint, scoring rows concurrently.
pub struct RowJudge {
    cfg: JudgeConfig,
    chat: ChatClient,
    pool: rayon::ThreadPool,
}

const SYSTEM: &str = "You grade training examples for fine-tuning a language model. Score the example from 1 (unusable) to 10 (excellent) against the rubric. Answer with JSON only: {\"score\": <1-10>, \"reason\": \"<one sentence>\"}.";

impl RowJudge {
    pub fn new(cfg: &JudgeConfig) -> Result<Self, String> {
        if cfg.model.is_empty() {
            return Err("judge: `model` is required".into());
        }
        let token = resolve_token(cfg.api_key.as_deref(), cfg.api_key_env.as_deref(), "judge")
            .map_err(|e| e.to_string())?;
        let chat = ChatClient::new(&ChatSettings {
            url: cfg.url.clone(),
            token,
            timeout_s: cfg.timeout_s,
            retries: cfg.retries,
        })
        .map_err(|e| format!("judge: {e}"))?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.concurrency.max(1))
            .thread_name(|i| format!("curate-judge-{i}"))
            .build()
            .map_err(|e| format!("judge: {e}"))?;
        Ok(Self {
            cfg: cfg.clone(),
            chat,
            pool,
        })
    }

    /// Score many rows' texts concurrently; the result is in input order. The first error
    /// ends the batch (see [`RowJudge::score_each`]).
    pub fn score_all(&self, texts: &[&str]) -> Result<Vec<RowScore>, JudgeError> {
        self.score_each(texts)?.into_iter().collect()
    }

    /// Score many rows' texts concurrently, in input order: per row, its score or the judge's
    /// answer that held none ([`JudgeError::NoScore`]). An endpoint that fails (unreachable,
    /// or an error status after the retries) fails the batch, and no row is sent after that:
    /// a judge that is down costs one row's retries, not every row's.
    pub fn score_each(
        &self,
        texts: &[&str],
    ) -> Result<Vec<Result<RowScore, JudgeError>>, JudgeError> {
        use rayon::prelude::*;
        self.pool.install(|| {
            texts
                .par_iter()
                .map(|t| match self.score(t) {
                    Err(e @ JudgeError::Chat(_)) => Err(e),
                    verdict => Ok(verdict),
                })
                .collect()
        })
    }

    /// Score one row's text.
    pub fn score(&self, text: &str) -> Result<RowScore, JudgeError> {
        let text: String = text.chars().take(self.cfg.max_chars).collect();
        let body = json!({
            "model": self.cfg.model,
            "temperature": 0,
            "max_tokens": 200,
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": format!("Rubric: {}\n\nExample:\n{}", self.cfg.rubric, text)},
            ],
        });
        let content = self.chat.complete(&body)?;
        parse_score(&content).ok_or_else(|| JudgeError::NoScore {
            url: self.chat.url().to_string(),
            answer: content.chars().take(200).collect(),
        })
    }

    /// The endpoint, for error messages.
    pub fn url(&self) -> &str {
        self.chat.url()
    }

    pub fn threshold(&self) -> f64 {
        self.cfg.threshold
    }

    /// The weight factor for a row scoring `score` that was not rejected (1: unchanged).
    pub fn weight_for(&self, score: f64) -> f64 {
        match self.cfg.weight_below {
            Some(t) if score < t => self.cfg.weight,
            _ => 1.0,
        }
    }
}

/// The score and reason from a judge answer: JSON `{"score", "reason"}` (possibly inside
/// other text or a code fence), else the first number in the answer.
pub fn parse_score(content: &str) -> Option<RowScore> {
    if let (Some(a), Some(b)) = (content.find('{'), content.rfind('}'))
        && a < b
        && let Ok(v) = serde_json::from_str::<Value>(&content[a..=b])
        && let Some(score) = v.get("score").and_then(|s| {
            s.as_f64()
                .or_else(|| s.as_str().and_then(|x| x.trim().parse().ok()))
        })
    {
        let reason = v
            .get("reason")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        return Some(RowScore { score, reason });
    }
    let num: String = content
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    num.parse().ok().map(|score| RowScore {
        score,
        reason: content.trim().chars().take(200).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_are_parsed_from_json_or_text() {
        assert_eq!(
            parse_score("```json\n{\"score\": 8, \"reason\": \"clear\"}\n```"),
            Some(RowScore {
                score: 8.0,
                reason: "clear".into()
            })
        );
        assert_eq!(parse_score("{\"score\": \"3\"}").unwrap().score, 3.0);
        assert_eq!(parse_score("Score: 7/10").unwrap().score, 7.0);
        assert_eq!(parse_score("no idea"), None);
    }
}
