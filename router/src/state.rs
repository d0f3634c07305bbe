//! The router's queues and records, and every transition a request (or the passing of time)
//! makes on them.
//!
//! One owner (the server's state task) applies requests one by one; each transition returns
//! the reply and pushes the events to broadcast. Nothing here does I/O, and time comes in as
//! an argument (wall-clock milliseconds, so leases and back-offs survive a restart). Every
//! record a transition touches is marked dirty; the server persists the dirty records of a
//! batch in one durable write before it sends the batch's replies.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use pypelinin_common::ids::{JobId, PipelineId};
use pypelinin_common::pipeline::Pipeline;
use pypelinin_common::protocol::request::{
    GetJob, GetJobs, JobFailed, JobFinished, NewJob, NewPipeline, PipelineFailed, PipelineFinished,
    RenewLeases,
};
use pypelinin_common::protocol::{
    Answer, AnswerKind, Batch, Event, JobAssignment, JobState, PipelineHandout, PipelineState,
    PipelineStatus, Reply, Request, SubmittedJob, WireDuration,
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use tracing::{debug, warn};

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
        }
    }
}

/// A job as the router records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Position in the global FIFO order.
    pub seq: u64,
    /// Its worker.
    pub worker: String,
    /// `data` and the other keys `add job` sent.
    pub fields: Map<String, Value>,
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
    /// The last job of its pipeline: the router ends the pipeline when the job finishes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ends_pipeline: Option<EndsPipeline>,
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
    pub pipeline: Box<RawValue>,
    /// The other keys `add pipeline` sent.
    pub fields: Map<String, Value>,
    /// Queued or running.
    pub state: PipelineState,
    /// Jobs submitted for it, in order.
    pub jobs: Vec<JobId>,
    /// While running: when its lease ends (ms since the epoch).
    pub lease_until: Option<u64>,
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

/// Keys whose records changed since the last [`State::take_changes`].
#[derive(Debug, Default)]
pub struct Changes {
    /// Jobs added, changed or removed.
    pub jobs: HashSet<JobId>,
    /// Pipelines added, changed or removed.
    pub pipelines: HashSet<PipelineId>,
    /// Ended outcomes added or purged.
    pub ended: HashSet<PipelineId>,
}

impl Changes {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty() && self.pipelines.is_empty() && self.ended.is_empty()
    }
}

/// The router's state. See the module documentation.
#[derive(Debug)]
pub struct State {
    configuration: Map<String, Value>,
    policy: Policy,
    jobs: HashMap<JobId, JobRecord>,
    job_queues: HashMap<String, BTreeMap<u64, JobId>>,
    delayed: BTreeSet<(u64, JobId)>,
    job_leases: BTreeSet<(u64, JobId)>,
    next_seq: u64,
    pipelines: HashMap<PipelineId, PipelineRecord>,
    pipeline_queue: BTreeMap<u64, PipelineId>,
    pipeline_leases: BTreeSet<(u64, PipelineId)>,
    request_ids: HashMap<String, PipelineId>,
    ended: HashMap<PipelineId, EndedRecord>,
    ended_order: VecDeque<(u64, PipelineId)>,
    waiting: VecDeque<Waiting>,
    changes: Changes,
}

/// A `get jobs` / `get pipelines` waiting at the router for work to be queued.
#[derive(Debug)]
struct Waiting {
    ticket: u64,
    /// When it is answered empty (ms since the epoch).
    until: u64,
    want: Want,
}

/// What a waiting request asks for.
#[derive(Debug)]
enum Want {
    Jobs(GetJob, usize),
    Pipelines(usize),
}

impl Want {
    /// The answer when nothing came in time.
    fn nothing(&self) -> Reply {
        match self {
            Want::Jobs(..) => Reply::Jobs(Vec::new()),
            Want::Pipelines(_) => Reply::Pipelines(Vec::new()),
        }
    }
}

/// The answer to a request that waited, for the server to send to the peer behind `ticket`.
#[derive(Debug)]
pub struct Served {
    /// What [`State::handle_or_wait`] was given with the request.
    pub ticket: u64,
    /// Its answer: the jobs or pipelines handed to it, or none when its wait ended.
    pub reply: Reply,
}

/// Requests waiting at most; past it a request with `wait ms` is answered at once.
pub const MAX_WAITING: usize = 10_000;

impl Default for State {
    fn default() -> Self {
        Self::new(Map::new(), Policy::default())
    }
}

/// Remembered outcomes reserved for at most (a larger `max_remembered` grows as it fills).
const RESERVE_AT_MOST: usize = 1_000_000;

/// The capacity to give a hash map that holds up to `remembered` outcomes under churn (the
/// oldest removed as new ones come), so it never grows while the router runs: a hashbrown
/// table whose removals left tombstones rehashes in place while it is at most half full, and
/// doubles otherwise — with `remembered` entries in a table sized for them, that doubling came
/// some 30,000 pipelines after the limit was reached and left the router 30% larger (the step in
/// docs/performance.md). The slots are allocated but untouched until used.
pub fn reserved_for(remembered: usize) -> usize {
    2 * remembered.min(RESERVE_AT_MOST)
}

/// The key of the client's idempotency token in `add pipeline`.
const REQUEST_ID: &str = "request id";

impl State {
    /// Empty queues; `get configuration` answers `configuration`.
    pub fn new(configuration: Map<String, Value>, policy: Policy) -> Self {
        let remembered = reserved_for(policy.max_remembered);
        let order = policy.max_remembered.min(RESERVE_AT_MOST) + 1;
        Self {
            configuration,
            policy,
            jobs: HashMap::new(),
            job_queues: HashMap::new(),
            delayed: BTreeSet::new(),
            job_leases: BTreeSet::new(),
            next_seq: 0,
            pipelines: HashMap::new(),
            pipeline_queue: BTreeMap::new(),
            pipeline_leases: BTreeSet::new(),
            request_ids: HashMap::with_capacity(remembered),
            ended: HashMap::with_capacity(remembered),
            ended_order: VecDeque::with_capacity(order),
            waiting: VecDeque::new(),
            changes: Changes::default(),
        }
    }

    /// A state rebuilt from persisted records (queues, leases and back-offs included).
    pub fn restore(
        configuration: Map<String, Value>,
        policy: Policy,
        jobs: Vec<(JobId, JobRecord)>,
        pipelines: Vec<(PipelineId, PipelineRecord)>,
        ended: Vec<(PipelineId, EndedRecord)>,
    ) -> Self {
        let mut s = Self::new(configuration, policy);
        for (id, record) in jobs {
            s.next_seq = s.next_seq.max(record.seq + 1);
            match (record.state, record.not_before, record.lease_until) {
                (JobState::Queued, Some(t), _) => {
                    s.delayed.insert((t, id.clone()));
                }
                (JobState::Queued, None, _) => {
                    s.job_queues
                        .entry(record.worker.clone())
                        .or_default()
                        .insert(record.seq, id.clone());
                }
                (JobState::Running, _, Some(t)) => {
                    s.job_leases.insert((t, id.clone()));
                }
                _ => {}
            }
            s.jobs.insert(id, record);
        }
        for (id, record) in pipelines {
            s.next_seq = s.next_seq.max(record.seq + 1);
            match (record.state, record.lease_until) {
                (PipelineState::Queued, _) => {
                    s.pipeline_queue.insert(record.seq, id.clone());
                }
                (PipelineState::Running, Some(t)) => {
                    s.pipeline_leases.insert((t, id.clone()));
                }
                _ => {}
            }
            if let Some(r) = record.fields.get(REQUEST_ID).and_then(Value::as_str) {
                s.request_ids.insert(r.to_owned(), id.clone());
            }
            s.pipelines.insert(id, record);
        }
        let mut ended: Vec<_> = ended.into_iter().collect();
        ended.sort_by_key(|(_, e)| e.at);
        for (id, record) in ended {
            if let Some(r) = &record.request_id {
                s.request_ids.insert(r.clone(), id.clone());
            }
            s.ended_order.push_back((record.at, id.clone()));
            s.ended.insert(id, record);
        }
        s
    }

    /// The keys changed since the last call.
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.changes)
    }

    /// A job's record.
    pub fn job(&self, id: &JobId) -> Option<&JobRecord> {
        self.jobs.get(id)
    }

    /// A pending pipeline's record.
    pub fn pipeline(&self, id: &PipelineId) -> Option<&PipelineRecord> {
        self.pipelines.get(id)
    }

    /// An ended pipeline's outcome.
    pub fn ended(&self, id: &PipelineId) -> Option<&EndedRecord> {
        self.ended.get(id)
    }

    /// Applies `request` at `now` (ms since the epoch), returning the reply and pushing the
    /// events it causes onto `events`.
    pub fn handle(&mut self, request: Request, now: u64, events: &mut Vec<Event>) -> Reply {
        match request {
            Request::GetConfiguration => Reply::Configuration(self.configuration.clone()),
            Request::AddJob(job) => self.add_job(job, now, events),
            Request::GetJob(get) => Reply::Job(self.get_job(&get, now)),
            Request::JobFinished(done) => self.job_finished(done, now, events),
            Request::JobFailed(failed) => self.job_failed(failed, now, events),
            Request::AddPipeline(p) => self.add_pipeline(p, events),
            Request::GetPipeline => Reply::Pipeline(self.get_pipeline(now)),
            Request::GetJobs(get) => {
                if get.max > GetJobs::MAX {
                    return too_many("get jobs", get.max);
                }
                let one = GetJob {
                    workers: get.workers,
                };
                let jobs = (0..get.max).map_while(|_| self.get_job(&one, now));
                Reply::Jobs(jobs.collect())
            }
            Request::GetPipelines(get) => {
                if get.max > GetJobs::MAX {
                    return too_many("get pipelines", get.max);
                }
                let pipelines = (0..get.max).map_while(|_| self.get_pipeline(now));
                Reply::Pipelines(pipelines.collect())
            }
            Request::PipelineFinished(done) => self.pipeline_finished(done, now, events),
            Request::PipelineFailed(failed) => self.pipeline_failed(failed, now, events),
            Request::RenewLeases(renew) => self.renew_leases(renew, now),
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
                    .collect();
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
            Request::Batch(batch) => {
                if batch.requests.len() > Batch::MAX_REQUESTS {
                    return Answer::error(
                        AnswerKind::SyntaxError,
                        format!(
                            "a batch holds at most {} requests, this one {}",
                            Batch::MAX_REQUESTS,
                            batch.requests.len()
                        ),
                    )
                    .into();
                }
                let replies = batch
                    .decode()
                    .into_iter()
                    .map(|item| match item {
                        Ok(request) => self.handle(request, now, events),
                        Err(error) => Reply::for_error(&error),
                    })
                    .collect();
                Reply::Batch(replies)
            }
        }
    }

    /// Handles `request` as [`State::handle`] does, except a `get jobs` or `get pipelines` with
    /// `wait ms` that finds nothing queued: that one waits, kept under `ticket`, and this
    /// returns `None`; [`State::serve_waiting`] answers it later.
    pub fn handle_or_wait(
        &mut self,
        ticket: u64,
        request: Request,
        now: u64,
        events: &mut Vec<Event>,
    ) -> Option<Reply> {
        let (want, wait_ms) = match &request {
            Request::GetJobs(get) if (1..=GetJobs::MAX).contains(&get.max) => {
                let one = GetJob {
                    workers: get.workers.clone(),
                };
                (Want::Jobs(one, get.max), get.wait_ms)
            }
            Request::GetPipelines(get) if (1..=GetJobs::MAX).contains(&get.max) => {
                (Want::Pipelines(get.max), get.wait_ms)
            }
            _ => return Some(self.handle(request, now, events)),
        };
        let wait_ms = wait_ms.unwrap_or(0).min(GetJobs::MAX_WAIT_MS);
        if wait_ms == 0 || self.waiting.len() >= MAX_WAITING {
            return Some(self.handle(request, now, events));
        }
        if let Some(reply) = self.take(&want, now) {
            return Some(reply);
        }
        self.waiting.push_back(Waiting {
            ticket,
            until: now + wait_ms,
            want,
        });
        None
    }

    /// Answers the waiting requests that can be answered at `now`: with what is queued (the
    /// longest waiting first, each taking up to its `max`), or with nothing once their wait
    /// is over. Call it after the requests of a batch, so the jobs they queued are handed out
    /// in the same durable write.
    pub fn serve_waiting(&mut self, now: u64, served: &mut Vec<Served>) {
        if self.waiting.is_empty() {
            return;
        }
        let work = !self.job_queues.is_empty() || !self.pipeline_queue.is_empty();
        let mut waiting = std::mem::take(&mut self.waiting);
        waiting.retain(|w| {
            let reply = match work.then(|| self.take(&w.want, now)).flatten() {
                Some(reply) => reply,
                None if w.until <= now => w.want.nothing(),
                None => return true,
            };
            served.push(Served {
                ticket: w.ticket,
                reply,
            });
            false
        });
        self.waiting = waiting;
    }

    /// Answers every waiting request with nothing (the router is stopping).
    pub fn stop_waiting(&mut self, served: &mut Vec<Served>) {
        served.extend(self.waiting.drain(..).map(|w| Served {
            ticket: w.ticket,
            reply: w.want.nothing(),
        }));
    }

    /// Requests waiting for work now.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Takes back jobs and pipelines handed out in a reply that could not be delivered (its
    /// peer is gone): they are queued again in their old place, and no attempt is counted.
    pub fn take_back(&mut self, jobs: &[JobId], pipelines: &[PipelineId], events: &mut Vec<Event>) {
        for id in jobs {
            let Some(record) = self.jobs.get_mut(id) else {
                continue;
            };
            if record.state != JobState::Running {
                continue;
            }
            if let Some(t) = record.lease_until.take() {
                self.job_leases.remove(&(t, id.clone()));
            }
            record.state = JobState::Queued;
            self.job_queues
                .entry(record.worker.clone())
                .or_default()
                .insert(record.seq, id.clone());
            self.changes.jobs.insert(id.clone());
            events.push(Event::NewJob);
        }
        for id in pipelines {
            let Some(record) = self.pipelines.get_mut(id) else {
                continue;
            };
            if record.state != PipelineState::Running {
                continue;
            }
            if let Some(t) = record.lease_until.take() {
                self.pipeline_leases.remove(&(t, id.clone()));
            }
            record.state = PipelineState::Queued;
            self.pipeline_queue.insert(record.seq, id.clone());
            self.changes.pipelines.insert(id.clone());
            events.push(Event::NewPipeline);
        }
    }

    /// Up to what `want` asks for, from the queues; `None` when nothing is queued for it.
    fn take(&mut self, want: &Want, now: u64) -> Option<Reply> {
        match want {
            Want::Jobs(get, max) => {
                let jobs: Vec<_> = (0..*max).map_while(|_| self.get_job(get, now)).collect();
                (!jobs.is_empty()).then_some(Reply::Jobs(jobs))
            }
            Want::Pipelines(max) => {
                let pipelines: Vec<_> = (0..*max).map_while(|_| self.get_pipeline(now)).collect();
                (!pipelines.is_empty()).then_some(Reply::Pipelines(pipelines))
            }
        }
    }

    /// Lets time pass until `now`: expired leases put jobs and pipelines back in their queues,
    /// jobs whose back-off is over are queued again, old outcomes are forgotten.
    pub fn tick(&mut self, now: u64, events: &mut Vec<Event>) {
        while let Some((t, id)) = self.job_leases.first().cloned() {
            if t > now {
                break;
            }
            self.job_leases.remove(&(t, id.clone()));
            if let Some(record) = self.jobs.get_mut(&id) {
                record.lease_until = None;
                warn!(job_id = %id, worker = %record.worker, "job lease expired; the broker stopped renewing it");
            }
            self.attempt_failed(
                &id,
                "the job's lease expired (its broker stopped or hung)",
                now,
                events,
            );
        }
        while let Some((t, id)) = self.delayed.first().cloned() {
            if t > now {
                break;
            }
            self.delayed.remove(&(t, id.clone()));
            if let Some(record) = self.jobs.get_mut(&id) {
                record.not_before = None;
                self.job_queues
                    .entry(record.worker.clone())
                    .or_default()
                    .insert(record.seq, id.clone());
                self.changes.jobs.insert(id);
                events.push(Event::NewJob);
            }
        }
        while let Some((t, id)) = self.pipeline_leases.first().cloned() {
            if t > now {
                break;
            }
            self.pipeline_leases.remove(&(t, id.clone()));
            if let Some(record) = self.pipelines.get_mut(&id) {
                warn!(pipeline_id = %id, "pipeline lease expired; handing the pipeline to another pipeliner");
                record.state = PipelineState::Queued;
                record.lease_until = None;
                self.pipeline_queue.insert(record.seq, id.clone());
                self.changes.pipelines.insert(id);
                events.push(Event::NewPipeline);
            }
        }
        while let Some((at, _)) = self.ended_order.front() {
            if now.saturating_sub(*at) < self.policy.retention_ms
                && self.ended_order.len() <= self.policy.max_remembered
            {
                break;
            }
            if let Some((_, id)) = self.ended_order.pop_front() {
                if let Some(record) = self.ended.remove(&id) {
                    if let Some(r) = record.request_id {
                        self.request_ids.remove(&r);
                    }
                }
                self.changes.ended.insert(id);
            }
        }
    }

    /// Number of jobs waiting in queues (back-offs included).
    pub fn queued_jobs(&self) -> usize {
        self.job_queues.values().map(BTreeMap::len).sum::<usize>() + self.delayed.len()
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
            .map(|e| e.status.clone())
            .unwrap_or_else(|| PipelineStatus::of(PipelineState::Unknown))
    }

    fn max_attempts(&self, worker: &str) -> u32 {
        self.policy
            .attempts_per_worker
            .get(worker)
            .copied()
            .unwrap_or(self.policy.max_attempts)
            .max(1)
    }

    fn add_job(&mut self, job: NewJob, now: u64, events: &mut Vec<Event>) -> Reply {
        if job.worker.is_empty() {
            return Answer::error(AnswerKind::SyntaxError, "\"worker\" must not be empty").into();
        }
        let id = JobId::generate();
        let seq = self.next_seq;
        self.next_seq += 1;
        self.job_queues
            .entry(job.worker.clone())
            .or_default()
            .insert(seq, id.clone());
        // A job names its pipeline only while that pipeline is pending; otherwise it is a
        // job of its own.
        let pipeline_id = job.pipeline_id.filter(|p| self.pipelines.contains_key(p));
        if let Some(p) = &pipeline_id {
            if let Some(record) = self.pipelines.get_mut(p) {
                record.jobs.push(id.clone());
                self.changes.pipelines.insert(p.clone());
            }
        }
        // The pipeliner says this is the pipeline's last job: trusted, as its `pipeline
        // finished` would be.
        let ends_pipeline = match (&pipeline_id, job.ends_pipeline) {
            (Some(_), Some(elapsed)) => Some(EndsPipeline {
                elapsed: elapsed.as_secs().max(0.0),
                added_at: now,
            }),
            _ => None,
        };
        let ends = ends_pipeline.is_some();
        self.jobs.insert(
            id.clone(),
            JobRecord {
                seq,
                worker: job.worker,
                fields: job.fields,
                pipeline_id,
                state: JobState::Queued,
                attempts: 0,
                lease_until: None,
                not_before: None,
                error: None,
                ends_pipeline,
            },
        );
        self.changes.jobs.insert(id.clone());
        events.push(Event::NewJob);
        Answer {
            ends_pipeline: ends,
            ..Answer::new(AnswerKind::JobAccepted).with_job_id(id)
        }
        .into()
    }

    fn get_job(&mut self, get: &GetJob, now: u64) -> Option<JobAssignment> {
        fn front<'a>((w, q): (&'a String, &'a BTreeMap<u64, JobId>)) -> Option<(u64, &'a String)> {
            q.first_key_value().map(|(seq, _)| (*seq, w))
        }
        let best = match &get.workers {
            Some(workers) => workers
                .iter()
                .filter_map(|w| self.job_queues.get_key_value(w))
                .filter_map(front)
                .min(),
            None => self.job_queues.iter().filter_map(front).min(),
        };
        let worker = best?.1.clone();
        let queue = self.job_queues.get_mut(&worker)?;
        let (_, id) = queue.pop_first()?;
        if queue.is_empty() {
            self.job_queues.remove(&worker);
        }
        let lease_until = now + self.policy.job_lease_ms;
        let record = self.jobs.get_mut(&id)?;
        record.state = JobState::Running;
        record.lease_until = Some(lease_until);
        self.job_leases.insert((lease_until, id.clone()));
        self.changes.jobs.insert(id.clone());
        Some(JobAssignment {
            job_id: id,
            worker: record.worker.clone(),
            pipeline_id: record.pipeline_id.clone(),
            fields: record.fields.clone(),
        })
    }

    /// Takes a pending job out of its queue, back-off or lease. False when it is not pending.
    fn detach(&mut self, id: &JobId) -> bool {
        let Some(record) = self.jobs.get_mut(id) else {
            return false;
        };
        match record.state {
            JobState::Queued => {
                if let Some(t) = record.not_before.take() {
                    self.delayed.remove(&(t, id.clone()));
                } else if let Some(q) = self.job_queues.get_mut(&record.worker) {
                    q.remove(&record.seq);
                    if q.is_empty() {
                        self.job_queues.remove(&record.worker);
                    }
                }
                true
            }
            JobState::Running => {
                if let Some(t) = record.lease_until.take() {
                    self.job_leases.remove(&(t, id.clone()));
                }
                true
            }
            JobState::Finished | JobState::Failed | JobState::Unknown => false,
        }
    }

    /// Ends a detached job with `state`: a job of a pending pipeline keeps its record, any
    /// other job is forgotten.
    fn end_job(&mut self, id: &JobId, state: JobState, error: Option<String>) {
        self.changes.jobs.insert(id.clone());
        let Some(record) = self.jobs.get_mut(id) else {
            return;
        };
        if record.pipeline_id.is_some() {
            record.state = state;
            record.error = error;
        } else {
            self.jobs.remove(id);
        }
    }

    /// One attempt of a detached job failed: queue it again after a back-off, or fail it
    /// for good once it used its attempts.
    fn attempt_failed(&mut self, id: &JobId, error: &str, now: u64, events: &mut Vec<Event>) {
        let Some(record) = self.jobs.get_mut(id) else {
            return;
        };
        record.attempts += 1;
        record.error = Some(error.to_owned());
        let attempts = record.attempts;
        let worker = record.worker.clone();
        let max = self.max_attempts(&worker);
        if attempts >= max {
            let error = if max > 1 {
                format!("{error} (failed {attempts} of {max} attempts)")
            } else {
                error.to_owned()
            };
            events.push(Event::job_failed(id.clone(), &error));
            self.end_job(id, JobState::Failed, Some(error));
            return;
        }
        let backoff = self
            .policy
            .retry_backoff_ms
            .saturating_mul(1 << (attempts - 1).min(16))
            .min(30_000);
        let ready = now + backoff;
        if let Some(record) = self.jobs.get_mut(id) {
            record.state = JobState::Queued;
            record.not_before = Some(ready);
        }
        self.delayed.insert((ready, id.clone()));
        self.changes.jobs.insert(id.clone());
        debug!(job_id = %id, %worker, attempts, backoff_ms = backoff, "job will be retried");
    }

    fn job_finished(&mut self, done: JobFinished, now: u64, events: &mut Vec<Event>) -> Reply {
        // A late report of a job that ended already (re-run elsewhere, or reported twice) is
        // answered as the legacy router did and changes nothing.
        if !self.detach(&done.job_id) {
            return Answer::new(AnswerKind::UnknownJobId).into();
        }
        let ends = self.jobs.get(&done.job_id).and_then(|r| {
            let ends = r.ends_pipeline.as_ref()?;
            Some((r.pipeline_id.clone()?, ends.clone()))
        });
        self.end_job(&done.job_id, JobState::Finished, None);
        events.push(Event::job_finished(done.job_id, &done.duration));
        if let Some((pipeline_id, ends)) = ends {
            // Its pipeliner's `pipeline finished`, in the same write.
            let secs = ends.elapsed + now.saturating_sub(ends.added_at) as f64 / 1000.0;
            let duration = WireDuration::from_secs(secs);
            let status = PipelineStatus {
                duration: Some(duration.clone()),
                ..PipelineStatus::of(PipelineState::Finished)
            };
            if self.end_pipeline(&pipeline_id, status, now) {
                events.push(Event::pipeline_finished(pipeline_id, &duration));
            }
        }
        Answer::new(AnswerKind::GoodJob).into()
    }

    fn job_failed(&mut self, failed: JobFailed, now: u64, events: &mut Vec<Event>) -> Reply {
        // Only the run of a job counts: a stale report (the job was queued again meanwhile)
        // must not use up an attempt.
        let running = self
            .jobs
            .get(&failed.job_id)
            .is_some_and(|r| r.state == JobState::Running);
        if !running || !self.detach(&failed.job_id) {
            return Answer::new(AnswerKind::UnknownJobId).into();
        }
        let error = if failed.error.is_empty() {
            "the job failed (no error text)".to_owned()
        } else {
            failed.error
        };
        self.attempt_failed(&failed.job_id, &error, now, events);
        Answer::new(AnswerKind::FailureRecorded).into()
    }

    fn renew_leases(&mut self, renew: RenewLeases, now: u64) -> Reply {
        for id in renew.job_ids {
            if let Some(record) = self.jobs.get_mut(&id) {
                if let (JobState::Running, Some(old)) = (record.state, record.lease_until) {
                    let new = now + self.policy.job_lease_ms;
                    self.job_leases.remove(&(old, id.clone()));
                    self.job_leases.insert((new, id.clone()));
                    record.lease_until = Some(new);
                    self.changes.jobs.insert(id);
                }
            }
        }
        for id in renew.pipeline_ids {
            if let Some(record) = self.pipelines.get_mut(&id) {
                if let (PipelineState::Running, Some(old)) = (record.state, record.lease_until) {
                    let new = now + self.policy.pipeline_lease_ms;
                    self.pipeline_leases.remove(&(old, id.clone()));
                    self.pipeline_leases.insert((new, id.clone()));
                    record.lease_until = Some(new);
                    self.changes.pipelines.insert(id);
                }
            }
        }
        Answer::new(AnswerKind::LeasesRenewed).into()
    }

    fn add_pipeline(&mut self, new: NewPipeline, events: &mut Vec<Event>) -> Reply {
        let request_id = new
            .fields
            .get(REQUEST_ID)
            .and_then(Value::as_str)
            .map(str::to_owned);
        if let Some(existing) = request_id.as_ref().and_then(|r| self.request_ids.get(r)) {
            // The client retried a request whose answer it lost: same pipeline, same id.
            return Answer::new(AnswerKind::PipelineAccepted)
                .with_pipeline_id(existing.clone())
                .into();
        }
        if let Err(e) = Pipeline::from_legacy(&new.pipeline) {
            return Answer::error(AnswerKind::InvalidPipeline, e.to_string()).into();
        }
        let Ok(pipeline) = serde_json::value::to_raw_value(&new.pipeline) else {
            return Answer::error(
                AnswerKind::InvalidPipeline,
                "the pipeline cannot be encoded",
            )
            .into();
        };
        if self.pipeline_queue.len() >= self.policy.max_queued_pipelines {
            return Answer::error(
                AnswerKind::QueueFull,
                format!(
                    "{} pipelines are queued; retry later",
                    self.pipeline_queue.len()
                ),
            )
            .into();
        }
        let id = PipelineId::generate();
        let seq = self.next_seq;
        self.next_seq += 1;
        self.pipeline_queue.insert(seq, id.clone());
        if let Some(r) = request_id {
            self.request_ids.insert(r, id.clone());
        }
        self.pipelines.insert(
            id.clone(),
            PipelineRecord {
                seq,
                pipeline,
                fields: new.fields,
                state: PipelineState::Queued,
                jobs: Vec::new(),
                lease_until: None,
            },
        );
        self.changes.pipelines.insert(id.clone());
        events.push(Event::NewPipeline);
        Answer::new(AnswerKind::PipelineAccepted)
            .with_pipeline_id(id)
            .into()
    }

    fn get_pipeline(&mut self, now: u64) -> Option<PipelineHandout> {
        let (_, id) = self.pipeline_queue.pop_first()?;
        let lease_until = now + self.policy.pipeline_lease_ms;
        let record = self.pipelines.get_mut(&id)?;
        record.state = PipelineState::Running;
        record.lease_until = Some(lease_until);
        self.pipeline_leases.insert((lease_until, id.clone()));
        self.changes.pipelines.insert(id.clone());
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
        Some(PipelineHandout {
            pipeline_id: id,
            pipeline: record.pipeline.clone(),
            submitted_jobs,
            fields: record.fields.clone(),
        })
    }

    /// Ends a pending pipeline: forgets it and its jobs, remembers `status` for the
    /// retention time. False when the pipeline is not pending.
    fn end_pipeline(&mut self, id: &PipelineId, status: PipelineStatus, now: u64) -> bool {
        let Some(record) = self.pipelines.remove(id) else {
            return false;
        };
        match record.state {
            PipelineState::Queued => {
                self.pipeline_queue.remove(&record.seq);
            }
            _ => {
                if let Some(t) = record.lease_until {
                    self.pipeline_leases.remove(&(t, id.clone()));
                }
            }
        }
        for job in &record.jobs {
            self.detach(job);
            self.jobs.remove(job);
            self.changes.jobs.insert(job.clone());
        }
        let request_id = record
            .fields
            .get(REQUEST_ID)
            .and_then(Value::as_str)
            .map(str::to_owned);
        self.ended.insert(
            id.clone(),
            EndedRecord {
                status,
                at: now,
                request_id,
            },
        );
        self.ended_order.push_back((now, id.clone()));
        self.changes.pipelines.insert(id.clone());
        self.changes.ended.insert(id.clone());
        true
    }

    fn pipeline_finished(
        &mut self,
        done: PipelineFinished,
        now: u64,
        events: &mut Vec<Event>,
    ) -> Reply {
        let status = PipelineStatus {
            duration: Some(done.duration.clone()),
            ..PipelineStatus::of(PipelineState::Finished)
        };
        if !self.end_pipeline(&done.pipeline_id, status, now) {
            // Not pending (as the legacy router answers), ended already included.
            return Answer::new(AnswerKind::UnknownPipelineId).into();
        }
        events.push(Event::pipeline_finished(done.pipeline_id, &done.duration));
        Answer::new(AnswerKind::GoodJob).into()
    }

    fn pipeline_failed(
        &mut self,
        failed: PipelineFailed,
        now: u64,
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

impl State {
    /// Checks that the queues, the back-off set, the lease tables, the records and the
    /// remembered outcomes agree: every pending job is in exactly the one place its state
    /// says (its worker's queue at its sequence number, the back-off set until its time, or
    /// the lease table until its lease ends), every pending pipeline likewise, and nothing
    /// stale is left in any index. Run after every step of the property tests and of the fuzz
    /// target; `Err` says what does not hold.
    ///
    /// # Errors
    /// The first inconsistency found.
    pub fn check_invariants(&self) -> Result<(), String> {
        let (mut queued, mut delayed, mut leased) = (0, 0, 0);
        for (id, r) in &self.jobs {
            if r.seq >= self.next_seq {
                return Err(format!(
                    "job {id} has seq {} >= next seq {}",
                    r.seq, self.next_seq
                ));
            }
            let in_queue = self
                .job_queues
                .get(&r.worker)
                .and_then(|q| q.get(&r.seq))
                .is_some_and(|q| q == id);
            match (r.state, r.not_before, r.lease_until) {
                (JobState::Queued, None, None) if in_queue => queued += 1,
                (JobState::Queued, Some(t), None)
                    if !in_queue && self.delayed.contains(&(t, id.clone())) =>
                {
                    delayed += 1
                }
                (JobState::Running, None, Some(t))
                    if !in_queue && self.job_leases.contains(&(t, id.clone())) =>
                {
                    leased += 1
                }
                (JobState::Finished | JobState::Failed, None, None)
                    if !in_queue && r.pipeline_id.is_some() => {}
                (state, not_before, lease) => {
                    return Err(format!(
                        "job {id} is {state:?} with back-off {not_before:?}, lease {lease:?}, \
                         in its queue: {in_queue}"
                    ))
                }
            }
            if let Some(p) = &r.pipeline_id {
                if !self.pipelines.get(p).is_some_and(|pr| pr.jobs.contains(id)) {
                    return Err(format!(
                        "job {id} names pipeline {p}, which does not list it"
                    ));
                }
            }
        }
        let in_queues: usize = self.job_queues.values().map(BTreeMap::len).sum();
        if self.job_queues.values().any(BTreeMap::is_empty) {
            return Err("an empty job queue is kept".into());
        }
        if (in_queues, self.delayed.len(), self.job_leases.len()) != (queued, delayed, leased) {
            return Err(format!(
                "indexes hold {in_queues} queued, {} delayed, {} leased jobs; records say \
                 {queued}, {delayed}, {leased}",
                self.delayed.len(),
                self.job_leases.len()
            ));
        }
        let (mut queued, mut leased) = (0, 0);
        for (id, r) in &self.pipelines {
            if r.seq >= self.next_seq {
                return Err(format!("pipeline {id} has seq {} >= next seq", r.seq));
            }
            match (r.state, r.lease_until) {
                (PipelineState::Queued, None)
                    if self.pipeline_queue.get(&r.seq).is_some_and(|q| q == id) =>
                {
                    queued += 1
                }
                (PipelineState::Running, Some(t))
                    if self.pipeline_leases.contains(&(t, id.clone())) =>
                {
                    leased += 1
                }
                (state, lease) => {
                    return Err(format!("pipeline {id} is {state:?} with lease {lease:?}"))
                }
            }
            if let Some(job) = r.jobs.iter().find(|j| !self.jobs.contains_key(*j)) {
                return Err(format!(
                    "pipeline {id} lists job {job}, which has no record"
                ));
            }
            if self.ended.contains_key(id) {
                return Err(format!("pipeline {id} is both pending and ended"));
            }
        }
        if (self.pipeline_queue.len(), self.pipeline_leases.len()) != (queued, leased) {
            return Err(format!(
                "indexes hold {} queued and {} leased pipelines; records say {queued}, {leased}",
                self.pipeline_queue.len(),
                self.pipeline_leases.len()
            ));
        }
        if self.ended_order.len() != self.ended.len()
            || self
                .ended_order
                .iter()
                .any(|(at, id)| self.ended.get(id).is_none_or(|e| e.at != *at))
        {
            return Err("the order of ended pipelines does not match their outcomes".into());
        }
        for (request_id, id) in &self.request_ids {
            if !self.pipelines.contains_key(id) && !self.ended.contains_key(id) {
                return Err(format!(
                    "request id {request_id} names unknown pipeline {id}"
                ));
            }
        }
        if self.waiting.len() > MAX_WAITING {
            return Err(format!(
                "{} requests wait, more than {MAX_WAITING}",
                self.waiting.len()
            ));
        }
        Ok(())
    }
}

/// The answer to a `get jobs` / `get pipelines` asking for more than [`GetJobs::MAX`].
fn too_many(command: &str, max: usize) -> Reply {
    Answer::error(
        AnswerKind::SyntaxError,
        format!(
            "{command} takes at most {} at once, not {max}",
            GetJobs::MAX
        ),
    )
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use pypelinin_common::protocol::request::{GetPipelines, JobStatusQuery, PipelineStatusQuery};
    use pypelinin_common::protocol::WireDuration;
    use serde_json::json;

    const T0: u64 = 1_000_000;

    fn add_in(state: &mut State, worker: &str, pipeline: Option<&PipelineId>) -> JobId {
        let mut job = NewJob::new(worker, json!({"w": worker}));
        job.pipeline_id = pipeline.cloned();
        let reply = state.handle(Request::AddJob(job), T0, &mut vec![]);
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

    fn get_at(state: &mut State, workers: Option<&[&str]>, now: u64) -> Option<JobAssignment> {
        let workers = workers.map(|w| w.iter().map(|s| s.to_string()).collect());
        match state.handle(Request::GetJob(GetJob { workers }), now, &mut vec![]) {
            Reply::Job(j) => j,
            other => panic!("{other:?}"),
        }
    }

    fn get(state: &mut State, workers: Option<&[&str]>) -> Option<JobAssignment> {
        get_at(state, workers, T0)
    }

    fn pipeline_json() -> Value {
        json!([
            ["graph", [[[["worker_name", "A"]], [["worker_name", "B"]]]]],
            ["data", null]
        ])
    }

    fn add_pipeline(state: &mut State, fields: Map<String, Value>) -> Reply {
        state.handle(
            Request::AddPipeline(NewPipeline {
                pipeline: pipeline_json(),
                fields,
            }),
            T0,
            &mut vec![],
        )
    }

    fn new_pipeline(state: &mut State) -> PipelineId {
        let Reply::Answer(Answer {
            pipeline_id: Some(id),
            ..
        }) = add_pipeline(state, Map::new())
        else {
            panic!()
        };
        id
    }

    fn take_pipeline(
        state: &mut State,
        now: u64,
    ) -> Option<pypelinin_common::protocol::PipelineAssignment> {
        match state.handle(Request::GetPipeline, now, &mut vec![]) {
            reply @ Reply::Pipeline(_) => pypelinin_common::protocol::reply::decode_reply::<
                Option<pypelinin_common::protocol::PipelineAssignment>,
            >(&reply.encode())
            .unwrap(),
            other => panic!("{other:?}"),
        }
    }

    fn job_state(state: &mut State, id: &JobId) -> JobState {
        let q = JobStatusQuery {
            job_ids: vec![id.clone()],
        };
        let Reply::Answer(Answer {
            jobs: Some(jobs), ..
        }) = state.handle(Request::JobStatus(q), T0, &mut vec![])
        else {
            panic!()
        };
        jobs[id]
    }

    fn pipeline_state(state: &mut State, id: &PipelineId) -> PipelineStatus {
        let q = PipelineStatusQuery {
            pipeline_ids: vec![id.clone()],
        };
        let Reply::Answer(Answer {
            pipelines: Some(mut p),
            ..
        }) = state.handle(Request::PipelineStatus(q), T0, &mut vec![])
        else {
            panic!()
        };
        p.remove(id).unwrap()
    }

    fn fail(state: &mut State, id: &JobId, now: u64, events: &mut Vec<Event>) -> Reply {
        let f = JobFailed {
            job_id: id.clone(),
            error: "boom".into(),
            duration: None,
        };
        state.handle(Request::JobFailed(f), now, events)
    }

    fn finish(state: &mut State, id: &JobId, events: &mut Vec<Event>) -> Reply {
        let done = JobFinished {
            job_id: id.clone(),
            duration: WireDuration::from_secs(1.5),
        };
        state.handle(Request::JobFinished(done), T0, events)
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

    fn wait_for(workers: &[&str], max: usize, wait_ms: u64) -> Request {
        Request::GetJobs(GetJobs {
            workers: Some(workers.iter().map(|w| w.to_string()).collect()),
            max,
            wait_ms: Some(wait_ms),
        })
    }

    /// The job ids of each served reply, by ticket.
    fn served_jobs(served: Vec<Served>) -> Vec<(u64, Vec<JobId>)> {
        served
            .into_iter()
            .map(|s| match s.reply {
                Reply::Jobs(jobs) => (s.ticket, jobs.into_iter().map(|j| j.job_id).collect()),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn waiting_requests_take_the_jobs_queued_after_them_in_order() {
        let mut s = State::default();
        let mut events = vec![];
        assert!(s
            .handle_or_wait(1, wait_for(&["A"], 2, 1_000), T0, &mut events)
            .is_none());
        assert!(s
            .handle_or_wait(2, wait_for(&["B"], 1, 1_000), T0, &mut events)
            .is_none());
        assert!(s
            .handle_or_wait(3, wait_for(&["A"], 5, 1_000), T0, &mut events)
            .is_none());
        assert_eq!(s.waiting(), 3);
        s.take_changes();
        let a1 = add(&mut s, "A");
        let b1 = add(&mut s, "B");
        let a2 = add(&mut s, "A");
        let b2 = add(&mut s, "B");
        let mut served = vec![];
        s.serve_waiting(T0, &mut served);
        // The longest waiting first, each up to its max; the third waits on.
        assert_eq!(
            served_jobs(served),
            vec![(1, vec![a1.clone(), a2.clone()]), (2, vec![b1.clone()])]
        );
        assert_eq!(s.waiting(), 1);
        for id in [&a1, &a2, &b1] {
            assert_eq!(s.job(id).unwrap().state, JobState::Running);
            assert_eq!(s.job(id).unwrap().lease_until, Some(T0 + 30_000));
        }
        // Handed out in the same batch: their leases are in this batch's durable write.
        assert!(s.take_changes().jobs.contains(&a1));
        assert_eq!(get(&mut s, None).unwrap().job_id, b2);
        // A request that finds jobs queued is answered at once.
        let a3 = add(&mut s, "A");
        let mut served = vec![];
        s.serve_waiting(T0, &mut served);
        assert_eq!(served_jobs(served), vec![(3, vec![a3])]);
        let b3 = add(&mut s, "B");
        match s.handle_or_wait(4, wait_for(&["B"], 1, 1_000), T0, &mut events) {
            Some(Reply::Jobs(jobs)) => assert_eq!(jobs[0].job_id, b3),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_wait_ends_empty_at_its_deadline_or_when_the_router_stops() {
        let mut s = State::default();
        let mut events = vec![];
        assert!(s
            .handle_or_wait(7, wait_for(&["A"], 1, 500), T0, &mut events)
            .is_none());
        let pipelines = Request::GetPipelines(GetPipelines {
            max: 3,
            wait_ms: Some(GetJobs::MAX_WAIT_MS + 1),
        });
        assert!(s.handle_or_wait(8, pipelines, T0, &mut events).is_none());
        let mut served = vec![];
        s.serve_waiting(T0 + 499, &mut served);
        assert!(served.is_empty());
        s.serve_waiting(T0 + 500, &mut served);
        assert_eq!(served_jobs(served), vec![(7, vec![])]);
        // A longer wait than the most granted waits that long.
        let mut served = vec![];
        s.serve_waiting(T0 + GetJobs::MAX_WAIT_MS - 1, &mut served);
        assert!(served.is_empty());
        s.serve_waiting(T0 + GetJobs::MAX_WAIT_MS, &mut served);
        assert!(
            matches!(&served[..], [Served { ticket: 8, reply: Reply::Pipelines(p) }] if p.is_empty())
        );
        assert!(s
            .handle_or_wait(9, wait_for(&["A"], 1, 500), T0, &mut events)
            .is_none());
        let mut served = vec![];
        s.stop_waiting(&mut served);
        assert_eq!(served_jobs(served), vec![(9, vec![])]);
        assert_eq!(s.waiting(), 0);
        // The queued pipeline a waiting request would have taken stays for the next one.
        let p = new_pipeline(&mut s);
        let mut served = vec![];
        s.serve_waiting(T0, &mut served);
        assert!(served.is_empty());
        assert_eq!(take_pipeline(&mut s, T0).unwrap().pipeline_id, p);
    }

    #[test]
    fn only_a_lone_get_jobs_or_get_pipelines_with_a_wait_waits() {
        let mut s = State::default();
        let mut events = vec![];
        let answered_at_once = [
            Request::GetJobs(GetJobs::new(None, 1)),
            wait_for(&["A"], 1, 0),
            wait_for(&["A"], 0, 1_000),
            wait_for(&["A"], GetJobs::MAX + 1, 1_000),
            Request::GetPipelines(GetPipelines::new(1)),
            Request::Batch(Batch::of(&[wait_for(&["A"], 1, 1_000)])),
            Request::GetJob(GetJob { workers: None }),
        ];
        for request in answered_at_once {
            let shown = format!("{request:?}");
            assert!(
                s.handle_or_wait(1, request, T0, &mut events).is_some(),
                "{shown}"
            );
        }
        assert_eq!(s.waiting(), 0);
    }

    #[test]
    fn work_taken_back_is_queued_in_its_old_place_without_using_an_attempt() {
        let mut s = State::default();
        let mut events = vec![];
        let j1 = add(&mut s, "A");
        let j2 = add(&mut s, "A");
        let p1 = new_pipeline(&mut s);
        let p2 = new_pipeline(&mut s);
        let got = get(&mut s, None).unwrap();
        assert_eq!(got.job_id, j1);
        assert_eq!(take_pipeline(&mut s, T0).unwrap().pipeline_id, p1);
        s.take_changes();
        s.take_back(
            std::slice::from_ref(&j1),
            std::slice::from_ref(&p1),
            &mut events,
        );
        assert_eq!(events, vec![Event::NewJob, Event::NewPipeline]);
        let changes = s.take_changes();
        assert!(changes.jobs.contains(&j1) && changes.pipelines.contains(&p1));
        let record = s.job(&j1).unwrap();
        assert_eq!(
            (record.state, record.attempts, record.lease_until),
            (JobState::Queued, 0, None)
        );
        // No lease left to expire.
        let mut later = vec![];
        s.tick(T0 + 60_000, &mut later);
        assert_eq!(s.job(&j1).unwrap().attempts, 0);
        assert_eq!(get(&mut s, None).unwrap().job_id, j1);
        assert_eq!(get(&mut s, None).unwrap().job_id, j2);
        assert_eq!(take_pipeline(&mut s, T0).unwrap().pipeline_id, p1);
        assert_eq!(take_pipeline(&mut s, T0).unwrap().pipeline_id, p2);
        // Only running work is taken back: a finished job stays finished.
        let mut events = vec![];
        finish(&mut s, &j2, &mut events);
        s.take_back(std::slice::from_ref(&j2), &[], &mut events);
        assert!(s.job(&j2).is_none());
        assert!(get(&mut s, None).is_none());
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
        assert_eq!(
            finish(&mut s, &id, &mut events),
            Answer::new(AnswerKind::GoodJob).into()
        );
        assert_eq!(
            finish(&mut s, &id, &mut events),
            Answer::new(AnswerKind::UnknownJobId).into()
        );
        assert_eq!(
            events,
            vec![Event::job_finished(id, &WireDuration::from_secs(1.5))]
        );
        assert!(
            get(&mut s, None).is_none(),
            "a job finished before it was taken is not handed out"
        );
        assert_eq!(s.job_records(), 0);
    }

    #[test]
    fn a_failed_job_is_retried_with_backoff_then_failed_for_good() {
        let mut s = State::default();
        let id = add(&mut s, "A");
        let mut events = vec![];
        for attempt in 1..=2u64 {
            get(&mut s, None).unwrap();
            assert_eq!(
                fail(&mut s, &id, T0, &mut events),
                Answer::new(AnswerKind::FailureRecorded).into()
            );
            assert_eq!(job_state(&mut s, &id), JobState::Queued);
            assert!(get(&mut s, None).is_none(), "backing off");
            let backoff = 500 * (1 << (attempt - 1));
            s.tick(T0 + backoff - 1, &mut events);
            assert!(get(&mut s, None).is_none());
            s.tick(T0 + backoff, &mut events);
            assert!(events.contains(&Event::NewJob));
            events.clear();
        }
        get(&mut s, None).unwrap();
        fail(&mut s, &id, T0, &mut events);
        assert_eq!(events.len(), 1);
        assert!(
            matches!(&events[0], Event::JobFailed { error, .. } if error == "boom (failed 3 of 3 attempts)"),
            "{events:?}"
        );
        assert_eq!(
            fail(&mut s, &id, T0, &mut events),
            Answer::new(AnswerKind::UnknownJobId).into()
        );
    }

    #[test]
    fn attempts_are_configured_per_worker() {
        let policy = Policy {
            attempts_per_worker: HashMap::from([("Once".to_owned(), 1)]),
            ..Policy::default()
        };
        let mut s = State::new(Map::new(), policy);
        let id = add(&mut s, "Once");
        get(&mut s, None).unwrap();
        let mut events = vec![];
        fail(&mut s, &id, T0, &mut events);
        assert!(matches!(&events[..], [Event::JobFailed { error, .. }] if error == "boom"));
    }

    #[test]
    fn an_expired_lease_requeues_the_job_and_a_renewed_one_does_not() {
        let mut s = State::default();
        let a = add(&mut s, "A");
        let b = add(&mut s, "A");
        get(&mut s, None).unwrap();
        get(&mut s, None).unwrap();
        let mut events = vec![];
        let renew = RenewLeases {
            job_ids: vec![b.clone()],
            pipeline_ids: vec![],
        };
        assert_eq!(
            s.handle(Request::RenewLeases(renew), T0 + 20_000, &mut events),
            Answer::new(AnswerKind::LeasesRenewed).into()
        );
        s.tick(T0 + 30_000, &mut events);
        assert_eq!(job_state(&mut s, &a), JobState::Queued, "a's lease expired");
        assert_eq!(
            job_state(&mut s, &b),
            JobState::Running,
            "b's lease was renewed"
        );
        assert_eq!(s.job(&a).unwrap().attempts, 1);
        s.tick(T0 + 30_500, &mut events);
        assert_eq!(
            get_at(&mut s, None, T0 + 30_500).unwrap().job_id,
            a,
            "handed out again"
        );
        // The late report of the first holder still counts once; the second holder's is ignored.
        assert_eq!(
            finish(&mut s, &a, &mut events),
            Answer::new(AnswerKind::GoodJob).into()
        );
        assert_eq!(
            finish(&mut s, &a, &mut events),
            Answer::new(AnswerKind::UnknownJobId).into()
        );
    }

    #[test]
    fn an_expired_pipeline_lease_hands_the_pipeline_out_again_with_its_jobs() {
        let mut s = State::default();
        let p = new_pipeline(&mut s);
        assert!(take_pipeline(&mut s, T0).unwrap().submitted_jobs.is_empty());
        let a = add_in(&mut s, "A", Some(&p));
        finish(&mut s, &a, &mut vec![]);
        assert!(take_pipeline(&mut s, T0).is_none());
        let mut events = vec![];
        s.tick(T0 + 30_000, &mut events);
        assert_eq!(events, vec![Event::NewPipeline]);
        let again = take_pipeline(&mut s, T0 + 30_000).unwrap();
        assert_eq!(again.pipeline_id, p);
        assert_eq!(
            again.submitted_jobs,
            vec![SubmittedJob {
                job_id: a,
                worker: "A".into(),
                state: JobState::Finished
            }]
        );
    }

    #[test]
    fn ended_pipelines_forget_their_jobs_and_are_remembered_for_the_retention_time() {
        let mut s = State::default();
        let p = new_pipeline(&mut s);
        take_pipeline(&mut s, T0);
        let a = add_in(&mut s, "A", Some(&p));
        let queued = add_in(&mut s, "B", Some(&p));
        finish(&mut s, &a, &mut vec![]);
        assert_eq!(job_state(&mut s, &a), JobState::Finished);
        let done = PipelineFinished {
            pipeline_id: p.clone(),
            duration: WireDuration::from_secs(2.0),
        };
        s.handle(Request::PipelineFinished(done), T0, &mut vec![]);
        assert_eq!(
            (job_state(&mut s, &a), job_state(&mut s, &queued)),
            (JobState::Unknown, JobState::Unknown)
        );
        assert!(
            get(&mut s, None).is_none(),
            "the ended pipeline's queued job is gone"
        );
        assert_eq!(s.job_records(), 0);
        assert_eq!(pipeline_state(&mut s, &p).state, PipelineState::Finished);
        s.tick(T0 + 299_999, &mut vec![]);
        assert_eq!(pipeline_state(&mut s, &p).state, PipelineState::Finished);
        s.tick(T0 + 300_000, &mut vec![]);
        assert_eq!(pipeline_state(&mut s, &p).state, PipelineState::Unknown);
        assert_eq!(s.remembered_pipelines(), 0);
    }

    fn add_last(state: &mut State, worker: &str, pipeline: &PipelineId, now: u64) -> Answer {
        let job = NewJob::new(worker, json!(null))
            .in_pipeline(pipeline.clone())
            .ending_pipeline(std::time::Duration::from_millis(250));
        match state.handle(Request::AddJob(job), now, &mut vec![]) {
            Reply::Answer(a) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_pipeline_ends_with_its_last_job_in_the_same_transition() {
        let mut s = State::default();
        let p = new_pipeline(&mut s);
        take_pipeline(&mut s, T0);
        let a = add_in(&mut s, "A", Some(&p));
        finish(&mut s, &a, &mut vec![]);
        let accepted = add_last(&mut s, "B", &p, T0);
        assert!(accepted.ends_pipeline, "{accepted:?}");
        let b = accepted.job_id.unwrap();
        assert_eq!(get(&mut s, None).unwrap().job_id, b);
        let mut events = vec![];
        let done = JobFinished {
            job_id: b.clone(),
            duration: WireDuration::from_secs(0.1),
        };
        s.handle(Request::JobFinished(done), T0 + 1_500, &mut events);
        let shown: Vec<String> = events.iter().map(ToString::to_string).collect();
        assert_eq!(shown.len(), 2, "{shown:?}");
        assert_eq!(shown[0], format!("job finished: {b} duration: 0.1"));
        assert_eq!(
            shown[1],
            format!("pipeline finished: id={p}, duration=1.75"),
            "run time: 0.25 s before its last job was added, then 1.5 s"
        );
        let status = pipeline_state(&mut s, &p);
        assert_eq!(status.state, PipelineState::Finished);
        assert_eq!(status.duration, Some(WireDuration::from_secs(1.75)));
        assert_eq!(s.job_records(), 0, "its jobs are forgotten with it");
        // A pipeliner's own report, if one comes, finds it ended and changes nothing.
        let mut events = vec![];
        let report = PipelineFinished {
            pipeline_id: p.clone(),
            duration: WireDuration::from_secs(2.0),
        };
        let reply = s.handle(Request::PipelineFinished(report), T0, &mut events);
        assert!(matches!(reply, Reply::Answer(a) if a.answer == AnswerKind::UnknownPipelineId));
        assert!(events.is_empty(), "{events:?}");
        assert_eq!(
            pipeline_state(&mut s, &p).duration,
            Some(WireDuration::from_secs(1.75))
        );
    }

    #[test]
    fn a_last_job_that_fails_or_has_no_pending_pipeline_ends_nothing() {
        let mut s = State::new(
            Map::new(),
            Policy {
                max_attempts: 1,
                ..Policy::default()
            },
        );
        let p = new_pipeline(&mut s);
        take_pipeline(&mut s, T0);
        let b = add_last(&mut s, "B", &p, T0).job_id.unwrap();
        get(&mut s, None).unwrap();
        let mut events = vec![];
        fail(&mut s, &b, T0, &mut events);
        assert_eq!(events.len(), 1, "only the job's failure: {events:?}");
        assert_eq!(
            pipeline_state(&mut s, &p).state,
            PipelineState::Running,
            "the pipeliner reports the failed pipeline"
        );

        let unknown = add_last(&mut s, "C", &PipelineId::from("nope"), T0);
        assert!(!unknown.ends_pipeline, "no pending pipeline to end");
        let c = unknown.job_id.unwrap();
        get(&mut s, None).unwrap();
        let mut events = vec![];
        finish(&mut s, &c, &mut events);
        assert_eq!(events.len(), 1, "{events:?}");
    }

    #[test]
    fn past_the_cap_the_oldest_outcomes_go_first() {
        let mut s = State::new(
            Map::new(),
            Policy {
                max_remembered: 2,
                ..Policy::default()
            },
        );
        let ids: Vec<PipelineId> = (0..3)
            .map(|_| {
                let p = new_pipeline(&mut s);
                take_pipeline(&mut s, T0);
                let done = PipelineFinished {
                    pipeline_id: p.clone(),
                    duration: WireDuration::from_secs(1.0),
                };
                s.handle(Request::PipelineFinished(done), T0, &mut vec![]);
                p
            })
            .collect();
        s.tick(T0, &mut vec![]);
        assert_eq!(s.remembered_pipelines(), 2);
        let states: Vec<_> = ids
            .iter()
            .map(|p| pipeline_state(&mut s, p).state)
            .collect();
        assert_eq!(
            states,
            [
                PipelineState::Unknown,
                PipelineState::Finished,
                PipelineState::Finished
            ]
        );
    }

    #[test]
    fn remembered_outcomes_never_grow_their_tables_under_churn() {
        // 20 times the cap ends, each with a request id: the oldest outcomes leave as new ones
        // come, and the tables sized at start take it without growing.
        let mut s = State::new(
            Map::new(),
            Policy {
                max_remembered: 1_000,
                ..Policy::default()
            },
        );
        let capacities = |s: &State| (s.ended.capacity(), s.request_ids.capacity());
        let at_start = capacities(&s);
        for n in 0..20_000 {
            let mut fields = Map::new();
            fields.insert(REQUEST_ID.to_owned(), json!(format!("r{n}")));
            let Reply::Answer(Answer {
                pipeline_id: Some(p),
                ..
            }) = add_pipeline(&mut s, fields)
            else {
                panic!("add pipeline refused")
            };
            take_pipeline(&mut s, T0);
            let done = PipelineFinished {
                pipeline_id: p,
                duration: WireDuration::from_secs(1.0),
            };
            s.handle(Request::PipelineFinished(done), T0, &mut vec![]);
            s.tick(T0, &mut vec![]);
        }
        assert_eq!(s.remembered_pipelines(), 1_000);
        // `capacity` is what fits before the next growth: tombstones lower it until an
        // in-place rehash; a table that doubled would show more than at start.
        let (ended, ids) = capacities(&s);
        assert!(
            ended <= at_start.0 && ids <= at_start.1,
            "a table grew: {:?} at start, {:?} now",
            at_start,
            (ended, ids)
        );
    }

    #[test]
    fn a_failed_pipeline_is_reported_with_its_job_and_error() {
        let mut s = State::default();
        let p = new_pipeline(&mut s);
        let a = add_in(&mut s, "A", Some(&p));
        let mut events = vec![];
        let failed = PipelineFailed {
            pipeline_id: p.clone(),
            job_id: a.clone(),
            worker: "A".into(),
            error: "boom".into(),
            duration: None,
        };
        let reply = s.handle(Request::PipelineFailed(failed.clone()), T0, &mut events);
        assert_eq!(reply, Answer::new(AnswerKind::FailureRecorded).into());
        assert_eq!(
            events,
            vec![Event::pipeline_failed(p.clone(), a.clone(), "A", "boom")]
        );
        let status = pipeline_state(&mut s, &p);
        assert_eq!(
            (status.state, status.error.as_deref(), status.job_id),
            (PipelineState::Failed, Some("boom"), Some(a))
        );
        assert_eq!(
            s.handle(Request::PipelineFailed(failed), T0, &mut vec![]),
            Answer::new(AnswerKind::UnknownPipelineId).into()
        );
    }

    #[test]
    fn a_full_queue_refuses_pipelines_until_one_is_taken() {
        let mut s = State::new(
            Map::new(),
            Policy {
                max_queued_pipelines: 2,
                ..Policy::default()
            },
        );
        new_pipeline(&mut s);
        new_pipeline(&mut s);
        let Reply::Answer(a) = add_pipeline(&mut s, Map::new()) else {
            panic!()
        };
        assert_eq!(a.answer, AnswerKind::QueueFull);
        assert!(a.error.unwrap().contains("2 pipelines are queued"));
        take_pipeline(&mut s, T0);
        new_pipeline(&mut s);
    }

    #[test]
    fn a_repeated_request_id_gives_the_same_pipeline() {
        let mut s = State::default();
        let fields: Map<String, Value> = json!({"request id": "r-1"}).as_object().cloned().unwrap();
        let first = add_pipeline(&mut s, fields.clone());
        assert_eq!(add_pipeline(&mut s, fields), first);
        assert_eq!(s.pending_pipelines(), 1);
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
            T0,
            &mut vec![],
        );
        let Reply::Answer(a) = reply else { panic!() };
        assert_eq!(a.answer, AnswerKind::InvalidPipeline);
        assert!(a.error.unwrap().contains("cycle"));
        assert_eq!(s.pending_pipelines(), 0);
    }

    #[test]
    fn restoring_the_records_gives_back_queues_leases_and_backoffs() {
        let mut s = State::default();
        let p = new_pipeline(&mut s);
        let queued = add(&mut s, "A");
        let running = add(&mut s, "B");
        let retrying = add(&mut s, "C");
        let later = add(&mut s, "A");
        get(&mut s, Some(&["B"])).unwrap();
        get(&mut s, Some(&["C"])).unwrap();
        fail(&mut s, &retrying, T0, &mut vec![]);
        let jobs = s.jobs.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let pipelines = s
            .pipelines
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut r = State::restore(Map::new(), Policy::default(), jobs, pipelines, vec![]);
        assert_eq!(get(&mut r, None).unwrap().job_id, queued);
        assert_eq!(get(&mut r, None).unwrap().job_id, later);
        assert!(get(&mut r, None).is_none());
        let mut events = vec![];
        finish(&mut r, &queued, &mut events);
        finish(&mut r, &later, &mut events);
        r.tick(T0 + 500, &mut events);
        assert_eq!(get(&mut r, None).unwrap().job_id, retrying);
        r.tick(T0 + 30_000, &mut events);
        assert!(
            get_at(&mut r, None, T0 + 30_000).is_none(),
            "an expired lease counts as an attempt: back-off"
        );
        r.tick(T0 + 30_500, &mut events);
        let again = get_at(&mut r, None, T0 + 30_500).unwrap();
        assert_eq!(
            again.job_id, running,
            "its lease survived the restart, then expired"
        );
        assert_eq!(take_pipeline(&mut r, T0).unwrap().pipeline_id, p);
        let next = add(&mut r, "Z");
        assert!(r.job(&next).unwrap().seq > s.job(&later).unwrap().seq);
    }

    fn batch(state: &mut State, requests: &[Request], events: &mut Vec<Event>) -> Vec<Reply> {
        let mut batch = Batch::of(requests);
        batch.requests.push(json!({"command": "no such command"}));
        match state.handle(Request::Batch(batch), T0, events) {
            Reply::Batch(mut replies) => {
                assert_eq!(
                    replies.pop(),
                    Some(Reply::for_error(
                        &pypelinin_common::protocol::RequestError::UnknownCommand
                    ))
                );
                replies
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_batch_is_its_requests_in_order() {
        let mut state = State::default();
        let mut events = vec![];
        let add = |w: &str| Request::AddJob(NewJob::new(w, json!({"w": w})));
        let get = Request::GetJob(GetJob::default());
        let replies = batch(
            &mut state,
            &[add("A"), add("B"), get.clone(), get.clone(), get.clone()],
            &mut events,
        );
        assert_eq!(replies.len(), 5);
        let Reply::Answer(Answer {
            job_id: Some(a), ..
        }) = &replies[0]
        else {
            panic!("{replies:?}")
        };
        let jobs: Vec<_> = replies[2..]
            .iter()
            .map(|r| match r {
                Reply::Job(j) => j.as_ref().map(|j| j.worker.clone()),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(jobs, [Some("A".into()), Some("B".into()), None]);
        assert_eq!(events, [Event::NewJob, Event::NewJob]);
        // A later batch reports on jobs of an earlier one; a second report is refused.
        let done = Request::JobFinished(JobFinished {
            job_id: a.clone(),
            duration: WireDuration::from_secs(0.1),
        });
        let replies = batch(&mut state, &[done.clone(), done], &mut events);
        let answers: Vec<_> = replies
            .iter()
            .map(|r| match r {
                Reply::Answer(a) => a.answer,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(answers, [AnswerKind::GoodJob, AnswerKind::UnknownJobId]);
        assert_eq!(job_state(&mut state, a), JobState::Unknown);
    }

    #[test]
    fn oversized_batches_are_refused_whole() {
        let mut state = State::default();
        let requests = vec![json!({"command": "add job", "worker": "A"}); Batch::MAX_REQUESTS + 1];
        let reply = state.handle(Request::Batch(Batch { requests }), T0, &mut vec![]);
        assert!(
            matches!(&reply, Reply::Answer(a) if a.answer == AnswerKind::SyntaxError),
            "{reply:?}"
        );
        assert_eq!(state.queued_jobs(), 0);
    }

    /// One step of a client of the queues: add a job of a worker, or take one (of any worker,
    /// or of one worker).
    #[derive(Debug, Clone)]
    enum Step {
        Add(u8),
        Take(Option<u8>),
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            (0u8..3).prop_map(Step::Add),
            proptest::option::of(0u8..3).prop_map(Step::Take),
        ]
    }

    fn request(step: &Step, n: usize) -> Request {
        match step {
            Step::Add(w) => Request::AddJob(NewJob::new(format!("W{w}"), json!(n))),
            Step::Take(w) => Request::GetJob(GetJob {
                workers: w.map(|w| vec![format!("W{w}")]),
            }),
        }
    }

    /// What a reply tells, without the random ids.
    fn gist(reply: &Reply) -> String {
        match reply {
            Reply::Answer(a) => format!("{:?}", a.answer),
            Reply::Job(j) => format!("{:?}", j.as_ref().map(|j| (&j.worker, j.data()))),
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn asking_for_too_many_at_once_is_refused_and_takes_nothing() {
        let mut s = State::default();
        add(&mut s, "A");
        new_pipeline(&mut s);
        for request in [
            Request::GetJobs(GetJobs::new(None, GetJobs::MAX + 1)),
            Request::GetPipelines(GetPipelines::new(GetJobs::MAX + 1)),
        ] {
            let reply = s.handle(request, T0, &mut vec![]);
            assert!(
                matches!(&reply, Reply::Answer(a) if a.answer == AnswerKind::SyntaxError
                    && a.error.as_deref().is_some_and(|e| e.contains("at most 10000"))),
                "{reply:?}"
            );
        }
        assert_eq!(s.queued_jobs(), 1);
        assert!(take_pipeline(&mut s, T0).is_some());
    }

    proptest::proptest! {
        /// `get jobs` / `get pipelines` with `max` k hand out exactly what k `get job` /
        /// `get pipeline` would: the same jobs and pipelines, in the same FIFO order.
        #[test]
        fn taking_several_at_once_is_taking_one_by_one(
            adds in proptest::collection::vec(0u8..3, 0..40),
            takes in proptest::collection::vec((proptest::option::of(0u8..3), 0usize..6), 1..12),
        ) {
            let mut many = State::default();
            let mut one = State::default();
            for (n, w) in adds.iter().enumerate() {
                for s in [&mut many, &mut one] {
                    s.handle(Request::AddJob(NewJob::new(format!("W{w}"), json!(n))), T0, &mut vec![]);
                    if n % 4 == 0 {
                        let fields = json!({"n": n}).as_object().cloned().unwrap();
                        add_pipeline(s, fields);
                    }
                }
            }
            for (w, k) in &takes {
                let workers = w.map(|w| vec![format!("W{w}")]);
                let got = match many.handle(
                    Request::GetJobs(GetJobs::new(workers.clone(), *k)),
                    T0,
                    &mut vec![],
                ) {
                    Reply::Jobs(jobs) => jobs,
                    other => panic!("{other:?}"),
                };
                let names: Option<Vec<&str>> =
                    workers.as_ref().map(|w| w.iter().map(String::as_str).collect());
                let expected: Vec<_> = (0..*k)
                    .filter_map(|_| get(&mut one, names.as_deref()))
                    .collect();
                let ids = |jobs: &[JobAssignment]| jobs.iter().map(|j| (j.worker.clone(), j.data().clone())).collect::<Vec<_>>();
                proptest::prop_assert_eq!(ids(&got), ids(&expected));
                let got = match many.handle(Request::GetPipelines(GetPipelines::new(*k)), T0, &mut vec![]) {
                    Reply::Pipelines(p) => p.into_iter().map(|p| p.fields["n"].clone()).collect::<Vec<_>>(),
                    other => panic!("{other:?}"),
                };
                let expected: Vec<_> = (0..*k)
                    .filter_map(|_| take_pipeline(&mut one, T0))
                    .map(|p| p.fields["n"].clone())
                    .collect();
                proptest::prop_assert_eq!(got, expected);
            }
            proptest::prop_assert_eq!(many.queued_jobs(), one.queued_jobs());
            proptest::prop_assert_eq!(many.pending_pipelines(), one.pending_pipelines());
        }

        /// Batching changes nothing but the number of round trips: every job is handed out
        /// once, in the same FIFO order, and every reply is the one of the lone request.
        #[test]
        fn batches_answer_as_requests_one_by_one(
            steps in proptest::collection::vec(step(), 0..60),
            cuts in proptest::collection::vec(1usize..8, 1..20),
        ) {
            let requests: Vec<_> = steps.iter().enumerate().map(|(n, s)| request(s, n)).collect();
            let mut alone = State::default();
            let expected: Vec<_> = requests
                .iter()
                .map(|r| gist(&alone.handle(r.clone(), T0, &mut vec![])))
                .collect();
            let mut batched = State::default();
            let mut got = Vec::new();
            let mut rest = &requests[..];
            for cut in cuts.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (now, later) = rest.split_at((*cut).min(rest.len()));
                got.extend(batch(&mut batched, now, &mut vec![]).iter().map(gist));
                rest = later;
            }
            proptest::prop_assert_eq!(got, expected);
            proptest::prop_assert_eq!(batched.queued_jobs(), alone.queued_jobs());
        }
    }

    /// One step of anything that can happen to the router's state.
    #[derive(Debug, Clone)]
    enum Op {
        AddJob {
            worker: u8,
            pipeline: Option<u8>,
            last: bool,
        },
        GetJobs {
            worker: Option<u8>,
            max: u8,
            wait: bool,
        },
        Finish(u8),
        Fail(u8),
        Renew(u8),
        AddPipeline {
            request_id: Option<u8>,
        },
        GetPipelines {
            max: u8,
            wait: bool,
        },
        PipelineFinished(u8),
        PipelineFailed(u8),
        TakeBack(u8),
        Advance(u16),
        Restore,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            3 => (0u8..3, proptest::option::of(any::<u8>()), any::<bool>())
                .prop_map(|(worker, pipeline, last)| Op::AddJob { worker, pipeline, last }),
            3 => (proptest::option::of(0u8..3), 1u8..4, any::<bool>())
                .prop_map(|(worker, max, wait)| Op::GetJobs { worker, max, wait }),
            2 => any::<u8>().prop_map(Op::Finish),
            1 => any::<u8>().prop_map(Op::Fail),
            1 => any::<u8>().prop_map(Op::Renew),
            2 => proptest::option::of(0u8..4).prop_map(|request_id| Op::AddPipeline { request_id }),
            2 => (1u8..3, any::<bool>()).prop_map(|(max, wait)| Op::GetPipelines { max, wait }),
            1 => any::<u8>().prop_map(Op::PipelineFinished),
            1 => any::<u8>().prop_map(Op::PipelineFailed),
            1 => any::<u8>().prop_map(Op::TakeBack),
            2 => (0u16..3000).prop_map(Op::Advance),
            1 => Just(Op::Restore),
        ]
    }

    fn pick<T: Clone>(seen: &[T], n: u8) -> Option<T> {
        (!seen.is_empty()).then(|| seen[usize::from(n) % seen.len()].clone())
    }

    /// The state a restart restores from what `s` would have persisted.
    fn restored(s: &State) -> State {
        State::restore(
            s.configuration.clone(),
            s.policy.clone(),
            s.jobs.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            s.pipelines
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            s.ended
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )
    }

    proptest::proptest! {
        /// Whatever happens — requests of every kind, waits, work taken back, time passing
        /// (leases expire, back-offs end, outcomes are forgotten), restarts — the state keeps
        /// its invariants after every step, and a restart restores the same queues, back-offs
        /// and leases.
        #[test]
        fn the_invariants_hold_after_every_step(ops in proptest::collection::vec(op(), 1..120)) {
            let policy = Policy {
                max_attempts: 2,
                retry_backoff_ms: 100,
                job_lease_ms: 1_000,
                pipeline_lease_ms: 1_000,
                retention_ms: 5_000,
                max_remembered: 5,
                ..Policy::default()
            };
            let mut s = State::new(Map::new(), policy);
            let mut now = T0;
            let (mut jobs, mut pipelines): (Vec<JobId>, Vec<PipelineId>) = (vec![], vec![]);
            let mut ticket = 0;
            let mut served = Vec::new();
            for op in ops {
                let mut events = Vec::new();
                let request = match op.clone() {
                    Op::AddJob { worker, pipeline, last } => {
                        let mut job = NewJob::new(format!("W{worker}"), json!({}));
                        job.pipeline_id = pipeline.and_then(|n| pick(&pipelines, n));
                        if last {
                            job = job.ending_pipeline(std::time::Duration::from_millis(5));
                        }
                        Some(Request::AddJob(job))
                    }
                    Op::GetJobs { worker, max, wait } => Some(Request::GetJobs(GetJobs {
                        workers: worker.map(|w| vec![format!("W{w}")]),
                        max: usize::from(max),
                        wait_ms: wait.then_some(500),
                    })),
                    Op::Finish(n) => pick(&jobs, n).map(|job_id| Request::JobFinished(JobFinished {
                        job_id,
                        duration: WireDuration::from_secs(0.1),
                    })),
                    Op::Fail(n) => pick(&jobs, n).map(|job_id| Request::JobFailed(JobFailed {
                        job_id,
                        error: "boom".into(),
                        duration: None,
                    })),
                    Op::Renew(n) => Some(Request::RenewLeases(RenewLeases {
                        job_ids: pick(&jobs, n).into_iter().collect(),
                        pipeline_ids: pick(&pipelines, n).into_iter().collect(),
                    })),
                    Op::AddPipeline { request_id } => {
                        let mut fields = Map::new();
                        if let Some(r) = request_id {
                            fields.insert(REQUEST_ID.into(), format!("r{r}").into());
                        }
                        Some(Request::AddPipeline(NewPipeline { pipeline: pipeline_json(), fields }))
                    }
                    Op::GetPipelines { max, wait } => Some(Request::GetPipelines(GetPipelines {
                        max: usize::from(max),
                        wait_ms: wait.then_some(500),
                    })),
                    Op::PipelineFinished(n) => pick(&pipelines, n).map(|pipeline_id| {
                        Request::PipelineFinished(PipelineFinished {
                            pipeline_id,
                            duration: WireDuration::from_secs(1.0),
                        })
                    }),
                    Op::PipelineFailed(n) => pick(&pipelines, n).map(|pipeline_id| {
                        Request::PipelineFailed(PipelineFailed {
                            pipeline_id,
                            job_id: "j".into(),
                            worker: "W0".into(),
                            error: "boom".into(),
                            duration: None,
                        })
                    }),
                    Op::TakeBack(n) => {
                        let job: Vec<JobId> = pick(&jobs, n).into_iter().collect();
                        let pipeline: Vec<PipelineId> = pick(&pipelines, n).into_iter().collect();
                        s.take_back(&job, &pipeline, &mut events);
                        None
                    }
                    Op::Advance(ms) => {
                        now += u64::from(ms);
                        s.tick(now, &mut events);
                        None
                    }
                    Op::Restore => {
                        let r = restored(&s);
                        proptest::prop_assert_eq!(r.check_invariants(), Ok(()));
                        proptest::prop_assert_eq!(&r.job_queues, &s.job_queues);
                        proptest::prop_assert_eq!(&r.delayed, &s.delayed);
                        proptest::prop_assert_eq!(&r.job_leases, &s.job_leases);
                        proptest::prop_assert_eq!(&r.pipeline_queue, &s.pipeline_queue);
                        proptest::prop_assert_eq!(&r.pipeline_leases, &s.pipeline_leases);
                        proptest::prop_assert_eq!(&r.jobs, &s.jobs);
                        proptest::prop_assert_eq!(&r.ended, &s.ended);
                        proptest::prop_assert_eq!(&r.request_ids, &s.request_ids);
                        // Sequence numbers of records that are gone are not kept: new ones still come after every live one.
                        proptest::prop_assert!(r.next_seq <= s.next_seq);
                        // Waiting requests live in memory only: a restart answers none of them.
                        s = r;
                        None
                    }
                };
                if let Some(request) = request {
                    let reply = s.handle_or_wait(ticket, request, now, &mut events);
                    ticket += 1;
                    let mut replies: Vec<Reply> = reply.into_iter().collect();
                    s.serve_waiting(now, &mut served);
                    replies.extend(served.drain(..).map(|w| w.reply));
                    for reply in replies {
                        match reply {
                            Reply::Answer(a) => {
                                jobs.extend(a.job_id);
                                pipelines.extend(a.pipeline_id);
                            }
                            Reply::Jobs(js) => jobs.extend(js.into_iter().map(|j| j.job_id)),
                            Reply::Pipelines(ps) => {
                                pipelines.extend(ps.into_iter().map(|p| p.pipeline_id))
                            }
                            _ => {}
                        }
                    }
                }
                if let Err(broken) = s.check_invariants() {
                    proptest::prop_assert!(false, "after {op:?}: {broken}");
                }
            }
        }
    }
}
