//! What the router counts and hears about the cluster, for `cluster status` and the metrics:
//! the brokers and pipeliners that identify themselves, requests by command, jobs and
//! pipelines by outcome, the last failures, the last minute's throughput and the job
//! durations per worker. All of it in memory only, plain counters the state task updates as
//! it goes (no lock, no atomic); a restart starts it afresh.

use std::collections::{HashMap, VecDeque};

use pypelinin_common::ids::{JobId, PipelineId};
use pypelinin_common::protocol::cluster::{
    ClusterStatus, Peer, PeerRole, PeerStatus, PipelineCounts, RecentFailure, Throughput,
    UnservedWorker, WorkerStatus,
};
use pypelinin_common::protocol::{JobState, PipelineState, Request};

use super::State;

/// Failures kept for `cluster status`.
const RECENT_FAILURES: usize = 20;
/// Peers remembered at most (the oldest heard of is forgotten first).
const MAX_PEERS: usize = 10_000;
/// The throughput window, in seconds.
const WINDOW_SECS: u64 = 60;

/// Upper bounds of the job duration buckets, in seconds.
pub const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 300.0,
];

/// A histogram: counts per bucket of its bounds (not cumulative; the last slot counts what is
/// above them all), their sum and count. Updated in place by one owner, no lock.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    /// Upper bounds of the buckets, increasing.
    pub bounds: &'static [f64],
    /// Observations per bucket, and one more for those above every bound.
    pub counts: Vec<u64>,
    /// Sum of the observations.
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
}

impl Histogram {
    /// An empty histogram with these bucket bounds.
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    /// Counts `value`.
    pub fn observe(&mut self, value: f64) {
        let slot = self
            .bounds
            .iter()
            .position(|bound| value <= *bound)
            .unwrap_or(self.bounds.len());
        self.counts[slot] += 1;
        self.sum += value;
        self.count += 1;
    }
}

impl Default for Histogram {
    /// A histogram of job durations ([`DURATION_BUCKETS`]).
    fn default() -> Self {
        Self::new(DURATION_BUCKETS)
    }
}

/// Counts by outcome of one worker's jobs.
#[derive(Debug, Clone, Default)]
pub(super) struct WorkerCounts {
    finished: u64,
    failed: u64,
    retried: u64,
    durations: Histogram,
}

/// What ended in one second.
#[derive(Debug, Clone, Copy, Default)]
struct Second {
    at: u64,
    jobs_finished: u64,
    jobs_failed: u64,
    pipelines_finished: u64,
    pipelines_failed: u64,
}

/// See the module documentation.
#[derive(Debug, Default)]
pub(super) struct Census {
    started: Option<u64>,
    peers: HashMap<String, (Peer, u64)>,
    workers: HashMap<String, WorkerCounts>,
    pipelines_finished: u64,
    pipelines_failed: u64,
    pipelines_cancelled: u64,
    failures: VecDeque<(u64, RecentFailure)>,
    seconds: VecDeque<Second>,
    requests: Vec<u64>,
}

impl Census {
    /// The bucket of the second of `now`.
    fn second(&mut self, now: u64) -> &mut Second {
        let at = now / 1000;
        if self.seconds.back().is_none_or(|s| s.at < at) {
            while self
                .seconds
                .front()
                .is_some_and(|s| s.at + WINDOW_SECS <= at)
            {
                self.seconds.pop_front();
            }
            self.seconds.push_back(Second {
                at,
                ..Second::default()
            });
        }
        // Just pushed, or the current second's: never empty here.
        let last = self.seconds.len() - 1;
        &mut self.seconds[last]
    }

    /// The counts of `worker` (the name is copied only the first time).
    fn worker(&mut self, worker: &str) -> &mut WorkerCounts {
        if !self.workers.contains_key(worker) {
            self.workers
                .insert(worker.to_owned(), WorkerCounts::default());
        }
        let Some(counts) = self.workers.get_mut(worker) else {
            unreachable!("inserted just above")
        };
        counts
    }

    fn failure(&mut self, now: u64, failure: RecentFailure) {
        if self.failures.len() == RECENT_FAILURES {
            self.failures.pop_front();
        }
        self.failures.push_back((now, failure));
    }
}

impl State {
    /// Counts `request` (and, for a `renew leases` that names its sender, notes the peer).
    pub(super) fn observe(&mut self, request: &Request, now: u64) {
        let census = &mut self.census;
        let index = Request::COMMANDS
            .iter()
            .position(|c| *c == request.command())
            .unwrap_or(0);
        if census.requests.len() <= index {
            census.requests.resize(Request::COMMANDS.len(), 0);
        }
        census.requests[index] += 1;
        if let Request::RenewLeases(renew) = request {
            if let Some(peer) = &renew.peer {
                self.peer_seen(peer, now);
            }
        }
    }

    fn peer_seen(&mut self, peer: &Peer, now: u64) {
        let peers = &mut self.census.peers;
        match peers.get_mut(&peer.id) {
            Some(seen) => *seen = (peer.clone(), now),
            None => {
                if peers.len() >= MAX_PEERS {
                    let oldest = peers
                        .iter()
                        .min_by_key(|(_, (_, at))| *at)
                        .map(|(id, _)| id.clone());
                    if let Some(oldest) = oldest {
                        peers.remove(&oldest);
                    }
                }
                peers.insert(peer.id.clone(), (peer.clone(), now));
            }
        }
    }

    /// Starts the clock of the counters (at the first tick).
    pub(super) fn census_tick(&mut self, now: u64) {
        let census = &mut self.census;
        census.started.get_or_insert(now);
        // Peers gone for long are forgotten.
        let forget_after = self.policy.peer_timeout_ms.saturating_mul(10).max(300_000);
        census
            .peers
            .retain(|_, (_, at)| now.saturating_sub(*at) < forget_after);
    }

    /// A job of `worker` finished after `secs`.
    pub(super) fn count_job_finished(&mut self, worker: &str, secs: f64, now: u64) {
        let counts = self.census.worker(worker);
        counts.finished += 1;
        counts.durations.observe(secs.max(0.0));
        self.census.second(now).jobs_finished += 1;
    }

    /// A job of `worker` failed an attempt; `last` when it failed for good.
    pub(super) fn count_job_failed(
        &mut self,
        job: &JobId,
        worker: &str,
        pipeline: Option<&PipelineId>,
        error: &str,
        last: bool,
        now: u64,
    ) {
        let census = &mut self.census;
        if !last {
            census.worker(worker).retried += 1;
            return;
        }
        census.worker(worker).failed += 1;
        census.second(now).jobs_failed += 1;
        census.failure(
            now,
            RecentFailure {
                secs_ago: 0.0,
                pipeline_id: pipeline.cloned(),
                job_id: Some(job.clone()),
                worker: worker.to_owned(),
                error: error.to_owned(),
            },
        );
    }

    /// A pipeline ended in `state`; a failed one with its job, worker and error.
    pub(super) fn count_pipeline_ended(
        &mut self,
        id: &PipelineId,
        status: &pypelinin_common::protocol::PipelineStatus,
        now: u64,
    ) {
        let census = &mut self.census;
        match status.state {
            PipelineState::Finished => {
                census.pipelines_finished += 1;
                census.second(now).pipelines_finished += 1;
            }
            PipelineState::Cancelled => {
                census.pipelines_cancelled += 1;
                census.second(now).pipelines_failed += 1;
            }
            _ => {
                census.pipelines_failed += 1;
                census.second(now).pipelines_failed += 1;
                // A job that failed for good was listed already, with the same error.
                let listed = census.failures.iter().any(|(_, f)| {
                    f.job_id.is_some() && f.job_id == status.job_id && f.pipeline_id.is_some()
                });
                if !listed {
                    census.failure(
                        now,
                        RecentFailure {
                            secs_ago: 0.0,
                            pipeline_id: Some(id.clone()),
                            job_id: status.job_id.clone().filter(|j| !j.as_str().is_empty()),
                            worker: status.worker.clone().unwrap_or_default(),
                            error: status.error.clone().unwrap_or_default(),
                        },
                    );
                }
            }
        }
    }

    /// What the router knows of the cluster at `now` (`cluster status`).
    pub fn cluster_status(&self, now: u64) -> ClusterStatus {
        let census = &self.census;
        let timeout = self.policy.peer_timeout_ms;
        let mut workers: HashMap<String, WorkerStatus> = HashMap::new();
        for (worker, counts) in &census.workers {
            let w = workers.entry(worker.clone()).or_default();
            w.finished = counts.finished;
            w.failed = counts.failed;
            w.retried = counts.retried;
        }
        for (worker, queue) in &self.job_queues {
            workers.entry(worker.clone()).or_default().queued = queue.len();
        }
        for record in self.jobs.values() {
            match (record.state, record.not_before) {
                (JobState::Running, _) => {
                    workers.entry(record.worker.clone()).or_default().running += 1;
                }
                (JobState::Queued, Some(_)) => {
                    workers.entry(record.worker.clone()).or_default().delayed += 1;
                }
                _ => {}
            }
        }
        let mut peers: Vec<PeerStatus> = census
            .peers
            .values()
            .map(|(peer, at)| {
                let ago = now.saturating_sub(*at);
                PeerStatus {
                    peer: peer.clone(),
                    last_seen_secs: ago as f64 / 1000.0,
                    gone: ago >= timeout,
                }
            })
            .collect();
        peers.sort_by(|a, b| {
            (a.peer.role, a.last_seen_secs, &a.peer.id)
                .partial_cmp(&(b.peer.role, b.last_seen_secs, &b.peer.id))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        for p in peers
            .iter()
            .filter(|p| !p.gone && p.peer.role == PeerRole::Broker)
        {
            for worker in &p.peer.workers {
                workers.entry(worker.clone()).or_default().brokers += 1;
            }
        }
        let (mut queued, mut running) = (0, 0);
        for record in self.pipelines.values() {
            match record.state {
                PipelineState::Running => running += 1,
                _ => queued += 1,
            }
        }
        let started = census.started.unwrap_or(now);
        let window_start = (now / 1000).saturating_sub(WINDOW_SECS - 1);
        let mut last_minute = Throughput {
            window_secs: (now.saturating_sub(started) as f64 / 1000.0).min(WINDOW_SECS as f64),
            ..Throughput::default()
        };
        for s in census.seconds.iter().filter(|s| s.at >= window_start) {
            last_minute.jobs_finished += s.jobs_finished;
            last_minute.jobs_failed += s.jobs_failed;
            last_minute.pipelines_finished += s.pipelines_finished;
            last_minute.pipelines_failed += s.pipelines_failed;
        }
        ClusterStatus {
            uptime_secs: now.saturating_sub(started) as f64 / 1000.0,
            workers: workers.into_iter().collect(),
            pipelines: PipelineCounts {
                queued,
                running,
                finished: census.pipelines_finished,
                failed: census.pipelines_failed,
                cancelled: census.pipelines_cancelled,
            },
            peers,
            recent_failures: census
                .failures
                .iter()
                .rev()
                .map(|(at, f)| RecentFailure {
                    secs_ago: now.saturating_sub(*at) as f64 / 1000.0,
                    ..f.clone()
                })
                .collect(),
            last_minute,
            unserved: self
                .unserved_workers()
                .into_iter()
                .map(|u| UnservedWorker {
                    waiting_secs: now.saturating_sub(u.since) as f64 / 1000.0,
                    worker: u.worker,
                    jobs: u.jobs,
                })
                .collect(),
            waiting_requests: self.waiting.len(),
        }
    }

    /// Requests handled since the router started, by command (every command listed).
    pub fn requests_by_command(&self) -> Vec<(&'static str, u64)> {
        Request::COMMANDS
            .iter()
            .enumerate()
            .map(|(i, c)| (*c, self.census.requests.get(i).copied().unwrap_or(0)))
            .collect()
    }

    /// Job durations per worker since the router started, by worker name.
    pub fn job_durations(&self) -> Vec<(String, Histogram)> {
        let mut out: Vec<_> = self
            .census
            .workers
            .iter()
            .map(|(w, c)| (w.clone(), c.durations.clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}
