//! `netbench`: the cluster across network hops (needs root and iproute2).
//!
//! Builds five hosts in network namespaces of their own — the router, two broker hosts, a
//! pipeliner host and a client host (this program) — joined by a bridge, and adds a delay on
//! each host's link, each way, with a delay relay ([`pypelinin_example::relay`]; the kernel's
//! `netem` is not on every machine). For each delay it starts a fresh cluster, pushes
//! pipelines through it and measures their rate and latency. Then, with load running, it cuts
//! one broker host off the bridge for a while (`ip link set … down`), brings it back, and
//! reports what that cost, checking that every pipeline finished and that the router
//! reported each pipeline and each job once. It prints a table and, as its last line, one JSON
//! object; it exits non-zero when a check fails. `--short` is the quick form CI runs.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::{Parser, Subcommand};
use pypelinin_client::{Outcome, Pipeline, PipelineId, PipelineManager};
use pypelinin_common::protocol::Event;
use pypelinin_common::transport::subscriber::Subscriber;
use pypelinin_common::transport::{ApiClient, ClientOptions};
use pypelinin_example::netns::Network;
use pypelinin_example::process::{ensure_binaries, sibling, Daemon};
use pypelinin_example::relay;
use pypelinin_example::workers::noop_name;
use serde_json::json;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The hosts, in address order: the router is 10.77.0.1.
const ROLES: [&str; 5] = ["router", "broker-1", "broker-2", "pipeliner", "client"];
/// The hosts that reach the router through a delay relay.
const RELAYED: [&str; 4] = ["broker-1", "broker-2", "pipeliner", "client"];
/// The router's ports on its host; each relayed host has the same ports on its loopback.
const API_PORT: u16 = 5555;
const BROADCAST_PORT: u16 = 5556;

/// Runs the cluster across network namespaces, with delays and a partition.
#[derive(Debug, Parser)]
#[command(name = "netbench", version)]
struct Cli {
    #[command(subcommand)]
    relay: Option<Relay>,
    /// Pipelines (two-job chains of no-op jobs) pushed through at each delay.
    #[arg(long, default_value_t = 2000)]
    pipelines: usize,
    /// Delays to measure, in ms, added each way on every host's link.
    #[arg(long, value_delimiter = ',', default_value = "0,0.5,5")]
    delays_ms: Vec<f64>,
    /// Pipelines in flight at once, at most.
    #[arg(long, default_value_t = 500)]
    window: usize,
    /// Sequential single pipelines for the latency percentiles, at each delay.
    #[arg(long, default_value_t = 100)]
    latency_samples: usize,
    /// Seconds broker-1's host is cut off; 0 skips the partition run.
    #[arg(long, default_value_t = 10.0)]
    partition_secs: f64,
    /// When the partition starts, in seconds after the load starts.
    #[arg(long, default_value_t = 5.0)]
    partition_at_secs: f64,
    /// Seconds of load (new pipelines submitted) in the partition run.
    #[arg(long, default_value_t = 30.0)]
    load_secs: f64,
    /// At most this many pipelines in the partition run (its load is bounded by time too).
    #[arg(long, default_value_t = 1_000_000)]
    partition_max_pipelines: usize,
    /// Pipelines submitted per second at most in the partition run [default: as fast as the
    /// window allows].
    #[arg(long)]
    partition_rate: Option<f64>,
    /// Delay (ms, each way) during the partition run.
    #[arg(long, default_value_t = 0.5)]
    partition_delay_ms: f64,
    /// The router's job lease in the partition run, in seconds [default: the router's, 30 s].
    /// Shorter than the partition, the cut-off broker's jobs run again elsewhere, and its late
    /// results must change nothing.
    #[arg(long)]
    job_lease_secs: Option<f64>,
    /// The quick form (CI): 300 pipelines at 0 and 5 ms, 10 latency samples, a 10 s
    /// partition at 3 s of 16 s of load at 500 pipelines/s.
    #[arg(long)]
    short: bool,
    /// Give up on a run after this many seconds.
    #[arg(long, default_value_t = 300.0)]
    timeout: f64,
    /// Keep the daemons' logs and print where they are.
    #[arg(long)]
    keep: bool,
}

/// `netbench relay`: the delay relay of one host (started by netbench itself).
#[derive(Debug, Subcommand)]
enum Relay {
    /// Relays each `--pair LISTEN=UPSTREAM`, holding bytes back `--delay-us` each way.
    #[command(hide = true)]
    Relay {
        /// Microseconds each byte is held back, each way.
        #[arg(long)]
        delay_us: u64,
        /// `LISTEN=UPSTREAM` socket addresses.
        #[arg(long, value_parser = parse_pair)]
        pair: Vec<(SocketAddr, SocketAddr)>,
    },
}

fn parse_pair(s: &str) -> Result<(SocketAddr, SocketAddr), String> {
    let (l, u) = s.split_once('=').ok_or("expected LISTEN=UPSTREAM")?;
    Ok((
        l.parse().map_err(|e| format!("{l}: {e}"))?,
        u.parse().map_err(|e| format!("{u}: {e}"))?,
    ))
}

impl Cli {
    fn apply_short(&mut self) {
        if self.short {
            self.pipelines = 300;
            self.delays_ms = vec![0.0, 5.0];
            self.latency_samples = 10;
            self.partition_secs = 10.0;
            self.partition_at_secs = 3.0;
            self.load_secs = 16.0;
            self.partition_rate = self.partition_rate.or(Some(500.0));
            self.window = 200;
        }
    }
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    if let Some(Relay::Relay { delay_us, pair }) = &cli.relay {
        let ready = || println!("ready");
        return match relay::serve(pair, Duration::from_micros(*delay_us), ready) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("relay: {e}");
                ExitCode::FAILURE
            }
        };
    }
    cli.apply_short();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netbench failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    ensure_binaries(&["my_router", "my_broker", "my_pipeliner"])?;
    let home = std::env::temp_dir().join(format!("pypelinin-netbench-{}", std::process::id()));
    std::fs::create_dir_all(&home)?;
    let result = (|| {
        let network = Network::create(&ROLES)?;
        // This program is the client host: its threads, the runtime's among them, live there.
        network.enter("client")?;
        let runtime = tokio::runtime::Runtime::new()?;
        runtime.block_on(async {
            tokio::select! {
                r = measure(cli, &network, &home) => r,
                _ = tokio::signal::ctrl_c() => bail!("interrupted"),
            }
        })
    })();
    if cli.keep {
        eprintln!("logs kept in {}", home.display());
    } else {
        let _ = std::fs::remove_dir_all(&home);
    }
    result
}

/// A cluster spread over the hosts, with a relay on each host but the router's.
struct Cluster {
    router: Daemon,
    relays: Vec<Daemon>,
    brokers: Vec<Daemon>,
    pipeliner: Daemon,
}

impl Cluster {
    fn start(
        network: &Network,
        home: &Path,
        delay: Duration,
        job_lease_secs: Option<f64>,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(home)?;
        let router_ip = network.host("router").address;
        let mut env = Vec::new();
        if let Some(lease) = job_lease_secs {
            env.push(("PYPELININ_JOB_LEASE_SECS", lease.to_string()));
            // Renewals well within the lease.
            env.push(("PYPELININ_LEASE_RENEW_SECS", (lease / 3.0).to_string()));
        }
        let spawn = |role: &str, name: &str, exe: &Path, args: Vec<String>| {
            let (ip, all) = network.command(role, &env, exe, &args);
            Daemon::spawn(name, &ip, &all, Some(&home.join(format!("{name}.log"))))
        };
        let mut router = spawn(
            "router",
            "router",
            &sibling("my_router")?,
            vec![
                "--api".into(),
                format!("tcp://{router_ip}:{API_PORT}"),
                "--broadcast".into(),
                format!("tcp://{router_ip}:{BROADCAST_PORT}"),
                "--home".into(),
                home.display().to_string(),
                "--no-store".into(),
                "--monitoring-interval".into(),
                "3600".into(),
            ],
        )?;
        router.read_endpoints()?;
        let mut relays = Vec::new();
        for role in RELAYED {
            let mut args = vec!["relay".into(), format!("--delay-us={}", delay.as_micros())];
            for port in [API_PORT, BROADCAST_PORT] {
                args.push(format!("--pair=127.0.0.1:{port}={router_ip}:{port}"));
            }
            let mut relay = spawn(
                role,
                &format!("relay-{role}"),
                &std::env::current_exe()?,
                args,
            )?;
            let line = relay.first_line()?;
            ensure!(line == "ready", "the relay of {role} said {line:?}");
            relays.push(relay);
        }
        let endpoints = vec![
            "--api".into(),
            format!("tcp://127.0.0.1:{API_PORT}"),
            "--broadcast".into(),
            format!("tcp://127.0.0.1:{BROADCAST_PORT}"),
        ];
        let mut brokers = Vec::new();
        for role in ["broker-1", "broker-2"] {
            let mut args = endpoints.clone();
            args.extend(["--noop-workers", "2", "--concurrency", "2"].map(String::from));
            brokers.push(spawn(role, role, &sibling("my_broker")?, args)?);
        }
        let pipeliner = spawn(
            "pipeliner",
            "pipeliner",
            &sibling("my_pipeliner")?,
            endpoints,
        )?;
        Ok(Self {
            router,
            relays,
            brokers,
            pipeliner,
        })
    }

    /// Stops the brokers and the pipeliner (they send what they still hold first).
    fn stop_workers(&mut self) {
        tokio::task::block_in_place(|| {
            for d in self.brokers.iter_mut().chain([&mut self.pipeliner]) {
                d.stop(Duration::from_secs(15));
            }
        });
    }

    fn stop(mut self) {
        self.stop_workers();
        tokio::task::block_in_place(|| {
            self.router.stop(Duration::from_secs(10));
            for r in &mut self.relays {
                r.kill();
            }
        });
    }
}

fn pipeline(i: usize) -> anyhow::Result<Pipeline> {
    Ok(Pipeline::builder()
        .edge(noop_name(0), noop_name(1))
        .data(json!({"filename": format!("p{i}")}))
        .build()?)
}

/// What a load run saw.
#[derive(Default)]
struct Driven {
    /// Seconds from the start of the load at which each pipeline ended, and how long it took.
    ended: Vec<(f64, f64)>,
    failed: Vec<String>,
    /// Pipelines the manager reported ended more than once.
    reported_twice: usize,
    wall: f64,
}

/// Keeps at most `window` pipelines in flight, and submits at most `rate` a second; submits
/// new ones while fewer than `count` were sent and `submit_for` has not passed; waits for all.
async fn drive(
    m: &mut PipelineManager,
    count: usize,
    submit_for: Duration,
    window: usize,
    rate: Option<f64>,
    deadline: Instant,
) -> anyhow::Result<Driven> {
    let started = Instant::now();
    let mut in_flight: HashMap<PipelineId, Instant> = HashMap::new();
    let mut seen: HashSet<PipelineId> = HashSet::new();
    let mut out = Driven::default();
    let mut sent = 0;
    loop {
        let submitting = sent < count && started.elapsed() < submit_for;
        if !submitting && in_flight.is_empty() {
            break;
        }
        let mut room = window.saturating_sub(in_flight.len()).min(count - sent);
        if let Some(rate) = rate {
            let allowed = (started.elapsed().as_secs_f64() * rate) as usize + 1;
            room = room.min(allowed.saturating_sub(sent));
        }
        if submitting && room > 0 {
            let batch = (sent..sent + room)
                .map(pipeline)
                .collect::<anyhow::Result<Vec<_>>>()?;
            let now = Instant::now();
            for id in m.start_many(&batch).await? {
                in_flight.insert(id, now);
            }
            sent += room;
        }
        ensure!(
            Instant::now() < deadline,
            "timed out: {} pipelines still running",
            in_flight.len()
        );
        if in_flight.is_empty() {
            // Held back by the rate: nothing to wait for but the next submission.
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        // Wake at least every 10 ms to keep submitting while load runs.
        let Some(first) = m.wait_any(Duration::from_millis(10)).await? else {
            continue;
        };
        for (id, outcome) in std::iter::once(first).chain(m.ended().await?) {
            let Some(t0) = in_flight.remove(&id) else {
                if seen.contains(&id) {
                    out.reported_twice += 1;
                }
                continue;
            };
            seen.insert(id.clone());
            out.ended
                .push((started.elapsed().as_secs_f64(), t0.elapsed().as_secs_f64()));
            if !matches!(outcome, Outcome::Finished(_)) {
                out.failed.push(format!("{id}: {outcome:?}"));
            }
        }
    }
    out.wall = started.elapsed().as_secs_f64();
    Ok(out)
}

/// How many times each id was broadcast.
type Counts = HashMap<String, u32>;

/// Counts the router's `pipeline finished`/`failed` and `job finished`/`failed` broadcasts
/// per id, until told to stop; then makes sure it heard everything broadcast before.
struct Tally {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<(Counts, Counts)>>,
}

impl Tally {
    async fn start(api: &str, broadcast: &str) -> anyhow::Result<Self> {
        let options = ClientOptions::default();
        let mut client = ApiClient::connect(api.to_owned(), options).await?;
        let mut sub = Subscriber::connect(
            broadcast,
            &[
                Event::PIPELINE_FINISHED,
                Event::PIPELINE_FAILED,
                Event::JOB_FINISHED,
                Event::JOB_FAILED,
            ],
            options.connect_timeout,
        )
        .await?;
        sub.wait_live(&mut client, Duration::from_secs(30)).await?;
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut pipelines = HashMap::new();
            let mut jobs = HashMap::new();
            let mut count = |event: Event| match event {
                Event::PipelineFinished { pipeline_id, .. }
                | Event::PipelineFailed { pipeline_id, .. } => {
                    *pipelines.entry(pipeline_id.to_string()).or_insert(0) += 1;
                }
                Event::JobFinished { job_id, .. } | Event::JobFailed { job_id, .. } => {
                    *jobs.entry(job_id.to_string()).or_insert(0) += 1;
                }
                _ => {}
            };
            loop {
                tokio::select! {
                    event = sub.recv() => count(event?),
                    _ = &mut stopped => break,
                }
            }
            // A probe comes after every event broadcast before it.
            sub.wait_live(&mut client, Duration::from_secs(30)).await?;
            while let Some(event) = sub.try_recv().await {
                count(event?);
            }
            Ok((pipelines, jobs))
        });
        Ok(Self { stop, task })
    }

    /// Pipelines and jobs the router reported ended more than once.
    async fn finish(self) -> anyhow::Result<(usize, usize)> {
        let _ = self.stop.send(());
        let (pipelines, jobs) = self.task.await??;
        let twice = |m: &Counts| m.values().filter(|n| **n > 1).count();
        Ok((twice(&pipelines), twice(&jobs)))
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn round(x: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (x * f).round() / f
}

const API: &str = "tcp://127.0.0.1:5555";
const BROADCAST: &str = "tcp://127.0.0.1:5556";

async fn measure(cli: &Cli, network: &Network, home: &Path) -> anyhow::Result<()> {
    let mut report = json!({"delays": [], "partition": null, "short": cli.short});
    println!("pypelinin across network namespaces: router, 2 broker hosts (2 slots each), a pipeliner host, a client host");
    for (k, delay_ms) in cli.delays_ms.iter().enumerate() {
        let delay = Duration::from_secs_f64(delay_ms.max(0.0) / 1000.0);
        let dir = home.join(format!("delay-{k}"));
        let cluster = Cluster::start(network, &dir, delay, None)?;
        let outcome = delay_run(cli, delay).await;
        cluster.stop();
        let (rate, p50, p99) = outcome.with_context(|| format!("at {delay_ms} ms"))?;
        println!(
            "  delay {delay_ms:>4} ms each way   {rate:>6.0} pipelines/s   latency p50 {p50:>7.2} ms, p99 {p99:>7.2} ms"
        );
        report["delays"]
            .as_array_mut()
            .context("report")?
            .push(json!({
                "delay_ms": delay_ms,
                "pipelines": cli.pipelines,
                "pipelines_per_s": rate.round(),
                "latency_p50_ms": round(p50, 2),
                "latency_p99_ms": round(p99, 2),
            }));
    }
    if cli.partition_secs > 0.0 {
        let delay = Duration::from_secs_f64(cli.partition_delay_ms.max(0.0) / 1000.0);
        let mut cluster =
            Cluster::start(network, &home.join("partition"), delay, cli.job_lease_secs)?;
        let outcome = partition_run(cli, network, &mut cluster).await;
        cluster.stop();
        report["partition"] = outcome?;
    }
    println!("{report}");
    let broken = report["partition"]["checks_passed"] == false;
    ensure!(!broken, "a partition check failed (see above)");
    Ok(())
}

/// Pipelines/s, then latency p50 and p99 in ms, of one cluster.
async fn delay_run(cli: &Cli, delay: Duration) -> anyhow::Result<(f64, f64, f64)> {
    let deadline = Instant::now() + Duration::from_secs_f64(cli.timeout);
    let mut m = PipelineManager::connect(API, BROADCAST)
        .await
        .context("cannot reach the router through the client host's relay")?;
    let driven = drive(
        &mut m,
        cli.pipelines,
        Duration::MAX,
        cli.window.max(1),
        None,
        deadline,
    )
    .await?;
    ensure!(
        driven.failed.is_empty(),
        "{} pipelines failed at {delay:?}: {:?}",
        driven.failed.len(),
        driven.failed.first()
    );
    let rate = cli.pipelines as f64 / driven.wall;
    let mut latencies = Vec::new();
    for i in 0..cli.latency_samples {
        ensure!(
            Instant::now() < deadline,
            "timed out in the latency samples"
        );
        let t = Instant::now();
        let id = m.start(&pipeline(cli.pipelines + i)?).await?;
        m.wait(&id).await?;
        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    latencies.sort_by(f64::total_cmp);
    Ok((
        rate,
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
    ))
}

/// Load for `load_secs`, broker-1's host cut off from `partition_at_secs` for
/// `partition_secs`; what it cost, and the checks.
async fn partition_run(
    cli: &Cli,
    network: &Network,
    cluster: &mut Cluster,
) -> anyhow::Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs_f64(cli.timeout);
    let mut m = PipelineManager::connect(API, BROADCAST)
        .await
        .context("cannot reach the router through the client host's relay")?;
    let tally = Tally::start(API, BROADCAST).await?;
    let at = cli.partition_at_secs.max(1.0);
    let length = cli.partition_secs;
    let load_secs = cli.load_secs.max(at + length);
    let cut = async {
        tokio::time::sleep(Duration::from_secs_f64(at)).await;
        tokio::task::block_in_place(|| network.set_link("broker-1", false))?;
        tokio::time::sleep(Duration::from_secs_f64(length)).await;
        tokio::task::block_in_place(|| network.set_link("broker-1", true))
    };
    let (driven, cut) = tokio::join!(
        drive(
            &mut m,
            cli.partition_max_pipelines,
            Duration::from_secs_f64(load_secs),
            cli.window.max(1),
            cli.partition_rate,
            deadline,
        ),
        cut
    );
    // Bring the link back whatever happened, then judge.
    let _ = network.set_link("broker-1", true);
    cut?;
    let driven = driven?;
    // The cut-off broker may still hold results: stop it (it sends them first), then count.
    cluster.stop_workers();
    let (pipelines_twice, jobs_twice) = tally.finish().await?;

    let back = at + length;
    let in_range = |from: f64, to: f64| {
        driven
            .ended
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .count()
    };
    let before = in_range(1.0, at) as f64 / (at - 1.0).max(0.1);
    let during = in_range(at, back) as f64 / length;
    let after = in_range(back, load_secs) as f64 / (load_secs - back).max(0.1);
    // Full-speed work lost: what would have ended from the cut to the end of the load at the
    // rate before it, less what did, in seconds of that rate.
    let lost_s = if before > 0.0 {
        (before * (load_secs - at) - in_range(at, load_secs) as f64) / before
    } else {
        0.0
    };
    // Pipelines held up (more than a second, hundreds of times the usual), and how long the
    // last pipeline ended after the load stopped.
    let held_up = driven.ended.iter().filter(|(_, took)| *took > 1.0).count();
    let drain = driven.wall - load_secs;
    let mut latencies: Vec<f64> = driven.ended.iter().map(|(_, took)| *took).collect();
    latencies.sort_by(f64::total_cmp);
    let timeline: Vec<usize> = (0..driven.wall.ceil() as usize)
        .map(|s| in_range(s as f64, s as f64 + 1.0))
        .collect();
    let all_finished = driven.failed.is_empty();
    let passed =
        all_finished && driven.reported_twice == 0 && pipelines_twice == 0 && jobs_twice == 0;
    println!(
        "  partition: broker-1's host cut off at {at} s for {length} s, {} ms each way, job lease {}",
        cli.partition_delay_ms,
        cli.job_lease_secs
            .map_or("30 s (default)".to_owned(), |l| format!("{l} s"))
    );
    println!(
        "    {} pipelines in {:.1} s; pipelines/s before {before:.0}, during {during:.0}, after {after:.0}",
        driven.ended.len(),
        driven.wall
    );
    println!(
        "    cost: {lost_s:.1} s of full-speed work; {held_up} pipelines took over 1 s, the slowest {:.2} s; the last ended {drain:.1} s after the load stopped",
        latencies.last().copied().unwrap_or(0.0)
    );
    println!("    pipelines ended per second: {timeline:?}");
    println!(
        "    checks: failed {}, reported twice to the client {}, pipeline broadcasts twice {pipelines_twice}, job broadcasts twice {jobs_twice}: {}",
        driven.failed.len(),
        driven.reported_twice,
        if passed { "passed" } else { "FAILED" }
    );
    for f in driven.failed.iter().take(5) {
        println!("    failed: {f}");
    }
    Ok(json!({
        "partition_at_s": at,
        "partition_s": length,
        "delay_ms": cli.partition_delay_ms,
        "job_lease_s": cli.job_lease_secs,
        "pipelines": driven.ended.len(),
        "wall_s": round(driven.wall, 2),
        "pipelines_per_s_before": before.round(),
        "pipelines_per_s_during": during.round(),
        "pipelines_per_s_after": after.round(),
        "lost_s": round(lost_s, 1),
        "held_up_over_1s": held_up,
        "drain_s": round(drain, 1),
        "slowest_pipeline_s": round(latencies.last().copied().unwrap_or(0.0), 2),
        "latency_p50_ms": round(percentile(&latencies, 0.5) * 1000.0, 2),
        "timeline": timeline,
        "failed": driven.failed.len(),
        "reported_twice": driven.reported_twice,
        "pipeline_broadcasts_twice": pipelines_twice,
        "job_broadcasts_twice": jobs_twice,
        "checks_passed": passed,
    }))
}
