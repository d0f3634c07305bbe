//! `my_pipeliner`: the example's pipeliner.

use std::process::ExitCode;

use clap::Parser;
use pypelinin_pipeliner::cli::PipelinerArgs;

/// mimalloc: the daemons allocate many small JSON values; it halves the time spent in
/// the allocator (see docs/performance.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The example's pipeliner: walks the pipelines' DAGs and submits their jobs.
#[derive(Debug, Parser)]
#[command(name = "my_pipeliner", version)]
struct Cli {
    #[command(flatten)]
    pipeliner: PipelinerArgs,
}

// One thread: its tasks (sockets, state, outbox) hand work to each other without cross-thread
// wake-ups, which made every request ~30% slower on a 2-core machine (docs/performance.md).
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    pypelinin_common::daemon::telemetry::init();
    let cli = Cli::parse();
    match pypelinin_pipeliner::cli::run(&cli.pipeliner).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
