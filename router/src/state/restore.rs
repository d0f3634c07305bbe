//! Rebuilding the state from persisted records at start.

use pypelinin_common::ids::{JobId, PipelineId};
use pypelinin_common::protocol::{JobState, PipelineState};
use serde_json::{Map, Value};

use super::records::{EndedRecord, JobRecord, PipelineRecord};
use super::{Policy, State, REQUEST_ID};

impl State {
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
                    s.delayed.insert(t, id.clone());
                }
                (JobState::Queued, None, _) => {
                    s.job_queues
                        .entry(record.worker.clone())
                        .or_default()
                        .insert(record.seq, id.clone());
                }
                (JobState::Running, _, Some(t)) => {
                    s.job_leases.insert(t, id.clone());
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
                    s.pipeline_leases.insert(t, id.clone());
                }
                _ => {}
            }
            if let Some(t) = record.deadline {
                s.deadlines.insert(t, id.clone());
            }
            if let Some(r) = record.fields.string(REQUEST_ID) {
                s.request_ids.insert(r.to_owned(), id.clone());
            }
            for alias in &record.aliases {
                s.legacy.aliases.insert(alias.clone(), id.clone());
            }
            s.pipelines.insert(id, record);
        }
        // Each pipeline's jobs, in the order they were added (their sequence numbers), from
        // the jobs' records: a pipeline's row does not hold them.
        let mut of_pipeline: Vec<(u64, PipelineId, JobId)> = s
            .jobs
            .iter()
            .filter_map(|(id, r)| Some((r.seq, r.pipeline_id.clone()?, id.clone())))
            .collect();
        of_pipeline.sort_unstable_by_key(|(seq, _, _)| *seq);
        for record in s.pipelines.values_mut() {
            record.jobs.clear();
        }
        for (_, pipeline, job) in of_pipeline {
            if let Some(record) = s.pipelines.get_mut(&pipeline) {
                if s.jobs[&job].pipeline_data && record.job_data.is_none() {
                    record.job_data = Some(super::jobs::job_data_of(&record.pipeline));
                }
                record.jobs.push(job);
            }
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

    /// The state a restart would restore from what this one persisted (its records): for the
    /// property tests and the fuzz target, with [`State::check_restored`].
    pub fn restarted(&self) -> State {
        let mut restored = State::restore(
            self.configuration.clone(),
            self.policy.clone(),
            self.jobs
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            // As stored: without their job lists.
            self.pipelines
                .iter()
                .map(|(k, v)| {
                    let mut v = v.clone();
                    v.jobs.clear();
                    (k.clone(), v)
                })
                .collect(),
            self.ended
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        );
        restored.ids = self.ids.clone();
        restored
    }

    /// Checks that `restored` (see [`State::restarted`]) holds the same records, queues,
    /// back-offs, leases and remembered outcomes as this state. Requests waiting for work live
    /// in memory only: a restart answers none of them.
    ///
    /// # Errors
    /// The first difference found.
    pub fn check_restored(&self, restored: &State) -> Result<(), String> {
        let differs = |what: &str| Err(format!("a restart does not restore the same {what}"));
        if restored.jobs != self.jobs {
            return differs("job records");
        }
        if restored.job_queues != self.job_queues {
            return differs("job queues");
        }
        if restored.delayed != self.delayed {
            return differs("back-offs");
        }
        if restored.job_leases != self.job_leases {
            return differs("job leases");
        }
        if restored.pipeline_queue != self.pipeline_queue {
            return differs("pipeline queue");
        }
        if restored.pipeline_leases != self.pipeline_leases {
            return differs("pipeline leases");
        }
        if restored.deadlines != self.deadlines {
            return differs("deadlines");
        }
        let job_lists = |s: &State| {
            let mut lists: Vec<_> = s
                .pipelines
                .iter()
                .map(|(id, r)| (id.clone(), r.jobs.clone()))
                .collect();
            lists.sort();
            lists
        };
        if job_lists(restored) != job_lists(self) {
            return differs("job lists of the pipelines");
        }
        // Outcomes that ended in the same millisecond may come back in another order.
        let sorted = |s: &State| {
            let mut order: Vec<_> = s.ended_order.iter().cloned().collect();
            order.sort();
            order
        };
        if restored.ended != self.ended || sorted(restored) != sorted(self) {
            return differs("outcomes");
        }
        if restored.request_ids != self.request_ids {
            return differs("request ids");
        }
        if restored.legacy.aliases != self.legacy.aliases {
            return differs("pipeline aliases");
        }
        // Sequence numbers of records that are gone are not kept: new ones still come after
        // every live one.
        if restored.next_seq > self.next_seq {
            return differs("sequence");
        }
        restored.check_invariants()
    }
}
