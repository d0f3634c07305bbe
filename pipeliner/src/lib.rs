//! The pypelinin pipeliner: walks pipeline DAGs.
//!
//! It takes pipelines from the router (`get pipeline`), submits each starter job (`add job`
//! with the pipeline's data and id), then each job as soon as all its parents have finished,
//! following `job finished` broadcasts, and reports `pipeline finished` — or `pipeline failed`
//! when a job failed. It walks many pipelines at once, and several pipeliners can share a
//! router: the router hands each pipeline to one of them.
//!
//! It subscribes to every `job finished`/`job failed` broadcast before it submits anything, so
//! a fast job's event is never missed; and because broadcasts can still be lost (a reconnect),
//! it asks the router where jobs stand (`job status`) when it has heard nothing of them for a
//! while.
//!
//! Layout: [`Pipeliner`] (the I/O loop), [`walks`] (the DAG walk, no I/O), [`settings`],
//! [`cli`].

pub mod cli;
pub mod settings;
pub mod walks;

use std::collections::VecDeque;
use std::time::Duration;

use pypelinin_common::daemon::config::secs;
use pypelinin_common::daemon::connect::wait_for_router;
use pypelinin_common::protocol::reply::{
    decode_pipelines_reply_value, decode_reply_value, expect_answer_value,
};
use pypelinin_common::protocol::request::{
    GetPipelines, NewJob, PipelineFailed, PipelineFinished, RenewLeases,
};
use pypelinin_common::protocol::PipelineAssignment;
use pypelinin_common::protocol::{
    Answer, AnswerKind, Event, JobState, PipelineState, Request, WireDuration,
};
use pypelinin_common::transport::{ApiClient, ClientError, ClientOptions, Subscriber};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use settings::PipelinerSettings;
use walks::{Action, Walks};

/// Pipelines asked for in one round trip, at most.
const FETCH_TURN: usize = 256;

/// Actions (and events read) in one batch, at most.
const MAX_BATCH: usize = 1024;

/// Round trips in one turn of the loop, at most, so it gets back to renewing leases and
/// reading events.
const TURN_ROUND_TRIPS: usize = 4;

/// Status queries ask about this many jobs at most.
const STATUS_CHUNK: usize = 1000;

/// A pipeliner ready to [`run`](Pipeliner::run).
pub struct Pipeliner {
    settings: PipelinerSettings,
}

impl Pipeliner {
    /// A pipeliner with `settings`.
    pub fn new(settings: PipelinerSettings) -> Self {
        Self { settings }
    }

    /// Runs until `shutdown` is cancelled: then it takes no new pipeline, walks the ones it
    /// holds to their end (up to the grace period) and returns.
    pub async fn run(self, shutdown: CancellationToken) {
        let s = &self.settings;
        let options = ClientOptions {
            connect_timeout: secs(s.connect_timeout_secs, Duration::from_secs(5)),
            request_timeout: secs(s.request_timeout_secs, Duration::from_secs(10)),
        };
        let prefixes = [Event::NEW_PIPELINE, Event::JOB_FINISHED, Event::JOB_FAILED];
        let Some((mut client, mut subscriber, _)) = wait_for_router(
            &s.api,
            &s.broadcast,
            &prefixes,
            options,
            s.token.clone(),
            &shutdown,
        )
        .await
        else {
            return;
        };
        // Submit nothing before the subscription is live: a fast job's event would be lost.
        while let Err(e) = subscriber
            .wait_live(&mut client, options.request_timeout)
            .await
        {
            warn!(error = %e, "waiting for the broadcast subscription");
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
        info!(max_pipelines = s.max_pipelines, "pipeliner running");
        let (asks, asked) = mpsc::channel(1);
        let (answers_tx, answers) = mpsc::channel(1);
        let waiter = ApiClient::new(s.api.clone(), options).with_token(s.token.clone());
        tokio::spawn(wait_for_pipelines(waiter, asked, answers_tx));
        let mut state = Loop {
            client,
            asks,
            waiting: None,
            wait_again_at: None,
            walks: Walks::default(),
            actions: VecDeque::new(),
            want_pipelines: true,
            max_pipelines: s.max_pipelines.max(1),
        };
        state.run(subscriber, answers, &shutdown, s).await;
    }
}

/// How long a pipeliner's `get pipelines` waits at the router when none is queued. A stopping
/// pipeliner waits for the answer (it may bring pipelines, which it then walks), so an idle
/// pipeliner stops within it.
const WAIT_FOR_PIPELINES: Duration = Duration::from_secs(1);

/// The answer to a waiting `get pipelines`.
type Waited = Result<Vec<PipelineAssignment>, ClientError>;

/// Sends each `get pipelines` that waits at the router (on a connection of its own, so the
/// walks' requests go out meanwhile) and passes its answer on.
async fn wait_for_pipelines(
    mut client: ApiClient,
    mut asks: mpsc::Receiver<usize>,
    answers: mpsc::Sender<Waited>,
) {
    while let Some(max) = asks.recv().await {
        let answer = client.wait_for_pipelines(max, WAIT_FOR_PIPELINES).await;
        if answers.send(answer).await.is_err() {
            return;
        }
    }
}

struct Loop {
    client: ApiClient,
    /// Asks [`wait_for_pipelines`] for a `get pipelines` that waits at the router.
    asks: mpsc::Sender<usize>,
    /// The pipelines a waiting `get pipelines` out now asked for. While one is out, the queue
    /// was empty when it was sent and the router hands it the next pipelines: the loop asks
    /// for none itself.
    waiting: Option<usize>,
    /// After a waiting `get pipelines` failed: not before this time.
    wait_again_at: Option<Instant>,
    walks: Walks,
    /// Requests to the router not sent yet (kept while the router is unreachable).
    actions: VecDeque<Action>,
    want_pipelines: bool,
    max_pipelines: usize,
}

impl Loop {
    async fn run(
        &mut self,
        mut subscriber: Subscriber,
        mut waited: mpsc::Receiver<Waited>,
        shutdown: &CancellationToken,
        s: &PipelinerSettings,
    ) {
        let resync_after = secs(s.resync_after_secs, Duration::from_secs(2));
        let grace = secs(s.shutdown_grace_secs, Duration::from_secs(30));
        let mut poll = tokio::time::interval(secs(s.poll_interval_secs, Duration::from_secs(5)));
        let mut resync = tokio::time::interval(resync_after);
        let mut renew = tokio::time::interval(secs(s.lease_renew_secs, Duration::from_secs(5)));
        let mut stopping: Option<Instant> = None;
        let mut retry_at: Option<Instant> = None;
        let mut backoff = Duration::from_millis(100);
        loop {
            if stopping.is_none() && shutdown.is_cancelled() {
                info!(
                    pipelines = self.walks.len(),
                    ?grace,
                    "pipeliner stopping: no new pipelines"
                );
                stopping = Some(Instant::now() + grace);
            }
            if retry_at.is_none_or(|t| Instant::now() >= t) {
                retry_at = None;
                if self.sync(stopping.is_none()).await {
                    backoff = Duration::from_millis(100);
                } else {
                    retry_at = Some(Instant::now() + backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
            if stopping.is_none() && retry_at.is_none() {
                self.wait_for_pipelines();
            }
            let idle = self.walks.is_empty() && self.actions.is_empty() && self.waiting.is_none();
            if stopping.is_some() && idle {
                info!("pipeliner stopped: every pipeline it held ended");
                return;
            }
            // More pipelines to take after a bounded turn: come straight back after one pass
            // through the events and timers below.
            // (Not a timer at `now`: tokio rounds deadlines up to the next millisecond.)
            let come_back = retry_at.is_none()
                && stopping.is_none()
                && self.want_pipelines
                && self.waiting.is_none()
                && self.walks.len() < self.max_pipelines;
            let wait_again_at = self.wait_again_at;
            tokio::select! {
                () = shutdown.cancelled(), if stopping.is_none() => {}
                () = sleep_until_opt(stopping) => {
                    warn!(pipelines = self.walks.len(), "grace period over; leaving pipelines unfinished");
                    return;
                }
                () = sleep_until_opt(retry_at) => {}
                () = sleep_until_opt(wait_again_at) => self.wait_again_at = None,
                Some(answer) = waited.recv() => self.waited(answer),
                () = std::future::ready(()), if come_back => {}
                event = subscriber.recv() => {
                    // Take every event that arrived, so their actions go out in one batch.
                    let mut event = Some(event);
                    let mut taken = 0;
                    while let Some(received) = event.take() {
                        match received {
                            Ok(received) => self.on_event(received),
                            Err(e) => {
                                warn!(error = %e, "broadcast subscription closed");
                                return;
                            }
                        }
                        taken += 1;
                        if taken < MAX_BATCH {
                            event = subscriber.try_recv().await;
                        }
                    }
                }
                _ = poll.tick() => self.want_pipelines = true,
                _ = renew.tick(), if !self.walks.is_empty() => {
                    // Heartbeat: without it the router hands our pipelines to another pipeliner.
                    let leases = RenewLeases { job_ids: Vec::new(), pipeline_ids: self.walks.ids() };
                    if let Err(e) = self.client.renew_leases(leases).await {
                        warn!(error = %e, "cannot renew pipeline leases");
                    }
                }
                _ = resync.tick() => {
                    if retry_at.is_none() && !self.resync(resync_after).await {
                        retry_at = Some(Instant::now() + backoff);
                    }
                }
            }
        }
    }

    fn on_event(&mut self, event: Event) {
        let now = std::time::Instant::now();
        let actions = match event {
            Event::NewPipeline => {
                self.want_pipelines = true;
                return;
            }
            Event::JobFinished { job_id, .. } => self.walks.job_finished(&job_id, now),
            Event::JobFailed { job_id, error } => self.walks.job_failed(&job_id, &error, now),
            _ => return,
        };
        self.actions.extend(actions);
    }

    /// Sends the queued actions and, when `fetch`, asks for pipelines while there is room: all
    /// in one `batch` per round trip, a few round trips per turn (the pipelines taken in one
    /// round trip have their first jobs submitted in the next). False when the router could
    /// not be reached (the actions are kept and sent again).
    async fn sync(&mut self, fetch: bool) -> bool {
        for _ in 0..TURN_ROUND_TRIPS {
            let walks = &self.walks;
            self.actions.retain(|a| match a {
                Action::Submit { pipeline_id, .. } => walks.contains(pipeline_id),
                _ => true,
            });
            let sent = self.actions.len().min(MAX_BATCH);
            let fetching = if fetch && self.want_pipelines && self.waiting.is_none() {
                self.room()
            } else {
                0
            };
            if sent == 0 && fetching == 0 {
                return true;
            }
            let mut requests: Vec<Request> = self.actions.iter().take(sent).map(request).collect();
            if fetching > 0 {
                requests.push(Request::GetPipelines(GetPipelines::new(fetching)));
            }
            let started = std::time::Instant::now();
            let replies = match self.client.batch(&requests).await {
                Ok(replies) => replies,
                Err(e) if e.is_transient() => {
                    warn!(error = %e, "cannot reach the router; will retry");
                    return false;
                }
                Err(e) => {
                    // Refused as a whole (a wrong cluster token): sending it again changes
                    // nothing.
                    warn!(error = %e, actions = sent, "the router refused a batch");
                    self.actions.drain(..sent);
                    self.want_pipelines = false;
                    return true;
                }
            };
            debug!(
                actions = sent,
                fetching,
                micros = started.elapsed().as_micros() as u64,
                "round trip"
            );
            let mut replies = replies.into_iter();
            let actions: Vec<Action> = self.actions.drain(..sent).collect();
            for (action, reply) in actions.into_iter().zip(replies.by_ref()) {
                self.performed(action, reply);
            }
            for reply in replies {
                match decode_pipelines_reply_value(reply) {
                    Ok(pipelines) => self.take_in(pipelines, fetching),
                    Err(e) => {
                        warn!(error = %e, "the router refused get pipelines");
                        self.want_pipelines = false;
                    }
                }
            }
        }
        true
    }

    /// Pipelines to ask for now: up to the most walked at once.
    fn room(&self) -> usize {
        self.max_pipelines
            .saturating_sub(self.walks.len())
            .min(FETCH_TURN)
    }

    /// Starts walking the pipelines the router handed out for a request of `asked`.
    fn take_in(&mut self, pipelines: Vec<PipelineAssignment>, asked: usize) {
        // Fewer than asked: the queue is empty for now.
        self.want_pipelines = pipelines.len() >= asked;
        for assignment in pipelines {
            debug!(pipeline_id = %assignment.pipeline_id, "pipeline taken");
            let actions = self.walks.start(assignment, std::time::Instant::now());
            self.actions.extend(actions);
        }
    }

    /// Sends a `get pipelines` that waits at the router when the pipeliner is idle and found the
    /// queue empty: the next pipeline queued comes straight here, without a broadcast and
    /// another request in between. (A busy pipeliner asks in its own round trips, as before.)
    fn wait_for_pipelines(&mut self) {
        let ready = self.waiting.is_none()
            && !self.want_pipelines
            && self.wait_again_at.is_none()
            && self.walks.is_empty();
        let room = self.room();
        if ready && room > 0 && self.asks.try_send(room).is_ok() {
            self.waiting = Some(room);
        }
    }

    /// Takes in the answer to the waiting `get pipelines`.
    fn waited(&mut self, answer: Waited) {
        let asked = self.waiting.take().unwrap_or(0);
        match answer {
            Ok(pipelines) => {
                debug!(
                    asked,
                    got = pipelines.len(),
                    "waiting get pipelines answered"
                );
                self.take_in(pipelines, asked);
            }
            Err(e) => {
                // Ask in the loop's own round trips (with their back-off) for a while.
                warn!(error = %e, "waiting for pipelines at the router failed");
                self.want_pipelines = true;
                self.wait_again_at = Some(Instant::now() + WAIT_FOR_PIPELINES);
            }
        }
    }

    /// Takes in the router's reply to an action.
    fn performed(&mut self, action: Action, reply: Value) {
        match action {
            Action::Submit {
                pipeline_id,
                job,
                worker,
                ..
            } => match expect_answer_value(reply, AnswerKind::JobAccepted) {
                Ok(Answer {
                    job_id: Some(job_id),
                    ends_pipeline,
                    ..
                }) => {
                    debug!(%pipeline_id, %job_id, worker, ends_pipeline, "job submitted");
                    let now = std::time::Instant::now();
                    self.walks
                        .submitted(&pipeline_id, job, job_id, ends_pipeline, now);
                }
                Ok(_) => warn!(%pipeline_id, worker, "job accepted without a job id"),
                Err(e) => warn!(%pipeline_id, worker, error = %e, "the router refused a job"),
            },
            Action::Finish {
                pipeline_id,
                duration,
            } => match decode_reply_value::<Answer>(reply) {
                Ok(a) if a.answer == AnswerKind::GoodJob => {
                    info!(%pipeline_id, secs = duration.as_secs_f64(), "pipeline finished");
                }
                Ok(a) if a.answer == AnswerKind::UnknownPipelineId => {
                    // A walk resumed from another pipeliner does not know whether the router
                    // took the end with the last job; it did, or the pipeline ended otherwise.
                    info!(%pipeline_id, "pipeline ended at the router already")
                }
                Ok(a) => {
                    warn!(%pipeline_id, answer = ?a.answer, "pipeline finished was not accepted")
                }
                Err(e) => warn!(%pipeline_id, error = %e, "the router refused pipeline finished"),
            },
            Action::Fail {
                pipeline_id,
                job_id,
                worker,
                error,
                ..
            } => {
                warn!(%pipeline_id, %job_id, worker, error, "pipeline failed");
                if let Err(e) = decode_reply_value::<Answer>(reply) {
                    warn!(%pipeline_id, error = %e, "the router refused pipeline failed");
                }
            }
        }
    }

    /// Asks where the jobs we have awaited for a while stand, and catches up on what the
    /// broadcasts did not tell; false when the router could not be reached.
    async fn resync(&mut self, older_than: Duration) -> bool {
        let Some(before) = std::time::Instant::now().checked_sub(older_than) else {
            return true;
        };
        let stale = self.walks.awaited_before(before);
        for chunk in stale.chunks(STATUS_CHUNK) {
            let states = match self.client.job_status(chunk.to_vec()).await {
                Ok(states) => states,
                Err(e) if e.is_transient() => return false,
                Err(e) => {
                    warn!(error = %e, "the router refused job status");
                    return true;
                }
            };
            let mut lost = Vec::new();
            for (job_id, state) in states {
                let now = std::time::Instant::now();
                let actions = match state {
                    JobState::Finished => self.walks.job_finished(&job_id, now),
                    JobState::Failed => self.walks.job_failed(
                        &job_id,
                        "the job failed (its broadcast was missed)",
                        now,
                    ),
                    JobState::Unknown => {
                        lost.push(job_id);
                        continue;
                    }
                    JobState::Queued | JobState::Running => continue,
                };
                if !actions.is_empty() {
                    debug!(%job_id, ?state, "caught up on a missed broadcast");
                }
                self.actions.extend(actions);
            }
            if !lost.is_empty() && !self.handle_lost(lost).await {
                return false;
            }
        }
        self.sync(false).await
    }

    /// Jobs the router does not know: drop their pipeline when the router forgot it too,
    /// else submit them again.
    async fn handle_lost(&mut self, lost: Vec<pypelinin_common::ids::JobId>) -> bool {
        let mut pipelines: Vec<_> = lost
            .iter()
            .filter_map(|j| self.walks.pipeline_of(j).cloned())
            .collect();
        pipelines.sort();
        pipelines.dedup();
        let states = match self.client.pipeline_status(pipelines).await {
            Ok(s) => s,
            Err(e) => return !e.is_transient(),
        };
        for job_id in lost {
            let Some(pipeline_id) = self.walks.pipeline_of(&job_id).cloned() else {
                continue;
            };
            match states.get(&pipeline_id).map(|s| s.state) {
                Some(PipelineState::Queued | PipelineState::Running) => {
                    warn!(%pipeline_id, %job_id, "the router lost a job; submitting it again");
                    let actions = self.walks.job_lost(&job_id);
                    self.actions.extend(actions);
                }
                _ => {
                    warn!(%pipeline_id, "the router no longer knows this pipeline; dropping it");
                    self.walks.drop_pipeline(&pipeline_id);
                }
            }
        }
        true
    }
}

/// The request an action makes.
fn request(action: &Action) -> Request {
    match action {
        Action::Submit {
            pipeline_id,
            worker,
            data,
            ends_pipeline,
            ..
        } => {
            let job = NewJob::new(worker.clone(), data.clone()).in_pipeline(pipeline_id.clone());
            Request::AddJob(match ends_pipeline {
                Some(elapsed) => job.ending_pipeline(*elapsed),
                None => job,
            })
        }
        Action::Finish {
            pipeline_id,
            duration,
        } => Request::PipelineFinished(PipelineFinished {
            pipeline_id: pipeline_id.clone(),
            duration: WireDuration::from(*duration),
        }),
        Action::Fail {
            pipeline_id,
            job_id,
            worker,
            error,
            duration,
        } => Request::PipelineFailed(PipelineFailed {
            pipeline_id: pipeline_id.clone(),
            job_id: job_id.clone(),
            worker: worker.clone(),
            error: error.clone(),
            duration: Some(WireDuration::from(*duration)),
        }),
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
