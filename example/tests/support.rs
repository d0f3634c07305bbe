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
        Self::start_with_config("", router_args, brokers, broker_args, pipeliners)
    }

    /// As [`Cluster::start`], with `config` (TOML) passed to every process as `--config`.
    pub fn start_with_config(
        config: &str,
        router_args: &[&str],
        brokers: usize,
        broker_args: &[&str],
        pipeliners: usize,
    ) -> Self {
        let home = tempfile::tempdir().unwrap();
        std::fs::write(home.path().join("cluster.toml"), config).unwrap();
        let mut cluster = Self {
            home,
            api: String::new(),
            broadcast: String::new(),
            daemons: Vec::new(),
        };
        let mut router =
            cluster.spawn_router("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", router_args);
        let (api, broadcast) = router.read_endpoints().unwrap();
        cluster.api = api;
        cluster.broadcast = broadcast;
        cluster.daemons.push(router);
        for _ in 0..brokers {
            cluster.add("my_broker", broker_args);
        }
        for _ in 0..pipeliners {
            cluster.add("my_pipeliner", &[]);
        }
        cluster
    }

    fn config_arg(&self) -> String {
        self.home.path().join("cluster.toml").display().to_string()
    }

    fn spawn_router(&self, api: &str, broadcast: &str, extra: &[&str]) -> Daemon {
        let home_arg = self.home.path().display().to_string();
        let config = self.config_arg();
        let mut a = args(&[
            "--api",
            api,
            "--broadcast",
            broadcast,
            "--home",
            &home_arg,
            "--config",
            &config,
        ]);
        a.extend(args(extra));
        let log = self
            .home
            .path()
            .join(format!("router-{}.log", self.daemons.len()));
        Daemon::spawn("my_router", &bin("my_router"), &a, Some(&log)).unwrap()
    }

    /// Starts a router again on the same endpoints and data (after the first was killed).
    pub fn restart_router(&mut self, extra: &[&str]) {
        let (api, broadcast) = (self.api.clone(), self.broadcast.clone());
        let mut router = self.spawn_router(&api, &broadcast, extra);
        router.read_endpoints().unwrap();
        self.daemons.push(router);
    }

    /// The process `index` (in start order: the router is 0).
    pub fn daemon(&mut self, index: usize) -> &mut Daemon {
        &mut self.daemons[index]
    }

    pub fn add(&mut self, name: &str, extra: &[&str]) {
        let config = self.config_arg();
        let mut a = args(&[
            "--api",
            &self.api,
            "--broadcast",
            &self.broadcast,
            "--config",
            &config,
        ]);
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

/// A client of the cluster, connected within the bounded wait.
pub async fn manager(cluster: &Cluster) -> pypelinin_client::PipelineManager {
    pypelinin_common::testing::within(
        WAIT,
        "client connect",
        pypelinin_client::PipelineManager::connect(&cluster.api, &cluster.broadcast),
    )
    .await
    .unwrap()
}
