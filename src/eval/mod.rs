//! Evaluation: suites (a manifest and JSONL cases, content-hashed), the scorers, the shipped
//! red-team smoke templates, regression suites built from curation splits, and the runner
//! that drives the gateway with a pinned adapter version and turns per-case results into
//! evidence for the registry. Perplexity suites are the exception: the gateway's API returns no
//! prompt log-probabilities, so they run through the trainer's forward pass ([`perplexity`]).

pub mod perplexity;
pub mod redteam;
pub mod runner;
pub mod schema;
pub mod scorers;
pub mod suite;

/// `produced_by` of the evidence this crate posts.
pub fn producer() -> String {
    format!("loraops eval {}", env!("CARGO_PKG_VERSION"))
}
