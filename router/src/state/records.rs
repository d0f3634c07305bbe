//! The records the router keeps and persists: one per pending job, per pending pipeline, and
//! per remembered outcome. Their serialized form is the durable record's rows (see
//! `persist.rs`, which versions it).

use pypelinin_common::ids::{JobId, PipelineId};
use pypelinin_common::protocol::RawFields;
use pypelinin_common::protocol::{JobState, PipelineState, PipelineStatus};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// A job as the router records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Position in the global FIFO order.
    pub seq: u64,
    /// Its worker.
    pub worker: String,
    /// `data` and the other keys `add job` sent: its body (stored in a row of its own, written
    /// once; read from the state row of a version 1 record).
    #[serde(default, skip_serializing)]
    pub fields: RawFields,
    /// Its pipeline, while that pipeline is pending.
    pub pipeline_id: Option<PipelineId>,
    /// Where it stands.
    pub state: JobState,
    /// Attempts that failed or whose lease expired.
    pub attempts: u32,
    /// While running: when its lease ends (ms since the epoch).
    pub lease_until: Option<u64>,
    /// While queued after a failure: not before this time (ms since the epoch).
    pub not_before: Option<u64>,
    /// The last error.
    pub error: Option<String>,
    /// How long its run took, once finished (seconds, as its broker reported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<f64>,
    /// The last job of its pipeline: the router ends the pipeline when the job finishes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ends_pipeline: Option<EndsPipeline>,
    /// Added as the original's pipeliner adds jobs (no pipeline id, not `subscribed`): its
    /// failure is also broadcast as `job finished` (see the `legacy` module).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub legacy: bool,
    /// Its `data` is its pipeline's data: sent as `"data from pipeline"`, or sent and equal
    /// byte for byte (as pipeliners hand every job the pipeline's data). Kept once, with the
    /// pipeline, instead of with every job, and taken from there when the job is handed out.
    /// `fields` then holds no `data`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pipeline_data: bool,
    /// Which hand-out gave it to its broker (a number the router counts up in memory; 0:
    /// none since start). Not stored.
    #[serde(skip)]
    pub handout: u64,
}

/// What the router needs to end a pipeline with its last job (`"ends pipeline"` of `add job`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndsPipeline {
    /// Seconds the pipeline had run when the job was added (the pipeliner's clock).
    pub elapsed: f64,
    /// When the job was added (ms since the epoch, the router's clock).
    pub added_at: u64,
}

/// A pipeline as the router records it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PipelineRecord {
    /// Position in the FIFO order.
    pub seq: u64,
    /// The serialized pipeline, as sent (JSON text: stored and handed out without re-encoding).
    /// With `fields`, its body (stored in a row of its own, written once; read from the state
    /// row of a version 1 record).
    #[serde(default = "no_pipeline", skip_serializing)]
    pub pipeline: Box<RawValue>,
    /// The other keys `add pipeline` sent.
    #[serde(default, skip_serializing)]
    pub fields: RawFields,
    /// Queued or running.
    pub state: PipelineState,
    /// Jobs submitted for it, in order. Not stored (a version 1 row has it): rebuilt at start
    /// from the jobs' records, each of which names its pipeline, so adding a job does not
    /// rewrite its pipeline's row.
    #[serde(default, skip_serializing)]
    pub jobs: Vec<JobId>,
    /// While running: when its lease ends (ms since the epoch).
    pub lease_until: Option<u64>,
    /// When it fails if it has not ended (ms since the epoch), from `"deadline secs"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<u64>,
    /// Times it was handed out, to any pipeliner.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub handouts: u32,
    /// The other ids it was handed out under, through `get pipeline` after its first time
    /// (see the `legacy` module).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<PipelineId>,
    /// Its data as a job's `data` (a JSON object, encoded as pipeliners encode it), once a
    /// job with large data was added to it (see [`JobRecord::pipeline_data`]). Not stored:
    /// worked out again from the pipeline when needed.
    #[serde(skip)]
    pub job_data: Option<RawFields>,
    /// Which hand-out gave it to its pipeliner, as [`JobRecord::handout`]. Not stored.
    #[serde(skip)]
    pub handout: u64,
}

/// The pipeline of a state row read alone (its body row fills it in).
fn no_pipeline() -> Box<RawValue> {
    RawValue::from_string("null".to_owned()).unwrap_or_else(|_| unreachable!("null is JSON"))
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The outcome of an ended pipeline, kept for the retention time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndedRecord {
    /// How it ended.
    pub status: PipelineStatus,
    /// When (ms since the epoch).
    pub at: u64,
    /// The client's request id of its `add pipeline`, if any.
    pub request_id: Option<String>,
}
