//! What must hold between the records and the indexes after every step.

use std::collections::BTreeMap;

use pypelinin_common::protocol::{JobState, PipelineState};

use super::{State, MAX_WAITING};

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
                (JobState::Queued, Some(t), None) if !in_queue && self.delayed.contains(t, id) => {
                    delayed += 1
                }
                (JobState::Running, None, Some(t))
                    if !in_queue && self.job_leases.contains(t, id) =>
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
        let (mut queued, mut leased, mut with_deadline) = (0, 0, 0);
        for (id, r) in &self.pipelines {
            if let Some(t) = r.deadline {
                if !self.deadlines.contains(t, id) {
                    return Err(format!("pipeline {id}'s deadline {t} is not in the index"));
                }
                with_deadline += 1;
            }
            if r.seq >= self.next_seq {
                return Err(format!("pipeline {id} has seq {} >= next seq", r.seq));
            }
            match (r.state, r.lease_until) {
                (PipelineState::Queued, None)
                    if self.pipeline_queue.get(&r.seq).is_some_and(|q| q == id) =>
                {
                    queued += 1
                }
                (PipelineState::Running, Some(t)) if self.pipeline_leases.contains(t, id) => {
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
        if self.deadlines.len() != with_deadline {
            return Err(format!(
                "the deadline index holds {} pipelines; records say {with_deadline}",
                self.deadlines.len()
            ));
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
        let recorded: usize = self.pipelines.values().map(|r| r.aliases.len()).sum();
        if recorded != self.legacy.aliases.len()
            || self.legacy.aliases.iter().any(|(alias, id)| {
                !self
                    .pipelines
                    .get(id)
                    .is_some_and(|r| r.aliases.contains(alias))
            })
        {
            return Err("the alias index does not match the pipelines' aliases".into());
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
