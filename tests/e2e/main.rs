//! End-to-end tests through the `loraops` binary: a registry started as a process, and the
//! CLI driving it like a user would. The harness is in `helpers.rs`.

mod cli;
mod console;
mod data;
mod demo;
mod eval;
mod helpers;
mod pipeline;
mod quantized;
mod runs;
mod stack;
mod walkthrough;
