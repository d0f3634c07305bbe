//! Hostile bytes against the connecting side. A broker, a pipeliner and a client each reach
//! the router through proxies of this test. Each proxy answers the first connections itself,
//! speaking raw TCP (no ZeroMQ library): a ZMTP handshake, then an absurd frame header or
//! garbage. The processes stay up with bounded memory, and once the proxies pass connections
//! through, the pipelines run.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pypelinin_client::{Outcome, Pipeline, PipelineManager};
use pypelinin_common::testing::within;
use pypelinin_common::testing::zmtp::{greeting, long_header, ready};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::{args, bin, Cluster, WAIT};

/// A process's resident memory may not pass this after the probes.
const RSS_BOUND_MB: u64 = 200;

/// What a hostile router sends on one connection, after a valid handshake or instead of it.
#[derive(Clone)]
struct Probe {
    handshake: bool,
    bytes: Vec<u8>,
}

fn probes() -> Vec<Probe> {
    let after = |bytes: Vec<u8>| Probe {
        handshake: true,
        bytes,
    };
    // Seeded noise, the same each run.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let random: Vec<u8> = (0..4096)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 24) as u8
        })
        .collect();
    vec![
        after(long_header(1 << 47)),
        after(long_header((1 << 63) - (1 << 20))),
        after(long_header(u64::MAX)),
        after(long_header(1 << 32)),
        after(vec![0x22; 10_000]),
        after(random),
        Probe {
            handshake: false,
            bytes: b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_vec(),
        },
    ]
}

/// A proxy in front of one router port: its first connections get the probes, the later ones
/// are passed through to the router.
struct HostileProxy {
    endpoint: String,
    /// Probed connections the peer closed.
    refused: Arc<AtomicUsize>,
    /// Probed connections the peer kept open past the wait (none expected).
    kept: Arc<Mutex<Vec<String>>>,
    probes: usize,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HostileProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HostileProxy {
    async fn start(router: &str, socket_type: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("tcp://{}", listener.local_addr().unwrap());
        let router = router.strip_prefix("tcp://").unwrap().to_owned();
        let probes = probes();
        let count = probes.len();
        let refused = Arc::new(AtomicUsize::new(0));
        let kept = Arc::new(Mutex::new(Vec::new()));
        let (refused_in, kept_in) = (refused.clone(), kept.clone());
        let task = tokio::spawn(async move {
            let mut probes = probes.into_iter();
            loop {
                let Ok((peer, _)) = listener.accept().await else {
                    continue;
                };
                match probes.next() {
                    Some(probe) => {
                        let (refused, kept) = (refused_in.clone(), kept_in.clone());
                        tokio::spawn(async move {
                            let what = format!("{:02x?}", &probe.bytes[..probe.bytes.len().min(9)]);
                            if play(peer, socket_type, probe).await {
                                refused.fetch_add(1, Ordering::SeqCst);
                            } else {
                                kept.lock().unwrap().push(what);
                            }
                        });
                    }
                    None => {
                        let router = router.clone();
                        tokio::spawn(async move {
                            let Ok(mut upstream) = TcpStream::connect(&router).await else {
                                return;
                            };
                            let mut peer = peer;
                            let _ = tokio::io::copy_bidirectional(&mut peer, &mut upstream).await;
                        });
                    }
                }
            }
        });
        Self {
            endpoint,
            refused,
            kept,
            probes: count,
            task,
        }
    }

    /// Waits until every probe was played and its connection closed by the peer.
    async fn all_refused(&self, who: &str) {
        within(WAIT, &format!("{who}: every probe refused"), async {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            while self.refused.load(Ordering::SeqCst) + self.kept.lock().unwrap().len()
                < self.probes
            {
                tick.tick().await;
            }
        })
        .await;
        let kept = self.kept.lock().unwrap();
        assert!(
            kept.is_empty(),
            "{who} kept these connections open: {kept:?}"
        );
    }
}

/// Plays `probe` on `peer`; true when the peer then closed the connection.
async fn play(mut peer: TcpStream, socket_type: &str, probe: Probe) -> bool {
    let mut out = Vec::new();
    if probe.handshake {
        out.extend(greeting());
        out.extend(ready(socket_type));
    }
    out.extend(&probe.bytes);
    // The peer may close before it took everything: that is a refusal too.
    let _ = peer.write_all(&out).await;
    let mut sink = [0u8; 4096];
    let closed = async {
        loop {
            match peer.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), closed)
        .await
        .is_ok()
}

fn rss_mb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024)
}

const CONFIG: &str = r#"
[broker]
request_timeout_secs = 2.0
poll_interval_secs = 1.0

[pipeliner]
request_timeout_secs = 2.0
poll_interval_secs = 1.0
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_router_cannot_stop_a_broker_a_pipeliner_or_a_client() {
    let mut cluster = Cluster::start_with_config(CONFIG, &["--no-store"], 0, &[], 0);
    let config = cluster
        .home
        .path()
        .join("cluster.toml")
        .display()
        .to_string();
    let mut parties = Vec::new();
    for (name, extra) in [
        ("my_broker", &["--noop-workers", "2"][..]),
        ("my_pipeliner", &[][..]),
    ] {
        let api = HostileProxy::start(&cluster.api, "ROUTER").await;
        let broadcast = HostileProxy::start(&cluster.broadcast, "PUB").await;
        let mut a = args(&[
            "--api",
            &api.endpoint,
            "--broadcast",
            &broadcast.endpoint,
            "--config",
            &config,
        ]);
        a.extend(args(extra));
        let log = cluster.home.path().join(format!("{name}-hostile.log"));
        cluster.daemons.push(
            pypelinin_example::process::Daemon::spawn(name, &bin(name), &a, Some(&log)).unwrap(),
        );
        parties.push((name, cluster.daemons.len() - 1, api, broadcast));
    }

    // The client, in this process: each failed connection is an error, never an abort.
    let api = HostileProxy::start(&cluster.api, "ROUTER").await;
    let broadcast = HostileProxy::start(&cluster.broadcast, "PUB").await;
    let mut manager = within(WAIT, "the client through its hostile proxies", async {
        let mut errors = Vec::new();
        loop {
            match PipelineManager::connect(&api.endpoint, &broadcast.endpoint).await {
                Ok(m) => return (m, errors),
                Err(e) => errors.push(e.to_string()),
            }
        }
    })
    .await;
    assert!(
        !manager.1.is_empty(),
        "the client met no hostile connection"
    );

    for (name, index, api, broadcast) in &parties {
        api.all_refused(&format!("{name}'s API")).await;
        broadcast.all_refused(&format!("{name}'s broadcasts")).await;
        let daemon = cluster.daemon(*index);
        assert!(
            daemon.exited().is_none(),
            "{name} exited\n{}",
            cluster.logs()
        );
        let rss = rss_mb(cluster.daemons[*index].pid());
        assert!(rss < RSS_BOUND_MB, "{name}: RSS {rss} MB");
    }
    api.all_refused("the client's API").await;
    broadcast.all_refused("the client's broadcasts").await;
    let rss = rss_mb(std::process::id());
    assert!(rss < RSS_BOUND_MB, "the client: RSS {rss} MB");

    // Past the probes, the same processes run pipelines through the proxies.
    let mut ids = Vec::new();
    for i in 0..20 {
        let pipeline = Pipeline::builder()
            .edge("Noop0", "Noop1")
            .data(json!({"filename": format!("p{i}")}))
            .build()
            .unwrap();
        ids.push(manager.0.start(&pipeline).await.unwrap());
    }
    let outcomes = manager
        .0
        .wait_all(&ids, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    assert!(
        outcomes.iter().all(|o| matches!(o, Outcome::Finished(_))),
        "{outcomes:?}"
    );
}
