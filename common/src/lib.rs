//! What every pypelinin process shares: the wire protocol, the pipeline model and the ZeroMQ
//! transport, plus settings, logging and shutdown plumbing.
//!
//! Layout:
//! - [`ids`]: [`JobId`](ids::JobId) and [`PipelineId`](ids::PipelineId).
//! - [`protocol`]: requests, replies and broadcast events in the legacy JSON spelling.
//! - [`pipeline`]: [`Pipeline`](pipeline::Pipeline) DAGs, their legacy serialized form, DOT,
//!   and the [`RunState`](pipeline::RunState) the pipeliner walks them with.
//! - [`transport`]: every socket: the router's API server and publisher, the API client and
//!   the subscriber.
//! - [`config`]: TOML file + `PYPELININ_*` environment loading.
//! - [`shutdown`], [`telemetry`]: Ctrl-C/SIGTERM and logging for the binaries.
//! - `testing` (feature `test-util`): helpers for tests.

pub mod config;
pub mod ids;
pub mod pipeline;
pub mod protocol;
pub mod shutdown;
pub mod telemetry;
#[cfg(feature = "test-util")]
pub mod testing;
pub mod transport;

/// The default API endpoint (loopback).
pub const DEFAULT_API: &str = "tcp://127.0.0.1:5555";
/// The default broadcast endpoint (loopback).
pub const DEFAULT_BROADCAST: &str = "tcp://127.0.0.1:5556";
