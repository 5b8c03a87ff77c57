//! Waiting on a condition with a deadline: the only way tests synchronise with a node.

use std::future::Future;
use std::time::{Duration, Instant};

/// The first pause between two checks; it doubles up to [`MAX_POLL_INTERVAL`].
const FIRST_POLL_INTERVAL: Duration = Duration::from_millis(5);
const MAX_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Checks `condition` until it holds; panics naming `what` if `timeout` passes first.
pub async fn wait_until(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    wait_until_async(timeout, what, || std::future::ready(condition())).await
}

/// Like [`wait_until`] with an async condition (an HTTP request, a file read).
pub async fn wait_until_async<F, Fut>(timeout: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let outcome = poll_until(timeout, || {
        let check = condition();
        async move { check.await.then_some(()) }
    })
    .await;
    if outcome.is_none() {
        panic!("timed out after {timeout:?} waiting for {what}");
    }
}

/// Calls `attempt` until it returns `Some`, and returns that; `None` once `timeout` has passed.
pub async fn poll_until<T, F, Fut>(timeout: Duration, mut attempt: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut pause = FIRST_POLL_INTERVAL;
    loop {
        if let Some(value) = attempt().await {
            return Some(value);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(MAX_POLL_INTERVAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn returns_once_the_condition_holds() {
        let mut calls = 0;
        wait_until(Duration::from_secs(5), "the third call", || {
            calls += 1;
            calls == 3
        })
        .await;
        assert_eq!(calls, 3);
    }

    #[tokio::test]
    async fn gives_up_at_the_deadline() {
        let started = Instant::now();
        let got: Option<()> = poll_until(Duration::from_millis(50), || async { None }).await;
        assert!(got.is_none());
        assert!(started.elapsed() >= Duration::from_millis(50));
    }

    #[tokio::test]
    #[should_panic(expected = "waiting for nothing in particular")]
    async fn panics_naming_what_it_waited_for() {
        wait_until(Duration::from_millis(10), "nothing in particular", || false).await;
    }
}
