//! Continuous batching on one thread: between two forward steps, finished and abandoned
//! sequences leave, waiting requests whose KV reservation fits join, and each step feeds every
//! running sequence's next token plus a bounded chunk of the prompts still being read, so a
//! long prompt arriving never stalls the streams already decoding for more than one chunk.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Mutex};

use llguidance::Matcher;
use tokio::sync::mpsc::UnboundedSender;

use crate::adapters::AdapterWeights;
use crate::base::Base;
use crate::forward::{Segment, step};
use crate::grammar;
use crate::kv::{KvBudget, KvCache, KvShape};
use crate::sampling::Sampler;
use crate::text::{Detokenizer, Released, StopMatcher};
use crate::{Event, FinishReason, Request, Stats, Usage};
use loraops_model::tokenizer::Tokenizer;

pub(crate) enum Command {
    Submit(Box<Submitted>),
}

pub(crate) struct Submitted {
    pub request: Request,
    pub out: UnboundedSender<Event>,
    /// Cache positions to reserve: prompt + max_tokens − 1 (the last token is never fed).
    pub cap: usize,
    pub matcher: Option<Matcher>,
}

/// How the loop batches.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Sequences running at once.
    pub max_running: usize,
    /// Prompt tokens fed per step while other sequences decode, across all prompts being
    /// read: small, so a step with a prompt in it costs the decoding streams little more than
    /// a step without (at 16 streams on a 100M model, a 256-token chunk made one step 24 times
    /// as long as a decode step).
    pub prefill_chunk: usize,
}

/// Prompt tokens fed per step when no sequence is decoding: nobody waits on the step, so
/// prompts are read in large products.
const PREFILL_ALONE: usize = 512;

struct Seq {
    prompt: Vec<u32>,
    adapter: Option<Arc<AdapterWeights>>,
    sampler: Sampler,
    out: UnboundedSender<Event>,
    cache: KvCache,
    reserved: usize,
    /// Prompt tokens already in the cache.
    fed: usize,
    /// The last sampled token, fed at the next step.
    next: Option<u32>,
    generated: usize,
    detok: Detokenizer,
    stop: StopMatcher,
    /// The request's constraint, advanced token by token.
    matcher: Option<Matcher>,
    finished: bool,
}

impl Seq {
    fn adapter_key(&self) -> usize {
        self.adapter
            .as_ref()
            .map_or(0, |a| Arc::as_ptr(a) as *const () as usize)
    }

    fn finish(&mut self, tok: &Tokenizer, reason: FinishReason) {
        let mut tail = self.detok.finish(tok);
        tail = match self.stop.push(&tail) {
            Released::Text(t) => t + &self.stop.finish(),
            Released::Stopped(t) => t,
        };
        if !tail.is_empty() {
            let _ = self.out.send(Event::Token {
                id: None,
                text: tail,
                logprob: None,
            });
        }
        let _ = self.out.send(Event::Done {
            finish: reason,
            usage: Usage {
                prompt_tokens: self.prompt.len(),
                completion_tokens: self.generated,
            },
        });
        self.finished = true;
    }
}

pub(crate) struct Scheduler {
    pub base: Arc<Base>,
    pub tokenizer: Arc<Tokenizer>,
    pub shape: KvShape,
    pub budget: KvBudget,
    pub limits: BatchLimits,
    pub stats: Arc<Mutex<Stats>>,
    /// End-of-sequence tokens.
    pub eos: Vec<u32>,
}

impl Scheduler {
    /// Run until every `Engine` handle is gone and the work is done.
    pub fn run(mut self, rx: Receiver<Command>) {
        let mut waiting: VecDeque<Box<Submitted>> = VecDeque::new();
        let mut running: Vec<Seq> = Vec::new();
        let mut open = true;
        loop {
            if running.is_empty() && waiting.is_empty() {
                self.publish(&waiting, &running);
                if !open {
                    return;
                }
                match rx.recv() {
                    Ok(Command::Submit(s)) => waiting.push_back(s),
                    Err(_) => return,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(Command::Submit(s)) => waiting.push_back(s),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            // Clients that went away.
            waiting.retain(|w| !w.out.is_closed());
            for s in running.iter_mut().filter(|s| s.out.is_closed()) {
                s.finished = true;
            }
            self.retire(&mut running);
            self.admit(&mut waiting, &mut running);
            self.publish(&waiting, &running);
            if running.is_empty() {
                continue;
            }
            self.step(&mut running);
            self.retire(&mut running);
        }
    }

    /// Move waiting requests in, first come first served, while their reservation fits.
    fn admit(&mut self, waiting: &mut VecDeque<Box<Submitted>>, running: &mut Vec<Seq>) {
        let mut admitted = false;
        while running.len() < self.limits.max_running {
            let Some(w) = waiting.front() else { break };
            let bytes = self.shape.bytes_for(w.cap);
            if !self.budget.reserve(bytes) {
                break;
            }
            let w = waiting.pop_front().expect("front exists");
            let Submitted {
                request,
                out,
                cap,
                matcher,
            } = *w;
            running.push(Seq {
                stop: StopMatcher::new(request.sampling.stop.clone()),
                sampler: Sampler::new(request.sampling),
                prompt: request.prompt,
                adapter: request.adapter,
                out,
                cache: KvCache::new(self.shape, cap),
                reserved: bytes,
                fed: 0,
                next: None,
                generated: 0,
                detok: Detokenizer::default(),
                matcher,
                finished: false,
            });
            admitted = true;
        }
        if admitted {
            // Sequences with the same adapter side by side: their rows form one group.
            running.sort_by_key(Seq::adapter_key);
        }
    }

    fn retire(&mut self, running: &mut Vec<Seq>) {
        running.retain(|s| {
            if s.finished {
                self.budget.release(s.reserved);
            }
            !s.finished
        });
    }

    fn publish(&self, waiting: &VecDeque<Box<Submitted>>, running: &[Seq]) {
        let mut st = self.stats.lock().expect("stats lock");
        st.waiting = waiting.len();
        st.running = running.len();
        st.kv_used_bytes = self.budget.used();
    }

    /// One forward step over every running sequence, then sampling.
    fn step(&mut self, running: &mut [Seq]) {
        let decoding = running
            .iter()
            .any(|s| s.fed == s.prompt.len() && s.next.is_some());
        let mut budget = if decoding {
            self.limits.prefill_chunk.max(1)
        } else {
            PREFILL_ALONE.max(self.limits.prefill_chunk)
        };
        // (index, tokens fed this step, wants logits)
        let mut plan: Vec<(usize, std::ops::Range<usize>, bool)> = Vec::new();
        for (i, s) in running.iter().enumerate() {
            if s.fed < s.prompt.len() {
                if budget == 0 {
                    continue;
                }
                let n = (s.prompt.len() - s.fed).min(budget);
                budget -= n;
                plan.push((i, s.fed..s.fed + n, s.fed + n == s.prompt.len()));
            } else if s.next.is_some() {
                plan.push((i, 0..1, true));
            }
        }
        let base = self.base.clone();
        let outcome = {
            let mut segs: Vec<Segment> = Vec::with_capacity(plan.len());
            // The constrained sequences that sample after this step, in plan order.
            let mut matchers: Vec<&mut Matcher> = Vec::new();
            let mut planned = plan.iter().peekable();
            for (i, s) in running.iter_mut().enumerate() {
                let Some(&&(pi, ref range, logits)) = planned.peek() else {
                    break;
                };
                if pi != i {
                    continue;
                }
                planned.next();
                let Seq {
                    prompt,
                    next,
                    cache,
                    adapter,
                    fed,
                    matcher,
                    ..
                } = s;
                if logits && let Some(m) = matcher {
                    matchers.push(m);
                }
                let tokens: &[u32] = if *fed < prompt.len() {
                    &prompt[range.clone()]
                } else {
                    std::slice::from_ref(next.as_ref().expect("planned decode has a token"))
                };
                segs.push(Segment {
                    tokens,
                    cache,
                    adapter: adapter.as_deref(),
                    logits,
                });
            }
            // `join`, called from this thread, runs the step on a worker of the pool its
            // products split over: called from here, each of its parallel loops would hand
            // itself over and wait, and with a small model those hand-offs took most of a
            // decode step. The constraints' masks for the tokens this step samples depend only
            // on the tokens already taken, so they are computed meanwhile, on the other side.
            std::panic::catch_unwind(AssertUnwindSafe(|| {
                rayon::join(
                    || step(&base, &mut segs),
                    || {
                        matchers
                            .into_iter()
                            .map(|m| m.compute_mask().map_err(|e| format!("{e:#}")))
                            .collect::<Vec<_>>()
                    },
                )
            }))
        };
        let (logits, masks) = match outcome {
            Ok(l) => l,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown".into());
                tracing::error!(error = %what, "forward step failed; failing its sequences");
                for &(i, _, _) in &plan {
                    let _ = running[i]
                        .out
                        .send(Event::Error(format!("the forward step failed: {what}")));
                    running[i].finished = true;
                }
                return;
            }
        };
        {
            let mut st = self.stats.lock().expect("stats lock");
            st.steps += 1;
            st.tokens_fed += plan.iter().map(|(_, r, _)| r.len() as u64).sum::<u64>();
        }
        let mut logits = logits.into_iter();
        let mut masks = masks.into_iter();
        for (i, range, wants) in plan {
            let s = &mut running[i];
            if s.fed < s.prompt.len() {
                s.fed = range.end;
            }
            if !wants {
                continue;
            }
            let mut l = logits.next().expect("one logits row per wanting segment");
            if let Some(m) = &mut s.matcher {
                // The grammar decides what may come next; the end of sequence once it accepts.
                let accepting = m.is_accepting().unwrap_or(false);
                let eos: Vec<(usize, f32)> = self
                    .eos
                    .iter()
                    .filter_map(|&e| l.get(e as usize).map(|&v| (e as usize, v)))
                    .collect();
                let allowed = masks.next().expect("one mask per constrained segment");
                if let Err(e) = grammar::mask(allowed, &mut l) {
                    let _ = s.out.send(Event::Error(e));
                    s.finished = true;
                    continue;
                }
                if accepting {
                    for (e, v) in eos {
                        l[e] = v;
                    }
                }
            }
            let (token, logprob) = s.sampler.sample(&mut l);
            self.emit(s, token, logprob);
        }
    }

    /// Handle a sampled token: end of sequence, text (through the stop matcher), length.
    fn emit(&self, s: &mut Seq, token: u32, logprob: Option<crate::sampling::TokenLogprob>) {
        if self.eos.contains(&token) {
            s.finish(&self.tokenizer, FinishReason::Stop);
            return;
        }
        s.generated += 1;
        let mut grammar_done = false;
        if let Some(m) = &mut s.matcher {
            if let Err(e) = m.consume_token(token) {
                let _ = s.out.send(Event::Error(format!("constraint: {e:#}")));
                s.finished = true;
                return;
            }
            grammar_done = m.is_stopped();
        }
        let delta = s.detok.push(&self.tokenizer, token);
        match s.stop.push(&delta) {
            Released::Stopped(text) => {
                if !text.is_empty() || logprob.is_some() {
                    let _ = s.out.send(Event::Token {
                        id: Some(token),
                        text,
                        logprob,
                    });
                }
                let _ = s.out.send(Event::Done {
                    finish: FinishReason::Stop,
                    usage: Usage {
                        prompt_tokens: s.prompt.len(),
                        completion_tokens: s.generated,
                    },
                });
                s.finished = true;
                return;
            }
            Released::Text(text) => {
                let _ = s.out.send(Event::Token {
                    id: Some(token),
                    text,
                    logprob,
                });
            }
        }
        let max = s.sampler.params().max_tokens;
        if grammar_done {
            s.finish(&self.tokenizer, FinishReason::Stop);
        } else if s.generated >= max || s.cache.len >= s.cache.capacity() {
            s.finish(&self.tokenizer, FinishReason::Length);
        } else {
            s.next = Some(token);
        }
    }
}
