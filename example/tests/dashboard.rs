//! The web dashboard in a real browser: headless Chromium driven through chromedriver
//! (WebDriver), against a cluster of real processes. Chromium and chromedriver are Debian's
//! `chromium` and `chromium-driver` packages (`.ci/run` installs them); without them the test
//! fails, saying so.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use pypelinin_common::pipeline::Pipeline;
use pypelinin_common::testing::{process_gone, wait_until, within};
use serde_json::{json, Value};

use crate::support::{manager, Cluster, WAIT};

/// How long one thing the page should show may take to show.
const SHOW: Duration = Duration::from_secs(30);

/// A child process killed (and reaped) when the test ends, however it ends.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// chromedriver on a free port, and a headless Chromium session through it.
async fn browser(profile: &Path) -> (KillOnDrop, Client) {
    for program in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
        assert!(
            Path::new(program).exists(),
            "{program} is missing: the dashboard's browser test needs Debian's chromium and \
             chromium-driver packages (`apt-get install chromium chromium-driver`; .ci/run \
             installs them)"
        );
    }
    let port = free_port();
    let driver = Command::new("/usr/bin/chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    let driver = KillOnDrop(driver);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_until(WAIT, "chromedriver to listen", || {
        TcpStream::connect(addr).is_ok()
    });
    let capabilities = json!({
        "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1280,1000",
                format!("--user-data-dir={}", profile.display()),
            ]
        }
    });
    let Value::Object(capabilities) = capabilities else {
        unreachable!()
    };
    let client = within(
        WAIT,
        "a Chromium session",
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&format!("http://{addr}")),
    )
    .await
    .expect("chromedriver starts a headless Chromium");
    (driver, client)
}

/// Evaluates `expression` in the page until it is true (JavaScript truth), for at most
/// [`SHOW`]; fails naming `what` and the page's text.
async fn until(page: &Client, what: &str, expression: &str) {
    let script = format!("try {{ return !!({expression}); }} catch (e) {{ return false; }}");
    let mut poll = tokio::time::interval(Duration::from_millis(100));
    let deadline = tokio::time::Instant::now() + SHOW;
    loop {
        poll.tick().await;
        if page.execute(&script, vec![]).await.unwrap() == Value::Bool(true) {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            let text = page
                .execute("return document.body.innerText", vec![])
                .await
                .unwrap_or_default();
            panic!("the page did not show {what} within {SHOW:?}; it shows:\n{text}");
        }
    }
}

/// Evaluates `expression` in the page.
async fn eval(page: &Client, expression: &str) -> Value {
    page.execute(&format!("return {expression};"), vec![])
        .await
        .unwrap()
}

async fn screenshot(page: &Client, name: &str) {
    let png = page.screenshot().await.unwrap();
    let dir = std::env::var_os("PYPELININ_SCREENSHOTS")
        .map_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")), PathBuf::from);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("dashboard-{name}.png")), png).unwrap();
}

/// Waits until the DAG shows `worker`'s job in `state`.
async fn job_becomes(page: &Client, worker: &str, state: &str) {
    let check = format!("{} === '{state}'", job_state(worker));
    until(page, &format!("{worker} {state}"), &check).await;
}

/// The state the DAG shows for `worker`'s job.
fn job_state(worker: &str) -> String {
    format!("document.querySelector('#dag g.job[data-worker=\"{worker}\"]')?.dataset.state")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_cluster_live_and_cancels_in_a_real_browser() {
    let dir = tempfile::tempdir().unwrap();
    let gate = dir.path().join("gate");
    let pids = dir.path().join("Sleepy.pids");
    let config = format!(
        r#"
[router]
max_attempts = 1
unserved_worker_warn_secs = 1

[broker]
concurrency = 4

[[broker.command_workers]]
name = "Echo"
command = ["sh", "-c", "cat > /dev/null; echo '{{}}'"]

[[broker.command_workers]]
name = "Gate"
command = ["sh", "-c", "cat > /dev/null; while [ ! -e '{gate}' ]; do sleep 0.05; done; echo '{{}}'"]
timeout_secs = 900

[[broker.command_workers]]
name = "Fails"
command = ["sh", "-c", "cat > /dev/null; echo 'the disk is on fire' >&2; exit 3"]

[[broker.command_workers]]
name = "Sleepy"
command = ["sh", "-c", "echo $$ >> '{pids}'; sleep 600; echo '{{}}'"]
timeout_secs = 900
"#,
        gate = gate.display(),
        pids = pids.display(),
    );
    let cluster = Cluster::start_with_config(&config, &[], 1, &[], 1);
    let mut m = manager(&cluster).await;

    // The dashboard, as `pypelinin dashboard` serves it, on a free port.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let connect = pypelinin_cli::dashboard::Connect {
        api: cluster.api.clone(),
        broadcast: Some(cluster.broadcast.clone()),
        options: Default::default(),
        token: None,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(pypelinin_cli::dashboard::serve(listener, connect, async {
        let _ = stopped.await;
    }));

    let profile = tempfile::tempdir().unwrap();
    let (_driver, page) = browser(profile.path()).await;
    page.goto(&url).await.unwrap();

    // 1. The overview's counters move while pipelines run.
    until(
        &page,
        "the overview",
        "document.querySelector('#count-finished')",
    )
    .await;
    assert_eq!(
        eval(
            &page,
            "document.querySelector('#count-finished').textContent"
        )
        .await,
        "0"
    );
    let data = |name: &str| json!({"filename": name});
    let echoes: Vec<Pipeline> = (0..5)
        .map(|i| {
            Pipeline::builder()
                .job("Echo")
                .data(data(&format!("echo{i}")))
                .build()
                .unwrap()
        })
        .collect();
    m.start_many(&echoes).await.unwrap();
    until(
        &page,
        "5 finished pipelines",
        "document.querySelector('#count-finished').textContent === '5'",
    )
    .await;
    until(
        &page,
        "the broker with its workers",
        "document.querySelector('#brokers').innerText.includes('Sleepy')",
    )
    .await;

    // 2. A failing pipeline appears in the latest failures, with its error.
    let failing = Pipeline::builder()
        .edges("Echo", ["Fails"])
        .data(data("failing"))
        .build()
        .unwrap();
    let failed_id = m.start(&failing).await.unwrap();
    until(
        &page,
        "the failure with its error",
        "document.querySelector('#failures').innerText.includes('the disk is on fire')",
    )
    .await;
    assert_eq!(
        eval(&page, "document.querySelector('#count-failed').textContent").await,
        "1"
    );
    screenshot(&page, "overview").await;
    // It ended before any page asked for it: the dashboard took its DAG when it was announced
    // (the router keeps only an ended pipeline's outcome).
    page.goto(&format!("{url}#/pipeline/{failed_id}"))
        .await
        .unwrap();
    job_becomes(&page, "Fails", "failed").await;
    assert_eq!(eval(&page, &job_state("Echo")).await, "finished");

    // 3. One pipeline: its DAG as SVG, one node per job, coloured as its jobs go.
    let gated = Pipeline::builder()
        .edges("Gate", ["Echo", "Fails"])
        .data(data("gated"))
        .build()
        .unwrap();
    let gated_id = m.start(&gated).await.unwrap();
    page.goto(&format!("{url}#/pipeline/{gated_id}"))
        .await
        .unwrap();
    job_becomes(&page, "Gate", "running").await;
    assert_eq!(
        eval(&page, "document.querySelectorAll('#dag svg g.job').length").await,
        3
    );
    assert_eq!(eval(&page, &job_state("Echo")).await, "waiting");
    // Its colour comes from the state (the style sheet's, not a default grey).
    let fill = |w: &str| {
        format!(
            "getComputedStyle(document.querySelector('#dag g.job[data-worker=\"{w}\"] rect')).fill"
        )
    };
    assert_ne!(
        eval(&page, &fill("Gate")).await,
        eval(&page, &fill("Echo")).await
    );
    // A click on a job shows its details.
    page.find(Locator::Css("#dag g.job[data-worker=\"Gate\"]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until(
        &page,
        "the job's details",
        "document.querySelector('#job-detail').innerText.includes('running')",
    )
    .await;
    std::fs::write(&gate, "").unwrap();
    job_becomes(&page, "Gate", "finished").await;
    job_becomes(&page, "Fails", "failed").await;
    until(
        &page,
        "the pipeline failed",
        "document.querySelector('#pipeline-state').innerText.includes('failed')",
    )
    .await;
    screenshot(&page, "pipeline").await;

    // 4. The pipeline list, filtered by state and searched by id.
    page.goto(&format!("{url}#/pipelines?state=failed"))
        .await
        .unwrap();
    until(
        &page,
        "the failed pipelines listed",
        &format!(
            "document.querySelectorAll('#pipelines tbody tr[data-id]').length === 2 && document.querySelector('#pipelines').innerText.includes('{failed_id}')"
        ),
    )
    .await;
    let search = page.find(Locator::Id("search")).await.unwrap();
    search.send_keys(&failed_id.as_str()[..10]).await.unwrap();
    until(
        &page,
        "one pipeline found by the start of its id",
        &format!(
            "document.querySelectorAll('#pipelines tbody tr[data-id]').length === 1 && document.querySelector('#pipelines tbody tr').dataset.id === '{failed_id}'"
        ),
    )
    .await;

    // 5. A worker no broker runs: a banner names it.
    let unserved = Pipeline::builder()
        .job("Nobody")
        .data(data("unserved"))
        .build()
        .unwrap();
    m.start(&unserved).await.unwrap();
    until(
        &page,
        "the unserved worker's banner",
        "!document.querySelector('#banner').hidden && document.querySelector('#banner').innerText.includes('No broker runs worker Nobody')",
    )
    .await;

    // 6. A broker's page: its load over time, drawn.
    page.goto(&url).await.unwrap();
    until(&page, "the brokers", "document.querySelector('#brokers a')").await;
    page.find(Locator::Css("#brokers a"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until(
        &page,
        "the broker's load charts",
        "document.querySelectorAll('svg.chart polyline').length === 4 && document.querySelector('h1').innerText.startsWith('broker on')",
    )
    .await;

    // 7. On a phone's width, nothing is wider than the screen.
    page.set_window_size(390, 844).await.unwrap();
    page.goto(&url).await.unwrap();
    until(
        &page,
        "the overview",
        "document.querySelector('#count-finished')",
    )
    .await;
    until(
        &page,
        "a page as narrow as the phone",
        "document.documentElement.scrollWidth <= window.innerWidth",
    )
    .await;
    page.set_window_size(1280, 1000).await.unwrap();

    // 8. Cancel: the confirmation, then the pipeline ends cancelled and its job's process
    // is gone.
    let sleepy = Pipeline::builder()
        .job("Sleepy")
        .data(data("sleepy"))
        .build()
        .unwrap();
    let sleepy_id = m.start(&sleepy).await.unwrap();
    page.goto(&format!("{url}#/pipeline/{sleepy_id}"))
        .await
        .unwrap();
    job_becomes(&page, "Sleepy", "running").await;
    wait_until(WAIT, "the Sleepy job's process to start", || {
        std::fs::read_to_string(&pids).is_ok_and(|p| !p.trim().is_empty())
    });
    let pid: u32 = std::fs::read_to_string(&pids)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    page.find(Locator::Id("cancel"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    page.accept_alert().await.unwrap();
    until(
        &page,
        "the pipeline cancelled",
        "document.querySelector('#pipeline-state').innerText.includes('cancelled')",
    )
    .await;
    assert_eq!(eval(&page, &job_state("Sleepy")).await, "cancelled");
    wait_until(WAIT, "the cancelled job's process to be gone", || {
        process_gone(pid)
    });

    page.close().await.unwrap();
    let _ = stop.send(());
    within(WAIT, "the dashboard to stop", server)
        .await
        .unwrap()
        .unwrap();
}

/// POSTs a cancel of `id` to the dashboard at `url`, with `token` when given; the status.
fn post_cancel(url: &str, id: &str, token: Option<&str>) -> u16 {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut request = agent.post(format!("{url}api/pipelines/{id}/cancel"));
    if let Some(token) = token {
        request = request.header("x-pypelinin-token", token);
    }
    request.send_empty().unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_cluster_token_a_cancel_through_the_dashboard_needs_it() {
    let config = "[cluster]\ntoken = \"t0k3n\"\n\n[[broker.command_workers]]\nname = \"Sleepy\"\ncommand = [\"sh\", \"-c\", \"sleep 600\"]\ntimeout_secs = 900\n";
    let cluster = Cluster::start_with_config(config, &[], 1, &[], 1);
    let mut m = within(
        WAIT,
        "client connect",
        pypelinin_client::PipelineManager::connect_with(
            &cluster.api,
            &cluster.broadcast,
            Default::default(),
            Some("t0k3n".into()),
        ),
    )
    .await
    .unwrap();
    let sleepy = Pipeline::builder()
        .job("Sleepy")
        .data(json!({"filename": "sleepy"}))
        .build()
        .unwrap();
    let id = m.start(&sleepy).await.unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let connect = pypelinin_cli::dashboard::Connect {
        api: cluster.api.clone(),
        broadcast: Some(cluster.broadcast.clone()),
        options: Default::default(),
        token: Some("t0k3n".into()),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(pypelinin_cli::dashboard::serve(listener, connect, async {
        let _ = stopped.await;
    }));

    let (u, i) = (url.clone(), id.to_string());
    let statuses = tokio::task::spawn_blocking(move || {
        [
            post_cancel(&u, &i, None),
            post_cancel(&u, &i, Some("wrong")),
            post_cancel(&u, &i, Some("t0k3n")),
            post_cancel(&u, &i, Some("t0k3n")),
        ]
    })
    .await
    .unwrap();
    // No token, a wrong one: refused; the right one: cancelled; again: it ended already.
    assert_eq!(statuses, [401, 401, 200, 409]);
    let outcomes = m.wait_all(std::slice::from_ref(&id), WAIT).await.unwrap();
    assert!(
        matches!(outcomes[..], [pypelinin_client::Outcome::Cancelled]),
        "{outcomes:?}"
    );

    let _ = stop.send(());
    within(WAIT, "the dashboard to stop", server)
        .await
        .unwrap()
        .unwrap();
}
