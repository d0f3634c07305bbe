//! The daemon layer (feature `daemon`): what the router, broker and pipeliner binaries share
//! and a program that only submits pipelines does not need.
//!
//! - [`config`]: [`DaemonArgs`](config::DaemonArgs) (clap) and the TOML file +
//!   `PYPELININ_*` environment loader.
//! - [`telemetry`]: logging to stderr (tracing-subscriber).
//! - [`shutdown`]: Ctrl-C and SIGTERM as a cancellation token.
//! - [`connect`]: waiting for the router at start.
//! - [`identity`]: how a broker or pipeliner tells the router who it is.
//! - [`runloop`]: the loop the broker and the pipeliner share, around a
//!   [`Machine`](runloop::Machine) that holds what each does.

pub mod config;
pub mod connect;
pub mod identity;
pub mod runloop;
pub mod shutdown;
pub mod telemetry;
