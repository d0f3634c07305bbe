//! Workers: the code that runs a job.
//!
//! A [`Worker`] takes the JSON object the store retrieved for it and returns a JSON object the
//! store saves. [`TypedWorker`] does the same with your own serde types. A
//! [`CommandWorker`] runs a program in any language: the input as JSON on stdin, the result as a
//! JSON object on stdout.
//!
//! A long Rust worker may check [`cancelled`] now and then, and return early once it is true:
//! its job's pipeline was cancelled, or the job overran its timeout, so its result would be
//! thrown away (a thread cannot be stopped from outside; a command worker's process is
//! killed instead).
//!
//! ```
//! use pypelinin_broker::worker::{JsonObject, Worker, WorkerResult};
//!
//! struct Upper;
//!
//! impl Worker for Upper {
//!     fn name(&self) -> &str { "Upper" }
//!     fn requires(&self) -> Vec<String> { vec!["text".into()] }
//!     fn process(&self, input: JsonObject) -> WorkerResult<JsonObject> {
//!         let text = input.get("text").and_then(|t| t.as_str()).ok_or("text must be a string")?;
//!         let mut out = JsonObject::new();
//!         out.insert("upper".into(), text.to_uppercase().into());
//!         Ok(out)
//!     }
//! }
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use std::cell::RefCell;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// A JSON object: what workers take and return.
pub type JsonObject = serde_json::Map<String, Value>;

/// Any error a worker or store returns; its text reaches the user.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The result of [`Worker::process`].
pub type WorkerResult<T> = Result<T, BoxError>;

/// A user worker: the Rust form of the legacy worker class.
///
/// `process` may block or burn CPU: the broker runs it on a thread of its blocking pool, never
/// on the async reactor. A returned error or a panic fails the job with its text.
pub trait Worker: Send + Sync + 'static {
    /// The name jobs use to ask for this worker.
    fn name(&self) -> &str;

    /// The fields this worker needs; the store uses them to fetch its input. Default: none.
    fn requires(&self) -> Vec<String> {
        Vec::new()
    }

    /// The longest a job may run before it is failed; `None` uses the broker's default.
    fn timeout(&self) -> Option<Duration> {
        None
    }

    /// Runs one job.
    ///
    /// # Errors
    /// Any error: the job is reported failed with its text.
    fn process(&self, input: JsonObject) -> WorkerResult<JsonObject>;
}

/// A worker with typed input and output, converted through serde.
///
/// ```
/// use pypelinin_broker::worker::{TypedWorker, WorkerResult};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Deserialize)]
/// struct Text { text: String }
/// #[derive(Serialize)]
/// struct Counted { length: usize }
///
/// struct Length;
/// impl TypedWorker for Length {
///     type Input = Text;
///     type Output = Counted;
///     const NAME: &'static str = "Length";
///     const REQUIRES: &'static [&'static str] = &["text"];
///     fn process(&self, input: Text) -> WorkerResult<Counted> {
///         Ok(Counted { length: input.text.chars().count() })
///     }
/// }
/// ```
pub trait TypedWorker: Send + Sync + 'static {
    /// What the worker takes (deserialized from the retrieved input).
    type Input: DeserializeOwned;
    /// What the worker returns (serialized to a JSON object).
    type Output: Serialize;
    /// The worker's name.
    const NAME: &'static str;
    /// The fields it needs.
    const REQUIRES: &'static [&'static str] = &[];

    /// Runs one job.
    ///
    /// # Errors
    /// Any error: the job is reported failed with its text.
    fn process(&self, input: Self::Input) -> WorkerResult<Self::Output>;
}

/// Adapts a [`TypedWorker`] to a [`Worker`].
pub struct Typed<T>(pub T);

impl<T: TypedWorker> Worker for Typed<T> {
    fn name(&self) -> &str {
        T::NAME
    }

    fn requires(&self) -> Vec<String> {
        T::REQUIRES.iter().map(|s| (*s).to_owned()).collect()
    }

    fn process(&self, input: JsonObject) -> WorkerResult<JsonObject> {
        let input: T::Input = serde_json::from_value(Value::Object(input)).map_err(|e| {
            format!(
                "input does not fit {}: {e}",
                std::any::type_name::<T::Input>()
            )
        })?;
        match serde_json::to_value(self.0.process(input)?)? {
            Value::Object(map) => Ok(map),
            other => Err(format!("{} must return a JSON object, not {other}", T::NAME).into()),
        }
    }
}

/// A worker that runs a program: input as JSON on stdin, result as a JSON object on stdout.
///
/// A non-zero exit, output that is not a JSON object, or a timeout fails the job with the
/// tail of the program's stderr.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CommandWorker {
    /// The worker's name.
    pub name: String,
    /// The fields it needs.
    #[serde(default)]
    pub requires: Vec<String>,
    /// The program and its arguments.
    pub command: Vec<String>,
    /// The longest a job may run, in seconds (default: the broker's job timeout).
    #[serde(default)]
    pub timeout_secs: Option<f64>,
}

/// How a registered worker runs.
#[derive(Clone)]
pub(crate) enum Runner {
    /// In this process, on the blocking pool.
    InProcess(Arc<dyn Worker>),
    /// As a child process.
    Command(Arc<CommandWorker>),
    /// By a process of a pool of long-lived processes.
    Process(Arc<crate::process::Pool>),
}

/// One registered worker.
#[derive(Clone)]
pub(crate) struct Registered {
    pub(crate) requires: Vec<String>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) runner: Runner,
}

/// The name a runner gives its worker.
fn worker_name(runner: &Runner) -> String {
    match runner {
        Runner::InProcess(w) => w.name().to_owned(),
        Runner::Command(c) => c.name.clone(),
        Runner::Process(p) => p.names().join(", "),
    }
}

/// The workers a broker runs, by name.
#[derive(Clone, Default)]
pub struct WorkerRegistry {
    workers: BTreeMap<String, Registered>,
}

/// Two workers with the same name, or an unusable command worker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The name is taken.
    #[error("a worker named {0:?} is registered already")]
    Duplicate(String),
    /// The worker is unusable.
    #[error("worker {name:?}: {reason}")]
    Invalid {
        /// The worker.
        name: String,
        /// Why.
        reason: String,
    },
}

impl WorkerRegistry {
    /// No workers.
    pub fn new() -> Self {
        Self::default()
    }

    fn insert(&mut self, name: String, entry: Registered) -> Result<(), RegistryError> {
        if name.is_empty() {
            return Err(RegistryError::Invalid {
                name,
                reason: "the name is empty".into(),
            });
        }
        if self.workers.contains_key(&name) {
            return Err(RegistryError::Duplicate(name));
        }
        self.workers.insert(name, entry);
        Ok(())
    }

    /// Adds a Rust worker.
    ///
    /// # Errors
    /// [`RegistryError::Duplicate`] when the name is taken.
    pub fn add(&mut self, worker: impl Worker) -> Result<&mut Self, RegistryError> {
        let entry = Registered {
            requires: worker.requires(),
            timeout: worker.timeout(),
            runner: Runner::InProcess(Arc::new(worker)),
        };
        let name = worker_name(&entry.runner);
        self.insert(name, entry)?;
        Ok(self)
    }

    /// Adds a typed Rust worker.
    ///
    /// # Errors
    /// [`RegistryError::Duplicate`] when the name is taken.
    pub fn add_typed(&mut self, worker: impl TypedWorker) -> Result<&mut Self, RegistryError> {
        self.add(Typed(worker))
    }

    /// Adds a command worker.
    ///
    /// # Errors
    /// [`RegistryError::Duplicate`] when the name is taken, [`RegistryError::Invalid`] when the
    /// command is empty or the timeout is not a positive number.
    pub fn add_command(&mut self, worker: CommandWorker) -> Result<&mut Self, RegistryError> {
        let invalid = |reason: &str| RegistryError::Invalid {
            name: worker.name.clone(),
            reason: reason.to_owned(),
        };
        if worker.command.is_empty() || worker.command[0].is_empty() {
            return Err(invalid("the command is empty"));
        }
        let timeout = match worker.timeout_secs {
            None => None,
            Some(t) if t.is_finite() && t > 0.0 => Some(Duration::from_secs_f64(t)),
            Some(_) => return Err(invalid("timeout_secs must be a positive number")),
        };
        let entry = Registered {
            requires: worker.requires.clone(),
            timeout,
            runner: Runner::Command(Arc::new(worker.clone())),
        };
        self.insert(worker.name, entry)?;
        Ok(self)
    }

    /// Adds the workers of a pool of process workers (started later, by the broker).
    ///
    /// # Errors
    /// [`RegistryError::Duplicate`] when a name is taken, [`RegistryError::Invalid`] when the
    /// table names no worker, has an empty command or no process, or a timeout that is not a
    /// positive number.
    pub fn add_process(
        &mut self,
        spec: crate::process::ProcessWorker,
    ) -> Result<Arc<crate::process::Pool>, RegistryError> {
        let names = spec.worker_names();
        let label = names.join(", ");
        let invalid = |reason: &str| RegistryError::Invalid {
            name: label.clone(),
            reason: reason.to_owned(),
        };
        if names.is_empty() {
            return Err(invalid("a process worker needs a name (or names)"));
        }
        if spec.command.first().is_none_or(String::is_empty) {
            return Err(invalid("the command is empty"));
        }
        if spec.processes == 0 {
            return Err(invalid("processes must be at least 1"));
        }
        if spec.max_jobs_per_process == Some(0) {
            return Err(invalid("max_jobs_per_process must be at least 1"));
        }
        let timeout = match spec.timeout_secs {
            None => None,
            Some(t) if t.is_finite() && t > 0.0 => Some(Duration::from_secs_f64(t)),
            Some(_) => return Err(invalid("timeout_secs must be a positive number")),
        };
        let requires = spec.requires.clone();
        let pool = Arc::new(crate::process::Pool::new(spec));
        for name in names {
            let entry = Registered {
                requires: requires.clone(),
                timeout,
                runner: Runner::Process(pool.clone()),
            };
            self.insert(name, entry)?;
        }
        Ok(pool)
    }

    /// The pools of the process workers registered, each once.
    pub fn pools(&self) -> Vec<Arc<crate::process::Pool>> {
        let mut pools: Vec<Arc<crate::process::Pool>> = Vec::new();
        for entry in self.workers.values() {
            if let Runner::Process(pool) = &entry.runner {
                if !pools.iter().any(|p| Arc::ptr_eq(p, pool)) {
                    pools.push(pool.clone());
                }
            }
        }
        pools
    }

    /// Sets what `worker` requires, when nothing set it (a process worker's table without
    /// `requires`, whose processes say it in their hello).
    pub(crate) fn fill_requires(&mut self, worker: &str, requires: Vec<String>) {
        if let Some(entry) = self.workers.get_mut(worker) {
            if entry.requires.is_empty() {
                entry.requires = requires;
            }
        }
    }

    /// Takes workers out (those of a pool whose processes cannot start).
    pub(crate) fn remove(&mut self, names: &[String]) {
        for name in names {
            self.workers.remove(name);
        }
    }

    /// The names of the registered workers, sorted.
    pub fn names(&self) -> Vec<String> {
        self.workers.keys().cloned().collect()
    }

    /// The names of the workers this broker offers now, sorted: all but those of a pool
    /// whose processes keep failing to start ([`crate::process::Pool::withdrawn`]).
    pub fn offered(&self) -> Vec<String> {
        self.workers
            .iter()
            .filter(|(_, entry)| match &entry.runner {
                Runner::Process(pool) => pool.withdrawn().is_none(),
                _ => true,
            })
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Whether no worker is registered.
    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// The fields `worker` requires, if it is registered.
    pub fn requires(&self, worker: &str) -> Option<&[String]> {
        self.workers.get(worker).map(|w| w.requires.as_slice())
    }

    pub(crate) fn get(&self, worker: &str) -> Option<&Registered> {
        self.workers.get(worker)
    }
}

thread_local! {
    /// The cancellation token of the job this thread runs, while it runs one.
    static CURRENT_JOB: RefCell<Option<CancellationToken>> = const { RefCell::new(None) };
}

/// Whether the job the calling worker runs should stop: its pipeline was cancelled, or it
/// overran its timeout. Its result is not saved either way, so a long worker may check this
/// now and then and return early (with any error). False outside a job.
///
/// ```
/// use pypelinin_broker::worker::{cancelled, JsonObject, Worker, WorkerResult};
///
/// struct Crunch;
///
/// impl Worker for Crunch {
///     fn name(&self) -> &str { "Crunch" }
///     fn process(&self, _input: JsonObject) -> WorkerResult<JsonObject> {
///         for _step in 0..1_000 {
///             if cancelled() {
///                 return Err("stopped: the job was cancelled".into());
///             }
///             // ... one step of the work ...
///         }
///         Ok(JsonObject::new())
///     }
/// }
/// assert!(!cancelled());
/// ```
pub fn cancelled() -> bool {
    CURRENT_JOB.with(|c| {
        c.borrow()
            .as_ref()
            .is_some_and(CancellationToken::is_cancelled)
    })
}

/// The cancellation token of the job the calling worker runs (`None` outside a job): for a
/// worker that hands its work to other threads or awaits it (`token.cancelled().await`).
pub fn cancellation_token() -> Option<CancellationToken> {
    CURRENT_JOB.with(|c| c.borrow().clone())
}

/// Makes `token` the current job's while the returned guard lives (on this thread).
pub(crate) fn enter_job(token: CancellationToken) -> JobGuard {
    CURRENT_JOB.with(|c| *c.borrow_mut() = Some(token));
    JobGuard
}

/// Clears the current job's token when dropped.
pub(crate) struct JobGuard;

impl Drop for JobGuard {
    fn drop(&mut self) {
        CURRENT_JOB.with(|c| *c.borrow_mut() = None);
    }
}
