//! What the router knows of the cluster as a whole: the daemons that identify themselves
//! ([`Peer`]), the answer to `cluster status` ([`ClusterStatus`]) and the jobs of one pipeline
//! (`pipeline status` with `"details": true`, [`JobDetail`]).
//!
//! None of it is persisted: after a router restart, daemons identify themselves again within
//! seconds and the counters start from zero.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::reply::{JobState, PipelineStatus};
use crate::ids::{JobId, PipelineId};

/// What kind of daemon a [`Peer`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerRole {
    /// Runs jobs.
    Broker,
    /// Walks pipelines.
    Pipeliner,
}

/// A broker or pipeliner as it identifies itself: the `"peer"` key of its `renew leases`,
/// sent every couple of seconds. A few hundred bytes.
///
/// ```
/// use pypelinin_common::protocol::cluster::{Peer, PeerRole};
/// let peer = Peer::new(PeerRole::Broker, vec!["Upper".into()]);
/// assert_eq!(peer.pid, std::process::id());
/// let text = serde_json::to_string(&peer).unwrap();
/// assert!(text.contains(r#""role":"broker""#), "{text}");
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Peer {
    /// Unique for the life of the process: `<host>-<pid>-<random>`.
    pub id: String,
    /// Broker or pipeliner.
    pub role: PeerRole,
    /// The host name.
    pub host: String,
    /// The process id.
    pub pid: u32,
    /// The workers a broker offers (empty for a pipeliner).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workers: Vec<String>,
    /// Jobs a broker runs, pipelines a pipeliner walks, now.
    #[serde(default)]
    pub running: usize,
    /// Jobs a broker can run at once (0 for a pipeliner).
    #[serde(default)]
    pub slots: usize,
    /// Its latest monitoring figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<PeerLoad>,
}

impl Peer {
    /// This process, as a `role` offering `workers`, with a fresh id.
    pub fn new(role: PeerRole, workers: Vec<String>) -> Self {
        let host = host_name();
        let pid = std::process::id();
        let random = uuid::Uuid::new_v4().simple().to_string();
        Self {
            id: format!("{host}-{pid}-{}", &random[..8]),
            role,
            host,
            pid,
            workers,
            running: 0,
            slots: 0,
            load: None,
        }
    }
}

/// The host name of this machine (`HOSTNAME`, `/etc/hostname`, else `localhost`).
pub fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// A daemon's monitoring figures (the process and its host).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerLoad {
    /// CPU used by the process since the previous sample, in percent of one core.
    #[serde(rename = "cpu percent")]
    pub cpu_percent: f32,
    /// The process's resident memory, in bytes.
    #[serde(rename = "resident memory")]
    pub resident_memory: u64,
    /// CPU used on the host, in percent of all its cores.
    #[serde(rename = "host cpu percent")]
    pub host_cpu_percent: f32,
    /// Memory used on the host, in bytes.
    #[serde(rename = "host memory used")]
    pub host_memory_used: u64,
    /// The host's memory, in bytes.
    #[serde(rename = "host memory total")]
    pub host_memory_total: u64,
}

/// The answer to `cluster status`: `{"answer": "cluster status", ...}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// Seconds since the router started (the counters below count from then).
    #[serde(rename = "uptime secs")]
    pub uptime_secs: f64,
    /// Every worker the router has heard of: jobs queued, running, ended.
    pub workers: BTreeMap<String, WorkerStatus>,
    /// Pipelines by state.
    pub pipelines: PipelineCounts,
    /// Brokers and pipeliners that identified themselves, newest first.
    pub peers: Vec<PeerStatus>,
    /// The last failures (jobs that failed for good, pipelines that failed), newest first.
    #[serde(rename = "recent failures")]
    pub recent_failures: Vec<RecentFailure>,
    /// What ended over the last minute.
    #[serde(rename = "last minute")]
    pub last_minute: Throughput,
    /// Workers with queued jobs that no broker asked for in `unserved_worker_warn_secs`.
    pub unserved: Vec<UnservedWorker>,
    /// `get jobs` / `get pipelines` waiting at the router for work.
    #[serde(rename = "waiting requests")]
    pub waiting_requests: usize,
}

/// The answer to `list pipelines`: `{"answer": "pipeline list", "pipelines": [...], "more":
/// bool}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PipelineList {
    /// The pipelines, newest first: running, then queued, then ended ones by when they ended.
    pub pipelines: Vec<ListedPipeline>,
    /// Whether more pipelines matched than were listed.
    pub more: bool,
}

/// One pipeline of a [`PipelineList`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListedPipeline {
    /// The pipeline.
    #[serde(rename = "pipeline id")]
    pub pipeline_id: PipelineId,
    /// Where it stands, as `pipeline status` answers it (with, for a failed one, the job that
    /// failed, its worker and error).
    #[serde(flatten)]
    pub status: PipelineStatus,
    /// For a pending one, the jobs submitted for it so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jobs: Option<usize>,
    /// For an ended one, seconds since it ended.
    #[serde(
        rename = "ended secs ago",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub ended_secs_ago: Option<f64>,
}

/// One worker's jobs (`cluster status`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// Jobs waiting in its queue.
    pub queued: usize,
    /// Jobs waiting out a back-off before a retry.
    pub delayed: usize,
    /// Jobs handed to a broker.
    pub running: usize,
    /// Jobs finished since the router started.
    pub finished: u64,
    /// Jobs failed for good since the router started.
    pub failed: u64,
    /// Attempts that failed and were retried since the router started.
    pub retried: u64,
    /// Live brokers offering it.
    pub brokers: usize,
}

/// Pipelines by state (`cluster status`): pending ones now, ended ones since the router
/// started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineCounts {
    /// Waiting for a pipeliner.
    pub queued: usize,
    /// Being walked.
    pub running: usize,
    /// Finished since the router started.
    pub finished: u64,
    /// Failed since the router started.
    pub failed: u64,
    /// Cancelled since the router started.
    pub cancelled: u64,
}

/// A peer and when it was last heard of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// What it said of itself.
    #[serde(flatten)]
    pub peer: Peer,
    /// Seconds since it last identified itself.
    #[serde(rename = "last seen secs")]
    pub last_seen_secs: f64,
    /// Not heard of within `peer_timeout_secs`: stopped, or cut off.
    pub gone: bool,
}

/// A job that failed for good, or a pipeline that failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecentFailure {
    /// Seconds ago.
    #[serde(rename = "secs ago")]
    pub secs_ago: f64,
    /// Its pipeline, if any.
    #[serde(
        rename = "pipeline id",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub pipeline_id: Option<PipelineId>,
    /// The job that failed, if any (a pipeline past its deadline names its first waiting job).
    #[serde(rename = "job id", default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<JobId>,
    /// The job's worker.
    pub worker: String,
    /// The error.
    pub error: String,
}

/// What ended over a window of time.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Throughput {
    /// The window, in seconds (shorter just after the router started).
    #[serde(rename = "window secs")]
    pub window_secs: f64,
    /// Jobs finished in it.
    #[serde(rename = "jobs finished")]
    pub jobs_finished: u64,
    /// Jobs failed for good in it.
    #[serde(rename = "jobs failed")]
    pub jobs_failed: u64,
    /// Pipelines finished in it.
    #[serde(rename = "pipelines finished")]
    pub pipelines_finished: u64,
    /// Pipelines failed or cancelled in it.
    #[serde(rename = "pipelines failed")]
    pub pipelines_failed: u64,
}

/// A worker whose jobs wait and that no broker asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnservedWorker {
    /// The worker.
    pub worker: String,
    /// Its queued jobs.
    pub jobs: usize,
    /// For how long no broker asked for it while jobs waited, in seconds.
    #[serde(rename = "waiting secs")]
    pub waiting_secs: f64,
}

/// A pending pipeline's DAG and jobs (`pipeline status` with `"details": true`, under
/// `"details"`; kept apart from [`PipelineStatus`](super::PipelineStatus), which the router
/// remembers for every ended pipeline, so that stays small).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PipelineDetails {
    /// The serialized pipeline, as `add pipeline` sent it.
    pub pipeline: serde_json::Value,
    /// Its submitted jobs, in the order they were submitted.
    pub jobs: Vec<JobDetail>,
}

/// One job of a pending pipeline (`pipeline status` with `"details": true`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobDetail {
    /// The job.
    #[serde(rename = "job id")]
    pub job_id: JobId,
    /// Its worker (which identifies the job within its pipeline).
    pub worker: String,
    /// Where it stands.
    pub state: JobState,
    /// Attempts that failed or whose lease expired.
    pub attempts: u32,
    /// How long its run took, once finished, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<f64>,
    /// The last error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
