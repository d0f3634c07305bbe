//! The router's durable record: every pending job and pipeline, and the outcomes of ended
//! pipelines, in a redb database. The state task writes the records a batch of requests
//! changed in one transaction (group commit) and sends the batch's replies only after it is
//! on disk; at start the router restores its state from it.

use std::path::{Path, PathBuf};

use pypelinin_common::ids::{JobId, PipelineId};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::state::{Changes, EndedRecord, JobRecord, PipelineRecord, State};

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const PIPELINES: TableDefinition<&str, &[u8]> = TableDefinition::new("pipelines");
const ENDED: TableDefinition<&str, &[u8]> = TableDefinition::new("ended");

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
}

/// The durable record.
pub struct Durable {
    db: Database,
}

impl Durable {
    /// Opens (or creates) `router.redb` in `dir` and reads every record.
    ///
    /// # Errors
    /// [`PersistError::Open`] when the database cannot be opened — for instance another router
    /// uses it — and [`PersistError::Corrupt`] for a record that cannot be read.
    pub fn open(dir: &Path) -> Result<(Self, Loaded), PersistError> {
        let path = dir.join("router.redb");
        let open_err = |message: String| PersistError::Open {
            path: path.clone(),
            message,
        };
        std::fs::create_dir_all(dir).map_err(|e| open_err(e.to_string()))?;
        let db = Database::create(&path).map_err(|e| open_err(e.to_string()))?;
        // Create the tables, so reads find them.
        let txn = db.begin_write().map_err(io)?;
        {
            txn.open_table(JOBS).map_err(io)?;
            txn.open_table(PIPELINES).map_err(io)?;
            txn.open_table(ENDED).map_err(io)?;
        }
        txn.commit().map_err(io)?;
        let txn = db.begin_read().map_err(io)?;
        let loaded = Loaded {
            jobs: read_all(&txn.open_table(JOBS).map_err(io)?)?,
            pipelines: read_all(&txn.open_table(PIPELINES).map_err(io)?)?,
            ended: read_all(&txn.open_table(ENDED).map_err(io)?)?,
        };
        Ok((Self { db }, loaded))
    }

    /// The writes that store the records `changes` names as they are in `state` (absent
    /// ones are deleted). Cheap: done on the state task, while [`Durable::write`] runs on a
    /// blocking thread.
    ///
    /// # Errors
    /// [`PersistError::Io`] when a record cannot be encoded.
    pub fn prepare(state: &State, changes: &Changes) -> Result<Writes, PersistError> {
        let mut writes = Writes::default();
        for id in &changes.jobs {
            let value = state.job(id).map(encode).transpose()?;
            writes.jobs.push((id.to_string(), value));
        }
        for id in &changes.pipelines {
            let value = state.pipeline(id).map(encode).transpose()?;
            writes.pipelines.push((id.to_string(), value));
        }
        for id in &changes.ended {
            let value = state.ended(id).map(encode).transpose()?;
            writes.ended.push((id.to_string(), value));
        }
        Ok(writes)
    }

    /// Applies `writes` in one transaction and returns once it is on disk.
    ///
    /// # Errors
    /// [`PersistError::Io`] when the write fails.
    pub fn write(&self, writes: &Writes) -> Result<(), PersistError> {
        if writes.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(io)?;
        for (table, rows) in [
            (JOBS, &writes.jobs),
            (PIPELINES, &writes.pipelines),
            (ENDED, &writes.ended),
        ] {
            let mut table = txn.open_table(table).map_err(io)?;
            for (key, value) in rows {
                match value {
                    Some(v) => table.insert(key.as_str(), v.as_slice()).map_err(io)?,
                    None => table.remove(key.as_str()).map_err(io)?,
                };
            }
        }
        txn.commit().map_err(io)
    }
}

/// Rows to write: key and encoded record, or `None` to delete.
#[derive(Debug, Default)]
pub struct Writes {
    jobs: Vec<(String, Option<Vec<u8>>)>,
    pipelines: Vec<(String, Option<Vec<u8>>)>,
    ended: Vec<(String, Option<Vec<u8>>)>,
}

impl Writes {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty() && self.pipelines.is_empty() && self.ended.is_empty()
    }
}

fn encode<T: serde::Serialize>(record: &T) -> Result<Vec<u8>, PersistError> {
    serde_json::to_vec(record).map_err(io)
}

fn read_all<K, T>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Vec<(K, T)>, PersistError>
where
    K: From<String>,
    T: serde::de::DeserializeOwned,
{
    let mut out = Vec::new();
    for entry in table.iter().map_err(io)? {
        let (key, value) = entry.map_err(io)?;
        let record = serde_json::from_slice(value.value())
            .map_err(|e| PersistError::Corrupt(format!("{}: {e}", key.value())))?;
        out.push((K::from(key.value().to_owned()), record));
    }
    Ok(out)
}
