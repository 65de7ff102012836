//! Whole engines, one per served version, for backends that hold each version separately
//! (mistral.rs merges an adapter into its own copy of the base). An LRU with a limit, where
//! the base engine and the versions the routing table pins are never evicted; loads run one
//! at a time per version ([`Flights`]) and at most [`MAX_PARALLEL_LOADS`] at once, failed
//! ones are remembered with backoff; a request in flight keeps its engine alive even after
//! eviction, so evicting never fails a request.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures_util::future::BoxFuture;
use tokio::sync::Semaphore;

use crate::engine::{Engine, EngineKey};
use crate::metrics::Metrics;
use crate::residency::Flights;

/// Each load reads a whole base: more at once only competes for memory and disk.
const MAX_PARALLEL_LOADS: usize = 2;

/// Turns a key into a ready engine: the seam between the pool and a backend.
pub trait EngineLoader: Send + Sync + 'static {
    fn load(&self, key: EngineKey) -> BoxFuture<'static, Result<Arc<dyn Engine>, String>>;
}

struct Entry {
    engine: Arc<dyn Engine>,
    last_used: u64,
}

#[derive(Default)]
struct Loaded {
    entries: HashMap<EngineKey, Entry>,
    pinned: HashSet<EngineKey>,
}

pub struct EnginePool {
    loader: Arc<dyn EngineLoader>,
    loaded: Arc<Mutex<Loaded>>,
    flights: Flights<EngineKey, Arc<dyn Engine>>,
    loads: Arc<Semaphore>,
    clock: Arc<AtomicU64>,
    limit: usize,
    metrics: Arc<Metrics>,
}

impl EnginePool {
    pub fn new(loader: Arc<dyn EngineLoader>, limit: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            loader,
            loaded: Arc::default(),
            flights: Flights::default(),
            loads: Arc::new(Semaphore::new(MAX_PARALLEL_LOADS)),
            clock: Arc::default(),
            limit: limit.max(1),
            metrics,
        }
    }

    /// The engine for `key`, loading it first if needed.
    pub async fn get(&self, key: &EngineKey) -> Result<Arc<dyn Engine>, String> {
        let tick = self.clock.fetch_add(1, Ordering::Relaxed);
        if let Some(e) = self.loaded.lock().expect("pool lock").entries.get_mut(key) {
            e.last_used = tick;
            return Ok(e.engine.clone());
        }
        let (loader, loads, loaded, clock, metrics, limit, k) = (
            self.loader.clone(),
            self.loads.clone(),
            self.loaded.clone(),
            self.clock.clone(),
            self.metrics.clone(),
            self.limit,
            key.clone(),
        );
        self.flights
            .run(key, move || async move {
                let _permit = loads.acquire_owned().await.map_err(|e| e.to_string())?;
                // Make room first, so the old engine's memory is free before the new one loads.
                {
                    let mut l = loaded.lock().expect("pool lock");
                    if l.entries.len() >= limit && !evict_one(&mut l, &k) {
                        return Err(format!(
                            "the engine memory holds {limit} engines and none can be evicted (the base and the routed versions stay loaded); raise max_engines or the memory budget"
                        ));
                    }
                }
                let start = Instant::now();
                tracing::info!(engine = %k, "loading engine");
                let engine = loader.load(k.clone()).await.inspect_err(|e| {
                    tracing::warn!(engine = %k, error = %e, "engine load failed");
                })?;
                let secs = start.elapsed().as_secs_f64();
                metrics.engine_load_seconds.observe(secs);
                tracing::info!(engine = %k, secs, "engine loaded");
                let mut l = loaded.lock().expect("pool lock");
                l.entries.insert(
                    k.clone(),
                    Entry {
                        engine: engine.clone(),
                        last_used: clock.fetch_add(1, Ordering::Relaxed),
                    },
                );
                while l.entries.len() > limit && evict_one(&mut l, &k) {}
                metrics.engines_loaded.set(l.entries.len() as i64);
                Ok(engine)
            })
            .await
    }

    /// Load `key` again even if its last load failed moments ago.
    pub async fn reload(&self, key: &EngineKey) -> Result<Arc<dyn Engine>, String> {
        self.flights.forget_failure(key);
        self.get(key).await
    }

    pub fn is_loaded(&self, key: &EngineKey) -> bool {
        self.loaded
            .lock()
            .expect("pool lock")
            .entries
            .contains_key(key)
    }

    pub fn loaded(&self) -> Vec<EngineKey> {
        let mut keys: Vec<EngineKey> = self
            .loaded
            .lock()
            .expect("pool lock")
            .entries
            .keys()
            .cloned()
            .collect();
        keys.sort();
        keys
    }

    pub fn unload(&self, key: &EngineKey) -> bool {
        let mut l = self.loaded.lock().expect("pool lock");
        let gone = l.entries.remove(key).is_some();
        self.metrics.engines_loaded.set(l.entries.len() as i64);
        gone
    }

    /// Keep these loaded (with the base) whatever the LRU says.
    pub fn pin(&self, keys: &[EngineKey]) {
        self.loaded.lock().expect("pool lock").pinned = keys.iter().cloned().collect();
    }
}

/// Drop the least recently used engine that may go: never the base, a pinned one, or `keep`.
/// Returns whether one went.
fn evict_one(l: &mut Loaded, keep: &EngineKey) -> bool {
    let victim = l
        .entries
        .iter()
        .filter(|(k, _)| *k != keep && **k != EngineKey::Base && !l.pinned.contains(*k))
        .min_by_key(|(_, e)| e.last_used)
        .map(|(k, _)| k.clone());
    match victim {
        Some(v) => {
            tracing::info!(engine = %v, "evicting engine (least recently used)");
            l.entries.remove(&v);
            true
        }
        None => false,
    }
}
