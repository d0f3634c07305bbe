//! Fault injection with real processes, killed or stopped by PID: whatever daemon crashes,
//! every accepted pipeline ends exactly once and no saved result is lost.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use pypelinin_client::{Error, Outcome, Pipeline, PipelineId};
use pypelinin_common::protocol::Event;
use pypelinin_common::testing::{process_gone, within};
use pypelinin_common::transport::{ApiClient, ClientOptions, Subscriber};
use serde_json::json;

use crate::support::{manager, Cluster, WAIT};

/// Short leases and fast renewals, so the tests see expiries within seconds (with room for a
/// loaded CI machine).
fn config(extra: &str) -> String {
    format!(
        r#"
[router]
job_lease_secs = 2.0
pipeline_lease_secs = 2.0
retry_backoff_ms = 100

[broker]
lease_renew_secs = 0.25
poll_interval_secs = 1.0

[pipeliner]
lease_renew_secs = 0.25
resync_after_secs = 0.5
poll_interval_secs = 1.0
{extra}"#
    )
}

/// A command worker that notes each run in `<dir>/<name>.runs` and then takes `secs`.
fn slow_worker(dir: &Path, name: &str, secs: f64) -> String {
    let runs = dir.join(format!("{name}.runs"));
    format!(
        r#"
[[broker.command_workers]]
name = "{name}"
command = ["sh", "-c", "echo run >> '{}'; sleep {secs}; echo '{{}}'"]
timeout_secs = 30
"#,
        runs.display()
    )
}

fn runs(dir: &Path, name: &str) -> usize {
    std::fs::read_to_string(dir.join(format!("{name}.runs"))).map_or(0, |t| t.lines().count())
}

/// A live subscriber counting `pipeline finished`/`failed` broadcasts per pipeline.
async fn ends_counter(cluster: &Cluster) -> Subscriber {
    let mut sub = Subscriber::connect(
        &cluster.broadcast,
        &[Event::PIPELINE_FINISHED, Event::PIPELINE_FAILED],
        WAIT,
    )
    .await
    .unwrap();
    let mut c = ApiClient::connect(cluster.api.clone(), ClientOptions::default())
        .await
        .unwrap();
    sub.wait_live(&mut c, WAIT).await.unwrap();
    sub
}

/// Reads every end broadcast that arrives within `quiet` of the last one.
async fn count_ends(sub: &mut Subscriber, quiet: Duration) -> HashMap<PipelineId, usize> {
    let mut ends: HashMap<PipelineId, usize> = HashMap::new();
    while let Ok(Ok(event)) = tokio::time::timeout(quiet, sub.recv()).await {
        match event {
            Event::PipelineFinished { pipeline_id, .. }
            | Event::PipelineFailed { pipeline_id, .. } => {
                *ends.entry(pipeline_id).or_default() += 1;
            }
            _ => {}
        }
    }
    ends
}

fn noop_pipeline(i: usize) -> Pipeline {
    Pipeline::builder()
        .edge("Noop0", "Noop1")
        .data(json!({"filename": format!("p{i}")}))
        .build()
        .unwrap()
}

fn single(worker: &str, i: usize) -> Pipeline {
    Pipeline::builder()
        .job(worker)
        .data(json!({"filename": format!("{worker}-{i}")}))
        .build()
        .unwrap()
}

/// Waits (bounded) until `check` holds; a file has no event to wait for.
async fn until(what: &str, mut check: impl FnMut() -> bool) {
    within(WAIT, what, async {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        while !check() {
            tick.tick().await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_mid_job_has_its_job_run_by_another_broker() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start_with_config(
        &config(&slow_worker(dir.path(), "Slow", 1.0)),
        &[],
        1,
        &["--concurrency", "1"],
        1,
    );
    let mut m = manager(&cluster).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(m.start(&single("Slow", i)).await.unwrap());
    }
    until("the first broker to start a job", || {
        runs(dir.path(), "Slow") >= 1
    })
    .await;
    cluster.daemon(1).signal(Signal::SIGKILL);
    cluster.add("my_broker", &["--concurrency", "1"]);
    let outcomes = m
        .wait_all(&ids, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    assert!(
        outcomes.iter().all(|o| matches!(o, Outcome::Finished(_))),
        "{outcomes:?}"
    );
    assert!(runs(dir.path(), "Slow") >= 4, "the killed job ran again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeliner_killed_mid_run_has_its_pipelines_finished_by_another_none_twice() {
    let mut cluster =
        Cluster::start_with_config(&config(""), &["--no-store"], 2, &["--noop-workers", "2"], 1);
    let mut ends = ends_counter(&cluster).await;
    let mut m = manager(&cluster).await;
    let mut ids = Vec::new();
    for i in 0..300 {
        ids.push(m.start(&noop_pipeline(i)).await.unwrap());
    }
    // Kill the pipeliner while it walks pipelines.
    let first = m.wait_any(WAIT).await.unwrap();
    assert!(first.is_some());
    cluster.daemon(3).signal(Signal::SIGKILL);
    cluster.add("my_pipeliner", &[]);
    let outcomes = m.wait_all(&ids[..], WAIT).await;
    // wait_all hands out outcomes not taken yet; the first one was taken by wait_any.
    let outcomes = outcomes.unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    assert!(outcomes.iter().all(|o| matches!(o, Outcome::Finished(_))));
    let ends = count_ends(&mut ends, Duration::from_secs(2)).await;
    assert_eq!(ends.len(), 300, "every pipeline ended");
    assert!(ends.values().all(|&n| n == 1), "a pipeline ended twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_killed_mid_run_and_restarted_loses_nothing() {
    let count: usize = std::env::var("PYPELININ_FAULT_PIPELINES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let mut cluster = Cluster::start_with_config(
        &config(""),
        &[],
        2,
        &["--noop-workers", "2", "--concurrency", "4"],
        1,
    );
    let mut ends = ends_counter(&cluster).await;
    let mut m = manager(&cluster).await;
    let mut ids = Vec::new();
    for i in 0..count {
        ids.push(m.start(&noop_pipeline(i)).await.unwrap());
    }
    let mut seen = HashMap::new();
    let (id, outcome) = m.wait_any(WAIT).await.unwrap().expect("a pipeline ended");
    seen.insert(id, outcome);
    cluster.daemon(0).kill();
    cluster.restart_router(&[]);
    let deadline = Instant::now() + WAIT;
    while seen.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        match m.wait_any(left).await {
            Ok(Some((id, outcome))) => {
                assert!(
                    seen.insert(id.clone(), outcome).is_none(),
                    "{id} ended twice for the client"
                );
            }
            Ok(None) => panic!(
                "{} of {count} pipelines ended\n{}",
                seen.len(),
                cluster.logs()
            ),
            Err(e) => panic!("{e}\n{}", cluster.logs()),
        }
    }
    assert!(
        seen.values().all(|o| matches!(o, Outcome::Finished(_))),
        "{:?}",
        seen.values().find(|o| !matches!(o, Outcome::Finished(_)))
    );
    // Every result is in the store.
    for i in 0..count {
        let doc =
            std::fs::read_to_string(cluster.store().join(format!("p{i}.json"))).unwrap_or_default();
        assert!(doc.contains("_result-from-Noop1"), "p{i} has no result");
    }
    // Broadcasts: each pipeline ended at most once (some ends fell in the router's downtime).
    let ends = count_ends(&mut ends, Duration::from_secs(1)).await;
    assert!(ends.values().all(|&n| n == 1), "a pipeline ended twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_always_failing_worker_fails_its_pipeline_after_exactly_the_configured_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let runs_file = dir.path().join("Fail.runs");
    let fail = format!(
        r#"
[[broker.command_workers]]
name = "Fail"
command = ["sh", "-c", "echo run >> '{}'; echo 'the disk is on fire' >&2; exit 1"]
"#,
        runs_file.display()
    );
    let cluster = Cluster::start_with_config(&config(&fail), &[], 1, &["--noop-workers", "2"], 1);
    let mut m = manager(&cluster).await;
    let bad = m.start(&single("Fail", 0)).await.unwrap();
    let mut good = Vec::new();
    for i in 0..20 {
        good.push(m.start(&noop_pipeline(i)).await.unwrap());
    }
    match m.wait(&bad).await {
        Err(Error::Failed(f)) => {
            assert_eq!(f.worker, "Fail");
            assert!(
                f.error.contains("the disk is on fire")
                    && f.error.contains("failed 3 of 3 attempts"),
                "{}",
                f.error
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        runs(dir.path(), "Fail"),
        3,
        "exactly the configured attempts"
    );
    let outcomes = m.wait_all(&good, WAIT).await.unwrap();
    assert!(
        outcomes.iter().all(|o| matches!(o, Outcome::Finished(_))),
        "other pipelines are unaffected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_stopped_past_its_lease_has_its_late_result_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start_with_config(
        &config(&slow_worker(dir.path(), "Slow", 1.5)),
        &[],
        1,
        &["--concurrency", "1"],
        1,
    );
    let mut ends = ends_counter(&cluster).await;
    let mut m = manager(&cluster).await;
    let id = m.start(&single("Slow", 0)).await.unwrap();
    until("the first broker to start the job", || {
        runs(dir.path(), "Slow") >= 1
    })
    .await;
    cluster.daemon(1).signal(Signal::SIGSTOP);
    cluster.add("my_broker", &["--concurrency", "1"]);
    let secs = m
        .wait(&id)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    assert!(secs > 0.0);
    assert_eq!(
        runs(dir.path(), "Slow"),
        2,
        "the job ran again on the second broker"
    );
    // Wake the first broker: it reports its late result, which changes nothing.
    cluster.daemon(1).signal(Signal::SIGCONT);
    let ends = count_ends(&mut ends, Duration::from_secs(3)).await;
    assert_eq!(ends.get(&id), Some(&1), "the pipeline ended once");
    let mut c = ApiClient::connect(cluster.api.clone(), ClientOptions::default())
        .await
        .unwrap();
    let status = c.pipeline_status(vec![id.clone()]).await.unwrap();
    assert_eq!(
        status[&id].state,
        pypelinin_common::protocol::PipelineState::Finished
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_malformed_requests_does_not_stop_a_run() {
    let cluster =
        Cluster::start_with_config(&config(""), &["--no-store"], 2, &["--noop-workers", "2"], 1);
    let mut m = manager(&cluster).await;
    let mut flooders = Vec::new();
    for f in 0..4 {
        let api = cluster.api.clone();
        flooders.push(tokio::spawn(async move {
            let mut c = ApiClient::connect(api, ClientOptions::default())
                .await
                .unwrap();
            let garbage: [&[u8]; 6] = [
                b"\xff\xfe",
                b"",
                b"{",
                b"[1,2,3]",
                br#"{"command": 5}"#,
                br#"{"command": "job finished"}"#,
            ];
            for i in 0..500 {
                let reply = c
                    .request_bytes(garbage[(i + f) % garbage.len()].to_vec())
                    .await
                    .expect("every request is answered");
                let v: serde_json::Value = serde_json::from_slice(&reply).unwrap();
                assert!(v["answer"].is_string(), "{v}");
            }
        }));
    }
    let mut ids = Vec::new();
    for i in 0..200 {
        ids.push(m.start(&noop_pipeline(i)).await.unwrap());
    }
    for f in flooders {
        f.await.unwrap();
    }
    let outcomes = m.wait_all(&ids, WAIT).await.unwrap();
    assert!(outcomes.iter().all(|o| matches!(o, Outcome::Finished(_))));
}

/// A command worker that notes its process id in `<dir>/<name>.pids` and then runs `sleep`
/// for ten minutes as a child of its shell (so the shell's process group holds two
/// processes): only a kill of the whole group ends it within a test.
fn sleeping_worker(dir: &Path, name: &str) -> String {
    let pids = dir.join(format!("{name}.pids"));
    format!(
        r#"
[[broker.command_workers]]
name = "{name}"
command = ["sh", "-c", "echo $$ >> '{}'; sleep 600; echo '{{}}'"]
timeout_secs = 900
"#,
        pids.display()
    )
}

/// The live processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let child: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // After the command's closing parenthesis: state, ppid, ...
            let (_, rest) = stat.rsplit_once(") ")?;
            let mut fields = rest.split_whitespace();
            let state = fields.next()?;
            let ppid: u32 = fields.next()?.parse().ok()?;
            (state != "Z" && ppid == pid).then_some(child)
        })
        .collect()
}

/// Starts the pipeline `first → then` (its document `cancelled`) and waits until `first`'s job
/// has noted its process ids in `<dir>/<first>.pids` (a line ending in a newline); returns the
/// pipeline and those ids.
async fn start_until_running(
    m: &mut pypelinin_client::PipelineManager,
    dir: &Path,
    first: &str,
    then: &str,
) -> (PipelineId, Vec<u32>) {
    let pipeline = Pipeline::builder()
        .edge(first, then)
        .data(json!({"filename": "cancelled"}))
        .build()
        .unwrap();
    let id = m.start(&pipeline).await.unwrap();
    let pids = dir.join(format!("{first}.pids"));
    until(&format!("the {first} job to start"), || {
        std::fs::read_to_string(&pids).is_ok_and(|t| t.ends_with('\n'))
    })
    .await;
    let pids = std::fs::read_to_string(&pids)
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    (id, pids)
}

/// Cancels pipeline `id` and waits until it is said cancelled.
async fn cancel_and_wait(
    m: &mut pypelinin_client::PipelineManager,
    cluster: &Cluster,
    id: &PipelineId,
) {
    m.cancel(id).await.unwrap();
    let outcomes = m
        .wait_all(std::slice::from_ref(id), WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    assert_eq!(outcomes, [Outcome::Cancelled]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_pipeline_stops_its_running_job_runs_nothing_more_and_stays_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let workers = format!(
        "{}{}",
        sleeping_worker(dir.path(), "Sleepy"),
        slow_worker(dir.path(), "After", 0.0)
    );
    let mut cluster = Cluster::start_with_config(&config(&workers), &[], 1, &[], 1);
    let mut m = manager(&cluster).await;
    let (id, pids) = start_until_running(&mut m, dir.path(), "Sleepy", "After").await;
    let pid = pids[0];
    until("the worker's shell to start its sleep", || {
        !children_of(pid).is_empty()
    })
    .await;
    let children = children_of(pid);

    cancel_and_wait(&mut m, &cluster, &id).await;
    until(
        "the worker's processes (its shell and the shell's child) to be killed",
        || process_gone(pid) && children.iter().all(|c| process_gone(*c)),
    )
    .await;
    // A second cancel says it ended already.
    let again = m.cancel(&id).await.unwrap_err().to_string();
    assert!(again.contains("cancelled already"), "{again}");

    // Durable: a restarted router still says cancelled.
    cluster.daemon(0).kill();
    cluster.restart_router(&[]);
    let mut c = within(
        WAIT,
        "a client of the restarted router",
        ApiClient::connect(cluster.api.clone(), ClientOptions::default()),
    )
    .await
    .unwrap();
    let status = c.pipeline_status(vec![id.clone()]).await.unwrap();
    assert_eq!(
        status[&id].state,
        pypelinin_common::protocol::PipelineState::Cancelled
    );
    // The cluster goes on: a new pipeline runs, and the cancelled one's next job never ran
    // (nor was its first job run again).
    let next = m.start(&single("After", 1)).await.unwrap();
    m.wait_all(&[next], WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    assert_eq!(
        runs(dir.path(), "After"),
        1,
        "only the new pipeline's job ran"
    );
    let sleepy_runs = std::fs::read_to_string(dir.path().join("Sleepy.pids"))
        .unwrap()
        .lines()
        .count();
    assert_eq!(sleepy_runs, 1, "the cancelled job ran again");
    assert!(
        !cluster.store().join("cancelled.json").exists(),
        "a result of the cancelled pipeline was saved"
    );
}

/// A pool of one Python process serving `Hang` (starts a child, notes both pids, waits
/// forever) and `Pid` (answers its process id).
fn hanging_process_worker(dir: &Path) -> String {
    let script = dir.join("hang.py");
    let pids = dir.join("Hang.pids");
    std::fs::write(
        &script,
        format!(
            r#"import json, os, signal, subprocess, sys
print(json.dumps({{"hello": "pypelinin worker", "protocol": 1, "workers": ["Hang", "Pid"]}}), flush=True)
for line in sys.stdin:
    job = json.loads(line)
    if job["worker"] == "Hang":
        child = subprocess.Popen(["sleep", "600"])
        with open({pids:?}, "w") as f:
            f.write("{{}} {{}}\n".format(os.getpid(), child.pid))
        signal.pause()
    print(json.dumps({{"job id": job["job id"], "result": {{"pid": os.getpid()}}}}), flush=True)
"#
        ),
    )
    .unwrap();
    format!(
        "\n[[broker.process_workers]]\nnames = [\"Hang\", \"Pid\"]\ncommand = [\"python3\", {:?}]\n\
         processes = 1\ntimeout_secs = 60\n",
        script.display().to_string()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_pipeline_kills_its_process_workers_group_and_the_pool_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let cluster =
        Cluster::start_with_config(&config(&hanging_process_worker(dir.path())), &[], 1, &[], 1);
    let mut m = manager(&cluster).await;
    let (id, pids) = start_until_running(&mut m, dir.path(), "Hang", "Pid").await;
    assert_eq!(pids.len(), 2, "the worker process and its child");

    cancel_and_wait(&mut m, &cluster, &id).await;
    until("the worker process and its child to be killed", || {
        pids.iter().all(|p| process_gone(*p))
    })
    .await;
    // The pool's one process was replaced: the next job runs, on a new process.
    let next = m.start(&single("Pid", 1)).await.unwrap();
    m.wait_all(&[next], WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cluster.store().join("Pid-1.json")).unwrap())
            .unwrap();
    let pid = doc["pid"].as_u64().unwrap();
    assert!(
        !pids.contains(&u32::try_from(pid).unwrap()),
        "ran on the killed process"
    );
    assert!(
        !cluster.store().join("cancelled.json").exists(),
        "a result of the cancelled pipeline was saved"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_past_its_deadline_fails_naming_what_it_waits_for_across_a_router_restart() {
    let mut cluster =
        Cluster::start_with_config(&config(""), &["--no-store"], 1, &["--noop-workers", "2"], 1);
    let mut m = manager(&cluster).await;
    let pipeline = Pipeline::builder()
        .edge("Noop0", "Nobody")
        .data(json!({"filename": "late"}))
        .build()
        .unwrap();
    let id = m
        .start_with_deadline(&pipeline, Duration::from_secs(3))
        .await
        .unwrap();
    // The router restarts before the deadline: the deadline is kept.
    cluster.daemon(0).kill();
    cluster.restart_router(&[]);
    match m.wait_within(&id, WAIT).await {
        Err(pypelinin_client::Error::Failed(f)) => {
            assert_eq!(f.worker, "Nobody", "{f}");
            assert!(
                f.error.contains("deadline of 3 s passed")
                    && f.error.contains("worker Nobody (queued)"),
                "{f}"
            );
        }
        other => panic!("{other:?}\n{}", cluster.logs()),
    }
    // A deadline the router cannot take is refused at once.
    let refused = m
        .start_with_deadline(&pipeline, Duration::ZERO)
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("deadline secs"), "{refused}");
}
