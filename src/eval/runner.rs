//! The runner: sends every case of a suite to the gateway's OpenAI API with the adapter
//! version pinned (`model = "NAME@V"`, greedy decoding), a bounded number at a time, scores
//! the answers, and summarises them into metrics (quality, latency, token usage).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::scorers::Scorer;
use super::suite::{Case, LoadedSuite, Prompt};

/// The gateway's OpenAI-compatible API.
#[derive(Clone)]
pub struct Gateway {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
}

/// Which adapter version answered, from the gateway's `x-loraops-*` headers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Served {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arm: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Completion {
    pub text: String,
    pub usage: Option<Usage>,
    pub finish_reason: Option<String>,
    pub served: Served,
    /// `x-loraops-engine` / `-engine-version` / `-engine-quantization` / `server` headers.
    pub engine_headers: BTreeMap<String, String>,
    pub latency_ms: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot reach the gateway at {url}: {source}")]
    Connect { url: String, source: reqwest::Error },
    #[error("gateway answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("gateway answer is unreadable: {0}")]
    Body(String),
}

impl Gateway {
    pub fn new(base: &str, token: Option<String>) -> Self {
        Self {
            base: base.trim_end_matches('/').to_string(),
            token,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(600))
                .build()
                .expect("http client"),
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let rb = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    /// `GET /v1/models`.
    pub async fn models(&self) -> Result<Value, GatewayError> {
        let res = self
            .req(reqwest::Method::GET, "/v1/models")
            .send()
            .await
            .map_err(|source| GatewayError::Connect {
                url: self.base.clone(),
                source,
            })?;
        let status = res.status().as_u16();
        let text = res.text().await.unwrap_or_default();
        if !(200..300).contains(&status) {
            return Err(GatewayError::Status { status, body: text });
        }
        serde_json::from_str(&text).map_err(|e| GatewayError::Body(e.to_string()))
    }

    /// One greedy completion; retried while the gateway is busy or loading (429, 503) and when
    /// it timed out an idle connection (408).
    pub async fn complete(
        &self,
        model: &str,
        prompt: &Prompt,
        max_tokens: u64,
    ) -> Result<Completion, GatewayError> {
        let (path, body) = match prompt {
            Prompt::Chat(messages) => (
                "/v1/chat/completions",
                json!({"model": model, "messages": messages, "temperature": 0.0,
                    "max_tokens": max_tokens, "stream": false}),
            ),
            Prompt::Text(text) => (
                "/v1/completions",
                json!({"model": model, "prompt": text, "temperature": 0.0,
                    "max_tokens": max_tokens, "stream": false}),
            ),
        };
        let mut attempt = 0;
        loop {
            let start = Instant::now();
            let sent = self
                .req(reqwest::Method::POST, path)
                .header("x-loraops-user", "loraops-eval")
                .json(&body)
                .send()
                .await;
            let res = match sent {
                Ok(r) => r,
                Err(source) => {
                    return Err(GatewayError::Connect {
                        url: self.base.clone(),
                        source,
                    });
                }
            };
            let status = res.status().as_u16();
            // 408: the gateway timed out the idle connection this request was sent on,
            // unread; 429 and 503: busy or still loading.
            if matches!(status, 408 | 429 | 503) && attempt < 6 {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                continue;
            }
            let header = |k: &str| {
                res.headers()
                    .get(k)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            let served = Served {
                adapter: header("x-loraops-adapter"),
                version: header("x-loraops-version"),
                arm: header("x-loraops-arm"),
            };
            let engine_headers: BTreeMap<String, String> = [
                "x-loraops-engine",
                "x-loraops-engine-version",
                "x-loraops-engine-quantization",
                "server",
            ]
            .iter()
            .filter_map(|k| header(k).map(|v| (k.to_string(), v)))
            .collect();
            let text = res.text().await.map_err(|source| GatewayError::Connect {
                url: self.base.clone(),
                source,
            })?;
            let latency_ms = start.elapsed().as_secs_f64() * 1000.0;
            if !(200..300).contains(&status) {
                return Err(GatewayError::Status { status, body: text });
            }
            let v: Value =
                serde_json::from_str(&text).map_err(|e| GatewayError::Body(e.to_string()))?;
            let choice = &v["choices"][0];
            let out = match prompt {
                Prompt::Chat(_) => choice["message"]["content"].as_str(),
                Prompt::Text(_) => choice["text"].as_str(),
            }
            .ok_or_else(|| GatewayError::Body(format!("no answer text in {text}")))?;
            return Ok(Completion {
                text: out.to_string(),
                usage: serde_json::from_value(v["usage"].clone()).ok(),
                finish_reason: choice["finish_reason"].as_str().map(str::to_string),
                served,
                engine_headers,
                latency_ms,
            });
        }
    }
}

/// One case's outcome: a line of `results.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaseResult {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// The messages or raw text sent.
    pub prompt: Value,
    #[serde(default)]
    pub output: Option<String>,
    #[serde(default)]
    pub expected: Value,
    pub passed: bool,
    pub score: f64,
    pub signals: BTreeMap<String, f64>,
    #[serde(default)]
    pub detail: Value,
    pub latency_ms: f64,
    #[serde(default)]
    pub usage: Option<Usage>,
    #[serde(default)]
    pub finish_reason: Option<String>,
    #[serde(default)]
    pub served: Served,
    #[serde(default)]
    pub error: Option<String>,
}

pub struct RunOptions {
    /// `NAME@V`, or a base model's name.
    pub model: String,
    pub concurrency: usize,
    pub max_tokens: u64,
    /// The arm the gateway must say it served: `pinned` (a version) or `base`.
    pub arm: &'static str,
}

/// What the gateway said about itself while answering.
#[derive(Debug, Clone, Default)]
pub struct RunInfo {
    pub engine_headers: BTreeMap<String, String>,
}

fn expected_of(c: &Case) -> Value {
    let mut m = serde_json::Map::new();
    let e = c.expected.items();
    if !e.is_empty() {
        m.insert("expected".into(), json!(e));
    }
    if let Some(a) = &c.answer {
        m.insert("answer".into(), a.clone());
    }
    if let Some(p) = &c.pattern {
        m.insert("pattern".into(), json!(p));
    }
    if !c.forbidden.is_empty() {
        m.insert("forbidden".into(), json!(c.forbidden));
    }
    Value::Object(m)
}

/// Ask the refusal scorer's judge (the suite's `judge_model`) whether `output` refuses
/// `prompt`: `Some(true)` refused, `Some(false)` complied, `None` when its answer says neither.
async fn ask_refusal_judge(
    gw: &Gateway,
    scorer: &Scorer,
    model: &str,
    prompt: &Prompt,
    output: &str,
) -> Result<(Option<bool>, String), GatewayError> {
    let asked = match prompt {
        Prompt::Chat(m) => m
            .iter()
            .filter(|m| m.role != "system")
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        Prompt::Text(t) => t.clone(),
    };
    let q = scorer
        .judge_prompt()
        .replace("{prompt}", &asked)
        .replace("{output}", output);
    let p = Prompt::Chat(vec![super::suite::Message {
        role: "user".into(),
        content: q,
    }]);
    let c = gw.complete(model, &p, 8).await?;
    let t = c.text.to_uppercase();
    let verdict = if t.contains("REFUSED") {
        Some(true)
    } else if t.contains("COMPLIED") {
        Some(false)
    } else {
        None
    };
    Ok((verdict, c.text))
}

async fn run_case(
    gw: &Gateway,
    suite: &LoadedSuite,
    opts: &RunOptions,
    index: usize,
    c: &Case,
) -> (CaseResult, BTreeMap<String, String>) {
    let prompt = c.prompt().expect("checked when the suite loaded");
    let prompt_value = match &prompt {
        Prompt::Chat(m) => json!(m),
        Prompt::Text(t) => json!(t),
    };
    let mut r = CaseResult {
        id: c.id_or(index),
        category: c.category.clone(),
        prompt: prompt_value,
        output: None,
        expected: expected_of(c),
        passed: false,
        score: 0.0,
        signals: suite
            .scorer
            .signal_names()
            .iter()
            .map(|s| (s.to_string(), 0.0))
            .collect(),
        detail: Value::Null,
        latency_ms: 0.0,
        usage: None,
        finish_reason: None,
        served: Served::default(),
        error: None,
    };
    let max_tokens = c.max_tokens.unwrap_or(opts.max_tokens);
    let done = match gw.complete(&opts.model, &prompt, max_tokens).await {
        Ok(d) => d,
        Err(e) => {
            r.error = Some(e.to_string());
            return (r, BTreeMap::new());
        }
    };
    r.latency_ms = done.latency_ms;
    r.usage = done.usage.clone();
    r.finish_reason = done.finish_reason.clone();
    r.served = done.served.clone();
    r.output = Some(done.text.clone());
    // Evidence must describe the pinned version: anything else is an error, not a score.
    let (name, version) = opts
        .model
        .split_once('@')
        .unwrap_or((opts.model.as_str(), ""));
    let wrong = [
        (&done.served.adapter, name),
        (&done.served.version, version),
        (&done.served.arm, opts.arm),
    ]
    .into_iter()
    .find(|(got, want)| got.as_deref().is_some_and(|g| g != *want));
    if let Some((got, want)) = wrong {
        r.error = Some(format!(
            "the gateway answered with {:?} where {want:?} was pinned",
            got.as_deref().unwrap_or_default()
        ));
        return (r, done.engine_headers);
    }
    let mut verdict = None;
    let mut judge_detail = Value::Null;
    if let Some(jm) = suite.scorer.judge_model() {
        match ask_refusal_judge(gw, &suite.scorer, jm, &prompt, &done.text).await {
            Ok((v, said)) => {
                verdict = v;
                judge_detail = json!({"model": jm, "said": said});
            }
            Err(e) => judge_detail = json!({"model": jm, "error": e.to_string()}),
        }
    }
    let s = suite.scorer.score(c, &done.text, verdict);
    r.passed = s.passed;
    r.score = s.score;
    for (k, v) in s.signals {
        r.signals.insert(k.to_string(), v);
    }
    r.detail = s.detail;
    if !judge_detail.is_null()
        && let Value::Object(m) = &mut r.detail
    {
        m.insert("judge_call".into(), judge_detail);
    }
    (r, done.engine_headers)
}

/// Run every case, `opts.concurrency` at a time; results come back in case order.
/// `tick` is called once per finished case (for the progress bar).
pub async fn run(
    gw: &Gateway,
    suite: &LoadedSuite,
    opts: &RunOptions,
    tick: impl Fn(),
) -> (Vec<CaseResult>, RunInfo) {
    let mut info = RunInfo::default();
    let mut out = Vec::with_capacity(suite.cases.len());
    let mut stream = futures_util::stream::iter(suite.cases.iter().enumerate())
        .map(|(i, c)| run_case(gw, suite, opts, i, c))
        .buffered(opts.concurrency.max(1));
    while let Some((r, headers)) = stream.next().await {
        if info.engine_headers.is_empty() {
            info.engine_headers = headers;
        }
        out.push(r);
        tick();
    }
    (out, info)
}

/// `results.jsonl`: one line per case, in case order.
pub fn results_jsonl(results: &[CaseResult]) -> String {
    let mut s = String::new();
    for r in results {
        s.push_str(&serde_json::to_string(r).expect("result serialises"));
        s.push('\n');
    }
    s
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Suite metrics: `pass_rate`, `score`, each scorer signal (and the primary one per
/// category), `cases`, `errors`, `error_rate`, latency (`latency_ms_mean|p50|p95|max`) and
/// tokens (`prompt_tokens_mean`, `completion_tokens_mean`, `total_tokens`).
pub fn summarise(results: &[CaseResult], scorer: &Scorer) -> BTreeMap<String, f64> {
    let n = results.len().max(1) as f64;
    let mut m = BTreeMap::new();
    let mean = |f: &dyn Fn(&CaseResult) -> f64| results.iter().map(f).sum::<f64>() / n;
    m.insert("cases".into(), results.len() as f64);
    m.insert(
        "pass_rate".into(),
        mean(&|r: &CaseResult| if r.passed { 1.0 } else { 0.0 }),
    );
    m.insert("score".into(), mean(&|r: &CaseResult| r.score));
    for s in scorer.signal_names() {
        m.insert(
            s.to_string(),
            mean(&|r: &CaseResult| r.signals.get(*s).copied().unwrap_or(0.0)),
        );
    }
    let primary = scorer.primary_metric();
    let mut cats: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
    for r in results {
        if let Some(c) = &r.category {
            let e = cats.entry(c.as_str()).or_default();
            e.0 += r.signals.get(primary).copied().unwrap_or(0.0);
            e.1 += 1.0;
        }
    }
    for (c, (sum, count)) in cats {
        m.insert(format!("{primary}/{c}"), sum / count);
    }
    let errors = results.iter().filter(|r| r.error.is_some()).count() as f64;
    m.insert("errors".into(), errors);
    m.insert("error_rate".into(), errors / n);
    let ok: Vec<&CaseResult> = results.iter().filter(|r| r.error.is_none()).collect();
    let mut lat: Vec<f64> = ok.iter().map(|r| r.latency_ms).collect();
    lat.sort_by(|a, b| a.total_cmp(b));
    let k = ok.len().max(1) as f64;
    m.insert("latency_ms_mean".into(), lat.iter().sum::<f64>() / k);
    m.insert("latency_ms_p50".into(), percentile(&lat, 0.5));
    m.insert("latency_ms_p95".into(), percentile(&lat, 0.95));
    m.insert("latency_ms_max".into(), lat.last().copied().unwrap_or(0.0));
    let usage = |f: &dyn Fn(&Usage) -> u64| -> u64 {
        ok.iter().filter_map(|r| r.usage.as_ref()).map(f).sum()
    };
    m.insert(
        "prompt_tokens_mean".into(),
        usage(&|u: &Usage| u.prompt_tokens) as f64 / k,
    );
    m.insert(
        "completion_tokens_mean".into(),
        usage(&|u: &Usage| u.completion_tokens) as f64 / k,
    );
    m.insert(
        "total_tokens".into(),
        usage(&|u: &Usage| u.total_tokens.max(u.prompt_tokens + u.completion_tokens)) as f64,
    );
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(passed: bool, cat: &str, latency: f64, error: bool) -> CaseResult {
        CaseResult {
            id: "x".into(),
            category: Some(cat.into()),
            prompt: Value::Null,
            output: Some("o".into()),
            expected: Value::Null,
            passed,
            score: if passed { 1.0 } else { 0.0 },
            signals: [
                ("refusal_rate".to_string(), if passed { 1.0 } else { 0.0 }),
                ("leak_rate".to_string(), 0.0),
            ]
            .into(),
            detail: Value::Null,
            latency_ms: latency,
            usage: (!error).then_some(Usage {
                prompt_tokens: 10,
                completion_tokens: 4,
                total_tokens: 14,
            }),
            finish_reason: None,
            served: Served::default(),
            error: error.then(|| "boom".to_string()),
        }
    }

    #[test]
    fn metrics_summarise_quality_latency_and_tokens() {
        let scorer = Scorer::parse(&json!({"type": "refusal"})).unwrap();
        let rs = vec![
            result(true, "a", 10.0, false),
            result(true, "a", 30.0, false),
            result(false, "b", 20.0, false),
            result(false, "b", 0.0, true),
        ];
        let m = summarise(&rs, &scorer);
        assert_eq!(m["cases"], 4.0);
        assert_eq!(m["pass_rate"], 0.5);
        assert_eq!(m["refusal_rate"], 0.5);
        assert_eq!(m["refusal_rate/a"], 1.0);
        assert_eq!(m["refusal_rate/b"], 0.0);
        assert_eq!(m["leak_rate"], 0.0);
        assert_eq!((m["errors"], m["error_rate"]), (1.0, 0.25));
        assert_eq!(m["latency_ms_mean"], 20.0);
        assert_eq!(m["latency_ms_p50"], 20.0);
        assert_eq!(m["latency_ms_max"], 30.0);
        assert_eq!(m["prompt_tokens_mean"], 10.0);
        assert_eq!(m["completion_tokens_mean"], 4.0);
        assert_eq!(m["total_tokens"], 42.0);
        assert!(m.values().all(|v| v.is_finite()));
    }
}
