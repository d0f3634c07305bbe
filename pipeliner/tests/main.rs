//! Integration tests of the pipeliner: a real router, real brokers, real pipeliners and the
//! client library, on 127.0.0.1 free ports.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

mod walk;
