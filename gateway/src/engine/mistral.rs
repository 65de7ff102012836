//! The mistral.rs backend: mistral.rs 0.8.1 in-process, for a deployment that serves one hot
//! adapter merged (with its ISQ quantisation and CUDA kernels).
//!
//! 0.8.1 merges a LoRA adapter into the weights at load time and has no per-request adapter
//! selection, so every served version is its own [`MistralEngine`] holding a merged copy of the
//! base, kept in an [`EnginePool`]. It only loads adapters through the Hugging Face hub API,
//! which resolves a local hub-cache layout (see [`crate::adapters`]) under `HF_HUB_CACHE`
//! without network access.

use std::path::PathBuf;
use std::sync::Arc;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;

use either::Either;
use mistralrs::core::RequestMessage;
use mistralrs::{
    Constraint, IsqType, LoraModelBuilder, Model, ModelDType, NormalRequest, Request, RequestLike,
    Response, SamplingParams, StopTokens, TextMessageRole, TextMessages, TextModelBuilder,
    TokenSource,
};
use tokio::sync::mpsc;

use super::{
    Backend, Engine, EngineError, EngineInfo, EngineKey, Event, EventStream, GenerateRequest,
    Logprob, Prompt, TokenUsage, TopLogprob,
};
use crate::adapters::AdapterStore;
use crate::pool::{EngineLoader, EnginePool};

/// Loads the base directory, merged with the key's adapter from the adapter cache.
pub struct MistralLoader {
    pub base_dir: PathBuf,
    pub store: AdapterStore,
    pub dtype: ModelDType,
    pub max_num_seqs: usize,
    pub isq: Option<IsqType>,
}

impl EngineLoader for MistralLoader {
    fn load(&self, key: EngineKey) -> BoxFuture<'static, Result<Arc<dyn Engine>, String>> {
        let store = self.store.clone();
        let mut spec = LoadSpec {
            base_dir: self.base_dir.clone(),
            adapter_id: None,
            dtype: self.dtype,
            max_num_seqs: self.max_num_seqs,
            isq: self.isq,
        };
        Box::pin(async move {
            if let EngineKey::Version {
                adapter,
                version,
                digest,
            } = &key
            {
                let dir = store
                    .ensure(adapter, *version, digest)
                    .await
                    .map_err(|e| e.to_string())?;
                AdapterStore::check_mergeable(&dir, adapter, *version)
                    .await
                    .map_err(|e| e.to_string())?;
                spec.adapter_id = Some(AdapterStore::hub_id(digest));
            }
            let engine: Arc<dyn Engine> =
                Arc::new(MistralEngine::load(spec).await.map_err(|e| e.to_string())?);
            Ok(engine)
        })
    }
}

/// Every version its own merged engine, in a pool.
pub struct MistralBackend {
    pool: Arc<EnginePool>,
    identity: EngineInfo,
}

impl MistralBackend {
    pub fn new(pool: EnginePool, isq: Option<IsqType>) -> Self {
        Self {
            pool: Arc::new(pool),
            identity: identity(isq),
        }
    }

    pub fn pool(&self) -> &EnginePool {
        &self.pool
    }
}

fn identity(isq: Option<IsqType>) -> EngineInfo {
    EngineInfo {
        name: "mistral.rs".into(),
        version: MISTRALRS_VERSION.into(),
        quantization: isq
            .map(|q| format!("{q:?}").to_ascii_lowercase())
            .unwrap_or_else(|| "none".into()),
    }
}

fn load_error(key: &EngineKey, message: String) -> EngineError {
    EngineError::Load {
        what: key.to_string(),
        message,
    }
}

impl Backend for MistralBackend {
    fn identity(&self) -> &EngineInfo {
        &self.identity
    }

    fn generate(
        &self,
        key: EngineKey,
        req: GenerateRequest,
    ) -> BoxFuture<'static, Result<EventStream, EngineError>> {
        let pool = self.pool.clone();
        async move {
            if req.sampling.seed.is_some() && req.sampling.temperature > 0.0 {
                return Err(EngineError::Rejected(
                    "seed needs temperature 0 on the mistral.rs engine (0.8.1 has no per-request seed); the native engine supports it".into(),
                ));
            }
            let engine = pool.get(&key).await.map_err(|m| load_error(&key, m))?;
            Ok(engine.generate(req))
        }
        .boxed()
    }

    fn load(&self, key: EngineKey) -> BoxFuture<'static, Result<(), EngineError>> {
        let pool = self.pool.clone();
        async move {
            pool.reload(&key)
                .await
                .map(|_| ())
                .map_err(|m| load_error(&key, m))
        }
        .boxed()
    }

    fn unload(&self, key: &EngineKey) -> bool {
        *key != EngineKey::Base && self.pool.unload(key)
    }

    fn pin(&self, keys: &[EngineKey]) {
        self.pool.pin(keys);
    }

    fn is_resident(&self, key: &EngineKey) -> bool {
        self.pool.is_loaded(key)
    }

    fn resident(&self) -> Vec<String> {
        self.pool
            .loaded()
            .into_iter()
            .filter(|k| *k != EngineKey::Base)
            .map(|k| k.to_string())
            .collect()
    }

    fn base_ready(&self) -> bool {
        self.pool.is_loaded(&EngineKey::Base)
    }
}

/// The mistral.rs release linked in (pinned with `=` in gateway/Cargo.toml; a test keeps the two
/// in step).
pub const MISTRALRS_VERSION: &str = "0.8.1";

/// What to load: a base directory, optionally with one adapter merged in.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Absolute path of a Hugging Face model directory.
    pub base_dir: PathBuf,
    /// Hub id (`ORG/NAME`) of an adapter present in the hub cache.
    pub adapter_id: Option<String>,
    pub dtype: ModelDType,
    /// Sequences batched together by the engine's scheduler.
    pub max_num_seqs: usize,
    /// Quantise the (merged) weights in place at load, to cut each engine's memory.
    pub isq: Option<IsqType>,
}

/// Parse an in-situ quantisation type: `q4_0`, `q4_1`, `q5_0`, `q5_1`, `q8_0`, `q2k` … `q8k`,
/// `hqq4`, `hqq8` (case-insensitive).
pub fn parse_isq(s: &str) -> Option<IsqType> {
    Some(match s.to_ascii_lowercase().as_str() {
        "q4_0" => IsqType::Q4_0,
        "q4_1" => IsqType::Q4_1,
        "q5_0" => IsqType::Q5_0,
        "q5_1" => IsqType::Q5_1,
        "q8_0" => IsqType::Q8_0,
        "q8_1" => IsqType::Q8_1,
        "q2k" => IsqType::Q2K,
        "q3k" => IsqType::Q3K,
        "q4k" => IsqType::Q4K,
        "q5k" => IsqType::Q5K,
        "q6k" => IsqType::Q6K,
        "q8k" => IsqType::Q8K,
        "hqq4" => IsqType::HQQ4,
        "hqq8" => IsqType::HQQ8,
        _ => return None,
    })
}

/// Parse `auto|bf16|f16|f32`.
pub fn parse_dtype(s: &str) -> Option<ModelDType> {
    Some(match s {
        "auto" => ModelDType::Auto,
        "bf16" => ModelDType::BF16,
        "f16" => ModelDType::F16,
        "f32" => ModelDType::F32,
        _ => return None,
    })
}

pub struct MistralEngine {
    model: Arc<Model>,
    identity: EngineInfo,
    /// The base's tokenizer and chat template, for chats with tools or tool calls: loraops
    /// renders those itself (as the native engine does) so that every engine parses the same
    /// tool-call format.
    tokenizer: Option<Arc<loraops_model::tokenizer::Tokenizer>>,
}

impl MistralEngine {
    /// Build on a dedicated thread: `build()` blocks for the whole load, and 0.8.1 keeps the
    /// adapters it applied in a per-thread list it never clears, so a later load on the same
    /// thread would silently merge earlier adapters too. A fresh thread with the list cleared
    /// makes every engine exactly its own base + adapter.
    pub async fn load(spec: LoadSpec) -> Result<Self, EngineError> {
        let identity = identity(spec.isq);
        let tokenizer = loraops_model::tokenizer::Tokenizer::load(&spec.base_dir)
            .ok()
            .map(Arc::new);
        let what = match &spec.adapter_id {
            Some(id) => format!("{} + {id}", spec.base_dir.display()),
            None => spec.base_dir.display().to_string(),
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("engine-load".into())
            .spawn(move || {
                mistralrs_quant::clear_applied_loras();
                let res = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())
                    .and_then(|rt| rt.block_on(build(spec)));
                mistralrs_quant::clear_applied_loras();
                let _ = tx.send(res);
            })
            .map_err(|e| EngineError::Load {
                what: what.clone(),
                message: e.to_string(),
            })?;
        let model = rx
            .await
            .map_err(|_| EngineError::Load {
                what: what.clone(),
                message: "the load thread panicked".into(),
            })?
            .map_err(|message| EngineError::Load { what, message })?;
        Ok(Self {
            model: Arc::new(model),
            identity,
            tokenizer,
        })
    }
}

/// mistral.rs' builders return `anyhow::Result`; `{:#}` keeps its cause chain on one line.
async fn build(spec: LoadSpec) -> Result<Model, String> {
    let mut text = TextModelBuilder::new(spec.base_dir.to_string_lossy())
        .with_token_source(TokenSource::None)
        .with_dtype(spec.dtype)
        .with_max_num_seqs(spec.max_num_seqs.max(1));
    if let Some(q) = spec.isq {
        text = text.with_isq(q);
    }
    let built = match spec.adapter_id {
        Some(id) => {
            LoraModelBuilder::from_text_model_builder(text, [id])
                .build()
                .await
        }
        None => text.build().await,
    };
    built.map_err(|e| format!("{e:#}"))
}

impl Engine for MistralEngine {
    fn identity(&self) -> &EngineInfo {
        &self.identity
    }

    fn generate(&self, req: GenerateRequest) -> EventStream {
        let (tx, rx) = mpsc::channel(32);
        let model = self.model.clone();
        let tokenizer = self.tokenizer.clone();
        tokio::spawn(async move {
            if let Err(e) = run(&model, tokenizer.as_deref(), req, &tx).await {
                let _ = tx.send(Err(e)).await;
            }
        });
        Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        }))
    }
}

fn sampling(req: &GenerateRequest) -> SamplingParams {
    let s = &req.sampling;
    let mut p = if s.temperature == 0.0 {
        SamplingParams::deterministic()
    } else {
        SamplingParams {
            temperature: Some(s.temperature),
            top_p: s.top_p,
            ..SamplingParams::neutral()
        }
    };
    p.max_len = Some(s.max_tokens);
    if !s.stop.is_empty() {
        p.stop_toks = Some(StopTokens::Seqs(s.stop.clone()));
    }
    if s.presence_penalty != 0.0 {
        p.presence_penalty = Some(s.presence_penalty);
    }
    if s.frequency_penalty != 0.0 {
        p.frequency_penalty = Some(s.frequency_penalty);
    }
    if !s.logit_bias.is_empty() {
        p.logits_bias = Some(s.logit_bias.iter().copied().collect());
    }
    p.top_n_logprobs = s.logprobs.unwrap_or(0);
    p
}

fn constraint(c: Option<crate::engine::Constraint>) -> Constraint {
    use crate::engine::Constraint as C;
    match c {
        Some(C::Regex(r)) => Constraint::Regex(r),
        Some(C::JsonSchema(s)) => Constraint::JsonSchema(loraops_engine::grammar::compact(&s)),
        Some(C::Lark(l)) => Constraint::Lark(l),
        None => Constraint::None,
    }
}

fn logprob(l: mistralrs::core::ResponseLogprob) -> Logprob {
    let bytes = l.bytes.unwrap_or_else(|| l.token.as_bytes().to_vec());
    Logprob {
        token: l.token,
        logprob: l.logprob,
        bytes,
        top: l
            .top_logprobs
            .into_iter()
            .map(|t| {
                let token = t.bytes.unwrap_or_default();
                TopLogprob {
                    bytes: token.as_bytes().to_vec(),
                    token,
                    logprob: t.logprob,
                }
            })
            .collect(),
    }
}

fn role(r: &str) -> TextMessageRole {
    match r {
        "user" => TextMessageRole::User,
        "assistant" => TextMessageRole::Assistant,
        "system" => TextMessageRole::System,
        other => TextMessageRole::Custom(other.to_string()),
    }
}

/// Send one request and forward its chunks as [`Event`]s. The engine always streams; a
/// non-streaming API response is the collected stream.
async fn run(
    model: &Model,
    tokenizer: Option<&loraops_model::tokenizer::Tokenizer>,
    req: GenerateRequest,
    tx: &mpsc::Sender<Result<Event, EngineError>>,
) -> Result<(), EngineError> {
    let sampling_params = sampling(&req);
    let return_logprobs = req.sampling.logprobs.is_some();
    let max_tokens = req.sampling.max_tokens as u64;
    let constraint = constraint(req.sampling.constraint);
    let messages = match req.prompt {
        Prompt::Chat { messages, tools }
            if tools.is_some()
                || messages
                    .iter()
                    .any(|m| m.tool_calls.is_some() || m.tool_call_id.is_some()) =>
        {
            let tokenizer = tokenizer.ok_or_else(|| {
                EngineError::Rejected("the base has no tokenizer.json to render tools with".into())
            })?;
            let messages: Vec<_> = messages.iter().map(|m| m.to_json()).collect();
            let text = tokenizer
                .render_chat(&serde_json::Value::Array(messages), tools.as_ref(), true)
                .map_err(|e| EngineError::Rejected(e.to_string()))?;
            Either::Right(text)
        }
        Prompt::Chat { messages, .. } => {
            let mut m = TextMessages::new();
            for msg in messages {
                m = m.add_message(role(&msg.role), msg.content);
            }
            Either::Left(m)
        }
        Prompt::Text(text) => Either::Right(text),
    };
    // Completion chunks carry no usage, and a stream can end without a final chunk (below):
    // then, and only then, the prompt is counted with the tokenizer.
    let prompt = messages.clone();
    let count_prompt = || async {
        model
            .tokenize(prompt.clone(), None, true, true, None)
            .await
            .map(|t| t.len() as u64)
            .unwrap_or(0)
    };
    let messages = match messages {
        Either::Left(mut m) => m.take_messages(),
        Either::Right(text) => RequestMessage::Completion {
            text,
            echo_prompt: false,
            best_of: None,
        },
    };
    let (rtx, mut rrx) = mpsc::channel(64);
    let request = Request::Normal(Box::new(NormalRequest {
        messages,
        sampling_params,
        response: rtx,
        return_logprobs,
        is_streaming: true,
        id: 0,
        constraint,
        suffix: None,
        tools: None,
        tool_choice: None,
        logits_processors: None,
        return_raw_logits: false,
        web_search_options: None,
        model_id: None,
        truncate_sequence: false,
    }));
    let sender = model
        .inner()
        .get_sender(None)
        .map_err(|e| EngineError::Internal(e.to_string()))?;
    sender
        .send(request)
        .await
        .map_err(|e| EngineError::Internal(e.to_string()))?;

    let mut chunks = 0u64;
    let mut text = String::new();
    while let Some(resp) = rrx.recv().await {
        let (delta, lp, finish, usage) = match resp {
            Response::Chunk(c) => {
                let choice = c.choices.into_iter().next();
                let usage = c.usage.map(|u| TokenUsage {
                    prompt_tokens: u.prompt_tokens as u64,
                    completion_tokens: u.completion_tokens as u64,
                });
                match choice {
                    Some(ch) => (ch.delta.content, ch.logprobs, ch.finish_reason, usage),
                    None => (None, None, None, usage),
                }
            }
            Response::CompletionChunk(c) => match c.choices.into_iter().next() {
                Some(ch) => (Some(ch.text), ch.logprobs, ch.finish_reason, None),
                None => (None, None, None, None),
            },
            Response::ValidationError(e) => return Err(EngineError::Rejected(e.to_string())),
            Response::InternalError(e) => return Err(EngineError::Internal(e.to_string())),
            Response::ModelError(e, _) | Response::CompletionModelError(e, _) => {
                return Err(EngineError::Internal(e));
            }
            other => {
                return Err(EngineError::Internal(format!(
                    "unexpected engine response {}",
                    response_kind(&other)
                )));
            }
        };
        chunks += 1;
        if let Some(l) = lp
            && tx
                .send(Ok(Event::Logprobs(vec![logprob(l)])))
                .await
                .is_err()
        {
            return Ok(());
        }
        if let Some(d) = delta.filter(|d| !d.is_empty()) {
            text.push_str(&d);
            if tx.send(Ok(Event::Delta(d))).await.is_err() {
                // The client went away; dropping `rrx` tells the engine to stop.
                return Ok(());
            }
        }
        if let Some(reason) = finish {
            let usage = match usage {
                Some(u) => u,
                None => TokenUsage {
                    prompt_tokens: count_prompt().await,
                    completion_tokens: chunks,
                },
            };
            let _ = tx
                .send(Ok(Event::Done {
                    finish_reason: reason,
                    usage,
                }))
                .await;
            return Ok(());
        }
    }
    // 0.8.1 streams only text that is valid UTF-8 so far, and when a sequence ends on
    // bytes that are not (a byte-level tokenizer can stop mid-character) it finishes without
    // a final chunk and closes the channel. Errors always arrive as responses, so a clean
    // close is the end of the generation: the held-back partial character is dropped, and
    // the completion length is recounted from the text (at least one token per chunk).
    let counted = if text.is_empty() {
        0
    } else {
        model
            .tokenize(Either::Right(text), None, false, false, None)
            .await
            .map(|t| t.len() as u64)
            .unwrap_or(0)
    };
    let completion_tokens = counted.max(chunks).min(max_tokens.max(1));
    let finish_reason = if completion_tokens >= max_tokens {
        "length"
    } else {
        "stop"
    };
    let _ = tx
        .send(Ok(Event::Done {
            finish_reason: finish_reason.into(),
            usage: TokenUsage {
                prompt_tokens: count_prompt().await,
                completion_tokens,
            },
        }))
        .await;
    Ok(())
}

fn response_kind(r: &Response) -> &'static str {
    match r {
        Response::Done(_) => "Done",
        Response::CompletionDone(_) => "CompletionDone",
        Response::ImageGeneration(_) => "ImageGeneration",
        Response::Speech { .. } => "Speech",
        Response::Raw { .. } => "Raw",
        Response::Embeddings { .. } => "Embeddings",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reported_version_is_the_pinned_one() {
        let manifest = include_str!("../../Cargo.toml");
        assert!(
            manifest.contains(&format!("mistralrs = \"={MISTRALRS_VERSION}\"")),
            "gateway/Cargo.toml pins another mistral.rs than MISTRALRS_VERSION"
        );
    }

    #[test]
    fn quantization_names_round_trip() {
        for name in ["q4_0", "q8_0", "q4k", "hqq8"] {
            let q = parse_isq(name).expect("known");
            assert_eq!(format!("{q:?}").to_ascii_lowercase(), name);
        }
    }
}
