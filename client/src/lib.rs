//! The pypelinin client: submit pipelines to a cluster and wait for them.
//!
//! ```no_run
//! use pypelinin_client::{Pipeline, PipelineManager};
//! use std::time::Duration;
//!
//! # async fn demo() -> Result<(), pypelinin_client::Error> {
//! let mut manager = PipelineManager::connect("tcp://127.0.0.1:5555", "tcp://127.0.0.1:5556").await?;
//! let pipeline = Pipeline::builder()
//!     .edges("Downloader", ["GetTextAndWords", "GetLinks"])
//!     .data(serde_json::json!({"filename": "doc-1", "url": "http://example.com"}))
//!     .build()?;
//! let id = manager.start(&pipeline).await?;
//! let seconds = manager.wait(&id).await?;
//! println!("{id} finished in {seconds} s");
//! # Ok(()) }
//! ```
//!
//! The manager subscribes to every `pipeline finished`/`pipeline failed` broadcast and checks
//! the subscription is live before it submits anything, so a pipeline that finishes at once is
//! not missed (the legacy client subscribed after submitting). It asks the router where
//! pipelines stand (`pipeline status`) when it has heard nothing for a while, so a missed
//! broadcast never leaves it waiting forever.
//!
//! Layout: [`PipelineManager`] (async), [`blocking::PipelineManager`] (for scripts), and the
//! re-exports a client needs: [`Pipeline`], [`Job`], [`save_dot`], [`PipelineId`].

pub mod blocking;

use std::collections::HashMap;
use std::time::{Duration, Instant};

pub use pypelinin_common::ids::{JobId, PipelineId};
pub use pypelinin_common::pipeline::{save_dot, Job, Pipeline, PipelineError};
pub use pypelinin_common::protocol::cluster::JobDetail;
use pypelinin_common::protocol::reply::expect_answer_value;
use pypelinin_common::protocol::request::NewPipeline;
use pypelinin_common::protocol::{
    Answer, AnswerKind, Event, JobState, PipelineState, ReplyError, Request,
};
use pypelinin_common::transport::{ApiClient, ClientError, ClientOptions, Subscriber};
use tracing::debug;

/// Why a pipeline failed: the job, its worker and the error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pipeline {pipeline_id} failed: job {job_id} ({worker}): {error}")]
pub struct PipelineFailure {
    /// The pipeline.
    pub pipeline_id: PipelineId,
    /// The job that failed.
    pub job_id: JobId,
    /// Its worker.
    pub worker: String,
    /// What went wrong.
    pub error: String,
}

/// A client failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The router could not be reached, or refused the request.
    #[error(transparent)]
    Router(#[from] ClientError),
    /// The pipeline is not valid.
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// The pipeline failed.
    #[error(transparent)]
    Failed(#[from] PipelineFailure),
    /// The router does not know the pipeline (it was never added, or its outcome was purged).
    #[error("the router does not know pipeline {0}")]
    Unknown(PipelineId),
    /// The pipeline was cancelled.
    #[error("pipeline {0} was cancelled")]
    Cancelled(PipelineId),
    /// The blocking wrapper could not start its runtime.
    #[error("cannot start a runtime")]
    Runtime(#[source] std::io::Error),
    /// These pipelines did not end in time.
    #[error("{} pipeline(s) did not end within {limit:?}", .left.len())]
    Timeout {
        /// The time limit.
        limit: Duration,
        /// The pipelines still running.
        left: Vec<PipelineId>,
    },
}

/// A job a pipeline waits for ([`PipelineManager::waiting_for`]).
#[derive(Debug, Clone, PartialEq)]
pub struct WaitingJob {
    /// The job: its id, worker, state (queued or running), attempts and last error.
    pub job: JobDetail,
    /// Live brokers offering its worker (0: none runs it).
    pub brokers: usize,
}

/// How a pipeline ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Every job finished; the pipeline took this many seconds (the pipeliner's figure).
    Finished(f64),
    /// A job failed.
    Failed(PipelineFailure),
    /// It was cancelled ([`PipelineManager::cancel`]).
    Cancelled,
    /// The router forgot the pipeline.
    Unknown,
}

/// Submits pipelines and follows them to their end.
pub struct PipelineManager {
    client: ApiClient,
    events: Subscriber,
    /// Started and not ended yet, with when we last heard of them.
    pending: HashMap<PipelineId, Instant>,
    outcomes: HashMap<PipelineId, Outcome>,
    resync_after: Duration,
}

impl PipelineManager {
    /// Connects to a router (its API and broadcast endpoints).
    ///
    /// # Errors
    /// [`Error::Router`] when the router cannot be reached within 5 s.
    pub async fn connect(api: &str, broadcast: &str) -> Result<Self, Error> {
        let token = std::env::var("PYPELININ_TOKEN").ok();
        Self::connect_with(api, broadcast, ClientOptions::default(), token).await
    }

    /// As [`PipelineManager::connect`] (which reads the cluster token from `PYPELININ_TOKEN`),
    /// with explicit timeouts and token.
    ///
    /// # Errors
    /// [`Error::Router`] when the router cannot be reached.
    pub async fn connect_with(
        api: &str,
        broadcast: &str,
        options: ClientOptions,
        token: Option<String>,
    ) -> Result<Self, Error> {
        let mut client = ApiClient::connect(api, options)
            .await
            .map_err(ClientError::from)?
            .with_token(token);
        let mut events = Subscriber::connect(
            broadcast,
            &[
                Event::PIPELINE_FINISHED,
                Event::PIPELINE_FAILED,
                Event::PIPELINE_CANCELLED,
            ],
            options.connect_timeout,
        )
        .await
        .map_err(ClientError::from)?;
        events
            .wait_live(&mut client, options.request_timeout)
            .await?;
        Ok(Self {
            client,
            events,
            pending: HashMap::new(),
            outcomes: HashMap::new(),
            resync_after: Duration::from_secs(2),
        })
    }

    /// Submits `pipeline`; returns its id.
    ///
    /// When the router's queue is full it waits and retries, and when the router does not
    /// answer (a restart) it retries with the same request id, so the pipeline is added once.
    /// Both for at most [`START_PATIENCE`].
    ///
    /// # Errors
    /// [`Error::Router`] when the router refuses the pipeline or stays unreachable or full.
    pub async fn start(&mut self, pipeline: &Pipeline) -> Result<PipelineId, Error> {
        let mut ids = self.start_many(std::slice::from_ref(pipeline)).await?;
        ids.pop().ok_or_else(|| {
            Error::Router(ReplyError::Unexpected("no pipeline id for the pipeline".into()).into())
        })
    }

    /// Submits `pipelines` in as few round trips as it can (`batch` requests of up to
    /// [`START_BATCH`] pipelines and, past the first, [`START_BATCH_BYTES`]); returns their ids
    /// in the same order. Retries as
    /// [`start`](PipelineManager::start) does; each pipeline is added once.
    ///
    /// # Errors
    /// [`Error::Router`] when the router refuses a pipeline or stays unreachable or full. The
    /// pipelines added before the error keep running, and
    /// [`wait_any`](PipelineManager::wait_any) reports them.
    pub async fn start_many(&mut self, pipelines: &[Pipeline]) -> Result<Vec<PipelineId>, Error> {
        self.start_many_within(pipelines, None).await
    }

    /// As [`start`](PipelineManager::start), with a deadline: a pipeline that has not ended
    /// `deadline` after the router took it fails, with an error that names the jobs still
    /// waiting and the workers they wait for (see docs/operations.md). The deadline is kept
    /// across router restarts.
    ///
    /// # Errors
    /// As [`start`](PipelineManager::start); a deadline of zero or over a year is refused.
    pub async fn start_with_deadline(
        &mut self,
        pipeline: &Pipeline,
        deadline: Duration,
    ) -> Result<PipelineId, Error> {
        let mut ids = self
            .start_many_within(std::slice::from_ref(pipeline), Some(deadline))
            .await?;
        ids.pop().ok_or_else(|| {
            Error::Router(ReplyError::Unexpected("no pipeline id for the pipeline".into()).into())
        })
    }

    /// As [`start_many`](PipelineManager::start_many), each pipeline with `deadline` (see
    /// [`start_with_deadline`](PipelineManager::start_with_deadline); `None`: no deadline).
    ///
    /// # Errors
    /// As [`start_many`](PipelineManager::start_many).
    pub async fn start_many_with_deadline(
        &mut self,
        pipelines: &[Pipeline],
        deadline: Option<Duration>,
    ) -> Result<Vec<PipelineId>, Error> {
        self.start_many_within(pipelines, deadline).await
    }

    async fn start_many_within(
        &mut self,
        pipelines: &[Pipeline],
        deadline: Option<Duration>,
    ) -> Result<Vec<PipelineId>, Error> {
        let mut ids = Vec::with_capacity(pipelines.len());
        let mut chunk = Vec::new();
        let mut chunk_bytes = 0;
        for p in pipelines {
            let mut fields = serde_json::Map::new();
            fields.insert("request id".into(), uuid_hex().into());
            if let Some(d) = deadline {
                fields.insert("deadline secs".into(), d.as_secs_f64().into());
            }
            let request = NewPipeline::new(&p.to_legacy()).with_fields(fields);
            let bytes = request.pipeline.get().len();
            let full = chunk.len() >= START_BATCH || chunk_bytes + bytes > START_BATCH_BYTES;
            if full && !chunk.is_empty() {
                ids.extend(self.start_chunk(std::mem::take(&mut chunk)).await?);
                chunk_bytes = 0;
            }
            chunk.push(Request::AddPipeline(request));
            chunk_bytes += bytes;
        }
        if !chunk.is_empty() {
            ids.extend(self.start_chunk(chunk).await?);
        }
        Ok(ids)
    }

    async fn start_chunk(&mut self, requests: Vec<Request>) -> Result<Vec<PipelineId>, Error> {
        let mut ids: Vec<Option<PipelineId>> = vec![None; requests.len()];
        let deadline = Instant::now() + START_PATIENCE;
        let mut backoff = Duration::from_millis(20);
        loop {
            let todo: Vec<usize> = (0..ids.len()).filter(|i| ids[*i].is_none()).collect();
            if todo.is_empty() {
                return Ok(ids.into_iter().flatten().collect());
            }
            let batch: Vec<Request> = todo.iter().map(|i| requests[*i].clone()).collect();
            let retry = match self.client.batch(&batch).await {
                Ok(replies) => {
                    let mut full = None;
                    for (i, reply) in todo.into_iter().zip(replies) {
                        match expect_answer_value(reply, AnswerKind::PipelineAccepted) {
                            Ok(Answer {
                                pipeline_id: Some(id),
                                ..
                            }) => {
                                self.pending.insert(id.clone(), Instant::now());
                                ids[i] = Some(id);
                            }
                            Ok(_) => {
                                let e = ReplyError::Unexpected(
                                    "pipeline accepted without a pipeline id".into(),
                                );
                                return Err(Error::Router(e.into()));
                            }
                            Err(e) => {
                                let e = ClientError::from(e);
                                if !is_queue_full(&e) {
                                    return Err(e.into());
                                }
                                full = Some(e);
                            }
                        }
                    }
                    full
                }
                Err(e) if e.is_transient() => Some(e),
                Err(e) => return Err(e.into()),
            };
            if let Some(e) = retry {
                if Instant::now() >= deadline {
                    return Err(e.into());
                }
                debug!(error = %e, "add pipeline will be retried");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }

    /// Cancels pipeline `id`: its jobs that wait are dropped, the results of those that run
    /// are ignored (and brokers stop them), and it ends as [`Outcome::Cancelled`].
    ///
    /// # Errors
    /// [`Error::Router`] when the router cannot be reached, or answers that the pipeline ended
    /// already (`pipeline ended`) or is not known (`unknown pipeline id`).
    pub async fn cancel(&mut self, id: &PipelineId) -> Result<(), Error> {
        self.client.cancel_pipeline(id.clone()).await?;
        Ok(())
    }

    /// What pipeline `id` waits for: its jobs still queued or running, each with its worker
    /// and how many live brokers offer that worker (0: no broker runs it, so the job waits
    /// until one does). Empty for a pipeline that ended, or whose next jobs a pipeliner has
    /// not submitted yet (a queued pipeline waits for a pipeliner).
    ///
    /// ```no_run
    /// # async fn stuck(m: &mut pypelinin_client::PipelineManager, id: pypelinin_client::PipelineId)
    /// # -> Result<(), pypelinin_client::Error> {
    /// use std::time::Duration;
    /// if m.wait_within(&id, Duration::from_secs(60)).await.is_err() {
    ///     for w in m.waiting_for(&id).await? {
    ///         if w.brokers == 0 {
    ///             eprintln!("job {} waits for worker {}, which no broker runs", w.job.job_id, w.job.worker);
    ///         }
    ///     }
    /// }
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`Error::Router`] when the router cannot be reached.
    pub async fn waiting_for(&mut self, id: &PipelineId) -> Result<Vec<WaitingJob>, Error> {
        let mut details = self.client.pipeline_details(vec![id.clone()]).await?;
        let Some((_, Some(details))) = details.remove(id) else {
            return Ok(Vec::new());
        };
        let status = self.client.cluster_status().await?;
        Ok(details
            .jobs
            .into_iter()
            .filter(|j| matches!(j.state, JobState::Queued | JobState::Running))
            .map(|job| WaitingJob {
                brokers: status.workers.get(&job.worker).map_or(0, |w| w.brokers),
                job,
            })
            .collect())
    }

    /// Pipelines started and not ended yet.
    pub fn running(&self) -> usize {
        self.pending.len()
    }

    /// Whether `id` has ended, reading the broadcasts that arrived (without waiting).
    ///
    /// # Errors
    /// [`Error::Router`] when the broadcast socket failed.
    pub async fn finished(&mut self, id: &PipelineId) -> Result<bool, Error> {
        self.read_arrived().await?;
        Ok(self.outcomes.contains_key(id))
    }

    /// The started pipelines that ended and were not waited for yet, reading the broadcasts
    /// that arrived (without waiting).
    ///
    /// # Errors
    /// [`Error::Router`] when the broadcast socket failed.
    pub async fn ended(&mut self) -> Result<Vec<(PipelineId, Outcome)>, Error> {
        self.read_arrived().await?;
        Ok(self.outcomes.drain().collect())
    }

    async fn read_arrived(&mut self) -> Result<(), Error> {
        while let Some(event) = self.events.try_recv().await {
            self.record(event.map_err(ClientError::from)?);
        }
        Ok(())
    }

    /// The outcome of an ended pipeline, once [`finished`](PipelineManager::finished) or a wait
    /// saw it.
    pub fn outcome(&self, id: &PipelineId) -> Option<&Outcome> {
        self.outcomes.get(id)
    }

    /// Waits for `id` to end; returns its duration in seconds.
    ///
    /// # Errors
    /// [`Error::Failed`] naming the failed job, its worker and the error; [`Error::Unknown`]
    /// when the router does not know the pipeline; [`Error::Router`] when it cannot be reached.
    pub async fn wait(&mut self, id: &PipelineId) -> Result<f64, Error> {
        loop {
            if let Some(outcome) = self.outcomes.remove(id) {
                return into_result(id, outcome);
            }
            if !self.pending.contains_key(id) {
                self.pending.insert(id.clone(), Instant::now());
            }
            self.next(Instant::now() + Duration::from_secs(3600))
                .await?;
        }
    }

    /// As [`wait`](PipelineManager::wait), at most `limit`.
    ///
    /// # Errors
    /// As [`wait`](PipelineManager::wait), and [`Error::Timeout`] when `id` did not end in
    /// time (it goes on running; a job of a worker no broker runs waits forever, and the
    /// router warns about such workers).
    pub async fn wait_within(&mut self, id: &PipelineId, limit: Duration) -> Result<f64, Error> {
        let mut outcomes = self.wait_all(std::slice::from_ref(id), limit).await?;
        match outcomes.pop() {
            Some(outcome) => into_result(id, outcome),
            None => Err(Error::Unknown(id.clone())),
        }
    }

    /// Waits for every pipeline of `ids` to end, at most `limit`; returns each outcome in the
    /// order of `ids`.
    ///
    /// # Errors
    /// [`Error::Timeout`] listing the pipelines still running at the limit; [`Error::Router`]
    /// when the router cannot be reached.
    pub async fn wait_all(
        &mut self,
        ids: &[PipelineId],
        limit: Duration,
    ) -> Result<Vec<Outcome>, Error> {
        let deadline = Instant::now() + limit;
        for id in ids {
            if !self.outcomes.contains_key(id) && !self.pending.contains_key(id) {
                self.pending.insert(id.clone(), Instant::now());
            }
        }
        loop {
            let left: Vec<PipelineId> = ids
                .iter()
                .filter(|id| !self.outcomes.contains_key(*id))
                .cloned()
                .collect();
            if left.is_empty() {
                return Ok(ids
                    .iter()
                    .filter_map(|id| self.outcomes.remove(id))
                    .collect());
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout { limit, left });
            }
            self.next(deadline).await?;
        }
    }

    /// Waits, at most `limit`, for the next of the started pipelines to end; `None` when none
    /// ended in time or none is running.
    ///
    /// # Errors
    /// [`Error::Router`] when the router cannot be reached.
    pub async fn wait_any(
        &mut self,
        limit: Duration,
    ) -> Result<Option<(PipelineId, Outcome)>, Error> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(id) = self.outcomes.keys().next().cloned() {
                return Ok(self.outcomes.remove(&id).map(|o| (id, o)));
            }
            if self.pending.is_empty() || Instant::now() >= deadline {
                return Ok(None);
            }
            self.next(deadline).await?;
        }
    }

    /// Waits for the next event, or resyncs when nothing came for a while; returns at
    /// `deadline` at the latest.
    async fn next(&mut self, deadline: Instant) -> Result<(), Error> {
        let wake = (Instant::now() + self.resync_after).min(deadline);
        match tokio::time::timeout_at(wake.into(), self.events.recv()).await {
            Ok(event) => {
                self.record(event.map_err(ClientError::from)?);
                Ok(())
            }
            Err(_) => match self.resync().await {
                // The router is restarting: its answers will come; keep waiting.
                Err(Error::Router(e)) if e.is_transient() => {
                    debug!(error = %e, "cannot re-sync now; will retry");
                    Ok(())
                }
                other => other,
            },
        }
    }

    fn record(&mut self, event: Event) {
        let (id, outcome) = match event {
            Event::PipelineFinished {
                pipeline_id,
                duration,
            } => {
                let secs = duration.parse().unwrap_or(0.0);
                (pipeline_id, Outcome::Finished(secs))
            }
            Event::PipelineFailed {
                pipeline_id,
                job_id,
                worker,
                error,
            } => {
                let failure = PipelineFailure {
                    pipeline_id: pipeline_id.clone(),
                    job_id,
                    worker,
                    error,
                };
                (pipeline_id, Outcome::Failed(failure))
            }
            Event::PipelineCancelled { pipeline_id } => (pipeline_id, Outcome::Cancelled),
            _ => return,
        };
        if self.pending.remove(&id).is_some() {
            self.outcomes.insert(id, outcome);
        }
    }

    /// Asks the router where the pipelines we heard nothing of for a while stand.
    async fn resync(&mut self) -> Result<(), Error> {
        let now = Instant::now();
        let stale: Vec<PipelineId> = self
            .pending
            .iter()
            .filter(|(_, at)| now.duration_since(**at) >= self.resync_after)
            .map(|(id, _)| id.clone())
            .collect();
        for chunk in stale.chunks(1000) {
            let states = self.client.pipeline_status(chunk.to_vec()).await?;
            for (id, status) in states {
                let outcome = match status.state {
                    PipelineState::Queued | PipelineState::Running => {
                        self.pending.insert(id, now);
                        continue;
                    }
                    PipelineState::Finished => {
                        Outcome::Finished(status.duration.map(|d| d.as_secs()).unwrap_or(0.0))
                    }
                    PipelineState::Failed => Outcome::Failed(PipelineFailure {
                        pipeline_id: id.clone(),
                        job_id: status.job_id.unwrap_or_else(|| JobId::from("")),
                        worker: status.worker.unwrap_or_default(),
                        error: status.error.unwrap_or_default(),
                    }),
                    PipelineState::Cancelled => Outcome::Cancelled,
                    PipelineState::Unknown => Outcome::Unknown,
                };
                debug!(pipeline_id = %id, ?outcome, "caught up on a missed broadcast");
                self.pending.remove(&id);
                self.outcomes.insert(id, outcome);
            }
        }
        Ok(())
    }
}

/// Pipelines sent in one request by [`PipelineManager::start_many`], at most.
pub const START_BATCH: usize = 500;

/// Bytes of pipelines sent in one request by [`PipelineManager::start_many`], about, at most
/// (a single larger pipeline goes alone): well under the router's default `max_request_bytes`
/// (16 MiB).
pub const START_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// How long [`PipelineManager::start`] keeps retrying while the router is full or unreachable.
pub const START_PATIENCE: Duration = Duration::from_secs(300);

fn is_queue_full(e: &ClientError) -> bool {
    matches!(e, ClientError::Reply(ReplyError::Refused(a)) if a.answer == AnswerKind::QueueFull)
}

fn uuid_hex() -> String {
    // A pipeline id is a fresh uuid4 already: reuse its generator for request ids.
    PipelineId::generate().to_string()
}

fn into_result(id: &PipelineId, outcome: Outcome) -> Result<f64, Error> {
    match outcome {
        Outcome::Finished(secs) => Ok(secs),
        Outcome::Failed(f) => Err(Error::Failed(f)),
        Outcome::Cancelled => Err(Error::Cancelled(id.clone())),
        Outcome::Unknown => Err(Error::Unknown(id.clone())),
    }
}

/// The Rust snippets of docs/operations.md and docs/tutorial.md, compiled as doctests.
#[cfg(doctest)]
mod doc_snippets {
    #[doc = include_str!("../../docs/operations.md")]
    struct Operations;
    #[doc = include_str!("../../docs/tutorial.md")]
    struct Tutorial;
}
