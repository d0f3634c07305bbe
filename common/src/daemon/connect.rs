//! Waiting for the router when a daemon starts.

use tokio_util::sync::CancellationToken;

use crate::transport::{
    ApiClient, Backoff, ClientError, ClientOptions, Subscriber, TransportError,
};

/// Connects a daemon to the router, waiting (with backoff, logging what it waits for) until
/// the router answers `get configuration`. Returns the client, a subscriber to `prefixes`, and
/// the cluster configuration; `None` if `shutdown` fires first.
pub async fn wait_for_router(
    api: &str,
    broadcast: &str,
    prefixes: &[&str],
    options: ClientOptions,
    token: Option<String>,
    shutdown: &CancellationToken,
) -> Option<(
    ApiClient,
    Subscriber,
    serde_json::Map<String, serde_json::Value>,
)> {
    let mut client = ApiClient::new(api, options).with_token(token);
    let mut backoff = Backoff::default();
    let mut attempt = 0u32;
    loop {
        let attempt_result = async {
            let configuration = client.get_configuration().await?;
            let subscriber =
                Subscriber::connect(broadcast, prefixes, options.connect_timeout).await?;
            Ok::<_, ClientError>((subscriber, configuration))
        };
        let outcome = tokio::select! {
            () = shutdown.cancelled() => return None,
            outcome = attempt_result => outcome,
        };
        match outcome {
            Ok((subscriber, configuration)) => {
                tracing::info!(api, broadcast, "connected to the router");
                return Some((client, subscriber, configuration));
            }
            Err(e) => {
                attempt += 1;
                // An unreachable tcp:// router is reported by the transport, at a growing
                // interval (`Reachability`); other failures here, at attempts 1, 2, 4, 8, ...
                let reported = api.starts_with("tcp://")
                    && matches!(e, ClientError::Transport(TransportError::Connect { .. }));
                if !reported && attempt.is_power_of_two() {
                    tracing::warn!(api, broadcast, attempt, error = %e, "still waiting for the router");
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}
