//! Concurrency limit with a bounded queue: up to `max_concurrent` requests run, up to
//! `max_queued` more wait for a slot, and anything beyond is refused at once (429) rather than
//! piling up latency.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct Limiter {
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    max_queued: usize,
}

/// Held for the whole request, streaming included.
pub struct Permit(#[allow(dead_code)] OwnedSemaphorePermit);

impl Limiter {
    pub fn new(max_concurrent: usize, max_queued: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max_concurrent.max(1))),
            waiting: AtomicUsize::new(0),
            max_queued,
        }
    }

    /// A slot, or `None` when the queue is full.
    pub async fn acquire(&self) -> Option<Permit> {
        if let Ok(p) = self.slots.clone().try_acquire_owned() {
            return Some(Permit(p));
        }
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.max_queued {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        // Leaves the queue however the wait ends, a dropped request (client reset) included:
        // otherwise every cancelled wait would shrink the queue for good.
        let _queued = Queued(&self.waiting);
        self.slots.clone().acquire_owned().await.ok().map(Permit)
    }

    /// Requests waiting for a slot now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }
}

struct Queued<'a>(&'a AtomicUsize);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
