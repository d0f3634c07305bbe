//! `demo`: a whole cluster on this machine, processing the bundled corpus.
//!
//! Starts the corpus HTTP server, `my_router`, two `my_broker`s and `my_pipeliner` as child
//! processes and the web dashboard (as `pypelinin dashboard` serves it), runs `send_pipelines`
//! over the corpus, shows a few results, and stops every child — also when interrupted with
//! Ctrl-C or when a child fails. With `--keep` the cluster and its dashboard stay up until
//! Ctrl-C, for a person to look.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use pypelinin_example::corpus::{self, CorpusServer};
use pypelinin_example::process::{ensure_binaries, sibling, Daemon};

/// Runs a whole pypelinin cluster on this machine over the bundled corpus.
#[derive(Debug, Parser)]
#[command(name = "demo", version)]
struct Cli {
    /// Folder for this run's data [default: a new folder under <temp>].
    #[arg(long)]
    home: Option<PathBuf>,
    /// Seconds send_pipelines may wait for the pipelines.
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
    /// Keep the cluster and its dashboard up once the pipelines ended, until Ctrl-C.
    #[arg(long)]
    keep: bool,
    /// Where the dashboard listens [default: a free port on 127.0.0.1].
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:0")]
    dashboard: std::net::SocketAddr,
}

const BINARIES: [&str; 4] = ["my_router", "my_broker", "my_pipeliner", "send_pipelines"];

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    ensure_binaries(&BINARIES)?;
    let home = cli.home.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("pypelinin-demo-{}", std::process::id()))
    });
    let logs = home.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let interrupted = ctrl_c_flag()?;

    let server = CorpusServer::start(&corpus::data_dir())?;
    println!("corpus served at {}", server.base_url());

    let home_arg = home.display().to_string();
    let mut router = Daemon::spawn_own_group(
        "my_router",
        &sibling("my_router")?,
        &args(&[
            "--api",
            "tcp://127.0.0.1:0",
            "--broadcast",
            "tcp://127.0.0.1:0",
            "--home",
            &home_arg,
            "--monitoring-interval",
            "1",
        ]),
        Some(&logs.join("my_router.log")),
    )?;
    let (api, broadcast) = router.read_endpoints()?;
    println!("router listening: api={api} broadcast={broadcast}");
    let dashboard = start_dashboard(cli.dashboard, &api, &broadcast)?;
    println!("dashboard:  {dashboard}");
    let mut daemons = vec![router];
    for i in 1..=2 {
        daemons.push(Daemon::spawn_own_group(
            "my_broker",
            &sibling("my_broker")?,
            &args(&[
                "--api",
                &api,
                "--broadcast",
                &broadcast,
                "--concurrency",
                "2",
            ]),
            Some(&logs.join(format!("my_broker-{i}.log"))),
        )?);
    }
    daemons.push(Daemon::spawn_own_group(
        "my_pipeliner",
        &sibling("my_pipeliner")?,
        &args(&["--api", &api, "--broadcast", &broadcast]),
        Some(&logs.join("my_pipeliner.log")),
    )?);
    println!(
        "started 2 brokers and a pipeliner (logs in {})",
        logs.display()
    );

    let timeout = cli.timeout.to_string();
    let mut sender = Daemon::spawn_own_group(
        "send_pipelines",
        &sibling("send_pipelines")?,
        &args(&[
            "--api",
            &api,
            "--broadcast",
            &broadcast,
            "--base-url",
            server.base_url(),
            "--home",
            &home_arg,
            "--timeout",
            &timeout,
        ]),
        None,
    )?;
    let outcome = supervise(&mut sender, &mut daemons, &interrupted);
    // Print what send_pipelines said (its stdout is piped).
    let summary = sender.read_rest();
    let keep = cli.keep && matches!(outcome, Supervised::Done(_));
    if keep {
        print!("{summary}");
        if matches!(outcome, Supervised::Done(true)) {
            show_results(&home)?;
        }
        println!("the cluster stays up: dashboard at {dashboard} (API {api}); Ctrl-C stops it");
        keep_up(&mut daemons, &interrupted);
    }

    for d in daemons.iter_mut().rev() {
        let status = d.stop(Duration::from_secs(10));
        if !status.is_some_and(stopped_cleanly) {
            eprintln!("{} stopped with {status:?}; see {}", d.name, logs.display());
        }
    }
    drop(server);
    if !keep {
        print!("{summary}");
    }
    match outcome {
        Supervised::Done(true) => {
            if !keep {
                show_results(&home)?;
            }
            println!("results:    {}", home.join("store").display());
            println!("monitoring: {}", home.join("monitoring.log").display());
            if !keep {
                println!("dashboard:  was at {dashboard} (run the demo with --keep to look at it)");
            }
            println!("all children stopped");
            Ok(ExitCode::SUCCESS)
        }
        Supervised::Done(false) => {
            eprintln!("some pipelines failed; logs in {}", logs.display());
            Ok(ExitCode::FAILURE)
        }
        Supervised::Interrupted => {
            eprintln!("interrupted; all children stopped");
            Ok(ExitCode::from(130))
        }
        Supervised::ChildFailed(name) => {
            bail!("{name} exited early; see its log in {}", logs.display())
        }
    }
}

enum Supervised {
    Done(bool),
    Interrupted,
    ChildFailed(String),
}

/// Waits for send_pipelines while watching the daemons and Ctrl-C.
fn supervise(
    sender: &mut Daemon,
    daemons: &mut [Daemon],
    interrupted: &std::sync::atomic::AtomicBool,
) -> Supervised {
    loop {
        if interrupted.load(std::sync::atomic::Ordering::SeqCst) {
            sender.stop(Duration::from_secs(5));
            return Supervised::Interrupted;
        }
        if let Some(status) = sender.exited() {
            // A Ctrl-C at the moment a child is started can reach the child too.
            if by_interrupt(status) {
                return Supervised::Interrupted;
            }
            return Supervised::Done(status.success());
        }
        for d in daemons.iter_mut() {
            if let Some(status) = d.exited() {
                sender.stop(Duration::from_secs(5));
                if by_interrupt(status) {
                    return Supervised::Interrupted;
                }
                return Supervised::ChildFailed(d.name.clone());
            }
        }
        // The demo has nothing else to do; check the children a few times a second.
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Serves the dashboard on `listen` in a thread of its own, for as long as the demo runs;
/// returns its address.
fn start_dashboard(
    listen: std::net::SocketAddr,
    api: &str,
    broadcast: &str,
) -> anyhow::Result<String> {
    let listener = std::net::TcpListener::bind(listen)
        .with_context(|| format!("the dashboard cannot listen on {listen}"))?;
    listener.set_nonblocking(true)?;
    let url = format!("http://{}/", listener.local_addr()?);
    let connect = pypelinin_cli::dashboard::Connect {
        api: api.to_owned(),
        broadcast: Some(broadcast.to_owned()),
        options: Default::default(),
        token: None,
    };
    in_thread(async move {
        let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
            return;
        };
        if let Err(e) =
            pypelinin_cli::dashboard::serve(listener, connect, std::future::pending()).await
        {
            eprintln!("the dashboard stopped: {e}");
        }
    });
    Ok(url)
}

/// Keeps the cluster up until Ctrl-C (or until a daemon exits on its own).
fn keep_up(daemons: &mut [Daemon], interrupted: &std::sync::atomic::AtomicBool) {
    while !interrupted.load(std::sync::atomic::Ordering::SeqCst) {
        if let Some(d) = daemons
            .iter_mut()
            .find_map(|d| d.exited().map(|_| d.name.clone()))
        {
            eprintln!("{d} exited; stopping the cluster");
            return;
        }
        // Nothing else to do; check a few times a second.
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether a child ended from a Ctrl-C (SIGINT) that reached it: it may, when the user presses
/// Ctrl-C at the moment the child is started, before it is in a process group of its own.
fn by_interrupt(status: std::process::ExitStatus) -> bool {
    std::os::unix::process::ExitStatusExt::signal(&status) == Some(2)
}

/// Whether a child we asked to stop did: it exited 0, or the stop signal itself ended it (a
/// daemon stopped while it starts, before it handles signals, has done nothing yet), or a
/// Ctrl-C that reached it as it was started did.
fn stopped_cleanly(status: std::process::ExitStatus) -> bool {
    let signal = std::os::unix::process::ExitStatusExt::signal(&status);
    status.success() || matches!(signal, Some(2 | 15))
}

/// Runs `work` on a runtime of its own, in a thread of its own (the demo itself is
/// synchronous).
fn in_thread(work: impl std::future::Future<Output = ()> + Send + 'static) {
    std::thread::spawn(move || {
        if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            runtime.block_on(work);
        }
    });
}

fn ctrl_c_flag() -> anyhow::Result<std::sync::Arc<std::sync::atomic::AtomicBool>> {
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let f = flag.clone();
    in_thread(async move {
        pypelinin_common::daemon::shutdown::signal().await;
        f.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    Ok(flag)
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| (*s).to_owned()).collect()
}

/// Prints the top words and links of two documents from the store.
fn show_results(home: &Path) -> anyhow::Result<()> {
    for name in ["bees", "rivers"] {
        let path = home.join("store").join(format!("{name}.json"));
        let doc: serde_json::Value = serde_json::from_slice(
            &std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?,
        )?;
        let top: Vec<String> = doc["summary"]["top_words"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|p| format!("{} ({})", p[0].as_str().unwrap_or("?"), p[1]))
                    .collect()
            })
            .unwrap_or_default();
        println!("{name}: top words {}", top.join(", "));
        let links: Vec<&str> = doc["links"]
            .as_array()
            .map(|a| a.iter().filter_map(|l| l.as_str()).collect())
            .unwrap_or_default();
        println!("{name}: {} links: {}", links.len(), links.join(" "));
        println!("{name}: stats {}", doc["stats"]);
    }
    Ok(())
}
