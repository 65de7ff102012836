//! What a gateway process is configured with.

use std::path::PathBuf;

use loraops_registry::auth::AuthSettings;

use crate::validate::Limits;

/// Which engine serves the gateway's requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// loraops' own engine: one base copy, every adapter unmerged, continuous batching.
    #[default]
    Native,
    /// mistral.rs: one merged engine per served version.
    Mistralrs,
    /// An OpenAI-compatible upstream (`upstream_url`).
    Remote,
}

impl std::str::FromStr for EngineKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "native" => Ok(Self::Native),
            "mistralrs" | "mistral.rs" => Ok(Self::Mistralrs),
            "remote" => Ok(Self::Remote),
            other => Err(format!(
                "engine {other:?}: expected native, mistralrs or remote"
            )),
        }
    }
}

/// The native engine's sizes.
#[derive(Debug, Clone)]
pub struct NativeSettings {
    /// `none` (f32) or `nf4` (the trainer's QLoRA base, double quantised).
    pub quantize: loraops_engine::Quantize,
    /// KV cache of all running sequences, in MiB.
    pub kv_cache_mb: u64,
    /// Adapters resident at once.
    pub max_adapters: usize,
    /// Memory for resident adapters, in MiB.
    pub adapter_memory_mb: u64,
    /// Sequences decoding at once.
    pub max_batch: usize,
    /// Prompt tokens prefilled per step while others decode.
    pub prefill_chunk: usize,
}

impl Default for NativeSettings {
    fn default() -> Self {
        Self {
            quantize: loraops_engine::Quantize::None,
            kv_cache_mb: 1024,
            max_adapters: 64,
            adapter_memory_mb: 2048,
            max_batch: 64,
            prefill_chunk: 16,
        }
    }
}

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
    /// A file holding the registry token, re-read every few seconds so a rotated token is
    /// picked up without a restart (takes precedence over `registry_token`).
    pub registry_token_file: Option<PathBuf>,
    /// Adapter cache; must be the `HF_HUB_CACHE` the process was started with
    /// (see [`crate::adapters::set_hub_cache_env`]).
    pub cache_dir: PathBuf,
    /// Which engine serves requests.
    pub engine: EngineKind,
    pub native: NativeSettings,
    /// The remote engine's upstream: an OpenAI-compatible server (`…/v1`).
    pub upstream_url: Option<String>,
    /// Sent to the upstream as a bearer token.
    pub upstream_api_key: Option<String>,
    /// Where the upstream reads a version's files (see `engine::remote::RemoteSettings`).
    pub upstream_lora_path: Option<String>,
    /// mistral.rs: most engines (versions) kept loaded.
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
    pub judge: Option<crate::judge::OnlineJudgeSettings>,
    /// Which versions `NAME@V` may name.
    pub pinned_versions: crate::routing::PinnedVersions,
}

impl GatewaySettings {
    pub fn new(base_model_dir: PathBuf, cache_dir: PathBuf) -> Self {
        Self {
            listen: "127.0.0.1:8500".into(),
            base_model_dir,
            base_model_name: None,
            registry_url: None,
            registry_token: None,
            registry_token_file: None,
            pinned_versions: Default::default(),
            cache_dir,
            engine: EngineKind::Native,
            native: NativeSettings::default(),
            upstream_url: None,
            upstream_api_key: None,
            upstream_lora_path: None,
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
    /// `native` (default), `mistralrs` or `remote` (with `upstream_url`).
    pub engine: Option<EngineKind>,
    /// native: `none` or `nf4` (the base held in NF4, as QLoRA trains on it).
    pub quantize: Option<String>,
    /// native: KV cache for all running sequences, in MiB (default 1024).
    pub kv_cache_mb: Option<u64>,
    /// native: adapters resident at once (default 64).
    pub max_adapters: Option<usize>,
    /// native: memory for resident adapters, in MiB (default 2048).
    pub adapter_memory_mb: Option<u64>,
    /// native: sequences decoding at once (default 64).
    pub max_batch: Option<usize>,
    /// native: prompt tokens prefilled per step while other sequences decode (default 16).
    pub prefill_chunk: Option<usize>,
    /// mistralrs: most engines (adapter versions) kept loaded.
    pub max_engines: Option<usize>,
    /// `auto`, `bf16`, `f16` or `f32`.
    pub dtype: Option<String>,
    pub max_concurrent: Option<usize>,
    pub max_queued: Option<usize>,
    /// Largest `max_tokens` a request may ask for (default 4096).
    pub max_tokens: Option<u64>,
    /// `max_tokens` of a request that gives none (default 256).
    pub default_max_tokens: Option<u64>,
    /// Largest prompt in bytes of text, 413 above (default 262144).
    pub max_prompt_bytes: Option<usize>,
    /// Largest prompt in tokens, 400 above (native engine; default 32768).
    pub max_prompt_tokens: Option<usize>,
    /// Largest `n`, answers per request (default 8).
    pub max_n: Option<u64>,
    /// Require a JWT on inference (default true).
    pub require_auth: Option<bool>,
    /// Which versions `NAME@V` may name: `any` (default; evaluation pins unreleased versions)
    /// or `routed` (only what the routing table serves now).
    pub pinned_versions: Option<crate::routing::PinnedVersions>,
    /// A file holding the gateway's registry token (a `gateway`-role token minted elsewhere,
    /// e.g. a mounted Secret); re-read every few seconds, so rotation needs no restart.
    pub registry_token_file: Option<PathBuf>,
    /// remote: the OpenAI-compatible server (`…/v1`, where `model` names `BASE` or `NAME@V`)
    /// inference goes to; setting it alone selects the remote engine.
    pub upstream_url: Option<String>,
    /// remote: where the upstream reads a version's files, `{name}`, `{version}`, `{digest}`
    /// filled in (e.g. `/adapters/{digest}` on a shared volume); without it only `lora_name`
    /// is sent. The upstream's API key comes from `LORAOPS_UPSTREAM_API_KEY`.
    pub upstream_lora_path: Option<String>,
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
    /// Most answers judged per user per hour (default 20).
    pub judge_max_per_user_per_hour: Option<u32>,
}

impl GatewayConfig {
    /// The engine: as configured, else `remote` when an upstream is set, else `native`.
    pub fn engine_kind(&self) -> EngineKind {
        self.engine.unwrap_or(if self.upstream_url.is_some() {
            EngineKind::Remote
        } else {
            EngineKind::Native
        })
    }

    /// Lay the configured keys over `s` (what is not configured keeps its default). Secrets
    /// and the base model are the caller's.
    pub fn apply_to(&self, s: &mut GatewaySettings) -> Result<(), String> {
        self.validate()?;
        if let Some(l) = &self.listen {
            s.listen = l.clone();
        }
        if self.base_name.is_some() {
            s.base_model_name = self.base_name.clone();
        }
        if self.registry_url.is_some() {
            s.registry_url = self.registry_url.clone();
        }
        if self.registry_token_file.is_some() {
            s.registry_token_file = self.registry_token_file.clone();
        }
        if let Some(p) = self.pinned_versions {
            s.pinned_versions = p;
        }
        s.engine = self.engine_kind();
        let n = &mut s.native;
        if let Some(q) = &self.quantize {
            n.quantize = q.parse()?;
        }
        n.kv_cache_mb = self.kv_cache_mb.unwrap_or(n.kv_cache_mb);
        n.max_adapters = self.max_adapters.unwrap_or(n.max_adapters);
        n.adapter_memory_mb = self.adapter_memory_mb.unwrap_or(n.adapter_memory_mb);
        n.max_batch = self.max_batch.unwrap_or(n.max_batch);
        n.prefill_chunk = self.prefill_chunk.unwrap_or(n.prefill_chunk);
        s.upstream_url = self.upstream_url.clone();
        s.upstream_lora_path = self.upstream_lora_path.clone();
        s.isq = self.isq.clone();
        s.memory_budget_mb = self.memory_budget_mb;
        s.max_engines = self.max_engines.unwrap_or(s.max_engines);
        s.dtype = self.dtype.clone().unwrap_or(s.dtype.clone());
        s.max_concurrent = self.max_concurrent.unwrap_or(s.max_concurrent);
        s.max_queued = self.max_queued.unwrap_or(s.max_queued);
        let l = &mut s.limits;
        l.max_tokens = self.max_tokens.unwrap_or(l.max_tokens);
        l.default_max_tokens = self.default_max_tokens.unwrap_or(l.default_max_tokens);
        l.max_prompt_bytes = self.max_prompt_bytes.unwrap_or(l.max_prompt_bytes);
        l.max_prompt_tokens = self.max_prompt_tokens.unwrap_or(l.max_prompt_tokens);
        l.max_n = self.max_n.unwrap_or(l.max_n);
        if l.default_max_tokens > l.max_tokens {
            return Err(format!(
                "gateway.default_max_tokens {} is above gateway.max_tokens {}",
                l.default_max_tokens, l.max_tokens
            ));
        }
        // A body must be able to carry the largest prompt (JSON escaping included).
        l.max_body_bytes = l.max_body_bytes.max(l.max_prompt_bytes * 2 + (64 << 10));
        s.judge = self
            .judge_model
            .clone()
            .map(|model| crate::judge::OnlineJudgeSettings {
                model,
                sample_rate: self.judge_sample_rate.unwrap_or(0.05),
                rubric: self.judge_rubric.clone(),
                max_per_user_per_hour: self.judge_max_per_user_per_hour.unwrap_or(20),
            });
        Ok(())
    }

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
            && (self.judge_sample_rate.is_some()
                || self.judge_rubric.is_some()
                || self.judge_max_per_user_per_hour.is_some())
        {
            return Err(
                "gateway.judge_sample_rate, judge_rubric and judge_max_per_user_per_hour need \
                 gateway.judge_model"
                    .into(),
            );
        }
        for (key, v) in [
            ("max_tokens", self.max_tokens),
            ("default_max_tokens", self.default_max_tokens),
            ("max_prompt_bytes", self.max_prompt_bytes.map(|v| v as u64)),
            (
                "max_prompt_tokens",
                self.max_prompt_tokens.map(|v| v as u64),
            ),
            ("max_n", self.max_n),
        ] {
            if v == Some(0) {
                return Err(format!("gateway.{key} must be at least 1"));
            }
        }
        if self.memory_budget_mb == Some(0) {
            return Err("gateway.memory_budget_mb must be at least 1".into());
        }
        if let Some(q) = &self.quantize {
            q.parse::<loraops_engine::Quantize>()
                .map_err(|e| format!("gateway.quantize: {e}"))?;
        }
        if self.engine == Some(EngineKind::Remote) && self.upstream_url.is_none() {
            return Err("gateway.engine = \"remote\" needs gateway.upstream_url".into());
        }
        for (key, v) in [
            ("kv_cache_mb", self.kv_cache_mb),
            ("adapter_memory_mb", self.adapter_memory_mb),
        ] {
            if v == Some(0) {
                return Err(format!("gateway.{key} must be at least 1"));
            }
        }
        for (key, v) in [
            ("max_engines", self.max_engines),
            ("max_concurrent", self.max_concurrent),
            ("max_adapters", self.max_adapters),
            ("max_batch", self.max_batch),
            ("prefill_chunk", self.prefill_chunk),
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
