//! The router's one-pass request decoder (values kept as text) against serde's derived
//! decoding of the same request through a tree of values: the same requests, the same
//! refusals.

use proptest::prelude::*;
use pypelinin_common::protocol::{decode_request, Limits, Request, RequestError};
use serde_json::{json, Map, Value};

/// A JSON value of a few levels.
fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-1e9f64..1e9).prop_map(Value::from),
        "[a-z é\"\\\\\u{1F600}]{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z ]{1,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A request of a known command, its keys right, wrong or missing at random.
fn request() -> impl Strategy<Value = Value> {
    let command = prop::sample::select(vec![
        "add job",
        "add pipeline",
        "get job",
        "get jobs",
        "job finished",
        "job failed",
        "renew leases",
        "probe",
        "cancel pipeline",
    ]);
    let key = prop::sample::select(vec![
        "worker",
        "data",
        "pipeline id",
        "ends pipeline",
        "subscribed",
        "pipeline",
        "max",
        "workers",
        "job id",
        "duration",
        "error",
        "token",
        "extra",
    ]);
    let good = prop_oneof![
        Just(json!("W")),
        Just(json!(["W", "V"])),
        Just(json!(3)),
        Just(json!(0.5)),
        Just(json!(true)),
        Just(json!([
            ["graph", [[[["worker_name", "A"]], null]]],
            ["data", null]
        ])),
    ];
    let field = prop_oneof![good, value()];
    (command, prop::collection::vec((key, field), 0..6)).prop_map(|(command, fields)| {
        let mut map: Map<String, Value> =
            fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        map.insert("command".into(), command.into());
        Value::Object(map)
    })
}

/// The class of a decoding's outcome: the request, or the kind of refusal.
fn class(outcome: Result<Request, RequestError>) -> Result<Request, &'static str> {
    outcome.map_err(|e| match e {
        RequestError::Malformed(_) => "malformed",
        RequestError::UndefinedCommand => "undefined command",
        RequestError::UnknownCommand => "unknown command",
        RequestError::Syntax(_) => "syntax error",
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn the_one_pass_decoder_reads_requests_as_serde_reads_their_values(request in request()) {
        // Compact text, as serde writes it: the texts kept are those serde would write again.
        let text = serde_json::to_string(&request).unwrap();
        let one_pass = class(decode_request(text.as_bytes()));
        let through_values = class(
            serde_json::from_value::<Request>(request.clone())
                .map_err(|e| RequestError::Syntax(e.to_string()))
                .and_then(Limits::apply),
        );
        prop_assert_eq!(one_pass, through_values, "{}", text);
    }
}
