//! The `pypelinin` binary where no router is needed: pipeline files are checked before
//! anything is sent, DOT and SVG are drawn, and an unreachable router is exit code 2. (With a
//! cluster: `example/tests/cli.rs`.)

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use std::process::{Command, Output};

fn pypelinin(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pypelinin"))
        .args(args)
        .env_remove("PYPELININ_API")
        .env_remove("PYPELININ_CONFIG")
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn dot_draws_a_pipeline_file_as_dot_and_svg() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.toml");
    std::fs::write(
        &file,
        "[[jobs]]\nworker = \"Download\"\n\n[[jobs]]\nworker = \"Parse\"\nafter = [\"Download\"]\n",
    )
    .unwrap();
    let svg = dir.path().join("p.svg");
    let out = pypelinin(&[
        "dot",
        file.to_str().unwrap(),
        "--svg",
        svg.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let dot = text(&out.stdout);
    assert!(dot.contains("\"Download\" -> \"Parse\";"), "{dot}");
    let drawn = std::fs::read_to_string(&svg).unwrap();
    assert!(drawn.contains("<svg") && drawn.contains("Parse"), "{drawn}");

    let out = pypelinin(&["--json", "dot", file.to_str().unwrap()]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["dot"].as_array().unwrap().len(), 1);
}

#[test]
fn an_invalid_file_is_refused_with_its_line_before_anything_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cycle.toml");
    std::fs::write(
        &file,
        "[[jobs]]\nworker = \"A\"\nafter = [\"B\"]\n\n[[jobs]]\nworker = \"B\"\nafter = [\"A\"]\n",
    )
    .unwrap();
    // No router listens there: the file is refused before any connection is tried.
    let out = pypelinin(&[
        "--api",
        "tcp://127.0.0.1:9",
        "submit",
        file.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("cycle.toml:") && (err.contains("cycle") || err.contains("starter")),
        "{err}"
    );
    assert!(!err.contains("reach"), "it tried the router: {err}");

    let json = dir.path().join("edge.json");
    std::fs::write(
        &json,
        "{\"jobs\": [{\"worker\": \"A\"}],\n \"edges\": [[\"A\", \"Z\"]]}",
    )
    .unwrap();
    let out = pypelinin(&["dot", json.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("edge.json:2: \"Z\" is no job of this pipeline"),
        "{err}"
    );
}

#[test]
fn usage_and_unreachable_routers_exit_2_with_one_clear_line() {
    let out = pypelinin(&["--api", "127.0.0.1:5555", "status"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("tcp://HOST:PORT"), "{err}");

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let api = format!("tcp://127.0.0.1:{port}");
    let out = pypelinin(&["--api", &api, "status"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("cannot reach") && err.contains(&api) && err.contains("router running"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let out = pypelinin(&["watch", "--event", "nonsense"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn the_dashboard_refuses_to_expose_the_cluster_without_a_token() {
    let out = Command::new(env!("CARGO_BIN_EXE_pypelinin"))
        .args(["dashboard", "--listen", "0.0.0.0:0"])
        .env_remove("PYPELININ_TOKEN")
        .env_remove("PYPELININ_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("refusing to serve the dashboard on 0.0.0.0:0") && err.contains("token"),
        "{err}"
    );
}
