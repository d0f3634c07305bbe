//! Fuzzes the router's request handling: decoding a frame (UTF-8, JSON, command, fields,
//! cluster token) and applying it to a long-lived state, as the router does, including the
//! passing of time (leases, back-offs, retention) and requests that wait for work. Any panic,
//! and any broken invariant (`State::check_invariants` after every input), is a bug.
#![no_main]

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use pypelinin_common::ids::{JobId, PipelineId};
use pypelinin_common::protocol::{decode_request_with_token, Reply};
use pypelinin_router::state::{Ids, Policy, State};

/// The state is kept across inputs (so sequences of requests meet), and started afresh every
/// this many inputs, so its records do not grow past libFuzzer's memory limit.
const RESET_EVERY: u64 = 10_000;

thread_local! {
    static STATE: RefCell<(State, u64, u64)> = RefCell::new(fresh());
}

fn fresh() -> (State, u64, u64) {
    // Counter ids: a crash found replays exactly.
    let state = State::new(Default::default(), Policy::default()).with_ids(Ids::Counter(0));
    (state, 1_000_000, 0)
}

fuzz_target!(|data: &[u8]| {
    STATE.with(|cell| {
        let mut guard = cell.borrow_mut();
        guard.2 += 1;
        if guard.2 % RESET_EVERY == 0 {
            *guard = fresh();
        }
        let (state, now, _) = &mut *guard;
        let mut events = Vec::new();
        // Each input moves time on a little, so leases and back-offs expire now and then.
        *now += u64::from(data.first().copied().unwrap_or(0)) * 100;
        state.tick(*now, &mut events);
        let ticket = guard_ticket(data);
        if let Ok((request, _token)) = decode_request_with_token(data) {
            if let Some(reply) = state.handle_or_wait(ticket, request, *now, &mut events) {
                let _ = reply.encode();
            }
        }
        let mut served = Vec::new();
        state.serve_waiting(*now, &mut served);
        for waited in served {
            let _ = waited.reply.encode();
            // Now and then the reply cannot be delivered: what it handed out is taken back.
            if data.len() > 2 && data[2] % 4 == 0 {
                let (jobs, pipelines) = handed_out(&waited.reply);
                state.take_back(&jobs, &pipelines, &mut events);
            }
        }
        if let Err(broken) = state.check_invariants() {
            panic!("invariant broken: {broken}");
        }
        // Now and then a restart: it must restore the same queues, back-offs and leases.
        if data.len() > 1 && data[1] % 16 == 0 {
            let restarted = state.restarted();
            if let Err(broken) = state.check_restored(&restarted) {
                panic!("restart: {broken}");
            }
            *state = restarted;
        }
        for event in &events {
            let _ = event.to_string();
        }
        let _ = state.take_changes();
    });
});

/// A ticket for a request that may wait: any number does, the state only hands it back.
fn guard_ticket(data: &[u8]) -> u64 {
    data.iter()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(*b)))
}

/// The jobs and pipelines a reply hands out.
fn handed_out(reply: &Reply) -> (Vec<JobId>, Vec<PipelineId>) {
    match reply {
        Reply::Jobs(jobs) => (jobs.iter().map(|j| j.job_id.clone()).collect(), Vec::new()),
        Reply::Pipelines(pipelines) => (
            Vec::new(),
            pipelines.iter().map(|p| p.pipeline_id.clone()).collect(),
        ),
        _ => (Vec::new(), Vec::new()),
    }
}
