//! The pypelinin broker: runs jobs.
//!
//! A broker asks the router for jobs of the workers it runs, reads each job's input through
//! the user's [`Store`], runs the [`Worker`](worker::Worker), saves the result through the
//! store and reports `job finished` — or `job failed` with the error, for a worker that
//! returned an error, panicked or overran its timeout, and for a store that failed. The binary
//! is the user's: link this library with your workers and store (see the example's
//! `my_broker`, and `docs/workers.md`).
//!
//! Layout:
//! - [`worker`]: the [`Worker`](worker::Worker) and [`TypedWorker`](worker::TypedWorker)
//!   traits, [`CommandWorker`](worker::CommandWorker) (any language), the
//!   [`WorkerRegistry`](worker::WorkerRegistry).
//! - [`store`]: the [`Store`] trait and [`FileStore`](store::FileStore).
//! - [`Broker`]: the daemon loop; [`settings`], [`cli`] for binaries.
//! - [`local`]: run a pipeline in this process, without sockets or daemons (for tests).
//! - `execute`: running one job; `monitoring`: the periodic monitoring record.

pub mod cli;
mod execute;
pub mod local;
mod monitoring;
pub mod settings;
pub mod store;
pub mod worker;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pypelinin_common::daemon::connect::wait_for_router;
use pypelinin_common::ids::JobId;
use pypelinin_common::protocol::reply::{decode_jobs_reply_value, decode_reply_value};
use pypelinin_common::protocol::request::{GetJobs, JobFailed, JobFinished, RenewLeases};
use pypelinin_common::protocol::{Answer, Event, JobAssignment, Request, WireDuration};
use pypelinin_common::transport::{ApiClient, ClientError, ClientOptions};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

pub use execute::{Outcome, Ran};
pub use settings::BrokerSettings;
pub use store::{FileStore, JobInfo, Store};
pub use worker::{CommandWorker, JsonObject, TypedWorker, Worker, WorkerRegistry};

use pypelinin_common::daemon::config::secs;
use worker::BoxError;

/// Builds the store from the cluster configuration the broker fetched from the router.
pub type StoreFactory = Box<dyn FnOnce(&JsonObject) -> Result<Arc<dyn Store>, BoxError> + Send>;

/// A failure that stops the broker.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No worker to run.
    #[error("the broker has no worker to run")]
    NoWorkers,
    /// A command worker of the settings is unusable.
    #[error(transparent)]
    Registry(#[from] worker::RegistryError),
    /// The store could not be built from the cluster configuration.
    #[error("cannot build the store from the cluster configuration: {0}")]
    Store(String),
}

/// A broker ready to [`run`](Broker::run).
pub struct Broker {
    settings: BrokerSettings,
    registry: Arc<WorkerRegistry>,
    store_factory: StoreFactory,
}

/// The store factory of the shipped stores: with `[store] type = "none"` a
/// [`NullStore`](store::NullStore), else `FileStore::from_configuration(configuration["store"])`.
pub fn file_store_factory() -> StoreFactory {
    Box::new(|configuration: &JsonObject| {
        let table = configuration
            .get("store")
            .ok_or("the cluster configuration has no [store] table")?;
        if table.get("type").and_then(Value::as_str) == Some("none") {
            return Ok(Arc::new(store::NullStore) as Arc<dyn Store>);
        }
        Ok(Arc::new(FileStore::from_configuration(table)?) as Arc<dyn Store>)
    })
}

impl Broker {
    /// A broker running the workers of `registry` plus the command workers of `settings`.
    ///
    /// # Errors
    /// [`Error::Registry`] for a bad or duplicate command worker, [`Error::NoWorkers`] when
    /// there is nothing to run.
    pub fn new(
        settings: BrokerSettings,
        mut registry: WorkerRegistry,
        store_factory: StoreFactory,
    ) -> Result<Self, Error> {
        for command in &settings.command_workers {
            registry.add_command(command.clone())?;
        }
        if registry.is_empty() {
            return Err(Error::NoWorkers);
        }
        Ok(Self {
            settings,
            registry: Arc::new(registry),
            store_factory,
        })
    }

    /// Runs until `shutdown` is cancelled: then it takes no new job, lets running jobs finish
    /// (up to the grace period), reports them and returns.
    ///
    /// # Errors
    /// [`Error::Store`] when the store cannot be built from the configuration.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let s = &self.settings;
        let options = ClientOptions {
            connect_timeout: secs(s.connect_timeout_secs, Duration::from_secs(5)),
            request_timeout: secs(s.request_timeout_secs, Duration::from_secs(10)),
        };
        let Some((client, subscriber, configuration)) = wait_for_router(
            &s.api,
            &s.broadcast,
            &[Event::NEW_JOB],
            options,
            s.token.clone(),
            &shutdown,
        )
        .await
        else {
            return Ok(());
        };
        let store =
            (self.store_factory)(&configuration).map_err(|e| Error::Store(e.to_string()))?;
        let monitoring = configuration
            .get("monitoring interval")
            .and_then(Value::as_f64)
            .filter(|v| v.is_finite() && *v > 0.0)
            .map(Duration::from_secs_f64);
        let concurrency = s.effective_concurrency();
        info!(workers = ?self.registry.names(), concurrency, prefetch = s.effective_prefetch(), "broker running");
        let (asks, asked) = mpsc::channel(1);
        let (answers_tx, answers) = mpsc::channel(1);
        let waiter = ApiClient::new(s.api.clone(), options).with_token(s.token.clone());
        tokio::spawn(wait_for_jobs(
            waiter,
            self.registry.names(),
            asked,
            answers_tx,
        ));
        let mut state = Loop {
            client,
            asks,
            waiting: None,
            wait_again_at: None,
            registry: self.registry.clone(),
            store,
            semaphore: Arc::new(Semaphore::new(concurrency)),
            concurrency,
            capacity: concurrency + s.effective_prefetch(),
            mean_job_secs: 0.0,
            job_timeout: secs(s.job_timeout_secs, Duration::from_secs(600)),
            held: HashMap::new(),
            taken: Arc::new(Mutex::new(VecDeque::new())),
            reports: VecDeque::new(),
            want_jobs: true,
            retry_at: None,
        };
        state
            .run(subscriber, answers, &shutdown, s, monitoring)
            .await;
        Ok(())
    }
}

/// How long a broker's `get jobs` waits at the router when no job is queued. A stopping broker
/// waits for the answer (it may bring jobs, which then run), so an idle broker stops within it.
const WAIT_FOR_JOBS: Duration = Duration::from_secs(1);

/// The answer to a waiting `get jobs`.
type Waited = Result<Vec<JobAssignment>, ClientError>;

/// Sends each `get jobs` that waits at the router (on a connection of its own, so reports
/// go out meanwhile) and passes its answer on.
async fn wait_for_jobs(
    mut client: ApiClient,
    workers: Vec<String>,
    mut asks: mpsc::Receiver<usize>,
    answers: mpsc::Sender<Waited>,
) {
    while let Some(max) = asks.recv().await {
        let answer = client
            .wait_for_jobs(Some(workers.clone()), max, WAIT_FOR_JOBS)
            .await;
        if answers.send(answer).await.is_err() {
            return;
        }
    }
}

/// Above this mean job duration (seconds), a broker takes no job ahead of its free slots.
const LONG_JOB_SECS: f64 = 0.1;

/// Reports and job requests sent in one round trip, at most.
const MAX_BATCH: usize = 512;

/// The broker's loop state.
struct Loop {
    client: ApiClient,
    /// Asks [`wait_for_jobs`] for a `get jobs` that waits at the router, for up to this many.
    asks: mpsc::Sender<usize>,
    /// The jobs a waiting `get jobs` out now asked for. While one is out, the queue was empty
    /// when it was sent and the router hands it the next jobs: the loop asks for none itself.
    waiting: Option<usize>,
    /// After a waiting `get jobs` failed: not before this time.
    wait_again_at: Option<Instant>,
    registry: Arc<WorkerRegistry>,
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
    /// Whether the queue may hold jobs for us (a broadcast, a finished job or the poll said so).
    want_jobs: bool,
    /// When the router was unreachable: when to try again.
    retry_at: Option<Instant>,
}

impl Loop {
    async fn run(
        &mut self,
        mut subscriber: pypelinin_common::transport::Subscriber,
        mut waited: mpsc::Receiver<Waited>,
        shutdown: &CancellationToken,
        settings: &BrokerSettings,
        monitoring: Option<Duration>,
    ) {
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Ran>();
        let mut poll =
            tokio::time::interval(secs(settings.poll_interval_secs, Duration::from_secs(5)));
        let mut monitor_tick =
            tokio::time::interval(monitoring.unwrap_or(Duration::from_secs(3600)));
        let mut monitor = monitoring::Monitor::new();
        let mut renew =
            tokio::time::interval(secs(settings.lease_renew_secs, Duration::from_secs(5)));
        let mut stopping: Option<Instant> = None;
        let mut backoff = Duration::from_millis(100);
        let grace = secs(settings.shutdown_grace_secs, Duration::from_secs(30));
        loop {
            // Checked before asking for jobs: `select!` below may have picked another ready
            // branch in the same turn as the shutdown.
            if stopping.is_none() && shutdown.is_cancelled() {
                info!(
                    held = self.held.len(),
                    ?grace,
                    "broker stopping: no new jobs, letting the jobs it took finish"
                );
                stopping = Some(Instant::now() + grace);
            }
            if self.retry_at.is_none_or(|t| Instant::now() >= t) {
                self.retry_at = None;
                if self.sync(stopping.is_none(), &done_tx).await {
                    backoff = Duration::from_millis(100);
                } else {
                    self.retry_at = Some(Instant::now() + backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
            self.start_taken(&done_tx);
            if stopping.is_none() {
                self.wait_for_jobs();
            }
            let idle = self.held.is_empty() && self.reports.is_empty() && self.waiting.is_none();
            if stopping.is_some() && idle {
                info!("broker stopped: every job it took ran and was reported");
                break;
            }
            let retry_at = self.retry_at;
            let wait_again_at = self.wait_again_at;
            tokio::select! {
                () = shutdown.cancelled(), if stopping.is_none() => {}
                () = sleep_until_opt(stopping) => {
                    warn!(held = self.held.len(), unreported = self.reports.len(), "grace period over; leaving unfinished jobs");
                    break;
                }
                () = sleep_until_opt(retry_at) => {}
                () = sleep_until_opt(wait_again_at) => self.wait_again_at = None,
                Some(answer) = waited.recv() => self.waited(answer),
                event = subscriber.recv() => {
                    if let Ok(Event::NewJob) = event {
                        self.want_jobs = true;
                    }
                    // The others that arrived say the same.
                    while let Some(Ok(_)) = subscriber.try_recv().await {}
                }
                Some(ran) = done_rx.recv() => {
                    self.ran(ran);
                    // Drain whatever else finished, so reports go out together.
                    while let Ok(ran) = done_rx.try_recv() {
                        self.ran(ran);
                    }
                    self.want_jobs = true;
                }
                _ = poll.tick() => self.want_jobs = true,
                _ = renew.tick(), if !self.held.is_empty() => {
                    // Heartbeat: without it the router hands our jobs to another broker.
                    let job_ids: Vec<JobId> = self.held.keys().cloned().collect();
                    let leases = RenewLeases { job_ids, pipeline_ids: Vec::new() };
                    if let Err(e) = self.client.renew_leases(leases).await {
                        warn!(error = %e, "cannot renew job leases");
                    }
                }
                _ = monitor_tick.tick(), if monitoring.is_some() => {
                    let record = monitor.record(self.concurrency, self.running_jobs());
                    let store = self.store.clone();
                    tokio::task::spawn_blocking(move || {
                        if let Err(e) = store.save_monitoring(&record) {
                            warn!(error = %e, "saving monitoring failed");
                        }
                    });
                }
            }
        }
    }

    /// Reports what ran and, when `fetch`, asks for jobs up to the capacity: both in one
    /// `batch` per round trip. False when the router could not be reached (nothing is lost:
    /// the reports are sent again).
    async fn sync(&mut self, fetch: bool, done: &mpsc::UnboundedSender<Ran>) -> bool {
        loop {
            self.start_taken(done);
            let reports = self.reports.len().min(MAX_BATCH);
            let wanted = if fetch && self.want_jobs && self.waiting.is_none() {
                self.room()
            } else {
                0
            };
            if reports == 0 && wanted == 0 {
                return true;
            }
            let mut requests: Vec<Request> =
                self.reports.iter().take(reports).map(report).collect();
            if wanted > 0 {
                requests.push(Request::GetJobs(GetJobs::new(
                    Some(self.registry.names()),
                    wanted,
                )));
            }
            let started = std::time::Instant::now();
            let replies = match self.client.batch(&requests).await {
                Ok(replies) => replies,
                Err(e) if e.is_transient() => {
                    warn!(error = %e, "cannot reach the router; will retry");
                    return false;
                }
                Err(e) => {
                    // Refused as a whole (a wrong cluster token): sending it again changes
                    // nothing.
                    warn!(error = %e, reports, "the router refused the reports and job requests");
                    self.reports.drain(..reports);
                    self.want_jobs = false;
                    return true;
                }
            };
            debug!(
                reports,
                wanted,
                micros = started.elapsed().as_micros() as u64,
                "round trip"
            );
            let mut replies = replies.into_iter();
            for (ran, reply) in self.reports.drain(..reports).zip(replies.by_ref()) {
                let id = &ran.job.job_id;
                match decode_reply_value::<Answer>(reply) {
                    Ok(answer) if !answer.answer.is_error() => {
                        debug!(job_id = %id, answer = ?answer.answer, "reported");
                    }
                    Ok(answer) => {
                        debug!(job_id = %id, answer = ?answer.answer, "report not taken (the job ended already)");
                    }
                    Err(e) => warn!(job_id = %id, error = %e, "the router refused the report"),
                }
            }
            for reply in replies {
                match decode_jobs_reply_value(reply) {
                    Ok(jobs) => self.take_in(jobs, wanted),
                    Err(e) => {
                        warn!(error = %e, "the router refused get jobs");
                        self.want_jobs = false;
                    }
                }
            }
        }
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

    /// Takes in the jobs the router handed out for a request of `asked`.
    fn take_in(&mut self, jobs: Vec<JobAssignment>, asked: usize) {
        // Fewer than asked: the queue is empty for now.
        self.want_jobs = jobs.len() >= asked;
        for job in jobs {
            self.held.insert(
                job.job_id.clone(),
                json!({"worker": job.worker, "job id": job.job_id, "data": job.data()}),
            );
            lock(&self.taken).push_back(job);
        }
    }

    /// Sends a `get jobs` that waits at the router when the broker is idle and found the queue
    /// empty: the next job queued comes straight to it, without a broadcast and another request
    /// in between. (A busy broker asks when its jobs end, with their reports, as before: so a
    /// stopping broker that still runs jobs takes no new one.)
    fn wait_for_jobs(&mut self) {
        let ready = self.waiting.is_none()
            && !self.want_jobs
            && self.retry_at.is_none()
            && self.wait_again_at.is_none()
            && self.held.is_empty();
        let room = self.room();
        if ready && room > 0 && self.asks.try_send(room).is_ok() {
            self.waiting = Some(room);
        }
    }

    /// Takes in the answer to the waiting `get jobs`.
    fn waited(&mut self, answer: Waited) {
        let asked = self.waiting.take().unwrap_or(0);
        match answer {
            Ok(jobs) => {
                debug!(asked, got = jobs.len(), "waiting get jobs answered");
                self.take_in(jobs, asked);
            }
            Err(e) => {
                // Ask in the loop's own round trips (with their back-off) for a while.
                warn!(error = %e, "waiting for jobs at the router failed");
                self.want_jobs = true;
                self.wait_again_at = Some(Instant::now() + WAIT_FOR_JOBS);
            }
        }
    }

    /// Takes in a job that ran: its report is due.
    fn ran(&mut self, ran: Ran) {
        self.held.remove(&ran.job.job_id);
        self.mean_job_secs = 0.8 * self.mean_job_secs + 0.2 * ran.duration.as_secs_f64();
        self.reports.push_back(ran);
    }

    /// Starts taken jobs while slots are free.
    fn start_taken(&mut self, done: &mpsc::UnboundedSender<Ran>) {
        while !lock(&self.taken).is_empty() {
            let Ok(permit) = self.semaphore.clone().try_acquire_owned() else {
                return;
            };
            let Some(job) = lock(&self.taken).pop_front() else {
                return;
            };
            let runner = Runner {
                registry: self.registry.clone(),
                store: self.store.clone(),
                timeout: self.job_timeout,
                semaphore: self.semaphore.clone(),
                taken: self.taken.clone(),
                done: done.clone(),
            };
            tokio::spawn(runner.run(job, permit));
        }
    }

    /// The jobs running now (held and no longer waiting to start), for monitoring.
    fn running_jobs(&self) -> Vec<Value> {
        let waiting: std::collections::HashSet<JobId> =
            lock(&self.taken).iter().map(|j| j.job_id.clone()).collect();
        self.held
            .iter()
            .filter(|(id, _)| !waiting.contains(*id))
            .map(|(_, v)| v.clone())
            .collect()
    }
}

/// Runs a job in a slot, then the next taken job while there is one and a slot.
struct Runner {
    registry: Arc<WorkerRegistry>,
    store: Arc<dyn Store>,
    timeout: Duration,
    semaphore: Arc<Semaphore>,
    taken: Arc<Mutex<VecDeque<JobAssignment>>>,
    done: mpsc::UnboundedSender<Ran>,
}

impl Runner {
    async fn run(self, mut job: JobAssignment, mut permit: tokio::sync::OwnedSemaphorePermit) {
        loop {
            let span = tracing::info_span!("job", job_id = %job.job_id, worker = %job.worker);
            let ran = execute::run_job(
                job,
                &self.registry,
                self.store.clone(),
                self.timeout,
                permit,
            )
            .instrument(span.clone())
            .await;
            span.in_scope(|| match &ran.outcome {
                Outcome::Finished => debug!(ms = ran.duration.as_millis() as u64, "job finished"),
                Outcome::Failed(e) => warn!(error = %e, "job failed"),
            });
            // The loop is gone only when the broker stopped past its grace period.
            if self.done.send(ran).is_err() {
                return;
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

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
