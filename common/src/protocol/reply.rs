//! Replies from the router's API socket.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::cluster::{ClusterStatus, PipelineDetails, PipelineList};
use super::duration::WireDuration;
use super::raw::RawFields;
use super::request::RequestError;
use crate::ids::{JobId, PipelineId};

/// The `"answer"` of a reply, in the legacy spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AnswerKind {
    /// `add job` queued the job.
    #[serde(rename = "job accepted")]
    JobAccepted,
    /// `add pipeline` queued the pipeline.
    #[serde(rename = "pipeline accepted")]
    PipelineAccepted,
    /// `job finished` / `pipeline finished` was recorded.
    #[serde(rename = "good job!")]
    GoodJob,
    /// `job failed` was recorded.
    #[serde(rename = "failure recorded")]
    FailureRecorded,
    /// `probe` was broadcast.
    #[serde(rename = "probe sent")]
    ProbeSent,
    /// The answer to `job status` / `pipeline status`.
    #[serde(rename = "status")]
    Status,
    /// `renew leases` was applied.
    #[serde(rename = "leases renewed")]
    LeasesRenewed,
    /// `add pipeline` refused: too many pipelines are queued; retry later.
    #[serde(rename = "queue full")]
    QueueFull,
    /// The router requires a cluster token and the request had none, or a wrong one.
    #[serde(rename = "unauthorized")]
    Unauthorized,
    /// The job id is not pending.
    #[serde(rename = "unknown job id")]
    UnknownJobId,
    /// The pipeline id is not pending.
    #[serde(rename = "unknown pipeline id")]
    UnknownPipelineId,
    /// The request had no `"command"`.
    #[serde(rename = "undefined command")]
    UndefinedCommand,
    /// The `"command"` is not known.
    #[serde(rename = "unknown command")]
    UnknownCommand,
    /// A key is missing or has the wrong type; `error` says which.
    #[serde(rename = "syntax error")]
    SyntaxError,
    /// The request was not one UTF-8 JSON object; `error` says why.
    #[serde(rename = "malformed request")]
    MalformedRequest,
    /// The pipeline of `add pipeline` is not a valid DAG; `error` says why.
    #[serde(rename = "invalid pipeline")]
    InvalidPipeline,
    /// Extension: `cancel pipeline` cancelled the pipeline.
    #[serde(rename = "pipeline cancelled")]
    PipelineCancelled,
    /// Extension: `cancel pipeline` of a pipeline that ended already; `error` says how.
    #[serde(rename = "pipeline ended")]
    PipelineEnded,
    /// Extension: the router could not make the request durable (a full or failing disk), so
    /// it is not acknowledged; `error` says why. Ask again later (the router stops, and a
    /// supervisor restarts it). As with a lost reply, the request may have reached the disk
    /// before the write failed.
    #[serde(rename = "unavailable")]
    Unavailable,
    /// Extension: the answer to `cluster status`.
    #[serde(rename = "cluster status")]
    ClusterStatus,
    /// Extension: the answer to `list pipelines`.
    #[serde(rename = "pipeline list")]
    PipelineList,
}

impl AnswerKind {
    /// Whether the answer reports a problem with the request.
    pub fn is_error(self) -> bool {
        !matches!(
            self,
            AnswerKind::JobAccepted
                | AnswerKind::PipelineAccepted
                | AnswerKind::GoodJob
                | AnswerKind::FailureRecorded
                | AnswerKind::ProbeSent
                | AnswerKind::Status
                | AnswerKind::LeasesRenewed
                | AnswerKind::PipelineCancelled
                | AnswerKind::ClusterStatus
                | AnswerKind::PipelineList
        )
    }
}

/// A reply of the `{"answer": ...}` form.
///
/// ```
/// use pypelinin_common::protocol::{Answer, AnswerKind};
/// let a = Answer::new(AnswerKind::JobAccepted).with_job_id("8e97badfa6d64d0faf032d25a6b0a127".into());
/// assert_eq!(
///     serde_json::to_string(&a).unwrap(),
///     r#"{"answer":"job accepted","job id":"8e97badfa6d64d0faf032d25a6b0a127"}"#
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    /// What happened.
    pub answer: AnswerKind,
    /// The job concerned, where there is one.
    #[serde(rename = "job id", default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<JobId>,
    /// The pipeline concerned, where there is one.
    #[serde(
        rename = "pipeline id",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub pipeline_id: Option<PipelineId>,
    /// What was wrong, for error answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `job status`: where each job stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jobs: Option<BTreeMap<JobId, JobState>>,
    /// `pipeline status`: where each pipeline stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipelines: Option<BTreeMap<PipelineId, PipelineStatus>>,
    /// Extension: `pipeline status` with `"details": true`: each pending pipeline's DAG and
    /// submitted jobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<BTreeMap<PipelineId, PipelineDetails>>,
    /// `job accepted`: the router will end the job's pipeline when the job finishes (the
    /// job was sent with `"ends pipeline"` and its pipeline is pending).
    #[serde(
        rename = "ends pipeline",
        default,
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub ends_pipeline: bool,
}

/// Where a job stands (`job status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting in the queue.
    Queued,
    /// Handed to a broker.
    Running,
    /// Finished.
    Finished,
    /// Failed for good.
    Failed,
    /// Not known (never added, or forgotten after its pipeline ended).
    Unknown,
}

/// Where a pipeline stands (`pipeline status`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PipelineStatus {
    /// The state.
    pub state: PipelineState,
    /// How long it took, once it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<WireDuration>,
    /// For a failed pipeline: the job that failed.
    #[serde(rename = "job id", default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<JobId>,
    /// For a failed pipeline: that job's worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// For a failed pipeline: the error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl PipelineStatus {
    /// A status with only a state.
    pub fn of(state: PipelineState) -> Self {
        Self {
            state,
            duration: None,
            job_id: None,
            worker: None,
            error: None,
        }
    }
}

/// The state of a pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PipelineState {
    /// Waiting for a pipeliner.
    Queued,
    /// Being walked by a pipeliner.
    Running,
    /// Every job finished.
    Finished,
    /// A job failed for good.
    Failed,
    /// Extension: cancelled by `cancel pipeline`.
    Cancelled,
    /// Not known (never added, or purged after the retention time).
    Unknown,
}

impl Answer {
    /// An answer with no ids and no error text.
    pub fn new(answer: AnswerKind) -> Self {
        Self {
            answer,
            job_id: None,
            pipeline_id: None,
            error: None,
            jobs: None,
            pipelines: None,
            details: None,
            ends_pipeline: false,
        }
    }

    /// An error answer saying what was wrong.
    pub fn error(answer: AnswerKind, error: impl Into<String>) -> Self {
        Self {
            error: Some(error.into()),
            ..Self::new(answer)
        }
    }

    /// Adds the job id.
    pub fn with_job_id(mut self, id: JobId) -> Self {
        self.job_id = Some(id);
        self
    }

    /// Adds the pipeline id.
    pub fn with_pipeline_id(mut self, id: PipelineId) -> Self {
        self.pipeline_id = Some(id);
        self
    }
}

/// A job handed out by `get job`: what `add job` received, plus its id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobAssignment {
    /// The job's id.
    #[serde(rename = "job id")]
    pub job_id: JobId,
    /// Name of the worker that runs the job.
    pub worker: String,
    /// The pipeline the job belongs to, when a pipeliner added it.
    #[serde(
        rename = "pipeline id",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub pipeline_id: Option<PipelineId>,
    /// `data` and any other keys, as `add job` sent them.
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

impl JobAssignment {
    /// The job's `data` (`null` when absent).
    pub fn data(&self) -> &Value {
        self.fields.get("data").unwrap_or(&Value::Null)
    }
}

/// `get job` as the router sends it: a [`JobAssignment`] whose `data` and other keys are still
/// the JSON text `add job` sent, so handing it out copies bytes instead of encoding a tree.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobHandout {
    /// The job's id.
    #[serde(rename = "job id")]
    pub job_id: JobId,
    /// Name of the worker that runs the job.
    pub worker: String,
    /// The pipeline the job belongs to, when a pipeliner added it.
    #[serde(
        rename = "pipeline id",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub pipeline_id: Option<PipelineId>,
    /// `data` and any other keys, as `add job` sent them.
    #[serde(flatten)]
    pub fields: RawFields,
    /// The job's `data` when the router keeps it with the job's pipeline (every job of which
    /// carried the same), not in `fields`.
    #[serde(flatten)]
    pub pipeline_data: Option<RawFields>,
}

impl JobHandout {
    /// The job's `data`, parsed (`null` when absent).
    pub fn data(&self) -> Value {
        self.pipeline_data
            .as_ref()
            .and_then(|d| d.value("data"))
            .or_else(|| self.fields.value("data"))
            .unwrap_or(Value::Null)
    }
}

/// A pipeline handed out by `get pipeline`: what `add pipeline` received, plus its id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PipelineAssignment {
    /// The pipeline's id.
    #[serde(rename = "pipeline id")]
    pub pipeline_id: PipelineId,
    /// The pipeline in the legacy serialized format.
    pub pipeline: Value,
    /// Extension: jobs of this pipeline submitted already (by a pipeliner that stopped), so the
    /// next pipeliner resumes the walk instead of starting over. Absent for a fresh pipeline.
    #[serde(
        rename = "submitted jobs",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub submitted_jobs: Vec<SubmittedJob>,
    /// Any other keys `add pipeline` sent.
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

/// `get pipeline` as the router sends it: a [`PipelineAssignment`] whose pipeline is still the
/// JSON text `add pipeline` sent, so handing it out copies bytes instead of re-encoding a tree.
#[derive(Debug, Clone, Serialize)]
pub struct PipelineHandout {
    /// The pipeline's id.
    #[serde(rename = "pipeline id")]
    pub pipeline_id: PipelineId,
    /// The pipeline in the legacy serialized format, as JSON text.
    pub pipeline: Box<RawValue>,
    /// As [`PipelineAssignment::submitted_jobs`].
    #[serde(
        rename = "submitted jobs",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub submitted_jobs: Vec<SubmittedJob>,
    /// Any other keys `add pipeline` sent.
    #[serde(flatten)]
    pub fields: RawFields,
}

impl PartialEq for PipelineHandout {
    fn eq(&self, other: &Self) -> bool {
        self.pipeline_id == other.pipeline_id
            && self.pipeline.get() == other.pipeline.get()
            && self.submitted_jobs == other.submitted_jobs
            && self.fields == other.fields
    }
}

/// A job of a pipeline that was submitted already, and where it stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubmittedJob {
    /// The job.
    #[serde(rename = "job id")]
    pub job_id: JobId,
    /// Its worker (which identifies the job within the pipeline).
    pub worker: String,
    /// Where it stands.
    pub state: JobState,
}

/// Any reply of the router.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// `{"answer": ...}`.
    Answer(Answer),
    /// The cluster configuration object, as is (no `"answer"` key).
    Configuration(Map<String, Value>),
    /// `get job`: a job, or `{"worker": null}`.
    Job(Option<JobHandout>),
    /// `get pipeline`: a pipeline, or `{"pipeline": null}`.
    Pipeline(Option<PipelineHandout>),
    /// `batch`: `{"answer": "batch", "replies": [...]}`, one reply per request.
    Batch(Vec<Reply>),
    /// `get jobs`: `{"answer": "jobs", "jobs": [...]}`, each as `get job` answers it.
    Jobs(Vec<JobHandout>),
    /// `get pipelines`: `{"answer": "pipelines", "pipelines": [...]}`, each as `get pipeline`
    /// answers it.
    Pipelines(Vec<PipelineHandout>),
    /// `cluster status`: `{"answer": "cluster status", ...}`.
    ClusterStatus(Box<ClusterStatus>),
    /// `list pipelines`: `{"answer": "pipeline list", "pipelines": [...], "more": bool}`.
    PipelineList(PipelineList),
}

impl From<Answer> for Reply {
    fn from(a: Answer) -> Self {
        Reply::Answer(a)
    }
}

impl Reply {
    /// The answer to a request that could not be decoded.
    pub fn for_error(error: &RequestError) -> Self {
        let answer = match error {
            RequestError::Malformed(e) => Answer::error(AnswerKind::MalformedRequest, e.clone()),
            RequestError::UndefinedCommand => Answer::new(AnswerKind::UndefinedCommand),
            RequestError::UnknownCommand => Answer::new(AnswerKind::UnknownCommand),
            RequestError::Syntax(e) => Answer::error(AnswerKind::SyntaxError, e.clone()),
        };
        answer.into()
    }

    /// The reply as one JSON frame.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing these types cannot fail: every map key is a string.
        let bytes = match self {
            Reply::Batch(replies) => Ok(json_list(
                br#"{"answer":"batch","replies":["#,
                replies.iter().map(Reply::encode),
            )),
            Reply::Jobs(jobs) => Ok(json_list(
                br#"{"answer":"jobs","jobs":["#,
                jobs.iter()
                    .map(|j| serde_json::to_vec(j).unwrap_or_default()),
            )),
            Reply::Pipelines(pipelines) => Ok(json_list(
                br#"{"answer":"pipelines","pipelines":["#,
                pipelines
                    .iter()
                    .map(|p| serde_json::to_vec(p).unwrap_or_default()),
            )),
            Reply::ClusterStatus(status) => serde_json::to_vec(&Tagged {
                answer: AnswerKind::ClusterStatus,
                body: status,
            }),
            Reply::PipelineList(list) => serde_json::to_vec(&Tagged {
                answer: AnswerKind::PipelineList,
                body: list,
            }),
            Reply::Answer(a) => serde_json::to_vec(a),
            Reply::Configuration(c) => serde_json::to_vec(c),
            Reply::Job(Some(j)) => serde_json::to_vec(j),
            Reply::Job(None) => Ok(br#"{"worker":null}"#.to_vec()),
            Reply::Pipeline(Some(p)) => serde_json::to_vec(p),
            Reply::Pipeline(None) => Ok(br#"{"pipeline":null}"#.to_vec()),
        };
        bytes.unwrap_or_default()
    }
}

/// A reply body with its `"answer"`.
#[derive(Serialize)]
struct Tagged<'a, T> {
    answer: AnswerKind,
    #[serde(flatten)]
    body: &'a T,
}

/// `head`, then the items separated by commas, then `]}`.
fn json_list(head: &[u8], items: impl Iterator<Item = Vec<u8>>) -> Vec<u8> {
    let mut out = head.to_vec();
    for (i, item) in items.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&item);
    }
    out.extend_from_slice(b"]}");
    out
}

/// Why a reply could not be read as the answer a client expected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReplyError {
    /// The router answered with an error (or another answer than the expected one).
    #[error("router answered {:?}{}", .0.answer, .0.error.as_deref().map(|e| format!(": {e}")).unwrap_or_default())]
    Refused(Box<Answer>),
    /// The reply is not of any known shape.
    #[error("unexpected reply from the router: {0}")]
    Unexpected(String),
}

/// A reply a client reads. One decoder serves every shape: [`decode_reply`] for the bytes of a
/// reply, [`FromReply::from_reply`] for a reply already parsed (an item of a batch reply).
///
/// ```
/// use pypelinin_common::protocol::reply::{decode_reply, FromReply};
/// use pypelinin_common::protocol::JobAssignment;
/// let none: Option<JobAssignment> = decode_reply(br#"{"worker": null}"#).unwrap();
/// assert!(none.is_none());
/// let jobs = Vec::<JobAssignment>::from_reply(serde_json::json!({"answer": "jobs", "jobs": []}));
/// assert_eq!(jobs.unwrap(), vec![]);
/// ```
pub trait FromReply: Sized {
    /// Reads `value` as this reply.
    ///
    /// # Errors
    /// [`ReplyError::Refused`] for an `{"answer": ...}` of another shape (an error answer),
    /// [`ReplyError::Unexpected`] for a value that is no known reply.
    fn from_reply(value: Value) -> Result<Self, ReplyError>;
}

/// `{"answer": ...}`.
impl FromReply for Answer {
    fn from_reply(value: Value) -> Result<Self, ReplyError> {
        plain(value)
    }
}

/// The cluster configuration (`get configuration`).
impl FromReply for Map<String, Value> {
    fn from_reply(value: Value) -> Result<Self, ReplyError> {
        plain(value)
    }
}

/// `get job`: a job, or none (`{"worker": null}`).
impl FromReply for Option<JobAssignment> {
    fn from_reply(value: Value) -> Result<Self, ReplyError> {
        if value.get("worker").is_some_and(Value::is_null) {
            return Ok(None);
        }
        plain(value).map(Some)
    }
}

/// `get pipeline`: a pipeline, or none (`{"pipeline": null}`).
impl FromReply for Option<PipelineAssignment> {
    fn from_reply(value: Value) -> Result<Self, ReplyError> {
        if value.get("pipeline").is_some_and(Value::is_null) {
            return Ok(None);
        }
        plain(value).map(Some)
    }
}

/// `get jobs`: `{"answer": "jobs", "jobs": [...]}`.
impl FromReply for Vec<JobAssignment> {
    fn from_reply(value: Value) -> Result<Self, ReplyError> {
        list(value, "jobs")
    }
}

/// `get pipelines`: `{"answer": "pipelines", "pipelines": [...]}`.
impl FromReply for Vec<PipelineAssignment> {
    fn from_reply(value: Value) -> Result<Self, ReplyError> {
        list(value, "pipelines")
    }
}

/// `batch`: `{"answer": "batch", "replies": [...]}`, one reply per request, in order (read each
/// with [`FromReply::from_reply`]). A refusal of the whole batch (`unauthorized`, `syntax
/// error`) is [`ReplyError::Refused`].
impl FromReply for Vec<Value> {
    fn from_reply(value: Value) -> Result<Self, ReplyError> {
        list(value, "replies").map_err(|e| match e {
            ReplyError::Unexpected(_) => ReplyError::Unexpected("not a batch reply".into()),
            e => e,
        })
    }
}

/// `cluster status`: `{"answer": "cluster status", ...}`.
impl FromReply for ClusterStatus {
    fn from_reply(value: Value) -> Result<Self, ReplyError> {
        tagged_reply(value, "cluster status")
    }
}

/// `list pipelines`: `{"answer": "pipeline list", ...}`.
impl FromReply for PipelineList {
    fn from_reply(value: Value) -> Result<Self, ReplyError> {
        tagged_reply(value, "pipeline list")
    }
}

/// Reads a reply whose `"answer"` is `answer` as `T`; another answer is a refusal.
fn tagged_reply<T: serde::de::DeserializeOwned>(
    value: Value,
    answer: &str,
) -> Result<T, ReplyError> {
    if value.get("answer").and_then(Value::as_str) == Some(answer) {
        return serde_json::from_value(value)
            .map_err(|e| ReplyError::Unexpected(format!("{e}: in a {answer} reply")));
    }
    match serde_json::from_value::<Answer>(value.clone()) {
        Ok(a) => Err(ReplyError::Refused(Box::new(a))),
        Err(_) => Err(ReplyError::Unexpected(format!(
            "not a {answer} reply: {value}"
        ))),
    }
}

/// Reads the bytes of a reply as `T` (see [`FromReply`]).
///
/// # Errors
/// As [`FromReply::from_reply`]; [`ReplyError::Unexpected`] for bytes that are not JSON.
pub fn decode_reply<T: FromReply>(bytes: &[u8]) -> Result<T, ReplyError> {
    T::from_reply(parse(bytes)?)
}

/// A reply as JSON.
fn parse(bytes: &[u8]) -> Result<Value, ReplyError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ReplyError::Unexpected(format!("{e}: {}", String::from_utf8_lossy(bytes))))
}

/// Reads a reply as `T`; an `{"answer": ...}` that is not a `T` becomes [`ReplyError::Refused`].
fn plain<T: DeserializeOwned>(value: Value) -> Result<T, ReplyError> {
    match serde_json::from_value::<T>(value.clone()) {
        Ok(t) => Ok(t),
        Err(e) => match serde_json::from_value::<Answer>(value.clone()) {
            Ok(a) => Err(ReplyError::Refused(Box::new(a))),
            Err(_) => Err(ReplyError::Unexpected(format!("{e}: {value}"))),
        },
    }
}

/// Reads `{"answer": key, key: [...]}` as a list of `T`.
fn list<T: DeserializeOwned>(mut value: Value, key: &str) -> Result<Vec<T>, ReplyError> {
    let answer = if key == "replies" { "batch" } else { key };
    if value.get("answer").and_then(Value::as_str) == Some(answer) {
        if let Some(list @ Value::Array(_)) = value.get_mut(key).map(Value::take) {
            return serde_json::from_value(list)
                .map_err(|e| ReplyError::Unexpected(format!("{e}: in a {answer} reply")));
        }
    }
    match serde_json::from_value::<Answer>(value.clone()) {
        Ok(a) => Err(ReplyError::Refused(Box::new(a))),
        Err(_) => Err(ReplyError::Unexpected(format!(
            "not a {answer} reply: {value}"
        ))),
    }
}

/// Reads an `{"answer": ...}` reply and checks it is `expected`.
///
/// # Errors
/// [`ReplyError::Refused`] when the answer is another one.
pub fn expect_answer(bytes: &[u8], expected: AnswerKind) -> Result<Answer, ReplyError> {
    check_answer(decode_reply(bytes)?, expected)
}

/// As [`expect_answer`], for a reply already parsed.
///
/// # Errors
/// As [`expect_answer`].
pub fn expect_answer_value(value: Value, expected: AnswerKind) -> Result<Answer, ReplyError> {
    check_answer(Answer::from_reply(value)?, expected)
}

fn check_answer(answer: Answer, expected: AnswerKind) -> Result<Answer, ReplyError> {
    if answer.answer == expected {
        Ok(answer)
    } else {
        Err(ReplyError::Refused(Box::new(answer)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn empty_queues_answer_like_the_legacy_router() {
        assert_eq!(Reply::Job(None).encode(), br#"{"worker":null}"#);
        assert_eq!(Reply::Pipeline(None).encode(), br#"{"pipeline":null}"#);
        assert_eq!(
            decode_reply::<Option<JobAssignment>>(br#"{"worker": null}"#),
            Ok(None)
        );
        assert_eq!(
            decode_reply::<Option<PipelineAssignment>>(br#"{"pipeline": null}"#),
            Ok(None)
        );
    }

    /// The job the router hands out, and the job a client reads.
    fn job(id: &str, pipeline_id: Option<&str>, fields: Value) -> (JobHandout, JobAssignment) {
        let fields = fields.as_object().cloned().unwrap();
        let handout = JobHandout {
            job_id: id.into(),
            worker: "Upper".into(),
            pipeline_id: pipeline_id.map(Into::into),
            fields: fields.clone().into(),
            pipeline_data: None,
        };
        let read = JobAssignment {
            job_id: id.into(),
            worker: "Upper".into(),
            pipeline_id: pipeline_id.map(Into::into),
            fields,
        };
        (handout, read)
    }

    #[test]
    fn job_assignment_hands_back_every_key() {
        let (handout, job) = job(
            "j1",
            None,
            json!({"data": {"filename": "a.json"}, "extra": 1}),
        );
        let bytes = Reply::Job(Some(handout)).encode();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            v,
            json!({"worker": "Upper", "data": {"filename": "a.json"}, "extra": 1, "job id": "j1"})
        );
        assert_eq!(decode_reply::<Option<JobAssignment>>(&bytes), Ok(Some(job)));
    }

    #[test]
    fn several_jobs_or_pipelines_come_as_a_list() {
        let job = |id: &str| job(id, Some("p"), json!({"data": {"n": 1}}));
        let bytes = Reply::Jobs(vec![job("j1").0, job("j2").0]).encode();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["answer"], "jobs");
        assert_eq!(v["jobs"][1]["job id"], "j2");
        assert_eq!(
            decode_reply::<Vec<JobAssignment>>(&bytes),
            Ok(vec![job("j1").1, job("j2").1])
        );
        assert_eq!(
            Reply::Jobs(vec![]).encode(),
            br#"{"answer":"jobs","jobs":[]}"#
        );
        assert_eq!(
            decode_reply::<Vec<JobAssignment>>(br#"{"answer":"jobs","jobs":[]}"#),
            Ok(vec![])
        );

        let handout = PipelineHandout {
            pipeline_id: "p1".into(),
            pipeline: RawValue::from_string(r#"[["graph",[]]]"#.into()).unwrap(),
            submitted_jobs: vec![],
            fields: RawFields::new(),
        };
        let bytes = Reply::Pipelines(vec![handout]).encode();
        let got = decode_reply::<Vec<PipelineAssignment>>(&bytes).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].pipeline_id, "p1".into());
        assert_eq!(got[0].pipeline, json!([["graph", []]]));

        let refused = br#"{"answer":"syntax error","error":"get jobs takes at most 10000"}"#;
        assert!(matches!(
            decode_reply::<Vec<JobAssignment>>(refused),
            Err(ReplyError::Refused(a)) if a.answer == AnswerKind::SyntaxError
        ));
        assert!(matches!(
            decode_reply::<Vec<PipelineAssignment>>(br#"{"answer":"jobs","jobs":[]}"#),
            Err(ReplyError::Unexpected(_))
        ));
    }

    #[test]
    fn error_answers_become_refusals() {
        let bytes = Reply::Answer(Answer::error(
            AnswerKind::SyntaxError,
            "missing field `worker`",
        ))
        .encode();
        assert_eq!(
            String::from_utf8(bytes.clone()).unwrap(),
            r#"{"answer":"syntax error","error":"missing field `worker`"}"#
        );
        let err = decode_reply::<Option<JobAssignment>>(&bytes).unwrap_err();
        assert!(matches!(err, ReplyError::Refused(a) if a.answer == AnswerKind::SyntaxError));
        let err =
            expect_answer(br#"{"answer": "unknown job id"}"#, AnswerKind::GoodJob).unwrap_err();
        assert!(err.to_string().contains("UnknownJobId"), "{err}");
        assert!(matches!(
            decode_reply::<Option<JobAssignment>>(b"nonsense"),
            Err(ReplyError::Unexpected(_))
        ));
    }

    #[test]
    fn batch_replies_nest_each_reply_as_it_would_be_alone() {
        let reply = Reply::Batch(vec![
            Reply::Job(None),
            Answer::new(AnswerKind::GoodJob).into(),
            Reply::for_error(&RequestError::UnknownCommand),
        ]);
        let bytes = reply.encode();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            v,
            json!({"answer": "batch", "replies": [
                {"worker": null}, {"answer": "good job!"}, {"answer": "unknown command"}
            ]})
        );
        let items = decode_reply::<Vec<Value>>(&bytes).unwrap();
        assert_eq!(
            Option::<JobAssignment>::from_reply(items[0].clone()),
            Ok(None)
        );
        assert!(expect_answer_value(items[1].clone(), AnswerKind::GoodJob).is_ok());
        assert!(matches!(
            expect_answer_value(items[2].clone(), AnswerKind::GoodJob),
            Err(ReplyError::Refused(a)) if a.answer == AnswerKind::UnknownCommand
        ));
        assert_eq!(
            Reply::Batch(Vec::new()).encode(),
            br#"{"answer":"batch","replies":[]}"#
        );
        assert!(matches!(
            decode_reply::<Vec<Value>>(br#"{"answer": "unauthorized"}"#),
            Err(ReplyError::Refused(a)) if a.answer == AnswerKind::Unauthorized
        ));
        assert!(matches!(
            decode_reply::<Vec<Value>>(br#"{"worker": null}"#),
            Err(ReplyError::Unexpected(_))
        ));
    }
}
