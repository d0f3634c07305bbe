//! Property and golden tests of the shared crate.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

mod golden;
mod pipeline_props;
mod request_props;
