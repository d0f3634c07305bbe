//! The pypelinin router: the hub of a cluster.
//!
//! It serves the API (REQ/REP-style JSON requests on a ROUTER socket) and broadcasts events
//! on a PUB socket; it holds the FIFO queues of jobs and pipelines. Brokers, pipeliners and
//! clients talk only to it.
//!
//! Layout:
//! - [`Router`]: binds the sockets ([`Router::bind`]) and serves until shutdown ([`Router::run`]).
//! - [`state`]: the queues and every transition a request makes on them (no I/O).
//! - [`persist`]: the durable record (fjall), written once per group of batches before their replies.
//! - [`settings`]: the router's own settings.
//! - [`cli`]: the command line shared by `pypelinin-router` and the example's `my_router`.
//!
//! Inside [`Router::run`], three tasks: the receive loop decodes requests and answers
//! malformed ones; the state task applies requests in batches (what arrived together is
//! handled together); the outbox task sends each batch's replies, then its broadcasts,
//! with a timeout per reply so one client that stops reading cannot stall the others.

pub mod cli;
pub mod persist;
pub mod settings;
pub mod state;

use std::time::Duration;

use pypelinin_common::protocol::{
    decode_request_with_token, Answer, AnswerKind, Event, Reply, Request, RequestError,
};
use pypelinin_common::transport::{ApiServer, Envelope, Publisher, Replier, TransportError};
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, trace, warn};

use persist::{Durable, Index, PersistError, Writes};
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
    /// The durable record cannot be opened or written.
    #[error(transparent)]
    Persist(#[from] PersistError),
}

/// Requests handled together in one batch, at most.
const BATCH: usize = 512;

/// A router with its sockets bound, ready to [`run`](Router::run).
pub struct Router {
    api: ApiServer,
    publisher: Publisher,
    settings: RouterSettings,
    state: State,
    durable: Option<(Durable, Index)>,
}

impl Router {
    /// Binds the API and broadcast endpoints of `settings` (port 0 picks a free port).
    /// `configuration` is what `get configuration` answers.
    ///
    /// # Errors
    /// [`Error::Transport`] when an endpoint cannot be bound.
    ///
    /// With a `data_dir`, the state is restored from the durable record there, and every
    /// change is written to it before it is acknowledged.
    ///
    /// # Errors
    /// [`Error::Persist`] when the durable record cannot be opened (for instance another router
    /// uses it).
    pub async fn bind(
        settings: RouterSettings,
        configuration: Map<String, Value>,
    ) -> Result<Self, Error> {
        let policy = settings.policy();
        let (state, durable) = match &settings.data_dir {
            Some(dir) => {
                let dir = dir.clone();
                let cache_bytes = settings.durable_cache_mb.max(1) * 1024 * 1024;
                let (durable, loaded) =
                    tokio::task::spawn_blocking(move || Durable::open(&dir, cache_bytes)).await??;
                info!(
                    jobs = loaded.jobs.len(),
                    pipelines = loaded.pipelines.len(),
                    ended = loaded.ended.len(),
                    "restored the durable record"
                );
                let state = State::restore(
                    configuration,
                    policy,
                    loaded.jobs,
                    loaded.pipelines,
                    loaded.ended,
                );
                let mut index = loaded.index;
                index.reserve_ended(state::reserved_for(settings.max_remembered_pipelines));
                (state, Some((durable, index)))
            }
            None => (State::new(configuration, policy), None),
        };
        let api = ApiServer::bind(&settings.api).await?;
        let publisher = Publisher::bind(&settings.broadcast).await?;
        Ok(Self {
            api,
            publisher,
            settings,
            state,
            durable,
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
        let (commit_tx, commit_rx) = mpsc::channel::<Handled>(COMMIT_QUEUE);
        let (durable, index) = match self.durable {
            Some((durable, index)) => (Some(durable), Some(index)),
            None => (None, None),
        };
        // Without durability, batches go straight to the outbox (one task hop less).
        let (sink, commit_task) = match durable {
            Some(durable) => (
                Sink::Commit(commit_tx),
                Some({
                    let out = out_tx.clone();
                    tokio::task::spawn_blocking(move || commit_loop(&durable, commit_rx, &out))
                }),
            ),
            None => (Sink::Send(out_tx.clone()), None),
        };
        let state_task = tokio::spawn(state_loop(self.state, index, request_rx, sink));
        let token = self.settings.token.clone().filter(|t| !t.is_empty());
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
                .and_then(|body| decode_request_with_token(&body));
            let decoded = match decoded {
                Ok((_, sent)) if token.is_some() && sent != token => Err(None),
                Ok((request, _)) => Ok(request),
                Err(e) => Err(Some(e)),
            };
            match decoded {
                Ok(request) => {
                    if request_tx.send((incoming.envelope, request)).await.is_err() {
                        break;
                    }
                }
                Err(error) => {
                    let reply = match error {
                        Some(error) => {
                            debug!(peer = %incoming.envelope.peer(), %error, "rejected request");
                            Reply::for_error(&error).encode()
                        }
                        None => {
                            warn!(peer = %incoming.envelope.peer(), "request without the cluster token");
                            Reply::from(Answer::new(AnswerKind::Unauthorized)).encode()
                        }
                    };
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
        let state_result = state_task.await?;
        let commit_result = match commit_task {
            Some(task) => task.await?,
            None => Ok(()),
        };
        outbox_task.await?;
        info!("router stopped");
        state_result.and(commit_result)
    }
}

/// Replies and broadcasts of one batch, sent in that order.
struct Outgoing {
    replies: Vec<(Envelope, Vec<u8>)>,
    events: Vec<Event>,
}

/// Milliseconds since the Unix epoch: the state's clock (it survives restarts).
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How often leases, back-offs and retention are checked when no request comes.
const TICK: Duration = Duration::from_millis(100);

/// A batch the state task handled: the rows it changed and what to send once they are on disk.
struct Handled {
    writes: Option<Writes>,
    outgoing: Outgoing,
}

/// Handled batches waiting for the durable write, at most: the state task handles the next
/// batches while one is written (the two overlap), and waits when the disk falls this far
/// behind.
const COMMIT_QUEUE: usize = 8;

/// Handled batches written in one transaction, at most.
const COMMIT_GROUP: usize = 64;

/// Where the state task hands handled batches.
enum Sink {
    /// To the committer (durable router).
    Commit(mpsc::Sender<Handled>),
    /// Straight to the outbox (in-memory router).
    Send(mpsc::Sender<Outgoing>),
}

/// Applies requests in batches; hands each batch's changed rows and replies to the committer.
async fn state_loop(
    mut state: State,
    mut index: Option<Index>,
    mut requests: mpsc::Receiver<(Envelope, Request)>,
    sink: Sink,
) -> Result<(), Error> {
    let mut batch = Vec::with_capacity(BATCH);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            received = requests.recv_many(&mut batch, BATCH) => {
                if received == 0 {
                    return Ok(());
                }
            }
            _ = tick.tick() => {}
        }
        let now = now_ms();
        let mut outgoing = Outgoing {
            replies: Vec::with_capacity(batch.len()),
            events: Vec::new(),
        };
        state.tick(now, &mut outgoing.events);
        for (envelope, request) in batch.drain(..) {
            trace!(command = request.command(), peer = %envelope.peer(), "request");
            let reply = state.handle(request, now, &mut outgoing.events);
            outgoing.replies.push((envelope, reply.encode()));
        }
        coalesce_wake_ups(&mut outgoing.events);
        let changes = state.take_changes();
        let writes = match &mut index {
            Some(index) => Some(Durable::prepare(index, &state, &changes)?),
            None => None,
        };
        let nothing = outgoing.replies.is_empty()
            && outgoing.events.is_empty()
            && writes.as_ref().is_none_or(Writes::is_empty);
        if nothing {
            continue;
        }
        let sent = match &sink {
            Sink::Commit(commits) => commits.send(Handled { writes, outgoing }).await.is_ok(),
            Sink::Send(out) => out.send(outgoing).await.is_ok(),
        };
        if !sent {
            // The committer stopped on a failed write; it reports the error.
            return Ok(());
        }
    }
}

/// Group commit: writes the rows of every handled batch waiting (one write batch), and only
/// then lets their replies and broadcasts go, in order. Runs on a thread of its own (a blocking
/// task) for the router's life: a batch reaches the disk without a hop through the runtime.
fn commit_loop(
    durable: &Durable,
    mut handled: mpsc::Receiver<Handled>,
    out: &mpsc::Sender<Outgoing>,
) -> Result<(), Error> {
    let mut group = Vec::with_capacity(COMMIT_GROUP);
    while let Some(first) = handled.blocking_recv() {
        group.push(first);
        while group.len() < COMMIT_GROUP {
            match handled.try_recv() {
                Ok(h) => group.push(h),
                Err(_) => break,
            }
        }
        let writes: Vec<Writes> = group
            .iter_mut()
            .filter_map(|h| h.writes.take())
            .filter(|w| !w.is_empty())
            .collect();
        if !writes.is_empty() {
            let (batches, rows) = (writes.len(), writes.iter().map(Writes::len).sum::<usize>());
            let started = std::time::Instant::now();
            let written = durable.write_all(&writes);
            debug!(
                batches,
                rows,
                micros = started.elapsed().as_micros() as u64,
                "group commit"
            );
            if let Err(e) = written {
                error!(error = %e, "cannot write the durable record; stopping without acknowledging");
                return Err(e.into());
            }
        }
        for h in group.drain(..) {
            if out.blocking_send(h.outgoing).is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Keeps one `new job` and one `new pipeline` per batch: they only wake brokers and pipeliners,
/// which then ask until the queue is empty (the legacy ones too), so more of them within one
/// batch would only cost every subscriber a wake-up.
fn coalesce_wake_ups(events: &mut Vec<Event>) {
    let (mut new_job, mut new_pipeline) = (false, false);
    events.retain(|event| match event {
        Event::NewJob => !std::mem::replace(&mut new_job, true),
        Event::NewPipeline => !std::mem::replace(&mut new_pipeline, true),
        _ => true,
    });
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
