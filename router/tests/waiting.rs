//! `get jobs` / `get pipelines` that wait at the router for work (`"wait ms"`).

use std::time::{Duration, Instant};

use pypelinin_common::protocol::request::NewJob;
use pypelinin_common::testing::within;
use pypelinin_router::RouterSettings;
use serde_json::json;
use zeromq::{DealerSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

use crate::support::{TestRouter, WAIT};

fn workers(names: &[&str]) -> Option<Vec<String>> {
    Some(names.iter().map(|w| w.to_string()).collect())
}

#[tokio::test]
async fn waiting_requests_get_the_jobs_of_their_workers_as_they_are_queued() {
    let router = TestRouter::start().await;
    let (mut wa, mut wb) = (router.client().await, router.client().await);
    let for_a = tokio::spawn(async move { wa.wait_for_jobs(workers(&["A"]), 2, WAIT).await });
    let for_b = tokio::spawn(async move { wb.wait_for_jobs(workers(&["B"]), 1, WAIT).await });
    let mut c = router.client().await;
    let b = c.add_job(NewJob::new("B", json!({"n": 1}))).await.unwrap();
    let a = c.add_job(NewJob::new("A", json!({"n": 2}))).await.unwrap();
    let got_b = within(WAIT, "the B waiter's answer", for_b)
        .await
        .unwrap()
        .unwrap();
    let got_a = within(WAIT, "the A waiter's answer", for_a)
        .await
        .unwrap()
        .unwrap();
    let ids = |jobs: &[pypelinin_common::protocol::JobAssignment]| -> Vec<String> {
        jobs.iter().map(|j| j.job_id.to_string()).collect()
    };
    assert_eq!(ids(&got_b), [b.to_string()]);
    assert_eq!(ids(&got_a), [a.to_string()]);
    assert_eq!(got_a[0].data(), &json!({"n": 2}));
    // Handed out: nothing is left for anyone else.
    assert!(c.get_job(None).await.unwrap().is_none());
    router.stop().await;
}

#[tokio::test]
async fn a_waiting_request_is_answered_empty_when_its_wait_is_over() {
    let router = TestRouter::start().await;
    let mut w = router.client().await;
    let wait = Duration::from_millis(300);
    let started = Instant::now();
    let jobs = within(WAIT, "the wait to end", w.wait_for_jobs(None, 5, wait))
        .await
        .unwrap();
    assert!(jobs.is_empty(), "{jobs:?}");
    let pipelines = within(WAIT, "the wait to end", w.wait_for_pipelines(5, wait))
        .await
        .unwrap();
    assert!(pipelines.is_empty());
    // Both waited (the router counts whole milliseconds).
    assert!(
        started.elapsed() >= 2 * wait - Duration::from_millis(10),
        "{:?}",
        started.elapsed()
    );
    router.stop().await;
}

#[tokio::test]
async fn a_waiting_pipeliner_gets_the_next_pipeline() {
    let router = TestRouter::start().await;
    let mut w = router.client().await;
    let waiting = tokio::spawn(async move { w.wait_for_pipelines(10, WAIT).await });
    let mut c = router.client().await;
    let p = json!([
        ["graph", [[[["worker_name", "A"]], null]]],
        ["data", [["n", 7]]]
    ]);
    let added = router
        .ask(&mut c, json!({"command": "add pipeline", "pipeline": p}))
        .await;
    assert_eq!(added["answer"], "pipeline accepted", "{added}");
    let got = within(WAIT, "the waiter's answer", waiting)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].pipeline_id.to_string(), added["pipeline id"]);
    router.stop().await;
}

#[tokio::test]
async fn a_job_handed_to_a_waiter_that_left_is_queued_again_at_once() {
    // A lease far longer than the test: the job comes back only if it is taken back.
    let settings = RouterSettings {
        job_lease_secs: 600.0,
        ..RouterSettings::default()
    };
    let router = TestRouter::start_settings(Default::default(), settings).await;
    // A DEALER sends the waiting request, then a probe on the same connection: the router
    // handles one connection's requests in order, so once the probe is answered the waiting
    // request is waiting at the router.
    let mut dealer = DealerSocket::new();
    within(WAIT, "DEALER connect", dealer.connect(&router.api))
        .await
        .unwrap();
    for body in [
        json!({"command": "get jobs", "max": 1, "wait ms": 60_000}),
        json!({"command": "probe", "token": "t"}),
    ] {
        // [empty delimiter, body], as a REQ sends it.
        let mut message = ZmqMessage::from(body.to_string());
        message.prepend(&ZmqMessage::from(""));
        dealer.send(message).await.unwrap();
    }
    let answer = within(WAIT, "the probe's answer", dealer.recv())
        .await
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&answer.into_vec()[1]).unwrap();
    assert_eq!(body["answer"], "probe sent", "{body}");
    // The waiter leaves; the next job is handed to it, cannot be delivered, and comes back
    // (a second `new job`).
    drop(dealer);
    let mut sub = router.live_sub().await;
    let mut c = router.client().await;
    let id = c.add_job(NewJob::new("A", json!(null))).await.unwrap();
    assert_eq!(sub.expect("new job (added)").await, "new job");
    assert_eq!(sub.expect("new job (queued again)").await, "new job");
    let again = c
        .get_job(None)
        .await
        .unwrap()
        .expect("the job is queued again");
    assert_eq!(again.job_id, id);
    let record = c.job_status(vec![id.clone()]).await.unwrap();
    assert_eq!(record[&id], pypelinin_common::protocol::JobState::Running);
    router.stop().await;
}

/// A daemon that gave up a `get jobs` (its answer lost, as across a network partition) says so
/// in its next `renew leases`: what that answer handed out is queued again at once, without
/// using an attempt, and not when its lease runs out.
#[tokio::test]
async fn work_in_an_answer_its_daemon_gave_up_is_queued_again_when_the_daemon_settles_the_ask() {
    use pypelinin_common::protocol::request::{Ask, GetJobs, RenewLeases, Settled};
    use pypelinin_common::protocol::{JobState, Request};

    let router = TestRouter::start().await;
    let mut c = router.client().await;
    let lost = c.add_job(NewJob::new("A", json!({"n": 1}))).await.unwrap();
    let kept = c.add_job(NewJob::new("A", json!({"n": 2}))).await.unwrap();
    // Ask 1 takes both; pretend its answer reached the daemon with `kept` only.
    let mut daemon = router.client().await;
    let ask = Request::GetJobs(GetJobs {
        asker: Some(Ask {
            id: "broker-run-1".into(),
            ask: 1,
        }),
        ..GetJobs::new(None, 2)
    });
    let answer = daemon.request(&ask).await.unwrap();
    let handed: serde_json::Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(handed["jobs"].as_array().map(Vec::len), Some(2), "{handed}");
    assert_eq!(
        c.job_status(vec![lost.clone()]).await.unwrap()[&lost],
        JobState::Running
    );
    // From a new connection, as after a rebuilt socket: ask 1 is settled, and it holds `kept`.
    let mut daemon = router.client().await;
    daemon
        .renew_leases(RenewLeases {
            job_ids: vec![kept.clone()],
            asker: Some(Settled {
                id: "broker-run-1".into(),
                settled: 1,
            }),
            ..RenewLeases::default()
        })
        .await
        .unwrap();
    let status = c
        .job_status(vec![lost.clone(), kept.clone()])
        .await
        .unwrap();
    assert_eq!(
        status[&lost],
        JobState::Queued,
        "the lost job is queued again"
    );
    assert_eq!(status[&kept], JobState::Running, "the held one is not");
    let again = c.get_jobs(None, 5).await.unwrap();
    assert_eq!(
        again.iter().map(|j| j.job_id.clone()).collect::<Vec<_>>(),
        [lost]
    );
    router.stop().await;
}
