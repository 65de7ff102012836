//! The concurrency limiter under cancellation.

use std::time::Duration;

use loraops_gateway::limiter::Limiter;

/// Requests dropped while queued (a client that resets its connection) give their queue place
/// back; otherwise the queue would fill for good and every later request get 429.
#[tokio::test]
async fn cancelled_waits_leave_the_queue() {
    let limiter = Limiter::new(1, 2);
    let held = limiter.acquire().await.expect("a free slot");
    for _ in 0..5 {
        // Each wait is cancelled by its timeout, as actix drops a reset request's future.
        assert!(
            tokio::time::timeout(Duration::from_millis(20), limiter.acquire())
                .await
                .is_err()
        );
    }
    assert_eq!(limiter.waiting(), 0);
    let queued = tokio::spawn(async move {
        let l = limiter;
        let p = l.acquire().await;
        (p.is_some(), l)
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(held);
    let (got, limiter) = queued.await.unwrap();
    assert!(got, "a queued request gets the freed slot");
    assert_eq!(limiter.waiting(), 0);
}
