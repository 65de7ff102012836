//! The inference backends behind the gateway. Requests arrive here already validated and
//! routed to an [`EngineKey`] (the base, or one version of an adapter); a [`Backend`] turns
//! them into a stream of text deltas ending in one `Done` event. Non-streaming responses collect
//! the same stream, so both modes produce the same tokens.
//!
//! Each engine kind owns its residency (what is loaded, what is evicted):
//! - [`native`]: loraops' own engine, one base copy and adapters in slots (the default);
//! - [`mistral`]: mistral.rs, one merged engine per version in an LRU;
//! - [`remote`]: an OpenAI-compatible upstream that places adapters through the LoRA control
//!   contract (`/v1/load_lora_adapter`).

pub mod mistral;
pub mod native;
pub mod remote;

use std::sync::Arc;

use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use loraops_registry::api::Name;

pub use loraops_engine::Constraint;

/// One chat message after validation (text content only). Assistant messages may carry the
/// calls they made and `tool` messages the call they answer, in OpenAI's JSON shape, which is
/// what chat templates expect.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    pub tool_calls: Option<serde_json::Value>,
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            ..Default::default()
        }
    }

    /// The message as a chat template reads it.
    pub fn to_json(&self) -> serde_json::Value {
        let mut m = serde_json::json!({"role": self.role, "content": self.content});
        if let Some(c) = &self.tool_calls {
            m["tool_calls"] = c.clone();
        }
        if let Some(id) = &self.tool_call_id {
            m["tool_call_id"] = serde_json::json!(id);
        }
        m
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Rendered with the model's chat template, with the function definitions `tools` (OpenAI's
    /// `tools` array) when the request offers any.
    Chat {
        messages: Vec<ChatMessage>,
        tools: Option<serde_json::Value>,
    },
    /// Sent as is (`/v1/completions`).
    Text(String),
}

impl Prompt {
    pub fn chat(messages: Vec<ChatMessage>) -> Self {
        Self::Chat {
            messages,
            tools: None,
        }
    }
}

/// Decoding options the engine honours; anything else was rejected during validation.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Sampling {
    pub max_tokens: usize,
    /// 0: greedy. Requests that leave it out get OpenAI's default, 1.
    pub temperature: f64,
    pub top_p: Option<f64>,
    /// The same seed and request give the same tokens.
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Added to the logits of these token ids.
    pub logit_bias: Vec<(u32, f32)>,
    /// Report each token's log-probability and this many most likely alternatives.
    pub logprobs: Option<usize>,
    /// What the answer must match (constrained decoding): `response_format`, a forced tool
    /// call, the `guided_*` fields, or the online judge's score.
    pub constraint: Option<Constraint>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub prompt: Prompt,
    pub sampling: Sampling,
}

/// Named as OpenAI's `usage` names them, so an upstream's `usage` reads straight into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(default)]
pub struct TokenUsage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// One alternative at a position.
#[derive(Debug, Clone, PartialEq)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

/// The model's log-probability of one generated token, with its most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct Logprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top: Vec<TopLogprob>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Delta(String),
    /// Log-probabilities of the tokens whose text the next `Delta` (or the `Done`) releases;
    /// only when the request asked for them.
    Logprobs(Vec<Logprob>),
    Done {
        finish_reason: String,
        usage: TokenUsage,
    },
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// The engine refused the request (e.g. the prompt exceeds the context): 400.
    #[error("{0}")]
    Rejected(String),
    /// Full for now: 429.
    #[error("{0}")]
    Overloaded(String),
    #[error("engine failure: {0}")]
    Internal(String),
    /// The version cannot be served (its load failed, or failed recently): 503.
    #[error("cannot load {what}: {message}")]
    Load { what: String, message: String },
}

pub type EventStream = BoxStream<'static, Result<Event, EngineError>>;

/// What produces the tokens, sent with every answer (`x-loraops-engine*` headers) so that
/// evaluation evidence records the engine that actually served it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineInfo {
    pub name: String,
    pub version: String,
    /// In-situ quantisation applied at load (`q8_0`, …), `none` for full-precision weights.
    pub quantization: String,
}

/// A loaded model, base or base+adapter, that can serve generation requests concurrently
/// (what the mistral.rs and remote backends hold per version).
pub trait Engine: Send + Sync + 'static {
    fn generate(&self, req: GenerateRequest) -> EventStream;
    fn identity(&self) -> &EngineInfo;
}

/// What serves a request: the base model, or one version of an adapter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EngineKey {
    Base,
    Version {
        adapter: Name,
        version: u32,
        digest: String,
    },
}

impl std::fmt::Display for EngineKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Base => f.write_str("base"),
            Self::Version {
                adapter, version, ..
            } => write!(f, "{adapter}@{version}"),
        }
    }
}

/// One engine kind with its residency: the gateway's only view of inference.
pub trait Backend: Send + Sync + 'static {
    /// What produces the tokens (response headers and evaluation evidence name it).
    fn identity(&self) -> &EngineInfo;

    /// Generate for `key`, making it resident first if it is not (a request for a version
    /// that is loading waits for that load; one whose load failed recently gets the cause).
    fn generate(
        &self,
        key: EngineKey,
        req: GenerateRequest,
    ) -> BoxFuture<'static, Result<EventStream, EngineError>>;

    /// Make `key` resident, or say why it cannot be.
    fn load(&self, key: EngineKey) -> BoxFuture<'static, Result<(), EngineError>>;

    /// Drop `key` if resident; running requests finish on it.
    fn unload(&self, key: &EngineKey) -> bool;

    /// The versions the routing table serves: never evicted while pinned.
    fn pin(&self, keys: &[EngineKey]);

    fn is_resident(&self, key: &EngineKey) -> bool;

    /// `NAME@V` of every resident version (not the base).
    fn resident(&self) -> Vec<String>;

    /// Whether the base is loaded: the gateway is ready only then.
    fn base_ready(&self) -> bool;
}

pub type SharedBackend = Arc<dyn Backend>;
