//! Random DAGs: the legacy format round-trips, DOT is deterministic, cycles are rejected.

use proptest::prelude::*;
use pypelinin_common::pipeline::{Pipeline, PipelineBuilder, RunState};
use serde_json::{json, Value};

/// A random DAG: `n` jobs, edges only from lower to higher index (so no cycle), plus data.
fn dag() -> impl Strategy<Value = (usize, Vec<(usize, usize)>, Option<Value>)> {
    (1usize..12).prop_flat_map(|n| {
        let edges = proptest::collection::vec((0..n, 0..n), 0..(n * 2))
            .prop_map(|pairs| pairs.into_iter().filter(|(a, b)| a < b).collect::<Vec<_>>());
        let data = proptest::option::of(
            proptest::collection::btree_map("[a-z ]{1,6}", any::<i32>(), 0..4)
                .prop_map(|m| json!(m)),
        );
        (Just(n), edges, data)
    })
}

fn build(
    n: usize,
    edges: &[(usize, usize)],
    data: &Option<Value>,
    order: &[usize],
) -> PipelineBuilder {
    let mut b = Pipeline::builder();
    for &i in order {
        b = b.job(format!("W{i}"));
    }
    for &(a, c) in edges {
        b = b.edge(format!("W{a}"), format!("W{c}"));
    }
    debug_assert!(order.len() == n);
    match data {
        Some(d) => b.data(d.clone()),
        None => b,
    }
}

proptest! {
    #[test]
    fn legacy_format_round_trips((n, edges, data) in dag()) {
        let order: Vec<usize> = (0..n).collect();
        let p = build(n, &edges, &data, &order).build().unwrap();
        let legacy = p.to_legacy();
        let back = Pipeline::from_legacy(&legacy).unwrap();
        prop_assert_eq!(&back, &p);
        prop_assert_eq!(back.to_legacy(), legacy.clone());
        // Through JSON text too, as it travels on the wire.
        let text = serde_json::to_string(&p).unwrap();
        let parsed: Pipeline = serde_json::from_str(&text).unwrap();
        prop_assert_eq!(parsed, p);
    }

    #[test]
    fn dot_does_not_depend_on_construction_order((n, edges, data) in dag(), seed in any::<u64>()) {
        let forward: Vec<usize> = (0..n).collect();
        let mut shuffled = forward.clone();
        // A deterministic shuffle from the seed.
        let mut s = seed | 1;
        for i in (1..shuffled.len()).rev() {
            s ^= s << 13; s ^= s >> 7; s ^= s << 17;
            shuffled.swap(i, (s % (i as u64 + 1)) as usize);
        }
        let mut reversed_edges = edges.clone();
        reversed_edges.reverse();
        let a = build(n, &edges, &data, &forward).build().unwrap();
        let b = build(n, &reversed_edges, &data, &shuffled).build().unwrap();
        prop_assert_eq!(a.to_dot(), b.to_dot());
        prop_assert_eq!(a.to_dot().lines().filter(|l| l.contains("->")).count(), {
            let mut e = edges.clone(); e.sort(); e.dedup(); e.len()
        });
    }

    #[test]
    fn a_back_edge_makes_a_cycle_that_is_rejected((n, edges, data) in dag()) {
        prop_assume!(!edges.is_empty());
        let order: Vec<usize> = (0..n).collect();
        let (a, c) = edges[0];
        let cyclic = build(n, &edges, &data, &order).edge(format!("W{c}"), format!("W{a}")).build();
        prop_assert!(cyclic.is_err());
    }

    #[test]
    fn the_run_state_runs_each_job_once_after_all_its_parents((n, edges, data) in dag()) {
        let order: Vec<usize> = (0..n).collect();
        let p = build(n, &edges, &data, &order).build().unwrap();
        let mut run = RunState::new(&p);
        let mut ready = run.runnable_at_start(&p);
        let mut ran = Vec::new();
        while let Some(job) = ready.pop() {
            for parent in p.parents(job) {
                prop_assert!(run.is_finished(parent), "job ran before a parent finished");
            }
            ran.push(job);
            ready.extend(run.finish(&p, job));
        }
        prop_assert!(run.is_complete());
        ran.sort();
        ran.dedup();
        prop_assert_eq!(ran.len(), n);
    }
}

#[test]
fn starter_less_graphs_are_rejected() {
    let v = json!([
        [
            "graph",
            [
                [[["worker_name", "A"]], [["worker_name", "B"]]],
                [[["worker_name", "B"]], [["worker_name", "A"]]]
            ]
        ],
        ["data", null]
    ]);
    assert!(Pipeline::from_legacy(&v).is_err());
}
