//! Request validation, kept apart from inference: an OpenAI request either becomes an
//! engine-neutral [`GenerateRequest`] or a precise 400/413 naming the offending parameter.
//!
//! Fields loraops does not know are refused by name, as OpenAI's own server does ("Unrecognized
//! request argument supplied"), so a client never believes a setting took effect when it did
//! not. A few of OpenAI's bookkeeping fields that change nothing about the answer (`store`,
//! `metadata`, `service_tier`, …) are accepted and ignored.

use serde_json::{Value, json};

use crate::engine::{ChatMessage, Constraint, GenerateRequest, Prompt, Sampling};
use crate::error::ApiError;
use crate::openai::{ChatCompletionRequest, Common, CompletionRequest, Content, InTool, Stop};
use crate::tools::{self, Function, ToolChoice};

/// Limits applied before a request reaches an engine (`[gateway]` settings).
#[derive(Debug, Clone)]
pub struct Limits {
    /// `max_tokens` when the request gives none.
    pub default_max_tokens: u64,
    /// Largest `max_tokens` accepted.
    pub max_tokens: u64,
    /// Largest prompt, in bytes of text (413 above).
    pub max_prompt_bytes: usize,
    /// Largest prompt in tokens (the native engine checks it once the prompt is tokenised).
    pub max_prompt_tokens: usize,
    /// Largest request body in bytes (413 above).
    pub max_body_bytes: usize,
    /// Largest `n` (answers per request).
    pub max_n: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            default_max_tokens: 256,
            max_tokens: 4096,
            max_prompt_bytes: 256 << 10,
            max_prompt_tokens: 32768,
            max_body_bytes: 1 << 20,
            max_n: 8,
        }
    }
}

/// How the answer's tool calls are read back (the request offered tools).
#[derive(Debug, Clone, PartialEq)]
pub struct ToolUse {
    /// At most one call per answer when false.
    pub parallel: bool,
    /// `tool_choice` named the function: OpenAI then finishes with `stop`, not `tool_calls`.
    pub named: bool,
}

/// A request ready for routing and inference.
#[derive(Debug, Clone)]
pub struct Validated {
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    pub user: Option<String>,
    /// Answers to generate (OpenAI's `n`).
    pub n: usize,
    /// Parse tool calls out of the answers.
    pub tools: Option<ToolUse>,
    /// Report log-probabilities (chat `logprobs: true`, completions `logprobs: N`).
    pub logprobs: bool,
    pub request: GenerateRequest,
}

/// OpenAI fields that do not change the answer: accepted and ignored.
const IGNORED: [&str; 5] = [
    "store",
    "metadata",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
];

/// OpenAI fields this gateway cannot honour, with why.
fn unsupported_field(name: &str) -> Option<&'static str> {
    Some(match name {
        "functions" | "function_call" => "the legacy functions API is not supported; use tools",
        "audio" | "modalities" => "only text output is supported",
        "prediction" => "predicted outputs are not supported",
        "web_search_options" => "web search is not supported",
        "reasoning_effort" | "verbosity" => "this parameter applies to OpenAI's reasoning models",
        _ => return None,
    })
}

fn check_other(other: &serde_json::Map<String, Value>) -> Result<(), ApiError> {
    for (k, v) in other {
        if IGNORED.contains(&k.as_str()) || v.is_null() {
            continue;
        }
        if k == "modalities" && *v == json!(["text"]) {
            continue;
        }
        if let Some(why) = unsupported_field(k) {
            return Err(ApiError::unsupported(k, format!("{k}: {why}")));
        }
        return Err(
            ApiError::bad_request(format!("Unrecognized request argument supplied: {k}"))
                .with_param(k),
        );
    }
    Ok(())
}

const ROLES: [&str; 5] = ["system", "user", "assistant", "developer", "tool"];

pub fn chat(req: ChatCompletionRequest, limits: &Limits) -> Result<Validated, ApiError> {
    check_other(&req.other)?;
    if req.messages.is_empty() {
        return Err(ApiError::bad_request("messages must not be empty").with_param("messages"));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    let mut bytes = 0usize;
    for (i, m) in req.messages.into_iter().enumerate() {
        let param = format!("messages[{i}]");
        if !ROLES.contains(&m.role.as_str()) {
            return Err(ApiError::bad_request(format!(
                "{param}.role {:?} is not one of system, developer, user, assistant, tool",
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
        let tool_calls = match m.tool_calls {
            Some(calls) if !calls.is_empty() => {
                if m.role != "assistant" {
                    return Err(ApiError::bad_request(format!(
                        "{param}.tool_calls: only assistant messages carry tool calls"
                    ))
                    .with_param(&format!("{param}.tool_calls")));
                }
                let calls: Vec<Value> = calls
                    .into_iter()
                    .map(|c| {
                        bytes += c.function.arguments.len();
                        // Chat templates (as transformers renders them) expect the arguments
                        // as an object; OpenAI sends them as JSON text.
                        let args = serde_json::from_str::<Value>(&c.function.arguments)
                            .unwrap_or(Value::String(c.function.arguments));
                        json!({"id": c.id, "type": c.kind,
                            "function": {"name": c.function.name, "arguments": args}})
                    })
                    .collect();
                Some(Value::Array(calls))
            }
            _ => None,
        };
        if m.role == "tool" && m.tool_call_id.as_deref().is_none_or(str::is_empty) {
            return Err(ApiError::bad_request(format!(
                "{param}: a tool message needs the tool_call_id it answers"
            ))
            .with_param(&format!("{param}.tool_call_id")));
        }
        // The chat template knows system/user/assistant/tool; `developer` is OpenAI's new
        // name for system.
        let role = if m.role == "developer" {
            "system".to_string()
        } else {
            m.role
        };
        let tool_call_id = m.tool_call_id.filter(|_| role == "tool");
        messages.push(ChatMessage {
            role,
            content,
            tool_calls,
            tool_call_id,
        });
    }
    check_prompt_size(bytes, "messages", limits)?;

    let (functions, rendered) = match &req.tools {
        Some(t) if !t.is_empty() => functions(t)?,
        _ => (Vec::new(), None),
    };
    let choice = tool_choice(req.tool_choice.as_ref(), &functions)?;
    // A named function is called once, as OpenAI does.
    let parallel =
        req.parallel_tool_calls.unwrap_or(true) && !matches!(choice, ToolChoice::Named(_));
    let offered = !functions.is_empty() && choice != ToolChoice::None;
    let mut constraints = Vec::new();
    if offered && let Some(g) = tools::grammar(&functions, &choice, parallel) {
        constraints.push(("tool_choice", Constraint::Lark(g)));
    }
    if let Some(c) = response_format(req.response_format.as_ref())? {
        constraints.push(("response_format", c));
    }
    let chat_logprobs = match &req.common.logprobs {
        None | Some(Value::Null) | Some(Value::Bool(false)) => None,
        Some(Value::Bool(true)) => Some(req.common.top_logprobs.unwrap_or(0)),
        Some(_) => {
            return Err(
                ApiError::bad_request("logprobs must be true or false").with_param("logprobs")
            );
        }
    };
    if chat_logprobs.is_none() && req.common.top_logprobs.is_some_and(|n| n > 0) {
        return Err(
            ApiError::bad_request("top_logprobs needs logprobs set to true")
                .with_param("top_logprobs"),
        );
    }
    if chat_logprobs.is_some_and(|n| n > 20) {
        return Err(
            ApiError::bad_request("top_logprobs must be between 0 and 20")
                .with_param("top_logprobs"),
        );
    }
    let prompt = Prompt::Chat {
        messages,
        tools: if offered { rendered } else { None },
    };
    let mut v = common(req.common, prompt, constraints, limits)?;
    v.request.sampling.logprobs = chat_logprobs.map(|n| n as usize);
    v.logprobs = chat_logprobs.is_some();
    v.tools = offered.then_some(ToolUse {
        parallel,
        named: matches!(choice, ToolChoice::Named(_)),
    });
    Ok(v)
}

/// The function definitions, and the `tools` array as the chat template renders it.
fn functions(tools: &[InTool]) -> Result<(Vec<Function>, Option<Value>), ApiError> {
    let mut fs = Vec::with_capacity(tools.len());
    let mut rendered = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        let param = format!("tools[{i}]");
        if t.kind != "function" {
            return Err(ApiError::unsupported(
                &format!("{param}.type"),
                format!("tool type {:?} is not supported (function only)", t.kind),
            ));
        }
        let Some(f) = &t.function else {
            return Err(
                ApiError::bad_request(format!("{param}.function is required"))
                    .with_param(&format!("{param}.function")),
            );
        };
        let valid = !f.name.is_empty()
            && f.name.len() <= 64
            && f.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid {
            return Err(ApiError::bad_request(format!(
                "{param}.function.name {:?} must be 1-64 letters, digits, _ or -",
                f.name
            ))
            .with_param(&format!("{param}.function.name")));
        }
        if fs.iter().any(|g: &Function| g.name == f.name) {
            return Err(ApiError::bad_request(format!(
                "{param}.function.name {:?} is defined twice",
                f.name
            ))
            .with_param(&format!("{param}.function.name")));
        }
        let parameters = f.parameters.clone().unwrap_or_else(|| json!({}));
        if !parameters.is_object() {
            return Err(ApiError::bad_request(format!(
                "{param}.function.parameters must be a JSON schema object"
            ))
            .with_param(&format!("{param}.function.parameters")));
        }
        let mut def = json!({"name": f.name, "parameters": parameters});
        if let Some(d) = &f.description {
            def["description"] = json!(d);
        }
        rendered.push(json!({"type": "function", "function": def}));
        fs.push(Function {
            name: f.name.clone(),
            parameters,
        });
    }
    Ok((fs, Some(Value::Array(rendered))))
}

fn tool_choice(v: Option<&Value>, functions: &[Function]) -> Result<ToolChoice, ApiError> {
    let bad = |m: String| ApiError::bad_request(m).with_param("tool_choice");
    let choice = match v {
        None | Some(Value::Null) => {
            return Ok(if functions.is_empty() {
                ToolChoice::None
            } else {
                ToolChoice::Auto
            });
        }
        Some(Value::String(s)) => match s.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            other => {
                return Err(bad(format!(
                    "tool_choice {other:?} is not one of none, auto, required or a function"
                )));
            }
        },
        Some(o) => match o["function"]["name"].as_str() {
            Some(name) if o["type"] == "function" => ToolChoice::Named(name.to_string()),
            _ => {
                return Err(bad(
                    "tool_choice must be {\"type\": \"function\", \"function\": {\"name\": …}}"
                        .into(),
                ));
            }
        },
    };
    if functions.is_empty() && choice != ToolChoice::None {
        return Err(bad(
            "tool_choice is only allowed when tools are specified".into()
        ));
    }
    if let ToolChoice::Named(n) = &choice
        && !functions.iter().any(|f| &f.name == n)
    {
        return Err(bad(format!(
            "tool_choice names {n:?}, which is not in tools"
        )));
    }
    Ok(choice)
}

/// `response_format`: text, any JSON object, or JSON that validates against a schema.
fn response_format(v: Option<&Value>) -> Result<Option<Constraint>, ApiError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let bad = |m: &str| ApiError::bad_request(m.to_string()).with_param("response_format");
    match v["type"].as_str() {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Constraint::JsonSchema(json!({"type": "object"})))),
        Some("json_schema") => {
            let s = &v["json_schema"];
            if !s["name"].is_string() {
                return Err(bad("response_format.json_schema.name is required"));
            }
            match &s["schema"] {
                Value::Object(_) => Ok(Some(Constraint::JsonSchema(s["schema"].clone()))),
                Value::Null => Ok(Some(Constraint::JsonSchema(json!({"type": "object"})))),
                _ => Err(bad(
                    "response_format.json_schema.schema must be a JSON schema object",
                )),
            }
        }
        _ => Err(bad(
            "response_format.type must be text, json_object or json_schema",
        )),
    }
}

pub fn completion(req: CompletionRequest, limits: &Limits) -> Result<Validated, ApiError> {
    check_other(&req.other)?;
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
        Value::String(s) => s,
        Value::Array(items) if items.len() == 1 && items[0].is_string() => {
            items[0].as_str().unwrap_or_default().to_string()
        }
        Value::Array(_) => {
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
    let logprobs = match &req.common.logprobs {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(n) if n <= 5 => Some(n as usize),
            _ => {
                return Err(
                    ApiError::bad_request("logprobs must be an integer between 0 and 5")
                        .with_param("logprobs"),
                );
            }
        },
    };
    if req.common.top_logprobs.is_some() {
        return Err(ApiError::bad_request(
            "top_logprobs is a chat parameter; completions take logprobs: N",
        )
        .with_param("top_logprobs"));
    }
    let mut v = common(req.common, Prompt::Text(prompt), Vec::new(), limits)?;
    v.request.sampling.logprobs = logprobs;
    v.logprobs = logprobs.is_some();
    Ok(v)
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

/// `logit_bias`: token id (as a string) → bias in [-100, 100].
fn logit_bias(m: Option<serde_json::Map<String, Value>>) -> Result<Vec<(u32, f32)>, ApiError> {
    let Some(m) = m else {
        return Ok(Vec::new());
    };
    if m.len() > 300 {
        return Err(
            ApiError::bad_request("logit_bias takes at most 300 tokens").with_param("logit_bias")
        );
    }
    m.into_iter()
        .map(|(k, v)| {
            let t = k.parse::<u32>().map_err(|_| {
                ApiError::bad_request(format!("logit_bias key {k:?} is not a token id"))
                    .with_param("logit_bias")
            })?;
            match v.as_f64() {
                Some(b) if (-100.0..=100.0).contains(&b) => Ok((t, b as f32)),
                _ => Err(ApiError::bad_request(format!(
                    "logit_bias[{k}] must be a number between -100 and 100"
                ))
                .with_param("logit_bias")),
            }
        })
        .collect()
}

fn common(
    c: Common,
    prompt: Prompt,
    mut constraints: Vec<(&'static str, Constraint)>,
    limits: &Limits,
) -> Result<Validated, ApiError> {
    if c.model.is_empty() {
        return Err(ApiError::bad_request("model is required").with_param("model"));
    }
    let n = c.n.unwrap_or(1);
    if n == 0 || n > limits.max_n {
        return Err(ApiError::bad_request(format!(
            "n must be between 1 and this gateway's limit of {}",
            limits.max_n
        ))
        .with_param("n"));
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
        if v.is_some_and(|v| !(-2.0..=2.0).contains(&v)) {
            return Err(
                ApiError::bad_request(format!("{name} must be between -2 and 2")).with_param(name),
            );
        }
    }
    let logit_bias = logit_bias(c.logit_bias)?;
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
    if let Some(r) = c.guided_regex {
        constraints.push(("guided_regex", Constraint::Regex(r)));
    }
    if let Some(g) = c.guided_grammar {
        constraints.push(("guided_grammar", Constraint::Lark(g)));
    }
    if let Some(s) = c.guided_json {
        if !s.is_object() {
            return Err(
                ApiError::bad_request("guided_json must be a JSON schema object")
                    .with_param("guided_json"),
            );
        }
        constraints.push(("guided_json", Constraint::JsonSchema(s)));
    }
    if constraints.len() > 1 {
        let names: Vec<&str> = constraints.iter().map(|(n, _)| *n).collect();
        return Err(ApiError::bad_request(format!(
            "{} each constrain the answer; give only one",
            names.join(" and ")
        ))
        .with_param(names[1]));
    }
    let stream = c.stream.unwrap_or(false);
    Ok(Validated {
        model: c.model,
        stream,
        include_usage: stream && c.stream_options.is_some_and(|o| o.include_usage),
        user: c.user.filter(|u| !u.is_empty()),
        n: n as usize,
        tools: None,
        logprobs: false,
        request: GenerateRequest {
            prompt,
            sampling: Sampling {
                max_tokens: max_tokens as usize,
                // OpenAI's default when the request leaves it out.
                temperature: c.temperature.unwrap_or(1.0),
                top_p: c.top_p,
                seed: c.seed.map(|s| s as u64),
                stop,
                presence_penalty: c.presence_penalty.unwrap_or(0.0) as f32,
                frequency_penalty: c.frequency_penalty.unwrap_or(0.0) as f32,
                logit_bias,
                logprobs: None,
                constraint: constraints.pop().map(|(_, c)| c),
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat_req(v: Value) -> Result<Validated, ApiError> {
        chat(serde_json::from_value(v).unwrap(), &Limits::default())
    }

    #[test]
    fn accepts_what_openai_clients_send() {
        let v = chat_req(json!({
            "model": "bot", "messages": [{"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
            {"role": "user", "content": "hi", "name": "ann"}], "stream": true, "stream_options": {"include_usage": true},
            "stop": "\n", "seed": 7, "user": "u1", "max_completion_tokens": 5, "logprobs": false,
            "store": false, "metadata": {"team": "a"}, "n": 3, "presence_penalty": 0.5,
            "logit_bias": {"42": -100}
        }))
        .unwrap();
        assert!(v.stream && v.include_usage);
        assert_eq!(v.user.as_deref(), Some("u1"));
        assert_eq!(v.n, 3);
        let s = &v.request.sampling;
        assert_eq!(s.max_tokens, 5);
        assert_eq!(s.stop, vec!["\n".to_string()]);
        assert_eq!(
            (s.presence_penalty, s.logit_bias.clone()),
            (0.5, vec![(42, -100.0)])
        );
        let Prompt::Chat { messages: m, tools } = v.request.prompt else {
            panic!("chat prompt expected")
        };
        assert_eq!(m[0].role, "system");
        assert_eq!(m[0].content, "be brief");
        assert_eq!(tools, None);
    }

    #[test]
    fn rejects_what_the_engine_cannot_do_naming_the_parameter() {
        let base = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
        for (field, value) in [
            ("n", json!(20)),
            ("logprobs", json!(3)),
            ("top_logprobs", json!(2)),
            ("presence_penalty", json!(5.0)),
            ("tools", json!([{"type": "retrieval"}])),
            ("tool_choice", json!("required")),
            ("functions", json!([{"name": "f"}])),
            ("max_tokens", json!(1_000_000)),
            ("temperature", json!(3.0)),
            ("logit_bias", json!({"x": 1})),
            ("top_k", json!(5)),
            ("response_format", json!({"type": "xml"})),
        ] {
            let mut b = base.clone();
            b[field] = value;
            let e = chat_req(b).unwrap_err();
            assert_eq!(e.status, 400, "{field}");
            let param = e.detail.param.as_deref().unwrap_or_default();
            assert!(param.starts_with(field), "{field}: {param}");
        }
        let mut b = base.clone();
        b["top_k"] = json!(5);
        let e = chat_req(b).unwrap_err();
        assert_eq!(
            e.detail.message,
            "Unrecognized request argument supplied: top_k"
        );
        let mut b = base.clone();
        b["temperature"] = json!(0.7);
        b["seed"] = json!(1);
        assert_eq!(chat_req(b).unwrap().request.sampling.seed, Some(1));
        // Left out, the temperature is OpenAI's default, not greedy.
        let t = chat_req(base.clone()).unwrap().request.sampling.temperature;
        assert_eq!(t, 1.0);
        let mut b = base;
        b["messages"][0]["content"] = json!("x".repeat(300 << 10));
        assert_eq!(chat_req(b).unwrap_err().status, 413);
    }

    #[test]
    fn tools_render_and_force_calls_as_asked() {
        let weather = json!({"type": "function", "function": {"name": "weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}});
        let base = json!({"model": "m", "tools": [weather], "messages": [
            {"role": "user", "content": "Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]});
        let v = chat_req(base.clone()).unwrap();
        assert_eq!(
            v.tools,
            Some(ToolUse {
                parallel: true,
                named: false
            })
        );
        assert_eq!(v.request.sampling.constraint, None, "auto forces nothing");
        let Prompt::Chat { messages, tools } = &v.request.prompt else {
            panic!()
        };
        assert_eq!(tools.as_ref().unwrap()[0]["function"]["name"], "weather");
        let call = &messages[1].tool_calls.as_ref().unwrap()[0];
        assert_eq!(call["function"]["arguments"]["city"], "Paris");
        assert_eq!(messages[2].tool_call_id.as_deref(), Some("call_1"));

        let mut b = base.clone();
        b["tool_choice"] = json!({"type": "function", "function": {"name": "weather"}});
        b["parallel_tool_calls"] = json!(false);
        let v = chat_req(b).unwrap();
        assert!(matches!(
            v.request.sampling.constraint,
            Some(Constraint::Lark(_))
        ));
        assert_eq!(
            v.tools,
            Some(ToolUse {
                parallel: false,
                named: true
            })
        );

        let mut b = base.clone();
        b["tool_choice"] = json!("none");
        let v = chat_req(b).unwrap();
        assert_eq!(v.tools, None);
        let Prompt::Chat { tools, .. } = &v.request.prompt else {
            panic!()
        };
        assert_eq!(*tools, None, "tool_choice none shows the model no tools");

        let mut b = base.clone();
        b["tool_choice"] = json!({"type": "function", "function": {"name": "time"}});
        assert_eq!(
            chat_req(b).unwrap_err().detail.param.as_deref(),
            Some("tool_choice")
        );
        let mut b = base.clone();
        b["tool_choice"] = json!("required");
        b["response_format"] = json!({"type": "json_object"});
        assert_eq!(chat_req(b).unwrap_err().status, 400);
        let mut b = base;
        b["messages"][2]["tool_call_id"] = Value::Null;
        assert_eq!(
            chat_req(b).unwrap_err().detail.param.as_deref(),
            Some("messages[2].tool_call_id")
        );
    }

    #[test]
    fn response_formats_become_constraints() {
        let base = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
        let mut b = base.clone();
        b["response_format"] = json!({"type": "json_object"});
        assert_eq!(
            chat_req(b).unwrap().request.sampling.constraint,
            Some(Constraint::JsonSchema(json!({"type": "object"})))
        );
        let schema =
            json!({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]});
        let mut b = base.clone();
        b["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": true}});
        assert_eq!(
            chat_req(b).unwrap().request.sampling.constraint,
            Some(Constraint::JsonSchema(schema))
        );
        let mut b = base.clone();
        b["guided_regex"] = json!("[0-9]+");
        assert_eq!(
            chat_req(b).unwrap().request.sampling.constraint,
            Some(Constraint::Regex("[0-9]+".into()))
        );
        let mut b = base;
        b["logprobs"] = json!(true);
        b["top_logprobs"] = json!(3);
        let v = chat_req(b).unwrap();
        assert!(v.logprobs);
        assert_eq!(v.request.sampling.logprobs, Some(3));
    }
}
