//! All ZeroMQ socket code of pypelinin, shared by every daemon and client.
//!
//! Server side: [`ApiServer`] (a ROUTER socket serving REQ clients, split into a
//! [`RequestReceiver`] and cloneable [`Replier`]s) and [`Publisher`] (the PUB socket).
//! Client side: [`ApiClient`] (a REQ socket it rebuilds after any error or timeout, since the
//! `zeromq` crate's REQ never reconnects and cannot send again after a lost reply) and
//! [`Subscriber`] (a SUB socket, which the crate does reconnect).
//!
//! See `zeromq-notes.md` in the shared folder for the measured behaviour behind these choices.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::{timeout, Instant};
use tracing::{debug, trace};
use zeromq::{
    PubSocket, ReqSocket, RouterRecvHalf, RouterSendHalf, RouterSocket, Socket, SocketOptions,
    SocketRecv, SocketSend, SubSocket, ZmqError, ZmqMessage,
};

use crate::ids::{JobId, PipelineId};
use crate::pipeline::Pipeline;
use crate::protocol::reply::{
    decode_batch_reply, decode_job_reply, decode_jobs_reply, decode_pipeline_reply,
    decode_pipelines_reply, decode_reply, expect_answer,
};
use crate::protocol::request::{
    GetJob, GetJobs, GetPipelines, JobFailed, JobFinished, JobStatusQuery, NewJob, NewPipeline,
    PipelineFailed, PipelineFinished, PipelineStatusQuery, Probe, RenewLeases,
};
use crate::protocol::{
    Answer, AnswerKind, Event, JobAssignment, JobState, PipelineAssignment, PipelineStatus,
    ReplyError, Request, WireDuration,
};

/// A transport failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// Binding a server socket failed.
    #[error("cannot bind {endpoint}")]
    Bind {
        /// The endpoint.
        endpoint: String,
        /// Why.
        #[source]
        source: ZmqError,
    },
    /// Connecting did not succeed within the connect timeout.
    #[error("cannot reach {endpoint} within {timeout:?} (is the router running?)")]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// The timeout.
        timeout: Duration,
    },
    /// Connecting failed for good (bad endpoint, ...).
    #[error("cannot connect to {endpoint}")]
    ConnectFailed {
        /// The endpoint.
        endpoint: String,
        /// Why.
        #[source]
        source: ZmqError,
    },
    /// No reply within the request timeout.
    #[error("no reply from {endpoint} within {timeout:?}")]
    Timeout {
        /// The endpoint.
        endpoint: String,
        /// The timeout.
        timeout: Duration,
    },
    /// The socket failed while sending or receiving.
    #[error("socket error talking to {endpoint}")]
    Socket {
        /// The endpoint.
        endpoint: String,
        /// Why.
        #[source]
        source: ZmqError,
    },
    /// The reply was not exactly one frame.
    #[error("reply from {endpoint} has {frames} frames, expected 1")]
    BadReply {
        /// The endpoint.
        endpoint: String,
        /// How many frames it had.
        frames: usize,
    },
    /// The socket was closed.
    #[error("socket closed")]
    Closed,
}

/// A failure of a request: the transport failed, or the router said no.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The request did not get a reply.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The reply was an error answer or of an unexpected shape.
    #[error(transparent)]
    Reply(#[from] ReplyError),
}

impl ClientError {
    /// Whether retrying the same request later may succeed (the router was unreachable).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ClientError::Transport(
                TransportError::Connect { .. }
                    | TransportError::Timeout { .. }
                    | TransportError::Socket { .. }
            )
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Server side

/// The routing frames of a request (identity, any REQ_CORRELATE id, the empty delimiter), sent
/// back unchanged in front of the reply.
#[derive(Debug, Clone)]
pub struct Envelope(Vec<Bytes>);

impl Envelope {
    /// The peer's identity, hex-encoded for logs.
    pub fn peer(&self) -> String {
        self.0
            .first()
            .map(|id| id.iter().map(|b| format!("{b:02x}")).collect())
            .unwrap_or_default()
    }
}

/// One request received by the [`ApiServer`].
#[derive(Debug)]
pub struct Incoming {
    /// Where the reply goes.
    pub envelope: Envelope,
    /// The single body frame, or why the frames are not one request.
    pub body: Result<Bytes, String>,
}

/// The API socket of the router: a ROUTER that serves many REQ (and DEALER) clients at once.
pub struct ApiServer {
    socket: RouterSocket,
    endpoint: String,
}

impl ApiServer {
    /// Binds `endpoint` (`tcp://127.0.0.1:0` picks a free port; see [`ApiServer::endpoint`]).
    ///
    /// # Errors
    /// [`TransportError::Bind`] when the endpoint cannot be bound.
    pub async fn bind(endpoint: &str) -> Result<Self, TransportError> {
        let mut socket = RouterSocket::new();
        let bound = socket
            .bind(endpoint)
            .await
            .map_err(|source| TransportError::Bind {
                endpoint: endpoint.to_owned(),
                source,
            })?;
        Ok(Self {
            socket,
            endpoint: bound.to_string(),
        })
    }

    /// The endpoint actually bound (with the real port).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Splits into the receiving half and a cloneable replying half.
    pub fn split(
        self,
        max_request_bytes: usize,
        send_timeout: Duration,
    ) -> (RequestReceiver, Replier) {
        let (send, recv) = self.socket.split();
        (
            RequestReceiver {
                recv,
                max_request_bytes,
            },
            Replier { send, send_timeout },
        )
    }
}

/// Receives requests from the [`ApiServer`].
pub struct RequestReceiver {
    recv: RouterRecvHalf,
    max_request_bytes: usize,
}

impl RequestReceiver {
    /// The next request. Frames that do not make one request come back as `body: Err(..)`,
    /// so the caller can answer them.
    ///
    /// # Errors
    /// [`TransportError::Closed`] once the socket is shut down.
    pub async fn recv(&mut self) -> Result<Incoming, TransportError> {
        let message = match self.recv.recv().await {
            Ok(m) => m,
            Err(ZmqError::NoMessage) => return Err(TransportError::Closed),
            Err(e) => {
                // Per-peer failures; the crate already dropped the peer. Keep serving.
                debug!(error = %e, "receive failed");
                return Err(TransportError::Socket {
                    endpoint: String::new(),
                    source: e,
                });
            }
        };
        Ok(self.split_frames(message))
    }

    fn split_frames(&self, message: ZmqMessage) -> Incoming {
        let mut frames = message.into_vec();
        // frames[0] is the identity the ROUTER added; the envelope runs to the first empty frame.
        let delimiter = frames
            .iter()
            .skip(1)
            .position(|f| f.is_empty())
            .map(|p| p + 1);
        let body_start = delimiter.map_or(1, |d| d + 1);
        let body: Vec<Bytes> = frames.split_off(body_start.min(frames.len()));
        let envelope = Envelope(frames);
        let body = match body.as_slice() {
            [one] if one.len() > self.max_request_bytes => Err(format!(
                "request of {} bytes exceeds the limit of {} bytes",
                one.len(),
                self.max_request_bytes
            )),
            [one] => Ok(one.clone()),
            other => Err(format!("request has {} frames, expected 1", other.len())),
        };
        Incoming { envelope, body }
    }
}

/// Sends replies through the [`ApiServer`]; clones share the socket.
#[derive(Clone)]
pub struct Replier {
    send: RouterSendHalf,
    send_timeout: Duration,
}

impl Replier {
    /// Sends `body` to the peer of `envelope`. A peer that does not read within the send timeout
    /// loses its reply rather than stalling everyone.
    ///
    /// # Errors
    /// [`TransportError::Timeout`] or [`TransportError::Socket`]; the server keeps working.
    pub async fn send(&mut self, envelope: Envelope, body: Vec<u8>) -> Result<(), TransportError> {
        let mut frames = envelope.0;
        frames.push(Bytes::from(body));
        let message = ZmqMessage::try_from(frames).map_err(|_| TransportError::Closed)?;
        match timeout(self.send_timeout, self.send.send(message)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(TransportError::Socket {
                endpoint: String::new(),
                source,
            }),
            Err(_) => Err(TransportError::Timeout {
                endpoint: String::new(),
                timeout: self.send_timeout,
            }),
        }
    }
}

/// The broadcast socket of the router.
pub struct Publisher {
    socket: PubSocket,
    endpoint: String,
}

impl Publisher {
    /// Binds `endpoint`.
    ///
    /// # Errors
    /// [`TransportError::Bind`] when the endpoint cannot be bound.
    pub async fn bind(endpoint: &str) -> Result<Self, TransportError> {
        let mut socket = PubSocket::new();
        let bound = socket
            .bind(endpoint)
            .await
            .map_err(|source| TransportError::Bind {
                endpoint: endpoint.to_owned(),
                source,
            })?;
        Ok(Self {
            socket,
            endpoint: bound.to_string(),
        })
    }

    /// The endpoint actually bound.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Broadcasts `event` as one string frame.
    ///
    /// # Errors
    /// [`TransportError::Socket`] when the socket fails.
    pub async fn publish(&mut self, event: &Event) -> Result<(), TransportError> {
        trace!(%event, "publish");
        self.socket
            .send(ZmqMessage::from(event.to_string()))
            .await
            .map_err(|source| TransportError::Socket {
                endpoint: self.endpoint.clone(),
                source,
            })
    }
}

// ---------------------------------------------------------------------------------------------
// Client side

/// Timeouts of client sockets.
#[derive(Debug, Clone, Copy)]
pub struct ClientOptions {
    /// How long to wait for the router to accept a connection.
    pub connect_timeout: Duration,
    /// How long to wait for a reply.
    pub request_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// A client of the router's API: one request at a time, with bounded waits.
///
/// It owns its REQ socket and rebuilds it on the next request after any error or timeout.
pub struct ApiClient {
    endpoint: String,
    options: ClientOptions,
    socket: Option<ReqSocket>,
    token: Option<String>,
}

impl ApiClient {
    /// A client of `endpoint`; it connects on the first request.
    pub fn new(endpoint: impl Into<String>, options: ClientOptions) -> Self {
        Self {
            endpoint: endpoint.into(),
            options,
            socket: None,
            token: None,
        }
    }

    /// Sends `token` with every request (for a router that requires a cluster token).
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token.filter(|t| !t.is_empty());
        self
    }

    /// A client that is connected already.
    ///
    /// # Errors
    /// [`TransportError::Connect`] when the router does not answer within the connect timeout.
    pub async fn connect(
        endpoint: impl Into<String>,
        options: ClientOptions,
    ) -> Result<Self, TransportError> {
        let mut client = Self::new(endpoint, options);
        client.ensure_connected().await?;
        Ok(client)
    }

    /// The router endpoint.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    async fn ensure_connected(&mut self) -> Result<&mut ReqSocket, TransportError> {
        if self.socket.is_none() {
            let mut options = SocketOptions::default();
            options.connect_timeout(self.options.connect_timeout);
            let mut socket = ReqSocket::with_options(options);
            // The crate's own timeout covers the retries; ours also bounds a hung handshake.
            let limit = self.options.connect_timeout + Duration::from_millis(500);
            match timeout(limit, socket.connect(&self.endpoint)).await {
                Ok(Ok(())) => {}
                Ok(Err(ZmqError::ConnectTimeout(_))) | Err(_) => {
                    return Err(TransportError::Connect {
                        endpoint: self.endpoint.clone(),
                        timeout: self.options.connect_timeout,
                    })
                }
                Ok(Err(source)) => {
                    return Err(TransportError::ConnectFailed {
                        endpoint: self.endpoint.clone(),
                        source,
                    })
                }
            }
            self.socket = Some(socket);
        }
        // Set just above.
        self.socket.as_mut().ok_or(TransportError::Closed)
    }

    /// Sends one request frame and returns the reply frame.
    ///
    /// # Errors
    /// Any [`TransportError`]; the socket is then rebuilt on the next call.
    pub async fn request_bytes(&mut self, body: Vec<u8>) -> Result<Bytes, TransportError> {
        let limit = self.options.request_timeout;
        self.request_bytes_within(body, limit).await
    }

    async fn request_bytes_within(
        &mut self,
        body: Vec<u8>,
        request_timeout: Duration,
    ) -> Result<Bytes, TransportError> {
        let result = self.exchange(body, request_timeout).await;
        if result.is_err() {
            // A REQ that lost its reply can never send again: start afresh next time.
            self.socket = None;
        }
        result
    }

    async fn exchange(
        &mut self,
        body: Vec<u8>,
        request_timeout: Duration,
    ) -> Result<Bytes, TransportError> {
        let endpoint = self.endpoint.clone();
        let socket = self.ensure_connected().await?;
        let socket_err = |source| TransportError::Socket {
            endpoint: endpoint.clone(),
            source,
        };
        let exchange = async {
            socket
                .send(ZmqMessage::from(body))
                .await
                .map_err(socket_err)?;
            socket.recv().await.map_err(socket_err)
        };
        let reply =
            timeout(request_timeout, exchange)
                .await
                .map_err(|_| TransportError::Timeout {
                    endpoint: endpoint.clone(),
                    timeout: request_timeout,
                })??;
        let frames = reply.len();
        match reply.into_vec().pop() {
            Some(frame) if frames == 1 => Ok(frame),
            _ => Err(TransportError::BadReply { endpoint, frames }),
        }
    }

    /// Sends a request and returns the reply frame.
    ///
    /// # Errors
    /// As [`ApiClient::request_bytes`].
    pub async fn request(&mut self, request: &Request) -> Result<Bytes, TransportError> {
        let limit = self.options.request_timeout;
        self.request_within(request, limit).await
    }

    /// As [`ApiClient::request`], for a request the router may hold up to `wait` before
    /// answering (on top of the request timeout).
    async fn request_waiting(
        &mut self,
        request: &Request,
        wait: Duration,
    ) -> Result<Bytes, TransportError> {
        let limit = self.options.request_timeout + wait;
        self.request_within(request, limit).await
    }

    async fn request_within(
        &mut self,
        request: &Request,
        request_timeout: Duration,
    ) -> Result<Bytes, TransportError> {
        let body = match &self.token {
            None => request.encode(),
            Some(token) => {
                let mut value = serde_json::to_value(request).unwrap_or_default();
                if let Some(map) = value.as_object_mut() {
                    map.insert(
                        crate::protocol::request::CLUSTER_TOKEN.into(),
                        token.clone().into(),
                    );
                }
                serde_json::to_vec(&value).unwrap_or_default()
            }
        };
        self.request_bytes_within(body, request_timeout).await
    }

    /// `batch`: sends `requests` in one round trip; returns one reply per request, in order,
    /// to read with the `_value` decoders of [`crate::protocol::reply`].
    ///
    /// # Errors
    /// Transport failures, a refusal of the whole batch, or a reply that does not hold one
    /// reply per request.
    pub async fn batch(
        &mut self,
        requests: &[Request],
    ) -> Result<Vec<serde_json::Value>, ClientError> {
        let batch = Request::Batch(crate::protocol::Batch::of(requests));
        let reply = self.request(&batch).await?;
        let replies = decode_batch_reply(&reply)?;
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
        Ok(decode_job_reply(&reply)?)
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
        Ok(decode_jobs_reply(&reply)?)
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
        };
        let reply = self.request_waiting(&Request::GetJobs(get), wait).await?;
        Ok(decode_jobs_reply(&reply)?)
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
        };
        let reply = self
            .request_waiting(&Request::GetPipelines(get), wait)
            .await?;
        Ok(decode_pipelines_reply(&reply)?)
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
        let mut fields = serde_json::Map::new();
        if let Some(id) = request_id {
            fields.insert("request id".into(), id.into());
        }
        let request = Request::AddPipeline(NewPipeline {
            pipeline: pipeline.to_legacy(),
            fields,
        });
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
        Ok(decode_pipeline_reply(&reply)?)
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
        Ok(decode_pipelines_reply(&reply)?)
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
        let reply = self
            .request(&Request::PipelineStatus(PipelineStatusQuery {
                pipeline_ids,
            }))
            .await?;
        let answer = expect_answer(&reply, AnswerKind::Status)?;
        Ok(answer.pipelines.unwrap_or_default())
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

/// Connects a daemon to the router, waiting (with backoff, logging what it waits for) until
/// the router answers `get configuration`. Returns the client, a subscriber to `prefixes`, and
/// the cluster configuration; `None` if `shutdown` fires first.
pub async fn wait_for_router(
    api: &str,
    broadcast: &str,
    prefixes: &[&str],
    options: ClientOptions,
    token: Option<String>,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Option<(
    ApiClient,
    Subscriber,
    serde_json::Map<String, serde_json::Value>,
)> {
    let mut client = ApiClient::new(api, options).with_token(token);
    let mut backoff = Duration::from_millis(100);
    let mut attempt = 0u32;
    loop {
        let attempt_result = async {
            let configuration = client.get_configuration().await?;
            let subscriber =
                Subscriber::connect(broadcast, prefixes, options.connect_timeout).await?;
            Ok::<_, ClientError>((subscriber, configuration))
        };
        let outcome = tokio::select! {
            () = shutdown.cancelled() => return None,
            outcome = attempt_result => outcome,
        };
        match outcome {
            Ok((subscriber, configuration)) => {
                tracing::info!(api, broadcast, "connected to the router");
                return Some((client, subscriber, configuration));
            }
            Err(e) => {
                attempt += 1;
                if attempt == 1 || attempt.is_multiple_of(10) {
                    tracing::warn!(api, broadcast, error = %e, "waiting for the router");
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// A subscriber to the router's broadcasts, filtering by prefix.
pub struct Subscriber {
    socket: SubSocket,
    endpoint: String,
    pending: VecDeque<Event>,
}

impl Subscriber {
    /// Connects to `endpoint` and subscribes to each prefix (see the prefixes on [`Event`]).
    ///
    /// The subscription may take a moment to reach the router; use
    /// [`Subscriber::wait_live`] before relying on it.
    ///
    /// # Errors
    /// [`TransportError::Connect`] when the router does not answer within `connect_timeout`.
    pub async fn connect(
        endpoint: &str,
        prefixes: &[&str],
        connect_timeout: Duration,
    ) -> Result<Self, TransportError> {
        let mut options = SocketOptions::default();
        options.connect_timeout(connect_timeout);
        let mut socket = SubSocket::with_options(options);
        match timeout(
            connect_timeout + Duration::from_millis(500),
            socket.connect(endpoint),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(ZmqError::ConnectTimeout(_))) | Err(_) => {
                return Err(TransportError::Connect {
                    endpoint: endpoint.to_owned(),
                    timeout: connect_timeout,
                })
            }
            Ok(Err(source)) => {
                return Err(TransportError::ConnectFailed {
                    endpoint: endpoint.to_owned(),
                    source,
                })
            }
        }
        let mut subscriber = Self {
            socket,
            endpoint: endpoint.to_owned(),
            pending: VecDeque::new(),
        };
        for prefix in prefixes {
            subscriber.subscribe(prefix).await?;
        }
        Ok(subscriber)
    }

    /// Adds a prefix.
    ///
    /// # Errors
    /// [`TransportError::Socket`] when the socket fails.
    pub async fn subscribe(&mut self, prefix: &str) -> Result<(), TransportError> {
        self.socket
            .subscribe(prefix)
            .await
            .map_err(|source| TransportError::Socket {
                endpoint: self.endpoint.clone(),
                source,
            })
    }

    /// Removes a prefix.
    ///
    /// # Errors
    /// [`TransportError::Socket`] when the socket fails.
    pub async fn unsubscribe(&mut self, prefix: &str) -> Result<(), TransportError> {
        self.socket
            .unsubscribe(prefix)
            .await
            .map_err(|source| TransportError::Socket {
                endpoint: self.endpoint.clone(),
                source,
            })
    }

    /// The next event. Strings that are no known event are skipped.
    ///
    /// Cancel-safe: dropping the future loses nothing.
    ///
    /// # Errors
    /// [`TransportError::Closed`] when the socket is shut down.
    pub async fn recv(&mut self) -> Result<Event, TransportError> {
        match self.pending.pop_front() {
            Some(event) => Ok(event),
            None => self.next_raw().await,
        }
    }

    /// An event that has arrived already, without waiting; `None` when there is none.
    ///
    /// It polls the receive once, in the caller's task (a zero timeout would not do: tokio
    /// rounds timer deadlines up to the next millisecond, so each call would wait ~1 ms).
    pub async fn try_recv(&mut self) -> Option<Result<Event, TransportError>> {
        let mut next = std::pin::pin!(self.recv());
        std::future::poll_fn(|cx| match std::future::Future::poll(next.as_mut(), cx) {
            std::task::Poll::Ready(received) => std::task::Poll::Ready(Some(received)),
            std::task::Poll::Pending => std::task::Poll::Ready(None),
        })
        .await
    }

    /// Waits until the subscription is live: asks the router to broadcast a probe until one
    /// arrives. Events that arrive meanwhile are kept for [`Subscriber::recv`].
    ///
    /// # Errors
    /// [`ClientError`] when the router cannot be asked, or [`TransportError::Timeout`] when no
    /// probe arrives within `limit`.
    pub async fn wait_live(
        &mut self,
        client: &mut ApiClient,
        limit: Duration,
    ) -> Result<(), ClientError> {
        let token = uuid::Uuid::new_v4().simple().to_string();
        self.subscribe(Event::PROBE).await?;
        let deadline = Instant::now() + limit;
        let mut retry = Duration::from_millis(20);
        let result = loop {
            if Instant::now() >= deadline {
                break Err(TransportError::Timeout {
                    endpoint: self.endpoint.clone(),
                    timeout: limit,
                }
                .into());
            }
            client.probe(&token).await?;
            let wait_until = (Instant::now() + retry).min(deadline);
            let mut seen = false;
            while let Ok(received) = tokio::time::timeout_at(wait_until, self.next_raw()).await {
                match received? {
                    Event::Probe { token: t } if t == token => {
                        seen = true;
                        break;
                    }
                    Event::Probe { .. } => {}
                    event => self.pending.push_back(event),
                }
            }
            if seen {
                break Ok(());
            }
            retry = (retry * 2).min(Duration::from_millis(500));
        };
        self.unsubscribe(Event::PROBE).await?;
        result
    }

    async fn next_raw(&mut self) -> Result<Event, TransportError> {
        loop {
            let message = match self.socket.recv().await {
                Ok(m) => m,
                Err(ZmqError::NoMessage) => return Err(TransportError::Closed),
                Err(e) => {
                    debug!(error = %e, "broadcast receive failed");
                    continue;
                }
            };
            let Some(frame) = message.get(0) else {
                continue;
            };
            match std::str::from_utf8(frame).ok().map(str::parse::<Event>) {
                Some(Ok(event)) => return Ok(event),
                _ => debug!(frame = %String::from_utf8_lossy(frame), "ignoring unknown broadcast"),
            }
        }
    }
}
