//! loraops engine: one resident copy of a base model serving many LoRA adapters at once.
//!
//! A request names its adapter (or none, for the base); the engine keeps adapters unmerged in
//! bounded slots ([`adapters`]), batches running sequences continuously ([`scheduler`]) with a
//! KV cache from one bounded budget ([`kv`]), and runs each step's heterogeneous batch through
//! the base once, adding each adapter's low-rank term to its own rows ([`forward`]). The model
//! (config, tokenizer, weights, NF4, PEFT reading) is `loraops-model`'s, the same code the
//! trainer trains with, so an adapter is served on exactly the base it was trained against.
//!
//! Entry point: [`Engine::start`], then [`Engine::generate`] with a tokenised prompt and an
//! adapter from [`Engine::load_adapter`] / [`Engine::adapter`].

pub mod adapters;
pub mod base;
mod dots;
pub mod forward;
pub mod grammar;
pub mod kv;
pub mod sampling;
mod scheduler;
pub mod text;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Mutex};

use loraops_model::config::RopeScaling;
use loraops_model::tokenizer::{Message, Tokenizer};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

pub use adapters::{AdapterWeights, SlotError, SlotLimits};
pub use base::Quantize;
pub use grammar::Constraint;
pub use sampling::{SamplingParams, TokenLogprob};
pub use scheduler::BatchLimits;

use kv::{KvBudget, KvShape};
use scheduler::{Command, Scheduler, Submitted};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] loraops_model::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Slots(#[from] SlotError),
    #[error("the native engine cannot serve {architecture}: it lacks {missing}")]
    UnsupportedArchitecture {
        architecture: String,
        missing: String,
    },
}

/// Why a request was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The request itself cannot be served (names the problem).
    #[error("{0}")]
    Rejected(String),
    /// Too many requests are waiting; retry later.
    #[error("the engine's queue is full ({0} requests waiting)")]
    Overloaded(usize),
    #[error("the engine has stopped")]
    Stopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End of sequence, or a stop sequence.
    Stop,
    /// `max_tokens`.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// What a request produces, in order: tokens, then one `Done` (or an `Error`).
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A generated token (`id` is `None` for text flushed at the end) and the text it
    /// releases, which may be empty while a character or a possible stop sequence is pending.
    Token {
        id: Option<u32>,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    Done {
        finish: FinishReason,
        usage: Usage,
    },
    Error(String),
}

/// A tokenised request.
pub struct Request {
    pub prompt: Vec<u32>,
    /// The adapter to apply, held for the whole request; `None` serves the base.
    pub adapter: Option<Arc<AdapterWeights>>,
    pub sampling: SamplingParams,
    /// What the answer must match (constrained decoding).
    pub constraint: Option<Constraint>,
}

#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub base_dir: PathBuf,
    pub quantize: Quantize,
    /// Memory for the KV cache of all running sequences.
    pub kv_cache_bytes: usize,
    pub batch: BatchLimits,
    /// Requests waiting for cache beyond this are refused ([`SubmitError::Overloaded`]).
    pub max_waiting: usize,
    pub slots: SlotLimits,
}

impl EngineOptions {
    pub fn new(base_dir: impl Into<PathBuf>) -> Self {
        Self {
            base_dir: base_dir.into(),
            quantize: Quantize::None,
            kv_cache_bytes: 512 << 20,
            batch: BatchLimits {
                max_running: 64,
                prefill_chunk: 16,
            },
            max_waiting: 1024,
            slots: SlotLimits {
                max_adapters: 64,
                max_bytes: 2 << 30,
            },
        }
    }
}

/// The scheduler's counters, for metrics and benchmarks.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub running: usize,
    pub waiting: usize,
    pub kv_used_bytes: usize,
    pub steps: u64,
    pub tokens_fed: u64,
}

/// A running engine. Dropping the last handle lets running requests finish, then stops.
pub struct Engine {
    tx: Sender<Command>,
    tokenizer: Arc<Tokenizer>,
    slots: Mutex<adapters::Slots>,
    stats: Arc<Mutex<Stats>>,
    options: EngineOptions,
    base: Arc<base::Base>,
    grammars: grammar::Grammars,
    shape: KvShape,
    /// Positions a sequence may reach.
    context: usize,
}

impl Engine {
    /// Load the base and start the scheduler thread.
    pub fn start(options: EngineOptions) -> Result<Self, EngineError> {
        let tokenizer = Arc::new(Tokenizer::load(&options.base_dir)?);
        let base = Arc::new(base::Base::load(&options.base_dir, options.quantize)?);
        let tokenizer_json = options.base_dir.join("tokenizer.json");
        let grammars = grammar::Grammars::new(
            &loraops_model::error::read(&tokenizer_json)?,
            base.config.vocab_size,
        )?;
        let c = &base.config;
        let shape = KvShape {
            layers: c.num_hidden_layers,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
        };
        let context = match c.rope_scaling {
            // Dynamic NTK is the default RoPE below its original length; beyond, refused (as
            // the model's own forward does).
            RopeScaling::Dynamic { original_max, .. } => original_max,
            _ => c.max_position_embeddings,
        };
        let mut eos: Vec<u32> = c.eos_token_id.into_iter().collect();
        eos.extend(tokenizer.eos_id);
        let stats = Arc::new(Mutex::new(Stats::default()));
        let scheduler = Scheduler {
            base: base.clone(),
            tokenizer: tokenizer.clone(),
            shape,
            budget: KvBudget::new(options.kv_cache_bytes),
            limits: options.batch,
            stats: stats.clone(),
            eos,
        };
        let (tx, rx) = channel();
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || scheduler.run(rx))
            .map_err(|e| EngineError::Config(format!("cannot start the engine thread: {e}")))?;
        tracing::info!(
            base = %options.base_dir.display(),
            quantize = options.quantize.as_str(),
            weights_mb = base.bytes() >> 20,
            kv_cache_mb = options.kv_cache_bytes >> 20,
            "engine started"
        );
        Ok(Self {
            tx,
            tokenizer,
            slots: Mutex::new(adapters::Slots::new(options.slots)),
            stats,
            options,
            base,
            grammars,
            shape,
            context,
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn options(&self) -> &EngineOptions {
        &self.options
    }

    /// Bytes of the resident base weights.
    pub fn base_bytes(&self) -> usize {
        self.base.bytes()
    }

    /// The model's context length: prompt and answer together stay below it.
    pub fn context_length(&self) -> usize {
        self.context
    }

    pub fn stats(&self) -> Stats {
        self.stats.lock().expect("stats lock").clone()
    }

    /// Token ids of a chat rendered with the model's template (with the generation prompt).
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>, loraops_model::Error> {
        let text = self.tokenizer.apply_chat_template(messages, true)?;
        self.encode_text(&text)
    }

    /// Token ids of a chat in OpenAI's shape (tool calls, tool results) with the function
    /// definitions `tools`, rendered by the model's template as transformers renders it.
    pub fn encode_chat_json(
        &self,
        messages: &serde_json::Value,
        tools: Option<&serde_json::Value>,
    ) -> Result<Vec<u32>, loraops_model::Error> {
        let text = self.tokenizer.render_chat(messages, tools, true)?;
        self.encode_text(&text)
    }

    /// The bytes a token stands for (a byte-level token may be part of a character).
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let b = self.grammars.trie().token(id);
        // Special tokens are kept as 0xFF followed by their text.
        b.strip_prefix(&[0xFF]).unwrap_or(b).to_vec()
    }

    /// Token ids of a raw prompt, with the BOS token where the tokenizer adds one.
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>, loraops_model::Error> {
        let mut ids = Vec::new();
        if self.tokenizer.add_bos
            && let Some(b) = self.tokenizer.bos_id
        {
            ids.push(b);
        }
        ids.extend(self.tokenizer.encode(text)?);
        Ok(ids)
    }

    /// Start generating. Tokens arrive on the returned channel; dropping it cancels the
    /// request at the next step.
    pub fn generate(&self, request: Request) -> Result<UnboundedReceiver<Event>, SubmitError> {
        let n = request.prompt.len();
        let max_tokens = request.sampling.max_tokens.max(1);
        if n == 0 {
            return Err(SubmitError::Rejected("the prompt is empty".into()));
        }
        let vocab = self.base.config.vocab_size;
        if let Some(t) = request.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(SubmitError::Rejected(format!(
                "token id {t} is outside the model's vocabulary of {vocab}"
            )));
        }
        if let Some((t, _)) = request
            .sampling
            .logit_bias
            .iter()
            .find(|(t, _)| *t as usize >= vocab)
        {
            return Err(SubmitError::Rejected(format!(
                "logit_bias names token {t}, outside the model's vocabulary of {vocab}"
            )));
        }
        if n + max_tokens > self.context {
            return Err(SubmitError::Rejected(format!(
                "the prompt ({n} tokens) and max_tokens ({max_tokens}) exceed the model's context of {} tokens",
                self.context
            )));
        }
        let cap = n + max_tokens - 1;
        let need = self.shape.bytes_for(cap);
        if need > self.options.kv_cache_bytes {
            return Err(SubmitError::Rejected(format!(
                "the prompt ({n} tokens) and max_tokens ({max_tokens}) need {} MiB of KV cache, more than this engine's {} MiB; lower max_tokens",
                need.div_ceil(1 << 20),
                self.options.kv_cache_bytes >> 20
            )));
        }
        let waiting = self.stats.lock().expect("stats lock").waiting;
        if waiting >= self.options.max_waiting {
            return Err(SubmitError::Overloaded(waiting));
        }
        let matcher = request
            .constraint
            .as_ref()
            .map(|c| self.grammars.matcher(c))
            .transpose()
            .map_err(SubmitError::Rejected)?;
        let (out, rx) = unbounded_channel();
        let mut request = request;
        request.sampling.max_tokens = max_tokens;
        self.tx
            .send(Command::Submit(Box::new(Submitted {
                request,
                out,
                cap,
                matcher,
            })))
            .map_err(|_| SubmitError::Stopped)?;
        Ok(rx)
    }

    /// Read a PEFT adapter directory and make it resident as `id` (replacing an adapter of
    /// that id; requests running on the old weights keep them). Blocking: call it off the
    /// async runtime.
    pub fn load_adapter(&self, id: &str, dir: &Path) -> Result<Arc<AdapterWeights>, EngineError> {
        let w = Arc::new(AdapterWeights::read(id, dir, &self.base.config)?);
        let evicted = self.slots.lock().expect("slots lock").insert(w.clone())?;
        for e in evicted {
            tracing::info!(adapter = %e, "adapter evicted (least recently used)");
        }
        Ok(w)
    }

    /// Read a PEFT adapter directory without making it resident: the caller holds the only
    /// reference (a request served while every slot holds a pinned adapter). Blocking.
    pub fn read_adapter(&self, id: &str, dir: &Path) -> Result<Arc<AdapterWeights>, EngineError> {
        Ok(Arc::new(AdapterWeights::read(id, dir, &self.base.config)?))
    }

    /// The resident adapter `id`, marked as used.
    pub fn adapter(&self, id: &str) -> Option<Arc<AdapterWeights>> {
        self.slots.lock().expect("slots lock").get(id)
    }

    pub fn has_adapter(&self, id: &str) -> bool {
        self.slots.lock().expect("slots lock").contains(id)
    }

    pub fn unload_adapter(&self, id: &str) -> bool {
        self.slots.lock().expect("slots lock").remove(id)
    }

    /// Adapters that must stay resident (the versions routing serves).
    pub fn pin_adapters(&self, ids: HashSet<String>) {
        self.slots.lock().expect("slots lock").set_pinned(ids);
    }

    pub fn adapters(&self) -> Vec<String> {
        self.slots.lock().expect("slots lock").ids()
    }

    /// Bytes of the resident adapters.
    pub fn adapter_bytes(&self) -> usize {
        self.slots.lock().expect("slots lock").bytes()
    }
}
