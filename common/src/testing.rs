//! Helpers for tests of the daemons (feature `test-util`): loopback endpoints, bounded waits,
//! and the Python tests of `tests/python`.

use std::future::Future;
use std::time::Duration;

/// An endpoint on 127.0.0.1 with a port the OS picks at bind time.
pub const EPHEMERAL: &str = "tcp://127.0.0.1:0";

/// Awaits `fut` for at most `limit`, panicking with `what` if it does not complete in time.
pub async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// Checks `check` every 20 ms until it holds, panicking with `what` if it does not within
/// `limit` (for a condition no event announces: a file written by another process, a process
/// gone, a state another process reports).
pub fn wait_until(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !check() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether process `pid` is gone (or a zombie nobody reaped yet), read from `/proc`.
pub fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

/// Runs the pytest file `tests/python/<file>` of the repository with the environment `env`
/// (the paths of the binaries it starts) and asserts it passed, with pytest's output in the
/// failure message. The interpreter is `PYPELININ_PYTHON`, else the repository's `.venv`, else
/// `python3`; it must have pyzmq and pytest (`requirements-dev.txt`), which is checked first.
pub fn pytest(file: &str, env: &[(&str, &str)]) {
    pytest_in("tests/python", file, env);
}

/// As [`pytest`], for the pytest file `file` of the repository's folder `dir`.
pub fn pytest_in(dir: &str, file: &str, env: &[(&str, &str)]) {
    use std::process::Command;
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let python = std::env::var("PYPELININ_PYTHON").unwrap_or_else(|_| {
        let venv = format!("{root}/.venv/bin/python");
        if std::path::Path::new(&venv).exists() {
            venv
        } else {
            "python3".to_owned()
        }
    });
    let probe = Command::new(&python)
        .args(["-c", "import zmq, pytest"])
        .output();
    assert!(
        probe.as_ref().is_ok_and(|o| o.status.success()),
        "{python} cannot import zmq and pytest: install them with \
         `python3 -m pip install -r requirements-dev.txt`"
    );
    let out = Command::new(&python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", file])
        .current_dir(format!("{root}/{dir}"))
        .envs(env.iter().copied())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "{file} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Raw ZMTP 3.0 bytes, for tests that play a hostile peer without a ZeroMQ library.
pub mod zmtp {
    /// A ZMTP 3.0 greeting with the NULL mechanism.
    pub fn greeting() -> Vec<u8> {
        let mut g = vec![0u8; 64];
        g[0] = 0xFF;
        g[9] = 0x7F;
        g[10] = 3;
        g[12..16].copy_from_slice(b"NULL");
        g
    }

    /// A READY command announcing `socket_type` (`DEALER`, `SUB`, `ROUTER`, ...).
    pub fn ready(socket_type: &str) -> Vec<u8> {
        let mut body = vec![5u8];
        body.extend(b"READY");
        body.push(11);
        body.extend(b"Socket-Type");
        body.extend((socket_type.len() as u32).to_be_bytes());
        body.extend(socket_type.as_bytes());
        let mut frame = vec![0x04, body.len() as u8];
        frame.extend(body);
        frame
    }

    /// A frame header announcing a frame of `len` bytes (the 8-byte length form).
    pub fn long_header(len: u64) -> Vec<u8> {
        let mut h = vec![0x02];
        h.extend(len.to_be_bytes());
        h
    }
}
