//! A router started in-process on free ports, and raw sockets to talk to it.

use std::time::Duration;

use pypelinin_common::testing::{within, EPHEMERAL};
use pypelinin_common::transport::{ApiClient, ClientOptions};
use pypelinin_router::{Router, RouterSettings};
use serde_json::{Map, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use zeromq::{Socket, SocketRecv, SubSocket};

pub const WAIT: Duration = Duration::from_secs(10);

/// A running router; dropping it stops it.
pub struct TestRouter {
    pub api: String,
    pub broadcast: String,
    /// Where metrics are served, when the settings ask for them.
    pub metrics: Option<std::net::SocketAddr>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl TestRouter {
    pub async fn start() -> Self {
        Self::start_with(Map::new()).await
    }

    pub async fn start_with(configuration: Map<String, Value>) -> Self {
        Self::start_settings(configuration, RouterSettings::default()).await
    }

    /// A router with `settings` (its endpoints replaced by free ports).
    pub async fn start_settings(
        configuration: Map<String, Value>,
        settings: RouterSettings,
    ) -> Self {
        let settings = RouterSettings {
            api: EPHEMERAL.into(),
            broadcast: EPHEMERAL.into(),
            ..settings
        };
        let router = Router::bind(settings, configuration)
            .await
            .expect("router binds");
        let (api, broadcast) = (
            router.api_endpoint().to_owned(),
            router.broadcast_endpoint().to_owned(),
        );
        let metrics = router.metrics_address();
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let task = tokio::spawn(async move { router.run(token).await.expect("router runs") });
        Self {
            api,
            broadcast,
            metrics,
            shutdown,
            task: Some(task),
        }
    }

    pub async fn client(&self) -> ApiClient {
        within(
            WAIT,
            "connecting to the router",
            ApiClient::connect(self.api.clone(), ClientOptions::default()),
        )
        .await
        .expect("client connects")
    }

    /// Sends raw bytes, returns the reply as JSON.
    pub async fn raw(&self, client: &mut ApiClient, body: &[u8]) -> Value {
        let reply = client.request_bytes(body.to_vec()).await.expect("reply");
        serde_json::from_slice(&reply).expect("reply is JSON")
    }

    /// Sends a JSON request, returns the reply.
    pub async fn ask(&self, client: &mut ApiClient, request: Value) -> Value {
        self.raw(client, request.to_string().as_bytes()).await
    }

    /// A SUB socket subscribed to everything, returned once a probe went through it.
    pub async fn live_sub(&self) -> RawSub {
        let mut socket = SubSocket::new();
        within(WAIT, "SUB connect", socket.connect(&self.broadcast))
            .await
            .expect("sub connects");
        socket.subscribe("").await.expect("subscribe");
        let mut sub = RawSub(socket);
        let mut client = self.client().await;
        let token = format!("live-{}", std::process::id());
        within(WAIT, "the subscription to become live", async {
            loop {
                client.probe(&token).await.expect("probe");
                if let Ok(msg) = tokio::time::timeout(Duration::from_millis(100), sub.next()).await
                {
                    if msg == format!("probe: {token}") {
                        break;
                    }
                }
            }
        })
        .await;
        // Drain the extra probes already in flight.
        while let Ok(msg) = tokio::time::timeout(Duration::from_millis(50), sub.next()).await {
            assert!(msg.starts_with("probe: "), "unexpected broadcast {msg}");
        }
        sub
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            within(WAIT, "router shutdown", task)
                .await
                .expect("router task");
        }
    }
}

impl Drop for TestRouter {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A raw SUB socket returning broadcast strings exactly as received.
pub struct RawSub(SubSocket);

impl RawSub {
    pub async fn next(&mut self) -> String {
        let msg = self.0.recv().await.expect("broadcast");
        assert_eq!(msg.len(), 1, "broadcasts are one frame");
        String::from_utf8(msg.get(0).expect("frame").to_vec()).expect("UTF-8 broadcast")
    }

    pub async fn expect(&mut self, what: &str) -> String {
        within(WAIT, what, self.next()).await
    }

    /// Asserts nothing more arrives within a short time (for "no broadcast" rows).
    pub async fn expect_silence(&mut self) {
        if let Ok(msg) = tokio::time::timeout(Duration::from_millis(200), self.next()).await {
            panic!("unexpected broadcast {msg:?}");
        }
    }
}

pub fn is_id(v: &Value) -> bool {
    v.as_str().is_some_and(|s| {
        s.len() == 32
            && s.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    })
}
