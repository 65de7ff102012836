//! loraops data: the JSONL rows every stage reads, and the stages that make them.
//!
//! - `row`: the typed row format (SFT messages, prompt/completion or Alpaca; preference; KTO),
//!   its optional `weight`, and the Alpaca prompt template, written once. The trainer, the
//!   evaluation suites and curation all read rows through it.
//! - `error`: this crate's errors; an endpoint's failure says its status, so a caller can tell
//!   a refused request from an endpoint that is down.
//!
//! With the `curate` feature (on by default):
//! - `format`: curation's schema checks, normalisation and the text dedup and filters see
//! - `curate`: `loraops data curate`, a list of stages (see its module docs)
//! - `synth`: `loraops data synth`, synthetic rows through a gateway, screened as curation
//!   screens input rows
//! - `chat`: the blocking OpenAI-compatible client of the curation judge and of `synth`
//!
//! This crate knows nothing of models, tokenizers or training: a row is text and fields.

pub mod error;
pub mod row;

#[cfg(feature = "curate")]
pub mod chat;
#[cfg(feature = "curate")]
pub mod curate;
#[cfg(feature = "curate")]
pub mod format;
#[cfg(feature = "curate")]
pub mod synth;

pub use error::{Error, Result};
pub use row::Row;
