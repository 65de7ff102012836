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

use bytes::Bytes;
use eventsource_stream::Eventsource;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
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

/// HTTP/1.1 over TCP, with TLS for `https://` upstreams (rustls, the system's trust store).
type Http = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The most of an upstream's error body kept for the message.
const ERROR_BODY_LIMIT: usize = 64 << 10;

struct Inner {
    /// One client (and connection pool) per thread. The gateway's HTTP workers are threads
    /// with a runtime each, and a pooled connection is driven by the runtime that opened it:
    /// a shared pool would hand a worker connections another worker drives, so every
    /// response would cross threads twice.
    http: ThreadLocal<Http>,
    tls: rustls::ClientConfig,
    /// `{url}/chat/completions` and `{url}/completions`, parsed once.
    chat_url: Uri,
    completions_url: Uri,
    /// `Bearer KEY`, marked sensitive (kept out of debug output).
    authorization: Option<HeaderValue>,
    settings: RemoteSettings,
    placed: Mutex<HashSet<EngineKey>>,
    flights: Flights<EngineKey, ()>,
    identity: EngineInfo,
}

impl RemoteBackend {
    pub fn new(settings: RemoteSettings) -> Result<Self, EngineError> {
        let authorization = match &settings.api_key {
            Some(k) => {
                let mut v = HeaderValue::try_from(format!("Bearer {k}")).map_err(|_| {
                    EngineError::Internal("the upstream API key is not a valid header".into())
                })?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        let tls = tls_config(&settings.url)
            .map_err(|e| EngineError::Internal(format!("TLS for the upstream: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                http: ThreadLocal::new(),
                tls,
                chat_url: upstream_uri(&settings.url, "/chat/completions")?,
                completions_url: upstream_uri(&settings.url, "/completions")?,
                authorization,
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

/// TLS as the system trusts it. Only an `https://` upstream reads the trust store, so a
/// plain-HTTP upstream needs no CA certificates installed.
fn tls_config(url: &str) -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?;
    let builder = if url.starts_with("https://") {
        rustls_platform_verifier::BuilderVerifierExt::with_platform_verifier(builder)?
    } else {
        builder.with_root_certificates(rustls::RootCertStore::empty())
    };
    Ok(builder.with_no_client_auth())
}

/// `path` on the upstream at `base`.
fn upstream_uri(base: &str, path: &str) -> Result<Uri, EngineError> {
    format!("{base}{path}")
        .parse()
        .map_err(|e| EngineError::Internal(format!("upstream URL {base}{path}: {e}")))
}

/// An error and its causes, as one line (hyper's own message is only "client error").
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

impl Inner {
    fn client(&self) -> &Http {
        self.http.get_or(|| {
            let mut tcp = HttpConnector::new();
            tcp.set_connect_timeout(Some(self.settings.connect_timeout));
            tcp.set_nodelay(true);
            tcp.enforce_http(false);
            let tls = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(self.tls.clone())
                .https_or_http()
                .enable_http1()
                .wrap_connector(tcp);
            Client::builder(TokioExecutor::new()).build(tls)
        })
    }

    fn url(&self, path: &str) -> Result<Uri, EngineError> {
        match path {
            "/chat/completions" => Ok(self.chat_url.clone()),
            "/completions" => Ok(self.completions_url.clone()),
            _ => upstream_uri(&self.settings.url, path),
        }
    }

    fn request(&self, url: Uri, body: Bytes) -> Result<Request<Full<Bytes>>, EngineError> {
        let mut req = Request::post(url).header(CONTENT_TYPE, "application/json");
        if let Some(a) = &self.authorization {
            req = req.header(AUTHORIZATION, a.clone());
        }
        req.body(Full::new(body))
            .map_err(|e| EngineError::Internal(format!("upstream request: {e}")))
    }

    /// Send, retrying only where the upstream has not read the request: a connection that
    /// could not be made, or a 408 on a kept-alive connection it timed out before this
    /// request arrived. So no generation is ever duplicated.
    async fn send(&self, path: &str, body: &Value) -> Result<Response<Incoming>, EngineError> {
        let failed = |message: String| EngineError::Load {
            what: format!("upstream {}", self.settings.url),
            message,
        };
        let body = Bytes::from(serde_json::to_vec(body).expect("a JSON value serialises"));
        let url = self.url(path)?;
        let mut wait = Duration::from_millis(100);
        let mut attempt = 1;
        loop {
            let call = self
                .client()
                .request(self.request(url.clone(), body.clone())?);
            match tokio::time::timeout(self.settings.read_timeout, call).await {
                Err(_) => {
                    return Err(failed(format!(
                        "no response within {:?}",
                        self.settings.read_timeout
                    )));
                }
                Ok(Ok(r))
                    if r.status() == StatusCode::REQUEST_TIMEOUT
                        && attempt < self.settings.connect_attempts =>
                {
                    tracing::debug!(attempt, "upstream timed out an idle connection; resending");
                    attempt += 1;
                }
                Ok(Ok(r)) => return Ok(r),
                Ok(Err(e)) if e.is_connect() && attempt < self.settings.connect_attempts => {
                    tracing::warn!(error = %describe(&e), attempt, "upstream unreachable; retrying");
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                    attempt += 1;
                }
                Ok(Err(e)) => return Err(failed(describe(&e))),
            }
        }
    }

    /// The start of a response's body as text (an error's explanation).
    async fn text(&self, res: Response<Incoming>) -> String {
        let body = Limited::new(res.into_body(), ERROR_BODY_LIMIT);
        match tokio::time::timeout(self.settings.read_timeout, body.collect()).await {
            Ok(Ok(b)) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
            _ => String::new(),
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
                let text = me.text(res).await;
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
                let text = inner.text(res).await;
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
            Ok(Box::pin(events(res, inner.settings.read_timeout)) as EventStream)
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
fn parse_logprobs(lp: &Value) -> Vec<Logprob> {
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
    fn push(&mut self, tool_calls: &Value) {
        for c in tool_calls.as_array().into_iter().flatten() {
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

/// One upstream SSE payload, read in place: the text borrows from the event unless it has
/// escapes, and what the gateway does not use (ids, model, timestamps) is skipped unread.
#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(default, borrow)]
    choices: Vec<ChunkChoice<'a>>,
    #[serde(default)]
    usage: Option<TokenUsage>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct ChunkChoice<'a> {
    /// Chat.
    #[serde(default, borrow)]
    delta: Option<ChunkDelta<'a>>,
    /// Completions.
    #[serde(default, borrow)]
    text: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    finish_reason: Option<String>,
    #[serde(default)]
    logprobs: Option<Value>,
}

#[derive(Deserialize)]
struct ChunkDelta<'a> {
    #[serde(default, borrow)]
    content: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    tool_calls: Option<Value>,
}

impl Chunk<'_> {
    /// The first choice's text.
    fn text(&self) -> Option<&str> {
        let c = self.choices.first()?;
        c.delta
            .as_ref()
            .and_then(|d| d.content.as_deref())
            .or(c.text.as_deref())
    }

    fn finish_reason(&self) -> Option<&str> {
        self.choices.first()?.finish_reason.as_deref()
    }
}

/// The response body's bytes, each read given `read_timeout` to arrive.
fn body_stream(
    res: Response<Incoming>,
    read_timeout: Duration,
) -> impl futures_util::Stream<Item = Result<Bytes, String>> + Send {
    futures_util::stream::unfold(Some(res.into_body()), move |body| async move {
        let mut body = body?;
        loop {
            return match tokio::time::timeout(read_timeout, body.frame()).await {
                Err(_) => Some((Err(format!("no data for {read_timeout:?}")), None)),
                Ok(None) => None,
                Ok(Some(Err(e))) => Some((Err(describe(&e)), None)),
                // Trailers carry nothing an OpenAI stream uses.
                Ok(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => Some((Ok(data), Some(body))),
                    Err(_) => continue,
                },
            };
        }
    })
}

/// The upstream's SSE as [`Event`]s: deltas, then one `Done` once the finish reason and the
/// usage chunk (or `[DONE]`) have arrived.
fn events(
    res: Response<Incoming>,
    read_timeout: Duration,
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
        sse: Box::pin(body_stream(res, read_timeout)).eventsource(),
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
            let Ok(chunk) = serde_json::from_str::<Chunk>(&ev.data) else {
                continue;
            };
            if let Some(e) = &chunk.error {
                st.done = true;
                return Some((Err(EngineError::Internal(format!("upstream: {e}"))), st));
            }
            if let Some(f) = chunk.finish_reason() {
                st.finish = Some(f.to_string());
            }
            if let Some(u) = chunk.usage {
                st.usage = u;
            }
            if let Some(choice) = chunk.choices.first() {
                if let Some(calls) = choice.delta.as_ref().and_then(|d| d.tool_calls.as_ref()) {
                    st.calls.push(calls);
                }
                if let Some(lp) = &choice.logprobs {
                    let lps = parse_logprobs(lp);
                    if !lps.is_empty() {
                        st.queued.push_back(Event::Logprobs(lps));
                    }
                }
            }
            if let Some(t) = chunk.text().filter(|t| !t.is_empty()) {
                st.chunks += 1;
                st.queued.push_back(Event::Delta(t.to_string()));
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Sampling;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// Read one request, head and body (`content-length`), off `c`.
    async fn read_request(c: &mut TcpStream) -> String {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = c.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the client closed mid-request");
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).into_owned();
            if let Some(end) = text.find("\r\n\r\n") {
                let length: usize = text
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map_or(0, |v| v.trim().parse().unwrap());
                if buf.len() >= end + 4 + length {
                    return text;
                }
            }
        }
    }

    /// A 408 on a connection the upstream had timed out is sent again on a new one, and a
    /// stream that falls silent for longer than the read timeout ends in an error naming it,
    /// not in a request that hangs.
    #[tokio::test]
    async fn a_408_is_sent_again_and_a_silent_stream_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (seen, request) = tokio::sync::oneshot::channel();
        let upstream = tokio::spawn(async move {
            let (mut c, _) = listener.accept().await.unwrap();
            read_request(&mut c).await;
            c.write_all(
                b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            )
            .await
            .unwrap();
            drop(c);
            let (mut c, _) = listener.accept().await.unwrap();
            seen.send(read_request(&mut c).await).unwrap();
            let event = b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n";
            c.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
            )
            .await
            .unwrap();
            c.write_all(format!("{:x}\r\n", event.len()).as_bytes())
                .await
                .unwrap();
            c.write_all(event).await.unwrap();
            c.write_all(b"\r\n").await.unwrap();
            tokio::time::sleep(Duration::from_secs(10)).await;
        });
        let mut settings = RemoteSettings::new(&format!("http://{addr}/v1"), "base");
        settings.api_key = Some("k".into());
        settings.read_timeout = Duration::from_millis(300);
        let backend = RemoteBackend::new(settings).unwrap();
        let req = GenerateRequest {
            prompt: Prompt::Text("Hello".into()),
            sampling: Sampling {
                max_tokens: 4,
                ..Sampling::default()
            },
        };
        let mut events = backend.generate(EngineKey::Base, req).await.unwrap();
        let request = request.await.unwrap();
        assert!(request.starts_with("POST /v1/completions "), "{request}");
        assert!(request.contains("authorization: Bearer k"), "{request}");
        assert!(matches!(events.next().await, Some(Ok(Event::Delta(t))) if t == "Hi"));
        match events.next().await {
            Some(Err(EngineError::Internal(m))) => assert!(m.contains("no data for"), "{m}"),
            other => panic!("expected a read timeout, got {other:?}"),
        }
        upstream.abort();
    }

    #[test]
    fn tls_is_configured_for_plain_and_secure_upstreams() {
        tls_config("http://127.0.0.1:8000/v1").unwrap();
        // The system's trust store (ca-certificates, as the image installs it).
        tls_config("https://upstream.example/v1").unwrap();
    }

    fn read(payload: &str) -> (Option<String>, Option<String>, Option<TokenUsage>) {
        let c: Chunk = serde_json::from_str(payload).unwrap();
        (
            c.text().map(str::to_string),
            c.finish_reason().map(str::to_string),
            c.usage,
        )
    }

    #[test]
    fn reads_chat_and_completion_chunks() {
        let (t, f, u) = read(
            r#"{"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}"#,
        );
        assert_eq!((t.as_deref(), f, u), (Some("hi"), None, None));
        let (t, f, _) = read(r#"{"choices":[{"text":"yo \"q\"","finish_reason":"length"}]}"#);
        assert_eq!(
            (t.as_deref(), f.as_deref()),
            (Some("yo \"q\""), Some("length"))
        );
        let (_, _, u) = read(r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}"#);
        assert_eq!(
            u,
            Some(TokenUsage {
                prompt_tokens: 3,
                completion_tokens: 2
            })
        );
        let (t, f, u) = read(r#"{"choices":[{"delta":{},"logprobs":null}],"usage":null}"#);
        assert_eq!((t, f, u), (None, None, None));
    }
}
