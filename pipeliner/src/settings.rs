//! The pipeliner's settings (`[pipeliner]` table, `PYPELININ_*` environment, flags).

use serde::{Deserialize, Serialize};

/// Settings of a pipeliner. Every field has a default.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct PipelinerSettings {
    /// The router's API endpoint (`PYPELININ_API`).
    pub api: String,
    /// The router's broadcast endpoint (`PYPELININ_BROADCAST`).
    pub broadcast: String,
    /// Pipelines walked at once, at most.
    pub max_pipelines: usize,
    /// How often to ask for pipelines when no broadcast came, in seconds.
    pub poll_interval_secs: f64,
    /// After this long without news of the jobs it waits for, ask the router where they stand
    /// (broadcasts can be missed), in seconds.
    pub resync_after_secs: f64,
    /// How long pipelines being walked may take to end after Ctrl-C/SIGTERM, in seconds.
    pub shutdown_grace_secs: f64,
    /// How long to wait for the router to accept a connection, in seconds.
    pub connect_timeout_secs: f64,
    /// How long to wait for a reply from the router, in seconds.
    pub request_timeout_secs: f64,
    /// How often to renew the leases of the pipelines it walks, in seconds (keep it well under
    /// the router's `pipeline_lease_secs`).
    pub lease_renew_secs: f64,
    /// The cluster token (`[cluster] token` or `PYPELININ_TOKEN`), when the router requires one.
    pub token: Option<String>,
}

impl Default for PipelinerSettings {
    fn default() -> Self {
        Self {
            api: pypelinin_common::DEFAULT_API.to_owned(),
            broadcast: pypelinin_common::DEFAULT_BROADCAST.to_owned(),
            max_pipelines: 10_000,
            poll_interval_secs: 5.0,
            resync_after_secs: 2.0,
            shutdown_grace_secs: 30.0,
            connect_timeout_secs: 5.0,
            request_timeout_secs: 10.0,
            lease_renew_secs: 5.0,
            token: None,
        }
    }
}

impl pypelinin_common::daemon::config::DaemonSettings for PipelinerSettings {
    fn api_mut(&mut self) -> &mut String {
        &mut self.api
    }

    fn broadcast_mut(&mut self) -> &mut String {
        &mut self.broadcast
    }

    fn token_mut(&mut self) -> &mut Option<String> {
        &mut self.token
    }
}
