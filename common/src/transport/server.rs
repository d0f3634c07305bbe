//! The router's sockets: the API server (ROUTER) and the publisher (PUB).

use std::time::Duration;

use bytes::Bytes;
use tokio::time::timeout;
use tracing::{debug, trace};
use zeromq::{
    PubSocket, RouterRecvHalf, RouterSendHalf, RouterSocket, Socket, SocketRecv, SocketSend,
    ZmqError, ZmqMessage,
};

use super::guard::{Guard, GuardLimits, Inner};
use super::TransportError;
use crate::protocol::Event;

/// The routing frames of a request (identity, any REQ_CORRELATE id, the empty delimiter), sent
/// back unchanged in front of the reply.
#[derive(Debug, Clone)]
pub struct Envelope(Vec<Bytes>);

impl Envelope {
    /// The peer's identity, hex-encoded for logs.
    pub fn peer(&self) -> String {
        self.0
            .first()
            .map(|id| id.iter().map(|b| format!("{b:02x}")).collect())
            .unwrap_or_default()
    }
}

/// One request received by the [`ApiServer`].
#[derive(Debug)]
pub struct Incoming {
    /// Where the reply goes.
    pub envelope: Envelope,
    /// The single body frame, or why the frames are not one request.
    pub body: Result<Bytes, String>,
}

/// The API socket of the router: a ROUTER that serves many REQ (and DEALER) clients at once.
pub struct ApiServer {
    socket: RouterSocket,
    endpoint: String,
    _guard: Option<Guard>,
}

impl ApiServer {
    /// Binds `endpoint` (`tcp://127.0.0.1:0` picks a free port; see [`ApiServer::endpoint`]).
    ///
    /// # Errors
    /// [`TransportError::Bind`] when the endpoint cannot be bound.
    pub async fn bind(endpoint: &str) -> Result<Self, TransportError> {
        Self::bind_with(endpoint, GuardLimits::api(16 * 1024 * 1024)).await
    }

    /// As [`ApiServer::bind`], with the limits of the guard in front of a `tcp://` endpoint
    /// (see [`super::guard`]).
    ///
    /// # Errors
    /// [`TransportError::Bind`] when the endpoint cannot be bound.
    pub async fn bind_with(endpoint: &str, limits: GuardLimits) -> Result<Self, TransportError> {
        let mut socket = RouterSocket::new();
        let (endpoint, guard) = bind_guarded(&mut socket, endpoint, "api", limits).await?;
        Ok(Self {
            socket,
            endpoint,
            _guard: guard,
        })
    }

    /// The endpoint actually bound (with the real port).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Splits into the receiving half and a cloneable replying half.
    pub fn split(
        self,
        max_request_bytes: usize,
        send_timeout: Duration,
    ) -> (RequestReceiver, Replier) {
        let (send, recv) = self.socket.split();
        (
            RequestReceiver {
                recv,
                max_request_bytes,
                _guard: self._guard,
            },
            Replier { send, send_timeout },
        )
    }
}

/// Receives requests from the [`ApiServer`].
pub struct RequestReceiver {
    recv: RouterRecvHalf,
    max_request_bytes: usize,
    /// The guard in front of the socket lives as long as the receiving half.
    _guard: Option<Guard>,
}

impl RequestReceiver {
    /// The next request. Frames that do not make one request come back as `body: Err(..)`,
    /// so the caller can answer them.
    ///
    /// # Errors
    /// [`TransportError::Closed`] once the socket is shut down.
    pub async fn recv(&mut self) -> Result<Incoming, TransportError> {
        let message = match self.recv.recv().await {
            Ok(m) => m,
            Err(ZmqError::NoMessage) => return Err(TransportError::Closed),
            Err(e) => {
                // Per-peer failures; the crate already dropped the peer. Keep serving.
                debug!(error = %e, "receive failed");
                return Err(TransportError::Socket {
                    endpoint: String::new(),
                    source: e,
                });
            }
        };
        Ok(split_frames(message, self.max_request_bytes))
    }
}

/// Binds `socket` at `endpoint`: a `tcp://` endpoint behind a [`Guard`] (the socket itself
/// listens on a private Unix socket), any other directly. Returns the endpoint bound (with the
/// real port) and the guard.
async fn bind_guarded<S: Socket>(
    socket: &mut S,
    endpoint: &str,
    name: &str,
    limits: GuardLimits,
) -> Result<(String, Option<Guard>), TransportError> {
    let bind_err = |source: std::io::Error| TransportError::BindIo {
        endpoint: endpoint.to_owned(),
        source,
    };
    let Some(address) = endpoint.strip_prefix("tcp://") else {
        let bound = socket
            .bind(endpoint)
            .await
            .map_err(|source| TransportError::Bind {
                endpoint: endpoint.to_owned(),
                source,
            })?;
        return Ok((bound.to_string(), None));
    };
    let address = match address.strip_prefix("*:") {
        Some(port) => format!("0.0.0.0:{port}"),
        None => address.to_owned(),
    };
    let listener = tokio::net::TcpListener::bind(&address)
        .await
        .map_err(bind_err)?;
    let inner = Inner::new(name);
    let private = inner.listen().map_err(bind_err)?;
    socket
        .bind_listener(private)
        .await
        .map_err(|source| TransportError::Bind {
            endpoint: endpoint.to_owned(),
            source,
        })?;
    let guard = Guard::start(listener, inner, limits);
    Ok((guard.endpoint().to_owned(), Some(guard)))
}

/// Splits a message the ROUTER received into the envelope and the single body frame.
fn split_frames(message: ZmqMessage, max_request_bytes: usize) -> Incoming {
    let mut frames = message.into_vec();
    // frames[0] is the identity the ROUTER added; the envelope runs to the first empty frame.
    let delimiter = frames
        .iter()
        .skip(1)
        .position(|f| f.is_empty())
        .map(|p| p + 1);
    let body_start = delimiter.map_or(1, |d| d + 1);
    let body: Vec<Bytes> = frames.split_off(body_start.min(frames.len()));
    let envelope = Envelope(frames);
    let body = match body.as_slice() {
        [one] if one.len() > max_request_bytes => Err(format!(
            "request of {} bytes exceeds the limit of {} bytes",
            one.len(),
            max_request_bytes
        )),
        [one] => Ok(one.clone()),
        other => Err(format!("request has {} frames, expected 1", other.len())),
    };
    Incoming { envelope, body }
}

/// Sends replies through the [`ApiServer`]; clones share the socket.
#[derive(Clone)]
pub struct Replier {
    send: RouterSendHalf,
    send_timeout: Duration,
}

impl Replier {
    /// Sends `body` to the peer of `envelope`. A peer that does not read within the send timeout
    /// loses its reply rather than stalling everyone.
    ///
    /// # Errors
    /// [`TransportError::Timeout`] or [`TransportError::Socket`]; the server keeps working.
    pub async fn send(&mut self, envelope: Envelope, body: Vec<u8>) -> Result<(), TransportError> {
        let mut frames = envelope.0;
        frames.push(Bytes::from(body));
        let message = ZmqMessage::try_from(frames).map_err(|_| TransportError::Closed)?;
        match timeout(self.send_timeout, self.send.send(message)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(TransportError::Socket {
                endpoint: String::new(),
                source,
            }),
            Err(_) => Err(TransportError::Timeout {
                endpoint: String::new(),
                timeout: self.send_timeout,
            }),
        }
    }

    /// Sends `body` to the peer of `envelope` without making the caller wait. The reply is
    /// queued for the peer's connection at once in the usual case; when that queue is full
    /// (a peer that stopped reading), the send goes on in a task of its own for up to the send
    /// timeout, so one slow peer never holds up the replies to the others. `failed` is called
    /// with the error when the reply could not be delivered.
    ///
    /// Call it inside the tokio runtime.
    pub fn send_detached<F>(&self, envelope: Envelope, body: Vec<u8>, failed: F)
    where
        F: FnOnce(TransportError) + Send + 'static,
    {
        let mut replier = self.clone();
        let mut send = Box::pin(async move { replier.send(envelope, body).await });
        // One poll with a waker that does nothing: it completes whenever the peer's queue has
        // room. If it cannot, the task below polls it again with a real waker.
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match std::future::Future::poll(send.as_mut(), &mut cx) {
            std::task::Poll::Ready(Ok(())) => {}
            std::task::Poll::Ready(Err(e)) => failed(e),
            std::task::Poll::Pending => {
                tokio::spawn(async move {
                    if let Err(e) = send.await {
                        failed(e);
                    }
                });
            }
        }
    }
}

/// The broadcast socket of the router.
pub struct Publisher {
    socket: PubSocket,
    endpoint: String,
    _guard: Option<Guard>,
}

impl Publisher {
    /// Binds `endpoint`.
    ///
    /// # Errors
    /// [`TransportError::Bind`] when the endpoint cannot be bound.
    pub async fn bind(endpoint: &str) -> Result<Self, TransportError> {
        let mut socket = PubSocket::new();
        let (endpoint, guard) =
            bind_guarded(&mut socket, endpoint, "pub", GuardLimits::broadcast()).await?;
        Ok(Self {
            socket,
            endpoint,
            _guard: guard,
        })
    }

    /// The endpoint actually bound.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Broadcasts `event` as one string frame.
    ///
    /// # Errors
    /// [`TransportError::Socket`] when the socket fails.
    pub async fn publish(&mut self, event: &Event) -> Result<(), TransportError> {
        trace!(%event, "publish");
        self.socket
            .send(ZmqMessage::from(event.to_string()))
            .await
            .map_err(|source| TransportError::Socket {
                endpoint: self.endpoint.clone(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

    use super::*;
    use crate::transport::{ApiClient, ClientOptions};

    fn message(frames: &[&[u8]]) -> ZmqMessage {
        let frames: Vec<Bytes> = frames.iter().map(|f| Bytes::copy_from_slice(f)).collect();
        ZmqMessage::try_from(frames).unwrap()
    }

    #[test]
    fn the_envelope_runs_to_the_first_empty_frame_and_one_body_frame_follows() {
        // A REQ_CORRELATE client adds a request id before the delimiter.
        let incoming = split_frames(message(&[b"id", b"corr", b"", b"{}"]), 10);
        assert_eq!(incoming.envelope.0.len(), 3);
        assert_eq!(incoming.envelope.peer(), "6964");
        assert_eq!(incoming.body.unwrap(), Bytes::from_static(b"{}"));
        // A DEALER without a delimiter: the body follows the identity.
        let incoming = split_frames(message(&[b"id", b"{}"]), 10);
        assert_eq!(incoming.envelope.0.len(), 1);
        assert!(incoming.body.is_ok());
    }

    #[test]
    fn several_body_frames_or_an_oversized_body_are_refused_with_the_reason() {
        let incoming = split_frames(message(&[b"id", b"", b"a", b"b"]), 10);
        assert_eq!(
            incoming.body.unwrap_err(),
            "request has 2 frames, expected 1"
        );
        let incoming = split_frames(message(&[b"id", b""]), 10);
        assert_eq!(
            incoming.body.unwrap_err(),
            "request has 0 frames, expected 1"
        );
        let incoming = split_frames(message(&[b"id", b"", b"0123456789A"]), 10);
        assert!(incoming
            .body
            .unwrap_err()
            .contains("exceeds the limit of 10"));
    }

    #[tokio::test]
    async fn a_reply_goes_back_to_its_peer_and_one_to_an_unknown_peer_is_reported() {
        let server = ApiServer::bind("tcp://127.0.0.1:0").await.unwrap();
        let endpoint = server.endpoint().to_owned();
        let (mut receiver, replier) = server.split(1024, Duration::from_secs(1));
        let client = tokio::spawn(async move {
            let mut client = ApiClient::new(endpoint, ClientOptions::default());
            client.request_bytes(b"ping".to_vec()).await
        });
        let incoming = tokio::time::timeout(Duration::from_secs(10), receiver.recv())
            .await
            .expect("a request within 10 s")
            .unwrap();
        assert_eq!(incoming.body.as_deref().unwrap(), b"ping");
        let stranger = Envelope(vec![Bytes::from_static(b"nobody"), Bytes::new()]);
        let (failed_tx, failed_rx) = tokio::sync::oneshot::channel();
        replier.send_detached(stranger, b"lost".to_vec(), move |e| {
            let _ = failed_tx.send(e.to_string());
        });
        let failure = tokio::time::timeout(Duration::from_secs(10), failed_rx)
            .await
            .expect("the failure reported within 10 s")
            .unwrap();
        assert!(failure.contains("socket error"), "{failure}");
        replier.send_detached(incoming.envelope, b"pong".to_vec(), |e| {
            panic!("the reply to a connected peer failed: {e}")
        });
        let reply = tokio::time::timeout(Duration::from_secs(10), client)
            .await
            .expect("the reply within 10 s")
            .unwrap()
            .unwrap();
        assert_eq!(reply, Bytes::from_static(b"pong"));
    }
}
