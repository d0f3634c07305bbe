//! The client's connection to the router's API: one REQ socket, rebuilt after any failure.

use std::time::Duration;

use bytes::Bytes;
use tokio::time::timeout;
use zeromq::{ReqSocket, Socket, SocketOptions, SocketRecv, SocketSend, ZmqMessage};

use super::outbound::{connect_guarded, OutboundGuard, OutboundLimits};
use super::TransportError;
use crate::protocol::Request;

/// Timeouts of client sockets.
#[derive(Debug, Clone, Copy)]
pub struct ClientOptions {
    /// How long to wait for the router to accept a connection.
    pub connect_timeout: Duration,
    /// How long to wait for a reply.
    pub request_timeout: Duration,
    /// The longest reply frame accepted, in bytes: a `tcp://` connection whose peer announces
    /// a longer one is closed before the frame is read (see [`super::outbound`]).
    pub max_reply_bytes: u64,
}

impl ClientOptions {
    /// The longest reply frame accepted by default: 1 GiB, far above any reply of a router
    /// (requests are at most 16 MiB by default, and a `get jobs` reply carries at most the
    /// jobs a broker asked for).
    pub const DEFAULT_MAX_REPLY_BYTES: u64 = 1 << 30;

    fn outbound(&self) -> OutboundLimits {
        OutboundLimits {
            max_frame_bytes: self.max_reply_bytes,
            connect_timeout: self.connect_timeout,
        }
    }
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            max_reply_bytes: Self::DEFAULT_MAX_REPLY_BYTES,
        }
    }
}

/// A client of the router's API: one request at a time, with bounded waits.
///
/// It owns its REQ socket and rebuilds it on the next request after any error or timeout.
/// A `tcp://` endpoint is reached through an [`OutboundGuard`], so no reply can make the
/// process reserve more than [`ClientOptions::max_reply_bytes`].
pub struct ApiClient {
    endpoint: String,
    options: ClientOptions,
    socket: Option<(ReqSocket, Option<OutboundGuard>)>,
    token: Option<String>,
    /// The router is the original's: requests go as legacy commands (see [`super::legacy`]).
    pub(crate) legacy: bool,
}

impl ApiClient {
    /// A client of `endpoint`; it connects on the first request.
    pub fn new(endpoint: impl Into<String>, options: ClientOptions) -> Self {
        Self {
            endpoint: endpoint.into(),
            options,
            socket: None,
            token: None,
            legacy: false,
        }
    }

    /// Sends `token` with every request (for a router that requires a cluster token).
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token.filter(|t| !t.is_empty());
        self
    }

    /// A client that is connected already.
    ///
    /// # Errors
    /// [`TransportError::Connect`] when the router does not answer within the connect timeout.
    pub async fn connect(
        endpoint: impl Into<String>,
        options: ClientOptions,
    ) -> Result<Self, TransportError> {
        let mut client = Self::new(endpoint, options);
        client.ensure_connected().await?;
        Ok(client)
    }

    /// The router endpoint.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    async fn ensure_connected(&mut self) -> Result<&mut ReqSocket, TransportError> {
        if self.socket.is_none() {
            let mut options = SocketOptions::default();
            options.connect_timeout(self.options.connect_timeout);
            let mut socket = ReqSocket::with_options(options);
            let guard =
                connect_guarded(&mut socket, &self.endpoint, "req", self.options.outbound())
                    .await?;
            self.socket = Some((socket, guard));
        }
        // Set just above.
        self.socket
            .as_mut()
            .map(|(socket, _)| socket)
            .ok_or(TransportError::Closed)
    }

    /// Sends one request frame and returns the reply frame.
    ///
    /// # Errors
    /// Any [`TransportError`]; the socket is then rebuilt on the next call.
    pub async fn request_bytes(&mut self, body: Vec<u8>) -> Result<Bytes, TransportError> {
        let limit = self.options.request_timeout;
        self.request_bytes_within(body, limit).await
    }

    async fn request_bytes_within(
        &mut self,
        body: Vec<u8>,
        request_timeout: Duration,
    ) -> Result<Bytes, TransportError> {
        let result = self.exchange(body, request_timeout).await;
        if result.is_err() {
            // A REQ that lost its reply can never send again: start afresh next time.
            self.socket = None;
        }
        result
    }

    async fn exchange(
        &mut self,
        body: Vec<u8>,
        request_timeout: Duration,
    ) -> Result<Bytes, TransportError> {
        let endpoint = self.endpoint.clone();
        let socket = self.ensure_connected().await?;
        let socket_err = |source| TransportError::Socket {
            endpoint: endpoint.clone(),
            source,
        };
        let exchange = async {
            socket
                .send(ZmqMessage::from(body))
                .await
                .map_err(socket_err)?;
            socket.recv().await.map_err(socket_err)
        };
        let reply =
            timeout(request_timeout, exchange)
                .await
                .map_err(|_| TransportError::Timeout {
                    endpoint: endpoint.clone(),
                    timeout: request_timeout,
                })??;
        let frames = reply.len();
        match reply.into_vec().pop() {
            Some(frame) if frames == 1 => Ok(frame),
            _ => Err(TransportError::BadReply { endpoint, frames }),
        }
    }

    /// Sends a request and returns the reply frame.
    ///
    /// # Errors
    /// As [`ApiClient::request_bytes`].
    pub async fn request(&mut self, request: &Request) -> Result<Bytes, TransportError> {
        let limit = self.options.request_timeout;
        self.request_within(request, limit).await
    }

    /// As [`ApiClient::request`], for a request the router may hold up to `wait` before
    /// answering (on top of the request timeout).
    /// Sends a request the router may hold up to `wait` (a request for work with `wait ms`)
    /// and returns the reply as JSON.
    ///
    /// # Errors
    /// Transport failures, or a reply that is not JSON.
    pub async fn request_value_waiting(
        &mut self,
        request: &Request,
        wait: Duration,
    ) -> Result<serde_json::Value, super::ClientError> {
        if self.legacy {
            return self.legacy_wait(request, wait).await;
        }
        let reply = self.request_waiting(request, wait).await?;
        let value = serde_json::from_slice(&reply).map_err(|e| {
            crate::protocol::ReplyError::Unexpected(format!("the reply is not JSON: {e}"))
        })?;
        if self.detect_legacy(&value) {
            return self.legacy_wait(request, wait).await;
        }
        Ok(value)
    }

    pub(crate) async fn request_waiting(
        &mut self,
        request: &Request,
        wait: Duration,
    ) -> Result<Bytes, TransportError> {
        let limit = self.options.request_timeout + wait;
        self.request_within(request, limit).await
    }

    async fn request_within(
        &mut self,
        request: &Request,
        request_timeout: Duration,
    ) -> Result<Bytes, TransportError> {
        let body = match &self.token {
            None => request.encode(),
            Some(token) => {
                let mut value = serde_json::to_value(request).unwrap_or_default();
                if let Some(map) = value.as_object_mut() {
                    map.insert(
                        crate::protocol::request::CLUSTER_TOKEN.into(),
                        token.clone().into(),
                    );
                }
                serde_json::to_vec(&value).unwrap_or_default()
            }
        };
        self.request_bytes_within(body, request_timeout).await
    }
}

/// Exponential back-off for loops that retry the router: each failure doubles the next wait,
/// up to a cap; a success starts again from the first wait.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Waits of `first`, doubling up to `max`.
    pub const fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max,
            next: first,
        }
    }

    /// The wait after one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        delay
    }

    /// After a success: the next failure waits `first` again.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

impl Default for Backoff {
    /// 100 ms, doubling up to 2 s: what the daemons use while the router is unreachable.
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(2))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

    use super::*;
    use crate::transport::ApiServer;

    fn quick() -> ClientOptions {
        ClientOptions {
            connect_timeout: Duration::from_millis(300),
            request_timeout: Duration::from_millis(300),
            ..ClientOptions::default()
        }
    }

    #[tokio::test]
    async fn nobody_listening_is_a_connect_error_within_the_connect_timeout() {
        // Bind then drop: a port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut client = ApiClient::new(format!("tcp://127.0.0.1:{port}"), quick());
        let outcome = tokio::time::timeout(
            Duration::from_secs(10),
            client.request_bytes(b"{}".to_vec()),
        )
        .await
        .expect("an answer within 10 s");
        assert!(
            matches!(outcome, Err(TransportError::Connect { .. })),
            "{outcome:?}"
        );
    }

    #[tokio::test]
    async fn after_a_lost_reply_the_socket_is_rebuilt_and_the_next_request_works() {
        let server = ApiServer::bind("tcp://127.0.0.1:0").await.unwrap();
        let mut client = ApiClient::new(server.endpoint().to_owned(), quick());
        let (mut receiver, replier) = server.split(1024, Duration::from_secs(1));
        // The first request is never answered: a timeout.
        let first = client.request_bytes(b"one".to_vec()).await;
        assert!(
            matches!(first, Err(TransportError::Timeout { .. })),
            "{first:?}"
        );
        let ignored = receiver.recv().await.unwrap();
        assert_eq!(ignored.body.as_deref().unwrap(), b"one");
        // The second goes out on a new socket and is answered.
        let server = tokio::spawn(async move {
            let incoming = receiver.recv().await.unwrap();
            assert_eq!(incoming.body.as_deref().unwrap(), b"two");
            replier.send_detached(incoming.envelope, b"answer".to_vec(), |e| {
                panic!("reply failed: {e}")
            });
            receiver
        });
        let second = client.request_bytes(b"two".to_vec()).await.unwrap();
        assert_eq!(second, Bytes::from_static(b"answer"));
        server.await.unwrap();
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let waits: Vec<_> = (0..4).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(waits, [100, 200, 350, 350]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }

    #[test]
    fn backoff_never_overflows() {
        let mut b = Backoff::new(Duration::MAX / 2, Duration::MAX);
        for _ in 0..4 {
            assert!(b.next_delay() <= Duration::MAX);
        }
    }
}
