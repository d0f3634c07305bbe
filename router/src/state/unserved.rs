//! Workers nobody serves: jobs queued for a worker that no broker has asked for. Such a job
//! would wait forever in silence, so once it has waited `unserved_worker_warn_ms` with no
//! broker asking for its worker in that time, the router logs one warning per worker (not per
//! job), and again only after a broker asked for it and stopped. Not persisted: after a
//! restart the wait is counted afresh.

use std::collections::HashMap;

use tracing::{info, warn};

use super::waiting::Want;
use super::State;

/// Who asked for which workers, and which workers are waited for in vain.
#[derive(Debug, Default)]
pub(super) struct Asks {
    /// When a broker last asked for each worker by name.
    by_worker: HashMap<String, u64>,
    /// When a broker last asked for jobs of any worker (a `get job` without names, as the
    /// legacy broker sends).
    any: Option<u64>,
    /// Workers with queued jobs and no broker asking: since when, and whether the warning was
    /// given.
    unserved: HashMap<String, (u64, bool)>,
}

/// A worker whose jobs wait and that no broker asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unserved {
    /// The worker's name.
    pub worker: String,
    /// Its queued jobs.
    pub jobs: usize,
    /// Since when (ms) no broker asked for it while jobs waited.
    pub since: u64,
}

impl Asks {
    /// A broker asked for jobs of `workers` (all workers when `None`) at `now`.
    fn note(&mut self, workers: Option<&[String]>, now: u64) {
        match workers {
            None => self.any = Some(now),
            Some(workers) => {
                for w in workers {
                    match self.by_worker.get_mut(w) {
                        Some(at) => *at = now,
                        None => {
                            self.by_worker.insert(w.clone(), now);
                        }
                    }
                }
            }
        }
    }
}

impl State {
    /// A broker asked for jobs of `workers` (all workers when `None`) at `now`.
    pub(super) fn note_asked(&mut self, workers: Option<&[String]>, now: u64) {
        self.asks.note(workers, now);
    }

    /// Looks for workers nobody serves (see the module documentation); run on each tick.
    pub(super) fn check_unserved(&mut self, now: u64) {
        // A request waiting for work asks all the time it waits.
        for waiting in &self.waiting {
            if let Want::Jobs(get, ..) = &waiting.want {
                self.asks.note(get.workers.as_deref(), now);
            }
        }
        let warn_ms = self.policy.unserved_worker_warn_ms;
        let Self {
            asks, job_queues, ..
        } = self;
        // An ask older than the warning time serves nobody any more: forget it (so names
        // asked for once cannot pile up).
        asks.by_worker
            .retain(|_, at| now.saturating_sub(*at) < warn_ms);
        asks.unserved
            .retain(|worker, _| job_queues.get(worker).is_some_and(|q| !q.is_empty()));
        for (worker, queue) in job_queues.iter() {
            if queue.is_empty() {
                continue;
            }
            let last = asks.by_worker.get(worker).copied().max(asks.any);
            let served = last.is_some_and(|t| now.saturating_sub(t) < warn_ms);
            if served {
                if let Some((since, true)) = asks.unserved.remove(worker) {
                    let secs = now.saturating_sub(since) / 1000;
                    info!(
                        worker,
                        "a broker asks for worker {worker} again after {secs} s"
                    );
                }
                continue;
            }
            let (since, warned) = asks.unserved.entry(worker.clone()).or_insert((now, false));
            if !*warned && now.saturating_sub(*since) >= warn_ms {
                *warned = true;
                let secs = now.saturating_sub(*since) / 1000;
                warn!(
                    worker,
                    jobs = queue.len(),
                    "no broker runs worker {worker}: {} job(s) waiting for {secs} s",
                    queue.len()
                );
            }
        }
    }

    /// The workers whose jobs have waited `unserved_worker_warn_ms` or more with no broker
    /// asking for them, by name.
    pub fn unserved_workers(&self) -> Vec<Unserved> {
        let mut out: Vec<Unserved> = self
            .asks
            .unserved
            .iter()
            .filter(|(_, (_, warned))| *warned)
            .map(|(worker, (since, _))| Unserved {
                worker: worker.clone(),
                jobs: self.job_queues.get(worker).map_or(0, |q| q.len()),
                since: *since,
            })
            .collect();
        out.sort_by(|a, b| a.worker.cmp(&b.worker));
        out
    }
}
