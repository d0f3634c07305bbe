//! Pipelines walked end to end.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pypelinin_broker::worker::{JsonObject, Worker, WorkerResult};
use pypelinin_broker::{Broker, BrokerSettings, WorkerRegistry};
use pypelinin_client::{Error, Outcome, Pipeline, PipelineManager};
use pypelinin_common::testing::{within, EPHEMERAL};
use pypelinin_pipeliner::{Pipeliner, PipelinerSettings};
use pypelinin_router::{Router, RouterSettings};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(60);

/// What ran: (pipeline document, worker, start, end).
type Log = Arc<Mutex<Vec<(String, String, Instant, Instant)>>>;

/// Records when it ran, for which document; fails when the data says `"fail": <worker>`.
struct Recorder {
    name: &'static str,
    log: Log,
}

impl Worker for Recorder {
    fn name(&self) -> &str {
        self.name
    }
    fn requires(&self) -> Vec<String> {
        vec!["filename".into(), "fail".into()]
    }
    fn process(&self, input: JsonObject) -> WorkerResult<JsonObject> {
        let start = Instant::now();
        if input["fail"] == self.name {
            return Err(format!("{} was told to fail", self.name).into());
        }
        let doc = input["filename"].as_str().unwrap_or_default().to_owned();
        self.log
            .lock()
            .unwrap()
            .push((doc, self.name.to_owned(), start, Instant::now()));
        Ok(JsonObject::new())
    }
}

struct Cluster {
    api: String,
    broadcast: String,
    shutdown: CancellationToken,
    _store: tempfile::TempDir,
    log: Log,
}

impl Cluster {
    /// A router, `brokers` brokers running A, B, C, D and `pipeliners` pipeliners.
    async fn start(brokers: usize, pipeliners: usize) -> Self {
        let store = tempfile::tempdir().unwrap();
        let config = json!({"store": {"data directory": store.path()}})
            .as_object()
            .cloned()
            .unwrap();
        let settings = RouterSettings {
            api: EPHEMERAL.into(),
            broadcast: EPHEMERAL.into(),
            ..Default::default()
        };
        let router = Router::bind(settings, config).await.unwrap();
        let (api, broadcast) = (
            router.api_endpoint().to_owned(),
            router.broadcast_endpoint().to_owned(),
        );
        let shutdown = CancellationToken::new();
        let t = shutdown.clone();
        tokio::spawn(async move { router.run(t).await.unwrap() });
        let log: Log = Arc::default();
        for _ in 0..brokers {
            let mut registry = WorkerRegistry::new();
            for name in ["A", "B", "C", "D"] {
                registry
                    .add(Recorder {
                        name,
                        log: log.clone(),
                    })
                    .unwrap();
            }
            let settings = BrokerSettings {
                api: api.clone(),
                broadcast: broadcast.clone(),
                concurrency: 2,
                ..Default::default()
            };
            let broker =
                Broker::new(settings, registry, pypelinin_broker::file_store_factory()).unwrap();
            let t = shutdown.clone();
            tokio::spawn(async move { broker.run(t).await.unwrap() });
        }
        for _ in 0..pipeliners {
            let settings = PipelinerSettings {
                api: api.clone(),
                broadcast: broadcast.clone(),
                ..Default::default()
            };
            let t = shutdown.clone();
            tokio::spawn(Pipeliner::new(settings).run(t));
        }
        Self {
            api,
            broadcast,
            shutdown,
            _store: store,
            log,
        }
    }

    async fn manager(&self) -> PipelineManager {
        within(
            WAIT,
            "client connect",
            PipelineManager::connect(&self.api, &self.broadcast),
        )
        .await
        .unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn diamond(doc: &str, fail: &str) -> Pipeline {
    Pipeline::builder()
        .edges("A", ["B", "C"])
        .edge("B", "D")
        .edge("C", "D")
        .data(json!({"filename": doc, "fail": fail}))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_in_job_starts_only_after_both_parents_finished() {
    let cluster = Cluster::start(2, 1).await;
    let mut manager = cluster.manager().await;
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(
            manager
                .start(&diamond(&format!("doc{i}"), "none"))
                .await
                .unwrap(),
        );
    }
    let outcomes = manager.wait_all(&ids, WAIT).await.unwrap();
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Outcome::Finished(s) if *s > 0.0)),
        "{outcomes:?}"
    );
    let log = cluster.log.lock().unwrap();
    assert_eq!(log.len(), 80, "every job ran exactly once");
    for i in 0..20 {
        let doc = format!("doc{i}");
        let of = |w: &str| {
            log.iter()
                .find(|(d, n, _, _)| *d == doc && n == w)
                .unwrap_or_else(|| panic!("{doc}/{w} did not run"))
        };
        let (a, b, c, d) = (of("A"), of("B"), of("C"), of("D"));
        assert!(
            b.2 >= a.3 && c.2 >= a.3,
            "{doc}: B or C started before A finished"
        );
        assert!(
            d.2 >= b.3 && d.2 >= c.3,
            "{doc}: D started before B and C finished"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_job_fails_its_pipeline_with_the_error_and_stops_it() {
    let cluster = Cluster::start(1, 1).await;
    let mut manager = cluster.manager().await;
    let bad = manager.start(&diamond("bad", "B")).await.unwrap();
    let good = manager.start(&diamond("good", "none")).await.unwrap();
    match manager.wait(&bad).await {
        Err(Error::Failed(f)) => {
            assert_eq!((f.pipeline_id, f.worker.as_str()), (bad.clone(), "B"));
            assert!(f.error.contains("B was told to fail"), "{}", f.error);
        }
        other => panic!("{other:?}"),
    }
    assert!(manager.wait(&good).await.unwrap() > 0.0);
    let log = cluster.log.lock().unwrap();
    assert!(
        !log.iter().any(|(d, w, _, _)| d == "bad" && w == "D"),
        "D of the failed pipeline must not run"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_pipeliners_share_300_pipelines_each_walked_once() {
    let cluster = Cluster::start(2, 3).await;
    let mut manager = cluster.manager().await;
    let mut ids = Vec::new();
    for i in 0..300 {
        let p = Pipeline::builder()
            .edge("A", "B")
            .data(json!({"filename": format!("p{i}"), "fail": "none"}))
            .build()
            .unwrap();
        ids.push(manager.start(&p).await.unwrap());
    }
    let outcomes = manager.wait_all(&ids, WAIT).await.unwrap();
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Finished(_)))
            .count(),
        300
    );
    let log = cluster.log.lock().unwrap();
    let mut runs: HashMap<(String, String), usize> = HashMap::new();
    for (doc, worker, _, _) in log.iter() {
        *runs.entry((doc.clone(), worker.clone())).or_default() += 1;
    }
    assert_eq!(runs.len(), 600, "each pipeline ran A and B");
    assert!(
        runs.values().all(|&n| n == 1),
        "a job ran twice: {:?}",
        runs.iter().filter(|(_, &n)| n > 1).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeliner_that_starts_late_takes_the_queued_pipelines() {
    let cluster = Cluster::start(1, 0).await;
    let mut manager = cluster.manager().await;
    let id = manager.start(&diamond("late", "none")).await.unwrap();
    assert!(!manager.finished(&id).await.unwrap());
    let settings = PipelinerSettings {
        api: cluster.api.clone(),
        broadcast: cluster.broadcast.clone(),
        ..Default::default()
    };
    tokio::spawn(Pipeliner::new(settings).run(cluster.shutdown.clone()));
    let outcomes = manager
        .wait_all(std::slice::from_ref(&id), WAIT)
        .await
        .unwrap();
    assert!(matches!(outcomes[..], [Outcome::Finished(_)]));
    assert!(
        manager
            .wait_all(&[id], Duration::from_millis(1))
            .await
            .is_err(),
        "an outcome is handed out once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_whose_requests_together_pass_the_routers_limit_are_sent_in_several_batches() {
    // No pipeliner yet: the pipelines queue up, then one pipeliner takes them all at once and
    // submits their first jobs in one turn: 8 × 3 MB, past the router's 16 MiB request limit.
    let cluster = Cluster::start(1, 0).await;
    let mut manager = cluster.manager().await;
    let pad = "x".repeat(3_000_000);
    let mut ids = Vec::new();
    for i in 0..8 {
        let p = Pipeline::builder()
            .edge("A", "B")
            .data(json!({"filename": format!("big{i}"), "fail": "none", "pad": pad}))
            .build()
            .unwrap();
        ids.push(manager.start(&p).await.unwrap());
    }
    let settings = PipelinerSettings {
        api: cluster.api.clone(),
        broadcast: cluster.broadcast.clone(),
        ..Default::default()
    };
    tokio::spawn(Pipeliner::new(settings).run(cluster.shutdown.clone()));
    let outcomes = manager.wait_all(&ids, WAIT).await.unwrap();
    assert!(
        outcomes.iter().all(|o| matches!(o, Outcome::Finished(_))),
        "{outcomes:?}"
    );
    assert_eq!(cluster.log.lock().unwrap().len(), 16, "A and B of each ran");
}
