//! What every pypelinin process shares, in three layers, each using only those above it:
//!
//! 1. **Protocol** (no I/O): [`ids`] ([`JobId`](ids::JobId), [`PipelineId`](ids::PipelineId)),
//!    [`protocol`] (requests, replies and broadcast events in the legacy JSON spelling) and
//!    [`pipeline`] ([`Pipeline`](pipeline::Pipeline) DAGs, their legacy form, DOT, and the
//!    [`RunState`](pipeline::RunState) a pipeliner walks them with).
//! 2. **Transport** ([`transport`]): the ZeroMQ sockets — the router's API server and
//!    publisher, the reconnecting API client with its typed requests, the subscriber.
//! 3. **Daemon** (`daemon`, behind the cargo feature `daemon`): settings files and flags
//!    (clap, config), logging (tracing-subscriber), Ctrl-C/SIGTERM, waiting for the router.
//!    The client library does not enable it, so a program that only submits pipelines does
//!    not compile the daemons' command-line and logging stacks.
//!
//! `testing` (feature `test-util`) has helpers for tests of the daemons.

pub mod ids;
pub mod pipeline;
pub mod protocol;

pub mod transport;

#[cfg(feature = "daemon")]
pub mod daemon;

#[cfg(feature = "test-util")]
pub mod testing;

/// The default API endpoint (loopback).
pub const DEFAULT_API: &str = "tcp://127.0.0.1:5555";
/// The default broadcast endpoint (loopback).
pub const DEFAULT_BROADCAST: &str = "tcp://127.0.0.1:5556";
