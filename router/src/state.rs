//! The router's queues and records, and every transition a request makes on them.
//!
//! One owner (the server's state task) applies requests one by one; each transition returns
//! the reply and pushes the events to broadcast. Nothing here does I/O, and time comes in as an
//! argument, so it is tested directly and persistence can record the same transitions.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use pypelinin_common::ids::{JobId, PipelineId};
use pypelinin_common::pipeline::Pipeline;
use pypelinin_common::protocol::request::{
    GetJob, JobFailed, JobFinished, NewJob, NewPipeline, PipelineFailed, PipelineFinished,
};
use pypelinin_common::protocol::{
    Answer, AnswerKind, Event, JobAssignment, JobState, PipelineAssignment, PipelineState,
    PipelineStatus, Reply, Request, SubmittedJob,
};
use serde_json::{Map, Value};
use tracing::debug;

#[derive(Debug)]
struct JobRecord {
    worker: String,
    fields: Map<String, Value>,
    pipeline_id: Option<PipelineId>,
    state: JobState,
}

#[derive(Debug)]
struct PipelineRecord {
    pipeline: Value,
    fields: Map<String, Value>,
    state: PipelineState,
    /// Jobs submitted for this pipeline, in order.
    jobs: Vec<JobId>,
}

/// The router's state: FIFO queues of jobs (one per worker, ordered by a global sequence
/// number so FIFO holds across workers) and of pipelines, the records of pending jobs and
/// pipelines, and the outcomes of ended pipelines for a retention time.
///
/// A job's record lives from `add job` until it ends; a job of a pipeline keeps its record
/// (finished or failed) until its pipeline ends, so a pipeliner can resume the pipeline. An
/// ended pipeline keeps only its outcome, for `retention`. Memory follows the work in flight.
#[derive(Debug)]
pub struct State {
    configuration: Map<String, Value>,
    jobs: HashMap<JobId, JobRecord>,
    job_queues: HashMap<String, VecDeque<(u64, JobId)>>,
    next_seq: u64,
    pipelines: HashMap<PipelineId, PipelineRecord>,
    pipeline_queue: VecDeque<PipelineId>,
    ended: HashMap<PipelineId, PipelineStatus>,
    ended_order: VecDeque<(Instant, PipelineId)>,
    retention: Duration,
}

impl Default for State {
    fn default() -> Self {
        Self::new(Map::new(), Duration::from_secs(300))
    }
}

impl State {
    /// Empty queues; `get configuration` answers `configuration`; ended pipelines are
    /// remembered for `retention`.
    pub fn new(configuration: Map<String, Value>, retention: Duration) -> Self {
        Self {
            configuration,
            jobs: HashMap::new(),
            job_queues: HashMap::new(),
            next_seq: 0,
            pipelines: HashMap::new(),
            pipeline_queue: VecDeque::new(),
            ended: HashMap::new(),
            ended_order: VecDeque::new(),
            retention,
        }
    }

    /// Applies `request` at time `now`, returning the reply and pushing the events it causes
    /// onto `events`.
    pub fn handle(&mut self, request: Request, now: Instant, events: &mut Vec<Event>) -> Reply {
        match request {
            Request::GetConfiguration => Reply::Configuration(self.configuration.clone()),
            Request::AddJob(job) => self.add_job(job, events),
            Request::GetJob(get) => Reply::Job(self.get_job(&get)),
            Request::JobFinished(done) => self.job_finished(done, events),
            Request::JobFailed(failed) => self.job_failed(failed, events),
            Request::AddPipeline(p) => self.add_pipeline(p, events),
            Request::GetPipeline => Reply::Pipeline(self.get_pipeline()),
            Request::PipelineFinished(done) => self.pipeline_finished(done, now, events),
            Request::PipelineFailed(failed) => self.pipeline_failed(failed, now, events),
            Request::JobStatus(q) => {
                let jobs = q
                    .job_ids
                    .into_iter()
                    .map(|id| {
                        let state = self.jobs.get(&id).map_or(JobState::Unknown, |r| r.state);
                        (id, state)
                    })
                    .collect();
                Answer {
                    jobs: Some(jobs),
                    ..Answer::new(AnswerKind::Status)
                }
                .into()
            }
            Request::PipelineStatus(q) => {
                let pipelines = q
                    .pipeline_ids
                    .into_iter()
                    .map(|id| {
                        let status = self.pipeline_status(&id);
                        (id, status)
                    })
                    .collect::<BTreeMap<_, _>>();
                Answer {
                    pipelines: Some(pipelines),
                    ..Answer::new(AnswerKind::Status)
                }
                .into()
            }
            Request::Probe(probe) => {
                events.push(Event::Probe { token: probe.token });
                Answer::new(AnswerKind::ProbeSent).into()
            }
        }
    }

    /// Forgets the outcomes of pipelines that ended more than the retention time before `now`.
    pub fn purge(&mut self, now: Instant) {
        while let Some((at, _)) = self.ended_order.front() {
            if now.duration_since(*at) < self.retention {
                break;
            }
            if let Some((_, id)) = self.ended_order.pop_front() {
                self.ended.remove(&id);
            }
        }
    }

    /// Number of jobs waiting in queues.
    pub fn queued_jobs(&self) -> usize {
        self.jobs
            .values()
            .filter(|j| j.state == JobState::Queued)
            .count()
    }

    /// Number of job records (pending jobs, and ended jobs of pending pipelines).
    pub fn job_records(&self) -> usize {
        self.jobs.len()
    }

    /// Number of pending pipelines (queued or running).
    pub fn pending_pipelines(&self) -> usize {
        self.pipelines.len()
    }

    /// Number of ended pipelines whose outcome is still remembered.
    pub fn remembered_pipelines(&self) -> usize {
        self.ended.len()
    }

    fn pipeline_status(&self, id: &PipelineId) -> PipelineStatus {
        if let Some(record) = self.pipelines.get(id) {
            return PipelineStatus::of(record.state);
        }
        self.ended
            .get(id)
            .cloned()
            .unwrap_or_else(|| PipelineStatus::of(PipelineState::Unknown))
    }

    fn add_job(&mut self, job: NewJob, events: &mut Vec<Event>) -> Reply {
        if job.worker.is_empty() {
            return Answer::error(AnswerKind::SyntaxError, "\"worker\" must not be empty").into();
        }
        let id = JobId::generate();
        let seq = self.next_seq;
        self.next_seq += 1;
        self.job_queues
            .entry(job.worker.clone())
            .or_default()
            .push_back((seq, id.clone()));
        // A job names its pipeline only while that pipeline is pending; otherwise it is a
        // job of its own.
        let pipeline_id = job.pipeline_id.filter(|p| self.pipelines.contains_key(p));
        if let Some(record) = pipeline_id.as_ref().and_then(|p| self.pipelines.get_mut(p)) {
            record.jobs.push(id.clone());
        }
        self.jobs.insert(
            id.clone(),
            JobRecord {
                worker: job.worker,
                fields: job.fields,
                pipeline_id,
                state: JobState::Queued,
            },
        );
        events.push(Event::NewJob);
        Answer::new(AnswerKind::JobAccepted).with_job_id(id).into()
    }

    fn get_job(&mut self, get: &GetJob) -> Option<JobAssignment> {
        // Drop ids at queue fronts that are no longer queued (ended before being taken).
        let jobs = &self.jobs;
        let is_queued = |id: &JobId| jobs.get(id).is_some_and(|r| r.state == JobState::Queued);
        let mut best: Option<(u64, String)> = None;
        let mut consider = |worker: &str, queue: &mut VecDeque<(u64, JobId)>| {
            while queue.front().is_some_and(|(_, id)| !is_queued(id)) {
                queue.pop_front();
            }
            if let Some(&(seq, _)) = queue.front() {
                if best.as_ref().is_none_or(|(s, _)| seq < *s) {
                    best = Some((seq, worker.to_owned()));
                }
            }
        };
        match &get.workers {
            Some(workers) => {
                for w in workers {
                    if let Some(q) = self.job_queues.get_mut(w) {
                        consider(w, q);
                    }
                }
            }
            None => {
                for (w, q) in self.job_queues.iter_mut() {
                    consider(w, q);
                }
            }
        }
        self.job_queues.retain(|_, q| !q.is_empty());
        let (_, worker) = best?;
        let queue = self.job_queues.get_mut(&worker)?;
        let (_, id) = queue.pop_front()?;
        if queue.is_empty() {
            self.job_queues.remove(&worker);
        }
        let record = self.jobs.get_mut(&id)?;
        record.state = JobState::Running;
        Some(JobAssignment {
            job_id: id,
            worker: record.worker.clone(),
            pipeline_id: record.pipeline_id.clone(),
            fields: record.fields.clone(),
        })
    }

    /// Ends a pending job: a job of a pending pipeline keeps its record with `state`, any
    /// other job is forgotten. `None` when the job is not pending.
    fn end_job(&mut self, id: &JobId, state: JobState) -> Option<String> {
        let record = self.jobs.get_mut(id)?;
        if matches!(record.state, JobState::Finished | JobState::Failed) {
            return None;
        }
        let worker = record.worker.clone();
        if record.pipeline_id.is_some() {
            record.state = state;
        } else {
            self.jobs.remove(id);
        }
        Some(worker)
    }

    fn job_finished(&mut self, done: JobFinished, events: &mut Vec<Event>) -> Reply {
        if self.end_job(&done.job_id, JobState::Finished).is_none() {
            return Answer::new(AnswerKind::UnknownJobId).into();
        }
        events.push(Event::job_finished(done.job_id, &done.duration));
        Answer::new(AnswerKind::GoodJob).into()
    }

    fn job_failed(&mut self, failed: JobFailed, events: &mut Vec<Event>) -> Reply {
        let Some(worker) = self.end_job(&failed.job_id, JobState::Failed) else {
            return Answer::new(AnswerKind::UnknownJobId).into();
        };
        debug!(job_id = %failed.job_id, %worker, error = %failed.error, "job failed");
        events.push(Event::job_failed(failed.job_id, &failed.error));
        Answer::new(AnswerKind::FailureRecorded).into()
    }

    fn add_pipeline(&mut self, new: NewPipeline, events: &mut Vec<Event>) -> Reply {
        if let Err(e) = Pipeline::from_legacy(&new.pipeline) {
            return Answer::error(AnswerKind::InvalidPipeline, e.to_string()).into();
        }
        let id = PipelineId::generate();
        self.pipeline_queue.push_back(id.clone());
        self.pipelines.insert(
            id.clone(),
            PipelineRecord {
                pipeline: new.pipeline,
                fields: new.fields,
                state: PipelineState::Queued,
                jobs: Vec::new(),
            },
        );
        events.push(Event::NewPipeline);
        Answer::new(AnswerKind::PipelineAccepted)
            .with_pipeline_id(id)
            .into()
    }

    fn get_pipeline(&mut self) -> Option<PipelineAssignment> {
        while let Some(id) = self.pipeline_queue.pop_front() {
            let Some(record) = self.pipelines.get_mut(&id) else {
                continue;
            };
            if record.state != PipelineState::Queued {
                continue;
            }
            record.state = PipelineState::Running;
            let submitted_jobs = record
                .jobs
                .iter()
                .filter_map(|job_id| {
                    self.jobs.get(job_id).map(|j| SubmittedJob {
                        job_id: job_id.clone(),
                        worker: j.worker.clone(),
                        state: j.state,
                    })
                })
                .collect();
            return Some(PipelineAssignment {
                pipeline_id: id,
                pipeline: record.pipeline.clone(),
                submitted_jobs,
                fields: record.fields.clone(),
            });
        }
        None
    }

    /// Ends a pending pipeline: forgets it and its jobs, remembers `status` for the
    /// retention time. False when the pipeline is not pending.
    fn end_pipeline(&mut self, id: &PipelineId, status: PipelineStatus, now: Instant) -> bool {
        let Some(record) = self.pipelines.remove(id) else {
            return false;
        };
        for job in &record.jobs {
            self.jobs.remove(job);
        }
        self.ended.insert(id.clone(), status);
        self.ended_order.push_back((now, id.clone()));
        true
    }

    fn pipeline_finished(
        &mut self,
        done: PipelineFinished,
        now: Instant,
        events: &mut Vec<Event>,
    ) -> Reply {
        let status = PipelineStatus {
            duration: Some(done.duration.clone()),
            ..PipelineStatus::of(PipelineState::Finished)
        };
        if !self.end_pipeline(&done.pipeline_id, status, now) {
            return Answer::new(AnswerKind::UnknownPipelineId).into();
        }
        events.push(Event::pipeline_finished(done.pipeline_id, &done.duration));
        Answer::new(AnswerKind::GoodJob).into()
    }

    fn pipeline_failed(
        &mut self,
        failed: PipelineFailed,
        now: Instant,
        events: &mut Vec<Event>,
    ) -> Reply {
        let status = PipelineStatus {
            state: PipelineState::Failed,
            duration: failed.duration.clone(),
            job_id: Some(failed.job_id.clone()),
            worker: Some(failed.worker.clone()),
            error: Some(failed.error.clone()),
        };
        if !self.end_pipeline(&failed.pipeline_id, status, now) {
            return Answer::new(AnswerKind::UnknownPipelineId).into();
        }
        events.push(Event::pipeline_failed(
            failed.pipeline_id,
            failed.job_id,
            &failed.worker,
            &failed.error,
        ));
        Answer::new(AnswerKind::FailureRecorded).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pypelinin_common::protocol::request::{JobStatusQuery, PipelineStatusQuery};
    use pypelinin_common::protocol::WireDuration;
    use serde_json::json;

    fn now() -> Instant {
        Instant::now()
    }

    fn add_in(state: &mut State, worker: &str, pipeline: Option<&PipelineId>) -> JobId {
        let mut job = NewJob::new(worker, json!({"w": worker}));
        job.pipeline_id = pipeline.cloned();
        let reply = state.handle(Request::AddJob(job), now(), &mut vec![]);
        let Reply::Answer(Answer {
            job_id: Some(id), ..
        }) = reply
        else {
            panic!("{reply:?}")
        };
        id
    }

    fn add(state: &mut State, worker: &str) -> JobId {
        add_in(state, worker, None)
    }

    fn get(state: &mut State, workers: Option<&[&str]>) -> Option<JobAssignment> {
        let workers = workers.map(|w| w.iter().map(|s| s.to_string()).collect());
        match state.handle(Request::GetJob(GetJob { workers }), now(), &mut vec![]) {
            Reply::Job(j) => j,
            other => panic!("{other:?}"),
        }
    }

    fn add_pipeline(state: &mut State) -> PipelineId {
        let p = json!([
            ["graph", [[[["worker_name", "A"]], [["worker_name", "B"]]]]],
            ["data", null]
        ]);
        let reply = state.handle(
            Request::AddPipeline(NewPipeline {
                pipeline: p,
                fields: Map::new(),
            }),
            now(),
            &mut vec![],
        );
        let Reply::Answer(Answer {
            pipeline_id: Some(id),
            ..
        }) = reply
        else {
            panic!("{reply:?}")
        };
        id
    }

    fn job_states(state: &mut State, ids: &[&JobId]) -> Vec<JobState> {
        let q = JobStatusQuery {
            job_ids: ids.iter().map(|i| (*i).clone()).collect(),
        };
        let Reply::Answer(Answer {
            jobs: Some(jobs), ..
        }) = state.handle(Request::JobStatus(q), now(), &mut vec![])
        else {
            panic!()
        };
        ids.iter().map(|i| jobs[*i]).collect()
    }

    fn pipeline_state(state: &mut State, id: &PipelineId, at: Instant) -> PipelineStatus {
        let q = PipelineStatusQuery {
            pipeline_ids: vec![id.clone()],
        };
        let Reply::Answer(Answer {
            pipelines: Some(mut p),
            ..
        }) = state.handle(Request::PipelineStatus(q), at, &mut vec![])
        else {
            panic!()
        };
        p.remove(id).unwrap()
    }

    #[test]
    fn jobs_come_out_fifo_across_and_within_workers() {
        let mut s = State::default();
        let ids: Vec<_> = ["A", "B", "A", "C"]
            .iter()
            .map(|w| add(&mut s, w))
            .collect();
        let got: Vec<_> = std::iter::from_fn(|| get(&mut s, None))
            .map(|j| j.job_id)
            .collect();
        assert_eq!(got, ids);
    }

    #[test]
    fn routing_hands_out_only_the_named_workers_fifo() {
        let mut s = State::default();
        let a1 = add(&mut s, "A");
        let b1 = add(&mut s, "B");
        let c1 = add(&mut s, "C");
        let a2 = add(&mut s, "A");
        assert_eq!(get(&mut s, Some(&["C", "A"])).unwrap().job_id, a1);
        assert_eq!(get(&mut s, Some(&["C", "A"])).unwrap().job_id, c1);
        assert_eq!(get(&mut s, Some(&["C", "A"])).unwrap().job_id, a2);
        assert!(get(&mut s, Some(&["C", "A"])).is_none());
        assert!(get(&mut s, Some(&[])).is_none());
        assert!(get(&mut s, Some(&["Z"])).is_none());
        assert_eq!(get(&mut s, None).unwrap().job_id, b1);
        assert!(s.job_queues.is_empty());
    }

    #[test]
    fn finishing_twice_is_unknown_and_broadcasts_once() {
        let mut s = State::default();
        let id = add(&mut s, "A");
        let mut events = vec![];
        let done = || {
            Request::JobFinished(JobFinished {
                job_id: id.clone(),
                duration: WireDuration::from_secs(1.5),
            })
        };
        assert_eq!(
            s.handle(done(), now(), &mut events),
            Answer::new(AnswerKind::GoodJob).into()
        );
        assert_eq!(
            s.handle(done(), now(), &mut events),
            Answer::new(AnswerKind::UnknownJobId).into()
        );
        assert_eq!(
            events,
            vec![Event::job_finished(id, &WireDuration::from_secs(1.5))]
        );
        // A job finished before anyone took it is not handed out afterwards.
        assert!(get(&mut s, None).is_none());
        assert_eq!(s.job_records(), 0);
    }

    #[test]
    fn jobs_of_a_pipeline_keep_their_state_until_the_pipeline_ends() {
        let mut s = State::default();
        let p = add_pipeline(&mut s);
        let assigned = match s.handle(Request::GetPipeline, now(), &mut vec![]) {
            Reply::Pipeline(Some(a)) => a,
            other => panic!("{other:?}"),
        };
        assert!(assigned.submitted_jobs.is_empty());
        let a = add_in(&mut s, "A", Some(&p));
        let lone = add(&mut s, "A");
        assert_eq!(
            job_states(&mut s, &[&a, &lone]),
            vec![JobState::Queued, JobState::Queued]
        );
        assert_eq!(get(&mut s, None).unwrap().pipeline_id, Some(p.clone()));
        assert_eq!(job_states(&mut s, &[&a]), vec![JobState::Running]);
        for id in [&a, &lone] {
            s.handle(
                Request::JobFinished(JobFinished {
                    job_id: id.clone(),
                    duration: WireDuration::from_secs(1.0),
                }),
                now(),
                &mut vec![],
            );
        }
        assert_eq!(
            job_states(&mut s, &[&a, &lone]),
            vec![JobState::Finished, JobState::Unknown]
        );
        let t0 = now();
        let done = PipelineFinished {
            pipeline_id: p.clone(),
            duration: WireDuration::from_secs(2.0),
        };
        s.handle(Request::PipelineFinished(done), t0, &mut vec![]);
        assert_eq!(job_states(&mut s, &[&a]), vec![JobState::Unknown]);
        assert_eq!(s.job_records(), 0);
        let status = pipeline_state(&mut s, &p, t0);
        assert_eq!(
            (status.state, status.duration),
            (PipelineState::Finished, Some(WireDuration::from_secs(2.0)))
        );
        // Remembered for the retention time, then purged.
        s.purge(t0 + Duration::from_secs(299));
        assert_eq!(
            pipeline_state(&mut s, &p, t0).state,
            PipelineState::Finished
        );
        s.purge(t0 + Duration::from_secs(300));
        assert_eq!(pipeline_state(&mut s, &p, t0).state, PipelineState::Unknown);
        assert_eq!(s.remembered_pipelines(), 0);
    }

    #[test]
    fn a_failed_pipeline_is_reported_with_its_job_and_error() {
        let mut s = State::default();
        let p = add_pipeline(&mut s);
        let a = add_in(&mut s, "A", Some(&p));
        let mut events = vec![];
        let failed = PipelineFailed {
            pipeline_id: p.clone(),
            job_id: a.clone(),
            worker: "A".into(),
            error: "boom".into(),
            duration: None,
        };
        let reply = s.handle(Request::PipelineFailed(failed.clone()), now(), &mut events);
        assert_eq!(reply, Answer::new(AnswerKind::FailureRecorded).into());
        assert_eq!(
            events,
            vec![Event::pipeline_failed(p.clone(), a.clone(), "A", "boom")]
        );
        let status = pipeline_state(&mut s, &p, now());
        assert_eq!(
            (status.state, status.error.as_deref(), status.job_id),
            (PipelineState::Failed, Some("boom"), Some(a))
        );
        assert_eq!(
            s.handle(Request::PipelineFailed(failed), now(), &mut vec![]),
            Answer::new(AnswerKind::UnknownPipelineId).into()
        );
        assert!(
            get(&mut s, None).is_none(),
            "the ended pipeline's queued job is dropped"
        );
    }

    #[test]
    fn invalid_pipelines_are_refused_at_add() {
        let mut s = State::default();
        let cyclic = json!([
            [
                "graph",
                [
                    [[["worker_name", "A"]], [["worker_name", "B"]]],
                    [[["worker_name", "B"]], [["worker_name", "A"]]]
                ]
            ],
            ["data", null]
        ]);
        let reply = s.handle(
            Request::AddPipeline(NewPipeline {
                pipeline: cyclic,
                fields: Map::new(),
            }),
            now(),
            &mut vec![],
        );
        let Reply::Answer(a) = reply else { panic!() };
        assert_eq!(a.answer, AnswerKind::InvalidPipeline);
        assert!(a.error.unwrap().contains("cycle"));
        assert_eq!(s.pending_pipelines(), 0);
    }
}
