//! The pypelinin router: the hub of a cluster.
//!
//! It serves the API (REQ/REP-style JSON requests on a ROUTER socket) and broadcasts events
//! on a PUB socket; it holds the FIFO queues of jobs and pipelines. Brokers, pipeliners and
//! clients talk only to it.
//!
//! Layout:
//! - [`Router`]: binds the sockets ([`Router::bind`]) and serves until shutdown ([`Router::run`]).
//! - [`state`]: the queues and every transition a request makes on them (no I/O).
//! - [`settings`]: the router's own settings.
//! - [`cli`]: the command line shared by `pypelinin-router` and the example's `my_router`.
//!
//! Inside [`Router::run`], three tasks: the receive loop decodes requests and answers
//! malformed ones; the state task applies requests in batches (what arrived together is
//! handled together); the outbox task sends each batch's replies, then its broadcasts,
//! with a timeout per reply so one client that stops reading cannot stall the others.

pub mod cli;
pub mod settings;
pub mod state;

use std::time::Duration;

use pypelinin_common::protocol::{
    decode_request, Answer, AnswerKind, Event, Reply, Request, RequestError,
};
use pypelinin_common::transport::{ApiServer, Envelope, Publisher, Replier, TransportError};
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use settings::RouterSettings;
use state::State;

/// A failure that stops the router.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A socket could not be bound or failed for good.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// One of the router's tasks panicked.
    #[error("a router task failed")]
    Task(#[from] tokio::task::JoinError),
}

/// Requests handled together in one batch, at most.
const BATCH: usize = 512;

/// A router with its sockets bound, ready to [`run`](Router::run).
pub struct Router {
    api: ApiServer,
    publisher: Publisher,
    settings: RouterSettings,
    configuration: Map<String, Value>,
}

impl Router {
    /// Binds the API and broadcast endpoints of `settings` (port 0 picks a free port).
    /// `configuration` is what `get configuration` answers.
    ///
    /// # Errors
    /// [`Error::Transport`] when an endpoint cannot be bound.
    pub async fn bind(
        settings: RouterSettings,
        configuration: Map<String, Value>,
    ) -> Result<Self, Error> {
        let api = ApiServer::bind(&settings.api).await?;
        let publisher = Publisher::bind(&settings.broadcast).await?;
        Ok(Self {
            api,
            publisher,
            settings,
            configuration,
        })
    }

    /// The API endpoint actually bound.
    pub fn api_endpoint(&self) -> &str {
        self.api.endpoint()
    }

    /// The broadcast endpoint actually bound.
    pub fn broadcast_endpoint(&self) -> &str {
        self.publisher.endpoint()
    }

    /// Serves until `shutdown` is cancelled, then answers what it already received and returns.
    ///
    /// # Errors
    /// [`Error::Task`] if an internal task panicked.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let reply_timeout = Duration::from_millis(self.settings.reply_timeout_ms);
        let (mut receiver, replier) = self
            .api
            .split(self.settings.max_request_bytes, reply_timeout);
        let (request_tx, request_rx) = mpsc::channel::<(Envelope, Request)>(4 * BATCH);
        let (out_tx, out_rx) = mpsc::channel::<Outgoing>(64);
        let retention = Duration::from_secs_f64(self.settings.retention_secs.max(0.0));
        let state = State::new(self.configuration, retention);
        let state_task = tokio::spawn(state_loop(state, request_rx, out_tx.clone()));
        let outbox_task = tokio::spawn(outbox_loop(out_rx, replier, self.publisher));

        loop {
            let incoming = tokio::select! {
                () = shutdown.cancelled() => break,
                incoming = receiver.recv() => incoming,
            };
            let incoming = match incoming {
                Ok(incoming) => incoming,
                Err(TransportError::Closed) => break,
                Err(e) => {
                    debug!(error = %e, "receive failed for one peer");
                    continue;
                }
            };
            let decoded = incoming
                .body
                .map_err(RequestError::Malformed)
                .and_then(|body| decode_request(&body));
            match decoded {
                Ok(request) => {
                    if request_tx.send((incoming.envelope, request)).await.is_err() {
                        break;
                    }
                }
                Err(error) => {
                    debug!(peer = %incoming.envelope.peer(), %error, "rejected request");
                    let reply = error_reply(&error).encode();
                    let batch = Outgoing {
                        replies: vec![(incoming.envelope, reply)],
                        events: Vec::new(),
                    };
                    if out_tx.send(batch).await.is_err() {
                        break;
                    }
                }
            }
        }
        info!("router stopping");
        drop(request_tx);
        drop(out_tx);
        state_task.await?;
        outbox_task.await?;
        info!("router stopped");
        Ok(())
    }
}

/// The answer to a request that could not be decoded.
fn error_reply(error: &RequestError) -> Reply {
    let answer = match error {
        RequestError::Malformed(e) => Answer::error(AnswerKind::MalformedRequest, e.clone()),
        RequestError::UndefinedCommand => Answer::new(AnswerKind::UndefinedCommand),
        RequestError::UnknownCommand => Answer::new(AnswerKind::UnknownCommand),
        RequestError::Syntax(e) => Answer::error(AnswerKind::SyntaxError, e.clone()),
    };
    answer.into()
}

/// Replies and broadcasts of one batch, sent in that order.
struct Outgoing {
    replies: Vec<(Envelope, Vec<u8>)>,
    events: Vec<Event>,
}

async fn state_loop(
    mut state: State,
    mut requests: mpsc::Receiver<(Envelope, Request)>,
    out: mpsc::Sender<Outgoing>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    while requests.recv_many(&mut batch, BATCH).await > 0 {
        let now = std::time::Instant::now();
        state.purge(now);
        let mut outgoing = Outgoing {
            replies: Vec::with_capacity(batch.len()),
            events: Vec::new(),
        };
        for (envelope, request) in batch.drain(..) {
            debug!(command = request.command(), peer = %envelope.peer(), "request");
            let reply = state.handle(request, now, &mut outgoing.events);
            outgoing.replies.push((envelope, reply.encode()));
        }
        if out.send(outgoing).await.is_err() {
            break;
        }
    }
}

async fn outbox_loop(
    mut batches: mpsc::Receiver<Outgoing>,
    mut replier: Replier,
    mut publisher: Publisher,
) {
    while let Some(batch) = batches.recv().await {
        for (envelope, reply) in batch.replies {
            let peer = envelope.peer();
            if let Err(e) = replier.send(envelope, reply).await {
                warn!(%peer, error = %e, "reply dropped");
            }
        }
        for event in &batch.events {
            if let Err(e) = publisher.publish(event).await {
                warn!(%event, error = %e, "broadcast failed");
            }
        }
    }
}
