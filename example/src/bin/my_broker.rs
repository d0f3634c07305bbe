//! `my_broker`: a broker running the example's workers.

use std::process::ExitCode;

use clap::Parser;
use pypelinin_broker::cli::BrokerArgs;

/// mimalloc: the daemons allocate many small JSON values; it halves the time spent in
/// the allocator (see docs/performance.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The example's broker: Downloader, GetTextAndWords, GetLinks, Summarize and the Python
/// TextStats worker, with the FileStore of the cluster configuration.
#[derive(Debug, Parser)]
#[command(name = "my_broker", version)]
struct Cli {
    #[command(flatten)]
    broker: BrokerArgs,
    /// Also run N no-op workers, Noop0 .. Noop<N-1> (for benchmarks and tests).
    #[arg(long, default_value_t = 0)]
    noop_workers: usize,
}

#[tokio::main]
async fn main() -> ExitCode {
    pypelinin_common::daemon::telemetry::init();
    let cli = Cli::parse();
    let result = async {
        let workers = pypelinin_example::workers::registry(cli.noop_workers)?;
        pypelinin_broker::cli::run(&cli.broker, workers, pypelinin_broker::file_store_factory())
            .await
    };
    match result.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
