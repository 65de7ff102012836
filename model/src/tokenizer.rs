//! The base model's tokenizer (tokenizer.json) and chat template (tokenizer_config.json),
//! rendered with minijinja the way transformers renders it with Jinja2.

use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    /// The chat template, compiled on first use.
    env: std::sync::OnceLock<minijinja::Environment<'static>>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub pad_id: u32,
    /// Whether encoding with special tokens prepends BOS (Llama-style tokenizers do).
    pub add_bos: bool,
}

/// A special token in tokenizer_config.json is a string or an AddedToken object.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::MissingTokenizer {
                dir: dir.to_path_buf(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| Error::parse(&path, e))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = if cfg_path.exists() {
            serde_json::from_slice(&crate::error::read(&cfg_path)?)
                .map_err(|e| Error::parse(&cfg_path, e))?
        } else {
            Value::Null
        };
        let mut chat_template = match cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: use "default".
            Some(Value::Array(a)) => a
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string),
            _ => None,
        };
        let jinja = dir.join("chat_template.jinja");
        if chat_template.is_none() && jinja.exists() {
            chat_template =
                Some(String::from_utf8_lossy(&crate::error::read(&jinja)?).into_owned());
        }
        let bos_token = token_text(cfg.get("bos_token"));
        let eos_token = token_text(cfg.get("eos_token"));
        let id = |t: &Option<String>| t.as_deref().and_then(|t| inner.token_to_id(t));
        let (bos_id, eos_id) = (id(&bos_token), id(&eos_token));
        let pad_id = id(&token_text(cfg.get("pad_token")))
            .or(eos_id)
            .unwrap_or(0);
        let with = inner
            .encode("a", true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let without = inner
            .encode("a", false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let add_bos = with.get_ids().len() > without.get_ids().len()
            && bos_id.is_some()
            && with.get_ids().first() == bos_id.as_ref();
        Ok(Self {
            inner,
            chat_template,
            env: std::sync::OnceLock::new(),
            bos_token,
            eos_token,
            bos_id,
            eos_id,
            pad_id,
            add_bos,
        })
    }

    /// Token ids of a text piece, without added BOS/EOS (special tokens written in the text are
    /// recognised).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Text of generated ids with special tokens left out, as OpenAI-style servers return it.
    pub fn decode_text(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Render the chat template for `messages`.
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let messages = serde_json::to_value(messages).expect("serialisable messages");
        self.render_chat(&messages, None, add_generation_prompt)
    }

    /// Render the chat template for messages in OpenAI's shape (assistant messages with
    /// `tool_calls`, `tool` messages with `tool_call_id`), with `tools` (function definitions)
    /// when given, as transformers' `apply_chat_template(messages, tools=…)` does.
    pub fn render_chat(
        &self,
        messages: &Value,
        tools: Option<&Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let env = self.template_env()?;
        let t = env
            .get_template("chat")
            .map_err(|e| Error::Template(e.to_string()))?;
        t.render(minijinja::context! {
            messages => messages,
            tools => tools,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        })
        .map_err(|e| Error::Template(e.to_string()))
    }

    /// The template compiled once, with the functions transformers' Jinja2 offers.
    fn template_env(&self) -> Result<&minijinja::Environment<'static>> {
        if let Some(env) = self.env.get() {
            return Ok(env);
        }
        let tpl = self.chat_template.clone().ok_or_else(|| {
            Error::Template("the tokenizer has no chat_template; use prompt/completion rows".into())
        })?;
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_function("strftime_now", |fmt: String| {
            chrono::Utc::now().format(&fmt).to_string()
        });
        // Jinja2 as transformers configures it: trim_blocks and lstrip_blocks.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_template_owned("chat", tpl)
            .map_err(|e| Error::Template(e.to_string()))?;
        Ok(self.env.get_or_init(|| env))
    }
}
