//! Golden tests: literal JSON and broadcast strings as the Python side sends and reads them.

use pypelinin_common::pipeline::Pipeline;
use pypelinin_common::protocol::reply::decode_reply;
use pypelinin_common::protocol::{decode_request, Event, Request};
use pypelinin_common::protocol::{JobAssignment, PipelineAssignment};
use serde_json::json;

#[test]
fn python2_escaped_and_raw_utf8_decode_the_same() {
    let escaped =
        decode_request(br#"{"command": "add job", "worker": "A", "data": {"f": "\u00e7"}}"#)
            .unwrap();
    let raw = decode_request(
        "{\"command\": \"add job\", \"worker\": \"A\", \"data\": {\"f\": \"ç\"}}".as_bytes(),
    )
    .unwrap();
    let (Request::AddJob(escaped), Request::AddJob(raw)) = (escaped, raw) else {
        panic!("not add jobs");
    };
    assert_eq!(escaped.fields.value("data"), raw.fields.value("data"));
    assert_eq!(raw.fields.value("data"), Some(json!({"f": "ç"})));
    // Each is kept (and handed back) as the text it came as.
    assert_eq!(
        escaped.fields.get("data").unwrap().get(),
        r#"{"f": "\u00e7"}"#
    );
}

#[test]
fn the_legacy_example_requests_decode() {
    let body = br#"{"command": "add pipeline",
 "pipeline": [["graph", [[ [["worker_name", "Downloader"], ["data", [["filename", "0.dat"]]]],
                           [["worker_name", "GetLinks"],   ["data", [["filename", "0.dat"]]]] ],
                         [ [["worker_name", "Downloader"], ["data", [["filename", "0.dat"]]]],
                           [["worker_name", "GetTextAndWords"], ["data", [["filename", "0.dat"]]]] ]]],
              ["data", [["filename", "0.dat"]]]]}"#;
    let Request::AddPipeline(p) = decode_request(body).unwrap() else {
        panic!()
    };
    let pipeline = Pipeline::from_legacy_text(p.pipeline.get()).unwrap();
    assert_eq!(pipeline.len(), 3);
    assert_eq!(pipeline.starters().count(), 1);
    assert_eq!(
        pipeline.job_data(pipeline.find("GetLinks").unwrap()),
        json!({"filename": "0.dat"})
    );
}

#[test]
fn legacy_replies_decode() {
    let job = decode_reply::<Option<JobAssignment>>(br#"{"worker": "Upper", "data": {"filename": "a.json"}, "job id": "8e97badfa6d64d0faf032d25a6b0a127"}"#)
        .unwrap()
        .unwrap();
    assert_eq!(job.worker, "Upper");
    assert_eq!(job.data(), &json!({"filename": "a.json"}));
    let p = decode_reply::<Option<PipelineAssignment>>(br#"{"pipeline": [["graph", [[[["worker_name", "A"]], null]]], ["data", null]], "pipeline id": "85d7a61c89024dfcb5da7b622b9f4058"}"#)
        .unwrap()
        .unwrap();
    assert_eq!(p.pipeline_id.as_str(), "85d7a61c89024dfcb5da7b622b9f4058");
}

#[test]
fn legacy_broadcasts_parse() {
    let e: Event = "job finished: 8e97badfa6d64d0faf032d25a6b0a127 duration: 0.123456789012"
        .parse()
        .unwrap();
    assert_eq!(e.duration_secs(), Some(0.123456789012));
    let e: Event = "pipeline finished: id=85d7a61c89024dfcb5da7b622b9f4058, duration=1e+16"
        .parse()
        .unwrap();
    assert_eq!(e.duration_secs(), Some(1e16));
}
