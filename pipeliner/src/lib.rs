//! The pypelinin pipeliner: walks pipeline DAGs.
//!
//! It takes pipelines from the router (`get pipeline`), submits each starter job (`add job`
//! with the pipeline's data and id), then each job as soon as all its parents have finished,
//! following `job finished` broadcasts, and reports `pipeline finished` — or `pipeline failed`
//! when a job failed. It walks many pipelines at once, and several pipeliners can share a
//! router: the router hands each pipeline to one of them.
//!
//! It subscribes to every `job finished`/`job failed` broadcast before it submits anything, so
//! a fast job's event is never missed; and because broadcasts can still be lost (a reconnect),
//! it asks the router where jobs stand (`job status`) when it has heard nothing of them for a
//! while.
//!
//! Layout: [`Pipeliner`] (connects, then runs the shared daemon loop of
//! `pypelinin_common::daemon::runloop`), [`machine`] (what the pipeliner does, as a state
//! machine: no I/O), [`walks`] (the DAG walk), [`settings`], [`cli`].

pub mod cli;
pub mod machine;
pub mod settings;
pub mod walks;

use std::time::Duration;

use pypelinin_common::daemon::config::{secs, ConfigError};
use pypelinin_common::daemon::connect::wait_for_router;
use pypelinin_common::daemon::runloop::{DaemonLoop, LoopSecs, LoopSettings};
use pypelinin_common::protocol::Event;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use machine::PipelinerMachine;
pub use settings::PipelinerSettings;

/// Requests (and events read) in one batch, at most.
const MAX_BATCH: usize = 1024;

/// Round trips in one turn of the loop, at most, so it gets back to renewing leases and
/// reading events.
const TURN_ROUND_TRIPS: usize = 4;

/// How long a pipeliner's `get pipelines` waits at the router when none is queued. A stopping
/// pipeliner waits for the answer (it may bring pipelines, which it then walks), so an idle
/// pipeliner stops within it.
const WAIT_FOR_PIPELINES: Duration = Duration::from_secs(1);

/// A failure that stops the pipeliner.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting cannot be used.
    #[error(transparent)]
    Settings(#[from] ConfigError),
}

/// A pipeliner ready to [`run`](Pipeliner::run).
pub struct Pipeliner {
    settings: PipelinerSettings,
}

impl Pipeliner {
    /// A pipeliner with `settings`.
    pub fn new(settings: PipelinerSettings) -> Self {
        Self { settings }
    }

    /// Runs until `shutdown` is cancelled: then it takes no new pipeline, walks the ones it
    /// holds to their end (up to the grace period) and returns.
    ///
    /// # Errors
    /// [`Error::Settings`] for a setting that cannot be used (checked before connecting).
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let s = &self.settings;
        let loop_secs = LoopSecs {
            connect_timeout: s.connect_timeout_secs,
            request_timeout: s.request_timeout_secs,
            poll_interval: s.poll_interval_secs,
            lease_renew: s.lease_renew_secs,
            shutdown_grace: s.shutdown_grace_secs,
        };
        let prefixes = vec![
            Event::NEW_PIPELINE,
            Event::JOB_FINISHED,
            Event::JOB_FAILED,
            Event::PIPELINE_CANCELLED,
        ];
        let resync = secs(
            "resync_after_secs",
            s.resync_after_secs,
            Duration::from_secs(2),
        )?;
        let settings = LoopSettings {
            housekeeping: Some(resync),
            wait: WAIT_FOR_PIPELINES,
            max_batch: MAX_BATCH,
            turn_round_trips: TURN_ROUND_TRIPS,
            ..LoopSettings::new(
                &s.api,
                &s.broadcast,
                s.token.clone(),
                prefixes.clone(),
                loop_secs,
            )?
        };
        let options = settings.options;
        let Some((mut client, mut subscriber, _)) = wait_for_router(
            &s.api,
            &s.broadcast,
            &prefixes,
            options,
            s.token.clone(),
            &shutdown,
        )
        .await
        else {
            return Ok(());
        };
        // Submit nothing before the subscription is live: a fast job's event would be lost.
        while let Err(e) = subscriber
            .wait_live(&mut client, options.request_timeout)
            .await
        {
            warn!(error = %e, "waiting for the broadcast subscription");
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
        info!(max_pipelines = s.max_pipelines, "pipeliner running");
        let machine = PipelinerMachine::new(s.max_pipelines, resync);
        let machine = DaemonLoop::new(settings, client, subscriber)
            .run(machine, &shutdown)
            .await;
        if !machine.walks().is_empty() {
            warn!(pipelines = machine.walks().len(), "pipeliner stopped with pipelines unfinished; the router hands them out again when their leases end");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_setting_past_a_year_is_refused_at_start_with_its_name() {
        let settings = PipelinerSettings {
            lease_renew_secs: 1e30,
            ..PipelinerSettings::default()
        };
        let stopped = CancellationToken::new();
        let outcome = Pipeliner::new(settings).run(stopped).await;
        match outcome {
            Err(e) => assert!(e.to_string().contains("lease_renew_secs"), "{e}"),
            Ok(()) => panic!("a lease renewal of 1e30 s was accepted"),
        }
    }
}
