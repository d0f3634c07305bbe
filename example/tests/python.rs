//! The Python package (`python/`): its tests, and its workers on a real broker.

use pypelinin_client::{Outcome, Pipeline};
use serde_json::json;

use crate::support::{manager, Cluster, WAIT};

/// `python/tests` (pytest): `python3 -m pypelinin.worker` over the line protocol.
#[test]
fn the_python_packages_worker_tests_pass() {
    pypelinin_common::testing::pytest_in("python/tests", "test_worker.py", &[]);
}

/// `python/tests` (pytest): the client against a real cluster of the example's binaries.
#[test]
fn the_python_packages_client_tests_pass() {
    let bin = |name: &str| crate::support::bin(name).display().to_string();
    pypelinin_common::testing::pytest_in(
        "python/tests",
        "test_client.py",
        &[
            ("PYPELININ_ROUTER", &bin("my_router")),
            ("PYPELININ_BROKER", &bin("my_broker")),
            ("PYPELININ_PIPELINER", &bin("my_pipeliner")),
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_workers_of_both_styles_run_a_pipeline_on_a_broker() {
    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/../python");
    // No `requires` in the table: the processes say what each worker requires.
    let config = format!(
        "[[broker.process_workers]]\nnames = [\"Upper\", \"CountWords\"]\n\
         command = [\"python3\", \"-m\", \"pypelinin.worker\", \"tests/sample_workers.py\"]\n\
         workdir = {python:?}\nprocesses = 2\n"
    );
    let cluster = Cluster::start_with_config(&config, &[], 1, &[], 1);
    let store = cluster.store();
    std::fs::create_dir_all(&store).unwrap();
    std::fs::write(store.join("ok.json"), r#"{"text": "three little words"}"#).unwrap();
    std::fs::write(store.join("bad.json"), r#"{"text": "boom"}"#).unwrap();
    let mut m = manager(&cluster).await;
    let pipeline = |name: &str| {
        Pipeline::builder()
            .edge("Upper", "CountWords")
            .data(json!({"filename": name}))
            .build()
            .unwrap()
    };
    let ids = m
        .start_many(&[pipeline("ok"), pipeline("bad")])
        .await
        .unwrap();
    let outcomes = match m.wait_all(&ids, WAIT).await {
        Ok(o) => o,
        Err(e) => panic!("{e}\n{}", cluster.logs()),
    };
    assert!(
        matches!(outcomes[0], Outcome::Finished(_)),
        "{outcomes:?}\n{}",
        cluster.logs()
    );
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.join("ok.json")).unwrap()).unwrap();
    assert_eq!(doc["upper"], "THREE LITTLE WORDS");
    assert_eq!(doc["words"], 3);
    // The worker's exception fails the pipeline with its text and traceback.
    match &outcomes[1] {
        Outcome::Failed(f) => {
            assert_eq!(f.worker, "CountWords");
            assert!(
                f.error.contains("ValueError: cannot count a boom"),
                "{}",
                f.error
            );
            assert!(f.error.contains("Traceback"), "{}", f.error);
        }
        other => panic!("{other:?}"),
    }
}
