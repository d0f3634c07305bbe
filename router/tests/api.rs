//! Every row of the protocol table, answered as the legacy router answered it.

use pypelinin_common::transport::ApiClient;
use pypelinin_router::RouterSettings;
use serde_json::{json, Value};

use crate::support::{is_id, TestRouter};

#[tokio::test]
async fn get_configuration_returns_the_configuration_verbatim() {
    let config =
        json!({"monitoring interval": 60, "store": {"monitoring filename": "/tmp/monitoring.log"}});
    let router = TestRouter::start_with(config.as_object().cloned().unwrap()).await;
    let mut c = router.client().await;
    assert_eq!(
        router
            .ask(&mut c, json!({"command": "get configuration"}))
            .await,
        config
    );
}

#[tokio::test]
async fn add_job_then_get_job_hands_back_exactly_what_was_added() {
    let router = TestRouter::start().await;
    let mut sub = router.live_sub().await;
    let mut c = router.client().await;
    let reply = router
        .ask(&mut c, json!({"command": "add job", "worker": "Upper", "data": {"filename": "a.json"}, "extra": [1]}))
        .await;
    assert_eq!(reply["answer"], "job accepted");
    assert!(is_id(&reply["job id"]), "{reply}");
    assert_eq!(reply.as_object().unwrap().len(), 2);
    assert_eq!(sub.expect("new job broadcast").await, "new job");
    let job = router.ask(&mut c, json!({"command": "get job"})).await;
    assert_eq!(
        job,
        json!({"worker": "Upper", "data": {"filename": "a.json"}, "extra": [1], "job id": reply["job id"]})
    );
    assert_eq!(
        router.ask(&mut c, json!({"command": "get job"})).await,
        json!({"worker": null})
    );
    sub.expect_silence().await;
}

#[tokio::test]
async fn data_may_be_absent_or_null() {
    let router = TestRouter::start().await;
    let mut c = router.client().await;
    let a = router
        .ask(&mut c, json!({"command": "add job", "worker": "A"}))
        .await;
    let b = router
        .ask(
            &mut c,
            json!({"command": "add job", "worker": "B", "data": null}),
        )
        .await;
    assert_eq!(
        router.ask(&mut c, json!({"command": "get job"})).await,
        json!({"worker": "A", "job id": a["job id"]})
    );
    assert_eq!(
        router.ask(&mut c, json!({"command": "get job"})).await,
        json!({"worker": "B", "data": null, "job id": b["job id"]})
    );
}

#[tokio::test]
async fn jobs_and_pipelines_are_served_fifo() {
    let router = TestRouter::start().await;
    let mut c = router.client().await;
    let mut ids = Vec::new();
    for (i, worker) in ["A", "B", "A", "C", "B"].iter().enumerate() {
        let r = router
            .ask(
                &mut c,
                json!({"command": "add job", "worker": worker, "data": {"i": i}}),
            )
            .await;
        ids.push(r["job id"].clone());
    }
    for (i, id) in ids.iter().enumerate() {
        let job = router.ask(&mut c, json!({"command": "get job"})).await;
        assert_eq!(&job["job id"], id);
        assert_eq!(job["data"]["i"], i);
    }
    let mut pids = Vec::new();
    for i in 0..5 {
        let p = json!([
            ["graph", [[[["worker_name", format!("W{i}")]], null]]],
            ["data", [["n", i]]]
        ]);
        pids.push(
            router
                .ask(&mut c, json!({"command": "add pipeline", "pipeline": p}))
                .await["pipeline id"]
                .clone(),
        );
    }
    for id in &pids {
        assert_eq!(
            &router.ask(&mut c, json!({"command": "get pipeline"})).await["pipeline id"],
            id
        );
    }
    assert_eq!(
        router.ask(&mut c, json!({"command": "get pipeline"})).await,
        json!({"pipeline": null})
    );
}

#[tokio::test]
async fn job_finished_answers_and_broadcasts_like_the_legacy_router() {
    let router = TestRouter::start().await;
    let mut sub = router.live_sub().await;
    let mut c = router.client().await;
    let id = router
        .ask(
            &mut c,
            json!({"command": "add job", "worker": "A", "data": {}}),
        )
        .await["job id"]
        .clone();
    assert_eq!(sub.expect("new job").await, "new job");
    let job = router.ask(&mut c, json!({"command": "get job"})).await;

    // Missing keys are a syntax error and do not consume the id.
    let r = router
        .ask(&mut c, json!({"command": "job finished", "job id": id}))
        .await;
    assert_eq!(r["answer"], "syntax error");
    assert!(r["error"].as_str().unwrap().contains("duration"), "{r}");
    assert_eq!(
        router
            .ask(&mut c, json!({"command": "job finished", "duration": 1}))
            .await["answer"],
        "syntax error"
    );

    // The legacy broker sends the fetched job back with extra keys: they are ignored.
    let mut done = job.clone();
    done["command"] = json!("job finished");
    done["duration"] = json!(1.5);
    assert_eq!(
        router.ask(&mut c, done.clone()).await,
        json!({"answer": "good job!"})
    );
    assert_eq!(
        sub.expect("job finished").await,
        format!("job finished: {} duration: 1.5", id.as_str().unwrap())
    );
    assert_eq!(
        router.ask(&mut c, done).await,
        json!({"answer": "unknown job id"})
    );
    assert_eq!(
        router
            .ask(
                &mut c,
                json!({"command": "job finished", "job id": "nope", "duration": 1})
            )
            .await,
        json!({"answer": "unknown job id"})
    );
    sub.expect_silence().await;
}

#[tokio::test]
async fn durations_print_as_python2_did() {
    let router = TestRouter::start().await;
    let mut sub = router.live_sub().await;
    let mut c = router.client().await;
    for (sent, shown) in [
        ("3", "3"),
        ("0.1", "0.1"),
        ("2.0", "2.0"),
        ("0.123456789012345", "0.123456789012"),
        ("1e16", "1e+16"),
    ] {
        let id = router
            .ask(&mut c, json!({"command": "add job", "worker": "A"}))
            .await["job id"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(sub.expect("new job").await, "new job");
        let body =
            format!(r#"{{"command": "job finished", "job id": "{id}", "duration": {sent}}}"#);
        assert_eq!(
            router.raw(&mut c, body.as_bytes()).await["answer"],
            "good job!"
        );
        assert_eq!(
            sub.expect("job finished").await,
            format!("job finished: {id} duration: {shown}")
        );
    }
}

#[tokio::test]
async fn pipelines_round_trip_in_the_legacy_format_and_finish() {
    let router = TestRouter::start().await;
    let mut sub = router.live_sub().await;
    let mut c = router.client().await;
    let pipeline = json!([
        [
            "graph",
            [[
                [
                    ["worker_name", "Downloader"],
                    ["data", [["filename", "0.dat"]]]
                ],
                [
                    ["worker_name", "GetLinks"],
                    ["data", [["filename", "0.dat"]]]
                ]
            ]]
        ],
        ["data", [["filename", "0.dat"]]]
    ]);
    let r = router
        .ask(
            &mut c,
            json!({"command": "add pipeline", "pipeline": pipeline}),
        )
        .await;
    assert_eq!(r["answer"], "pipeline accepted");
    assert!(is_id(&r["pipeline id"]));
    let id = r["pipeline id"].as_str().unwrap().to_owned();
    assert_eq!(sub.expect("new pipeline").await, "new pipeline");
    assert_eq!(
        router.ask(&mut c, json!({"command": "get pipeline"})).await,
        json!({"pipeline": pipeline, "pipeline id": id})
    );
    assert_eq!(
        router
            .ask(&mut c, json!({"command": "pipeline finished"}))
            .await["answer"],
        "syntax error"
    );
    // The legacy router crashed here; ours answers a syntax error and keeps the id pending.
    assert_eq!(
        router
            .ask(
                &mut c,
                json!({"command": "pipeline finished", "pipeline id": id})
            )
            .await["answer"],
        "syntax error"
    );
    assert_eq!(
        router
            .ask(
                &mut c,
                json!({"command": "pipeline finished", "pipeline id": id, "duration": 2.0})
            )
            .await,
        json!({"answer": "good job!"})
    );
    assert_eq!(
        sub.expect("pipeline finished").await,
        format!("pipeline finished: id={id}, duration=2.0")
    );
    assert_eq!(
        router
            .ask(
                &mut c,
                json!({"command": "pipeline finished", "pipeline id": id, "duration": 2.0})
            )
            .await,
        json!({"answer": "unknown pipeline id"})
    );
    sub.expect_silence().await;
}

#[tokio::test]
async fn job_and_pipeline_ids_are_separate_spaces() {
    let router = TestRouter::start().await;
    let mut c = router.client().await;
    let job = router
        .ask(&mut c, json!({"command": "add job", "worker": "A"}))
        .await["job id"]
        .clone();
    let p = json!([["graph", [[[["worker_name", "A"]], null]]], ["data", null]]);
    let pid = router
        .ask(&mut c, json!({"command": "add pipeline", "pipeline": p}))
        .await["pipeline id"]
        .clone();
    assert_eq!(
        router
            .ask(
                &mut c,
                json!({"command": "pipeline finished", "pipeline id": job, "duration": 1})
            )
            .await["answer"],
        "unknown pipeline id"
    );
    assert_eq!(
        router
            .ask(
                &mut c,
                json!({"command": "job finished", "job id": pid, "duration": 1})
            )
            .await["answer"],
        "unknown job id"
    );
}

#[tokio::test]
async fn invalid_pipelines_are_refused_with_the_reason() {
    let router = TestRouter::start().await;
    let mut c = router.client().await;
    let cases = [
        (
            json!([
                ["graph", [[[["worker_name", "A"]], [["worker_name", "A"]]]]],
                ["data", null]
            ]),
            "cycle",
        ),
        (json!([["graph", []], ["data", null]]), "no job"),
        (json!({"graph": "nope"}), "graph"),
        (json!(42), "pairs"),
    ];
    for (pipeline, reason) in cases {
        let r = router
            .ask(
                &mut c,
                json!({"command": "add pipeline", "pipeline": pipeline}),
            )
            .await;
        assert_eq!(r["answer"], "invalid pipeline", "{pipeline}");
        assert!(r["error"].as_str().unwrap().contains(reason), "{r}");
    }
    assert_eq!(
        router.ask(&mut c, json!({"command": "get pipeline"})).await,
        json!({"pipeline": null})
    );
}

#[tokio::test]
async fn job_failed_on_the_last_attempt_is_broadcast_and_ends_the_job() {
    let settings = RouterSettings {
        max_attempts: 1,
        ..RouterSettings::default()
    };
    let router = TestRouter::start_settings(serde_json::Map::new(), settings).await;
    let mut sub = router.live_sub().await;
    let mut c = router.client().await;
    let id = router
        .ask(&mut c, json!({"command": "add job", "worker": "A"}))
        .await["job id"]
        .clone();
    router.ask(&mut c, json!({"command": "get job"})).await;
    let r = router
        .ask(
            &mut c,
            json!({"command": "job failed", "job id": id, "error": "boom", "duration": 0.5}),
        )
        .await;
    assert_eq!(r, json!({"answer": "failure recorded"}));
    assert_eq!(sub.expect("new job").await, "new job");
    assert_eq!(
        sub.expect("job failed").await,
        format!("job failed: {} error: boom", id.as_str().unwrap())
    );
    assert_eq!(
        router
            .ask(
                &mut c,
                json!({"command": "job failed", "job id": id, "error": "boom"})
            )
            .await,
        json!({"answer": "unknown job id"})
    );
    assert_eq!(
        router.ask(&mut c, json!({"command": "job failed"})).await["answer"],
        "syntax error"
    );
}

#[tokio::test]
async fn command_errors_follow_the_legacy_classes() {
    let router = TestRouter::start().await;
    let mut c = router.client().await;
    assert_eq!(
        router.ask(&mut c, json!({"worker": "A"})).await,
        json!({"answer": "undefined command"})
    );
    for command in [
        json!("GET JOB"),
        json!(42),
        json!(null),
        json!("launch missiles"),
    ] {
        assert_eq!(
            router.ask(&mut c, json!({"command": command})).await,
            json!({"answer": "unknown command"})
        );
    }
    let r = router
        .ask(&mut c, json!({"command": "add job", "data": {}}))
        .await;
    assert_eq!(r["answer"], "syntax error");
    assert!(r["error"].as_str().unwrap().contains("worker"), "{r}");
    assert_eq!(
        router
            .ask(&mut c, json!({"command": "add job", "worker": ""}))
            .await["answer"],
        "syntax error"
    );
    assert_eq!(
        router
            .ask(&mut c, json!({"command": "add job", "worker": 7}))
            .await["answer"],
        "syntax error"
    );
    assert_eq!(
        router
            .ask(&mut c, json!({"command": "get job", "workers": "A"}))
            .await["answer"],
        "syntax error"
    );
}

#[tokio::test]
async fn malformed_requests_get_an_error_and_the_next_request_is_served() {
    let router = TestRouter::start().await;
    let mut c = router.client().await;
    let deep = "[".repeat(10_000);
    for bad in [
        &b"\xff\xfe\x00\x80"[..],
        b"",
        b"not json",
        b"42",
        b"null",
        b"true",
        b"[1, 2]",
        b"\"command\"",
        deep.as_bytes(),
    ] {
        let r = router.raw(&mut c, bad).await;
        assert_eq!(r["answer"], "malformed request", "{bad:?}");
        assert!(r["error"].is_string());
        let ok = router.ask(&mut c, json!({"command": "get job"})).await;
        assert_eq!(ok, json!({"worker": null}));
    }
}

#[tokio::test]
async fn multi_frame_requests_are_malformed() {
    use zeromq::{ReqSocket, Socket, SocketRecv, SocketSend, ZmqMessage};
    let router = TestRouter::start().await;
    let mut req = ReqSocket::new();
    req.connect(&router.api).await.unwrap();
    let mut msg = ZmqMessage::from(r#"{"command": "get job"}"#);
    msg.push_back("second frame".into());
    req.send(msg).await.unwrap();
    let reply = req.recv().await.unwrap();
    let v: Value = serde_json::from_slice(reply.get(0).unwrap()).unwrap();
    assert_eq!(v["answer"], "malformed request");
    assert!(v["error"].as_str().unwrap().contains("2 frames"), "{v}");
    req.send(ZmqMessage::from(r#"{"command": "get job"}"#))
        .await
        .unwrap();
    let reply = req.recv().await.unwrap();
    assert_eq!(reply.get(0).unwrap().as_ref(), br#"{"worker":null}"#);
}

#[tokio::test]
async fn a_one_megabyte_payload_round_trips() {
    let router = TestRouter::start().await;
    let mut c = router.client().await;
    let big: String = (0..1_048_576)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let r = router
        .ask(
            &mut c,
            json!({"command": "add job", "worker": "Big", "data": {"blob": big}}),
        )
        .await;
    let job = router.ask(&mut c, json!({"command": "get job"})).await;
    assert_eq!(job["job id"], r["job id"]);
    assert_eq!(job["data"]["blob"].as_str().unwrap(), big);
}

#[tokio::test]
async fn routing_by_worker_hands_out_only_offered_workers() {
    let router = TestRouter::start().await;
    let mut c = router.client().await;
    let gpu = router
        .ask(&mut c, json!({"command": "add job", "worker": "Gpu"}))
        .await["job id"]
        .clone();
    let cpu = router
        .ask(&mut c, json!({"command": "add job", "worker": "Cpu"}))
        .await["job id"]
        .clone();
    assert_eq!(
        router
            .ask(&mut c, json!({"command": "get job", "workers": ["Other"]}))
            .await,
        json!({"worker": null})
    );
    assert_eq!(
        router
            .ask(&mut c, json!({"command": "get job", "workers": ["Cpu"]}))
            .await["job id"],
        cpu
    );
    assert_eq!(
        router
            .ask(&mut c, json!({"command": "get job", "workers": ["Cpu"]}))
            .await,
        json!({"worker": null})
    );
    // A legacy get job (no "workers") takes any job.
    assert_eq!(
        router.ask(&mut c, json!({"command": "get job"})).await["job id"],
        gpu
    );
}

#[tokio::test]
async fn shutdown_is_clean() {
    let router = TestRouter::start().await;
    let mut c = router.client().await;
    router.ask(&mut c, json!({"command": "get job"})).await;
    router.stop().await;
}

#[tokio::test]
async fn a_failed_job_is_retried_after_a_backoff_then_failed_with_its_attempts() {
    let settings = RouterSettings {
        max_attempts: 2,
        retry_backoff_ms: 50,
        ..RouterSettings::default()
    };
    let router = TestRouter::start_settings(serde_json::Map::new(), settings).await;
    let mut sub = router.live_sub().await;
    let mut c = router.client().await;
    let id = router
        .ask(&mut c, json!({"command": "add job", "worker": "A"}))
        .await["job id"]
        .clone();
    assert_eq!(sub.expect("new job").await, "new job");
    assert_eq!(
        router.ask(&mut c, json!({"command": "get job"})).await["job id"],
        id
    );
    let failed = json!({"command": "job failed", "job id": id, "error": "flaky"});
    assert_eq!(
        router.ask(&mut c, failed.clone()).await,
        json!({"answer": "failure recorded"})
    );
    // The retry is announced like a new job once its back-off is over.
    assert_eq!(sub.expect("the retry's new job").await, "new job");
    assert_eq!(
        router.ask(&mut c, json!({"command": "get job"})).await["job id"],
        id
    );
    assert_eq!(
        router.ask(&mut c, failed.clone()).await,
        json!({"answer": "failure recorded"})
    );
    assert_eq!(
        sub.expect("job failed").await,
        format!(
            "job failed: {} error: flaky (failed 2 of 2 attempts)",
            id.as_str().unwrap()
        )
    );
    assert_eq!(
        router.ask(&mut c, failed).await,
        json!({"answer": "unknown job id"})
    );
}

#[tokio::test]
async fn with_a_cluster_token_requests_without_it_are_unauthorized_and_change_nothing() {
    use pypelinin_common::transport::{ApiClient, ClientOptions};
    let settings = RouterSettings {
        token: Some("s3cret".into()),
        ..RouterSettings::default()
    };
    let router = TestRouter::start_settings(serde_json::Map::new(), settings).await;
    let mut anonymous = router.client().await;
    // The token is checked before anything else: a request that is incomplete, unknown or
    // not even JSON is unauthorized too, not answered with what is wrong with it.
    for request in [
        json!({"command": "add job", "worker": "A"}),
        json!({"command": "add job", "worker": "A", "cluster token": "wrong"}),
        json!({"command": "add job", "worker": "A", "cluster token": "s3cre"}),
        json!({"command": "get configuration"}),
        json!({"command": "add job"}),
        json!({"command": "no such command"}),
        json!({"worker": "A"}),
    ] {
        assert_eq!(
            router.ask(&mut anonymous, request).await,
            json!({"answer": "unauthorized"})
        );
    }
    assert_eq!(
        router.raw(&mut anonymous, b"not json at all").await,
        json!({"answer": "unauthorized"})
    );
    let mut member = ApiClient::connect(router.api.clone(), ClientOptions::default())
        .await
        .unwrap()
        .with_token(Some("s3cret".into()));
    assert_eq!(
        member.get_job(None).await.unwrap(),
        None,
        "nothing was added by the refused requests"
    );
    let id = member
        .add_job(pypelinin_common::protocol::request::NewJob::new(
            "A",
            json!(null),
        ))
        .await
        .unwrap();
    assert_eq!(member.get_job(None).await.unwrap().unwrap().job_id, id);

    // A token inside a request of a batch is dropped: never stored or handed out.
    let batch = json!({"command": "batch", "cluster token": "s3cret", "requests": [
        {"command": "add job", "worker": "B", "data": {"n": 1}, "cluster token": "leak"}
    ]});
    let reply = router.ask(&mut anonymous, batch).await;
    assert_eq!(reply["replies"][0]["answer"], "job accepted", "{reply}");
    let job = member.get_job(None).await.unwrap().unwrap();
    assert_eq!(job.worker, "B");
    assert!(
        !job.fields.contains_key("cluster token"),
        "the inner token was handed out: {:?}",
        job.fields
    );
}

#[tokio::test]
async fn an_empty_cluster_token_is_refused_at_start() {
    let settings = RouterSettings {
        api: "tcp://127.0.0.1:0".into(),
        broadcast: "tcp://127.0.0.1:0".into(),
        token: Some(String::new()),
        ..RouterSettings::default()
    };
    let Err(e) = pypelinin_router::Router::bind(settings, serde_json::Map::new()).await else {
        panic!("a router with an empty token started");
    };
    assert!(e.to_string().contains("cluster token is empty"), "{e}");
}

#[tokio::test]
async fn a_batch_is_answered_item_by_item_and_survives_a_restart() {
    let data = std::env::temp_dir().join(format!("pypelinin-batch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let settings = || RouterSettings {
        data_dir: Some(data.clone()),
        ..RouterSettings::default()
    };
    let router = TestRouter::start_settings(Default::default(), settings()).await;
    let mut sub = router.live_sub().await;
    let mut c = router.client().await;
    let add = |w: &str, n: u32| json!({"command": "add job", "worker": w, "data": {"n": n}});
    let reply = router
        .ask(
            &mut c,
            json!({"command": "batch", "requests": [
                add("A", 1), add("B", 2), {"command": "get job"}, {"command": "nope"}, add("A", 3),
            ]}),
        )
        .await;
    assert_eq!(reply["answer"], "batch", "{reply}");
    let replies = reply["replies"].as_array().expect("replies").clone();
    assert_eq!(replies.len(), 5, "{reply}");
    assert_eq!(replies[0]["answer"], "job accepted");
    assert_eq!(
        replies[2]["job id"], replies[0]["job id"],
        "FIFO: the first job first"
    );
    assert_eq!(replies[3], json!({"answer": "unknown command"}));
    // One wake-up for the whole batch.
    assert_eq!(sub.expect("new job broadcast").await, "new job");
    sub.expect_silence().await;
    router.stop().await;

    // Restarted from its durable record: the taken job stays taken, the others come in order.
    let router = TestRouter::start_settings(Default::default(), settings()).await;
    let mut c = router.client().await;
    let get = json!({"command": "get job"});
    let reply = router
        .ask(
            &mut c,
            json!({"command": "batch", "requests": [get, get, get]}),
        )
        .await;
    let handed: Vec<Value> = reply["replies"]
        .as_array()
        .expect("replies")
        .iter()
        .map(|r| r.get("data").cloned().unwrap_or(Value::Null))
        .collect();
    assert_eq!(
        handed,
        [json!({"n": 2}), json!({"n": 3}), Value::Null],
        "{reply}"
    );
    router.stop().await;
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test]
async fn get_jobs_and_get_pipelines_take_several_in_order_and_survive_a_restart() {
    let data = std::env::temp_dir().join(format!("pypelinin-take-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let settings = || RouterSettings {
        data_dir: Some(data.clone()),
        ..RouterSettings::default()
    };
    let router = TestRouter::start_settings(Default::default(), settings()).await;
    let mut c = router.client().await;
    for (n, worker) in ["A", "B", "A", "A", "B"].iter().enumerate() {
        let added = router
            .ask(
                &mut c,
                json!({"command": "add job", "worker": worker, "data": {"n": n}}),
            )
            .await;
        assert_eq!(added["answer"], "job accepted", "{added}");
    }
    for n in 0..3 {
        let p = json!([
            ["graph", [[[["worker_name", "A"]], null]]],
            ["data", [["n", n]]]
        ]);
        let added = router
            .ask(&mut c, json!({"command": "add pipeline", "pipeline": p}))
            .await;
        assert_eq!(added["answer"], "pipeline accepted", "{added}");
    }
    let reply = router
        .ask(
            &mut c,
            json!({"command": "get jobs", "workers": ["A"], "max": 2}),
        )
        .await;
    assert_eq!(reply["answer"], "jobs", "{reply}");
    let data_of = |reply: &Value| -> Vec<Value> {
        reply["jobs"]
            .as_array()
            .expect("jobs")
            .iter()
            .map(|j| j["data"]["n"].clone())
            .collect()
    };
    assert_eq!(data_of(&reply), [json!(0), json!(2)], "the oldest A jobs");
    let too_many = router
        .ask(&mut c, json!({"command": "get jobs", "max": 10_001}))
        .await;
    assert_eq!(too_many["answer"], "syntax error", "{too_many}");
    let pipelines = c.get_pipelines(2).await.expect("get pipelines");
    let order: Vec<_> = pipelines
        .iter()
        .map(|p| p.pipeline[1][1][0][1].clone())
        .collect();
    assert_eq!(order, [json!(0), json!(1)], "the oldest pipelines");
    router.stop().await;

    // Restarted from its durable record: what was taken stays taken.
    let router = TestRouter::start_settings(Default::default(), settings()).await;
    let mut c = router.client().await;
    let reply = router
        .ask(&mut c, json!({"command": "get jobs", "max": 10}))
        .await;
    assert_eq!(data_of(&reply), [json!(1), json!(3), json!(4)], "{reply}");
    assert!(c.get_jobs(None, 10).await.expect("get jobs").is_empty());
    let pipelines = c.get_pipelines(10).await.expect("get pipelines");
    assert_eq!(pipelines.len(), 1);
    assert_eq!(pipelines[0].pipeline[1][1][0][1], json!(2));
    router.stop().await;
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test]
async fn try_recv_returns_at_once_and_hands_over_events_that_arrived() {
    use pypelinin_common::protocol::Event;
    use pypelinin_common::testing::within;
    use pypelinin_common::transport::Subscriber;

    use crate::support::WAIT;

    let router = TestRouter::start().await;
    let mut c = router.client().await;
    let mut sub = Subscriber::connect(&router.broadcast, &[Event::NEW_JOB], WAIT)
        .await
        .expect("subscribe");
    within(WAIT, "a live subscription", sub.wait_live(&mut c, WAIT))
        .await
        .expect("live");
    // Nothing broadcast (but perhaps a late probe): it answers without waiting.
    let idle = within(WAIT, "try_recv on an idle socket", sub.try_recv()).await;
    assert!(!matches!(idle, Some(Ok(Event::NewJob))), "{idle:?}");
    router
        .ask(&mut c, json!({"command": "add job", "worker": "A"}))
        .await;
    // The broadcast arrives in its own time; each try_recv only looks.
    within(WAIT, "the new job broadcast", async {
        loop {
            match sub.try_recv().await {
                Some(Ok(Event::NewJob)) => return,
                Some(Err(e)) => panic!("{e}"),
                _ => tokio::task::yield_now().await,
            }
        }
    })
    .await;
    let again = sub.try_recv().await;
    assert!(
        !matches!(again, Some(Ok(Event::NewJob))),
        "one broadcast, taken once: {again:?}"
    );
}

/// Sends `add job` with `data` spelled exactly as `data_text`; returns the job's id.
async fn add_with_text(router: &TestRouter, c: &mut ApiClient, data_text: &str) -> Value {
    let body = format!(r#"{{"command": "add job", "worker": "Raw", "data": {data_text}}}"#);
    let reply = router.raw(c, body.as_bytes()).await;
    assert_eq!(reply["answer"], "job accepted", "{reply}");
    reply["job id"].clone()
}

/// The text of `key`'s value in the JSON object `reply`, as the router wrote it.
fn text_after<'a>(reply: &'a str, key: &str) -> &'a str {
    let at = reply
        .find(&format!("\"{key}\":"))
        .expect("the key is in the reply")
        + key.len()
        + 3;
    &reply[at..]
}

#[tokio::test]
async fn job_data_is_handed_back_byte_for_byte_and_survives_a_restart() {
    let data_dir = std::env::temp_dir().join(format!("pypelinin-raw-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data_dir);
    let settings = || RouterSettings {
        data_dir: Some(data_dir.clone()),
        ..RouterSettings::default()
    };
    // What a tree of `Value`s would not give back as it came: spacing, number spellings, an
    // integer past 64 bits, escapes and raw UTF-8 (four-byte characters too), a list.
    let texts = [
        r#"{"n": 1.50, "big": 123456789012345678901234567890, "e": 1E3, "neg": -0.0}"#.to_owned(),
        r#"{"escaped": "\u00e7a va \ud83d\ude00 \"q\" \\ \n", "raw": "ça va 😀 ünïcode ✓"}"#
            .to_owned(),
        r#"[ 1 , {"nested" : [true, null, {}]} ]"#.to_owned(),
        // 10 MB: five million two-byte characters.
        format!(r#"{{"payload": "{}"}}"#, "é".repeat(5_000_000)),
    ];
    let router = TestRouter::start_settings(Default::default(), settings()).await;
    let mut c = router.client().await;
    let mut ids = Vec::new();
    for text in &texts {
        ids.push(add_with_text(&router, &mut c, text).await);
    }
    // A pipeline's other keys too.
    let body = format!(
        r#"{{"command": "add pipeline", "pipeline": [["graph", [[[["worker_name", "A"]], null]]], ["data", null]], "note": {}}}"#,
        texts[1]
    );
    assert_eq!(
        router.raw(&mut c, body.as_bytes()).await["answer"],
        "pipeline accepted"
    );
    // The first is handed out before the restart, the others after it.
    let reply = c
        .request_bytes(br#"{"command": "get job"}"#.to_vec())
        .await
        .expect("reply");
    let reply = String::from_utf8(reply.to_vec()).expect("UTF-8");
    assert!(text_after(&reply, "data").starts_with(&texts[0]), "{reply}");
    router.stop().await;

    let router = TestRouter::start_settings(Default::default(), settings()).await;
    let mut c = router.client().await;
    for (text, id) in texts.iter().zip(&ids).skip(1) {
        let reply = c
            .request_bytes(br#"{"command": "get job"}"#.to_vec())
            .await
            .expect("reply");
        let reply = String::from_utf8(reply.to_vec()).expect("UTF-8");
        let parsed: Value = serde_json::from_str(&reply).expect("JSON");
        assert_eq!(&parsed["job id"], id, "FIFO after the restart");
        assert!(
            text_after(&reply, "data").starts_with(text.as_str()),
            "the data of job {id} came back changed: {}…",
            &reply[..reply.len().min(300)]
        );
    }
    let reply = c
        .request_bytes(br#"{"command": "get pipeline"}"#.to_vec())
        .await
        .expect("reply");
    let reply = String::from_utf8(reply.to_vec()).expect("UTF-8");
    assert!(text_after(&reply, "note").starts_with(&texts[1]), "{reply}");
    router.stop().await;
    let _ = std::fs::remove_dir_all(&data_dir);
}

/// A job sent with `"data from pipeline": true` is handed the pipeline's data as an object made
/// of each value's text as the client sent it (in key order, the last of a repeated key): no
/// value is parsed and encoded again.
#[tokio::test]
async fn a_pipelines_data_reaches_its_jobs_value_by_value_as_sent() {
    let router = TestRouter::start().await;
    let mut c = router.client().await;
    let pipeline = r#"[["graph", [[[["worker_name", "A"]], null]]], ["data", [["b", 1], ["a", 1E3], ["b", {"x" : [1,  2.50]}], ["ü", "\u00e7a va 😀"]]]]"#;
    let body =
        format!(r#"{{"command": "add pipeline", "pipeline": {pipeline}, "request id": "r1"}}"#);
    let added = router.raw(&mut c, body.as_bytes()).await;
    assert_eq!(added["answer"], "pipeline accepted", "{added}");
    let p = added["pipeline id"].clone();
    let accepted = router
        .ask(
            &mut c,
            json!({"command": "add job", "worker": "A", "pipeline id": p, "data from pipeline": true}),
        )
        .await;
    assert_eq!(accepted["answer"], "job accepted", "{accepted}");
    let reply = c
        .request_bytes(br#"{"command": "get job"}"#.to_vec())
        .await
        .expect("reply");
    let reply = String::from_utf8(reply.to_vec()).expect("UTF-8");
    assert!(
        text_after(&reply, "data")
            .starts_with(r#"{"a":1E3,"b":{"x" : [1,  2.50]},"ü":"\u00e7a va 😀"}"#),
        "{reply}"
    );
    router.stop().await;
}

/// A pipeliner sends a job whose data is its pipeline's as `"data from pipeline": true`; the
/// router hands the job out with the pipeline's data, before and after a restart, and refuses
/// the key where it cannot hold.
#[tokio::test]
async fn a_job_sent_with_data_from_pipeline_is_handed_out_with_the_pipelines_data() {
    use pypelinin_common::pipeline::Pipeline;
    use pypelinin_common::protocol::request::NewJob;

    let data_dir = std::env::temp_dir().join(format!("pypelinin-dfp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data_dir);
    let settings = || RouterSettings {
        data_dir: Some(data_dir.clone()),
        ..RouterSettings::default()
    };
    let router = TestRouter::start_settings(Default::default(), settings()).await;
    let mut c = router.client().await;
    let data = json!({"filename": "d1", "payload": "ü".repeat(3000)});
    let pipeline = Pipeline::builder()
        .edge("A", "B")
        .data(data.clone())
        .build()
        .unwrap();
    let p = c.add_pipeline(&pipeline).await.unwrap();
    let job = NewJob::with_raw_data("A", serde_json::value::to_raw_value(&data).unwrap())
        .in_pipeline(p.clone())
        .with_data_from_pipeline();
    let encoded =
        serde_json::to_string(&pypelinin_common::protocol::Request::AddJob(job.clone())).unwrap();
    assert!(
        encoded.contains(r#""data from pipeline":true"#) && !encoded.contains("payload"),
        "the data itself is not sent: {}",
        &encoded[..encoded.len().min(300)]
    );
    let id = c.add_job(job.clone()).await.unwrap();
    let id2 = c.add_job(job).await.unwrap();
    let handed = c.get_job(None).await.unwrap().expect("a job");
    assert_eq!(handed.job_id, id);
    assert_eq!(handed.data(), &data);
    router.stop().await;
    // After a restart, from the record.
    let router = TestRouter::start_settings(Default::default(), settings()).await;
    let mut c = router.client().await;
    let handed = c.get_job(None).await.unwrap().expect("a job");
    assert_eq!(handed.job_id, id2);
    assert_eq!(handed.data(), &data);
    // Without a pipeline, or with data as well: refused, saying why.
    let no_pipeline = router
        .ask(
            &mut c,
            json!({"command": "add job", "worker": "A", "data from pipeline": true}),
        )
        .await;
    assert_eq!(no_pipeline["answer"], "syntax error", "{no_pipeline}");
    assert!(
        no_pipeline["error"]
            .as_str()
            .unwrap()
            .contains("needs \"pipeline id\""),
        "{no_pipeline}"
    );
    let both = router
        .ask(
            &mut c,
            json!({"command": "add job", "worker": "A", "pipeline id": p, "data": {}, "data from pipeline": true}),
        )
        .await;
    assert_eq!(both["answer"], "syntax error", "{both}");
    router.stop().await;
    let _ = std::fs::remove_dir_all(&data_dir);
}
