//! Local mode: run a pipeline in this process with given workers and a store, without
//! sockets or daemons, with the cluster's DAG semantics — so workers and pipelines are tested
//! with plain `cargo test`.
//!
//! ```
//! use std::sync::Arc;
//! use pypelinin_broker::local::run_pipeline;
//! use pypelinin_broker::worker::{JsonObject, Worker, WorkerResult};
//! use pypelinin_broker::{FileStore, WorkerRegistry};
//! use pypelinin_common::pipeline::Pipeline;
//!
//! struct Hello;
//! impl Worker for Hello {
//!     fn name(&self) -> &str { "Hello" }
//!     fn process(&self, _: JsonObject) -> WorkerResult<JsonObject> {
//!         Ok(serde_json::json!({"greeting": "hi"}).as_object().cloned().unwrap())
//!     }
//! }
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let dir = std::env::temp_dir().join(format!("pypelinin-local-doc-{}", std::process::id()));
//! let store = Arc::new(FileStore::new(&dir, None).unwrap());
//! let mut workers = WorkerRegistry::new();
//! workers.add(Hello).unwrap();
//! let pipeline = Pipeline::builder().job("Hello").data(serde_json::json!({"filename": "doc"})).build().unwrap();
//! let run = run_pipeline(&pipeline, &workers, store.clone()).await.unwrap();
//! assert_eq!(run.finished, vec!["Hello".to_string()]);
//! assert_eq!(FileStore::read_document(&dir.join("doc.json")).unwrap()["greeting"], "hi");
//! # std::fs::remove_dir_all(dir).unwrap();
//! # });
//! ```

use std::sync::Arc;
use std::time::Duration;

use pypelinin_common::ids::JobId;
use pypelinin_common::pipeline::{JobIndex, Pipeline, RunState};
use pypelinin_common::protocol::JobAssignment;
use serde_json::Map;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::execute::{run_job, Outcome};
use crate::store::Store;
use crate::worker::WorkerRegistry;

/// A pipeline run in local mode.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalRun {
    /// Workers of the jobs, in the order they finished.
    pub finished: Vec<String>,
}

/// A job of a local run failed; nothing after it was run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("job {worker} failed: {error}")]
pub struct LocalFailure {
    /// The worker of the failed job.
    pub worker: String,
    /// What went wrong.
    pub error: String,
    /// Workers of the jobs that finished before.
    pub finished: Vec<String>,
}

/// Runs `pipeline` with the workers of `registry` and `store`: each job once all its parents
/// have finished, independent jobs at the same time, a job's data being the pipeline's.
///
/// # Errors
/// [`LocalFailure`] for the first job that failed; its descendants are not run.
pub async fn run_pipeline(
    pipeline: &Pipeline,
    registry: &WorkerRegistry,
    store: Arc<dyn Store>,
) -> Result<LocalRun, LocalFailure> {
    let registry = Arc::new(registry.clone());
    let slots = Arc::new(Semaphore::new(pipeline.len().max(1)));
    let mut run = RunState::new(pipeline);
    let mut tasks: JoinSet<(JobIndex, Outcome)> = JoinSet::new();
    let mut finished = Vec::new();
    let mut failure = None;
    let spawn = |tasks: &mut JoinSet<(JobIndex, Outcome)>, job: JobIndex| {
        let assignment = JobAssignment {
            job_id: JobId::generate(),
            worker: pipeline.job(job).worker.clone(),
            pipeline_id: None,
            fields: Map::from_iter([("data".to_owned(), pipeline.job_data(job))]),
        };
        let (registry, store, slots) = (registry.clone(), store.clone(), slots.clone());
        tasks.spawn(async move {
            // The semaphore has a slot per job and is never closed.
            let permit = slots.acquire_owned().await.ok();
            let Some(permit) = permit else {
                return (job, Outcome::Failed("local run stopped".into()));
            };
            let ran = run_job(
                assignment,
                &registry,
                store,
                Duration::from_secs(600),
                permit,
                tokio_util::sync::CancellationToken::new(),
            )
            .await;
            (job, ran.outcome)
        });
    };
    for job in run.runnable_at_start(pipeline) {
        spawn(&mut tasks, job);
    }
    while let Some(joined) = tasks.join_next().await {
        let (job, outcome) = match joined {
            Ok(done) => done,
            Err(e) => {
                failure.get_or_insert((String::from("?"), format!("job task failed: {e}")));
                continue;
            }
        };
        let worker = pipeline.job(job).worker.clone();
        match outcome {
            Outcome::Finished => {
                finished.push(worker);
                if failure.is_none() {
                    for next in run.finish(pipeline, job) {
                        spawn(&mut tasks, next);
                    }
                }
            }
            Outcome::Failed(error) => {
                failure.get_or_insert((worker, error));
            }
        }
    }
    match failure {
        Some((worker, error)) => Err(LocalFailure {
            worker,
            error,
            finished,
        }),
        None => Ok(LocalRun { finished }),
    }
}
