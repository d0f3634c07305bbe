//! Jobs run through real brokers: results, failures, concurrency, routing, command workers.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use pypelinin_broker::worker::{JsonObject, Worker, WorkerResult};
use pypelinin_broker::{CommandWorker, TypedWorker, WorkerRegistry};
use pypelinin_common::protocol::request::NewJob;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::support::{outcomes, Cluster};

struct Upper;
impl Worker for Upper {
    fn name(&self) -> &str {
        "Upper"
    }
    fn requires(&self) -> Vec<String> {
        vec!["text".into()]
    }
    fn process(&self, input: JsonObject) -> WorkerResult<JsonObject> {
        let text = input["text"].as_str().ok_or("text must be a string")?;
        Ok(json!({"upper": text.to_uppercase()})
            .as_object()
            .cloned()
            .unwrap())
    }
}

#[derive(Deserialize)]
struct Text {
    text: String,
}
#[derive(Serialize)]
struct Length {
    length: usize,
}
struct Len;
impl TypedWorker for Len {
    type Input = Text;
    type Output = Length;
    const NAME: &'static str = "Len";
    const REQUIRES: &'static [&'static str] = &["text"];
    fn process(&self, input: Text) -> WorkerResult<Length> {
        Ok(Length {
            length: input.text.chars().count(),
        })
    }
}

/// A worker whose behaviour comes from the job data: fail, panic or hang.
struct Trouble;
impl Worker for Trouble {
    fn name(&self) -> &str {
        "Trouble"
    }
    fn requires(&self) -> Vec<String> {
        vec!["mode".into()]
    }
    fn timeout(&self) -> Option<Duration> {
        // Long enough that a panicking or failing job ends well within it on a loaded machine.
        Some(Duration::from_secs(3))
    }
    fn process(&self, input: JsonObject) -> WorkerResult<JsonObject> {
        match input["mode"].as_str() {
            Some("fail") => Err("the input was bad".into()),
            Some("panic") => panic!("worker exploded"),
            Some("hang") => {
                // Workload, not a test wait: blocks past the worker's 3 s timeout.
                let (_keep, never) = std::sync::mpsc::channel::<()>();
                let _ = never.recv_timeout(Duration::from_secs(6));
                Ok(JsonObject::new())
            }
            _ => Ok(json!({"ok": true}).as_object().cloned().unwrap()),
        }
    }
}

fn registry(workers: impl FnOnce(&mut WorkerRegistry)) -> WorkerRegistry {
    let mut r = WorkerRegistry::new();
    workers(&mut r);
    r
}

fn write_doc(cluster: &Cluster, name: &str, doc: Value) {
    std::fs::write(
        cluster.store_dir.path().join(format!("{name}.json")),
        doc.to_string(),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_and_results_land_in_the_store() {
    let mut cluster = Cluster::start().await;
    let mut events = cluster.events().await;
    cluster.broker(
        cluster.settings(2),
        registry(|r| {
            r.add(Upper).unwrap();
            r.add_typed(Len).unwrap();
        }),
    );
    let mut c = cluster.client().await;
    for i in 0..5 {
        write_doc(
            &cluster,
            &format!("d{i}"),
            json!({"text": format!("hello {i}")}),
        );
        c.add_job(NewJob::new("Upper", json!({"filename": format!("d{i}")})))
            .await
            .unwrap();
        c.add_job(NewJob::new("Len", json!({"filename": format!("d{i}")})))
            .await
            .unwrap();
    }
    let (finished, failed) = outcomes(&mut events, 10).await;
    assert_eq!(failed, vec![]);
    assert_eq!(finished.len(), 10);
    for i in 0..5 {
        let doc = cluster.document(&format!("d{i}"));
        assert_eq!(doc["upper"], format!("HELLO {i}"));
        assert_eq!(doc["length"], 7);
        assert_eq!(
            doc["_result-from-Upper"],
            json!({"upper": format!("HELLO {i}")})
        );
        assert_eq!(doc["_result-from-Len"], json!({"length": 7}));
    }
    // Monitoring records are written every 0.2 s of the configuration.
    let log = cluster.store_dir.path().join("monitoring.log");
    pypelinin_common::testing::within(crate::support::WAIT, "a monitoring record", async {
        // A file has no event to wait for: check it on a short interval, bounded by `within`.
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        while !std::fs::read_to_string(&log).is_ok_and(|t| t.contains("\"type\":\"broker\"")) {
            tick.tick().await;
        }
    })
    .await;
    let first: Value = serde_json::from_str(
        std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert!(first["host"]["memory"]["total"].as_u64().unwrap() > 0);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_panicking_and_hanging_workers_are_reported_and_others_go_on() {
    let mut cluster = Cluster::start().await;
    let mut events = cluster.events().await;
    cluster.broker(
        cluster.settings(2),
        registry(|r| {
            r.add(Trouble).unwrap();
        }),
    );
    let mut c = cluster.client().await;
    let mut ids = std::collections::HashMap::new();
    for mode in ["fail", "ok", "panic", "ok", "hang", "ok"] {
        let id = c
            .add_job(NewJob::new(
                "Trouble",
                json!({"filename": format!("t-{}", ids.len()), "mode": mode}),
            ))
            .await
            .unwrap();
        ids.insert(id.to_string(), mode);
    }
    // A job naming no document fails in the store, and one with a hostile name is refused.
    let no_doc = c
        .add_job(NewJob::new("Trouble", json!({"mode": "ok"})))
        .await
        .unwrap();
    let hostile = c
        .add_job(NewJob::new(
            "Trouble",
            json!({"filename": "../../etc/passwd", "mode": "ok"}),
        ))
        .await
        .unwrap();
    let (finished, failed) = outcomes(&mut events, 8).await;
    assert_eq!(finished.len(), 3, "{failed:?}");
    assert!(finished.iter().all(|id| ids[id] == "ok"));
    let error_of = |wanted: &str| -> String {
        failed
            .iter()
            .find(|(id, _)| id == wanted)
            .map(|(_, e)| e.clone())
            .unwrap_or_else(|| panic!("{wanted} not failed: {failed:?}"))
    };
    for (id, mode) in &ids {
        match *mode {
            "fail" => assert_eq!(error_of(id), "worker failed: the input was bad"),
            "panic" => assert!(
                error_of(id).starts_with("worker panicked: worker exploded at "),
                "{}",
                error_of(id)
            ),
            "hang" => assert_eq!(error_of(id), "timed out after 3s"),
            _ => {}
        }
    }
    assert!(
        error_of(no_doc.as_str()).contains("no string \"filename\""),
        "{}",
        error_of(no_doc.as_str())
    );
    assert!(
        error_of(hostile.as_str()).contains("refusing document name"),
        "{}",
        error_of(hostile.as_str())
    );
    assert!(!cluster
        .store_dir
        .path()
        .join("../../etc/passwd.json")
        .exists());
}

/// Records how many jobs run at once; each job waits until `target` run together (or a bound).
struct Overlap {
    state: Arc<(Mutex<(usize, usize)>, Condvar)>,
    target: usize,
}
impl Worker for Overlap {
    fn name(&self) -> &str {
        "Overlap"
    }
    fn process(&self, _: JsonObject) -> WorkerResult<JsonObject> {
        let (lock, cvar) = &*self.state;
        let mut g = lock.lock().unwrap();
        g.0 += 1;
        g.1 = g.1.max(g.0);
        cvar.notify_all();
        let (mut g, _) = cvar
            .wait_timeout_while(g, Duration::from_secs(5), |g| {
                g.0 < self.target && g.1 < self.target
            })
            .unwrap();
        g.0 -= 1;
        Ok(JsonObject::new())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_is_reached_and_never_exceeded() {
    let mut cluster = Cluster::start().await;
    let mut events = cluster.events().await;
    let state = Arc::new((Mutex::new((0, 0)), Condvar::new()));
    let (s2, concurrency) = (state.clone(), 3);
    cluster.broker(
        cluster.settings(concurrency),
        registry(move |r| {
            // Each job waits until `concurrency` jobs run together: a broker that runs fewer
            // makes them wait their bound, one that runs more shows a higher maximum.
            r.add(Overlap {
                state: s2,
                target: concurrency,
            })
            .unwrap();
        }),
    );
    let mut c = cluster.client().await;
    for i in 0..9 {
        c.add_job(NewJob::new("Overlap", json!({"filename": format!("o{i}")})))
            .await
            .unwrap();
    }
    let (finished, failed) = outcomes(&mut events, 9).await;
    assert_eq!((finished.len(), failed.len()), (9, 0), "{failed:?}");
    let max = state.0.lock().unwrap().1;
    assert_eq!(
        max, concurrency,
        "jobs ran {max} at once with concurrency {concurrency}"
    );
}

fn script(cluster: &Cluster, name: &str, body: &str) -> String {
    let path = cluster.store_dir.path().join(name);
    std::fs::write(&path, body).unwrap();
    path.to_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_workers_run_scripts_and_report_their_failures() {
    let mut cluster = Cluster::start().await;
    let mut events = cluster.events().await;
    let py = script(&cluster, "words.py", "import json, sys\nd = json.load(sys.stdin)\nprint(json.dumps({'words': len(d['text'].split())}))\n");
    let sh_fail = script(&cluster, "fail.sh", "echo 'something broke' >&2\nexit 4\n");
    let sh_bad = script(&cluster, "bad.sh", "cat > /dev/null\necho 'not json'\n");
    let sh_slow = script(&cluster, "slow.sh", "exec sleep 30\n");
    let command = |name: &str, cmd: Vec<&str>, timeout: f64| CommandWorker {
        name: name.into(),
        requires: vec!["text".into()],
        command: cmd.into_iter().map(String::from).collect(),
        timeout_secs: Some(timeout),
    };
    let mut settings = cluster.settings(4);
    settings.command_workers = vec![
        command("Words", vec!["python3", &py], 20.0),
        command("Fail", vec!["sh", &sh_fail], 20.0),
        command("Bad", vec!["sh", &sh_bad], 20.0),
        command("Slow", vec!["sh", &sh_slow], 0.5),
    ];
    cluster.broker(settings, WorkerRegistry::new());
    write_doc(&cluster, "doc", json!({"text": "one two three"}));
    let mut c = cluster.client().await;
    let mut ids = std::collections::HashMap::new();
    for w in ["Words", "Fail", "Bad", "Slow"] {
        ids.insert(
            c.add_job(NewJob::new(w, json!({"filename": "doc"})))
                .await
                .unwrap()
                .to_string(),
            w,
        );
    }
    let (finished, failed) = outcomes(&mut events, 4).await;
    assert_eq!(
        finished.iter().map(|id| ids[id]).collect::<Vec<_>>(),
        vec!["Words"],
        "{failed:?}"
    );
    assert_eq!(cluster.document("doc")["words"], 3);
    for (id, error) in &failed {
        match ids[id] {
            "Fail" => assert!(
                error.contains("exit status: 4") && error.contains("something broke"),
                "{error}"
            ),
            "Bad" => assert!(error.contains("did not print a JSON object"), "{error}"),
            "Slow" => assert!(error.contains("timed out after 500ms"), "{error}"),
            other => panic!("{other} failed: {error}"),
        }
    }
}

struct Named(&'static str);
impl Worker for Named {
    fn name(&self) -> &str {
        self.0
    }
    fn process(&self, _: JsonObject) -> WorkerResult<JsonObject> {
        Ok(json!({"ran by": self.0}).as_object().cloned().unwrap())
    }
}

/// Runs only A, and records in each result which broker ran it.
struct Tagged(&'static str, &'static str);
impl Worker for Tagged {
    fn name(&self) -> &str {
        self.0
    }
    fn process(&self, _: JsonObject) -> WorkerResult<JsonObject> {
        Ok(json!({format!("broker of {}", self.0): self.1})
            .as_object()
            .cloned()
            .unwrap())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokers_get_only_their_workers_jobs_and_absent_workers_wait() {
    let mut cluster = Cluster::start().await;
    let mut events = cluster.events().await;
    cluster.broker(
        cluster.settings(2),
        registry(|r| {
            r.add(Tagged("Cpu", "cpu-broker")).unwrap();
        }),
    );
    cluster.broker(
        cluster.settings(2),
        registry(|r| {
            r.add(Tagged("Gpu", "gpu-broker")).unwrap();
        }),
    );
    let mut c = cluster.client().await;
    for i in 0..6 {
        let worker = if i % 2 == 0 { "Cpu" } else { "Gpu" };
        c.add_job(NewJob::new(worker, json!({"filename": format!("r{i}")})))
            .await
            .unwrap();
    }
    let waiting = c
        .add_job(NewJob::new("Late", json!({"filename": "late"})))
        .await
        .unwrap();
    let (finished, failed) = outcomes(&mut events, 6).await;
    assert_eq!((finished.len(), failed.len()), (6, 0));
    for i in 0..6 {
        let doc = cluster.document(&format!("r{i}"));
        if i % 2 == 0 {
            assert_eq!(
                doc,
                json!({"broker of Cpu": "cpu-broker", "_result-from-Cpu": {"broker of Cpu": "cpu-broker"}})
            );
        } else {
            assert_eq!(
                doc,
                json!({"broker of Gpu": "gpu-broker", "_result-from-Gpu": {"broker of Gpu": "gpu-broker"}})
            );
        }
    }
    // The job for "Late" was never handed to a broker that cannot run it...
    assert!(!cluster.store_dir.path().join("late.json").exists());
    // ... and runs once a broker offering it starts.
    cluster.broker(
        cluster.settings(1),
        registry(|r| {
            r.add(Named("Late")).unwrap();
        }),
    );
    let (finished, _) = outcomes(&mut events, 1).await;
    assert_eq!(finished, vec![waiting.to_string()]);
    assert_eq!(cluster.document("late")["ran by"], "Late");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_waits_for_a_router_that_starts_after_it() {
    use pypelinin_common::transport::{ApiClient, ClientOptions, Subscriber};
    use pypelinin_router::{Router, RouterSettings};
    // Free ports: bind, note them, release them for the router that comes later.
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (api, broadcast) = (
        format!("tcp://127.0.0.1:{}", free()),
        format!("tcp://127.0.0.1:{}", free()),
    );
    let store_dir = tempfile::tempdir().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let settings = pypelinin_broker::BrokerSettings {
        api: api.clone(),
        broadcast: broadcast.clone(),
        concurrency: 1,
        connect_timeout_secs: 0.3,
        ..Default::default()
    };
    let broker = pypelinin_broker::Broker::new(
        settings,
        registry(|r| {
            r.add(Named("Early")).unwrap();
        }),
        pypelinin_broker::file_store_factory(),
    )
    .unwrap();
    let token = shutdown.clone();
    let broker_task = tokio::spawn(async move { broker.run(token).await.unwrap() });
    // The broker is retrying now; start the router on the promised ports.
    let router_settings = RouterSettings {
        api: api.clone(),
        broadcast: broadcast.clone(),
        ..Default::default()
    };
    let router = Router::bind(
        router_settings,
        crate::support::configuration(store_dir.path()),
    )
    .await
    .unwrap();
    let token = shutdown.clone();
    let router_task = tokio::spawn(async move { router.run(token).await.unwrap() });
    let mut sub = Subscriber::connect(
        &broadcast,
        &[pypelinin_common::protocol::Event::JOB_FINISHED],
        crate::support::WAIT,
    )
    .await
    .unwrap();
    let mut c = ApiClient::connect(api, ClientOptions::default())
        .await
        .unwrap();
    sub.wait_live(&mut c, crate::support::WAIT).await.unwrap();
    let id = c
        .add_job(NewJob::new("Early", json!({"filename": "e"})))
        .await
        .unwrap();
    let (finished, _) = outcomes(&mut sub, 1).await;
    assert_eq!(finished, vec![id.to_string()]);
    shutdown.cancel();
    broker_task.await.unwrap();
    router_task.await.unwrap();
}

/// Tells when it started, then blocks until released, so the test controls when the job ends.
struct Gate(Arc<(Mutex<(bool, bool)>, Condvar)>);
impl Worker for Gate {
    fn name(&self) -> &str {
        "Gate"
    }
    fn process(&self, _: JsonObject) -> WorkerResult<JsonObject> {
        let (lock, cvar) = &*self.0;
        let mut g = lock.lock().unwrap();
        g.0 = true;
        cvar.notify_all();
        let _open = cvar
            .wait_timeout_while(g, Duration::from_secs(10), |g| !g.1)
            .unwrap();
        Ok(json!({"gate": "passed"}).as_object().cloned().unwrap())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_the_running_job_finish_and_report() {
    let mut cluster = Cluster::start().await;
    let mut events = cluster.events().await;
    let gate = Arc::new((Mutex::new((false, false)), Condvar::new()));
    let g = gate.clone();
    let token = cluster.broker(
        cluster.settings(1),
        registry(move |r| {
            r.add(Gate(g)).unwrap();
        }),
    );
    let mut c = cluster.client().await;
    let first = c
        .add_job(NewJob::new("Gate", json!({"filename": "g1"})))
        .await
        .unwrap();
    let g = gate.clone();
    let started = tokio::task::spawn_blocking(move || {
        let (lock, cvar) = &*g;
        let (g, _) = cvar
            .wait_timeout_while(lock.lock().unwrap(), crate::support::WAIT, |g| !g.0)
            .unwrap();
        g.0
    });
    assert!(started.await.unwrap(), "the broker did not start the job");
    token.cancel();
    // A job queued after the stop request is not taken.
    let second = c
        .add_job(NewJob::new("Gate", json!({"filename": "g2"})))
        .await
        .unwrap();
    gate.0.lock().unwrap().1 = true;
    gate.1.notify_all();
    let (finished, _) = outcomes(&mut events, 1).await;
    assert_eq!(finished, vec![first.to_string()]);
    assert_eq!(cluster.document("g1")["gate"], "passed");
    let left = c.get_job(Some(vec!["Gate".into()])).await.unwrap().unwrap();
    assert_eq!(left.job_id, second);
}
