//! The router's own settings (`[router]` table, `PYPELININ_*` environment, flags).

use std::collections::HashMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::state::Policy;

/// Settings of the router daemon. Every field has a default.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
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
    /// Outcomes of ended pipelines kept at most; past it the oldest go first (memory stays
    /// flat however fast pipelines end).
    pub max_remembered_pipelines: usize,
    /// When jobs have waited this long, in seconds, for a worker that no broker asked for in
    /// that time, the router logs one warning per worker.
    pub unserved_worker_warn_secs: f64,
    /// A broker or pipeliner not heard of for this long, in seconds, is shown as gone by
    /// `cluster status` (they identify themselves every 2 s).
    pub peer_timeout_secs: f64,
    /// The lease, in seconds, of a job taken by `get job` or a pipeline taken by `get pipeline`
    /// (the legacy commands, which the original's broker and pipeliner use and which never
    /// renew a lease). 0 or less: the usual leases.
    pub legacy_lease_secs: f64,
    /// Also broadcast `pipeline finished: id=…` when a pipeline added without a request id (by
    /// the original's client, which listens for nothing else) fails or is cancelled, right after
    /// `pipeline failed` / `pipeline cancelled`, so such a client does not wait forever.
    pub legacy_end_broadcast: bool,
    /// Hold the end broadcast of work added as the original's pipeliner and client add it (a
    /// job without a pipeline id, a pipeline without a request id) until this many seconds
    /// after its `add` reply: they subscribe to that end only once they have the reply, so a
    /// job or pipeline that ends sooner would otherwise never reach them. 0: never held.
    pub legacy_subscribe_grace_secs: f64,
    /// Serve Prometheus metrics over HTTP at this address (`127.0.0.1:9555`; `--metrics`).
    /// Off when absent.
    pub metrics: Option<String>,
    /// Where the durable record lives (`PYPELININ_DATA_DIR`); `None` keeps everything in
    /// memory only (the binaries always set one unless told `--no-durability`).
    pub data_dir: Option<PathBuf>,
    /// Memory for the durable record's block cache, in MB. The router reads its record only
    /// when it starts (it keeps its state in memory), so a small cache keeps its memory flat.
    pub durable_cache_mb: usize,
    /// Attempts of a job before it fails for good.
    pub max_attempts: u32,
    /// Per-worker attempts (`[router.attempts]`, e.g. `Flaky = 5`).
    pub attempts: HashMap<String, u32>,
    /// Wait before the first retry of a failed job, in milliseconds; doubles per attempt.
    pub retry_backoff_ms: u64,
    /// How long a job handed to a broker stays leased without a renewal, in seconds.
    pub job_lease_secs: f64,
    /// How long a pipeline handed to a pipeliner stays leased without a renewal, in seconds.
    pub pipeline_lease_secs: f64,
    /// Above this many queued pipelines, `add pipeline` answers `queue full`.
    pub max_queued_pipelines: usize,
    /// The cluster token every request must carry (`[cluster] token`, `PYPELININ_TOKEN`).
    pub token: Option<String>,
    /// Refuse to start when the data dir's disk has less than this many MiB free.
    pub min_free_disk_mb: u64,
    /// Start even when the durable record lost acknowledged writes (`--accept-loss`; never
    /// from a settings file).
    #[serde(skip)]
    pub accept_loss: bool,
}

/// The default lease of work taken through the legacy commands: 6 hours. The original
/// router had no leases at all — a job whose broker died was never run again — so its users'
/// jobs may take as long as they like; 6 hours covers a long job (a big document through a
/// slow model) and still brings back, the same day, the work of a legacy broker that died.
pub const LEGACY_LEASE_SECS: f64 = 6.0 * 3600.0;

/// The default hold of a legacy end broadcast: 0.2 s after the `add` reply. The original's
/// pipeliner and client subscribe a few Python statements after reading that reply, and a
/// subscription crosses to the router in well under a millisecond on a LAN; 0.2 s also covers a
/// Python process that the scheduler set aside for a while. Only work that ends sooner is
/// delayed, by at most the rest of those 0.2 s (plus the router's 0.1 s tick).
pub const LEGACY_SUBSCRIBE_GRACE_SECS: f64 = 0.2;

impl RouterSettings {
    /// The failure, lease and load policy these settings describe.
    pub fn policy(&self) -> Policy {
        let ms = |secs: f64| (secs.max(0.0) * 1000.0) as u64;
        Policy {
            max_attempts: self.max_attempts.max(1),
            attempts_per_worker: self.attempts.clone(),
            retry_backoff_ms: self.retry_backoff_ms,
            job_lease_ms: ms(self.job_lease_secs).max(1),
            pipeline_lease_ms: ms(self.pipeline_lease_secs).max(1),
            retention_ms: ms(self.retention_secs),
            max_remembered: self.max_remembered_pipelines,
            max_queued_pipelines: self.max_queued_pipelines.max(1),
            unserved_worker_warn_ms: ms(self.unserved_worker_warn_secs).max(1),
            peer_timeout_ms: ms(self.peer_timeout_secs).max(1),
            legacy_lease_ms: (self.legacy_lease_secs > 0.0).then(|| ms(self.legacy_lease_secs)),
            legacy_end_broadcast: self.legacy_end_broadcast,
            legacy_subscribe_grace_ms: ms(self.legacy_subscribe_grace_secs),
        }
    }
}

impl Default for RouterSettings {
    fn default() -> Self {
        Self {
            api: pypelinin_common::DEFAULT_API.to_owned(),
            broadcast: pypelinin_common::DEFAULT_BROADCAST.to_owned(),
            max_request_bytes: 16 * 1024 * 1024,
            reply_timeout_ms: 1000,
            retention_secs: 300.0,
            max_remembered_pipelines: 100_000,
            unserved_worker_warn_secs: 30.0,
            peer_timeout_secs: 10.0,
            legacy_lease_secs: LEGACY_LEASE_SECS,
            legacy_end_broadcast: true,
            legacy_subscribe_grace_secs: LEGACY_SUBSCRIBE_GRACE_SECS,
            metrics: None,
            data_dir: None,
            durable_cache_mb: 8,
            max_attempts: 3,
            attempts: HashMap::new(),
            retry_backoff_ms: 500,
            job_lease_secs: 30.0,
            pipeline_lease_secs: 30.0,
            max_queued_pipelines: 100_000,
            token: None,
            accept_loss: false,
            min_free_disk_mb: 64,
        }
    }
}

impl pypelinin_common::daemon::config::DaemonSettings for RouterSettings {
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
