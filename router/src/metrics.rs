//! Prometheus metrics over HTTP (`--metrics 127.0.0.1:9555`, off by default).
//!
//! The request path pays nothing for them: the state task keeps plain counters as it goes
//! (see `state/census.rs`), and the committer a histogram of its group commits. A scrape is a
//! message to the state task, which answers with a [`Snapshot`] of its counters and gauges
//! between two batches; the HTTP thread encodes it (OpenMetrics text, by `prometheus-client`)
//! and answers. So a scrape costs the router one snapshot, never a lock on the hot path.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use pypelinin_common::protocol::cluster::{ClusterStatus, PeerRole};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::state::{Histogram, State};

/// Upper bounds of the group commit time buckets, in seconds.
pub const COMMIT_SECS_BUCKETS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];
/// Upper bounds of the group commit size buckets, in rows.
pub const COMMIT_ROWS_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

/// The durable record's group commits: how long each took and how many rows it wrote.
#[derive(Debug, Clone)]
pub struct CommitStats {
    /// Seconds per group commit.
    pub seconds: Histogram,
    /// Rows per group commit.
    pub rows: Histogram,
}

impl Default for CommitStats {
    fn default() -> Self {
        Self {
            seconds: Histogram::new(COMMIT_SECS_BUCKETS),
            rows: Histogram::new(COMMIT_ROWS_BUCKETS),
        }
    }
}

/// Shared by the committer (which adds to it once per group) and the scrapes.
pub type SharedCommitStats = Arc<Mutex<CommitStats>>;

/// Everything a scrape shows, taken by the state task between two batches.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// What `cluster status` answers.
    pub status: ClusterStatus,
    /// Requests handled, by command.
    pub requests: Vec<(&'static str, u64)>,
    /// Job durations, by worker.
    pub durations: Vec<(String, Histogram)>,
    /// Group commits (a durable router).
    pub commits: Option<CommitStats>,
}

impl Snapshot {
    /// The snapshot of `state` at `now`.
    pub fn of(state: &State, now: u64, commits: Option<&SharedCommitStats>) -> Self {
        Self {
            status: state.cluster_status(now),
            requests: state.requests_by_command(),
            durations: state.job_durations(),
            commits: commits.map(|c| c.lock().map(|c| c.clone()).unwrap_or_default()),
        }
    }

    /// The snapshot as OpenMetrics text.
    ///
    /// # Errors
    /// Never in practice (writing to a string).
    pub fn encode(self) -> Result<String, std::fmt::Error> {
        let mut registry = Registry::with_prefix("pypelinin");
        registry.register_collector(Box::new(self));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry)?;
        Ok(out)
    }
}

/// A value encoded as one metric of a descriptor.
struct Value<'a> {
    kind: MetricType,
    value: ValueKind<'a>,
}

enum ValueKind<'a> {
    Count(u64),
    Gauge(i64),
    Seconds(f64),
    Histogram(&'a Histogram),
}

impl EncodeMetric for Value<'_> {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        match &self.value {
            ValueKind::Count(n) => {
                encoder.encode_counter::<prometheus_client::encoding::NoLabelSet, _, u64>(n, None)
            }
            ValueKind::Gauge(n) => encoder.encode_gauge(n),
            ValueKind::Seconds(s) => encoder.encode_gauge(s),
            ValueKind::Histogram(h) => {
                let buckets: Vec<(f64, u64)> = h
                    .bounds
                    .iter()
                    .copied()
                    .chain(std::iter::once(f64::INFINITY))
                    .zip(h.counts.iter().copied())
                    .collect();
                encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    h.sum, h.count, &buckets, None,
                )
            }
        }
    }

    fn metric_type(&self) -> MetricType {
        self.kind
    }
}

fn count(n: u64) -> Value<'static> {
    Value {
        kind: MetricType::Counter,
        value: ValueKind::Count(n),
    }
}

fn gauge(n: usize) -> Value<'static> {
    Value {
        kind: MetricType::Gauge,
        value: ValueKind::Gauge(i64::try_from(n).unwrap_or(i64::MAX)),
    }
}

fn histogram(h: &Histogram) -> Value<'_> {
    Value {
        kind: MetricType::Histogram,
        value: ValueKind::Histogram(h),
    }
}

/// Encodes `values`, each with its labels, under one descriptor.
fn family<'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    values: impl IntoIterator<Item = (Vec<(&'static str, &'a str)>, Value<'a>)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in values {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

impl std::fmt::Debug for Value<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("metric value")
    }
}

impl prometheus_client::collector::Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.status;
        let e = &mut encoder;
        family(
            e,
            "requests",
            "Requests handled, by command (each request of a batch counts).",
            MetricType::Counter,
            self.requests
                .iter()
                .map(|(c, n)| (vec![("command", *c)], count(*n))),
        )?;
        family(
            e,
            "jobs",
            "Jobs ended since the router started, by worker and outcome (retried: an attempt that failed and was queued again).",
            MetricType::Counter,
            s.workers.iter().flat_map(|(w, c)| {
                [
                    ("finished", c.finished),
                    ("failed", c.failed),
                    ("retried", c.retried),
                ]
                .into_iter()
                .map(move |(o, n)| (vec![("worker", w.as_str()), ("outcome", o)], count(n)))
            }),
        )?;
        let p = &s.pipelines;
        family(
            e,
            "pipelines",
            "Pipelines ended since the router started, by outcome.",
            MetricType::Counter,
            [
                ("finished", p.finished),
                ("failed", p.failed),
                ("cancelled", p.cancelled),
            ]
            .into_iter()
            .map(|(o, n)| (vec![("outcome", o)], count(n))),
        )?;
        family(
            e,
            "pending_jobs",
            "Jobs now, by worker and state (queued, delayed: waiting out a retry back-off, running: handed to a broker).",
            MetricType::Gauge,
            s.workers.iter().flat_map(|(w, c)| {
                [
                    ("queued", c.queued),
                    ("delayed", c.delayed),
                    ("running", c.running),
                ]
                .into_iter()
                .map(move |(st, n)| (vec![("worker", w.as_str()), ("state", st)], gauge(n)))
            }),
        )?;
        family(
            e,
            "pending_pipelines",
            "Pipelines now, by state.",
            MetricType::Gauge,
            [("queued", p.queued), ("running", p.running)]
                .into_iter()
                .map(|(st, n)| (vec![("state", st)], gauge(n))),
        )?;
        let live = |role| {
            s.peers
                .iter()
                .filter(|x| x.peer.role == role && !x.gone)
                .count()
        };
        family(
            e,
            "peers",
            "Brokers and pipeliners heard of within peer_timeout_secs.",
            MetricType::Gauge,
            [
                ("broker", live(PeerRole::Broker)),
                ("pipeliner", live(PeerRole::Pipeliner)),
            ]
            .into_iter()
            .map(|(r, n)| (vec![("role", r)], gauge(n))),
        )?;
        family(
            e,
            "waiting_requests",
            "get jobs / get pipelines waiting at the router for work.",
            MetricType::Gauge,
            [(vec![], gauge(s.waiting_requests))],
        )?;
        family(
            e,
            "unserved_workers",
            "Workers with queued jobs that no broker asked for in unserved_worker_warn_secs.",
            MetricType::Gauge,
            [(vec![], gauge(s.unserved.len()))],
        )?;
        family(
            e,
            "uptime_seconds",
            "Seconds since the router started.",
            MetricType::Gauge,
            [(
                vec![],
                Value {
                    kind: MetricType::Gauge,
                    value: ValueKind::Seconds(s.uptime_secs),
                },
            )],
        )?;
        family(
            e,
            "job_duration_seconds",
            "How long jobs ran, as their brokers reported, by worker.",
            MetricType::Histogram,
            self.durations
                .iter()
                .map(|(w, h)| (vec![("worker", w.as_str())], histogram(h))),
        )?;
        if let Some(commits) = &self.commits {
            family(
                e,
                "group_commit_seconds",
                "How long each durable write (one group commit, fsync included) took.",
                MetricType::Histogram,
                [(vec![], histogram(&commits.seconds))],
            )?;
            family(
                e,
                "group_commit_rows",
                "Rows written by each group commit.",
                MetricType::Histogram,
                [(vec![], histogram(&commits.rows))],
            )?;
        }
        Ok(())
    }
}

/// A scrape's request to the state task: the channel for its snapshot (room for one, so the
/// state task never waits on it).
pub type ScrapeRequest = std::sync::mpsc::SyncSender<Snapshot>;

/// How long a scrape waits for the state task's snapshot.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(5);

/// The metrics server: its address, and a handle that stops it when dropped.
pub struct Server {
    /// The address bound.
    pub address: std::net::SocketAddr,
    server: Arc<tiny_http::Server>,
}

impl Drop for Server {
    fn drop(&mut self) {
        // Ends the serving thread's loop (and frees the port).
        self.server.unblock();
    }
}

/// Serves `GET /metrics` at `address` on a thread of its own until the returned [`Server`] is
/// dropped (port 0 picks a free port).
///
/// # Errors
/// When `address` cannot be bound.
pub fn serve(address: &str, scrapes: mpsc::Sender<ScrapeRequest>) -> Result<Server, String> {
    let server = tiny_http::Server::http(address)
        .map_err(|e| format!("cannot serve metrics at {address}: {e}"))?;
    let server = Arc::new(server);
    let bound = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| format!("metrics address {address} is no IP address"))?;
    info!(address = %bound, "serving metrics at http://{bound}/metrics");
    let serving = server.clone();
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for request in serving.incoming_requests() {
                let response = answer(&request, &scrapes);
                if let Err(e) = request.respond(response) {
                    warn!(error = %e, "a metrics reply failed");
                }
            }
        })
        .map_err(|e| format!("cannot start the metrics thread: {e}"))?;
    Ok(Server {
        address: bound,
        server,
    })
}

fn answer(
    request: &tiny_http::Request,
    scrapes: &mpsc::Sender<ScrapeRequest>,
) -> tiny_http::Response<std::io::Cursor<Vec<u8>>> {
    let text = |status: u16, body: String| {
        let mut response = tiny_http::Response::from_string(body).with_status_code(status);
        if let Ok(h) = "Content-Type: text/plain; charset=utf-8".parse::<tiny_http::Header>() {
            response.add_header(h);
        }
        response
    };
    let path = request.url().split('?').next().unwrap_or_default();
    if *request.method() != tiny_http::Method::Get || path != "/metrics" {
        return text(
            404,
            "pypelinin router: metrics are at GET /metrics\n".into(),
        );
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    if scrapes.blocking_send(tx).is_err() {
        return text(503, "the router is stopping\n".into());
    }
    let Ok(snapshot) = rx.recv_timeout(SNAPSHOT_TIMEOUT) else {
        return text(503, "the router did not answer in time\n".into());
    };
    match snapshot.encode() {
        Ok(body) => {
            let mut response = tiny_http::Response::from_string(body);
            if let Ok(h) =
                "Content-Type: application/openmetrics-text; version=1.0.0; charset=utf-8"
                    .parse::<tiny_http::Header>()
            {
                response.add_header(h);
            }
            response
        }
        Err(_) => text(500, "cannot encode the metrics\n".into()),
    }
}
