//! The router's durable record: every pending job and pipeline, and the outcomes of ended
//! pipelines, in a fjall database (a log-structured key-value store). The state task writes the
//! records a batch of requests changed as one write batch (group commit) and sends the batch's
//! replies only after it is on disk; at start the router restores its state from it.
//!
//! A commit appends the batch to fjall's journal and `fdatasync`s it: one sequential write per
//! group, where a B-tree (redb, before) rewrote every page a row touched. fjall moves the rows
//! to sorted files in the background and drops deleted ones there.
//!
//! A job or pipeline is stored as two rows under the same key: its **body** — what the client
//! sent (a job's data and other keys; a pipeline's DAG and other keys), written once when the
//! record is first stored and deleted with it — and its **state** row (where it stands, its
//! lease, attempts, error: a few hundred bytes), rewritten at each change. So a change costs the
//! same bytes whatever the payload, and a pipeline's row does not grow with its jobs: its job
//! list is not stored (each job's row names its pipeline; the list is rebuilt at start).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use pypelinin_common::ids::{JobId, PipelineId};

use crate::state::{Changes, EndedRecord, JobRecord, PipelineRecord, State};

// Rows are keyed by sequence number (big-endian, so keys sort in number order), not by id: new
// rows land at the end of each keyspace and old ones leave from its start (queues are FIFO),
// which keeps fjall's background compactions small. The value holds the id.
const JOBS: &str = "jobs.by-seq";
const PIPELINES: &str = "pipelines.by-seq";
const JOB_BODIES: &str = "job-bodies.by-seq";
const PIPELINE_BODIES: &str = "pipeline-bodies.by-seq";
const ENDED: &str = "ended.by-seq";

/// The folder of the database inside the data dir.
const DATABASE: &str = "router-db";

/// The keyspace of the record's own bookkeeping: the number of commits (key [`COMMITS`]).
const META: &str = "meta";

/// The key of the number of commits written, in [`META`].
const COMMITS: &[u8] = b"commits";

/// The file beside the database that holds a number of commits known to be on disk, kept
/// apart from fjall's journal: a record that restores fewer commits than it says lost
/// acknowledged writes.
const MARK: &str = "acknowledged";

/// How often the mark is brought up to date (plus at every clean stop). Writes acknowledged
/// within the last period before a loss are not covered by the check.
const MARK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The file an earlier version of the router kept its record in (redb).
const EARLIER_RECORD: &str = "router.redb";

/// Rows held in memory per keyspace before fjall writes them to a sorted file (its default,
/// 64 MiB, would hold up to 192 MiB for the three keyspaces).
const MEMTABLE_BYTES: u64 = 4 * 1024 * 1024;

/// Journal kept on disk at most before fjall flushes what it holds in memory, so older journal
/// files can go.
const JOURNAL_BYTES: u64 = 64 * 1024 * 1024;

/// A failure of the durable record.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The database cannot be opened (in use by another router, corrupt, no permission).
    #[error("cannot open the router's data at {path}: {message}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// A read or write failed.
    #[error("the router's durable record failed: {0}")]
    Io(String),
    /// A record cannot be decoded.
    #[error("a record of the router's data is corrupt: {0}")]
    Corrupt(String),
    /// The record holds fewer commits than were acknowledged: writes were lost (a journal
    /// cut, zeroed or deleted by a disk or file system fault).
    #[error(
        "the router's durable record at {path} lost acknowledged writes: it holds {found} \
         commits, but {acknowledged} were acknowledged (the last {} commits' jobs and pipelines \
         are missing, or all of them if the record was deleted). Restore the data dir from a \
         backup, or start the router with --accept-loss to go on with what is left",
        acknowledged - found
    )]
    Lost {
        /// The data dir.
        path: PathBuf,
        /// Commits the mark says were on disk.
        acknowledged: u64,
        /// Commits the record holds.
        found: u64,
    },
}

fn io<E: std::fmt::Display>(e: E) -> PersistError {
    PersistError::Io(e.to_string())
}

/// Records read back at start.
pub struct Loaded {
    /// Pending jobs (and ended jobs of pending pipelines).
    pub jobs: Vec<(JobId, JobRecord)>,
    /// Pending pipelines.
    pub pipelines: Vec<(PipelineId, PipelineRecord)>,
    /// Outcomes of ended pipelines.
    pub ended: Vec<(PipelineId, EndedRecord)>,
    /// Where each record is stored, for the writes that follow.
    pub index: Index,
}

/// The format of the rows this router writes. A router reads rows of this version and of
/// every earlier one (a later change of format adds a version and a conversion), and refuses a
/// record written by a newer router rather than misread it.
///
/// Version 2 keeps a job's or pipeline's body in a row of its own (version 1 rows carry it in
/// the state row, and a pipeline's row its job list: both are still read, and such a record's
/// body gets its own row at its next change).
pub const SCHEMA_VERSION: u32 = 2;

/// A stored row: the record, its id and the version of its format.
#[derive(serde::Serialize, serde::Deserialize)]
struct Row<I, T> {
    /// The format's version; rows written before versions existed are version 1.
    #[serde(rename = "v", default = "first_version")]
    version: u32,
    id: I,
    record: T,
}

fn first_version() -> u32 {
    1
}

/// Only the version of a row, to say why a row cannot be read.
#[derive(serde::Deserialize)]
struct RowVersion {
    #[serde(rename = "v", default = "first_version")]
    version: u32,
}

/// The key of every stored record, so a change rewrites or deletes the right row. Owned by
/// the state task.
#[derive(Debug, Default)]
pub struct Index {
    jobs: HashMap<JobId, Stored>,
    pipelines: HashMap<PipelineId, Stored>,
    ended: std::collections::BTreeMap<PipelineId, u64>,
    next_ended: u64,
}

/// Where a job or pipeline is stored: its key, and whether its body has a row (not yet for a
/// record read from a version 1 row).
#[derive(Debug, Clone, Copy)]
struct Stored {
    key: u64,
    body: bool,
}

/// How to open the durable record.
#[derive(Debug, Clone, Copy)]
pub struct OpenOptions {
    /// fjall's block cache.
    pub cache_bytes: usize,
    /// Go on with what is left when the record lost acknowledged writes.
    pub accept_loss: bool,
    /// Refuse to start when the data dir's disk has less free.
    pub min_free_bytes: u64,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            cache_bytes: 8 * 1024 * 1024,
            accept_loss: false,
            min_free_bytes: 0,
        }
    }
}

/// Bytes free for the router on the file system of `dir` (`None` where it cannot be told).
fn free_bytes(dir: &Path) -> Option<u64> {
    #[cfg(unix)]
    {
        let stats = nix::sys::statvfs::statvfs(dir).ok()?;
        // Their types differ between platforms (u64 here, u32 elsewhere).
        #[allow(clippy::useless_conversion)]
        Some(u64::from(stats.blocks_available()).saturating_mul(u64::from(stats.fragment_size())))
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        None
    }
}

/// The durable record.
pub struct Durable {
    db: Database,
    jobs: Keyspace,
    pipelines: Keyspace,
    job_bodies: Keyspace,
    pipeline_bodies: Keyspace,
    ended: Keyspace,
    meta: Keyspace,
    /// The data dir (where the mark is).
    dir: PathBuf,
    /// Commits written so far.
    commits: std::sync::atomic::AtomicU64,
    /// When the mark was last written.
    marked: std::sync::Mutex<std::time::Instant>,
}

impl Durable {
    /// Opens (or creates) the database in `dir`, with a block cache of `cache_bytes`, and reads
    /// every record.
    ///
    /// # Errors
    /// [`PersistError::Open`] when the database cannot be opened — for instance another router
    /// uses it, or `dir` holds the record of an earlier version — and
    /// [`PersistError::Corrupt`] for a record that cannot be read, [`PersistError::Lost`] when
    /// it holds fewer commits than the mark beside it says were acknowledged (unless
    /// `accept_loss`: then it goes on with what is left, says so, and marks it).
    pub fn open(dir: &Path, options: &OpenOptions) -> Result<(Self, Loaded), PersistError> {
        let OpenOptions {
            cache_bytes,
            accept_loss,
            min_free_bytes,
        } = *options;
        let path = dir.join(DATABASE);
        let open_err = |message: String| PersistError::Open {
            path: path.clone(),
            message,
        };
        if dir.join(EARLIER_RECORD).exists() {
            return Err(PersistError::Open {
                path: dir.join(EARLIER_RECORD),
                message: "this data dir holds the record of an earlier pypelinin router (redb); \
                          let that router finish its pipelines, or move the file away, then start \
                          this one"
                    .to_owned(),
            });
        }
        std::fs::create_dir_all(dir).map_err(|e| open_err(e.to_string()))?;
        if let Some(free) = free_bytes(dir).filter(|free| *free < min_free_bytes) {
            return Err(open_err(format!(
                "its disk has {} MiB free, less than the {} MiB the router keeps free \
                 (min_free_disk_mb): free some space, or move the data dir",
                free / (1024 * 1024),
                min_free_bytes / (1024 * 1024)
            )));
        }
        let db = Database::builder(&path)
            .cache_size(cache_bytes as u64)
            .worker_threads(1)
            .max_journaling_size(JOURNAL_BYTES)
            .open()
            .map_err(|e| match e {
                fjall::Error::Locked => {
                    open_err("in use by another router (the database is locked)".to_owned())
                }
                e => open_err(e.to_string()),
            })?;
        let keyspace = |name: &str| {
            db.keyspace(name, || {
                KeyspaceCreateOptions::default().max_memtable_size(MEMTABLE_BYTES)
            })
            .map_err(|e| open_err(e.to_string()))
        };
        let (jobs, pipelines, ended) = (keyspace(JOBS)?, keyspace(PIPELINES)?, keyspace(ENDED)?);
        let (job_bodies, pipeline_bodies) = (keyspace(JOB_BODIES)?, keyspace(PIPELINE_BODIES)?);
        let meta = keyspace(META)?;
        let found = match meta.get(COMMITS).map_err(io)? {
            Some(v) => <[u8; 8]>::try_from(&*v)
                .map(u64::from_be_bytes)
                .map_err(|_| PersistError::Corrupt("the commit count".into()))?,
            None => 0,
        };
        let acknowledged = read_mark(dir)?;
        if acknowledged > found {
            let lost = PersistError::Lost {
                path: dir.to_owned(),
                acknowledged,
                found,
            };
            if !accept_loss {
                return Err(lost);
            }
            tracing::error!(error = %lost, "going on with what is left (--accept-loss)");
        }
        let mut index = Index::default();
        let mut loaded_jobs = Vec::new();
        for (key, version, id, mut record) in read_all::<JobId, JobRecord>(&jobs)? {
            let body = match job_bodies.get(key.to_be_bytes()).map_err(io)? {
                Some(body) => {
                    record.fields = serde_json::from_slice(&body)
                        .map_err(|e| PersistError::Corrupt(format!("the body of job {id}: {e}")))?;
                    true
                }
                // A version 1 row holds its body.
                None if version == 1 => false,
                None => return Err(PersistError::Corrupt(format!("job {id} has no body row"))),
            };
            index.jobs.insert(id.clone(), Stored { key, body });
            loaded_jobs.push((id, record));
        }
        let mut loaded_pipelines = Vec::new();
        for (key, version, id, mut record) in read_all::<PipelineId, PipelineRecord>(&pipelines)? {
            let body = match pipeline_bodies.get(key.to_be_bytes()).map_err(io)? {
                Some(body) => {
                    let body: PipelineBody = serde_json::from_slice(&body).map_err(|e| {
                        PersistError::Corrupt(format!("the body of pipeline {id}: {e}"))
                    })?;
                    record.pipeline = body.pipeline;
                    record.fields = body.fields;
                    true
                }
                None if version == 1 => false,
                None => {
                    return Err(PersistError::Corrupt(format!(
                        "pipeline {id} has no body row"
                    )))
                }
            };
            index.pipelines.insert(id.clone(), Stored { key, body });
            loaded_pipelines.push((id, record));
        }
        let mut loaded_ended = Vec::new();
        for (key, _, id, record) in read_all::<PipelineId, EndedRecord>(&ended)? {
            index.ended.insert(id.clone(), key);
            loaded_ended.push((id, record));
        }
        index.next_ended = index.ended.values().max().map_or(0, |k| k + 1);
        let loaded = Loaded {
            jobs: loaded_jobs,
            pipelines: loaded_pipelines,
            ended: loaded_ended,
            index,
        };
        let durable = Self {
            db,
            jobs,
            pipelines,
            job_bodies,
            pipeline_bodies,
            ended,
            meta,
            dir: dir.to_owned(),
            commits: std::sync::atomic::AtomicU64::new(found),
            marked: std::sync::Mutex::new(std::time::Instant::now()),
        };
        // A record that cannot be written is refused now, not at the first request.
        durable.check_writable()?;
        // Checked: from now on the mark counts from what is there.
        durable.write_mark()?;
        Ok((durable, loaded))
    }

    /// The writes that store the records `changes` names as they are in `state` (absent
    /// ones are deleted; a record added and removed since the last write costs nothing).
    /// Cheap: done on the state task, while [`Durable::write`] runs on a blocking thread.
    ///
    /// # Errors
    /// [`PersistError::Io`] when a record cannot be encoded.
    pub fn prepare(
        index: &mut Index,
        state: &State,
        changes: &Changes,
    ) -> Result<Writes, PersistError> {
        let mut writes = Writes::default();
        for id in &changes.jobs {
            let record = state.job(id);
            let body = |r: &JobRecord| encode(&r.fields);
            with_body(
                &mut index.jobs,
                id,
                record.map(|r| (r.seq, r)),
                body,
                (&mut writes.jobs, &mut writes.job_bodies),
            )?;
        }
        for id in &changes.pipelines {
            let record = state.pipeline(id);
            let body = |r: &PipelineRecord| {
                encode(&PipelineBodyRef {
                    pipeline: &r.pipeline,
                    fields: &r.fields,
                })
            };
            with_body(
                &mut index.pipelines,
                id,
                record.map(|r| (r.seq, r)),
                body,
                (&mut writes.pipelines, &mut writes.pipeline_bodies),
            )?;
        }
        for id in &changes.ended {
            let row = state.ended(id).map(|r| {
                let key = index.ended.get(id).copied().unwrap_or_else(|| {
                    index.next_ended += 1;
                    index.next_ended - 1
                });
                (key, r)
            });
            writes.ended.extend(keyed(&mut index.ended, id, row)?);
        }
        Ok(writes)
    }

    /// Applies `writes` in one transaction and returns once it is on disk.
    ///
    /// # Errors
    /// [`PersistError::Io`] when the write fails.
    pub fn write(&self, writes: &Writes) -> Result<(), PersistError> {
        self.write_all(std::slice::from_ref(writes))
    }

    /// Applies several batches of writes, in order, in one transaction and returns once it is
    /// on disk.
    ///
    /// # Errors
    /// [`PersistError::Io`] when the write fails.
    pub fn write_all(&self, batches: &[Writes]) -> Result<(), PersistError> {
        self.write_all_with(batches, true)
    }

    /// As [`Durable::write_all`]; without `sync`, returns once the journal holds the writes,
    /// before they are on disk: the next synced write (or a clean stop) puts them there, in
    /// order, and a crash before it may lose them. Only for writes whose loss a restart makes
    /// good: hand-outs and leases (the work is queued again), never an acknowledged change.
    /// An unsynced write is not counted in the commits the acknowledged mark checks.
    ///
    /// # Errors
    /// [`PersistError::Io`] when the write fails.
    pub fn write_all_with(&self, batches: &[Writes], sync: bool) -> Result<(), PersistError> {
        if batches.iter().all(Writes::is_empty) {
            return Ok(());
        }
        let rows = batches.iter().map(Writes::len).sum();
        let mut batch = fjall::OwnedWriteBatch::with_capacity(self.db.clone(), rows)
            .durability(sync.then_some(PersistMode::SyncData));
        for w in batches {
            for (keyspace, rows) in [
                (&self.jobs, &w.jobs),
                (&self.job_bodies, &w.job_bodies),
                (&self.pipelines, &w.pipelines),
                (&self.pipeline_bodies, &w.pipeline_bodies),
                (&self.ended, &w.ended),
            ] {
                for (key, value) in rows {
                    let key = key.to_be_bytes();
                    match value {
                        Some(v) => batch.insert(keyspace, key, v.as_slice()),
                        None => batch.remove(keyspace, key),
                    }
                }
            }
        }
        if !sync {
            return batch.commit().map_err(io);
        }
        let commits = self.commits.load(std::sync::atomic::Ordering::Relaxed) + 1;
        batch.insert(&self.meta, COMMITS, commits.to_be_bytes());
        batch.commit().map_err(io)?;
        self.commits
            .store(commits, std::sync::atomic::Ordering::Relaxed);
        let due = lock(&self.marked).elapsed() >= MARK_EVERY;
        if due {
            // The commit is on disk whatever happens to the mark: a mark that cannot be
            // written only narrows what the check at start covers.
            if let Err(e) = self.write_mark() {
                tracing::warn!(error = %e, "cannot update the acknowledged mark");
                *lock(&self.marked) = std::time::Instant::now();
            }
        }
        Ok(())
    }

    /// Writes the commit count again, synced, to see that the disk takes writes.
    fn check_writable(&self) -> Result<(), PersistError> {
        let mut batch = fjall::OwnedWriteBatch::with_capacity(self.db.clone(), 1)
            .durability(Some(PersistMode::SyncData));
        batch.insert(&self.meta, COMMITS, self.commits().to_be_bytes());
        batch.commit().map_err(|e| PersistError::Open {
            path: self.dir.join(DATABASE),
            message: format!("cannot write to it: {e}"),
        })
    }

    /// Commits written so far.
    pub fn commits(&self) -> u64 {
        self.commits.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Writes the number of commits on disk to the mark beside the database (a new file, synced,
    /// then renamed over the old one).
    ///
    /// # Errors
    /// [`PersistError::Io`] when the file cannot be written.
    pub fn write_mark(&self) -> Result<(), PersistError> {
        use std::io::Write;
        let commits = self.commits();
        let tmp = self.dir.join(format!("{MARK}.tmp"));
        let mut file = std::fs::File::create(&tmp).map_err(io)?;
        file.write_all(format!("{commits}\n").as_bytes())
            .map_err(io)?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&tmp, self.dir.join(MARK)).map_err(io)?;
        if let Ok(dir) = std::fs::File::open(&self.dir) {
            dir.sync_all().map_err(io)?;
        }
        *lock(&self.marked) = std::time::Instant::now();
        Ok(())
    }
}

impl Drop for Durable {
    /// A clean stop leaves an exact mark.
    fn drop(&mut self) {
        if let Err(e) = self.write_mark() {
            tracing::warn!(error = %e, "cannot write the acknowledged mark");
        }
    }
}

/// The number of commits the mark in `dir` says were on disk (0 without a mark: a new data
/// dir, or one of a router from before the mark).
fn read_mark(dir: &Path) -> Result<u64, PersistError> {
    match std::fs::read_to_string(dir.join(MARK)) {
        Ok(text) => text.trim().parse().map_err(|_| {
            PersistError::Corrupt(format!(
                "the mark {} is not a number",
                dir.join(MARK).display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(io(e)),
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The row to write for record `id` (`row`: its key and record, `None` when it is gone),
/// keeping `index` up to date; nothing for a record that was never stored and is gone.
fn keyed<I, T>(
    index: &mut std::collections::BTreeMap<I, u64>,
    id: &I,
    row: Option<(u64, &T)>,
) -> Result<Option<RowWrite>, PersistError>
where
    I: Clone + Ord + serde::Serialize,
    T: serde::Serialize,
{
    match row {
        Some((key, record)) => {
            index.insert(id.clone(), key);
            let value = encode(&Row {
                version: SCHEMA_VERSION,
                id,
                record,
            })?;
            Ok(Some((key, Some(value))))
        }
        None => Ok(index.remove(id).map(|key| (key, None))),
    }
}

/// The rows to write for job or pipeline `id` (`row`: its key and record, `None` when it is
/// gone): its state row, and its body row when the body has none yet (a new record, or one
/// read from a version 1 row); deleting both when it is gone. Keeps `index` up to date.
fn with_body<I, T>(
    index: &mut HashMap<I, Stored>,
    id: &I,
    row: Option<(u64, &T)>,
    body: impl Fn(&T) -> Result<Vec<u8>, PersistError>,
    (states, bodies): (&mut Vec<RowWrite>, &mut Vec<RowWrite>),
) -> Result<(), PersistError>
where
    I: Clone + Eq + std::hash::Hash + serde::Serialize,
    T: serde::Serialize,
{
    match row {
        Some((key, record)) => {
            let stored = index
                .entry(id.clone())
                .or_insert(Stored { key, body: false });
            if !stored.body {
                bodies.push((key, Some(body(record)?)));
                stored.body = true;
            }
            let value = encode(&Row {
                version: SCHEMA_VERSION,
                id,
                record,
            })?;
            states.push((key, Some(value)));
        }
        None => {
            if let Some(stored) = index.remove(id) {
                states.push((stored.key, None));
                if stored.body {
                    bodies.push((stored.key, None));
                }
            }
        }
    }
    Ok(())
}

/// A pipeline's body row: what `add pipeline` sent.
#[derive(serde::Deserialize)]
struct PipelineBody {
    pipeline: Box<serde_json::value::RawValue>,
    fields: pypelinin_common::protocol::RawFields,
}

/// [`PipelineBody`], to write.
#[derive(serde::Serialize)]
struct PipelineBodyRef<'a> {
    pipeline: &'a serde_json::value::RawValue,
    fields: &'a pypelinin_common::protocol::RawFields,
}

/// A row to write: its key and encoded value, or `None` to delete it.
type RowWrite = (u64, Option<Vec<u8>>);

/// Rows to write.
#[derive(Debug, Default)]
pub struct Writes {
    jobs: Vec<RowWrite>,
    job_bodies: Vec<RowWrite>,
    pipelines: Vec<RowWrite>,
    pipeline_bodies: Vec<RowWrite>,
    ended: Vec<RowWrite>,
}

impl Writes {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows to write or delete.
    pub fn len(&self) -> usize {
        self.jobs.len()
            + self.job_bodies.len()
            + self.pipelines.len()
            + self.pipeline_bodies.len()
            + self.ended.len()
    }

    /// Bytes of the rows to write (keys and values; a deletion counts its key).
    pub fn bytes(&self) -> usize {
        [
            &self.jobs,
            &self.job_bodies,
            &self.pipelines,
            &self.pipeline_bodies,
            &self.ended,
        ]
        .iter()
        .flat_map(|rows| rows.iter())
        .map(|(_, value)| 8 + value.as_ref().map_or(0, Vec::len))
        .sum()
    }
}

fn encode<T: serde::Serialize>(record: &T) -> Result<Vec<u8>, PersistError> {
    serde_json::to_vec(record).map_err(io)
}

/// Every row of `keyspace`: its key, format version, id and record.
fn read_all<K, T>(keyspace: &Keyspace) -> Result<Vec<(u64, u32, K, T)>, PersistError>
where
    K: serde::de::DeserializeOwned,
    T: serde::de::DeserializeOwned,
{
    let mut out = Vec::new();
    for entry in keyspace.iter() {
        let (key, value) = entry.into_inner().map_err(io)?;
        let key = <[u8; 8]>::try_from(&*key)
            .map(u64::from_be_bytes)
            .map_err(|_| PersistError::Corrupt(format!("a key of {} bytes", key.len())))?;
        let newer = |version: u32| {
            PersistError::Corrupt(format!(
                "row {key} has format version {version}, written by a newer router (this one reads up to {SCHEMA_VERSION}); run that router instead"
            ))
        };
        let row: Row<K, T> = serde_json::from_slice(&value).map_err(|e| {
            match serde_json::from_slice::<RowVersion>(&value) {
                Ok(RowVersion { version }) if version > SCHEMA_VERSION => newer(version),
                _ => PersistError::Corrupt(format!("row {key}: {e}")),
            }
        })?;
        if row.version > SCHEMA_VERSION {
            return Err(newer(row.version));
        }
        out.push((key, row.version, row.id, row.record));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Policy;
    use pypelinin_common::protocol::request::{GetJobs, JobFinished, NewJob, NewPipeline};
    use pypelinin_common::protocol::{JobState, PipelineState, Reply, Request, WireDuration};
    use serde_json::{json, Map, Value};

    const NOW: u64 = 1_000_000;
    const CACHE: usize = 1024 * 1024;

    fn options(accept_loss: bool) -> OpenOptions {
        OpenOptions {
            cache_bytes: CACHE,
            accept_loss,
            min_free_bytes: 0,
        }
    }

    /// A fresh data dir of this test.
    fn data_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("pypelinin-persist-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn open(dir: &Path) -> (Durable, Loaded) {
        Durable::open(dir, &options(false)).expect("open the durable record")
    }

    fn restore(loaded: Loaded) -> (State, Index) {
        let state = State::restore(
            Map::new(),
            Policy::default(),
            loaded.jobs,
            loaded.pipelines,
            loaded.ended,
        );
        (state, loaded.index)
    }

    /// Writes what changed in `state` since the last write.
    fn commit(durable: &Durable, index: &mut Index, state: &mut State) {
        let changes = state.take_changes();
        let writes = Durable::prepare(index, state, &changes).expect("prepare");
        durable.write(&writes).expect("write");
    }

    /// Applies `requests` and writes what they changed, as the router does for one batch.
    fn apply(durable: &Durable, index: &mut Index, state: &mut State, requests: Vec<Request>) {
        for request in requests {
            let reply = state.handle(request, NOW, &mut Vec::new());
            assert!(
                !matches!(&reply, Reply::Answer(a) if a.answer.is_error()),
                "{reply:?}"
            );
        }
        commit(durable, index, state);
    }

    fn add_job(n: usize, data_bytes: usize) -> Request {
        Request::AddJob(NewJob::new(
            "W",
            json!({"n": n, "pad": "x".repeat(data_bytes)}),
        ))
    }

    /// Takes up to `max` jobs, asking again while answers stop short for their size.
    fn take(state: &mut State, max: usize) -> Vec<JobId> {
        let mut taken = Vec::new();
        while taken.len() < max {
            let request = Request::GetJobs(GetJobs::new(None, max - taken.len()));
            match state.handle(request, NOW, &mut Vec::new()) {
                Reply::Jobs(jobs) if jobs.is_empty() => break,
                Reply::Jobs(jobs) => taken.extend(jobs.into_iter().map(|j| j.job_id)),
                other => panic!("{other:?}"),
            }
        }
        taken
    }

    /// Adds the pipeline serialized as `pipeline`; returns its id.
    fn add_pipeline(state: &mut State, pipeline: &Value) -> PipelineId {
        let added = state.handle(
            Request::AddPipeline(NewPipeline::new(pipeline)),
            NOW,
            &mut Vec::new(),
        );
        let Reply::Answer(a) = added else {
            panic!("{added:?}")
        };
        a.pipeline_id.expect("a pipeline id")
    }

    fn finished(id: JobId) -> Request {
        Request::JobFinished(JobFinished {
            job_id: id,
            duration: WireDuration::from_secs(0.1),
        })
    }

    #[test]
    fn what_was_written_is_read_back_after_reopening() {
        let dir = data_dir("reopen");
        let (durable, loaded) = open(&dir);
        let (mut state, mut index) = restore(loaded);
        apply(
            &durable,
            &mut index,
            &mut state,
            (0..3).map(|n| add_job(n, 10)).collect(),
        );
        // Take two jobs (leased), then finish the first: its record is dropped.
        let taken = take(&mut state, 2);
        commit(&durable, &mut index, &mut state);
        apply(
            &durable,
            &mut index,
            &mut state,
            vec![finished(taken[0].clone())],
        );
        drop(durable);

        let (durable, loaded) = open(&dir);
        let (mut state, _) = restore(loaded);
        assert_eq!(
            state.job_records(),
            2,
            "the finished job is gone, the others are back"
        );
        assert_eq!(
            state.queued_jobs(),
            1,
            "the job taken and not finished stays leased"
        );
        let again = take(&mut state, 10);
        assert_eq!(again.len(), 1, "only the job nobody took is handed out");
        assert!(!taken.contains(&again[0]));
        drop(durable);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_job_whose_data_is_its_pipelines_is_written_without_it_and_handed_out_with_it() {
        let dir = data_dir("shared");
        let (durable, loaded) = open(&dir);
        let (mut state, mut index) = restore(loaded);
        let data = json!({"n": 1, "pad": "é".repeat(5_000)});
        let pipeline = pypelinin_common::pipeline::Pipeline::builder()
            .edge("V", "W")
            .data(data.clone())
            .build()
            .expect("a pipeline");
        let id = add_pipeline(&mut state, &pipeline.to_legacy());
        commit(&durable, &mut index, &mut state);
        // As a pipeliner adds them: each job with the pipeline's data, and one with its own.
        let mut written = Vec::new();
        let own = json!({"pad": "y".repeat(5_000)});
        for job in [
            NewJob::new("V", pipeline.job_data(pipeline.find("V").expect("V"))),
            NewJob::new("W", own.clone()),
        ] {
            state.handle(
                Request::AddJob(job.in_pipeline(id.clone())),
                NOW,
                &mut Vec::new(),
            );
            let changes = state.take_changes();
            let writes = Durable::prepare(&mut index, &state, &changes).expect("prepare");
            written.push(writes.bytes());
            durable.write(&writes).expect("write");
        }
        assert!(
            written[0] < 1_000 && written[1] > 5_000,
            "bytes written for a job sharing its pipeline's data and one with its own: {written:?}"
        );
        drop(durable);

        let (_, loaded) = open(&dir);
        let (mut state, _) = restore(loaded);
        let handed = match state.handle(
            Request::GetJobs(GetJobs::new(None, 2)),
            NOW,
            &mut Vec::new(),
        ) {
            Reply::Jobs(jobs) => jobs,
            other => panic!("{other:?}"),
        };
        // On the wire, as a broker reads it.
        let wire: Value = serde_json::from_slice(&Reply::Jobs(handed).encode()).expect("JSON");
        let data_of: Vec<(&Value, &Value)> = wire["jobs"]
            .as_array()
            .expect("jobs")
            .iter()
            .map(|j| (&j["worker"], &j["data"]))
            .collect();
        assert_eq!(data_of, [(&json!("V"), &data), (&json!("W"), &own)]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_last_job_still_ends_its_pipeline_after_a_restart() {
        let dir = data_dir("ends");
        let (durable, loaded) = open(&dir);
        let (mut state, mut index) = restore(loaded);
        let pipeline = json!([
            ["graph", [[[["worker_name", "V"]], [["worker_name", "W"]]]]],
            ["data", null]
        ]);
        let pipeline_id = add_pipeline(&mut state, &pipeline);
        let taken = state.handle(Request::GetPipeline, NOW, &mut Vec::new());
        assert!(matches!(taken, Reply::Pipeline(Some(_))), "{taken:?}");
        let job = NewJob::new("W", json!(null))
            .in_pipeline(pipeline_id.clone())
            .ending_pipeline(std::time::Duration::from_millis(5));
        apply(&durable, &mut index, &mut state, vec![Request::AddJob(job)]);
        let taken = take(&mut state, 1);
        commit(&durable, &mut index, &mut state);
        drop(durable);

        let (durable, loaded) = open(&dir);
        let (mut state, mut index) = restore(loaded);
        apply(
            &durable,
            &mut index,
            &mut state,
            vec![finished(taken[0].clone())],
        );
        drop(durable);

        let (durable, loaded) = open(&dir);
        let ended = loaded
            .ended
            .iter()
            .find(|(id, _)| *id == pipeline_id)
            .map(|(_, e)| e.status.state);
        assert_eq!(
            ended,
            Some(PipelineState::Finished),
            "ended on disk with its last job"
        );
        assert!(loaded.pipelines.is_empty() && loaded.jobs.is_empty());
        drop(durable);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_unsynced_hand_out_reaches_the_disk_with_the_next_synced_write_uncounted() {
        let dir = data_dir("unsynced");
        let (durable, loaded) = open(&dir);
        let (mut state, mut index) = restore(loaded);
        apply(
            &durable,
            &mut index,
            &mut state,
            vec![add_job(1, 8), add_job(2, 8)],
        );
        let counted = durable.commits();
        // A hand-out alone: written, not synced, not counted (the mark checks only what an
        // answer acknowledged).
        let taken = take(&mut state, 1);
        let changes = state.take_changes();
        let writes = Durable::prepare(&mut index, &state, &changes).expect("prepare");
        assert!(!writes.is_empty());
        durable.write_all_with(&[writes], false).expect("write");
        assert_eq!(durable.commits(), counted);
        // The next acknowledged change syncs it, in order.
        apply(&durable, &mut index, &mut state, vec![add_job(3, 8)]);
        assert_eq!(durable.commits(), counted + 1);
        drop(durable);

        let (durable, loaded) = open(&dir);
        let (state, _) = restore(loaded);
        assert_eq!(state.job_records(), 3);
        assert_eq!(
            state.job(&taken[0]).map(|r| r.state),
            Some(pypelinin_common::protocol::JobState::Running),
            "the hand-out is on disk"
        );
        drop(durable);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn more_rows_than_memory_holds_survive_flushes_and_deletes() {
        // 3,000 jobs of 4 KB: three times what a keyspace holds in memory before fjall writes it
        // to a sorted file, so the reopened record is read from files and journal together.
        let dir = data_dir("flush");
        let (durable, loaded) = open(&dir);
        let (mut state, mut index) = restore(loaded);
        for chunk in (0..3_000).collect::<Vec<_>>().chunks(250) {
            apply(
                &durable,
                &mut index,
                &mut state,
                chunk.iter().map(|&n| add_job(n, 4_096)).collect(),
            );
        }
        let taken = take(&mut state, 2_000);
        commit(&durable, &mut index, &mut state);
        let done: Vec<Request> = taken.iter().step_by(2).cloned().map(finished).collect();
        apply(&durable, &mut index, &mut state, done);
        drop(durable);

        let (durable, loaded) = open(&dir);
        let seqs: Vec<u64> = loaded.jobs.iter().map(|(_, r)| r.seq).collect();
        assert_eq!(seqs.len(), 2_000, "3,000 added, 1,000 finished");
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "rows come back in sequence order"
        );
        let (mut state, _) = restore(loaded);
        assert_eq!(state.queued_jobs(), 1_000, "the jobs never taken");
        let next = take(&mut state, 1);
        let record = state.job(&next[0]).expect("the job handed out");
        assert_eq!(
            record.fields.value("data").unwrap()["n"],
            2_000,
            "the oldest job never taken comes first"
        );
        drop(durable);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Adds a running pipeline (its DAG `jobs` jobs in a chain, with `data_bytes` of data) and
    /// commits; returns its id.
    fn running_pipeline(
        durable: &Durable,
        index: &mut Index,
        state: &mut State,
        jobs: usize,
        data_bytes: usize,
    ) -> PipelineId {
        let graph: Vec<Value> = (1..jobs)
            .map(|i| {
                json!([
                    [["worker_name", format!("W{}", i - 1)]],
                    [["worker_name", format!("W{i}")]]
                ])
            })
            .collect();
        let pipeline = json!([["graph", graph], ["data", {"pad": "x".repeat(data_bytes)}]]);
        let id = add_pipeline(state, &pipeline);
        let taken = state.handle(Request::GetPipeline, NOW, &mut Vec::new());
        assert!(matches!(taken, Reply::Pipeline(Some(_))), "{taken:?}");
        commit(durable, index, state);
        id
    }

    /// The rows and bytes written by one commit of what `requests` changed.
    fn bytes_of(
        durable: &Durable,
        index: &mut Index,
        state: &mut State,
        requests: Vec<Request>,
    ) -> (usize, usize) {
        for request in requests {
            state.handle(request, NOW, &mut Vec::new());
        }
        let changes = state.take_changes();
        let writes = Durable::prepare(index, state, &changes).expect("prepare");
        durable.write(&writes).expect("write");
        (writes.len(), writes.bytes())
    }

    #[test]
    fn a_job_costs_the_same_bytes_whatever_its_pipelines_size_and_payload() {
        let dir = data_dir("bytes");
        let (durable, loaded) = open(&dir);
        let (mut state, mut index) = restore(loaded);
        let p = running_pipeline(&durable, &mut index, &mut state, 1000, 100_000);
        let job = |i: usize| {
            Request::AddJob(NewJob::new(format!("W{i}"), json!({"n": i})).in_pipeline(p.clone()))
        };
        // Adding the 1st and the 900th job of a 1,000-job pipeline with 100 KB of data writes
        // the job's rows only (not the pipeline's DAG, data or job list).
        let (rows, first) = bytes_of(&durable, &mut index, &mut state, vec![job(0)]);
        assert_eq!(
            rows, 2,
            "the job's state and body rows, nothing of its pipeline"
        );
        for i in 1..900 {
            bytes_of(&durable, &mut index, &mut state, vec![job(i)]);
        }
        let (rows, late) = bytes_of(&durable, &mut index, &mut state, vec![job(900)]);
        assert_eq!(rows, 2);
        assert!(first < 400, "adding a job wrote {first} bytes");
        assert!(
            late <= first + 8,
            "the 1st job wrote {first} bytes, the 901st {late}"
        );
        // A state change (hand-out, then the end) rewrites the small state row, not the body.
        let big = NewJob::new("Big", json!({"pad": "y".repeat(100_000)}));
        let (_, added) = bytes_of(&durable, &mut index, &mut state, vec![Request::AddJob(big)]);
        assert!(added > 100_000, "the body is written once: {added}");
        let taken = take(&mut state, 1000);
        let changes = state.take_changes();
        let writes = Durable::prepare(&mut index, &state, &changes).expect("prepare");
        durable.write(&writes).expect("write");
        assert!(
            writes.bytes() < 600 * taken.len(),
            "handing out {} jobs wrote {} bytes",
            taken.len(),
            writes.bytes()
        );
        drop(durable);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_restart_in_the_middle_of_a_1000_job_pipeline_loses_and_repeats_nothing() {
        let dir = data_dir("long");
        let (durable, loaded) = open(&dir);
        let (mut state, mut index) = restore(loaded);
        let p = running_pipeline(&durable, &mut index, &mut state, 1000, 10);
        // 500 jobs in a chain: each added, handed out, finished.
        let mut done = Vec::new();
        for i in 0..500 {
            let job = NewJob::new(format!("W{i}"), json!({"n": i, "é": "ünïcode ✓"}))
                .in_pipeline(p.clone());
            apply(&durable, &mut index, &mut state, vec![Request::AddJob(job)]);
            let taken = take(&mut state, 10);
            assert_eq!(taken.len(), 1);
            commit(&durable, &mut index, &mut state);
            apply(
                &durable,
                &mut index,
                &mut state,
                vec![finished(taken[0].clone())],
            );
            done.push(taken[0].clone());
        }
        // The 501st is running when the router stops.
        let job = NewJob::new("W500", json!({"n": 500})).in_pipeline(p.clone());
        apply(&durable, &mut index, &mut state, vec![Request::AddJob(job)]);
        let running = take(&mut state, 10);
        commit(&durable, &mut index, &mut state);
        let before = state.pipeline(&p).expect("pending").jobs.clone();
        drop(durable);

        let (durable, loaded) = open(&dir);
        let (mut restored, mut index) = restore(loaded);
        let record = restored.pipeline(&p).expect("the pipeline is back");
        assert_eq!(record.jobs, before, "its 501 jobs, in order");
        assert_eq!(record.jobs[..500], done[..]);
        // The finished jobs stay finished (none is handed out again), the running one is
        // still leased, and its data came back whole.
        assert!(
            take(&mut restored, 1000).is_empty(),
            "nothing is handed out twice"
        );
        let r = restored.job(&running[0]).expect("the running job");
        assert_eq!(r.state, JobState::Running);
        assert_eq!(r.fields.value("data"), Some(json!({"n": 500})));
        let first = restored
            .job(&done[0])
            .expect("a finished job of the pipeline");
        assert_eq!(first.state, JobState::Finished);
        assert_eq!(
            first.fields.value("data"),
            Some(json!({"n": 0, "é": "ünïcode ✓"}))
        );
        apply(
            &durable,
            &mut index,
            &mut restored,
            vec![finished(running[0].clone())],
        );
        assert_eq!(
            restored.job(&running[0]).map(|r| r.state),
            Some(JobState::Finished)
        );
        drop(durable);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn records_of_the_first_format_are_read_and_get_their_body_rows_at_their_next_change() {
        let dir = data_dir("v1");
        {
            let (durable, _) = open(&dir);
            // A pipeline and its job as a version 1 router wrote them: bodies inline, the job
            // list in the pipeline's row.
            let pipeline = json!({"v": 1, "id": "p1", "record": {
                "seq": 1, "pipeline": [["graph", []], ["data", {"x": 1}]], "fields": {"k": "v"},
                "state": "running", "jobs": ["j1"], "lease_until": NOW + 60_000
            }});
            let job = json!({"v": 1, "id": "j1", "record": {
                "seq": 2, "worker": "W", "fields": {"data": {"n": 7}}, "pipeline_id": "p1",
                "state": "queued", "attempts": 0, "lease_until": null, "not_before": null,
                "error": null
            }});
            durable
                .pipelines
                .insert(1u64.to_be_bytes(), serde_json::to_vec(&pipeline).unwrap())
                .unwrap();
            durable
                .jobs
                .insert(2u64.to_be_bytes(), serde_json::to_vec(&job).unwrap())
                .unwrap();
            durable.db.persist(fjall::PersistMode::SyncAll).unwrap();
        }
        let (durable, loaded) = open(&dir);
        let (mut state, mut index) = restore(loaded);
        let p = PipelineId::from("p1");
        assert_eq!(
            state
                .pipeline(&p)
                .expect("read")
                .fields
                .string("k")
                .as_deref(),
            Some("v")
        );
        assert_eq!(
            state.pipeline(&p).expect("read").jobs,
            vec![JobId::from("j1")]
        );
        // Its next change writes it in the new format, body included.
        let taken = take(&mut state, 1);
        assert_eq!(taken, vec![JobId::from("j1")]);
        commit(&durable, &mut index, &mut state);
        drop(durable);
        let (_, loaded) = open(&dir);
        let (state, _) = restore(loaded);
        let job = state.job(&JobId::from("j1")).expect("read again");
        assert_eq!(
            (job.state, job.fields.value("data").unwrap_or_default()),
            (JobState::Running, json!({"n": 7}))
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_second_router_on_the_same_data_dir_is_refused() {
        let dir = data_dir("locked");
        let (first, _) = open(&dir);
        let Err(e) = Durable::open(&dir, &options(false)) else {
            panic!("a second open of a data dir in use succeeded");
        };
        assert!(
            matches!(e, PersistError::Open { .. }) && e.to_string().contains("another router"),
            "{e}"
        );
        drop(first);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_data_dir_of_the_earlier_record_is_refused_and_left_alone() {
        let dir = data_dir("earlier");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("router.redb"), b"earlier").expect("write");
        let Err(e) = Durable::open(&dir, &options(false)) else {
            panic!("a data dir with router.redb was opened");
        };
        assert!(e.to_string().contains("earlier pypelinin router"), "{e}");
        assert_eq!(
            std::fs::read(dir.join("router.redb")).expect("read"),
            b"earlier"
        );
        assert!(!dir.join(DATABASE).exists(), "nothing created beside it");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rows_without_a_version_are_read_and_rows_of_a_newer_router_refused() {
        let dir = data_dir("versions");
        let record = json!({
            "status": {"state": "finished"}, "at": NOW, "request id": null
        });
        {
            let (durable, _) = open(&dir);
            // A row as routers wrote them before rows had versions.
            let unversioned = json!({"id": "p-old", "record": record});
            durable
                .ended
                .insert(
                    0u64.to_be_bytes(),
                    serde_json::to_vec(&unversioned).unwrap(),
                )
                .unwrap();
            durable.db.persist(fjall::PersistMode::SyncAll).unwrap();
        }
        let (_, loaded) = open(&dir);
        assert_eq!(loaded.ended.len(), 1, "the unversioned row is read");
        {
            let (durable, _) = open(&dir);
            let newer = json!({"v": SCHEMA_VERSION + 1, "id": "p-new", "record": {"shape": "new"}});
            durable
                .ended
                .insert(1u64.to_be_bytes(), serde_json::to_vec(&newer).unwrap())
                .unwrap();
            durable.db.persist(fjall::PersistMode::SyncAll).unwrap();
        }
        let Err(e) = Durable::open(&dir, &options(false)) else {
            panic!("a row of a newer format was read");
        };
        assert!(e.to_string().contains("newer router"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The largest journal file of the database in `dir`.
    fn journal(dir: &Path) -> PathBuf {
        let mut journals: Vec<_> = std::fs::read_dir(dir.join(DATABASE))
            .expect("read the database dir")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "jnl"))
            .collect();
        journals.sort_by_key(|p| std::fs::metadata(p).map_or(0, |m| m.len()));
        journals.pop().expect("a journal file")
    }

    #[test]
    fn a_record_that_lost_acknowledged_commits_is_refused_unless_the_loss_is_accepted() {
        let dir = data_dir("lost");
        {
            let (durable, loaded) = open(&dir);
            let (mut state, mut index) = restore(loaded);
            for n in 0..300 {
                apply(&durable, &mut index, &mut state, vec![add_job(n, 100)]);
            }
            assert_eq!(durable.commits(), 300);
        }
        // A disk fault zeroes the journal past the half of what it holds (fjall allocates the
        // file ahead: its end is zeros already).
        let journal = journal(&dir);
        let mut bytes = std::fs::read(&journal).expect("read the journal");
        let used = bytes.iter().rposition(|b| *b != 0).map_or(0, |p| p + 1);
        bytes[used / 2..].fill(0);
        std::fs::write(&journal, &bytes).expect("zero the journal");
        let Err(e) = Durable::open(&dir, &options(false)) else {
            panic!("a record that lost half its commits was opened");
        };
        assert!(
            matches!(e, PersistError::Lost { acknowledged: 300, found, .. } if found < 300),
            "{e}"
        );
        assert!(e.to_string().contains("--accept-loss"), "{e}");
        // Accepted: the router goes on with what is left, and the mark follows it.
        {
            let (durable, loaded) =
                Durable::open(&dir, &options(true)).expect("open accepting the loss");
            assert!(loaded.jobs.len() < 300, "{} jobs", loaded.jobs.len());
            assert!(durable.commits() < 300);
        }
        let (durable, _) = open(&dir);
        drop(durable);
        // A deleted database is a loss too.
        std::fs::remove_dir_all(dir.join(DATABASE)).expect("delete the database");
        let Err(e) = Durable::open(&dir, &options(false)) else {
            panic!("a data dir whose database was deleted was opened");
        };
        assert!(matches!(e, PersistError::Lost { found: 0, .. }), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
