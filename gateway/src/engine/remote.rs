//! The remote backend: an OpenAI-compatible upstream (a vLLM fleet, another loraops gateway)
//! for deployments that outgrow one machine. Each routed version is placed on the upstream
//! through the LoRA control contract vLLM, mistral.rs and loraops share
//! (`POST /v1/load_lora_adapter` with `lora_name` = `NAME@V`, and `lora_path` when the upstream
//! reads adapter files from a path or URL of its own, `--upstream-lora-path`); requests then
//! name the version as their `model`. Every call carries the API key, has connect and read
//! timeouts, and is retried only where the upstream has not read it: a connection that could
//! not be made, or a 408 on a kept-alive connection the upstream had timed out (never once a
//! generation may have started). An upstream that says which adapter digest produced an
//! answer (`x-loraops-digest`, as loraops gateways do) is checked against the routed one.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventsource_stream::Eventsource;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use serde_json::{Value, json};
use thread_local::ThreadLocal;

use super::{
    Backend, Constraint, EngineError, EngineInfo, EngineKey, Event, EventStream, GenerateRequest,
    Logprob, Prompt, TokenUsage, TopLogprob,
};
use crate::residency::Flights;

/// How to reach the upstream.
#[derive(Debug, Clone)]
pub struct RemoteSettings {
    /// Base URL up to and including `/v1`.
    pub url: String,
    /// Sent as `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// The `model` the upstream serves the base under.
    pub base_name: String,
    /// Where the upstream reads a version's files from, with `{name}`, `{version}` and
    /// `{digest}` filled in (e.g. a shared volume: `/adapters/{digest}`). Without it only
    /// `lora_name` is sent (a loraops upstream pulls the version from its registry itself).
    pub lora_path: Option<String>,
    /// Place versions on the upstream with `/v1/load_lora_adapter` (off: the upstream already
    /// serves them under `NAME@V`).
    pub place_adapters: bool,
    pub connect_timeout: Duration,
    /// Longest silence while reading a response (between stream events, too).
    pub read_timeout: Duration,
    /// Attempts to connect before giving up.
    pub connect_attempts: u32,
}

impl RemoteSettings {
    pub fn new(url: &str, base_name: &str) -> Self {
        Self {
            url: url.trim_end_matches('/').to_string(),
            api_key: None,
            base_name: base_name.to_string(),
            lora_path: None,
            place_adapters: true,
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(120),
            connect_attempts: 3,
        }
    }
}

pub struct RemoteBackend {
    inner: Arc<Inner>,
}

struct Inner {
    /// One client (and connection pool) per thread. The gateway's HTTP workers are threads
    /// with a runtime each, and a pooled connection is driven by the runtime that opened it:
    /// a shared pool would hand a worker connections another worker drives, so every
    /// response would cross threads twice.
    http: ThreadLocal<reqwest::Client>,
    /// `{url}/chat/completions` and `{url}/completions`, parsed once.
    chat_url: reqwest::Url,
    completions_url: reqwest::Url,
    settings: RemoteSettings,
    placed: Mutex<HashSet<EngineKey>>,
    flights: Flights<EngineKey, ()>,
    identity: EngineInfo,
}

impl RemoteBackend {
    pub fn new(settings: RemoteSettings) -> Result<Self, EngineError> {
        let http = ThreadLocal::new();
        http.get_or_try(|| client(&settings))?;
        let url = |path: &str| {
            reqwest::Url::parse(&format!("{}{path}", settings.url))
                .map_err(|e| EngineError::Internal(format!("upstream URL {}: {e}", settings.url)))
        };
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                chat_url: url("/chat/completions")?,
                completions_url: url("/completions")?,
                // The upstream is opaque: name where it is, not what it runs.
                identity: EngineInfo {
                    name: "openai-compatible-upstream".into(),
                    version: settings.url.clone(),
                    quantization: "unknown".into(),
                },
                settings,
                placed: Mutex::default(),
                flights: Flights::default(),
            }),
        })
    }
}

fn client(settings: &RemoteSettings) -> Result<reqwest::Client, EngineError> {
    reqwest::Client::builder()
        .connect_timeout(settings.connect_timeout)
        .read_timeout(settings.read_timeout)
        .build()
        .map_err(|e| EngineError::Internal(format!("HTTP client: {e}")))
}

impl Inner {
    fn post(
        &self,
        url: reqwest::Url,
        body: &Value,
    ) -> Result<reqwest::RequestBuilder, EngineError> {
        let rb = self
            .http
            .get_or_try(|| client(&self.settings))?
            .post(url)
            .json(body);
        Ok(match &self.settings.api_key {
            Some(k) => rb.bearer_auth(k),
            None => rb,
        })
    }

    fn url(&self, path: &str) -> Result<reqwest::Url, EngineError> {
        match path {
            "/chat/completions" => Ok(self.chat_url.clone()),
            "/completions" => Ok(self.completions_url.clone()),
            _ => reqwest::Url::parse(&format!("{}{path}", self.settings.url))
                .map_err(|e| EngineError::Internal(format!("upstream URL: {e}"))),
        }
    }

    /// Send, retrying only where the upstream has not read the request: a connection that
    /// could not be made, or a 408 on a kept-alive connection it timed out before this
    /// request arrived. So no generation is ever duplicated.
    async fn send(&self, path: &str, body: &Value) -> Result<reqwest::Response, EngineError> {
        let mut wait = Duration::from_millis(100);
        let mut attempt = 1;
        loop {
            match self.post(self.url(path)?, body)?.send().await {
                Ok(r)
                    if r.status() == reqwest::StatusCode::REQUEST_TIMEOUT
                        && attempt < self.settings.connect_attempts =>
                {
                    tracing::debug!(attempt, "upstream timed out an idle connection; resending");
                    attempt += 1;
                }
                Ok(r) => return Ok(r),
                Err(e) if e.is_connect() && attempt < self.settings.connect_attempts => {
                    tracing::warn!(error = %e, attempt, "upstream unreachable; retrying");
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                    attempt += 1;
                }
                Err(e) => {
                    return Err(EngineError::Load {
                        what: format!("upstream {}", self.settings.url),
                        message: e.to_string(),
                    });
                }
            }
        }
    }

    /// Place `key` on the upstream (once; concurrent requests share the call).
    async fn place(self: &Arc<Self>, key: &EngineKey) -> Result<(), EngineError> {
        let EngineKey::Version {
            adapter,
            version,
            digest,
        } = key
        else {
            return Ok(());
        };
        if !self.settings.place_adapters || self.placed.lock().expect("placed lock").contains(key) {
            return Ok(());
        }
        let mut body = json!({"lora_name": format!("{adapter}@{version}")});
        if let Some(t) = &self.settings.lora_path {
            let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
            body["lora_path"] = json!(
                t.replace("{name}", adapter.as_str())
                    .replace("{version}", &version.to_string())
                    .replace("{digest}", hex)
            );
        }
        let me = self.clone();
        let k = key.clone();
        self.flights
            .run(key, move || async move {
                let res = me
                    .send("/load_lora_adapter", &body)
                    .await
                    .map_err(|e| e.to_string())?;
                let status = res.status();
                let text = res.text().await.unwrap_or_default();
                // vLLM answers 400 "already been loaded" to a repeated load: it is placed.
                if status.is_success() || text.contains("already been loaded") {
                    me.placed.lock().expect("placed lock").insert(k);
                    Ok(())
                } else {
                    Err(format!("upstream refused the adapter ({status}): {text}"))
                }
            })
            .await
            .map_err(|message| EngineError::Load {
                what: key.to_string(),
                message,
            })
    }
}

impl Backend for RemoteBackend {
    fn identity(&self) -> &EngineInfo {
        &self.inner.identity
    }

    fn generate(
        &self,
        key: EngineKey,
        req: GenerateRequest,
    ) -> BoxFuture<'static, Result<EventStream, EngineError>> {
        let inner = self.inner.clone();
        async move {
            inner.place(&key).await?;
            let model = match &key {
                EngineKey::Base => inner.settings.base_name.clone(),
                k => k.to_string(),
            };
            let (path, b) = body(&model, &req);
            let res = inner.send(&path, &b).await?;
            let status = res.status();
            if !status.is_success() {
                let text = res.text().await.unwrap_or_default();
                let message = format!("upstream {status}: {text}");
                return Err(match status.as_u16() {
                    429 => EngineError::Overloaded(message),
                    // The gateway's own credentials, not the client's request.
                    401 | 403 => EngineError::Load {
                        what: format!("upstream {}", inner.settings.url),
                        message,
                    },
                    s if (400..500).contains(&s) => EngineError::Rejected(message),
                    _ => EngineError::Internal(message),
                });
            }
            if let EngineKey::Version { digest, .. } = &key
                && let Some(served) = res
                    .headers()
                    .get("x-loraops-digest")
                    .and_then(|h| h.to_str().ok())
                && served != digest
            {
                return Err(EngineError::Internal(format!(
                    "the upstream served {key} with digest {served}, not the routed {digest}"
                )));
            }
            Ok(Box::pin(events(res)) as EventStream)
        }
        .boxed()
    }

    fn load(&self, key: EngineKey) -> BoxFuture<'static, Result<(), EngineError>> {
        let inner = self.inner.clone();
        async move {
            inner.flights.forget_failure(&key);
            inner.place(&key).await
        }
        .boxed()
    }

    fn unload(&self, key: &EngineKey) -> bool {
        let gone = self.inner.placed.lock().expect("placed lock").remove(key);
        if gone {
            let inner = self.inner.clone();
            let body = json!({"lora_name": key.to_string()});
            tokio::spawn(async move {
                if let Err(e) = inner.send("/unload_lora_adapter", &body).await {
                    tracing::warn!(error = %e, "unloading from the upstream failed");
                }
            });
        }
        gone
    }

    fn pin(&self, _keys: &[EngineKey]) {
        // The upstream decides what it keeps; placed versions stay placed until unloaded.
    }

    fn is_resident(&self, key: &EngineKey) -> bool {
        *key == EngineKey::Base
            || !self.inner.settings.place_adapters
            || self.inner.placed.lock().expect("placed lock").contains(key)
    }

    fn resident(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .inner
            .placed
            .lock()
            .expect("placed lock")
            .iter()
            .map(|k| k.to_string())
            .collect();
        v.sort();
        v
    }

    fn base_ready(&self) -> bool {
        true
    }
}

fn body(model: &str, req: &GenerateRequest) -> (String, Value) {
    let s = &req.sampling;
    let mut b = json!({
        "model": model,
        "max_tokens": s.max_tokens,
        "stream": true,
        "stream_options": {"include_usage": true},
        "temperature": s.temperature,
    });
    if let Some(seed) = s.seed {
        b["seed"] = json!(seed);
    }
    if let Some(p) = s.top_p {
        b["top_p"] = json!(p);
    }
    if !s.stop.is_empty() {
        b["stop"] = json!(s.stop);
    }
    if s.presence_penalty != 0.0 {
        b["presence_penalty"] = json!(s.presence_penalty);
    }
    if s.frequency_penalty != 0.0 {
        b["frequency_penalty"] = json!(s.frequency_penalty);
    }
    if !s.logit_bias.is_empty() {
        let bias: serde_json::Map<String, Value> = s
            .logit_bias
            .iter()
            .map(|(t, b)| (t.to_string(), json!(b)))
            .collect();
        b["logit_bias"] = Value::Object(bias);
    }
    // Regular expressions and Lark grammars are not OpenAI's API, but what vLLM and loraops
    // gateways accept.
    match &s.constraint {
        Some(Constraint::Regex(re)) => {
            b["guided_regex"] = json!(re);
        }
        Some(Constraint::Lark(g)) => {
            b["guided_grammar"] = json!(g);
        }
        Some(Constraint::JsonSchema(schema)) => {
            b["response_format"] = json!({"type": "json_schema",
                "json_schema": {"name": "answer", "schema": schema, "strict": true}});
        }
        None => {}
    }
    match &req.prompt {
        Prompt::Chat { messages, tools } => {
            b["messages"] = messages.iter().map(|m| m.to_json()).collect();
            if let Some(t) = tools {
                b["tools"] = t.clone();
            }
            if let Some(n) = s.logprobs {
                b["logprobs"] = json!(true);
                b["top_logprobs"] = json!(n);
            }
            ("/chat/completions".into(), b)
        }
        Prompt::Text(t) => {
            b["prompt"] = json!(t);
            if let Some(n) = s.logprobs {
                b["logprobs"] = json!(n);
            }
            ("/completions".into(), b)
        }
    }
}

/// Log-probabilities of one upstream chunk, chat (`logprobs.content`) or completions
/// (`logprobs.tokens` / `token_logprobs` / `top_logprobs`) shaped.
fn parse_logprobs(choice: &Value) -> Vec<Logprob> {
    let lp = &choice["logprobs"];
    let bytes = |v: &Value, token: &str| -> Vec<u8> {
        v["bytes"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|b| b.as_u64().map(|b| b as u8))
                    .collect()
            })
            .unwrap_or_else(|| token.as_bytes().to_vec())
    };
    if let Some(content) = lp["content"].as_array() {
        return content
            .iter()
            .map(|e| {
                let token = e["token"].as_str().unwrap_or_default().to_string();
                Logprob {
                    bytes: bytes(e, &token),
                    logprob: e["logprob"].as_f64().unwrap_or(0.0) as f32,
                    top: e["top_logprobs"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|t| {
                            let token = t["token"].as_str().unwrap_or_default().to_string();
                            TopLogprob {
                                bytes: bytes(t, &token),
                                logprob: t["logprob"].as_f64().unwrap_or(0.0) as f32,
                                token,
                            }
                        })
                        .collect(),
                    token,
                }
            })
            .collect();
    }
    let Some(tokens) = lp["tokens"].as_array() else {
        return Vec::new();
    };
    tokens
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let token = t.as_str().unwrap_or_default().to_string();
            let top = lp["top_logprobs"][i]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| TopLogprob {
                    token: k.clone(),
                    bytes: k.as_bytes().to_vec(),
                    logprob: v.as_f64().unwrap_or(0.0) as f32,
                })
                .collect();
            Logprob {
                bytes: token.as_bytes().to_vec(),
                logprob: lp["token_logprobs"][i].as_f64().unwrap_or(0.0) as f32,
                top,
                token,
            }
        })
        .collect()
}

/// Tool calls an upstream streams in fragments, gathered whole and written back as the
/// `<tool_call>` blocks the gateway parses for every engine.
#[derive(Default)]
struct UpstreamCalls {
    calls: Vec<(String, String)>,
}

impl UpstreamCalls {
    fn push(&mut self, choice: &Value) {
        for c in choice["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let i = c["index"].as_u64().unwrap_or(0) as usize;
            if self.calls.len() <= i {
                self.calls.resize(i + 1, Default::default());
            }
            let f = &c["function"];
            if let Some(n) = f["name"].as_str() {
                self.calls[i].0.push_str(n);
            }
            if let Some(a) = f["arguments"].as_str() {
                self.calls[i].1.push_str(a);
            }
        }
    }

    fn take_text(&mut self) -> Option<String> {
        if self.calls.is_empty() {
            return None;
        }
        let text = std::mem::take(&mut self.calls)
            .into_iter()
            .map(|(name, args)| {
                let args: Value = serde_json::from_str(&args).unwrap_or(Value::String(args));
                crate::tools::block(&name, &args)
            })
            .collect::<Vec<_>>()
            .join("\n");
        Some(text)
    }
}

/// The text, finish reason and usage of one upstream SSE payload.
fn parse_chunk(v: &Value) -> (Option<String>, Option<String>, Option<TokenUsage>) {
    let choice = v["choices"].get(0);
    let text = choice.and_then(|c| {
        c["delta"]["content"]
            .as_str()
            .or_else(|| c["text"].as_str())
            .map(str::to_string)
    });
    let finish = choice.and_then(|c| c["finish_reason"].as_str().map(str::to_string));
    let usage = v["usage"].as_object().map(|u| TokenUsage {
        prompt_tokens: u.get("prompt_tokens").and_then(Value::as_u64).unwrap_or(0),
        completion_tokens: u
            .get("completion_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(0),
    });
    (text, finish, usage)
}

/// The upstream's SSE as [`Event`]s: deltas, then one `Done` once the finish reason and the
/// usage chunk (or `[DONE]`) have arrived.
fn events(
    res: reqwest::Response,
) -> impl futures_util::Stream<Item = Result<Event, EngineError>> + Send {
    struct State<S> {
        sse: S,
        finish: Option<String>,
        usage: TokenUsage,
        chunks: u64,
        calls: UpstreamCalls,
        /// Events decoded from one payload, not yet released.
        queued: std::collections::VecDeque<Event>,
        done: bool,
    }
    let state = State {
        sse: res.bytes_stream().eventsource(),
        finish: None,
        usage: TokenUsage::default(),
        chunks: 0,
        calls: UpstreamCalls::default(),
        queued: Default::default(),
        done: false,
    };
    futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(ev) = st.queued.pop_front() {
                return Some((Ok(ev), st));
            }
            if st.done {
                return None;
            }
            let ev = match st.sse.next().await {
                Some(Ok(ev)) => ev,
                Some(Err(e)) => {
                    st.done = true;
                    return Some((
                        Err(EngineError::Internal(format!("upstream stream broke: {e}"))),
                        st,
                    ));
                }
                None => {
                    st.done = true;
                    return Some((
                        Err(EngineError::Internal(
                            "upstream ended without [DONE]".into(),
                        )),
                        st,
                    ));
                }
            };
            if ev.data == "[DONE]" {
                if st.usage.completion_tokens == 0 {
                    st.usage.completion_tokens = st.chunks;
                }
                st.done = true;
                if let Some(t) = st.calls.take_text() {
                    st.queued.push_back(Event::Delta(t));
                }
                st.queued.push_back(Event::Done {
                    finish_reason: st.finish.take().unwrap_or_else(|| "stop".into()),
                    usage: st.usage,
                });
                continue;
            }
            let Ok(v) = serde_json::from_str::<Value>(&ev.data) else {
                continue;
            };
            if v.get("error").is_some() {
                st.done = true;
                return Some((
                    Err(EngineError::Internal(format!("upstream: {}", v["error"]))),
                    st,
                ));
            }
            let (text, f, u) = parse_chunk(&v);
            if f.is_some() {
                st.finish = f;
            }
            if let Some(u) = u {
                st.usage = u;
            }
            if let Some(choice) = v["choices"].get(0) {
                st.calls.push(choice);
                let lps = parse_logprobs(choice);
                if !lps.is_empty() {
                    st.queued.push_back(Event::Logprobs(lps));
                }
            }
            if let Some(t) = text.filter(|t| !t.is_empty()) {
                st.chunks += 1;
                st.queued.push_back(Event::Delta(t));
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_chat_and_completion_chunks() {
        let (t, f, u) =
            parse_chunk(&json!({"choices": [{"delta": {"content": "hi"}, "finish_reason": null}]}));
        assert_eq!((t.as_deref(), f, u), (Some("hi"), None, None));
        let (t, f, _) =
            parse_chunk(&json!({"choices": [{"text": "yo", "finish_reason": "length"}]}));
        assert_eq!((t.as_deref(), f.as_deref()), (Some("yo"), Some("length")));
        let (_, _, u) = parse_chunk(
            &json!({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}),
        );
        assert_eq!(
            u,
            Some(TokenUsage {
                prompt_tokens: 3,
                completion_tokens: 2
            })
        );
    }
}
