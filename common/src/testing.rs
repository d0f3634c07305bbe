//! Helpers for tests of the daemons (feature `test-util`): loopback endpoints and bounded waits.

use std::future::Future;
use std::time::Duration;

/// An endpoint on 127.0.0.1 with a port the OS picks at bind time.
pub const EPHEMERAL: &str = "tcp://127.0.0.1:0";

/// Awaits `fut` for at most `limit`, panicking with `what` if it does not complete in time.
pub async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}
