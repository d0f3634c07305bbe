//! Many clients at once: nothing lost, nothing duplicated, nobody blocked.

use std::collections::HashSet;

use pypelinin_common::protocol::request::NewJob;
use serde_json::json;

use crate::support::TestRouter;

const CLIENTS: usize = 8;
const ROUNDS: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_lose_and_duplicate_nothing() {
    let router = TestRouter::start().await;
    let mut tasks = Vec::new();
    for client_no in 0..CLIENTS {
        let mut client = router.client().await;
        tasks.push(tokio::spawn(async move {
            let mut added = Vec::new();
            let mut taken = Vec::new();
            for round in 0..ROUNDS {
                let id = client
                    .add_job(NewJob::new(
                        "W",
                        json!({"client": client_no, "round": round}),
                    ))
                    .await
                    .expect("add job");
                added.push(id);
                if let Some(job) = client.get_job(None).await.expect("get job") {
                    taken.push(job.job_id);
                }
            }
            (added, taken)
        }));
    }
    let mut added = HashSet::new();
    let mut taken = Vec::new();
    for task in tasks {
        let (a, t) = task.await.unwrap();
        added.extend(a);
        taken.extend(t);
    }
    assert_eq!(added.len(), CLIENTS * ROUNDS, "ids are unique");
    // Each get job ran after that client's own add job, so every get found a job.
    assert_eq!(taken.len(), CLIENTS * ROUNDS);
    let taken_set: HashSet<_> = taken.iter().cloned().collect();
    assert_eq!(taken_set.len(), taken.len(), "no job handed out twice");
    assert_eq!(taken_set, added, "every added job handed out");
    let mut c = router.client().await;
    assert_eq!(
        router.ask(&mut c, json!({"command": "get job"})).await,
        json!({"worker": null})
    );
}
