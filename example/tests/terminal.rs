//! The demo in a real terminal: a Ctrl-C typed into a pseudo-terminal (which the terminal turns
//! into SIGINT for its whole foreground process group) stops every child cleanly.

use std::io::Read;
use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Each wait of this test; under nextest's 2-minute limit, so its message shows.
const WAIT: Duration = Duration::from_secs(60);

/// Reads the terminal's output on a thread of its own, sending it on in pieces.
fn reader(master: OwnedFd) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut file = std::fs::File::from(master);
        let mut buf = [0u8; 4096];
        // EIO once every process holding the terminal has exited.
        while let Ok(n @ 1..) = file.read(&mut buf) {
            if tx
                .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                .is_err()
            {
                return;
            }
        }
    });
    rx
}

/// Collects output until it contains `needle`; panics with what came after `limit`.
fn until(rx: &mpsc::Receiver<String>, seen: &mut String, needle: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !seen.contains(needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(piece) => seen.push_str(&piece),
            Err(_) => panic!("no {needle:?} on the terminal within {limit:?}; it showed:\n{seen}"),
        }
    }
}

/// A program running in a pseudo-terminal of its own, with what the terminal showed so far.
struct Terminal {
    master: OwnedFd,
    rx: mpsc::Receiver<String>,
    seen: String,
    child: Stopped,
}

impl Terminal {
    /// Runs `program` with `args` (and `env`) under setsid(1): a session of its own, with the
    /// pseudo-terminal (its stdin) as the controlling terminal, so its process group is the
    /// terminal's foreground group. Not a group leader here, setsid execs it in place (no fork).
    fn run(program: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let pty = nix::pty::openpty(None, None).expect("a pseudo-terminal");
        let slave = pty.slave;
        let (out, err, inp) = (
            slave.try_clone().unwrap(),
            slave.try_clone().unwrap(),
            slave.try_clone().unwrap(),
        );
        let mut command = Command::new("setsid");
        command
            .arg("--ctty")
            .arg(program)
            .args(args)
            .envs(env.iter().copied())
            // The binaries are built: no nested cargo build.
            .env_remove("CARGO")
            .stdin(Stdio::from(inp))
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        let child = Stopped(command.spawn().expect("the program starts"));
        // Only the program (and the children it gives the terminal) may hold the terminal now,
        // so its end reaches the reader as the end of the terminal's output.
        drop(command);
        drop(slave);
        let rx = reader(pty.master.try_clone().unwrap());
        Self {
            master: pty.master,
            rx,
            seen: String::new(),
            child,
        }
    }

    /// Waits until the terminal showed `needle`.
    fn until(&mut self, needle: &str) {
        until(&self.rx, &mut self.seen, needle, WAIT);
    }

    /// Types Ctrl-C: the terminal's line discipline signals the foreground group.
    fn ctrl_c(&self) {
        let typed = nix::unistd::write(&self.master, &[0x03]).expect("type Ctrl-C");
        assert_eq!(typed, 1);
    }

    /// Waits until every process holding the terminal exited (its output ends); returns the
    /// program's exit status.
    fn exit_status(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(piece) => self.seen.push_str(&piece),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("the program did not exit:\n{}", self.seen)
                }
            }
        }
        self.child.0.wait().unwrap()
    }
}

#[test]
fn ctrl_c_in_a_terminal_stops_the_demo_and_every_child_cleanly() {
    let home = tempfile::tempdir().unwrap();
    let home_arg = home.path().display().to_string();
    let mut demo = Terminal::run(env!("CARGO_BIN_EXE_demo"), &["--home", &home_arg], &[]);
    demo.until("started 2 brokers and a pipeliner");
    demo.ctrl_c();
    demo.until("interrupted");
    let status = demo.exit_status();
    let seen = &demo.seen;
    assert_eq!(status.code(), Some(130), "{seen}");
    assert!(seen.contains("all children stopped"), "{seen}");
    assert!(
        !seen.contains("stopped with"),
        "a child did not stop cleanly:\n{seen}"
    );
    assert!(!seen.contains("some pipelines failed"), "{seen}");
}

/// The demo, asked to stop (SIGTERM: it then stops its children, each within a bounded
/// grace) and waited for when the test ends early.
struct Stopped(std::process::Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(Some(_))) {
            return;
        }
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.0.wait();
    }
}

/// A process worker that takes 2 s a job, noting each job's start in a file of `DIR`.
const SLOW_WORKER: &str = r#"
import json, os, sys, threading
folder = sys.argv[1]
print(json.dumps({"hello": "pypelinin worker", "protocol": 1, "workers": ["Slow"]}), flush=True)
for line in sys.stdin:
    job = json.loads(line)
    open(os.path.join(folder, job["job id"] + ".started"), "w").close()
    threading.Event().wait(2)
    print(json.dumps({"job id": job["job id"], "result": {"slept": True, "pid": os.getpid()}}), flush=True)
"#;

#[test]
fn ctrl_c_in_a_brokers_terminal_lets_its_process_workers_finish_their_jobs() {
    use pypelinin_common::protocol::request::NewJob;
    use pypelinin_common::testing::{process_gone, wait_until};

    let cluster = crate::support::Cluster::start(&[], 0, &[], 0);
    let folder = cluster.home.path();
    std::fs::write(folder.join("slow.py"), SLOW_WORKER).unwrap();
    std::fs::write(
        folder.join("broker.toml"),
        format!(
            "[[broker.process_workers]]\nname = \"Slow\"\ncommand = [\"python3\", \"slow.py\", {:?}]\nprocesses = 2\n",
            folder.display().to_string()
        ),
    )
    .unwrap();

    let config = folder.join("broker.toml").display().to_string();
    let mut broker = Terminal::run(
        env!("CARGO_BIN_EXE_my_broker"),
        &[
            "--api",
            &cluster.api,
            "--broadcast",
            &cluster.broadcast,
            "--config",
            &config,
            "--concurrency",
            "2",
        ],
        &[("NO_COLOR", "1")],
    );
    broker.until("broker running");

    // Two jobs, running on the pool's two processes.
    let store = cluster.store();
    std::fs::create_dir_all(&store).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let ids: Vec<String> = runtime.block_on(async {
        let mut c = pypelinin_common::transport::ApiClient::connect(
            cluster.api.clone(),
            Default::default(),
        )
        .await
        .unwrap();
        let mut ids = Vec::new();
        for name in ["j0", "j1"] {
            std::fs::write(store.join(format!("{name}.json")), "{}").unwrap();
            let job = NewJob::new("Slow", serde_json::json!({"filename": name}));
            ids.push(c.add_job(job).await.unwrap().to_string());
        }
        ids
    });
    wait_until(WAIT, "both jobs started", || {
        ids.iter()
            .all(|id| folder.join(format!("{id}.started")).exists())
    });

    // Ctrl-C, typed: it reaches the broker, not its worker processes (a process group each).
    broker.ctrl_c();
    broker.until("stopping");
    let status = broker.exit_status();
    let seen = &broker.seen;
    assert!(status.success(), "{status}:\n{seen}");
    // Both jobs ran to their end and were saved; then the pool stopped.
    let mut pids = Vec::new();
    for name in ["j0", "j1"] {
        let doc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(store.join(format!("{name}.json"))).unwrap())
                .unwrap();
        assert_eq!(doc["slept"], true, "{name} did not finish: {doc}\n{seen}");
        pids.push(u32::try_from(doc["pid"].as_u64().unwrap()).unwrap());
    }
    for pid in pids {
        wait_until(WAIT, "the pool's processes stopped", || process_gone(pid));
    }
    assert!(!seen.contains("unfinished"), "{seen}");
}
