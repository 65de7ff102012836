//! The `loraops` binary's library: the command line ([`cli`]) and layered configuration
//! ([`config`]). Each command group lives in one module under `cli/`.

pub mod cli;
pub mod config;
pub mod eval;
pub mod output;
pub mod run_report;
