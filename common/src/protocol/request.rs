//! Requests sent to the router's API socket.

use std::borrow::Cow;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::cluster::Peer;
use super::duration::WireDuration;
use super::raw::{self, RawFields, RawObject};
use super::reply::PipelineState;
use crate::ids::{JobId, PipelineId};

/// Declares [`Request`] with each command's wire name written once: the serde tag, the
/// [`Request::COMMANDS`] list and [`Request::command`] all come from it.
macro_rules! requests {
    ($(
        $(#[doc = $doc:literal])*
        $name:literal => $variant:ident $(($inner:ty))?,
    )*) => {
        /// A request on the router's API socket, in the legacy JSON spelling.
        ///
        /// ```
        /// use pypelinin_common::protocol::{decode_request, Request};
        /// let req = decode_request(br#"{"command": "get job"}"#).unwrap();
        /// assert!(matches!(req, Request::GetJob(_)));
        /// assert_eq!(req.encode(), br#"{"command":"get job"}"#);
        /// ```
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "command")]
        pub enum Request {
            $(
                $(#[doc = $doc])*
                #[serde(rename = $name)]
                $variant $(($inner))?,
            )*
        }

        impl Request {
            /// Every command name this router understands.
            pub const COMMANDS: &'static [&'static str] = &[$($name),*];

            /// The command name as sent on the wire.
            pub fn command(&self) -> &'static str {
                match self {
                    $(requests!(@pattern $variant $(($inner))?) => $name,)*
                }
            }
        }
    };
    (@pattern $variant:ident ($inner:ty)) => { Request::$variant(_) };
    (@pattern $variant:ident) => { Request::$variant };
}

requests! {
    /// Asks for the cluster configuration (the router's TOML file as JSON).
    "get configuration" => GetConfiguration,
    /// Queues a job.
    "add job" => AddJob(NewJob),
    /// Takes the oldest queued job (of the given workers, when the broker names them).
    "get job" => GetJob(GetJob),
    /// Reports a job done.
    "job finished" => JobFinished(JobFinished),
    /// Reports that a job failed, with the error.
    "job failed" => JobFailed(JobFailed),
    /// Queues a pipeline.
    "add pipeline" => AddPipeline(NewPipeline),
    /// Takes the oldest queued pipeline.
    "get pipeline" => GetPipeline,
    /// Extension: takes up to `max` of the oldest queued jobs at once, as that many `get job`
    /// would; answers `{"answer": "jobs", "jobs": [...]}` (an empty list when none is queued).
    "get jobs" => GetJobs(GetJobs),
    /// Extension: takes up to `max` of the oldest queued pipelines at once, as that many
    /// `get pipeline` would; answers `{"answer": "pipelines", "pipelines": [...]}`.
    "get pipelines" => GetPipelines(GetPipelines),
    /// Reports a pipeline done.
    "pipeline finished" => PipelineFinished(PipelineFinished),
    /// Extension: reports that a pipeline cannot finish because one of its jobs failed.
    "pipeline failed" => PipelineFailed(PipelineFailed),
    /// Extension: renews the leases of jobs a broker runs and pipelines a pipeliner walks.
    "renew leases" => RenewLeases(RenewLeases),
    /// Extension: asks where jobs stand (to re-sync after missed broadcasts).
    "job status" => JobStatus(JobStatusQuery),
    /// Extension: asks where pipelines stand (finished ones are kept for a retention time).
    "pipeline status" => PipelineStatus(PipelineStatusQuery),
    /// Extension: asks the router to broadcast `probe: <token>`, so a subscriber can tell when
    /// its subscription is live.
    "probe" => Probe(Probe),
    /// Extension: cancels a pending pipeline: its queued and delayed jobs are removed, results
    /// of its running jobs are ignored when they arrive, it ends in state `cancelled`
    /// (durably), and `pipeline cancelled: id=<id>` is broadcast so brokers stop its jobs.
    "cancel pipeline" => CancelPipeline(CancelPipeline),
    /// Extension: asks what the router knows of the cluster: jobs per worker, pipelines by
    /// state, the brokers and pipeliners heard of, recent failures, the last minute's
    /// throughput and the workers nobody serves; answers `{"answer": "cluster status", ...}`
    /// ([`crate::protocol::cluster::ClusterStatus`]).
    "cluster status" => ClusterStatus,
    /// Extension: lists pipelines, newest first (running, then queued, then ended ones by when
    /// they ended), optionally of one state or whose id starts with a prefix; answers
    /// `{"answer": "pipeline list", "pipelines": [...], "more": bool}`
    /// ([`crate::protocol::cluster::PipelineList`]).
    "list pipelines" => ListPipelines(ListPipelines),
    /// Extension: several requests in one round trip. The router handles them in order, with
    /// nothing in between, and writes their changes in one durable write; it answers
    /// `{"answer": "batch", "replies": [...]}`, one reply per request, each what the request
    /// alone would have got.
    "batch" => Batch(Batch),
}

impl Request {
    /// The request as one JSON frame.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing these types cannot fail: every map key is a string.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// `add job`: the worker to run and everything else the client sent (`data` and any other
/// keys), which the router hands back verbatim with `get job`.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    /// Name of the worker that runs the job.
    pub worker: String,
    /// Extension: the pipeline the job belongs to (sent by pipeliners). The router then keeps
    /// the job's state with the pipeline's, so another pipeliner can resume the pipeline.
    pub pipeline_id: Option<PipelineId>,
    /// Extension: this job is the last of its pipeline (every other job of it has finished),
    /// and the pipeline had run this long when it was submitted. The router then ends the
    /// pipeline itself when the job finishes — `pipeline finished` in the same write, without
    /// another round trip of the pipeliner — and says so with `"ends pipeline": true` in
    /// `job accepted`. Only with `pipeline id`.
    pub ends_pipeline: Option<WireDuration>,
    /// Extension: the adder subscribed to the job's end before adding it, and hears `job
    /// failed` (ours always say so; [`NewJob::new`] sets it). Without it — as the original's
    /// pipeliner adds jobs — the router holds the end of a job without a pipeline until that
    /// adder can have subscribed, and broadcasts its failure as `job finished` too
    /// (docs/protocol.md, "Mixing legacy and new daemons").
    pub subscribed: bool,
    /// Extension: the job's `data` is its pipeline's, which the router has, so it is sent as
    /// `"data from pipeline": true` instead of the data (see [`NewJob::with_data_from_pipeline`]).
    /// The data stays in `fields` on this side: against the original's router, which does
    /// not know the key, the job is sent with it.
    pub data_from_pipeline: bool,
    /// `data` and any other keys, kept as sent (as JSON text).
    pub fields: RawFields,
}

/// Written as the router reads it: the command's own keys, then `fields` — without `data`
/// when the data is the pipeline's.
impl Serialize for NewJob {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("worker", &self.worker)?;
        if let Some(p) = &self.pipeline_id {
            map.serialize_entry("pipeline id", p)?;
        }
        if let Some(e) = &self.ends_pipeline {
            map.serialize_entry("ends pipeline", e)?;
        }
        if self.subscribed {
            map.serialize_entry("subscribed", &true)?;
        }
        if self.data_from_pipeline {
            map.serialize_entry(NewJob::DATA_FROM_PIPELINE, &true)?;
        }
        for (k, v) in self.fields.iter() {
            if !(self.data_from_pipeline && k == "data") {
                map.serialize_entry(k, v)?;
            }
        }
        map.end()
    }
}

impl NewJob {
    /// A job for `worker` with `data` (which may be `null`).
    pub fn new(worker: impl Into<String>, data: Value) -> Self {
        Self::with_raw_data(worker, raw::raw(&data))
    }

    /// A job for `worker` whose `data` is the JSON text `data` (encoded once, however many
    /// jobs carry it).
    pub fn with_raw_data(worker: impl Into<String>, data: Box<RawValue>) -> Self {
        let mut fields = RawFields::new();
        fields.insert_raw("data", data);
        Self {
            worker: worker.into(),
            pipeline_id: None,
            ends_pipeline: None,
            subscribed: true,
            data_from_pipeline: false,
            fields,
        }
    }

    /// The key of [`NewJob::data_from_pipeline`] on the wire.
    pub const DATA_FROM_PIPELINE: &'static str = "data from pipeline";

    /// Data at least this large goes as [`NewJob::with_data_from_pipeline`] when it is the
    /// pipeline's; smaller data costs less to send than to look up.
    pub const DATA_FROM_PIPELINE_MIN_BYTES: usize = 1024;

    /// The same job, its `data` being its pipeline's, byte for byte as [`NewJob::new`] encodes
    /// the pipeline's data: sent as `"data from pipeline": true` instead, and the router hands
    /// the job out with the pipeline's data (which it has), so large data crosses the network
    /// once per pipeline rather than once per job. Only with [`NewJob::in_pipeline`].
    pub fn with_data_from_pipeline(mut self) -> Self {
        self.data_from_pipeline = true;
        self
    }

    /// The same job, as part of `pipeline_id`.
    pub fn in_pipeline(mut self, pipeline_id: PipelineId) -> Self {
        self.pipeline_id = Some(pipeline_id);
        self
    }

    /// The same job, as the last of its pipeline, which had run for `elapsed` (see
    /// [`NewJob::ends_pipeline`]).
    pub fn ending_pipeline(mut self, elapsed: std::time::Duration) -> Self {
        self.ends_pipeline = Some(WireDuration::from(elapsed));
        self
    }

    /// Reads the keys of an `add job` read in one pass: its own keys are parsed, the others
    /// kept as text.
    fn from_raw(mut object: RawObject<'_>) -> Result<Self, RequestError> {
        let worker = take::<String>(&mut object, "worker")?
            .ok_or_else(|| RequestError::Syntax("missing field `worker`".into()))?;
        Ok(Self {
            worker,
            pipeline_id: take::<Option<PipelineId>>(&mut object, "pipeline id")?.flatten(),
            ends_pipeline: take::<Option<WireDuration>>(&mut object, "ends pipeline")?.flatten(),
            subscribed: take::<bool>(&mut object, "subscribed")?.unwrap_or(false),
            data_from_pipeline: take::<bool>(&mut object, NewJob::DATA_FROM_PIPELINE)?
                .unwrap_or(false),
            fields: RawFields::from_pairs(object.0),
        })
    }
}

/// Deserialized through a [`Value`] map (inside a tagged enum serde cannot hold raw text); the
/// router reads requests with [`decode_request`], which keeps the text without this detour.
impl<'de> Deserialize<'de> for NewJob {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Parsed {
            worker: String,
            #[serde(rename = "pipeline id", default)]
            pipeline_id: Option<PipelineId>,
            #[serde(rename = "ends pipeline", default)]
            ends_pipeline: Option<WireDuration>,
            #[serde(default)]
            subscribed: bool,
            #[serde(rename = "data from pipeline", default)]
            data_from_pipeline: bool,
            #[serde(flatten)]
            fields: Map<String, Value>,
        }
        let p = Parsed::deserialize(deserializer)?;
        Ok(Self {
            worker: p.worker,
            pipeline_id: p.pipeline_id,
            ends_pipeline: p.ends_pipeline,
            subscribed: p.subscribed,
            data_from_pipeline: p.data_from_pipeline,
            fields: p.fields.into(),
        })
    }
}

/// Takes `key` out of `object`, parsed as a `T` (a wrong type is a syntax error, worded as
/// serde words it).
fn take<T: DeserializeOwned>(
    object: &mut RawObject<'_>,
    key: &str,
) -> Result<Option<T>, RequestError> {
    object
        .take(key)
        .map(|raw| {
            serde_json::from_str(raw.get()).map_err(|e| {
                let e = e.to_string();
                let e = e.rfind(" at line ").map_or(&*e, |at| &e[..at]);
                RequestError::Syntax(format!("\"{key}\": {e}"))
            })
        })
        .transpose()
}

/// `get job`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GetJob {
    /// Extension: only jobs of these workers. Absent (legacy) means any job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<Vec<String>>,
}

/// `get jobs`: up to `max` jobs in one request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GetJobs {
    /// Only jobs of these workers; absent means any job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<Vec<String>>,
    /// Jobs to take at most (at most [`GetJobs::MAX`]; fewer once the answer carries 4 MiB
    /// of jobs' data).
    pub max: usize,
    /// Extension: when no job is queued, wait at the router up to this long (at most
    /// [`GetJobs::MAX_WAIT_MS`]) and get the first jobs queued meanwhile, instead of an empty
    /// answer at once. Ignored inside a `batch`.
    #[serde(rename = "wait ms", default, skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
    /// Extension: who asks, and the number of this ask; see [`Ask`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asker: Option<Ask>,
}

/// Extension, `"asker": {"id": I, "ask": N}` on `get jobs` and `get pipelines`: the asking
/// daemon (an id it draws at start) and the number of this ask (1, 2, ... in the order it
/// asks). The router notes what it hands out under it; a `renew leases` that says the asks
/// up to N are settled ([`Settled`]) and does not list a job or pipeline handed out under
/// them gives that work back to the queue at once: its answer never reached the daemon (the
/// daemon gave the request up, as across a network partition).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ask {
    /// The daemon's id for this run.
    pub id: String,
    /// The ask's number.
    pub ask: u64,
}

/// Extension, `"asker": {"id": I, "settled": N}` on `renew leases`: the daemon has taken in
/// or given up the answer of each of its asks numbered up to N, and the renewal lists every
/// job and pipeline it still holds. See [`Ask`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settled {
    /// The daemon's id for this run.
    pub id: String,
    /// Its asks up to this number are settled.
    pub settled: u64,
}

impl GetJobs {
    /// The largest `max` accepted; a larger one is refused with `syntax error`.
    pub const MAX: usize = 10_000;
    /// The longest wait the router grants; a longer `wait ms` waits this long.
    pub const MAX_WAIT_MS: u64 = 60_000;

    /// Up to `max` jobs of `workers` (any worker when `None`), answered at once.
    pub fn new(workers: Option<Vec<String>>, max: usize) -> Self {
        Self {
            workers,
            max,
            wait_ms: None,
            asker: None,
        }
    }
}

/// `get pipelines`: up to `max` pipelines in one request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GetPipelines {
    /// Pipelines to take at most (at most [`GetJobs::MAX`]; fewer once the answer carries
    /// 4 MiB of pipelines).
    pub max: usize,
    /// Extension: as [`GetJobs::wait_ms`], for pipelines.
    #[serde(rename = "wait ms", default, skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
    /// Extension: who asks, and the number of this ask; see [`Ask`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asker: Option<Ask>,
}

impl GetPipelines {
    /// Up to `max` pipelines, answered at once.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            wait_ms: None,
            asker: None,
        }
    }
}

/// `job finished`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobFinished {
    /// The job that finished.
    #[serde(rename = "job id")]
    pub job_id: JobId,
    /// How long it ran, in seconds.
    pub duration: WireDuration,
}

/// `job failed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobFailed {
    /// The job that failed.
    #[serde(rename = "job id")]
    pub job_id: JobId,
    /// What went wrong, for the user.
    #[serde(default)]
    pub error: String,
    /// How long it ran before failing, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<WireDuration>,
}

/// `add pipeline`: the serialized pipeline and any other keys, handed back verbatim.
#[derive(Debug, Clone, Serialize)]
pub struct NewPipeline {
    /// The pipeline in the legacy serialized format (see [`crate::pipeline`]), as JSON text.
    pub pipeline: Box<RawValue>,
    /// Any other keys, kept as sent (as JSON text).
    #[serde(flatten)]
    pub fields: RawFields,
}

impl NewPipeline {
    /// `pipeline` (the legacy serialized form, [`crate::pipeline::Pipeline::to_legacy`]), with
    /// no other key.
    pub fn new(pipeline: &Value) -> Self {
        Self {
            pipeline: raw::raw(pipeline),
            fields: RawFields::new(),
        }
    }

    /// The same, with these other keys.
    pub fn with_fields(mut self, fields: impl Into<RawFields>) -> Self {
        self.fields = fields.into();
        self
    }

    /// Reads the keys of an `add pipeline` read in one pass.
    fn from_raw(mut object: RawObject<'_>) -> Result<Self, RequestError> {
        let pipeline = object
            .take("pipeline")
            .ok_or_else(|| RequestError::Syntax("missing field `pipeline`".into()))?;
        Ok(Self {
            pipeline: pipeline.to_owned(),
            fields: RawFields::from_pairs(object.0),
        })
    }
}

impl PartialEq for NewPipeline {
    fn eq(&self, other: &Self) -> bool {
        self.pipeline.get() == other.pipeline.get() && self.fields == other.fields
    }
}

/// As [`NewJob`]'s: through a [`Value`] map.
impl<'de> Deserialize<'de> for NewPipeline {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Parsed {
            pipeline: Value,
            #[serde(flatten)]
            fields: Map<String, Value>,
        }
        let p = Parsed::deserialize(deserializer)?;
        Ok(Self::new(&p.pipeline).with_fields(p.fields))
    }
}

/// `pipeline finished`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PipelineFinished {
    /// The pipeline that finished.
    #[serde(rename = "pipeline id")]
    pub pipeline_id: PipelineId,
    /// How long it took, in seconds.
    pub duration: WireDuration,
}

/// `cancel pipeline`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelPipeline {
    /// The pipeline to cancel.
    #[serde(rename = "pipeline id")]
    pub pipeline_id: PipelineId,
}

/// `list pipelines`.
///
/// ```
/// use pypelinin_common::protocol::request::ListPipelines;
/// use pypelinin_common::protocol::{decode_request, PipelineState, Request};
/// let req = decode_request(br#"{"command": "list pipelines", "state": "failed", "limit": 20}"#).unwrap();
/// let Request::ListPipelines(list) = req else { panic!() };
/// assert_eq!(list.state, Some(PipelineState::Failed));
/// assert_eq!((list.limit, list.id_prefix), (20, None));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListPipelines {
    /// Only the pipelines in this state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<PipelineState>,
    /// Only the pipelines whose id starts with this.
    #[serde(rename = "id prefix", default, skip_serializing_if = "Option::is_none")]
    pub id_prefix: Option<String>,
    /// At most this many (default 50; more than [`ListPipelines::MAX`] lists that many).
    #[serde(default = "ListPipelines::default_limit")]
    pub limit: usize,
}

impl ListPipelines {
    /// The most pipelines one answer lists.
    pub const MAX: usize = 1000;

    fn default_limit() -> usize {
        50
    }
}

/// `pipeline failed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PipelineFailed {
    /// The pipeline that cannot finish.
    #[serde(rename = "pipeline id")]
    pub pipeline_id: PipelineId,
    /// The job that failed.
    #[serde(rename = "job id")]
    pub job_id: JobId,
    /// That job's worker.
    pub worker: String,
    /// What went wrong.
    pub error: String,
    /// How long the pipeline ran, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<WireDuration>,
}

/// `renew leases`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RenewLeases {
    /// Jobs the sender runs.
    #[serde(rename = "job ids", default, skip_serializing_if = "Vec::is_empty")]
    pub job_ids: Vec<JobId>,
    /// Pipelines the sender walks.
    #[serde(
        rename = "pipeline ids",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub pipeline_ids: Vec<PipelineId>,
    /// Extension: who sends it (brokers and pipeliners say so every couple of seconds); the
    /// router lists them in `cluster status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<Box<Peer>>,
    /// Extension: the asks of the sender that are settled; the lists above are then all it
    /// holds. See [`Ask`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asker: Option<Settled>,
}

impl RenewLeases {
    /// Whether it renews nothing, identifies no one and settles no ask.
    pub fn is_empty(&self) -> bool {
        self.job_ids.is_empty()
            && self.pipeline_ids.is_empty()
            && self.peer.is_none()
            && self.asker.is_none()
    }
}

/// `job status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStatusQuery {
    /// The jobs asked about.
    #[serde(rename = "job ids")]
    pub job_ids: Vec<JobId>,
}

/// `pipeline status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PipelineStatusQuery {
    /// The pipelines asked about.
    #[serde(rename = "pipeline ids")]
    pub pipeline_ids: Vec<PipelineId>,
    /// Extension: also the serialized pipeline and its submitted jobs (worker, state,
    /// attempts, duration, error) of each pending pipeline.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub details: bool,
}

/// `probe`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    /// Echoed in the `probe: <token>` broadcast.
    pub token: String,
}

/// `batch`: the requests, each a complete request object (batches do not nest).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Batch {
    /// The requests, in the order the router handles them, each as its JSON text.
    pub requests: Vec<Box<RawValue>>,
}

impl PartialEq for Batch {
    fn eq(&self, other: &Self) -> bool {
        self.requests.len() == other.requests.len()
            && self
                .requests
                .iter()
                .zip(&other.requests)
                .all(|(a, b)| a.get() == b.get())
    }
}

/// As [`NewJob`]'s: through [`Value`]s.
impl<'de> Deserialize<'de> for Batch {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Parsed {
            requests: Vec<Value>,
        }
        let p = Parsed::deserialize(deserializer)?;
        Ok(Self {
            requests: p.requests.iter().map(raw::raw).collect(),
        })
    }
}

impl Batch {
    /// Requests in one batch, at most; a larger batch is refused with `syntax error`.
    pub const MAX_REQUESTS: usize = 10_000;

    /// A batch of `requests`.
    pub fn of<'a>(requests: impl IntoIterator<Item = &'a Request>) -> Self {
        Self {
            // Serializing a request cannot fail: every map key is a string.
            requests: requests
                .into_iter()
                .map(|r| serde_json::value::to_raw_value(r).unwrap_or_else(|_| raw::null()))
                .collect(),
        }
    }

    /// The command of each request (`None` for one without a readable command), read lazily:
    /// each request's text is scanned when its command is asked for.
    pub fn commands(&self) -> impl Iterator<Item = Option<String>> + '_ {
        #[derive(Deserialize)]
        struct Command {
            command: String,
        }
        self.requests.iter().map(|text| {
            serde_json::from_str::<Command>(text.get())
                .ok()
                .map(|c| c.command)
        })
    }

    /// Decodes each request on its own, so one bad request is answered with its error and the
    /// others still run. A nested batch is a syntax error.
    pub fn decode(self) -> Vec<Result<Request, RequestError>> {
        self.requests
            .iter()
            .map(|text| {
                let object = serde_json::from_str::<RawObject<'_>>(text.get()).map_err(|_| {
                    RequestError::Malformed("each request of a batch must be a JSON object".into())
                })?;
                match dispatch(object)? {
                    Request::Batch(_) => Err(RequestError::Syntax(
                        "a batch cannot contain a batch".into(),
                    )),
                    request => Ok(request),
                }
            })
            .collect()
    }
}

/// Why a request could not be decoded; each maps to one legacy error answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RequestError {
    /// Not one UTF-8 JSON object in one frame.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// A JSON object without a `"command"` key.
    #[error("undefined command")]
    UndefinedCommand,
    /// A `"command"` this router does not know.
    #[error("unknown command")]
    UnknownCommand,
    /// A known command with missing or mistyped keys.
    #[error("syntax error: {0}")]
    Syntax(String),
}

/// The key of the cluster token in a request.
pub const CLUSTER_TOKEN: &str = "cluster token";

/// A request frame read as a JSON object, with the [`CLUSTER_TOKEN`] it carried taken out:
/// a router that requires a token checks it ([`RequestFrame::token`]) before it looks at
/// anything else of the request, then [`decodes`](RequestFrame::decode) it.
///
/// The frame is read in one pass that keeps each value as its text in the frame; decoding
/// parses the keys of the command and keeps the others (`data`, ...) as text.
pub struct RequestFrame<'a> {
    object: RawObject<'a>,
    token: Option<String>,
}

impl<'a> RequestFrame<'a> {
    /// Reads `bytes` as one JSON object.
    ///
    /// # Errors
    /// [`RequestError::Malformed`] for bytes that are not one UTF-8 JSON object.
    pub fn read(bytes: &'a [u8]) -> Result<Self, RequestError> {
        let mut object = decode_object(bytes)?;
        let token = object
            .take(CLUSTER_TOKEN)
            .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok());
        Ok(Self { object, token })
    }

    /// The cluster token the frame carried, if any.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// The request.
    ///
    /// # Errors
    /// As [`decode_request`].
    pub fn decode(self) -> Result<Request, RequestError> {
        dispatch(self.object)
    }
}

/// Decodes one request frame, also returning the [`CLUSTER_TOKEN`] it carried (removed from
/// the request), for routers that require a cluster token.
///
/// # Errors
/// As [`decode_request`].
pub fn decode_request_with_token(bytes: &[u8]) -> Result<(Request, Option<String>), RequestError> {
    let frame = RequestFrame::read(bytes)?;
    let token = frame.token.clone();
    Ok((frame.decode()?, token))
}

/// Decodes one request frame.
///
/// # Errors
/// [`RequestError::Malformed`] for bytes that are not one UTF-8 JSON object;
/// [`RequestError::UndefinedCommand`] when `"command"` is missing;
/// [`RequestError::UnknownCommand`] when it is not a known command name;
/// [`RequestError::Syntax`] when a known command lacks a key or has one of the wrong type, or
/// a value is past its limit (see [`Limits`]).
pub fn decode_request(bytes: &[u8]) -> Result<Request, RequestError> {
    RequestFrame::read(bytes)?.decode()
}

fn decode_object(bytes: &[u8]) -> Result<RawObject<'_>, RequestError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| RequestError::Malformed(format!("request is not UTF-8: {e}")))?;
    serde_json::from_str(text).map_err(|e| match e.classify() {
        // Well-formed JSON, but not an object.
        serde_json::error::Category::Data => {
            RequestError::Malformed("request must be a JSON object".into())
        }
        _ => RequestError::Malformed(format!("request is not JSON: {e}")),
    })
}

fn dispatch(mut object: RawObject<'_>) -> Result<Request, RequestError> {
    let command = match object.take("command") {
        None => return Err(RequestError::UndefinedCommand),
        Some(raw) => match serde_json::from_str::<Cow<'_, str>>(raw.get()) {
            Ok(c) if Request::COMMANDS.contains(&&*c) => c,
            _ => return Err(RequestError::UnknownCommand),
        },
    };
    // A token inside a request (of a batch) is never kept with it, stored or handed out.
    object.take(CLUSTER_TOKEN);
    let request = match &*command {
        "add job" => Request::AddJob(NewJob::from_raw(object)?),
        "add pipeline" => Request::AddPipeline(NewPipeline::from_raw(object)?),
        "batch" => {
            let requests = take::<Vec<Box<RawValue>>>(&mut object, "requests")?
                .ok_or_else(|| RequestError::Syntax("missing field `requests`".into()))?;
            Request::Batch(Batch { requests })
        }
        // The others are small: read through serde, the command first.
        _ => {
            let entries = std::iter::once(("command", &*command))
                .map(|(k, c)| (Cow::Borrowed(k), Entry::Command(c)))
                .chain(object.0.into_iter().map(|(k, v)| (k, Entry::Raw(v))));
            let map = serde::de::value::MapDeserializer::new(entries);
            Request::deserialize(map)
                .map_err(|e: serde_json::Error| RequestError::Syntax(e.to_string()))?
        }
    };
    Limits::apply(request)
}

/// A value of a request read in one pass: the command's name, or any other value's text.
enum Entry<'a> {
    Command(&'a str),
    Raw(&'a RawValue),
}

impl<'de> serde::de::IntoDeserializer<'de, serde_json::Error> for Entry<'de> {
    type Deserializer = EntryDeserializer<'de>;

    fn into_deserializer(self) -> Self::Deserializer {
        EntryDeserializer(self)
    }
}

/// Deserializes an [`Entry`].
struct EntryDeserializer<'a>(Entry<'a>);

impl<'de> Deserializer<'de> for EntryDeserializer<'de> {
    type Error = serde_json::Error;

    fn deserialize_any<V: serde::de::Visitor<'de>>(
        self,
        visitor: V,
    ) -> Result<V::Value, serde_json::Error> {
        match self.0 {
            Entry::Command(c) => visitor.visit_borrowed_str(c),
            Entry::Raw(raw) => raw.deserialize_any(visitor),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct enum identifier ignored_any
    }
}

/// The limits the router puts on what it stores, broadcasts and logs.
#[derive(Debug)]
pub struct Limits;

impl Limits {
    /// Worker names (in `add job`, `get job`, `get jobs`, `pipeline failed`) and probe tokens:
    /// at most this many bytes, and no control characters.
    pub const MAX_NAME_BYTES: usize = 256;
    /// Error texts of `job failed` and `pipeline failed`: longer ones are cut to this many bytes
    /// (their end is dropped).
    pub const MAX_ERROR_BYTES: usize = 64 * 1024;

    /// `request` within the limits: error texts cut, names checked ([`decode_request`] applies
    /// them; this is for a request decoded otherwise).
    ///
    /// # Errors
    /// [`RequestError::Syntax`] for a name past its limit or with control characters.
    pub fn apply(request: Request) -> Result<Request, RequestError> {
        let name = |what: &str, value: &str| {
            if value.len() > Self::MAX_NAME_BYTES {
                Err(RequestError::Syntax(format!(
                    "{what} is {} bytes long; at most {} are allowed",
                    value.len(),
                    Self::MAX_NAME_BYTES
                )))
            } else if value.chars().any(char::is_control) {
                Err(RequestError::Syntax(format!(
                    "{what} must not contain control characters"
                )))
            } else {
                Ok(())
            }
        };
        let workers = |workers: &Option<Vec<String>>| {
            workers
                .iter()
                .flatten()
                .try_for_each(|w| name("a worker name", w))
        };
        match request {
            Request::AddJob(ref job) => name("\"worker\"", &job.worker)?,
            Request::GetJob(ref get) => workers(&get.workers)?,
            Request::GetJobs(ref get) => workers(&get.workers)?,
            Request::Probe(ref probe) => name("\"token\"", &probe.token)?,
            Request::JobFailed(mut failed) => {
                cut(&mut failed.error, Self::MAX_ERROR_BYTES);
                return Ok(Request::JobFailed(failed));
            }
            Request::PipelineFailed(mut failed) => {
                name("\"worker\"", &failed.worker)?;
                cut(&mut failed.error, Self::MAX_ERROR_BYTES);
                return Ok(Request::PipelineFailed(failed));
            }
            _ => {}
        }
        Ok(request)
    }
}

/// Cuts `text` to at most `max` bytes, on a character boundary.
fn cut(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn decode(v: Value) -> Result<Request, RequestError> {
        decode_request(v.to_string().as_bytes())
    }

    #[test]
    fn legacy_requests_decode() {
        let req = decode(
            json!({"command": "add job", "worker": "Upper", "data": {"filename": "a.json"}}),
        )
        .unwrap();
        let Request::AddJob(job) = req else {
            panic!("{req:?}")
        };
        assert_eq!(job.worker, "Upper");
        assert_eq!(
            job.fields.value("data"),
            Some(json!({"filename": "a.json"}))
        );
        assert!(!job.fields.contains_key("command"));

        let req =
            decode(json!({"command": "job finished", "job id": "x", "duration": 1.5, "data": 1}))
                .unwrap();
        assert_eq!(
            req,
            Request::JobFinished(JobFinished {
                job_id: "x".into(),
                duration: WireDuration::from_secs(1.5)
            })
        );
        assert_eq!(
            decode(json!({"command": "get configuration", "extra": true})).unwrap(),
            Request::GetConfiguration
        );
    }

    #[test]
    fn error_classes_follow_the_legacy_router() {
        assert_eq!(
            decode(json!({"worker": "A"})),
            Err(RequestError::UndefinedCommand)
        );
        assert_eq!(
            decode(json!({"command": "GET JOB"})),
            Err(RequestError::UnknownCommand)
        );
        assert_eq!(
            decode(json!({"command": 42})),
            Err(RequestError::UnknownCommand)
        );
        assert_eq!(
            decode(json!({"command": null})),
            Err(RequestError::UnknownCommand)
        );
        let err = decode(json!({"command": "job finished", "job id": "x"})).unwrap_err();
        assert!(
            matches!(&err, RequestError::Syntax(m) if m.contains("duration")),
            "{err:?}"
        );
        let err = decode(json!({"command": "add job"})).unwrap_err();
        assert!(
            matches!(&err, RequestError::Syntax(m) if m.contains("worker")),
            "{err:?}"
        );
        let err =
            decode(json!({"command": "job finished", "job id": 5, "duration": 1})).unwrap_err();
        assert!(matches!(err, RequestError::Syntax(_)));
    }

    #[test]
    fn the_token_is_taken_out_of_the_request() {
        let (req, token) =
            decode_request_with_token(br#"{"command": "get job", "cluster token": "s3cret"}"#)
                .unwrap();
        assert_eq!(
            (req, token.as_deref()),
            (Request::GetJob(GetJob::default()), Some("s3cret"))
        );
        let (_, token) = decode_request_with_token(br#"{"command": "get job"}"#).unwrap();
        assert_eq!(token, None);
    }

    #[test]
    fn malformed_input_is_told_apart() {
        for bad in [
            &b"\xff\xfe"[..],
            b"",
            b"{",
            b"42",
            b"null",
            b"[1,2]",
            b"\"command\"",
        ] {
            assert!(
                matches!(decode_request(bad), Err(RequestError::Malformed(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn deeply_nested_json_is_rejected_not_overflowing_the_stack() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(matches!(
            decode_request(deep.as_bytes()),
            Err(RequestError::Malformed(_))
        ));
    }

    #[test]
    fn every_request_round_trips() {
        let requests = [
            Request::GetConfiguration,
            Request::AddJob(NewJob::new("A", json!({"k": [1, 2]}))),
            Request::GetJob(GetJob::default()),
            Request::GetJob(GetJob {
                workers: Some(vec!["A".into()]),
            }),
            Request::JobFinished(JobFinished {
                job_id: "j".into(),
                duration: WireDuration::from_secs(0.5),
            }),
            Request::JobFailed(JobFailed {
                job_id: "j".into(),
                error: "boom".into(),
                duration: None,
            }),
            Request::AddPipeline(NewPipeline::new(&json!([]))),
            Request::GetPipeline,
            Request::PipelineFinished(PipelineFinished {
                pipeline_id: "p".into(),
                duration: WireDuration::from_secs(2.0),
            }),
            Request::Probe(Probe { token: "t".into() }),
            Request::AddJob(NewJob::new("A", json!(null)).in_pipeline("p".into())),
            Request::AddJob(
                NewJob::new("B", json!(1))
                    .in_pipeline("p".into())
                    .ending_pipeline(std::time::Duration::from_millis(3)),
            ),
            Request::PipelineFailed(PipelineFailed {
                pipeline_id: "p".into(),
                job_id: "j".into(),
                worker: "A".into(),
                error: "boom".into(),
                duration: None,
            }),
            Request::JobStatus(JobStatusQuery {
                job_ids: vec!["j".into()],
            }),
            Request::PipelineStatus(PipelineStatusQuery {
                pipeline_ids: vec!["p".into()],
                details: false,
            }),
            Request::PipelineStatus(PipelineStatusQuery {
                pipeline_ids: vec!["p".into()],
                details: true,
            }),
            Request::ClusterStatus,
            Request::RenewLeases(RenewLeases {
                job_ids: vec!["j".into()],
                pipeline_ids: vec![],
                peer: Some(Box::new(crate::protocol::cluster::Peer::new(
                    crate::protocol::cluster::PeerRole::Broker,
                    vec!["A".into()],
                ))),
                asker: Some(Settled {
                    id: "d1".into(),
                    settled: 7,
                }),
            }),
            Request::Batch(Batch::of(&[Request::GetPipeline])),
            Request::GetJobs(GetJobs::new(Some(vec!["A".into(), "B".into()]), 64)),
            Request::GetJobs(GetJobs {
                workers: None,
                max: 1,
                wait_ms: Some(1_000),
                asker: Some(Ask {
                    id: "d1".into(),
                    ask: 8,
                }),
            }),
            Request::GetPipelines(GetPipelines::new(256)),
            Request::GetPipelines(GetPipelines {
                max: 2,
                wait_ms: Some(5),
                asker: None,
            }),
        ];
        for req in requests {
            assert_eq!(decode_request(&req.encode()).unwrap(), req);
            assert!(Request::COMMANDS.contains(&req.command()));
        }
    }

    #[test]
    fn ends_pipeline_is_its_own_key_not_job_data() {
        let Ok(Request::AddJob(job)) = decode(json!({
            "command": "add job", "worker": "B", "data": 1,
            "pipeline id": "p", "ends pipeline": 0.25,
        })) else {
            panic!("not an add job");
        };
        assert_eq!(job.ends_pipeline, Some(WireDuration::from_secs(0.25)));
        assert!(
            !job.fields.contains_key("ends pipeline"),
            "{:?}",
            job.fields
        );
        let plain = Request::AddJob(NewJob::new("A", json!(null))).encode();
        assert!(!String::from_utf8_lossy(&plain).contains("ends pipeline"));
    }

    #[test]
    fn get_jobs_needs_a_count() {
        assert_eq!(
            decode(json!({"command": "get jobs", "workers": ["A"], "max": 3})),
            Ok(Request::GetJobs(GetJobs::new(Some(vec!["A".into()]), 3)))
        );
        assert!(matches!(
            decode(json!({"command": "get jobs"})),
            Err(RequestError::Syntax(e)) if e.contains("missing field `max`")
        ));
        for bad in [
            json!({"command": "get jobs", "max": -1}),
            json!({"command": "get pipelines", "max": "ten"}),
        ] {
            assert!(
                matches!(decode(bad.clone()), Err(RequestError::Syntax(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn batch_items_decode_one_by_one() {
        let batch = decode(json!({"command": "batch", "requests": [
            {"command": "get job"},
            {"command": "nope"},
            {"no command": 1},
            {"command": "job finished"},
            [1, 2],
            {"command": "batch", "requests": []},
            {"command": "get pipeline"},
        ]}))
        .unwrap();
        let Request::Batch(batch) = batch else {
            panic!("not a batch: {batch:?}");
        };
        let items = batch.decode();
        assert_eq!(items.len(), 7);
        assert_eq!(items[0], Ok(Request::GetJob(GetJob::default())));
        assert_eq!(items[1], Err(RequestError::UnknownCommand));
        assert_eq!(items[2], Err(RequestError::UndefinedCommand));
        assert!(matches!(items[3], Err(RequestError::Syntax(_))));
        assert!(matches!(items[4], Err(RequestError::Malformed(_))));
        assert!(matches!(&items[5], Err(RequestError::Syntax(e)) if e.contains("batch")));
        assert_eq!(items[6], Ok(Request::GetPipeline));
        assert!(matches!(
            decode(json!({"command": "batch"})),
            Err(RequestError::Syntax(_))
        ));
    }

    #[test]
    fn the_token_is_read_apart_and_never_kept_with_a_request() {
        let text = json!({"command": "batch", "cluster token": "t", "requests": [
            {"command": "add job", "worker": "A", "cluster token": "inner"}
        ]})
        .to_string();
        let frame = RequestFrame::read(text.as_bytes()).unwrap();
        assert_eq!(frame.token(), Some("t"));
        let Request::Batch(batch) = frame.decode().unwrap() else {
            panic!("not a batch")
        };
        let Ok(Request::AddJob(job)) = batch.decode().remove(0) else {
            panic!("not an add job")
        };
        assert!(!job.fields.contains_key(CLUSTER_TOKEN), "{:?}", job.fields);
        // A token is read before the command is looked at.
        let frame = RequestFrame::read(br#"{"command": "nonsense", "cluster token": "t"}"#);
        assert_eq!(frame.unwrap().token(), Some("t"));
    }

    #[test]
    fn names_past_their_limit_are_refused_and_long_errors_cut() {
        let long = "W".repeat(Limits::MAX_NAME_BYTES + 1);
        for bad in [
            json!({"command": "add job", "worker": long}),
            json!({"command": "add job", "worker": "a\nb"}),
            json!({"command": "get jobs", "workers": ["ok", "\u{1b}[31m"], "max": 1}),
            json!({"command": "probe", "token": "x".repeat(1000)}),
        ] {
            assert!(
                matches!(decode(bad.clone()), Err(RequestError::Syntax(_))),
                "{bad}"
            );
        }
        let error = "é".repeat(Limits::MAX_ERROR_BYTES);
        let Request::JobFailed(failed) =
            decode(json!({"command": "job failed", "job id": "j", "error": error})).unwrap()
        else {
            panic!("not job failed")
        };
        assert!(failed.error.len() <= Limits::MAX_ERROR_BYTES && failed.error.len() > 60_000);
        let ok = decode(json!({"command": "add job", "worker": "W".repeat(256)}));
        assert!(ok.is_ok());
    }
}
