//! Stores: where a job's input comes from and where its result goes.
//!
//! The broker calls [`Store::retrieve`] before running a worker, [`Store::save`] with its
//! result, and [`Store::save_monitoring`] every monitoring interval. Calls run on the broker's
//! blocking pool, from several threads at once, so a store may do blocking I/O and must be
//! `Sync`. An error fails the job with its text; it never stops the broker.

mod file;

pub use file::FileStore;

/// A store that keeps nothing: `retrieve` gives the required fields found in the job's data,
/// `save` and `save_monitoring` drop what they get. For benchmarks and tests of the cluster
/// itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct NullStore;

impl Store for NullStore {
    fn retrieve(&self, info: &JobInfo) -> Result<JsonObject, BoxError> {
        Ok(info
            .worker_requires
            .iter()
            .filter_map(|f| info.data.get(f).map(|v| (f.clone(), v.clone())))
            .collect())
    }

    fn save(&self, _info: &JobInfo, _result: &JsonObject) -> Result<(), BoxError> {
        Ok(())
    }

    fn save_monitoring(&self, _record: &Value) -> Result<(), BoxError> {
        Ok(())
    }
}

use pypelinin_common::ids::JobId;
use serde_json::Value;

use crate::worker::{BoxError, JsonObject};

/// What a store learns about the job it serves (the legacy `{"worker", "worker_requires",
/// "data"}`, plus the job id).
#[derive(Debug, Clone, PartialEq)]
pub struct JobInfo {
    /// The job.
    pub job_id: JobId,
    /// The worker that runs it.
    pub worker: String,
    /// The fields the worker requires.
    pub worker_requires: Vec<String>,
    /// The job's data, as `add job` sent it. For a job of a pipeline this is the pipeline's
    /// data (as in the legacy, the pipeline's data travels with each of its jobs).
    pub data: Value,
}

/// A user store: the Rust form of the legacy store class.
pub trait Store: Send + Sync + 'static {
    /// The input of the worker, usually the `worker_requires` fields of the job's document.
    ///
    /// # Errors
    /// Any error: the job fails with its text.
    fn retrieve(&self, info: &JobInfo) -> Result<JsonObject, BoxError>;

    /// Saves the worker's result.
    ///
    /// # Errors
    /// Any error: the job fails with its text (the legacy broker hung the pipeline instead).
    fn save(&self, info: &JobInfo, result: &JsonObject) -> Result<(), BoxError>;

    /// Saves one monitoring record of the broker (host, process and running jobs).
    ///
    /// # Errors
    /// Any error is logged.
    fn save_monitoring(&self, record: &Value) -> Result<(), BoxError>;
}

/// The job's input, from `store`; on failure, the job's error.
pub(crate) fn retrieve_input(store: &dyn Store, info: &JobInfo) -> Result<JsonObject, String> {
    store
        .retrieve(info)
        .map_err(|e| format!("store failed to retrieve the input: {e}"))
}

/// Saves the job's `result` through `store`; on failure, the job's error.
pub(crate) fn save_result(
    store: &dyn Store,
    info: &JobInfo,
    result: &JsonObject,
) -> Result<(), String> {
    store
        .save(info, result)
        .map_err(|e| format!("store failed to save the result: {e}"))
}
