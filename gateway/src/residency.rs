//! Loads that happen once: concurrent requests for a version that is loading wait for the
//! same load, which runs as its own task (a request that gives up does not cancel it), and a
//! load that failed is remembered with a backoff, so requests in the meantime get its cause at
//! once instead of starting another load each.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};

/// First wait after a failed load; it doubles with each further failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(120);

type Load<V> = Shared<BoxFuture<'static, Result<V, String>>>;

enum Flight<V: Clone> {
    Loading {
        load: Load<V>,
        /// The backoff of the failure before this load, if any.
        last_backoff: Duration,
    },
    Failed {
        error: String,
        retry_at: Instant,
        backoff: Duration,
    },
}

/// In-flight and recently failed loads, by key.
pub struct Flights<K, V: Clone> {
    map: Mutex<HashMap<K, Flight<V>>>,
}

impl<K, V: Clone> Default for Flights<K, V> {
    fn default() -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl<K, V> Flights<K, V>
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// The result of loading `key`: the load in progress, the remembered failure, or a new
    /// load made from `start`.
    pub async fn run<F>(&self, key: &K, start: impl FnOnce() -> F) -> Result<V, String>
    where
        F: std::future::Future<Output = Result<V, String>> + Send + 'static,
    {
        let (load, last_backoff) = {
            let mut map = self.map.lock().expect("flights lock");
            match map.get(key) {
                Some(Flight::Loading { load, last_backoff }) => (load.clone(), *last_backoff),
                Some(Flight::Failed {
                    error, retry_at, ..
                }) if Instant::now() < *retry_at => return Err(error.clone()),
                other => {
                    let last_backoff = match other {
                        Some(Flight::Failed { backoff, .. }) => *backoff,
                        _ => Duration::ZERO,
                    };
                    let task = tokio::spawn(start());
                    let load: Load<V> = async move {
                        match task.await {
                            Ok(r) => r,
                            Err(e) => Err(format!("the load task failed: {e}")),
                        }
                    }
                    .boxed()
                    .shared();
                    map.insert(
                        key.clone(),
                        Flight::Loading {
                            load: load.clone(),
                            last_backoff,
                        },
                    );
                    (load, last_backoff)
                }
            }
        };
        let res = load.clone().await;
        // Whoever sees the load end first records how it ended.
        let mut map = self.map.lock().expect("flights lock");
        let ours = matches!(map.get(key), Some(Flight::Loading { load: l, .. }) if l.ptr_eq(&load));
        if ours {
            match &res {
                Ok(_) => {
                    map.remove(key);
                }
                Err(error) => {
                    let backoff = if last_backoff.is_zero() {
                        FIRST_BACKOFF
                    } else {
                        (last_backoff * 2).min(MAX_BACKOFF)
                    };
                    map.insert(
                        key.clone(),
                        Flight::Failed {
                            error: error.clone(),
                            retry_at: Instant::now() + backoff,
                            backoff,
                        },
                    );
                }
            }
        }
        res
    }

    /// Forget a remembered failure (an operator asked for the load explicitly).
    pub fn forget_failure(&self, key: &K) {
        let mut map = self.map.lock().expect("flights lock");
        if matches!(map.get(key), Some(Flight::Failed { .. })) {
            map.remove(key);
        }
    }

    /// Keys loading now.
    pub fn loading(&self) -> Vec<K> {
        self.map
            .lock()
            .expect("flights lock")
            .iter()
            .filter(|(_, f)| matches!(f, Flight::Loading { .. }))
            .map(|(k, _)| k.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn concurrent_requests_share_one_load_and_failures_are_remembered() {
        let flights: Flights<&str, u32> = Flights::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let start = |ok: bool| {
            let calls = calls.clone();
            move || async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                if ok {
                    Ok(7)
                } else {
                    Err("disk on fire".to_string())
                }
            }
        };
        let (a, b) = tokio::join!(
            flights.run(&"v1", start(true)),
            flights.run(&"v1", start(true))
        );
        assert_eq!((a, b), (Ok(7), Ok(7)));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(
            flights.run(&"v2", start(false)).await,
            Err("disk on fire".into())
        );
        // Within the backoff the failure answers without a new load.
        assert_eq!(
            flights.run(&"v2", start(true)).await,
            Err("disk on fire".into())
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        flights.forget_failure(&"v2");
        assert_eq!(flights.run(&"v2", start(true)).await, Ok(7));
    }

    #[tokio::test]
    async fn a_request_that_gives_up_does_not_cancel_the_load() {
        let flights: Arc<Flights<&str, u32>> = Arc::default();
        let done = Arc::new(AtomicUsize::new(0));
        let d = done.clone();
        let slow = move || async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            d.fetch_add(1, Ordering::SeqCst);
            Ok(1)
        };
        let f = flights.clone();
        let first = tokio::spawn(async move { f.run(&"v", slow).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        first.abort();
        let again = flights.run(&"v", || async { Ok(2) }).await;
        assert_eq!(again, Ok(1), "the second request waited for the first load");
        assert_eq!(done.load(Ordering::SeqCst), 1);
    }
}
