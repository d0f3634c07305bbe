//! The router's command line, shared by `pypelinin-router` and the example's `my_router`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use pypelinin_common::daemon::config::DaemonArgs;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::{Router, RouterSettings};

/// Flags of the router; they beat the settings file and the environment.
#[derive(Debug, Clone, Default, Args)]
pub struct RouterArgs {
    /// Settings file and endpoints (the router binds them).
    #[command(flatten)]
    pub daemon: DaemonArgs,
    /// Folder of the durable record [default: $XDG_DATA_HOME/pypelinin/router, or
    /// ~/.local/share/pypelinin/router].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Keep the queues in memory only: a crash loses them (for benchmarks of durability's cost).
    #[arg(long)]
    pub no_durability: bool,
    /// Start even when the durable record lost writes it had acknowledged (a journal cut or
    /// deleted by a disk fault), going on with what is left; without it such a router refuses
    /// to start and says what is missing.
    #[arg(long)]
    pub accept_loss: bool,
    /// Serve Prometheus metrics over HTTP at this address (GET /metrics), e.g.
    /// 127.0.0.1:9555 [default: off]
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics: Option<String>,
}

/// The default folder of the router's durable record.
pub fn default_data_dir() -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("pypelinin").join("router")
}

impl RouterArgs {
    /// Settings and cluster configuration from the file, the environment and the flags.
    /// `defaults` is the cluster configuration used for keys the file does not set.
    ///
    /// # Errors
    /// When the file cannot be read or a setting is invalid.
    pub fn load(
        &self,
        defaults: Map<String, Value>,
    ) -> anyhow::Result<(RouterSettings, Map<String, Value>)> {
        self.load_with_data_dir(defaults, default_data_dir())
    }

    /// As [`RouterArgs::load`], with another default folder for the durable record.
    ///
    /// # Errors
    /// When the file cannot be read or a setting is invalid.
    pub fn load_with_data_dir(
        &self,
        defaults: Map<String, Value>,
        default_data_dir: PathBuf,
    ) -> anyhow::Result<(RouterSettings, Map<String, Value>)> {
        let (mut settings, file): (RouterSettings, _) = self.daemon.load("router")?;
        file.check_store()?;
        if let Some(dir) = &self.data_dir {
            settings.data_dir = Some(dir.clone());
        }
        settings.accept_loss = self.accept_loss;
        if let Some(address) = &self.metrics {
            settings.metrics = Some(address.clone());
        }
        if self.no_durability {
            settings.data_dir = None;
        } else if settings.data_dir.is_none() {
            settings.data_dir = Some(default_data_dir);
        }
        let mut configuration = defaults;
        // Daemon settings and the cluster secret are not served to clients.
        configuration.extend(file.to_json_without(&["router", "broker", "pipeliner", "cluster"]));
        Ok((settings, configuration))
    }
}

/// The line a router prints on stdout once its sockets are bound; tests and scripts read it
/// (`metrics=http://HOST:PORT/metrics` is added when it serves metrics).
pub fn listening_line(api: &str, broadcast: &str) -> String {
    format!("listening api={api} broadcast={broadcast}")
}

/// Runs a router from its flags until Ctrl-C or SIGTERM.
///
/// # Errors
/// When the settings are invalid, an endpoint cannot be bound, or the router fails.
pub async fn run(args: &RouterArgs, defaults: Map<String, Value>) -> anyhow::Result<()> {
    run_with_data_dir(args, defaults, default_data_dir()).await
}

/// As [`run`], with another default folder for the durable record.
///
/// # Errors
/// As [`run`].
pub async fn run_with_data_dir(
    args: &RouterArgs,
    defaults: Map<String, Value>,
    default_data_dir: PathBuf,
) -> anyhow::Result<()> {
    // Listen for Ctrl-C/SIGTERM first: a signal during start-up then stops the router cleanly.
    let shutdown: CancellationToken = pypelinin_common::daemon::shutdown::token_on_signal();
    let (settings, configuration) = args.load_with_data_dir(defaults, default_data_dir)?;
    match &settings.data_dir {
        Some(dir) => info!(data_dir = %dir.display(), "durable record"),
        None => tracing::warn!("durability is off: a crash loses the queues"),
    }
    let (api, broadcast) = (settings.api.clone(), settings.broadcast.clone());
    let router = Router::bind(settings, configuration)
        .await
        .with_context(|| format!("cannot start the router on api={api} broadcast={broadcast}"))?;
    info!(
        api = router.api_endpoint(),
        broadcast = router.broadcast_endpoint(),
        "router listening"
    );
    let mut line = listening_line(router.api_endpoint(), router.broadcast_endpoint());
    if let Some(address) = router.metrics_address() {
        line.push_str(&format!(" metrics=http://{address}/metrics"));
    }
    println!("{line}");
    router.run(shutdown).await?;
    Ok(())
}
