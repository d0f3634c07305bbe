//! The command line of a broker binary: `my_broker` is a few lines over [`run`].

use anyhow::Context;
use clap::Args;
use pypelinin_common::daemon::config::DaemonArgs;

use crate::{Broker, BrokerSettings, StoreFactory, WorkerRegistry};

/// Flags of a broker; they beat the settings file and the environment.
#[derive(Debug, Clone, Default, Args)]
pub struct BrokerArgs {
    /// Settings file and the router's endpoints.
    #[command(flatten)]
    pub daemon: DaemonArgs,
    /// Jobs run at once [default: the number of CPU cores].
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Jobs taken ahead of free slots while jobs are short [default: 64].
    #[arg(long)]
    pub prefetch: Option<usize>,
}

impl BrokerArgs {
    /// Settings from the file, the environment and the flags.
    ///
    /// # Errors
    /// When the file cannot be read or a setting is invalid.
    pub fn load(&self) -> anyhow::Result<BrokerSettings> {
        let (mut settings, _): (BrokerSettings, _) = self.daemon.load("broker")?;
        // A process worker's relative program and folder are the settings file's.
        if let Some(folder) = self
            .daemon
            .config
            .as_deref()
            .and_then(std::path::Path::parent)
        {
            settings.process_workers = std::mem::take(&mut settings.process_workers)
                .into_iter()
                .map(|w| w.resolved_against(folder))
                .collect();
        }
        if let Some(c) = self.concurrency {
            settings.concurrency = c;
        }
        if let Some(p) = self.prefetch {
            settings.prefetch = Some(p);
        }
        Ok(settings)
    }
}

/// Runs a broker with `registry` and the store `store_factory` builds, until Ctrl-C/SIGTERM.
///
/// # Errors
/// When the settings are invalid or the broker cannot start.
pub async fn run(
    args: &BrokerArgs,
    registry: WorkerRegistry,
    store_factory: StoreFactory,
) -> anyhow::Result<()> {
    let settings = args.load()?;
    let broker =
        Broker::new(settings, registry, store_factory).context("cannot start the broker")?;
    let shutdown = pypelinin_common::daemon::shutdown::token_on_signal();
    broker.run(shutdown).await.context("the broker stopped")?;
    Ok(())
}
