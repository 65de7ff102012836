//! The wire format: every request and response body of the registry API, the training
//! manifest, evidence, gate policies, rollouts and the routing table. Registry, gateway,
//! trainer and CLI all use these types, so the format cannot drift between them.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use crate::peft::{AdapterSummary, ModelDims};

// ---------------------------------------------------------------------------------------------
// Names and references: validated when parsed.

/// A base-model or adapter name: 1–64 characters of `[A-Za-z0-9._-]`, starting with a letter
/// or digit. No path separators, no `..`, no `@` (it separates the version in `NAME@V`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema)]
#[serde(try_from = "String", into = "String")]
#[schema(value_type = String)]
pub struct Name(String);

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum NameError {
    #[error("name must be 1 to 64 characters, got {0}")]
    Length(usize),
    #[error("name {0:?} must start with a letter or digit")]
    Start(String),
    #[error("name {0:?} contains {1:?}: only letters, digits, '.', '_' and '-' are allowed")]
    Char(String, char),
    #[error("name {0:?} contains \"..\"")]
    DotDot(String),
}

impl Name {
    pub fn parse(s: &str) -> Result<Self, NameError> {
        if s.is_empty() || s.len() > 64 {
            return Err(NameError::Length(s.len()));
        }
        if !s.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            return Err(NameError::Start(s.into()));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(NameError::Char(s.into(), c));
        }
        if s.contains("..") {
            return Err(NameError::DotDot(s.into()));
        }
        Ok(Self(s.to_string()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Name {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        Name::parse(&s)
    }
}
impl From<Name> for String {
    fn from(n: Name) -> String {
        n.0
    }
}
impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl FromStr for Name {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        Name::parse(s)
    }
}

/// `NAME` or `NAME@V`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterRef {
    pub name: Name,
    pub version: Option<u32>,
}

impl FromStr for AdapterRef {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, version) = match s.split_once('@') {
            Some((n, v)) => {
                let v: u32 = v
                    .parse()
                    .map_err(|_| format!("version in {s:?} must be a positive integer"))?;
                if v == 0 {
                    return Err(format!("version in {s:?} must be at least 1"));
                }
                (n, Some(v))
            }
            None => (s, None),
        };
        Ok(Self {
            name: Name::parse(name).map_err(|e| e.to_string())?,
            version,
        })
    }
}

impl fmt::Display for AdapterRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.version {
            Some(v) => write!(f, "{}@{v}", self.name),
            None => write!(f, "{}", self.name),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors and pages.

/// `{"error":{"code","message","details"}}`: the body of every registry error.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `not_found`, `invalid_adapter`, `forbidden`.
    pub code: String,
    pub message: String,
    #[serde(default)]
    pub details: Value,
}

/// One page of a listing; pass `next` back as `?after=` for the following page.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Base models, adapters, versions.

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NewBaseModel {
    pub name: Name,
    /// e.g. `LlamaForCausalLM`.
    #[serde(default)]
    pub architecture: Option<String>,
    /// Dimensions used to check adapter shapes; unknown fields are not checked.
    #[serde(default)]
    pub dims: ModelDims,
    /// Digest of the weights (`sha256:…`), when known.
    #[serde(default)]
    pub digest: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BaseModel {
    pub name: Name,
    pub architecture: Option<String>,
    pub dims: ModelDims,
    pub digest: Option<String>,
    pub description: Option<String>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Adapter {
    pub name: Name,
    pub base_model: Name,
    pub latest_version: Option<u32>,
    /// The version serving as stable, once one has been promoted.
    pub stable_version: Option<u32>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VersionFile {
    pub name: String,
    /// Lower-case hex sha256 of the file's bytes (also its ETag).
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AdapterVersion {
    pub adapter: Name,
    pub version: u32,
    /// `sha256:…` over the version's files (see [`version_digest`]).
    pub digest: String,
    pub base_model: Name,
    pub files: Vec<VersionFile>,
    pub summary: AdapterSummary,
    /// The parsed `adapter_config.json`.
    #[schema(value_type = Object)]
    pub config: Value,
    /// The training manifest, when the push carried one.
    #[schema(value_type = Object)]
    pub lineage: Option<Value>,
    /// The training run that produced it (`GET /runs/{id}`), when its manifest named one.
    #[serde(default)]
    pub run: Option<String>,
    pub size_bytes: u64,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
}

/// Reply to a push: the version, and whether this push created it (`false`: the same bytes
/// were already registered as this version).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PushResponse {
    pub created: bool,
    #[serde(flatten)]
    pub version: AdapterVersion,
}

/// The digest of a version: sha256 over `"{name} {sha256} {size}\n"` for each file, sorted by
/// name. Identical files give an identical digest, whatever the upload order.
pub fn version_digest(files: &[VersionFile]) -> String {
    let mut sorted: Vec<&VersionFile> = files.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut h = Sha256::new();
    for f in sorted {
        h.update(format!("{} {} {}\n", f.name, f.sha256, f.size));
    }
    format!("sha256:{}", hex::encode(h.finalize()))
}

// ---------------------------------------------------------------------------------------------
// Training lineage (`manifest.json` in an adapter directory).

pub const MANIFEST_FORMAT: &str = "loraops.training/v1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DatasetRef {
    /// `train`, `val`, `holdout`, …
    pub role: String,
    pub path: String,
    /// `sha256:…` of the file's bytes.
    pub digest: String,
    pub rows: u64,
}

/// What produced an adapter: written by the trainer next to the adapter files, stored by the
/// registry as the version's lineage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TrainingManifest {
    pub format: String,
    /// `sft`, `dpo`, `orpo` or `kto`.
    pub method: String,
    pub trainer_version: String,
    pub base_model: String,
    /// `sha256:…` over the base model's weight files, when computed.
    #[serde(default)]
    pub base_model_digest: Option<String>,
    #[serde(default)]
    pub datasets: Vec<DatasetRef>,
    /// The effective training configuration.
    #[schema(value_type = Object)]
    pub config: Value,
    /// Summary metrics: steps, final/best losses, tokens, seconds, …
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    pub created_at: DateTime<Utc>,
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub extra: BTreeMap<String, Value>,
}

// ---------------------------------------------------------------------------------------------
// Training runs: created by `loraops train --registry`, metrics streamed as it trains.

/// Where a run stands. `running` until the trainer reports its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Running,
    Succeeded,
    Failed,
    /// Stopped by a signal (Ctrl-C) before its last step.
    Interrupted,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Interrupted => "interrupted",
        }
    }
}

impl FromStr for RunStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "running" => Self::Running,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "interrupted" => Self::Interrupted,
            _ => return Err(format!("unknown run status {s:?}")),
        })
    }
}

/// `POST /runs`: a run as the trainer starts it. The trainer picks the id, so a create that is
/// retried (or sent late, after the registry was unreachable) is the same run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NewRun {
    #[schema(value_type = String)]
    pub id: uuid::Uuid,
    /// The adapter the run trains: it is listed under it, and a token limited to some
    /// adapters sees only their runs.
    #[serde(default)]
    pub adapter: Option<Name>,
    /// `sft`, `dpo`, `orpo` or `kto`.
    pub method: String,
    pub base_model: String,
    /// The effective training configuration (hyperparameters).
    #[schema(value_type = Object)]
    pub config: Value,
    #[serde(default)]
    pub datasets: Vec<DatasetRef>,
    pub total_steps: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VersionRef {
    pub adapter: Name,
    pub version: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Run {
    pub id: String,
    pub adapter: Option<Name>,
    pub method: String,
    pub base_model: String,
    pub status: RunStatus,
    #[schema(value_type = Object)]
    pub config: Value,
    pub datasets: Vec<DatasetRef>,
    pub total_steps: u64,
    /// The highest step a metric was recorded for.
    pub last_step: u64,
    /// What the trainer reported at the end (final loss, best validation loss, tokens, …).
    #[schema(value_type = Object)]
    pub summary: Option<Value>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    /// Versions pushed from this run's adapter (`GET /runs/{id}` only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub versions: Vec<VersionRef>,
}

/// One metric value at one optimizer step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RunPoint {
    pub step: u64,
    /// `loss`, `val_loss`, `lr`, `grad_norm`, `tokens_per_s`, `memory_bytes`, or a
    /// method's own (`rewards/margins`, …): 1–64 characters of `[A-Za-z0-9._/-]`.
    pub name: String,
    pub value: f64,
}

/// `POST /runs/{id}/metrics`: a batch of points. A point already stored (same step and name)
/// is ignored, so a batch can be resent after a failure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RunPoints {
    pub points: Vec<RunPoint>,
}

/// `POST /runs/{id}/end`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EndRun {
    pub status: RunStatus,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub summary: Option<Value>,
}

/// `GET /runs/{id}/metrics`: each metric as `[step, value]` pairs in step order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RunMetrics {
    pub run: String,
    pub series: BTreeMap<String, Vec<(u64, f64)>>,
}

/// `GET /me`: who the token is, as the registry sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Me {
    pub sub: String,
    pub roles: Vec<Role>,
    /// Adapter name patterns the token is limited to; `null`: every adapter.
    pub adapters: Option<Vec<String>>,
}

// ---------------------------------------------------------------------------------------------
// Evidence.

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SuiteRef {
    pub name: String,
    #[serde(default)]
    pub version: Option<String>,
    /// `sha256:…` of the suite's manifest and cases.
    pub digest: String,
}

/// What served the evaluated requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EngineIdentity {
    pub engine: String,
    pub engine_version: String,
    #[serde(default)]
    pub model_digest: Option<String>,
    /// Decoding parameters (temperature, max_tokens, …).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub decoding: Value,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NewEvidence {
    /// The digest of the adapter version that was evaluated; evidence for other bytes never counts.
    pub adapter_digest: String,
    pub suite: SuiteRef,
    pub engine: EngineIdentity,
    pub metrics: BTreeMap<String, f64>,
    pub cases: u64,
    #[serde(default)]
    pub cases_digest: Option<String>,
    /// Free-form description of the producer (tool and version).
    #[serde(default)]
    pub produced_by: Option<String>,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Evidence {
    pub id: i64,
    pub adapter: Name,
    pub version: u32,
    #[serde(flatten)]
    pub body: NewEvidence,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
}

/// Evidence for a base model itself (no adapter), the baseline of gate rules with
/// `vs: base`. Its `adapter_digest` is the base model's registered digest, or
/// `base:NAME` when it has none ([`base_evidence_digest`]).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BaseEvidence {
    pub id: i64,
    pub base_model: Name,
    #[serde(flatten)]
    pub body: NewEvidence,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
}

/// What base-model evidence binds to: the weights digest, when registered, else the name.
pub fn base_evidence_digest(name: &Name, digest: Option<&str>) -> String {
    match digest {
        Some(d) => d.to_string(),
        None => format!("base:{name}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Gates.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum Comparison {
    #[serde(rename = ">=")]
    Ge,
    #[serde(rename = ">")]
    Gt,
    #[serde(rename = "<=")]
    Le,
    #[serde(rename = "<")]
    Lt,
}

/// One rule: a metric of a suite's evidence compared with a threshold, absolute or relative
/// to the stable version's (or the base model's) evidence on the same suite digest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GateRule {
    /// The suite, as `NAME@VERSION` or its digest `sha256:…`; the registry must hold it.
    pub suite: String,
    pub metric: String,
    pub op: Comparison,
    /// Absolute threshold.
    #[serde(default)]
    pub threshold: Option<f64>,
    /// Non-regression: compare with the baseline's value, allowing this much slack in the
    /// worse direction.
    #[serde(default)]
    pub max_regression: Option<f64>,
    /// The baseline of `max_regression`: `stable` (the adapter's stable version; default) or
    /// `base` (the base model's evidence on the same suite, which also applies to a first
    /// version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vs: Option<Baseline>,
}

/// What a non-regression gate rule compares with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Baseline {
    Stable,
    Base,
}

/// How a gate names a suite: a digest, or a name and version (immutable once stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SuiteSpec {
    Digest(String),
    Version { name: Name, version: String },
}

impl FromStr for SuiteSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(hex) = s.strip_prefix("sha256:") {
            if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Ok(Self::Digest(s.to_ascii_lowercase()));
            }
            return Err(format!(
                "suite {s:?}: a digest is sha256: and 64 hex digits"
            ));
        }
        match s.split_once('@') {
            Some((name, version)) if !version.is_empty() => Ok(Self::Version {
                name: Name::parse(name).map_err(|e| format!("suite {s:?}: {e}"))?,
                version: version.to_string(),
            }),
            _ => Err(format!(
                "suite {s:?}: name a suite version, NAME@VERSION, or its digest sha256:…; a bare \
                 name would accept any suite uploaded under that name"
            )),
        }
    }
}

impl fmt::Display for SuiteSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Digest(d) => f.write_str(d),
            Self::Version { name, version } => write!(f, "{name}@{version}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GatePolicy {
    /// Suites (`NAME@VERSION` or `sha256:…`) that must have evidence, even if no rule names
    /// them.
    #[serde(default)]
    pub required_suites: Vec<String>,
    #[serde(default)]
    pub rules: Vec<GateRule>,
    /// Evidence older than this does not count.
    #[serde(default)]
    pub max_evidence_age_hours: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Gate {
    pub adapter: Name,
    pub policy: GatePolicy,
    pub updated_by: String,
    pub updated_at: DateTime<Utc>,
}

// ---------------------------------------------------------------------------------------------
// Rollouts and routing.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Before any user sees the candidate: gateways mirror a share of stable requests to it.
    Shadowing,
    Running,
    /// The analysis passed and the next step needs a deployer's `approve`.
    AwaitingApproval,
    Paused,
    Promoted,
    RolledBack,
    Aborted,
}

impl RolloutState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Shadowing => "shadowing",
            Self::Running => "running",
            Self::AwaitingApproval => "awaiting_approval",
            Self::Paused => "paused",
            Self::Promoted => "promoted",
            Self::RolledBack => "rolled_back",
            Self::Aborted => "aborted",
        }
    }
    pub fn is_active(self) -> bool {
        matches!(
            self,
            Self::Shadowing | Self::Running | Self::AwaitingApproval | Self::Paused
        )
    }
}

impl FromStr for RolloutState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "shadowing" => Self::Shadowing,
            "running" => Self::Running,
            "awaiting_approval" => Self::AwaitingApproval,
            "paused" => Self::Paused,
            "promoted" => Self::Promoted,
            "rolled_back" => Self::RolledBack,
            "aborted" => Self::Aborted,
            _ => return Err(format!("unknown rollout state {s:?}")),
        })
    }
}

/// How a relative rule compares the canary with the stable arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Relation {
    /// `canary - stable OP threshold`.
    Difference,
    /// `canary / stable OP threshold`.
    Ratio,
}

/// Confidence of a relative rule that names none.
pub const DEFAULT_CONFIDENCE: f64 = 0.95;

/// An analysis rule on live per-arm metrics: absolute (the canary's value against a
/// threshold) or, with `compare`, relative (the canary against the stable arm, decided by a
/// statistical test at `confidence`: pass, fail or inconclusive).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AnalysisRule {
    /// Absolute: `error_rate`, `latency_p95_ms`, `latency_p99_ms`, `judge_score`,
    /// `judge_agreement` (shadow phase) or `tokens_per_answer`. Relative: `error_rate`
    /// (difference), `latency` (ratio), `judge_score` (difference), `tokens_per_answer` (ratio).
    pub metric: String,
    pub op: Comparison,
    pub threshold: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compare: Option<Relation>,
    /// For relative rules, in (0.5, 1); default 0.95.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confidence: Option<f64>,
}

impl AnalysisRule {
    pub fn confidence(&self) -> f64 {
        self.confidence.unwrap_or(DEFAULT_CONFIDENCE)
    }
}

impl Comparison {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ge => ">=",
            Self::Gt => ">",
            Self::Le => "<=",
            Self::Lt => "<",
        }
    }
    /// Whether `observed` satisfies `observed OP bound`.
    pub fn holds(self, observed: f64, bound: f64) -> bool {
        match self {
            Self::Ge => observed >= bound,
            Self::Gt => observed > bound,
            Self::Le => observed <= bound,
            Self::Lt => observed < bound,
        }
    }
    /// Whether larger values are the worse direction (`<=`, `<`).
    pub fn larger_is_worse(self) -> bool {
        matches!(self, Self::Le | Self::Lt)
    }
}

/// `error_rate<=0.05` (absolute) or `error_rate: canary - stable <= 0.005 at confidence 0.95`
/// (relative; `canary / stable` for a ratio; the confidence part is optional).
impl FromStr for AnalysisRule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!(
                "{s:?}: {why}; expected METRIC<=N (absolute) or \
                 METRIC: canary - stable <= N [at confidence C] (relative; canary / stable for a ratio)"
            )
        };
        let (body, confidence) = match s.split_once(" at confidence ") {
            Some((b, c)) => {
                let c: f64 = c
                    .trim()
                    .parse()
                    .map_err(|_| bad(&format!("confidence {:?} is not a number", c.trim())))?;
                (b, Some(c))
            }
            None => (s, None),
        };
        let (lhs, op, rhs) = [
            ("<=", Comparison::Le),
            (">=", Comparison::Ge),
            ("<", Comparison::Lt),
            (">", Comparison::Gt),
        ]
        .into_iter()
        .find_map(|(tok, op)| body.split_once(tok).map(|(l, r)| (l, op, r)))
        .ok_or_else(|| bad("no comparison"))?;
        let threshold: f64 = rhs
            .trim()
            .parse()
            .map_err(|_| bad(&format!("{:?} is not a number", rhs.trim())))?;
        let (metric, compare) = match lhs.split_once(':') {
            Some((m, expr)) => {
                let expr: String = expr.split_whitespace().collect();
                let rel = match expr.as_str() {
                    "canary-stable" => Relation::Difference,
                    "canary/stable" => Relation::Ratio,
                    _ => {
                        return Err(bad(
                            "the relative part must be `canary - stable` or `canary / stable`",
                        ));
                    }
                };
                (m.trim(), Some(rel))
            }
            None => (lhs.trim(), None),
        };
        if confidence.is_some() && compare.is_none() {
            return Err(bad("a confidence applies to relative rules only"));
        }
        Ok(Self {
            metric: metric.to_string(),
            op,
            threshold,
            compare,
            confidence,
        })
    }
}

impl fmt::Display for AnalysisRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.compare {
            None => write!(f, "{} {} {}", self.metric, self.op.as_str(), self.threshold),
            Some(rel) => write!(
                f,
                "{}: canary {} stable {} {} at confidence {}",
                self.metric,
                match rel {
                    Relation::Difference => "-",
                    Relation::Ratio => "/",
                },
                self.op.as_str(),
                self.threshold,
                self.confidence()
            ),
        }
    }
}

/// What happens when a rollout reaches `max_hold_secs` or `max_duration_secs`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TimeoutPolicy {
    /// Traffic back to the stable version (the default).
    #[default]
    Rollback,
    /// Stop where it is and wait for a deployer (webhook `rollout.pause`).
    Pause,
}

/// The shadow phase: before the first step, gateways mirror `percent` of the stable arm's
/// requests to the candidate (answers discarded) until the shadow arm's analysis passes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ShadowSpec {
    /// Share of stable requests mirrored, in (0, 100].
    pub percent: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RolloutSpec {
    /// Canary weights in percent, e.g. `[5, 25, 50, 100]`.
    #[serde(default = "default_steps")]
    pub steps: Vec<f64>,
    #[serde(default = "default_interval")]
    pub interval_secs: u64,
    /// Requests each compared arm needs (in the interval, and in all for relative rules)
    /// before any verdict.
    #[serde(default = "default_min_requests")]
    pub min_requests: u64,
    #[serde(default = "default_failure_limit")]
    pub failure_limit: u32,
    #[serde(default)]
    pub rules: Vec<AnalysisRule>,
    /// Effective distinct users each compared arm needs before any verdict (so that one
    /// client cannot decide alone); at most 100.
    #[serde(default = "default_min_users")]
    pub min_users: u64,
    /// Longest time at one step (or in the shadow phase) without a verdict; then
    /// `on_timeout`. Default: 30 intervals, at least 30 minutes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_hold_secs: Option<u64>,
    /// Longest time from start to the end of the rollout; then `on_timeout`. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_duration_secs: Option<u64>,
    #[serde(default)]
    pub on_timeout: TimeoutPolicy,
    /// Weights from `steps` (or 100 for the promotion) the canary only moves to after a
    /// deployer's `approve`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approve_before: Vec<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowSpec>,
}

fn default_steps() -> Vec<f64> {
    vec![5.0, 25.0, 50.0, 100.0]
}
fn default_interval() -> u64 {
    60
}
fn default_min_requests() -> u64 {
    50
}
fn default_failure_limit() -> u32 {
    2
}
fn default_min_users() -> u64 {
    10
}

impl Default for RolloutSpec {
    fn default() -> Self {
        Self {
            steps: default_steps(),
            interval_secs: default_interval(),
            min_requests: default_min_requests(),
            failure_limit: default_failure_limit(),
            rules: Vec::new(),
            min_users: default_min_users(),
            max_hold_secs: None,
            max_duration_secs: None,
            on_timeout: TimeoutPolicy::Rollback,
            approve_before: Vec::new(),
            shadow: None,
        }
    }
}

impl RolloutSpec {
    /// `max_hold_secs`, or its default: thirty intervals, at least thirty minutes (the default
    /// error-rate margin needs about 1,500 canary requests to pass at a 1 % error rate).
    pub fn max_hold(&self) -> u64 {
        self.max_hold_secs
            .unwrap_or_else(|| self.interval_secs.saturating_mul(30).max(1800))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Rollout {
    pub id: i64,
    pub adapter: Name,
    pub version: u32,
    /// The stable version at start (none for an adapter's first rollout).
    pub from_version: Option<u32>,
    pub state: RolloutState,
    pub step_index: u32,
    /// Current canary weight in percent.
    pub weight: f64,
    pub failures: u32,
    pub spec: RolloutSpec,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RoutedVersion {
    pub version: u32,
    pub digest: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AdapterRoute {
    pub adapter: Name,
    pub base_model: Name,
    pub stable: Option<RoutedVersion>,
    pub canary: Option<RoutedVersion>,
    /// Share of sticky keys sent to the canary, in percent.
    pub canary_weight: f64,
    /// The candidate of a rollout in its shadow phase: no user is routed to it; gateways
    /// mirror `shadow_percent` of the stable arm's requests to it and discard the answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<RoutedVersion>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub shadow_percent: f64,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

/// What gateways serve: bumped `revision` on every change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RoutingTable {
    pub revision: i64,
    pub routes: Vec<AdapterRoute>,
}

/// Users are counted in this many groups (a hash of the user key, independent of the split).
pub const USER_GROUPS: u32 = 128;

/// The group of a user key (sticky key) in per-arm observations: the first 8 bytes of
/// sha256("loraops-users" ‖ 0 ‖ key) modulo [`USER_GROUPS`]. Salted differently from the
/// traffic split, so every group holds users of both arms.
pub fn user_group(key: &str) -> u32 {
    let mut h = Sha256::new();
    h.update(b"loraops-users\0");
    h.update(key.as_bytes());
    let d = h.finalize();
    (u64::from_be_bytes(d[..8].try_into().expect("8 bytes")) % USER_GROUPS as u64) as u32
}

/// Per-arm counters from one gateway over one reporting window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ArmObservation {
    pub adapter: Name,
    pub version: u32,
    /// `stable`, `canary`, `pinned` or `shadow` (mirrored requests of a shadow phase).
    pub arm: String,
    pub requests: u64,
    pub errors: u64,
    /// Latency histogram: upper bounds in milliseconds and cumulative counts.
    #[serde(default)]
    pub latency_ms_buckets: Vec<(f64, u64)>,
    /// Completion tokens of the answers.
    #[serde(default)]
    pub tokens: u64,
    /// Requests that ended with an answer (and so a token count).
    #[serde(default)]
    pub answers: u64,
    /// Sum of the squared completion tokens per answer (for the variance).
    #[serde(default)]
    pub tokens_sq_sum: f64,
    /// Answers of this arm scored by the gateway's online judge in the window.
    #[serde(default)]
    pub judge_scored: u64,
    /// Sum of those scores, each in [0, 1].
    #[serde(default)]
    pub judge_score_sum: f64,
    /// Sum of the squared scores.
    #[serde(default)]
    pub judge_score_sq_sum: f64,
    /// Shadow arm: answers the judge compared with the stable answer, and the sum of its
    /// agreement scores (each in [0, 1]).
    #[serde(default)]
    pub agreement_scored: u64,
    #[serde(default)]
    pub agreement_sum: f64,
    /// Requests and errors per user group ([`user_group`]), `[group, requests, errors]`,
    /// only non-empty groups: how many users the arm saw, and how evenly.
    #[serde(default)]
    pub users: Vec<(u32, u64, u64)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Observations {
    pub gateway: String,
    pub window_start: DateTime<Utc>,
    pub window_end: DateTime<Utc>,
    pub arms: Vec<ArmObservation>,
    /// The gateway's online judge model, if it has one (rollouts with judge rules need one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge: Option<String>,
}

/// `POST /adapters/{name}/rollouts`: the version to canary and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StartRollout {
    pub version: u32,
    #[serde(flatten)]
    pub spec: RolloutSpec,
}

/// One gate rule's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RuleOutcome {
    /// `suite/metric op bound`, or `suite required`.
    pub rule: String,
    pub suite: String,
    #[serde(default)]
    pub metric: Option<String>,
    /// What the rule needs, e.g. `>= 0.8` or `>= 0.91 (stable 0.93 - 0.02)`.
    pub required: String,
    #[serde(default)]
    pub observed: Option<f64>,
    pub passed: bool,
    /// The evidence record the verdict is based on.
    #[serde(default)]
    pub evidence_id: Option<i64>,
    /// Why it failed or does not apply, in words.
    #[serde(default)]
    pub note: Option<String>,
}

/// A gate evaluated for one version: every rule's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GateReport {
    pub adapter: Name,
    pub version: u32,
    pub adapter_digest: String,
    /// Where the policy came from: the adapter's own, `*` (the default), or `builtin`
    /// (no policy set: any evidence for this digest).
    pub policy_scope: String,
    /// The stable version relative rules compared with.
    #[serde(default)]
    pub stable_version: Option<u32>,
    pub passed: bool,
    pub rules: Vec<RuleOutcome>,
}

impl GateReport {
    /// The rules this version fails, by name.
    pub fn failed_rules(&self) -> Vec<&str> {
        self.rules
            .iter()
            .filter(|r| !r.passed)
            .map(|r| r.rule.as_str())
            .collect()
    }
}

/// Per-arm live metrics over an analysis window, summed over every gateway.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ArmMetrics {
    pub arm: String,
    pub version: u32,
    pub requests: u64,
    pub errors: u64,
    pub error_rate: f64,
    #[serde(default)]
    pub latency_p95_ms: Option<f64>,
    #[serde(default)]
    pub latency_p99_ms: Option<f64>,
    /// Mean online judge score in [0, 1], when any answer was scored.
    #[serde(default)]
    pub judge_score: Option<f64>,
    #[serde(default)]
    pub judge_scored: u64,
    /// Shadow arm: mean agreement of its answers with the stable ones, as the judge saw it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge_agreement: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_answer: Option<f64>,
    /// Distinct users (estimated from the user groups).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<f64>,
    /// Effective number of users: (Σ requests)² / Σ requests² over user groups; one client
    /// sending most of the traffic makes it close to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effective_users: Option<f64>,
    /// This arm's share of the adapter's routed (stable + canary) requests, in percent.
    pub share: f64,
}

/// One analysis rule's outcome over one window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RuleResult {
    /// The rule as written (see [`AnalysisRule`]'s text form).
    pub rule: String,
    /// `interval` (since the last verdict) or `cumulative` (since the phase began).
    pub window: String,
    /// `pass`, `fail`, `inconclusive` or `no_data`.
    pub outcome: String,
    /// The observed value (absolute) or effect (relative: canary − stable, or canary / stable).
    #[serde(default)]
    pub estimate: Option<f64>,
    /// Relative rules: the confidence interval of the effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<(f64, f64)>,
    /// Relative rules: one-sided p-value of "the canary is worse than stable".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p_value: Option<f64>,
    /// The test: `two-proportion`, `mann-whitney`, `welch`, `threshold`.
    pub test: String,
}

/// An audit record of a rollout transition.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RolloutEvent {
    pub id: i64,
    pub at: DateTime<Utc>,
    /// Who or what: a token's subject, or `controller`.
    pub actor: String,
    /// start, advance, hold, analysis_failed, await_approval, approve, promote, rollback,
    /// pause, resume, abort, rollback_promotion.
    pub action: String,
    #[serde(default)]
    pub from_state: Option<RolloutState>,
    pub to_state: RolloutState,
    /// Canary weight after the transition, in percent.
    pub weight: f64,
    pub reason: String,
    /// What the decision was based on: the gate report at start, later the analysis (arm
    /// metrics and every rule's outcome per window).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub details: Option<Value>,
}

/// `GET /adapters/{name}/rollouts/current`: the rollout and its audit trail.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RolloutStatus {
    pub rollout: Rollout,
    pub events: Vec<RolloutEvent>,
}

/// One time bucket of a rollout's live per-arm metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SeriesPoint {
    /// The bucket's end (reports are placed by the time the registry received them).
    pub at: DateTime<Utc>,
    pub arms: Vec<ArmMetrics>,
}

/// `GET /adapters/{name}/rollouts/current/series`: the rollout's reports over time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RolloutSeries {
    pub rollout: i64,
    pub bucket_secs: u64,
    pub points: Vec<SeriesPoint>,
}

// ---------------------------------------------------------------------------------------------
// Evaluation suites.

/// Format tag hashed into every suite digest.
pub const SUITE_FORMAT: &str = "loraops.suite/v1";

/// A threshold a suite suggests for one of its metrics (gates may use it or set their own).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SuiteThreshold {
    pub metric: String,
    pub op: Comparison,
    pub value: f64,
}

/// `suite.json`: what a suite is and how its cases are scored. The cases live next to it in
/// `cases.jsonl`, one JSON object a line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SuiteManifest {
    pub name: Name,
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The scorer and its options, e.g. `{"type": "exact", "lowercase": true}`; the types are
    /// `exact`, `contains`, `regex`, `multiple_choice`, `json` and `refusal`.
    #[schema(value_type = Object)]
    pub scorer: Value,
    /// Default thresholds on the suite's metrics.
    #[serde(default)]
    pub thresholds: Vec<SuiteThreshold>,
    /// Decoding overrides (`max_tokens`); the runner always decodes greedily.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    #[schema(value_type = Object)]
    pub decoding: Value,
}

/// `POST /suites`: a manifest and its cases (JSONL text). `digest`, when given, must match
/// what the registry computes.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NewSuite {
    pub manifest: SuiteManifest,
    pub cases: String,
    #[serde(default)]
    pub digest: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Suite {
    pub name: Name,
    pub version: String,
    /// `sha256:…` over the manifest and the cases (see [`suite_digest`]).
    pub digest: String,
    pub manifest: SuiteManifest,
    /// Number of cases.
    pub cases: u64,
    /// Bytes of the canonical cases file.
    pub size_bytes: u64,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
}

/// Reply to a suite upload: `created` is false when the same suite was already stored.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SuitePushResponse {
    pub created: bool,
    #[serde(flatten)]
    pub suite: Suite,
}

/// JSON with object keys sorted and no insignificant whitespace: the form that is hashed.
pub fn canonical_json(v: &Value) -> String {
    fn write(v: &Value, out: &mut String) {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::to_string(k).expect("string serialises"));
                    out.push(':');
                    write(&m[k], out);
                }
                out.push('}');
            }
            Value::Array(a) => {
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(x, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut s = String::new();
    write(v, &mut s);
    s
}

/// Cases JSONL in canonical form: every non-blank line a JSON object, re-written canonically,
/// each followed by `\n`. Returns the text and the number of cases.
pub fn canonical_cases(text: &str) -> Result<(String, u64), String> {
    let mut out = String::with_capacity(text.len());
    let mut n = 0;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value =
            serde_json::from_str(line).map_err(|e| format!("cases line {}: {e}", i + 1))?;
        if !v.is_object() {
            return Err(format!(
                "cases line {}: a case must be a JSON object",
                i + 1
            ));
        }
        out.push_str(&canonical_json(&v));
        out.push('\n');
        n += 1;
    }
    if n == 0 {
        return Err("a suite needs at least one case".into());
    }
    Ok((out, n))
}

/// The digest of a suite: sha256 over the format tag, the canonical manifest and the
/// canonical cases, so formatting and key order never change it.
pub fn suite_digest(manifest: &SuiteManifest, canonical_cases: &str) -> String {
    let m = serde_json::to_value(manifest).expect("manifest serialises");
    let mut h = Sha256::new();
    h.update(SUITE_FORMAT.as_bytes());
    h.update(b"\n");
    h.update(canonical_json(&m).as_bytes());
    h.update(b"\n");
    h.update(canonical_cases.as_bytes());
    format!("sha256:{}", hex::encode(h.finalize()))
}

// ---------------------------------------------------------------------------------------------
// Auth.

/// The roles of DESIGN.md's RBAC model.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Publisher,
    Evaluator,
    Deployer,
    Admin,
    /// The data plane: reads routing, adapters, their versions and files and the base models,
    /// and posts observations; nothing else.
    Gateway,
    /// End users of the gateway: inference only; reads nothing from the registry.
    Inference,
}

impl Role {
    /// Whether the role may read the registry (every role but `inference`; `gateway` only
    /// what serving needs).
    pub fn reads_registry(self) -> bool {
        !matches!(self, Self::Inference)
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "viewer" => Self::Viewer,
            "publisher" => Self::Publisher,
            "evaluator" => Self::Evaluator,
            "deployer" => Self::Deployer,
            "admin" => Self::Admin,
            "gateway" => Self::Gateway,
            "inference" => Self::Inference,
            _ => {
                return Err(format!(
                    "unknown role {s:?} (viewer, publisher, evaluator, deployer, admin, gateway, inference)"
                ));
            }
        })
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Viewer => "viewer",
            Self::Publisher => "publisher",
            Self::Evaluator => "evaluator",
            Self::Deployer => "deployer",
            Self::Admin => "admin",
            Self::Gateway => "gateway",
            Self::Inference => "inference",
        })
    }
}

/// Health report of `/readyz`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Readiness {
    pub ready: bool,
    pub checks: BTreeMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_reject_separators_and_dotdot() {
        assert!(Name::parse("support-bot_v2.1").is_ok());
        assert!(matches!(Name::parse("a/b"), Err(NameError::Char(_, '/'))));
        assert!(matches!(Name::parse("a\\b"), Err(NameError::Char(_, '\\'))));
        assert!(matches!(Name::parse("a..b"), Err(NameError::DotDot(_))));
        assert!(matches!(Name::parse(".hidden"), Err(NameError::Start(_))));
        assert!(matches!(Name::parse(""), Err(NameError::Length(0))));
        assert!(matches!(Name::parse("x@1"), Err(NameError::Char(_, '@'))));
    }

    #[test]
    fn adapter_refs() {
        let r: AdapterRef = "bot@3".parse().unwrap();
        assert_eq!((r.name.as_str(), r.version), ("bot", Some(3)));
        assert_eq!("bot".parse::<AdapterRef>().unwrap().version, None);
        assert!("bot@0".parse::<AdapterRef>().is_err());
        assert!("bot@x".parse::<AdapterRef>().is_err());
    }

    #[test]
    fn version_digest_ignores_order() {
        let a = VersionFile {
            name: "a".into(),
            sha256: "00".into(),
            size: 1,
        };
        let b = VersionFile {
            name: "b".into(),
            sha256: "11".into(),
            size: 2,
        };
        assert_eq!(
            version_digest(&[a.clone(), b.clone()]),
            version_digest(&[b.clone(), a.clone()])
        );
        let b2 = VersionFile { size: 3, ..b };
        assert_ne!(
            version_digest(&[a.clone(), b2]),
            version_digest(&[
                a,
                VersionFile {
                    name: "b".into(),
                    sha256: "11".into(),
                    size: 2
                }
            ])
        );
    }
}
