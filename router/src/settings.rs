//! The router's own settings (`[router]` table, `PYPELININ_*` environment, flags).

use serde::Deserialize;

/// Settings of the router daemon. Every field has a default.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct RouterSettings {
    /// Endpoint of the API socket (`PYPELININ_API`).
    pub api: String,
    /// Endpoint of the broadcast socket (`PYPELININ_BROADCAST`).
    pub broadcast: String,
    /// Largest request accepted, in bytes; larger ones get an error answer.
    pub max_request_bytes: usize,
    /// How long a reply may wait for a client that does not read, in milliseconds.
    pub reply_timeout_ms: u64,
    /// How long the outcome of an ended pipeline stays available to `pipeline status`, in
    /// seconds.
    pub retention_secs: f64,
}

impl Default for RouterSettings {
    fn default() -> Self {
        Self {
            api: pypelinin_common::DEFAULT_API.to_owned(),
            broadcast: pypelinin_common::DEFAULT_BROADCAST.to_owned(),
            max_request_bytes: 16 * 1024 * 1024,
            reply_timeout_ms: 1000,
            retention_secs: 300.0,
        }
    }
}
