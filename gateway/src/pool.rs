//! Loaded engines, one per served version, in an LRU with a configurable limit. Concurrent
//! requests for a version that is still loading wait for the same load; a request in flight
//! keeps its engine alive even after eviction, so evicting never fails a request.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures_util::future::BoxFuture;
use loraops_registry::api::Name;
use tokio::sync::OnceCell;

use crate::adapters::{AdapterError, AdapterStore};
use crate::engine::mistral::{LoadSpec, MistralEngine};
use crate::engine::remote::RemoteEngine;
use crate::engine::{Engine, EngineError};
use crate::metrics::Metrics;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EngineKey {
    Base,
    Version {
        adapter: Name,
        version: u32,
        digest: String,
    },
}

impl std::fmt::Display for EngineKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Base => f.write_str("base"),
            Self::Version {
                adapter, version, ..
            } => write!(f, "{adapter}@{version}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Turns a key into a ready engine: the seam between the pool and a backend.
pub trait EngineLoader: Send + Sync + 'static {
    fn load(&self, key: EngineKey) -> BoxFuture<'static, Result<Arc<dyn Engine>, LoadError>>;
}

/// Loads the base directory, merged with the key's adapter from the adapter cache.
pub struct MistralLoader {
    pub base_dir: PathBuf,
    pub store: AdapterStore,
    pub dtype: mistralrs::ModelDType,
    pub max_num_seqs: usize,
    pub isq: Option<mistralrs::IsqType>,
}

impl EngineLoader for MistralLoader {
    fn load(&self, key: EngineKey) -> BoxFuture<'static, Result<Arc<dyn Engine>, LoadError>> {
        let store = self.store.clone();
        let mut spec = LoadSpec {
            base_dir: self.base_dir.clone(),
            adapter_id: None,
            dtype: self.dtype,
            max_num_seqs: self.max_num_seqs,
            isq: self.isq,
        };
        Box::pin(async move {
            if let EngineKey::Version {
                adapter,
                version,
                digest,
            } = &key
            {
                spec.adapter_id = Some(store.ensure(adapter, *version, digest).await?);
            }
            let engine: Arc<dyn Engine> = Arc::new(MistralEngine::load(spec).await?);
            Ok(engine)
        })
    }
}

/// Forwards to an OpenAI-compatible upstream: the base under its name, a version as
/// `NAME@V` (how the upstream must name its LoRA modules).
pub struct RemoteLoader {
    pub http: reqwest::Client,
    pub base_url: String,
    pub base_name: String,
}

impl EngineLoader for RemoteLoader {
    fn load(&self, key: EngineKey) -> BoxFuture<'static, Result<Arc<dyn Engine>, LoadError>> {
        let model = match &key {
            EngineKey::Base => self.base_name.clone(),
            k => k.to_string(),
        };
        let engine: Arc<dyn Engine> =
            Arc::new(RemoteEngine::new(self.http.clone(), &self.base_url, &model));
        Box::pin(async move { Ok(engine) })
    }
}

struct Slot {
    cell: OnceCell<Arc<dyn Engine>>,
    last_used: AtomicU64,
}

pub struct EnginePool {
    loader: Box<dyn EngineLoader>,
    slots: Mutex<HashMap<EngineKey, Arc<Slot>>>,
    clock: AtomicU64,
    limit: usize,
    metrics: Arc<Metrics>,
}

impl EnginePool {
    pub fn new(loader: Box<dyn EngineLoader>, limit: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            loader,
            slots: Mutex::new(HashMap::new()),
            clock: AtomicU64::new(0),
            limit: limit.max(1),
            metrics,
        }
    }

    /// The engine for `key`, loading it first if needed.
    pub async fn get(&self, key: &EngineKey) -> Result<Arc<dyn Engine>, Arc<LoadError>> {
        let tick = self.clock.fetch_add(1, Ordering::Relaxed);
        let slot = {
            let mut slots = self.slots.lock().expect("pool lock");
            slots
                .entry(key.clone())
                .or_insert_with(|| {
                    Arc::new(Slot {
                        cell: OnceCell::new(),
                        last_used: AtomicU64::new(tick),
                    })
                })
                .clone()
        };
        slot.last_used.store(tick, Ordering::Relaxed);
        if let Some(e) = slot.cell.get() {
            return Ok(e.clone());
        }
        let loaded_here = AtomicBool::new(false);
        let res = slot
            .cell
            .get_or_try_init(|| async {
                loaded_here.store(true, Ordering::Relaxed);
                let start = Instant::now();
                tracing::info!(engine = %key, "loading engine");
                let res = self.loader.load(key.clone()).await;
                match &res {
                    Ok(_) => {
                        let secs = start.elapsed().as_secs_f64();
                        self.metrics.engine_load_seconds.observe(secs);
                        tracing::info!(engine = %key, secs, "engine loaded");
                    }
                    Err(e) => tracing::warn!(engine = %key, error = %e, "engine load failed"),
                }
                res.map_err(Arc::new)
            })
            .await
            .cloned();
        if res.is_err() {
            // Forget the failed slot so a later request retries the load.
            let mut slots = self.slots.lock().expect("pool lock");
            if slots
                .get(key)
                .is_some_and(|s| Arc::ptr_eq(s, &slot) && s.cell.get().is_none())
            {
                slots.remove(key);
            }
        } else if loaded_here.load(Ordering::Relaxed) {
            self.evict(key);
        }
        res
    }

    /// Whether `key` is loaded (not merely loading).
    pub fn is_loaded(&self, key: &EngineKey) -> bool {
        self.slots
            .lock()
            .expect("pool lock")
            .get(key)
            .is_some_and(|s| s.cell.initialized())
    }

    pub fn loaded(&self) -> Vec<EngineKey> {
        self.slots
            .lock()
            .expect("pool lock")
            .iter()
            .filter(|(_, s)| s.cell.initialized())
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Drop least recently used loaded engines beyond the limit, never `keep`.
    fn evict(&self, keep: &EngineKey) {
        let mut slots = self.slots.lock().expect("pool lock");
        loop {
            let loaded: Vec<(EngineKey, u64)> = slots
                .iter()
                .filter(|(_, s)| s.cell.initialized())
                .map(|(k, s)| (k.clone(), s.last_used.load(Ordering::Relaxed)))
                .collect();
            self.metrics.engines_loaded.set(loaded.len() as i64);
            if loaded.len() <= self.limit {
                return;
            }
            let Some((victim, _)) = loaded
                .into_iter()
                .filter(|(k, _)| k != keep)
                .min_by_key(|(_, t)| *t)
            else {
                return;
            };
            tracing::info!(engine = %victim, "evicting engine (least recently used)");
            slots.remove(&victim);
        }
    }
}
