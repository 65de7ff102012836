//! Object storage for version files: opened from a URL (a local directory by default,
//! `s3://bucket/prefix` in production), streaming writes that hash as they go, and the sweep
//! that deletes blobs of uploads that never became a version.
//!
//! Layout: `versions/{adapter}/{upload-id}/{file}`. Every upload writes under a fresh id, so a
//! blob is never overwritten; the version row names the upload id it owns.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures_util::{StreamExt, TryStreamExt};
use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use object_store::buffered::BufWriter;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::settings::S3Settings;

pub type Store = Arc<dyn ObjectStore>;

#[derive(Debug, thiserror::Error)]
pub enum StoreConfigError {
    #[error("object store URL {0:?}: {1}")]
    Url(String, String),
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
}

/// Open the store a URL names: `s3://bucket[/prefix]`, `file:///abs/dir`, or a plain path.
pub fn open(url: &str, s3: &S3Settings) -> Result<Store, StoreConfigError> {
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(StoreConfigError::Url(url.into(), "names no bucket".into()));
        }
        let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
        if let Some(e) = &s3.endpoint {
            b = b.with_endpoint(e);
        }
        if let Some(r) = &s3.region {
            b = b.with_region(r);
        }
        if let Some(k) = &s3.access_key_id {
            b = b.with_access_key_id(k);
        }
        if let Some(k) = &s3.secret_access_key {
            b = b.with_secret_access_key(k);
        }
        let allow_http = s3.allow_http.unwrap_or_else(|| {
            s3.endpoint
                .as_deref()
                .is_some_and(|e| e.starts_with("http://"))
        });
        b = b
            .with_allow_http(allow_http)
            .with_virtual_hosted_style_request(s3.virtual_hosted_style.unwrap_or(false));
        let store = b.build()?;
        let prefix = prefix.trim_matches('/');
        return Ok(if prefix.is_empty() {
            Arc::new(store)
        } else {
            Arc::new(PrefixStore::new(store, prefix))
        });
    }
    let dir = match url.strip_prefix("file://") {
        Some(p) => p.to_string(),
        None if url.contains("://") => {
            return Err(StoreConfigError::Url(
                url.into(),
                "unsupported scheme (use a directory, file:// or s3://)".into(),
            ));
        }
        None => url.to_string(),
    };
    std::fs::create_dir_all(&dir).map_err(|e| StoreConfigError::Url(url.into(), e.to_string()))?;
    let fs = LocalFileSystem::new_with_prefix(&dir)?.with_automatic_cleanup(true);
    Ok(Arc::new(fs))
}

pub fn version_prefix(adapter: &str, upload_id: &str) -> ObjectPath {
    ObjectPath::from(format!("versions/{adapter}/{upload_id}"))
}

/// A blob being written: bytes go to the store in parts while sha256 is computed over them,
/// so memory stays flat whatever the size.
pub struct HashingWriter {
    /// `None` once finished or aborted; a writer dropped while still `Some` (its request was
    /// cancelled) aborts its multipart upload, whose parts S3 would otherwise keep, invisible
    /// to listings and so to the sweep.
    writer: Option<BufWriter>,
    hasher: Sha256,
    pub len: u64,
    pub key: ObjectPath,
}

/// Part size for multipart writes (S3's minimum part is 5 MiB).
const PART: usize = 8 << 20;

impl HashingWriter {
    pub fn new(store: &Store, key: ObjectPath) -> Self {
        let writer =
            BufWriter::with_capacity(store.clone(), key.clone(), PART).with_max_concurrency(2);
        Self {
            writer: Some(writer),
            hasher: Sha256::new(),
            len: 0,
            key,
        }
    }

    pub async fn write(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        self.hasher.update(chunk);
        self.len += chunk.len() as u64;
        self.writer
            .as_mut()
            .expect("writer in use")
            .write_all(chunk)
            .await
    }

    /// Complete the object; returns (sha256 hex, length).
    pub async fn finish(mut self) -> std::io::Result<(String, u64)> {
        let mut w = self.writer.take().expect("writer in use");
        // A shutdown that fails leaves the writer shut: object_store's `abort` would panic
        // ("Already shut down") and take the request's worker with it. The parts of an
        // incomplete multipart upload are never a visible object (and the sweep decides by
        // the upload's row), so the error alone is the answer.
        w.shutdown().await?;
        let hasher = std::mem::take(&mut self.hasher);
        Ok((hex::encode(hasher.finalize()), self.len))
    }

    /// Give up: abort a multipart upload in progress.
    pub async fn abort(mut self) {
        if let Some(mut w) = self.writer.take() {
            let _ = w.abort().await;
        }
    }
}

impl Drop for HashingWriter {
    fn drop(&mut self) {
        if let Some(mut w) = self.writer.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move {
                let _ = w.abort().await;
            });
        }
    }
}

/// Delete every object under `prefix`; returns how many went.
pub async fn delete_prefix(
    store: &Store,
    prefix: &ObjectPath,
) -> Result<usize, object_store::Error> {
    let keys: Vec<ObjectPath> = store
        .list(Some(prefix))
        .map_ok(|m| m.location)
        .try_collect()
        .await?;
    let n = keys.len();
    let stream = futures_util::stream::iter(keys.into_iter().map(Ok)).boxed();
    store.delete_stream(stream).try_collect::<Vec<_>>().await?;
    Ok(n)
}

/// `versions/{adapter}/{upload-id}/…` → (adapter, upload id, last modified) of each upload
/// directory found in the store.
pub async fn list_uploads(
    store: &Store,
) -> Result<Vec<(String, String, DateTime<Utc>)>, object_store::Error> {
    let mut out: std::collections::BTreeMap<(String, String), DateTime<Utc>> = Default::default();
    let mut s = store.list(Some(&ObjectPath::from("versions")));
    while let Some(meta) = s.next().await.transpose()? {
        let parts: Vec<_> = meta
            .location
            .parts()
            .map(|p| p.as_ref().to_string())
            .collect();
        if parts.len() >= 4 {
            let e = out
                .entry((parts[1].clone(), parts[2].clone()))
                .or_insert(meta.last_modified);
            *e = (*e).max(meta.last_modified);
        }
    }
    Ok(out.into_iter().map(|((a, u), t)| (a, u, t)).collect())
}
