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
use std::sync::Arc;
use std::time::Duration;

use pypelinin_common::ids::JobId;
use pypelinin_common::protocol::request::{JobFailed, RenewLeases};
use pypelinin_common::protocol::{Event, JobAssignment, WireDuration};
use pypelinin_common::transport::{wait_for_router, ApiClient, ClientOptions};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

pub use execute::{Outcome, Ran};
pub use settings::BrokerSettings;
pub use store::{FileStore, JobInfo, Store};
pub use worker::{CommandWorker, JsonObject, TypedWorker, Worker, WorkerRegistry};

use pypelinin_common::config::secs;
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
        info!(workers = ?self.registry.names(), concurrency, "broker running");
        let mut state = Loop {
            client,
            registry: self.registry.clone(),
            store,
            semaphore: Arc::new(Semaphore::new(concurrency)),
            concurrency,
            job_timeout: secs(s.job_timeout_secs, Duration::from_secs(600)),
            running: HashMap::new(),
            reports: VecDeque::new(),
            want_jobs: true,
            retry_at: None,
        };
        state.run(subscriber, &shutdown, s, monitoring).await;
        Ok(())
    }
}

/// The broker's loop state.
struct Loop {
    client: ApiClient,
    registry: Arc<WorkerRegistry>,
    store: Arc<dyn Store>,
    semaphore: Arc<Semaphore>,
    concurrency: usize,
    job_timeout: Duration,
    /// Jobs running now, for monitoring.
    running: HashMap<JobId, Value>,
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
                    running = self.running.len(),
                    ?grace,
                    "broker stopping: no new jobs, letting running jobs finish"
                );
                stopping = Some(Instant::now() + grace);
            }
            if self.retry_at.is_none_or(|t| Instant::now() >= t) {
                self.retry_at = None;
                let ok = self.flush_reports().await
                    && (stopping.is_some() || self.fetch_jobs(&done_tx).await);
                if ok {
                    backoff = Duration::from_millis(100);
                } else {
                    self.retry_at = Some(Instant::now() + backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
            if stopping.is_some() && self.running.is_empty() && self.reports.is_empty() {
                info!("broker stopped: every running job finished and was reported");
                break;
            }
            let retry_at = self.retry_at;
            tokio::select! {
                () = shutdown.cancelled(), if stopping.is_none() => {}
                () = sleep_until_opt(stopping) => {
                    warn!(running = self.running.len(), unreported = self.reports.len(), "grace period over; leaving unfinished jobs");
                    break;
                }
                () = sleep_until_opt(retry_at) => {}
                event = subscriber.recv() => {
                    if let Ok(Event::NewJob) = event {
                        self.want_jobs = true;
                    }
                }
                Some(ran) = done_rx.recv() => {
                    self.running.remove(&ran.job.job_id);
                    self.reports.push_back(ran);
                    // Drain whatever else finished, so reports go out together.
                    while let Ok(ran) = done_rx.try_recv() {
                        self.running.remove(&ran.job.job_id);
                        self.reports.push_back(ran);
                    }
                    self.want_jobs = true;
                }
                _ = poll.tick() => self.want_jobs = true,
                _ = renew.tick(), if !self.running.is_empty() => {
                    // Heartbeat: without it the router hands our jobs to another broker.
                    let leases = RenewLeases {
                        job_ids: self.running.keys().cloned().collect(),
                        pipeline_ids: Vec::new(),
                    };
                    if let Err(e) = self.client.renew_leases(leases).await {
                        warn!(error = %e, "cannot renew job leases");
                    }
                }
                _ = monitor_tick.tick(), if monitoring.is_some() => {
                    let record = monitor.record(self.concurrency, self.running.values().cloned().collect());
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

    /// Reports finished and failed jobs; false when the router could not be reached.
    async fn flush_reports(&mut self) -> bool {
        while let Some(ran) = self.reports.front() {
            let id = ran.job.job_id.clone();
            let duration = WireDuration::from(ran.duration);
            let result = match &ran.outcome {
                Outcome::Finished => self.client.job_finished(id.clone(), duration).await,
                Outcome::Failed(error) => {
                    let failure = JobFailed {
                        job_id: id.clone(),
                        error: error.clone(),
                        duration: Some(duration),
                    };
                    self.client.job_failed(failure).await
                }
            };
            match result {
                Ok(answer) => debug!(job_id = %id, answer = ?answer.answer, "reported"),
                Err(e) if e.is_transient() => {
                    warn!(job_id = %id, error = %e, "cannot report to the router; will retry");
                    return false;
                }
                Err(e) => warn!(job_id = %id, error = %e, "the router refused the report"),
            }
            self.reports.pop_front();
        }
        true
    }

    /// Asks for jobs while there is capacity; false when the router could not be reached.
    async fn fetch_jobs(&mut self, done: &mpsc::UnboundedSender<Ran>) -> bool {
        while self.want_jobs {
            let Ok(permit) = self.semaphore.clone().try_acquire_owned() else {
                return true;
            };
            match self.client.get_job(Some(self.registry.names())).await {
                Ok(Some(job)) => self.start(job, permit, done.clone()),
                Ok(None) => self.want_jobs = false,
                Err(e) => {
                    if e.is_transient() {
                        warn!(error = %e, "cannot ask the router for jobs; will retry");
                        return false;
                    }
                    warn!(error = %e, "the router refused get job");
                    self.want_jobs = false;
                }
            }
        }
        true
    }

    fn start(
        &mut self,
        job: JobAssignment,
        permit: tokio::sync::OwnedSemaphorePermit,
        done: mpsc::UnboundedSender<Ran>,
    ) {
        self.running.insert(
            job.job_id.clone(),
            json!({"worker": job.worker, "job id": job.job_id, "data": job.data()}),
        );
        let span = tracing::info_span!("job", job_id = %job.job_id, worker = %job.worker);
        let registry = self.registry.clone();
        let store = self.store.clone();
        let timeout = self.job_timeout;
        tokio::spawn(
            async move {
                let ran = execute::run_job(job, &registry, store, timeout, permit).await;
                match &ran.outcome {
                    Outcome::Finished => {
                        debug!(ms = ran.duration.as_millis() as u64, "job finished")
                    }
                    Outcome::Failed(e) => warn!(error = %e, "job failed"),
                }
                // The loop is gone only when the broker stopped past its grace period.
                let _ignored = done.send(ran);
            }
            .instrument(span),
        );
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
