//! The example's workers: the legacy example's Downloader, GetTextAndWords, GetLinks, plus a
//! fan-in Summarize, and a Python process worker (`workers/stats.py`).

use std::collections::BTreeMap;
use std::time::Duration;

use pypelinin_broker::process::ProcessWorker;
use pypelinin_broker::worker::{BoxError, TypedWorker, WorkerRegistry, WorkerResult};
use serde::{Deserialize, Serialize};

/// Fetches a document over HTTP or from a `file://` URL.
pub struct Downloader;

/// What the Downloader needs.
#[derive(Debug, Deserialize)]
pub struct UrlInput {
    /// The document's address.
    pub url: String,
}

/// What the Downloader gives.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Downloaded {
    /// The document.
    pub html: String,
    /// Its size in bytes.
    pub length: usize,
}

impl TypedWorker for Downloader {
    type Input = UrlInput;
    type Output = Downloaded;
    const NAME: &'static str = "Downloader";
    const REQUIRES: &'static [&'static str] = &["url"];

    fn process(&self, input: UrlInput) -> WorkerResult<Downloaded> {
        let url =
            url::Url::parse(&input.url).map_err(|e| format!("bad url {:?}: {e}", input.url))?;
        let html = match url.scheme() {
            "file" => {
                let path = url
                    .to_file_path()
                    .map_err(|()| format!("bad file url {url}"))?;
                std::fs::read_to_string(&path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?
            }
            "http" => {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .timeout_global(Some(Duration::from_secs(10)))
                    .build()
                    .into();
                agent
                    .get(url.as_str())
                    .call()
                    .map_err(|e| format!("GET {url}: {e}"))?
                    .body_mut()
                    .read_to_string()
                    .map_err(|e| format!("GET {url}: {e}"))?
            }
            other => return Err(format!("unsupported scheme {other:?} in {url}").into()),
        };
        Ok(Downloaded {
            length: html.len(),
            html,
        })
    }
}

/// The text of a document without markup, and how often each word occurs.
pub struct GetTextAndWords;

/// An HTML document.
#[derive(Debug, Deserialize)]
pub struct HtmlInput {
    /// The document.
    pub html: String,
}

/// Text and word frequencies.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct TextAndWords {
    /// The text, markup removed.
    pub text: String,
    /// Lower-case word → occurrences.
    pub words: BTreeMap<String, u64>,
}

impl TypedWorker for GetTextAndWords {
    type Input = HtmlInput;
    type Output = TextAndWords;
    const NAME: &'static str = "GetTextAndWords";
    const REQUIRES: &'static [&'static str] = &["html"];

    fn process(&self, input: HtmlInput) -> WorkerResult<TextAndWords> {
        let text = html_text(&input.html)?;
        Ok(TextAndWords {
            words: word_counts(&text),
            text,
        })
    }
}

/// The links of a document, made absolute.
pub struct GetLinks;

/// An HTML document and its address.
#[derive(Debug, Deserialize)]
pub struct HtmlAndUrl {
    /// The document.
    pub html: String,
    /// Its address (links are resolved against it).
    pub url: String,
}

/// Links.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Links {
    /// Absolute URLs, in document order.
    pub links: Vec<String>,
}

impl TypedWorker for GetLinks {
    type Input = HtmlAndUrl;
    type Output = Links;
    const NAME: &'static str = "GetLinks";
    const REQUIRES: &'static [&'static str] = &["html", "url"];

    fn process(&self, input: HtmlAndUrl) -> WorkerResult<Links> {
        let base =
            url::Url::parse(&input.url).map_err(|e| format!("bad url {:?}: {e}", input.url))?;
        let dom = tl::parse(&input.html, tl::ParserOptions::default())
            .map_err(|e| format!("cannot parse HTML: {e}"))?;
        let links = dom
            .nodes()
            .iter()
            .filter_map(|n| n.as_tag())
            .filter(|t| t.name().as_utf8_str().eq_ignore_ascii_case("a"))
            .filter_map(|t| t.attributes().get("href").flatten())
            .filter_map(|href| base.join(&decode_entities(&href.as_utf8_str())).ok())
            .map(|u| u.to_string())
            .collect();
        Ok(Links { links })
    }
}

/// Fan-in: needs the results of both GetTextAndWords and GetLinks.
pub struct Summarize;

/// Word counts and links.
#[derive(Debug, Deserialize)]
pub struct SummaryInput {
    /// From GetTextAndWords.
    pub words: BTreeMap<String, u64>,
    /// From GetLinks.
    pub links: Vec<String>,
}

/// A summary of a document.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    /// The five most frequent words (ties by alphabetical order), with their counts.
    pub top_words: Vec<(String, u64)>,
    /// Number of distinct words.
    pub distinct_words: usize,
    /// Number of links.
    pub link_count: usize,
}

/// The result of Summarize, kept under `summary`.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct SummaryOutput {
    /// The summary.
    pub summary: Summary,
}

impl TypedWorker for Summarize {
    type Input = SummaryInput;
    type Output = SummaryOutput;
    const NAME: &'static str = "Summarize";
    const REQUIRES: &'static [&'static str] = &["words", "links"];

    fn process(&self, input: SummaryInput) -> WorkerResult<SummaryOutput> {
        let mut words: Vec<(String, u64)> = input.words.into_iter().collect();
        let distinct_words = words.len();
        words.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        words.truncate(5);
        Ok(SummaryOutput {
            summary: Summary {
                top_words: words,
                distinct_words,
                link_count: input.links.len(),
            },
        })
    }
}

/// A worker that does nothing (for benchmarks and tests): returns an empty result.
pub struct Noop(pub String);

impl pypelinin_broker::worker::Worker for Noop {
    fn name(&self) -> &str {
        &self.0
    }

    fn process(
        &self,
        _input: pypelinin_broker::JsonObject,
    ) -> WorkerResult<pypelinin_broker::JsonObject> {
        Ok(pypelinin_broker::JsonObject::new())
    }
}

/// The name of the `i`-th no-op worker: `Noop0`, `Noop1`, ...
pub fn noop_name(i: usize) -> String {
    format!("Noop{i}")
}

/// The Python process worker: text statistics, in `workers/stats.py`, on a pool of two
/// long-lived `python3` processes.
pub fn stats_worker() -> ProcessWorker {
    ProcessWorker {
        name: Some("TextStats".into()),
        names: Vec::new(),
        requires: vec!["text".into()],
        command: vec![
            "python3".into(),
            concat!(env!("CARGO_MANIFEST_DIR"), "/workers/stats.py").into(),
        ],
        processes: 2,
        max_jobs_per_process: None,
        timeout_secs: Some(30.0),
        workdir: None,
        hello_timeout_secs: None,
        retry_secs: None,
    }
}

/// Every example worker, plus `noop` no-op workers (`Noop0`, ...).
///
/// # Errors
/// Never in practice: the names are distinct.
pub fn registry(noop: usize) -> Result<WorkerRegistry, pypelinin_broker::worker::RegistryError> {
    let mut r = WorkerRegistry::new();
    for i in 0..noop {
        r.add(Noop(noop_name(i)))?;
    }
    r.add_typed(Downloader)?
        .add_typed(GetTextAndWords)?
        .add_typed(GetLinks)?
        .add_typed(Summarize)?;
    r.add_process(stats_worker())?;
    Ok(r)
}

/// The text of an HTML document: text nodes outside `<head>`, `<script>` and `<style>`,
/// joined by spaces, entities decoded.
///
/// # Errors
/// When the HTML cannot be parsed.
pub fn html_text(html: &str) -> Result<String, BoxError> {
    let dom = tl::parse(html, tl::ParserOptions::default())
        .map_err(|e| format!("cannot parse HTML: {e}"))?;
    let parser = dom.parser();
    let mut parts: Vec<String> = Vec::new();
    let mut stack: Vec<tl::NodeHandle> = dom.children().iter().rev().copied().collect();
    while let Some(handle) = stack.pop() {
        match handle.get(parser) {
            Some(tl::Node::Tag(tag)) => {
                let name = tag.name().as_utf8_str().to_ascii_lowercase();
                if matches!(name.as_str(), "head" | "script" | "style") {
                    continue;
                }
                let children: Vec<tl::NodeHandle> = tag.children().top().iter().copied().collect();
                stack.extend(children.into_iter().rev());
            }
            Some(tl::Node::Raw(raw)) => {
                let text = decode_entities(raw.as_utf8_str().trim());
                if !text.is_empty() {
                    parts.push(text);
                }
            }
            _ => {}
        }
    }
    Ok(parts.join(" "))
}

/// Lower-case words (runs of letters and digits) → occurrences.
pub fn word_counts(text: &str) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for word in text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        *counts.entry(word.to_lowercase()).or_insert(0) += 1;
    }
    counts
}

fn decode_entities(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&nbsp;", " ")
        .replace("&amp;", "&")
}

#[cfg(test)]
mod tests {
    use super::*;
    use pypelinin_broker::local::run_pipeline;
    use pypelinin_broker::FileStore;
    use std::sync::Arc;

    #[test]
    fn text_skips_head_and_style_and_decodes_entities() {
        let html = "<html><head><title>T</title><style>p {}</style></head><body><h1>Hi</h1><p>a &amp; b</p><script>x()</script></body></html>";
        assert_eq!(html_text(html).unwrap(), "Hi a & b");
        let counts = word_counts("The cat, the CAT and the hat.");
        assert_eq!(counts["the"], 3);
        assert_eq!(counts["cat"], 2);
        assert_eq!(counts.len(), 4);
    }

    #[test]
    fn links_are_made_absolute() {
        let out = GetLinks
            .process(HtmlAndUrl {
                html: r#"<a href="b.html">B</a> <a href="/c.html">C</a> <a href="http://x.org/d">D</a> <a>none</a>"#.into(),
                url: "http://127.0.0.1:9/docs/a.html".into(),
            })
            .unwrap();
        assert_eq!(
            out.links,
            [
                "http://127.0.0.1:9/docs/b.html",
                "http://127.0.0.1:9/c.html",
                "http://x.org/d"
            ]
        );
    }

    #[test]
    fn the_summary_keeps_the_five_most_frequent_words() {
        let words = [
            ("a", 5),
            ("b", 5),
            ("c", 1),
            ("d", 2),
            ("e", 3),
            ("f", 4),
            ("g", 1),
        ];
        let out = Summarize
            .process(SummaryInput {
                words: words.iter().map(|(w, n)| ((*w).to_owned(), *n)).collect(),
                links: vec!["x".into()],
            })
            .unwrap();
        let top: Vec<&str> = out
            .summary
            .top_words
            .iter()
            .map(|(w, _)| w.as_str())
            .collect();
        assert_eq!(top, ["a", "b", "f", "e", "d"]);
        assert_eq!((out.summary.distinct_words, out.summary.link_count), (7, 1));
    }

    #[tokio::test]
    async fn the_document_pipeline_runs_in_local_mode() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FileStore::new(dir.path(), None).unwrap());
        let base = crate::corpus::file_base_url(&crate::corpus::data_dir()).unwrap();
        let pipeline =
            crate::cluster::document_pipeline("bees", &format!("{base}bees.html")).unwrap();
        let run = run_pipeline(&pipeline, &registry(0).unwrap(), store)
            .await
            .unwrap();
        assert_eq!(run.finished.len(), 5);
        assert_eq!(run.finished[0], "Downloader");
        assert_eq!(
            run.finished
                .iter()
                .position(|w| w == "Summarize")
                .map(|i| i >= 3),
            Some(true)
        );
        let doc = FileStore::read_document(&dir.path().join("bees.json")).unwrap();
        assert_eq!(doc["words"]["bees"], 4);
        assert_eq!(doc["summary"]["link_count"], 4);
        assert_eq!(doc["links"][3], "http://example.org/wiki/bees");
        assert_eq!(doc["stats"]["sentences"], 4);
    }

    #[tokio::test]
    async fn a_failing_job_stops_the_local_run() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FileStore::new(dir.path(), None).unwrap());
        let pipeline =
            crate::cluster::document_pipeline("missing", "file:///nonexistent/missing.html")
                .unwrap();
        let failure = run_pipeline(&pipeline, &registry(0).unwrap(), store)
            .await
            .unwrap_err();
        assert_eq!(failure.worker, "Downloader");
        assert!(
            failure
                .error
                .contains("cannot read /nonexistent/missing.html"),
            "{}",
            failure.error
        );
        assert!(failure.finished.is_empty());
    }
}
