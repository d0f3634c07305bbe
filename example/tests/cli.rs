//! The `pypelinin` command-line tool against a real cluster: submit, status, show, cancel,
//! watch and a deadline, each subcommand's `--json` parsed, exit codes checked.

use pypelinin_common::testing::wait_until;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::support::{Cluster, WAIT};

/// The `pypelinin` binary, built beside the example's (the `pypelinin-cli` package's tests
/// build it in a workspace test run).
fn pypelinin_bin() -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_my_router")).with_file_name("pypelinin");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build -p pypelinin-cli` (a workspace test run \
         builds it)",
        bin.display()
    );
    bin
}

/// Runs `pypelinin` against `cluster` with `args`.
fn run(cluster: &Cluster, args: &[&str]) -> Output {
    Command::new(pypelinin_bin())
        .args(["--api", &cluster.api, "--broadcast", &cluster.broadcast])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `pypelinin --json ARGS` and parses its output.
fn json(cluster: &Cluster, args: &[&str]) -> (Option<i32>, Value) {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = run(cluster, &all);
    let value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "pypelinin {args:?} printed no JSON ({e}): {}\n{}",
            stdout(&out),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), value)
}

/// Polls `pypelinin --json status` until `check` holds, for at most [`WAIT`].
fn status_until(cluster: &Cluster, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    wait_until(WAIT, what, || {
        let (code, status) = json(cluster, &["status"]);
        assert_eq!(code, Some(0), "{status}");
        last = status;
        check(&last)
    });
    last
}

/// A child process killed (and reaped) when the test ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn submit_status_show_cancel_watch_and_a_deadline_through_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("Sleepy.pids");
    let config = format!(
        r#"
[router]
unserved_worker_warn_secs = 1

[[broker.command_workers]]
name = "Echo"
command = ["sh", "-c", "cat > /dev/null; echo '{{}}'"]

[[broker.command_workers]]
name = "Sleepy"
command = ["sh", "-c", "echo $$ >> '{}'; sleep 600; echo '{{}}'"]
timeout_secs = 900
"#,
        pids.display()
    );
    let cluster = Cluster::start_with_config(&config, &[], 1, &[], 1);

    // A live event stream of failed and cancelled pipelines, read to its 3rd event.
    let watch = Command::new(pypelinin_bin())
        .args(["--api", &cluster.api, "--broadcast", &cluster.broadcast])
        .args([
            "--json",
            "watch",
            "--event",
            "pipeline-cancelled",
            "--event",
            "pipeline-failed",
            "--count",
            "3",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut watch = KillOnDrop(watch);

    // 1. A pipeline whose second job's worker no broker runs.
    let unserved = write(
        dir.path(),
        "unserved.toml",
        "data = { filename = \"unserved\" }\n\n[[jobs]]\nworker = \"Echo\"\n\n[[jobs]]\nworker = \"Nobody\"\nafter = [\"Echo\"]\n",
    );
    let (code, submitted) = json(&cluster, &["submit", &unserved]);
    assert_eq!(code, Some(0), "{submitted}");
    let id = submitted["pipeline ids"][0].as_str().unwrap().to_owned();
    let status = status_until(&cluster, "the unserved worker to be reported", |s| {
        s["unserved"]
            .as_array()
            .is_some_and(|u| u.iter().any(|w| w["worker"] == "Nobody" && w["jobs"] == 1))
    });
    // The broker and the pipeliner identified themselves.
    let peers = status["peers"].as_array().unwrap();
    let broker = peers.iter().find(|p| p["role"] == "broker").unwrap();
    assert!(
        broker["workers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w == "Echo"),
        "{broker}"
    );
    assert_eq!(broker["gone"], false);
    assert!(
        broker["load"]["resident memory"].as_u64().unwrap() > 0,
        "{broker}"
    );
    assert!(peers.iter().any(|p| p["role"] == "pipeliner"), "{status}");
    assert_eq!(status["workers"]["Echo"]["finished"], 1, "{status}");
    assert_eq!(status["workers"]["Nobody"]["brokers"], 0, "{status}");
    let text = stdout(&run(&cluster, &["status"]));
    assert!(
        text.contains("no broker runs worker Nobody: 1 job(s) waiting"),
        "{text}"
    );
    // The Rust client tells which worker the stuck pipeline waits for, and that none runs it.
    let waiting = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut m = crate::support::manager(&cluster).await;
        m.waiting_for(&id.as_str().into()).await.unwrap()
    });
    let waiting: Vec<(&str, usize)> = waiting
        .iter()
        .map(|w| (w.job.worker.as_str(), w.brokers))
        .collect();
    assert_eq!(waiting, [("Nobody", 0)]);
    // The router warned of it once (not per job, not at every check).
    let logs = cluster.logs();
    assert_eq!(
        logs.matches("no broker runs worker Nobody").count(),
        1,
        "{logs}"
    );

    // `show`: the DAG with each job's state; --dot colours them.
    let dot = dir.path().join("unserved.dot");
    let (code, shown) = json(&cluster, &["show", &id, "--dot", dot.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{shown}");
    assert_eq!(shown["state"], "running");
    let jobs: Vec<(&str, &str)> = shown["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| (j["worker"].as_str().unwrap(), j["state"].as_str().unwrap()))
        .collect();
    assert_eq!(jobs, [("Echo", "finished"), ("Nobody", "queued")]);
    let dot = std::fs::read_to_string(dot).unwrap();
    assert!(
        dot.contains(r#""Echo" [style=filled, fillcolor="palegreen"];"#),
        "{dot}"
    );
    let text = stdout(&run(&cluster, &["show", &id]));
    assert!(text.contains("Nobody") && text.contains("queued"), "{text}");

    // 2. `cancel`: cancelled (exit 0), then "ended already" (exit 1); `show` says cancelled.
    let (code, cancelled) = json(&cluster, &["cancel", &id]);
    assert_eq!(code, Some(0), "{cancelled}");
    assert_eq!(cancelled["pipelines"][0]["result"], "cancelled");
    let (code, again) = json(&cluster, &["cancel", &id]);
    assert_eq!(code, Some(1), "{again}");
    assert_eq!(again["pipelines"][0]["result"], "ended");
    let (code, shown) = json(&cluster, &["show", &id]);
    assert_eq!(
        (code, &shown["state"]),
        (Some(1), &Value::from("cancelled"))
    );

    // 3. A running command worker's processes are killed by `cancel`; nothing is saved.
    let sleepy = write(
        dir.path(),
        "sleepy.toml",
        "data = { filename = \"sleepy\" }\n[[jobs]]\nworker = \"Sleepy\"\n[[jobs]]\nworker = \"Echo\"\nafter = [\"Sleepy\"]\n",
    );
    let out = run(&cluster, &["submit", &sleepy]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sleepy_id = stdout(&out).trim().to_owned();
    wait_until(WAIT, "the Sleepy worker to start", || {
        std::fs::read_to_string(&pids).is_ok_and(|t| t.ends_with('\n'))
    });
    let pid: u32 = std::fs::read_to_string(&pids)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let out = run(&cluster, &["cancel", &sleepy_id]);
    assert!(out.status.success(), "{}", stdout(&out));
    wait_until(WAIT, "the cancelled Sleepy process to be killed", || {
        // Gone, or a zombie (dead, not reaped yet).
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z'))
        })
    });
    assert!(!cluster.store().join("sleepy.json").exists());

    // 4. A deadline: `submit --wait` fails the pipeline naming the worker it waited for. Three
    // seconds, so a loaded machine still has its pipeliner submit the job before the deadline
    // (with one second, the client once took that long to start waiting).
    let (code, waited) = json(
        &cluster,
        &["submit", &unserved, "--deadline", "3", "--wait"],
    );
    assert_eq!(code, Some(1), "{waited}");
    let failed = &waited["pipelines"][0];
    assert_eq!(failed["state"], "failed", "{waited}");
    assert_eq!(failed["worker"], "Nobody", "{waited}");
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains("deadline of 3 s passed") && error.contains("of worker Nobody (queued)"),
        "{error}"
    );

    // `watch` saw the cancellation and the deadline's failure, one JSON object per line.
    wait_until(WAIT, "watch to see its 3 events", || {
        watch.0.try_wait().unwrap().is_some()
    });
    let mut seen = String::new();
    std::io::Read::read_to_string(&mut watch.0.stdout.take().unwrap(), &mut seen).unwrap();
    let lines: Vec<Value> = seen
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = lines.iter().map(|l| l["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "pipeline-cancelled",
            "pipeline-cancelled",
            "pipeline-failed"
        ],
        "{lines:?}"
    );
}
