//! A cluster of real processes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pypelinin_example::process::Daemon;

pub const WAIT: Duration = Duration::from_secs(120);

pub fn bin(name: &str) -> PathBuf {
    match name {
        "my_router" => env!("CARGO_BIN_EXE_my_router").into(),
        "my_broker" => env!("CARGO_BIN_EXE_my_broker").into(),
        "my_pipeliner" => env!("CARGO_BIN_EXE_my_pipeliner").into(),
        "send_pipelines" => env!("CARGO_BIN_EXE_send_pipelines").into(),
        other => panic!("no binary {other}"),
    }
}

pub fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| (*s).to_owned()).collect()
}

/// A router, brokers and pipeliners as processes; dropped → every process killed.
pub struct Cluster {
    pub home: tempfile::TempDir,
    pub api: String,
    pub broadcast: String,
    pub daemons: Vec<Daemon>,
}

impl Cluster {
    pub fn start(
        router_args: &[&str],
        brokers: usize,
        broker_args: &[&str],
        pipeliners: usize,
    ) -> Self {
        let home = tempfile::tempdir().unwrap();
        let home_arg = home.path().display().to_string();
        let mut a = args(&[
            "--api",
            "tcp://127.0.0.1:0",
            "--broadcast",
            "tcp://127.0.0.1:0",
            "--home",
            &home_arg,
        ]);
        a.extend(args(router_args));
        let mut router = Daemon::spawn(
            "my_router",
            &bin("my_router"),
            &a,
            Some(&home.path().join("router.log")),
        )
        .unwrap();
        let (api, broadcast) = router.read_endpoints().unwrap();
        let mut cluster = Self {
            home,
            api,
            broadcast,
            daemons: vec![router],
        };
        for _ in 0..brokers {
            cluster.add("my_broker", broker_args);
        }
        for _ in 0..pipeliners {
            cluster.add("my_pipeliner", &[]);
        }
        cluster
    }

    pub fn add(&mut self, name: &str, extra: &[&str]) {
        let mut a = args(&["--api", &self.api, "--broadcast", &self.broadcast]);
        a.extend(args(extra));
        let log = self
            .home
            .path()
            .join(format!("{name}-{}.log", self.daemons.len()));
        self.daemons
            .push(Daemon::spawn(name, &bin(name), &a, Some(&log)).unwrap());
    }

    pub fn store(&self) -> PathBuf {
        self.home.path().join("store")
    }

    pub fn logs(&self) -> String {
        let mut out = String::new();
        for entry in std::fs::read_dir(self.home.path()).unwrap().flatten() {
            let p = entry.path();
            if p.extension().is_some_and(|e| e == "log") {
                out.push_str(&format!("--- {}\n{}\n", p.display(), tail(&p)));
            }
        }
        out
    }
}

fn tail(p: &Path) -> String {
    let text = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
