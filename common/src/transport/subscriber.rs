//! The subscriber to the router's broadcasts.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;
use tracing::debug;
use zeromq::{Socket, SocketOptions, SocketRecv, SubSocket, ZmqError};

use super::outbound::{connect_guarded, OutboundGuard, OutboundLimits};
use super::{ApiClient, ClientError, TransportError};
use crate::protocol::{AnswerKind, Event, ReplyError};

/// A subscriber to the router's broadcasts, filtering by prefix.
///
/// A `tcp://` endpoint is reached through an [`OutboundGuard`]: a broadcast frame longer than
/// [`Subscriber::MAX_BROADCAST_BYTES`] closes the connection (the socket connects again).
pub struct Subscriber {
    socket: SubSocket,
    endpoint: String,
    pending: VecDeque<Event>,
    _guard: Option<OutboundGuard>,
}

impl Subscriber {
    /// The longest broadcast frame accepted, in bytes. Events are short: the longest, a failed
    /// job, carries at most [`Event::MAX_ERROR_BYTES`] of its error.
    pub const MAX_BROADCAST_BYTES: u64 = 1 << 20;

    /// Connects to `endpoint` and subscribes to each prefix (see the prefixes on [`Event`]).
    ///
    /// The subscription may take a moment to reach the router; use
    /// [`Subscriber::wait_live`] before relying on it.
    ///
    /// # Errors
    /// [`TransportError::Connect`] when the router does not answer within `connect_timeout`.
    pub async fn connect(
        endpoint: &str,
        prefixes: &[&str],
        connect_timeout: Duration,
    ) -> Result<Self, TransportError> {
        let limits = OutboundLimits {
            max_frame_bytes: Self::MAX_BROADCAST_BYTES,
            connect_timeout,
        };
        let mut options = SocketOptions::default();
        options.connect_timeout(connect_timeout);
        let mut socket = SubSocket::with_options(options);
        let guard = connect_guarded(&mut socket, endpoint, "sub", limits).await?;
        let mut subscriber = Self {
            socket,
            endpoint: endpoint.to_owned(),
            pending: VecDeque::new(),
            _guard: guard,
        };
        for prefix in prefixes {
            subscriber.subscribe(prefix).await?;
        }
        Ok(subscriber)
    }

    /// Adds a prefix.
    ///
    /// # Errors
    /// [`TransportError::Socket`] when the socket fails.
    pub async fn subscribe(&mut self, prefix: &str) -> Result<(), TransportError> {
        self.socket
            .subscribe(prefix)
            .await
            .map_err(|source| TransportError::Socket {
                endpoint: self.endpoint.clone(),
                source,
            })
    }

    /// Removes a prefix.
    ///
    /// # Errors
    /// [`TransportError::Socket`] when the socket fails.
    pub async fn unsubscribe(&mut self, prefix: &str) -> Result<(), TransportError> {
        self.socket
            .unsubscribe(prefix)
            .await
            .map_err(|source| TransportError::Socket {
                endpoint: self.endpoint.clone(),
                source,
            })
    }

    /// The next event. Strings that are no known event are skipped.
    ///
    /// Cancel-safe: dropping the future loses nothing.
    ///
    /// # Errors
    /// [`TransportError::Closed`] when the socket is shut down.
    pub async fn recv(&mut self) -> Result<Event, TransportError> {
        match self.pending.pop_front() {
            Some(event) => Ok(event),
            None => self.next_raw().await,
        }
    }

    /// An event that has arrived already, without waiting; `None` when there is none.
    ///
    /// It polls the receive once, in the caller's task (a zero timeout would not do: tokio
    /// rounds timer deadlines up to the next millisecond, so each call would wait ~1 ms).
    pub async fn try_recv(&mut self) -> Option<Result<Event, TransportError>> {
        let mut next = std::pin::pin!(self.recv());
        std::future::poll_fn(|cx| match std::future::Future::poll(next.as_mut(), cx) {
            std::task::Poll::Ready(received) => std::task::Poll::Ready(Some(received)),
            std::task::Poll::Pending => std::task::Poll::Ready(None),
        })
        .await
    }

    /// Waits until the subscription is live: asks the router to broadcast a probe until one
    /// arrives. Events that arrive meanwhile are kept for [`Subscriber::recv`]. The original's
    /// router has no probe: against it, this waits [`LEGACY_SETTLE`](super::legacy::LEGACY_SETTLE).
    ///
    /// # Errors
    /// [`ClientError`] when the router cannot be asked, or [`TransportError::Timeout`] when no
    /// probe arrives within `limit`.
    pub async fn wait_live(
        &mut self,
        client: &mut ApiClient,
        limit: Duration,
    ) -> Result<(), ClientError> {
        let token = uuid::Uuid::new_v4().simple().to_string();
        self.subscribe(Event::PROBE).await?;
        let deadline = Instant::now() + limit;
        let mut retry = Duration::from_millis(20);
        let result = loop {
            if Instant::now() >= deadline {
                break Err(TransportError::Timeout {
                    endpoint: self.endpoint.clone(),
                    timeout: limit,
                }
                .into());
            }
            match client.probe(&token).await {
                Err(ClientError::Reply(ReplyError::Refused(answer)))
                    if answer.answer == AnswerKind::UnknownCommand =>
                {
                    // The original's router has no probe (see `legacy`): give the subscription
                    // the time it takes to reach a router on a LAN, many times over.
                    tokio::time::sleep(super::legacy::LEGACY_SETTLE).await;
                    break Ok(());
                }
                probed => probed?,
            }
            let wait_until = (Instant::now() + retry).min(deadline);
            let mut seen = false;
            while let Ok(received) = tokio::time::timeout_at(wait_until, self.next_raw()).await {
                match received? {
                    Event::Probe { token: t } if t == token => {
                        seen = true;
                        break;
                    }
                    Event::Probe { .. } => {}
                    event => self.pending.push_back(event),
                }
            }
            if seen {
                break Ok(());
            }
            retry = (retry * 2).min(Duration::from_millis(500));
        };
        self.unsubscribe(Event::PROBE).await?;
        result
    }

    async fn next_raw(&mut self) -> Result<Event, TransportError> {
        loop {
            let message = match self.socket.recv().await {
                Ok(m) => m,
                Err(ZmqError::NoMessage) => return Err(TransportError::Closed),
                Err(e) => {
                    debug!(error = %e, "broadcast receive failed");
                    continue;
                }
            };
            let Some(frame) = message.get(0) else {
                continue;
            };
            match std::str::from_utf8(frame).ok().map(str::parse::<Event>) {
                Some(Ok(event)) => return Ok(event),
                _ => debug!(frame = %String::from_utf8_lossy(frame), "ignoring unknown broadcast"),
            }
        }
    }
}
