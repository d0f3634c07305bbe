//! `pypelinin dashboard`: the cluster, its pipelines and their DAGs in a browser.
//!
//! The dashboard is a client of the router like any other (the router stays lean): once a
//! second it asks `cluster status`, keeps what it needs for its charts (throughput over the
//! last ten minutes, each broker's load over the last five) and pushes the result to every
//! open page as a server-sent event, so the pages update live at one update a second whatever
//! the load. The pipeline list, one pipeline and a cancel are asked of the router when a page
//! asks. The page itself (HTML, script, style) is built into the binary: no CDN, nothing to
//! fetch from elsewhere.

mod dag;

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::Stream;
use pypelinin_common::ids::PipelineId;
use pypelinin_common::pipeline::{JobIndex, Pipeline};
use pypelinin_common::protocol::cluster::{ClusterStatus, PipelineDetails};
use pypelinin_common::protocol::request::ListPipelines;
use pypelinin_common::protocol::{AnswerKind, JobState, PipelineState, PipelineStatus};
use pypelinin_common::transport::{ApiClient, ClientError, ClientOptions};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::watch;

/// How often the dashboard asks the router for `cluster status` (and pages update).
pub const REFRESH: Duration = Duration::from_secs(1);

/// Throughput samples kept: ten minutes of them.
const THROUGHPUT_SAMPLES: usize = 600;

/// Load samples kept per broker or pipeliner: five minutes of them.
const LOAD_SAMPLES: usize = 300;

/// Pipelines whose DAG the dashboard keeps after the router forgot it (it keeps only an
/// ended pipeline's outcome): the last ones shown.
const REMEMBERED_DAGS: usize = 1000;

/// How often, at most, the dashboard takes the DAGs of new pipelines.
const CAPTURE: Duration = Duration::from_millis(100);

/// Pending pipelines whose DAG and jobs the dashboard takes at each capture: the newest.
const CAPTURED: usize = 50;

/// How to reach the router.
#[derive(Debug, Clone)]
pub struct Connect {
    /// The router's API endpoint.
    pub api: String,
    /// The router's broadcast endpoint: with it, the dashboard takes the DAG of a new
    /// pipeline as soon as it is announced (without, at each refresh).
    pub broadcast: Option<String>,
    /// The client's timeouts.
    pub options: ClientOptions,
    /// The cluster token, if the router has one; a cancel from a page must carry it too.
    pub token: Option<String>,
}

impl Connect {
    async fn client(&self) -> Result<ApiClient, ClientError> {
        Ok(ApiClient::connect(&self.api, self.options)
            .await?
            .with_token(self.token.clone()))
    }
}

/// Whether serving on `addr` exposes the cluster beyond this machine.
pub fn exposes(addr: &SocketAddr) -> bool {
    !addr.ip().is_loopback()
}

/// Serves the dashboard on `listener` until `shutdown` completes.
///
/// # Errors
/// When the listener fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    connect: Connect,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (tick, _) = watch::channel(Arc::new(String::from("{}")));
    let shared = Arc::new(Shared {
        connect,
        client: tokio::sync::Mutex::new(None),
        history: Mutex::new(History::default()),
        dags: Mutex::new(Dags::default()),
        tick,
    });
    let poller = tokio::spawn(poll(shared.clone()));
    let capturer = tokio::spawn(capture(shared.clone()));
    let app = router(shared);
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    poller.abort();
    capturer.abort();
    served
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/app.js", get(script))
        .route("/app.css", get(style))
        .route("/api/overview", get(overview))
        .route("/api/events", get(events))
        .route("/api/pipelines", get(pipelines))
        .route("/api/pipelines/{id}", get(pipeline))
        .route("/api/pipelines/{id}/cancel", post(cancel))
        .route("/api/peers/{id}", get(peer))
        .with_state(shared)
}

/// What the handlers share.
struct Shared {
    connect: Connect,
    /// The handlers' connection to the router (one request at a time), made when first needed
    /// and made again after a failure.
    client: tokio::sync::Mutex<Option<ApiClient>>,
    history: Mutex<History>,
    dags: Mutex<Dags>,
    /// The latest overview, as JSON text: every page's event stream follows it.
    tick: watch::Sender<Arc<String>>,
}

/// What the charts draw: throughput over time, and each peer's load.
#[derive(Default)]
struct History {
    /// Counters of the previous status: jobs and pipelines ended, and when.
    last: Option<(Instant, u64, u64)>,
    /// `[seconds since the dashboard started, jobs/s, pipelines/s]`.
    throughput: VecDeque<[f64; 3]>,
    /// By peer id: `[seconds, process CPU %, resident MB, host CPU %, host memory used %]`.
    loads: HashMap<String, VecDeque<[f64; 5]>>,
    started: Option<Instant>,
}

impl History {
    /// Takes in a new status; returns the throughput series.
    fn note(&mut self, status: &ClusterStatus, now: Instant) {
        let started = *self.started.get_or_insert(now);
        let t = now.duration_since(started).as_secs_f64();
        let jobs: u64 = status.workers.values().map(|w| w.finished + w.failed).sum();
        let p = &status.pipelines;
        let pipelines = p.finished + p.failed + p.cancelled;
        if let Some((at, last_jobs, last_pipelines)) = self.last {
            let dt = now.duration_since(at).as_secs_f64().max(1e-3);
            // A restarted router counts from zero again: no negative rates.
            let rate = |now: u64, then: u64| now.saturating_sub(then) as f64 / dt;
            self.throughput
                .push_back([t, rate(jobs, last_jobs), rate(pipelines, last_pipelines)]);
            if self.throughput.len() > THROUGHPUT_SAMPLES {
                self.throughput.pop_front();
            }
        }
        self.last = Some((now, jobs, pipelines));
        for peer in &status.peers {
            let Some(load) = &peer.peer.load else {
                continue;
            };
            let samples = self.loads.entry(peer.peer.id.clone()).or_default();
            let host_memory = if load.host_memory_total > 0 {
                load.host_memory_used as f64 * 100.0 / load.host_memory_total as f64
            } else {
                0.0
            };
            samples.push_back([
                t,
                f64::from(load.cpu_percent),
                load.resident_memory as f64 / 1e6,
                f64::from(load.host_cpu_percent),
                host_memory,
            ]);
            if samples.len() > LOAD_SAMPLES {
                samples.pop_front();
            }
        }
        // Forget peers the router no longer lists.
        self.loads
            .retain(|id, _| status.peers.iter().any(|p| &p.peer.id == id));
    }
}

/// The DAGs of pipelines shown, kept after the router forgets them.
#[derive(Default)]
struct Dags {
    by_id: HashMap<PipelineId, PipelineDetails>,
    order: VecDeque<PipelineId>,
}

impl Dags {
    /// Keeps (or updates) the DAG and jobs of pipeline `id`; the oldest kept goes past
    /// [`REMEMBERED_DAGS`].
    fn keep(&mut self, id: &PipelineId, details: PipelineDetails) {
        if self.by_id.insert(id.clone(), details).is_none() {
            self.order.push_back(id.clone());
            if self.order.len() > REMEMBERED_DAGS {
                if let Some(old) = self.order.pop_front() {
                    self.by_id.remove(&old);
                }
            }
        }
    }
}

/// Asks the router for `cluster status` every [`REFRESH`] and publishes the overview.
async fn poll(shared: Arc<Shared>) {
    let mut client: Option<ApiClient> = None;
    let mut every = tokio::time::interval(REFRESH);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let status = match client.as_mut() {
            Some(c) => c.cluster_status().await,
            None => match shared.connect.client().await {
                Ok(mut c) => {
                    let status = c.cluster_status().await;
                    client = Some(c);
                    status
                }
                Err(e) => Err(e),
            },
        };
        let overview = match status {
            Ok(status) => {
                let mut history = lock(&shared.history);
                history.note(&status, Instant::now());
                json!({
                    "status": status,
                    "throughput": history.throughput,
                    "router": shared.connect.api,
                    "token required": shared.connect.token.is_some(),
                })
            }
            Err(e) => {
                // A new connection next time (the router may have restarted elsewhere).
                client = None;
                json!({
                    "error": format!("cannot reach the router: {e}"),
                    "router": shared.connect.api,
                    "throughput": lock(&shared.history).throughput,
                })
            }
        };
        shared.tick.send_replace(Arc::new(overview.to_string()));
    }
}

/// Takes the DAGs and jobs of the newest pending pipelines as soon as new pipelines are
/// announced (at most every [`CAPTURE`]; at every refresh without a broadcast endpoint), so a
/// pipeline's DAG can still be drawn after it ended, when the router keeps only its outcome.
async fn capture(shared: Arc<Shared>) {
    let mut subscriber = None;
    let mut client: Option<ApiClient> = None;
    loop {
        if subscriber.is_none() {
            if let Some(endpoint) = &shared.connect.broadcast {
                subscriber = pypelinin_common::transport::Subscriber::connect(
                    endpoint,
                    &[pypelinin_common::protocol::Event::NEW_PIPELINE],
                    shared.connect.options.connect_timeout,
                )
                .await
                .ok();
            }
        }
        match subscriber.as_mut() {
            // Wait for an announcement (a refresh's time at most, to connect again when the
            // subscriber is gone), then take whatever else is queued.
            Some(sub) => match tokio::time::timeout(REFRESH, sub.recv()).await {
                Ok(Ok(_)) => {
                    while let Ok(Ok(_)) = tokio::time::timeout(Duration::ZERO, sub.recv()).await {}
                }
                Ok(Err(_)) => {
                    subscriber = None;
                    continue;
                }
                Err(_) => continue,
            },
            None => tokio::time::sleep(REFRESH).await,
        }
        if client.is_none() {
            client = shared.connect.client().await.ok();
        }
        if let Some(c) = client.as_mut() {
            if let Err(ClientError::Transport(_)) = capture_once(&shared, c).await {
                client = None;
            }
        }
        tokio::time::sleep(CAPTURE).await;
    }
}

async fn capture_once(shared: &Shared, client: &mut ApiClient) -> Result<(), ClientError> {
    let pending = client
        .list_pipelines(ListPipelines {
            state: None,
            id_prefix: None,
            limit: CAPTURED,
        })
        .await?;
    let ids: Vec<PipelineId> = pending
        .pipelines
        .into_iter()
        .filter(|p| p.jobs.is_some())
        .map(|p| p.pipeline_id)
        .collect();
    if ids.is_empty() {
        return Ok(());
    }
    let details = client.pipeline_details(ids).await?;
    let mut dags = lock(&shared.dags);
    for (id, (_, details)) in details {
        if let Some(details) = details {
            dags.keep(&id, details);
        }
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A request to the router on the handlers' connection (made again after a failure).
async fn ask<T, F>(shared: &Shared, request: F) -> Result<T, ApiError>
where
    F: for<'c> FnOnce(
        &'c mut ApiClient,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<T, ClientError>> + Send + 'c>,
    >,
{
    let mut slot = shared.client.lock().await;
    if slot.is_none() {
        *slot = Some(shared.connect.client().await.map_err(ApiError::router)?);
    }
    let Some(client) = slot.as_mut() else {
        return Err(ApiError::router("no connection"));
    };
    let result = request(client).await;
    if matches!(result, Err(ClientError::Transport(_))) {
        *slot = None;
    }
    result.map_err(ApiError::from)
}

/// An error answer of the dashboard's API: a status and a message.
struct ApiError(StatusCode, String);

impl ApiError {
    fn router(e: impl std::fmt::Display) -> Self {
        ApiError(
            StatusCode::BAD_GATEWAY,
            format!("cannot reach the router: {e}"),
        )
    }
}

impl From<ClientError> for ApiError {
    fn from(e: ClientError) -> Self {
        match &e {
            ClientError::Reply(pypelinin_common::protocol::ReplyError::Refused(answer)) => {
                let status = match answer.answer {
                    AnswerKind::Unauthorized => StatusCode::UNAUTHORIZED,
                    AnswerKind::UnknownPipelineId => StatusCode::NOT_FOUND,
                    AnswerKind::PipelineEnded => StatusCode::CONFLICT,
                    _ => StatusCode::BAD_REQUEST,
                };
                ApiError(status, e.to_string())
            }
            _ => ApiError::router(e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

async fn page() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("page.html"),
    )
}

async fn script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("app.js"),
    )
}

async fn style() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("app.css"),
    )
}

async fn overview(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let text = shared.tick.borrow().clone();
    (
        [(header::CONTENT_TYPE, "application/json")],
        text.to_string(),
    )
}

/// The overview, once now and then at every refresh, as server-sent events.
async fn events(
    State(shared): State<Arc<Shared>>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let mut rx = shared.tick.subscribe();
    rx.mark_changed();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        let text = rx.borrow_and_update().clone();
        Some((
            Ok(SseEvent::default().event("overview").data(text.as_str())),
            rx,
        ))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// The query of the pipeline list.
#[derive(Debug, Deserialize)]
struct ListQuery {
    /// A state, or nothing (or `all`) for every state.
    #[serde(default)]
    state: Option<String>,
    /// The start of an id.
    #[serde(default)]
    q: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
}

async fn pipelines(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let state = match query.state.as_deref().map(str::trim) {
        None | Some("" | "all") => None,
        Some(s) => Some(
            serde_json::from_value::<PipelineState>(json!(s))
                .map_err(|_| ApiError(StatusCode::BAD_REQUEST, format!("no state {s:?}")))?,
        ),
    };
    let list = ListPipelines {
        state,
        id_prefix: query
            .q
            .map(|q| q.trim().to_lowercase())
            .filter(|q| !q.is_empty()),
        limit: query.limit.unwrap_or(100),
    };
    let list = ask(&shared, |c| Box::pin(c.list_pipelines(list))).await?;
    Ok(Json(json!(list)))
}

/// A job's state as the page draws it.
fn job_state_name(state: JobState) -> &'static str {
    match state {
        JobState::Queued => "queued",
        JobState::Running => "running",
        JobState::Finished => "finished",
        JobState::Failed => "failed",
        JobState::Unknown => "waiting",
    }
}

/// The state of each job (by worker) of pipeline `p`, which stands at `status`, as the page
/// draws it, from its `details` (the router's, or the last seen once it ended).
///
/// An ended pipeline's details may be older than its end (the router drops them at the end):
/// every job above a job that was submitted (or that failed it) has finished, since a job is
/// submitted only once its parents finished; what else had not finished was dropped.
fn drawn_states(
    p: &Pipeline,
    status: &PipelineStatus,
    details: Option<&PipelineDetails>,
) -> HashMap<String, &'static str> {
    let submitted = |worker: &str| {
        details
            .and_then(|d| d.jobs.iter().rev().find(|j| j.worker == worker))
            .map(|j| j.state)
    };
    let ended = !matches!(status.state, PipelineState::Queued | PipelineState::Running);
    // Jobs known to have finished: those that said so, and every ancestor of a submitted job.
    let mut finished = std::collections::HashSet::new();
    let mut stack: Vec<JobIndex> = p
        .jobs()
        .filter(|(_, job)| {
            submitted(&job.worker).is_some() || status.worker.as_deref() == Some(&job.worker)
        })
        .map(|(i, _)| i)
        .collect();
    for (i, job) in p.jobs() {
        if submitted(&job.worker) == Some(JobState::Finished) {
            finished.insert(i);
        }
    }
    while let Some(job) = stack.pop() {
        for parent in p.parents(job) {
            if finished.insert(parent) {
                stack.push(parent);
            }
        }
    }
    p.jobs()
        .map(|(i, job)| {
            let state = if status.state == PipelineState::Finished || finished.contains(&i) {
                "finished"
            } else if status.state == PipelineState::Failed
                && status.worker.as_deref() == Some(job.worker.as_str())
            {
                "failed"
            } else if ended {
                match submitted(&job.worker) {
                    Some(JobState::Failed) => "failed",
                    _ => "cancelled",
                }
            } else {
                submitted(&job.worker).map_or("waiting", job_state_name)
            };
            (job.worker.clone(), state)
        })
        .collect()
}

async fn pipeline(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = PipelineId::from(id.trim());
    let ids = vec![id.clone()];
    let mut all = ask(&shared, |c| Box::pin(c.pipeline_details(ids))).await?;
    let Some((status, details)) = all.remove(&id) else {
        return Err(ApiError(
            StatusCode::BAD_GATEWAY,
            format!("the router did not answer for pipeline {id}"),
        ));
    };
    if status.state == PipelineState::Unknown {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!(
                "the router does not know pipeline {id} (never submitted, or it ended longer ago than the router remembers)"
            ),
        ));
    }
    // The router drops an ended pipeline's DAG: draw the last one seen, at its end state.
    let details = {
        let mut dags = lock(&shared.dags);
        match details {
            Some(d) => {
                dags.keep(&id, d.clone());
                Some(d)
            }
            None => dags.by_id.get(&id).cloned(),
        }
    };
    let dag = details
        .as_ref()
        .and_then(|d| Pipeline::from_legacy(&d.pipeline).ok());
    let states = dag
        .as_ref()
        .map(|p| drawn_states(p, &status, details.as_ref()))
        .unwrap_or_default();
    let state_of = |w: &str| states.get(w).copied().unwrap_or("waiting");
    let svg = dag.as_ref().map(|p| dag::svg(p, state_of));
    let jobs: Vec<Value> = match (&dag, &details) {
        (Some(p), _) => p
            .jobs()
            .map(|(_, job)| {
                let submitted = details
                    .as_ref()
                    .and_then(|d| d.jobs.iter().rev().find(|j| j.worker == job.worker));
                // Of an ended pipeline, the details may predate its end: only a job's final
                // figures are shown.
                let ended = !matches!(status.state, PipelineState::Queued | PipelineState::Running);
                let detail = submitted
                    .filter(|d| !ended || matches!(d.state, JobState::Finished | JobState::Failed));
                json!({
                    "worker": job.worker,
                    "state": state_of(&job.worker),
                    "job id": submitted.map(|d| d.job_id.clone()),
                    "ended": ended,
                    "attempts": detail.map(|d| d.attempts),
                    "duration": detail.and_then(|d| d.duration),
                    "error": detail.and_then(|d| d.error.clone()).or_else(|| {
                        (status.worker.as_deref() == Some(job.worker.as_str()))
                            .then(|| status.error.clone())
                            .flatten()
                    }),
                })
            })
            .collect(),
        _ => Vec::new(),
    };
    Ok(Json(json!({
        "pipeline id": id,
        "status": status,
        "svg": svg,
        "jobs": jobs,
        "ended": !matches!(status.state, PipelineState::Queued | PipelineState::Running),
    })))
}

/// Whether `headers` carry the cluster token (when there is one), compared in constant time.
fn token_ok(shared: &Shared, headers: &HeaderMap) -> bool {
    let Some(token) = &shared.connect.token else {
        return true;
    };
    let given = headers
        .get("x-pypelinin-token")
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    use subtle::ConstantTimeEq;
    given.len() == token.len() && bool::from(given.ct_eq(token.as_bytes()))
}

async fn cancel(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    if !token_ok(&shared, &headers) {
        return Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "the cluster token is needed to cancel a pipeline".into(),
        ));
    }
    let id = PipelineId::from(id.trim());
    let pipeline_id = id.clone();
    ask(&shared, |c| Box::pin(c.cancel_pipeline(pipeline_id))).await?;
    Ok(Json(json!({"pipeline id": id, "result": "cancelled"})))
}

async fn peer(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let overview: Value = serde_json::from_str(&shared.tick.borrow()).unwrap_or_default();
    let peer = overview["status"]["peers"]
        .as_array()
        .and_then(|peers| peers.iter().find(|p| p["id"] == id.as_str()).cloned());
    let Some(peer) = peer else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no broker or pipeliner {id} is known to the router now"),
        ));
    };
    let history: Vec<[f64; 5]> = lock(&shared.history)
        .loads
        .get(&id)
        .map(|h| h.iter().copied().collect())
        .unwrap_or_default();
    Ok(Json(json!({"peer": peer, "history": history})))
}
