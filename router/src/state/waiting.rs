//! Requests that wait at the router for work: a `get jobs` or `get pipelines` with `wait ms`
//! that found nothing queued is kept (in arrival order) and answered by the batch that queues
//! work for it, or with nothing once its wait is over.

use pypelinin_common::protocol::request::{Ask, GetJob, GetJobs};
use pypelinin_common::protocol::{Event, Reply, Request};

use super::State;

/// A `get jobs` / `get pipelines` waiting at the router for work to be queued.
#[derive(Debug)]
pub(super) struct Waiting {
    ticket: u64,
    /// When it is answered empty (ms since the epoch).
    until: u64,
    pub(super) want: Want,
}

/// What a waiting request asks for, up to how many, and who asks (see the `askers` module).
#[derive(Debug)]
pub(super) enum Want {
    Jobs(GetJob, usize, Option<Ask>),
    Pipelines(usize, Option<Ask>),
}

impl Want {
    /// The answer when nothing came in time.
    fn nothing(&self) -> Reply {
        match self {
            Want::Jobs(..) => Reply::Jobs(Vec::new()),
            Want::Pipelines(..) => Reply::Pipelines(Vec::new()),
        }
    }
}

/// The answer to a request that waited, for the server to send to the peer behind `ticket`.
#[derive(Debug)]
pub struct Served {
    /// What [`State::handle_or_wait`] was given with the request.
    pub ticket: u64,
    /// Its answer: the jobs or pipelines handed to it, or none when its wait ended.
    pub reply: Reply,
}

/// Requests waiting at most; past it a request with `wait ms` is answered at once.
pub const MAX_WAITING: usize = 10_000;

impl State {
    /// Handles `request` as [`State::handle`] does, except a `get jobs` or `get pipelines` with
    /// `wait ms` that finds nothing queued: that one waits, kept under `ticket`, and this
    /// returns `None`; [`State::serve_waiting`] answers it later.
    pub fn handle_or_wait(
        &mut self,
        ticket: u64,
        request: Request,
        now: u64,
        events: &mut Vec<Event>,
    ) -> Option<Reply> {
        self.observe(&request, now);
        let (want, wait_ms) = match &request {
            Request::GetJobs(get) if (1..=GetJobs::MAX).contains(&get.max) => {
                self.note_asked(get.workers.as_deref(), now);
                let one = GetJob {
                    workers: get.workers.clone(),
                };
                (Want::Jobs(one, get.max, get.asker.clone()), get.wait_ms)
            }
            Request::GetPipelines(get) if (1..=GetJobs::MAX).contains(&get.max) => {
                (Want::Pipelines(get.max, get.asker.clone()), get.wait_ms)
            }
            _ => return Some(self.apply(request, now, events)),
        };
        let wait_ms = wait_ms.unwrap_or(0).min(GetJobs::MAX_WAIT_MS);
        if wait_ms == 0 || self.waiting.len() >= MAX_WAITING {
            return Some(self.apply(request, now, events));
        }
        if let Some(reply) = self.take(&want, now) {
            return Some(reply);
        }
        self.waiting.push_back(Waiting {
            ticket,
            until: now + wait_ms,
            want,
        });
        None
    }

    /// Answers the waiting requests that can be answered at `now`: with what is queued (the
    /// longest waiting first, each taking up to its `max`), or with nothing once their wait
    /// is over. Call it after the requests of a batch, so the jobs they queued are handed out
    /// in the same durable write.
    pub fn serve_waiting(&mut self, now: u64, served: &mut Vec<Served>) {
        if self.waiting.is_empty() {
            return;
        }
        let work = !self.job_queues.is_empty() || !self.pipeline_queue.is_empty();
        let mut waiting = std::mem::take(&mut self.waiting);
        waiting.retain(|w| {
            let reply = match work.then(|| self.take(&w.want, now)).flatten() {
                Some(reply) => reply,
                None if w.until <= now => w.want.nothing(),
                None => return true,
            };
            served.push(Served {
                ticket: w.ticket,
                reply,
            });
            false
        });
        self.waiting = waiting;
    }

    /// Answers every waiting request with nothing (the router is stopping).
    pub fn stop_waiting(&mut self, served: &mut Vec<Served>) {
        served.extend(self.waiting.drain(..).map(|w| Served {
            ticket: w.ticket,
            reply: w.want.nothing(),
        }));
    }

    /// Requests waiting for work now.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Up to what `want` asks for, from the queues; `None` when nothing is queued for it.
    fn take(&mut self, want: &Want, now: u64) -> Option<Reply> {
        match want {
            Want::Jobs(get, max, asker) => {
                let jobs = self.take_jobs(get, *max, now, asker.as_ref());
                (!jobs.is_empty()).then_some(Reply::Jobs(jobs))
            }
            Want::Pipelines(max, asker) => {
                let pipelines = self.take_pipelines(*max, now, asker.as_ref());
                (!pipelines.is_empty()).then_some(Reply::Pipelines(pipelines))
            }
        }
    }
}
