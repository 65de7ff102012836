//! A remote engine: forwards to an OpenAI-compatible server (vLLM, LoRAX, another mistral.rs)
//! where `model` names the adapter. The scale-out path for many adapters per GPU, and the
//! upstream of the gateway-overhead benchmark.

use futures_util::StreamExt;
use serde_json::{Value, json};

use super::{
    Engine, EngineError, EngineInfo, Event, EventStream, GenerateRequest, Prompt, TokenUsage,
};

pub struct RemoteEngine {
    http: reqwest::Client,
    /// Base URL up to and including `/v1`.
    base_url: String,
    /// The `model` the upstream serves this engine's version under.
    model: String,
    identity: EngineInfo,
}

impl RemoteEngine {
    pub fn new(http: reqwest::Client, base_url: &str, model: &str) -> Self {
        Self {
            http,
            base_url: base_url.trim_end_matches('/').to_string(),
            model: model.to_string(),
            // The upstream is opaque: name where it is, not what it runs.
            identity: EngineInfo {
                name: "openai-compatible-upstream".into(),
                version: base_url.trim_end_matches('/').to_string(),
                quantization: "unknown".into(),
            },
        }
    }
}

fn body(model: &str, req: &GenerateRequest) -> (String, Value) {
    let s = &req.sampling;
    let mut b = json!({
        "model": model,
        "max_tokens": s.max_tokens,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if let Some(t) = s.temperature {
        b["temperature"] = json!(t);
    }
    if let Some(p) = s.top_p {
        b["top_p"] = json!(p);
    }
    if !s.stop.is_empty() {
        b["stop"] = json!(s.stop);
    }
    // Not OpenAI's API, but what vLLM and mistral.rs servers accept for constrained decoding.
    if let Some(re) = &s.constraint {
        b["guided_regex"] = json!(re);
        b["grammar"] = json!({"type": "regex", "value": re});
    }
    match &req.prompt {
        Prompt::Chat(ms) => {
            b["messages"] = ms
                .iter()
                .map(|m| json!({"role": m.role, "content": m.content}))
                .collect();
            ("/chat/completions".into(), b)
        }
        Prompt::Text(t) => {
            b["prompt"] = json!(t);
            ("/completions".into(), b)
        }
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

impl Engine for RemoteEngine {
    fn identity(&self) -> &EngineInfo {
        &self.identity
    }

    fn generate(&self, req: GenerateRequest) -> EventStream {
        let (path, b) = body(&self.model, &req);
        let rb = self.http.post(format!("{}{path}", self.base_url)).json(&b);
        let s = async_stream(rb);
        Box::pin(s)
    }
}

/// Read the upstream's SSE and emit deltas, then one `Done` once both the finish reason and
/// the usage chunk (or `[DONE]`) have arrived.
fn async_stream(
    rb: reqwest::RequestBuilder,
) -> impl futures_util::Stream<Item = Result<Event, EngineError>> + Send {
    let (tx, rx) = tokio::sync::mpsc::channel(32);
    tokio::spawn(async move {
        let res = match rb.send().await {
            Ok(r) if r.status().is_success() => r,
            Ok(r) => {
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                let e = if status.is_client_error() {
                    EngineError::Rejected(format!("upstream {status}: {text}"))
                } else {
                    EngineError::Internal(format!("upstream {status}: {text}"))
                };
                let _ = tx.send(Err(e)).await;
                return;
            }
            Err(e) => {
                let _ = tx.send(Err(EngineError::Internal(e.to_string()))).await;
                return;
            }
        };
        let mut bytes = res.bytes_stream();
        let mut buf = Vec::new();
        let mut finish: Option<String> = None;
        let mut usage = TokenUsage::default();
        let mut chunks = 0u64;
        while let Some(chunk) = bytes.next().await {
            let Ok(chunk) = chunk else {
                let _ = tx
                    .send(Err(EngineError::Internal("upstream stream broke".into())))
                    .await;
                return;
            };
            buf.extend_from_slice(&chunk);
            while let Some(pos) = buf.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = buf.drain(..pos + 2).collect();
                let line = String::from_utf8_lossy(&event);
                let Some(data) = line.trim().strip_prefix("data:").map(str::trim) else {
                    continue;
                };
                if data == "[DONE]" {
                    if usage.completion_tokens == 0 {
                        usage.completion_tokens = chunks;
                    }
                    let _ = tx
                        .send(Ok(Event::Done {
                            finish_reason: finish.take().unwrap_or_else(|| "stop".into()),
                            usage,
                        }))
                        .await;
                    return;
                }
                let Ok(v) = serde_json::from_str::<Value>(data) else {
                    continue;
                };
                let (text, f, u) = parse_chunk(&v);
                if let Some(t) = text.filter(|t| !t.is_empty()) {
                    chunks += 1;
                    if tx.send(Ok(Event::Delta(t))).await.is_err() {
                        return;
                    }
                }
                if f.is_some() {
                    finish = f;
                }
                if let Some(u) = u {
                    usage = u;
                }
            }
        }
        let _ = tx
            .send(Err(EngineError::Internal(
                "upstream ended without [DONE]".into(),
            )))
            .await;
    });
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|i| (i, rx)) })
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
