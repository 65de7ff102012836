//! From engine events to OpenAI answers: one [`Choice`] per requested answer (`n`), tool calls
//! read out of the text, log-probabilities in the endpoint's shape, and the SSE chunks or the
//! whole JSON body exactly as OpenAI writes them (field names, `index`, `finish_reason`).

use bytes::Bytes;
use serde::Serialize;
use serde_json::{Value, json};

use crate::engine::{Logprob, TokenUsage};
use crate::openai::{
    ChatChoice, ChatChunk, ChatCompletion, ChunkChoice, Delta, OutMessage, TextChoice,
    TextCompletion, Usage,
};
use crate::tools::{self, StreamParser, Streamed, ToolCall};
use crate::validate::ToolUse;

/// A random id (answers, tool calls, sticky keys) from the thread's CSPRNG: `Uuid::new_v4`
/// asks the kernel for each one, a system call on the path of every request.
pub fn random_id() -> uuid::Uuid {
    uuid::Builder::from_random_bytes(rand::random()).into_uuid()
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Chat,
    Text,
}

/// What every chunk and body of one response shares.
pub struct Shape {
    pub id: String,
    pub created: i64,
    pub model: String,
    pub kind: Kind,
    pub include_usage: bool,
    pub tools: Option<ToolUse>,
    pub logprobs: bool,
}

/// One answer as it is generated.
pub struct Choice {
    pub index: u32,
    /// Everything the engine wrote (what the judge and shadow comparisons read).
    pub text: String,
    parser: Option<StreamParser>,
    calls: Vec<ToolCall>,
    logprobs: Vec<Logprob>,
    /// Characters of the answer so far (completions' `text_offset`).
    offset: usize,
    pub finish: Option<String>,
}

/// OpenAI's finish reasons; the engine may say e.g. `eos` or `canceled`.
fn finish_reason(r: &str) -> &'static str {
    match r {
        "length" => "length",
        "content_filter" => "content_filter",
        _ => "stop",
    }
}

fn sse<T: Serialize>(v: &T) -> Bytes {
    let mut out = b"data: ".to_vec();
    // Serialising our own plain structs cannot fail.
    serde_json::to_writer(&mut out, v).expect("serialisable chunk");
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

impl Shape {
    pub fn choices(&self, n: usize) -> Vec<Choice> {
        (0..n as u32)
            .map(|index| Choice {
                index,
                text: String::new(),
                parser: self.tools.as_ref().map(|_| StreamParser::default()),
                calls: Vec::new(),
                logprobs: Vec::new(),
                offset: 0,
                finish: None,
            })
            .collect()
    }

    fn parallel(&self) -> bool {
        self.tools.as_ref().is_none_or(|t| t.parallel)
    }

    /// Log-probabilities in the endpoint's shape. A token the sampler ruled out has −∞, which
    /// JSON cannot carry: it is written as −9999, as OpenAI does.
    fn logprobs_json(&self, lps: &[Logprob], offset: &mut usize) -> Option<Value> {
        if !self.logprobs {
            return None;
        }
        let bytes = |b: &[u8]| b.iter().map(|&x| json!(x)).collect::<Vec<_>>();
        let lp = |x: f32| if x.is_finite() { x } else { -9999.0 };
        Some(match self.kind {
            Kind::Chat => json!({
                "content": lps.iter().map(|l| json!({
                    "token": l.token, "logprob": lp(l.logprob), "bytes": bytes(&l.bytes),
                    "top_logprobs": l.top.iter().map(|t| json!({
                        "token": t.token, "logprob": lp(t.logprob), "bytes": bytes(&t.bytes)
                    })).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
                "refusal": null,
            }),
            Kind::Text => {
                let mut offsets = Vec::with_capacity(lps.len());
                for l in lps {
                    offsets.push(*offset);
                    *offset += l.token.chars().count();
                }
                json!({
                    "tokens": lps.iter().map(|l| &l.token).collect::<Vec<_>>(),
                    "token_logprobs": lps.iter().map(|l| lp(l.logprob)).collect::<Vec<_>>(),
                    "top_logprobs": lps.iter().map(|l| l.top.iter()
                        .map(|t| (t.token.clone(), json!(lp(t.logprob))))
                        .collect::<serde_json::Map<_, _>>()).collect::<Vec<_>>(),
                    "text_offset": offsets,
                })
            }
        })
    }

    fn chat_chunk(
        &self,
        index: u32,
        delta: Delta,
        logprobs: Option<Value>,
        finish: Option<&str>,
    ) -> Bytes {
        sse(&ChatChunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices: vec![ChunkChoice {
                index,
                delta,
                logprobs,
                finish_reason: finish.map(str::to_string),
            }],
            usage: self.include_usage.then_some(None),
        })
    }

    fn text_chunk(
        &self,
        index: u32,
        text: String,
        logprobs: Option<Value>,
        finish: Option<&str>,
    ) -> Bytes {
        sse(&TextCompletion {
            id: &self.id,
            object: "text_completion",
            created: self.created,
            model: &self.model,
            choices: vec![TextChoice {
                index,
                text,
                logprobs,
                finish_reason: finish.map(str::to_string),
            }],
            usage: self.include_usage.then_some(None),
        })
    }

    /// The first chunk of a streamed chat answer: the role.
    pub fn role_chunk(&self, index: u32) -> Option<Bytes> {
        (self.kind == Kind::Chat).then(|| {
            self.chat_chunk(
                index,
                Delta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                    tool_calls: None,
                },
                None,
                None,
            )
        })
    }

    /// Log-probabilities arrive before the text they belong to; they ride on its chunk.
    pub fn logprobs(&self, c: &mut Choice, lps: Vec<Logprob>) {
        if self.logprobs {
            c.logprobs.extend(lps);
        }
    }

    /// The chunks a text delta releases (none while a tool call is still being written).
    pub fn delta(&self, c: &mut Choice, text: &str, out: &mut Vec<Bytes>) {
        c.text.push_str(text);
        let released = match c.parser.as_mut() {
            Some(p) => p.push(text),
            None => vec![Streamed::Content(text.to_string())],
        };
        for r in released {
            self.release(c, r, out);
        }
    }

    fn release(&self, c: &mut Choice, r: Streamed, out: &mut Vec<Bytes>) {
        let lps = std::mem::take(&mut c.logprobs);
        let lp = self.logprobs_json(&lps, &mut c.offset);
        match (self.kind, r) {
            (Kind::Text, Streamed::Content(t)) => {
                out.push(self.text_chunk(c.index, t, lp, None));
            }
            (Kind::Chat, Streamed::Content(t)) => {
                let delta = Delta {
                    role: None,
                    content: Some(t),
                    tool_calls: None,
                };
                out.push(self.chat_chunk(c.index, delta, lp, None));
            }
            (_, Streamed::Call { index, call }) => {
                if index > 0 && !self.parallel() {
                    return;
                }
                let mut v = call.to_json();
                v["index"] = json!(index);
                c.calls.push(call);
                let delta = Delta {
                    role: None,
                    content: None,
                    tool_calls: Some(vec![v]),
                };
                out.push(self.chat_chunk(c.index, delta, lp, None));
            }
        }
    }

    /// The last chunks of one answer: what the parser still held, and the finish reason.
    pub fn done(&self, c: &mut Choice, reason: &str, out: &mut Vec<Bytes>) {
        if let Some(rest) = c.parser.as_mut().and_then(StreamParser::finish) {
            self.release(c, Streamed::Content(rest), out);
        }
        let finish = self.finish_of(c, reason);
        let lps = std::mem::take(&mut c.logprobs);
        let lp = (!lps.is_empty())
            .then(|| self.logprobs_json(&lps, &mut c.offset))
            .flatten();
        out.push(match self.kind {
            Kind::Chat => self.chat_chunk(c.index, Delta::default(), lp, Some(finish)),
            Kind::Text => self.text_chunk(c.index, String::new(), lp, Some(finish)),
        });
        c.finish = Some(finish.to_string());
    }

    fn finish_of(&self, c: &Choice, reason: &str) -> &'static str {
        match &self.tools {
            Some(t) if !c.calls.is_empty() && !t.named => "tool_calls",
            _ => finish_reason(reason),
        }
    }

    /// The extra last chunk of `stream_options.include_usage`: no choices, the usage.
    pub fn usage_chunk(&self, usage: Usage) -> Bytes {
        match self.kind {
            Kind::Chat => sse(&ChatChunk {
                id: &self.id,
                object: "chat.completion.chunk",
                created: self.created,
                model: &self.model,
                choices: vec![],
                usage: Some(Some(usage)),
            }),
            Kind::Text => sse(&TextCompletion {
                id: &self.id,
                object: "text_completion",
                created: self.created,
                model: &self.model,
                choices: vec![],
                usage: Some(Some(usage)),
            }),
        }
    }

    /// A whole (non-streamed) response from finished answers.
    pub fn body(&self, choices: Vec<(Choice, String)>, usage: TokenUsage) -> Vec<u8> {
        let usage: Usage = usage.into();
        let out = match self.kind {
            Kind::Chat => serde_json::to_vec(&ChatCompletion {
                id: self.id.clone(),
                object: "chat.completion",
                created: self.created,
                model: self.model.clone(),
                choices: choices
                    .into_iter()
                    .map(|(mut c, reason)| {
                        let (content, mut calls) = match &self.tools {
                            Some(_) => tools::parse(&c.text),
                            None => (std::mem::take(&mut c.text), Vec::new()),
                        };
                        if !self.parallel() {
                            calls.truncate(1);
                        }
                        c.calls = calls;
                        let finish = self.finish_of(&c, &reason).to_string();
                        let lps = std::mem::take(&mut c.logprobs);
                        ChatChoice {
                            index: c.index,
                            logprobs: self.logprobs_json(&lps, &mut c.offset),
                            message: OutMessage {
                                role: "assistant",
                                content: (!content.is_empty() || c.calls.is_empty())
                                    .then_some(content),
                                refusal: None,
                                tool_calls: c.calls.iter().map(ToolCall::to_json).collect(),
                            },
                            finish_reason: finish,
                        }
                    })
                    .collect(),
                usage,
            }),
            Kind::Text => serde_json::to_vec(&TextCompletion {
                id: &self.id,
                object: "text_completion",
                created: self.created,
                model: &self.model,
                choices: choices
                    .into_iter()
                    .map(|(mut c, reason)| {
                        let lps = std::mem::take(&mut c.logprobs);
                        TextChoice {
                            index: c.index,
                            logprobs: self.logprobs_json(&lps, &mut c.offset),
                            text: std::mem::take(&mut c.text),
                            finish_reason: Some(finish_reason(&reason).to_string()),
                        }
                    })
                    .collect(),
                usage: Some(Some(usage)),
            }),
        };
        out.expect("serialisable response")
    }
}

impl Choice {
    /// Non-streamed answers gather text and log-probabilities and are shaped at the end.
    pub fn gather(&mut self, text: &str) {
        self.text.push_str(text);
    }

    pub fn gather_logprobs(&mut self, lps: Vec<Logprob>) {
        self.logprobs.extend(lps);
    }
}
