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
//! - [`Broker`]: connects and runs the shared daemon loop of `pypelinin_common::daemon::runloop`
//!   around a [`BrokerMachine`](machine::BrokerMachine) (what the broker does, no router I/O);
//!   [`settings`], [`cli`] for binaries.
//! - [`local`]: run a pipeline in this process, without sockets or daemons (for tests).
//! - `execute`: running one job; `monitoring`: the periodic monitoring record.

pub mod cli;
mod execute;
pub mod local;
pub mod machine;
mod monitoring;
pub mod process;
pub mod settings;
pub mod store;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use pypelinin_common::daemon::config::{secs, ConfigError, MAX_SETTING_SECS};
use pypelinin_common::daemon::connect::wait_for_router;
use pypelinin_common::daemon::runloop::{DaemonLoop, LoopSecs, LoopSettings};
use pypelinin_common::protocol::Event;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

pub use execute::{Outcome, Ran};
pub use machine::BrokerMachine;
pub use settings::BrokerSettings;
pub use store::{FileStore, JobInfo, Store};
pub use worker::{CommandWorker, JsonObject, TypedWorker, Worker, WorkerRegistry};

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
    /// A setting cannot be used.
    #[error(transparent)]
    Settings(#[from] ConfigError),
    /// The store could not be built from the cluster configuration.
    #[error("cannot build the store from the cluster configuration: {0}")]
    Store(String),
}

/// A broker ready to [`run`](Broker::run).
pub struct Broker {
    settings: BrokerSettings,
    registry: WorkerRegistry,
    /// The pools of the process workers, started by [`Broker::run`].
    pools: Vec<Arc<process::Pool>>,
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
        for spec in &settings.process_workers {
            registry.add_process(spec.clone())?;
        }
        // Those of the settings and those the registry came with.
        let pools = registry.pools();
        if registry.is_empty() {
            return Err(Error::NoWorkers);
        }
        Ok(Self {
            settings,
            registry,
            pools,
            store_factory,
        })
    }

    /// Runs until `shutdown` is cancelled: then it takes no new job, lets running jobs finish
    /// (up to the grace period), reports them and returns.
    ///
    /// # Errors
    /// [`Error::Store`] when the store cannot be built from the configuration.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), Error> {
        // A pool whose processes cannot start is said once, and its workers are not offered
        // (rather than failing every job of theirs).
        for pool in std::mem::take(&mut self.pools) {
            match pool.start().await {
                Ok(announced) => {
                    for (worker, requires) in announced {
                        self.registry.fill_requires(&worker, requires);
                    }
                }
                Err(e) => {
                    error!(workers = ?pool.names(), error = %e, "cannot start the process workers; not offering them");
                    self.registry.remove(&pool.names());
                }
            }
        }
        if self.registry.is_empty() {
            return Err(Error::NoWorkers);
        }
        let registry = Arc::new(std::mem::take(&mut self.registry));
        let s = &self.settings;
        let loop_secs = LoopSecs {
            connect_timeout: s.connect_timeout_secs,
            request_timeout: s.request_timeout_secs,
            poll_interval: s.poll_interval_secs,
            lease_renew: s.lease_renew_secs,
            shutdown_grace: s.shutdown_grace_secs,
        };
        let mut settings = LoopSettings {
            wait: WAIT_FOR_JOBS,
            max_batch: MAX_BATCH,
            ..LoopSettings::new(
                &s.api,
                &s.broadcast,
                s.token.clone(),
                vec![Event::NEW_JOB, Event::PIPELINE_CANCELLED],
                loop_secs,
            )?
        };
        let job_timeout = secs(
            "job_timeout_secs",
            s.job_timeout_secs,
            Duration::from_secs(600),
        )?;
        let Some((client, subscriber, configuration)) = wait_for_router(
            &s.api,
            &s.broadcast,
            &settings.prefixes,
            settings.options,
            s.token.clone(),
            &shutdown,
        )
        .await
        else {
            return Ok(());
        };
        let store =
            (self.store_factory)(&configuration).map_err(|e| Error::Store(e.to_string()))?;
        // The router validates it; a value past a year (or none) means no monitoring.
        settings.housekeeping = configuration
            .get("monitoring interval")
            .and_then(Value::as_f64)
            .filter(|v| *v > 0.0 && *v <= MAX_SETTING_SECS)
            .and_then(|v| Duration::try_from_secs_f64(v).ok());
        let concurrency = s.effective_concurrency();
        info!(workers = ?registry.names(), concurrency, prefetch = s.effective_prefetch(), "broker running");
        let machine = BrokerMachine::new(
            registry.clone(),
            store,
            concurrency,
            s.effective_prefetch(),
            job_timeout,
            settings.housekeeping.is_some(),
        );
        let mut machine = DaemonLoop::new(settings, client, subscriber)
            .run(machine, &shutdown)
            .await;
        let unfinished = machine.held_jobs();
        machine.join().await;
        for pool in registry.pools() {
            pool.close();
        }
        if unfinished > 0 {
            warn!(jobs = unfinished, "broker stopped with jobs unfinished; the router hands them out again when their leases end");
        }
        Ok(())
    }
}

/// How long a broker's `get jobs` waits at the router when no job is queued. A stopping broker
/// waits for the answer (it may bring jobs, which then run), so an idle broker stops within it.
const WAIT_FOR_JOBS: Duration = Duration::from_secs(1);

/// Reports and job requests sent in one batch, at most.
const MAX_BATCH: usize = 512;

/// The Rust snippets of README.md, docs/workers.md and docs/store.md, compiled as doctests.
#[cfg(doctest)]
mod doc_snippets {
    #[doc = include_str!("../../README.md")]
    struct Readme;
    #[doc = include_str!("../../docs/workers.md")]
    struct Workers;
    #[doc = include_str!("../../docs/store.md")]
    struct Store;
}
