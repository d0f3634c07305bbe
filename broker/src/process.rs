//! Process workers: a pool of long-lived processes, in any language, that run jobs sent to them
//! over stdin/stdout, one JSON object per line (docs/workers.md, "Process workers").
//!
//! A process starts by printing its hello, `{"hello": "pypelinin worker", "protocol": 1,
//! "workers": ["Name", ...]}`; then, for each job it reads `{"job id": ID, "worker": NAME,
//! "input": {...}}` and prints `{"job id": ID, "result": {...}}`, or `{"job id": ID, "error":
//! "...", "traceback": "..."}` when the job failed. Its stderr is kept (the last 2 KiB) for the
//! error of a job it fails by dying.
//!
//! A process that dies, prints something else, or overruns a job's timeout fails that job and
//! is killed (its whole process group) and replaced; one that ran `max_jobs_per_process` jobs is
//! replaced too. Each process runs in a process group of its own, so a Ctrl-C in the broker's
//! terminal does not reach it: the broker lets running jobs end, then stops the pool.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::process::Child;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::store::{retrieve_input, save_result, JobInfo, Store};
use crate::worker::JsonObject;

/// The version of the line protocol this broker speaks.
pub const PROTOCOL: u64 = 1;

/// What a process prints first: `"hello": HELLO`.
pub const HELLO: &str = "pypelinin worker";

/// How long a new process has to print its hello, unless its table says otherwise.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

/// How much of a process's stderr is kept (its end), for the error of a job it fails by dying.
const STDERR_TAIL: usize = 2048;

/// The longest line a process may print (a result of up to this many bytes).
const MAX_LINE: usize = 512 * 1024 * 1024;

/// Starts failing in a row after which a pool's workers are withdrawn.
pub const WITHDRAW_AFTER: u32 = 3;

/// How often a withdrawn pool tries to start a process, unless its table says otherwise.
pub const RETRY_WITHDRAWN: Duration = Duration::from_secs(30);

/// The first pause before starting a replacement again after a failed start; it doubles.
const RESTART_BACKOFF: Duration = Duration::from_millis(250);

/// A `[[broker.process_workers]]` table: a pool of processes serving one or more workers.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessWorker {
    /// The worker it serves (or use `names`).
    #[serde(default)]
    pub name: Option<String>,
    /// The workers it serves.
    #[serde(default)]
    pub names: Vec<String>,
    /// The fields the workers need from the store.
    #[serde(default)]
    pub requires: Vec<String>,
    /// The program and its arguments. The processes run in the settings file's folder (or
    /// `workdir`), so relative paths are the file's.
    pub command: Vec<String>,
    /// Processes in the pool: jobs of these workers run this many at once, at most.
    #[serde(default = "one")]
    pub processes: usize,
    /// A process is replaced after this many jobs (for libraries that leak); none: never.
    #[serde(default)]
    pub max_jobs_per_process: Option<u64>,
    /// The longest a job may run, in seconds (default: the broker's job timeout).
    #[serde(default)]
    pub timeout_secs: Option<f64>,
    /// The processes' working directory (default: the settings file's folder; relative: from
    /// it).
    #[serde(default)]
    pub workdir: Option<PathBuf>,
    /// How long a new process has to say hello, in seconds (default 30).
    #[serde(default)]
    pub hello_timeout_secs: Option<f64>,
    /// Once its processes keep failing to start, the pool's workers are withdrawn (no longer
    /// offered); the pool then tries to start a process every this many seconds (default 30)
    /// and offers them again once one says hello.
    #[serde(default)]
    pub retry_secs: Option<f64>,
}

fn one() -> usize {
    1
}

impl ProcessWorker {
    /// The workers it serves: `name` and `names`.
    pub fn worker_names(&self) -> Vec<String> {
        self.name.iter().chain(&self.names).cloned().collect()
    }

    /// The same, for a table of the settings file in `folder`: the processes run in that
    /// folder (or in `workdir`, taken from it), so relative paths in the command are the
    /// file's, and a relative program path is made absolute from it.
    pub fn resolved_against(mut self, folder: &Path) -> Self {
        if let Some(program) = self.command.first_mut() {
            let path = Path::new(program.as_str());
            if path.is_relative() && program.contains('/') {
                *program = folder.join(path).display().to_string();
            }
        }
        self.workdir = Some(match self.workdir.take() {
            Some(dir) if dir.is_relative() => folder.join(dir),
            Some(dir) => dir,
            None => folder.to_path_buf(),
        });
        self
    }
}

/// A running process of a pool.
struct Proc {
    child: Child,
    /// Its stdin, written without blocking (see [`write_all`]).
    stdin: File,
    stdout: Lines,
    stderr: Arc<Mutex<VecDeque<u8>>>,
    /// The task keeping `stderr`: it ends when the process's stderr closes.
    stderr_reader: tokio::task::JoinHandle<()>,
    pgid: Option<Pid>,
    jobs: u64,
}

impl Proc {
    /// Kills the process and every process it started.
    fn kill(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            let _gone = killpg(pgid, Signal::SIGKILL);
        }
        let _gone = self.child.start_kill();
    }

    /// The end of what it printed on stderr.
    fn stderr_tail(&self) -> String {
        let bytes: Vec<u8> = lock(&self.stderr).iter().copied().collect();
        let text = String::from_utf8_lossy(&bytes);
        let text = text.trim();
        if text.is_empty() {
            "(empty)".into()
        } else {
            text.to_owned()
        }
    }

    /// Why its stdout ended: how it exited, and the end of its stderr.
    async fn exited(&mut self) -> String {
        let status = tokio::time::timeout(Duration::from_secs(1), self.child.wait()).await;
        if status.is_ok() {
            // Reaped: its group goes now, while it may still hold the processes it started;
            // once empty, the group's id may be reused, so it is not signalled later.
            if let Some(pgid) = self.pgid.take() {
                let _gone = killpg(pgid, Signal::SIGKILL);
            }
        }
        // Let the stderr reader take the last bytes (it ends with the process's stderr, unless
        // a child of it keeps that open).
        let _ = tokio::time::timeout(Duration::from_millis(200), &mut self.stderr_reader).await;
        let how = match status {
            Ok(Ok(status)) => format!("it exited ({status})"),
            _ => "it closed its stdout".to_owned(),
        };
        format!("{how}; stderr: {}", self.stderr_tail())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A process's pipe, made non-blocking (the thread running a job waits on it with `poll`,
/// up to a deadline).
fn pipe(fd: std::io::Result<OwnedFd>) -> Result<File, String> {
    let fd = fd.map_err(|e| format!("cannot take the process's pipes: {e}"))?;
    let flags = fcntl(&fd, FcntlArg::F_GETFL).map_err(|e| format!("cannot set up a pipe: {e}"))?;
    fcntl(
        &fd,
        FcntlArg::F_SETFL(OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK),
    )
    .map_err(|e| format!("cannot set up a pipe: {e}"))?;
    Ok(File::from(fd))
}

/// Why waiting on a process stopped before it was ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Halt {
    /// The deadline passed.
    TimedOut,
    /// The job was stopped (cancelled) from outside.
    Stopped,
    /// The pool closed: the broker is stopping.
    Closed,
}

/// Waits on a process's pipes for the thread running a job: until `deadline`, or until the
/// job is stopped or the pool closed (looked at every [`STOP_CHECK`]).
struct Waiter<'a> {
    deadline: Instant,
    stop: &'a Stop,
    closed: &'a CancellationToken,
}

/// How often a thread waiting on a process looks whether its job was stopped. (A stop kills
/// the process, which closes its pipes and ends the wait at once; this is for a pipe kept
/// open by a process that left the group.)
const STOP_CHECK: Duration = Duration::from_millis(50);

impl Waiter<'_> {
    /// Waits until `pipe` is ready for `events` (or closed).
    fn wait(&self, pipe: &File, events: PollFlags) -> Result<(), Halt> {
        loop {
            if self.stop.is_stopped() {
                return Err(Halt::Stopped);
            }
            if self.closed.is_cancelled() {
                return Err(Halt::Closed);
            }
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Halt::TimedOut);
            }
            let slice = PollTimeout::try_from(left.min(STOP_CHECK)).unwrap_or(PollTimeout::MAX);
            let mut fds = [PollFd::new(pipe.as_fd(), events)];
            match poll(&mut fds, slice) {
                Ok(0) | Err(Errno::EINTR) => {}
                // Ready, or closed or failed: the read or write that follows says which.
                Ok(_) | Err(_) => return Ok(()),
            }
        }
    }
}

/// Stops a job's exchange from outside its thread: kills the process's group (which closes
/// its pipes) and tells the thread. Shared by the thread and the task waiting for it.
struct Stop {
    /// The group to kill, until the thread is done with the process.
    pgid: Mutex<Option<Pid>>,
    stopped: AtomicBool,
}

impl Stop {
    fn new(pgid: Option<Pid>) -> Self {
        Self {
            pgid: Mutex::new(pgid),
            stopped: AtomicBool::new(false),
        }
    }

    fn stop(&self) {
        let mut pgid = lock(&self.pgid);
        self.stopped.store(true, Ordering::SeqCst);
        if let Some(pgid) = pgid.take() {
            let _gone = killpg(pgid, Signal::SIGKILL);
        }
    }

    fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// The thread is done with the process: a stop no longer kills it. Whether the job was
    /// not stopped (if it was, the process must not be used again).
    fn release(&self) -> bool {
        lock(&self.pgid).take();
        !self.is_stopped()
    }
}

/// Stops the job (see [`Stop`]) when dropped, unless disarmed: the task waiting for a job's
/// thread was dropped, so the job was cancelled.
struct StopOnDrop(Option<Arc<Stop>>);

impl StopOnDrop {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if let Some(stop) = self.0.take() {
            stop.stop();
        }
    }
}

/// Writes all of `bytes` to a process's stdin.
fn write_all(pipe: &mut File, mut bytes: &[u8], waiter: &Waiter<'_>) -> Result<(), Wrote> {
    while !bytes.is_empty() {
        match pipe.write(bytes) {
            Ok(0) => return Err(Wrote::Failed(std::io::ErrorKind::WriteZero.into())),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                waiter
                    .wait(pipe, PollFlags::POLLOUT)
                    .map_err(Wrote::Halted)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Wrote::Failed(e)),
        }
    }
    Ok(())
}

/// Why a write to a process failed.
enum Wrote {
    Halted(Halt),
    Failed(std::io::Error),
}

/// Why a line could not be read from a process.
enum ReadError {
    /// Its stdout closed.
    Closed,
    /// The line is longer than [`MAX_LINE`].
    TooLong,
    Halted(Halt),
    Failed(std::io::Error),
}

/// A process's stdout, read a line at a time.
struct Lines {
    pipe: File,
    /// Bytes read: `buf[start..end]` are not taken yet.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// `buf[start..scanned]` holds no line end.
    scanned: usize,
}

/// What [`Lines`] reads at a time, and keeps between lines.
const READ_BUFFER: usize = 64 * 1024;

impl Lines {
    fn new(pipe: File) -> Self {
        Self {
            pipe,
            buf: vec![0; READ_BUFFER],
            start: 0,
            end: 0,
            scanned: 0,
        }
    }

    /// Reads the next line (without its end).
    fn read_line(&mut self, waiter: &Waiter<'_>) -> Result<&[u8], ReadError> {
        if self.start == self.end && self.buf.len() > READ_BUFFER {
            // A long line went by: let its room go.
            self.buf = vec![0; READ_BUFFER];
            (self.start, self.end, self.scanned) = (0, 0, 0);
        }
        loop {
            if let Some(at) = self.buf[self.scanned..self.end]
                .iter()
                .position(|b| *b == b'\n')
            {
                let (start, mut end) = (self.start, self.scanned + at);
                (self.start, self.scanned) = (end + 1, end + 1);
                if self.start == self.end {
                    (self.start, self.end, self.scanned) = (0, 0, 0);
                }
                if end > start && self.buf[end - 1] == b'\r' {
                    end -= 1;
                }
                return Ok(&self.buf[start..end]);
            }
            self.scanned = self.end;
            if self.end - self.start > MAX_LINE {
                return Err(ReadError::TooLong);
            }
            if self.end == self.buf.len() {
                if self.start > 0 {
                    self.buf.copy_within(self.start..self.end, 0);
                    (self.end, self.scanned) = (self.end - self.start, self.end - self.start);
                    self.start = 0;
                } else {
                    self.buf.resize(self.buf.len() * 2, 0);
                }
            }
            match self.pipe.read(&mut self.buf[self.end..]) {
                Ok(0) => return Err(ReadError::Closed),
                Ok(n) => self.end += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => waiter
                    .wait(&self.pipe, PollFlags::POLLIN)
                    .map_err(ReadError::Halted)?,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ReadError::Failed(e)),
            }
        }
    }
}

/// A pool of processes for one `[[broker.process_workers]]` table.
pub struct Pool {
    spec: ProcessWorker,
    label: String,
    /// One permit per process: a job holds one while it runs, and so does a replacement while
    /// it starts.
    slots: Arc<Semaphore>,
    idle: Mutex<Vec<Proc>>,
    /// Starts that failed in a row.
    failed_starts: AtomicU32,
    /// Why the pool's workers are withdrawn, while they are.
    withdrawn: Mutex<Option<String>>,
    /// Cancelled when the broker stops: no process is started after it.
    closed: CancellationToken,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("spec", &self.spec).finish()
    }
}

impl Pool {
    /// A pool for `spec`, with no process started yet ([`Pool::start`] starts them).
    pub fn new(spec: ProcessWorker) -> Self {
        let size = spec.processes.max(1);
        let label = spec.worker_names().join(", ");
        Self {
            spec,
            label,
            slots: Arc::new(Semaphore::new(size)),
            idle: Mutex::new(Vec::new()),
            failed_starts: AtomicU32::new(0),
            withdrawn: Mutex::new(None),
            closed: CancellationToken::new(),
        }
    }

    /// The workers the pool serves.
    pub fn names(&self) -> Vec<String> {
        self.spec.worker_names()
    }

    /// Why the pool's workers are withdrawn (its processes kept failing to start), while they
    /// are: the broker does not offer them then.
    pub fn withdrawn(&self) -> Option<String> {
        lock(&self.withdrawn).clone()
    }

    /// Starts every process of the pool and waits for their hellos; returns what they say
    /// each worker requires (empty when they do not say).
    ///
    /// # Errors
    /// What kept the first process that failed from starting or saying hello.
    pub async fn start(&self) -> Result<Announced, String> {
        let size = self.spec.processes.max(1);
        let mut starting = tokio::task::JoinSet::new();
        for _ in 0..size {
            let (spec, closed) = (self.spec.clone(), self.closed.clone());
            starting.spawn(async move { spawn(&spec, &closed).await });
        }
        let mut idle = Vec::with_capacity(size);
        let mut announced = Announced::new();
        while let Some(started) = starting.join_next().await {
            let (proc, said) =
                started.map_err(|e| format!("cannot start a worker process: {e}"))??;
            idle.push(proc);
            announced = said;
        }
        lock(&self.idle).extend(idle);
        Ok(announced)
    }

    /// Stops the pool: its idle processes are killed, and none is started any more (those
    /// running a job are killed when it ends).
    pub fn close(&self) {
        self.closed.cancel();
        lock(&self.idle).clear();
    }

    /// Runs one job on a process of the pool: on a thread of the blocking pool, retrieves its
    /// input from `store`, hands it to the process, waits for its answer (within `limit`) and
    /// saves its result — one hand-off to a thread and back per job, as for a Rust worker.
    /// Dropping the future (a cancel) kills the process and starts another; nothing is saved.
    ///
    /// # Errors
    /// The job's error: the store's, the worker's, or what happened to its process.
    pub async fn run(
        self: &Arc<Self>,
        info: JobInfo,
        store: Arc<dyn Store>,
        limit: Duration,
    ) -> Result<(), String> {
        let checkout = self.checkout(&info.worker).await?;
        let stop = checkout.stop.clone();
        let mut on_drop = StopOnDrop(Some(stop.clone()));
        let span = tracing::Span::current();
        let ended = tokio::task::spawn_blocking(move || {
            let _span = span.enter();
            checkout.run_job(&info, store.as_ref(), limit)
        })
        .await;
        on_drop.disarm();
        match ended {
            Err(e) => Err(format!("worker task failed: {e}")),
            Ok(Ended::Done(outcome)) => outcome,
            Ok(Ended::Closed(mut checkout, context)) => {
                let why = match checkout.proc.as_mut() {
                    Some(proc) => proc.exited().await,
                    None => String::new(),
                };
                checkout.replace(&why);
                Err(format!(
                    "process worker {:?} failed: {context}{why}; a new process takes its place",
                    self.spec.command
                ))
            }
        }
    }

    /// Waits for a slot of the pool and takes a process (starting one when none is idle).
    async fn checkout(self: &Arc<Self>, worker: &str) -> Result<Checkout, String> {
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| "the worker pool is closed".to_owned())?;
        if let Some(why) = self.withdrawn() {
            return Err(format!(
                "this broker withdrew worker {worker:?}: its processes keep failing to start \
                 ({why})"
            ));
        }
        let proc = lock(&self.idle).pop();
        let proc = match proc {
            Some(proc) => proc,
            None => match spawn(&self.spec, &self.closed).await {
                Ok((proc, _)) => {
                    self.started();
                    proc
                }
                Err(why) => {
                    self.start_failed(&why);
                    return Err(why);
                }
            },
        };
        Ok(Checkout {
            stop: Arc::new(Stop::new(proc.pgid)),
            proc: Some(proc),
            permit: Some(permit),
            pool: self.clone(),
        })
    }

    /// A process started: the count of failed starts begins again.
    fn started(&self) {
        self.failed_starts.store(0, Ordering::Relaxed);
    }

    /// A process failed to start. After [`WITHDRAW_AFTER`] in a row the pool's workers are
    /// withdrawn (said once), and a task tries again every `retry_secs` until one starts.
    fn start_failed(self: &Arc<Self>, why: &str) {
        let failed = self.failed_starts.fetch_add(1, Ordering::Relaxed) + 1;
        if failed < WITHDRAW_AFTER {
            warn!(pool = %self.label, error = %why, "a worker process failed to start");
            return;
        }
        {
            let mut withdrawn = lock(&self.withdrawn);
            if withdrawn.is_some() || self.closed.is_cancelled() {
                return;
            }
            *withdrawn = Some(why.to_owned());
        }
        let retry = self.retry_every();
        error!(
            workers = %self.label, error = %why,
            "worker processes failed to start {failed} times in a row; this broker stops \
             offering these workers, and tries to start one again every {retry:?}"
        );
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(self.clone().retry_withdrawn(retry));
        }
    }

    /// How often a withdrawn pool tries again.
    fn retry_every(&self) -> Duration {
        self.spec
            .retry_secs
            .filter(|t| t.is_finite() && *t > 0.0)
            .and_then(|t| Duration::try_from_secs_f64(t).ok())
            .unwrap_or(RETRY_WITHDRAWN)
    }

    /// Tries to start a process every `retry` until one says hello; then the pool's workers are
    /// offered again.
    async fn retry_withdrawn(self: Arc<Self>, retry: Duration) {
        loop {
            tokio::select! {
                () = self.closed.cancelled() => return,
                () = tokio::time::sleep(retry) => {}
            }
            match spawn(&self.spec, &self.closed).await {
                Ok((proc, _)) if !self.closed.is_cancelled() => {
                    lock(&self.idle).push(proc);
                    self.started();
                    lock(&self.withdrawn).take();
                    info!(workers = %self.label, "a worker process started again; offering these workers again");
                    return;
                }
                Ok(_) => return,
                Err(why) => {
                    debug!(workers = %self.label, error = %why, "a worker process still fails to start")
                }
            }
        }
    }

    /// Starts a process in place of one that was killed (holding its slot until then),
    /// trying again after a pause while the pool is not withdrawn.
    async fn restart(self: Arc<Self>, permit: OwnedSemaphorePermit) {
        let mut pause = RESTART_BACKOFF;
        while !self.closed.is_cancelled() && self.withdrawn().is_none() {
            match spawn(&self.spec, &self.closed).await {
                Ok((proc, _)) => {
                    if !self.closed.is_cancelled() {
                        lock(&self.idle).push(proc);
                    }
                    self.started();
                    break;
                }
                Err(why) => self.start_failed(&why),
            }
            tokio::select! {
                () = self.closed.cancelled() => break,
                () = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(self.retry_every());
        }
        drop(permit);
    }
}

/// What one job's exchange with its process came to.
enum Exchange {
    /// The process answered: the job's result or error; the process can take another job.
    Done(Result<JsonObject, String>),
    /// The process closed its stdout (it died, most likely); the text says what was being done.
    Closed(String),
    /// The wait for the process ended first.
    Halted(Halt),
    /// The process cannot go on: it printed something else than an answer.
    Broken(String),
}

/// How a job's thread ended.
enum Ended {
    /// The job's outcome; the process was given back, or replaced.
    Done(Result<(), String>),
    /// The process closed its stdout: the task finds out how it exited, then replaces it.
    Closed(Box<Checkout>, String),
}

/// A job's line to its process.
#[derive(Serialize)]
struct JobLine<'a> {
    #[serde(rename = "job id")]
    job_id: &'a str,
    worker: &'a str,
    input: &'a JsonObject,
}

/// A process taken from the pool for one job. Unless given back, it is killed when dropped and
/// a new one started in its place (holding the job's slot until it is ready).
struct Checkout {
    proc: Option<Proc>,
    permit: Option<OwnedSemaphorePermit>,
    pool: Arc<Pool>,
    /// Stops the job from outside its thread.
    stop: Arc<Stop>,
}

impl Checkout {
    /// Runs the job (on a thread that may block): retrieves its input, exchanges it with the
    /// process, saves the result.
    fn run_job(mut self, info: &JobInfo, store: &dyn Store, limit: Duration) -> Ended {
        let input = match retrieve_input(store, info) {
            Ok(input) => input,
            Err(e) => {
                self.finish();
                return Ended::Done(Err(e));
            }
        };
        let stop = self.stop.clone();
        let closed = self.pool.closed.clone();
        let waiter = Waiter {
            deadline: Instant::now() + limit,
            stop: &stop,
            closed: &closed,
        };
        let pool = self.pool.clone();
        let command = &pool.spec.command;
        match self.exchange(info.job_id.as_str(), &info.worker, &input, &waiter) {
            Exchange::Done(outcome) => {
                if !self.finish() {
                    return Ended::Done(Err("the job was cancelled; nothing was saved".into()));
                }
                Ended::Done(outcome.and_then(|result| save_result(store, info, &result)))
            }
            Exchange::Closed(_) | Exchange::Halted(Halt::Stopped) if stop.is_stopped() => {
                // Killed by the cancel; dropping the checkout replaces the process.
                Ended::Done(Err("the job was cancelled; its process was killed".into()))
            }
            Exchange::Closed(context) => Ended::Closed(Box::new(self), context),
            Exchange::Halted(Halt::TimedOut) => {
                let why = format!(
                    "process worker {command:?} timed out after {limit:?}; its process was killed"
                );
                self.replace("it overran the job's timeout");
                Ended::Done(Err(why))
            }
            Exchange::Halted(halt) => {
                let why = if halt == Halt::Closed {
                    "the broker stopped before the job ended; its process was killed"
                } else {
                    "the job was cancelled; its process was killed"
                };
                self.replace_quietly();
                Ended::Done(Err(why.into()))
            }
            Exchange::Broken(why) => {
                let error = format!(
                    "process worker {command:?} failed: {why}; a new process takes its place"
                );
                self.replace(&why);
                Ended::Done(Err(error))
            }
        }
    }

    /// Hands the job to the process and reads its answer.
    fn exchange(
        &mut self,
        job_id: &str,
        worker: &str,
        input: &JsonObject,
        waiter: &Waiter<'_>,
    ) -> Exchange {
        let Some(proc) = self.proc.as_mut() else {
            return Exchange::Broken("no process".into());
        };
        let line = JobLine {
            job_id,
            worker,
            input,
        };
        let mut bytes = match serde_json::to_vec(&line) {
            Ok(bytes) => bytes,
            Err(e) => return Exchange::Done(Err(format!("cannot encode the job: {e}"))),
        };
        bytes.push(b'\n');
        match write_all(&mut proc.stdin, &bytes, waiter) {
            Ok(()) => {}
            Err(Wrote::Halted(halt)) => return Exchange::Halted(halt),
            Err(Wrote::Failed(e)) => {
                return Exchange::Closed(format!("cannot write the job to it ({e}); "))
            }
        }
        let answer = match proc.stdout.read_line(waiter) {
            Ok(answer) => answer,
            Err(ReadError::Closed) => return Exchange::Closed(String::new()),
            Err(ReadError::Halted(halt)) => return Exchange::Halted(halt),
            Err(ReadError::TooLong) => {
                return Exchange::Broken(format!("it printed a line of more than {MAX_LINE} bytes"))
            }
            Err(ReadError::Failed(e)) => {
                return Exchange::Broken(format!("cannot read its stdout: {e}"))
            }
        };
        let mut answer: JsonObject = match serde_json::from_slice(answer) {
            Ok(answer) => answer,
            Err(_) => {
                return Exchange::Broken(format!(
                    "it printed {:?} instead of an answer (one JSON object per line); stderr: {}",
                    cut(&String::from_utf8_lossy(answer)),
                    proc.stderr_tail()
                ))
            }
        };
        if answer.get("job id").and_then(Value::as_str) != Some(job_id) {
            return Exchange::Broken(format!(
                "it answered for job {:?}, not {job_id:?}",
                answer.get("job id")
            ));
        }
        proc.jobs += 1;
        match (answer.remove("result"), answer.get("error")) {
            (Some(Value::Object(result)), None) => Exchange::Done(Ok(result)),
            (_, Some(error)) => {
                let error = error
                    .as_str()
                    .map_or_else(|| error.to_string(), str::to_owned);
                let traceback = answer
                    .get("traceback")
                    .and_then(Value::as_str)
                    .filter(|t| !t.trim().is_empty())
                    .map(|t| format!("\n{}", t.trim_end()))
                    .unwrap_or_default();
                Exchange::Done(Err(format!("{error}{traceback}")))
            }
            (Some(other), None) => Exchange::Done(Err(format!(
                "the worker returned {} instead of a JSON object",
                pypelinin_common::pipeline::json_type_name(&other)
            ))),
            (None, None) => Exchange::Broken(format!(
                "it answered {:?}, with neither \"result\" nor \"error\"",
                cut(&serde_json::to_string(&answer).unwrap_or_default())
            )),
        }
    }

    /// The job's thread is done with the process: gives it back, unless the job was stopped
    /// meanwhile (it is replaced then). Whether it was not stopped.
    fn finish(self) -> bool {
        if self.stop.release() {
            self.give_back();
            true
        } else {
            false
        }
    }

    /// Puts the process back for the next job, or replaces it once it ran its share.
    fn give_back(mut self) {
        let Some(proc) = self.proc.take() else {
            return;
        };
        if self
            .pool
            .spec
            .max_jobs_per_process
            .is_some_and(|max| proc.jobs >= max)
        {
            debug!(pool = %self.pool.label, jobs = proc.jobs, "process ran its share of jobs; replacing it");
            self.proc = Some(proc);
            self.replace_quietly();
            return;
        }
        if !self.pool.closed.is_cancelled() {
            lock(&self.pool.idle).push(proc);
        }
        self.permit.take();
    }

    /// Kills the process (saying why) and starts another in its place.
    fn replace(&mut self, why: &str) {
        warn!(pool = %self.pool.label, why, "killing a worker process and starting another");
        self.replace_quietly();
    }

    fn replace_quietly(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill();
        }
        let Some(permit) = self.permit.take() else {
            return;
        };
        // Outside a runtime (the broker is stopping) there is nothing to start it on.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(self.pool.clone().restart(permit));
        }
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if self.proc.is_some() {
            // Dropped mid-job (a cancel): the process may still be busy with it.
            self.replace("its job was cancelled");
        }
    }
}

/// Starts one process and waits for its hello; returns it with what it says its workers
/// require. The wait ends early when `closed` is cancelled.
async fn spawn(
    spec: &ProcessWorker,
    closed: &CancellationToken,
) -> Result<(Proc, Announced), String> {
    let program = spec
        .command
        .first()
        .ok_or_else(|| "the command is empty".to_owned())?;
    let mut command = tokio::process::Command::new(program);
    command
        .args(&spec.command[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(dir) = &spec.workdir {
        command.current_dir(dir);
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", spec.command))?;
    let pgid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw);
    let (Some(stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err("cannot take the process's pipes".into());
    };
    let tail = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL)));
    let stderr_reader = tokio::spawn(keep_tail(stderr, tail.clone()));
    let mut proc = Proc {
        child,
        stdin: pipe(stdin.into_owned_fd())?,
        stdout: Lines::new(pipe(stdout.into_owned_fd())?),
        stderr: tail,
        stderr_reader,
        pgid,
        jobs: 0,
    };
    let limit = spec
        .hello_timeout_secs
        .filter(|t| t.is_finite() && *t > 0.0)
        .and_then(|t| Duration::try_from_secs_f64(t).ok())
        .unwrap_or(HELLO_TIMEOUT);
    let stop = Arc::new(Stop::new(pgid));
    let mut on_drop = StopOnDrop(Some(stop.clone()));
    let closed = closed.clone();
    let read = tokio::task::spawn_blocking(move || {
        let waiter = Waiter {
            deadline: Instant::now() + limit,
            stop: &stop,
            closed: &closed,
        };
        let hello = proc.stdout.read_line(&waiter).map(<[u8]>::to_vec);
        stop.release();
        (proc, hello)
    })
    .await;
    on_drop.disarm();
    let (mut proc, hello) = read.map_err(|e| format!("cannot start a worker process: {e}"))?;
    let hello = match hello {
        Ok(line) => String::from_utf8_lossy(&line).into_owned(),
        Err(ReadError::Closed) => {
            let why = proc.exited().await;
            return Err(format!("{:?} said no hello: {why}", spec.command));
        }
        Err(ReadError::Halted(Halt::TimedOut)) => {
            return Err(format!(
                "{:?} said no hello within {limit:?}; stderr: {}",
                spec.command,
                proc.stderr_tail()
            ))
        }
        Err(ReadError::Halted(_)) => return Err("the broker is stopping".into()),
        Err(ReadError::TooLong) => {
            return Err(format!(
                "{:?} said no hello: it printed a line of more than {MAX_LINE} bytes",
                spec.command
            ))
        }
        Err(ReadError::Failed(e)) => {
            return Err(format!(
                "{:?} said no hello: cannot read its stdout: {e}",
                spec.command
            ))
        }
    };
    let announced = check_hello(spec, &hello)?;
    Ok((proc, announced))
}

/// What a process's hello says each worker requires (`"requires": {"Name": [...]}`, optional).
type Announced = std::collections::BTreeMap<String, Vec<String>>;

/// Checks a process's hello: the protocol, and that it serves the pool's workers. Returns what
/// it says they require.
fn check_hello(spec: &ProcessWorker, hello: &str) -> Result<Announced, String> {
    let bad = |why: String| {
        Err(format!(
            "{:?} said {:?} for a hello: {why} (expected {{\"hello\": \"{HELLO}\", \"protocol\": \
             {PROTOCOL}, \"workers\": [...]}})",
            spec.command,
            cut(hello)
        ))
    };
    let Ok(Value::Object(hello_map)) = serde_json::from_str::<Value>(hello) else {
        return bad("not a JSON object".into());
    };
    if hello_map.get("hello").and_then(Value::as_str) != Some(HELLO) {
        return bad(format!("no \"hello\": \"{HELLO}\""));
    }
    if hello_map.get("protocol").and_then(Value::as_u64) != Some(PROTOCOL) {
        return bad(format!("this broker speaks protocol {PROTOCOL}"));
    }
    let served: Vec<&str> = hello_map
        .get("workers")
        .and_then(Value::as_array)
        .map(|w| w.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let missing: Vec<String> = spec
        .worker_names()
        .into_iter()
        .filter(|n| !served.contains(&n.as_str()))
        .collect();
    if !missing.is_empty() {
        return bad(format!("it does not serve {missing:?}"));
    }
    let announced = hello_map
        .get("requires")
        .and_then(Value::as_object)
        .map(|r| {
            r.iter()
                .map(|(name, fields)| {
                    let fields = fields
                        .as_array()
                        .map(|f| {
                            f.iter()
                                .filter_map(Value::as_str)
                                .map(str::to_owned)
                                .collect()
                        })
                        .unwrap_or_default();
                    (name.clone(), fields)
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(announced)
}

/// Keeps the last [`STDERR_TAIL`] bytes of `stderr`.
async fn keep_tail(mut stderr: tokio::process::ChildStderr, tail: Arc<Mutex<VecDeque<u8>>>) {
    let mut buf = [0u8; 4096];
    loop {
        match stderr.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let mut tail = lock(&tail);
                tail.extend(&buf[..n]);
                let extra = tail.len().saturating_sub(STDERR_TAIL);
                tail.drain(..extra);
            }
        }
    }
}

/// `text`, cut to 200 characters for an error message.
fn cut(text: &str) -> String {
    match text.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text.to_owned(),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(command: &[&str], workdir: Option<&str>) -> ProcessWorker {
        ProcessWorker {
            name: Some("W".into()),
            names: vec![],
            requires: vec![],
            command: command.iter().map(|s| (*s).to_owned()).collect(),
            processes: 1,
            max_jobs_per_process: None,
            timeout_secs: None,
            workdir: workdir.map(PathBuf::from),
            hello_timeout_secs: None,
            retry_secs: None,
        }
    }

    /// A pipe whose read end is made as a process's stdout is.
    fn lines() -> (Lines, File) {
        let (read, write) = std::io::pipe().unwrap();
        let read = pipe(Ok(OwnedFd::from(read))).unwrap();
        (Lines::new(read), File::from(OwnedFd::from(write)))
    }

    fn waiter<'a>(ms: u64, stop: &'a Stop, closed: &'a CancellationToken) -> Waiter<'a> {
        Waiter {
            deadline: Instant::now() + Duration::from_millis(ms),
            stop,
            closed,
        }
    }

    #[test]
    fn lines_come_whole_however_the_bytes_arrive_and_the_reader_waits_no_longer_than_told() {
        let (stop, closed) = (Stop::new(None), CancellationToken::new());
        let (mut reader, mut writer) = lines();
        writer.write_all(b"one\ntwo\r\n\nthr").unwrap();
        let w = waiter(5_000, &stop, &closed);
        assert_eq!(reader.read_line(&w).ok(), Some(&b"one"[..]));
        assert_eq!(reader.read_line(&w).ok(), Some(&b"two"[..]));
        assert_eq!(reader.read_line(&w).ok(), Some(&b""[..]));
        // Half a line: the wait ends at the deadline, and the half is kept.
        let short = waiter(30, &stop, &closed);
        assert!(matches!(
            reader.read_line(&short),
            Err(ReadError::Halted(Halt::TimedOut))
        ));
        writer.write_all(b"ee\n").unwrap();
        assert_eq!(reader.read_line(&w).ok(), Some(&b"three"[..]));

        // A line longer than the buffer (and than the pipe holds) grows it; the next line
        // finds it small again.
        let long = vec![b'x'; 5 * READ_BUFFER];
        let sent = long.clone();
        let feeder = std::thread::spawn(move || {
            writer.write_all(&sent).unwrap();
            writer.write_all(b"\nlast\n").unwrap();
            writer
        });
        assert_eq!(reader.read_line(&w).ok(), Some(&long[..]));
        assert!(reader.buf.len() > READ_BUFFER);
        assert_eq!(reader.read_line(&w).ok(), Some(&b"last"[..]));
        let writer = feeder.join().unwrap();
        // The next read lets the long line's room go; a stop ends the wait at once.
        stop.stop();
        assert!(matches!(
            reader.read_line(&w),
            Err(ReadError::Halted(Halt::Stopped))
        ));
        assert_eq!(reader.buf.len(), READ_BUFFER);
        // The writer gone, the reader says so.
        drop(writer);
        let (stop, closed) = (Stop::new(None), CancellationToken::new());
        assert!(matches!(
            reader.read_line(&waiter(5_000, &stop, &closed)),
            Err(ReadError::Closed)
        ));
        closed.cancel();
        assert!(matches!(
            lines().0.read_line(&waiter(5_000, &stop, &closed)),
            Err(ReadError::Halted(Halt::Closed))
        ));
    }

    #[test]
    fn paths_of_a_settings_file_are_its_folders() {
        let folder = Path::new("/etc/cluster");
        let s = spec(&["python3", "workers/w.py"], None).resolved_against(folder);
        assert_eq!(
            s.command,
            ["python3", "workers/w.py"],
            "run from the folder"
        );
        assert_eq!(s.workdir.as_deref(), Some(folder));
        let s = spec(&["bin/w", "x"], Some("run")).resolved_against(folder);
        assert_eq!(s.command[0], "/etc/cluster/bin/w");
        assert_eq!(s.workdir.as_deref(), Some(Path::new("/etc/cluster/run")));
        let s = spec(&["/usr/bin/w"], Some("/tmp")).resolved_against(folder);
        assert_eq!(s.command[0], "/usr/bin/w");
        assert_eq!(s.workdir.as_deref(), Some(Path::new("/tmp")));
    }

    #[test]
    fn a_hello_must_name_the_protocol_and_every_worker() {
        let s = ProcessWorker {
            names: vec!["V".into()],
            ..spec(&["w"], None)
        };
        assert!(check_hello(
            &s,
            r#"{"hello": "pypelinin worker", "protocol": 1, "workers": ["V", "W"]}"#
        )
        .is_ok_and(|r| r.is_empty()));
        let said = check_hello(
            &s,
            r#"{"hello": "pypelinin worker", "protocol": 1, "workers": ["V", "W"], "requires": {"V": ["text"]}}"#,
        )
        .unwrap();
        assert_eq!(said["V"], ["text"]);
        for (hello, says) in [
            ("hi", "not a JSON object"),
            (
                r#"{"hello": "x", "protocol": 1, "workers": ["V", "W"]}"#,
                "no \"hello\"",
            ),
            (
                r#"{"hello": "pypelinin worker", "protocol": 2, "workers": ["V", "W"]}"#,
                "protocol 1",
            ),
            (
                r#"{"hello": "pypelinin worker", "protocol": 1, "workers": ["W"]}"#,
                "[\"V\"]",
            ),
        ] {
            let e = check_hello(&s, hello).unwrap_err();
            assert!(e.contains(says), "{hello}: {e}");
        }
    }
}
