//! The `pypelinin-router` binary: flags, settings file, listening line, signals.

use pypelinin_common::testing::within;
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use crate::support::WAIT;

/// A child process killed (by PID) and reaped when dropped, its data folder removed.
pub(crate) struct Daemon(pub(crate) Child, std::path::PathBuf);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

/// A data folder of its own for each router these tests start.
fn data_dir() -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    std::env::temp_dir().join(format!("pypelinin-router-data-{}-{n}", std::process::id()))
}

pub(crate) fn spawn_router(args: &[&str]) -> (Daemon, String, String) {
    let data = data_dir();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pypelinin-router"))
        .args(args)
        .arg("--data-dir")
        .arg(&data)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("router starts");
    let stdout = child.stdout.take().unwrap();
    let daemon = Daemon(child, data);
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("listening line");
    let rest = line
        .trim()
        .strip_prefix("listening ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    let (api, broadcast) = rest.split_once(' ').unwrap();
    (
        daemon,
        api.strip_prefix("api=").unwrap().to_owned(),
        broadcast.strip_prefix("broadcast=").unwrap().to_owned(),
    )
}

/// Waits for the child to exit without blocking the runtime.
async fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let pid = child.id();
    let status = tokio::task::block_in_place(|| child.wait());
    status.unwrap_or_else(|e| panic!("waiting for {pid}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_serves_the_settings_file_and_exits_0_on_sigterm() {
    let dir = std::env::temp_dir().join(format!("pypelinin-router-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("cluster.toml");
    std::fs::write(
        &file,
        "\"monitoring interval\" = 60\n[store]\n\"data directory\" = \"/tmp/docs\"\n\"monitoring filename\" = \"/tmp/monitoring.log\"\n[router]\nmax_request_bytes = 1000\n",
    )
    .unwrap();
    let (mut daemon, api, _) = spawn_router(&[
        "--config",
        file.to_str().unwrap(),
        "--api",
        "tcp://127.0.0.1:0",
        "--broadcast",
        "tcp://127.0.0.1:0",
    ]);
    let mut c = within(
        WAIT,
        "connect",
        pypelinin_common::transport::ApiClient::connect(api, Default::default()),
    )
    .await
    .unwrap();
    let config = c.get_configuration().await.unwrap();
    assert_eq!(
        serde_json::Value::Object(config),
        json!({"monitoring interval": 60, "store": {"data directory": "/tmp/docs", "monitoring filename": "/tmp/monitoring.log"}})
    );
    // The [router] table applies: requests above 1000 bytes are refused, and served after.
    let big = json!({"command": "add job", "worker": "A", "data": "x".repeat(2000)}).to_string();
    let r: serde_json::Value =
        serde_json::from_slice(&c.request_bytes(big.into_bytes()).await.unwrap()).unwrap();
    assert_eq!(r["answer"], "malformed request");
    assert!(
        r["error"].as_str().unwrap().contains("exceeds the limit"),
        "{r}"
    );

    let pid = daemon.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = within(WAIT, "router exit after SIGTERM", wait_exit(&mut daemon.0)).await;
    assert!(status.success(), "{status:?}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn binary_exits_non_zero_with_a_clear_message_on_bad_settings() {
    let dir = std::env::temp_dir().join(format!("pypelinin-router-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(&file, "this is = = not toml").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pypelinin-router"))
        .args(["--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not valid TOML"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A FileStore's table with a misspelt key is refused at start (not by every broker later).
    std::fs::write(&file, "[store]\n\"data directoy\" = \"/tmp/docs\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pypelinin-router"))
        .args(["--config", file.to_str().unwrap(), "--no-durability"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("[store] data directoy") && err.contains("did you mean data directory?"),
        "{err}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_pypelinin-router"))
        .args([
            "--api",
            "tcp://256.0.0.1:1",
            "--broadcast",
            "tcp://127.0.0.1:0",
            "--no-durability",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot bind tcp://256.0.0.1:1"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// The original's client, one request at a time: every request/reply path and broadcast it
/// uses answers as the original router's did (tests/python/test_legacy_client.py).
#[test]
fn a_legacy_python_client_works_against_the_router() {
    pytest("test_legacy_client.py");
}

/// Stand-ins of the original's broker, pipeliner and client (tests/python/legacy.py) against
/// the router: a long job of a broker that never renews runs once, a pipeliner or client that
/// subscribes after the job or pipeline ended still hears the end, and a pipeline handed out
/// again does not crash the pipeliner (tests/python/test_legacy_daemons.py).
#[test]
fn the_originals_daemons_run_nothing_twice_and_wait_for_nothing_forever() {
    pytest("test_legacy_daemons.py");
}

/// The pytest file `tests/python/<file>` against this build's router binary.
fn pytest(file: &str) {
    pypelinin_common::testing::pytest(
        file,
        &[("PYPELININ_ROUTER", env!("CARGO_BIN_EXE_pypelinin-router"))],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_no_broker_runs_is_warned_about_once() {
    let dir = std::env::temp_dir().join(format!("pypelinin-unserved-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("cluster.toml");
    std::fs::write(&file, "[router]\nunserved_worker_warn_secs = 0.3\n").unwrap();
    let (mut daemon, api, _) = spawn_router(&[
        "--config",
        file.to_str().unwrap(),
        "--api",
        "tcp://127.0.0.1:0",
        "--broadcast",
        "tcp://127.0.0.1:0",
    ]);
    let stderr = daemon.0.stderr.take().unwrap();
    let (lines, warnings) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("no broker runs worker") && lines.send(line).is_err() {
                return;
            }
        }
    });
    let mut c = within(
        WAIT,
        "connect",
        pypelinin_common::transport::ApiClient::connect(api, Default::default()),
    )
    .await
    .unwrap();
    for _ in 0..3 {
        c.add_job(pypelinin_common::protocol::request::NewJob::new(
            "Nobody",
            json!({}),
        ))
        .await
        .unwrap();
    }
    let first = tokio::task::block_in_place(|| warnings.recv_timeout(WAIT))
        .expect("a warning about the worker nobody runs");
    assert!(
        first.contains("Nobody") && first.contains("3 job(s)"),
        "{first}"
    );
    // Once per worker, not per job nor per tick: nothing more within ten times the warning
    // time (a negative needs a wait).
    let second =
        tokio::task::block_in_place(|| warnings.recv_timeout(std::time::Duration::from_secs(3)));
    assert!(second.is_err(), "warned twice: {second:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
