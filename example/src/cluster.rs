//! The example's cluster configuration, its pipeline, and helpers shared by its binaries.

use std::path::{Path, PathBuf};

use pypelinin_client::Pipeline;
use serde_json::{json, Map, Value};

/// Where the example keeps its data by default: `<temp>/pypelinin-example`.
pub fn default_home() -> PathBuf {
    std::env::temp_dir().join("pypelinin-example")
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
