//! How `pypelinin` prints for people: the cluster status, a pipeline, an event.

use std::fmt::Write;

use anstyle::{AnsiColor, Style};
use pypelinin_common::pipeline::Pipeline;
use pypelinin_common::protocol::cluster::{ClusterStatus, PeerRole, PipelineDetails};
use pypelinin_common::protocol::{Event, JobState, PipelineState, PipelineStatus};
use serde_json::{json, Value};

use pypelinin_client::PipelineId;

/// Failures.
pub const RED: Style = AnsiColor::Red.on_default();
/// Cancellations and warnings.
pub const YELLOW: Style = AnsiColor::Yellow.on_default();
/// What went well.
pub const GREEN: Style = AnsiColor::Green.on_default();
/// Headings.
pub const BOLD: Style = Style::new().bold();

/// `text` in `style` when `colour`, else as is.
pub fn paint(colour: bool, style: Style, text: &str) -> String {
    if colour {
        format!("{style}{text}{style:#}")
    } else {
        text.to_owned()
    }
}

/// Where the job of `worker` stands in a pipeline's details; `None`: not submitted yet.
pub fn job_state(details: Option<&PipelineDetails>, worker: &str) -> Option<JobState> {
    details?
        .jobs
        .iter()
        .rev()
        .find(|j| j.worker == worker)
        .map(|j| j.state)
}

/// The fill colour of a job in that state (DOT and SVG).
pub fn state_colour(state: Option<JobState>) -> Option<&'static str> {
    match state? {
        JobState::Finished => Some("palegreen"),
        JobState::Running => Some("lightskyblue"),
        JobState::Queued => Some("lightyellow"),
        JobState::Failed => Some("salmon"),
        JobState::Unknown => None,
    }
}

/// A DAG as JSON: its jobs (by worker) and edges.
pub fn dag_json(p: &Pipeline) -> Value {
    let jobs: Vec<&str> = p.jobs().map(|(_, j)| j.worker.as_str()).collect();
    let edges: Vec<[&str; 2]> = p
        .edges()
        .map(|(a, b)| [p.job(a).worker.as_str(), p.job(b).worker.as_str()])
        .collect();
    json!({"jobs": jobs, "edges": edges, "data": p.data()})
}

fn secs_text(secs: f64) -> String {
    if secs < 1.0 {
        format!("{:.0} ms", secs * 1000.0)
    } else if secs < 120.0 {
        format!("{secs:.1} s")
    } else if secs < 7200.0 {
        format!("{:.0} min", secs / 60.0)
    } else {
        format!("{:.1} h", secs / 3600.0)
    }
}

fn bytes_text(bytes: u64) -> String {
    let mib = bytes as f64 / (1024.0 * 1024.0);
    if mib >= 1024.0 {
        format!("{:.1} GiB", mib / 1024.0)
    } else {
        format!("{mib:.0} MiB")
    }
}

/// The cluster status as text.
pub fn status(s: &ClusterStatus, colour: bool) -> String {
    let mut out = String::new();
    let live = |role| {
        s.peers
            .iter()
            .filter(|p| p.peer.role == role && !p.gone)
            .count()
    };
    let _ = writeln!(
        out,
        "{} up {} · {} broker(s) · {} pipeliner(s) · {} request(s) waiting for work",
        paint(colour, BOLD, "router"),
        secs_text(s.uptime_secs),
        live(PeerRole::Broker),
        live(PeerRole::Pipeliner),
        s.waiting_requests
    );
    let p = &s.pipelines;
    let _ = writeln!(
        out,
        "pipelines: {} queued, {} running · since start: {} finished, {} failed, {} cancelled",
        p.queued, p.running, p.finished, p.failed, p.cancelled
    );
    let m = &s.last_minute;
    let per_sec = if m.window_secs > 0.0 {
        m.jobs_finished as f64 / m.window_secs
    } else {
        0.0
    };
    let _ = writeln!(
        out,
        "last {}: {} jobs finished ({per_sec:.1}/s), {} failed · {} pipelines finished, {} failed or cancelled",
        secs_text(m.window_secs),
        m.jobs_finished,
        m.jobs_failed,
        m.pipelines_finished,
        m.pipelines_failed
    );
    for u in &s.unserved {
        let _ = writeln!(
            out,
            "{}",
            paint(
                colour,
                YELLOW,
                &format!(
                    "no broker runs worker {}: {} job(s) waiting for {}",
                    u.worker,
                    u.jobs,
                    secs_text(u.waiting_secs)
                )
            )
        );
    }
    if !s.workers.is_empty() {
        let width = s.workers.keys().map(String::len).max().unwrap_or(6).max(6);
        let _ = writeln!(
            out,
            "\n{}",
            paint(
                colour,
                BOLD,
                &format!(
                    "{:<width$}  {:>7} {:>7} {:>7} {:>9} {:>7} {:>7} {:>7}",
                    "WORKER",
                    "QUEUED",
                    "DELAYED",
                    "RUNNING",
                    "FINISHED",
                    "FAILED",
                    "RETRIED",
                    "BROKERS"
                )
            )
        );
        for (name, w) in &s.workers {
            let line = format!(
                "{name:<width$}  {:>7} {:>7} {:>7} {:>9} {:>7} {:>7} {:>7}",
                w.queued, w.delayed, w.running, w.finished, w.failed, w.retried, w.brokers
            );
            let style = if w.brokers == 0 && w.queued > 0 {
                YELLOW
            } else {
                Style::new()
            };
            let _ = writeln!(out, "{}", paint(colour, style, &line));
        }
    }
    if !s.peers.is_empty() {
        // The id is host-pid-random: the host and pid columns say it (`--json` has the id).
        let host_width = s
            .peers
            .iter()
            .map(|p| p.peer.host.len())
            .max()
            .unwrap_or(4)
            .max(4);
        let _ = writeln!(
            out,
            "\n{}",
            paint(
                colour,
                BOLD,
                &format!(
                    "{:<9} {:<host_width$} {:>8} {:>9} {:>6} {:>9} {:>10}  WORKERS",
                    "ROLE", "HOST", "PID", "RUNNING", "CPU", "MEMORY", "LAST SEEN"
                )
            )
        );
        for p in &s.peers {
            let role = match p.peer.role {
                PeerRole::Broker => "broker",
                PeerRole::Pipeliner => "pipeliner",
            };
            let (cpu, mem) = p.peer.load.as_ref().map_or(("-".into(), "-".into()), |l| {
                (
                    format!("{:.0}%", l.cpu_percent),
                    bytes_text(l.resident_memory),
                )
            });
            let running = if p.peer.slots > 0 {
                format!("{}/{}", p.peer.running, p.peer.slots)
            } else {
                p.peer.running.to_string()
            };
            let seen = if p.gone {
                format!("gone {}", secs_text(p.last_seen_secs))
            } else {
                format!("{} ago", secs_text(p.last_seen_secs))
            };
            let line = format!(
                "{role:<9} {:<host_width$} {:>8} {running:>9} {cpu:>6} {mem:>9} {seen:>10}  {}",
                p.peer.host,
                p.peer.pid,
                p.peer.workers.join(", ")
            );
            let style = if p.gone { RED } else { Style::new() };
            let _ = writeln!(out, "{}", paint(colour, style, &line));
        }
    }
    if !s.recent_failures.is_empty() {
        let _ = writeln!(
            out,
            "\n{}",
            paint(colour, BOLD, "recent failures (newest first)")
        );
        for f in &s.recent_failures {
            let what = match (&f.pipeline_id, &f.job_id) {
                (Some(p), Some(j)) => format!("pipeline {p} job {j}"),
                (Some(p), None) => format!("pipeline {p}"),
                (None, Some(j)) => format!("job {j}"),
                (None, None) => "?".into(),
            };
            let _ = writeln!(
                out,
                "  {:>8} ago  {what} ({}): {}",
                secs_text(f.secs_ago),
                f.worker,
                paint(colour, RED, &f.error)
            );
        }
    }
    out
}

/// One pipeline as text: its state, then each job (in the DAG's order when the router still
/// has the DAG) with its worker, state, attempts, duration and error.
pub fn pipeline(
    id: &PipelineId,
    s: &PipelineStatus,
    details: Option<&PipelineDetails>,
    dag: Option<&Pipeline>,
    colour: bool,
) -> String {
    let mut out = String::new();
    let state = match s.state {
        PipelineState::Queued => paint(colour, Style::new(), "queued (waiting for a pipeliner)"),
        PipelineState::Running => paint(colour, BOLD, "running"),
        PipelineState::Finished => paint(colour, GREEN, "finished"),
        PipelineState::Failed => paint(colour, RED, "failed"),
        PipelineState::Cancelled => paint(colour, YELLOW, "cancelled"),
        PipelineState::Unknown => "unknown".into(),
    };
    let _ = write!(out, "pipeline {id}: {state}");
    if let Some(d) = &s.duration {
        let _ = write!(out, " in {}", secs_text(d.as_secs()));
    }
    out.push('\n');
    if let (Some(worker), Some(error)) = (&s.worker, &s.error) {
        let job = s
            .job_id
            .as_ref()
            .map_or(String::new(), |j| format!("job {j} "));
        let _ = writeln!(
            out,
            "  {job}of worker {worker}: {}",
            paint(colour, RED, error)
        );
    }
    let Some(dag) = dag else {
        if matches!(
            s.state,
            PipelineState::Finished | PipelineState::Failed | PipelineState::Cancelled
        ) {
            let _ = writeln!(
                out,
                "  (ended: the router keeps only its outcome, not its jobs)"
            );
        }
        return out;
    };
    let jobs = details.map_or(&[][..], |d| d.jobs.as_slice());
    let width = dag
        .jobs()
        .map(|(_, j)| j.worker.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let _ = writeln!(
        out,
        "\n{}",
        paint(
            colour,
            BOLD,
            &format!(
                "{:<width$}  {:<9} {:>8} {:>9}  {:<32}  ERROR",
                "JOB", "STATE", "ATTEMPTS", "DURATION", "JOB ID"
            )
        )
    );
    // The DAG's order: parents before children (a topological order by worker name).
    let mut order: Vec<&str> = Vec::new();
    let mut done = std::collections::HashSet::new();
    while order.len() < dag.len() {
        let mut ready: Vec<&str> = dag
            .jobs()
            .filter(|(i, j)| {
                !done.contains(&j.worker.as_str())
                    && dag
                        .parents(*i)
                        .all(|p| done.contains(&dag.job(p).worker.as_str()))
            })
            .map(|(_, j)| j.worker.as_str())
            .collect();
        if ready.is_empty() {
            break;
        }
        ready.sort_unstable();
        for w in ready {
            done.insert(w);
            order.push(w);
        }
    }
    for worker in order {
        let job = jobs.iter().rev().find(|j| j.worker == worker);
        let (state, style) = match job.map(|j| j.state) {
            None => ("waiting", Style::new()),
            Some(JobState::Queued) => ("queued", Style::new()),
            Some(JobState::Running) => ("running", BOLD),
            Some(JobState::Finished) => ("finished", GREEN),
            Some(JobState::Failed) => ("failed", RED),
            Some(JobState::Unknown) => ("unknown", Style::new()),
        };
        let attempts = job.map_or(String::new(), |j| j.attempts.to_string());
        let duration = job
            .and_then(|j| j.duration)
            .map_or(String::new(), secs_text);
        let job_id = job.map_or(String::new(), |j| j.job_id.to_string());
        let error = job.and_then(|j| j.error.clone()).unwrap_or_default();
        let _ = writeln!(
            out,
            "{worker:<width$}  {} {attempts:>8} {duration:>9}  {job_id:<32}  {}",
            paint(colour, style, &format!("{state:<9}")),
            paint(colour, RED, &error)
        );
    }
    out
}

/// An event as one line, with the local time of day.
pub fn event_line(at: f64, event: &Event, colour: bool) -> String {
    let secs = at as u64;
    let time = format!(
        "{:02}:{:02}:{:02}.{:03}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60,
        ((at.fract()) * 1000.0) as u64
    );
    let style = match event {
        Event::JobFailed { .. } | Event::PipelineFailed { .. } => RED,
        Event::PipelineCancelled { .. } => YELLOW,
        Event::PipelineFinished { .. } => GREEN,
        _ => Style::new(),
    };
    format!("{time} UTC  {}", paint(colour, style, &event.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pypelinin_common::protocol::cluster::{Peer, PeerStatus, UnservedWorker, WorkerStatus};

    #[test]
    fn the_status_text_names_hosts_gone_peers_and_unserved_workers() {
        let mut broker = Peer::new(PeerRole::Broker, vec!["Upper".into()]);
        broker.host = "gpu-7".into();
        broker.running = 1;
        broker.slots = 4;
        let status = ClusterStatus {
            uptime_secs: 90.0,
            workers: [(
                "Upper".to_owned(),
                WorkerStatus {
                    queued: 3,
                    brokers: 1,
                    ..WorkerStatus::default()
                },
            )]
            .into_iter()
            .collect(),
            peers: vec![PeerStatus {
                peer: broker,
                last_seen_secs: 12.0,
                gone: true,
            }],
            unserved: vec![UnservedWorker {
                worker: "Nobody".into(),
                jobs: 2,
                waiting_secs: 180.0,
            }],
            ..ClusterStatus::default()
        };
        let text = super::status(&status, false);
        assert!(
            text.contains("no broker runs worker Nobody: 2 job(s) waiting for 3 min"),
            "{text}"
        );
        let line = text
            .lines()
            .find(|l| l.starts_with("broker"))
            .unwrap_or_default();
        assert!(
            line.contains("gpu-7") && line.contains("1/4") && line.contains("gone 12.0 s"),
            "{line}"
        );
        assert!(
            !text.contains('\u{1b}'),
            "colours without a terminal: {text}"
        );
    }
}
