//! Suites on disk and in memory: `suite.json` (the manifest) plus `cases.jsonl`, or a
//! `templates.json` that expands deterministically into cases (the red-team smoke suite).
//! A suite's identity is its digest over the canonical manifest and cases
//! ([`loraops_registry::api::suite_digest`]), the same on every machine.

use std::path::Path;

use anyhow::Context;
use loraops_data::row::Sft;
use loraops_registry::api::{NewSuite, SuiteManifest, canonical_cases, suite_digest};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::scorers::Scorer;

pub const MANIFEST_FILE: &str = "suite.json";
pub const CASES_FILE: &str = "cases.jsonl";
pub const TEMPLATES_FILE: &str = "templates.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A string or a list of strings (any of which is right).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn items(&self) -> Vec<&str> {
        match self {
            Self::None => vec![],
            Self::One(s) => vec![s.as_str()],
            Self::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

/// One line of `cases.jsonl`. The prompt is `messages` (a chat), `prompt` (one user turn,
/// chat) or `text` (a raw completion prompt, sent to `/v1/completions`); the other fields
/// are what the suite's scorer needs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Case {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Grouping for per-category metrics (`refusal_rate/prompt_injection`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// A system message put before `prompt` or `messages`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<Message>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// `exact` / `contains`: the right answer(s); `regex`: pattern(s).
    #[serde(default, skip_serializing_if = "is_none")]
    pub expected: OneOrMany,
    /// `multiple_choice`: the options, shown lettered A, B, C, … after the prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub choices: Option<Vec<String>>,
    /// `multiple_choice`: a letter, a 0-based index, or the text of the right choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<Value>,
    /// `regex`: the pattern (else `expected`, else the scorer's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    /// `json`: the schema the output must match (else the scorer's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<Value>,
    /// `refusal`: strings that must never appear in the output (secrets, PII).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forbidden: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    /// `perplexity`: the SFT row scored (any format the trainer reads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row: Option<Value>,
}

fn is_none(e: &OneOrMany) -> bool {
    matches!(e, OneOrMany::None)
}

/// What to send to the gateway for a case.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Chat(Vec<Message>),
    Text(String),
}

const LETTERS: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ";

impl Case {
    pub fn id_or(&self, index: usize) -> String {
        self.id
            .clone()
            .unwrap_or_else(|| format!("case-{}", index + 1))
    }

    /// The choices as the model sees them: `A. …` lines and an instruction.
    fn choices_block(&self) -> Option<String> {
        let choices = self.choices.as_ref()?;
        let mut s = String::from("\n\n");
        for (c, l) in choices.iter().zip(LETTERS.chars()) {
            s.push_str(&format!("{l}. {c}\n"));
        }
        s.push_str("Answer with the letter of the correct choice.");
        Some(s)
    }

    pub fn prompt(&self) -> Result<Prompt, String> {
        let block = self.choices_block().unwrap_or_default();
        if let Some(t) = &self.text {
            return Ok(Prompt::Text(format!("{t}{block}")));
        }
        let mut msgs = Vec::new();
        if let Some(s) = &self.system {
            msgs.push(Message {
                role: "system".into(),
                content: s.clone(),
            });
        }
        match (&self.messages, &self.prompt) {
            (Some(m), _) if !m.is_empty() => msgs.extend(m.iter().cloned()),
            (_, Some(p)) => msgs.push(Message {
                role: "user".into(),
                content: p.clone(),
            }),
            _ => return Err("a case needs \"messages\", \"prompt\" or \"text\"".into()),
        }
        if !block.is_empty()
            && let Some(last) = msgs.iter_mut().rev().find(|m| m.role == "user")
        {
            last.content.push_str(&block);
        }
        Ok(Prompt::Chat(msgs))
    }
}

/// A suite ready to run: its manifest, canonical cases, digest and parsed scorer.
#[derive(Debug, Clone)]
pub struct LoadedSuite {
    pub manifest: SuiteManifest,
    /// Canonical cases JSONL (what the digest covers and the registry stores).
    pub cases_text: String,
    pub digest: String,
    pub cases: Vec<Case>,
    pub scorer: Scorer,
}

impl LoadedSuite {
    /// Canonicalise, hash and check a suite: every case must parse, carry a prompt and what
    /// the scorer needs.
    pub fn new(manifest: SuiteManifest, cases_jsonl: &str) -> anyhow::Result<Self> {
        let scorer = Scorer::parse(&manifest.scorer)
            .map_err(|e| anyhow::anyhow!("suite {}: scorer: {e}", manifest.name))?;
        let (cases_text, _) = canonical_cases(cases_jsonl)
            .map_err(|e| anyhow::anyhow!("suite {}: {e}", manifest.name))?;
        let mut cases = Vec::new();
        for (i, line) in cases_text.lines().enumerate() {
            let c: Case = serde_json::from_str(line)
                .map_err(|e| anyhow::anyhow!("suite {}: case {}: {e}", manifest.name, i + 1))?;
            let prompt = if scorer.needs_prompt() {
                c.prompt().map(|_| ())
            } else {
                Ok(())
            };
            prompt.and_then(|_| scorer.check_case(&c)).map_err(|e| {
                anyhow::anyhow!("suite {}: case {}: {e}", manifest.name, c.id_or(i))
            })?;
            cases.push(c);
        }
        let digest = suite_digest(&manifest, &cases_text);
        Ok(Self {
            manifest,
            cases_text,
            digest,
            cases,
            scorer,
        })
    }

    /// `DIR/suite.json` + `DIR/cases.jsonl`, or `DIR/templates.json` (expanded).
    pub fn from_dir(dir: &Path) -> anyhow::Result<Self> {
        let manifest_path = dir.join(MANIFEST_FILE);
        let cases_path = dir.join(CASES_FILE);
        if !cases_path.exists() && dir.join(TEMPLATES_FILE).exists() {
            let t = std::fs::read_to_string(dir.join(TEMPLATES_FILE))
                .with_context(|| format!("{}", dir.join(TEMPLATES_FILE).display()))?;
            let (m, cases) = super::redteam::expand(&t)
                .with_context(|| format!("{}", dir.join(TEMPLATES_FILE).display()))?;
            return Self::new(m, &cases);
        }
        let m: SuiteManifest = serde_json::from_slice(
            &std::fs::read(&manifest_path)
                .with_context(|| format!("{}", manifest_path.display()))?,
        )
        .with_context(|| format!("{} is not a suite manifest", manifest_path.display()))?;
        let cases = std::fs::read_to_string(&cases_path)
            .with_context(|| format!("{}", cases_path.display()))?;
        Self::new(m, &cases)
    }

    /// Write `suite.json` and `cases.jsonl` (canonical) into `dir`.
    pub fn write_dir(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
        std::fs::write(
            dir.join(MANIFEST_FILE),
            serde_json::to_string_pretty(&self.manifest)? + "\n",
        )?;
        std::fs::write(dir.join(CASES_FILE), &self.cases_text)?;
        Ok(())
    }

    pub fn to_upload(&self) -> NewSuite {
        NewSuite {
            manifest: self.manifest.clone(),
            cases: self.cases_text.clone(),
            digest: Some(self.digest.clone()),
        }
    }

    /// `max_tokens` from the manifest's `decoding`, else `default`.
    pub fn max_tokens(&self, default: u64) -> u64 {
        self.manifest
            .decoding
            .get("max_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(default)
    }
}

/// The perplexity suite of a curation split (usually `holdout.jsonl`): every row verbatim as a
/// case's `row`, keeping its `id` and `source` (as the category).
pub fn perplexity_cases(jsonl: &str) -> anyhow::Result<Vec<Case>> {
    let mut out = Vec::new();
    for r in split_rows(jsonl) {
        let (i, row) = r?;
        anyhow::ensure!(row.is_object(), "line {}: not a JSON object", i + 1);
        out.push(Case {
            id: Some(row_id(&row, i)),
            category: row
                .get("source")
                .and_then(Value::as_str)
                .map(str::to_string),
            row: Some(row),
            ..Case::default()
        });
    }
    anyhow::ensure!(!out.is_empty(), "no rows");
    Ok(out)
}

/// The non-empty lines of a JSONL split: (0-based line index, row).
fn split_rows(jsonl: &str) -> impl Iterator<Item = anyhow::Result<(usize, Value)>> + '_ {
    jsonl
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line)
                .map(|row| (i, row))
                .with_context(|| format!("line {}: not JSON", i + 1))
        })
}

fn row_id(row: &Value, index: usize) -> String {
    row.get("id")
        .and_then(|v| {
            v.as_str()
                .map(str::to_string)
                .or_else(|| v.as_u64().map(|n| n.to_string()))
        })
        .unwrap_or_else(|| format!("row-{}", index + 1))
}

/// The regression suite of a curation split: each SFT row (`messages`, `prompt`+`completion`,
/// `instruction`+`input`+`output`) becomes a case whose expected answer is the last assistant
/// turn or the completion, prompted exactly as the trainer formats the row (chat rows through
/// the chat API, prompt/completion and Alpaca rows as raw text through `/v1/completions`),
/// read through the same typed row ([`loraops_data::row::Sft`]) the trainer reads.
pub fn regression_cases(jsonl: &str) -> anyhow::Result<Vec<Case>> {
    let mut out = Vec::new();
    for r in split_rows(jsonl) {
        let (i, row) = r?;
        let id = row_id(&row, i);
        let mut case = Case {
            id: Some(id),
            category: row
                .get("source")
                .and_then(Value::as_str)
                .map(str::to_string),
            ..Case::default()
        };
        let sft = Sft::from_json(&row).map_err(|e| anyhow::anyhow!("line {}: {e}", i + 1))?;
        if let Sft::Chat(msgs) = &sft {
            let msgs: Vec<Message> = msgs
                .iter()
                .map(|m| {
                    Ok(Message {
                        role: m.role.clone(),
                        content: m.text()?.to_string(),
                    })
                })
                .collect::<Result<_, String>>()
                .map_err(|e| anyhow::anyhow!("line {}: \"messages\": {e}", i + 1))?;
            let last = msgs
                .iter()
                .rposition(|m| m.role == "assistant")
                .with_context(|| format!("line {}: no assistant turn to expect", i + 1))?;
            if !msgs[..last].iter().any(|m| m.role == "user") {
                anyhow::bail!(
                    "line {}: no user turn before the last assistant turn",
                    i + 1
                );
            }
            case.expected = OneOrMany::One(msgs[last].content.clone());
            case.messages = Some(msgs[..last].to_vec());
        } else {
            // Prompted exactly as the trainer prompts the row (the Alpaca template included).
            let (prompt, completion) = sft
                .text_pair()
                .ok_or_else(|| anyhow::anyhow!("line {}: {}", i + 1, loraops_data::row::NOT_SFT))?;
            case.text = Some(prompt);
            case.expected = OneOrMany::One(completion.to_string());
        }
        out.push(case);
    }
    anyhow::ensure!(!out.is_empty(), "the split has no rows");
    Ok(out)
}

/// Cases as JSONL.
pub fn cases_jsonl(cases: &[Case]) -> String {
    let mut s = String::new();
    for c in cases {
        s.push_str(&serde_json::to_string(c).expect("case serialises"));
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn manifest(scorer: Value) -> SuiteManifest {
        serde_json::from_value(json!({"name": "t", "version": "1", "scorer": scorer})).unwrap()
    }

    #[test]
    fn digest_ignores_formatting_and_checks_cases() {
        let a = LoadedSuite::new(
            manifest(json!({"type": "exact"})),
            "{\"prompt\":\"2+2?\",\"expected\":\"4\"}\n",
        )
        .unwrap();
        let b = LoadedSuite::new(
            manifest(json!({"type": "exact"})),
            "\n{ \"expected\" : \"4\", \"prompt\": \"2+2?\" }\n\n",
        )
        .unwrap();
        assert_eq!(a.digest, b.digest);
        assert!(a.digest.starts_with("sha256:"));
        let c = LoadedSuite::new(
            manifest(json!({"type": "exact"})),
            "{\"prompt\":\"2+2?\",\"expected\":\"5\"}\n",
        )
        .unwrap();
        assert_ne!(a.digest, c.digest);
        // No expected answer for an exact-match case; no prompt at all.
        let e = LoadedSuite::new(manifest(json!({"type": "exact"})), "{\"prompt\":\"x\"}\n")
            .unwrap_err();
        assert!(e.to_string().contains("expected"), "{e}");
        let e = LoadedSuite::new(manifest(json!({"type": "exact"})), "{\"expected\":\"x\"}\n")
            .unwrap_err();
        assert!(e.to_string().contains("\"prompt\""), "{e}");
        let e = LoadedSuite::new(manifest(json!({"type": "bleu"})), "{\"prompt\":\"x\"}\n")
            .unwrap_err();
        assert!(e.to_string().contains("bleu"), "{e}");
    }

    #[test]
    fn prompts_and_choices() {
        let c = Case {
            system: Some("Be brief.".into()),
            prompt: Some("Largest planet?".into()),
            choices: Some(vec!["Mars".into(), "Jupiter".into()]),
            ..Case::default()
        };
        let Prompt::Chat(m) = c.prompt().unwrap() else {
            panic!("chat expected")
        };
        assert_eq!(m[0].role, "system");
        assert_eq!(
            m[1].content,
            "Largest planet?\n\nA. Mars\nB. Jupiter\nAnswer with the letter of the correct choice."
        );
        let t = Case {
            text: Some("Q: hi\nA:".into()),
            ..Case::default()
        };
        assert_eq!(t.prompt().unwrap(), Prompt::Text("Q: hi\nA:".into()));
    }

    #[test]
    fn regression_rows_in_every_sft_format() {
        let split = [
            json!({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you"}]}),
            json!({"prompt": "Q: 1+1\nA:", "completion": " 2", "source": "math"}),
            json!({"instruction": "Shout", "input": "hi", "output": "HI"}),
            json!({"instruction": "Greet", "output": "Hello!"}),
        ]
        .iter()
        .map(|v| v.to_string() + "\n")
        .collect::<String>();
        let cases = regression_cases(&split).unwrap();
        assert_eq!(cases.len(), 4);
        assert_eq!(cases[0].expected, OneOrMany::One("See you".into()));
        assert_eq!(cases[0].messages.as_ref().unwrap().len(), 4);
        assert_eq!(cases[1].text.as_deref(), Some("Q: 1+1\nA:"));
        assert_eq!(cases[1].category.as_deref(), Some("math"));
        assert!(
            cases[2]
                .text
                .as_ref()
                .unwrap()
                .contains("### Input:\nhi\n\n### Response:\n")
        );
        assert!(!cases[3].text.as_ref().unwrap().contains("### Input"));
        assert_eq!(cases[3].id.as_deref(), Some("row-4"));
        let s = LoadedSuite::new(manifest(json!({"type": "exact"})), &cases_jsonl(&cases)).unwrap();
        assert_eq!(s.cases, cases);
        assert!(regression_cases("{\"prompt\": \"x\"}\n").is_err());
        assert!(
            regression_cases("{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}\n")
                .is_err()
        );
    }
}
