//! The adapter cache: versions pulled from the registry, sha256-verified, laid out as a
//! Hugging Face hub cache (`models--loraops--DIGEST/refs/main` + `snapshots/DIGEST/…`), the
//! only form mistral.rs 0.8.1 loads adapters from (the native engine reads the snapshot
//! directory). Keyed by content digest, so a version is downloaded once whatever name or
//! number it is served under. The file list the registry gave is kept next to the files, and a
//! cached snapshot is hashed again the first time this process uses it, so a cache altered on
//! disk is downloaded afresh rather than served.

use std::path::{Path, PathBuf};

use loraops_registry::api::{Name, VersionFile, version_digest};
use loraops_registry::client::{ClientError, RegistryClient, no_progress};
use loraops_registry::peft::{self, AdapterConfig};
use sha2::{Digest, Sha256};

/// Organisation of every adapter id in the cache.
const ORG: &str = "loraops";

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("{0}")]
    Registry(#[from] ClientError),
    #[error("no registry is configured to fetch {0} from")]
    NoRegistry(String),
    #[error("{adapter}@{version}: the registry's digest {got} is not the routed {expected}")]
    DigestMismatch {
        adapter: String,
        version: u32,
        expected: String,
        got: String,
    },
    #[error("{adapter}@{version}: {message}")]
    Unsupported {
        adapter: String,
        version: u32,
        message: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AdapterError + '_ {
    move |source| AdapterError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Set `HF_HUB_CACHE` (read by mistral.rs at each load) to the adapter cache and keep the hub
/// client offline.
///
/// # Safety
/// Changes the process environment: call it before any other thread may read it (at the start
/// of `main`, or once per test process before any server starts).
pub unsafe fn set_hub_cache_env(dir: &Path) {
    // SAFETY: the caller guarantees no concurrent reader.
    unsafe {
        std::env::set_var("HF_HUB_CACHE", dir);
        std::env::set_var("HF_HUB_OFFLINE", "1");
    }
}

/// The registry's file list of a cached version, kept beside its files.
const FILES_RECORD: &str = ".loraops-files.json";

#[derive(Clone)]
pub struct AdapterStore {
    root: PathBuf,
    registry: Option<RegistryClient>,
    /// Digests whose cached files this process has hashed and found intact.
    verified: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

impl AdapterStore {
    pub fn new(root: PathBuf, registry: Option<RegistryClient>) -> Self {
        Self {
            root,
            registry,
            verified: Default::default(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn hex(digest: &str) -> &str {
        digest.strip_prefix("sha256:").unwrap_or(digest)
    }

    /// The hub id mistral.rs loads the version with.
    pub fn hub_id(digest: &str) -> String {
        format!("{ORG}/{}", Self::hex(digest))
    }

    fn repo_dir(&self, digest: &str) -> PathBuf {
        self.root
            .join(format!("models--{ORG}--{}", Self::hex(digest)))
    }

    /// Make `name@version` (whose content digest is `digest`) loadable; returns its snapshot
    /// directory (`adapter_config.json` + `adapter_model.safetensors`).
    pub async fn ensure(
        &self,
        name: &Name,
        version: u32,
        digest: &str,
    ) -> Result<PathBuf, AdapterError> {
        let repo = self.repo_dir(digest);
        let rev = Self::hex(digest).to_string();
        let snapshot = repo.join("snapshots").join(&rev);
        if repo.join("refs").join("main").exists() && self.intact(&snapshot, digest).await {
            return Ok(snapshot);
        }
        let client = self
            .registry
            .as_ref()
            .ok_or_else(|| AdapterError::NoRegistry(format!("{name}@{version}")))?;
        let v = client.version(name.as_str(), version).await?;
        let got = version_digest(&v.files);
        if got != digest || v.digest != digest {
            return Err(AdapterError::DigestMismatch {
                adapter: name.to_string(),
                version,
                expected: digest.to_string(),
                got,
            });
        }
        // Download into a private staging directory, then rename it into place, so a crash or
        // a concurrent pull never leaves a half-written snapshot visible.
        let staging = self
            .root
            .join(format!(".staging-{rev}-{}", uuid::Uuid::new_v4().simple()));
        tokio::fs::create_dir_all(&staging)
            .await
            .map_err(io(&staging))?;
        let res = self.fill(client, name, version, &v.files, &staging).await;
        if let Err(e) = res {
            let _ = tokio::fs::remove_dir_all(&staging).await;
            return Err(e);
        }
        let snapshots = repo.join("snapshots");
        tokio::fs::create_dir_all(&snapshots)
            .await
            .map_err(io(&snapshots))?;
        if snapshot.exists() {
            // A snapshot that failed its check: replace it.
            let _ = tokio::fs::remove_dir_all(&snapshot).await;
        }
        if tokio::fs::rename(&staging, &snapshot).await.is_err() {
            // Someone else finished the same digest first; theirs is identical.
            let _ = tokio::fs::remove_dir_all(&staging).await;
        }
        let refs = repo.join("refs");
        tokio::fs::create_dir_all(&refs).await.map_err(io(&refs))?;
        // The hub client reads the revision verbatim: no trailing newline.
        let main = refs.join("main");
        tokio::fs::write(&main, rev.as_bytes())
            .await
            .map_err(io(&main))?;
        self.verified
            .lock()
            .expect("verified lock")
            .insert(digest.to_string());
        Ok(snapshot)
    }

    /// Whether the cached snapshot holds the files its record names, with their digests, and
    /// the record the version's digest (hashed once per process).
    async fn intact(&self, snapshot: &Path, digest: &str) -> bool {
        if self
            .verified
            .lock()
            .expect("verified lock")
            .contains(digest)
        {
            return snapshot.join(peft::WEIGHTS_FILE).exists();
        }
        let snapshot = snapshot.to_path_buf();
        let digest_owned = digest.to_string();
        let ok = tokio::task::spawn_blocking(move || {
            let Ok(bytes) = std::fs::read(snapshot.join(FILES_RECORD)) else {
                return false;
            };
            let Ok(files) = serde_json::from_slice::<Vec<VersionFile>>(&bytes) else {
                return false;
            };
            if version_digest(&files) != digest_owned {
                return false;
            }
            files
                .iter()
                .filter(|f| f.name == peft::CONFIG_FILE || f.name == peft::WEIGHTS_FILE)
                .all(|f| {
                    std::fs::read(snapshot.join(&f.name))
                        .is_ok_and(|b| hex::encode(Sha256::digest(&b)) == f.sha256)
                })
        })
        .await
        .unwrap_or(false);
        if ok {
            self.verified
                .lock()
                .expect("verified lock")
                .insert(digest.to_string());
        } else {
            tracing::warn!(%digest, "cached adapter files do not match their digests; downloading again");
        }
        ok
    }

    async fn fill(
        &self,
        client: &RegistryClient,
        name: &Name,
        version: u32,
        files: &[loraops_registry::api::VersionFile],
        dir: &Path,
    ) -> Result<(), AdapterError> {
        for f in files
            .iter()
            .filter(|f| f.name == peft::CONFIG_FILE || f.name == peft::WEIGHTS_FILE)
        {
            client
                .download_file(name.as_str(), version, f, &dir.join(&f.name), no_progress())
                .await?;
        }
        let record = dir.join(FILES_RECORD);
        let bytes = serde_json::to_vec(files).expect("serialisable");
        tokio::fs::write(&record, bytes).await.map_err(io(&record))
    }

    /// The adapter's config, refused when it needs what mistral.rs cannot apply (0.8.1 reads
    /// only r, lora_alpha and target_modules: anything else would be served silently wrong).
    pub async fn check_mergeable(
        snapshot: &Path,
        name: &Name,
        version: u32,
    ) -> Result<(), AdapterError> {
        let cfg_path = snapshot.join(peft::CONFIG_FILE);
        let bytes = tokio::fs::read(&cfg_path).await.map_err(io(&cfg_path))?;
        let unsupported = |message: String| AdapterError::Unsupported {
            adapter: name.to_string(),
            version,
            message,
        };
        let cfg = AdapterConfig::parse(&bytes).map_err(|e| unsupported(e.to_string()))?;
        if let Some(feature) = cfg.unsupported_for_merge() {
            return Err(unsupported(format!(
                "uses {feature}, which the mistral.rs engine cannot apply"
            )));
        }
        Ok(())
    }
}
