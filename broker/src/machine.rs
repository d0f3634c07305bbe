//! What the broker does, as a [`Machine`] the shared daemon loop drives: jobs in, reports
//! out. It starts each job it takes in a task of its own while it has a free slot, and joins
//! those tasks when it stops.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pypelinin_common::daemon::identity::Identity;
use pypelinin_common::daemon::runloop::Machine;
use pypelinin_common::ids::{JobId, PipelineId};
use pypelinin_common::protocol::cluster::{Peer, PeerRole};
use pypelinin_common::protocol::reply::FromReply;
use pypelinin_common::protocol::request::{GetJobs, JobFailed, JobFinished, RenewLeases};
use pypelinin_common::protocol::{Answer, Event, JobAssignment, ReplyError, Request, WireDuration};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::execute::{self, Outcome, Ran};
use crate::monitoring::Monitor;
use crate::store::Store;
use crate::worker::WorkerRegistry;

/// Above this mean job duration (seconds), a broker takes no job ahead of its free slots.
const LONG_JOB_SECS: f64 = 0.1;

/// The broker's state: the jobs it holds and the reports it owes.
pub struct BrokerMachine {
    registry: Arc<WorkerRegistry>,
    /// The workers offered at the last ask: all but those of withdrawn pools.
    workers: Mutex<Vec<String>>,
    store: Arc<dyn Store>,
    semaphore: Arc<Semaphore>,
    concurrency: usize,
    /// Jobs held at most while jobs are short: running plus taken ahead
    /// (`concurrency + prefetch`).
    capacity: usize,
    /// Recent mean job duration in seconds (an exponential moving average).
    mean_job_secs: f64,
    job_timeout: Duration,
    /// Jobs taken from the router and not reported yet (queued here or running), with what
    /// monitoring shows of them.
    held: HashMap<JobId, Value>,
    /// Jobs taken and not started yet, in the order the router handed them out. Shared with
    /// the job tasks: a task whose job ended starts the next one at once, without waiting for
    /// the loop (which may be in a round trip to the router).
    taken: Arc<Mutex<VecDeque<JobAssignment>>>,
    /// Jobs that ran and whose report the router has not acknowledged yet.
    reports: VecDeque<Ran>,
    /// The job tasks and monitoring saves: joined on stop.
    tasks: JoinSet<()>,
    /// The running jobs of pipelines, each with the token that stops it when its pipeline is
    /// cancelled. Shared with the job tasks.
    running: Arc<Mutex<Running>>,
    monitor: Option<Monitor>,
    identity: Identity,
}

impl BrokerMachine {
    /// A broker running the workers of `registry` with `store`, `concurrency` jobs at once and
    /// up to `prefetch` more taken ahead while jobs are short. With `monitoring`, its
    /// housekeeping saves a monitoring record.
    pub fn new(
        registry: Arc<WorkerRegistry>,
        store: Arc<dyn Store>,
        concurrency: usize,
        prefetch: usize,
        job_timeout: Duration,
        monitoring: bool,
    ) -> Self {
        let concurrency = concurrency.max(1);
        let workers = registry.names();
        Self {
            identity: Identity::new(Peer::new(PeerRole::Broker, workers.clone())),
            workers: Mutex::new(workers),
            registry,
            store,
            semaphore: Arc::new(Semaphore::new(concurrency)),
            concurrency,
            capacity: concurrency + prefetch,
            mean_job_secs: 0.0,
            job_timeout,
            held: HashMap::new(),
            taken: Arc::new(Mutex::new(VecDeque::new())),
            reports: VecDeque::new(),
            tasks: JoinSet::new(),
            running: Arc::default(),
            monitor: monitoring.then(Monitor::new),
        }
    }

    /// Jobs taken and not reported yet.
    pub fn held_jobs(&self) -> usize {
        self.held.len()
    }

    /// Stops the job tasks still running (past the grace period) and waits for every task.
    pub async fn join(&mut self) {
        self.tasks.shutdown().await;
    }

    /// The jobs running now (held and no longer waiting to start), for monitoring.
    fn running_jobs(&self) -> Vec<Value> {
        let waiting: HashSet<JobId> = lock(&self.taken).iter().map(|j| j.job_id.clone()).collect();
        self.held
            .iter()
            .filter(|(id, _)| !waiting.contains(*id))
            .map(|(_, v)| v.clone())
            .collect()
    }
}

impl Machine for BrokerMachine {
    type Work = JobAssignment;
    type Out = Ran;
    type Note = Ran;

    fn ask_for_work(&self, max: usize, wait: Option<Duration>) -> Request {
        let offered = self.registry.offered();
        let mut workers = lock(&self.workers);
        if *workers != offered {
            info!(workers = ?offered, "offering a changed set of workers");
            workers.clone_from(&offered);
        }
        Request::GetJobs(GetJobs {
            workers: Some(offered),
            max,
            wait_ms: wait.map(|w| w.as_millis() as u64),
            asker: None,
        })
    }

    fn decode_work(&self, reply: Value) -> Result<Vec<JobAssignment>, ReplyError> {
        Vec::<JobAssignment>::from_reply(reply)
    }

    fn is_wake_up(&self, event: &Event) -> bool {
        matches!(event, Event::NewJob)
    }

    /// Jobs to ask for now: up to the capacity.
    fn room(&self) -> usize {
        // Taking jobs ahead pays for short jobs only: a long job would keep the ones behind
        // it from brokers that are free.
        let capacity = if self.mean_job_secs > LONG_JOB_SECS {
            self.concurrency
        } else {
            self.capacity
        };
        capacity.saturating_sub(self.held.len()).min(GetJobs::MAX)
    }

    fn take_in(&mut self, jobs: Vec<JobAssignment>) {
        for job in jobs {
            self.held.insert(
                job.job_id.clone(),
                json!({"worker": job.worker, "job id": job.job_id, "data": job.data()}),
            );
            lock(&self.taken).push_back(job);
        }
    }

    fn outbox(&mut self) -> &mut VecDeque<Ran> {
        &mut self.reports
    }

    fn request(ran: &Ran) -> Request {
        report(ran)
    }

    fn replied(&mut self, ran: Ran, reply: Value) {
        let id = &ran.job.job_id;
        match Answer::from_reply(reply) {
            Ok(answer) if !answer.answer.is_error() => {
                debug!(job_id = %id, answer = ?answer.answer, "reported");
            }
            Ok(answer) => {
                debug!(job_id = %id, answer = ?answer.answer, "report not taken (the job ended already)");
            }
            Err(e) => warn!(job_id = %id, error = %e, "the router refused the report"),
        }
    }

    fn on_event(&mut self, event: Event) {
        if let Event::PipelineCancelled { pipeline_id } = event {
            self.cancel(&pipeline_id);
        }
    }

    /// A job that ran: its report is due.
    fn on_note(&mut self, ran: Ran) {
        self.held.remove(&ran.job.job_id);
        self.mean_job_secs = 0.8 * self.mean_job_secs + 0.2 * ran.duration.as_secs_f64();
        self.reports.push_back(ran);
    }

    /// Starts taken jobs while slots are free.
    fn turn(&mut self, notes: &mpsc::UnboundedSender<Ran>) {
        // Forget the tasks that ended.
        while self.tasks.try_join_next().is_some() {}
        while !lock(&self.taken).is_empty() {
            let Ok(permit) = self.semaphore.clone().try_acquire_owned() else {
                return;
            };
            let Some(job) = lock(&self.taken).pop_front() else {
                return;
            };
            let runner = JobTask {
                registry: self.registry.clone(),
                store: self.store.clone(),
                timeout: self.job_timeout,
                semaphore: self.semaphore.clone(),
                taken: self.taken.clone(),
                done: notes.clone(),
                running: self.running.clone(),
            };
            self.tasks.spawn(runner.run(job, permit));
        }
    }

    /// Saves a monitoring record (in a task: the store may block).
    fn housekeeping(&mut self) {
        let running = self.running_jobs();
        let concurrency = self.concurrency;
        let Some(monitor) = self.monitor.as_mut() else {
            return;
        };
        let record = monitor.record(concurrency, running);
        let store = self.store.clone();
        self.tasks.spawn(async move {
            let saved = tokio::task::spawn_blocking(move || store.save_monitoring(&record)).await;
            if let Ok(Err(e)) = saved {
                warn!(error = %e, "saving monitoring failed");
            }
        });
    }

    fn peer(&mut self) -> Peer {
        let waiting = lock(&self.taken).len();
        let running = self.held.len().saturating_sub(waiting);
        let workers = lock(&self.workers).clone();
        self.identity.now(running, self.concurrency, workers)
    }

    /// The jobs it holds, and those whose report the router has not acknowledged yet: all
    /// the router handed it that it did not forget (see [`Machine::leases`]).
    fn leases(&self) -> RenewLeases {
        RenewLeases {
            job_ids: self
                .held
                .keys()
                .chain(self.reports.iter().map(|ran| &ran.job.job_id))
                .cloned()
                .collect(),
            ..RenewLeases::default()
        }
    }

    fn held(&self) -> usize {
        self.held.len()
    }
}

/// Runs a job in a slot, then the next taken job while there is one and a slot.
impl BrokerMachine {
    /// Stops the jobs of a cancelled pipeline: those taken and not started are dropped, and
    /// the running ones are stopped (a command worker's process is killed); none saves a
    /// result, and none is reported (the router already forgot them).
    fn cancel(&mut self, pipeline_id: &PipelineId) {
        let mut dropped = 0;
        lock(&self.taken).retain(|job| {
            let keep = job.pipeline_id.as_ref() != Some(pipeline_id);
            if !keep {
                self.held.remove(&job.job_id);
                dropped += 1;
            }
            keep
        });
        let mut stopped = 0;
        for (job_id, (pipeline, token)) in lock(&self.running).iter() {
            if pipeline.as_ref() == Some(pipeline_id) {
                // Its task ends without a report (the router forgot the job).
                token.cancel();
                self.held.remove(job_id);
                stopped += 1;
            }
        }
        if dropped + stopped > 0 {
            info!(%pipeline_id, dropped, stopped, "pipeline cancelled: its jobs here stop");
        }
    }
}

/// The running jobs of pipelines: each job's pipeline and the token that stops it.
type Running = HashMap<JobId, (Option<PipelineId>, CancellationToken)>;

struct JobTask {
    registry: Arc<WorkerRegistry>,
    store: Arc<dyn Store>,
    timeout: Duration,
    semaphore: Arc<Semaphore>,
    taken: Arc<Mutex<VecDeque<JobAssignment>>>,
    done: mpsc::UnboundedSender<Ran>,
    running: Arc<Mutex<Running>>,
}

impl JobTask {
    async fn run(self, mut job: JobAssignment, mut permit: tokio::sync::OwnedSemaphorePermit) {
        loop {
            let span = tracing::info_span!("job", job_id = %job.job_id, worker = %job.worker);
            let job_id = job.job_id.clone();
            let token = CancellationToken::new();
            lock(&self.running).insert(job_id.clone(), (job.pipeline_id.clone(), token.clone()));
            // The worker's token: cancelled with the job's, and by a timeout (which must not
            // look like a cancel here: a timed-out job is reported).
            let run = execute::run_job(
                job,
                &self.registry,
                self.store.clone(),
                self.timeout,
                permit,
                token.child_token(),
            )
            .instrument(span.clone());
            // Dropping the run stops it: a command worker's process group is killed (and
            // nothing is saved); a Rust worker's thread runs on, told by its token
            // (`worker::cancelled`), and saves nothing. A stopped job is not reported: the
            // machine let go of it when it cancelled it.
            let ran = tokio::select! {
                ran = run => Some(ran),
                () = token.cancelled() => None,
            };
            lock(&self.running).remove(&job_id);
            if let Some(ran) = ran {
                span.in_scope(|| match &ran.outcome {
                    Outcome::Finished => {
                        debug!(ms = ran.duration.as_millis() as u64, "job finished")
                    }
                    Outcome::Failed(e) => warn!(error = %e, "job failed"),
                });
                // The loop is gone only when the broker stopped past its grace period.
                if self.done.send(ran).is_err() {
                    return;
                }
            }
            // The slot is free again once the work really ended (a Rust worker that overran
            // its timeout keeps it until its thread returns).
            let Ok(next_permit) = self.semaphore.clone().try_acquire_owned() else {
                return;
            };
            let Some(next) = lock(&self.taken).pop_front() else {
                return;
            };
            (job, permit) = (next, next_permit);
        }
    }
}

/// Locks the queue of taken jobs (no code panics while holding it).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The report of a job that ran: `job finished`, or `job failed` with the error.
fn report(ran: &Ran) -> Request {
    let job_id = ran.job.job_id.clone();
    let duration = WireDuration::from(ran.duration);
    match &ran.outcome {
        Outcome::Finished => Request::JobFinished(JobFinished { job_id, duration }),
        Outcome::Failed(error) => Request::JobFailed(JobFailed {
            job_id,
            error: error.clone(),
            duration: Some(duration),
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

    use super::*;
    use crate::store::NullStore;
    use crate::worker::{JsonObject, Worker, WorkerResult};

    struct Echo;

    impl Worker for Echo {
        fn name(&self) -> &str {
            "Echo"
        }

        fn process(&self, input: JsonObject) -> WorkerResult<JsonObject> {
            Ok(input)
        }
    }

    fn machine(concurrency: usize, prefetch: usize) -> BrokerMachine {
        let mut registry = WorkerRegistry::new();
        registry.add(Echo).unwrap();
        BrokerMachine::new(
            Arc::new(registry),
            Arc::new(NullStore),
            concurrency,
            prefetch,
            Duration::from_secs(10),
            false,
        )
    }

    fn job(id: &str, worker: &str) -> JobAssignment {
        serde_json::from_value(json!({"job id": id, "worker": worker, "data": {}})).unwrap()
    }

    #[test]
    fn it_asks_for_its_workers_up_to_its_capacity() {
        let m = machine(2, 3);
        assert_eq!(m.room(), 5);
        match m.ask_for_work(5, Some(Duration::from_secs(1))) {
            Request::GetJobs(get) => {
                assert_eq!(get.workers, Some(vec!["Echo".to_owned()]));
                assert_eq!((get.max, get.wait_ms), (5, Some(1000)));
            }
            other => panic!("expected get jobs, got {other:?}"),
        }
        assert!(m.is_wake_up(&Event::NewJob));
        assert!(!m.is_wake_up(&Event::NewPipeline));
    }

    #[tokio::test]
    async fn jobs_in_run_in_slots_and_come_out_as_reports() {
        let mut m = machine(1, 1);
        m.take_in(vec![job("j1", "Echo"), job("j2", "Nope")]);
        assert_eq!((m.held(), m.room()), (2, 0));
        let mut leased = m.leases().job_ids;
        leased.sort();
        assert_eq!(leased, [JobId::from("j1"), JobId::from("j2")]);
        let (notes, mut noted) = mpsc::unbounded_channel();
        m.turn(&notes);
        // One slot: the task of the first job runs the second after it.
        for _ in 0..2 {
            let ran = tokio::time::timeout(Duration::from_secs(10), noted.recv())
                .await
                .expect("a job ran within 10 s")
                .unwrap();
            m.on_note(ran);
        }
        assert_eq!(m.held(), 0);
        let reports: Vec<Request> = m.outbox().iter().map(BrokerMachine::request).collect();
        assert!(matches!(&reports[0], Request::JobFinished(f) if f.job_id == "j1".into()));
        assert!(
            matches!(&reports[1], Request::JobFailed(f) if f.job_id == "j2".into() && f.error.contains("does not run worker"))
        );
        m.join().await;
    }

    #[test]
    fn long_jobs_stop_the_taking_ahead() {
        let mut m = machine(2, 10);
        assert_eq!(m.room(), 12);
        for i in 0..10 {
            m.on_note(Ran {
                job: job(&format!("j{i}"), "Echo"),
                outcome: Outcome::Finished,
                duration: Duration::from_secs(2),
            });
        }
        assert_eq!(m.room(), 2);
    }
}
