//! Tool calling in the format Hermes- and Qwen2.5-style models are trained on: the chat template
//! renders the function definitions, the model answers a call as
//! `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>`, and the gateway turns those
//! blocks into OpenAI's `tool_calls`. When a call is required (`tool_choice` `required` or a
//! named function), a Lark grammar makes the engine write exactly such a block, with the
//! arguments constrained by the function's JSON schema.

use serde_json::{Value, json};

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// A function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Function {
    pub name: String,
    /// JSON schema of the arguments (an object schema; `{}` when the definition has none).
    pub parameters: Value,
}

/// What `tool_choice` asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    Auto,
    None,
    Required,
    Named(String),
}

/// One parsed call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as a JSON string, as OpenAI sends them.
    pub arguments: String,
}

impl ToolCall {
    pub fn to_json(&self) -> Value {
        json!({"id": self.id, "type": "function",
            "function": {"name": self.name, "arguments": self.arguments}})
    }
}

fn call_id() -> String {
    format!(
        "call_{}",
        &crate::respond::random_id().simple().to_string()[..24]
    )
}

/// A call written as the model writes it (what an upstream's parsed calls are turned back
/// into, so that every engine's answer is read the same way).
pub fn block(name: &str, arguments: &Value) -> String {
    format!(
        "{OPEN}\n{}\n{CLOSE}",
        json!({"name": name, "arguments": arguments})
    )
}

/// One `<tool_call>` block's JSON, if it is a call.
fn parse_block(body: &str) -> Option<ToolCall> {
    let v: Value = serde_json::from_str(body.trim()).ok()?;
    let name = v.get("name")?.as_str()?.to_string();
    let args = v
        .get("arguments")
        .or_else(|| v.get("parameters"))
        .cloned()
        .unwrap_or(json!({}));
    let arguments = match args {
        Value::String(s) => s,
        other => other.to_string(),
    };
    Some(ToolCall {
        id: call_id(),
        name,
        arguments,
    })
}

/// Split a whole answer into its text and its calls, exactly as [`StreamParser`] releases a
/// stream of it: a block that does not parse, or is cut off, stays text.
pub fn parse(text: &str) -> (String, Vec<ToolCall>) {
    let mut p = StreamParser::default();
    let mut content = String::new();
    let mut calls = Vec::new();
    for s in p.push(text) {
        match s {
            Streamed::Content(t) => content.push_str(&t),
            Streamed::Call { call, .. } => calls.push(call),
        }
    }
    content.extend(p.finish());
    if !calls.is_empty() {
        content = content.trim().to_string();
    }
    (content, calls)
}

/// What a stream releases as text arrives.
#[derive(Debug, Clone, PartialEq)]
pub enum Streamed {
    Content(String),
    Call { index: usize, call: ToolCall },
}

/// Parses a streamed answer: text is released as content until a `<tool_call>` begins, then
/// each complete block is released as a call (its arguments in one fragment).
#[derive(Debug, Default)]
pub struct StreamParser {
    pending: String,
    in_calls: bool,
    calls: usize,
}

impl StreamParser {
    pub fn push(&mut self, delta: &str) -> Vec<Streamed> {
        self.pending.push_str(delta);
        let mut out = Vec::new();
        loop {
            if !self.in_calls {
                match self.pending.find(OPEN) {
                    Some(at) => {
                        let text: String = self.pending.drain(..at).collect();
                        if !text.trim().is_empty() {
                            out.push(Streamed::Content(text));
                        }
                        self.in_calls = true;
                    }
                    None => {
                        // Hold back a tail that could be the start of `<tool_call>`.
                        let keep = (1..OPEN.len().min(self.pending.len() + 1))
                            .rev()
                            .find(|&n| {
                                self.pending.is_char_boundary(self.pending.len() - n)
                                    && self.pending.ends_with(&OPEN[..n])
                            })
                            .unwrap_or(0);
                        let text: String =
                            self.pending.drain(..self.pending.len() - keep).collect();
                        if !text.is_empty() {
                            out.push(Streamed::Content(text));
                        }
                        return out;
                    }
                }
            }
            let Some(end) = self.pending.find(CLOSE) else {
                return out;
            };
            let block: String = self.pending.drain(..end + CLOSE.len()).collect();
            let body = &block[OPEN.len()..block.len() - CLOSE.len()];
            match parse_block(body) {
                Some(call) => {
                    out.push(Streamed::Call {
                        index: self.calls,
                        call,
                    });
                    self.calls += 1;
                }
                None => out.push(Streamed::Content(block)),
            }
            let trimmed = self.pending.trim_start().len();
            self.pending.drain(..self.pending.len() - trimmed);
            self.in_calls = false;
        }
    }

    /// What is left at the end: an unfinished block goes out as text.
    pub fn finish(&mut self) -> Option<String> {
        let rest = std::mem::take(&mut self.pending);
        (!rest.is_empty()).then_some(rest)
    }

    pub fn calls(&self) -> usize {
        self.calls
    }
}

/// A Lark grammar (llguidance's dialect) that makes the answer one call (or, with `parallel`,
/// one or more) to the functions `choice` allows, each with arguments valid for its schema.
/// `None` when nothing needs forcing (`auto`, `none`).
pub fn grammar(functions: &[Function], choice: &ToolChoice, parallel: bool) -> Option<String> {
    let allowed: Vec<&Function> = match choice {
        ToolChoice::Auto | ToolChoice::None => return None,
        ToolChoice::Required => functions.iter().collect(),
        ToolChoice::Named(n) => functions.iter().filter(|f| &f.name == n).collect(),
    };
    let mut g = String::new();
    g.push_str(if parallel {
        "start: call (\"\\n\" call)*\n"
    } else {
        "start: call\n"
    });
    let names: Vec<String> = (0..allowed.len()).map(|i| format!("call_{i}")).collect();
    g.push_str(&format!("call: {}\n", names.join(" | ")));
    for (i, f) in allowed.iter().enumerate() {
        let head = format!("{OPEN}\n{{\"name\": {}, \"arguments\": ", json!(f.name));
        let schema = loraops_engine::grammar::compact(&if f.parameters.is_object()
            && f.parameters != json!({})
        {
            f.parameters.clone()
        } else {
            json!({"type": "object"})
        });
        g.push_str(&format!(
            "call_{i}: {} %json {} {}\n",
            json!(head),
            schema,
            json!(format!("}}\n{CLOSE}"))
        ));
    }
    Some(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_parse_out_of_the_answer_and_other_text_stays_text() {
        let (text, calls) = parse(
            "Let me check.\n<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"time\", \"arguments\": {}}\n</tool_call>",
        );
        assert_eq!(text, "Let me check.");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].name, "weather");
        assert_eq!(calls[0].arguments, "{\"city\":\"Paris\"}");
        assert!(calls[0].id.starts_with("call_"));
        assert_eq!(parse("plain answer").1, vec![]);
        // A block that is not a call stays text.
        let broken = "<tool_call>\nnot json\n</tool_call>";
        assert_eq!(parse(broken), (broken.to_string(), vec![]));
        // Cut off by max_tokens after one whole call: the call, and the rest as text.
        let (text, calls) = parse(
            "<tool_call>\n{\"name\": \"time\", \"arguments\": {}}\n</tool_call>\n<tool_call>\n{\"na",
        );
        assert_eq!(calls.len(), 1);
        assert_eq!(text, "<tool_call>\n{\"na");
    }

    #[test]
    fn a_stream_releases_text_until_a_call_then_each_call_whole() {
        let mut p = StreamParser::default();
        let mut out = Vec::new();
        for piece in [
            "Hi <to",
            "ol_call>\n{\"name\": \"w",
            "eather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool",
            "_call>",
        ] {
            out.extend(p.push(piece));
        }
        assert_eq!(out[0], Streamed::Content("Hi ".into()));
        let Streamed::Call { index, call } = &out[1] else {
            panic!("{out:?}")
        };
        assert_eq!((*index, call.name.as_str()), (0, "weather"));
        assert_eq!(p.calls(), 1);
        assert_eq!(p.finish(), None);
        let mut q = StreamParser::default();
        assert_eq!(q.push("a < b <"), vec![Streamed::Content("a < b ".into())]);
        assert_eq!(q.finish(), Some("<".into()));
    }

    #[test]
    fn the_grammar_names_only_the_allowed_functions() {
        let fs = vec![
            Function {
                name: "weather".into(),
                parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
            },
            Function {
                name: "time".into(),
                parameters: json!({}),
            },
        ];
        assert_eq!(grammar(&fs, &ToolChoice::Auto, true), None);
        let g = grammar(&fs, &ToolChoice::Named("time".into()), false).unwrap();
        assert!(g.contains("\\\"time\\\"") && !g.contains("weather"), "{g}");
        let g = grammar(&fs, &ToolChoice::Required, true).unwrap();
        assert!(g.contains("call_0 | call_1") && g.contains("%json"), "{g}");
    }

    /// The grammar, run by the engine on a model that writes noise, yields calls that parse,
    /// name an allowed function and carry arguments valid for its schema.
    #[test]
    fn forced_calls_from_the_engine_parse_and_validate() {
        let dir = tempfile::tempdir().unwrap();
        loraops_model::tiny::init_tiny(dir.path(), &loraops_model::tiny::TinySpec::default())
            .unwrap();
        let engine =
            loraops_engine::Engine::start(loraops_engine::EngineOptions::new(dir.path())).unwrap();
        let fs = vec![Function {
            name: "weather".into(),
            parameters: json!({"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                "required": ["city", "days"], "additionalProperties": false}),
        }];
        let g = grammar(&fs, &ToolChoice::Required, false).unwrap();
        let prompt = engine.encode_text("Weather?").unwrap();
        for seed in 0..4 {
            let mut rx = engine
                .generate(loraops_engine::Request {
                    prompt: prompt.clone(),
                    adapter: None,
                    sampling: loraops_engine::SamplingParams {
                        max_tokens: 200,
                        seed: Some(seed),
                        ..Default::default()
                    },
                    constraint: Some(loraops_engine::Constraint::Lark(g.clone())),
                })
                .unwrap();
            let mut text = String::new();
            while let Some(ev) = rx.blocking_recv() {
                match ev {
                    loraops_engine::Event::Token { text: t, .. } => text.push_str(&t),
                    loraops_engine::Event::Done { .. } => break,
                    loraops_engine::Event::Error(e) => panic!("{e}"),
                }
            }
            let (rest, calls) = parse(&text);
            assert_eq!(calls.len(), 1, "{text:?}");
            assert!(rest.is_empty(), "{text:?}");
            let args: Value = serde_json::from_str(&calls[0].arguments).unwrap();
            assert!(
                args["city"].is_string()
                    && args["days"].as_i64().is_some_and(|d| (1..=7).contains(&d)),
                "{args}"
            );
        }
    }
}
