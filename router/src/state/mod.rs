//! The router's queues and records, and every transition a request (or the passing of time)
//! makes on them.
//!
//! One owner (the server's state task) applies requests one by one; each transition returns
//! the reply and pushes the events to broadcast. Nothing here does I/O: time comes in as an
//! argument (wall-clock milliseconds, so leases and back-offs survive a restart), and new ids
//! come from [`Ids`], random in the router and a counter in tests and the fuzz target, so a run
//! can be replayed exactly. Every record a transition touches is marked dirty; the server
//! persists the dirty records of a batch in one durable write before it sends the batch's
//! replies.
//!
//! Modules, each one concern:
//! - `policy`, `records`: the settings that shape the transitions, and the persisted records.
//! - `leases`: [`Leases`], ids with a deadline (leases and back-offs).
//! - `jobs`: where a job is — its worker's queue, the back-off set, the lease table or ended —
//!   changes only through one function, `move_job`, which keeps the record and the indexes
//!   together; the job transitions are built on it.
//! - `pipelines`: the same for pipelines (`move_pipeline`), and their transitions.
//! - `outcomes`: ended pipelines remembered for the retention time, and request ids.
//! - `waiting`: `get jobs` / `get pipelines` that wait for work.
//! - `legacy`: for the original's pipeliner and client, ends held until they can hear them,
//!   and aliases of pipelines handed out again.
//! - `restore`: rebuilding the state from persisted records.
//! - `invariants`: [`State::check_invariants`], run after every step of the property tests and
//!   of the fuzz target.

mod askers;
mod census;
mod invariants;
mod jobs;
mod leases;
mod legacy;
mod listing;
mod outcomes;
mod pipelines;
mod policy;
mod records;
mod restore;
mod unserved;
mod waiting;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use pypelinin_common::ids::{JobId, PipelineId};
use pypelinin_common::protocol::cluster::{JobDetail, PipelineDetails};
use pypelinin_common::protocol::request::{Ask, GetJob, GetJobs};
use pypelinin_common::protocol::{
    Answer, AnswerKind, Batch, Event, JobHandout, JobState, PipelineHandout, PipelineState,
    PipelineStatus, RawFields, Reply, Request,
};
use serde_json::{Map, Value};

pub use census::{Histogram, DURATION_BUCKETS};
pub use leases::Leases;
pub use policy::Policy;
pub use records::{EndedRecord, EndsPipeline, JobRecord, PipelineRecord};
pub use unserved::Unserved;
pub use waiting::{Served, MAX_WAITING};

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

/// Where new job and pipeline ids come from.
#[derive(Debug, Clone)]
pub enum Ids {
    /// Random (UUID v4): what the router uses.
    Random,
    /// A counter from this value, for runs that must replay exactly (tests, the fuzz target).
    Counter(u64),
}

impl Ids {
    fn next(&mut self) -> Option<String> {
        match self {
            Ids::Random => None,
            Ids::Counter(n) => {
                *n += 1;
                Some(format!("{n:032x}"))
            }
        }
    }

    fn job(&mut self) -> JobId {
        self.next()
            .map_or_else(JobId::generate, |id| id.as_str().into())
    }

    fn pipeline(&mut self) -> PipelineId {
        self.next()
            .map_or_else(PipelineId::generate, |id| id.as_str().into())
    }
}

/// The router's state. See the module documentation.
#[derive(Debug)]
pub struct State {
    configuration: Map<String, Value>,
    policy: Policy,
    ids: Ids,
    jobs: HashMap<JobId, JobRecord>,
    /// Queued jobs by worker, in FIFO order (by sequence number).
    job_queues: HashMap<String, BTreeMap<u64, JobId>>,
    /// Queued jobs waiting out a back-off before a retry.
    delayed: Leases<JobId>,
    job_leases: Leases<JobId>,
    next_seq: u64,
    pipelines: HashMap<PipelineId, PipelineRecord>,
    pipeline_queue: BTreeMap<u64, PipelineId>,
    pipeline_leases: Leases<PipelineId>,
    /// Pending pipelines with a deadline, by when it passes.
    deadlines: Leases<PipelineId>,
    // B-trees, not hash maps: they hold as much memory as they hold outcomes, and do not
    // grow under churn (a hash table at its limit, its removals leaving tombstones, doubles
    // once; reserving for the limit up front cost its pages as entries landed all over it).
    request_ids: BTreeMap<String, PipelineId>,
    ended: BTreeMap<PipelineId, EndedRecord>,
    ended_order: VecDeque<(u64, PipelineId)>,
    waiting: VecDeque<waiting::Waiting>,
    asks: unserved::Asks,
    /// What was handed out under each daemon's asks, until a renewal settles them.
    askers: askers::Askers,
    census: census::Census,
    legacy: legacy::Legacy,
    changes: Changes,
}

impl Default for State {
    fn default() -> Self {
        Self::new(Map::new(), Policy::default())
    }
}

/// The key of the client's idempotency token in `add pipeline`.
const REQUEST_ID: &str = "request id";

impl State {
    /// Empty queues; `get configuration` answers `configuration`.
    pub fn new(configuration: Map<String, Value>, policy: Policy) -> Self {
        Self {
            configuration,
            policy,
            ids: Ids::Random,
            jobs: HashMap::new(),
            job_queues: HashMap::new(),
            delayed: Leases::default(),
            job_leases: Leases::default(),
            next_seq: 0,
            pipelines: HashMap::new(),
            pipeline_queue: BTreeMap::new(),
            pipeline_leases: Leases::default(),
            deadlines: Leases::default(),
            request_ids: BTreeMap::new(),
            ended: BTreeMap::new(),
            ended_order: VecDeque::new(),
            waiting: VecDeque::new(),
            asks: unserved::Asks::default(),
            askers: askers::Askers::default(),
            census: census::Census::default(),
            legacy: legacy::Legacy::default(),
            changes: Changes::default(),
        }
    }

    /// The same state, taking new ids from `ids`.
    pub fn with_ids(mut self, ids: Ids) -> Self {
        self.ids = ids;
        self
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
        self.observe(&request, now);
        self.apply(request, now, events)
    }

    /// [`State::handle`] of a request counted already.
    fn apply(&mut self, request: Request, now: u64, events: &mut Vec<Event>) -> Reply {
        let from = events.len();
        let reply = self.transition(request, now, events);
        self.hold_early_ends(from, now, events);
        reply
    }

    /// The transition `request` makes, with every event it causes (none held yet).
    fn transition(&mut self, request: Request, now: u64, events: &mut Vec<Event>) -> Reply {
        match request {
            Request::GetConfiguration => Reply::Configuration(self.configuration.clone()),
            Request::AddJob(job) => self.add_job(job, now, events),
            Request::GetJob(get) => {
                self.note_asked(get.workers.as_deref(), now);
                let lease = self.policy.legacy_job_lease_ms();
                Reply::Job(self.get_job(&get, now, lease))
            }
            Request::JobFinished(done) => self.job_finished(done, now, events),
            Request::JobFailed(failed) => self.job_failed(failed, now, events),
            Request::AddPipeline(p) => self.add_pipeline(p, now, events),
            Request::GetPipeline => {
                let lease = self.policy.legacy_pipeline_lease_ms();
                let mut handout = self.get_pipeline(now, lease);
                if let Some(handout) = &mut handout {
                    self.alias_rehanded(handout);
                }
                Reply::Pipeline(handout)
            }
            Request::GetJobs(get) => {
                if get.max > GetJobs::MAX {
                    return too_many("get jobs", get.max);
                }
                self.note_asked(get.workers.as_deref(), now);
                let one = GetJob {
                    workers: get.workers,
                };
                Reply::Jobs(self.take_jobs(&one, get.max, now, get.asker.as_ref()))
            }
            Request::GetPipelines(get) => {
                if get.max > GetJobs::MAX {
                    return too_many("get pipelines", get.max);
                }
                Reply::Pipelines(self.take_pipelines(get.max, now, get.asker.as_ref()))
            }
            Request::PipelineFinished(done) => self.pipeline_finished(done, now, events),
            Request::PipelineFailed(failed) => self.pipeline_failed(failed, now, events),
            Request::RenewLeases(renew) => {
                if let Some(settled) = &renew.asker {
                    self.settle(settled, &renew.job_ids, &renew.pipeline_ids, now, events);
                }
                self.renew_job_leases(renew.job_ids, now);
                self.renew_pipeline_leases(renew.pipeline_ids, now);
                Answer::new(AnswerKind::LeasesRenewed).into()
            }
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
                let details = q.details.then(|| {
                    q.pipeline_ids
                        .iter()
                        .filter_map(|id| Some((id.clone(), self.pipeline_details(id)?)))
                        .collect()
                });
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
                    details,
                    ..Answer::new(AnswerKind::Status)
                }
                .into()
            }
            Request::CancelPipeline(cancel) => self.cancel_pipeline(cancel, now, events),
            Request::ClusterStatus => Reply::ClusterStatus(Box::new(self.cluster_status(now))),
            Request::ListPipelines(list) => Reply::PipelineList(self.list_pipelines(&list, now)),
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

    /// Takes back jobs and pipelines handed out in a reply that could not be delivered (its
    /// peer is gone): they are queued again in their old place, and no attempt is counted.
    pub fn take_back(&mut self, jobs: &[JobId], pipelines: &[PipelineId], events: &mut Vec<Event>) {
        for id in jobs {
            if self
                .jobs
                .get(id)
                .is_some_and(|r| r.state == JobState::Running)
            {
                self.move_job(id, jobs::JobPlace::Queued);
                events.push(Event::NewJob);
            }
        }
        for id in pipelines {
            if self
                .pipelines
                .get(id)
                .is_some_and(|r| r.state == PipelineState::Running)
            {
                self.move_pipeline(id, pipelines::PipelinePlace::Queued);
                if let Some(record) = self.pipelines.get_mut(id) {
                    // Never delivered: not a handout.
                    record.handouts = record.handouts.saturating_sub(1);
                }
                events.push(Event::NewPipeline);
            }
        }
    }

    /// Lets time pass until `now`: expired leases put jobs and pipelines back in their queues,
    /// jobs whose back-off is over are queued again, pipelines past their deadline fail, old
    /// outcomes are forgotten, workers no broker asks for are warned about, and held
    /// broadcasts whose time came are sent.
    pub fn tick(&mut self, now: u64, events: &mut Vec<Event>) {
        self.census_tick(now);
        self.expire_job_leases(now, events);
        self.forget_askers(now);
        self.end_back_offs(now, events);
        self.expire_pipeline_leases(now, events);
        self.expire_deadlines(now, events);
        self.forget_old_outcomes(now);
        self.check_unserved(now);
        self.release_held(now, events);
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

    /// Where a pipeline stands: pending, remembered, or unknown.
    fn pipeline_status(&self, id: &PipelineId) -> PipelineStatus {
        if let Some(record) = self.pipelines.get(id) {
            return PipelineStatus::of(record.state);
        }
        self.ended
            .get(id)
            .map(|e| e.status.clone())
            .unwrap_or_else(|| PipelineStatus::of(PipelineState::Unknown))
    }

    /// A pending pipeline's DAG and submitted jobs; `None` for one that is not pending.
    fn pipeline_details(&self, id: &PipelineId) -> Option<PipelineDetails> {
        let record = self.pipelines.get(id)?;
        let jobs = record
            .jobs
            .iter()
            .filter_map(|j| {
                let r = self.jobs.get(j)?;
                Some(JobDetail {
                    job_id: j.clone(),
                    worker: r.worker.clone(),
                    state: r.state,
                    attempts: r.attempts,
                    duration: r.duration,
                    error: r.error.clone(),
                })
            })
            .collect();
        Some(PipelineDetails {
            pipeline: serde_json::from_str(record.pipeline.get()).unwrap_or(Value::Null),
            jobs,
        })
    }

    /// The next sequence number (FIFO order across jobs and pipelines).
    fn next_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
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
mod tests;

/// Bytes of data one `get jobs` or `get pipelines` answer carries at most: past them it
/// hands out fewer than asked (always at least one), so large payloads neither make one
/// answer huge nor pile up in the router while it is sent.
pub(crate) const HANDOUT_BYTES: usize = 4 * 1024 * 1024;

impl State {
    /// Up to `max` jobs of the workers `get` names, and up to [`HANDOUT_BYTES`] of their data.
    /// With `asker`, notes what it hands out under that ask (see [`askers`]).
    pub(super) fn take_jobs(
        &mut self,
        get: &GetJob,
        max: usize,
        now: u64,
        asker: Option<&Ask>,
    ) -> Vec<JobHandout> {
        let lease = self.policy.job_lease_ms;
        let mut bytes = 0;
        let mut jobs = Vec::new();
        while jobs.len() < max && bytes < HANDOUT_BYTES {
            let Some(job) = self.get_job(get, now, lease) else {
                break;
            };
            bytes +=
                job.fields.text_len() + job.pipeline_data.as_ref().map_or(0, RawFields::text_len);
            jobs.push(job);
        }
        if let Some(ask) = asker {
            let handed = jobs.iter().filter_map(|j| {
                let handout = self.jobs.get(&j.job_id)?.handout;
                Some((askers::Handed::Job(j.job_id.clone()), handout))
            });
            self.askers.note(ask, handed, now);
        }
        jobs
    }

    /// Up to `max` pipelines, and up to [`HANDOUT_BYTES`] of them; noted under `asker` as
    /// [`State::take_jobs`] does.
    pub(super) fn take_pipelines(
        &mut self,
        max: usize,
        now: u64,
        asker: Option<&Ask>,
    ) -> Vec<PipelineHandout> {
        let lease = self.policy.pipeline_lease_ms;
        let mut bytes = 0;
        let mut pipelines = Vec::new();
        while pipelines.len() < max && bytes < HANDOUT_BYTES {
            let Some(pipeline) = self.get_pipeline(now, lease) else {
                break;
            };
            bytes += pipeline.pipeline.get().len() + pipeline.fields.text_len();
            pipelines.push(pipeline);
        }
        if let Some(ask) = asker {
            let handed = pipelines.iter().filter_map(|p| {
                let handout = self.pipelines.get(&p.pipeline_id)?.handout;
                Some((askers::Handed::Pipeline(p.pipeline_id.clone()), handout))
            });
            self.askers.note(ask, handed, now);
        }
        pipelines
    }
}
