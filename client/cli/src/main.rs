//! `pypelinin`: the command-line tool of a pypelinin cluster (see `pypelinin --help` and
//! docs/operations.md).

use clap::Parser;
use pypelinin_cli::{run, Cli, Exit};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Exit {
    // The tool says in one line of its own what went wrong; the library's log lines (an
    // unreachable router, retried) show only with RUST_LOG (RUST_LOG=warn, say).
    pypelinin_common::daemon::telemetry::init_with_default("error");
    run(Cli::parse()).await
}
