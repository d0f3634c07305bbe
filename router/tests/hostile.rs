//! Hostile peers against a real `pypelinin-router` process, speaking raw TCP (no ZeroMQ
//! library on the attacking side): absurd frame headers, garbage, floods of connections, a
//! slow greeting, a peer that never reads. After each, the router answers a normal request and
//! its memory stays under a stated bound.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use pypelinin_common::protocol::request::Probe;
use pypelinin_common::protocol::Request;
use pypelinin_common::testing::zmtp::{greeting, long_header};
use pypelinin_common::testing::{within, zmtp};
use pypelinin_common::transport::{ApiClient, ClientOptions};

use crate::process::{spawn_router, Daemon};
use crate::support::WAIT;

/// The router's resident memory may not pass this after a probe (it starts at ~40 MB).
const RSS_BOUND_MB: u64 = 200;

/// A READY command for a DEALER socket.
fn ready() -> Vec<u8> {
    zmtp::ready("DEALER")
}

/// A raw connection that sent its greeting.
fn connect(endpoint: &str) -> TcpStream {
    let address = endpoint.strip_prefix("tcp://").expect("a tcp endpoint");
    let mut stream = TcpStream::connect(address).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream.write_all(&greeting()).expect("send the greeting");
    stream
}

/// Whether the router closed `stream` (it reads the router's greeting first, then expects the
/// end of the stream).
fn closed_by_router(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

fn rss_mb(daemon: &Daemon) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.0.id()))
        .expect("the router's /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024)
}

/// The router still serves: a normal client gets an answer.
async fn still_serves(api: &str, after: &str) {
    let mut client = within(
        WAIT,
        "a normal client connecting",
        ApiClient::connect(api.to_owned(), ClientOptions::default()),
    )
    .await
    .unwrap_or_else(|e| panic!("after {after}: cannot connect: {e}"));
    within(WAIT, "a normal request", client.get_configuration())
        .await
        .unwrap_or_else(|e| panic!("after {after}: no answer: {e}"));
}

fn router() -> (Daemon, String, String) {
    spawn_router(&[
        "--api",
        "tcp://127.0.0.1:0",
        "--broadcast",
        "tcp://127.0.0.1:0",
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_frame_headers_close_the_connection_and_the_router_serves_on() {
    let (daemon, api, broadcast) = router();
    for endpoint in [&api, &broadcast] {
        for claim in [
            1u64 << 32,
            1 << 44,
            1 << 47,
            1 << 56,
            (1 << 63) - (1 << 20),
            u64::MAX,
        ] {
            let mut stream = connect(endpoint);
            stream.write_all(&ready()).expect("ready");
            stream.write_all(&long_header(claim)).expect("header");
            assert!(
                tokio::task::block_in_place(|| closed_by_router(&mut stream)),
                "a header claiming {claim} bytes on {endpoint} was not refused"
            );
        }
        // Held at once on many connections.
        let mut held: Vec<TcpStream> = (0..8).map(|_| connect(endpoint)).collect();
        for stream in &mut held {
            let _ = stream.write_all(&long_header(1 << 44));
        }
        still_serves(&api, "absurd headers").await;
        assert!(rss_mb(&daemon) < RSS_BOUND_MB, "RSS {} MB", rss_mb(&daemon));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_after_the_greeting_closes_the_connection() {
    let (daemon, api, broadcast) = router();
    let repeated = vec![0x22u8; 10_000];
    let mut seeded = Vec::new();
    for seed in 1u64..=3 {
        // A small xorshift: the same bytes every run.
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        seeded.push(
            (0..10_000)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect::<Vec<u8>>(),
        );
    }
    for endpoint in [&api, &broadcast] {
        for bytes in std::iter::once(&repeated).chain(&seeded) {
            let mut stream = connect(endpoint);
            let _ = stream.write_all(bytes);
            assert!(
                tokio::task::block_in_place(|| closed_by_router(&mut stream)),
                "garbage on {endpoint} was not refused"
            );
        }
        // Not even a greeting.
        let address = endpoint.strip_prefix("tcp://").expect("tcp");
        let mut stream = TcpStream::connect(address).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let _ = stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(tokio::task::block_in_place(|| closed_by_router(
            &mut stream
        )));
    }
    still_serves(&api, "garbage").await;
    assert!(rss_mb(&daemon) < RSS_BOUND_MB, "RSS {} MB", rss_mb(&daemon));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gigabyte_frame_is_refused_at_its_header_before_it_is_buffered() {
    let (daemon, api, _) = router();
    let mut stream = connect(&api);
    stream.write_all(&ready()).expect("ready");
    stream.write_all(&[0x01, 0]).expect("delimiter");
    stream.write_all(&long_header(1 << 30)).expect("header");
    // Send on until the router closes: it must, long before 1 GiB.
    let chunk = vec![b'x'; 1 << 20];
    let mut sent = 0u64;
    while sent < 1 << 30 {
        if stream.write_all(&chunk).is_err() {
            break;
        }
        sent += chunk.len() as u64;
    }
    assert!(
        sent < 256 << 20,
        "the router took {sent} bytes of a 1 GiB frame"
    );
    still_serves(&api, "a 1 GiB frame").await;
    assert!(rss_mb(&daemon) < RSS_BOUND_MB, "RSS {} MB", rss_mb(&daemon));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_held_connections_and_a_slow_greeting_do_not_stop_service() {
    let (daemon, api, _) = router();
    let address = api.strip_prefix("tcp://").expect("tcp").to_owned();
    let mut held = Vec::new();
    for _ in 0..2_000 {
        match TcpStream::connect(&address) {
            Ok(stream) => held.push(stream),
            Err(e) => panic!("connection {} refused: {e}", held.len()),
        }
    }
    // A slow-loris greeting: one byte, then nothing.
    let mut slow = TcpStream::connect(&address).expect("connect");
    slow.write_all(&[0xFF]).expect("first byte");
    still_serves(&api, "2,000 held connections and a slow greeting").await;
    assert!(rss_mb(&daemon) < RSS_BOUND_MB, "RSS {} MB", rss_mb(&daemon));
    drop(held);
    still_serves(&api, "the held connections closed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_reads_is_held_to_its_requests_in_flight_and_then_dropped() {
    let (daemon, api, _) = router();
    let mut stream = connect(&api);
    stream.write_all(&ready()).expect("ready");
    // 300 requests whose replies are ~1 MB each (the status of 20,000 unknown jobs), never read.
    let ids: Vec<String> = (0..20_000).map(|n| format!("{n:032x}")).collect();
    let request = serde_json::json!({"command": "job status", "job ids": ids}).to_string();
    let mut sent = 0;
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .expect("write timeout");
    for _ in 0..300 {
        let mut message = vec![0x01, 0];
        message.extend(long_header(request.len() as u64));
        message.extend(request.as_bytes());
        if stream.write_all(&message).is_err() {
            break;
        }
        sent += 1;
    }
    assert!(sent > 0, "no request went out");
    still_serves(&api, "a peer that never reads").await;
    let rss = rss_mb(&daemon);
    eprintln!("router RSS with a peer that never reads: {rss} MB");
    assert!(
        rss < RSS_BOUND_MB,
        "RSS {rss} MB with replies queued for a peer that never reads"
    );
    // When it leaves, what was queued for it goes; the router serves on, within its bound.
    drop(stream);
    still_serves(&api, "the peer left").await;
    let after = rss_mb(&daemon);
    eprintln!("router RSS after the peer left: {after} MB");
    assert!(after < RSS_BOUND_MB, "RSS {after} MB after the peer left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_never_reads_is_dropped_at_its_high_water_mark() {
    let (mut daemon, api, broadcast) = router();
    let stderr = daemon.0.stderr.take().expect("the router's stderr");
    let mut stream = connect(&broadcast);
    stream.write_all(&zmtp::ready("SUB")).expect("ready");
    // Subscribe to everything (a ZMTP 3.0 subscription message: 0x01 and the prefix).
    stream.write_all(&[0x00, 1, 0x01]).expect("subscribe");
    // ~40 MB of probe broadcasts, more than twice the 16 MiB mark, none read.
    let mut client = within(
        WAIT,
        "a normal client connecting",
        ApiClient::connect(api.clone(), ClientOptions::default()),
    )
    .await
    .expect("connect");
    let probes: Vec<Request> = (0..5_000)
        .map(|n| {
            Request::Probe(Probe {
                token: format!("{n:0>250}"),
            })
        })
        .collect();
    for _ in 0..30 {
        within(WAIT, "a batch of probes", client.batch(&probes))
            .await
            .expect("probes sent");
    }
    // The router says why it dropped the subscriber: the mark, not the stall timeout.
    let reason = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.contains("closed a connection"))
    });
    let line = within(WAIT, "the router's log line", reason)
        .await
        .expect("the log reader")
        .expect("a log line about the dropped subscriber");
    assert!(line.contains("bytes behind"), "{line}");
    assert!(
        tokio::task::block_in_place(|| closed_by_router(&mut stream)),
        "the subscriber is still connected"
    );
    still_serves(&api, "a subscriber that never reads").await;
    let rss = rss_mb(&daemon);
    assert!(rss < RSS_BOUND_MB, "RSS {rss} MB");
}
