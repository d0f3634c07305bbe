//! Pipelines: DAGs of jobs, their legacy serialized form, DOT export and the run state the
//! pipeliner walks them with.
//!
//! A job is identified by its worker name within a pipeline (as in the legacy, where jobs are
//! equal when their worker names are), so a worker name used twice is one node.
//!
//! ```
//! use pypelinin_common::pipeline::Pipeline;
//! use serde_json::json;
//! // Legacy: Pipeline({Job('A'): [Job('B'), Job('C')], Job('B'): Job('D')}, data={'doc': 7})
//! let p = Pipeline::builder()
//!     .edges("A", ["B", "C"])
//!     .edge("B", "D")
//!     .data(json!({"doc": 7}))
//!     .build()
//!     .unwrap();
//! assert_eq!(p.len(), 4);
//! let names: Vec<_> = p.starters().map(|j| p.job(j).worker.as_str()).collect();
//! assert_eq!(names, ["A"]);
//! ```

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::protocol::raw::{Key, RawObject};

/// Index of a job inside its [`Pipeline`].
pub type JobIndex = NodeIndex;

/// One job of a pipeline: the worker that runs it, and optionally its own data.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// Name of the worker; identifies the job within its pipeline.
    pub worker: String,
    /// Data of this job alone. `None` means it uses the pipeline's data, as every legacy job did.
    pub data: Option<Map<String, Value>>,
}

impl Job {
    /// A job of `worker` with no data of its own.
    pub fn new(worker: impl Into<String>) -> Self {
        Self {
            worker: worker.into(),
            data: None,
        }
    }
}

/// Why a pipeline is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PipelineError {
    /// It has no job.
    #[error("the pipeline has no job")]
    Empty,
    /// A cycle runs through this worker.
    #[error("the pipeline has a cycle through job {0:?}")]
    Cycle(String),
    /// Every job has a parent, so none can start.
    #[error("the pipeline has no starter job (every job has a parent)")]
    NoStarter,
    /// A worker name is empty.
    #[error("a job has an empty worker name")]
    EmptyWorkerName,
    /// The pipeline's data (or a job's) is not a JSON object.
    #[error("pipeline data must be a JSON object or null, not {0}")]
    DataNotObject(String),
    /// The serialized form is not the legacy format.
    #[error("not a serialized pipeline: {0}")]
    Format(String),
    /// Writing the DOT file failed.
    #[error("cannot write {path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        message: String,
    },
}

/// A DAG of jobs, plus data handed to every job (the legacy pipeline data).
#[derive(Debug, Clone)]
pub struct Pipeline {
    graph: DiGraph<Job, ()>,
    data: Option<Map<String, Value>>,
}

impl Pipeline {
    /// Starts building a pipeline.
    pub fn builder() -> PipelineBuilder {
        PipelineBuilder::default()
    }

    /// Number of jobs.
    pub fn len(&self) -> usize {
        self.graph.node_count()
    }

    /// A valid pipeline is never empty; this is here for completeness.
    pub fn is_empty(&self) -> bool {
        self.graph.node_count() == 0
    }

    /// The pipeline's data.
    pub fn data(&self) -> Option<&Map<String, Value>> {
        self.data.as_ref()
    }

    /// The same DAG with `data` as the pipeline's data (handed to every job without data of
    /// its own).
    pub fn with_data(mut self, data: Map<String, Value>) -> Self {
        self.data = Some(data);
        self
    }

    /// The job at `index`.
    ///
    /// # Panics
    /// If `index` is not a job of this pipeline.
    pub fn job(&self, index: JobIndex) -> &Job {
        &self.graph[index]
    }

    /// Every job with its index, in the order they were added.
    pub fn jobs(&self) -> impl Iterator<Item = (JobIndex, &Job)> + '_ {
        self.graph.node_indices().map(move |i| (i, &self.graph[i]))
    }

    /// The job of `worker`, if the pipeline has one.
    pub fn find(&self, worker: &str) -> Option<JobIndex> {
        self.graph
            .node_indices()
            .find(|&i| self.graph[i].worker == worker)
    }

    /// Jobs without parents: they run first.
    pub fn starters(&self) -> impl Iterator<Item = JobIndex> + '_ {
        self.graph
            .node_indices()
            .filter(move |&i| self.parents(i).next().is_none())
    }

    /// The jobs in an order where each comes after all its parents (a topological order).
    pub fn topological_order(&self) -> Vec<JobIndex> {
        // A built pipeline has no cycle (checked by `build` and `from_legacy`).
        petgraph::algo::toposort(&self.graph, None)
            .unwrap_or_else(|_| self.graph.node_indices().collect())
    }

    /// The jobs `index` waits for.
    pub fn parents(&self, index: JobIndex) -> impl Iterator<Item = JobIndex> + '_ {
        self.graph.neighbors_directed(index, Direction::Incoming)
    }

    /// The jobs that wait for `index`.
    pub fn children(&self, index: JobIndex) -> impl Iterator<Item = JobIndex> + '_ {
        self.graph.neighbors_directed(index, Direction::Outgoing)
    }

    /// Every edge `(parent, child)`, in the order they were added.
    pub fn edges(&self) -> impl Iterator<Item = (JobIndex, JobIndex)> + '_ {
        self.graph
            .edge_references()
            .map(|e| (e.source(), e.target()))
    }

    /// The data a job is submitted with: its own, else the pipeline's, else `null`.
    pub fn job_data(&self, index: JobIndex) -> Value {
        match self.graph[index].data.as_ref().or(self.data.as_ref()) {
            Some(map) => Value::Object(map.clone()),
            None => Value::Null,
        }
    }

    fn validate(&self) -> Result<(), PipelineError> {
        if self.graph.node_count() == 0 {
            return Err(PipelineError::Empty);
        }
        if self.graph.node_weights().any(|j| j.worker.is_empty()) {
            return Err(PipelineError::EmptyWorkerName);
        }
        if let Err(cycle) = petgraph::algo::toposort(&self.graph, None) {
            return Err(PipelineError::Cycle(
                self.graph[cycle.node_id()].worker.clone(),
            ));
        }
        if self.starters().next().is_none() {
            return Err(PipelineError::NoStarter);
        }
        Ok(())
    }

    /// The legacy serialized form: `[["graph", EDGES], ["data", PAIRS or null]]`.
    ///
    /// Each job is written as pairs: `[["worker_name", "A"]]`, plus `["data", PAIRS]` when it
    /// has data of its own. The original copied the pipeline's data into every job, so its
    /// text grew with jobs × data; a job without data is valid for its readers too, and they
    /// hand jobs the pipeline's data. A job with no edge is `[JOB, null]`. Edges come sorted
    /// by worker names, so equal pipelines serialize to the same text.
    pub fn to_legacy(&self) -> Value {
        let job_value = |i: JobIndex| {
            let job = &self.graph[i];
            let mut pairs = vec![Value::Array(vec![
                "worker_name".into(),
                job.worker.clone().into(),
            ])];
            if let Some(data) = job.data.as_ref() {
                pairs.push(Value::Array(vec!["data".into(), map_to_pairs(data)]));
            }
            Value::Array(pairs)
        };
        // Canonical order (jobs by worker name, then their children by name), so the text
        // depends only on the pipeline, not on the order it was built in.
        let mut nodes: Vec<JobIndex> = self.graph.node_indices().collect();
        nodes.sort_by(|&a, &b| self.graph[a].worker.cmp(&self.graph[b].worker));
        let mut edges = Vec::with_capacity(self.graph.edge_count());
        for node in nodes {
            let mut children: Vec<JobIndex> = self.children(node).collect();
            if children.is_empty() && self.parents(node).next().is_none() {
                edges.push(Value::Array(vec![job_value(node), Value::Null]));
            }
            children.sort_by(|&a, &b| self.graph[a].worker.cmp(&self.graph[b].worker));
            for child in children {
                edges.push(Value::Array(vec![job_value(node), job_value(child)]));
            }
        }
        let data = self.data.as_ref().map_or(Value::Null, map_to_pairs);
        Value::Array(vec![
            Value::Array(vec!["graph".into(), Value::Array(edges)]),
            Value::Array(vec!["data".into(), data]),
        ])
    }

    /// Reads the legacy serialized form (pairs or objects at every level, in any order).
    ///
    /// # Errors
    /// [`PipelineError::Format`] when it is not the legacy format, and the validation errors
    /// ([`PipelineError::Cycle`], [`PipelineError::NoStarter`], ...) when it is no valid DAG.
    pub fn from_legacy(value: &Value) -> Result<Self, PipelineError> {
        let fmt_err = |m: &str| PipelineError::Format(m.to_owned());
        let top = pairs_to_map(value).ok_or_else(|| {
            fmt_err("expected a list of [key, value] pairs with \"graph\" and \"data\"")
        })?;
        let data = match top.get("data") {
            None => None,
            Some(d) => read_data(d)?,
        };
        let graph = top
            .get("graph")
            .ok_or_else(|| fmt_err("missing \"graph\""))?
            .as_array()
            .ok_or_else(|| fmt_err("\"graph\" must be a list of [from, to] edges"))?;
        let mut builder = PipelineBuilder::default();
        for edge in graph {
            let pair = edge
                .as_array()
                .filter(|a| a.len() == 2)
                .ok_or_else(|| fmt_err("each edge of \"graph\" must be a list [from, to]"))?;
            let from = read_job(&pair[0], data.as_ref())?;
            let from = builder.node(from);
            if !pair[1].is_null() {
                let to = read_job(&pair[1], data.as_ref())?;
                let to = builder.node(to);
                builder.edge_indices.push((from, to));
            }
        }
        builder.data = data.map(Value::Object);
        builder.build()
    }

    /// Reads the legacy serialized form from its JSON text (as `add pipeline` carries it),
    /// parsing each data once.
    ///
    /// # Errors
    /// As [`Pipeline::from_legacy`]; [`PipelineError::Format`] for text that is not JSON.
    pub fn from_legacy_text(text: &str) -> Result<Self, PipelineError> {
        let view = LegacyText::read(text)?;
        let mut builder = PipelineBuilder {
            data: view.data.map(parse_data).transpose()?.map(Value::Object),
            ..PipelineBuilder::default()
        };
        let node = |builder: &mut PipelineBuilder, job: &JobText<'_>| {
            if let Some(&i) = builder.by_name.get(&job.worker) {
                return Ok(i);
            }
            let data = job.data.map(parse_data).transpose()?;
            Ok::<_, PipelineError>(builder.node(Job {
                worker: job.worker.clone(),
                data,
            }))
        };
        for (from, to) in &view.edges {
            let from = node(&mut builder, from)?;
            if let Some(to) = to {
                let to = node(&mut builder, to)?;
                builder.edge_indices.push((from, to));
            }
        }
        builder.build()
    }

    /// Checks the legacy serialized form in `text` as [`Pipeline::from_legacy_text`] does —
    /// its format, and that it is a valid DAG — without reading its data (only its shape:
    /// `null`, pairs or an object), so a large payload is scanned, never built.
    ///
    /// # Errors
    /// As [`Pipeline::from_legacy_text`].
    pub fn check_legacy_text(text: &str) -> Result<(), PipelineError> {
        let view = LegacyText::read(text)?;
        let mut builder = PipelineBuilder::default();
        for (from, to) in view.edges {
            let from = builder.node(Job::new(from.worker));
            if let Some(to) = to {
                let to = builder.node(Job::new(to.worker));
                builder.edge_indices.push((from, to));
            }
        }
        builder.build().map(drop)
    }

    /// The data of the pipeline serialized in `text` (`None` when it has none), as the text of
    /// a JSON object made of the text of each of the data's values as `text` has it, not
    /// parsed: each key once (the last of a repeated key), in key order. Read in two passes over `text`, where parsing the values and
    /// encoding them again would take several; the router hands it to the jobs of the
    /// pipeline. Only the data is read: neither the graph nor the values are checked beyond
    /// being JSON.
    ///
    /// ```
    /// use pypelinin_common::pipeline::Pipeline;
    /// let text = r#"[["graph", []], ["data", [["b", [1, 2]], ["a", {"x": null}], ["b", "last"]]]]"#;
    /// let data = Pipeline::legacy_data_text(text).unwrap().unwrap();
    /// assert_eq!(data.get(), r#"{"a":{"x": null},"b":"last"}"#);
    /// ```
    ///
    /// # Errors
    /// [`PipelineError::Format`] when `text` is not a list of pairs or an object, or its data
    /// is neither `null` nor pairs nor an object.
    pub fn legacy_data_text(text: &str) -> Result<Option<Box<RawValue>>, PipelineError> {
        let format = |m: &str| PipelineError::Format(m.to_owned());
        let top = raw_pairs_of(text).ok_or_else(|| {
            format("expected a list of [key, value] pairs with \"graph\" and \"data\"")
        })?;
        let Some(data) = last(&top, "data").filter(|d| d.get() != "null") else {
            return Ok(None);
        };
        let pairs = raw_pairs(data)
            .ok_or_else(|| format("\"data\" must be null or a list of [key, value] pairs"))?;
        let map: std::collections::BTreeMap<&str, &RawValue> =
            pairs.iter().map(|(k, v)| (k.as_ref(), *v)).collect();
        let mut object = String::with_capacity(data.get().len() + 2);
        object.push('{');
        for (i, (key, value)) in map.into_iter().enumerate() {
            if i > 0 {
                object.push(',');
            }
            // Encoding a string cannot fail.
            object.push_str(&serde_json::to_string(key).unwrap_or_default());
            object.push(':');
            object.push_str(value.get());
        }
        object.push('}');
        RawValue::from_string(object)
            .map(Some)
            .map_err(|e| PipelineError::Format(e.to_string()))
    }

    /// The DOT text of the legacy `Pipeline.to_dot()`: every job, a blank line, every edge,
    /// each sorted by worker name so the text does not depend on construction order.
    pub fn to_dot(&self) -> String {
        self.to_dot_coloured(|_| None)
    }

    /// As [`Pipeline::to_dot`], each job filled with the colour `colour` gives its worker
    /// (an SVG/X11 colour name or `#rrggbb`; `None`: left plain). `pypelinin show --dot`
    /// colours jobs by state with it.
    ///
    /// ```
    /// use pypelinin_common::pipeline::Pipeline;
    /// let p = Pipeline::builder().edge("A", "B").build().unwrap();
    /// let dot = p.to_dot_coloured(|w| (w == "A").then_some("palegreen"));
    /// assert!(dot.contains(r#""A" [style=filled, fillcolor="palegreen"];"#), "{dot}");
    /// assert!(dot.contains("    \"B\";"), "{dot}");
    /// ```
    pub fn to_dot_coloured<'a>(&self, colour: impl Fn(&str) -> Option<&'a str>) -> String {
        let mut nodes: Vec<&str> = self
            .graph
            .node_weights()
            .map(|j| j.worker.as_str())
            .collect();
        nodes.sort_unstable();
        let edges = sorted_edges(self);
        let mut out = String::from("digraph graphname {\n");
        for n in nodes {
            match colour(n) {
                Some(c) => out.push_str(&format!(
                    "    {} [style=filled, fillcolor={}];\n",
                    dot_quote(n),
                    dot_quote(c)
                )),
                None => out.push_str(&format!("    {};\n", dot_quote(n))),
            }
        }
        out.push('\n');
        for (a, b) in edges {
            out.push_str(&format!("    {} -> {};\n", dot_quote(a), dot_quote(b)));
        }
        out.push('}');
        out
    }

    /// The pipeline drawn as an SVG image, laid out without Graphviz (by the `layout-rs`
    /// crate), jobs coloured as [`Pipeline::to_dot_coloured`] says.
    ///
    /// ```
    /// use pypelinin_common::pipeline::Pipeline;
    /// let p = Pipeline::builder().edges("Download", ["Parse", "Index"]).build().unwrap();
    /// let svg = p.to_svg(|_| None).unwrap();
    /// assert!(svg.contains("<svg") && svg.contains("Download"), "{svg}");
    /// ```
    ///
    /// # Errors
    /// [`PipelineError::Format`] if the layout fails.
    pub fn to_svg<'a>(
        &self,
        colour: impl Fn(&str) -> Option<&'a str>,
    ) -> Result<String, PipelineError> {
        dot_to_svg(&self.to_dot_coloured(colour))
    }

    /// Writes [`Pipeline::to_svg`] (no colours) to `path`.
    ///
    /// # Errors
    /// [`PipelineError::Io`] when the file cannot be written.
    pub fn save_svg(&self, path: impl AsRef<Path>) -> Result<(), PipelineError> {
        let path = path.as_ref();
        std::fs::write(path, self.to_svg(|_| None)?).map_err(|e| PipelineError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    /// Writes [`Pipeline::to_dot`] to `path`.
    ///
    /// # Errors
    /// [`PipelineError::Io`] when the file cannot be written.
    pub fn save_dot(&self, path: impl AsRef<Path>) -> Result<(), PipelineError> {
        save_dot(self, path)
    }
}

/// Lays out DOT text and draws it as SVG (pure Rust: no Graphviz needed).
///
/// # Errors
/// [`PipelineError::Format`] when the text is not DOT the layout understands.
pub fn dot_to_svg(dot: &str) -> Result<String, PipelineError> {
    let mut parser = layout::gv::DotParser::new(dot);
    let graph = parser
        .process()
        .map_err(|e| PipelineError::Format(format!("cannot lay out the DOT text: {e}")))?;
    // The layout asserts its own invariants; a graph it cannot place is an error here, not a
    // crash of the caller.
    std::panic::catch_unwind(move || {
        let mut builder = layout::gv::GraphBuilder::new();
        builder.visit_graph(&graph);
        let mut visual = builder.get();
        let mut svg = layout::backends::svg::SVGWriter::new();
        visual.do_it(false, false, false, &mut svg);
        svg.finalize()
    })
    .map_err(|_| PipelineError::Format("the layout of the DOT text failed".into()))
}

/// Writes the DOT text of `pipeline` to `path` (the legacy `save_dot`).
///
/// # Errors
/// [`PipelineError::Io`] when the file cannot be written.
pub fn save_dot(pipeline: &Pipeline, path: impl AsRef<Path>) -> Result<(), PipelineError> {
    let path = path.as_ref();
    std::fs::write(path, pipeline.to_dot()).map_err(|e| PipelineError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

impl fmt::Display for Pipeline {
    /// The DOT text.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_dot())
    }
}

impl PartialEq for Pipeline {
    /// Same data, same jobs and same edges, whatever order they were added in (a job is
    /// identified by its worker name).
    fn eq(&self, other: &Self) -> bool {
        self.data == other.data
            && sorted_jobs(self) == sorted_jobs(other)
            && sorted_edges(self) == sorted_edges(other)
    }
}

fn sorted_jobs(p: &Pipeline) -> Vec<&Job> {
    let mut jobs: Vec<&Job> = p.graph.node_weights().collect();
    jobs.sort_by(|a, b| a.worker.cmp(&b.worker));
    jobs
}

fn sorted_edges(p: &Pipeline) -> Vec<(&str, &str)> {
    let mut edges: Vec<(&str, &str)> = p
        .edges()
        .map(|(a, b)| (p.graph[a].worker.as_str(), p.graph[b].worker.as_str()))
        .collect();
    edges.sort_unstable();
    edges
}

impl Serialize for Pipeline {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_legacy().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Pipeline {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        Pipeline::from_legacy(&value).map_err(serde::de::Error::custom)
    }
}

/// Builds a [`Pipeline`]; jobs are named by worker and created on first mention.
#[derive(Debug, Default, Clone)]
pub struct PipelineBuilder {
    jobs: Vec<Job>,
    by_name: HashMap<String, usize>,
    edge_indices: Vec<(usize, usize)>,
    data: Option<Value>,
}

impl PipelineBuilder {
    fn node(&mut self, job: Job) -> usize {
        if let Some(&i) = self.by_name.get(&job.worker) {
            return i;
        }
        self.by_name.insert(job.worker.clone(), self.jobs.len());
        self.jobs.push(job);
        self.jobs.len() - 1
    }

    /// Adds a job (with no edge, unless others mention it).
    pub fn job(mut self, worker: impl Into<String>) -> Self {
        self.node(Job::new(worker));
        self
    }

    /// Adds a job with data of its own instead of the pipeline's.
    pub fn job_with_data(mut self, worker: impl Into<String>, data: Map<String, Value>) -> Self {
        self.node(Job {
            worker: worker.into(),
            data: Some(data),
        });
        self
    }

    /// Adds the edge `from → to`: `to` runs after `from` finished.
    pub fn edge(mut self, from: impl Into<String>, to: impl Into<String>) -> Self {
        let a = self.node(Job::new(from));
        let b = self.node(Job::new(to));
        self.edge_indices.push((a, b));
        self
    }

    /// Adds `from → to` for each `to` (the legacy `{Job(from): [Job(b), Job(c)]}`).
    pub fn edges<I, S>(mut self, from: impl Into<String>, to: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let from = from.into();
        for t in to {
            self = self.edge(from.clone(), t);
        }
        self
    }

    /// Sets the pipeline's data (a JSON object, or `null` for none).
    pub fn data(mut self, data: Value) -> Self {
        self.data = Some(data);
        self
    }

    /// Checks and builds the pipeline.
    ///
    /// # Errors
    /// [`PipelineError::Empty`], [`PipelineError::Cycle`], [`PipelineError::NoStarter`],
    /// [`PipelineError::EmptyWorkerName`] or [`PipelineError::DataNotObject`].
    pub fn build(self) -> Result<Pipeline, PipelineError> {
        let data = match self.data {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) => Some(m),
            Some(other) => return Err(PipelineError::DataNotObject(json_type_name(&other).into())),
        };
        let mut graph = DiGraph::with_capacity(self.jobs.len(), self.edge_indices.len());
        let nodes: Vec<NodeIndex> = self
            .jobs
            .into_iter()
            .map(|mut job| {
                // A job whose data is the pipeline's is a legacy copy, not data of its own.
                if job.data.is_some() && job.data == data {
                    job.data = None;
                }
                graph.add_node(job)
            })
            .collect();
        for (a, b) in self.edge_indices {
            graph.update_edge(nodes[a], nodes[b], ());
        }
        let pipeline = Pipeline { graph, data };
        pipeline.validate()?;
        Ok(pipeline)
    }
}

/// Which jobs of one pipeline have finished, and which may run now.
///
/// ```
/// use pypelinin_common::pipeline::{Pipeline, RunState};
/// let p = Pipeline::builder().edges("A", ["B", "C"]).edge("B", "D").edge("C", "D").build().unwrap();
/// let mut run = RunState::new(&p);
/// let a = p.find("A").unwrap();
/// assert_eq!(run.runnable_at_start(&p), vec![a]);
/// assert_eq!(run.finish(&p, a).len(), 2); // B and C
/// run.finish(&p, p.find("B").unwrap());
/// assert!(run.finish(&p, p.find("B").unwrap()).is_empty()); // idempotent
/// assert_eq!(run.finish(&p, p.find("C").unwrap()), vec![p.find("D").unwrap()]); // fan-in
/// assert!(run.is_last(p.find("D").unwrap()));
/// run.finish(&p, p.find("D").unwrap());
/// assert!(run.is_complete());
/// ```
#[derive(Debug, Clone)]
pub struct RunState {
    parents_left: Vec<u32>,
    finished: Vec<bool>,
    left: usize,
}

impl RunState {
    /// Nothing finished yet.
    pub fn new(pipeline: &Pipeline) -> Self {
        let parents_left = pipeline
            .graph
            .node_indices()
            .map(|i| pipeline.parents(i).count() as u32)
            .collect();
        Self {
            parents_left,
            finished: vec![false; pipeline.len()],
            left: pipeline.len(),
        }
    }

    /// The jobs to submit first: the starters.
    pub fn runnable_at_start(&self, pipeline: &Pipeline) -> Vec<JobIndex> {
        pipeline.starters().collect()
    }

    /// Marks `job` finished and returns the jobs that became runnable (all their parents
    /// finished). Finishing a job twice changes nothing and returns nothing.
    pub fn finish(&mut self, pipeline: &Pipeline, job: JobIndex) -> Vec<JobIndex> {
        let Some(done) = self.finished.get_mut(job.index()) else {
            return Vec::new();
        };
        if *done {
            return Vec::new();
        }
        *done = true;
        self.left -= 1;
        let mut ready = Vec::new();
        for child in pipeline.children(job) {
            let n = &mut self.parents_left[child.index()];
            *n -= 1;
            if *n == 0 {
                ready.push(child);
            }
        }
        ready.sort_unstable();
        ready
    }

    /// Whether `job` has finished.
    pub fn is_finished(&self, job: JobIndex) -> bool {
        self.finished.get(job.index()).copied().unwrap_or(false)
    }

    /// Whether every job has finished.
    pub fn is_complete(&self) -> bool {
        self.left == 0
    }

    /// Whether `job` is the only job left unfinished: the pipeline ends when it finishes.
    pub fn is_last(&self, job: JobIndex) -> bool {
        self.left == 1 && !self.is_finished(job)
    }
}

fn dot_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// How a JSON value's type reads in an error message ("a number", "an object", ...).
pub fn json_type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn map_to_pairs(map: &Map<String, Value>) -> Value {
    Value::Array(
        map.iter()
            .map(|(k, v)| Value::Array(vec![Value::String(k.clone()), v.clone()]))
            .collect(),
    )
}

/// A list of `[string, value]` pairs, or an object, as a map (Python's `dict()`).
fn pairs_to_map(value: &Value) -> Option<Map<String, Value>> {
    match value {
        Value::Object(m) => Some(m.clone()),
        Value::Array(items) => items
            .iter()
            .map(|item| match item.as_array().map(Vec::as_slice) {
                Some([Value::String(k), v]) => Some((k.clone(), v.clone())),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

/// A serialized pipeline read without reading any data: its edges, each job's worker, and the
/// text of each data.
struct LegacyText<'a> {
    edges: Vec<(JobText<'a>, Option<JobText<'a>>)>,
    data: Option<&'a RawValue>,
}

/// A job of a [`LegacyText`].
struct JobText<'a> {
    worker: String,
    data: Option<&'a RawValue>,
}

impl<'a> LegacyText<'a> {
    fn read(text: &'a str) -> Result<Self, PipelineError> {
        let fmt_err = |m: &str| PipelineError::Format(m.to_owned());
        let top: &RawValue =
            serde_json::from_str(text).map_err(|e| PipelineError::Format(e.to_string()))?;
        let top = raw_pairs(top).ok_or_else(|| {
            fmt_err("expected a list of [key, value] pairs with \"graph\" and \"data\"")
        })?;
        let data = last(&top, "data")
            .map(|d| check_data(d).map(|()| d))
            .transpose()?
            .filter(|d| d.get() != "null");
        let graph = last(&top, "graph").ok_or_else(|| fmt_err("missing \"graph\""))?;
        let graph: Vec<&RawValue> = serde_json::from_str(graph.get())
            .map_err(|_| fmt_err("\"graph\" must be a list of [from, to] edges"))?;
        let edges = graph
            .into_iter()
            .map(|edge| {
                let (from, to): (&RawValue, &RawValue) = serde_json::from_str(edge.get())
                    .map_err(|_| fmt_err("each edge of \"graph\" must be a list [from, to]"))?;
                let to = match to.get() {
                    "null" => None,
                    _ => Some(JobText::read(to)?),
                };
                Ok((JobText::read(from)?, to))
            })
            .collect::<Result<_, PipelineError>>()?;
        Ok(Self { edges, data })
    }
}

impl<'a> JobText<'a> {
    fn read(raw: &'a RawValue) -> Result<Self, PipelineError> {
        let pairs = raw_pairs(raw).ok_or_else(|| {
            PipelineError::Format(
                "a job must be a list of pairs such as [[\"worker_name\", \"A\"]]".into(),
            )
        })?;
        let worker = match last(&pairs, "worker_name") {
            Some(w) => serde_json::from_str::<String>(w.get())
                .map_err(|_| PipelineError::Format("\"worker_name\" must be a string".into()))?,
            None => return Err(PipelineError::Format("a job lacks \"worker_name\"".into())),
        };
        let data = last(&pairs, "data")
            .map(|d| check_data(d).map(|()| d))
            .transpose()?
            .filter(|d| d.get() != "null");
        Ok(Self { worker, data })
    }
}

/// A list of `[key, value]` pairs or an object, each value left as text.
fn raw_pairs(raw: &RawValue) -> Option<Vec<(Cow<'_, str>, &RawValue)>> {
    raw_pairs_of(raw.get())
}

/// As [`raw_pairs`], of JSON text (which may have white space around it).
fn raw_pairs_of(text: &str) -> Option<Vec<(Cow<'_, str>, &RawValue)>> {
    match text.trim_start().as_bytes().first() {
        Some(b'[') => serde_json::from_str::<Vec<(Key<'_>, &RawValue)>>(text)
            .ok()
            .map(|pairs| pairs.into_iter().map(|(k, v)| (k.0, v)).collect()),
        Some(b'{') => serde_json::from_str::<RawObject<'_>>(text)
            .ok()
            .map(|o| o.0),
        _ => None,
    }
}

/// The value of the last `key` of `pairs` (a later pair replaces an earlier one, as in a map).
fn last<'a>(pairs: &[(Cow<'_, str>, &'a RawValue)], key: &str) -> Option<&'a RawValue> {
    pairs.iter().rev().find(|(k, _)| k == key).map(|(_, v)| *v)
}

/// Checks that data is `null`, pairs or an object, without reading its values.
fn check_data(raw: &RawValue) -> Result<(), PipelineError> {
    if raw.get() == "null" || raw_pairs(raw).is_some() {
        Ok(())
    } else {
        Err(PipelineError::Format(
            "\"data\" must be null or a list of [key, value] pairs".into(),
        ))
    }
}

/// Data (pairs or an object, not `null`) as a map, each value parsed once.
fn parse_data(raw: &RawValue) -> Result<Map<String, Value>, PipelineError> {
    let format =
        || PipelineError::Format("\"data\" must be null or a list of [key, value] pairs".into());
    raw_pairs(raw)
        .ok_or_else(format)?
        .into_iter()
        .map(|(k, v)| {
            Ok((
                k.into_owned(),
                serde_json::from_str(v.get()).map_err(|_| format())?,
            ))
        })
        .collect()
}

fn read_data(value: &Value) -> Result<Option<Map<String, Value>>, PipelineError> {
    if value.is_null() {
        return Ok(None);
    }
    pairs_to_map(value).map(Some).ok_or_else(|| {
        PipelineError::Format("\"data\" must be null or a list of [key, value] pairs".into())
    })
}

/// Reads a job; data equal to the pipeline's (the copy the original writes into every job)
/// is the pipeline's, not the job's own.
fn read_job(
    value: &Value,
    pipeline_data: Option<&Map<String, Value>>,
) -> Result<Job, PipelineError> {
    let map = pairs_to_map(value).ok_or_else(|| {
        PipelineError::Format(
            "a job must be a list of pairs such as [[\"worker_name\", \"A\"]]".into(),
        )
    })?;
    let worker = match map.get("worker_name") {
        Some(Value::String(w)) => w.clone(),
        Some(_) => {
            return Err(PipelineError::Format(
                "\"worker_name\" must be a string".into(),
            ))
        }
        None => return Err(PipelineError::Format("a job lacks \"worker_name\"".into())),
    };
    let data = match map.get("data") {
        None => None,
        Some(d) => read_data(d)?.filter(|d| Some(d) != pipeline_data),
    };
    Ok(Job { worker, data })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_the_legacy_example() {
        let v = json!([
            ["graph", [[[["worker_name", "A"]], [["worker_name", "B"]]]]],
            ["data", [["doc", 7]]]
        ]);
        let p = Pipeline::from_legacy(&v).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(
            p.data(),
            Some(&json!({"doc": 7}).as_object().cloned().unwrap())
        );
        assert_eq!(p.job_data(p.find("B").unwrap()), json!({"doc": 7}));
        // Emitted in the legacy order; the jobs hold no copy of the pipeline's data.
        let compact = json!([
            ["graph", [[[["worker_name", "A"]], [["worker_name", "B"]]]]],
            ["data", [["doc", 7]]]
        ]);
        assert_eq!(p.to_legacy(), compact);
        // The original's writers copy the data into every job: the copies are the pipeline's
        // data, not the jobs' own, and are not written back.
        let copied = json!([
            [
                "graph",
                [[
                    [["worker_name", "A"], ["data", [["doc", 7]]]],
                    [["worker_name", "B"], ["data", [["doc", 7]]]]
                ]]
            ],
            ["data", [["doc", 7]]]
        ]);
        let p = Pipeline::from_legacy(&copied).unwrap();
        assert_eq!(p.job(p.find("A").unwrap()).data, None);
        assert_eq!(p.job_data(p.find("A").unwrap()), json!({"doc": 7}));
        assert_eq!(p.to_legacy(), compact);
    }

    #[test]
    fn a_job_with_data_of_its_own_keeps_it() {
        let own = json!({"doc": 8}).as_object().cloned().unwrap();
        let p = Pipeline::builder()
            .job_with_data("B", own.clone())
            .edge("A", "B")
            .data(json!({"doc": 7}))
            .build()
            .unwrap();
        let back = Pipeline::from_legacy(&p.to_legacy()).unwrap();
        assert_eq!(back.job_data(back.find("A").unwrap()), json!({"doc": 7}));
        assert_eq!(back.job_data(back.find("B").unwrap()), json!({"doc": 8}));
        assert_eq!(back.job(back.find("B").unwrap()).data, Some(own));
    }

    #[test]
    fn accepts_objects_and_any_pair_order_and_lone_jobs() {
        let v = json!({"data": null, "graph": [[{"worker_name": "A"}, [["worker_name","B"]]], [[["worker_name","C"]], null]]});
        let p = Pipeline::from_legacy(&v).unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p.job_data(p.find("C").unwrap()), Value::Null);
        assert_eq!(
            p.to_legacy(),
            json!([
                [
                    "graph",
                    [
                        [[["worker_name", "A"]], [["worker_name", "B"]]],
                        [[["worker_name", "C"]], null]
                    ]
                ],
                ["data", null]
            ])
        );
    }

    #[test]
    fn rejects_invalid_pipelines_with_clear_errors() {
        let cyc = Pipeline::builder().edge("A", "B").edge("B", "A").build();
        assert!(matches!(cyc, Err(PipelineError::Cycle(_))));
        let self_loop = Pipeline::builder().edge("A", "A").build();
        assert!(matches!(self_loop, Err(PipelineError::Cycle(_))));
        let with_starter_and_cycle = Pipeline::builder()
            .edge("S", "A")
            .edge("A", "B")
            .edge("B", "A")
            .build();
        assert!(matches!(
            with_starter_and_cycle,
            Err(PipelineError::Cycle(_))
        ));
        assert_eq!(Pipeline::builder().build(), Err(PipelineError::Empty));
        assert_eq!(
            Pipeline::builder().job("").build(),
            Err(PipelineError::EmptyWorkerName)
        );
        assert!(matches!(
            Pipeline::builder().job("A").data(json!(3)).build(),
            Err(PipelineError::DataNotObject(_))
        ));
        for bad in [
            json!(1),
            json!([["graph", 3]]),
            json!([["data", null]]),
            json!([["graph", [[1, 2]]]]),
            json!([["graph", [[[["worker_name", 5]], null]]]]),
            json!([["graph", [[[["x", "A"]], null]]]]),
            json!([["graph", [[[["worker_name", "A"]]]]]]),
            json!([["graph", []]]),
            json!([["graph", [[[["worker_name", "A"]], null]]], ["data", 7]]),
            json!([["graph", [[[["worker_name", "A"], ["data", "x"]], null]]]]),
            json!([["graph", [[[["worker_name", "A"]], [["worker_name", "A"]]]]]]),
        ] {
            let error = Pipeline::from_legacy(&bad).expect_err(&bad.to_string());
            // Read from its text, with or without its data read: the same error.
            let text = bad.to_string();
            assert_eq!(
                Pipeline::from_legacy_text(&text).err(),
                Some(error.clone()),
                "{bad}"
            );
            assert_eq!(
                Pipeline::check_legacy_text(&text).err(),
                Some(error),
                "{bad}"
            );
        }
    }

    #[test]
    fn text_is_read_as_its_value_is() {
        for value in [
            json!([
                [
                    "graph",
                    [[
                        [["worker_name", "A"], ["data", [["k", 1]]]],
                        [["worker_name", "B"]]
                    ]]
                ],
                ["data", [["k", 2], ["big", "é".repeat(100)]]]
            ]),
            json!({"data": {"k": [1, {"n": null}]}, "graph": [[{"worker_name": "A"}, null]]}),
            // A later pair replaces an earlier one, as in a map.
            json!([
                ["graph", []],
                ["graph", [[[["worker_name", "C"]], null]]],
                ["data", null]
            ]),
        ] {
            let text = format!(" {value} ");
            let from_value = Pipeline::from_legacy(&value).expect("valid");
            assert_eq!(
                Pipeline::from_legacy_text(&text),
                Ok(from_value.clone()),
                "{value}"
            );
            assert_eq!(Pipeline::check_legacy_text(&text), Ok(()));
            let data_text = Pipeline::legacy_data_text(&text).expect("valid");
            assert_eq!(
                data_text.map(|d| serde_json::from_str::<Map<String, Value>>(d.get()).unwrap()),
                from_value.data().cloned(),
                "{value}"
            );
        }
    }

    #[test]
    fn dot_is_the_legacy_text() {
        let p = Pipeline::builder()
            .edge("B", "C")
            .edge("A", "B")
            .build()
            .unwrap();
        assert_eq!(
            p.to_dot(),
            "digraph graphname {\n    \"A\";\n    \"B\";\n    \"C\";\n\n    \"A\" -> \"B\";\n    \"B\" -> \"C\";\n}"
        );
        let tricky = Pipeline::builder().job("say \"hi\"\\").build().unwrap();
        assert!(tricky.to_dot().contains(r#""say \"hi\"\\";"#));
        let dir = std::env::temp_dir().join(format!("pypelinin-dot-{}", std::process::id()));
        p.save_dot(&dir).unwrap();
        assert_eq!(std::fs::read_to_string(&dir).unwrap(), p.to_string());
        std::fs::remove_file(dir).unwrap();
    }

    #[test]
    fn run_state_walks_fan_out_and_fan_in() {
        let p = Pipeline::builder()
            .edges("A", ["B", "C"])
            .edge("B", "D")
            .edge("C", "D")
            .job("E")
            .build()
            .unwrap();
        let idx = |w| p.find(w).unwrap();
        let mut run = RunState::new(&p);
        assert_eq!(run.runnable_at_start(&p), vec![idx("A"), idx("E")]);
        assert_eq!(run.finish(&p, idx("A")), vec![idx("B"), idx("C")]);
        assert!(run.finish(&p, idx("B")).is_empty());
        assert_eq!(run.finish(&p, idx("C")), vec![idx("D")]);
        assert!(!run.is_complete());
        run.finish(&p, idx("D"));
        run.finish(&p, idx("E"));
        assert!(run.is_complete());
        assert!(run.is_finished(idx("D")));
    }
}
