//! `FileStore`: one JSON document per data item in a directory.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use super::{JobInfo, Store};
use crate::worker::{BoxError, JsonObject};

/// A store of JSON documents in a directory, built from the `store` table of the cluster
/// configuration.
///
/// Layout (see `docs/store.md`):
/// - The job's data names its document under a key, `"filename"` by default (the legacy
///   `SimpleFileStore` contract): `{"filename": "doc-1"}` is the file `<directory>/doc-1.json`,
///   holding one JSON object. Names may use letters, digits, `.`, `_` and `-`, must not start
///   with `.`, and are at most 200 bytes: anything else (`../x`, `a/b`) is refused, never
///   followed.
/// - `retrieve` returns each required field from the document, else from the job's data.
/// - `save` merges the result's fields into the document and also keeps the whole result under
///   `"_result-from-<worker>"`. It holds an exclusive lock on `<name>.json.lock` while it reads
///   and rewrites the document (several brokers may save to one document at once), and writes
///   a temporary file renamed over the document, so a reader never sees half a document.
/// - `save_monitoring` appends one JSON line to the monitoring file.
#[derive(Debug, Clone)]
pub struct FileStore {
    directory: PathBuf,
    document_key: String,
    monitoring_file: Option<PathBuf>,
}

/// The `store` table of the cluster configuration.
#[derive(Debug, Deserialize)]
struct FileStoreConfig {
    /// Where documents live.
    #[serde(rename = "data directory")]
    directory: PathBuf,
    /// Which key of a job's data names its document.
    #[serde(rename = "document key", default = "default_document_key")]
    document_key: String,
    /// Where monitoring records are appended (none when absent).
    #[serde(rename = "monitoring filename", default)]
    monitoring_file: Option<PathBuf>,
}

fn default_document_key() -> String {
    "filename".to_owned()
}

impl FileStore {
    /// A store in `directory`, created if missing.
    ///
    /// # Errors
    /// When the directory cannot be created.
    pub fn new(
        directory: impl Into<PathBuf>,
        monitoring_file: Option<PathBuf>,
    ) -> Result<Self, BoxError> {
        let directory = directory.into();
        std::fs::create_dir_all(&directory)
            .map_err(|e| format!("cannot create store directory {}: {e}", directory.display()))?;
        Ok(Self {
            directory,
            document_key: default_document_key(),
            monitoring_file,
        })
    }

    /// A store from the `store` table of the cluster configuration:
    /// `{"data directory": "...", "monitoring filename": "...", "document key": "filename"}`.
    ///
    /// # Errors
    /// When the table is missing keys or the directory cannot be created.
    pub fn from_configuration(table: &Value) -> Result<Self, BoxError> {
        let config: FileStoreConfig = serde_json::from_value(table.clone())
            .map_err(|e| format!("invalid [store] configuration for FileStore: {e}"))?;
        let mut store = Self::new(config.directory, config.monitoring_file)?;
        store.document_key = config.document_key;
        Ok(store)
    }

    /// The directory holding the documents.
    pub fn directory(&self) -> &Path {
        &self.directory
    }

    /// The path of the document a job's data names.
    ///
    /// # Errors
    /// When the data does not name a document, or the name is not a safe file name.
    pub fn document_path(&self, data: &Value) -> Result<PathBuf, BoxError> {
        let name = data
            .get(&self.document_key)
            .and_then(Value::as_str)
            .ok_or_else(|| {
                format!(
                    "job data has no string {:?} naming its document",
                    self.document_key
                )
            })?;
        Ok(self.directory.join(format!("{}.json", safe_name(name)?)))
    }

    /// Reads a document (an empty object when it does not exist yet).
    ///
    /// # Errors
    /// When it cannot be read or is not a JSON object.
    pub fn read_document(path: &Path) -> Result<JsonObject, BoxError> {
        match std::fs::read(path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(Value::Object(map)) => Ok(map),
                Ok(_) => Err(format!("{} does not hold a JSON object", path.display()).into()),
                Err(e) => Err(format!("{} is not valid JSON: {e}", path.display()).into()),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(JsonObject::new()),
            Err(e) => Err(format!("cannot read {}: {e}", path.display()).into()),
        }
    }

    /// Writes a document atomically (temporary file, fsync, rename).
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn write_document(path: &Path, document: &JsonObject) -> Result<(), BoxError> {
        let tmp = path.with_extension(format!("json.tmp-{}", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut file = File::create(&tmp)?;
            serde_json::to_writer(&mut file, document)?;
            file.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("cannot write {}: {e}", path.display()).into()
        })
    }
}

/// Checks that `name` can be a file name inside the store directory.
fn safe_name(name: &str) -> Result<&str, BoxError> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(name)
    } else {
        Err(format!(
            "refusing document name {name:?}: use 1 to 200 letters, digits, '.', '_' or '-', not starting with '.'"
        )
        .into())
    }
}

impl Store for FileStore {
    fn retrieve(&self, info: &JobInfo) -> Result<JsonObject, BoxError> {
        let path = self.document_path(&info.data)?;
        let document = Self::read_document(&path)?;
        let mut input = JsonObject::new();
        for field in &info.worker_requires {
            let value = document
                .get(field)
                .or_else(|| info.data.get(field))
                .ok_or_else(|| {
                    format!(
                        "document {} has no field {field:?} (required by {})",
                        path.display(),
                        info.worker
                    )
                })?;
            input.insert(field.clone(), value.clone());
        }
        Ok(input)
    }

    fn save(&self, info: &JobInfo, result: &JsonObject) -> Result<(), BoxError> {
        let path = self.document_path(&info.data)?;
        let lock_path = path.with_extension("json.lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| format!("cannot open {}: {e}", lock_path.display()))?;
        lock.lock()
            .map_err(|e| format!("cannot lock {}: {e}", lock_path.display()))?;
        let mut document = Self::read_document(&path)?;
        for (k, v) in result {
            document.insert(k.clone(), v.clone());
        }
        document.insert(
            format!("_result-from-{}", info.worker),
            Value::Object(result.clone()),
        );
        Self::write_document(&path, &document)
        // The lock is released when `lock` is dropped.
    }

    fn save_monitoring(&self, record: &Value) -> Result<(), BoxError> {
        let Some(path) = &self.monitoring_file else {
            return Ok(());
        };
        let mut line = serde_json::to_vec(record)?;
        line.push(b'\n');
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        // One write of the whole line: appends of concurrent writers do not interleave.
        file.write_all(&line)
            .map_err(|e| format!("cannot append to {}: {e}", path.display()).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn info(worker: &str, requires: &[&str], data: Value) -> JobInfo {
        JobInfo {
            job_id: "j".into(),
            worker: worker.into(),
            worker_requires: requires.iter().map(|s| s.to_string()).collect(),
            data,
        }
    }

    #[test]
    fn retrieve_reads_required_fields_from_the_document_then_the_data() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path(), None).unwrap();
        std::fs::write(
            dir.path().join("d1.json"),
            r#"{"text": "hello", "other": 1}"#,
        )
        .unwrap();
        let got = store
            .retrieve(&info(
                "W",
                &["text", "url"],
                json!({"filename": "d1", "url": "u"}),
            ))
            .unwrap();
        assert_eq!(Value::Object(got), json!({"text": "hello", "url": "u"}));
        let err = store
            .retrieve(&info("W", &["missing"], json!({"filename": "d1"})))
            .unwrap_err();
        assert!(err.to_string().contains("\"missing\""), "{err}");
    }

    #[test]
    fn save_merges_and_keeps_the_whole_result() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path(), None).unwrap();
        let job = info("Upper", &[], json!({"filename": "d2"}));
        store
            .save(&job, json!({"upper": "HI"}).as_object().unwrap())
            .unwrap();
        store
            .save(
                &info("Len", &[], json!({"filename": "d2"})),
                json!({"len": 2}).as_object().unwrap(),
            )
            .unwrap();
        let doc: Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("d2.json")).unwrap()).unwrap();
        assert_eq!(
            doc,
            json!({"upper": "HI", "len": 2, "_result-from-Upper": {"upper": "HI"}, "_result-from-Len": {"len": 2}})
        );
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.contains(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn hostile_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path().join("store"), None).unwrap();
        for name in [
            "../escape",
            "a/b",
            "/etc/passwd",
            "..",
            ".hidden",
            "",
            "a\0b",
            "a\\b",
            &"x".repeat(300),
        ] {
            let err = store
                .save(
                    &info("W", &[], json!({"filename": name})),
                    &JsonObject::new(),
                )
                .unwrap_err();
            assert!(
                err.to_string().contains("refusing document name"),
                "{name:?}: {err}"
            );
        }
        assert!(!dir.path().join("escape.json").exists());
        assert!(store
            .retrieve(&info("W", &[], json!({"nofilename": 1})))
            .is_err());
        assert!(store
            .retrieve(&info("W", &[], json!({"filename": 7})))
            .is_err());
    }

    #[test]
    fn concurrent_saves_to_one_document_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(FileStore::new(dir.path(), None).unwrap());
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for round in 0..10 {
                        let job = info(&format!("W{i}"), &[], json!({"filename": "shared"}));
                        store
                            .save(
                                &job,
                                json!({format!("k{i}-{round}"): round}).as_object().unwrap(),
                            )
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let doc = FileStore::read_document(&dir.path().join("shared.json")).unwrap();
        assert_eq!(doc.keys().filter(|k| k.starts_with('k')).count(), 80);
    }

    #[test]
    fn monitoring_records_are_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("monitoring.log");
        let store = FileStore::from_configuration(
            &json!({"data directory": dir.path(), "monitoring filename": log}),
        )
        .unwrap();
        store.save_monitoring(&json!({"n": 1})).unwrap();
        store.save_monitoring(&json!({"n": 2})).unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines, vec![json!({"n": 1}), json!({"n": 2})]);
        assert!(FileStore::from_configuration(&json!({"monitoring filename": "x"})).is_err());
    }
}
