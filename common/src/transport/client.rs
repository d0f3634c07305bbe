//! The typed requests of [`ApiClient`]: one method per command of the protocol.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{ApiClient, ClientError};
use crate::ids::{JobId, PipelineId};
use crate::pipeline::Pipeline;
use crate::protocol::cluster::{ClusterStatus, PipelineDetails};
use crate::protocol::reply::{decode_reply, expect_answer, FromReply};
use crate::protocol::request::{
    GetJob, GetJobs, GetPipelines, JobFailed, JobFinished, JobStatusQuery, NewJob, NewPipeline,
    PipelineFailed, PipelineFinished, PipelineStatusQuery, Probe, RenewLeases,
};
use crate::protocol::{
    Answer, AnswerKind, JobAssignment, JobState, PipelineAssignment, PipelineStatus, ReplyError,
    Request, WireDuration,
};

impl ApiClient {
    /// `batch`: sends `requests` in one round trip; returns one reply per request, in order,
    /// to read with the `_value` decoders of [`crate::protocol::reply`]. Against the
    /// original's router (it answers `unknown command`), each request goes as its legacy
    /// command instead (see [`super::legacy`]).
    ///
    /// # Errors
    /// Transport failures, a refusal of the whole batch, or a reply that does not hold one
    /// reply per request.
    pub async fn batch(
        &mut self,
        requests: &[Request],
    ) -> Result<Vec<serde_json::Value>, ClientError> {
        if self.legacy {
            return self.legacy_batch(requests).await;
        }
        let batch = Request::Batch(crate::protocol::Batch::of(requests));
        let reply = self.request(&batch).await?;
        // Parsed once: the replies may carry jobs' data.
        let value = serde_json::from_slice::<serde_json::Value>(&reply).map_err(|e| {
            ReplyError::Unexpected(format!("{e}: {}", String::from_utf8_lossy(&reply)))
        })?;
        if self.detect_legacy(&value) {
            // The original's router: the same requests, as its commands.
            return self.legacy_batch(requests).await;
        }
        let replies = Vec::<serde_json::Value>::from_reply(value)?;
        if replies.len() != requests.len() {
            return Err(ReplyError::Unexpected(format!(
                "{} replies to a batch of {} requests",
                replies.len(),
                requests.len()
            ))
            .into());
        }
        Ok(replies)
    }

    /// `renew leases` for jobs this client runs and pipelines it walks.
    ///
    /// # Errors
    /// Transport failures, or an error answer.
    pub async fn renew_leases(&mut self, leases: RenewLeases) -> Result<(), ClientError> {
        let reply = self.request(&Request::RenewLeases(leases)).await?;
        expect_answer(&reply, AnswerKind::LeasesRenewed)?;
        Ok(())
    }

    /// `get configuration`.
    ///
    /// # Errors
    /// Transport failures, or a reply that is not a JSON object.
    pub async fn get_configuration(
        &mut self,
    ) -> Result<serde_json::Map<String, serde_json::Value>, ClientError> {
        let reply = self.request(&Request::GetConfiguration).await?;
        Ok(decode_reply(&reply)?)
    }

    /// `add job`; returns the new job's id.
    ///
    /// # Errors
    /// Transport failures, or the router's refusal.
    pub async fn add_job(&mut self, job: NewJob) -> Result<JobId, ClientError> {
        let reply = self.request(&Request::AddJob(job)).await?;
        let answer = expect_answer(&reply, AnswerKind::JobAccepted)?;
        answer
            .job_id
            .ok_or_else(|| ReplyError::Unexpected("job accepted without a job id".into()).into())
    }

    /// `get job`, for any worker (`None`) or only the given ones.
    ///
    /// # Errors
    /// Transport failures, or the router's refusal.
    pub async fn get_job(
        &mut self,
        workers: Option<Vec<String>>,
    ) -> Result<Option<JobAssignment>, ClientError> {
        let reply = self.request(&Request::GetJob(GetJob { workers })).await?;
        Ok(decode_reply(&reply)?)
    }

    /// `get jobs`: up to `max` jobs at once (fewer when fewer are queued), oldest first.
    ///
    /// # Errors
    /// Transport failures, or the router's refusal.
    pub async fn get_jobs(
        &mut self,
        workers: Option<Vec<String>>,
        max: usize,
    ) -> Result<Vec<JobAssignment>, ClientError> {
        let reply = self
            .request(&Request::GetJobs(GetJobs::new(workers, max)))
            .await?;
        Ok(decode_reply(&reply)?)
    }

    /// `get jobs` that waits at the router up to `wait` (whole milliseconds) when no job is
    /// queued, and returns the first jobs queued meanwhile (none once the wait is over).
    ///
    /// # Errors
    /// Transport failures, or the router's refusal.
    pub async fn wait_for_jobs(
        &mut self,
        workers: Option<Vec<String>>,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<JobAssignment>, ClientError> {
        let get = GetJobs {
            workers,
            max,
            wait_ms: Some(wait.as_millis() as u64),
            asker: None,
        };
        let reply = self.request_waiting(&Request::GetJobs(get), wait).await?;
        Ok(decode_reply(&reply)?)
    }

    /// `get pipelines` that waits as [`ApiClient::wait_for_jobs`] does.
    ///
    /// # Errors
    /// Transport failures, or the router's refusal.
    pub async fn wait_for_pipelines(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<PipelineAssignment>, ClientError> {
        let get = GetPipelines {
            max,
            wait_ms: Some(wait.as_millis() as u64),
            asker: None,
        };
        let reply = self
            .request_waiting(&Request::GetPipelines(get), wait)
            .await?;
        Ok(decode_reply(&reply)?)
    }

    /// `job finished`; returns the answer (`good job!` or `unknown job id`).
    ///
    /// # Errors
    /// Transport failures, or an error answer.
    pub async fn job_finished(
        &mut self,
        job_id: JobId,
        duration: WireDuration,
    ) -> Result<Answer, ClientError> {
        let reply = self
            .request(&Request::JobFinished(JobFinished { job_id, duration }))
            .await?;
        Ok(decode_reply(&reply)?)
    }

    /// `job failed`; returns the answer.
    ///
    /// # Errors
    /// Transport failures, or an error answer.
    pub async fn job_failed(&mut self, failure: JobFailed) -> Result<Answer, ClientError> {
        let reply = self.request(&Request::JobFailed(failure)).await?;
        Ok(decode_reply(&reply)?)
    }

    /// `add pipeline`; returns the new pipeline's id.
    ///
    /// # Errors
    /// Transport failures, or the router's refusal (`invalid pipeline`, ...).
    pub async fn add_pipeline(&mut self, pipeline: &Pipeline) -> Result<PipelineId, ClientError> {
        self.add_pipeline_with_id(pipeline, None).await
    }

    /// `add pipeline` with a client request id: sending the same id again (after a lost reply)
    /// gives the same pipeline instead of a second one.
    ///
    /// # Errors
    /// Transport failures, or the router's refusal (`invalid pipeline`, `queue full`, ...).
    pub async fn add_pipeline_with_id(
        &mut self,
        pipeline: &Pipeline,
        request_id: Option<&str>,
    ) -> Result<PipelineId, ClientError> {
        let mut request = NewPipeline::new(&pipeline.to_legacy());
        if let Some(id) = request_id {
            request.fields.insert("request id", &id.into());
        }
        let request = Request::AddPipeline(request);
        let reply = self.request(&request).await?;
        let answer = expect_answer(&reply, AnswerKind::PipelineAccepted)?;
        answer.pipeline_id.ok_or_else(|| {
            ReplyError::Unexpected("pipeline accepted without a pipeline id".into()).into()
        })
    }

    /// `get pipeline`.
    ///
    /// # Errors
    /// Transport failures, or the router's refusal.
    pub async fn get_pipeline(&mut self) -> Result<Option<PipelineAssignment>, ClientError> {
        let reply = self.request(&Request::GetPipeline).await?;
        Ok(decode_reply(&reply)?)
    }

    /// `get pipelines`: up to `max` pipelines at once, oldest first.
    ///
    /// # Errors
    /// Transport failures, or the router's refusal.
    pub async fn get_pipelines(
        &mut self,
        max: usize,
    ) -> Result<Vec<PipelineAssignment>, ClientError> {
        let reply = self
            .request(&Request::GetPipelines(GetPipelines::new(max)))
            .await?;
        Ok(decode_reply(&reply)?)
    }

    /// `pipeline finished`; returns the answer.
    ///
    /// # Errors
    /// Transport failures, or an error answer.
    pub async fn pipeline_finished(
        &mut self,
        pipeline_id: PipelineId,
        duration: WireDuration,
    ) -> Result<Answer, ClientError> {
        let reply = self
            .request(&Request::PipelineFinished(PipelineFinished {
                pipeline_id,
                duration,
            }))
            .await?;
        Ok(decode_reply(&reply)?)
    }

    /// `pipeline failed`; returns the answer.
    ///
    /// # Errors
    /// Transport failures, or an error answer.
    pub async fn pipeline_failed(
        &mut self,
        failure: PipelineFailed,
    ) -> Result<Answer, ClientError> {
        let reply = self.request(&Request::PipelineFailed(failure)).await?;
        Ok(decode_reply(&reply)?)
    }

    /// `job status` of `job_ids`.
    ///
    /// # Errors
    /// Transport failures, or an error answer.
    pub async fn job_status(
        &mut self,
        job_ids: Vec<JobId>,
    ) -> Result<BTreeMap<JobId, JobState>, ClientError> {
        let reply = self
            .request(&Request::JobStatus(JobStatusQuery { job_ids }))
            .await?;
        let answer = expect_answer(&reply, AnswerKind::Status)?;
        Ok(answer.jobs.unwrap_or_default())
    }

    /// `pipeline status` of `pipeline_ids`.
    ///
    /// # Errors
    /// Transport failures, or an error answer.
    pub async fn pipeline_status(
        &mut self,
        pipeline_ids: Vec<PipelineId>,
    ) -> Result<BTreeMap<PipelineId, PipelineStatus>, ClientError> {
        let answer = self.pipeline_status_with(pipeline_ids, false).await?;
        Ok(answer.pipelines.unwrap_or_default())
    }

    /// `pipeline status` of `pipeline_ids` with `"details": true`: each status, and the DAG
    /// and submitted jobs of those that are pending.
    ///
    /// # Errors
    /// Transport failures, or an error answer.
    pub async fn pipeline_details(
        &mut self,
        pipeline_ids: Vec<PipelineId>,
    ) -> Result<BTreeMap<PipelineId, (PipelineStatus, Option<PipelineDetails>)>, ClientError> {
        let answer = self.pipeline_status_with(pipeline_ids, true).await?;
        let mut details = answer.details.unwrap_or_default();
        Ok(answer
            .pipelines
            .unwrap_or_default()
            .into_iter()
            .map(|(id, status)| {
                let d = details.remove(&id);
                (id, (status, d))
            })
            .collect())
    }

    async fn pipeline_status_with(
        &mut self,
        pipeline_ids: Vec<PipelineId>,
        details: bool,
    ) -> Result<Answer, ClientError> {
        let reply = self
            .request(&Request::PipelineStatus(PipelineStatusQuery {
                pipeline_ids,
                details,
            }))
            .await?;
        Ok(expect_answer(&reply, AnswerKind::Status)?)
    }

    /// `cluster status`: what the router knows of the cluster.
    ///
    /// # Errors
    /// Transport failures, or an error answer.
    pub async fn cluster_status(&mut self) -> Result<ClusterStatus, ClientError> {
        let reply = self.request(&Request::ClusterStatus).await?;
        Ok(decode_reply(&reply)?)
    }

    /// `list pipelines`: pipelines newest first, of one state or id prefix when `list` says.
    ///
    /// # Errors
    /// Transport failures, or an error answer.
    pub async fn list_pipelines(
        &mut self,
        list: crate::protocol::request::ListPipelines,
    ) -> Result<crate::protocol::cluster::PipelineList, ClientError> {
        let reply = self.request(&Request::ListPipelines(list)).await?;
        Ok(decode_reply(&reply)?)
    }

    /// `cancel pipeline`: cancels a pending pipeline.
    ///
    /// # Errors
    /// Transport failures, or an error answer: `pipeline ended` (it finished, failed or was
    /// cancelled already) or `unknown pipeline id`.
    pub async fn cancel_pipeline(&mut self, pipeline_id: PipelineId) -> Result<(), ClientError> {
        let reply = self
            .request(&Request::CancelPipeline(
                crate::protocol::request::CancelPipeline { pipeline_id },
            ))
            .await?;
        expect_answer(&reply, AnswerKind::PipelineCancelled)?;
        Ok(())
    }

    /// `probe`: asks the router to broadcast `probe: <token>`.
    ///
    /// # Errors
    /// Transport failures, or an error answer.
    pub async fn probe(&mut self, token: &str) -> Result<(), ClientError> {
        let reply = self
            .request(&Request::Probe(Probe {
                token: token.to_owned(),
            }))
            .await?;
        expect_answer(&reply, AnswerKind::ProbeSent)?;
        Ok(())
    }
}
