//! The native backend: loraops' own engine (`loraops-engine`), one resident base serving every
//! adapter unmerged. A version becomes resident by pulling its files into the adapter cache
//! (sha256-verified) and reading them into an engine slot; requests carry the adapter they
//! started with to the end.

use std::sync::Arc;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use loraops_engine::{AdapterWeights, Engine as NativeEngine, EngineOptions, SubmitError};
use loraops_model::tokenizer::Message;

use super::{
    Backend, EngineError, EngineInfo, EngineKey, Event, EventStream, GenerateRequest, Logprob,
    Prompt, TokenUsage, TopLogprob,
};
use crate::adapters::AdapterStore;
use crate::residency::Flights;

pub struct NativeBackend {
    inner: Arc<Inner>,
}

struct Inner {
    engine: NativeEngine,
    store: AdapterStore,
    flights: Flights<EngineKey, Arc<AdapterWeights>>,
    identity: EngineInfo,
    /// Longest prompt accepted, in tokens (`[gateway] max_prompt_tokens`).
    max_prompt_tokens: usize,
}

/// The engine slot id of a version.
fn slot_id(key: &EngineKey) -> String {
    key.to_string()
}

impl NativeBackend {
    /// Load the base (blocking: call it off the async runtime's workers).
    pub fn start(
        options: EngineOptions,
        store: AdapterStore,
        max_prompt_tokens: usize,
    ) -> Result<Self, EngineError> {
        let quantization = options.quantize.as_str().to_string();
        let what = options.base_dir.display().to_string();
        let engine = NativeEngine::start(options).map_err(|e| EngineError::Load {
            what,
            message: e.to_string(),
        })?;
        Ok(Self {
            inner: Arc::new(Inner {
                engine,
                store,
                flights: Flights::default(),
                max_prompt_tokens,
                identity: EngineInfo {
                    name: "loraops".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    quantization,
                },
            }),
        })
    }

    pub fn engine(&self) -> &NativeEngine {
        &self.inner.engine
    }
}

impl Inner {
    /// The version's adapter, resident (loading it once if it is not).
    async fn adapter(
        self: &Arc<Self>,
        key: &EngineKey,
    ) -> Result<Arc<AdapterWeights>, EngineError> {
        let EngineKey::Version {
            adapter,
            version,
            digest,
        } = key
        else {
            unreachable!("the base has no adapter")
        };
        let id = slot_id(key);
        if let Some(a) = self.engine.adapter(&id) {
            return Ok(a);
        }
        let me = self.clone();
        let (name, version, digest) = (adapter.clone(), *version, digest.clone());
        self.flights
            .run(key, move || async move {
                let dir = me
                    .store
                    .ensure(&name, version, &digest)
                    .await
                    .map_err(|e| e.to_string())?;
                let id = format!("{name}@{version}");
                tokio::task::spawn_blocking(move || load_or_read(&me.engine, &id, &dir))
                    .await
                    .map_err(|e| format!("the adapter load panicked: {e}"))?
                    .map_err(|e| e.to_string())
            })
            .await
            .map_err(|message| EngineError::Load {
                what: key.to_string(),
                message,
            })
    }
}

/// The engine's token events as gateway [`Event`]s: text deltas, each preceded by the
/// log-probabilities of the tokens it releases when the request asked for them (a token's
/// text can be held back, waiting for the rest of a character or a possible stop sequence).
struct Tokens {
    rx: tokio::sync::mpsc::UnboundedReceiver<loraops_engine::Event>,
    inner: Arc<Inner>,
    logprobs: Vec<Logprob>,
    /// The event to send after the log-probabilities just sent.
    queued: Option<Event>,
}

impl Tokens {
    fn logprob(&self, id: u32, lp: loraops_engine::TokenLogprob) -> Logprob {
        let e = &self.inner.engine;
        let top = |t: u32, logprob: f32| {
            let bytes = e.token_bytes(t);
            TopLogprob {
                token: String::from_utf8_lossy(&bytes).into_owned(),
                logprob,
                bytes,
            }
        };
        let first = top(id, lp.logprob);
        Logprob {
            token: first.token,
            logprob: first.logprob,
            bytes: first.bytes,
            top: lp.top.into_iter().map(|(t, l)| top(t, l)).collect(),
        }
    }

    /// Release `ev`, after the log-probabilities gathered so far.
    fn release(&mut self, ev: Event) -> Event {
        if self.logprobs.is_empty() {
            ev
        } else {
            self.queued = Some(ev);
            Event::Logprobs(std::mem::take(&mut self.logprobs))
        }
    }

    fn into_stream(self) -> EventStream {
        Box::pin(futures_util::stream::unfold(self, |mut st| async move {
            if let Some(ev) = st.queued.take() {
                return Some((Ok(ev), st));
            }
            loop {
                let ev = match st.rx.recv().await? {
                    loraops_engine::Event::Token { id, text, logprob } => {
                        if let (Some(id), Some(lp)) = (id, logprob) {
                            let lp = st.logprob(id, lp);
                            st.logprobs.push(lp);
                        }
                        if text.is_empty() {
                            continue;
                        }
                        Ok(st.release(Event::Delta(text)))
                    }
                    loraops_engine::Event::Done { finish, usage } => Ok(st.release(Event::Done {
                        finish_reason: finish.as_str().into(),
                        usage: TokenUsage {
                            prompt_tokens: usage.prompt_tokens as u64,
                            completion_tokens: usage.completion_tokens as u64,
                        },
                    })),
                    loraops_engine::Event::Error(m) => Err(EngineError::Internal(m)),
                };
                return Some((ev, st));
            }
        }))
    }
}

/// Make `id` resident; when every slot holds a version the routing table serves, read a copy
/// the request alone holds instead (a version pinned by name, or a request racing a routing
/// change), rather than failing until the pins change.
fn load_or_read(
    engine: &NativeEngine,
    id: &str,
    dir: &std::path::Path,
) -> Result<Arc<AdapterWeights>, loraops_engine::EngineError> {
    match engine.load_adapter(id, dir) {
        Err(loraops_engine::EngineError::Slots(loraops_engine::SlotError::NoRoom { .. })) => {
            tracing::debug!(adapter = %id, "every adapter slot is pinned; serving a transient copy");
            engine.read_adapter(id, dir)
        }
        other => other,
    }
}

impl Backend for NativeBackend {
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
            let adapter = match &key {
                EngineKey::Base => None,
                k => Some(inner.adapter(k).await?),
            };
            let e = &inner.engine;
            let prompt = match &req.prompt {
                Prompt::Chat {
                    messages,
                    tools: None,
                } if messages
                    .iter()
                    .all(|m| m.tool_calls.is_none() && m.tool_call_id.is_none()) =>
                {
                    let messages: Vec<Message> = messages
                        .iter()
                        .map(|m| Message {
                            role: m.role.clone(),
                            content: m.content.clone(),
                        })
                        .collect();
                    e.encode_chat(&messages)
                }
                Prompt::Chat { messages, tools } => {
                    let messages: Vec<_> = messages.iter().map(|m| m.to_json()).collect();
                    e.encode_chat_json(&serde_json::Value::Array(messages), tools.as_ref())
                }
                Prompt::Text(t) => e.encode_text(t),
            }
            .map_err(|e| EngineError::Rejected(e.to_string()))?;
            if prompt.len() > inner.max_prompt_tokens {
                return Err(EngineError::Rejected(format!(
                    "the prompt is {} tokens, more than this gateway's limit of {}",
                    prompt.len(),
                    inner.max_prompt_tokens
                )));
            }
            let s = &req.sampling;
            let sampling = loraops_engine::SamplingParams {
                max_tokens: s.max_tokens,
                temperature: s.temperature as f32,
                top_p: s.top_p.unwrap_or(1.0) as f32,
                seed: s.seed,
                stop: s.stop.clone(),
                presence_penalty: s.presence_penalty,
                frequency_penalty: s.frequency_penalty,
                logit_bias: s.logit_bias.clone(),
                logprobs: s.logprobs,
            };
            let rx = e
                .generate(loraops_engine::Request {
                    prompt,
                    adapter,
                    sampling,
                    constraint: s.constraint.clone(),
                })
                .map_err(|err| match err {
                    SubmitError::Rejected(m) => EngineError::Rejected(m),
                    SubmitError::Overloaded(_) => EngineError::Overloaded(err.to_string()),
                    SubmitError::Stopped => EngineError::Internal(err.to_string()),
                })?;
            let events = Tokens {
                rx,
                inner: inner.clone(),
                logprobs: Vec::new(),
                queued: None,
            }
            .into_stream();
            Ok(events)
        }
        .boxed()
    }

    fn load(&self, key: EngineKey) -> BoxFuture<'static, Result<(), EngineError>> {
        let inner = self.inner.clone();
        async move {
            if key != EngineKey::Base {
                inner.flights.forget_failure(&key);
                inner.adapter(&key).await?;
                if !inner.engine.has_adapter(&slot_id(&key)) {
                    return Err(EngineError::Load {
                        what: key.to_string(),
                        message: "no adapter slot is free: every slot holds a routed version"
                            .into(),
                    });
                }
            }
            Ok(())
        }
        .boxed()
    }

    fn unload(&self, key: &EngineKey) -> bool {
        self.inner.engine.unload_adapter(&slot_id(key))
    }

    fn pin(&self, keys: &[EngineKey]) {
        self.inner
            .engine
            .pin_adapters(keys.iter().map(slot_id).collect());
    }

    fn is_resident(&self, key: &EngineKey) -> bool {
        match key {
            EngineKey::Base => true,
            k => self.inner.engine.has_adapter(&slot_id(k)),
        }
    }

    fn resident(&self) -> Vec<String> {
        self.inner.engine.adapters()
    }

    fn base_ready(&self) -> bool {
        true
    }
}
