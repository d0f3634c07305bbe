//! The example cluster end to end.

use std::collections::{BTreeMap, HashSet};
use std::process::Command;

use pypelinin_client::{Outcome, Pipeline, PipelineManager};
use pypelinin_common::testing::within;
use pypelinin_example::corpus;
use serde_json::{json, Value};

use crate::support::{args, bin, manager, Cluster, WAIT};

fn noop_pipeline(i: usize) -> Pipeline {
    Pipeline::builder()
        .edge("Noop0", "Noop1")
        .data(json!({"filename": format!("p{i}")}))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_2000_noop_pipelines_all_finish() {
    let cluster = Cluster::start(
        &["--no-store"],
        2,
        &["--noop-workers", "2", "--concurrency", "4"],
        1,
    );
    let mut m = manager(&cluster).await;
    let mut ids = Vec::new();
    for i in 0..2000 {
        ids.push(m.start(&noop_pipeline(i)).await.unwrap());
    }
    let outcomes = match m.wait_all(&ids, WAIT).await {
        Ok(o) => o,
        Err(e) => panic!("{e}\n{}", cluster.logs()),
    };
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Finished(_)))
            .count(),
        2000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_many_splits_pipelines_larger_than_one_request_allows() {
    let cluster = Cluster::start(&["--no-store"], 1, &["--noop-workers", "2"], 1);
    let mut m = manager(&cluster).await;
    // 17 pipelines of 1 MiB: more than the router takes in one request (16 MiB).
    let blob = "x".repeat(1024 * 1024);
    let pipelines: Vec<Pipeline> = (0..17)
        .map(|i| {
            Pipeline::builder()
                .edge("Noop0", "Noop1")
                .data(json!({"filename": format!("p{i}"), "blob": blob}))
                .build()
                .unwrap()
        })
        .collect();
    let ids = match m.start_many(&pipelines).await {
        Ok(ids) => ids,
        Err(e) => panic!("{e}\n{}", cluster.logs()),
    };
    assert_eq!(ids.len(), 17);
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 17, "distinct ids");
    let outcomes = match m.wait_all(&ids, WAIT).await {
        Ok(o) => o,
        Err(e) => panic!("{e}\n{}", cluster.logs()),
    };
    assert!(
        outcomes.iter().all(|o| matches!(o, Outcome::Finished(_))),
        "{outcomes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_pipeliner_processes_share_300_pipelines_each_ending_once() {
    let cluster = Cluster::start(&["--no-store"], 1, &["--noop-workers", "2"], 3);
    let mut m = manager(&cluster).await;
    let mut ids = Vec::new();
    for i in 0..300 {
        ids.push(m.start(&noop_pipeline(i)).await.unwrap());
    }
    let mut seen = HashSet::new();
    within(WAIT, "300 pipelines to end", async {
        while seen.len() < 300 {
            let (id, outcome) = m.wait_any(WAIT).await.unwrap().expect("an outcome");
            assert!(matches!(outcome, Outcome::Finished(_)), "{outcome:?}");
            assert!(seen.insert(id.clone()), "{id} ended twice");
        }
    })
    .await;
    assert_eq!(seen, ids.into_iter().collect());
}

/// Text and links of an HTML file, computed without the example's code: a hand-rolled tag
/// stripper and href scanner.
fn expected(html: &str) -> (BTreeMap<String, u64>, Vec<String>) {
    let body = &html[html.find("<body>").unwrap()..];
    let mut text = String::new();
    let mut in_tag = false;
    for c in body.chars() {
        match c {
            '<' => {
                in_tag = true;
                text.push(' ');
            }
            '>' => in_tag = false,
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    let mut words = BTreeMap::new();
    for w in text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        *words.entry(w.to_lowercase()).or_insert(0) += 1;
    }
    let links = body
        .split("href=\"")
        .skip(1)
        .map(|rest| rest[..rest.find('"').unwrap()].to_owned())
        .collect();
    (words, links)
}

#[test]
fn the_whole_corpus_goes_through_and_the_results_are_right() {
    let cluster = Cluster::start(&[], 2, &["--concurrency", "2"], 1);
    let home = cluster.home.path().display().to_string();
    let out = Command::new(bin("send_pipelines"))
        .args(args(&[
            "--api",
            &cluster.api,
            "--broadcast",
            &cluster.broadcast,
            "--home",
            &home,
            "--timeout",
            "100",
        ]))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.logs()
    );
    let documents = corpus::documents(&corpus::data_dir()).unwrap();
    assert!(
        stdout.starts_with(&format!("{} pipelines finished in ", documents.len())),
        "{stdout}"
    );
    assert!(
        stdout.contains("pipelines/s, average pipeline duration "),
        "{stdout}"
    );
    let base = corpus::file_base_url(&corpus::data_dir()).unwrap();
    for file in &documents {
        let html = std::fs::read_to_string(corpus::data_dir().join(file)).unwrap();
        let (words, links) = expected(&html);
        let name = file.trim_end_matches(".html");
        let doc: Value = serde_json::from_slice(
            &std::fs::read(cluster.store().join(format!("{name}.json"))).unwrap(),
        )
        .unwrap();
        let got_words: BTreeMap<String, u64> =
            serde_json::from_value(doc["words"].clone()).unwrap();
        assert_eq!(got_words, words, "{name}");
        let want_links: Vec<String> = links
            .iter()
            .map(|l| {
                if l.starts_with("http") {
                    l.clone()
                } else {
                    format!("{base}{l}")
                }
            })
            .collect();
        assert_eq!(doc["links"], json!(want_links), "{name}");
        assert_eq!(doc["summary"]["link_count"], links.len(), "{name}");
        assert_eq!(doc["summary"]["distinct_words"], words.len(), "{name}");
        assert!(
            doc["stats"]["characters"].as_u64().unwrap() > 0,
            "{name}: the Python worker ran"
        );
    }
    // The DOT file of the pipeline is the legacy text, exactly.
    let dot = std::fs::read_to_string(cluster.home.path().join("pipeline.dot")).unwrap();
    assert_eq!(
        dot,
        "digraph graphname {\n    \"Downloader\";\n    \"GetLinks\";\n    \"GetTextAndWords\";\n    \"Summarize\";\n    \"TextStats\";\n\n    \"Downloader\" -> \"GetLinks\";\n    \"Downloader\" -> \"GetTextAndWords\";\n    \"GetLinks\" -> \"Summarize\";\n    \"GetTextAndWords\" -> \"Summarize\";\n    \"GetTextAndWords\" -> \"TextStats\";\n}"
    );
    // Brokers saved monitoring records.
    let monitoring =
        std::fs::read_to_string(cluster.home.path().join("monitoring.log")).unwrap_or_default();
    assert!(
        monitoring.contains("\"type\":\"broker\""),
        "no monitoring record"
    );
}

#[test]
fn send_pipelines_fails_when_pipelines_cannot_finish_in_time() {
    // No broker: nothing can run.
    let cluster = Cluster::start(&[], 0, &[], 1);
    let home = cluster.home.path().display().to_string();
    let out = Command::new(bin("send_pipelines"))
        .args(args(&[
            "--api",
            &cluster.api,
            "--broadcast",
            &cluster.broadcast,
            "--home",
            &home,
            "--count",
            "3",
            "--timeout",
            "1",
        ]))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("3 pipeline(s) did not finish within 1 s"),
        "{stderr}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("0 pipelines finished"));
}

#[test]
fn send_pipelines_lists_failed_pipelines_and_fails() {
    let cluster = Cluster::start(&[], 1, &[], 1);
    let home = cluster.home.path().display().to_string();
    let out = Command::new(bin("send_pipelines"))
        .args(args(&[
            "--api",
            &cluster.api,
            "--broadcast",
            &cluster.broadcast,
            "--home",
            &home,
            "--count",
            "2",
            "--base-url",
            "file:///nonexistent/",
            "--timeout",
            "60",
        ]))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.lines().filter(|l| l.starts_with("failed: ")).count(),
        2,
        "{stderr}"
    );
    assert!(
        stderr.contains("(Downloader): worker failed: cannot read /nonexistent/"),
        "{stderr}"
    );
}

#[test]
fn every_binary_has_help() {
    for name in ["my_router", "my_broker", "my_pipeliner", "send_pipelines"] {
        let out = Command::new(bin(name)).arg("--help").output().unwrap();
        assert!(out.status.success(), "{name}");
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(
            help.contains("--api") && help.contains("--broadcast"),
            "{name}: {help}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_with_a_token_runs_and_refuses_strangers() {
    use pypelinin_common::transport::{ApiClient, ClientOptions};
    let cluster = Cluster::start_with_config(
        "[cluster]\ntoken = \"t0k3n\"\n",
        &["--no-store"],
        1,
        &["--noop-workers", "2"],
        1,
    );
    let mut stranger = ApiClient::connect(cluster.api.clone(), ClientOptions::default())
        .await
        .unwrap();
    let refused = stranger.get_job(None).await.unwrap_err();
    assert!(refused.to_string().contains("Unauthorized"), "{refused}");
    let mut m = within(
        WAIT,
        "client connect",
        PipelineManager::connect_with(
            &cluster.api,
            &cluster.broadcast,
            ClientOptions::default(),
            Some("t0k3n".into()),
        ),
    )
    .await
    .unwrap();
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(m.start(&noop_pipeline(i)).await.unwrap());
    }
    let outcomes = m
        .wait_all(&ids, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    assert!(outcomes.iter().all(|o| matches!(o, Outcome::Finished(_))));
}

#[test]
fn each_binary_names_itself_and_my_router_shows_the_data_dir_it_uses() {
    for name in ["my_router", "my_broker", "my_pipeliner", "send_pipelines"] {
        let out = Command::new(bin(name)).arg("-V").output().unwrap();
        let version = String::from_utf8_lossy(&out.stdout);
        assert!(
            version.starts_with(&format!("{name} ")),
            "{name} -V: {version}"
        );
    }
    let out = Command::new(bin("my_router"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("[default: <home>/router-data]"), "{help}");
    assert!(!help.contains("XDG_DATA_HOME"), "{help}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_within_a_limit_for_a_pipeline_that_cannot_run_times_out_and_it_still_ends_later() {
    // A broker that runs only the Noop workers: a job of "Nobody" cannot run.
    let cluster = Cluster::start(&["--no-store"], 1, &["--noop-workers", "2"], 1);
    let mut m = manager(&cluster).await;
    let stuck = Pipeline::builder()
        .job("Nobody")
        .data(json!({"filename": "stuck"}))
        .build()
        .unwrap();
    let stuck = m.start(&stuck).await.unwrap();
    let limit = std::time::Duration::from_millis(500);
    match m.wait_within(&stuck, limit).await {
        Err(pypelinin_client::Error::Timeout { left, .. }) => {
            assert_eq!(left, std::slice::from_ref(&stuck))
        }
        other => panic!("{other:?}"),
    }
    // A pipeline that can run ends within the limit as usual.
    let fine = m.start(&noop_pipeline(0)).await.unwrap();
    let secs = m.wait_within(&fine, WAIT).await.unwrap();
    assert!(secs >= 0.0);
    // The stuck one can still be cancelled.
    m.cancel(&stuck).await.unwrap();
    assert!(matches!(
        m.wait_within(&stuck, WAIT).await,
        Err(pypelinin_client::Error::Cancelled(_))
    ));
}
