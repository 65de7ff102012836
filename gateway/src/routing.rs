//! Model routing: which engine serves a request's `model`. `NAME` follows the registry's
//! routing table, split between stable and canary by a deterministic hash of the sticky key
//! (so every replica sends a user to the same arm), `NAME@V` pins a version, and the base
//! model's name serves without adapter. A deployer's smoke test may force the canary
//! ([`Router::resolve_forced`]); a rollout in its shadow phase names the version that stable
//! requests are mirrored to ([`Router::shadow_of`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use loraops_registry::api::{AdapterRef, AdapterRoute, Name, RoutedVersion, RoutingTable};
use loraops_registry::client::{ClientError, RegistryClient};
use sha2::{Digest, Sha256};

use crate::engine::EngineKey;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arm {
    Stable,
    Canary,
    Pinned,
    /// The base model, no adapter.
    Base,
    /// The candidate, reached by a deployer's `x-loraops-arm: canary` whatever the split;
    /// never counted in the rollout's analysis.
    Forced,
}

impl Arm {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stable => "stable",
            Self::Canary => "canary",
            Self::Pinned => "pinned",
            Self::Base => "base",
            Self::Forced => "forced",
        }
    }
}

/// Where one request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub key: EngineKey,
    pub arm: Arm,
    /// The adapter whose routing chose this target. An adapter without a stable version (its
    /// first canary) serves its stable arm from the base model, so the canary is compared
    /// with the base.
    pub route: Option<Name>,
}

impl Target {
    pub fn adapter(&self) -> Option<(&Name, u32)> {
        match &self.key {
            EngineKey::Base => None,
            EngineKey::Version {
                adapter, version, ..
            } => Some((adapter, *version)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("unknown model {0}")]
    UnknownModel(String),
    #[error("{0} has no rollout candidate to force")]
    NoCanary(String),
    #[error("cannot resolve {model}: {source}")]
    Registry {
        model: String,
        source: Box<ClientError>,
    },
}

/// Buckets of the split: weights have a resolution of 0.0001 percent.
const BUCKETS: u64 = 1_000_000;

/// The bucket of a sticky key for one adapter: the first 8 bytes of
/// sha256(adapter ‖ 0 ‖ key), modulo [`BUCKETS`]. Salting with the adapter keeps one user from
/// being in every canary at once; raising the weight only adds keys to the canary.
pub fn bucket(adapter: &str, sticky_key: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(adapter.as_bytes());
    h.update([0u8]);
    h.update(sticky_key.as_bytes());
    let d = h.finalize();
    u64::from_be_bytes(d[..8].try_into().expect("8 bytes")) % BUCKETS
}

/// The arm of `route` a sticky key goes to, and that arm's version.
pub fn choose<'a>(route: &'a AdapterRoute, sticky_key: &str) -> Option<(Arm, &'a RoutedVersion)> {
    if let Some(c) = &route.canary {
        let threshold = (route.canary_weight.clamp(0.0, 100.0) / 100.0 * BUCKETS as f64) as u64;
        if bucket(route.adapter.as_str(), sticky_key) < threshold {
            return Some((Arm::Canary, c));
        }
    }
    route.stable.as_ref().map(|s| (Arm::Stable, s))
}

fn key(adapter: &Name, v: &RoutedVersion) -> EngineKey {
    EngineKey::Version {
        adapter: adapter.clone(),
        version: v.version,
        digest: v.digest.clone(),
    }
}

/// Every engine the table needs loaded: each route's stable, canary and shadow versions.
pub fn wanted(table: &RoutingTable) -> Vec<EngineKey> {
    let mut out = Vec::new();
    for r in &table.routes {
        for v in [&r.stable, &r.canary, &r.shadow].into_iter().flatten() {
            out.push(key(&r.adapter, v));
        }
    }
    out
}

/// Which versions `NAME@V` may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PinnedVersions {
    /// Any version the registry has (evaluation pins versions before their rollout).
    #[default]
    Any,
    /// Only versions the routing table serves now (stable, canary, shadow): rolled-back and
    /// never-released versions are refused as unknown models, except to callers whose token
    /// holds the evaluator or deployer role for the adapter (evaluation and smoke tests pin
    /// versions before their rollout).
    Routed,
}

impl std::str::FromStr for PinnedVersions {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "any" => Ok(Self::Any),
            "routed" => Ok(Self::Routed),
            _ => Err(format!("{s:?}: expected any or routed")),
        }
    }
}

/// How long a pinned version the registry does not have is answered 404 without asking again.
const MISS_TTL: std::time::Duration = std::time::Duration::from_secs(30);
/// Most misses remembered; beyond, the oldest half is forgotten.
const MAX_MISSES: usize = 4096;

pub struct Router {
    base_name: String,
    table: RwLock<Arc<RoutingTable>>,
    registry: Option<RegistryClient>,
    /// Digests of pinned versions not in the table; versions are immutable, so never stale.
    pinned: Mutex<HashMap<(Name, u32), String>>,
    /// Pinned versions the registry said it does not have, and when: a stream of requests for
    /// made-up versions costs one registry call per version per [`MISS_TTL`].
    misses: Mutex<HashMap<(Name, u32), std::time::Instant>>,
    pinned_versions: PinnedVersions,
}

impl Router {
    pub fn new(base_name: String, registry: Option<RegistryClient>) -> Self {
        Self {
            base_name,
            table: RwLock::new(Arc::new(RoutingTable {
                revision: -1,
                routes: Vec::new(),
            })),
            registry,
            pinned: Mutex::new(HashMap::new()),
            misses: Mutex::new(HashMap::new()),
            pinned_versions: PinnedVersions::Any,
        }
    }

    pub fn with_pinned_versions(mut self, p: PinnedVersions) -> Self {
        self.pinned_versions = p;
        self
    }

    pub fn base_name(&self) -> &str {
        &self.base_name
    }

    pub fn table(&self) -> Arc<RoutingTable> {
        self.table.read().expect("routing lock").clone()
    }

    pub fn set_table(&self, t: RoutingTable) {
        *self.table.write().expect("routing lock") = Arc::new(t);
    }

    /// The engine for `model`. `may_pin_any`: whether the caller may name versions the
    /// routing table does not serve (see [`PinnedVersions`]).
    pub async fn resolve(
        &self,
        model: &str,
        sticky_key: &str,
        may_pin_any: bool,
    ) -> Result<Target, RouteError> {
        if model == self.base_name {
            return Ok(Target {
                key: EngineKey::Base,
                arm: Arm::Base,
                route: None,
            });
        }
        let r: AdapterRef = model
            .parse()
            .map_err(|_| RouteError::UnknownModel(model.to_string()))?;
        let table = self.table();
        let route = table.routes.iter().find(|x| x.adapter == r.name);
        match r.version {
            None => {
                let route = route.ok_or_else(|| RouteError::UnknownModel(model.to_string()))?;
                Ok(match choose(route, sticky_key) {
                    Some((arm, v)) => Target {
                        key: key(&route.adapter, v),
                        arm,
                        route: Some(route.adapter.clone()),
                    },
                    None => Target {
                        key: EngineKey::Base,
                        arm: Arm::Stable,
                        route: Some(route.adapter.clone()),
                    },
                })
            }
            Some(version) => {
                let routed = route.and_then(|x| {
                    [&x.stable, &x.canary, &x.shadow]
                        .into_iter()
                        .flatten()
                        .find(|v| v.version == version)
                });
                let digest = match routed {
                    Some(v) => v.digest.clone(),
                    None if self.pinned_versions == PinnedVersions::Routed && !may_pin_any => {
                        return Err(RouteError::UnknownModel(model.to_string()));
                    }
                    None => self.pinned_digest(&r.name, version, model).await?,
                };
                Ok(Target {
                    key: EngineKey::Version {
                        adapter: r.name.clone(),
                        version,
                        digest,
                    },
                    arm: Arm::Pinned,
                    route: Some(r.name),
                })
            }
        }
    }

    /// The candidate of `model`'s active rollout (its canary, or its shadow-phase version),
    /// for a deployer's smoke test: `x-loraops-arm: canary`.
    pub fn resolve_forced(&self, model: &str) -> Result<Target, RouteError> {
        let r: AdapterRef = model
            .parse()
            .map_err(|_| RouteError::UnknownModel(model.to_string()))?;
        let table = self.table();
        let route = table
            .routes
            .iter()
            .find(|x| x.adapter == r.name && r.version.is_none())
            .ok_or_else(|| RouteError::UnknownModel(model.to_string()))?;
        let v = route
            .canary
            .as_ref()
            .or(route.shadow.as_ref())
            .ok_or_else(|| RouteError::NoCanary(model.to_string()))?;
        Ok(Target {
            key: key(&route.adapter, v),
            arm: Arm::Forced,
            route: Some(route.adapter.clone()),
        })
    }

    /// Where `adapter`'s stable requests are mirrored in a shadow phase, and the share.
    pub fn shadow_of(&self, adapter: &Name) -> Option<(EngineKey, u32, f64)> {
        let table = self.table();
        let route = table.routes.iter().find(|x| &x.adapter == adapter)?;
        let v = route.shadow.as_ref()?;
        (route.shadow_percent > 0.0)
            .then(|| (key(&route.adapter, v), v.version, route.shadow_percent))
    }

    async fn pinned_digest(
        &self,
        name: &Name,
        version: u32,
        model: &str,
    ) -> Result<String, RouteError> {
        if let Some(d) = self
            .pinned
            .lock()
            .expect("pinned lock")
            .get(&(name.clone(), version))
        {
            return Ok(d.clone());
        }
        let client = self
            .registry
            .as_ref()
            .ok_or_else(|| RouteError::UnknownModel(model.to_string()))?;
        let pin = (name.clone(), version);
        if let Some(at) = self.misses.lock().expect("misses lock").get(&pin)
            && at.elapsed() < MISS_TTL
        {
            return Err(RouteError::UnknownModel(model.to_string()));
        }
        match client.version(name.as_str(), version).await {
            Ok(v) => {
                self.pinned
                    .lock()
                    .expect("pinned lock")
                    .insert((name.clone(), version), v.digest.clone());
                Ok(v.digest)
            }
            Err(e) if e.status().is_some_and(|s| s == 404) => {
                let mut misses = self.misses.lock().expect("misses lock");
                if misses.len() >= MAX_MISSES {
                    let mut ages: Vec<_> = misses.values().copied().collect();
                    ages.sort();
                    let cut = ages[ages.len() / 2];
                    misses.retain(|_, at| *at > cut);
                }
                misses.insert(pin, std::time::Instant::now());
                Err(RouteError::UnknownModel(model.to_string()))
            }
            Err(source) => Err(RouteError::Registry {
                model: model.to_string(),
                source: Box::new(source),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(weight: f64) -> AdapterRoute {
        AdapterRoute {
            adapter: Name::parse("bot").unwrap(),
            base_model: Name::parse("tiny").unwrap(),
            stable: Some(RoutedVersion {
                version: 1,
                digest: "sha256:01".into(),
            }),
            canary: Some(RoutedVersion {
                version: 2,
                digest: "sha256:02".into(),
            }),
            canary_weight: weight,
            shadow: None,
            shadow_percent: 0.0,
        }
    }

    #[test]
    fn observed_share_equals_the_weight() {
        let keys: Vec<String> = (0..20_000).map(|i| format!("user-{i}")).collect();
        for weight in [0.0, 5.0, 25.0, 50.0, 100.0] {
            let r = route(weight);
            let canary = keys
                .iter()
                .filter(|k| choose(&r, k).unwrap().0 == Arm::Canary)
                .count();
            let share = canary as f64 / keys.len() as f64 * 100.0;
            // Binomial standard deviation at 20k keys is at most 0.36 points.
            assert!(
                (share - weight).abs() < 1.2,
                "weight {weight}: observed {share}"
            );
        }
    }

    #[test]
    fn keys_are_sticky_and_raising_the_weight_only_adds_canary_keys() {
        let (r5, r25) = (route(5.0), route(25.0));
        for i in 0..5_000 {
            let k = format!("k{i}");
            let a = choose(&r5, &k).unwrap().0;
            assert_eq!(a, choose(&r5, &k).unwrap().0);
            if a == Arm::Canary {
                assert_eq!(choose(&r25, &k).unwrap().0, Arm::Canary, "{k}");
            }
        }
        // Replicas agree because the bucket depends only on adapter and key; the adapter salts it.
        assert_eq!(bucket("bot", "alice"), bucket("bot", "alice"));
        assert_ne!(bucket("bot", "alice"), bucket("other", "alice"));
    }
}
