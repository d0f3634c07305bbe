//! Process workers: pools of long-lived processes speaking the line protocol (a Python test
//! worker, `workers/process_worker.py`), through a real router and broker.

use std::collections::HashSet;

use pypelinin_broker::process::ProcessWorker;
use pypelinin_broker::worker::{BoxError, WorkerResult};
use pypelinin_broker::{Broker, JobInfo, JsonObject, Store, Worker, WorkerRegistry};
use pypelinin_common::protocol::request::NewJob;
use pypelinin_common::testing::{process_gone, wait_until, within};
use serde_json::{json, Value};

use crate::support::{outcomes, Cluster, WAIT};

fn script() -> String {
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/workers/process_worker.py"
    )
    .to_owned()
}

/// A pool of `processes` processes of the test worker, serving Py and PyToo.
fn pool(processes: usize) -> ProcessWorker {
    ProcessWorker {
        name: Some("Py".into()),
        names: vec!["PyToo".into()],
        requires: vec!["spec".into()],
        command: vec!["python3".into(), script()],
        processes,
        max_jobs_per_process: None,
        timeout_secs: None,
        workdir: None,
        hello_timeout_secs: None,
        retry_secs: None,
    }
}

/// Adds a job of `worker` whose spec is `spec` (its document `name` in the store).
async fn add(cluster: &Cluster, worker: &str, name: &str, spec: Value) -> String {
    std::fs::write(cluster.store_dir.path().join(format!("{name}.json")), "{}").unwrap();
    let mut c = cluster.client().await;
    c.add_job(NewJob::new(worker, json!({"filename": name, "spec": spec})))
        .await
        .unwrap()
        .to_string()
}

/// The process ids a "hang" job wrote to its pidfile: the worker's and its child's.
fn pids_in(pidfile: &std::path::Path) -> Vec<u32> {
    std::fs::read_to_string(pidfile)
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect()
}

fn pid_of(cluster: &Cluster, name: &str) -> u32 {
    u32::try_from(cluster.document(name)["pid"].as_u64().unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_runs_many_jobs_on_the_same_few_processes() {
    let mut cluster = Cluster::start().await;
    let mut events = cluster.events().await;
    let mut settings = cluster.settings(4);
    settings.process_workers = vec![pool(2)];
    cluster.broker(settings, WorkerRegistry::new());
    let mut ids = Vec::new();
    for i in 0..20 {
        let worker = if i % 2 == 0 { "Py" } else { "PyToo" };
        ids.push(add(&cluster, worker, &format!("d{i}"), json!({"mode": "pid"})).await);
    }
    let (finished, failed) = outcomes(&mut events, 20).await;
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(finished.len(), 20);
    let pids: HashSet<u32> = (0..20)
        .map(|i| pid_of(&cluster, &format!("d{i}")))
        .collect();
    assert!(pids.len() <= 2, "20 jobs ran on {} processes", pids.len());
    // Each job ran as the worker it named.
    assert_eq!(cluster.document("d1")["worker"], "PyToo");
    // An error answer fails the job with the worker's error and traceback.
    let id = add(&cluster, "Py", "e", json!({"mode": "error"})).await;
    let (_, failed) = outcomes(&mut events, 1).await;
    assert_eq!(failed[0].0, id);
    assert!(failed[0].1.contains("bad input"), "{failed:?}");
    cluster.stop().await;
    for pid in pids {
        wait_until(WAIT, "the pool's processes stopped with the broker", || {
            process_gone(pid)
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_crashes_or_prints_garbage_fails_its_job_and_is_replaced() {
    let mut cluster = Cluster::start().await;
    let mut events = cluster.events().await;
    let mut settings = cluster.settings(2);
    settings.process_workers = vec![pool(2)];
    cluster.broker(settings, WorkerRegistry::new());
    add(&cluster, "Py", "before", json!({"mode": "pid"})).await;
    outcomes(&mut events, 1).await;
    let crash = add(&cluster, "Py", "crash", json!({"mode": "crash"})).await;
    let (_, failed) = outcomes(&mut events, 1).await;
    assert_eq!(failed[0].0, crash);
    // The error carries the end of the process's stderr.
    assert!(
        failed[0].1.contains("dying on purpose"),
        "no stderr in {:?}",
        failed[0].1
    );
    let garbage = add(&cluster, "Py", "garbage", json!({"mode": "garbage"})).await;
    let (_, failed) = outcomes(&mut events, 1).await;
    assert_eq!(failed[0].0, garbage);
    assert!(failed[0].1.contains("this is not an answer"), "{failed:?}");
    // The pool is whole again: two jobs at once run on two live processes.
    let a = add(&cluster, "Py", "a", json!({"mode": "pid"})).await;
    let b = add(&cluster, "PyToo", "b", json!({"mode": "pid"})).await;
    let (finished, failed) = outcomes(&mut events, 2).await;
    assert!(failed.is_empty(), "{failed:?}");
    assert!(finished.contains(&a) && finished.contains(&b));
    for name in ["a", "b"] {
        assert!(
            !process_gone(pid_of(&cluster, name)),
            "{name} ran on a dead process"
        );
    }
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_past_its_timeout_kills_its_process_group_and_the_pool_goes_on() {
    let mut cluster = Cluster::start().await;
    let mut events = cluster.events().await;
    let mut settings = cluster.settings(1);
    settings.process_workers = vec![ProcessWorker {
        timeout_secs: Some(0.5),
        ..pool(1)
    }];
    cluster.broker(settings, WorkerRegistry::new());
    let pidfile = cluster.store_dir.path().join("hang.pids");
    let hang = add(
        &cluster,
        "Py",
        "hang",
        json!({"mode": "hang", "pidfile": pidfile}),
    )
    .await;
    let (_, failed) = outcomes(&mut events, 1).await;
    assert_eq!(failed[0].0, hang);
    assert!(failed[0].1.contains("timed out"), "{failed:?}");
    let pids = pids_in(&pidfile);
    assert_eq!(pids.len(), 2, "the worker and its child");
    for pid in pids {
        wait_until(WAIT, "the process group killed", || process_gone(pid));
    }
    add(&cluster, "Py", "after", json!({"mode": "pid"})).await;
    let (finished, failed) = outcomes(&mut events, 1).await;
    assert!(failed.is_empty() && finished.len() == 1, "{failed:?}");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_stopping_past_its_grace_kills_a_running_process_job_and_ends() {
    let cluster = Cluster::start().await;
    let mut settings = cluster.settings(1);
    settings.shutdown_grace_secs = 0.2;
    settings.process_workers = vec![ProcessWorker {
        timeout_secs: Some(600.0),
        ..pool(1)
    }];
    let pidfile = cluster.store_dir.path().join("hang.pids");
    let broker = Broker::new(
        settings,
        WorkerRegistry::new(),
        pypelinin_broker::file_store_factory(),
    )
    .unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let token = shutdown.clone();
    let running = tokio::spawn(async move { broker.run(token).await });
    add(
        &cluster,
        "Py",
        "hang",
        json!({"mode": "hang", "pidfile": pidfile}),
    )
    .await;
    wait_until(WAIT, "the job to start its child", || {
        std::fs::read_to_string(&pidfile).is_ok_and(|t| t.split_whitespace().count() == 2)
    });
    let pids = pids_in(&pidfile);
    shutdown.cancel();
    // The job would run for 600 s: the broker ends after its grace period all the same.
    within(WAIT, "the broker to stop", running)
        .await
        .unwrap()
        .unwrap();
    for pid in pids {
        wait_until(WAIT, "the job's process group killed", || process_gone(pid));
    }
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_are_recycled_after_their_share_of_jobs() {
    let mut cluster = Cluster::start().await;
    let mut events = cluster.events().await;
    let mut settings = cluster.settings(1);
    settings.process_workers = vec![ProcessWorker {
        max_jobs_per_process: Some(2),
        ..pool(1)
    }];
    cluster.broker(settings, WorkerRegistry::new());
    // One after the other, so each runs on whichever process is idle.
    let mut pids = Vec::new();
    for i in 0..6 {
        add(&cluster, "Py", &format!("r{i}"), json!({"mode": "pid"})).await;
        let (finished, failed) = outcomes(&mut events, 1).await;
        assert!(failed.is_empty() && finished.len() == 1, "{failed:?}");
        pids.push(pid_of(&cluster, &format!("r{i}")));
    }
    assert_eq!(pids[0], pids[1]);
    assert_eq!(pids[2], pids[3]);
    assert_eq!(pids[4], pids[5]);
    assert_eq!(pids.iter().collect::<HashSet<_>>().len(), 3, "{pids:?}");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_that_cannot_say_hello_is_not_offered() {
    let cluster = Cluster::start().await;
    let silent = ProcessWorker {
        name: Some("Silent".into()),
        names: vec![],
        command: vec!["sh".into(), "-c".into(), "exec sleep 600".into()],
        hello_timeout_secs: Some(0.3),
        ..pool(1)
    };
    let dies = ProcessWorker {
        name: Some("Dies".into()),
        names: vec![],
        command: vec![
            "sh".into(),
            "-c".into(),
            "echo 'no python here' >&2; exit 1".into(),
        ],
        ..pool(1)
    };
    // With nothing else to run, the broker refuses to start, after saying why.
    let mut settings = cluster.settings(1);
    settings.process_workers = vec![silent.clone(), dies.clone()];
    let broker = Broker::new(
        settings,
        WorkerRegistry::new(),
        pypelinin_broker::file_store_factory(),
    )
    .unwrap();
    let outcome = tokio::time::timeout(WAIT, broker.run(Default::default()))
        .await
        .expect("the broker gave up on its pools in time");
    assert!(
        matches!(outcome, Err(pypelinin_broker::Error::NoWorkers)),
        "{outcome:?}"
    );
    cluster.stop().await;
    // The errors say why (checked on the pools themselves).
    let silent = pypelinin_broker::process::Pool::new(silent);
    let e = silent.start().await.unwrap_err();
    assert!(e.contains("no hello within"), "{e}");
    let dies = pypelinin_broker::process::Pool::new(dies);
    let e = dies.start().await.unwrap_err();
    assert!(e.contains("no python here"), "{e}");
}

/// Answers its input.
struct Echo;
impl Worker for Echo {
    fn name(&self) -> &str {
        "Echo"
    }
    fn process(&self, input: JsonObject) -> WorkerResult<JsonObject> {
        Ok(input)
    }
}

/// Whether the router's cluster status shows a live broker offering `worker`.
async fn offered(cluster: &Cluster, worker: &str) -> bool {
    let status = cluster.client().await.cluster_status().await.unwrap();
    status
        .peers
        .iter()
        .any(|p| !p.gone && p.peer.workers.iter().any(|w| w == worker))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_whose_processes_stop_starting_is_withdrawn_then_offered_again() {
    let mut cluster = Cluster::start().await;
    let mut events = cluster.events().await;
    // The worker's processes fail to start while the file `broken` is in their folder, as
    // after a bad deploy.
    let folder = tempfile::tempdir().unwrap();
    let broken = folder.path().join("broken");
    let command = format!(
        "if [ -e broken ]; then echo 'ModuleNotFoundError: no module named numpy' >&2; exit 1; fi; exec python3 {}",
        script()
    );
    let mut settings = cluster.settings(1);
    settings.process_workers = vec![ProcessWorker {
        command: vec!["sh".into(), "-c".into(), command],
        workdir: Some(folder.path().to_path_buf()),
        retry_secs: Some(0.3),
        ..pool(1)
    }];
    let mut registry = WorkerRegistry::new();
    registry.add(Echo).unwrap();
    cluster.broker(settings, registry);
    add(&cluster, "Py", "first", json!({"mode": "pid"})).await;
    let (finished, failed) = outcomes(&mut events, 1).await;
    assert!(failed.is_empty() && finished.len() == 1, "{failed:?}");
    // Its process dies, and every replacement fails to start.
    std::fs::write(&broken, "").unwrap();
    let crash = add(&cluster, "Py", "crash", json!({"mode": "crash"})).await;
    let (_, failed) = outcomes(&mut events, 1).await;
    assert_eq!(failed[0].0, crash);
    // The broker stops offering the pool's workers (and keeps offering its others)...
    // (No event tells a broker's workers: its status, sent every 2 s, is polled.)
    within(WAIT, "the broker to withdraw Py", async {
        let mut poll = tokio::time::interval(std::time::Duration::from_millis(50));
        while offered(&cluster, "Py").await || !offered(&cluster, "Echo").await {
            poll.tick().await;
        }
    })
    .await;
    assert!(!offered(&cluster, "PyToo").await);
    // ... so a job of theirs waits at the router instead of failing (one attempt per job
    // here: a job the broker took would fail for good).
    let waits = add(&cluster, "PyToo", "waits", json!({"mode": "pid"})).await;
    let echo = add(&cluster, "Echo", "echo", json!({})).await;
    let (finished, failed) = outcomes(&mut events, 1).await;
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(finished, vec![echo]);
    // Fixed: the pool starts a process again, offers its workers, and the job runs.
    std::fs::remove_file(&broken).unwrap();
    let (finished, failed) = outcomes(&mut events, 1).await;
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(finished, vec![waits]);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_result_comes_through_whole() {
    let mut cluster = Cluster::start().await;
    let mut events = cluster.events().await;
    let mut settings = cluster.settings(1);
    settings.process_workers = vec![pool(1)];
    cluster.broker(settings, WorkerRegistry::new());
    let bytes = 20 * 1024 * 1024;
    add(
        &cluster,
        "Py",
        "big",
        json!({"mode": "big", "bytes": bytes}),
    )
    .await;
    let (finished, failed) = outcomes(&mut events, 1).await;
    assert!(failed.is_empty() && finished.len() == 1, "{failed:?}");
    assert_eq!(
        cluster.document("big")["big"].as_str().map(str::len),
        Some(bytes)
    );
    cluster.stop().await;
}

/// A store that hands each job its data as input and keeps the results in memory.
#[derive(Default)]
struct KeepingStore(std::sync::Mutex<Vec<JsonObject>>);

impl Store for KeepingStore {
    fn retrieve(&self, info: &JobInfo) -> Result<JsonObject, BoxError> {
        Ok(info.data.as_object().cloned().unwrap_or_default())
    }

    fn save(&self, _info: &JobInfo, result: &JsonObject) -> Result<(), BoxError> {
        self.0.lock().unwrap().push(result.clone());
        Ok(())
    }

    fn save_monitoring(&self, _record: &Value) -> Result<(), BoxError> {
        Ok(())
    }
}

fn job_info(job_id: &str, spec: Value) -> JobInfo {
    JobInfo {
        job_id: job_id.into(),
        worker: "Py".into(),
        worker_requires: vec!["spec".into()],
        data: json!({ "spec": spec }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_of_200_mb_comes_through_the_pipe_whole() {
    let pool = std::sync::Arc::new(pypelinin_broker::process::Pool::new(pool(1)));
    pool.start().await.unwrap();
    let store = std::sync::Arc::new(KeepingStore::default());
    let bytes = 200 * 1024 * 1024;
    let big = job_info("j1", json!({"mode": "big", "bytes": bytes}));
    pool.run(big, store.clone(), WAIT * 6)
        .await
        .expect("the big result");
    {
        let results = store.0.lock().unwrap();
        assert_eq!(results[0]["big"].as_str().map(str::len), Some(bytes));
    }
    store.0.lock().unwrap().clear();
    // The process is still there for the next job.
    let next = job_info("j2", json!({"mode": "pid"}));
    pool.run(next, store.clone(), WAIT).await.unwrap();
    assert!(store.0.lock().unwrap()[0]["pid"].is_u64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shell_worker_of_the_docs_runs_as_a_pool() {
    let mut cluster = Cluster::start().await;
    let mut events = cluster.events().await;
    let mut settings = cluster.settings(2);
    settings.process_workers = vec![ProcessWorker {
        name: Some("Size".into()),
        names: vec![],
        requires: vec!["spec".into()],
        command: vec![concat!(env!("CARGO_MANIFEST_DIR"), "/../example/workers/size.sh").into()],
        processes: 2,
        ..pool(1)
    }];
    cluster.broker(settings, WorkerRegistry::new());
    add(&cluster, "Size", "s", json!({"mode": "any"})).await;
    let failing = add(&cluster, "Size", "f", json!({"fail": true})).await;
    let (finished, failed) = outcomes(&mut events, 2).await;
    assert_eq!(finished.len(), 1, "{failed:?}");
    assert!(cluster.document("s")["line bytes"].as_u64().unwrap() > 40);
    assert_eq!(failed[0].0, failing);
    assert!(
        failed[0].1.contains("asked to fail") && failed[0].1.contains("size.sh"),
        "{failed:?}"
    );
    cluster.stop().await;
    // docs/workers.md shows this very script.
    let docs = include_str!("../../docs/workers.md");
    let script = include_str!("../../example/workers/size.sh");
    assert!(
        docs.contains(script),
        "docs/workers.md shows another size.sh"
    );
}
