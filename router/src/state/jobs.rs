//! Jobs: where each one is, and the transitions that move it.
//!
//! A job is in exactly one place: its worker's queue (at its sequence number), the back-off set
//! (until its retry time), the lease table (until its lease ends), or ended. The record says
//! which ([`JobRecord::state`], `not_before`, `lease_until`), and [`State::move_job`] is the one
//! function that changes it: it takes the job out of the index of its old place and into the
//! index of the new one, so the record and the indexes cannot disagree.

use std::collections::BTreeMap;

use pypelinin_common::ids::{JobId, PipelineId};
use pypelinin_common::pipeline::Pipeline;
use pypelinin_common::protocol::request::{GetJob, JobFailed, JobFinished, NewJob};
use pypelinin_common::protocol::{
    Answer, AnswerKind, Event, JobHandout, JobState, PipelineState, PipelineStatus, RawFields,
    Reply, WireDuration,
};
use serde_json::value::RawValue;
use tracing::{debug, warn};

use super::records::{EndsPipeline, JobRecord, PipelineRecord};
use super::State;

/// Where a job goes.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum JobPlace {
    /// Its worker's queue, in its FIFO place.
    Queued,
    /// Queued after a back-off: not handed out before this time.
    Delayed(u64),
    /// Handed out, leased until this time.
    Leased(u64),
    /// Ended (finished or failed): a job of a pending pipeline keeps its record with this
    /// state and error, any other job is forgotten.
    Ended(JobState, Option<String>),
    /// Forgotten (its pipeline ended).
    Gone,
}

impl State {
    /// Moves job `id` to `to`: out of the index of where it is, into the index of `to`, with
    /// its record to match. Marks it changed. Nothing happens to an unknown job.
    pub(super) fn move_job(&mut self, id: &JobId, to: JobPlace) {
        let Self {
            jobs,
            job_queues,
            delayed,
            job_leases,
            changes,
            ..
        } = self;
        let Some(record) = jobs.get_mut(id) else {
            return;
        };
        changes.jobs.insert(id.clone());
        match (
            record.state,
            record.not_before.take(),
            record.lease_until.take(),
        ) {
            (JobState::Queued, Some(t), _) => {
                delayed.remove(t, id);
            }
            (JobState::Queued, None, _) => {
                if let Some(queue) = job_queues.get_mut(&record.worker) {
                    queue.remove(&record.seq);
                    if queue.is_empty() {
                        job_queues.remove(&record.worker);
                    }
                }
            }
            (JobState::Running, _, Some(t)) => {
                job_leases.remove(t, id);
            }
            _ => {}
        }
        match to {
            JobPlace::Queued => {
                record.state = JobState::Queued;
                job_queues
                    .entry(record.worker.clone())
                    .or_default()
                    .insert(record.seq, id.clone());
            }
            JobPlace::Delayed(until) => {
                record.state = JobState::Queued;
                record.not_before = Some(until);
                delayed.insert(until, id.clone());
            }
            JobPlace::Leased(until) => {
                record.state = JobState::Running;
                record.lease_until = Some(until);
                job_leases.insert(until, id.clone());
            }
            JobPlace::Ended(state, error) if record.pipeline_id.is_some() => {
                record.state = state;
                record.error = error;
            }
            JobPlace::Ended(..) | JobPlace::Gone => {
                jobs.remove(id);
            }
        }
    }

    /// Whether job `id` is pending (queued, delayed or running).
    fn is_pending(&self, id: &JobId) -> bool {
        self.jobs
            .get(id)
            .is_some_and(|r| matches!(r.state, JobState::Queued | JobState::Running))
    }

    fn max_attempts(&self, worker: &str) -> u32 {
        self.policy
            .attempts_per_worker
            .get(worker)
            .copied()
            .unwrap_or(self.policy.max_attempts)
            .max(1)
    }

    pub(super) fn add_job(&mut self, job: NewJob, now: u64, events: &mut Vec<Event>) -> Reply {
        if job.worker.is_empty() {
            return Answer::error(AnswerKind::SyntaxError, "\"worker\" must not be empty").into();
        }
        if job.data_from_pipeline && job.pipeline_id.is_none() {
            return Answer::error(
                AnswerKind::SyntaxError,
                "\"data from pipeline\" needs \"pipeline id\": the job takes its pipeline's data",
            )
            .into();
        }
        if job.data_from_pipeline && job.fields.contains_key("data") {
            return Answer::error(
                AnswerKind::SyntaxError,
                "\"data from pipeline\" and \"data\" together: send one or the other",
            )
            .into();
        }
        // A job may name only a pending pipeline: one that ended (or never was) takes no job.
        if let Some(p) = job
            .pipeline_id
            .as_ref()
            .filter(|p| !self.pipelines.contains_key(*p))
        {
            return Answer::error(
                AnswerKind::UnknownPipelineId,
                format!("pipeline {p} is not pending (unknown, or ended already)"),
            )
            .into();
        }
        let id = self.ids.job();
        let seq = self.next_seq();
        let pipeline_id = job.pipeline_id;
        if let Some(p) = &pipeline_id {
            // Not a change of the pipeline's row: its job list is rebuilt from the jobs' rows.
            if let Some(record) = self.pipelines.get_mut(p) {
                record.jobs.push(id.clone());
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
        let legacy = pipeline_id.is_none() && !job.subscribed;
        let mut fields = job.fields;
        // Its data is its pipeline's: said so, or sent and found equal.
        let pipeline_data = job.data_from_pipeline
            || pipeline_id
                .as_ref()
                .is_some_and(|p| self.share_pipeline_data(p, &mut fields));
        // Ended with no place yet: `move_job` queues it.
        self.jobs.insert(
            id.clone(),
            JobRecord {
                seq,
                worker: job.worker,
                fields,
                pipeline_id,
                state: JobState::Unknown,
                attempts: 0,
                lease_until: None,
                not_before: None,
                error: None,
                duration: None,
                ends_pipeline,
                legacy,
                pipeline_data,
                handout: 0,
            },
        );
        if legacy {
            // Added as the original's pipeliner adds jobs: it subscribes to the end only now.
            self.note_legacy_job(&id, now);
        }
        self.move_job(&id, JobPlace::Queued);
        events.push(Event::NewJob);
        Answer {
            ends_pipeline: ends,
            ..Answer::new(AnswerKind::JobAccepted).with_job_id(id)
        }
        .into()
    }

    /// Hands out the oldest queued job of the workers `get` names (any worker: `None`), leased
    /// for `lease_ms`.
    pub(super) fn get_job(&mut self, get: &GetJob, now: u64, lease_ms: u64) -> Option<JobHandout> {
        fn front<'a>((_, q): (&'a String, &'a BTreeMap<u64, JobId>)) -> Option<(u64, &'a JobId)> {
            q.first_key_value().map(|(seq, id)| (*seq, id))
        }
        let best = match &get.workers {
            Some(workers) => workers
                .iter()
                .filter_map(|w| self.job_queues.get_key_value(w))
                .filter_map(front)
                .min(),
            None => self.job_queues.iter().filter_map(front).min(),
        };
        let id = best?.1.clone();
        let lease_until = now.saturating_add(lease_ms);
        self.move_job(&id, JobPlace::Leased(lease_until));
        let handout = self.askers.next_handout();
        let record = self.jobs.get_mut(&id)?;
        record.handout = handout;
        let record = &*record;
        let pipeline_data = match (&record.pipeline_id, record.pipeline_data) {
            (Some(p), true) => self.pipelines.get_mut(p).map(|p| {
                // Worked out at restart already; never handed out without its data.
                let PipelineRecord {
                    pipeline, job_data, ..
                } = p;
                job_data
                    .get_or_insert_with(|| job_data_of(pipeline))
                    .clone()
            }),
            _ => None,
        };
        Some(JobHandout {
            job_id: id,
            worker: record.worker.clone(),
            pipeline_id: record.pipeline_id.clone(),
            fields: record.fields.clone(),
            pipeline_data,
        })
    }

    /// Whether the `data` in `fields` of a job of pipeline `p` is large and the pipeline's
    /// own, byte for byte, as pipeliners send it: then it is taken out of `fields`, and kept
    /// once with the pipeline instead of with each of its jobs (see
    /// [`JobRecord::pipeline_data`]).
    fn share_pipeline_data(&mut self, p: &PipelineId, fields: &mut RawFields) -> bool {
        let Some(data) = fields
            .get("data")
            .filter(|d| d.get().len() >= SHARED_DATA_MIN_BYTES)
        else {
            return false;
        };
        let Some(PipelineRecord {
            pipeline, job_data, ..
        }) = self.pipelines.get_mut(p)
        else {
            return false;
        };
        let shared = job_data.get_or_insert_with(|| job_data_of(pipeline));
        if shared.get("data").is_some_and(|s| s.get() == data.get()) {
            fields.remove("data");
            true
        } else {
            false
        }
    }

    /// One attempt of a pending job failed: queue it again after a back-off, or fail it for
    /// good once it used its attempts.
    fn attempt_failed(&mut self, id: &JobId, error: &str, now: u64, events: &mut Vec<Event>) {
        let Some(record) = self.jobs.get_mut(id) else {
            return;
        };
        record.attempts += 1;
        record.error = Some(error.to_owned());
        let legacy = record.legacy;
        let attempts = record.attempts;
        let worker = record.worker.clone();
        let pipeline = record.pipeline_id.clone();
        let max = self.max_attempts(&worker);
        let last = attempts >= max;
        if last {
            let error = if max > 1 {
                format!("{error} (failed {attempts} of {max} attempts)")
            } else {
                error.to_owned()
            };
            self.count_job_failed(id, &worker, pipeline.as_ref(), &error, true, now);
            events.push(Event::job_failed(id.clone(), &error));
            if legacy && self.policy.legacy_end_broadcast {
                // Added as the original's pipeliner adds jobs: it hears only `job finished`,
                // and its broker reported a failed job as finished, so this one is too.
                events.push(Event::job_finished(
                    id.clone(),
                    &WireDuration::from_secs(0.0),
                ));
            }
            self.move_job(id, JobPlace::Ended(JobState::Failed, Some(error)));
            return;
        }
        let backoff = self
            .policy
            .retry_backoff_ms
            .saturating_mul(1 << (attempts - 1).min(16))
            .min(30_000);
        self.count_job_failed(id, &worker, pipeline.as_ref(), error, false, now);
        self.move_job(id, JobPlace::Delayed(now.saturating_add(backoff)));
        debug!(job_id = %id, %worker, attempts, backoff_ms = backoff, "job will be retried");
    }

    pub(super) fn job_finished(
        &mut self,
        done: JobFinished,
        now: u64,
        events: &mut Vec<Event>,
    ) -> Reply {
        // A late report of a job that ended already (re-run elsewhere, or reported twice) is
        // answered as the legacy router did and changes nothing.
        if !self.is_pending(&done.job_id) {
            return Answer::new(AnswerKind::UnknownJobId).into();
        }
        // Kept for the counts: the record of a job without a pipeline goes when it ends.
        let worker = self
            .jobs
            .get(&done.job_id)
            .filter(|r| r.pipeline_id.is_none())
            .map(|r| r.worker.clone());
        let ends = self.jobs.get(&done.job_id).and_then(|r| {
            let ends = r.ends_pipeline.as_ref()?;
            Some((r.pipeline_id.clone()?, ends.clone()))
        });
        self.move_job(&done.job_id, JobPlace::Ended(JobState::Finished, None));
        let secs = done.duration.as_secs();
        if let Some(record) = self.jobs.get_mut(&done.job_id) {
            // A job of a pending pipeline keeps its record until the pipeline ends.
            record.duration = Some(secs);
            let worker = record.worker.clone();
            self.count_job_finished(&worker, secs, now);
        } else if let Some(worker) = worker {
            self.count_job_finished(&worker, secs, now);
        }
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

    pub(super) fn job_failed(
        &mut self,
        failed: JobFailed,
        now: u64,
        events: &mut Vec<Event>,
    ) -> Reply {
        // Only the run of a job counts: a stale report (the job was queued again meanwhile)
        // must not use up an attempt.
        let running = self
            .jobs
            .get(&failed.job_id)
            .is_some_and(|r| r.state == JobState::Running);
        if !running {
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

    /// Extends the leases of the running jobs among `ids`.
    pub(super) fn renew_job_leases(&mut self, ids: Vec<JobId>, now: u64) {
        let until = now.saturating_add(self.policy.job_lease_ms);
        for id in ids {
            if self
                .jobs
                .get(&id)
                .is_some_and(|r| r.state == JobState::Running)
            {
                self.move_job(&id, JobPlace::Leased(until));
            }
        }
    }

    /// Jobs whose lease ended by `now`: their broker stopped or hung; each counts as a failed
    /// attempt.
    pub(super) fn expire_job_leases(&mut self, now: u64, events: &mut Vec<Event>) {
        while let Some((_, id)) = self.job_leases.pop_due(now) {
            if let Some(record) = self.jobs.get(&id) {
                warn!(job_id = %id, worker = %record.worker, "job lease expired; the broker stopped renewing it");
            }
            self.attempt_failed(
                &id,
                "the job's lease expired (its broker stopped or hung)",
                now,
                events,
            );
        }
    }

    /// Jobs whose back-off is over by `now` go back to their queue.
    pub(super) fn end_back_offs(&mut self, now: u64, events: &mut Vec<Event>) {
        while let Some((_, id)) = self.delayed.pop_due(now) {
            if self.jobs.contains_key(&id) {
                self.move_job(&id, JobPlace::Queued);
                events.push(Event::NewJob);
            }
        }
    }
}

/// A job's `data` at least this large is kept once with its pipeline when it is the
/// pipeline's (see [`JobRecord::pipeline_data`]); smaller data costs less to keep than to
/// compare.
const SHARED_DATA_MIN_BYTES: usize = 1024;

/// The `data` pipeliners hand each job of the pipeline whose serialized form is `pipeline`:
/// its data as a JSON object made of the text of each value as the client sent it (no `data`
/// when the pipeline has none), read without parsing the values (see
/// [`Pipeline::legacy_data_text`]).
pub(super) fn job_data_of(pipeline: &RawValue) -> RawFields {
    let mut fields = RawFields::new();
    if let Ok(Some(data)) = Pipeline::legacy_data_text(pipeline.get()) {
        fields.insert_raw("data", data);
    }
    fields
}
