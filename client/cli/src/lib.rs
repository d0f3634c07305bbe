//! The `pypelinin` command-line tool: submit pipelines described in a file, see what the
//! cluster does, look at one pipeline, cancel, watch the events, draw a pipeline.
//!
//! Every subcommand takes the router's endpoints (`--api`, `--broadcast`, or `[client]` of
//! `--config`, or `PYPELININ_API`/`PYPELININ_BROADCAST`), the cluster token (`[cluster] token`
//! or `PYPELININ_TOKEN`) and `--json` for output a script reads. Exit codes: 0 all went well,
//! 1 a pipeline failed or was cancelled (or could not be cancelled), 2 a usage error or a
//! router that cannot be reached. Colours only on a terminal (and never with `NO_COLOR`).
//!
//! - [`dashboard`]: the live web dashboard (`pypelinin dashboard`).
//! - [`file`]: the pipeline file format.
//! - [`render`]: how status and pipelines are printed for people.

pub mod dashboard;
pub mod file;
pub mod render;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use pypelinin_common::daemon::config::{secs, DaemonArgs, DaemonSettings};
use pypelinin_common::pipeline::Pipeline;
use pypelinin_common::protocol::{AnswerKind, Event, PipelineState, ReplyError};
use pypelinin_common::transport::{ApiClient, ClientError, ClientOptions, Subscriber};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use pypelinin_client::{Outcome, PipelineId, PipelineManager};

/// A command's result: its exit code.
pub type Exit = std::process::ExitCode;

/// `pypelinin`: drive a pypelinin cluster.
#[derive(Debug, Parser)]
#[command(
    name = "pypelinin",
    version,
    about = "Drive a pypelinin cluster: submit pipelines from a file, see the cluster at a glance, show, cancel and watch pipelines",
    long_about = None
)]
pub struct Cli {
    /// The router's endpoints and a settings file ([client] and [cluster] tables).
    #[command(flatten)]
    pub daemon: DaemonArgs,
    /// Print JSON (one document; `watch`: one per line) instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Submit the pipelines of a TOML or JSON file; print their ids, or with --wait follow
    /// them to their end.
    Submit {
        /// The pipeline file (see docs/operations.md for its format).
        file: PathBuf,
        /// Submit this many copies of each pipeline of the file.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        count: u32,
        /// Set KEY of the pipeline data to VALUE (JSON, else a string; `{i}` is the copy's
        /// number). May be repeated.
        #[arg(long = "data", value_name = "KEY=VALUE")]
        data: Vec<String>,
        /// Fail each pipeline that has not ended this many seconds after it was submitted
        /// (beats the file's deadline_secs).
        #[arg(long, value_name = "SECS")]
        deadline: Option<f64>,
        /// Wait for the pipelines to end, with a progress bar; list each failure.
        #[arg(long)]
        wait: bool,
    },
    /// The whole cluster at a glance: jobs per worker, pipelines, brokers and pipeliners,
    /// recent failures, the last minute's throughput, workers no broker runs.
    Status,
    /// One pipeline: its state and each job with its worker, state, attempts, duration and
    /// error.
    Show {
        /// The pipeline's id.
        id: String,
        /// Write its DAG as DOT, jobs coloured by state, to this file.
        #[arg(long, value_name = "FILE")]
        dot: Option<PathBuf>,
        /// Write its DAG as SVG, jobs coloured by state, to this file.
        #[arg(long, value_name = "FILE")]
        svg: Option<PathBuf>,
    },
    /// Cancel pipelines: their waiting jobs are dropped and running ones stopped.
    Cancel {
        /// The pipelines' ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Print the cluster's events as they happen (Ctrl-C stops).
    Watch {
        /// Only the events of this pipeline (and of its jobs).
        #[arg(long, value_name = "ID")]
        pipeline: Option<String>,
        /// Only these kinds of event: new-job, new-pipeline, job-finished, job-failed,
        /// pipeline-finished, pipeline-failed, pipeline-cancelled. May be repeated.
        #[arg(long = "event", value_name = "KIND")]
        events: Vec<String>,
        /// Stop after this many events.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
    },
    /// Serve a live web dashboard of the cluster: throughput, queues, brokers, failures,
    /// pipelines and their DAGs (Ctrl-C stops).
    Dashboard {
        /// Where to listen. Anything but a loopback address exposes the cluster to the
        /// network, and is refused unless the cluster has a token (which a cancel must give).
        #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
    },
    /// Print the DOT text of the pipelines of a file (checking it as submit does).
    Dot {
        /// The pipeline file.
        file: PathBuf,
        /// Also write an SVG drawing (laid out without Graphviz); several pipelines go to
        /// FILE-1.svg, FILE-2.svg, ...
        #[arg(long, value_name = "FILE")]
        svg: Option<PathBuf>,
    },
}

/// The tool's settings: `[client]` of the settings file, `PYPELININ_*`, then the flags.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct ClientSettings {
    /// The router's API endpoint (`PYPELININ_API`).
    pub api: String,
    /// The router's broadcast endpoint (`PYPELININ_BROADCAST`).
    pub broadcast: String,
    /// The cluster token (`[cluster] token` or `PYPELININ_TOKEN`).
    pub token: Option<String>,
    /// How long to wait for the router to accept a connection, in seconds.
    pub connect_timeout_secs: f64,
    /// How long to wait for a reply, in seconds.
    pub request_timeout_secs: f64,
}

impl Default for ClientSettings {
    fn default() -> Self {
        Self {
            api: pypelinin_common::DEFAULT_API.to_owned(),
            broadcast: pypelinin_common::DEFAULT_BROADCAST.to_owned(),
            token: None,
            connect_timeout_secs: 3.0,
            request_timeout_secs: 10.0,
        }
    }
}

impl DaemonSettings for ClientSettings {
    fn api_mut(&mut self) -> &mut String {
        &mut self.api
    }
    fn broadcast_mut(&mut self) -> &mut String {
        &mut self.broadcast
    }
    fn token_mut(&mut self) -> &mut Option<String> {
        &mut self.token
    }
}

/// A failure that ends the tool with exit code 2 (usage, file or connection), said once.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Failure(String);

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        // Transport errors say already which address could not be reached.
        Failure(e.to_string())
    }
}

impl From<pypelinin_client::Error> for Failure {
    fn from(e: pypelinin_client::Error) -> Self {
        match e {
            pypelinin_client::Error::Router(e) => e.into(),
            e => Failure(e.to_string()),
        }
    }
}

/// How the tool talks to the router.
struct Context {
    settings: ClientSettings,
    options: ClientOptions,
    json: bool,
    colour: bool,
}

impl Context {
    async fn client(&self) -> Result<ApiClient, Failure> {
        let client = ApiClient::connect(&self.settings.api, self.options)
            .await
            .map_err(|e| Failure(e.to_string()))?;
        Ok(client.with_token(self.settings.token.clone()))
    }

    async fn manager(&self) -> Result<PipelineManager, Failure> {
        PipelineManager::connect_with(
            &self.settings.api,
            &self.settings.broadcast,
            self.options,
            self.settings.token.clone(),
        )
        .await
        .map_err(Failure::from)
    }
}

/// Runs the tool with `cli`; returns the exit code (and prints what went wrong).
pub async fn run(cli: Cli) -> Exit {
    match run_inner(cli).await {
        Ok(code) => code,
        Err(Failure(message)) => {
            eprintln!("pypelinin: {message}");
            Exit::from(2)
        }
    }
}

async fn run_inner(cli: Cli) -> Result<Exit, Failure> {
    // `dot` needs no router (and no settings).
    if let Command::Dot { file, svg } = &cli.command {
        return dot(file, svg.as_deref(), cli.json);
    }
    let (settings, _) = cli
        .daemon
        .load::<ClientSettings>("client")
        .map_err(|e| Failure(format!("{e:#}")))?;
    let secs_of = |name, value, default| {
        secs(name, value, Duration::from_secs(default)).map_err(|e| Failure(e.to_string()))
    };
    let options = ClientOptions {
        connect_timeout: secs_of("connect_timeout_secs", settings.connect_timeout_secs, 3)?,
        request_timeout: secs_of("request_timeout_secs", settings.request_timeout_secs, 10)?,
        ..ClientOptions::default()
    };
    let ctx = Context {
        settings,
        options,
        json: cli.json,
        colour: !cli.json
            && std::io::stdout().is_terminal()
            && std::env::var_os("NO_COLOR").is_none(),
    };
    match cli.command {
        Command::Submit {
            file,
            count,
            data,
            deadline,
            wait,
        } => submit(&ctx, &file, count, &data, deadline, wait).await,
        Command::Status => status(&ctx).await,
        Command::Show { id, dot, svg } => show(&ctx, &id, dot.as_deref(), svg.as_deref()).await,
        Command::Cancel { ids } => cancel(&ctx, &ids).await,
        Command::Watch {
            pipeline,
            events,
            count,
        } => watch(&ctx, pipeline, &events, count).await,
        Command::Dashboard { listen } => serve_dashboard(&ctx, listen).await,
        Command::Dot { .. } => Ok(Exit::SUCCESS),
    }
}

async fn serve_dashboard(ctx: &Context, listen: std::net::SocketAddr) -> Result<Exit, Failure> {
    if dashboard::exposes(&listen) {
        if ctx.settings.token.is_none() {
            return Err(Failure(format!(
                "refusing to serve the dashboard on {listen}: it would expose the cluster to the \
                 network without a token (set [cluster] token or PYPELININ_TOKEN, or listen on \
                 127.0.0.1)"
            )));
        }
        eprintln!(
            "pypelinin: warning: the dashboard on {listen} exposes the cluster to the network \
             (a cancel needs the cluster token)"
        );
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| Failure(format!("cannot listen on {listen}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| Failure(format!("cannot listen on {listen}: {e}")))?;
    println!(
        "dashboard: http://{bound}/ (router {}; Ctrl-C stops)",
        ctx.settings.api
    );
    let _ = std::io::stdout().flush();
    let connect = dashboard::Connect {
        api: ctx.settings.api.clone(),
        broadcast: Some(ctx.settings.broadcast.clone()),
        options: ctx.options,
        token: ctx.settings.token.clone(),
    };
    let stop = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    dashboard::serve(listener, connect, stop)
        .await
        .map_err(|e| Failure(format!("the dashboard stopped: {e}")))?;
    Ok(Exit::SUCCESS)
}

/// Prints `value` as one line of JSON.
fn print_json(value: &Value) {
    println!("{value}");
}

async fn submit(
    ctx: &Context,
    path: &Path,
    count: u32,
    data: &[String],
    deadline: Option<f64>,
    wait: bool,
) -> Result<Exit, Failure> {
    let read = file::read(path).map_err(|e| Failure(e.to_string()))?;
    let deadline = match deadline {
        None => None,
        Some(s) if s > 0.0 && s <= 365.0 * 24.0 * 3600.0 => Some(Duration::from_secs_f64(s)),
        Some(s) => {
            return Err(Failure(format!(
                "--deadline {s}: give a number of seconds above 0 and at most a year"
            )))
        }
    };
    // Copies in order, grouped by deadline so each group goes in few round trips.
    let mut groups: Vec<(Option<Duration>, Vec<Pipeline>)> = Vec::new();
    for p in &read {
        let d = deadline.or(p.deadline);
        for i in 1..=count as usize {
            let copy = file::with_data(&p.pipeline, data, i).map_err(Failure)?;
            match groups.last_mut() {
                Some((gd, list)) if *gd == d => list.push(copy),
                _ => groups.push((d, vec![copy])),
            }
        }
    }
    let mut manager = ctx.manager().await?;
    let mut ids = Vec::new();
    for (d, list) in &groups {
        ids.extend(manager.start_many_with_deadline(list, *d).await?);
    }
    if !wait {
        if ctx.json {
            print_json(&json!({ "pipeline ids": ids }));
        } else {
            for id in &ids {
                println!("{id}");
            }
        }
        return Ok(Exit::SUCCESS);
    }
    let started = Instant::now();
    let bar = if ctx.json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(ids.len() as u64)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} pipelines ended {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let mut outcomes: std::collections::HashMap<PipelineId, Outcome> = Default::default();
    let mut failed = 0;
    while outcomes.len() < ids.len() {
        let Some((id, outcome)) = manager.wait_any(Duration::from_secs(3600)).await? else {
            if manager.running() == 0 {
                // Nothing left to wait for, though not every outcome came: never loop idle.
                return Err(Failure(format!(
                    "{} of {} pipelines ended; the others are no longer followed",
                    outcomes.len(),
                    ids.len()
                )));
            }
            continue;
        };
        if !matches!(outcome, Outcome::Finished(_)) {
            failed += 1;
            bar.set_message(format!("({failed} failed)"));
        }
        outcomes.insert(id, outcome);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let elapsed = started.elapsed().as_secs_f64();
    let ended: Vec<(&PipelineId, &Outcome)> = ids
        .iter()
        .filter_map(|id| outcomes.get(id).map(|o| (id, o)))
        .collect();
    if ctx.json {
        let list: Vec<Value> = ended.iter().map(|(id, o)| outcome_json(id, o)).collect();
        print_json(&json!({ "pipelines": list, "failed": failed, "seconds": elapsed }));
    } else {
        let mut out = std::io::stdout().lock();
        for (id, outcome) in &ended {
            match outcome {
                Outcome::Finished(_) => {}
                Outcome::Failed(f) => {
                    let _ = writeln!(
                        out,
                        "{}",
                        render::paint(
                            ctx.colour,
                            render::RED,
                            &format!(
                                "pipeline {id} failed: job {} of worker {}: {}",
                                f.job_id, f.worker, f.error
                            )
                        )
                    );
                }
                Outcome::Cancelled => {
                    let _ = writeln!(
                        out,
                        "{}",
                        render::paint(
                            ctx.colour,
                            render::YELLOW,
                            &format!("pipeline {id} was cancelled")
                        )
                    );
                }
                Outcome::Unknown => {
                    let _ = writeln!(out, "pipeline {id}: the router forgot it (restarted without its durable record?)");
                }
            }
        }
        let finished = ended.len() - failed;
        let _ = writeln!(
            out,
            "{} pipeline(s) finished, {failed} failed or cancelled, in {elapsed:.2} s",
            finished
        );
    }
    Ok(if failed == 0 {
        Exit::SUCCESS
    } else {
        Exit::from(1)
    })
}

/// A pipeline's outcome as JSON (`submit --wait --json`).
fn outcome_json(id: &PipelineId, outcome: &Outcome) -> Value {
    match outcome {
        Outcome::Finished(secs) => {
            json!({"pipeline id": id, "state": "finished", "duration": secs})
        }
        Outcome::Failed(f) => {
            json!({"pipeline id": id, "state": "failed", "job id": f.job_id, "worker": f.worker, "error": f.error})
        }
        Outcome::Cancelled => json!({"pipeline id": id, "state": "cancelled"}),
        Outcome::Unknown => json!({"pipeline id": id, "state": "unknown"}),
    }
}

async fn status(ctx: &Context) -> Result<Exit, Failure> {
    let status = ctx.client().await?.cluster_status().await?;
    if ctx.json {
        print_json(&serde_json::to_value(&status).unwrap_or_default());
    } else {
        print!("{}", render::status(&status, ctx.colour));
    }
    Ok(Exit::SUCCESS)
}

async fn show(
    ctx: &Context,
    id: &str,
    dot: Option<&Path>,
    svg: Option<&Path>,
) -> Result<Exit, Failure> {
    let id = PipelineId::from(id);
    let mut all = ctx
        .client()
        .await?
        .pipeline_details(vec![id.clone()])
        .await?;
    let (status, details) = all
        .remove(&id)
        .ok_or_else(|| Failure(format!("the router did not answer for pipeline {id}")))?;
    if status.state == PipelineState::Unknown {
        if ctx.json {
            print_json(&json!({"pipeline id": id, "state": "unknown"}));
        }
        return Err(Failure(format!(
            "the router does not know pipeline {id} (never submitted, or ended longer ago than its retention_secs)"
        )));
    }
    let pipeline = details
        .as_ref()
        .and_then(|d| Pipeline::from_legacy(&d.pipeline).ok());
    if dot.is_some() || svg.is_some() {
        let Some(p) = &pipeline else {
            return Err(Failure(format!(
                "pipeline {id} has ended: the router keeps only its outcome, not its DAG"
            )));
        };
        let colour = |w: &str| render::state_colour(render::job_state(details.as_ref(), w));
        if let Some(path) = dot {
            std::fs::write(path, p.to_dot_coloured(colour))
                .map_err(|e| Failure(format!("cannot write {}: {e}", path.display())))?;
        }
        if let Some(path) = svg {
            let text = p.to_svg(colour).map_err(|e| Failure(e.to_string()))?;
            std::fs::write(path, text)
                .map_err(|e| Failure(format!("cannot write {}: {e}", path.display())))?;
        }
    }
    if ctx.json {
        let mut value = serde_json::to_value(&status).unwrap_or_default();
        if let Value::Object(map) = &mut value {
            map.insert("pipeline id".into(), json!(id));
            if let Some(d) = &details {
                map.insert(
                    "jobs".into(),
                    serde_json::to_value(&d.jobs).unwrap_or_default(),
                );
            }
            // The DAG, readable: jobs and edges by worker name.
            if let Some(p) = &pipeline {
                map.insert("pipeline".into(), render::dag_json(p));
            }
        }
        print_json(&value);
    } else {
        print!(
            "{}",
            render::pipeline(
                &id,
                &status,
                details.as_ref(),
                pipeline.as_ref(),
                ctx.colour
            )
        );
    }
    Ok(match status.state {
        PipelineState::Failed | PipelineState::Cancelled => Exit::from(1),
        _ => Exit::SUCCESS,
    })
}

async fn cancel(ctx: &Context, ids: &[String]) -> Result<Exit, Failure> {
    let mut client = ctx.client().await?;
    let mut all_cancelled = true;
    let mut results = Vec::new();
    for id in ids {
        let id = PipelineId::from(id.as_str());
        let (result, error) = match client.cancel_pipeline(id.clone()).await {
            Ok(()) => ("cancelled", None),
            Err(ClientError::Reply(ReplyError::Refused(answer))) => {
                all_cancelled = false;
                let result = match answer.answer {
                    AnswerKind::PipelineEnded => "ended",
                    AnswerKind::UnknownPipelineId => "unknown",
                    _ => "refused",
                };
                (
                    result,
                    Some(
                        answer
                            .error
                            .unwrap_or_else(|| format!("{:?}", answer.answer)),
                    ),
                )
            }
            Err(e) => return Err(e.into()),
        };
        if !ctx.json {
            match &error {
                None => println!("cancelled {id}"),
                Some(e) => println!("{id}: {e}"),
            }
        }
        results.push(json!({"pipeline id": id, "result": result, "error": error}));
    }
    if ctx.json {
        print_json(&json!({ "pipelines": results }));
    }
    Ok(if all_cancelled {
        Exit::SUCCESS
    } else {
        Exit::from(1)
    })
}

/// The kind of `event`, as `watch --event` names it.
fn event_kind(event: &Event) -> &'static str {
    match event {
        Event::NewJob => "new-job",
        Event::NewPipeline => "new-pipeline",
        Event::JobFinished { .. } => "job-finished",
        Event::JobFailed { .. } => "job-failed",
        Event::PipelineFinished { .. } => "pipeline-finished",
        Event::PipelineFailed { .. } => "pipeline-failed",
        Event::PipelineCancelled { .. } => "pipeline-cancelled",
        Event::Probe { .. } => "probe",
    }
}

const EVENT_KINDS: &[&str] = &[
    "new-job",
    "new-pipeline",
    "job-finished",
    "job-failed",
    "pipeline-finished",
    "pipeline-failed",
    "pipeline-cancelled",
];

async fn watch(
    ctx: &Context,
    pipeline: Option<String>,
    kinds: &[String],
    count: Option<u64>,
) -> Result<Exit, Failure> {
    if let Some(bad) = kinds.iter().find(|k| !EVENT_KINDS.contains(&k.as_str())) {
        return Err(Failure(format!(
            "--event {bad}: the kinds are {}",
            EVENT_KINDS.join(", ")
        )));
    }
    let pipeline = pipeline.map(|p| PipelineId::from(p.as_str()));
    let mut client = ctx.client().await?;
    let mut events =
        Subscriber::connect(&ctx.settings.broadcast, &[""], ctx.options.connect_timeout)
            .await
            .map_err(|e| Failure(e.to_string()))?;
    events
        .wait_live(&mut client, ctx.options.request_timeout)
        .await?;
    if !ctx.json {
        eprintln!("watching {} (Ctrl-C stops)", ctx.settings.broadcast);
    }
    // The jobs of the watched pipeline, learnt from the router as their events come.
    let mut jobs_of_pipeline: std::collections::HashSet<pypelinin_common::ids::JobId> =
        Default::default();
    let mut shown = 0u64;
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        if count.is_some_and(|n| shown >= n) {
            return Ok(Exit::SUCCESS);
        }
        let event = tokio::select! {
            _ = &mut interrupted => return Ok(Exit::SUCCESS),
            event = events.recv() => event.map_err(|e| Failure(format!("the subscription failed: {e}")))?,
        };
        if matches!(event, Event::Probe { .. }) {
            continue;
        }
        let kind = event_kind(&event);
        if !kinds.is_empty() && !kinds.iter().any(|k| k == kind) {
            continue;
        }
        if let Some(p) = &pipeline {
            let ours = match &event {
                Event::PipelineFinished { pipeline_id, .. }
                | Event::PipelineFailed { pipeline_id, .. }
                | Event::PipelineCancelled { pipeline_id } => pipeline_id == p,
                Event::JobFinished { job_id, .. } | Event::JobFailed { job_id, .. } => {
                    if !jobs_of_pipeline.contains(job_id) {
                        if let Some((_, Some(details))) =
                            client.pipeline_details(vec![p.clone()]).await?.remove(p)
                        {
                            jobs_of_pipeline.extend(details.jobs.into_iter().map(|j| j.job_id));
                        }
                    }
                    jobs_of_pipeline.contains(job_id)
                }
                _ => false,
            };
            if !ours {
                continue;
            }
        }
        shown += 1;
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        if ctx.json {
            print_json(&json!({"at": at, "kind": kind, "event": event.to_string()}));
        } else {
            println!("{}", render::event_line(at, &event, ctx.colour));
        }
        let _ = std::io::stdout().flush();
    }
}

fn dot(path: &Path, svg: Option<&Path>, json: bool) -> Result<Exit, Failure> {
    let read = file::read(path).map_err(|e| Failure(e.to_string()))?;
    let mut dots = Vec::new();
    for (i, p) in read.iter().enumerate() {
        let text = p.pipeline.to_dot();
        if let Some(svg) = svg {
            let target = if read.len() == 1 {
                svg.to_path_buf()
            } else {
                let stem = svg
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                svg.with_file_name(format!("{stem}-{}.svg", i + 1))
            };
            let drawn = p
                .pipeline
                .to_svg(|_| None)
                .map_err(|e| Failure(e.to_string()))?;
            std::fs::write(&target, drawn)
                .map_err(|e| Failure(format!("cannot write {}: {e}", target.display())))?;
        }
        dots.push(text);
    }
    if json {
        print_json(&json!({ "dot": dots }));
    } else {
        println!("{}", dots.join("\n\n"));
    }
    Ok(Exit::SUCCESS)
}
