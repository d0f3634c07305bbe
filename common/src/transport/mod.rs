//! The transport layer: every ZeroMQ socket of pypelinin, shared by the daemons and clients.
//!
//! - [`server`]: the router's side: [`ApiServer`] (a ROUTER socket serving REQ clients, split
//!   into a [`RequestReceiver`] and cloneable [`Replier`]s) and [`Publisher`] (the PUB socket).
//! - [`connection`]: [`ApiClient`]'s connection: a REQ socket rebuilt after any error or timeout
//!   (the `zeromq` crate's REQ never reconnects and cannot send again after a lost reply),
//!   [`ClientOptions`] and the [`Backoff`] every reconnecting loop uses.
//! - [`client`]: the typed requests of [`ApiClient`], one method per command.
//! - [`guard`]: the guard in front of every listening `tcp://` socket: it checks the ZMTP
//!   framing of what peers send before the `zeromq` crate sees it, and bounds what one peer can
//!   make the router hold.
//! - [`outbound`]: the same check on the connecting side: a socket that connects to a `tcp://`
//!   endpoint goes through an [`OutboundGuard`](outbound::OutboundGuard), so what the router
//!   (or whatever answers at its address) sends is checked before the crate reads it.
//! - [`legacy`]: talking to the original's router: the same requests as its legacy commands,
//!   when it answers `unknown command` to ours.
//! - [`subscriber`]: [`Subscriber`], a SUB socket (which the crate does reconnect) that parses
//!   broadcasts into [`Event`](crate::protocol::Event)s.
//!
//! This layer depends on the protocol layer ([`crate::protocol`], [`crate::pipeline`],
//! [`crate::ids`]) and on nothing of the daemons. docs/architecture.md explains the measured
//! behaviour of the crate behind these choices.

pub mod client;
pub mod connection;
pub mod guard;
pub mod legacy;
pub mod outbound;
pub mod server;
pub mod subscriber;

use std::time::Duration;

use zeromq::ZmqError;

use crate::protocol::ReplyError;

pub use connection::{ApiClient, Backoff, ClientOptions};
pub use server::{ApiServer, Envelope, Incoming, Publisher, Replier, RequestReceiver};
pub use subscriber::Subscriber;

/// A transport failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// Binding a server socket failed.
    #[error("cannot bind {endpoint}")]
    Bind {
        /// The endpoint.
        endpoint: String,
        /// Why.
        #[source]
        source: ZmqError,
    },
    /// Binding the listening socket of a guarded endpoint failed.
    #[error("cannot bind {endpoint}")]
    BindIo {
        /// The endpoint.
        endpoint: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Connecting did not succeed within the connect timeout.
    #[error("cannot reach {endpoint} within {timeout:?} (is the router running?)")]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// The timeout.
        timeout: Duration,
    },
    /// Connecting failed for good (bad endpoint, ...).
    #[error("cannot connect to {endpoint}")]
    ConnectFailed {
        /// The endpoint.
        endpoint: String,
        /// Why.
        #[source]
        source: ZmqError,
    },
    /// No reply within the request timeout.
    #[error("no reply from {endpoint} within {timeout:?}")]
    Timeout {
        /// The endpoint.
        endpoint: String,
        /// The timeout.
        timeout: Duration,
    },
    /// The socket failed while sending or receiving.
    #[error("socket error talking to {endpoint}")]
    Socket {
        /// The endpoint.
        endpoint: String,
        /// Why.
        #[source]
        source: ZmqError,
    },
    /// The reply was not exactly one frame.
    #[error("reply from {endpoint} has {frames} frames, expected 1")]
    BadReply {
        /// The endpoint.
        endpoint: String,
        /// How many frames it had.
        frames: usize,
    },
    /// The socket was closed.
    #[error("socket closed")]
    Closed,
}

/// A failure of a request: the transport failed, or the router said no.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The request did not get a reply.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The reply was an error answer or of an unexpected shape.
    #[error(transparent)]
    Reply(#[from] ReplyError),
}

impl ClientError {
    /// Whether retrying the same request later may succeed (the router was unreachable).
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Transport(
                TransportError::Connect { .. }
                | TransportError::Timeout { .. }
                | TransportError::Socket { .. },
            ) => true,
            // The router could not write it down: it did not happen, and the router restarts.
            ClientError::Reply(ReplyError::Refused(answer)) => {
                answer.answer == crate::protocol::AnswerKind::Unavailable
            }
            _ => false,
        }
    }
}
