//! Gateway tests: one binary, real servers on port 0 — a registry holding the adapters and a
//! gateway serving a generated tiny model with mistral.rs.

mod helpers;
mod kit;

mod api;
mod engine;
mod rollout;
mod routing;
