//! Child processes of the example's binaries: spawn, read the router's endpoints, stop by PID.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A child process; killed (by PID) and reaped when dropped if it still runs.
pub struct Daemon {
    /// Its role, for messages.
    pub name: String,
    child: Child,
    /// A router's metrics URL, from its listening line (with `--metrics`).
    metrics_url: Option<String>,
}

impl Daemon {
    /// Starts `exe` with `args`; its stderr goes to `log` (or is inherited), stdout is piped.
    ///
    /// # Errors
    /// When the program cannot be started.
    pub fn spawn(
        name: &str,
        exe: &Path,
        args: &[String],
        log: Option<&Path>,
    ) -> anyhow::Result<Self> {
        Self::spawn_in(name, exe, args, log, false)
    }

    /// As [`Daemon::spawn`], in a process group of its own: a Ctrl-C in the terminal (which
    /// signals the whole foreground group) then reaches only the parent, which stops its
    /// children in order.
    ///
    /// # Errors
    /// When the program cannot be started.
    pub fn spawn_own_group(
        name: &str,
        exe: &Path,
        args: &[String],
        log: Option<&Path>,
    ) -> anyhow::Result<Self> {
        Self::spawn_in(name, exe, args, log, true)
    }

    fn spawn_in(
        name: &str,
        exe: &Path,
        args: &[String],
        log: Option<&Path>,
        own_group: bool,
    ) -> anyhow::Result<Self> {
        let stderr = match log {
            Some(path) => Stdio::from(
                std::fs::File::create(path)
                    .with_context(|| format!("cannot create {}", path.display()))?,
            ),
            None => Stdio::inherit(),
        };
        let mut command = Command::new(exe);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        if own_group {
            std::os::unix::process::CommandExt::process_group(&mut command, 0);
        }
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {} ({})", name, exe.display()))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            metrics_url: None,
        })
    }

    /// A router's metrics URL, once [`Daemon::read_endpoints`] read it (with `--metrics`).
    pub fn metrics_url(&self) -> Option<&str> {
        self.metrics_url.as_deref()
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Reads the `listening api=… broadcast=…` line a router prints once its sockets are bound.
    ///
    /// # Errors
    /// When the router exits or prints something else first.
    pub fn read_endpoints(&mut self) -> anyhow::Result<(String, String)> {
        let stdout = self
            .child
            .stdout
            .take()
            .context("the router's stdout is not piped")?;
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .context("cannot read the router's first line")?;
        let Some(rest) = line.trim().strip_prefix("listening ") else {
            bail!(
                "{} did not start (first line {:?}); see its log",
                self.name,
                line.trim()
            );
        };
        let mut api = None;
        let mut broadcast = None;
        for part in rest.split_whitespace() {
            if let Some(v) = part.strip_prefix("api=") {
                api = Some(v.to_owned());
            } else if let Some(v) = part.strip_prefix("broadcast=") {
                broadcast = Some(v.to_owned());
            } else if let Some(v) = part.strip_prefix("metrics=") {
                self.metrics_url = Some(v.to_owned());
            }
        }
        match (api, broadcast) {
            (Some(a), Some(b)) => Ok((a, b)),
            _ => bail!("unexpected listening line {line:?}"),
        }
    }

    /// The first line it prints on its stdout, without the line end.
    ///
    /// # Errors
    /// When its stdout is not piped (or was read already) or cannot be read.
    pub fn first_line(&mut self) -> anyhow::Result<String> {
        let stdout = self
            .child
            .stdout
            .take()
            .with_context(|| format!("the stdout of {} is not piped", self.name))?;
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .with_context(|| format!("cannot read the first line of {}", self.name))?;
        Ok(line.trim_end().to_owned())
    }

    /// Everything left on its stdout (call after it exited).
    pub fn read_rest(&mut self) -> String {
        let mut out = String::new();
        if let Some(mut stdout) = self.child.stdout.take() {
            let _ignored = std::io::Read::read_to_string(&mut stdout, &mut out);
        }
        out
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: Signal) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // The process may have exited already; that is fine.
            let _ignored = kill(Pid::from_raw(pid), signal);
        }
    }

    /// Kills it with SIGKILL (a crash) and waits until it is gone, so its ports and files are
    /// free.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        let _ignored = self.child.kill();
        self.child.wait().ok()
    }

    /// Stops it: SIGTERM, then SIGKILL if it has not exited within `grace`. Returns its exit
    /// status.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.exited() {
            return Some(status);
        }
        self.signal(Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ignored = self.child.kill();
        self.child.wait().ok()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ignored = self.child.kill();
            let _ignored = self.child.wait();
        }
    }
}

/// The path of a binary of this package beside the running one (`my_router`, ...).
pub fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate the running program")?;
    let dir = exe.parent().context("the running program has no folder")?;
    Ok(dir.join(name))
}

/// Makes sure the example's binaries are built beside the running one: when started by
/// `cargo run`, builds them with the same profile (a no-op when they are up to date).
///
/// # Errors
/// When the build fails, or a binary is missing and cargo is not available.
pub fn ensure_binaries(names: &[&str]) -> anyhow::Result<()> {
    let missing = names
        .iter()
        .any(|n| sibling(n).map(|p| !p.exists()).unwrap_or(true));
    let Ok(cargo) = std::env::var("CARGO") else {
        if missing {
            bail!("the example's binaries are not built: run `cargo build --release -p pypelinin-example --bins`");
        }
        return Ok(());
    };
    let exe = std::env::current_exe()?;
    let release = exe
        .parent()
        .and_then(Path::file_name)
        .is_some_and(|d| d == "release");
    let mut build = Command::new(cargo);
    // Not quiet: on a fresh clone this links five binaries, which takes a while; cargo's
    // progress shows that something happens.
    build.args(["build", "-p", "pypelinin-example", "--bins"]);
    build
        .arg("--manifest-path")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"));
    if release {
        build.arg("--release");
    }
    eprintln!(
        "building the example's daemons ({}) if they are not up to date ...",
        names.join(", ")
    );
    let status = build.status().context("cannot run cargo build")?;
    if !status.success() {
        bail!("building the example's binaries failed");
    }
    Ok(())
}
