//! The command line of a broker binary: `my_broker` is a few lines over [`run`].

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use pypelinin_common::config::ConfigFile;

use crate::{Broker, BrokerSettings, StoreFactory, WorkerRegistry};

/// Flags of a broker; they beat the settings file and the environment.
#[derive(Debug, Clone, Default, Args)]
pub struct BrokerArgs {
    /// TOML settings file; the broker reads its [broker] table.
    #[arg(long, env = "PYPELININ_CONFIG")]
    pub config: Option<PathBuf>,
    /// The router's API endpoint [default: tcp://127.0.0.1:5555].
    #[arg(long)]
    pub api: Option<String>,
    /// The router's broadcast endpoint [default: tcp://127.0.0.1:5556].
    #[arg(long)]
    pub broadcast: Option<String>,
    /// Jobs run at once [default: the number of CPU cores].
    #[arg(long)]
    pub concurrency: Option<usize>,
}

impl BrokerArgs {
    /// Settings from the file, the environment and the flags.
    ///
    /// # Errors
    /// When the file cannot be read or a setting is invalid.
    pub fn load(&self) -> anyhow::Result<BrokerSettings> {
        let file = ConfigFile::read_optional(self.config.as_deref())?;
        let mut settings: BrokerSettings = file.settings("broker")?;
        if settings.token.is_none() {
            settings.token = file.cluster_token()?;
        }
        if let Some(api) = &self.api {
            settings.api.clone_from(api);
        }
        if let Some(broadcast) = &self.broadcast {
            settings.broadcast.clone_from(broadcast);
        }
        if let Some(c) = self.concurrency {
            settings.concurrency = c;
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
    let shutdown = pypelinin_common::shutdown::token_on_signal();
    broker.run(shutdown).await.context("the broker stopped")?;
    Ok(())
}
