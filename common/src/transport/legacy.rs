//! Talking to the original's router (pypelinin 0.1.1), which knows only the legacy commands.
//!
//! A router that answers `unknown command` to a `batch` (or to a `get jobs` / `get pipelines`
//! that waits) is the original's. From then on this [`ApiClient`] sends every request on its
//! own, as a legacy command, and shapes the original's answers as ours:
//!
//! | request | sent as |
//! |---|---|
//! | `batch` | each request in turn |
//! | `get jobs` (up to N, of some workers) | `get job` until N jobs or `{"worker": null}` |
//! | `get pipelines` (up to N) | `get pipeline` until N or `{"pipeline": null}` |
//! | a request that waits for work | the same, again every [`LEGACY_POLL`] until work comes or the wait is over |
//! | `job failed` | `job finished` (answered `failure recorded`): the original broker reported failed jobs finished too |
//! | `pipeline failed` | `pipeline finished` (answered `failure recorded`): the original's client hears nothing else |
//! | `renew leases` | nothing: answered `leases renewed` (the original has no leases) |
//! | `job status` | nothing: every job is said to be running (the original cannot tell) |
//! | `add job` with `"data from pipeline"` | `add job` with the data itself |
//! | anything else | as is |
//!
//! What is lost, said once in the log: leases (the work of a daemon that dies is never handed
//! out again), retries, cancellation, deadlines and cluster status. `get job` hands out a job of
//! any worker: one this client does not run is dropped with an error in the log (the
//! original's broker dropped them too); run every worker on every broker.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;
use tracing::{error, warn};

use super::{ApiClient, ClientError};
use crate::protocol::request::{GetJobs, GetPipelines, JobFailed, PipelineFailed};
use crate::protocol::{Answer, AnswerKind, JobState, Reply, ReplyError, Request};

/// How often a request that waits for work asks the original's router again (its own broker
/// and pipeliner polled their broadcasts every 50 ms).
pub const LEGACY_POLL: Duration = Duration::from_millis(50);

/// How long a subscription is given to reach the original's router, which has no `probe` to
/// confirm it (a subscription crosses a LAN in well under a millisecond).
pub const LEGACY_SETTLE: Duration = Duration::from_millis(200);

/// Whether this process said already that it talks to the original's router.
static WARNED: AtomicBool = AtomicBool::new(false);

/// Whether `reply` is the original's answer to a command it does not know.
fn is_unknown_command(reply: &Value) -> bool {
    reply.get("answer").and_then(Value::as_str) == Some("unknown command")
        && reply.as_object().is_some_and(|o| o.len() == 1)
}

/// Our reply `answer` as JSON.
fn value_of(reply: impl Into<Reply>) -> Value {
    serde_json::from_slice(&reply.into().encode()).unwrap_or(Value::Null)
}

impl ApiClient {
    /// Whether this client found the original's router and speaks the legacy commands.
    pub fn is_legacy(&self) -> bool {
        self.legacy
    }

    /// Notes that the router answered `reply` to an extension: true (and legacy from now on)
    /// when that is the original's `unknown command`.
    pub(crate) fn detect_legacy(&mut self, reply: &Value) -> bool {
        if !is_unknown_command(reply) {
            return false;
        }
        self.legacy = true;
        if !WARNED.swap(true, Ordering::Relaxed) {
            warn!(
                api = %self.endpoint(),
                "the router does not know this project's extensions: it is the original \
                 pypelinin's; falling back to its commands (one request per job, polling for \
                 work). Lost: leases (the work of a daemon that dies is never handed out again), \
                 retries (a failed job is reported finished), cancellation, deadlines, cluster \
                 status"
            );
        }
        true
    }

    /// [`ApiClient::batch`] against the original's router: each request on its own.
    pub(crate) async fn legacy_batch(
        &mut self,
        requests: &[Request],
    ) -> Result<Vec<Value>, ClientError> {
        let mut replies = Vec::with_capacity(requests.len());
        for request in requests {
            replies.push(self.legacy_request(request).await?);
        }
        Ok(replies)
    }

    /// A request for work that waits up to `wait`, against the original's router: asked again
    /// every [`LEGACY_POLL`] until work comes or the wait is over.
    pub(crate) async fn legacy_wait(
        &mut self,
        request: &Request,
        wait: Duration,
    ) -> Result<Value, ClientError> {
        let until = Instant::now() + wait;
        loop {
            let reply = self.legacy_request(request).await?;
            let work = ["jobs", "pipelines"].iter().find_map(|k| reply.get(k));
            let empty = work.and_then(Value::as_array).is_some_and(Vec::is_empty);
            if !empty || Instant::now() + LEGACY_POLL > until {
                return Ok(reply);
            }
            tokio::time::sleep(LEGACY_POLL).await;
        }
    }

    /// One request, as the original's router understands it (see the module documentation).
    async fn legacy_request(&mut self, request: &Request) -> Result<Value, ClientError> {
        match request {
            Request::Batch(batch) => {
                let mut replies = Vec::new();
                for item in batch.clone().decode() {
                    match item {
                        Ok(request) => replies.push(Box::pin(self.legacy_request(&request)).await?),
                        Err(e) => replies.push(value_of(Reply::for_error(&e))),
                    }
                }
                Ok(json!({"answer": "batch", "replies": replies}))
            }
            Request::GetJobs(GetJobs { workers, max, .. }) => {
                let mut jobs = Vec::new();
                while jobs.len() < *max {
                    let job = self.send_legacy(&json!({"command": "get job"})).await?;
                    let Some(worker) = job.get("worker").and_then(Value::as_str) else {
                        break;
                    };
                    if workers
                        .as_ref()
                        .is_some_and(|w| !w.iter().any(|n| n == worker))
                    {
                        error!(
                            job_id = ?job.get("job id"), worker,
                            "the original's router handed out a job of a worker this broker does \
                             not run, and it has no way to take it back: the job stays pending \
                             there (as with the original's broker); run every worker on every broker"
                        );
                        continue;
                    }
                    jobs.push(job);
                }
                Ok(json!({"answer": "jobs", "jobs": jobs}))
            }
            Request::GetPipelines(GetPipelines { max, .. }) => {
                let mut pipelines = Vec::new();
                while pipelines.len() < *max {
                    let reply = self
                        .send_legacy(&json!({"command": "get pipeline"}))
                        .await?;
                    if reply.get("pipeline").is_none_or(Value::is_null) {
                        break;
                    }
                    pipelines.push(reply);
                }
                Ok(json!({"answer": "pipelines", "pipelines": pipelines}))
            }
            Request::JobFailed(JobFailed {
                job_id, duration, ..
            }) => {
                let secs = duration.as_ref().map_or(0.0, |d| d.as_secs());
                let finished =
                    json!({"command": "job finished", "job id": job_id, "duration": secs});
                self.failure_as_finished(&finished).await
            }
            Request::PipelineFailed(PipelineFailed {
                pipeline_id,
                duration,
                ..
            }) => {
                let secs = duration.as_ref().map_or(0.0, |d| d.as_secs());
                let finished = json!({"command": "pipeline finished", "pipeline id": pipeline_id, "duration": secs});
                self.failure_as_finished(&finished).await
            }
            Request::RenewLeases(_) => Ok(value_of(Answer::new(AnswerKind::LeasesRenewed))),
            Request::AddJob(job) if job.data_from_pipeline => {
                // The original's router does not know the key: send the data itself.
                let job = crate::protocol::request::NewJob {
                    data_from_pipeline: false,
                    ..job.clone()
                };
                let request = serde_json::to_value(Request::AddJob(job)).unwrap_or(Value::Null);
                self.send_legacy(&request).await
            }
            Request::JobStatus(query) => {
                let jobs: BTreeMap<_, _> = query
                    .job_ids
                    .iter()
                    .map(|id| (id.clone(), JobState::Running))
                    .collect();
                Ok(value_of(Answer {
                    jobs: Some(jobs),
                    ..Answer::new(AnswerKind::Status)
                }))
            }
            other => {
                let request = serde_json::to_value(other).unwrap_or(Value::Null);
                self.send_legacy(&request).await
            }
        }
    }

    /// Sends `finished` for a failure: answered `failure recorded` when the original took it.
    async fn failure_as_finished(&mut self, finished: &Value) -> Result<Value, ClientError> {
        let reply = self.send_legacy(finished).await?;
        if reply.get("answer").and_then(Value::as_str) == Some("good job!") {
            return Ok(value_of(Answer::new(AnswerKind::FailureRecorded)));
        }
        Ok(reply)
    }

    /// Sends one legacy request and returns its JSON reply.
    async fn send_legacy(&mut self, request: &Value) -> Result<Value, ClientError> {
        let body = serde_json::to_vec(request).unwrap_or_default();
        let reply = self.request_bytes(body).await?;
        serde_json::from_slice(&reply).map_err(|e| {
            ClientError::Reply(ReplyError::Unexpected(format!(
                "the reply is not JSON: {e}"
            )))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_bare_unknown_command_answer_is_the_originals() {
        assert!(is_unknown_command(&json!({"answer": "unknown command"})));
        // Ours adds a reason to its error answers; other answers are not a sign either.
        assert!(!is_unknown_command(
            &json!({"answer": "unknown command", "error": "no such command"})
        ));
        assert!(!is_unknown_command(&json!({"answer": "undefined command"})));
        assert!(!is_unknown_command(
            &json!({"answer": "batch", "replies": []})
        ));
    }

    #[test]
    fn our_answers_shaped_for_the_decoders() {
        let renewed = value_of(Answer::new(AnswerKind::LeasesRenewed));
        assert_eq!(renewed, json!({"answer": "leases renewed"}));
        let recorded = value_of(Answer::new(AnswerKind::FailureRecorded));
        assert_eq!(recorded, json!({"answer": "failure recorded"}));
    }
}
