//! `send_pipelines`: submits one pipeline per document of the corpus and waits for them.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use pypelinin_client::{Outcome, PipelineId, PipelineManager};
use pypelinin_example::{cluster, corpus};

/// Sends the example's pipelines (Downloader → GetTextAndWords, GetLinks → Summarize, and
/// TextStats) for the bundled corpus, and waits for them.
#[derive(Debug, Parser)]
#[command(name = "send_pipelines", version)]
struct Cli {
    /// The router's API endpoint.
    #[arg(long, default_value = pypelinin_common::DEFAULT_API)]
    api: String,
    /// The router's broadcast endpoint.
    #[arg(long, default_value = pypelinin_common::DEFAULT_BROADCAST)]
    broadcast: String,
    /// Number of pipelines [default: one per bundled document]; documents repeat past that.
    #[arg(long)]
    count: Option<usize>,
    /// Where the documents are: http://host:port/ or file:///folder/ [default: the bundled corpus as file:// URLs].
    #[arg(long)]
    base_url: Option<String>,
    /// Seconds to wait for all pipelines before giving up.
    #[arg(long, default_value_t = 120.0)]
    timeout: f64,
    /// Folder of the example's data, where the DOT file goes [default:
    /// <temp>/pypelinin-example-<uid>/<api endpoint>, as my_router's].
    #[arg(long)]
    home: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    pypelinin_common::daemon::telemetry::init();
    match run(Cli::parse()).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<bool> {
    let home = cli
        .home
        .clone()
        .unwrap_or_else(|| cluster::default_home(&cli.api));
    std::fs::create_dir_all(&home).with_context(|| format!("cannot create {}", home.display()))?;
    let documents = corpus::documents(&corpus::data_dir())?;
    anyhow::ensure!(!documents.is_empty(), "the corpus is empty");
    let base = match cli.base_url {
        Some(b) if b.ends_with('/') => b,
        Some(b) => format!("{b}/"),
        None => corpus::file_base_url(&corpus::data_dir())?,
    };
    let count = cli.count.unwrap_or(documents.len());

    // Its error names the endpoint and asks whether the router runs.
    let mut manager = PipelineManager::connect(&cli.api, &cli.broadcast).await?;

    let dot = home.join("pipeline.dot");
    let sample = cluster::document_pipeline("sample", &format!("{base}sample.html"))?;
    sample.save_dot(&dot)?;
    let svg = home.join("pipeline.svg");
    let has_svg = std::process::Command::new("dot")
        .arg("-Tsvg")
        .arg(&dot)
        .arg("-o")
        .arg(&svg)
        .status()
        .is_ok_and(|s| s.success());

    let bar = ProgressBar::new(count as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} pipelines  {per_sec}  ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let mut names: HashMap<PipelineId, String> = HashMap::new();
    for i in 0..count {
        let file = &documents[i % documents.len()];
        let doc = cluster::document_name(file);
        let name = if count > documents.len() {
            format!("{doc}-{i}")
        } else {
            doc
        };
        let pipeline = cluster::document_pipeline(&name, &format!("{base}{file}"))?;
        let id = manager.start(&pipeline).await?;
        names.insert(id, name);
    }

    let deadline = started + Duration::from_secs_f64(cli.timeout.max(0.0));
    let mut durations = Vec::new();
    let mut failures = Vec::new();
    let mut done = 0;
    while done < count {
        let left = deadline.saturating_duration_since(Instant::now());
        match manager.wait_any(left).await? {
            Some((id, outcome)) => {
                done += 1;
                bar.inc(1);
                match outcome {
                    Outcome::Finished(secs) => durations.push(secs),
                    Outcome::Failed(f) => failures.push(format!("{} ({}): {f}", id, names[&id])),
                    Outcome::Cancelled => {
                        failures.push(format!("{} ({}): cancelled", id, names[&id]))
                    }
                    Outcome::Unknown => {
                        failures.push(format!("{} ({}): the router forgot it", id, names[&id]))
                    }
                }
            }
            None => break,
        }
    }
    bar.finish_and_clear();
    let elapsed = started.elapsed().as_secs_f64();
    let finished = durations.len();
    let average = if finished > 0 {
        durations.iter().sum::<f64>() / finished as f64
    } else {
        0.0
    };
    println!(
        "{finished} pipelines finished in {elapsed:.2} s ({:.1} pipelines/s, average pipeline duration {average:.3} s)",
        finished as f64 / elapsed.max(1e-9)
    );
    println!(
        "pipeline graph: {}{}",
        dot.display(),
        if has_svg {
            format!(" and {}", svg.display())
        } else {
            String::new()
        }
    );
    let timed_out = count - done;
    for f in &failures {
        eprintln!("failed: {f}");
    }
    if timed_out > 0 {
        eprintln!(
            "{timed_out} pipeline(s) did not finish within {} s",
            cli.timeout
        );
    }
    Ok(failures.is_empty() && timed_out == 0)
}
