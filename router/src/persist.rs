//! The router's durable record: every pending job and pipeline, and the outcomes of ended
//! pipelines, in a redb database. The state task writes the records a batch of requests
//! changed in one transaction (group commit) and sends the batch's replies only after it is
//! on disk; at start the router restores its state from it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use pypelinin_common::ids::{JobId, PipelineId};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::state::{Changes, EndedRecord, JobRecord, PipelineRecord, State};

// Rows are keyed by sequence number, not by id: new rows land at the end of each B-tree and
// old ones leave from its start (queues are FIFO), so a commit touches a few pages instead of
// one page per row (random uuid keys made commits 5-9x slower). The value holds the id.
const JOBS: TableDefinition<u64, &[u8]> = TableDefinition::new("jobs.by-seq");
const PIPELINES: TableDefinition<u64, &[u8]> = TableDefinition::new("pipelines.by-seq");
const ENDED: TableDefinition<u64, &[u8]> = TableDefinition::new("ended.by-seq");

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

/// A stored row: the record and its id.
#[derive(serde::Serialize, serde::Deserialize)]
struct Row<I, T> {
    id: I,
    record: T,
}

/// The key of every stored record, so a change rewrites or deletes the right row. Owned by
/// the state task.
#[derive(Debug, Default)]
pub struct Index {
    jobs: HashMap<JobId, u64>,
    pipelines: HashMap<PipelineId, u64>,
    ended: HashMap<PipelineId, u64>,
    next_ended: u64,
}

/// The durable record.
pub struct Durable {
    db: Database,
}

impl Durable {
    /// Opens (or creates) `router.redb` in `dir`, with a page cache of `cache_bytes`, and
    /// reads every record.
    ///
    /// # Errors
    /// [`PersistError::Open`] when the database cannot be opened — for instance another router
    /// uses it — and [`PersistError::Corrupt`] for a record that cannot be read.
    pub fn open(dir: &Path, cache_bytes: usize) -> Result<(Self, Loaded), PersistError> {
        let path = dir.join("router.redb");
        let open_err = |message: String| PersistError::Open {
            path: path.clone(),
            message,
        };
        std::fs::create_dir_all(dir).map_err(|e| open_err(e.to_string()))?;
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(&path)
            .map_err(|e| open_err(e.to_string()))?;
        // Create the tables, so reads find them.
        let txn = db.begin_write().map_err(io)?;
        {
            txn.open_table(JOBS).map_err(io)?;
            txn.open_table(PIPELINES).map_err(io)?;
            txn.open_table(ENDED).map_err(io)?;
        }
        txn.commit().map_err(io)?;
        let txn = db.begin_read().map_err(io)?;
        let mut index = Index::default();
        let jobs = read_all(&txn.open_table(JOBS).map_err(io)?, &mut index.jobs)?;
        let pipelines = read_all(
            &txn.open_table(PIPELINES).map_err(io)?,
            &mut index.pipelines,
        )?;
        let ended = read_all(&txn.open_table(ENDED).map_err(io)?, &mut index.ended)?;
        index.next_ended = index.ended.values().max().map_or(0, |k| k + 1);
        let loaded = Loaded {
            jobs,
            pipelines,
            ended,
            index,
        };
        Ok((Self { db }, loaded))
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
            let row = state.job(id).map(|r| (r.seq, r));
            writes.jobs.extend(keyed(&mut index.jobs, id, row)?);
        }
        for id in &changes.pipelines {
            let row = state.pipeline(id).map(|r| (r.seq, r));
            writes
                .pipelines
                .extend(keyed(&mut index.pipelines, id, row)?);
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
        if batches.iter().all(Writes::is_empty) {
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(io)?;
        for (definition, rows) in [
            (JOBS, batches.iter().map(|w| &w.jobs).collect::<Vec<_>>()),
            (PIPELINES, batches.iter().map(|w| &w.pipelines).collect()),
            (ENDED, batches.iter().map(|w| &w.ended).collect()),
        ] {
            let mut table = txn.open_table(definition).map_err(io)?;
            for (key, value) in rows.into_iter().flatten() {
                match value {
                    Some(v) => table.insert(key, v.as_slice()).map_err(io)?,
                    None => table.remove(key).map_err(io)?,
                };
            }
        }
        txn.commit().map_err(io)
    }
}

/// The row to write for record `id` (`row`: its key and record, `None` when it is gone),
/// keeping `index` up to date; nothing for a record that was never stored and is gone.
fn keyed<I, T>(
    index: &mut HashMap<I, u64>,
    id: &I,
    row: Option<(u64, &T)>,
) -> Result<Option<RowWrite>, PersistError>
where
    I: Clone + Eq + std::hash::Hash + serde::Serialize,
    T: serde::Serialize,
{
    match row {
        Some((key, record)) => {
            index.insert(id.clone(), key);
            let value = encode(&Row { id, record })?;
            Ok(Some((key, Some(value))))
        }
        None => Ok(index.remove(id).map(|key| (key, None))),
    }
}

/// A row to write: its key and encoded value, or `None` to delete it.
type RowWrite = (u64, Option<Vec<u8>>);

/// Rows to write.
#[derive(Debug, Default)]
pub struct Writes {
    jobs: Vec<RowWrite>,
    pipelines: Vec<RowWrite>,
    ended: Vec<RowWrite>,
}

impl Writes {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows to write or delete.
    pub fn len(&self) -> usize {
        self.jobs.len() + self.pipelines.len() + self.ended.len()
    }
}

fn encode<T: serde::Serialize>(record: &T) -> Result<Vec<u8>, PersistError> {
    serde_json::to_vec(record).map_err(io)
}

fn read_all<K, T>(
    table: &impl ReadableTable<u64, &'static [u8]>,
    index: &mut HashMap<K, u64>,
) -> Result<Vec<(K, T)>, PersistError>
where
    K: Clone + Eq + std::hash::Hash + serde::de::DeserializeOwned,
    T: serde::de::DeserializeOwned,
{
    let mut out = Vec::new();
    for entry in table.iter().map_err(io)? {
        let (key, value) = entry.map_err(io)?;
        let row: Row<K, T> = serde_json::from_slice(value.value())
            .map_err(|e| PersistError::Corrupt(format!("row {}: {e}", key.value())))?;
        index.insert(row.id.clone(), key.value());
        out.push((row.id, row.record));
    }
    Ok(out)
}
