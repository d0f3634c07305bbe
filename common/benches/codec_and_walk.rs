//! Micro-benchmarks of the hot paths every request and every pipeline go through: decoding a
//! request, encoding a reply, reading a pipeline in the legacy format, and walking its DAG.
//!
//! `cargo bench -p pypelinin-common` (figures in docs/performance.md).

#![allow(missing_docs, clippy::unwrap_used)] // criterion's macros; a failed unwrap is a failed bench.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use pypelinin_common::pipeline::{Pipeline, RunState};
use pypelinin_common::protocol::{decode_request, Answer, AnswerKind, Batch, Reply, Request};
use serde_json::json;
use std::hint::black_box;

/// A chain Noop0 → Noop1 → ... of `n` jobs with a small data object.
fn chain(n: usize) -> Pipeline {
    let mut builder = Pipeline::builder();
    for i in 0..n.saturating_sub(1) {
        builder = builder.edges(format!("Noop{i}"), [format!("Noop{}", i + 1)]);
    }
    if n == 1 {
        builder = builder.job("Noop0");
    }
    builder
        .data(json!({"filename": "doc-1", "url": "http://example.com/1"}))
        .build()
        .unwrap()
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");
    let add_job = br#"{"command": "add job", "worker": "Noop1", "data": {"filename": "doc-1"}, "pipeline id": "0123456789abcdef0123456789abcdef"}"#;
    group.bench_function("decode add job", |b| {
        b.iter(|| decode_request(black_box(add_job)).unwrap())
    });
    let add_pipeline = Request::AddPipeline(pypelinin_common::protocol::request::NewPipeline::new(
        &chain(2).to_legacy(),
    ))
    .encode();
    group.bench_function("decode add pipeline (2 jobs)", |b| {
        b.iter(|| decode_request(black_box(&add_pipeline)).unwrap())
    });
    let get = Request::GetJob(Default::default());
    let batch = Request::Batch(Batch::of(&vec![get; 64])).encode();
    group.bench_function("decode batch of 64 get job", |b| {
        b.iter(|| match decode_request(black_box(&batch)).unwrap() {
            Request::Batch(batch) => batch.decode(),
            _ => unreachable!(),
        })
    });
    let reply = Reply::from(
        Answer::new(AnswerKind::JobAccepted).with_job_id("0123456789abcdef0123456789abcdef".into()),
    );
    group.bench_function("encode job accepted", |b| {
        b.iter(|| black_box(&reply).encode())
    });
    group.finish();
}

fn walk(c: &mut Criterion) {
    let mut group = c.benchmark_group("dag walk");
    for n in [2usize, 10, 100] {
        let legacy = chain(n).to_legacy();
        group.bench_with_input(BenchmarkId::new("from legacy", n), &legacy, |b, legacy| {
            b.iter(|| Pipeline::from_legacy(black_box(legacy)).unwrap())
        });
        let pipeline = chain(n);
        group.bench_with_input(BenchmarkId::new("walk to the end", n), &pipeline, |b, p| {
            b.iter(|| {
                let mut run = RunState::new(p);
                let mut ready = run.runnable_at_start(p);
                while let Some(job) = ready.pop() {
                    ready.extend(run.finish(p, job));
                }
                assert!(run.is_complete());
            })
        });
    }
    group.finish();
}

criterion_group!(benches, codec, walk);
criterion_main!(benches);
