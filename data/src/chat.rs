//! A small blocking client for an OpenAI-compatible `/chat/completions` endpoint (the loraops
//! gateway, or any other), shared by the curation judge and by synthetic data generation.

use std::time::Duration;

use serde_json::Value;

/// Why a chat request produced no answer.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("cannot reach {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error("{url}: HTTP {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("{url}: unreadable answer: {message}")]
    Answer { url: String, message: String },
    #[error("{0}")]
    Setup(String),
}

impl ChatError {
    /// The endpoint it happened at, if any.
    pub fn url(&self) -> Option<&str> {
        match self {
            ChatError::Unreachable { url, .. }
            | ChatError::Status { url, .. }
            | ChatError::Answer { url, .. } => Some(url),
            ChatError::Setup(_) => None,
        }
    }

    /// As this crate's error: [`crate::Error::Endpoint`] naming the URL and the status, or a
    /// configuration error.
    pub fn into_error(self) -> crate::Error {
        let (status, detail) = match &self {
            ChatError::Unreachable { message, .. } => (None, format!("cannot reach it: {message}")),
            ChatError::Status { status, body, .. } => {
                (Some(*status), format!("HTTP {status}: {body}"))
            }
            ChatError::Answer { message, .. } => (None, format!("unreadable answer: {message}")),
            ChatError::Setup(m) => return crate::Error::Config(m.clone()),
        };
        crate::Error::Endpoint {
            url: self.url().unwrap_or_default().to_string(),
            status,
            detail,
        }
    }
}

/// Connection settings for [`ChatClient::new`].
#[derive(Debug, Clone)]
pub struct ChatSettings {
    /// Base URL of the OpenAI-compatible API (`…/v1`); `/chat/completions` is appended.
    pub url: String,
    /// Bearer token, if the endpoint needs one.
    pub token: Option<String>,
    pub timeout_s: u64,
    /// Retries per request on transport errors, 429 and 5xx answers.
    pub retries: usize,
}

/// The bearer token: the one given, else the named environment variable (an error if unset).
pub fn resolve_token(
    given: Option<&str>,
    env: Option<&str>,
    what: &str,
) -> Result<Option<String>, ChatError> {
    if let Some(t) = given {
        return Ok(Some(t.to_string()));
    }
    match env {
        Some(v) => std::env::var(v)
            .map(Some)
            .map_err(|_| ChatError::Setup(format!("{what}: environment variable {v} is not set"))),
        None => Ok(None),
    }
}

/// A chat client; cheap to share between threads.
pub struct ChatClient {
    url: String,
    http: reqwest::blocking::Client,
    token: Option<String>,
    retries: usize,
}

impl ChatClient {
    pub fn new(s: &ChatSettings) -> Result<Self, ChatError> {
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(s.timeout_s.max(1)))
            .build()
            .map_err(|e| ChatError::Setup(e.to_string()))?;
        Ok(Self {
            url: format!("{}/chat/completions", s.url.trim_end_matches('/')),
            http,
            token: s.token.clone(),
            retries: s.retries,
        })
    }

    /// The endpoint, for error messages.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Post one request body and return `choices[0].message.content`.
    pub fn complete(&self, body: &Value) -> Result<String, ChatError> {
        let url = &self.url;
        let mut last = None;
        for attempt in 0..=self.retries {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(200 << attempt.min(5)));
            }
            let mut req = self.http.post(url).json(body);
            if let Some(t) = &self.token {
                req = req.bearer_auth(t);
            }
            match req.send() {
                Ok(r) if r.status().is_success() => {
                    let v: Value = r.json().map_err(|e| ChatError::Answer {
                        url: url.clone(),
                        message: e.to_string(),
                    })?;
                    let content = v
                        .pointer("/choices/0/message/content")
                        .and_then(Value::as_str)
                        .ok_or_else(|| ChatError::Answer {
                            url: url.clone(),
                            message: format!("no choices[0].message.content in {v}"),
                        })?;
                    return Ok(content.to_string());
                }
                // Busy, loading or failing servers get another try; other answers are final.
                Ok(r) if r.status().is_server_error() || r.status().as_u16() == 429 => {
                    let status = r.status().as_u16();
                    last = Some(ChatError::Status {
                        url: url.clone(),
                        status,
                        body: r.text().unwrap_or_default(),
                    });
                }
                Ok(r) => {
                    let status = r.status().as_u16();
                    return Err(ChatError::Status {
                        url: url.clone(),
                        status,
                        body: r.text().unwrap_or_default(),
                    });
                }
                Err(e) => {
                    // reqwest's Display stops at "error sending request"; the cause says why.
                    // The URL is named once, by the error itself.
                    let e = e.without_url();
                    let mut message = e.to_string();
                    let mut src = std::error::Error::source(&e);
                    while let Some(s) = src {
                        message = format!("{message}: {s}");
                        src = s.source();
                    }
                    last = Some(ChatError::Unreachable {
                        url: url.clone(),
                        message,
                    });
                }
            }
        }
        Err(last.expect("at least one attempt"))
    }
}
