//! Pipelines: where each pending one is — the queue or the lease table — and the transitions
//! that move it. As for jobs, [`State::move_pipeline`] is the one function that changes where
//! a pipeline is; [`State::end_pipeline`] takes it out of both for good.

use pypelinin_common::ids::{JobId, PipelineId};
use pypelinin_common::pipeline::Pipeline;
use pypelinin_common::protocol::request::{
    CancelPipeline, NewPipeline, PipelineFailed, PipelineFinished,
};
use pypelinin_common::protocol::{
    Answer, AnswerKind, Event, JobState, PipelineHandout, PipelineState, PipelineStatus, Reply,
    SubmittedJob, WireDuration,
};
use tracing::warn;

use super::jobs::JobPlace;
use super::records::{JobRecord, PipelineRecord};
use super::{State, REQUEST_ID};

/// The key of `add pipeline` that sets a pipeline's deadline, in seconds from its arrival.
pub const DEADLINE_SECS: &str = "deadline secs";

/// The longest deadline: a year.
const MAX_DEADLINE_SECS: f64 = 31_536_000.0;

/// Where a pending pipeline goes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum PipelinePlace {
    /// The queue, in its FIFO place.
    Queued,
    /// Handed out, leased until this time.
    Leased(u64),
}

impl State {
    /// Moves pending pipeline `id` to `to`, its record and the indexes together. Marks it
    /// changed.
    pub(super) fn move_pipeline(&mut self, id: &PipelineId, to: PipelinePlace) {
        let Self {
            pipelines,
            pipeline_queue,
            pipeline_leases,
            changes,
            ..
        } = self;
        let Some(record) = pipelines.get_mut(id) else {
            return;
        };
        changes.pipelines.insert(id.clone());
        match (record.state, record.lease_until.take()) {
            (PipelineState::Running, Some(t)) => {
                pipeline_leases.remove(t, id);
            }
            (PipelineState::Queued, _) => {
                pipeline_queue.remove(&record.seq);
            }
            _ => {}
        }
        match to {
            PipelinePlace::Queued => {
                record.state = PipelineState::Queued;
                pipeline_queue.insert(record.seq, id.clone());
            }
            PipelinePlace::Leased(until) => {
                record.state = PipelineState::Running;
                record.lease_until = Some(until);
                pipeline_leases.insert(until, id.clone());
            }
        }
    }

    pub(super) fn add_pipeline(
        &mut self,
        new: NewPipeline,
        now: u64,
        events: &mut Vec<Event>,
    ) -> Reply {
        let request_id = new.fields.string(REQUEST_ID);
        if let Some(existing) = request_id.as_ref().and_then(|r| self.request_ids.get(r)) {
            // The client retried a request whose answer it lost: same pipeline, same id.
            return Answer::new(AnswerKind::PipelineAccepted)
                .with_pipeline_id(existing.clone())
                .into();
        }
        let deadline = match new.fields.get(DEADLINE_SECS) {
            None => None,
            Some(v) => match serde_json::from_str::<f64>(v.get())
                .ok()
                .filter(|secs| *secs > 0.0 && *secs <= MAX_DEADLINE_SECS)
            {
                Some(secs) => Some(now.saturating_add((secs * 1000.0) as u64)),
                None => {
                    return Answer::error(
                        AnswerKind::SyntaxError,
                        format!(
                            "\"{DEADLINE_SECS}\" must be a number of seconds above 0 and at most \
                             {MAX_DEADLINE_SECS} (a year), not {v}"
                        ),
                    )
                    .into()
                }
            },
        };
        if let Err(e) = Pipeline::check_legacy_text(new.pipeline.get()) {
            return Answer::error(AnswerKind::InvalidPipeline, e.to_string()).into();
        }
        let pipeline = new.pipeline;
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
        let id = self.ids.pipeline();
        let seq = self.next_seq();
        if let Some(r) = request_id {
            self.request_ids.insert(r, id.clone());
        }
        // Unknown with no place yet: `move_pipeline` queues it.
        self.pipelines.insert(
            id.clone(),
            PipelineRecord {
                seq,
                pipeline,
                fields: new.fields,
                state: PipelineState::Unknown,
                jobs: Vec::new(),
                lease_until: None,
                deadline,
                handouts: 0,
                aliases: Vec::new(),
                job_data: None,
                handout: 0,
            },
        );
        if !self.pipelines[&id].fields.contains_key(REQUEST_ID) {
            // Added as the original's client adds pipelines: it subscribes to the end only now.
            self.note_legacy_pipeline(&id, now);
        }
        if let Some(t) = deadline {
            self.deadlines.insert(t, id.clone());
        }
        self.move_pipeline(&id, PipelinePlace::Queued);
        events.push(Event::NewPipeline);
        Answer::new(AnswerKind::PipelineAccepted)
            .with_pipeline_id(id)
            .into()
    }

    /// Hands out the oldest queued pipeline, with the jobs submitted for it so far, leased for
    /// `lease_ms`.
    pub(super) fn get_pipeline(&mut self, now: u64, lease_ms: u64) -> Option<PipelineHandout> {
        let (_, id) = self.pipeline_queue.first_key_value()?;
        let id = id.clone();
        let lease_until = now.saturating_add(lease_ms);
        self.move_pipeline(&id, PipelinePlace::Leased(lease_until));
        let handout = self.askers.next_handout();
        let record = self.pipelines.get_mut(&id)?;
        record.handouts = record.handouts.saturating_add(1);
        record.handout = handout;
        let record = &*record;
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
    pub(super) fn end_pipeline(
        &mut self,
        id: &PipelineId,
        status: PipelineStatus,
        now: u64,
    ) -> bool {
        let Some(record) = self.pipelines.get(id) else {
            return false;
        };
        match (record.state, record.lease_until) {
            (PipelineState::Running, Some(t)) => {
                self.pipeline_leases.remove(t, id);
            }
            _ => {
                self.pipeline_queue.remove(&record.seq);
            }
        }
        if let Some(t) = record.deadline {
            self.deadlines.remove(t, id);
        }
        let jobs = record.jobs.clone();
        let aliases = record.aliases.clone();
        let request_id = record.fields.string(REQUEST_ID);
        for job in &jobs {
            self.move_job(job, JobPlace::Gone);
        }
        self.forget_aliases(&aliases);
        self.pipelines.remove(id);
        self.changes.pipelines.insert(id.clone());
        self.count_pipeline_ended(id, &status, now);
        self.remember(id.clone(), status, now, request_id);
        true
    }

    /// Fails the pipelines whose deadline passed, naming the jobs still waiting and the
    /// workers they wait for.
    pub(super) fn expire_deadlines(&mut self, now: u64, events: &mut Vec<Event>) {
        while let Some((_, id)) = self.deadlines.pop_due(now) {
            let Some(record) = self.pipelines.get(&id) else {
                continue;
            };
            let secs = record
                .fields
                .value(DEADLINE_SECS)
                .and_then(|v| v.as_f64())
                .unwrap_or_default();
            let waiting: Vec<(&JobId, &JobRecord)> = record
                .jobs
                .iter()
                .filter_map(|j| self.jobs.get(j).map(|r| (j, r)))
                .filter(|(_, r)| matches!(r.state, JobState::Queued | JobState::Running))
                .collect();
            let (job_id, worker) = waiting
                .first()
                .map(|(j, r)| ((*j).clone(), r.worker.clone()))
                .unwrap_or_else(|| (JobId::from(""), String::new()));
            let what: Vec<String> = waiting
                .iter()
                .map(|(j, r)| {
                    let how = if r.state == JobState::Running {
                        "running"
                    } else {
                        "queued"
                    };
                    format!("job {j} of worker {} ({how})", r.worker)
                })
                .collect();
            let error = if what.is_empty() {
                format!("its deadline of {secs} s passed between two of its jobs")
            } else {
                format!(
                    "its deadline of {secs} s passed; still waiting: {}",
                    what.join(", ")
                )
            };
            let status = PipelineStatus {
                job_id: Some(job_id.clone()),
                worker: Some(worker.clone()),
                error: Some(error.clone()),
                ..PipelineStatus::of(PipelineState::Failed)
            };
            let echo = self.legacy_echo(&id);
            if self.end_pipeline(&id, status, now) {
                warn!(pipeline_id = %id, "{error}");
                events.push(Event::pipeline_failed(id.clone(), job_id, &worker, &error));
                push_echo(echo, id, None, events);
            }
        }
    }

    /// Cancels a pending pipeline: it ends in state `cancelled` (its jobs go with it, so a
    /// running job's late report is ignored), and the broadcast tells brokers to stop its jobs.
    pub(super) fn cancel_pipeline(
        &mut self,
        cancel: CancelPipeline,
        now: u64,
        events: &mut Vec<Event>,
    ) -> Reply {
        let id = cancel.pipeline_id;
        if let Some(ended) = self.ended.get(&id) {
            let how = match ended.status.state {
                PipelineState::Finished => "finished",
                PipelineState::Failed => "failed",
                PipelineState::Cancelled => "was cancelled",
                _ => "ended",
            };
            return Answer::error(
                AnswerKind::PipelineEnded,
                format!("pipeline {id} {how} already: nothing to cancel"),
            )
            .into();
        }
        let status = PipelineStatus {
            error: Some("cancelled".into()),
            ..PipelineStatus::of(PipelineState::Cancelled)
        };
        let echo = self.legacy_echo(&id);
        if !self.end_pipeline(&id, status, now) {
            return Answer::error(
                AnswerKind::UnknownPipelineId,
                format!("no pipeline {id} is pending or remembered"),
            )
            .into();
        }
        events.push(Event::PipelineCancelled {
            pipeline_id: id.clone(),
        });
        push_echo(echo, id.clone(), None, events);
        Answer::new(AnswerKind::PipelineCancelled)
            .with_pipeline_id(id)
            .into()
    }

    pub(super) fn pipeline_finished(
        &mut self,
        mut done: PipelineFinished,
        now: u64,
        events: &mut Vec<Event>,
    ) -> Reply {
        done.pipeline_id = self.resolve(done.pipeline_id);
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

    pub(super) fn pipeline_failed(
        &mut self,
        mut failed: PipelineFailed,
        now: u64,
        events: &mut Vec<Event>,
    ) -> Reply {
        failed.pipeline_id = self.resolve(failed.pipeline_id);
        let status = PipelineStatus {
            duration: failed.duration.clone(),
            job_id: Some(failed.job_id.clone()),
            worker: Some(failed.worker.clone()),
            error: Some(failed.error.clone()),
            ..PipelineStatus::of(PipelineState::Failed)
        };
        let echo = self.legacy_echo(&failed.pipeline_id);
        if !self.end_pipeline(&failed.pipeline_id, status, now) {
            return Answer::new(AnswerKind::UnknownPipelineId).into();
        }
        events.push(Event::pipeline_failed(
            failed.pipeline_id.clone(),
            failed.job_id,
            &failed.worker,
            &failed.error,
        ));
        push_echo(echo, failed.pipeline_id, failed.duration, events);
        Answer::new(AnswerKind::FailureRecorded).into()
    }

    /// Whether the failure or cancellation of pending pipeline `id` is also broadcast as `pipeline
    /// finished` (see [`Policy::legacy_end_broadcast`](super::Policy::legacy_end_broadcast)):
    /// for a pipeline added without a request id, as the original's client adds them.
    fn legacy_echo(&self, id: &PipelineId) -> bool {
        self.policy.legacy_end_broadcast
            && self
                .pipelines
                .get(id)
                .is_some_and(|r| !r.fields.contains_key(REQUEST_ID))
    }

    /// Extends the leases of the running pipelines among `ids`.
    pub(super) fn renew_pipeline_leases(&mut self, ids: Vec<PipelineId>, now: u64) {
        let until = now.saturating_add(self.policy.pipeline_lease_ms);
        for id in ids {
            if self
                .pipelines
                .get(&id)
                .is_some_and(|r| r.state == PipelineState::Running)
            {
                self.move_pipeline(&id, PipelinePlace::Leased(until));
            }
        }
    }

    /// Pipelines whose lease ended by `now` go back to the queue for another pipeliner.
    pub(super) fn expire_pipeline_leases(&mut self, now: u64, events: &mut Vec<Event>) {
        while let Some((_, id)) = self.pipeline_leases.pop_due(now) {
            if self.pipelines.contains_key(&id) {
                warn!(pipeline_id = %id, "pipeline lease expired; handing the pipeline to another pipeliner");
                self.move_pipeline(&id, PipelinePlace::Queued);
                events.push(Event::NewPipeline);
            }
        }
    }
}

/// Pushes `pipeline finished: id=ID, duration=D` after a failure or cancellation, when `echo`
/// (the only end the original's client listens for).
fn push_echo(echo: bool, id: PipelineId, duration: Option<WireDuration>, events: &mut Vec<Event>) {
    if echo {
        let duration = duration.unwrap_or_else(|| WireDuration::from_secs(0.0));
        events.push(Event::pipeline_finished(id, &duration));
    }
}
