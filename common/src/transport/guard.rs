//! A guard in front of the router's listening sockets: no bytes from the network reach the
//! `zeromq` crate unchecked.
//!
//! The crate reserves memory for the length a frame header announces before a byte of the frame
//! arrives, and has no limit to set: one 9-byte header claiming 2^47 bytes aborts the process.
//! So the router's ZeroMQ sockets listen only on a private Unix socket, and the guard listens on
//! the TCP endpoint. For each connection it relays the bytes both ways, reading the ZMTP 3
//! framing as they pass (without buffering frames): a greeting that is not ZMTP 3, a frame
//! header with reserved bits or announcing more than [`GuardLimits::max_frame_bytes`], or a
//! greeting not complete within [`GuardLimits::greeting_timeout`] closes that connection (logged
//! at most once per 10 s); every other connection is served throughout.
//!
//! It also bounds what one peer can make the router hold: at most
//! [`GuardLimits::max_connections`] connections; on the API port at most
//! [`GuardLimits::max_in_flight`] requests of one connection not answered yet (the guard stops
//! reading from a peer past that, so the replies queued for a peer that never reads stay few);
//! a peer that takes none of the bytes sent to it for [`GuardLimits::stall_timeout`] is
//! disconnected, which frees what was queued for it; and on the broadcast port the guard takes
//! the broadcasts as they come and disconnects a subscriber more than
//! [`GuardLimits::max_pending_bytes`] behind (a high-water mark in bytes), so nothing piles up
//! in the PUB socket's own queue.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

/// What the guard lets through.
#[derive(Debug, Clone, Copy)]
pub struct GuardLimits {
    /// The longest frame a peer may send, in bytes.
    pub max_frame_bytes: u64,
    /// Connections at once, at most; past it new ones are closed at once.
    pub max_connections: usize,
    /// Messages of one connection not answered yet, at most (`None`: no limit, for the PUB
    /// port, whose peers only subscribe).
    pub max_in_flight: Option<u64>,
    /// How long a peer has to send its greeting.
    pub greeting_timeout: Duration,
    /// How long a peer may take none of the bytes sent to it before it is disconnected.
    pub stall_timeout: Duration,
    /// Bytes sent to the peer and not taken yet that the guard holds, at most; past it the peer
    /// is disconnected, like a libzmq high-water mark (`None`: the guard holds one read and
    /// stops reading from the socket behind it, for the API port, whose replies the
    /// `max_in_flight` limit bounds).
    pub max_pending_bytes: Option<u64>,
}

impl GuardLimits {
    /// Limits for the API port. Frames up to twice `max_request_bytes` pass, so a request a
    /// little too large still gets its answer (`malformed request`, "exceeds the limit") from
    /// the router; a header announcing more closes the connection before anything is held.
    pub fn api(max_request_bytes: usize) -> Self {
        let max = max_request_bytes as u64;
        Self {
            max_frame_bytes: max.saturating_mul(2).max(max.saturating_add(64 * 1024)),
            max_connections: 4_096,
            max_in_flight: Some(32),
            greeting_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(10),
            max_pending_bytes: None,
        }
    }

    /// Limits for the broadcast port: peers send only subscriptions (short frames), and a
    /// subscriber more than 16 MiB of broadcasts behind (some 200,000 events) is disconnected.
    /// The guard takes the broadcasts from the PUB socket as they come, so none pile up in the
    /// socket's own queue for a slow subscriber.
    pub fn broadcast() -> Self {
        Self {
            max_frame_bytes: 64 * 1024,
            max_connections: 4_096,
            max_in_flight: None,
            greeting_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(10),
            max_pending_bytes: Some(16 * 1024 * 1024),
        }
    }
}

/// Why a connection was closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// The first bytes are not a ZMTP 3 greeting.
    #[error("not a ZMTP 3 greeting")]
    Greeting,
    /// A frame header with reserved flag bits set.
    #[error("frame flags {0:#04x} have reserved bits set")]
    Flags(u8),
    /// A frame announcing more bytes than allowed.
    #[error("a frame of {announced} bytes announced; at most {max} are allowed")]
    TooLong {
        /// The length announced.
        announced: u64,
        /// The limit.
        max: u64,
    },
}

/// Reads ZMTP 3 framing as bytes pass: the 64-byte greeting, then frames (a flags byte, a
/// 1- or 8-byte length, the body). Counts the messages that end (a frame that is neither a
/// command nor followed by more).
#[derive(Debug)]
pub struct Scanner {
    state: ScanState,
    max_frame_bytes: u64,
    messages: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum ScanState {
    /// Bytes of the greeting seen so far.
    Greeting(usize),
    /// Waiting for a frame's flags byte.
    Flags,
    /// Length bytes still to read, the length so far, and the frame's flags.
    Length { left: u8, value: u64, flags: u8 },
    /// Body bytes still to pass, and whether the frame ends a message.
    Body { left: u64, ends_message: bool },
}

/// Bytes relayed per read while a connection is busy, each way. A connection reads into
/// [`SMALL_BUFFER`] bytes, and into this many while its reads fill them: a reply of many large
/// jobs then passes in a few reads and writes (each a turn of the router's loop) instead of
/// dozens. With 16 KiB reads throughout, both 100 B and 10 KB payloads ran 5–8% slower; with
/// 128 KiB the router kept ~3 MB more after 2,000 pipelines for a few percent more.
pub(crate) const BUFFER: usize = 64 * 1024;

/// Bytes relayed per read while a connection's messages are short.
const SMALL_BUFFER: usize = 16 * 1024;

/// Bytes the broadcast port's guard takes from the PUB socket per read (broadcasts are
/// short; each read is a chunk held for the subscriber).
const BROADCAST_CHUNK: usize = 16 * 1024;

/// The buffer one direction of a relayed connection reads into: [`SMALL_BUFFER`] bytes, grown
/// to [`BUFFER`] when a read fills it and given back when a read no longer fills the small
/// one, so only busy connections hold a large one. Its memory is never zeroed: reads fill it.
pub(crate) struct RelayBuffer(Vec<u8>);

impl RelayBuffer {
    pub(crate) fn new() -> Self {
        Self(Vec::with_capacity(SMALL_BUFFER))
    }

    /// Reads once from `from`; the bytes read are [`RelayBuffer::bytes`].
    pub(crate) async fn read_from(
        &mut self,
        from: &mut (impl AsyncRead + Unpin),
    ) -> std::io::Result<usize> {
        let capacity = self.0.capacity();
        let last = self.0.len();
        if last == capacity && capacity < BUFFER {
            self.0 = Vec::with_capacity(BUFFER);
        } else if last < SMALL_BUFFER && capacity > SMALL_BUFFER {
            self.0 = Vec::with_capacity(SMALL_BUFFER);
        }
        self.0.clear();
        from.read_buf(&mut self.0).await
    }

    /// The bytes of the last read.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// ZMTP flag bits.
const MORE: u8 = 0x01;
const LONG: u8 = 0x02;
const COMMAND: u8 = 0x04;

/// The length of a ZMTP 3 greeting.
const GREETING: usize = 64;

impl Scanner {
    /// A scanner at the start of a connection.
    pub fn new(max_frame_bytes: u64) -> Self {
        Self {
            state: ScanState::Greeting(0),
            max_frame_bytes,
            messages: 0,
        }
    }

    /// Whether the greeting is complete.
    pub fn greeted(&self) -> bool {
        !matches!(self.state, ScanState::Greeting(_))
    }

    /// Messages that ended so far.
    pub fn messages(&self) -> u64 {
        self.messages
    }

    /// Reads `bytes`, the next ones of the stream.
    ///
    /// # Errors
    /// The first [`Violation`] in them.
    pub fn scan(&mut self, bytes: &[u8]) -> Result<(), Violation> {
        let mut i = 0;
        while i < bytes.len() {
            match self.state {
                ScanState::Greeting(seen) => {
                    let b = bytes[i];
                    // The signature is 0xFF, 8 bytes of padding, 0x7F; then the major version.
                    let ok = match seen {
                        0 => b == 0xFF,
                        9 => b & 0x01 == 0x01,
                        10 => b >= 3,
                        _ => true,
                    };
                    if !ok {
                        return Err(Violation::Greeting);
                    }
                    i += 1;
                    self.state = if seen + 1 == GREETING {
                        ScanState::Flags
                    } else {
                        ScanState::Greeting(seen + 1)
                    };
                }
                ScanState::Flags => {
                    let flags = bytes[i];
                    i += 1;
                    if flags & !(MORE | LONG | COMMAND) != 0 {
                        return Err(Violation::Flags(flags));
                    }
                    let left = if flags & LONG != 0 { 8 } else { 1 };
                    self.state = ScanState::Length {
                        left,
                        value: 0,
                        flags,
                    };
                }
                ScanState::Length { left, value, flags } => {
                    let value = (value << 8) | u64::from(bytes[i]);
                    i += 1;
                    if left > 1 {
                        self.state = ScanState::Length {
                            left: left - 1,
                            value,
                            flags,
                        };
                        continue;
                    }
                    if value > self.max_frame_bytes {
                        return Err(Violation::TooLong {
                            announced: value,
                            max: self.max_frame_bytes,
                        });
                    }
                    let ends_message = flags & (MORE | COMMAND) == 0;
                    self.state = ScanState::Body {
                        left: value,
                        ends_message,
                    };
                    if value == 0 {
                        self.end_frame(ends_message);
                    }
                }
                ScanState::Body { left, ends_message } => {
                    let take = left.min((bytes.len() - i) as u64);
                    i += take as usize;
                    if take == left {
                        self.end_frame(ends_message);
                    } else {
                        self.state = ScanState::Body {
                            left: left - take,
                            ends_message,
                        };
                    }
                }
            }
        }
        Ok(())
    }

    fn end_frame(&mut self, ends_message: bool) {
        if ends_message {
            self.messages += 1;
        }
        self.state = ScanState::Flags;
    }
}

/// Where the guarded ZeroMQ socket listens: a Unix socket only this process knows.
#[derive(Debug, Clone)]
pub struct Inner {
    path: std::path::PathBuf,
}

impl Inner {
    /// A fresh path for a private Unix socket, in the temp folder.
    pub fn new(name: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        static SWEPT: std::sync::Once = std::sync::Once::new();
        SWEPT.call_once(remove_stale_sockets);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("pypelinin-{name}-{}-{n}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        Self { path }
    }

    /// Its path.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// A listener on it, to hand to the ZeroMQ socket (`bind_listener`).
    ///
    /// # Errors
    /// When the socket cannot be bound.
    pub fn listen(&self) -> std::io::Result<std::os::unix::net::UnixListener> {
        let listener = std::os::unix::net::UnixListener::bind(&self.path)?;
        // Only this user may connect around the guard.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o600))?;
        Ok(listener)
    }
}

/// Removes the private sockets that processes killed without a chance to clean up (kill -9)
/// left in the temp folder: those whose process is gone. Run once per process.
fn remove_stale_sockets() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(stale_socket_pid) else {
            continue;
        };
        let alive = std::path::Path::new(&format!("/proc/{pid}")).exists();
        if !alive {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The process id in the name of one of our private sockets
/// (`pypelinin-{name}-{pid}-{n}.sock`), or `None` for any other name.
fn stale_socket_pid(file_name: &str) -> Option<u32> {
    let stem = file_name
        .strip_prefix("pypelinin-")?
        .strip_suffix(".sock")?;
    let mut parts = stem.rsplitn(3, '-');
    parts.next()?.parse::<u64>().ok()?;
    let pid = parts.next()?.parse::<u32>().ok()?;
    parts.next()?;
    Some(pid)
}

impl Drop for Inner {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A running guard; dropping it stops accepting (connections being relayed end with their
/// peers).
pub struct Guard {
    endpoint: String,
    task: JoinHandle<()>,
    _inner: Arc<Inner>,
}

impl Guard {
    /// Listens on `listener` and relays each connection to `inner`, within `limits`.
    pub fn start(listener: TcpListener, inner: Inner, limits: GuardLimits) -> Self {
        let endpoint = listener
            .local_addr()
            .map(|a| format!("tcp://{a}"))
            .unwrap_or_default();
        let inner = Arc::new(inner);
        let task = tokio::spawn(accept_loop(listener, inner.clone(), limits));
        Self {
            endpoint,
            task,
            _inner: inner,
        }
    }

    /// The TCP endpoint it listens on.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Log lines about misbehaving peers: at most one per 10 s.
fn throttled() -> &'static Mutex<(Option<std::time::Instant>, u64)> {
    static LOG: Mutex<(Option<std::time::Instant>, u64)> = Mutex::new((None, 0));
    &LOG
}

pub(crate) fn log_closed(peer: &str, why: &str) {
    let mut log = throttled()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let now = std::time::Instant::now();
    if log
        .0
        .is_some_and(|last| now.duration_since(last) < Duration::from_secs(10))
    {
        log.1 += 1;
        return;
    }
    let suppressed = std::mem::take(&mut log.1);
    log.0 = Some(now);
    warn!(%peer, why, suppressed, "closed a connection that broke the protocol or its limits");
}

async fn accept_loop(listener: TcpListener, inner: Arc<Inner>, limits: GuardLimits) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let (client, addr) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            log_closed(&addr.to_string(), "too many connections");
            drop(client);
            continue;
        };
        let inner = inner.clone();
        tokio::spawn(async move {
            let peer = addr.to_string();
            if let Err(why) = relay(client, &inner, limits).await {
                log_closed(&peer, &why);
            }
            drop(slot);
        });
    }
}

/// Relays one connection until either side closes; `Err` says why the guard closed it.
async fn relay(client: TcpStream, inner: &Inner, limits: GuardLimits) -> Result<(), String> {
    let _ = client.set_nodelay(true);
    let server = UnixStream::connect(&inner.path)
        .await
        .map_err(|e| format!("cannot reach the socket behind the guard: {e}"))?;
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let counts = Arc::new(Counts::default());
    let up = upstream(client_read, server_write, limits, counts.clone());
    let down = downstream(server_read, client_write, limits, counts);
    // Either direction ending ends the connection.
    tokio::select! {
        outcome = up => outcome,
        outcome = down => outcome,
    }
}

/// Replies passed to the client so far, so the upstream side (which counts requests itself)
/// can bound the requests in flight.
#[derive(Debug, Default)]
struct Counts {
    down: AtomicU64,
    answered: Notify,
}

/// Client to server: checks the framing, holds back past the requests in flight.
async fn upstream(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    limits: GuardLimits,
    counts: Arc<Counts>,
) -> Result<(), String> {
    let mut scanner = Scanner::new(limits.max_frame_bytes);
    let mut buf = RelayBuffer::new();
    let greeting_deadline = tokio::time::Instant::now() + limits.greeting_timeout;
    loop {
        if let Some(max) = limits.max_in_flight {
            loop {
                let answered = counts.answered.notified();
                let in_flight = scanner
                    .messages()
                    .saturating_sub(counts.down.load(Ordering::Acquire));
                if in_flight < max {
                    break;
                }
                answered.await;
            }
        }
        let read = if scanner.greeted() {
            buf.read_from(&mut from).await
        } else {
            match tokio::time::timeout_at(greeting_deadline, buf.read_from(&mut from)).await {
                Ok(read) => read,
                Err(_) => return Err("no ZMTP greeting in time".into()),
            }
        };
        if matches!(read, Ok(0) | Err(_)) {
            return Ok(());
        }
        scanner.scan(buf.bytes()).map_err(|v| v.to_string())?;
        if to.write_all(buf.bytes()).await.is_err() {
            return Ok(());
        }
    }
}

/// Server to client: counts the replies, and drops a peer that takes nothing for the stall
/// timeout, or that falls more than `max_pending_bytes` behind.
async fn downstream(
    from: impl AsyncRead + Unpin,
    to: impl AsyncWrite + Unpin,
    limits: GuardLimits,
    counts: Arc<Counts>,
) -> Result<(), String> {
    match limits.max_pending_bytes {
        None => downstream_in_step(from, to, limits, counts).await,
        Some(max) => downstream_eager(from, to, limits, max).await,
    }
}

/// Reads from our socket only once the last read was passed on to the peer.
async fn downstream_in_step(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    limits: GuardLimits,
    counts: Arc<Counts>,
) -> Result<(), String> {
    // Our own socket's bytes: counted, not limited.
    let mut scanner = Scanner::new(u64::MAX);
    let mut buf = RelayBuffer::new();
    loop {
        if matches!(buf.read_from(&mut from).await, Ok(0) | Err(_)) {
            return Ok(());
        }
        // The server's greeting and frames are well-formed; a count is all that is wanted.
        let _ = scanner.scan(buf.bytes());
        match tokio::time::timeout(limits.stall_timeout, to.write_all(buf.bytes())).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Ok(()),
            Err(_) => return Err("the peer took nothing for the stall timeout".into()),
        }
        counts.down.store(scanner.messages(), Ordering::Release);
        counts.answered.notify_waiters();
    }
}

/// Takes what our socket sends as it comes, and holds it for the peer up to `max_pending`
/// bytes.
async fn downstream_eager(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    limits: GuardLimits,
    max_pending: u64,
) -> Result<(), String> {
    let pending = AtomicU64::new(0);
    let (chunks, mut queued) = tokio::sync::mpsc::unbounded_channel::<bytes::Bytes>();
    let take = async {
        // Read into spare capacity (never zeroed), and pass on exactly what was read: a
        // zeroed 16 KiB buffer per read cost the router more than the reads themselves.
        let mut buf = bytes::BytesMut::with_capacity(BROADCAST_CHUNK);
        loop {
            buf.reserve(BROADCAST_CHUNK);
            let n = match from.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return Ok(()),
                Ok(n) => n,
            };
            if pending.fetch_add(n as u64, Ordering::AcqRel) + n as u64 > max_pending {
                return Err(format!(
                    "the peer fell more than {max_pending} bytes behind"
                ));
            }
            if chunks.send(buf.split().freeze()).is_err() {
                return Ok(());
            }
        }
    };
    let give = async {
        while let Some(chunk) = queued.recv().await {
            match tokio::time::timeout(limits.stall_timeout, to.write_all(&chunk)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Ok(()),
                Err(_) => return Err("the peer took nothing for the stall timeout".into()),
            }
            pending.fetch_sub(chunk.len() as u64, Ordering::AcqRel);
        }
        Ok(())
    };
    tokio::select! {
        outcome = take => outcome,
        outcome = give => outcome,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_relay_buffer_grows_while_reads_fill_it_and_shrinks_when_they_no_longer_do() {
        let mut buf = RelayBuffer::new();
        let big = vec![7u8; 3 * BUFFER];
        let mut from: &[u8] = &big;
        // The first read fills the small buffer; the next ones take up to BUFFER bytes.
        assert_eq!(buf.read_from(&mut from).await.unwrap(), SMALL_BUFFER);
        assert_eq!(buf.read_from(&mut from).await.unwrap(), BUFFER);
        assert_eq!(buf.bytes(), &big[..BUFFER]);
        let short = [1u8, 2, 3];
        let mut from: &[u8] = &short;
        assert_eq!(buf.read_from(&mut from).await.unwrap(), 3);
        assert_eq!(buf.bytes(), short);
        // A short read gives the large buffer back.
        let mut from: &[u8] = &big;
        assert_eq!(buf.read_from(&mut from).await.unwrap(), SMALL_BUFFER);
        assert_eq!(buf.0.capacity(), SMALL_BUFFER);
    }

    fn greeting() -> Vec<u8> {
        let mut g = vec![0u8; GREETING];
        g[0] = 0xFF;
        g[9] = 0x7F;
        g[10] = 3;
        g
    }

    #[test]
    fn frames_pass_and_messages_are_counted_across_any_split() {
        let mut stream = greeting();
        // A READY command, a two-frame message (short frames), a long frame message.
        stream.extend([COMMAND, 3, b'a', b'b', b'c']);
        stream.extend([MORE, 0, 0, 2, b'h', b'i']);
        stream.extend([LONG, 0, 0, 0, 0, 0, 0, 1, 0]);
        stream.extend(std::iter::repeat_n(b'x', 256));
        for chunk in [1, 2, 7, 64, stream.len()] {
            let mut s = Scanner::new(1000);
            for piece in stream.chunks(chunk) {
                s.scan(piece).unwrap();
            }
            assert_eq!(s.messages(), 2, "chunks of {chunk}");
            assert!(s.greeted());
        }
    }

    #[test]
    fn only_our_socket_names_are_taken_for_stale_ones() {
        assert_eq!(stale_socket_pid("pypelinin-api-4242-0.sock"), Some(4242));
        assert_eq!(stale_socket_pid("pypelinin-req-7-12.sock"), Some(7));
        for other in [
            "pypelinin-api-4242-0.sock.bak",
            "pypelinin-4242-0.sock",
            "pypelinin-api-x-0.sock",
            "other-api-4242-0.sock",
            "pypelinin-router-data-4242-0",
        ] {
            assert_eq!(stale_socket_pid(other), None, "{other}");
        }
    }

    #[test]
    fn a_socket_left_by_a_process_that_is_gone_is_removed() {
        // No process has pid u32::MAX - 1 (Linux caps pids far lower).
        let stale = std::env::temp_dir().join(format!("pypelinin-test-{}-0.sock", u32::MAX - 1));
        std::fs::write(&stale, b"").unwrap();
        let ours = Inner::new("test");
        let _listener = ours.listen().unwrap();
        remove_stale_sockets();
        assert!(!stale.exists(), "the stale socket was left");
        assert!(ours.path().exists(), "a live process's socket was removed");
    }

    #[test]
    fn hostile_headers_and_greetings_are_violations() {
        let mut s = Scanner::new(1 << 20);
        s.scan(&greeting()).unwrap();
        let huge = [LONG, 0x00, 0x00, 0x80, 0, 0, 0, 0, 0];
        assert!(matches!(s.scan(&huge), Err(Violation::TooLong { .. })));
        let mut s = Scanner::new(1 << 20);
        s.scan(&greeting()).unwrap();
        assert_eq!(s.scan(&[0x22; 100]), Err(Violation::Flags(0x22)));
        let mut s = Scanner::new(1 << 20);
        assert_eq!(s.scan(b"GET / HTTP/1.1\r\n"), Err(Violation::Greeting));
        let mut old = greeting();
        old[10] = 1;
        assert_eq!(Scanner::new(10).scan(&old), Err(Violation::Greeting));
    }
}
