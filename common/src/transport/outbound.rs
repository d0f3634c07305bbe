//! The guard on the connecting side: what the router (or whatever answers at its address)
//! sends reaches the `zeromq` crate of a broker, pipeliner or client only after its framing was
//! checked.
//!
//! The crate reserves the length a frame header announces before the frame's bytes arrive, so
//! one 9-byte header from a hostile or broken peer would abort the process. A socket that
//! connects to a `tcp://` endpoint therefore connects to a private Unix socket instead (mode
//! 0600, in the temp folder); for each connection made there the guard opens the TCP connection
//! itself and relays the bytes both ways. It reads the ZMTP 3 framing of what comes back (as
//! [`Scanner`] does for the router's guard): a greeting that is not ZMTP 3, reserved flag bits
//! or a frame announcing more than [`OutboundLimits::max_frame_bytes`] close that connection
//! (logged at most once per 10 s), and the socket connects again as after any lost connection.
//! What this process sends passes unchecked: it is ours.

use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use zeromq::{Socket, ZmqError};

use super::guard::{log_closed, Inner, RelayBuffer, Scanner};
use super::TransportError;

/// What the connecting side's guard lets through.
#[derive(Debug, Clone, Copy)]
pub struct OutboundLimits {
    /// The longest frame the remote side may send, in bytes.
    pub max_frame_bytes: u64,
    /// How long to keep trying a refused TCP connection (the router may be starting), and how
    /// long the remote side has to send its greeting.
    pub connect_timeout: Duration,
}

/// A running guard for one ZeroMQ socket that connects to a `tcp://` endpoint. Dropping it
/// stops accepting; connections being relayed end with the socket.
pub struct OutboundGuard {
    endpoint: String,
    failure: Arc<Mutex<Option<io::Error>>>,
    task: JoinHandle<()>,
    _inner: Arc<Inner>,
}

impl OutboundGuard {
    /// Starts a guard relaying to `address` (`host:port`, without `tcp://`). `name` names the
    /// private socket (`req`, `sub`).
    ///
    /// # Errors
    /// When the private Unix socket cannot be made.
    pub fn start(address: &str, name: &str, limits: OutboundLimits) -> io::Result<Self> {
        let inner = Arc::new(Inner::new(name));
        let listener = inner.listen()?;
        listener.set_nonblocking(true)?;
        let listener = UnixListener::from_std(listener)?;
        let endpoint = format!("ipc://{}", inner.path().display());
        let failure = Arc::new(Mutex::new(None));
        let task = tokio::spawn(accept_loop(
            listener,
            address.to_owned(),
            limits,
            failure.clone(),
        ));
        Ok(Self {
            endpoint,
            failure,
            task,
            _inner: inner,
        })
    }

    /// The `ipc://` endpoint the ZeroMQ socket connects to instead of the TCP one.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Why the last TCP connection could not be made, if it could not (taken: asked once).
    pub fn take_failure(&self) -> Option<io::Error> {
        self.failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

impl Drop for OutboundGuard {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The endpoint a socket should connect to for `endpoint`, and the guard behind it: a guard
/// for `tcp://`, none for a local transport (`ipc://`), which only this machine's users reach.
///
/// # Errors
/// When the guard's private socket cannot be made.
fn guarded(
    endpoint: &str,
    name: &str,
    limits: OutboundLimits,
) -> io::Result<(String, Option<OutboundGuard>)> {
    match endpoint.strip_prefix("tcp://") {
        Some(address) => {
            let guard = OutboundGuard::start(address, name, limits)?;
            Ok((guard.endpoint().to_owned(), Some(guard)))
        }
        None => Ok((endpoint.to_owned(), None)),
    }
}

/// Connects `socket` to `endpoint` (through a guard when it is `tcp://`) within
/// `limits.connect_timeout`. Returns the guard, which must live as long as the socket.
///
/// # Errors
/// [`TransportError::Connect`] when nothing answers in time (or the router refuses
/// connections: it is not there yet); [`TransportError::ConnectFailed`] for an address that
/// cannot work, with the reason.
pub(crate) async fn connect_guarded<S: Socket>(
    socket: &mut S,
    endpoint: &str,
    name: &str,
    limits: OutboundLimits,
) -> Result<Option<OutboundGuard>, TransportError> {
    let failed = |source| TransportError::ConnectFailed {
        endpoint: endpoint.to_owned(),
        source,
    };
    let (target, guard) =
        guarded(endpoint, name, limits).map_err(|e| failed(ZmqError::Network(e)))?;
    // The crate's own timeout covers the retries; ours also bounds a hung handshake.
    let limit = limits.connect_timeout + Duration::from_millis(500);
    let outcome = tokio::time::timeout(limit, socket.connect(&target)).await;
    // The guard knows why its TCP connection failed better than the handshake does.
    let failure = guard.as_ref().and_then(OutboundGuard::take_failure);
    let timed_out = TransportError::Connect {
        endpoint: endpoint.to_owned(),
        timeout: limits.connect_timeout,
    };
    match (outcome, failure) {
        (Ok(Ok(())), _) => Ok(guard),
        // Refused until the deadline: the router is not there (yet).
        (_, Some(e)) if still_away(&e) => Err(timed_out),
        (_, Some(e)) => Err(failed(ZmqError::Network(e))),
        (Ok(Err(ZmqError::ConnectTimeout(_))) | Err(_), None) => Err(timed_out),
        (Ok(Err(source)), None) => Err(failed(source)),
    }
}

/// Whether the guard's failure to connect means the router is not there (yet), rather than
/// an address that cannot work.
fn still_away(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::ConnectionRefused
    )
}

async fn accept_loop(
    listener: UnixListener,
    address: String,
    limits: OutboundLimits,
    failure: Arc<Mutex<Option<io::Error>>>,
) {
    loop {
        let local = match listener.accept().await {
            Ok((local, _)) => local,
            Err(e) => {
                debug!(error = %e, "accept on the private socket failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let address = address.clone();
        let failure = failure.clone();
        tokio::spawn(async move {
            let remote = match connect(&address, limits.connect_timeout).await {
                Ok(remote) => {
                    reachability().reached(&address, Instant::now());
                    remote
                }
                Err(e) => {
                    debug!(%address, error = %e, "cannot connect");
                    reachability().failed(&address, &e, Instant::now());
                    // Dropping `local` fails the socket's handshake; it says why from here.
                    *failure.lock().unwrap_or_else(PoisonError::into_inner) = Some(e);
                    return;
                }
            };
            if let Err(why) = relay(local, remote, limits).await {
                log_closed(&address, &why);
            }
        });
    }
}

/// What this process says about routers it cannot reach: one line when an address stops
/// answering, then one at a growing interval (5 s, 10 s, 20 s, ... up to every 5 min) while it
/// stays away, and one when it answers again. It replaces the `zeromq` crate's line per
/// reconnection attempt (filtered out by the daemons' logging).
#[derive(Debug, Default)]
pub struct Reachability {
    away: Mutex<std::collections::HashMap<String, Away>>,
}

#[derive(Debug, Clone, Copy)]
struct Away {
    since: Instant,
    next_note: Instant,
    interval: Duration,
}

/// The process's one [`Reachability`].
fn reachability() -> &'static Reachability {
    static REACH: std::sync::OnceLock<Reachability> = std::sync::OnceLock::new();
    REACH.get_or_init(Reachability::default)
}

impl Reachability {
    const FIRST_INTERVAL: Duration = Duration::from_secs(5);
    const MAX_INTERVAL: Duration = Duration::from_secs(300);

    /// A connection to `address` failed at `now`. Returns whether a line was logged.
    pub fn failed(&self, address: &str, error: &io::Error, now: Instant) -> bool {
        let mut away = self.away.lock().unwrap_or_else(PoisonError::into_inner);
        match away.get_mut(address) {
            None => {
                away.insert(
                    address.to_owned(),
                    Away {
                        since: now,
                        next_note: now + Self::FIRST_INTERVAL,
                        interval: Self::FIRST_INTERVAL,
                    },
                );
                warn!(%address, %error, "cannot reach the router; retrying");
                true
            }
            Some(a) if now >= a.next_note => {
                let secs = now.duration_since(a.since).as_secs();
                a.interval = (a.interval * 2).min(Self::MAX_INTERVAL);
                a.next_note = now + a.interval;
                warn!(%address, %error, "router unreachable for {secs} s; retrying");
                true
            }
            Some(_) => false,
        }
    }

    /// A connection to `address` was made at `now`. Returns whether a line was logged (the
    /// address had been unreachable).
    pub fn reached(&self, address: &str, now: Instant) -> bool {
        let mut away = self.away.lock().unwrap_or_else(PoisonError::into_inner);
        match away.remove(address) {
            Some(a) => {
                let secs = now.duration_since(a.since).as_secs();
                info!(%address, "reached the router again after {secs} s");
                true
            }
            None => false,
        }
    }
}

/// Connects to `address`, trying again while it is refused (the router may be starting), for
/// up to `within`.
async fn connect(address: &str, within: Duration) -> io::Result<TcpStream> {
    let deadline = Instant::now() + within;
    let mut delay = Duration::from_millis(20);
    loop {
        match tokio::time::timeout_at(deadline, TcpStream::connect(address)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(e))
                if e.kind() == io::ErrorKind::ConnectionRefused
                    && Instant::now() + delay < deadline =>
            {
                reachability().failed(address, &e, Instant::now());
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(500));
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no connection within {within:?}"),
                ))
            }
        }
    }
}

/// Relays one connection until either side closes; `Err` says why the guard closed it.
async fn relay(local: UnixStream, remote: TcpStream, limits: OutboundLimits) -> Result<(), String> {
    let (mut local_read, mut local_write) = local.into_split();
    let (mut remote_read, mut remote_write) = remote.into_split();
    let up = async move {
        // Our own bytes: passed as they are (in reads as large as the other way's: a batch of
        // large requests passes in a few).
        let mut buf = RelayBuffer::new();
        loop {
            if matches!(buf.read_from(&mut local_read).await, Ok(0) | Err(_)) {
                return Ok(());
            }
            if remote_write.write_all(buf.bytes()).await.is_err() {
                return Ok(());
            }
        }
    };
    let down = async move {
        let mut scanner = Scanner::new(limits.max_frame_bytes);
        let mut buf = RelayBuffer::new();
        let greeting_deadline = Instant::now() + limits.connect_timeout;
        loop {
            let read = if scanner.greeted() {
                buf.read_from(&mut remote_read).await
            } else {
                tokio::time::timeout_at(greeting_deadline, buf.read_from(&mut remote_read))
                    .await
                    .map_err(|_| "no ZMTP greeting in time".to_owned())?
            };
            if matches!(read, Ok(0) | Err(_)) {
                return Ok(());
            }
            scanner.scan(buf.bytes()).map_err(|v| v.to_string())?;
            if local_write.write_all(buf.bytes()).await.is_err() {
                return Ok(());
            }
        }
    };
    tokio::select! {
        outcome = up => outcome,
        outcome = down => outcome,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    fn limits() -> OutboundLimits {
        OutboundLimits {
            max_frame_bytes: 1024,
            connect_timeout: Duration::from_secs(5),
        }
    }

    fn greeting() -> Vec<u8> {
        let mut g = vec![0u8; 64];
        g[0] = 0xFF;
        g[9] = 0x7F;
        g[10] = 3;
        g
    }

    /// Connects through a guard to a raw server that sends `reply`; returns what reached us.
    async fn through_guard(reply: Vec<u8>) -> Vec<u8> {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = server.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut peer, _) = server.accept().await.unwrap();
            peer.write_all(&reply).await.unwrap();
            // Hold the connection open: only the guard may close it.
            let mut sink = Vec::new();
            let _ = peer.read_to_end(&mut sink).await;
        });
        let guard = OutboundGuard::start(&address, "test", limits()).unwrap();
        let path = guard.endpoint().strip_prefix("ipc://").unwrap().to_owned();
        let mut local = UnixStream::connect(path).await.unwrap();
        let mut received = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), local.read_to_end(&mut received))
            .await
            .expect("the guard closes the connection")
            .unwrap();
        received
    }

    #[tokio::test]
    async fn a_frame_announcing_too_much_closes_the_connection_and_its_header_never_passes() {
        let mut reply = greeting();
        reply.extend([0x00, 3, b'a', b'b', b'c']);
        let fine = reply.len();
        reply.extend([0x02, 0, 0, 0x80, 0, 0, 0, 0, 0]);
        let received = through_guard(reply.clone()).await;
        // What passed (the guard checks each read whole before passing it) is well-formed.
        assert!(
            received.len() <= fine && received == reply[..received.len()],
            "the header passed: {received:?}"
        );
    }

    #[tokio::test]
    async fn a_greeting_that_is_not_zmtp_closes_the_connection() {
        let received = through_guard(b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec()).await;
        assert!(received.is_empty(), "{received:?}");
    }

    #[test]
    fn an_unreachable_router_is_noted_once_then_at_a_growing_interval() {
        let reach = Reachability::default();
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        let t0 = Instant::now();
        let s = Duration::from_secs;
        // Failures every second for 2 minutes: lines at 0, 5, 15, 35 and 75 s.
        let noted: Vec<u64> = (0..120)
            .filter(|&i| reach.failed("r:1", &refused, t0 + s(i)))
            .collect();
        assert_eq!(noted, [0, 5, 15, 35, 75]);
        // Another address is noted on its own.
        assert!(reach.failed("r:2", &refused, t0 + s(120)));
        // Back: one line, and the next failure is a first one again.
        assert!(reach.reached("r:1", t0 + s(121)));
        assert!(!reach.reached("r:1", t0 + s(122)));
        assert!(reach.failed("r:1", &refused, t0 + s(123)));
    }

    #[tokio::test]
    async fn a_connection_refused_past_the_connect_timeout_is_a_failure_with_its_reason() {
        // A port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let quick = OutboundLimits {
            connect_timeout: Duration::from_millis(300),
            ..limits()
        };
        let guard = OutboundGuard::start(&format!("127.0.0.1:{port}"), "test", quick).unwrap();
        let path = guard.endpoint().strip_prefix("ipc://").unwrap().to_owned();
        let mut local = UnixStream::connect(path).await.unwrap();
        let mut received = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), local.read_to_end(&mut received))
            .await
            .expect("the guard gives up within its connect timeout")
            .unwrap();
        let failure = guard.take_failure().expect("the reason is kept");
        assert_eq!(
            failure.kind(),
            io::ErrorKind::ConnectionRefused,
            "{failure}"
        );
        assert!(guard.take_failure().is_none(), "asked once");
    }
}
