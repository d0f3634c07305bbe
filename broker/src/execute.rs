//! Running one job: retrieve its input, run its worker, save its result.

use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::Stdio;
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use pypelinin_common::protocol::JobAssignment;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use crate::store::{retrieve_input, save_result, JobInfo, Store};
use crate::worker::{BoxError, CommandWorker, JsonObject, Registered, Runner, WorkerRegistry};

/// How much of a command's stderr a failure report keeps (its end).
const STDERR_TAIL: usize = 2048;

/// How a job ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The result was saved.
    Finished,
    /// The job failed; the text says why.
    Failed(String),
}

/// A job that ran, with how long it took.
#[derive(Debug, Clone)]
pub struct Ran {
    /// The job.
    pub job: JobAssignment,
    /// How it ended.
    pub outcome: Outcome,
    /// From the start of the job to its end.
    pub duration: Duration,
}

/// Runs `job`. The `permit` (a slot of the broker's concurrency) is released when the work
/// really ends — for a Rust worker that overran its timeout, only once its thread returns.
/// `cancel` tells a Rust worker to stop ([`crate::worker::cancelled`]); it is cancelled here
/// too when the job overruns its timeout. A Rust worker whose job is cancelled saves nothing.
pub async fn run_job(
    job: JobAssignment,
    registry: &WorkerRegistry,
    store: Arc<dyn Store>,
    default_timeout: Duration,
    permit: OwnedSemaphorePermit,
    cancel: CancellationToken,
) -> Ran {
    let started = Instant::now();
    let outcome = match registry.get(&job.worker) {
        None => Outcome::Failed(format!("this broker does not run worker {:?}", job.worker)),
        Some(registered) => {
            let info = JobInfo {
                job_id: job.job_id.clone(),
                worker: job.worker.clone(),
                worker_requires: registered.requires.clone(),
                data: job.data().clone(),
            };
            let limit = registered.timeout.unwrap_or(default_timeout);
            run_registered(registered, info, store, limit, permit, cancel).await
        }
    };
    Ran {
        job,
        outcome,
        duration: started.elapsed(),
    }
}

async fn run_registered(
    registered: &Registered,
    info: JobInfo,
    store: Arc<dyn Store>,
    limit: Duration,
    permit: OwnedSemaphorePermit,
    cancel: CancellationToken,
) -> Outcome {
    match &registered.runner {
        Runner::InProcess(worker) => {
            let worker = worker.clone();
            let token = cancel.clone();
            let (started, has_started) = tokio::sync::oneshot::channel::<()>();
            let mut work = tokio::task::spawn_blocking(move || {
                let _ = started.send(());
                let _permit = permit;
                let _job = crate::worker::enter_job(token.clone());
                let input = retrieve_input(store.as_ref(), &info)?;
                let result = call_catching_panics(|| worker.process(input))?;
                // A cancelled job's result is not wanted: its pipeline ended, or it overran.
                if token.is_cancelled() {
                    return Err("the job was cancelled; its result was not saved".into());
                }
                save_result(store.as_ref(), &info, &result)
            });
            // The clock starts when the worker's thread does: on a loaded machine a thread can
            // take a while to get, and waiting for one is not running. (`has_started` fails
            // only if the closure never ran, and then `work` has its error.)
            let _ = has_started.await;
            match tokio::time::timeout(limit, &mut work).await {
                Err(_) => {
                    // Tell the worker, which runs on: it may check and stop.
                    cancel.cancel();
                    Outcome::Failed(format!("timed out after {limit:?}"))
                }
                Ok(Err(join)) => Outcome::Failed(format!("worker task failed: {join}")),
                Ok(Ok(Err(e))) => Outcome::Failed(e),
                Ok(Ok(Ok(()))) => Outcome::Finished,
            }
        }
        Runner::Command(command) => {
            let _permit = permit;
            run_command_job(command.clone(), info, store, limit).await
        }
        Runner::Process(pool) => {
            let _permit = permit;
            match pool.run(info, store, limit).await {
                Ok(()) => Outcome::Finished,
                Err(e) => Outcome::Failed(e),
            }
        }
    }
}

/// Runs a command worker's job; failures carry the tail of its stderr.
async fn run_command_job(
    command: Arc<CommandWorker>,
    info: JobInfo,
    store: Arc<dyn Store>,
    limit: Duration,
) -> Outcome {
    through_store(store, info, |input| async move {
        match tokio::time::timeout(limit, run_command(&command, &input)).await {
            Err(_) => Err(format!(
                "command {:?} timed out after {limit:?}",
                command.command
            )),
            Ok(result) => result,
        }
    })
    .await
}

/// Retrieves the job's input from the store, runs `run` on it and saves its result (the
/// store's calls on the blocking pool).
async fn through_store<F, Fut>(store: Arc<dyn Store>, info: JobInfo, run: F) -> Outcome
where
    F: FnOnce(JsonObject) -> Fut,
    Fut: std::future::Future<Output = Result<JsonObject, String>>,
{
    let (retrieve_store, retrieve_info) = (store.clone(), info.clone());
    let input = match tokio::task::spawn_blocking(move || {
        retrieve_input(retrieve_store.as_ref(), &retrieve_info)
    })
    .await
    {
        Ok(Ok(input)) => input,
        Ok(Err(e)) => return Outcome::Failed(e),
        Err(e) => return Outcome::Failed(format!("store task failed: {e}")),
    };
    let result = match run(input).await {
        Ok(result) => result,
        Err(e) => return Outcome::Failed(e),
    };
    match tokio::task::spawn_blocking(move || save_result(store.as_ref(), &info, &result)).await {
        Ok(Ok(())) => Outcome::Finished,
        Ok(Err(e)) => Outcome::Failed(e),
        Err(e) => Outcome::Failed(format!("store task failed: {e}")),
    }
}

/// Kills the process group of a command worker when dropped before [`GroupGuard::ran`]: the
/// program and every process it started (`sh -c "a | b"` runs `a` and `b` as children of the
/// shell, which a kill of the shell alone would leave running).
struct GroupGuard {
    pgid: Option<nix::unistd::Pid>,
}

impl GroupGuard {
    /// The program ran to its end: nothing to kill.
    fn ran(&mut self) {
        self.pgid = None;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.pgid {
            // The leader is not reaped yet (its `Child` is dropped after this guard), so the
            // group id cannot have been reused.
            let _gone = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Runs the program with `input` as JSON on stdin and reads a JSON object from its stdout.
/// The program runs in a process group of its own; the group is killed if this future is
/// dropped (timeout, cancellation or shutdown).
pub(crate) async fn run_command(
    command: &CommandWorker,
    input: &JsonObject,
) -> Result<JsonObject, String> {
    let mut child = tokio::process::Command::new(&command.command[0])
        .args(&command.command[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start command {:?}: {e}", command.command))?;
    // Declared after `child`, so dropped before it: the group dies while its leader is unreaped.
    let mut group = GroupGuard {
        pgid: child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(nix::unistd::Pid::from_raw),
    };
    let body = serde_json::to_vec(input).map_err(|e| e.to_string())?;
    let mut stdin = child.stdin.take();
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    // Feed stdin and drain both pipes at once, so a chatty program cannot block on a full pipe.
    let write = async {
        if let Some(mut s) = stdin.take() {
            // A program that exits without reading its input is judged by its exit status.
            let _ignored = s.write_all(&body).await;
        }
    };
    let read = |pipe: Option<tokio::process::ChildStdout>| async move {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ignored = p.read_to_end(&mut buf).await;
        }
        buf
    };
    let read_err = async {
        let mut buf = Vec::new();
        if let Some(mut p) = stderr.take() {
            let _ignored = p.read_to_end(&mut buf).await;
        }
        buf
    };
    let ((), out, err) = tokio::join!(write, read(stdout.take()), read_err);
    let status = child
        .wait()
        .await
        .map_err(|e| format!("cannot wait for command {:?}: {e}", command.command))?;
    group.ran();
    let tail = stderr_tail(&err);
    if !status.success() {
        return Err(format!(
            "command {:?} failed ({status}); stderr: {tail}",
            command.command
        ));
    }
    match serde_json::from_slice::<Value>(&out) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(format!(
            "command {:?} printed {} instead of a JSON object; stderr: {tail}",
            command.command,
            pypelinin_common::pipeline::json_type_name(&other)
        )),
        Err(e) => Err(format!(
            "command {:?} did not print a JSON object ({e}); stderr: {tail}",
            command.command
        )),
    }
}

fn stderr_tail(err: &[u8]) -> String {
    let text = String::from_utf8_lossy(err);
    let text = text.trim();
    if text.is_empty() {
        return "(empty)".into();
    }
    match text.char_indices().rev().nth(STDERR_TAIL) {
        Some((i, _)) => format!("...{}", &text[i..]),
        None => text.to_owned(),
    }
}

thread_local! {
    /// Where the panic hook leaves the location of the last panic on this thread.
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Installs (once) a panic hook that records where a worker panicked, then runs the usual hook
/// (which prints the backtrace to the broker's log when `RUST_BACKTRACE` asks for it). The
/// job's error keeps the message and location only: resolving a backtrace can take longer
/// than a job's timeout.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Some(l) = info.location() {
                let at = format!("at {}:{}", l.file(), l.line());
                LAST_PANIC.with(|p| *p.borrow_mut() = Some(at));
            }
            previous(info);
        }));
    });
}

/// Runs `f`, turning a panic into an error that carries its message and location.
fn call_catching_panics(
    f: impl FnOnce() -> Result<JsonObject, BoxError>,
) -> Result<JsonObject, String> {
    install_panic_hook();
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(result)) => Ok(result),
        Ok(Err(e)) => Err(format!("worker failed: {e}")),
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".to_owned());
            let detail = LAST_PANIC
                .with(|p| p.borrow_mut().take())
                .unwrap_or_default();
            Err(format!("worker panicked: {message} {detail}")
                .trim_end()
                .to_owned())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::{cancelled, Worker, WorkerResult};
    use serde_json::json;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A store that counts saves.
    #[derive(Default)]
    struct Counting(AtomicUsize);

    impl Store for Counting {
        fn retrieve(&self, _: &JobInfo) -> Result<JsonObject, BoxError> {
            Ok(JsonObject::new())
        }
        fn save(&self, _: &JobInfo, _: &JsonObject) -> Result<(), BoxError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn save_monitoring(&self, _: &Value) -> Result<(), BoxError> {
            Ok(())
        }
    }

    /// Says it started, then works until told to stop (10 s at most).
    struct UntilCancelled(std::sync::Mutex<std::sync::mpsc::Sender<()>>);

    impl Worker for UntilCancelled {
        fn name(&self) -> &str {
            "UntilCancelled"
        }
        fn timeout(&self) -> Option<Duration> {
            Some(Duration::from_millis(300))
        }
        fn process(&self, _: JsonObject) -> WorkerResult<JsonObject> {
            let _ = self.0.lock().map(|s| s.send(()));
            let end = Instant::now() + Duration::from_secs(10);
            while !cancelled() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(1));
            }
            assert!(cancelled(), "the worker was never told to stop");
            Ok(JsonObject::new())
        }
    }

    fn job() -> JobAssignment {
        JobAssignment {
            job_id: "j".into(),
            worker: "UntilCancelled".into(),
            pipeline_id: None,
            fields: serde_json::Map::new(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rust_worker_is_told_of_a_cancel_and_of_a_timeout_and_saves_nothing() {
        let (started_tx, started) = std::sync::mpsc::channel();
        let mut registry = WorkerRegistry::new();
        registry
            .add(UntilCancelled(std::sync::Mutex::new(started_tx)))
            .unwrap();
        let registry = Arc::new(registry);
        let store = Arc::new(Counting::default());
        let slots = Arc::new(tokio::sync::Semaphore::new(1));

        // Cancelled while it runs: it sees `cancelled()`, and its result is not saved.
        let token = CancellationToken::new();
        let permit = slots.clone().acquire_owned().await.unwrap();
        let run = tokio::spawn({
            let (registry, store, token) = (registry.clone(), store.clone(), token.clone());
            async move {
                run_job(
                    job(),
                    &registry,
                    store,
                    Duration::from_secs(60),
                    permit,
                    token,
                )
                .await
            }
        });
        tokio::task::spawn_blocking(move || started.recv_timeout(Duration::from_secs(10)))
            .await
            .unwrap()
            .expect("the worker started");
        token.cancel();
        let ran = run.await.unwrap();
        assert!(
            matches!(&ran.outcome, Outcome::Failed(e) if e.contains("cancelled")),
            "{:?}",
            ran.outcome
        );
        assert_eq!(
            store.0.load(Ordering::SeqCst),
            0,
            "a cancelled job saved its result"
        );

        // Past its timeout (300 ms): failed, and its token cancelled so the thread ends and
        // frees its slot.
        let permit = slots.clone().acquire_owned().await.unwrap();
        let ran = run_job(
            job(),
            &registry,
            store.clone(),
            Duration::from_secs(60),
            permit,
            CancellationToken::new(),
        )
        .await;
        assert!(
            matches!(&ran.outcome, Outcome::Failed(e) if e.contains("timed out")),
            "{:?}",
            ran.outcome
        );
        let slot = tokio::time::timeout(Duration::from_secs(10), slots.acquire()).await;
        assert!(slot.is_ok(), "the timed-out worker's thread never ended");
        assert_eq!(store.0.load(Ordering::SeqCst), 0);
    }

    fn cmd(args: &[&str]) -> CommandWorker {
        CommandWorker {
            name: "C".into(),
            requires: vec![],
            command: args.iter().map(|s| s.to_string()).collect(),
            timeout_secs: None,
        }
    }

    #[tokio::test]
    async fn command_workers_read_stdin_and_print_json() {
        let c = cmd(&["sh", "-c", r#"read line; echo "{\"got\": $line}""#]);
        let out = run_command(&c, json!({"n": 3}).as_object().unwrap())
            .await
            .unwrap();
        assert_eq!(Value::Object(out), json!({"got": {"n": 3}}));
    }

    #[tokio::test]
    async fn command_failures_carry_the_stderr_tail() {
        let err = run_command(
            &cmd(&["sh", "-c", "echo boom >&2; exit 3"]),
            &JsonObject::new(),
        )
        .await
        .unwrap_err();
        assert!(
            err.contains("exit status: 3") && err.contains("boom"),
            "{err}"
        );
        let err = run_command(
            &cmd(&["sh", "-c", "echo not json; echo oops >&2"]),
            &JsonObject::new(),
        )
        .await
        .unwrap_err();
        assert!(
            err.contains("did not print a JSON object") && err.contains("oops"),
            "{err}"
        );
        let err = run_command(&cmd(&["sh", "-c", "echo '[1]'"]), &JsonObject::new())
            .await
            .unwrap_err();
        assert!(err.contains("a list instead of a JSON object"), "{err}");
        let err = run_command(&cmd(&["/nonexistent/program"]), &JsonObject::new())
            .await
            .unwrap_err();
        assert!(err.contains("cannot start command"), "{err}");
        let long = format!("printf '%0{}d' 0 >&2; exit 1", 10_000);
        let err = run_command(&cmd(&["sh", "-c", &long]), &JsonObject::new())
            .await
            .unwrap_err();
        assert!(err.len() < 3_000, "{}", err.len());
    }

    #[test]
    fn panics_become_errors_with_their_message() {
        let err = call_catching_panics(|| panic!("worker exploded")).unwrap_err();
        assert!(err.contains("worker panicked: worker exploded"), "{err}");
        assert!(err.contains("execute.rs"), "{err}");
        let err = call_catching_panics(|| Err("plain error".into())).unwrap_err();
        assert_eq!(err, "worker failed: plain error");
    }
}
