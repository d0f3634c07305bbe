//! End-to-end tests of the example: real processes of our binaries (router, brokers,
//! pipeliner, send_pipelines) on 127.0.0.1 free ports, each killed by PID at the end.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

mod cli;
mod cluster;
mod dashboard;
mod faults;
mod hostile;
mod legacy;
mod netns;
mod python;
mod support;
mod terminal;
