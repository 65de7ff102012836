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
    /// How often per-arm counters are reported to the registry.
    pub report_interval: std::time::Duration,
    /// In-situ quantisation of every engine's weights (`q8_0`, `q4k`, …; see
    /// [`crate::engine::mistral::parse_isq`]).
    pub isq: Option<String>,
    /// Memory for engines, in MiB: each holds a full copy of the base, so this caps how many
    /// are loaded (below `max_engines`).
    pub memory_budget_mb: Option<u64>,
    /// Score a sample of rollout answers with a judge model (see [`crate::judge`]).
    pub judge: Option<crate::judge::JudgeSettings>,
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
            report_interval: std::time::Duration::from_secs(5),
            isq: None,
            memory_budget_mb: None,
            judge: None,
        }
    }
}

/// The `[gateway]` section of the configuration file (`LORAOPS_GATEWAY__KEY` in the
/// environment); flags of `loraops gateway serve` override it. Secrets (the registry token)
/// are not here: they come from `LORAOPS_TOKEN`.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// HOST:PORT (default 127.0.0.1:8500).
    pub listen: Option<String>,
    /// Hugging Face directory of the base model.
    pub base_model: Option<PathBuf>,
    /// The `model` name that selects the base without adapter.
    pub base_name: Option<String>,
    /// Registry to follow for routing and adapters.
    pub registry_url: Option<String>,
    /// Adapter cache (default DATA_DIR/gateway/hub).
    pub cache_dir: Option<PathBuf>,
    /// Most engines (adapter versions) kept loaded.
    pub max_engines: Option<usize>,
    /// `auto`, `bf16`, `f16` or `f32`.
    pub dtype: Option<String>,
    pub max_concurrent: Option<usize>,
    pub max_queued: Option<usize>,
    /// Require a JWT on inference (default true).
    pub require_auth: Option<bool>,
    /// Forward inference to this OpenAI-compatible server (`…/v1`, where `model` names
    /// `BASE` or `NAME@V`) instead of running mistral.rs in-process.
    pub upstream_url: Option<String>,
    /// In-situ quantisation of every engine (`q8_0`, `q4k`, …).
    pub isq: Option<String>,
    /// Memory for engines in MiB; caps how many are loaded at once.
    pub memory_budget_mb: Option<u64>,
    /// Online judge: the model that scores a sample of rollout answers (the base model's name
    /// or `NAME@V`); their mean is the `judge_score` rollout rules can use.
    pub judge_model: Option<String>,
    /// Fraction of rollout answers judged, in (0, 1] (default 0.05).
    pub judge_sample_rate: Option<f64>,
    /// The judge's system prompt.
    pub judge_rubric: Option<String>,
}

impl GatewayConfig {
    /// Checks what can be checked without loading anything.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(d) = &self.dtype
            && crate::engine::mistral::parse_dtype(d).is_none()
        {
            return Err(format!(
                "gateway.dtype {d:?}: expected auto, bf16, f16 or f32"
            ));
        }
        if let Some(q) = &self.isq
            && crate::engine::mistral::parse_isq(q).is_none()
        {
            return Err(format!(
                "gateway.isq {q:?}: expected q4_0, q4_1, q5_0, q5_1, q8_0, q8_1, q2k … q8k, hqq4 or hqq8"
            ));
        }
        if let Some(r) = self.judge_sample_rate
            && !(r > 0.0 && r <= 1.0)
        {
            return Err(format!(
                "gateway.judge_sample_rate {r}: expected a fraction in (0, 1]"
            ));
        }
        if self.judge_model.is_none()
            && (self.judge_sample_rate.is_some() || self.judge_rubric.is_some())
        {
            return Err(
                "gateway.judge_sample_rate and judge_rubric need gateway.judge_model".into(),
            );
        }
        if self.memory_budget_mb == Some(0) {
            return Err("gateway.memory_budget_mb must be at least 1".into());
        }
        for (key, v) in [
            ("max_engines", self.max_engines),
            ("max_concurrent", self.max_concurrent),
        ] {
            if v == Some(0) {
                return Err(format!("gateway.{key} must be at least 1"));
            }
        }
        if let Some(l) = &self.listen
            && l.rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .is_none()
        {
            return Err(format!("gateway.listen {l:?}: expected HOST:PORT"));
        }
        Ok(())
    }
}
