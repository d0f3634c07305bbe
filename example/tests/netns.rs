//! `netbench --short`: the cluster across network namespaces joined by a bridge, with a delay
//! on every host's link, and a broker host cut off for 10 s under load (needs root, as CI has).

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

#[test]
fn a_cluster_across_network_hops_survives_a_partition_and_reports_each_pipeline_once() {
    let child = Command::new(env!("CARGO_BIN_EXE_netbench"))
        .args(["--short", "--timeout", "120"])
        // The daemons are built beside it: no cargo build from inside the test.
        .env_remove("CARGO")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start netbench");
    let pid = child.id();
    let (done, output) = std::sync::mpsc::channel();
    std::thread::spawn(move || done.send(child.wait_with_output()));
    let Ok(output) = output.recv_timeout(Duration::from_secs(300)) else {
        // Stop it by its PID; it removes its namespaces as it goes.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        panic!("netbench --short did not end within 300 s");
    };
    let output = output.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "netbench failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("no JSON report ({e}):\n{stdout}"));

    let delays = report["delays"].as_array().unwrap();
    assert_eq!(delays.len(), 2, "{report}");
    for d in delays {
        assert!(d["pipelines_per_s"].as_f64().unwrap() > 0.0, "{d}");
    }
    // 5 ms each way on every link: a two-job pipeline needs several round trips between
    // hosts (client, router, pipeliner, broker), so it cannot take less than 20 ms.
    let slow = &delays[1];
    assert_eq!(slow["delay_ms"], 5.0);
    assert!(
        slow["latency_p50_ms"].as_f64().unwrap() >= 20.0,
        "the delay did not show: {slow}"
    );

    let partition = &report["partition"];
    assert_eq!(partition["partition_s"], 10.0, "{partition}");
    assert!(
        partition["pipelines"].as_u64().unwrap() > 1000,
        "{partition}"
    );
    assert_eq!(partition["failed"], 0, "{partition}");
    assert_eq!(partition["reported_twice"], 0, "{partition}");
    assert_eq!(partition["pipeline_broadcasts_twice"], 0, "{partition}");
    assert_eq!(partition["job_broadcasts_twice"], 0, "{partition}");
    assert_eq!(partition["checks_passed"], true, "{partition}");
    // Broker-1 held work when the link went down, and some of what the router handed to it
    // then never reached it. None of it waited for its lease to end (30 s): the held jobs were
    // reported once the link was back, and the lost hand-outs were queued again as soon as
    // broker-1 renewed its leases saying which requests it had given up.
    assert_eq!(
        partition["job_lease_s"],
        Value::Null,
        "the router's default lease"
    );
    assert!(
        partition["slowest_pipeline_s"].as_f64().unwrap() < 30.0,
        "a pipeline waited for a lease to end: {partition}"
    );
}
