//! `my_router`: the example's router, serving the example's cluster configuration.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser};
use pypelinin_example::cluster;
use pypelinin_router::cli::RouterArgs;

/// mimalloc: the daemons allocate many small JSON values; it halves the time spent in
/// the allocator (see docs/performance.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The example's router: a FileStore in <home>/store, monitoring in <home>/monitoring.log,
/// its durable record in <home>/router-data.
#[derive(Debug, Parser)]
#[command(name = "my_router", version)]
struct Cli {
    #[command(flatten)]
    router: RouterArgs,
    /// Folder of the example's data (store, monitoring log, durable record) [default:
    /// <temp>/pypelinin-example-<uid>/<api endpoint>, one per user and cluster].
    #[arg(long)]
    home: Option<PathBuf>,
    /// Seconds between brokers' monitoring records.
    #[arg(long, default_value_t = 5.0)]
    monitoring_interval: f64,
    /// Store nothing (`[store] type = "none"`): for benchmarks of the cluster itself.
    #[arg(long)]
    no_store: bool,
}

// One thread: its tasks (sockets, state, outbox) hand work to each other without cross-thread
// wake-ups, which made every request ~30% slower on a 2-core machine (docs/performance.md).
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    pypelinin_common::daemon::telemetry::init();
    // Its durable record is <home>/router-data, not the router's usual default.
    let command = Cli::command().mut_arg("data_dir", |a| {
        a.help("Folder of the durable record [default: <home>/router-data]")
    });
    let cli = match Cli::from_arg_matches(&command.get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let api = cli
        .router
        .daemon
        .api
        .clone()
        .unwrap_or_else(|| pypelinin_common::DEFAULT_API.to_owned());
    let home = cli
        .home
        .clone()
        .unwrap_or_else(|| cluster::default_home(&api));
    let mut configuration = cluster::configuration(&home, cli.monitoring_interval);
    if cli.no_store {
        configuration.insert("store".into(), serde_json::json!({"type": "none"}));
    }
    // The example keeps its durable record beside its store.
    let data_dir = home.join("router-data");
    match pypelinin_router::cli::run_with_data_dir(&cli.router, configuration, data_dir).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
