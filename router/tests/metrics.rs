//! `--metrics`: a scrape parses with a Prometheus (OpenMetrics) text parser, and its counters,
//! gauges and histograms equal what the test did.

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};

use pypelinin_router::RouterSettings;
use serde_json::{json, Map};

use crate::support::TestRouter;

/// A sample's labels, sorted by name.
type Labels = Vec<(String, String)>;
/// Samples by name and labels.
type Samples = HashMap<(String, Labels), f64>;

/// Parses OpenMetrics text with the reference parser (Python's `prometheus_client`), as
/// `(name, labels) → value`.
fn parse(text: &str) -> Samples {
    let script = "import sys, json\n\
        from prometheus_client.openmetrics.parser import text_string_to_metric_families as p\n\
        print(json.dumps([[s.name, sorted(s.labels.items()), s.value] \
        for f in p(sys.stdin.read()) for s in f.samples]))";
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs (pip install -r requirements-dev.txt)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the OpenMetrics parser refused the scrape: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let samples: Vec<(String, Labels, f64)> = serde_json::from_slice(&out.stdout).unwrap();
    samples
        .into_iter()
        .map(|(name, labels, value)| ((name, labels), value))
        .collect()
}

fn sample(samples: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut key: Labels = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    key.sort();
    *samples
        .get(&(name.to_owned(), key))
        .unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_parses_and_counts_what_happened() {
    let data = tempfile::tempdir().unwrap();
    let settings = RouterSettings {
        metrics: Some("127.0.0.1:0".into()),
        data_dir: Some(data.path().to_owned()),
        ..RouterSettings::default()
    };
    let router = TestRouter::start_settings(Map::new(), settings).await;
    let mut c = router.client().await;
    let mut ids = Vec::new();
    for n in 0..3 {
        let reply = router
            .ask(
                &mut c,
                json!({"command": "add job", "worker": "A", "data": {"n": n}}),
            )
            .await;
        ids.push(reply["job id"].as_str().unwrap().to_owned());
    }
    let taken = router
        .ask(
            &mut c,
            json!({"command": "get jobs", "workers": ["A"], "max": 2}),
        )
        .await;
    assert_eq!(taken["jobs"].as_array().unwrap().len(), 2);
    let done = json!({"command": "job finished", "job id": ids[0], "duration": 0.02});
    assert_eq!(router.ask(&mut c, done).await["answer"], "good job!");
    let failed = json!({"command": "job failed", "job id": ids[1], "error": "boom"});
    assert_eq!(
        router.ask(&mut c, failed).await["answer"],
        "failure recorded"
    );
    let pipeline = json!([["graph", [[[["worker_name", "B"]], null]]], ["data", null]]);
    let added = router
        .ask(
            &mut c,
            json!({"command": "add pipeline", "pipeline": pipeline}),
        )
        .await;
    let cancel = json!({"command": "cancel pipeline", "pipeline id": added["pipeline id"]});
    assert_eq!(
        router.ask(&mut c, cancel).await["answer"],
        "pipeline cancelled"
    );

    let url = format!("http://{}/metrics", router.metrics.unwrap());
    let scrape = tokio::task::spawn_blocking(move || {
        let mut response = ureq::get(&url).call().unwrap();
        let kind = response
            .headers()
            .get("content-type")
            .map(|h| h.to_str().unwrap_or_default().to_owned())
            .unwrap_or_default();
        (kind, response.body_mut().read_to_string().unwrap())
    })
    .await
    .unwrap();
    assert!(
        scrape.0.starts_with("application/openmetrics-text"),
        "{}",
        scrape.0
    );
    let samples = parse(&scrape.1);
    let requests = |command| {
        sample(
            &samples,
            "pypelinin_requests_total",
            &[("command", command)],
        )
    };
    assert_eq!(requests("add job"), 3.0);
    assert_eq!(requests("get jobs"), 1.0);
    assert_eq!(requests("job finished"), 1.0);
    assert_eq!(requests("cancel pipeline"), 1.0);
    let jobs = |outcome| {
        sample(
            &samples,
            "pypelinin_jobs_total",
            &[("worker", "A"), ("outcome", outcome)],
        )
    };
    assert_eq!(
        (jobs("finished"), jobs("retried"), jobs("failed")),
        (1.0, 1.0, 0.0)
    );
    let pending = |state| {
        sample(
            &samples,
            "pypelinin_pending_jobs",
            &[("worker", "A"), ("state", state)],
        )
    };
    // The third job waits; the failed one waits out its back-off; none runs.
    assert_eq!(
        (pending("queued"), pending("delayed"), pending("running")),
        (1.0, 1.0, 0.0)
    );
    let pipelines = |outcome| {
        sample(
            &samples,
            "pypelinin_pipelines_total",
            &[("outcome", outcome)],
        )
    };
    assert_eq!((pipelines("cancelled"), pipelines("finished")), (1.0, 0.0));
    let duration = |what| {
        sample(
            &samples,
            &format!("pypelinin_job_duration_seconds_{what}"),
            &[("worker", "A")],
        )
    };
    assert_eq!(duration("count"), 1.0);
    assert!((duration("sum") - 0.02).abs() < 1e-9);
    let in_bucket = sample(
        &samples,
        "pypelinin_job_duration_seconds_bucket",
        &[("worker", "A"), ("le", "0.025")],
    );
    assert_eq!(in_bucket, 1.0);
    // Every acknowledged change went through a group commit.
    assert!(sample(&samples, "pypelinin_group_commit_seconds_count", &[]) >= 1.0);
    assert!(sample(&samples, "pypelinin_group_commit_rows_sum", &[]) >= 5.0);

    // Anything but GET /metrics is a 404 that says where the metrics are.
    let base = format!("http://{}/", router.metrics.unwrap());
    let other = tokio::task::spawn_blocking(move || ureq::get(&base).call())
        .await
        .unwrap();
    assert!(
        matches!(other, Err(ureq::Error::StatusCode(404))),
        "{other:?}"
    );
    router.stop().await;
}
