//! Curation's view of a row: the schema checks on top of [`crate::row`]'s shapes (no empty
//! texts, known roles, an assistant turn in a conversation), normalisation, and the text
//! dedup and the filters look at. Optional `source`, `license`, `split` fields.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use unicode_normalization::UnicodeNormalization;

pub use crate::row::Family;
use crate::row::{self, Row};

/// `format` in the configuration: fix the family or take the first valid row's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FormatChoice {
    #[default]
    Auto,
    Sft,
    Preference,
    Kto,
}

impl FormatChoice {
    pub fn family(self) -> Option<Family> {
        match self {
            FormatChoice::Auto => None,
            FormatChoice::Sft => Some(Family::Sft),
            FormatChoice::Preference => Some(Family::Preference),
            FormatChoice::Kto => Some(Family::Kto),
        }
    }
}

/// Unicode normalisation form for stored text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum UnicodeForm {
    #[default]
    Nfc,
    Nfkc,
    None,
}

/// The split names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
    Holdout,
    Regression,
}

impl Split {
    pub const ALL: [Split; 4] = [Split::Train, Split::Val, Split::Holdout, Split::Regression];
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Holdout => "holdout",
            Split::Regression => "regression",
        }
    }
    pub fn parse(s: &str) -> Option<Split> {
        match s {
            "train" => Some(Split::Train),
            "val" | "validation" | "valid" => Some(Split::Val),
            "holdout" | "test" => Some(Split::Holdout),
            "regression" => Some(Split::Regression),
            _ => None,
        }
    }
}

/// A row as curation holds it: its JSON object (written back as it came, normalised and
/// masked) and the fields curation reads.
#[derive(Debug, Clone)]
pub struct Record {
    pub family: Family,
    pub obj: Map<String, Value>,
    pub split: Option<Split>,
    pub license: Option<String>,
    pub source: Option<String>,
    pub label: Option<bool>,
}

const ROLES: [&str; 5] = ["system", "user", "assistant", "tool", "developer"];

fn nonempty_str<'a>(o: &'a Map<String, Value>, k: &str) -> Result<&'a str, String> {
    match o.get(k) {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s),
        Some(Value::String(_)) => Err(format!("\"{k}\" is empty")),
        Some(v) => Err(format!("\"{k}\" must be a string, got {}", kind(v))),
        None => Err(format!("\"{k}\" is missing")),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn check_messages(v: &Value, what: &str, need_assistant: bool) -> Result<(), String> {
    let arr = v
        .as_array()
        .ok_or_else(|| format!("\"{what}\" must be an array of messages"))?;
    if arr.is_empty() {
        return Err(format!("\"{what}\" is empty"));
    }
    for (i, m) in arr.iter().enumerate() {
        let o = m
            .as_object()
            .ok_or_else(|| format!("{what}[{i}] is not an object"))?;
        let role = o
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("{what}[{i}].role is missing or not a string"))?;
        if !ROLES.contains(&role) {
            return Err(format!("{what}[{i}].role {role:?} is not one of {ROLES:?}"));
        }
        match o.get("content") {
            Some(Value::String(_)) => {}
            Some(Value::Null) if role == "assistant" && o.contains_key("tool_calls") => {}
            _ => return Err(format!("{what}[{i}].content is missing or not a string")),
        }
    }
    if need_assistant
        && !arr
            .iter()
            .any(|m| m.get("role").and_then(Value::as_str) == Some("assistant"))
    {
        return Err(format!("\"{what}\" has no assistant message"));
    }
    Ok(())
}

fn check_text_or_messages(o: &Map<String, Value>, k: &str) -> Result<(), String> {
    match o.get(k) {
        Some(Value::Array(_)) => check_messages(&o[k], k, false),
        _ => nonempty_str(o, k).map(|_| ()),
    }
}

/// Validate a parsed JSON value as a row of one of the supported formats.
pub fn validate(v: Value) -> Result<Record, String> {
    let Value::Object(obj) = v else {
        return Err(format!("expected a JSON object, got {}", kind(&v)));
    };
    let family = Family::of(&obj);
    match family {
        Some(Family::Preference) => {
            check_text_or_messages(&obj, "prompt")?;
            check_text_or_messages(&obj, "chosen")?;
            check_text_or_messages(&obj, "rejected")?;
        }
        Some(Family::Kto) => {
            check_text_or_messages(&obj, "prompt")?;
            check_text_or_messages(&obj, "completion")?;
            if !obj["label"].is_boolean() {
                return Err(format!(
                    "\"label\" must be true or false, got {}",
                    kind(&obj["label"])
                ));
            }
        }
        Some(Family::Sft) if obj.contains_key("messages") => {
            check_messages(&obj["messages"], "messages", true)?;
        }
        Some(Family::Sft) if obj.contains_key("instruction") || obj.contains_key("output") => {
            nonempty_str(&obj, "instruction")?;
            nonempty_str(&obj, "output")?;
            match obj.get("input") {
                None | Some(Value::String(_)) | Some(Value::Null) => {}
                Some(v) => return Err(format!("\"input\" must be a string, got {}", kind(v))),
            }
        }
        Some(Family::Sft) => {
            check_text_or_messages(&obj, "prompt")?;
            check_text_or_messages(&obj, "completion")?;
        }
        None => {
            let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
            return Err(format!(
                "unknown row format (keys {keys:?}); expected messages, prompt/completion, instruction/output, prompt/chosen/rejected or prompt/completion/label"
            ));
        }
    }
    let family = family.expect("checked above");
    let opt = |k: &str| -> Result<Option<String>, String> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.trim().to_string())),
            Some(v) => Err(format!("\"{k}\" must be a string, got {}", kind(v))),
        }
    };
    let split = match opt("split")? {
        None => None,
        Some(s) => Some(Split::parse(&s).ok_or_else(|| {
            format!("\"split\" {s:?} is not one of train, val, holdout, regression")
        })?),
    };
    let license = opt("license")?.filter(|s| !s.is_empty());
    let source = opt("source")?.filter(|s| !s.is_empty());
    let label = obj.get("label").and_then(Value::as_bool);
    // The trainer refuses a bad weight; refuse it here, before it reaches a split.
    if obj.contains_key("weight") {
        row::weight(&Value::Object(obj.clone()))?;
    }
    Ok(Record {
        family,
        obj,
        split,
        license,
        source,
        label,
    })
}

impl Record {
    /// The typed row (see [`crate::row`]).
    pub fn row(&self) -> Result<Row, String> {
        let v = Value::Object(self.obj.clone());
        match self.family {
            Family::Sft => row::Sft::from_json(&v).map(Row::Sft),
            Family::Preference => row::Preference::from_json(&v).map(Row::Preference),
            Family::Kto => row::Kto::from_json(&v).map(Row::Kto),
        }
    }
}

/// Normalise one string: Unicode form, CRLF → LF, control characters other than tab and
/// newline removed, outer whitespace trimmed.
pub fn normalize_str(s: &str, form: UnicodeForm) -> String {
    let cleaned = |it: &mut dyn Iterator<Item = char>| -> String {
        let mut out = String::with_capacity(s.len());
        let mut prev_cr = false;
        for c in it {
            if c == '\r' {
                out.push('\n');
                prev_cr = true;
                continue;
            }
            if c == '\n' && prev_cr {
                prev_cr = false;
                continue;
            }
            prev_cr = false;
            if c.is_control() && c != '\n' && c != '\t' {
                continue;
            }
            if c == '\u{feff}' || c == '\u{200b}' {
                continue;
            }
            out.push(c);
        }
        out
    };
    if s.is_ascii()
        && !s
            .bytes()
            .any(|b| b < 0x20 && b != b'\n' && b != b'\t' || b == 0x7f)
    {
        return s.trim().to_string();
    }
    let out = if s.is_ascii() {
        cleaned(&mut s.chars())
    } else {
        match form {
            UnicodeForm::Nfc => cleaned(&mut s.nfc()),
            UnicodeForm::Nfkc => cleaned(&mut s.nfkc()),
            UnicodeForm::None => cleaned(&mut s.chars()),
        }
    };
    let t = out.trim();
    if t.len() == out.len() {
        out
    } else {
        t.to_string()
    }
}

/// Apply `f` to every string in the row that is text (not `license`, `split`, `label`, `role`).
pub fn map_text(obj: &mut Map<String, Value>, f: &mut dyn FnMut(&mut String)) {
    fn walk(v: &mut Value, f: &mut dyn FnMut(&mut String)) {
        match v {
            Value::String(s) => f(s),
            Value::Array(a) => a.iter_mut().for_each(|x| walk(x, f)),
            Value::Object(o) => {
                for (k, x) in o.iter_mut() {
                    if k != "role" {
                        walk(x, f);
                    }
                }
            }
            _ => {}
        }
    }
    for (k, v) in obj.iter_mut() {
        if !matches!(k.as_str(), "license" | "split" | "label") {
            walk(v, f);
        }
    }
}

fn text_of(v: &Value, out: &mut String) {
    match v {
        Value::String(s) => {
            out.push_str(s);
            out.push('\n');
        }
        Value::Array(a) => {
            for m in a {
                if let Some(o) = m.as_object() {
                    if let Some(r) = o.get("role").and_then(Value::as_str) {
                        out.push_str(r);
                        out.push_str(": ");
                    }
                    if let Some(c) = o.get("content") {
                        text_of(c, out);
                    }
                } else {
                    text_of(m, out);
                }
            }
        }
        _ => {}
    }
}

/// The row's content as one text (what dedup and the filters look at).
pub fn content_text(row: &Record) -> String {
    let keys: &[&str] = match row.family {
        Family::Preference => &["prompt", "chosen", "rejected"],
        Family::Kto => &["prompt", "completion"],
        Family::Sft => &[
            "messages",
            "prompt",
            "completion",
            "instruction",
            "input",
            "output",
        ],
    };
    let mut out = String::new();
    for k in keys {
        if let Some(v) = row.obj.get(*k) {
            text_of(v, &mut out);
        }
    }
    out
}

/// Whether a preference row's chosen and rejected answers are identical.
pub fn chosen_equals_rejected(row: &Record) -> bool {
    row.family == Family::Preference && row.obj.get("chosen") == row.obj.get("rejected")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn formats_are_recognised_and_checked() {
        let ok = [
            (
                json!({"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"yo"}]}),
                Family::Sft,
            ),
            (json!({"prompt":"a","completion":"b"}), Family::Sft),
            (
                json!({"instruction":"a","input":"","output":"b"}),
                Family::Sft,
            ),
            (
                json!({"prompt":"a","chosen":"b","rejected":"c"}),
                Family::Preference,
            ),
            (
                json!({"prompt":"a","completion":"b","label":false}),
                Family::Kto,
            ),
        ];
        for (v, f) in ok {
            assert_eq!(validate(v.clone()).unwrap().family, f, "{v}");
        }
        let bad = [
            (json!([1]), "expected a JSON object"),
            (
                json!({"messages":[{"role":"user","content":"hi"}]}),
                "no assistant message",
            ),
            (
                json!({"messages":[{"role":"bot","content":"hi"}]}),
                "is not one of",
            ),
            (
                json!({"prompt":"a","completion":"b","label":"yes"}),
                "\"label\" must be true or false",
            ),
            (
                json!({"prompt":"a","chosen":"b"}),
                "\"rejected\" is missing",
            ),
            (json!({"text":"a"}), "unknown row format"),
            (
                json!({"prompt":"a","completion":"b","split":"dev"}),
                "\"split\"",
            ),
        ];
        for (v, want) in bad {
            let e = validate(v.clone()).unwrap_err();
            assert!(e.contains(want), "{v}: {e}");
        }
    }

    #[test]
    fn normalisation_is_nfc_and_strips_controls() {
        let s = "  Cafe\u{301}\r\nline\u{0007}two\u{feff}  ";
        assert_eq!(normalize_str(s, UnicodeForm::Nfc), "Caf\u{e9}\nlinetwo");
        assert_eq!(normalize_str("ＡＢＣ", UnicodeForm::Nfkc), "ABC");
    }
}
