//! The router's queues and records, and every transition a request makes on them.
//!
//! One owner (the server's state task) applies requests one by one; each transition returns
//! the reply and pushes the events to broadcast. Nothing here does I/O, so it is tested
//! directly and persistence can record the same transitions.

use std::collections::{HashMap, VecDeque};

use pypelinin_common::ids::{JobId, PipelineId};
use pypelinin_common::pipeline::Pipeline;
use pypelinin_common::protocol::request::{
    GetJob, JobFailed, JobFinished, NewJob, NewPipeline, PipelineFinished,
};
use pypelinin_common::protocol::{
    Answer, AnswerKind, Event, JobAssignment, PipelineAssignment, Reply, Request,
};
use serde_json::{Map, Value};
use tracing::debug;

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobStatus {
    /// In its worker's queue.
    Queued,
    /// Handed to a broker by `get job`.
    Taken,
}

#[derive(Debug)]
struct JobRecord {
    worker: String,
    fields: Map<String, Value>,
    status: JobStatus,
}

#[derive(Debug)]
struct PipelineRecord {
    pipeline: Value,
    fields: Map<String, Value>,
}

/// The router's state: FIFO queues of jobs (one per worker, ordered by a global sequence
/// number so FIFO holds across workers) and of pipelines, and the records of pending ids.
///
/// An id is pending from `add …` until `… finished` (or `job failed`); its record is then
/// dropped, so memory follows the pending work, not the history.
#[derive(Debug, Default)]
pub struct State {
    configuration: Map<String, Value>,
    jobs: HashMap<JobId, JobRecord>,
    job_queues: HashMap<String, VecDeque<(u64, JobId)>>,
    next_seq: u64,
    pipelines: HashMap<PipelineId, PipelineRecord>,
    pipeline_queue: VecDeque<PipelineId>,
}

impl State {
    /// Empty queues; `get configuration` answers `configuration`.
    pub fn new(configuration: Map<String, Value>) -> Self {
        Self {
            configuration,
            ..Self::default()
        }
    }

    /// Applies `request`, returning the reply and pushing the events it causes onto `events`.
    pub fn handle(&mut self, request: Request, events: &mut Vec<Event>) -> Reply {
        match request {
            Request::GetConfiguration => Reply::Configuration(self.configuration.clone()),
            Request::AddJob(job) => self.add_job(job, events),
            Request::GetJob(get) => Reply::Job(self.get_job(&get)),
            Request::JobFinished(done) => self.job_finished(done, events),
            Request::JobFailed(failed) => self.job_failed(failed, events),
            Request::AddPipeline(p) => self.add_pipeline(p, events),
            Request::GetPipeline => Reply::Pipeline(self.get_pipeline()),
            Request::PipelineFinished(done) => self.pipeline_finished(done, events),
            Request::Probe(probe) => {
                events.push(Event::Probe { token: probe.token });
                Answer::new(AnswerKind::ProbeSent).into()
            }
        }
    }

    /// Number of jobs waiting in queues.
    pub fn queued_jobs(&self) -> usize {
        self.jobs
            .values()
            .filter(|j| j.status == JobStatus::Queued)
            .count()
    }

    /// Number of pending jobs (queued or taken).
    pub fn pending_jobs(&self) -> usize {
        self.jobs.len()
    }

    /// Number of pending pipelines (queued or taken).
    pub fn pending_pipelines(&self) -> usize {
        self.pipelines.len()
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
        self.jobs.insert(
            id.clone(),
            JobRecord {
                worker: job.worker,
                fields: job.fields,
                status: JobStatus::Queued,
            },
        );
        events.push(Event::NewJob);
        Answer::new(AnswerKind::JobAccepted).with_job_id(id).into()
    }

    fn get_job(&mut self, get: &GetJob) -> Option<JobAssignment> {
        // Drop ids at queue fronts that are no longer queued (finished before being taken).
        let jobs = &self.jobs;
        let is_queued = |id: &JobId| jobs.get(id).is_some_and(|r| r.status == JobStatus::Queued);
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
        let (_, worker) = best?;
        let queue = self.job_queues.get_mut(&worker)?;
        let (_, id) = queue.pop_front()?;
        if queue.is_empty() {
            self.job_queues.remove(&worker);
        }
        let record = self.jobs.get_mut(&id)?;
        record.status = JobStatus::Taken;
        Some(JobAssignment {
            job_id: id,
            worker: record.worker.clone(),
            fields: record.fields.clone(),
        })
    }

    fn job_finished(&mut self, done: JobFinished, events: &mut Vec<Event>) -> Reply {
        if self.jobs.remove(&done.job_id).is_none() {
            return Answer::new(AnswerKind::UnknownJobId).into();
        }
        events.push(Event::job_finished(done.job_id, &done.duration));
        Answer::new(AnswerKind::GoodJob).into()
    }

    fn job_failed(&mut self, failed: JobFailed, events: &mut Vec<Event>) -> Reply {
        match self.jobs.remove(&failed.job_id) {
            None => Answer::new(AnswerKind::UnknownJobId).into(),
            Some(record) => {
                debug!(job_id = %failed.job_id, worker = %record.worker, error = %failed.error, "job failed");
                events.push(Event::job_failed(failed.job_id, &failed.error));
                Answer::new(AnswerKind::FailureRecorded).into()
            }
        }
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
            },
        );
        events.push(Event::NewPipeline);
        Answer::new(AnswerKind::PipelineAccepted)
            .with_pipeline_id(id)
            .into()
    }

    fn get_pipeline(&mut self) -> Option<PipelineAssignment> {
        while let Some(id) = self.pipeline_queue.pop_front() {
            if let Some(record) = self.pipelines.get(&id) {
                return Some(PipelineAssignment {
                    pipeline_id: id,
                    pipeline: record.pipeline.clone(),
                    fields: record.fields.clone(),
                });
            }
        }
        None
    }

    fn pipeline_finished(&mut self, done: PipelineFinished, events: &mut Vec<Event>) -> Reply {
        if self.pipelines.remove(&done.pipeline_id).is_none() {
            return Answer::new(AnswerKind::UnknownPipelineId).into();
        }
        events.push(Event::pipeline_finished(done.pipeline_id, &done.duration));
        Answer::new(AnswerKind::GoodJob).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pypelinin_common::protocol::WireDuration;
    use serde_json::json;

    fn add(state: &mut State, worker: &str) -> JobId {
        let reply = state.handle(
            Request::AddJob(NewJob::new(worker, json!({"w": worker}))),
            &mut vec![],
        );
        let Reply::Answer(Answer {
            job_id: Some(id), ..
        }) = reply
        else {
            panic!("{reply:?}")
        };
        id
    }

    fn get(state: &mut State, workers: Option<&[&str]>) -> Option<JobAssignment> {
        let workers = workers.map(|w| w.iter().map(|s| s.to_string()).collect());
        match state.handle(Request::GetJob(GetJob { workers }), &mut vec![]) {
            Reply::Job(j) => j,
            other => panic!("{other:?}"),
        }
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
            s.handle(done(), &mut events),
            Answer::new(AnswerKind::GoodJob).into()
        );
        assert_eq!(
            s.handle(done(), &mut events),
            Answer::new(AnswerKind::UnknownJobId).into()
        );
        assert_eq!(
            events,
            vec![Event::job_finished(id, &WireDuration::from_secs(1.5))]
        );
        // A job finished before anyone took it is not handed out afterwards.
        assert!(get(&mut s, None).is_none());
        assert_eq!(s.pending_jobs(), 0);
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
            &mut vec![],
        );
        let Reply::Answer(a) = reply else { panic!() };
        assert_eq!(a.answer, AnswerKind::InvalidPipeline);
        assert!(a.error.unwrap().contains("cycle"));
        assert_eq!(s.pending_pipelines(), 0);
    }
}
