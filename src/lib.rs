//! The `loraops` binary's library: the command line ([`cli`], one module per command group),
//! layered configuration ([`config`]), evaluation suites run through the gateway or the model
//! ([`eval`]), progress and `--json` output ([`output`]) and a training run's reports to the
//! registry ([`run_report`]).

pub mod cli;
pub mod config;
pub mod eval;
pub mod output;
pub mod run_report;
