//! Constrained decoding with llguidance: a grammar (a regular expression, a JSON schema or a
//! Lark grammar) becomes a matcher per sequence that, before each token is sampled, leaves only
//! the tokens the grammar allows next. The answer then always matches: a judge's score always
//! parses, a `json_schema` answer always validates.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv, TokTrie};
use llguidance::{Matcher, ParserFactory};
use toktrie_hf_tokenizers::{ByteTokenizer, ByteTokenizerEnv};

use crate::EngineError;

/// What an answer must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    Regex(String),
    /// A JSON schema; `{"type": "object"}` for any JSON object.
    JsonSchema(serde_json::Value),
    /// A Lark grammar (llguidance's dialect).
    Lark(String),
}

/// Builds matchers for one tokenizer.
pub struct Grammars {
    factory: Arc<ParserFactory>,
}

impl Grammars {
    /// From the model's `tokenizer.json`, for logits of `vocab` entries.
    pub fn new(tokenizer_json: &[u8], vocab: usize) -> Result<Self, EngineError> {
        let err = |e: anyhow::Error| EngineError::Config(format!("grammar support: {e:#}"));
        let bt = ByteTokenizer::from_json_bytes(tokenizer_json).map_err(err)?;
        let n = bt.token_bytes().len().max(vocab);
        let env: TokEnv = ByteTokenizerEnv::new(bt, Some(n)).map_err(err)?.to_env();
        let mut factory = ParserFactory::new_simple(&env).map_err(err)?;
        factory.quiet();
        Ok(Self {
            factory: Arc::new(factory),
        })
    }

    /// A matcher for `c`; a grammar that does not compile is the request's error.
    pub fn matcher(&self, c: &Constraint) -> Result<Matcher, String> {
        let grammar = match c {
            Constraint::Regex(r) => TopLevelGrammar::from_regex(r),
            Constraint::JsonSchema(s) => TopLevelGrammar::from_json_schema(compact(s)),
            Constraint::Lark(l) => TopLevelGrammar::from_lark(l.clone()),
        };
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| format!("invalid constraint: {e:#}"))?;
        Ok(Matcher::new(Ok(parser)))
    }

    pub fn trie(&self) -> &TokTrie {
        self.factory.tok_env().tok_trie()
    }
}

/// `schema`, asking for JSON without insignificant whitespace (unless it says otherwise): left
/// free, a model can spend its whole `max_tokens` on spaces and newlines and never close the
/// object.
pub fn compact(schema: &serde_json::Value) -> serde_json::Value {
    let mut s = schema.clone();
    if let Some(o) = s.as_object_mut()
        && !o.contains_key("x-guidance")
    {
        o.insert(
            "x-guidance".into(),
            serde_json::json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
        );
    }
    s
}

/// Set every logit the matcher's mask (`Matcher::compute_mask`, or why it failed) does not
/// allow to −∞. Returns an error when the grammar allows nothing.
pub fn mask(allowed: Result<SimpleVob, String>, logits: &mut [f32]) -> Result<(), String> {
    let allowed = allowed.map_err(|e| format!("constraint: {e}"))?;
    let mut any = false;
    for (t, l) in logits.iter_mut().enumerate() {
        if allowed.is_allowed(t as u32) {
            any = true;
        } else {
            *l = f32::NEG_INFINITY;
        }
    }
    if any {
        Ok(())
    } else {
        Err("constraint: no token is allowed".into())
    }
}
