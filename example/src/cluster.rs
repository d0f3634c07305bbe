//! The example's cluster configuration, its pipeline, and helpers shared by its binaries.

use std::path::{Path, PathBuf};

use pypelinin_client::Pipeline;
use serde_json::{json, Map, Value};

/// Where the example keeps its data by default: one folder per user and per cluster (named by
/// its API endpoint), `<temp>/pypelinin-example-<uid>/<endpoint>`, so two users or two
/// clusters on one machine never mix their results or durable records.
pub fn default_home(api: &str) -> PathBuf {
    let cluster: String = api
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let uid = nix::unistd::Uid::current();
    std::env::temp_dir()
        .join(format!("pypelinin-example-{uid}"))
        .join(cluster.trim_matches('-').replace("---", "-"))
}

/// The cluster configuration `my_router` serves: a FileStore in `<home>/store`, monitoring
/// records in `<home>/monitoring.log` every `monitoring_secs`.
pub fn configuration(home: &Path, monitoring_secs: f64) -> Map<String, Value> {
    let config = json!({
        "monitoring interval": monitoring_secs,
        "store": {
            "data directory": home.join("store"),
            "monitoring filename": home.join("monitoring.log"),
        },
    });
    match config {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

/// The document name a pipeline works on (`bees.html` → `bees`).
pub fn document_name(file: &str) -> String {
    file.trim_end_matches(".html").to_owned()
}

/// The example's pipeline for one document:
/// `Downloader → (GetTextAndWords, GetLinks) → Summarize`, and `GetTextAndWords → TextStats`.
///
/// # Errors
/// Never for this shape; the error type is the builder's.
pub fn document_pipeline(
    name: &str,
    url: &str,
) -> Result<Pipeline, pypelinin_client::PipelineError> {
    Pipeline::builder()
        .edges("Downloader", ["GetTextAndWords", "GetLinks"])
        .edges("GetTextAndWords", ["Summarize", "TextStats"])
        .edge("GetLinks", "Summarize")
        .data(json!({"filename": name, "url": url}))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pipeline_file_is_the_document_pipeline() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines/document.toml");
        let mut read = pypelinin_cli::file::read(std::path::Path::new(path)).unwrap();
        assert_eq!(read.len(), 1);
        let from_file = read.remove(0).pipeline;
        let built = document_pipeline("bees", "file:///bees.html").unwrap();
        assert_eq!(from_file.to_dot(), built.to_dot());
    }

    #[test]
    fn the_default_home_is_per_user_and_per_cluster() {
        let a = default_home("tcp://127.0.0.1:5555");
        let b = default_home("tcp://127.0.0.1:6555");
        assert_ne!(a, b);
        assert!(a.ends_with("tcp-127-0-0-1-5555"), "{}", a.display());
        let user = a
            .parent()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str());
        assert_eq!(
            user,
            Some(format!("pypelinin-example-{}", nix::unistd::Uid::current()).as_str())
        );
    }
}
