//! A blocking [`PipelineManager`](crate::PipelineManager) for scripts without an async runtime.

use std::time::Duration;

use crate::{Error, Outcome, Pipeline, PipelineId};

/// The blocking form of [`crate::PipelineManager`]: same methods, no `.await`.
pub struct PipelineManager {
    runtime: tokio::runtime::Runtime,
    inner: crate::PipelineManager,
}

impl PipelineManager {
    /// Connects to a router.
    ///
    /// # Errors
    /// As [`crate::PipelineManager::connect`], or when no runtime can be started.
    pub fn connect(api: &str, broadcast: &str) -> Result<Self, Error> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(Error::Runtime)?;
        let inner = runtime.block_on(crate::PipelineManager::connect(api, broadcast))?;
        Ok(Self { runtime, inner })
    }

    /// Submits `pipeline`.
    ///
    /// # Errors
    /// As [`crate::PipelineManager::start`].
    pub fn start(&mut self, pipeline: &Pipeline) -> Result<PipelineId, Error> {
        self.runtime.block_on(self.inner.start(pipeline))
    }

    /// Submits `pipelines` in as few round trips as it can.
    ///
    /// # Errors
    /// As [`crate::PipelineManager::start_many`].
    pub fn start_many(&mut self, pipelines: &[Pipeline]) -> Result<Vec<PipelineId>, Error> {
        self.runtime.block_on(self.inner.start_many(pipelines))
    }

    /// Whether `id` has ended (without waiting).
    ///
    /// # Errors
    /// As [`crate::PipelineManager::finished`].
    pub fn finished(&mut self, id: &PipelineId) -> Result<bool, Error> {
        self.runtime.block_on(self.inner.finished(id))
    }

    /// Waits for `id`; returns its duration in seconds.
    ///
    /// # Errors
    /// As [`crate::PipelineManager::wait`].
    pub fn wait(&mut self, id: &PipelineId) -> Result<f64, Error> {
        self.runtime.block_on(self.inner.wait(id))
    }

    /// Waits for all of `ids`, at most `limit`.
    ///
    /// # Errors
    /// As [`crate::PipelineManager::wait_all`].
    pub fn wait_all(&mut self, ids: &[PipelineId], limit: Duration) -> Result<Vec<Outcome>, Error> {
        self.runtime.block_on(self.inner.wait_all(ids, limit))
    }
}
