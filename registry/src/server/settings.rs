//! `[registry]` and `[s3]` configuration sections. Loaded by the binary as
//! file < `LORAOPS_SECTION__KEY` environment < flags.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::auth::AuthSettings;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrySettings {
    /// `HOST:PORT` to listen on (port 0 picks a free one).
    pub listen: String,
    /// `sqlite://PATH?mode=rwc` or `postgres://…`. Default: SQLite under the data dir.
    pub database_url: Option<String>,
    /// A local directory (`file:///abs/dir` or a plain path) or `s3://bucket/prefix`.
    /// Default: `<data_dir>/blobs`.
    pub object_store_url: Option<String>,
    /// Largest accepted upload, all files together, in bytes.
    pub max_upload_bytes: u64,
    /// Storage quota per adapter: the bytes of all its versions together (0: none). A push
    /// that would pass it is refused with 507 and `quota_exceeded`; a re-push of an existing
    /// version is not counted.
    pub max_adapter_bytes: u64,
    /// Whether reads (GET) work without a token; otherwise they need the `viewer` role.
    pub anonymous_reads: bool,
    /// Blobs of uploads that never became a version are deleted after this many seconds.
    pub orphan_grace_secs: u64,
    /// How often the orphan sweep runs.
    pub sweep_interval_secs: u64,
    /// Database connection pool size.
    pub max_db_connections: u32,
    /// How often the rollout controller looks at running rollouts, in milliseconds.
    pub controller_tick_ms: u64,
    /// The controller lease: a replica that stops renewing it is replaced after this long.
    pub controller_lease_secs: u64,
    /// Endpoints notified of version, evidence and rollout events (signed POSTs).
    pub webhooks: Vec<WebhookSettings>,
    /// Delivery attempts per event and endpoint before giving up.
    pub webhook_max_attempts: u32,
    /// Wait before the first retry; doubles on each failure, capped at 5 minutes.
    pub webhook_retry_base_ms: u64,
    /// Per-attempt timeout of a webhook POST.
    pub webhook_timeout_secs: u64,
    /// Gateway observations are deleted this many hours after they were received (an
    /// active rollout's folded analysis does not need them).
    pub observation_retention_hours: u64,
    /// How far a report's `window_end` may lie ahead of the registry's clock (clock skew).
    pub observation_max_skew_secs: u64,
    /// Reports whose window ended longer ago than this are refused: stale data would count as
    /// current (a gateway drops them after a long outage).
    pub observation_max_age_secs: u64,
    /// Delivered and abandoned webhook deliveries are deleted this many hours after the event.
    pub webhook_retention_hours: u64,
    /// Concurrent routing long-polls (`GET /routing?wait=`) one caller may hold; more get 429.
    pub max_routing_waiters_per_caller: u32,
}

/// One webhook endpoint (`[[registry.webhooks]]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    /// `http(s)://…` that receives `POST`s with a JSON event.
    pub url: String,
    /// The HMAC-SHA256 key. Prefer `secret_env`, which keeps the key out of config files.
    #[serde(default)]
    pub secret: Option<String>,
    /// Name of an environment variable that holds the key.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// Event types sent: exact (`rollout.promote`), a family (`rollout.*`) or `*` (default).
    #[serde(default = "all_events")]
    pub events: Vec<String>,
}

fn all_events() -> Vec<String> {
    vec!["*".into()]
}

impl Default for RegistrySettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8400".into(),
            database_url: None,
            object_store_url: None,
            max_upload_bytes: 8 << 30,
            max_adapter_bytes: 0,
            anonymous_reads: false,
            orphan_grace_secs: 6 * 3600,
            sweep_interval_secs: 600,
            max_db_connections: 10,
            controller_tick_ms: 1000,
            controller_lease_secs: 15,
            webhooks: Vec::new(),
            webhook_max_attempts: 10,
            webhook_retry_base_ms: 1000,
            webhook_timeout_secs: 10,
            observation_retention_hours: 7 * 24,
            observation_max_skew_secs: 5,
            observation_max_age_secs: 900,
            webhook_retention_hours: 7 * 24,
            max_routing_waiters_per_caller: 16,
        }
    }
}

/// Longest duration a setting may name: a year (far from any overflow of dates or timers).
const MAX_SETTING_SECS: u64 = 366 * 24 * 3600;

impl RegistrySettings {
    /// Refuse values that would misbehave rather than run: zero where a loop needs a period,
    /// durations beyond a year (a sweep "disabled" with a huge grace must not become no grace).
    pub fn validate(&self) -> Result<(), String> {
        let secs = [
            ("orphan_grace_secs", self.orphan_grace_secs, 1),
            ("sweep_interval_secs", self.sweep_interval_secs, 1),
            ("controller_lease_secs", self.controller_lease_secs, 1),
            ("webhook_timeout_secs", self.webhook_timeout_secs, 1),
            (
                "observation_max_skew_secs",
                self.observation_max_skew_secs,
                0,
            ),
            ("observation_max_age_secs", self.observation_max_age_secs, 1),
            ("controller_tick_ms/1000", self.controller_tick_ms / 1000, 0),
            (
                "webhook_retry_base_ms/1000",
                self.webhook_retry_base_ms / 1000,
                0,
            ),
            (
                "observation_retention_hours*3600",
                self.observation_retention_hours.saturating_mul(3600),
                3600,
            ),
            (
                "webhook_retention_hours*3600",
                self.webhook_retention_hours.saturating_mul(3600),
                3600,
            ),
        ];
        for (name, v, min) in secs {
            if !(min..=MAX_SETTING_SECS).contains(&v) {
                return Err(format!(
                    "{name} is {v} s; it must be between {min} s and {MAX_SETTING_SECS} s"
                ));
            }
        }
        if self.controller_tick_ms < 50 {
            return Err(format!(
                "controller_tick_ms is {}; it must be at least 50",
                self.controller_tick_ms
            ));
        }
        if self.max_db_connections == 0 {
            return Err("max_db_connections must be at least 1".into());
        }
        if self.webhook_max_attempts == 0 {
            return Err("webhook_max_attempts must be at least 1".into());
        }
        if self.max_routing_waiters_per_caller == 0 {
            return Err("max_routing_waiters_per_caller must be at least 1".into());
        }
        Ok(())
    }

    pub fn database_url(&self, data_dir: &Path) -> String {
        self.database_url.clone().unwrap_or_else(|| {
            format!(
                "sqlite://{}?mode=rwc",
                data_dir.join("registry.db").display()
            )
        })
    }
    pub fn object_store_url(&self, data_dir: &Path) -> String {
        self.object_store_url
            .clone()
            .unwrap_or_else(|| data_dir.join("blobs").display().to_string())
    }
}

/// S3-compatible object storage. Unset fields fall back to the standard `AWS_*` environment.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Settings {
    /// Custom endpoint, e.g. `http://minio:9000`.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Allow plain-HTTP endpoints.
    pub allow_http: Option<bool>,
    /// Virtual-hosted-style requests (`bucket.host`); default is path-style (`host/bucket`).
    pub virtual_hosted_style: Option<bool>,
}

/// Everything the registry service needs to start.
#[derive(Debug, Clone)]
pub struct ServeSettings {
    pub data_dir: PathBuf,
    pub registry: RegistrySettings,
    pub auth: AuthSettings,
    pub s3: S3Settings,
}
