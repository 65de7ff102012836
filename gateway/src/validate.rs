//! Request validation, kept apart from inference: an OpenAI request either becomes an
//! engine-neutral [`GenerateRequest`] or a precise 400/413 naming the offending parameter.

use crate::engine::{ChatMessage, GenerateRequest, Prompt, Sampling};
use crate::error::ApiError;
use crate::openai::{ChatCompletionRequest, Common, CompletionRequest, Content, Stop};

/// Limits applied before a request reaches an engine.
#[derive(Debug, Clone)]
pub struct Limits {
    /// `max_tokens` when the request gives none.
    pub default_max_tokens: u64,
    /// Largest `max_tokens` accepted.
    pub max_tokens: u64,
    /// Largest prompt, in bytes of text (413 above).
    pub max_prompt_bytes: usize,
    /// Largest request body in bytes (413 above).
    pub max_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            default_max_tokens: 256,
            max_tokens: 4096,
            max_prompt_bytes: 256 << 10,
            max_body_bytes: 1 << 20,
        }
    }
}

/// A request ready for routing and inference.
#[derive(Debug, Clone)]
pub struct Validated {
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    pub user: Option<String>,
    pub request: GenerateRequest,
}

const ROLES: [&str; 4] = ["system", "user", "assistant", "developer"];

pub fn chat(req: ChatCompletionRequest, limits: &Limits) -> Result<Validated, ApiError> {
    if req.tools.as_ref().is_some_and(|t| !t.is_null()) {
        return Err(ApiError::unsupported(
            "tools",
            "tool calling is not supported by this gateway",
        ));
    }
    if let Some(f) = &req.response_format {
        let kind = f.get("type").and_then(|t| t.as_str()).unwrap_or("");
        if kind != "text" {
            return Err(ApiError::unsupported(
                "response_format",
                format!("response_format {kind:?} is not supported (only \"text\")"),
            ));
        }
    }
    if req.messages.is_empty() {
        return Err(ApiError::bad_request("messages must not be empty").with_param("messages"));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    let mut bytes = 0usize;
    for (i, m) in req.messages.into_iter().enumerate() {
        let param = format!("messages[{i}]");
        if !ROLES.contains(&m.role.as_str()) {
            return Err(ApiError::bad_request(format!(
                "{param}.role {:?} is not one of system, developer, user, assistant",
                m.role
            ))
            .with_param(&format!("{param}.role")));
        }
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut s = String::new();
                for p in parts {
                    if p.kind != "text" {
                        return Err(ApiError::unsupported(
                            &format!("{param}.content"),
                            format!(
                                "content part type {:?} is not supported (text only)",
                                p.kind
                            ),
                        ));
                    }
                    s.push_str(p.text.as_deref().unwrap_or(""));
                }
                s
            }
        };
        bytes += content.len();
        // The chat template knows system/user/assistant; `developer` is OpenAI's new name
        // for system.
        let role = if m.role == "developer" {
            "system".to_string()
        } else {
            m.role
        };
        messages.push(ChatMessage { role, content });
    }
    check_prompt_size(bytes, "messages", limits)?;
    common(req.common, Prompt::Chat(messages), limits)
}

pub fn completion(req: CompletionRequest, limits: &Limits) -> Result<Validated, ApiError> {
    if req.echo == Some(true) {
        return Err(ApiError::unsupported("echo", "echo is not supported"));
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::unsupported("suffix", "suffix is not supported"));
    }
    if req.best_of.is_some_and(|b| b > 1) {
        return Err(ApiError::unsupported(
            "best_of",
            "best_of > 1 is not supported",
        ));
    }
    let prompt = match req.prompt {
        serde_json::Value::String(s) => s,
        serde_json::Value::Array(items) if items.len() == 1 && items[0].is_string() => {
            items[0].as_str().unwrap_or_default().to_string()
        }
        serde_json::Value::Array(_) => {
            return Err(ApiError::unsupported(
                "prompt",
                "prompt must be one string (batches and token arrays are not supported)",
            ));
        }
        _ => return Err(ApiError::bad_request("prompt must be a string").with_param("prompt")),
    };
    if prompt.is_empty() {
        return Err(ApiError::bad_request("prompt must not be empty").with_param("prompt"));
    }
    check_prompt_size(prompt.len(), "prompt", limits)?;
    common(req.common, Prompt::Text(prompt), limits)
}

fn check_prompt_size(bytes: usize, param: &str, limits: &Limits) -> Result<(), ApiError> {
    if bytes > limits.max_prompt_bytes {
        return Err(ApiError::too_large(
            Some(param),
            format!(
                "the prompt is {bytes} bytes, more than this gateway's limit of {}",
                limits.max_prompt_bytes
            ),
        ));
    }
    Ok(())
}

fn common(c: Common, prompt: Prompt, limits: &Limits) -> Result<Validated, ApiError> {
    if c.model.is_empty() {
        return Err(ApiError::bad_request("model is required").with_param("model"));
    }
    if c.n.is_some_and(|n| n != 1) {
        return Err(ApiError::unsupported("n", "only n = 1 is supported"));
    }
    let max_tokens = c
        .max_completion_tokens
        .or(c.max_tokens)
        .unwrap_or(limits.default_max_tokens);
    if max_tokens == 0 {
        return Err(ApiError::bad_request("max_tokens must be at least 1").with_param("max_tokens"));
    }
    if max_tokens > limits.max_tokens {
        return Err(ApiError::bad_request(format!(
            "max_tokens {max_tokens} is above this gateway's limit of {}",
            limits.max_tokens
        ))
        .with_param("max_tokens"));
    }
    if let Some(t) = c.temperature
        && !(0.0..=2.0).contains(&t)
    {
        return Err(
            ApiError::bad_request("temperature must be between 0 and 2").with_param("temperature")
        );
    }
    if let Some(p) = c.top_p
        && !(p > 0.0 && p <= 1.0)
    {
        return Err(ApiError::bad_request("top_p must be in (0, 1]").with_param("top_p"));
    }
    for (name, v) in [
        ("presence_penalty", c.presence_penalty),
        ("frequency_penalty", c.frequency_penalty),
    ] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(ApiError::unsupported(
                name,
                format!("{name} is not supported"),
            ));
        }
    }
    if c.logit_bias.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(ApiError::unsupported(
            "logit_bias",
            "logit_bias is not supported",
        ));
    }
    if c.logprobs
        .as_ref()
        .is_some_and(|v| !(v.is_null() || *v == serde_json::Value::Bool(false)))
        || c.top_logprobs.is_some_and(|n| n > 0)
    {
        return Err(ApiError::unsupported(
            "logprobs",
            "logprobs are not supported",
        ));
    }
    let stop = match c.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > 4 || stop.iter().any(String::is_empty) {
        return Err(
            ApiError::bad_request("stop takes up to 4 non-empty sequences").with_param("stop"),
        );
    }
    let stream = c.stream.unwrap_or(false);
    Ok(Validated {
        model: c.model,
        stream,
        include_usage: stream && c.stream_options.is_some_and(|o| o.include_usage),
        user: c.user.filter(|u| !u.is_empty()),
        request: GenerateRequest {
            prompt,
            sampling: Sampling {
                max_tokens: max_tokens as usize,
                // OpenAI's default when the request leaves it out.
                temperature: c.temperature.unwrap_or(1.0),
                top_p: c.top_p,
                seed: c.seed.map(|s| s as u64),
                stop,
                constraint: None,
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat_req(v: serde_json::Value) -> Result<Validated, ApiError> {
        chat(serde_json::from_value(v).unwrap(), &Limits::default())
    }

    #[test]
    fn accepts_what_openai_clients_send() {
        let v = chat_req(serde_json::json!({
            "model": "bot", "messages": [{"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
            {"role": "user", "content": "hi"}], "stream": true, "stream_options": {"include_usage": true},
            "stop": "\n", "seed": 7, "user": "u1", "max_completion_tokens": 5, "logprobs": false
        }))
        .unwrap();
        assert!(v.stream && v.include_usage);
        assert_eq!(v.user.as_deref(), Some("u1"));
        assert_eq!(v.request.sampling.max_tokens, 5);
        assert_eq!(v.request.sampling.stop, vec!["\n".to_string()]);
        let Prompt::Chat(m) = v.request.prompt else {
            panic!("chat prompt expected")
        };
        assert_eq!(m[0].role, "system");
        assert_eq!(m[0].content, "be brief");
    }

    #[test]
    fn rejects_what_the_engine_cannot_do_naming_the_parameter() {
        let base =
            serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
        for (field, value) in [
            ("n", serde_json::json!(2)),
            ("logprobs", serde_json::json!(true)),
            ("presence_penalty", serde_json::json!(0.5)),
            ("tools", serde_json::json!([{"type": "function"}])),
            ("max_tokens", serde_json::json!(1_000_000)),
            ("temperature", serde_json::json!(3.0)),
        ] {
            let mut b = base.clone();
            b[field] = value;
            let e = chat_req(b).unwrap_err();
            assert_eq!(e.status, 400, "{field}");
            assert_eq!(e.detail.param.as_deref(), Some(field), "{field}");
        }
        let mut b = base.clone();
        b["temperature"] = serde_json::json!(0.7);
        b["seed"] = serde_json::json!(1);
        assert_eq!(chat_req(b).unwrap().request.sampling.seed, Some(1));
        // Left out, the temperature is OpenAI's default, not greedy.
        let t = chat_req(base.clone()).unwrap().request.sampling.temperature;
        assert_eq!(t, 1.0);
        let mut b = base;
        b["messages"][0]["content"] = serde_json::json!("x".repeat(300 << 10));
        assert_eq!(chat_req(b).unwrap_err().status, 413);
    }
}
