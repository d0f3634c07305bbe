//! A TCP relay that holds every byte back a fixed time in each direction: the network
//! benchmark's stand-in for `tc netem delay`, which needs a kernel module that not every
//! machine has (this one's kernel has none).
//!
//! `netbench` runs one relay in each host's network namespace. The daemons of that host connect
//! to the relay on the host's loopback, and the relay connects to the router across the
//! namespaces' bridge, so whatever the host sends or receives crosses the bridge `delay` later.
//! A link set down between host and bridge stalls the relay's connection as it would stall
//! the daemons' own.
//!
//! Each connection gets a thread per direction that reads, stamps each chunk with the time it
//! may leave, and a thread per direction that writes each chunk once its time has come (a
//! thread sleep: microsecond precision, where tokio's timers have milliseconds). Order is kept,
//! and at most [`QUEUED_CHUNKS`] chunks wait per direction, so a stalled side slows the other
//! instead of growing memory.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{sync_channel, Receiver};
use std::time::{Duration, Instant};

/// Chunks that may wait in one direction of one connection.
pub const QUEUED_CHUNKS: usize = 256;

/// How long the relay tries to reach its upstream for each new connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Binds a listener for each `(listen, upstream)` pair, then relays every connection to its
/// upstream with `delay` each way, on threads, until the process ends. `ready` is called once
/// every listener is bound.
///
/// # Errors
/// When a listener cannot be bound.
pub fn serve(
    pairs: &[(SocketAddr, SocketAddr)],
    delay: Duration,
    ready: impl FnOnce(),
) -> io::Result<()> {
    let mut listeners = Vec::new();
    for &(listen, upstream) in pairs {
        let listener = TcpListener::bind(listen)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {listen}: {e}")))?;
        listeners.push((listener, upstream));
    }
    ready();
    let mut accepting = Vec::new();
    for (listener, upstream) in listeners {
        accepting.push(std::thread::spawn(move || {
            accept(&listener, upstream, delay)
        }));
    }
    for thread in accepting {
        let _ = thread.join();
    }
    Ok(())
}

fn accept(listener: &TcpListener, upstream: SocketAddr, delay: Duration) {
    for downstream in listener.incoming() {
        let Ok(downstream) = downstream else { continue };
        std::thread::spawn(move || {
            // No upstream (the link is down): close, as a refused connection would; the
            // daemon's socket reconnects by itself.
            if let Ok(up) = TcpStream::connect_timeout(&upstream, CONNECT_TIMEOUT) {
                relay(downstream, up, delay);
            }
        });
    }
}

/// Relays `a` ⇄ `b` until either side ends, then closes both.
fn relay(a: TcpStream, b: TcpStream, delay: Duration) {
    let _ = a.set_nodelay(true);
    let _ = b.set_nodelay(true);
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let forth = std::thread::spawn(move || pipe(a, b2, delay));
    pipe(b, a2, delay);
    let _ = forth.join();
}

/// Copies `from` to `to`, each chunk `delay` after it was read; shuts both down at the end.
fn pipe(mut from: TcpStream, to: TcpStream, delay: Duration) {
    let (chunks, queued) = sync_channel::<(Instant, Vec<u8>)>(QUEUED_CHUNKS);
    let writer = {
        let to = match to.try_clone() {
            Ok(t) => t,
            Err(_) => return,
        };
        std::thread::spawn(move || write_due(to, &queued))
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if chunks
                    .send((Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    drop(chunks);
    let _ = writer.join();
    // Either side ended: end the connection both ways, so the other direction's reader stops.
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// Writes each queued chunk to `to` once its time has come.
fn write_due(mut to: TcpStream, queued: &Receiver<(Instant, Vec<u8>)>) {
    for (due, chunk) in queued {
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        if to.write_all(&chunk).is_err() {
            let _ = to.shutdown(Shutdown::Both);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_come_through_in_order_and_late_by_the_delay_each_way() {
        let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
        let up_addr = upstream.local_addr().unwrap();
        // An echo server behind the relay.
        std::thread::spawn(move || {
            let (mut s, _) = upstream.accept().unwrap();
            let mut buf = [0u8; 4096];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        // Find a free port for the relay, then serve on it.
        let listen = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let delay = Duration::from_millis(40);
        let (bound, is_bound) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            serve(&[(listen, up_addr)], delay, move || bound.send(()).unwrap()).unwrap();
        });
        is_bound.recv_timeout(Duration::from_secs(10)).unwrap();
        let mut client = TcpStream::connect(listen).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let message: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let started = Instant::now();
        client.write_all(&message).unwrap();
        let mut echoed = vec![0u8; message.len()];
        client.read_exact(&mut echoed).unwrap();
        let round_trip = started.elapsed();
        assert_eq!(
            echoed, message,
            "the bytes came back changed or out of order"
        );
        // Held back once on the way out and once on the way back: at least twice the delay.
        assert!(
            round_trip >= 2 * delay,
            "the round trip took {round_trip:?}, less than twice the relay's {delay:?}"
        );
    }
}
