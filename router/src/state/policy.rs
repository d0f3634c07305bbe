//! How the router treats failures, leases and load.

use std::collections::HashMap;

/// How the router treats failures, leases and load.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Attempts of a job before it fails for good (a failure or an expired lease is one).
    pub max_attempts: u32,
    /// Per-worker overrides of `max_attempts`.
    pub attempts_per_worker: HashMap<String, u32>,
    /// Wait before the first retry; doubles with each attempt, up to 30 s.
    pub retry_backoff_ms: u64,
    /// How long a job handed to a broker stays leased without a renewal.
    pub job_lease_ms: u64,
    /// How long a pipeline handed to a pipeliner stays leased without a renewal.
    pub pipeline_lease_ms: u64,
    /// How long the outcome of an ended pipeline is kept.
    pub retention_ms: u64,
    /// Outcomes kept at most: past it the oldest are forgotten before their retention time,
    /// so memory stays flat however fast pipelines end.
    pub max_remembered: usize,
    /// Above this many queued pipelines, `add pipeline` answers `queue full`.
    pub max_queued_pipelines: usize,
    /// Jobs that waited this long for a worker no broker asked for in that time get one
    /// warning per worker in the log.
    pub unserved_worker_warn_ms: u64,
    /// A broker or pipeliner not heard of for this long is shown as gone.
    pub peer_timeout_ms: u64,
    /// The lease of work taken through the legacy commands (`get job`, `get pipeline`), whose
    /// takers (the original's broker and pipeliner) never renew: long enough that a long job
    /// is not run again. `None`: the usual leases. A renewal gives the usual lease.
    pub legacy_lease_ms: Option<u64>,
    /// A pipeline added without a request id (as the original's client adds them) that fails
    /// or is cancelled is also broadcast as `pipeline finished`, the only end that client
    /// listens for, so it does not wait forever (it learns how it ended from `pipeline
    /// status`, if it asks).
    pub legacy_end_broadcast: bool,
    /// How long after its `add` reply the end of work added as the original's pipeliner and
    /// client add it (a job without a pipeline id, a pipeline without a request id) is held
    /// back: those peers subscribe to the end only once they have the reply, so an end
    /// broadcast sooner would be missed. 0: never held.
    pub legacy_subscribe_grace_ms: u64,
}

impl Policy {
    /// The lease of a job handed out by `get job`.
    pub fn legacy_job_lease_ms(&self) -> u64 {
        self.legacy_lease_ms
            .map_or(self.job_lease_ms, |l| l.max(self.job_lease_ms))
    }

    /// The lease of a pipeline handed out by `get pipeline`.
    pub fn legacy_pipeline_lease_ms(&self) -> u64 {
        self.legacy_lease_ms
            .map_or(self.pipeline_lease_ms, |l| l.max(self.pipeline_lease_ms))
    }
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            attempts_per_worker: HashMap::new(),
            retry_backoff_ms: 500,
            job_lease_ms: 30_000,
            pipeline_lease_ms: 30_000,
            retention_ms: 300_000,
            max_remembered: 100_000,
            max_queued_pipelines: 100_000,
            unserved_worker_warn_ms: 30_000,
            peer_timeout_ms: 10_000,
            legacy_lease_ms: None,
            legacy_end_broadcast: false,
            legacy_subscribe_grace_ms: 0,
        }
    }
}
