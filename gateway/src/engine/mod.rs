//! The inference backend behind the gateway. Requests arrive here already validated and routed:
//! an engine only turns a prompt into a stream of text deltas ending in one `Done` event.
//! Non-streaming responses collect the same stream, so both modes produce the same tokens.

pub mod mistral;
pub mod remote;

use futures_util::stream::BoxStream;

/// One chat message after validation (text content only).
#[derive(Debug, Clone, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
    /// Sent as is (`/v1/completions`).
    Text(String),
}

/// Decoding options the engine honours; anything else was rejected during validation.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Sampling {
    pub max_tokens: usize,
    /// `None` or 0: greedy.
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub stop: Vec<String>,
    /// A regular expression the output must match (constrained decoding). Only the gateway's
    /// own requests set it (the online judge's score); the OpenAI API does not expose it.
    pub constraint: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub prompt: Prompt,
    pub sampling: Sampling,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TokenUsage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Delta(String),
    Done {
        finish_reason: String,
        usage: TokenUsage,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The engine refused the request (e.g. the prompt exceeds the context).
    #[error("{0}")]
    Rejected(String),
    #[error("engine failure: {0}")]
    Internal(String),
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

/// A loaded model, base or base+adapter, that can serve generation requests concurrently.
pub trait Engine: Send + Sync + 'static {
    fn generate(&self, req: GenerateRequest) -> EventStream;
    fn identity(&self) -> &EngineInfo;
}
