//! The broker's settings (`[broker]` table, `PYPELININ_*` environment, flags).

use serde::{Deserialize, Serialize};

use crate::process::ProcessWorker;
use crate::worker::CommandWorker;

/// Settings of a broker. Every field has a default.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct BrokerSettings {
    /// The router's API endpoint (`PYPELININ_API`).
    pub api: String,
    /// The router's broadcast endpoint (`PYPELININ_BROADCAST`).
    pub broadcast: String,
    /// Jobs run at once; 0 means one per CPU core (`PYPELININ_CONCURRENCY`).
    pub concurrency: usize,
    /// Jobs a broker takes ahead of its free slots while its jobs are short (a mean under
    /// 100 ms), so the next ones are at hand when a slot frees and one round trip carries many
    /// (`PYPELININ_PREFETCH`; `None`: 64). With longer jobs it takes none ahead, so they stay
    /// in the queue for brokers that are free.
    pub prefetch: Option<usize>,
    /// The longest a job may run unless its worker says otherwise, in seconds.
    pub job_timeout_secs: f64,
    /// How often to ask for jobs when no broadcast came (broadcasts can be missed), in seconds.
    pub poll_interval_secs: f64,
    /// How long running jobs may take to finish after Ctrl-C/SIGTERM, in seconds.
    pub shutdown_grace_secs: f64,
    /// How long to wait for the router to accept a connection, in seconds.
    pub connect_timeout_secs: f64,
    /// How long to wait for a reply from the router, in seconds.
    pub request_timeout_secs: f64,
    /// How often to renew the leases of running jobs, in seconds (keep it well under the
    /// router's `job_lease_secs`).
    pub lease_renew_secs: f64,
    /// The cluster token (`[cluster] token` or `PYPELININ_TOKEN`), when the router requires one.
    pub token: Option<String>,
    /// Command workers (`[[broker.command_workers]]` tables): one new process per job.
    pub command_workers: Vec<CommandWorker>,
    /// Process workers (`[[broker.process_workers]]` tables): pools of long-lived processes.
    pub process_workers: Vec<ProcessWorker>,
}

impl Default for BrokerSettings {
    fn default() -> Self {
        Self {
            api: pypelinin_common::DEFAULT_API.to_owned(),
            broadcast: pypelinin_common::DEFAULT_BROADCAST.to_owned(),
            concurrency: 0,
            prefetch: None,
            job_timeout_secs: 600.0,
            poll_interval_secs: 5.0,
            shutdown_grace_secs: 30.0,
            connect_timeout_secs: 5.0,
            request_timeout_secs: 10.0,
            lease_renew_secs: 5.0,
            token: None,
            command_workers: Vec::new(),
            process_workers: Vec::new(),
        }
    }
}

impl BrokerSettings {
    /// The concurrency to use: the setting, or the number of CPU cores.
    pub fn effective_concurrency(&self) -> usize {
        if self.concurrency > 0 {
            self.concurrency
        } else {
            std::thread::available_parallelism().map_or(1, usize::from)
        }
    }
}

impl BrokerSettings {
    /// Jobs taken ahead of free slots while jobs are short: the setting, or 64.
    pub fn effective_prefetch(&self) -> usize {
        self.prefetch.unwrap_or(64)
    }
}

impl pypelinin_common::daemon::config::DaemonSettings for BrokerSettings {
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
