//! `bench`: a cluster benchmark.
//!
//! Starts a real cluster (router, brokers, pipeliners as separate processes of our binaries,
//! on free loopback ports, in a temporary data folder), submits N pipelines of no-op jobs from
//! one client with a bounded in-flight window, waits for all, measures sequential single
//! pipelines for latency, stops everything, and prints a table followed, as its last line, by
//! one JSON object. `--router-clients K` instead measures the router alone: K clients sending
//! small requests.

use std::collections::HashSet;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use pypelinin_client::{Outcome, Pipeline, PipelineManager};
use pypelinin_common::transport::{ApiClient, ClientOptions};
use pypelinin_example::process::{ensure_binaries, sibling, Daemon};
use pypelinin_example::workers::noop_name;
use serde_json::json;

/// mimalloc: the daemons allocate many small JSON values; it halves the time spent in
/// the allocator (see docs/performance.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Benchmarks a whole pypelinin cluster on this machine.
#[derive(Debug, Parser)]
#[command(name = "bench", version)]
struct Cli {
    /// Pipelines to push through for the throughput figure.
    #[arg(long, default_value_t = 2000)]
    pipelines: usize,
    /// Broker processes.
    #[arg(long, default_value_t = 1)]
    brokers: usize,
    /// Pipeliner processes; 0 only queues the pipelines and reports the router's memory.
    #[arg(long, default_value_t = 1)]
    pipeliners: usize,
    /// Jobs each broker runs at once.
    #[arg(long, default_value_t = 2)]
    concurrency: usize,
    /// Jobs each broker takes ahead of its free slots [default: the broker's default].
    #[arg(long)]
    prefetch: Option<usize>,
    /// Jobs per pipeline.
    #[arg(long, default_value_t = 2)]
    jobs_per_pipeline: usize,
    /// Shape of the pipeline.
    #[arg(long, value_enum, default_value_t = Shape::Chain)]
    shape: Shape,
    /// Bytes of payload in each pipeline's data.
    #[arg(long, default_value_t = 0)]
    payload_bytes: usize,
    /// Sequential single pipelines for the latency percentiles.
    #[arg(long, default_value_t = 200)]
    latency_samples: usize,
    /// Pipelines in flight at once, at most.
    #[arg(long, default_value_t = 1000)]
    window: usize,
    /// Serve the router's Prometheus metrics and scrape them once a second during the run (to
    /// show what metrics cost).
    #[arg(long)]
    metrics: bool,
    /// Keep the router's queues in memory only (to show what durability costs).
    #[arg(long)]
    no_durability: bool,
    /// Give up after this many seconds (exit non-zero, saying what was left).
    #[arg(long, default_value_t = 600.0)]
    timeout: f64,
    /// Measure the router alone with K concurrent clients sending small requests.
    #[arg(long)]
    router_clients: Option<usize>,
    /// Keep the temporary folder (daemon logs, the router's data) and print where it is.
    #[arg(long)]
    keep: bool,
    /// Read the router's RSS each time this many more pipelines have ended (memory over a
    /// long run).
    #[arg(long, default_value_t = 100_000)]
    rss_every: usize,
    /// Seconds of the router micro-benchmark.
    #[arg(long, default_value_t = 5.0)]
    router_secs: f64,
    /// What runs the no-op jobs: Rust workers in the broker, a pool of Python process workers
    /// (`concurrency` processes per broker), or a Python command worker (a process per job).
    #[arg(long, value_enum, default_value_t = WorkerLanguage::Rust)]
    worker_language: WorkerLanguage,
}

/// What runs the benchmark's no-op jobs.
#[derive(Debug, Clone, Copy, PartialEq, ValueEnum)]
enum WorkerLanguage {
    /// Rust workers, in the broker's process.
    Rust,
    /// A pool of long-lived Python processes (`example/workers/noop_process.py`).
    PythonProcess,
    /// `python3` started for every job.
    PythonCommand,
}

/// The broker settings file that runs the no-op workers `names` in `language` (none for Rust).
fn worker_settings(language: WorkerLanguage, names: &[String], processes: usize) -> Option<String> {
    let quoted = |items: &[String]| {
        items
            .iter()
            .map(|n| format!("{n:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let workers = concat!(env!("CARGO_MANIFEST_DIR"), "/workers");
    match language {
        WorkerLanguage::Rust => None,
        WorkerLanguage::PythonProcess => {
            let mut command = vec!["python3".to_owned(), format!("{workers}/noop_process.py")];
            command.extend(names.iter().cloned());
            Some(format!(
                "[[broker.process_workers]]\nnames = [{}]\ncommand = [{}]\nprocesses = {processes}\n",
                quoted(names),
                quoted(&command)
            ))
        }
        WorkerLanguage::PythonCommand => Some(
            names
                .iter()
                .map(|n| {
                    format!(
                        "[[broker.command_workers]]\nname = {n:?}\ncommand = [\"python3\", \"-c\", \
                         \"import json, sys; json.load(sys.stdin); print('{{}}')\"]\n"
                    )
                })
                .collect(),
        ),
    }
}

/// The shape of a benchmark pipeline.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Shape {
    /// Noop0 → Noop1 → ... → NoopN-1.
    Chain,
    /// Noop0 → (Noop1 ... NoopN-2) → NoopN-1.
    Fan,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn pipeline(cli: &Cli, i: usize, payload: &str) -> anyhow::Result<Pipeline> {
    let n = cli.jobs_per_pipeline.max(1);
    let mut b = Pipeline::builder();
    match (cli.shape, n) {
        (_, 1) => b = b.job(noop_name(0)),
        (Shape::Chain, _) | (Shape::Fan, 2) => {
            for j in 0..n - 1 {
                b = b.edge(noop_name(j), noop_name(j + 1));
            }
        }
        (Shape::Fan, _) => {
            for j in 1..n - 1 {
                b = b
                    .edge(noop_name(0), noop_name(j))
                    .edge(noop_name(j), noop_name(n - 1));
            }
        }
    }
    let mut data = json!({"filename": format!("p{i}")});
    if !payload.is_empty() {
        data["payload"] = json!(payload);
    }
    Ok(b.data(data).build()?)
}

/// Peak resident memory of a process in MB (VmHWM; sysinfo has no peak figure).
fn peak_rss_mb(pid: u32) -> f64 {
    status_mb(pid, "VmHWM:")
}

fn rss_mb(pid: u32) -> f64 {
    status_mb(pid, "VmRSS:")
}

/// Bytes process `pid` has written through `write` calls so far (`wchar` of /proc/<pid>/io):
/// for the router, its journal and sorted files.
fn bytes_written(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("wchar:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// A memory line of /proc/<pid>/status, in MB.
fn status_mb(pid: u32, key: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// CPU seconds (user + system) a process used so far; 0 when unknown.
fn cpu_secs(pid: Option<u32>) -> f64 {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Clock ticks are 100 per second on Linux.
    (ticks(11) + ticks(12)) / 100.0
}

/// CPU seconds used by each role of the cluster (router, brokers, pipeliners, this client).
fn cluster_cpu(cluster: &Cluster) -> [f64; 4] {
    let sum = |ds: &[Daemon]| ds.iter().map(|d| cpu_secs(Some(d.pid()))).sum::<f64>();
    [
        cpu_secs(Some(cluster.router.pid())),
        sum(&cluster.brokers),
        sum(&cluster.pipeliners),
        cpu_secs(None),
    ]
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Scrapes a metrics URL once a second on a thread of its own until stopped.
struct Scraper {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<anyhow::Result<u64>>,
}

impl Scraper {
    fn start(url: String) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut scrapes = 0;
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                let body = ureq::get(&url)
                    .call()
                    .with_context(|| format!("scraping {url}"))?
                    .body_mut()
                    .read_to_string()?;
                anyhow::ensure!(
                    body.contains("pypelinin_requests_total"),
                    "a scrape without the request counters"
                );
                scrapes += 1;
                // Sleep a second, checking the stop flag every 50 ms.
                for _ in 0..20 {
                    if stopped.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            Ok(scrapes)
        });
        Self { stop, thread }
    }

    /// Stops it; the number of scrapes it made.
    fn stop(self) -> anyhow::Result<u64> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the scraper panicked"))?
    }
}

struct Cluster {
    router: Daemon,
    brokers: Vec<Daemon>,
    pipeliners: Vec<Daemon>,
    api: String,
    broadcast: String,
}

fn start_cluster(cli: &Cli, home: &Path) -> anyhow::Result<Cluster> {
    let home_arg = home.display().to_string();
    let mut router_args = vec![
        "--api",
        "tcp://127.0.0.1:0",
        "--broadcast",
        "tcp://127.0.0.1:0",
        "--home",
        &home_arg,
        "--no-store",
        "--monitoring-interval",
        "3600",
    ];
    if cli.no_durability {
        router_args.push("--no-durability");
    }
    if cli.metrics {
        router_args.extend(["--metrics", "127.0.0.1:0"]);
    }
    let args = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    let mut router = Daemon::spawn(
        "my_router",
        &sibling("my_router")?,
        &args(&router_args),
        Some(&home.join("router.log")),
    )?;
    let (api, broadcast) = router.read_endpoints()?;
    let jobs = cli.jobs_per_pipeline.max(1);
    let names: Vec<String> = (0..jobs).map(noop_name).collect();
    let settings = worker_settings(cli.worker_language, &names, cli.concurrency);
    let workers = if settings.is_some() { 0 } else { jobs }.to_string();
    let concurrency = cli.concurrency.to_string();
    let mut broker_args = vec![
        "--api",
        &api,
        "--broadcast",
        &broadcast,
        "--noop-workers",
        &workers,
        "--concurrency",
        &concurrency,
    ];
    let settings_file = home.join("broker.toml");
    let settings_arg = settings_file.display().to_string();
    if let Some(settings) = &settings {
        std::fs::write(&settings_file, settings).context("cannot write the broker's settings")?;
        broker_args.extend(["--config", &settings_arg]);
    }
    let prefetch = cli.prefetch.map(|p| p.to_string());
    if let Some(p) = &prefetch {
        broker_args.extend(["--prefetch", p]);
    }
    let mut brokers = Vec::new();
    for i in 0..cli.brokers {
        brokers.push(Daemon::spawn(
            "my_broker",
            &sibling("my_broker")?,
            &args(&broker_args),
            Some(&home.join(format!("broker-{i}.log"))),
        )?);
    }
    let mut pipeliners = Vec::new();
    for i in 0..cli.pipeliners {
        pipeliners.push(Daemon::spawn(
            "my_pipeliner",
            &sibling("my_pipeliner")?,
            &args(&["--api", &api, "--broadcast", &broadcast]),
            Some(&home.join(format!("pipeliner-{i}.log"))),
        )?);
    }
    Ok(Cluster {
        router,
        brokers,
        pipeliners,
        api,
        broadcast,
    })
}

async fn run(cli: &Cli) -> anyhow::Result<()> {
    ensure_binaries(&["my_router", "my_broker", "my_pipeliner"])?;
    let home = std::env::temp_dir().join(format!("pypelinin-bench-{}", std::process::id()));
    std::fs::create_dir_all(&home)?;
    let result = async {
        let mut cluster = start_cluster(cli, &home)?;
        let outcome = match cli.router_clients {
            Some(k) => router_bench(cli, &cluster, k).await,
            None if cli.pipeliners == 0 => queue_bench(cli, &cluster).await,
            None => cluster_bench(cli, &mut cluster).await,
        };
        for d in cluster
            .pipeliners
            .iter_mut()
            .chain(cluster.brokers.iter_mut())
        {
            d.stop(Duration::from_secs(10));
        }
        cluster.router.stop(Duration::from_secs(10));
        outcome
    }
    .await;
    if cli.keep {
        eprintln!("logs and data kept in {}", home.display());
    } else {
        let _ = std::fs::remove_dir_all(&home);
    }
    result
}

/// With no pipeliner: queues `--pipelines` pipelines and reports what they cost the router.
async fn queue_bench(cli: &Cli, cluster: &Cluster) -> anyhow::Result<()> {
    let mut m = PipelineManager::connect(&cluster.api, &cluster.broadcast)
        .await
        .context("cannot reach the benchmark's router")?;
    let payload = "x".repeat(cli.payload_bytes);
    let before = rss_mb(cluster.router.pid());
    let started = Instant::now();
    let mut sent = 0;
    while sent < cli.pipelines {
        let n = (cli.pipelines - sent).min(pypelinin_client::START_BATCH);
        let batch = (sent..sent + n)
            .map(|i| pipeline(cli, i, &payload))
            .collect::<Result<Vec<_>, _>>()?;
        m.start_many(&batch).await?;
        sent += n;
    }
    let wall = started.elapsed().as_secs_f64();
    let after = rss_mb(cluster.router.pid());
    println!("pypelinin queue benchmark (no pipeliner: every pipeline stays queued)");
    println!("  pipelines queued    {}", cli.pipelines);
    println!("  wall                {wall:.2} s");
    println!("  router RSS (MB)     {before:.1} before, {after:.1} after");
    println!(
        "{}",
        json!({
            "pipelines_queued": cli.pipelines,
            "wall_s": (wall * 1000.0).round() / 1000.0,
            "router_rss_before_mb": (before * 10.0).round() / 10.0,
            "router_rss_mb": (after * 10.0).round() / 10.0,
            "router_peak_rss_mb": (peak_rss_mb(cluster.router.pid()) * 10.0).round() / 10.0,
            "durable": !cli.no_durability,
        })
    );
    Ok(())
}

async fn router_bench(cli: &Cli, cluster: &Cluster, clients: usize) -> anyhow::Result<()> {
    let duration = Duration::from_secs_f64(cli.router_secs.max(0.1));
    let mut tasks = Vec::new();
    for _ in 0..clients.max(1) {
        let api = cluster.api.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = ApiClient::connect(api, ClientOptions::default()).await?;
            let end = Instant::now() + duration;
            let mut n = 0u64;
            while Instant::now() < end {
                // A small request the router answers from its queues: no job for this worker.
                c.get_job(Some(vec!["Nobody".into()])).await?;
                n += 1;
            }
            Ok::<u64, anyhow::Error>(n)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    let rate = total as f64 / duration.as_secs_f64();
    println!(
        "router micro-benchmark: {clients} clients, {total} requests in {:.1} s",
        duration.as_secs_f64()
    );
    println!("{rate:.0} requests/s");
    println!(
        "{}",
        json!({"router_clients": clients, "requests": total, "requests_per_s": rate.round(), "durable": !cli.no_durability})
    );
    Ok(())
}

async fn cluster_bench(cli: &Cli, cluster: &mut Cluster) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs_f64(cli.timeout);
    let mut m = PipelineManager::connect(&cluster.api, &cluster.broadcast)
        .await
        .context("cannot reach the benchmark's router")?;
    let payload = "x".repeat(cli.payload_bytes);

    // With --metrics, a scraper as Prometheus would be: a GET every second while the run lasts.
    let scraper = cluster
        .router
        .metrics_url()
        .map(|url| Scraper::start(url.to_owned()));

    // Throughput: N pipelines, at most `window` in flight.
    let started = Instant::now();
    let cpu_before = cluster_cpu(cluster);
    let written_before = bytes_written(cluster.router.pid());
    let mut sent = 0;
    let mut done = 0;
    let mut failed = 0;
    let mut in_flight: HashSet<pypelinin_client::PipelineId> = HashSet::new();
    // (pipelines ended, router RSS in MB) every `rss_every` pipelines.
    let mut rss_marks: Vec<(usize, f64)> = Vec::new();
    while done < cli.pipelines {
        let room = cli
            .window
            .max(1)
            .saturating_sub(in_flight.len())
            .min(cli.pipelines - sent);
        if room > 0 {
            let batch = (sent..sent + room)
                .map(|n| pipeline(cli, n, &payload))
                .collect::<Result<Vec<_>, _>>()?;
            in_flight.extend(m.start_many(&batch).await?);
            sent += room;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(first) = m.wait_any(left).await? else {
            bail!(
                "timed out after {} s: {done} of {} pipelines ended, {} still running",
                cli.timeout,
                cli.pipelines,
                in_flight.len()
            );
        };
        for (id, outcome) in std::iter::once(first).chain(m.ended().await?) {
            in_flight.remove(&id);
            done += 1;
            if !matches!(outcome, Outcome::Finished(_)) {
                failed += 1;
            }
        }
        let every = cli.rss_every.max(1);
        if done / every > rss_marks.len() {
            rss_marks.push((done, rss_mb(cluster.router.pid())));
        }
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu_after = cluster_cpu(cluster);
    let written = bytes_written(cluster.router.pid()).saturating_sub(written_before);
    let cpu: Vec<f64> = cpu_after
        .iter()
        .zip(cpu_before)
        .map(|(a, b)| ((a - b) / wall * 100.0).round())
        .collect();
    if failed > 0 {
        bail!("{failed} pipelines failed; see the logs");
    }

    // Latency: sequential single pipelines.
    let mut latencies = Vec::with_capacity(cli.latency_samples);
    for i in 0..cli.latency_samples {
        if Instant::now() >= deadline {
            bail!(
                "timed out during the latency samples ({i} of {})",
                cli.latency_samples
            );
        }
        let t = Instant::now();
        let id = m
            .start(&pipeline(cli, cli.pipelines + i, &payload)?)
            .await?;
        m.wait(&id).await?;
        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    latencies.sort_by(f64::total_cmp);

    let router_rss = peak_rss_mb(cluster.router.pid());
    let broker_rss = cluster
        .brokers
        .iter()
        .map(|d| peak_rss_mb(d.pid()))
        .fold(0.0, f64::max);
    let pipeliner_rss = cluster
        .pipeliners
        .iter()
        .map(|d| peak_rss_mb(d.pid()))
        .fold(0.0, f64::max);
    let jobs = cli.pipelines * cli.jobs_per_pipeline.max(1);
    let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
    let scrapes = scraper.map(Scraper::stop).transpose()?;
    println!("pypelinin cluster benchmark");
    println!("  pipelines           {}", cli.pipelines);
    println!(
        "  jobs                {jobs} ({} per pipeline, {:?})",
        cli.jobs_per_pipeline, cli.shape
    );
    println!(
        "  brokers x conc.     {} x {}",
        cli.brokers, cli.concurrency
    );
    println!("  pipeliners          {}", cli.pipeliners);
    println!("  payload             {} B", cli.payload_bytes);
    println!("  durable             {}", !cli.no_durability);
    if let Some(n) = scrapes {
        println!("  metrics scrapes     {n} (one a second)");
    }
    println!("  wall                {wall:.2} s");
    println!(
        "  router writes       {:.0} B per job ({:.1} MB in all: its journal and sorted files)",
        written as f64 / jobs as f64,
        written as f64 / 1e6
    );
    println!("  pipelines/s         {:.0}", cli.pipelines as f64 / wall);
    println!("  jobs/s              {:.0}", jobs as f64 / wall);
    println!(
        "  latency p50 / p99   {p50:.2} / {p99:.2} ms ({} samples)",
        latencies.len()
    );
    println!("  peak RSS (MB)       router {router_rss:.1}, broker {broker_rss:.1}, pipeliner {pipeliner_rss:.1}");
    for (ended, rss) in &rss_marks {
        println!("  router RSS          {rss:.1} MB after {ended} pipelines");
    }
    println!(
        "  CPU (% of a core)   router {}, brokers {}, pipeliners {}, client {} (during the throughput run)",
        cpu[0], cpu[1], cpu[2], cpu[3]
    );
    println!(
        "{}",
        json!({
            "pipelines": cli.pipelines,
            "jobs": jobs,
            "wall_s": (wall * 1000.0).round() / 1000.0,
            "pipelines_per_s": (cli.pipelines as f64 / wall).round(),
            "jobs_per_s": (jobs as f64 / wall).round(),
            "latency_p50_ms": (p50 * 1000.0).round() / 1000.0,
            "latency_p99_ms": (p99 * 1000.0).round() / 1000.0,
            "router_peak_rss_mb": (router_rss * 10.0).round() / 10.0,
            "router_write_bytes_per_job": (written as f64 / jobs as f64).round(),
            "broker_peak_rss_mb": (broker_rss * 10.0).round() / 10.0,
            "pipeliner_peak_rss_mb": (pipeliner_rss * 10.0).round() / 10.0,
            "durable": !cli.no_durability,
            "metrics_scrapes": scrapes,
            "brokers": cli.brokers,
            "pipeliners": cli.pipeliners,
            "concurrency": cli.concurrency,
            "jobs_per_pipeline": cli.jobs_per_pipeline,
            "worker_language": format!("{:?}", cli.worker_language),
            "payload_bytes": cli.payload_bytes,
            "cpu_percent": {"router": cpu[0], "brokers": cpu[1], "pipeliners": cpu[2], "client": cpu[3]},
            "router_rss_mb_after": rss_marks
                .iter()
                .map(|(n, rss)| json!([n, (rss * 10.0).round() / 10.0]))
                .collect::<Vec<_>>(),
        })
    );
    Ok(())
}
