//! Adapters resident next to the base: LoRA pairs kept unmerged, in slots bounded by count and
//! bytes. Pinned adapters (the versions a routing table serves) are never evicted; the others
//! go least recently used first. A request holds its adapter's `Arc`, so evicting or replacing
//! an adapter never changes the weights of a request already running.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use loraops_model::adapter::read_adapter;
use loraops_model::config::ModelConfig;
use loraops_registry::peft::LINEAR_MODULES;

use crate::EngineError;

/// One adapted module: A (r × in) and B (out × r), row-major, and the scale.
pub struct Pair {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub r: usize,
    pub scale: f32,
}

/// An adapter's weights as the forward pass applies them.
pub struct AdapterWeights {
    pub id: String,
    /// Per layer, per module in `LINEAR_MODULES` order.
    pub pairs: Vec<[Option<Pair>; 7]>,
    pub bytes: usize,
}

impl AdapterWeights {
    /// Read a PEFT adapter directory for `config`'s model (see `read_adapter` for what is
    /// checked and refused).
    pub fn read(id: &str, dir: &Path, config: &ModelConfig) -> Result<Self, EngineError> {
        let peft = read_adapter(dir, config, &candle_core::Device::Cpu)?;
        let mut pairs: Vec<[Option<Pair>; 7]> = (0..config.num_hidden_layers)
            .map(|_| Default::default())
            .collect();
        let mut bytes = 0;
        for ((layer, module), p) in peft.pairs {
            let m = LINEAR_MODULES
                .iter()
                .position(|(name, _)| *name == module)
                .expect("read_adapter checks module names");
            let flat = |t: &candle_core::Tensor| -> Result<Vec<f32>, EngineError> {
                Ok(t.flatten_all()?.to_vec1::<f32>()?)
            };
            let pair = Pair {
                r: p.a.dim(0)?,
                a: flat(&p.a)?,
                b: flat(&p.b)?,
                scale: p.scale as f32,
            };
            bytes += 4 * (pair.a.len() + pair.b.len());
            pairs[layer][m] = Some(pair);
        }
        Ok(Self {
            id: id.to_string(),
            pairs,
            bytes,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    #[error(
        "adapter {id} needs {need} bytes but the adapter memory holds {budget} and the adapters in it are pinned"
    )]
    NoRoom {
        id: String,
        need: usize,
        budget: usize,
    },
}

/// Limits of the adapter slots.
#[derive(Debug, Clone, Copy)]
pub struct SlotLimits {
    pub max_adapters: usize,
    pub max_bytes: usize,
}

struct Entry {
    weights: Arc<AdapterWeights>,
    last_used: u64,
}

/// The resident adapters.
pub struct Slots {
    limits: SlotLimits,
    entries: HashMap<String, Entry>,
    pinned: HashSet<String>,
    clock: u64,
}

impl Slots {
    pub fn new(limits: SlotLimits) -> Self {
        Self {
            limits,
            entries: HashMap::new(),
            pinned: HashSet::new(),
            clock: 0,
        }
    }

    /// The adapter, marked as just used.
    pub fn get(&mut self, id: &str) -> Option<Arc<AdapterWeights>> {
        self.clock += 1;
        let e = self.entries.get_mut(id)?;
        e.last_used = self.clock;
        Some(e.weights.clone())
    }

    pub fn contains(&self, id: &str) -> bool {
        self.entries.contains_key(id)
    }

    /// Make `w` resident, evicting unpinned adapters least recently used first until it fits.
    /// Returns the ids evicted.
    pub fn insert(&mut self, w: Arc<AdapterWeights>) -> Result<Vec<String>, SlotError> {
        self.clock += 1;
        let id = w.id.clone();
        self.entries.remove(&id);
        let mut evicted = Vec::new();
        loop {
            let used: usize = self.entries.values().map(|e| e.weights.bytes).sum();
            let fits = self.entries.len() < self.limits.max_adapters
                && used + w.bytes <= self.limits.max_bytes;
            if fits {
                break;
            }
            let victim = self
                .entries
                .iter()
                .filter(|(k, _)| !self.pinned.contains(*k))
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone());
            match victim {
                Some(v) => {
                    self.entries.remove(&v);
                    evicted.push(v);
                }
                None => {
                    return Err(SlotError::NoRoom {
                        id,
                        need: w.bytes,
                        budget: self.limits.max_bytes,
                    });
                }
            }
        }
        self.entries.insert(
            id,
            Entry {
                weights: w,
                last_used: self.clock,
            },
        );
        Ok(evicted)
    }

    pub fn remove(&mut self, id: &str) -> bool {
        self.entries.remove(id).is_some()
    }

    /// The adapters that must stay resident (replaces the previous set).
    pub fn set_pinned(&mut self, ids: HashSet<String>) {
        self.pinned = ids;
    }

    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.entries.keys().cloned().collect();
        ids.sort();
        ids
    }

    pub fn bytes(&self) -> usize {
        self.entries.values().map(|e| e.weights.bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adapter(id: &str, bytes: usize) -> Arc<AdapterWeights> {
        Arc::new(AdapterWeights {
            id: id.into(),
            pairs: Vec::new(),
            bytes,
        })
    }

    #[test]
    fn evicts_least_recently_used_but_never_pinned() {
        let mut s = Slots::new(SlotLimits {
            max_adapters: 2,
            max_bytes: 100,
        });
        s.insert(adapter("a", 10)).unwrap();
        s.insert(adapter("b", 10)).unwrap();
        s.get("a");
        assert_eq!(s.insert(adapter("c", 10)).unwrap(), vec!["b".to_string()]);
        s.set_pinned(["a".to_string(), "c".to_string()].into());
        let e = s.insert(adapter("d", 10)).unwrap_err();
        assert!(matches!(e, SlotError::NoRoom { .. }));
        assert_eq!(s.ids(), vec!["a".to_string(), "c".to_string()]);
        // Bytes bound too: 95 bytes fit only once both unpinned ones are gone.
        s.set_pinned(HashSet::new());
        assert_eq!(s.insert(adapter("big", 95)).unwrap().len(), 2);
        assert_eq!(s.bytes(), 95);
    }

    #[test]
    fn a_running_request_keeps_the_weights_it_started_with() {
        let mut s = Slots::new(SlotLimits {
            max_adapters: 4,
            max_bytes: 100,
        });
        s.insert(adapter("a", 10)).unwrap();
        let held = s.get("a").unwrap();
        s.remove("a");
        s.insert(adapter("a", 20)).unwrap();
        assert_eq!(held.bytes, 10);
        assert_eq!(s.get("a").unwrap().bytes, 20);
    }
}
