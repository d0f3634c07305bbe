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

/// A job or a pipeline handed out.
#[derive(Debug)]
pub(super) enum Handed {
    Job(JobId),
    Pipeline(PipelineId),
}

/// What one daemon was handed under asks not settled yet: (what, hand-out number) per ask.
#[derive(Debug, Default)]
struct Asked {
    /// When it last asked or settled (ms since the epoch).
    last_seen: u64,
    handed: BTreeMap<u64, Vec<(Handed, u64)>>,
    noted: usize,
}

impl Askers {
    /// A new hand-out number.
    pub(super) fn next_handout(&mut self) -> u64 {
        self.last_handout += 1;
        self.last_handout
    }

    /// Notes what was handed out under `ask`, each with its hand-out number. Past
    /// [`MAX_NOTED`] notes of one daemon, its oldest asks' notes are dropped.
    pub(super) fn note(
        &mut self,
        ask: &Ask,
        handed: impl Iterator<Item = (Handed, u64)>,
        now: u64,
    ) {
        let asked = self.by_id.entry(ask.id.clone()).or_default();
        asked.last_seen = now;
        let before = asked.handed.get(&ask.ask).map_or(0, Vec::len);
        let noted = asked.handed.entry(ask.ask).or_default();
        noted.extend(handed);
        asked.noted += noted.len() - before;
        if noted.is_empty() {
            asked.handed.remove(&ask.ask);
        }
        while asked.noted > MAX_NOTED {
            let Some((_, dropped)) = asked.handed.pop_first() else {
                break;
            };
            asked.noted = asked.noted.saturating_sub(dropped.len());
        }
    }

    /// Takes out the notes of `settled`'s asks.
    fn take_settled(&mut self, settled: &Settled, now: u64) -> Vec<(Handed, u64)> {
        let Some(asked) = self.by_id.get_mut(&settled.id) else {
            return Vec::new();
        };
        asked.last_seen = now;
        let later = asked.handed.split_off(&settled.settled.saturating_add(1));
        let due: Vec<(Handed, u64)> = std::mem::replace(&mut asked.handed, later)
            .into_values()
            .flatten()
            .collect();
        asked.noted = asked.noted.saturating_sub(due.len());
        due
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
        let held_jobs: HashSet<&JobId> = jobs.iter().collect();
        let held_pipelines: HashSet<&PipelineId> = pipelines.iter().collect();
        let (mut lost_jobs, mut lost_pipelines) = (Vec::new(), Vec::new());
        for (handed, handout) in self.askers.take_settled(settled, now) {
            match handed {
                Handed::Job(id) => {
                    let out = self
                        .jobs
                        .get(&id)
                        .is_some_and(|r| r.state == JobState::Running && r.handout == handout);
                    if out && !held_jobs.contains(&id) {
                        lost_jobs.push(id);
                    }
                }
                Handed::Pipeline(id) => {
                    let out = self
                        .pipelines
                        .get(&id)
                        .is_some_and(|r| r.state == PipelineState::Running && r.handout == handout);
                    if out && !held_pipelines.contains(&id) {
                        lost_pipelines.push(id);
                    }
                }
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_daemon_that_never_settles_keeps_at_most_max_noted_notes_the_newest() {
        let mut askers = Askers::default();
        let per_ask = 1_000;
        for ask in 1..=(MAX_NOTED / per_ask + 2) as u64 {
            let handed =
                (0..per_ask).map(|i| (Handed::Job(JobId::from(format!("{ask}-{i}").as_str())), 1));
            askers.note(
                &Ask {
                    id: "d".into(),
                    ask,
                },
                handed,
                0,
            );
        }
        let asked = &askers.by_id["d"];
        assert!(asked.noted <= MAX_NOTED, "{}", asked.noted);
        assert_eq!(
            asked.noted,
            asked.handed.values().map(Vec::len).sum::<usize>()
        );
        assert_eq!(
            asked.handed.keys().next(),
            Some(&3),
            "the two oldest asks were dropped"
        );
        // Settling takes the notes out and the count with them.
        let due = askers.take_settled(
            &Settled {
                id: "d".into(),
                settled: 100,
            },
            0,
        );
        assert_eq!(due.len(), (100 - 2) * per_ask);
        assert_eq!(
            askers.by_id["d"].noted,
            askers.by_id["d"]
                .handed
                .values()
                .map(Vec::len)
                .sum::<usize>()
        );
    }
}
