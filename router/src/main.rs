//! `pypelinin-router`: the router daemon.

use std::process::ExitCode;

use clap::Parser;
use pypelinin_router::cli::RouterArgs;

/// mimalloc: the daemons allocate many small JSON values; it halves the time spent in
/// the allocator (see docs/performance.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// pypelinin router: queues pipelines and jobs and broadcasts events.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    router: RouterArgs,
}

// One thread: its tasks (sockets, state, outbox) hand work to each other without cross-thread
// wake-ups, which made every request ~30% slower on a 2-core machine (docs/performance.md).
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    pypelinin_common::daemon::telemetry::init();
    let cli = Cli::parse();
    match pypelinin_router::cli::run(&cli.router, serde_json::Map::new()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
