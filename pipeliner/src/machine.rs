//! What the pipeliner does, as a [`Machine`] the shared daemon loop drives: pipelines in, the
//! requests of their walks out. No I/O.

use pypelinin_common::daemon::identity::Identity;
use pypelinin_common::protocol::cluster::{Peer, PeerRole};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::{Duration, Instant};

use pypelinin_common::daemon::runloop::Machine;
use pypelinin_common::ids::{JobId, PipelineId};
use pypelinin_common::protocol::reply::{expect_answer_value, FromReply};
use pypelinin_common::protocol::request::{
    GetPipelines, JobStatusQuery, NewJob, PipelineFailed, PipelineFinished, PipelineStatusQuery,
    RenewLeases,
};
use pypelinin_common::protocol::{
    Answer, AnswerKind, Event, JobState, PipelineAssignment, PipelineState, ReplyError, Request,
    WireDuration,
};
use serde_json::Value;
use tracing::{debug, info, warn};

use crate::walks::{Action, Walks};

/// Pipelines asked for in one round trip, at most.
const FETCH_TURN: usize = 256;

/// Status queries ask about this many jobs at most.
const STATUS_CHUNK: usize = 1000;

/// A request the pipeliner has to send.
#[derive(Debug, Clone)]
pub enum Out {
    /// A step of a walk: submit a job, end a pipeline.
    Walk(Action),
    /// `job status` of jobs not heard of for a while (their broadcast may have been missed).
    JobStatus(Vec<JobId>),
    /// `pipeline status` of the pipelines of jobs the router does not know.
    LostJobs {
        /// The jobs.
        jobs: Vec<JobId>,
        /// Their pipelines.
        pipelines: Vec<PipelineId>,
    },
    /// `pipeline status` with details of the pipelines of jobs `job status` said failed, for
    /// their errors (their `job failed` broadcast, which says it, was missed or is late).
    FailedJobs {
        /// The jobs.
        jobs: Vec<JobId>,
        /// Their pipelines.
        pipelines: Vec<PipelineId>,
    },
}

/// The pipeliner's state: the walks and the requests waiting to be sent.
pub struct PipelinerMachine {
    walks: Walks,
    outbox: VecDeque<Out>,
    max_pipelines: usize,
    /// Jobs not heard of for this long are asked after.
    resync_after: Duration,
    identity: Identity,
}

impl PipelinerMachine {
    /// Walks at most `max_pipelines` at once; asks after jobs not heard of for `resync_after`.
    pub fn new(max_pipelines: usize, resync_after: Duration) -> Self {
        Self {
            walks: Walks::default(),
            outbox: VecDeque::new(),
            max_pipelines: max_pipelines.max(1),
            resync_after,
            identity: Identity::new(Peer::new(PeerRole::Pipeliner, Vec::new())),
        }
    }

    /// The walks.
    pub fn walks(&self) -> &Walks {
        &self.walks
    }

    fn extend(&mut self, actions: Vec<Action>) {
        self.outbox.extend(actions.into_iter().map(Out::Walk));
    }

    /// Stops walking `pipeline_id`, with the submissions it still had to send.
    fn drop_walk(&mut self, pipeline_id: &PipelineId) {
        self.walks.drop_pipeline(pipeline_id);
        let walks = &self.walks;
        self.outbox.retain(|out| match out {
            Out::Walk(Action::Submit { pipeline_id, .. }) => walks.contains(pipeline_id),
            _ => true,
        });
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
                    self.walks
                        .submitted(&pipeline_id, job, job_id, ends_pipeline, Instant::now());
                }
                Ok(_) => warn!(%pipeline_id, worker, "job accepted without a job id"),
                Err(ReplyError::Refused(a)) if a.answer == AnswerKind::UnknownPipelineId => {
                    // It ended meanwhile (another pipeliner took it over after our lease
                    // lapsed, or it was ended otherwise): nothing is left to walk.
                    info!(%pipeline_id, "the pipeline is no longer pending; dropping it");
                    self.drop_walk(&pipeline_id);
                }
                Err(e) => {
                    warn!(%pipeline_id, worker, error = %e, "the router refused a job; failing its pipeline");
                    let actions = self.walks.job_refused(
                        &pipeline_id,
                        &worker,
                        &e.to_string(),
                        Instant::now(),
                    );
                    self.drop_walk(&pipeline_id);
                    self.extend(actions);
                }
            },
            Action::Finish {
                pipeline_id,
                duration,
            } => match Answer::from_reply(reply) {
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
                if let Err(e) = Answer::from_reply(reply) {
                    warn!(%pipeline_id, error = %e, "the router refused pipeline failed");
                }
            }
        }
    }

    /// Catches up on what the broadcasts did not tell, from the router's `job status`.
    fn job_states(&mut self, reply: Value) {
        let states = match expect_answer_value(reply, AnswerKind::Status) {
            Ok(answer) => answer.jobs.unwrap_or_default(),
            Err(e) => {
                warn!(error = %e, "the router refused job status");
                return;
            }
        };
        let mut lost = Vec::new();
        let mut failed = Vec::new();
        for (job_id, state) in states {
            let now = Instant::now();
            let actions = match state {
                JobState::Finished => self.walks.job_finished(&job_id, now),
                JobState::Failed => {
                    // Its pipeline fails with the job's error: asked for first.
                    failed.push(job_id);
                    continue;
                }
                JobState::Unknown => {
                    lost.push(job_id);
                    continue;
                }
                JobState::Queued | JobState::Running => continue,
            };
            if !actions.is_empty() {
                debug!(%job_id, ?state, "caught up on a missed broadcast");
            }
            self.extend(actions);
        }
        if !lost.is_empty() {
            let pipelines = self.pipelines_of(&lost);
            self.outbox.push_back(Out::LostJobs {
                jobs: lost,
                pipelines,
            });
        }
        if !failed.is_empty() {
            let pipelines = self.pipelines_of(&failed);
            self.outbox.push_back(Out::FailedJobs {
                jobs: failed,
                pipelines,
            });
        }
    }

    /// The pipelines of `jobs`, each once.
    fn pipelines_of(&self, jobs: &[JobId]) -> Vec<PipelineId> {
        let mut pipelines: Vec<PipelineId> = jobs
            .iter()
            .filter_map(|j| self.walks.pipeline_of(j).cloned())
            .collect();
        pipelines.sort();
        pipelines.dedup();
        pipelines
    }

    /// Jobs `job status` said failed: each fails its pipeline with the error the router kept
    /// (unless its broadcast ended the walk meanwhile).
    fn failed_jobs(&mut self, failed: Vec<JobId>, reply: Value) {
        let details = match expect_answer_value(reply, AnswerKind::Status) {
            Ok(answer) => answer.details.unwrap_or_default(),
            Err(e) => {
                warn!(error = %e, "the router refused pipeline status");
                Default::default()
            }
        };
        for job_id in failed {
            let error = self
                .walks
                .pipeline_of(&job_id)
                .and_then(|p| details.get(p))
                .and_then(|d| d.jobs.iter().find(|j| j.job_id == job_id))
                .and_then(|j| j.error.clone())
                .unwrap_or_else(|| "the job failed (its broadcast was missed)".to_owned());
            let actions = self.walks.job_failed(&job_id, &error, Instant::now());
            if !actions.is_empty() {
                debug!(%job_id, "caught up on a missed job failed");
            }
            self.extend(actions);
        }
    }

    /// Jobs the router does not know: drop their pipeline when the router forgot it too, else
    /// submit them again.
    fn lost_jobs(&mut self, lost: Vec<JobId>, reply: Value) {
        let states = match expect_answer_value(reply, AnswerKind::Status) {
            Ok(answer) => answer.pipelines.unwrap_or_default(),
            Err(e) => {
                warn!(error = %e, "the router refused pipeline status");
                return;
            }
        };
        for job_id in lost {
            let Some(pipeline_id) = self.walks.pipeline_of(&job_id).cloned() else {
                continue;
            };
            match states.get(&pipeline_id).map(|s| s.state) {
                Some(PipelineState::Queued | PipelineState::Running) => {
                    warn!(%pipeline_id, %job_id, "the router lost a job; submitting it again");
                    let actions = self.walks.job_lost(&job_id);
                    self.extend(actions);
                }
                _ => {
                    warn!(%pipeline_id, "the router no longer knows this pipeline; dropping it");
                    self.drop_walk(&pipeline_id);
                }
            }
        }
    }
}

impl Machine for PipelinerMachine {
    type Work = PipelineAssignment;
    type Out = Out;
    type Note = Infallible;

    fn ask_for_work(&self, max: usize, wait: Option<Duration>) -> Request {
        Request::GetPipelines(GetPipelines {
            max,
            wait_ms: wait.map(|w| w.as_millis() as u64),
            asker: None,
        })
    }

    fn decode_work(&self, reply: Value) -> Result<Vec<PipelineAssignment>, ReplyError> {
        Vec::<PipelineAssignment>::from_reply(reply)
    }

    fn is_wake_up(&self, event: &Event) -> bool {
        matches!(event, Event::NewPipeline)
    }

    fn room(&self) -> usize {
        self.max_pipelines
            .saturating_sub(self.walks.len())
            .min(FETCH_TURN)
    }

    fn take_in(&mut self, pipelines: Vec<PipelineAssignment>) {
        for assignment in pipelines {
            debug!(pipeline_id = %assignment.pipeline_id, "pipeline taken");
            let actions = self.walks.start(assignment, Instant::now());
            self.extend(actions);
        }
    }

    fn outbox(&mut self) -> &mut VecDeque<Out> {
        &mut self.outbox
    }

    fn request(out: &Out) -> Request {
        match out {
            Out::Walk(action) => request(action),
            Out::JobStatus(job_ids) => Request::JobStatus(JobStatusQuery {
                job_ids: job_ids.clone(),
            }),
            Out::LostJobs { pipelines, .. } => Request::PipelineStatus(PipelineStatusQuery {
                pipeline_ids: pipelines.clone(),
                details: false,
            }),
            Out::FailedJobs { pipelines, .. } => Request::PipelineStatus(PipelineStatusQuery {
                pipeline_ids: pipelines.clone(),
                details: true,
            }),
        }
    }

    fn replied(&mut self, out: Out, reply: Value) {
        match out {
            Out::Walk(action) => self.performed(action, reply),
            Out::JobStatus(_) => self.job_states(reply),
            Out::LostJobs { jobs, .. } => self.lost_jobs(jobs, reply),
            Out::FailedJobs { jobs, .. } => self.failed_jobs(jobs, reply),
        }
    }

    fn on_event(&mut self, event: Event) {
        let now = Instant::now();
        let actions = match event {
            Event::JobFinished { job_id, .. } => self.walks.job_finished(&job_id, now),
            Event::JobFailed { job_id, error } => self.walks.job_failed(&job_id, &error, now),
            Event::PipelineCancelled { pipeline_id } => {
                info!(%pipeline_id, "the pipeline was cancelled; dropping it");
                self.drop_walk(&pipeline_id);
                return;
            }
            _ => return,
        };
        self.extend(actions);
    }

    fn on_note(&mut self, note: Infallible) {
        match note {}
    }

    fn turn(&mut self, _notes: &tokio::sync::mpsc::UnboundedSender<Infallible>) {}

    /// Asks where the jobs it has awaited for a while stand (unless it is asking already).
    fn housekeeping(&mut self) {
        let asking = self.outbox.iter().any(|o| {
            matches!(
                o,
                Out::JobStatus(_) | Out::LostJobs { .. } | Out::FailedJobs { .. }
            )
        });
        let Some(before) = Instant::now().checked_sub(self.resync_after) else {
            return;
        };
        if asking {
            return;
        }
        let stale = self.walks.awaited_before(before);
        for chunk in stale.chunks(STATUS_CHUNK) {
            self.outbox.push_back(Out::JobStatus(chunk.to_vec()));
        }
    }

    fn peer(&mut self) -> Peer {
        self.identity.now(self.walks.len(), 0, Vec::new())
    }

    /// The pipelines it walks, and those whose end the router has not acknowledged yet: all
    /// the router handed it that it did not forget (see [`Machine::leases`]).
    fn leases(&self) -> RenewLeases {
        let mut pipeline_ids = self.walks.ids();
        pipeline_ids.extend(self.outbox.iter().filter_map(|out| match out {
            Out::Walk(Action::Finish { pipeline_id, .. } | Action::Fail { pipeline_id, .. }) => {
                Some(pipeline_id.clone())
            }
            _ => None,
        }));
        RenewLeases {
            pipeline_ids,
            ..RenewLeases::default()
        }
    }

    fn held(&self) -> usize {
        self.walks.len()
    }
}

/// The request an action makes.
fn request(action: &Action) -> Request {
    match action {
        Action::Submit {
            pipeline_id,
            worker,
            data,
            pipeline_data,
            ends_pipeline,
            ..
        } => {
            let mut job = NewJob::with_raw_data(worker.clone(), data.clone())
                .in_pipeline(pipeline_id.clone());
            if *pipeline_data && data.get().len() >= NewJob::DATA_FROM_PIPELINE_MIN_BYTES {
                // The router has the pipeline's data: large data crosses once per pipeline.
                job = job.with_data_from_pipeline();
            }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

    use super::*;
    use pypelinin_common::pipeline::Pipeline;
    use pypelinin_common::protocol::cluster::PipelineDetails;
    use pypelinin_common::protocol::PipelineStatus;
    use serde_json::json;
    use std::collections::BTreeMap;

    fn chain_of_two(id: &str) -> PipelineAssignment {
        let pipeline = Pipeline::builder().edge("A", "B").build().unwrap();
        PipelineAssignment {
            pipeline_id: id.into(),
            pipeline: pipeline.to_legacy(),
            submitted_jobs: Vec::new(),
            fields: Default::default(),
        }
    }

    fn reply(answer: Answer) -> Value {
        serde_json::to_value(answer).unwrap()
    }

    /// Sends every queued request as the router would, giving each job the id `<worker>-id`.
    fn accept_all(m: &mut PipelinerMachine) {
        let outs: Vec<Out> = m.outbox().drain(..).collect();
        for out in outs {
            let answer = match &out {
                Out::Walk(Action::Submit { worker, .. }) => Answer::new(AnswerKind::JobAccepted)
                    .with_job_id(format!("{worker}-id").as_str().into()),
                _ => Answer::new(AnswerKind::GoodJob),
            };
            m.replied(out, reply(answer));
        }
    }

    fn workers(m: &mut PipelinerMachine) -> Vec<String> {
        m.outbox()
            .iter()
            .map(|o| match o {
                Out::Walk(Action::Submit { worker, .. }) => worker.clone(),
                Out::Walk(Action::Finish { .. }) => "<finish>".into(),
                Out::Walk(Action::Fail { .. }) => "<fail>".into(),
                Out::JobStatus(jobs) => format!("<status of {}>", jobs.len()),
                Out::LostJobs { jobs, .. } => format!("<lost {}>", jobs.len()),
                Out::FailedJobs { jobs, .. } => format!("<failed {}>", jobs.len()),
            })
            .collect()
    }

    #[test]
    fn a_job_the_router_refuses_fails_its_pipeline_with_the_error() {
        let mut m = PipelinerMachine::new(10, Duration::from_secs(60));
        m.take_in(vec![chain_of_two("p1")]);
        let submit = m.outbox().pop_front().unwrap();
        m.replied(
            submit,
            reply(Answer::error(
                AnswerKind::MalformedRequest,
                "request of 20000000 bytes exceeds the limit of 16777216 bytes",
            )),
        );
        assert_eq!(m.held(), 0, "the walk is over");
        match m.outbox().pop_front() {
            Some(Out::Walk(Action::Fail {
                pipeline_id,
                worker,
                error,
                ..
            })) => {
                assert_eq!((pipeline_id.as_str(), worker.as_str()), ("p1", "A"));
                assert!(error.contains("exceeds the limit"), "{error}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pipelines_in_requests_out_events_move_the_walk() {
        let mut m = PipelinerMachine::new(10, Duration::from_secs(60));
        assert_eq!(m.room(), 10);
        m.take_in(vec![chain_of_two("p1")]);
        assert_eq!(m.held(), 1);
        assert_eq!(m.room(), 9);
        assert_eq!(workers(&mut m), ["A"]);
        assert!(matches!(
            PipelinerMachine::request(&m.outbox()[0]),
            Request::AddJob(_)
        ));
        accept_all(&mut m);
        assert_eq!(m.leases().pipeline_ids, vec![PipelineId::from("p1")]);
        m.on_event(Event::JobFinished {
            job_id: "A-id".into(),
            duration: "0.01".into(),
        });
        assert_eq!(workers(&mut m), ["B"]);
    }

    #[test]
    fn a_missed_broadcast_is_caught_up_through_job_status() {
        let mut m = PipelinerMachine::new(10, Duration::ZERO);
        m.take_in(vec![chain_of_two("p1")]);
        accept_all(&mut m);
        m.housekeeping();
        assert_eq!(workers(&mut m), ["<status of 1>"]);
        // Asked once, however often housekeeping comes while the query is unsent.
        m.housekeeping();
        assert_eq!(workers(&mut m), ["<status of 1>"]);
        let out = m.outbox().pop_front().unwrap();
        assert!(matches!(
            PipelinerMachine::request(&out),
            Request::JobStatus(_)
        ));
        let states = BTreeMap::from([(JobId::from("A-id"), JobState::Finished)]);
        m.replied(
            out,
            reply(Answer {
                jobs: Some(states),
                ..Answer::new(AnswerKind::Status)
            }),
        );
        assert_eq!(workers(&mut m), ["B"]);
    }

    #[test]
    fn a_job_status_says_failed_fails_the_pipeline_with_the_error_the_router_kept() {
        let mut m = PipelinerMachine::new(10, Duration::ZERO);
        m.take_in(vec![chain_of_two("p1")]);
        accept_all(&mut m);
        m.housekeeping();
        let out = m.outbox().pop_front().unwrap();
        let states = BTreeMap::from([(JobId::from("A-id"), JobState::Failed)]);
        m.replied(
            out,
            reply(Answer {
                jobs: Some(states),
                ..Answer::new(AnswerKind::Status)
            }),
        );
        assert_eq!(workers(&mut m), ["<failed 1>"]);
        let out = m.outbox().pop_front().unwrap();
        assert!(matches!(
            PipelinerMachine::request(&out),
            Request::PipelineStatus(PipelineStatusQuery { details: true, .. })
        ));
        let details: BTreeMap<PipelineId, PipelineDetails> = serde_json::from_value(json!({
            "p1": {"pipeline": [], "jobs": [{"job id": "A-id", "worker": "A", "state": "failed",
                    "attempts": 3, "error": "cannot read /nonexistent/"}]}
        }))
        .unwrap();
        m.replied(
            out,
            reply(Answer {
                details: Some(details),
                ..Answer::new(AnswerKind::Status)
            }),
        );
        match m.outbox().pop_front() {
            Some(Out::Walk(Action::Fail { worker, error, .. })) => {
                assert_eq!(
                    (worker.as_str(), error.as_str()),
                    ("A", "cannot read /nonexistent/")
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(m.held(), 0);
    }

    #[test]
    fn a_job_the_router_lost_is_submitted_again_or_its_forgotten_pipeline_dropped() {
        for (pipeline_state, expected) in [
            (PipelineState::Running, vec!["A"]),
            (PipelineState::Unknown, vec![]),
        ] {
            let mut m = PipelinerMachine::new(10, Duration::ZERO);
            m.take_in(vec![chain_of_two("p1")]);
            accept_all(&mut m);
            m.housekeeping();
            let out = m.outbox().pop_front().unwrap();
            let states = BTreeMap::from([(JobId::from("A-id"), JobState::Unknown)]);
            m.replied(
                out,
                reply(Answer {
                    jobs: Some(states),
                    ..Answer::new(AnswerKind::Status)
                }),
            );
            let out = m.outbox().pop_front().unwrap();
            match PipelinerMachine::request(&out) {
                Request::PipelineStatus(q) => assert_eq!(q.pipeline_ids, ["p1".into()]),
                other => panic!("expected pipeline status, got {other:?}"),
            }
            let pipelines =
                BTreeMap::from([(PipelineId::from("p1"), PipelineStatus::of(pipeline_state))]);
            m.replied(
                out,
                reply(Answer {
                    pipelines: Some(pipelines),
                    ..Answer::new(AnswerKind::Status)
                }),
            );
            assert_eq!(workers(&mut m), expected, "{pipeline_state:?}");
            assert_eq!(m.held(), usize::from(!expected.is_empty()));
        }
    }

    #[test]
    fn large_pipeline_data_goes_as_data_from_pipeline_and_a_jobs_own_data_as_itself() {
        let submit = |data: &str, pipeline_data: bool| {
            let action = Action::Submit {
                pipeline_id: "p".into(),
                job: pypelinin_common::pipeline::JobIndex::new(0),
                worker: "A".into(),
                data: serde_json::value::RawValue::from_string(data.to_owned()).unwrap(),
                pipeline_data,
                ends_pipeline: None,
            };
            match request(&action) {
                Request::AddJob(job) => job,
                other => panic!("{other:?}"),
            }
        };
        let large =
            json!({"payload": "x".repeat(NewJob::DATA_FROM_PIPELINE_MIN_BYTES)}).to_string();
        assert!(submit(&large, true).data_from_pipeline);
        assert!(!submit(&large, false).data_from_pipeline, "its own data");
        assert!(
            !submit(r#"{"small": 1}"#, true).data_from_pipeline,
            "cheaper to send"
        );
        // The data stays on this side (sent as itself to the original's router).
        assert_eq!(
            submit(&large, true).fields.get("data").unwrap().get(),
            large
        );
    }

    #[test]
    fn a_refused_request_for_work_changes_nothing() {
        let mut m = PipelinerMachine::new(1, Duration::from_secs(60));
        let refused = reply(Answer::error(AnswerKind::SyntaxError, "no"));
        assert!(m.decode_work(refused).is_err());
        assert_eq!((m.room(), m.held()), (1, 0));
        assert!(m.outbox().is_empty());
    }

    #[test]
    fn a_job_refused_because_its_pipeline_ended_drops_the_walk() {
        let mut m = PipelinerMachine::new(10, Duration::from_secs(60));
        m.take_in(vec![chain_of_two("p1")]);
        let out = m.outbox().pop_front().unwrap();
        let refused = Answer::error(AnswerKind::UnknownPipelineId, "pipeline p1 is not pending");
        m.replied(out, reply(refused));
        assert_eq!(m.held(), 0, "the walk is dropped");
        assert!(m.outbox().is_empty());
    }
}
