//! What the router does for the original's pipeliner and client beyond answering their
//! commands: it holds back ends they could not hear yet, and hands a pipeline out again under
//! a new id.
//!
//! **Held ends.** The original's pipeliner subscribes to `job finished: ID` only once it has
//! the reply to its `add job`, and its client to `pipeline finished: id=ID` only once it has
//! the reply to `add pipeline`. Work that ends before that subscription reaches the router
//! would end unheard, and that peer would wait for it forever. So the end broadcasts of a job
//! added without a pipeline id, and of a pipeline added without a request id (the only way
//! those peers add work; ours always send both), are held until
//! [`Policy::legacy_subscribe_grace_ms`](super::Policy::legacy_subscribe_grace_ms) after the
//! add, then sent in order. Each end is still broadcast once; work that ends later is not
//! delayed at all. Held broadcasts live in memory only, as broadcasts in flight do.
//!
//! **Aliases.** The original's pipeliner keeps its pipelines by id and dies (`KeyError`) when
//! two copies of one id finish. A pipeline handed out again through `get pipeline` (its lease
//! ended) therefore goes out under a new id, an alias, that `pipeline finished` and `pipeline
//! failed` accept for it; the first report from any copy ends it, the others are answered
//! `unknown pipeline id`. Aliases are kept in the pipeline's record, so they survive a restart.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::Hash;

use pypelinin_common::ids::{JobId, PipelineId};
use pypelinin_common::protocol::{Event, PipelineHandout};

use super::State;

/// Ids added recently, with when their end may be broadcast; each is forgotten once that time
/// has passed.
#[derive(Debug)]
pub(super) struct Recent<Id> {
    until: HashMap<Id, u64>,
    order: VecDeque<(u64, Id)>,
}

impl<Id> Default for Recent<Id> {
    fn default() -> Self {
        Self {
            until: HashMap::new(),
            order: VecDeque::new(),
        }
    }
}

impl<Id: Hash + Eq + Clone> Recent<Id> {
    fn note(&mut self, id: Id, until: u64) {
        self.until.insert(id.clone(), until);
        self.order.push_back((until, id));
    }

    /// When the end of `id` may be broadcast, if that is after `now`.
    fn hold_until(&self, id: &Id, now: u64) -> Option<u64> {
        self.until.get(id).copied().filter(|t| *t > now)
    }

    fn forget_due(&mut self, now: u64) {
        // The grace is one constant, so the order of adding is the order of `until`.
        while let Some((t, _)) = self.order.front() {
            if *t > now {
                break;
            }
            if let Some((t, id)) = self.order.pop_front() {
                if self.until.get(&id) == Some(&t) {
                    self.until.remove(&id);
                }
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.until.is_empty()
    }
}

/// The router's memory for legacy peers: recent adds, held broadcasts, aliases.
#[derive(Debug, Default)]
pub(super) struct Legacy {
    jobs: Recent<JobId>,
    pipelines: Recent<PipelineId>,
    /// Broadcasts held back, by when they go (and their order).
    held: BTreeMap<(u64, u64), Event>,
    next_held: u64,
    /// Alias → the pipeline it stands for.
    pub(super) aliases: HashMap<PipelineId, PipelineId>,
}

impl State {
    /// Notes job `id`, added at `now` without a pipeline id: its end waits for the grace.
    pub(super) fn note_legacy_job(&mut self, id: &JobId, now: u64) {
        let grace = self.policy.legacy_subscribe_grace_ms;
        if grace > 0 {
            self.legacy.jobs.note(id.clone(), now.saturating_add(grace));
        }
    }

    /// Notes pipeline `id`, added at `now` without a request id: its end waits for the grace.
    pub(super) fn note_legacy_pipeline(&mut self, id: &PipelineId, now: u64) {
        let grace = self.policy.legacy_subscribe_grace_ms;
        if grace > 0 {
            self.legacy
                .pipelines
                .note(id.clone(), now.saturating_add(grace));
        }
    }

    /// Moves the ends among `events[from..]` that a legacy peer may not have subscribed to yet
    /// into the held broadcasts.
    pub(super) fn hold_early_ends(&mut self, from: usize, now: u64, events: &mut Vec<Event>) {
        let legacy = &mut self.legacy;
        if legacy.jobs.is_empty() && legacy.pipelines.is_empty() {
            return;
        }
        let mut i = from;
        while i < events.len() {
            let until = match &events[i] {
                Event::JobFinished { job_id, .. } | Event::JobFailed { job_id, .. } => {
                    legacy.jobs.hold_until(job_id, now)
                }
                Event::PipelineFinished { pipeline_id, .. }
                | Event::PipelineFailed { pipeline_id, .. }
                | Event::PipelineCancelled { pipeline_id } => {
                    legacy.pipelines.hold_until(pipeline_id, now)
                }
                _ => None,
            };
            match until {
                Some(t) => {
                    let event = events.remove(i);
                    legacy.held.insert((t, legacy.next_held), event);
                    legacy.next_held += 1;
                }
                None => i += 1,
            }
        }
    }

    /// Sends the held broadcasts whose time came by `now`, and forgets adds past their grace.
    pub(super) fn release_held(&mut self, now: u64, events: &mut Vec<Event>) {
        let legacy = &mut self.legacy;
        while let Some(entry) = legacy.held.first_entry() {
            if entry.key().0 > now {
                break;
            }
            events.push(entry.remove());
        }
        legacy.jobs.forget_due(now);
        legacy.pipelines.forget_due(now);
    }

    /// Broadcasts held back, waiting for their time.
    pub fn held_broadcasts(&self) -> usize {
        self.legacy.held.len()
    }

    /// The pipeline `id` stands for: itself, or the pipeline it is an alias of.
    pub(super) fn resolve(&self, id: PipelineId) -> PipelineId {
        match self.legacy.aliases.get(&id) {
            Some(real) => real.clone(),
            None => id,
        }
    }

    /// Gives `handout`, taken through `get pipeline`, a new id when its pipeline was handed out
    /// before (see the module documentation).
    pub(super) fn alias_rehanded(&mut self, handout: &mut PipelineHandout) {
        let real = handout.pipeline_id.clone();
        if self.pipelines.get(&real).is_none_or(|r| r.handouts <= 1) {
            return;
        }
        let alias = self.ids.pipeline();
        if let Some(record) = self.pipelines.get_mut(&real) {
            record.aliases.push(alias.clone());
            self.changes.pipelines.insert(real.clone());
        }
        self.legacy.aliases.insert(alias.clone(), real);
        handout.pipeline_id = alias;
    }

    /// Forgets the aliases of a pipeline that ends.
    pub(super) fn forget_aliases(&mut self, aliases: &[PipelineId]) {
        for alias in aliases {
            self.legacy.aliases.remove(alias);
        }
    }
}
