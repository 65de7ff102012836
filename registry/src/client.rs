//! The registry's HTTP client (reqwest): used by the CLI, the gateway and the evaluator.
//! Uploads and downloads stream; downloads are verified against their sha256 before they
//! become visible on disk.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::{StreamExt, TryStreamExt};
use reqwest::{Method, StatusCode, multipart};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::api::{
    Adapter, AdapterVersion, BaseModel, ErrorBody, Evidence, Gate, GatePolicy, NewBaseModel,
    NewEvidence, Observations, Page, PushResponse, RolloutStatus, RoutingTable, StartRollout,
};
use crate::peft;

/// Called with the number of bytes moved since the last call.
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

pub fn no_progress() -> Progress {
    Arc::new(|_| {})
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the registry at {url}: {source}")]
    Connect { url: String, source: reqwest::Error },
    #[error("registry answered {status}: {} ({})", .body.error.message, .body.error.code)]
    Api { status: StatusCode, body: ErrorBody },
    #[error("registry answered {status}: {text}")]
    Unexpected { status: StatusCode, text: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: sha256 is {got}, the registry says {expected}")]
    Integrity {
        file: String,
        expected: String,
        got: String,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("download from the registry at {url} stalled: no data for {secs} s")]
    Stalled { url: String, secs: u64 },
}

impl ClientError {
    /// HTTP status of an API error, if the registry answered with one.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Api { status, .. } | Self::Unexpected { status, .. } => Some(*status),
            _ => None,
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ClientError + '_ {
    move |source| ClientError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How long registry calls may take. A registry that accepts connections but never answers
/// (stopped, partitioned, overloaded) must fail calls, not hang the caller forever.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Establishing the TCP (and TLS) connection.
    pub connect: std::time::Duration,
    /// A whole JSON call; a routing long-poll gets its wait on top.
    pub request: std::time::Duration,
    /// Longest silence while a file streams down.
    pub idle: std::time::Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: std::time::Duration::from_secs(5),
            request: std::time::Duration::from_secs(30),
            idle: std::time::Duration::from_secs(60),
        }
    }
}

/// Where the bearer token comes from.
#[derive(Clone)]
enum Token {
    None,
    Static(String),
    /// Re-read when older than [`TOKEN_FILE_TTL`]: a token rotated by whoever mints it
    /// (a Kubernetes Secret, `loraops up`) is picked up without a restart.
    File {
        path: PathBuf,
        cache: Arc<std::sync::Mutex<Option<(std::time::Instant, String)>>>,
    },
}

const TOKEN_FILE_TTL: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Clone)]
pub struct RegistryClient {
    base: String,
    token: Token,
    http: reqwest::Client,
    timeouts: Timeouts,
}

impl RegistryClient {
    pub fn new(base_url: &str, token: Option<String>) -> Self {
        Self::with_timeouts(base_url, token, Timeouts::default())
    }

    pub fn with_timeouts(base_url: &str, token: Option<String>, timeouts: Timeouts) -> Self {
        Self {
            base: base_url.trim_end_matches('/').to_string(),
            token: token.map_or(Token::None, Token::Static),
            http: reqwest::Client::builder()
                .connect_timeout(timeouts.connect)
                .build()
                .expect("http client"),
            timeouts,
        }
    }

    /// Take the token from a file, re-read every few seconds (rotation without restarts).
    pub fn with_token_file(mut self, path: PathBuf) -> Self {
        self.token = Token::File {
            path,
            cache: Arc::default(),
        };
        self
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn token(&self) -> Option<String> {
        match &self.token {
            Token::None => None,
            Token::Static(t) => Some(t.clone()),
            Token::File { path, cache } => {
                let mut c = cache.lock().expect("token cache");
                if let Some((at, t)) = c.as_ref()
                    && at.elapsed() < TOKEN_FILE_TTL
                {
                    return Some(t.clone());
                }
                match std::fs::read_to_string(path) {
                    Ok(t) => {
                        let t = t.trim().to_string();
                        *c = Some((std::time::Instant::now(), t.clone()));
                        Some(t)
                    }
                    // Keep the last token read: a file being replaced is briefly absent.
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "cannot read the registry token file");
                        c.as_ref().map(|(_, t)| t.clone())
                    }
                }
            }
        }
    }

    /// A call with the whole-request timeout.
    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.streaming(method, path).timeout(self.timeouts.request)
    }

    /// A call that moves a body of any size: only the connect timeout (and, for downloads,
    /// the idle timeout) applies.
    fn streaming(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let rb = self.http.request(method, format!("{}{path}", self.base));
        match self.token() {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    async fn send(&self, rb: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
        // A server may close a kept-alive connection that waited too long for its first
        // request with a 408 that the next request on it then reads (actix does, after 5 s).
        // The server read nothing of ours, so sending again on a fresh connection is safe,
        // even for a POST; a streamed body cannot be replayed and is not retried.
        let again = rb.try_clone();
        let connect = |source| ClientError::Connect {
            url: self.base.clone(),
            source,
        };
        let mut res = rb.send().await.map_err(connect)?;
        if res.status() == StatusCode::REQUEST_TIMEOUT
            && let Some(rb) = again
        {
            tracing::debug!(url = %res.url(), "the registry timed out an idle connection; resending");
            res = rb.send().await.map_err(connect)?;
        }
        if res.status().is_success() {
            return Ok(res);
        }
        let status = res.status();
        let text = res.text().await.unwrap_or_default();
        Err(match serde_json::from_str::<ErrorBody>(&text) {
            Ok(body) => ClientError::Api { status, body },
            Err(_) => ClientError::Unexpected { status, text },
        })
    }

    async fn json<T: DeserializeOwned>(
        &self,
        rb: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let res = self.send(rb).await?;
        let status = res.status();
        let bytes = res.bytes().await.map_err(|source| ClientError::Connect {
            url: self.base.clone(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Unexpected {
            status,
            text: format!("unreadable body: {e}"),
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.json(self.request(Method::GET, path)).await
    }

    async fn send_json<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.json(self.request(method, path).json(body)).await
    }

    pub async fn create_base_model(&self, b: &NewBaseModel) -> Result<BaseModel, ClientError> {
        self.send_json(Method::POST, "/api/v1/base-models", b).await
    }

    pub async fn base_models(&self) -> Result<Vec<BaseModel>, ClientError> {
        self.all_pages("/api/v1/base-models").await
    }

    pub async fn adapters_page(
        &self,
        after: Option<&str>,
        limit: u64,
    ) -> Result<Page<Adapter>, ClientError> {
        let mut path = format!("/api/v1/adapters?limit={limit}");
        if let Some(a) = after {
            path.push_str(&format!("&after={a}"));
        }
        self.get(&path).await
    }

    pub async fn adapters(&self) -> Result<Vec<Adapter>, ClientError> {
        self.all_pages("/api/v1/adapters").await
    }

    pub async fn adapter(&self, name: &str) -> Result<Adapter, ClientError> {
        self.get(&format!("/api/v1/adapters/{name}")).await
    }

    pub async fn versions(&self, name: &str) -> Result<Vec<AdapterVersion>, ClientError> {
        self.all_pages(&format!("/api/v1/adapters/{name}/versions"))
            .await
    }

    /// Delete `name@version` (admin; not the stable version nor an active rollout's candidate).
    pub async fn delete_version(&self, name: &str, version: u32) -> Result<(), ClientError> {
        let path = format!("/api/v1/adapters/{name}/versions/{version}");
        self.send(self.request(Method::DELETE, &path)).await?;
        Ok(())
    }

    pub async fn version(&self, name: &str, version: u32) -> Result<AdapterVersion, ClientError> {
        self.get(&format!("/api/v1/adapters/{name}/versions/{version}"))
            .await
    }

    async fn all_pages<T: DeserializeOwned>(&self, path: &str) -> Result<Vec<T>, ClientError> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let sep = if path.contains('?') { '&' } else { '?' };
            let url = match &after {
                Some(a) => format!("{path}{sep}limit=500&after={a}"),
                None => format!("{path}{sep}limit=500"),
            };
            let page: Page<T> = self.get(&url).await?;
            out.extend(page.items);
            match page.next {
                Some(n) => after = Some(n),
                None => return Ok(out),
            }
        }
    }

    /// Push an adapter directory (adapter_config.json, adapter_model.safetensors, and
    /// manifest.json / README.md when present), streaming each file.
    pub async fn push_dir(
        &self,
        dir: &Path,
        name: &str,
        base_model: Option<&str>,
        progress: Progress,
    ) -> Result<PushResponse, ClientError> {
        let mut form = multipart::Form::new();
        let mut found = false;
        for file in [
            peft::CONFIG_FILE,
            peft::WEIGHTS_FILE,
            peft::MANIFEST_FILE,
            peft::README_FILE,
        ] {
            let path = dir.join(file);
            let meta = match tokio::fs::metadata(&path).await {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if file == peft::CONFIG_FILE || file == peft::WEIGHTS_FILE {
                        return Err(ClientError::Invalid(format!(
                            "{} is missing (an adapter directory needs {} and {})",
                            path.display(),
                            peft::CONFIG_FILE,
                            peft::WEIGHTS_FILE
                        )));
                    }
                    continue;
                }
                Err(e) => return Err(io(&path)(e)),
            };
            found = true;
            let f = tokio::fs::File::open(&path).await.map_err(io(&path))?;
            let p = progress.clone();
            let stream = tokio_util::io::ReaderStream::with_capacity(f, 256 << 10)
                .inspect_ok(move |b| p(b.len() as u64));
            let part =
                multipart::Part::stream_with_length(reqwest::Body::wrap_stream(stream), meta.len())
                    .file_name(file);
            form = form.part(file, part);
        }
        debug_assert!(found);
        let mut path = format!("/api/v1/adapters/{name}/versions");
        if let Some(b) = base_model {
            path.push_str(&format!("?base_model={b}"));
        }
        self.json(self.streaming(Method::POST, &path).multipart(form))
            .await
    }

    /// Download one file of a version to `dest`, verifying its sha256 first: the bytes land in
    /// a temporary file that is renamed into place only when they match.
    pub async fn download_file(
        &self,
        name: &str,
        version: u32,
        file: &crate::api::VersionFile,
        dest: &Path,
        progress: Progress,
    ) -> Result<(), ClientError> {
        let res = self
            .send(self.streaming(
                Method::GET,
                &format!(
                    "/api/v1/adapters/{name}/versions/{version}/files/{}",
                    file.name
                ),
            ))
            .await?;
        let tmp = dest.with_extension("partial");
        // Large writes: each tokio file write is a blocking-pool round trip.
        let mut out = tokio::io::BufWriter::with_capacity(
            1 << 20,
            tokio::fs::File::create(&tmp).await.map_err(io(&tmp))?,
        );
        let mut hasher = Sha256::new();
        let mut stream = res.bytes_stream();
        loop {
            let next = match tokio::time::timeout(self.timeouts.idle, stream.next()).await {
                Ok(n) => n,
                Err(_) => {
                    drop(out);
                    let _ = tokio::fs::remove_file(&tmp).await;
                    return Err(ClientError::Stalled {
                        url: self.base.clone(),
                        secs: self.timeouts.idle.as_secs(),
                    });
                }
            };
            let Some(chunk) = next else { break };
            let chunk = chunk.map_err(|source| ClientError::Connect {
                url: self.base.clone(),
                source,
            })?;
            hasher.update(&chunk);
            out.write_all(&chunk).await.map_err(io(&tmp))?;
            progress(chunk.len() as u64);
        }
        out.flush().await.map_err(io(&tmp))?;
        drop(out);
        let got = hex::encode(hasher.finalize());
        if got != file.sha256 {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(ClientError::Integrity {
                file: file.name.clone(),
                expected: file.sha256.clone(),
                got,
            });
        }
        tokio::fs::rename(&tmp, dest).await.map_err(io(dest))
    }

    /// Download every file of `name@version` into `dir`.
    pub async fn pull(
        &self,
        name: &str,
        version: u32,
        dir: &Path,
        progress: Progress,
    ) -> Result<AdapterVersion, ClientError> {
        let v = self.version(name, version).await?;
        tokio::fs::create_dir_all(dir).await.map_err(io(dir))?;
        for f in &v.files {
            self.download_file(name, version, f, &dir.join(&f.name), progress.clone())
                .await?;
        }
        Ok(v)
    }

    pub async fn post_evidence(
        &self,
        name: &str,
        version: u32,
        e: &NewEvidence,
    ) -> Result<Evidence, ClientError> {
        self.send_json(
            Method::POST,
            &format!("/api/v1/adapters/{name}/versions/{version}/evidence"),
            e,
        )
        .await
    }

    /// Evidence for a base model itself (the baseline of `vs: base` gate rules).
    pub async fn post_base_evidence(
        &self,
        base: &str,
        e: &NewEvidence,
    ) -> Result<crate::api::BaseEvidence, ClientError> {
        self.send_json(
            Method::POST,
            &format!("/api/v1/base-models/{base}/evidence"),
            e,
        )
        .await
    }

    pub async fn evidence(&self, name: &str, version: u32) -> Result<Vec<Evidence>, ClientError> {
        self.get(&format!(
            "/api/v1/adapters/{name}/versions/{version}/evidence"
        ))
        .await
    }

    pub async fn put_gate(&self, name: &str, policy: &GatePolicy) -> Result<Gate, ClientError> {
        self.send_json(
            Method::PUT,
            &format!("/api/v1/adapters/{name}/gate"),
            policy,
        )
        .await
    }

    pub async fn gate(&self, name: &str) -> Result<Gate, ClientError> {
        self.get(&format!("/api/v1/adapters/{name}/gate")).await
    }

    /// The routing table; with `since`, waits (up to `wait_secs`) for a newer revision.
    pub async fn routing(
        &self,
        since: Option<i64>,
        wait_secs: u64,
    ) -> Result<RoutingTable, ClientError> {
        match since {
            Some(s) => {
                let rb = self
                    .request(
                        Method::GET,
                        &format!("/api/v1/routing?since={s}&wait={wait_secs}"),
                    )
                    .timeout(self.timeouts.request + std::time::Duration::from_secs(wait_secs));
                self.json(rb).await
            }
            None => self.get("/api/v1/routing").await,
        }
    }

    /// Start a canary; a failing gate is a 422 whose details hold the gate report.
    pub async fn start_rollout(
        &self,
        name: &str,
        req: &StartRollout,
    ) -> Result<RolloutStatus, ClientError> {
        self.send_json(
            Method::POST,
            &format!("/api/v1/adapters/{name}/rollouts"),
            req,
        )
        .await
    }

    /// The active rollout, else the latest, with its audit trail.
    pub async fn rollout(&self, name: &str) -> Result<RolloutStatus, ClientError> {
        self.get(&format!("/api/v1/adapters/{name}/rollouts/current"))
            .await
    }

    /// `promote`, `pause`, `resume` or `abort` the active rollout.
    pub async fn rollout_action(
        &self,
        name: &str,
        action: &str,
    ) -> Result<RolloutStatus, ClientError> {
        self.json(self.request(
            Method::POST,
            &format!("/api/v1/adapters/{name}/rollouts/current/{action}"),
        ))
        .await
    }

    /// Report per-arm counters (a gateway, every few seconds).
    pub async fn post_observations(&self, o: &Observations) -> Result<(), ClientError> {
        self.send(
            self.request(Method::POST, "/api/v1/routing/observations")
                .json(o),
        )
        .await?;
        Ok(())
    }
    /// Start a training run (the same id again is the same run).
    pub async fn create_run(&self, r: &crate::api::NewRun) -> Result<crate::api::Run, ClientError> {
        self.send_json(Method::POST, "/api/v1/runs", r).await
    }

    /// Add metric points to a run (points already stored are ignored).
    pub async fn post_run_metrics(
        &self,
        id: &str,
        points: &crate::api::RunPoints,
    ) -> Result<(), ClientError> {
        self.send(
            self.request(Method::POST, &format!("/api/v1/runs/{id}/metrics"))
                .json(points),
        )
        .await?;
        Ok(())
    }

    /// Record how a run ended.
    pub async fn end_run(
        &self,
        id: &str,
        end: &crate::api::EndRun,
    ) -> Result<crate::api::Run, ClientError> {
        self.send_json(Method::POST, &format!("/api/v1/runs/{id}/end"), end)
            .await
    }

    /// Runs, newest first (of one adapter, when given).
    pub async fn runs(&self, adapter: Option<&str>) -> Result<Vec<crate::api::Run>, ClientError> {
        match adapter {
            Some(a) => self.all_pages(&format!("/api/v1/runs?adapter={a}")).await,
            None => self.all_pages("/api/v1/runs").await,
        }
    }

    pub async fn run(&self, id: &str) -> Result<crate::api::Run, ClientError> {
        self.get(&format!("/api/v1/runs/{id}")).await
    }

    pub async fn run_metrics(&self, id: &str) -> Result<crate::api::RunMetrics, ClientError> {
        self.get(&format!("/api/v1/runs/{id}/metrics")).await
    }

    /// Upload a suite (a manifest and its JSONL cases); the same content again is a no-op.
    pub async fn push_suite(
        &self,
        s: &crate::api::NewSuite,
    ) -> Result<crate::api::SuitePushResponse, ClientError> {
        self.send_json(Method::POST, "/api/v1/suites", s).await
    }

    /// Every stored suite version, or only those of `name`.
    pub async fn suites(&self, name: Option<&str>) -> Result<Vec<crate::api::Suite>, ClientError> {
        match name {
            Some(n) => self.all_pages(&format!("/api/v1/suites?name={n}")).await,
            None => self.all_pages("/api/v1/suites").await,
        }
    }

    /// A suite's latest version, or the named one.
    pub async fn suite(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<crate::api::Suite, ClientError> {
        match version {
            Some(v) => {
                self.get(&format!("/api/v1/suites/{name}/versions/{v}"))
                    .await
            }
            None => self.get(&format!("/api/v1/suites/{name}")).await,
        }
    }

    /// The canonical cases (JSONL) of a suite version, checked against its digest.
    pub async fn suite_cases(&self, s: &crate::api::Suite) -> Result<String, ClientError> {
        let res = self
            .send(self.request(
                Method::GET,
                &format!("/api/v1/suites/{}/versions/{}/cases", s.name, s.version),
            ))
            .await?;
        let text = res.text().await.map_err(|source| ClientError::Connect {
            url: self.base.clone(),
            source,
        })?;
        let got = crate::api::suite_digest(&s.manifest, &text);
        if got != s.digest {
            return Err(ClientError::Integrity {
                file: format!("suite {}@{} cases", s.name, s.version),
                expected: s.digest.clone(),
                got,
            });
        }
        Ok(text)
    }
}
