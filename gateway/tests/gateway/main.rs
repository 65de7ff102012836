//! Gateway tests: one binary, real servers on port 0 — a registry holding the adapters and a
//! gateway serving a generated tiny model with the native engine (and mistral.rs where named).

mod helpers;
mod kit;

mod api;
mod engine;
mod limits;
mod native;
mod remote;
mod rollout;
mod routing;
