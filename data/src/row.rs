//! The JSONL row format, typed: what a row of each family holds, read in one place.
//!
//! SFT: `{"messages":[{"role","content"}…]}`, `{"prompt","completion"}` or Alpaca
//! `{"instruction","input","output"}`; preference: `{"prompt","chosen","rejected"}`; KTO:
//! `{"prompt","completion","label":bool}`. Prompts and completions of the last two (and of
//! prompt/completion SFT rows) are strings or message lists. Any row may carry a `weight`.
//!
//! The trainer tokenises these types, evaluation builds regression cases from them and
//! curation reads them; the Alpaca prompt exists only here, so a row is prompted the same
//! way in training and in its regression suite. Parsing here is about shape: curation adds
//! its stricter checks (no empty texts, known roles) on top, in `format`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The dataset family a row belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Sft,
    Preference,
    Kto,
}

impl Family {
    pub fn describe(self) -> &'static str {
        match self {
            Family::Sft => "SFT (messages, prompt/completion or instruction/output)",
            Family::Preference => "preference (prompt/chosen/rejected)",
            Family::Kto => "KTO (prompt/completion/label)",
        }
    }

    /// The family a row's keys name: `chosen` or `rejected` make a preference row, `label` a
    /// KTO row, `messages`, `instruction`/`output` or `prompt`/`completion` an SFT row.
    pub fn of(obj: &Map<String, Value>) -> Option<Family> {
        let has = |k: &str| obj.contains_key(k);
        if has("chosen") || has("rejected") {
            Some(Family::Preference)
        } else if has("label") {
            Some(Family::Kto)
        } else if ["messages", "instruction", "output", "prompt", "completion"]
            .iter()
            .any(|k| has(k))
        {
            Some(Family::Sft)
        } else {
            None
        }
    }
}

/// One chat message. `content` is None only for an assistant turn that holds tool calls.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Option<String>,
}

impl Message {
    /// The content, which training and evaluation need as text.
    pub fn text(&self) -> Result<&str, String> {
        self.content
            .as_deref()
            .ok_or_else(|| "a message has no string \"content\"".to_string())
    }
}

/// The messages of a `[{"role","content"}…]` list.
pub fn messages(v: &Value) -> Result<Vec<Message>, String> {
    v.as_array()
        .ok_or("messages are not an array")?
        .iter()
        .map(|m| {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or("a message has no \"role\"")?;
            let content = match m.get("content") {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Null) => None,
                _ => return Err("a message has no string \"content\"".to_string()),
            };
            Ok(Message {
                role: role.into(),
                content,
            })
        })
        .collect()
}

/// A prompt or completion: a string, or a message list.
#[derive(Debug, Clone, PartialEq)]
pub enum Text {
    Plain(String),
    Chat(Vec<Message>),
}

impl Text {
    /// The field `key` of a row (None when absent or null).
    pub fn field(v: &Value, key: &str) -> Result<Option<Text>, String> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(Text::Plain(s.clone()))),
            Some(m @ Value::Array(_)) => Ok(Some(Text::Chat(
                messages(m).map_err(|e| format!("\"{key}\": {e}"))?,
            ))),
            Some(_) => Err(format!("\"{key}\" must be a string or a message list")),
        }
    }

    /// The text, a message list's contents joined by newlines.
    pub fn joined(&self) -> String {
        match self {
            Text::Plain(s) => s.clone(),
            Text::Chat(m) => m
                .iter()
                .filter_map(|m| m.content.as_deref())
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }
}

const ALPACA_WITH_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n";
const ALPACA_NO_INPUT: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n";

/// The Alpaca prompt of an instruction and its (possibly empty) input: the text the model
/// reads before the output, in training and in regression suites alike.
pub fn alpaca_prompt(instruction: &str, input: &str) -> String {
    if input.is_empty() {
        ALPACA_NO_INPUT.replace("{instruction}", instruction)
    } else {
        ALPACA_WITH_INPUT
            .replace("{instruction}", instruction)
            .replace("{input}", input)
    }
}

/// The error for a row that is none of the SFT formats.
pub const NOT_SFT: &str = "not an SFT row: expected \"messages\", \"prompt\"+\"completion\" or \"instruction\"+\"output\"";

/// An SFT row.
#[derive(Debug, Clone, PartialEq)]
pub enum Sft {
    /// A conversation; its assistant turns are the completions.
    Chat(Vec<Message>),
    Completion {
        prompt: Text,
        completion: Text,
    },
    Alpaca {
        instruction: String,
        /// Empty when the row has none.
        input: String,
        output: String,
    },
}

impl Sft {
    /// Read an SFT row: `messages` first, then `prompt` + `completion`, then `instruction` +
    /// `output` (a row holding both of the last two pairs is a prompt/completion row).
    pub fn from_json(v: &Value) -> Result<Sft, String> {
        if let Some(m) = v.get("messages") {
            let m = messages(m).map_err(|e| e.replace("messages are", "\"messages\" is"))?;
            return Ok(Sft::Chat(m));
        }
        let text = |k: &str| match v.get(k) {
            Some(Value::String(s)) => Some(Text::Plain(s.clone())),
            Some(a @ Value::Array(_)) => messages(a).ok().map(Text::Chat),
            _ => None,
        };
        if let (Some(prompt), Some(completion)) = (text("prompt"), text("completion")) {
            return Ok(Sft::Completion { prompt, completion });
        }
        let s = |k: &str| v.get(k).and_then(Value::as_str);
        if let (Some(i), Some(o)) = (s("instruction"), s("output")) {
            return Ok(Sft::Alpaca {
                instruction: i.to_string(),
                input: s("input").unwrap_or("").to_string(),
                output: o.to_string(),
            });
        }
        Err(NOT_SFT.into())
    }

    /// A text row's prompt as the model reads it (the Alpaca template applied) and its
    /// completion; None for conversations and message-list prompts or completions.
    pub fn text_pair(&self) -> Option<(String, &str)> {
        match self {
            Sft::Chat(_) => None,
            Sft::Completion {
                prompt: Text::Plain(p),
                completion: Text::Plain(c),
            } => Some((p.clone(), c)),
            Sft::Completion { .. } => None,
            Sft::Alpaca {
                instruction,
                input,
                output,
            } => Some((alpaca_prompt(instruction, input), output)),
        }
    }
}

/// A preference row: a prompt (absent: chosen and rejected conversations may share their
/// start) and two completions.
#[derive(Debug, Clone, PartialEq)]
pub struct Preference {
    pub prompt: Option<Text>,
    pub chosen: Text,
    pub rejected: Text,
}

impl Preference {
    pub fn from_json(v: &Value) -> Result<Preference, String> {
        let side = |k: &str| -> Result<Text, String> {
            Text::field(v, k)?.ok_or_else(|| {
                format!("not a preference row: \"{k}\" is missing (expected \"prompt\", \"chosen\", \"rejected\")")
            })
        };
        let (chosen, rejected) = (side("chosen")?, side("rejected")?);
        Ok(Preference {
            prompt: Text::field(v, "prompt")?,
            chosen,
            rejected,
        })
    }
}

/// A KTO row: a completion labelled desirable (true) or not.
#[derive(Debug, Clone, PartialEq)]
pub struct Kto {
    pub prompt: Option<Text>,
    pub completion: Text,
    pub label: bool,
}

impl Kto {
    pub fn from_json(v: &Value) -> Result<Kto, String> {
        let completion = Text::field(v, "completion")?.ok_or_else(|| {
            "not a KTO row: \"completion\" is missing (expected \"prompt\", \"completion\", \"label\")"
                .to_string()
        })?;
        let label = v.get("label").and_then(Value::as_bool).ok_or_else(|| {
            "\"label\" must be true (desirable) or false (undesirable)".to_string()
        })?;
        Ok(Kto {
            prompt: Text::field(v, "prompt")?,
            completion,
            label,
        })
    }
}

/// A row of any family.
#[derive(Debug, Clone, PartialEq)]
pub enum Row {
    Sft(Sft),
    Preference(Preference),
    Kto(Kto),
}

impl Row {
    /// Read a row of the family its keys name ([`Family::of`]).
    pub fn from_json(v: &Value) -> Result<Row, String> {
        let family = v.as_object().and_then(Family::of).ok_or_else(|| {
            "unknown row format; expected messages, prompt/completion, instruction/output, prompt/chosen/rejected or prompt/completion/label".to_string()
        })?;
        Ok(match family {
            Family::Sft => Row::Sft(Sft::from_json(v)?),
            Family::Preference => Row::Preference(Preference::from_json(v)?),
            Family::Kto => Row::Kto(Kto::from_json(v)?),
        })
    }

    pub fn family(&self) -> Family {
        match self {
            Row::Sft(_) => Family::Sft,
            Row::Preference(_) => Family::Preference,
            Row::Kto(_) => Family::Kto,
        }
    }
}

/// A row's optional `"weight"` (default 1): a non-negative number that multiplies the row's
/// loss (SFT, DPO, ORPO and KTO rows alike); 0 leaves the row out of the gradient.
pub fn weight(v: &Value) -> Result<f32, String> {
    match v.get("weight") {
        None | Some(Value::Null) => Ok(1.0),
        Some(w) => w
            .as_f64()
            .filter(|w| w.is_finite() && *w >= 0.0)
            .map(|w| w as f32)
            .ok_or_else(|| "\"weight\" must be a non-negative number".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn each_sft_format_reads_as_its_variant() {
        let chat = Sft::from_json(&json!({"messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": null, "tool_calls": []}]}))
        .unwrap();
        let Sft::Chat(m) = &chat else { panic!() };
        assert_eq!(m[1].content, None);
        assert!(m[1].text().is_err());
        assert_eq!(chat.text_pair(), None);
        let pc = Sft::from_json(&json!({"prompt": "P", "completion": "C"})).unwrap();
        assert_eq!(pc.text_pair(), Some(("P".into(), "C")));
        let a = Sft::from_json(&json!({"instruction": "Do", "input": "x", "output": "O"})).unwrap();
        let (p, o) = a.text_pair().unwrap();
        assert!(p.ends_with("### Instruction:\nDo\n\n### Input:\nx\n\n### Response:\n"));
        assert_eq!(o, "O");
        let a = Sft::from_json(&json!({"instruction": "Do", "output": "O"})).unwrap();
        assert!(!a.text_pair().unwrap().0.contains("### Input"));
        assert_eq!(
            Sft::from_json(&json!({"prompt": "x"})).unwrap_err(),
            NOT_SFT
        );
        assert_eq!(
            Sft::from_json(&json!({"messages": 3})).unwrap_err(),
            "\"messages\" is not an array"
        );
    }

    #[test]
    fn families_follow_the_keys() {
        let row = |v: Value| Row::from_json(&v).map(|r| r.family());
        assert_eq!(
            row(json!({"prompt": "p", "chosen": "a", "rejected": "b"})),
            Ok(Family::Preference)
        );
        assert_eq!(
            row(json!({"prompt": "p", "completion": "c", "label": true})),
            Ok(Family::Kto)
        );
        assert_eq!(
            row(json!({"prompt": "p", "completion": "c"})),
            Ok(Family::Sft)
        );
        assert!(row(json!({"text": "t"})).is_err());
        let e = Preference::from_json(&json!({"chosen": "a"})).unwrap_err();
        assert!(e.contains("\"rejected\" is missing"), "{e}");
        let e = Kto::from_json(&json!({"completion": "a", "label": "yes"})).unwrap_err();
        assert!(e.contains("\"label\" must be true"), "{e}");
        assert_eq!(weight(&json!({"weight": 0.5})), Ok(0.5));
        assert!(weight(&json!({"weight": -1})).is_err());
    }
}
