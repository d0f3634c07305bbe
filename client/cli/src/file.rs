//! Pipeline files: the pipelines `pypelinin submit` and `pypelinin dot` read, in TOML or JSON.
//!
//! One pipeline:
//!
//! ```toml
//! deadline_secs = 600            # optional: fail it if it has not ended by then
//! data = { doc = "a.txt" }       # optional: handed to every job
//!
//! [[jobs]]
//! worker = "Download"
//!
//! [[jobs]]
//! worker = "Parse"
//! after = ["Download"]           # its parents
//! data = { strict = true }       # optional: this job's own data
//! ```
//!
//! Edges may also be listed apart: `edges = [["Download", "Parse"]]`. Several pipelines: the
//! same tables under `[[pipelines]]`. JSON has the same keys (`{"jobs": [{"worker": "A"}],
//! "edges": [["A", "B"]]}` or `{"pipelines": [...]}`). A job is named by its worker, so a
//! worker appears once per pipeline. A file that is not valid — a key that is no setting,
//! a cycle, an edge naming no job, no job at all — is refused with its line and the reason,
//! before anything is sent.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use pypelinin_common::pipeline::{Pipeline, PipelineError};
use serde::Deserialize;
use serde_json::{Map, Value};

/// The longest deadline: a year (as the router accepts).
const MAX_DEADLINE_SECS: f64 = 365.0 * 24.0 * 3600.0;

/// A pipeline read from a file, with its deadline.
#[derive(Debug, Clone)]
pub struct FilePipeline {
    /// The pipeline.
    pub pipeline: Pipeline,
    /// Its deadline, if the file gives one.
    pub deadline: Option<Duration>,
}

/// Why a pipeline file cannot be used: where, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}:{line}: {reason}")]
pub struct FileError {
    /// The file.
    pub path: String,
    /// The line (1-based) the problem is on.
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

/// A name in the file, with where it is (TOML gives spans; JSON does not, so its names are
/// found in the text).
trait Name {
    fn name(&self) -> &str;
    fn span(&self) -> Option<Range<usize>>;
}

impl Name for String {
    fn name(&self) -> &str {
        self
    }
    fn span(&self) -> Option<Range<usize>> {
        None
    }
}

impl Name for toml::Spanned<String> {
    fn name(&self) -> &str {
        self.get_ref()
    }
    fn span(&self) -> Option<Range<usize>> {
        Some(self.span())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, bound(deserialize = "N: Deserialize<'de>"))]
struct Many<N> {
    pipelines: Vec<Spec<N>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, bound(deserialize = "N: Deserialize<'de>"))]
struct Spec<N> {
    #[serde(default)]
    jobs: Vec<JobSpec<N>>,
    #[serde(default)]
    edges: Vec<(N, N)>,
    #[serde(default)]
    data: Option<Map<String, Value>>,
    #[serde(default, alias = "deadline secs")]
    deadline_secs: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, bound(deserialize = "N: Deserialize<'de>"))]
struct JobSpec<N> {
    worker: N,
    #[serde(default)]
    after: Vec<N>,
    #[serde(default)]
    data: Option<Map<String, Value>>,
}

/// Reads the pipelines of the file at `path` (`.json`: JSON; anything else: TOML).
///
/// # Errors
/// [`FileError`] with the line and reason when the file cannot be read or is not valid.
pub fn read(path: &Path) -> Result<Vec<FilePipeline>, FileError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| FileError {
        path: shown.clone(),
        line: 1,
        reason: format!("cannot read it: {e}"),
    })?;
    let json = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    parse(&text, json).map_err(|(line, reason)| FileError {
        path: shown,
        line,
        reason,
    })
}

/// Reads the pipelines of `text` (JSON when `json`, else TOML); an error is its line and
/// reason.
///
/// ```
/// use pypelinin_cli::file::parse;
/// let text = "[[jobs]]\nworker = \"A\"\n[[jobs]]\nworker = \"B\"\nafter = [\"C\"]\n";
/// let (line, reason) = parse(text, false).unwrap_err();
/// assert_eq!(line, 5);
/// assert!(reason.contains("\"C\" is no job of this pipeline"), "{reason}");
/// ```
///
/// # Errors
/// The line (1-based) and what is wrong.
pub fn parse(text: &str, json: bool) -> Result<Vec<FilePipeline>, (usize, String)> {
    if json {
        let value: Value = serde_json::from_str(text).map_err(|e| (e.line(), e.to_string()))?;
        let specs = if value.get("pipelines").is_some() {
            serde_json::from_str::<Many<String>>(text)
                .map_err(|e| (e.line(), e.to_string()))?
                .pipelines
        } else {
            vec![serde_json::from_str::<Spec<String>>(text)
                .map_err(|e| (e.line(), e.to_string()))?]
        };
        build_all(text, specs)
    } else {
        let line_of = |e: &toml::de::Error| e.span().map_or(1, |s| line_at(text, s.start));
        let value: toml::Table =
            toml::from_str(text).map_err(|e| (line_of(&e), toml_reason(&e)))?;
        let specs = if value.contains_key("pipelines") {
            toml::from_str::<Many<toml::Spanned<String>>>(text)
                .map_err(|e| (line_of(&e), toml_reason(&e)))?
                .pipelines
        } else {
            vec![toml::from_str::<Spec<toml::Spanned<String>>>(text)
                .map_err(|e| (line_of(&e), toml_reason(&e)))?]
        };
        build_all(text, specs)
    }
}

/// The message of a TOML error without the excerpt it quotes (the line is given apart).
fn toml_reason(e: &toml::de::Error) -> String {
    e.message().trim().to_owned()
}

/// The line (1-based) of byte `offset` of `text`.
fn line_at(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

fn build_all<N: Name>(
    text: &str,
    specs: Vec<Spec<N>>,
) -> Result<Vec<FilePipeline>, (usize, String)> {
    if specs.is_empty() {
        return Err((1, "the file lists no pipeline".into()));
    }
    let several = specs.len() > 1;
    specs
        .into_iter()
        .enumerate()
        .map(|(i, spec)| {
            build(text, spec).map_err(|(line, reason)| {
                let reason = if several {
                    format!("pipeline {}: {reason}", i + 1)
                } else {
                    reason
                };
                (line, reason)
            })
        })
        .collect()
}

/// The line of `name`: its span, else the first place the text quotes it.
fn line_of<N: Name>(text: &str, name: &N) -> usize {
    if let Some(span) = name.span() {
        return line_at(text, span.start);
    }
    let quoted = serde_json::to_string(name.name()).unwrap_or_default();
    text.find(&quoted).map_or(1, |at| line_at(text, at))
}

fn build<N: Name>(text: &str, spec: Spec<N>) -> Result<FilePipeline, (usize, String)> {
    let Some(first) = spec.jobs.first() else {
        return Err((
            1,
            "the pipeline has no job: list them as [[jobs]] with a worker each".into(),
        ));
    };
    let first_line = line_of(text, &first.worker);
    let mut declared: HashMap<&str, usize> = HashMap::new();
    for job in &spec.jobs {
        let name = job.worker.name();
        let line = line_of(text, &job.worker);
        if name.trim().is_empty() {
            return Err((line, "a job's worker name is empty".into()));
        }
        if declared.insert(name, line).is_some() {
            return Err((
                line,
                format!(
                    "job {name:?} is listed twice (a pipeline's jobs are named by their worker)"
                ),
            ));
        }
    }
    let known = |n: &N| -> Result<(), (usize, String)> {
        if declared.contains_key(n.name()) {
            return Ok(());
        }
        let mut names: Vec<&str> = declared.keys().copied().collect();
        names.sort_unstable();
        Err((
            line_of(text, n),
            format!(
                "{:?} is no job of this pipeline (its jobs: {})",
                n.name(),
                names.join(", ")
            ),
        ))
    };
    let mut edges: Vec<(&str, &str)> = Vec::new();
    let mut seen = HashSet::new();
    for job in &spec.jobs {
        for parent in &job.after {
            known(parent)?;
            if seen.insert((parent.name(), job.worker.name())) {
                edges.push((parent.name(), job.worker.name()));
            }
        }
    }
    for (from, to) in &spec.edges {
        known(from)?;
        known(to)?;
        if seen.insert((from.name(), to.name())) {
            edges.push((from.name(), to.name()));
        }
    }
    let deadline = match spec.deadline_secs {
        None => None,
        Some(s) if s > 0.0 && s <= MAX_DEADLINE_SECS => Some(Duration::from_secs_f64(s)),
        Some(s) => {
            let line = text
                .find("deadline")
                .map_or(first_line, |at| line_at(text, at));
            return Err((
                line,
                format!("deadline_secs = {s}: give a number of seconds above 0 and at most a year"),
            ));
        }
    };
    let mut builder = Pipeline::builder();
    for job in &spec.jobs {
        builder = match &job.data {
            Some(data) => builder.job_with_data(job.worker.name(), data.clone()),
            None => builder.job(job.worker.name()),
        };
    }
    for (from, to) in edges {
        builder = builder.edge(from, to);
    }
    if let Some(data) = spec.data {
        builder = builder.data(Value::Object(data));
    }
    let pipeline = builder.build().map_err(|e| {
        let line = match &e {
            PipelineError::Cycle(worker) => declared.get(worker.as_str()).copied(),
            _ => None,
        };
        (line.unwrap_or(first_line), e.to_string())
    })?;
    Ok(FilePipeline { pipeline, deadline })
}

/// Applies `--data key=value` overrides (the value read as JSON when it is, else as a
/// string; `{i}` in a string is the copy's number, from 1) to copy `i` of `pipeline`.
///
/// # Errors
/// A pair without `=`, or a pipeline that cannot be rebuilt.
pub fn with_data(pipeline: &Pipeline, overrides: &[String], i: usize) -> Result<Pipeline, String> {
    if overrides.is_empty() {
        return Ok(pipeline.clone());
    }
    let mut data = pipeline.data().cloned().unwrap_or_default();
    for pair in overrides {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(format!("--data {pair:?}: write KEY=VALUE"));
        };
        let value = value.replace("{i}", &i.to_string());
        let value = serde_json::from_str(&value).unwrap_or(Value::String(value));
        data.insert(key.to_owned(), value);
    }
    Ok(pipeline.clone().with_data(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str, json: bool) -> (usize, String) {
        match parse(text, json) {
            Ok(p) => panic!("accepted: {p:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn a_toml_pipeline_with_after_edges_data_and_deadline() {
        let text = r#"
deadline_secs = 60
data = { doc = "a" }

[[jobs]]
worker = "A"

[[jobs]]
worker = "B"
after = ["A"]
data = { own = 1 }

[[jobs]]
worker = "C"

edges_are_not_here = false
"#;
        // A key that is no setting is refused, with its line.
        let (line, reason) = err(text, false);
        assert_eq!(line, 16, "{reason}");
        assert!(
            reason.contains("unknown field `edges_are_not_here`"),
            "{reason}"
        );

        let text = text.replace("edges_are_not_here = false\n", "");
        let text = text.replacen(
            "[[jobs]]\nworker = \"A\"",
            "edges = [[\"A\", \"C\"]]\n[[jobs]]\nworker = \"A\"",
            1,
        );
        let p = parse(&text, false).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].deadline, Some(Duration::from_secs(60)));
        let pipeline = &p[0].pipeline;
        assert_eq!(pipeline.len(), 3);
        assert_eq!(pipeline.edges().count(), 2);
        let b = pipeline.find("B").unwrap();
        assert_eq!(pipeline.job_data(b)["own"], 1);
        assert_eq!(pipeline.data().unwrap()["doc"], "a");
    }

    #[test]
    fn bad_dags_are_refused_with_their_line() {
        let cycle = "[[jobs]]\nworker = \"A\"\nafter = [\"B\"]\n\n[[jobs]]\nworker = \"B\"\nafter = [\"A\"]\n";
        let (line, reason) = err(cycle, false);
        assert!(
            reason.contains("cycle") || reason.contains("starter"),
            "{reason}"
        );
        assert!(line == 2 || line == 6, "{line}");
        let (line, reason) = err("jobs = []\n", false);
        assert_eq!(line, 1);
        assert!(reason.contains("no job"), "{reason}");
        let twice = "[[jobs]]\nworker = \"A\"\n[[jobs]]\nworker = \"A\"\n";
        let (line, reason) = err(twice, false);
        assert_eq!(line, 4);
        assert!(reason.contains("listed twice"), "{reason}");
        let edge = "edges = [[\"A\", \"Nope\"]]\n[[jobs]]\nworker = \"A\"\n";
        let (line, reason) = err(edge, false);
        assert_eq!(line, 1);
        assert!(reason.contains("\"Nope\" is no job"), "{reason}");
        let (line, reason) = err("deadline_secs = -1\n[[jobs]]\nworker = \"A\"\n", false);
        assert_eq!(line, 1);
        assert!(reason.contains("deadline_secs"), "{reason}");
        let (line, _) = err("[[jobs]]\nworker = \"A\"\nafter = [\n", false);
        assert!(line >= 3, "{line}");
    }

    #[test]
    fn json_files_and_several_pipelines() {
        let text = r#"{"pipelines": [
  {"jobs": [{"worker": "A"}, {"worker": "B", "after": ["A"]}]},
  {"jobs": [{"worker": "C"}], "edges": [["C", "D"]]}
]}"#;
        let (line, reason) = err(text, true);
        assert_eq!(line, 3);
        assert!(
            reason.starts_with("pipeline 2: \"D\" is no job"),
            "{reason}"
        );
        let ok = text.replace(r#", "edges": [["C", "D"]]"#, "");
        let p = parse(&ok, true).unwrap();
        assert_eq!(
            p.iter().map(|p| p.pipeline.len()).collect::<Vec<_>>(),
            [2, 1]
        );
        let (line, reason) = err("{\"jobs\": [{\"worker\": \"A\", \"colour\": 1}]}", true);
        assert_eq!(line, 1);
        assert!(reason.contains("unknown field `colour`"), "{reason}");
    }

    #[test]
    fn data_overrides_number_the_copies() {
        let p = parse("[[jobs]]\nworker = \"A\"\n", false)
            .unwrap()
            .remove(0)
            .pipeline;
        let copy = with_data(&p, &["doc=doc-{i}.txt".into(), "n=3".into()], 2).unwrap();
        assert_eq!(copy.data().unwrap()["doc"], "doc-2.txt");
        assert_eq!(copy.data().unwrap()["n"], 3);
        assert!(with_data(&p, &["nokey".into()], 1).is_err());
    }
}
