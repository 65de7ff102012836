//! What a gateway process is configured with.

use std::path::PathBuf;

use loraops_registry::auth::AuthSettings;

use crate::validate::Limits;

#[derive(Debug, Clone)]
pub struct GatewaySettings {
    /// HOST:PORT; port 0 picks a free one.
    pub listen: String,
    /// Hugging Face directory of the base model.
    pub base_model_dir: PathBuf,
    /// The `model` name that selects the base without adapter (default: the directory name).
    pub base_model_name: Option<String>,
    /// Registry to follow; without one only the base model is served.
    pub registry_url: Option<String>,
    pub registry_token: Option<String>,
    /// Adapter cache; must be the `HF_HUB_CACHE` the process was started with
    /// (see [`crate::adapters::set_hub_cache_env`]).
    pub cache_dir: PathBuf,
    /// Forward inference to this OpenAI-compatible server (`…/v1`) instead of running
    /// mistral.rs in-process.
    pub upstream_url: Option<String>,
    /// Most engines (versions) kept loaded.
    pub max_engines: usize,
    /// `auto`, `bf16`, `f16` or `f32`.
    pub dtype: String,
    /// Sequences each engine batches together.
    pub max_num_seqs: usize,
    pub max_concurrent: usize,
    pub max_queued: usize,
    pub limits: Limits,
    /// Require a JWT on inference and model listing; `None` serves openly.
    pub auth: Option<AuthSettings>,
    /// Where the HS256 secret lives when `auth` uses the default secret file.
    pub data_dir: PathBuf,
    /// Longest long-poll wait asked of the registry, in seconds.
    pub poll_wait_secs: u64,
    /// Load the base engine before accepting traffic.
    pub preload_base: bool,
}

impl GatewaySettings {
    pub fn new(base_model_dir: PathBuf, cache_dir: PathBuf) -> Self {
        Self {
            listen: "127.0.0.1:8500".into(),
            base_model_dir,
            base_model_name: None,
            registry_url: None,
            registry_token: None,
            cache_dir,
            upstream_url: None,
            max_engines: 4,
            dtype: "f32".into(),
            max_num_seqs: 16,
            max_concurrent: 64,
            max_queued: 256,
            limits: Limits::default(),
            auth: None,
            data_dir: PathBuf::from("./loraops-data"),
            poll_wait_secs: 30,
            preload_base: true,
        }
    }
}
