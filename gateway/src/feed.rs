//! The registry feed: long-polls `GET /api/v1/routing` and applies each new table at once
//! (a rollback never waits on a slow load): the versions it routes are pinned in the backend
//! and loaded in the background, and a request for a version still loading waits for that one
//! load. When the registry is unreachable the last table keeps serving; `/readyz` and the
//! `loraops_gateway_registry_up` gauge say so.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use loraops_registry::client::RegistryClient;

use crate::engine::SharedBackend;
use crate::metrics::Metrics;
use crate::routing::{Router, wanted};

#[derive(Debug, Clone, Default)]
pub struct FeedStatus {
    /// Revision of the table being served (none before the first poll succeeded).
    pub revision: Option<i64>,
    pub last_ok: Option<DateTime<Utc>>,
    /// Set while the registry is unreachable.
    pub error: Option<String>,
    pub failed_since: Option<DateTime<Utc>>,
}

impl FeedStatus {
    /// One line for `/readyz`.
    pub fn describe(&self) -> String {
        match (&self.error, self.revision) {
            (None, Some(r)) => format!("ok, routing revision {r}"),
            (None, None) => "waiting for the first routing table".into(),
            (Some(e), Some(r)) => format!(
                "unreachable since {}: {e}; serving the last routing table (revision {r})",
                self.failed_since
                    .map(|t| t.to_rfc3339())
                    .unwrap_or_default()
            ),
            (Some(e), None) => format!("unreachable: {e}; serving the base model only"),
        }
    }
}

pub struct Feed {
    pub client: RegistryClient,
    pub router: Arc<Router>,
    pub backend: SharedBackend,
    pub metrics: Arc<Metrics>,
    pub status: Arc<Mutex<FeedStatus>>,
    /// Longest long-poll wait asked of the registry.
    pub wait_secs: u64,
}

impl Feed {
    /// Run until the process stops.
    pub async fn run(self) {
        let mut backoff = Duration::from_millis(200);
        loop {
            let since = self.status.lock().expect("feed lock").revision;
            match self.client.routing(since, self.wait_secs).await {
                Ok(table) => {
                    backoff = Duration::from_millis(200);
                    self.metrics.registry_up.set(1);
                    if Some(table.revision) != since {
                        self.apply(table).await;
                    }
                    let mut s = self.status.lock().expect("feed lock");
                    s.last_ok = Some(Utc::now());
                    s.error = None;
                    s.failed_since = None;
                }
                Err(e) => {
                    self.metrics.registry_up.set(0);
                    {
                        let mut s = self.status.lock().expect("feed lock");
                        if s.error.is_none() {
                            tracing::warn!(error = %e, "registry unreachable; keeping the last routing table");
                            s.failed_since = Some(Utc::now());
                        }
                        s.error = Some(e.to_string());
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Serve the table now; pin its versions and load the missing ones in the background.
    async fn apply(&self, table: loraops_registry::api::RoutingTable) {
        let keys = wanted(&table);
        self.backend.pin(&keys);
        for k in keys {
            if self.backend.is_resident(&k) {
                continue;
            }
            let backend = self.backend.clone();
            tokio::spawn(async move {
                if let Err(e) = backend.load(k.clone()).await {
                    tracing::error!(engine = %k, error = %e, "cannot load a routed version");
                }
            });
        }
        tracing::info!(
            revision = table.revision,
            routes = table.routes.len(),
            "routing table applied"
        );
        self.metrics.routing_revision.set(table.revision);
        let rev = table.revision;
        self.router.set_table(table);
        self.status.lock().expect("feed lock").revision = Some(rev);
    }
}
