//! Integration tests of the broker: a real router and real brokers on 127.0.0.1 free ports,
//! test workers, and a FileStore in a temporary directory.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

mod jobs;
mod process;
mod support;
