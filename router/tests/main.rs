//! Integration tests of the router: a real router on 127.0.0.1 ephemeral ports, driven by real
//! ZeroMQ REQ and SUB sockets.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

mod api;
mod concurrency;
mod disk;
mod hostile;
mod metrics;
mod process;
mod support;
mod waiting;
