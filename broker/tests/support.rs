//! A router and brokers in this process, on free ports.

use std::time::Duration;

use pypelinin_broker::{Broker, BrokerSettings, FileStore, WorkerRegistry};
use pypelinin_common::protocol::Event;
use pypelinin_common::testing::{within, EPHEMERAL};
use pypelinin_common::transport::{ApiClient, ClientOptions, Subscriber};
use pypelinin_router::{Router, RouterSettings};
use serde_json::{json, Map, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const WAIT: Duration = Duration::from_secs(20);

pub struct Cluster {
    pub api: String,
    pub broadcast: String,
    pub store_dir: tempfile::TempDir,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

pub fn configuration(store_dir: &std::path::Path) -> Map<String, Value> {
    json!({"monitoring interval": 0.2, "store": {"data directory": store_dir, "monitoring filename": store_dir.join("monitoring.log")}})
        .as_object()
        .cloned()
        .unwrap()
}

impl Cluster {
    /// A router on free ports.
    pub async fn start() -> Self {
        let store_dir = tempfile::tempdir().unwrap();
        // One attempt per job: these tests are about what the broker reports; the router's
        // retries have tests of their own.
        let settings = RouterSettings {
            api: EPHEMERAL.into(),
            broadcast: EPHEMERAL.into(),
            max_attempts: 1,
            ..Default::default()
        };
        let router = Router::bind(settings, configuration(store_dir.path()))
            .await
            .unwrap();
        let (api, broadcast) = (
            router.api_endpoint().to_owned(),
            router.broadcast_endpoint().to_owned(),
        );
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let tasks = vec![tokio::spawn(
            async move { router.run(token).await.unwrap() },
        )];
        Self {
            api,
            broadcast,
            store_dir,
            shutdown,
            tasks,
        }
    }

    pub fn settings(&self, concurrency: usize) -> BrokerSettings {
        BrokerSettings {
            api: self.api.clone(),
            broadcast: self.broadcast.clone(),
            concurrency,
            poll_interval_secs: 30.0,
            ..Default::default()
        }
    }

    /// Starts a broker with `registry`; returns its own shutdown token.
    pub fn broker(
        &mut self,
        settings: BrokerSettings,
        registry: WorkerRegistry,
    ) -> CancellationToken {
        let broker =
            Broker::new(settings, registry, pypelinin_broker::file_store_factory()).unwrap();
        let token = self.shutdown.child_token();
        let t = token.clone();
        self.tasks
            .push(tokio::spawn(async move { broker.run(t).await.unwrap() }));
        token
    }

    pub async fn client(&self) -> ApiClient {
        within(
            WAIT,
            "client connect",
            ApiClient::connect(self.api.clone(), ClientOptions::default()),
        )
        .await
        .unwrap()
    }

    /// A live subscriber to job finished / job failed events.
    pub async fn events(&self) -> Subscriber {
        let mut sub = Subscriber::connect(
            &self.broadcast,
            &[Event::JOB_FINISHED, Event::JOB_FAILED],
            WAIT,
        )
        .await
        .unwrap();
        let mut c = self.client().await;
        sub.wait_live(&mut c, WAIT).await.unwrap();
        sub
    }

    pub fn document(&self, name: &str) -> Value {
        Value::Object(
            FileStore::read_document(&self.store_dir.path().join(format!("{name}.json"))).unwrap(),
        )
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        for t in self.tasks.drain(..) {
            within(WAIT, "cluster shutdown", t).await.unwrap();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Waits for the outcome events of `n` jobs; returns (finished ids, failed (id, error)).
pub async fn outcomes(sub: &mut Subscriber, n: usize) -> (Vec<String>, Vec<(String, String)>) {
    let mut finished = Vec::new();
    let mut failed = Vec::new();
    within(WAIT, &format!("{n} job outcomes"), async {
        while finished.len() + failed.len() < n {
            match sub.recv().await.unwrap() {
                Event::JobFinished { job_id, .. } => finished.push(job_id.to_string()),
                Event::JobFailed { job_id, error } => failed.push((job_id.to_string(), error)),
                _ => {}
            }
        }
    })
    .await;
    (finished, failed)
}
