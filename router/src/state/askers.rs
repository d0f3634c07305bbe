//! Work handed out under daemons' asks, until a renewal settles them.
//!
//! A broker or pipeliner numbers its `get jobs` / `get pipelines` ([`Ask`]). The router notes
//! what it hands out under each ask. A later `renew leases` of the same daemon says that its
//! asks up to some number are settled — their answers taken in, or given up (a request that
//! timed out: its socket is rebuilt, so its answer can no longer arrive) — and lists all it
//! holds. Work noted under a settled ask that the daemon does not hold, and that is still out
//! under that same hand-out, never reached it: the router queues it again at once, in its old
//! place and without counting an attempt, instead of when its lease runs out. This is what a
//! network partition leaves behind: a `get jobs` answered while the link was down, given up by
//! the broker meanwhile. The notes live in memory only; after a restart, leases cover the
//! rest.

use std::collections::{BTreeMap, HashMap, HashSet};

use pypelinin_common::ids::{JobId, PipelineId};
use pypelinin_common::protocol::request::{Ask, Settled};
use pypelinin_common::protocol::{Event, JobState, PipelineState};
use tracing::info;

use super::State;

/// Hand-outs noted per daemon at most; past it the oldest asks' notes are dropped (their
/// work then comes back when its lease ends, as without notes).
const MAX_NOTED: usize = 200_000;

/// The hand-outs of every daemon that asks with an [`Ask`].
#[derive(Debug, Default)]
pub(super) struct Askers {
    by_id: HashMap<String, Asked>,
    /// The number of the last hand-out, counted up from 1.
    last_handout: u64,
}

/// What one daemon was handed under asks not settled yet: (id, hand-out number) per ask.
#[derive(Debug, Default)]
struct Asked {
    /// When it last asked or settled (ms since the epoch).
    last_seen: u64,
    jobs: BTreeMap<u64, Vec<(JobId, u64)>>,
    pipelines: BTreeMap<u64, Vec<(PipelineId, u64)>>,
    noted: usize,
}

impl Asked {
    /// Drops the oldest asks' notes while more than [`MAX_NOTED`] are kept.
    fn trim(&mut self) {
        while self.noted > MAX_NOTED {
            let oldest_job = self.jobs.keys().next().copied();
            let oldest_pipeline = self.pipelines.keys().next().copied();
            let dropped = match (oldest_job, oldest_pipeline) {
                (Some(j), Some(p)) if p < j => self.pipelines.pop_first().map(|(_, v)| v.len()),
                (Some(_), _) => self.jobs.pop_first().map(|(_, v)| v.len()),
                (None, Some(_)) => self.pipelines.pop_first().map(|(_, v)| v.len()),
                (None, None) => None,
            };
            let Some(n) = dropped else { return };
            self.noted = self.noted.saturating_sub(n);
        }
    }
}

impl Askers {
    /// A new hand-out number.
    pub(super) fn next_handout(&mut self) -> u64 {
        self.last_handout += 1;
        self.last_handout
    }

    /// Notes `jobs` (id, hand-out number) handed out under `ask`.
    pub(super) fn note_jobs(&mut self, ask: &Ask, jobs: Vec<(JobId, u64)>, now: u64) {
        let asked = self.by_id.entry(ask.id.clone()).or_default();
        asked.last_seen = now;
        if !jobs.is_empty() {
            asked.noted += jobs.len();
            asked.jobs.entry(ask.ask).or_default().extend(jobs);
            asked.trim();
        }
    }

    /// Notes `pipelines` handed out under `ask`.
    pub(super) fn note_pipelines(
        &mut self,
        ask: &Ask,
        pipelines: Vec<(PipelineId, u64)>,
        now: u64,
    ) {
        let asked = self.by_id.entry(ask.id.clone()).or_default();
        asked.last_seen = now;
        if !pipelines.is_empty() {
            asked.noted += pipelines.len();
            asked
                .pipelines
                .entry(ask.ask)
                .or_default()
                .extend(pipelines);
            asked.trim();
        }
    }

    /// Takes out the notes of `settled`'s asks.
    fn take_settled(&mut self, settled: &Settled, now: u64) -> Option<Asked> {
        let asked = self.by_id.get_mut(&settled.id)?;
        asked.last_seen = now;
        let after = settled.settled.saturating_add(1);
        let later_jobs = asked.jobs.split_off(&after);
        let later_pipelines = asked.pipelines.split_off(&after);
        let due = Asked {
            last_seen: now,
            jobs: std::mem::replace(&mut asked.jobs, later_jobs),
            pipelines: std::mem::replace(&mut asked.pipelines, later_pipelines),
            noted: 0,
        };
        let n = due.jobs.values().map(Vec::len).sum::<usize>()
            + due.pipelines.values().map(Vec::len).sum::<usize>();
        asked.noted = asked.noted.saturating_sub(n);
        Some(due)
    }

    /// Daemons heard of, for tests.
    #[cfg(test)]
    pub(super) fn known(&self) -> usize {
        self.by_id.len()
    }
}

impl State {
    /// Queues again the work handed out under the settled asks of `settled` that the daemon
    /// does not hold (`jobs`, `pipelines`) and that is still out under that hand-out.
    pub(super) fn settle(
        &mut self,
        settled: &Settled,
        jobs: &[JobId],
        pipelines: &[PipelineId],
        now: u64,
        events: &mut Vec<Event>,
    ) {
        let Some(due) = self.askers.take_settled(settled, now) else {
            return;
        };
        let held: HashSet<&JobId> = jobs.iter().collect();
        let lost_jobs: Vec<JobId> = due
            .jobs
            .into_values()
            .flatten()
            .filter(|(id, handout)| {
                !held.contains(id)
                    && self
                        .jobs
                        .get(id)
                        .is_some_and(|r| r.state == JobState::Running && r.handout == *handout)
            })
            .map(|(id, _)| id)
            .collect();
        let held: HashSet<&PipelineId> = pipelines.iter().collect();
        let lost_pipelines: Vec<PipelineId> =
            due.pipelines
                .into_values()
                .flatten()
                .filter(|(id, handout)| {
                    !held.contains(id)
                        && self.pipelines.get(id).is_some_and(|r| {
                            r.state == PipelineState::Running && r.handout == *handout
                        })
                })
                .map(|(id, _)| id)
                .collect();
        if lost_jobs.is_empty() && lost_pipelines.is_empty() {
            return;
        }
        info!(
            asker = %settled.id,
            jobs = lost_jobs.len(),
            pipelines = lost_pipelines.len(),
            "work handed out in answers that never reached their daemon is queued again"
        );
        self.take_back(&lost_jobs, &lost_pipelines, events);
    }

    /// Forgets the daemons not heard of for longer than a lease: whatever they were handed
    /// has come back through its lease by then.
    pub(super) fn forget_askers(&mut self, now: u64) {
        let horizon = self.policy.job_lease_ms.max(self.policy.pipeline_lease_ms);
        self.askers
            .by_id
            .retain(|_, a| now.saturating_sub(a.last_seen) <= horizon);
    }
}
