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
//! - [`metrics`]: Prometheus metrics over HTTP (`--metrics`), from snapshots of the state.
//!
//! Inside [`Router::run`]: the receive loop decodes requests and answers malformed ones; the
//! state task applies requests in batches (what arrived together is handled together) and keeps
//! the requests that wait for work (`get jobs` with `wait ms`); a durable router's committer
//! thread writes each group of batches to disk; the outbox task then sends their replies and
//! broadcasts. The outbox never waits for a peer: a reply whose peer's queue is full is sent
//! from a task of its own, and dropped after the reply timeout. Work handed to a waiting
//! request whose reply cannot be delivered goes back to the state task, which queues it again.
//! `run` watches every task and stops at once, with the error, when one ends unexpectedly (a
//! committer that could not write, say).

pub mod cli;
pub mod metrics;
pub mod persist;
pub mod settings;
pub mod state;

use std::time::Duration;

use pypelinin_common::daemon::telemetry::Throttle;
use pypelinin_common::protocol::{
    Answer, AnswerKind, Event, Reply, Request, RequestError, RequestFrame,
};
use pypelinin_common::transport::guard::GuardLimits;
use pypelinin_common::transport::{ApiServer, Envelope, Publisher, Replier, TransportError};
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, trace, warn};

use persist::{Durable, Index, OpenOptions, PersistError, Writes};
use pypelinin_common::ids::{JobId, PipelineId};
pub use settings::RouterSettings;
use state::{Served, State};
use std::collections::HashMap;

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
    /// A setting cannot be used.
    #[error("invalid settings: {0}")]
    Settings(String),
    /// One of the router's tasks ended while the router was serving.
    #[error("a router task ended unexpectedly")]
    TaskEnded,
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
    metrics: Option<Metrics>,
}

/// The metrics server's side in the router: its address and the scrapes it asks for.
struct Metrics {
    server: metrics::Server,
    scrapes: mpsc::Receiver<metrics::ScrapeRequest>,
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
        if settings.token.as_deref() == Some("") {
            return Err(Error::Settings(
                "the cluster token is empty: set a long random string, or remove it to run \
                 without a token"
                    .into(),
            ));
        }
        let policy = settings.policy();
        let (state, durable) = match &settings.data_dir {
            Some(dir) => {
                let dir = dir.clone();
                let options = OpenOptions {
                    cache_bytes: settings.durable_cache_mb.max(1) * 1024 * 1024,
                    accept_loss: settings.accept_loss,
                    min_free_bytes: settings.min_free_disk_mb.saturating_mul(1024 * 1024),
                };
                let (durable, loaded) =
                    tokio::task::spawn_blocking(move || Durable::open(&dir, &options)).await??;
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
                (state, Some((durable, loaded.index)))
            }
            None => (State::new(configuration, policy), None),
        };
        let limits = GuardLimits::api(settings.max_request_bytes);
        let api = ApiServer::bind_with(&settings.api, limits).await?;
        let publisher = Publisher::bind(&settings.broadcast).await?;
        let metrics = match &settings.metrics {
            Some(address) => {
                let (tx, scrapes) = mpsc::channel(16);
                let server = metrics::serve(address, tx).map_err(Error::Settings)?;
                Some(Metrics { server, scrapes })
            }
            None => None,
        };
        Ok(Self {
            api,
            publisher,
            settings,
            state,
            durable,
            metrics,
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

    /// Where metrics are served (`GET /metrics`), when they are.
    pub fn metrics_address(&self) -> Option<std::net::SocketAddr> {
        self.metrics.as_ref().map(|m| m.server.address)
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
        let (out_tx, out_rx) = mpsc::channel::<Outgoing>(OUTBOX_QUEUE);
        // Bounded by the waiting requests (one reply each).
        let (back_tx, back_rx) = mpsc::unbounded_channel::<Handout>();
        let (durable, index) = match self.durable {
            Some((durable, index)) => (Some(durable), Some(index)),
            None => (None, None),
        };
        let mut tasks = tokio::task::JoinSet::new();
        // The metrics server stops when `run` returns (and drops it).
        let (_metrics_server, scrapes) = match self.metrics {
            Some(m) => (Some(m.server), Some(m.scrapes)),
            None => (None, None),
        };
        let commit_stats =
            (scrapes.is_some() && durable.is_some()).then(metrics::SharedCommitStats::default);
        // A durable router hands each batch to the committer, which writes it and then passes
        // it to the outbox; without durability batches go straight to the outbox.
        let sink = match durable {
            Some(durable) => {
                let (commit_tx, commit_rx) = mpsc::channel::<Handled>(COMMIT_QUEUE);
                let outbox = out_tx.clone();
                let stats = commit_stats.clone();
                tasks.spawn_blocking(move || {
                    commit_loop(&durable, commit_rx, &outbox, stats.as_ref())
                });
                Sink::Commit(commit_tx)
            }
            None => Sink::Send(out_tx.clone()),
        };
        let observers = Observers {
            scrapes,
            commit_stats,
        };
        tasks.spawn(state_loop(
            self.state, index, request_rx, back_rx, sink, observers,
        ));
        tasks.spawn(outbox_loop(out_rx, replier, self.publisher, back_tx));
        let token = self.settings.token.clone();
        let mut unauthorized_log = Throttle::new(Duration::from_secs(10));

        // Set when a task ended before the router was asked to stop: it failed.
        let mut ended_early = None;
        loop {
            let incoming = tokio::select! {
                () = shutdown.cancelled() => break,
                ended = tasks.join_next() => {
                    ended_early = ended;
                    break;
                }
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
            let body = incoming.body;
            let decoded = match &body {
                Ok(body) => RequestFrame::read(body),
                Err(e) => Err(RequestError::Malformed(e.clone())),
            };
            // With a cluster token, nothing of a request is looked at before its token: any
            // frame without the right one, well-formed or not, is unauthorized.
            let decoded = match (&token, decoded) {
                (Some(expected), frame)
                    if !frame
                        .as_ref()
                        .is_ok_and(|f| same_token(f.token(), expected)) =>
                {
                    if let Some(suppressed) = unauthorized_log.allow() {
                        warn!(peer = %incoming.envelope.peer(), suppressed, "request without the right cluster token");
                    }
                    Err(None)
                }
                (_, Ok(frame)) => frame.decode().map_err(Some),
                (_, Err(e)) => Err(Some(e)),
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
                        None => Reply::from(Answer::new(AnswerKind::Unauthorized)).encode(),
                    };
                    let batch = Outgoing {
                        replies: vec![(incoming.envelope, reply, Handout::default())],
                        events: Vec::new(),
                    };
                    if out_tx.send(batch).await.is_err() {
                        break;
                    }
                }
            }
        }
        if ended_early.is_some() {
            error!("a router task ended unexpectedly; stopping");
        } else {
            info!("router stopping");
        }
        drop(request_tx);
        drop(out_tx);
        // Every task ends once the one before it in the chain has: the state task when the
        // requests end, the committer when the state task is gone, the outbox after both.
        let early = ended_early.is_some();
        let mut result = Ok(());
        let mut ended = ended_early;
        loop {
            let outcome = match ended.take() {
                Some(outcome) => outcome,
                None => match tasks.join_next().await {
                    Some(outcome) => outcome,
                    None => break,
                },
            };
            let failure = match outcome {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e,
                Err(e) => Error::Task(e),
            };
            error!(error = %failure, "router task failed");
            if result.is_ok() {
                result = Err(failure);
            }
        }
        if early && result.is_ok() {
            // The task that ended first said nothing of why; the router cannot go on without it.
            result = Err(Error::TaskEnded);
        }
        if result.is_ok() {
            info!("router stopped");
        }
        result
    }
}

/// Whether `sent` is the cluster token, compared in constant time (the time taken does not
/// tell how much of a guess was right).
fn same_token(sent: Option<&str>, expected: &str) -> bool {
    use subtle::ConstantTimeEq;
    sent.is_some_and(|sent| bool::from(sent.as_bytes().ct_eq(expected.as_bytes())))
}

/// Replies and broadcasts of one batch, sent in that order.
struct Outgoing {
    replies: Vec<(Envelope, Vec<u8>, Handout)>,
    events: Vec<Event>,
}

/// What a reply to a waiting request hands out: taken back if the reply cannot be delivered.
/// (Empty for every other reply: a client that asks and leaves at once loses its jobs to their
/// lease, as with any lost reply.)
#[derive(Debug, Default)]
struct Handout {
    jobs: Vec<JobId>,
    pipelines: Vec<PipelineId>,
}

impl Handout {
    fn of(reply: &Reply) -> Self {
        match reply {
            Reply::Jobs(jobs) => Self {
                jobs: jobs.iter().map(|j| j.job_id.clone()).collect(),
                pipelines: Vec::new(),
            },
            Reply::Pipelines(pipelines) => Self {
                jobs: Vec::new(),
                pipelines: pipelines.iter().map(|p| p.pipeline_id.clone()).collect(),
            },
            _ => Self::default(),
        }
    }

    fn is_empty(&self) -> bool {
        self.jobs.is_empty() && self.pipelines.is_empty()
    }
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
    /// Whether its replies wait for the rows to be on disk: see [`needs_sync`].
    sync: bool,
}

/// Whether the reply to `request` must wait until what it changed is on disk. An answer that
/// acknowledges a change (a job or pipeline added, a report taken, a cancellation) does. A
/// hand-out (`get job`, `get pipelines`, ...), a renewal or a question does not: if the router
/// stops before those rows reach the disk, the restart finds the work queued and hands it out
/// again, which a lease that ends does anyway. So a lone client that alternates `add job` and
/// `get job`, as the original's daemons do, waits for the disk half as often.
fn needs_sync(request: &Request) -> bool {
    match request {
        Request::Batch(b) => !b
            .commands()
            .all(|c| c.is_some_and(|c| NO_SYNC.contains(&&*c))),
        other => !NO_SYNC.contains(&other.command()),
    }
}

/// The commands whose answers need not wait for the disk (see [`needs_sync`]), by name: the
/// same list serves a request and the requests of a batch.
const NO_SYNC: &[&str] = &[
    "get configuration",
    "get job",
    "get jobs",
    "get pipeline",
    "get pipelines",
    "renew leases",
    "job status",
    "pipeline status",
    "cluster status",
    "list pipelines",
    "probe",
];

/// Whether broadcasting `event` tells of a change that must be on disk first: an end.
fn is_end(event: &Event) -> bool {
    matches!(
        event,
        Event::JobFinished { .. }
            | Event::JobFailed { .. }
            | Event::PipelineFinished { .. }
            | Event::PipelineFailed { .. }
            | Event::PipelineCancelled { .. }
    )
}

/// Handled batches waiting for the durable write, at most: the state task handles the next
/// batches while one is written (the two overlap), and waits when the disk falls this far
/// behind.
const COMMIT_QUEUE: usize = 8;

/// Handled batches written in one transaction, at most.
const COMMIT_GROUP: usize = 64;

/// Batches waiting for the outbox, at most.
const OUTBOX_QUEUE: usize = 64;

/// Where the state task hands handled batches.
enum Sink {
    /// To the committer (durable router).
    Commit(mpsc::Sender<Handled>),
    /// Straight to the outbox (in-memory router).
    Send(mpsc::Sender<Outgoing>),
}

/// What looks at the state from outside the request path: metrics scrapes.
struct Observers {
    /// Scrapes asking for a snapshot (with `--metrics`).
    scrapes: Option<mpsc::Receiver<metrics::ScrapeRequest>>,
    /// The committer's figures, for the snapshots.
    commit_stats: Option<metrics::SharedCommitStats>,
}

impl Observers {
    /// The next scrape; never, without metrics.
    async fn scrape(&mut self) -> Option<metrics::ScrapeRequest> {
        match &mut self.scrapes {
            Some(scrapes) => scrapes.recv().await,
            None => std::future::pending().await,
        }
    }
}

/// Applies requests in batches; hands each batch's changed rows and replies to the committer.
/// Requests that wait for work are kept here (their envelopes by ticket) and answered in the
/// batch that queues work for them, or once their wait is over (checked every [`TICK`]).
async fn state_loop(
    mut state: State,
    mut index: Option<Index>,
    mut requests: mpsc::Receiver<(Envelope, Request)>,
    mut taken_back: mpsc::UnboundedReceiver<Handout>,
    sink: Sink,
    mut observers: Observers,
) -> Result<(), Error> {
    let mut batch = Vec::with_capacity(BATCH);
    let mut back = Vec::new();
    let mut waiting: HashMap<u64, Envelope> = HashMap::new();
    let mut next_ticket = 0u64;
    let mut served = Vec::new();
    let mut stopping = false;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            received = requests.recv_many(&mut batch, BATCH) => {
                stopping = received == 0;
            }
            received = taken_back.recv_many(&mut back, BATCH) => {
                if received == 0 {
                    // The outbox is gone: the router is stopping.
                    stopping = true;
                }
            }
            _ = tick.tick() => {}
            Some(scrape) = observers.scrape() => {
                let snapshot = metrics::Snapshot::of(&state, now_ms(), observers.commit_stats.as_ref());
                // Room for one, and asked for once: never waits.
                let _ = scrape.try_send(snapshot);
                continue;
            }
        }
        let now = now_ms();
        let mut outgoing = Outgoing {
            replies: Vec::with_capacity(batch.len()),
            events: Vec::new(),
        };
        state.tick(now, &mut outgoing.events);
        for handout in back.drain(..) {
            state.take_back(&handout.jobs, &handout.pipelines, &mut outgoing.events);
        }
        let mut sync = false;
        for (envelope, request) in batch.drain(..) {
            trace!(command = request.command(), peer = %envelope.peer(), "request");
            sync = sync || needs_sync(&request);
            match state.handle_or_wait(next_ticket, request, now, &mut outgoing.events) {
                Some(reply) => {
                    outgoing
                        .replies
                        .push((envelope, reply.encode(), Handout::default()))
                }
                None => {
                    waiting.insert(next_ticket, envelope);
                    next_ticket += 1;
                }
            }
        }
        if stopping {
            state.stop_waiting(&mut served);
        } else {
            state.serve_waiting(now, &mut served);
        }
        for Served { ticket, reply } in served.drain(..) {
            if let Some(envelope) = waiting.remove(&ticket) {
                outgoing
                    .replies
                    .push((envelope, reply.encode(), Handout::of(&reply)));
            }
        }
        coalesce_wake_ups(&mut outgoing.events);
        let sync = sync || outgoing.events.iter().any(is_end);
        let changes = state.take_changes();
        let writes = match &mut index {
            Some(index) => Some(Durable::prepare(index, &state, &changes)?),
            None => None,
        };
        let nothing = outgoing.replies.is_empty()
            && outgoing.events.is_empty()
            && writes.as_ref().is_none_or(Writes::is_empty);
        if !nothing {
            let sent = match &sink {
                Sink::Commit(commits) => commits
                    .send(Handled {
                        writes,
                        outgoing,
                        sync,
                    })
                    .await
                    .is_ok(),
                Sink::Send(out) => out.send(outgoing).await.is_ok(),
            };
            if !sent {
                // The committer stopped on a failed write; it reports the error.
                return Ok(());
            }
        }
        if stopping {
            return Ok(());
        }
    }
}

/// Group commit: writes the rows of every handled batch waiting (one write batch), and only
/// then hands their replies and broadcasts to the outbox, in order. Runs on a thread of its own
/// (a blocking task) for the router's life; it only writes, so a peer that stops reading never
/// delays a commit.
fn commit_loop(
    durable: &Durable,
    mut handled: mpsc::Receiver<Handled>,
    outbox: &mpsc::Sender<Outgoing>,
    stats: Option<&metrics::SharedCommitStats>,
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
            // One synced write when any batch of the group needs it (the batches before it
            // reach the disk with it, in order), else the journal alone.
            let sync = group.iter().any(|h| h.sync);
            let written = durable.write_all_with(&writes, sync);
            if let Some(stats) = stats {
                if let Ok(mut stats) = stats.lock() {
                    stats.seconds.observe(started.elapsed().as_secs_f64());
                    stats.rows.observe(rows as f64);
                }
            }
            debug!(
                batches,
                rows,
                micros = started.elapsed().as_micros() as u64,
                "group commit"
            );
            if let Err(e) = written {
                error!(error = %e, "cannot write the durable record; answering unavailable and stopping");
                // This group, and the batches behind it, are not acknowledged: each of their
                // requests is answered `unavailable` (its sender asks again, of the restarted
                // router) and nothing is broadcast. (A failed sync may still leave the group in
                // the journal: the same doubt as a lost reply.)
                while let Ok(h) = handled.try_recv() {
                    group.push(h);
                }
                let answer = Reply::from(Answer::error(
                    AnswerKind::Unavailable,
                    format!("cannot write the durable record: {e}"),
                ))
                .encode();
                for h in group.drain(..) {
                    let replies = h
                        .outgoing
                        .replies
                        .into_iter()
                        .map(|(envelope, _, _)| (envelope, answer.clone(), Handout::default()))
                        .collect();
                    let unavailable = Outgoing {
                        replies,
                        events: Vec::new(),
                    };
                    if outbox.blocking_send(unavailable).is_err() {
                        break;
                    }
                }
                return Err(e.into());
            }
        }
        for h in group.drain(..) {
            if outbox.blocking_send(h.outgoing).is_err() {
                // The outbox is gone: the router is stopping.
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

/// Sends what the state task handed over (through the committer, for a durable router), batch
/// by batch, in order.
async fn outbox_loop(
    mut batches: mpsc::Receiver<Outgoing>,
    replier: Replier,
    mut publisher: Publisher,
    taken_back: mpsc::UnboundedSender<Handout>,
) -> Result<(), Error> {
    while let Some(batch) = batches.recv().await {
        deliver(batch, &replier, &mut publisher, &taken_back).await;
    }
    Ok(())
}

/// Sends the replies of `batch`, then its broadcasts, never waiting for a peer that does not
/// read (its reply is dropped after the reply timeout, as a libzmq high-water mark would; the
/// peer's request times out and it asks again). Work handed to a waiting request whose reply
/// cannot be delivered goes to `taken_back`.
async fn deliver(
    batch: Outgoing,
    replier: &Replier,
    publisher: &mut Publisher,
    taken_back: &mpsc::UnboundedSender<Handout>,
) {
    for (envelope, reply, handout) in batch.replies {
        let peer = envelope.peer();
        let taken_back = taken_back.clone();
        replier.send_detached(envelope, reply, move |e| {
            if handout.is_empty() {
                warn!(%peer, error = %e, "reply dropped");
            } else {
                warn!(%peer, error = %e, jobs = handout.jobs.len(), pipelines = handout.pipelines.len(),
                        "a waiting request is gone; queueing what it was handed again");
                // The state task is gone only when the router stops.
                let _ = taken_back.send(handout);
            }
        });
    }
    for event in &batch.events {
        if let Err(e) = publisher.publish(event).await {
            warn!(%event, error = %e, "broadcast failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pypelinin_common::protocol::request::{GetJobs, NewJob, RenewLeases};
    use pypelinin_common::protocol::Batch;

    #[test]
    fn only_answers_that_acknowledge_a_change_wait_for_the_disk() {
        let add = Request::AddJob(NewJob::new("W", serde_json::json!(null)));
        let get = Request::GetJobs(GetJobs::new(None, 4));
        let renew = Request::RenewLeases(RenewLeases::default());
        assert!(needs_sync(&add));
        assert!(!needs_sync(&get));
        assert!(!needs_sync(&Request::GetPipeline));
        assert!(!needs_sync(&renew));
        // A batch waits when any of its requests does.
        assert!(!needs_sync(&Request::Batch(Batch::of([&get, &renew]))));
        assert!(needs_sync(&Request::Batch(Batch::of([&get, &add]))));
        // A broadcast of an end waits too (an end found by the clock: a deadline).
        assert!(is_end(&Event::PipelineCancelled {
            pipeline_id: "p".into()
        }));
        assert!(!is_end(&Event::NewJob));
    }
}
