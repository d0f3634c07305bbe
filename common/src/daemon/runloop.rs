//! The loop the broker and the pipeliner share: everything about talking to the router, around
//! a [`Machine`] that holds what the daemon does.
//!
//! The loop owns the connection, the request that waits at the router for work while the
//! daemon is idle (on a second connection, so other requests go out meanwhile), the back-off
//! while the router is unreachable, lease renewal, the broadcast subscription, the periodic
//! poll and the grace period of a stop. Each turn it sends, in one `batch`, the requests the
//! machine has queued, a `renew leases` when one is due and a request for work when the
//! machine has room; it hands every reply, event and note back to the machine.
//!
//! A [`Machine`] does no I/O on the router: events, replies and notes go in, requests come out,
//! so the broker's and the pipeliner's logic is tested without sockets.

use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::config::{secs, ConfigError};
use crate::protocol::cluster::Peer;
use crate::protocol::reply::expect_answer_value;
use crate::protocol::request::{Ask, RenewLeases, Settled};
use crate::protocol::{Answer, AnswerKind, Event, ReplyError, Request};
use crate::transport::{
    ApiClient, Backoff, ClientError, ClientOptions, Subscriber, TransportError,
};

/// After work came to the waiting request, how long a request for work that would go alone
/// (nothing to report, no renewal) is held back. The `new job` / `new pipeline` broadcast
/// that comes right after most likely announces that same work: asking at once would find
/// nothing, and keep the report of the work just taken behind that round trip. The report
/// carries a request for work anyway when it goes.
const ASK_AFTER_WORK: Duration = Duration::from_millis(2);

/// Bytes of requests one batch carries at most; a request larger than this goes alone. Well
/// under the router's request limit (16 MiB unless set otherwise).
const BATCH_BYTES: usize = 4 * 1024 * 1024;

/// Bytes of `request` encoded, counted without keeping them.
fn encoded_len(request: &Request) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Encoding a request cannot fail: every map key is a string.
    let _ = serde_json::to_writer(&mut count, request);
    count.0
}

/// The answer each request of a batch the router refused as a whole is given.
fn refusal_of(error: &ClientError) -> Value {
    let answer = match error {
        ClientError::Reply(ReplyError::Refused(answer)) => (**answer).clone(),
        other => Answer::error(AnswerKind::MalformedRequest, other.to_string()),
    };
    serde_json::to_value(answer).unwrap_or_default()
}

/// What a daemon does, as a state machine the [`DaemonLoop`] drives.
pub trait Machine {
    /// What the router hands out: jobs or pipelines.
    type Work;
    /// A request waiting to be sent, with what the machine needs to take in its reply.
    type Out;
    /// What the machine's own tasks tell it (a job that ran).
    type Note: Send + 'static;

    /// A request for up to `max` pieces of work that waits up to `wait` at the router when
    /// none is queued (no wait: answered at once).
    fn ask_for_work(&self, max: usize, wait: Option<Duration>) -> Request;
    /// The work in the router's reply to [`Machine::ask_for_work`].
    ///
    /// # Errors
    /// When the reply is an error answer or is not a list of work.
    fn decode_work(&self, reply: Value) -> Result<Vec<Self::Work>, ReplyError>;
    /// Whether `event` says work may be queued for it (then the loop asks for some).
    fn is_wake_up(&self, event: &Event) -> bool;

    /// How much more work it could take now.
    fn room(&self) -> usize;
    /// Takes in work the router handed out.
    fn take_in(&mut self, work: Vec<Self::Work>);
    /// The requests waiting to be sent, oldest first. The loop sends them from the front and
    /// keeps them there while the router cannot be reached.
    fn outbox(&mut self) -> &mut VecDeque<Self::Out>;
    /// The request of `out`.
    fn request(out: &Self::Out) -> Request;
    /// Takes in the router's reply to `out`.
    fn replied(&mut self, out: Self::Out, reply: Value);
    /// Takes in a broadcast that is not a wake-up.
    fn on_event(&mut self, event: Event);
    /// Takes in a note from one of its tasks.
    fn on_note(&mut self, note: Self::Note);
    /// Called at every turn of the loop, before it waits: start what can start (the broker
    /// starts the jobs it took while it has free slots). Tasks send their notes to `notes`.
    fn turn(&mut self, notes: &mpsc::UnboundedSender<Self::Note>);
    /// Called every [`LoopSettings::housekeeping`]: the pipeliner asks after jobs it has not
    /// heard of for a while, the broker saves its monitoring record.
    fn housekeeping(&mut self);
    /// Who it is, now (sent to the router every [`LoopSettings::identify`]).
    fn peer(&mut self) -> Peer;
    /// The leases it holds (renewed every [`LoopSettings::lease_renew`]): every job or
    /// pipeline the router handed it that it has not reported ended with an answer from the
    /// router, or forgotten because the router said so (a cancel). The router queues again
    /// what it handed out and this list lacks, once the answer that handed it out is settled
    /// (see [`Ask`]).
    fn leases(&self) -> RenewLeases;
    /// How much work it holds (none: a stop may end).
    fn held(&self) -> usize;
}

/// How a [`DaemonLoop`] runs.
#[derive(Debug, Clone)]
pub struct LoopSettings {
    /// The router's API endpoint.
    pub api: String,
    /// The router's broadcast endpoint (to subscribe again after a failure).
    pub broadcast: String,
    /// The broadcast prefixes to subscribe to.
    pub prefixes: Vec<&'static str>,
    /// The cluster token.
    pub token: Option<String>,
    /// Timeouts of the connections.
    pub options: ClientOptions,
    /// Ask for work this often even when no broadcast said there is some.
    pub poll_interval: Duration,
    /// Renew the leases this often.
    pub lease_renew: Duration,
    /// On a stop, how long to let held work end.
    pub grace: Duration,
    /// How often to call [`Machine::housekeeping`], the first time at start (never: `None`).
    pub housekeeping: Option<Duration>,
    /// How long a request for work waits at the router while the daemon is idle.
    pub wait: Duration,
    /// Requests sent in one batch, at most.
    pub max_batch: usize,
    /// Round trips in one turn, at most, so the loop gets back to events and timers.
    pub turn_round_trips: usize,
    /// How often the daemon tells the router who it is (on a `renew leases`).
    pub identify: Duration,
}

/// The seconds of a broker's or pipeliner's settings, as its settings file spells them;
/// [`LoopSettings::new`] checks them (zero or less: the default).
#[derive(Debug, Clone, Copy)]
pub struct LoopSecs {
    /// `connect_timeout_secs` (default 5).
    pub connect_timeout: f64,
    /// `request_timeout_secs` (default 10).
    pub request_timeout: f64,
    /// `poll_interval_secs` (default 5).
    pub poll_interval: f64,
    /// `lease_renew_secs` (default 5).
    pub lease_renew: f64,
    /// `shutdown_grace_secs` (default 30).
    pub shutdown_grace: f64,
}

impl LoopSettings {
    /// Settings of a loop that talks to the router at `api` and `broadcast`, subscribed to
    /// `prefixes`, with the timings of `secs`; no housekeeping, a wait for work of 1 s, batches
    /// of up to 512 requests and 4 round trips a turn (set the fields to change them).
    ///
    /// # Errors
    /// [`ConfigError::Value`] for a number of seconds that cannot be used.
    pub fn new(
        api: &str,
        broadcast: &str,
        token: Option<String>,
        prefixes: Vec<&'static str>,
        s: LoopSecs,
    ) -> Result<Self, ConfigError> {
        let d = Duration::from_secs;
        Ok(Self {
            api: api.to_owned(),
            broadcast: broadcast.to_owned(),
            prefixes,
            token,
            options: ClientOptions {
                connect_timeout: secs("connect_timeout_secs", s.connect_timeout, d(5))?,
                request_timeout: secs("request_timeout_secs", s.request_timeout, d(10))?,
                ..ClientOptions::default()
            },
            poll_interval: secs("poll_interval_secs", s.poll_interval, d(5))?,
            lease_renew: secs("lease_renew_secs", s.lease_renew, d(5))?,
            grace: secs("shutdown_grace_secs", s.shutdown_grace, d(30))?,
            housekeeping: None,
            wait: d(1),
            max_batch: 512,
            turn_round_trips: 4,
            identify: super::identity::IDENTIFY_EVERY,
        })
    }
}

/// The loop around a [`Machine`]. See the module documentation.
pub struct DaemonLoop {
    settings: LoopSettings,
    client: ApiClient,
    /// The subscription handed to [`DaemonLoop::new`]; [`DaemonLoop::run`] takes it over (and
    /// makes it again after a failure).
    subscriber: Option<Subscriber>,
    /// Whether the queue may hold work for the machine.
    want_work: bool,
    /// The work the request waiting at the router asked for, while one is out.
    waiting: Option<usize>,
    /// After a waiting request failed: not before this time.
    wait_again_at: Option<Instant>,
    /// After work came to the waiting request: no request for work goes alone before this
    /// time (see [`ASK_AFTER_WORK`]).
    ask_after: Option<Instant>,
    /// While the router is unreachable: when to try again.
    retry_at: Option<Instant>,
    backoff: Backoff,
    /// A `renew leases` goes with the next batch.
    renew_due: bool,
    /// The next batch says who the daemon is (on a `renew leases`).
    identify_due: bool,
    /// After the subscription failed: when to subscribe again.
    resubscribe_at: Option<Instant>,
    /// Whether the last batch failed for want of the router: later failures of the same outage
    /// are logged at debug (the transport notes an unreachable address at a growing interval).
    router_away: bool,
    /// Likewise for the subscription.
    subscription_away: bool,
    /// Its requests for work are numbered and settled (see [`Ask`]).
    asks: Asks,
}

/// This daemon's requests for work, numbered ([`Ask`]): which are still out, and what the
/// last renewal said was settled.
#[derive(Debug)]
struct Asks {
    /// This run's id, drawn at start.
    id: String,
    /// The number of the last ask.
    last: u64,
    /// Asks whose answer is neither taken in nor given up.
    out: BTreeSet<u64>,
    /// The waiting request's ask, while one is out.
    waiting: Option<u64>,
    /// What the last renewal sent said was settled.
    settled_sent: u64,
}

impl Asks {
    fn new() -> Self {
        Self {
            id: uuid::Uuid::new_v4().simple().to_string(),
            last: 0,
            out: BTreeSet::new(),
            waiting: None,
            settled_sent: 0,
        }
    }

    /// Numbers `request` (a request for work) as the next ask, which is out until
    /// [`Asks::settle`].
    fn number(&mut self, mut request: Request) -> (Request, u64) {
        self.last += 1;
        let ask = Some(Ask {
            id: self.id.clone(),
            ask: self.last,
        });
        match &mut request {
            Request::GetJobs(get) => get.asker = ask,
            Request::GetPipelines(get) => get.asker = ask,
            _ => {}
        }
        self.out.insert(self.last);
        (request, self.last)
    }

    /// Its answer was taken in, or can no longer arrive.
    fn settle(&mut self, ask: u64) {
        self.out.remove(&ask);
    }

    /// Every ask up to this number is settled.
    fn settled(&self) -> u64 {
        self.out.first().map_or(self.last, |first| first - 1)
    }
}

/// The answer to a waiting request for work.
type Waited = Result<Value, ClientError>;

impl DaemonLoop {
    /// A loop on a connected `client` and `subscriber` (see
    /// [`wait_for_router`](super::connect::wait_for_router)).
    pub fn new(settings: LoopSettings, client: ApiClient, subscriber: Subscriber) -> Self {
        Self {
            settings,
            client,
            subscriber: Some(subscriber),
            want_work: true,
            waiting: None,
            wait_again_at: None,
            ask_after: None,
            retry_at: None,
            backoff: Backoff::default(),
            renew_due: false,
            identify_due: true,
            resubscribe_at: None,
            router_away: false,
            subscription_away: false,
            asks: Asks::new(),
        }
    }

    /// Runs `machine` until `shutdown` is cancelled: then it asks for no more work, lets the
    /// machine's held work end (up to the grace period) and returns the machine, with the
    /// waiting request's task joined.
    pub async fn run<M: Machine>(mut self, mut machine: M, shutdown: &CancellationToken) -> M {
        let (notes_tx, mut notes) = mpsc::unbounded_channel::<M::Note>();
        let (asks, asked) = mpsc::channel::<Request>(1);
        let (answers_tx, mut answers) = mpsc::channel::<Waited>(1);
        let waiter_client = ApiClient::new(self.settings.api.clone(), self.settings.options)
            .with_token(self.settings.token.clone());
        let waiter = tokio::spawn(wait_for_work(
            waiter_client,
            self.settings.wait,
            asked,
            answers_tx,
        ));
        let mut poll = tokio::time::interval(self.settings.poll_interval);
        let mut renew = tokio::time::interval(self.settings.lease_renew);
        renew.reset();
        let mut identify = tokio::time::interval(self.settings.identify);
        identify.reset();
        // Without housekeeping the interval's branch is disabled; a year stands for never.
        let mut housekeeping = tokio::time::interval(
            self.settings
                .housekeeping
                .unwrap_or(Duration::from_secs(365 * 24 * 3600)),
        );
        let has_housekeeping = self.settings.housekeeping.is_some();
        let mut stopping: Option<Instant> = None;
        let mut subscriber = self.subscriber.take();
        let grace_over = loop {
            // Checked before asking for work: `select!` below may have picked another ready
            // branch in the same turn as the shutdown.
            if stopping.is_none() && shutdown.is_cancelled() {
                info!(held = machine.held(), grace = ?self.settings.grace, "stopping: taking no new work, letting held work end");
                stopping = Some(Instant::now() + self.settings.grace);
            }
            if self.retry_at.is_none_or(|t| Instant::now() >= t) {
                self.retry_at = None;
                if self.sync(&mut machine, stopping.is_none(), &notes_tx).await {
                    self.backoff.reset();
                } else {
                    self.retry_at = Some(Instant::now() + self.backoff.next_delay());
                }
            }
            machine.turn(&notes_tx);
            if stopping.is_none() {
                self.wait_for_work(&machine, &asks);
            }
            if subscriber.is_none() && self.resubscribe_at.is_none_or(|t| Instant::now() >= t) {
                subscriber = self.resubscribe().await;
            }
            let idle = machine.held() == 0 && machine.outbox().is_empty() && self.waiting.is_none();
            if stopping.is_some() && idle {
                info!("stopped: all held work ended");
                break false;
            }
            // More to send or to take after a bounded turn: come straight back after one pass
            // through the events and timers below (not a timer at `now`: tokio rounds
            // deadlines up to the next millisecond).
            let come_back = self.retry_at.is_none()
                && (!machine.outbox().is_empty()
                    || (stopping.is_none()
                        && self.want_work
                        && self.waiting.is_none()
                        && !self.holding_asks()
                        && machine.room() > 0));
            let (retry_at, wait_again_at, resubscribe_at, ask_after) = (
                self.retry_at,
                self.wait_again_at,
                self.resubscribe_at,
                self.ask_after,
            );
            tokio::select! {
                () = shutdown.cancelled(), if stopping.is_none() => {}
                () = sleep_until_opt(stopping) => {
                    warn!(held = machine.held(), unsent = machine.outbox().len(), "grace period over; leaving held work unfinished");
                    break true;
                }
                () = sleep_until_opt(retry_at) => {}
                () = sleep_until_opt(wait_again_at) => self.wait_again_at = None,
                () = sleep_until_opt(ask_after) => self.ask_after = None,
                () = sleep_until_opt(resubscribe_at), if subscriber.is_none() => {}
                Some(answer) = answers.recv() => self.waited(&mut machine, answer),
                () = std::future::ready(()), if come_back => {}
                event = recv_opt(subscriber.as_mut()) => {
                    if !self.on_events(&mut machine, subscriber.as_mut(), event).await {
                        subscriber = None;
                    }
                }
                Some(note) = notes.recv() => {
                    machine.on_note(note);
                    // Take whatever else arrived, so its requests go out together.
                    while let Ok(note) = notes.try_recv() {
                        machine.on_note(note);
                    }
                    self.want_work = true;
                }
                _ = poll.tick() => self.want_work = true,
                _ = renew.tick() => self.renew_due = true,
                _ = identify.tick() => self.identify_due = true,
                _ = housekeeping.tick(), if has_housekeeping => machine.housekeeping(),
            }
        };
        drop(asks);
        if grace_over {
            waiter.abort();
        }
        // Ends once its request is answered (at most the wait plus the request timeout).
        let _ = waiter.await;
        machine
    }

    /// Sends what the machine has queued, a due lease renewal and, when `fetch`, a request for
    /// work while it has room: one `batch` per round trip, a few round trips per turn. False
    /// when the router could not be reached (nothing is lost: what was not sent stays queued).
    async fn sync<M: Machine>(
        &mut self,
        machine: &mut M,
        fetch: bool,
        notes: &mpsc::UnboundedSender<M::Note>,
    ) -> bool {
        for _ in 0..self.settings.turn_round_trips.max(1) {
            // Up to `max_batch` requests, and up to BATCH_BYTES of them (a larger request goes
            // alone): a batch stays under the router's request limit.
            let mut sent = 0;
            let mut bytes = 0;
            let mut requests: Vec<Request> = Vec::new();
            for out in machine.outbox().iter().take(self.settings.max_batch) {
                let request = M::request(out);
                let len = encoded_len(&request);
                if sent > 0 && bytes + len > BATCH_BYTES {
                    break;
                }
                bytes += len;
                sent += 1;
                requests.push(request);
            }
            // Collected only when due: it lists every lease the machine holds, so it may say
            // which asks are settled (when more are than the last renewal said).
            let mut leases = self.renew_due.then(|| machine.leases());
            let settled = self.asks.settled();
            if let Some(leases) = leases.as_mut().filter(|_| settled > self.asks.settled_sent) {
                leases.asker = Some(Settled {
                    id: self.asks.id.clone(),
                    settled,
                });
            }
            if self.identify_due {
                leases.get_or_insert_with(RenewLeases::default).peer =
                    Some(Box::new(machine.peer()));
            }
            let renew = leases.as_ref().is_some_and(|l| !l.is_empty());
            let alone = sent == 0 && !renew;
            let fetching = if fetch
                && self.want_work
                && self.waiting.is_none()
                && !(alone && self.holding_asks())
            {
                machine.room()
            } else {
                0
            };
            if sent == 0 && fetching == 0 && !renew {
                return true;
            }
            if let Some(leases) = leases.filter(|_| renew) {
                requests.push(Request::RenewLeases(leases));
            }
            let mut ask = None;
            if fetching > 0 {
                let (request, n) = self.asks.number(machine.ask_for_work(fetching, None));
                requests.push(request);
                ask = Some(n);
            }
            let started = std::time::Instant::now();
            let sent_batch = self.client.batch(&requests).await;
            if let (Err(_), Some(n)) = (&sent_batch, ask) {
                // Given up: after a failure the connection is made anew, so no answer to it
                // can be taken in any more.
                self.asks.settle(n);
            }
            let replies = match sent_batch {
                Ok(replies) => replies,
                Err(e) if e.is_transient() => {
                    if self.router_away {
                        debug!(error = %e, "cannot reach the router; will retry");
                    } else {
                        warn!(error = %e, "cannot reach the router; will retry");
                        self.router_away = true;
                    }
                    return false;
                }
                Err(e) => {
                    // Refused as a whole (a wrong cluster token, a request past the router's
                    // size limit): sending it again changes nothing. Each request gets the
                    // refusal as its answer, so the machine ends what waited on it.
                    warn!(error = %e, requests = sent, "the router refused a batch");
                    let refusal = refusal_of(&e);
                    let outs: Vec<M::Out> = machine.outbox().drain(..sent).collect();
                    for out in outs {
                        machine.replied(out, refusal.clone());
                    }
                    self.want_work = false;
                    self.renew_due = false;
                    self.identify_due = false;
                    return true;
                }
            };
            if std::mem::take(&mut self.router_away) {
                info!("the router answers again");
            }
            debug!(
                requests = sent,
                renew,
                fetching,
                micros = started.elapsed().as_micros() as u64,
                "round trip"
            );
            let mut replies = replies.into_iter();
            let outs: Vec<M::Out> = machine.outbox().drain(..sent).collect();
            for (out, reply) in outs.into_iter().zip(replies.by_ref()) {
                machine.replied(out, reply);
            }
            if renew {
                self.renew_due = false;
                self.identify_due = false;
                self.asks.settled_sent = self.asks.settled_sent.max(settled);
                if let Some(Err(e)) = replies
                    .next()
                    .map(|r| expect_answer_value(r, AnswerKind::LeasesRenewed))
                {
                    warn!(error = %e, "the router refused to renew the leases");
                }
            }
            if let Some(reply) = replies.next() {
                self.take_work(machine, reply, fetching);
                // Asked since the waiting request's work came: a wake-up from now on
                // announces other work.
                self.ask_after = None;
            }
            if let Some(n) = ask {
                self.asks.settle(n);
            }
            machine.turn(notes);
        }
        true
    }

    /// Whether a request for work that would go alone is held back now (see
    /// [`ASK_AFTER_WORK`]).
    fn holding_asks(&self) -> bool {
        self.ask_after.is_some_and(|t| Instant::now() < t)
    }

    /// Takes in the reply to a request for `asked` pieces of work; returns how many came.
    fn take_work<M: Machine>(&mut self, machine: &mut M, reply: Value, asked: usize) -> usize {
        match machine.decode_work(reply) {
            Ok(work) => {
                // Fewer than asked: the queue is empty for now.
                self.want_work = work.len() >= asked;
                let taken = work.len();
                machine.take_in(work);
                taken
            }
            Err(e) => {
                warn!(error = %e, "the router refused the request for work");
                self.want_work = false;
                0
            }
        }
    }

    /// Sends a request for work that waits at the router when the daemon is idle and found the
    /// queue empty: the next work queued comes straight to it, without a broadcast and another
    /// request in between. (A busy daemon asks in its own round trips: so a stopping broker
    /// that still runs jobs takes no new one.)
    fn wait_for_work<M: Machine>(&mut self, machine: &M, asks: &mpsc::Sender<Request>) {
        let ready = self.waiting.is_none()
            && !self.want_work
            && self.retry_at.is_none()
            && self.wait_again_at.is_none()
            && machine.held() == 0;
        let room = machine.room();
        if ready && room > 0 {
            let (request, n) = self
                .asks
                .number(machine.ask_for_work(room, Some(self.settings.wait)));
            if asks.try_send(request).is_ok() {
                self.waiting = Some(room);
                self.asks.waiting = Some(n);
            } else {
                self.asks.settle(n);
            }
        }
    }

    /// Takes in the answer to the waiting request.
    fn waited<M: Machine>(&mut self, machine: &mut M, answer: Waited) {
        let asked = self.waiting.take().unwrap_or(0);
        // Settled once its work is taken in (or its failure handled), below.
        let ask = self.asks.waiting.take();
        match answer {
            Ok(reply) => {
                if self.take_work(machine, reply, asked) > 0 {
                    self.ask_after = Some(Instant::now() + ASK_AFTER_WORK);
                }
            }
            Err(e) => {
                // Ask in the loop's own round trips (with their back-off) for a while.
                if self.router_away {
                    debug!(error = %e, "waiting for work at the router failed");
                } else {
                    warn!(error = %e, "waiting for work at the router failed");
                }
                self.want_work = true;
                self.wait_again_at = Some(Instant::now() + self.settings.wait);
            }
        }
        if let Some(n) = ask {
            self.asks.settle(n);
        }
    }

    /// Takes in an event and every other one that arrived with it (so their requests go out
    /// in one batch). False when the subscription failed: it is made again after a back-off.
    async fn on_events<M: Machine>(
        &mut self,
        machine: &mut M,
        mut subscriber: Option<&mut Subscriber>,
        first: Result<Event, TransportError>,
    ) -> bool {
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(received) = next.take() {
            match received {
                Ok(event) if machine.is_wake_up(&event) => self.want_work = true,
                Ok(event) => machine.on_event(event),
                Err(e) => {
                    warn!(error = %e, "the broadcast subscription failed; subscribing again");
                    self.resubscribe_at = Some(Instant::now() + self.backoff.next_delay());
                    return false;
                }
            }
            taken += 1;
            if taken < self.settings.max_batch {
                if let Some(subscriber) = subscriber.as_deref_mut() {
                    next = subscriber.try_recv().await;
                }
            }
        }
        true
    }

    /// Subscribes again after a failure. Missed events are caught up by the poll and by the
    /// machine's housekeeping.
    async fn resubscribe(&mut self) -> Option<Subscriber> {
        let s = &self.settings;
        match Subscriber::connect(&s.broadcast, &s.prefixes, s.options.connect_timeout).await {
            Ok(subscriber) => {
                info!(broadcast = %s.broadcast, "subscribed to the broadcasts again");
                self.subscription_away = false;
                self.resubscribe_at = None;
                self.want_work = true;
                Some(subscriber)
            }
            Err(e) => {
                if self.subscription_away {
                    debug!(error = %e, "cannot subscribe to the broadcasts; will retry");
                } else {
                    warn!(error = %e, "cannot subscribe to the broadcasts; will retry");
                    self.subscription_away = true;
                }
                self.resubscribe_at = Some(Instant::now() + self.backoff.next_delay());
                None
            }
        }
    }
}

/// Sends each request for work that waits at the router (on a connection of its own, so the
/// loop's requests go out meanwhile) and passes its answer on.
async fn wait_for_work(
    mut client: ApiClient,
    wait: Duration,
    mut asks: mpsc::Receiver<Request>,
    answers: mpsc::Sender<Waited>,
) {
    while let Some(request) = asks.recv().await {
        let answer = client.request_value_waiting(&request, wait).await;
        if answers.send(answer).await.is_err() {
            return;
        }
    }
}

async fn recv_opt(subscriber: Option<&mut Subscriber>) -> Result<Event, TransportError> {
    match subscriber {
        Some(subscriber) => subscriber.recv().await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `at`; forever when there is none.
pub async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::request::{GetJobs, GetPipelines};

    #[test]
    fn asks_are_numbered_and_settled_up_to_the_oldest_still_out() {
        let mut asks = Asks::new();
        assert_eq!(asks.settled(), 0, "nothing asked yet");
        let (request, one) = asks.number(Request::GetJobs(GetJobs::new(None, 4)));
        let Request::GetJobs(get) = request else {
            panic!("{request:?}")
        };
        assert_eq!(
            get.asker,
            Some(Ask {
                id: asks.id.clone(),
                ask: 1
            })
        );
        let (request, two) = asks.number(Request::GetPipelines(GetPipelines::new(1)));
        assert!(matches!(
            request,
            Request::GetPipelines(GetPipelines {
                asker: Some(Ask { ask: 2, .. }),
                ..
            })
        ));
        assert_eq!(asks.settled(), 0, "1 and 2 are out");
        asks.settle(two);
        assert_eq!(asks.settled(), 0, "1 is still out");
        asks.settle(one);
        assert_eq!(asks.settled(), 2);
        let (_, three) = asks.number(Request::GetJobs(GetJobs::new(None, 1)));
        assert_eq!(asks.settled(), 2);
        asks.settle(three);
        assert_eq!(asks.settled(), 3);
        assert_ne!(Asks::new().id, asks.id, "each run draws its own id");
    }
}
