//! loraops gateway: the data plane. OpenAI-compatible serving of a base model and its LoRA
//! adapters, following the registry's routing table with sticky stable/canary splitting.
//!
//! A request flows `http` (auth, body) → [`validate`] (OpenAI request → engine request) →
//! [`routing`] (model name + sticky key → engine key and arm) → [`limiter`] → [`engine`] (a
//! backend: the native multi-LoRA engine, mistral.rs with its [`pool`] of merged engines, or a
//! remote upstream; each makes the version resident once, [`residency`]) → back out as JSON or
//! SSE. [`feed`] keeps the routing table current from the registry, [`adapters`] holds the
//! adapter files it pulls, [`metrics`] exports Prometheus series per version and arm.
//! [`dispatch`] is where a routed request meets its engine, for the request path, the online
//! [`judge`] and [`shadow`] mirroring alike; [`report`] counts per arm for the registry.

pub mod adapters;
pub mod base;
pub mod dispatch;
pub mod engine;
pub mod error;
pub mod feed;
pub mod http;
pub mod judge;
pub mod limiter;
pub mod metrics;
pub mod openai;
pub mod pool;
pub mod report;
pub mod residency;
pub mod respond;
pub mod routing;
pub mod settings;
pub mod shadow;
pub mod tools;
pub mod validate;

pub use http::{Application, StartError};
pub use settings::{GatewayConfig, GatewaySettings};
