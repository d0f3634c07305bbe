//! Tests of the router state: each transition, and properties of random runs.

use super::*;
use pypelinin_common::protocol::cluster::PipelineList;
use pypelinin_common::protocol::request::{
    CancelPipeline, GetPipelines, JobFailed, JobFinished, JobStatusQuery, ListPipelines, NewJob,
    NewPipeline, PipelineFailed, PipelineFinished, PipelineStatusQuery, RenewLeases, Settled,
};
use pypelinin_common::protocol::{JobHandout, SubmittedJob, WireDuration};
use serde_json::json;

const T0: u64 = 1_000_000;

fn add_in(state: &mut State, worker: &str, pipeline: Option<&PipelineId>) -> JobId {
    let mut job = NewJob::new(worker, json!({"w": worker}));
    job.pipeline_id = pipeline.cloned();
    let reply = state.handle(Request::AddJob(job), T0, &mut vec![]);
    let Reply::Answer(Answer {
        job_id: Some(id), ..
    }) = reply
    else {
        panic!("{reply:?}")
    };
    id
}

fn add(state: &mut State, worker: &str) -> JobId {
    add_in(state, worker, None)
}

/// Adds a job as the original's pipeliner does: no pipeline id, not `subscribed`.
fn add_legacy(state: &mut State, worker: &str) -> JobId {
    let job = NewJob {
        subscribed: false,
        ..NewJob::new(worker, json!({"w": worker}))
    };
    match state.handle(Request::AddJob(job), T0, &mut vec![]) {
        Reply::Answer(Answer {
            job_id: Some(id), ..
        }) => id,
        other => panic!("{other:?}"),
    }
}

fn get_at(state: &mut State, workers: Option<&[&str]>, now: u64) -> Option<JobHandout> {
    let workers = workers.map(|w| w.iter().map(|s| s.to_string()).collect());
    match state.handle(Request::GetJob(GetJob { workers }), now, &mut vec![]) {
        Reply::Job(j) => j,
        other => panic!("{other:?}"),
    }
}

fn get(state: &mut State, workers: Option<&[&str]>) -> Option<JobHandout> {
    get_at(state, workers, T0)
}

fn pipeline_json() -> Value {
    json!([
        ["graph", [[[["worker_name", "A"]], [["worker_name", "B"]]]]],
        ["data", null]
    ])
}

fn add_pipeline(state: &mut State, fields: Map<String, Value>) -> Reply {
    state.handle(
        Request::AddPipeline(NewPipeline::new(&pipeline_json()).with_fields(fields)),
        T0,
        &mut vec![],
    )
}

fn new_pipeline(state: &mut State) -> PipelineId {
    let Reply::Answer(Answer {
        pipeline_id: Some(id),
        ..
    }) = add_pipeline(state, Map::new())
    else {
        panic!()
    };
    id
}

fn take_pipeline(
    state: &mut State,
    now: u64,
) -> Option<pypelinin_common::protocol::PipelineAssignment> {
    match state.handle(Request::GetPipeline, now, &mut vec![]) {
        reply @ Reply::Pipeline(_) => pypelinin_common::protocol::reply::decode_reply::<
            Option<pypelinin_common::protocol::PipelineAssignment>,
        >(&reply.encode())
        .unwrap(),
        other => panic!("{other:?}"),
    }
}

fn job_state(state: &mut State, id: &JobId) -> JobState {
    let q = JobStatusQuery {
        job_ids: vec![id.clone()],
    };
    let Reply::Answer(Answer {
        jobs: Some(jobs), ..
    }) = state.handle(Request::JobStatus(q), T0, &mut vec![])
    else {
        panic!()
    };
    jobs[id]
}

fn pipeline_state(state: &mut State, id: &PipelineId) -> PipelineStatus {
    let q = PipelineStatusQuery {
        pipeline_ids: vec![id.clone()],
        details: false,
    };
    let Reply::Answer(Answer {
        pipelines: Some(mut p),
        ..
    }) = state.handle(Request::PipelineStatus(q), T0, &mut vec![])
    else {
        panic!()
    };
    p.remove(id).unwrap()
}

fn cancel(state: &mut State, id: &PipelineId, events: &mut Vec<Event>) -> Answer {
    let request = Request::CancelPipeline(CancelPipeline {
        pipeline_id: id.clone(),
    });
    match state.handle(request, T0, events) {
        Reply::Answer(a) => a,
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_cancelled_pipeline_drops_its_waiting_jobs_ignores_late_results_and_stays_cancelled() {
    let mut s = State::new(Map::new(), Policy::default());
    let p = new_pipeline(&mut s);
    assert!(take_pipeline(&mut s, T0).is_some(), "a pipeliner walks it");
    let running = add_in(&mut s, "A", Some(&p));
    let taken = get(&mut s, Some(&["A"])).expect("job A handed out");
    assert_eq!(taken.job_id, running);
    let waiting = add_in(&mut s, "B", Some(&p));
    let other = add(&mut s, "B");

    let mut events = vec![];
    let answer = cancel(&mut s, &p, &mut events);
    assert_eq!(answer.answer, AnswerKind::PipelineCancelled, "{answer:?}");
    assert_eq!(
        events,
        [Event::PipelineCancelled {
            pipeline_id: p.clone()
        }]
    );
    assert_eq!(pipeline_state(&mut s, &p).state, PipelineState::Cancelled);
    // Its waiting job is never handed out; a job of no pipeline still is.
    let next = get(&mut s, Some(&["B"])).expect("the other job");
    assert_eq!(next.job_id, other);
    assert!(
        get(&mut s, Some(&["B"])).is_none(),
        "{waiting} was handed out"
    );
    // The running job's late result changes nothing.
    let late = finish(&mut s, &running, &mut vec![]);
    assert!(
        matches!(&late, Reply::Answer(a) if a.answer == AnswerKind::UnknownJobId),
        "{late:?}"
    );
    // A second cancel, and a cancel of a pipeline never added, answer clearly.
    let again = cancel(&mut s, &p, &mut vec![]);
    assert_eq!(again.answer, AnswerKind::PipelineEnded);
    assert!(
        again
            .error
            .as_deref()
            .is_some_and(|e| e.contains("was cancelled")),
        "{again:?}"
    );
    let unknown = cancel(&mut s, &"nope".into(), &mut vec![]);
    assert_eq!(unknown.answer, AnswerKind::UnknownPipelineId);
    s.check_invariants().unwrap();
    // A restart restores it cancelled.
    let mut r = s.restarted();
    s.check_restored(&r).unwrap();
    assert_eq!(pipeline_state(&mut r, &p).state, PipelineState::Cancelled);
}

#[test]
fn a_finished_pipeline_cannot_be_cancelled() {
    let mut s = State::new(Map::new(), Policy::default());
    let p = new_pipeline(&mut s);
    take_pipeline(&mut s, T0).unwrap();
    let done = PipelineFinished {
        pipeline_id: p.clone(),
        duration: WireDuration::from_secs(1.0),
    };
    s.handle(Request::PipelineFinished(done), T0, &mut vec![]);
    let mut events = vec![];
    let answer = cancel(&mut s, &p, &mut events);
    assert_eq!(answer.answer, AnswerKind::PipelineEnded);
    assert!(answer.error.unwrap().contains("finished"));
    assert!(events.is_empty());
    assert_eq!(pipeline_state(&mut s, &p).state, PipelineState::Finished);
}

#[test]
fn a_worker_no_broker_asks_for_is_reported_once_its_jobs_waited_the_warning_time() {
    let policy = Policy {
        unserved_worker_warn_ms: 1_000,
        ..Policy::default()
    };
    let mut s = State::new(Map::new(), policy);
    add(&mut s, "Nobody");
    add(&mut s, "Nobody");
    add(&mut s, "Busy");
    add(&mut s, "Busy");
    s.tick(T0, &mut vec![]);
    // A broker keeps asking for Busy (and takes one of its jobs each time).
    assert!(get_at(&mut s, Some(&["Busy", "Other"]), T0 + 500).is_some());
    s.tick(T0 + 999, &mut vec![]);
    assert!(s.unserved_workers().is_empty(), "reported before its time");
    s.tick(T0 + 1_000, &mut vec![]);
    let expected = Unserved {
        worker: "Nobody".into(),
        jobs: 2,
        since: T0,
    };
    assert_eq!(s.unserved_workers(), std::slice::from_ref(&expected));
    // Busy's one job left: nobody asked for it in the last second now.
    s.tick(T0 + 1_600, &mut vec![]);
    assert_eq!(s.unserved_workers(), [expected]);
    s.tick(T0 + 2_600, &mut vec![]);
    let names: Vec<String> = s.unserved_workers().into_iter().map(|u| u.worker).collect();
    assert_eq!(names, ["Busy", "Nobody"]);
    // A broker that asks for Nobody (and waits for it) serves it.
    let wait = Request::GetJobs(GetJobs {
        workers: Some(vec!["Other".into(), "Nobody".into()]),
        max: 1,
        wait_ms: None,
        asker: None,
    });
    s.handle_or_wait(0, wait, T0 + 2_700, &mut vec![]);
    s.tick(T0 + 2_800, &mut vec![]);
    let names: Vec<String> = s.unserved_workers().into_iter().map(|u| u.worker).collect();
    assert_eq!(names, ["Busy"]);
    // A broker that asks for any worker (as the legacy one does) serves them all.
    assert!(get_at(&mut s, None, T0 + 2_900).is_some());
    s.tick(T0 + 3_000, &mut vec![]);
    assert!(s.unserved_workers().is_empty());
}

fn add_pipeline_with_deadline(state: &mut State, deadline: Value) -> Answer {
    let mut fields = Map::new();
    fields.insert("deadline secs".into(), deadline);
    match add_pipeline(state, fields) {
        Reply::Answer(a) => a,
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_pipeline_past_its_deadline_fails_naming_the_jobs_and_workers_it_waits_for() {
    let mut s = State::new(Map::new(), Policy::default());
    let late = add_pipeline_with_deadline(&mut s, json!(2.5));
    let late = late.pipeline_id.expect("accepted");
    let patient = add_pipeline_with_deadline(&mut s, json!(3600));
    let patient = patient.pipeline_id.unwrap();
    let job = add_in(&mut s, "Nobody", Some(&late));
    s.check_invariants().unwrap();
    // Kept across a restart.
    let restarted = s.restarted();
    s.check_restored(&restarted).unwrap();

    let mut events = vec![];
    s.tick(T0 + 2_499, &mut events);
    assert_eq!(pipeline_state(&mut s, &late).state, PipelineState::Queued);
    s.tick(T0 + 2_500, &mut events);
    let status = pipeline_state(&mut s, &late);
    assert_eq!(status.state, PipelineState::Failed);
    let error = status.error.unwrap();
    assert!(
        error.contains("deadline of 2.5 s")
            && error.contains(&format!("job {job} of worker Nobody (queued)")),
        "{error}"
    );
    assert_eq!(status.worker.as_deref(), Some("Nobody"));
    assert!(
        matches!(&events[..], [Event::PipelineFailed { pipeline_id, worker, .. }] if *pipeline_id == late && worker == "Nobody"),
        "{events:?}"
    );
    // Its job is gone; the other pipeline waits on.
    assert!(get(&mut s, Some(&["Nobody"])).is_none());
    assert_eq!(
        pipeline_state(&mut s, &patient).state,
        PipelineState::Queued
    );
    s.check_invariants().unwrap();
    // A pipeline that ends in time leaves no deadline behind.
    take_pipeline(&mut s, T0).unwrap();
    let done = PipelineFinished {
        pipeline_id: patient.clone(),
        duration: WireDuration::from_secs(1.0),
    };
    s.handle(Request::PipelineFinished(done), T0 + 3_000, &mut vec![]);
    s.check_invariants().unwrap();
}

#[test]
fn a_deadline_that_is_no_number_of_seconds_is_refused() {
    let mut s = State::new(Map::new(), Policy::default());
    for bad in [json!("soon"), json!(0), json!(-1), json!(1e12), json!(null)] {
        let answer = add_pipeline_with_deadline(&mut s, bad.clone());
        assert_eq!(answer.answer, AnswerKind::SyntaxError, "{bad}: {answer:?}");
        assert!(answer.error.unwrap().contains("deadline secs"));
    }
    assert_eq!(s.pipelines.len(), 0, "nothing was queued");
}

fn fail(state: &mut State, id: &JobId, now: u64, events: &mut Vec<Event>) -> Reply {
    let f = JobFailed {
        job_id: id.clone(),
        error: "boom".into(),
        duration: None,
    };
    state.handle(Request::JobFailed(f), now, events)
}

fn finish(state: &mut State, id: &JobId, events: &mut Vec<Event>) -> Reply {
    let done = JobFinished {
        job_id: id.clone(),
        duration: WireDuration::from_secs(1.5),
    };
    state.handle(Request::JobFinished(done), T0, events)
}

#[test]
fn jobs_come_out_fifo_across_and_within_workers() {
    let mut s = State::default();
    let ids: Vec<_> = ["A", "B", "A", "C"]
        .iter()
        .map(|w| add(&mut s, w))
        .collect();
    let got: Vec<_> = std::iter::from_fn(|| get(&mut s, None))
        .map(|j| j.job_id)
        .collect();
    assert_eq!(got, ids);
}

fn wait_for(workers: &[&str], max: usize, wait_ms: u64) -> Request {
    Request::GetJobs(GetJobs {
        workers: Some(workers.iter().map(|w| w.to_string()).collect()),
        max,
        wait_ms: Some(wait_ms),
        asker: None,
    })
}

/// The job ids of each served reply, by ticket.
fn served_jobs(served: Vec<Served>) -> Vec<(u64, Vec<JobId>)> {
    served
        .into_iter()
        .map(|s| match s.reply {
            Reply::Jobs(jobs) => (s.ticket, jobs.into_iter().map(|j| j.job_id).collect()),
            other => panic!("{other:?}"),
        })
        .collect()
}

#[test]
fn waiting_requests_take_the_jobs_queued_after_them_in_order() {
    let mut s = State::default();
    let mut events = vec![];
    assert!(s
        .handle_or_wait(1, wait_for(&["A"], 2, 1_000), T0, &mut events)
        .is_none());
    assert!(s
        .handle_or_wait(2, wait_for(&["B"], 1, 1_000), T0, &mut events)
        .is_none());
    assert!(s
        .handle_or_wait(3, wait_for(&["A"], 5, 1_000), T0, &mut events)
        .is_none());
    assert_eq!(s.waiting(), 3);
    s.take_changes();
    let a1 = add(&mut s, "A");
    let b1 = add(&mut s, "B");
    let a2 = add(&mut s, "A");
    let b2 = add(&mut s, "B");
    let mut served = vec![];
    s.serve_waiting(T0, &mut served);
    // The longest waiting first, each up to its max; the third waits on.
    assert_eq!(
        served_jobs(served),
        vec![(1, vec![a1.clone(), a2.clone()]), (2, vec![b1.clone()])]
    );
    assert_eq!(s.waiting(), 1);
    for id in [&a1, &a2, &b1] {
        assert_eq!(s.job(id).unwrap().state, JobState::Running);
        assert_eq!(s.job(id).unwrap().lease_until, Some(T0 + 30_000));
    }
    // Handed out in the same batch: their leases are in this batch's durable write.
    assert!(s.take_changes().jobs.contains(&a1));
    assert_eq!(get(&mut s, None).unwrap().job_id, b2);
    // A request that finds jobs queued is answered at once.
    let a3 = add(&mut s, "A");
    let mut served = vec![];
    s.serve_waiting(T0, &mut served);
    assert_eq!(served_jobs(served), vec![(3, vec![a3])]);
    let b3 = add(&mut s, "B");
    match s.handle_or_wait(4, wait_for(&["B"], 1, 1_000), T0, &mut events) {
        Some(Reply::Jobs(jobs)) => assert_eq!(jobs[0].job_id, b3),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_wait_ends_empty_at_its_deadline_or_when_the_router_stops() {
    let mut s = State::default();
    let mut events = vec![];
    assert!(s
        .handle_or_wait(7, wait_for(&["A"], 1, 500), T0, &mut events)
        .is_none());
    let pipelines = Request::GetPipelines(GetPipelines {
        max: 3,
        wait_ms: Some(GetJobs::MAX_WAIT_MS + 1),
        asker: None,
    });
    assert!(s.handle_or_wait(8, pipelines, T0, &mut events).is_none());
    let mut served = vec![];
    s.serve_waiting(T0 + 499, &mut served);
    assert!(served.is_empty());
    s.serve_waiting(T0 + 500, &mut served);
    assert_eq!(served_jobs(served), vec![(7, vec![])]);
    // A longer wait than the most granted waits that long.
    let mut served = vec![];
    s.serve_waiting(T0 + GetJobs::MAX_WAIT_MS - 1, &mut served);
    assert!(served.is_empty());
    s.serve_waiting(T0 + GetJobs::MAX_WAIT_MS, &mut served);
    assert!(
        matches!(&served[..], [Served { ticket: 8, reply: Reply::Pipelines(p) }] if p.is_empty())
    );
    assert!(s
        .handle_or_wait(9, wait_for(&["A"], 1, 500), T0, &mut events)
        .is_none());
    let mut served = vec![];
    s.stop_waiting(&mut served);
    assert_eq!(served_jobs(served), vec![(9, vec![])]);
    assert_eq!(s.waiting(), 0);
    // The queued pipeline a waiting request would have taken stays for the next one.
    let p = new_pipeline(&mut s);
    let mut served = vec![];
    s.serve_waiting(T0, &mut served);
    assert!(served.is_empty());
    assert_eq!(take_pipeline(&mut s, T0).unwrap().pipeline_id, p);
}

#[test]
fn only_a_lone_get_jobs_or_get_pipelines_with_a_wait_waits() {
    let mut s = State::default();
    let mut events = vec![];
    let answered_at_once = [
        Request::GetJobs(GetJobs::new(None, 1)),
        wait_for(&["A"], 1, 0),
        wait_for(&["A"], 0, 1_000),
        wait_for(&["A"], GetJobs::MAX + 1, 1_000),
        Request::GetPipelines(GetPipelines::new(1)),
        Request::Batch(Batch::of(&[wait_for(&["A"], 1, 1_000)])),
        Request::GetJob(GetJob { workers: None }),
    ];
    for request in answered_at_once {
        let shown = format!("{request:?}");
        assert!(
            s.handle_or_wait(1, request, T0, &mut events).is_some(),
            "{shown}"
        );
    }
    assert_eq!(s.waiting(), 0);
}

#[test]
fn work_taken_back_is_queued_in_its_old_place_without_using_an_attempt() {
    let mut s = State::default();
    let mut events = vec![];
    let j1 = add(&mut s, "A");
    let j2 = add(&mut s, "A");
    let p1 = new_pipeline(&mut s);
    let p2 = new_pipeline(&mut s);
    let got = get(&mut s, None).unwrap();
    assert_eq!(got.job_id, j1);
    assert_eq!(take_pipeline(&mut s, T0).unwrap().pipeline_id, p1);
    s.take_changes();
    s.take_back(
        std::slice::from_ref(&j1),
        std::slice::from_ref(&p1),
        &mut events,
    );
    assert_eq!(events, vec![Event::NewJob, Event::NewPipeline]);
    let changes = s.take_changes();
    assert!(changes.jobs.contains(&j1) && changes.pipelines.contains(&p1));
    let record = s.job(&j1).unwrap();
    assert_eq!(
        (record.state, record.attempts, record.lease_until),
        (JobState::Queued, 0, None)
    );
    // No lease left to expire.
    let mut later = vec![];
    s.tick(T0 + 60_000, &mut later);
    assert_eq!(s.job(&j1).unwrap().attempts, 0);
    assert_eq!(get(&mut s, None).unwrap().job_id, j1);
    assert_eq!(get(&mut s, None).unwrap().job_id, j2);
    assert_eq!(take_pipeline(&mut s, T0).unwrap().pipeline_id, p1);
    assert_eq!(take_pipeline(&mut s, T0).unwrap().pipeline_id, p2);
    // Only running work is taken back: a finished job stays finished.
    let mut events = vec![];
    finish(&mut s, &j2, &mut events);
    s.take_back(std::slice::from_ref(&j2), &[], &mut events);
    assert!(s.job(&j2).is_none());
    assert!(get(&mut s, None).is_none());
}

#[test]
fn routing_hands_out_only_the_named_workers_fifo() {
    let mut s = State::default();
    let a1 = add(&mut s, "A");
    let b1 = add(&mut s, "B");
    let c1 = add(&mut s, "C");
    let a2 = add(&mut s, "A");
    assert_eq!(get(&mut s, Some(&["C", "A"])).unwrap().job_id, a1);
    assert_eq!(get(&mut s, Some(&["C", "A"])).unwrap().job_id, c1);
    assert_eq!(get(&mut s, Some(&["C", "A"])).unwrap().job_id, a2);
    assert!(get(&mut s, Some(&["C", "A"])).is_none());
    assert!(get(&mut s, Some(&[])).is_none());
    assert!(get(&mut s, Some(&["Z"])).is_none());
    assert_eq!(get(&mut s, None).unwrap().job_id, b1);
    assert!(s.job_queues.is_empty());
}

#[test]
fn finishing_twice_is_unknown_and_broadcasts_once() {
    let mut s = State::default();
    let id = add(&mut s, "A");
    let mut events = vec![];
    assert_eq!(
        finish(&mut s, &id, &mut events),
        Answer::new(AnswerKind::GoodJob).into()
    );
    assert_eq!(
        finish(&mut s, &id, &mut events),
        Answer::new(AnswerKind::UnknownJobId).into()
    );
    assert_eq!(
        events,
        vec![Event::job_finished(id, &WireDuration::from_secs(1.5))]
    );
    assert!(
        get(&mut s, None).is_none(),
        "a job finished before it was taken is not handed out"
    );
    assert_eq!(s.job_records(), 0);
}

#[test]
fn a_failed_job_is_retried_with_backoff_then_failed_for_good() {
    let mut s = State::default();
    let id = add(&mut s, "A");
    let mut events = vec![];
    for attempt in 1..=2u64 {
        get(&mut s, None).unwrap();
        assert_eq!(
            fail(&mut s, &id, T0, &mut events),
            Answer::new(AnswerKind::FailureRecorded).into()
        );
        assert_eq!(job_state(&mut s, &id), JobState::Queued);
        assert!(get(&mut s, None).is_none(), "backing off");
        let backoff = 500 * (1 << (attempt - 1));
        s.tick(T0 + backoff - 1, &mut events);
        assert!(get(&mut s, None).is_none());
        s.tick(T0 + backoff, &mut events);
        assert!(events.contains(&Event::NewJob));
        events.clear();
    }
    get(&mut s, None).unwrap();
    fail(&mut s, &id, T0, &mut events);
    assert_eq!(events.len(), 1);
    assert!(
        matches!(&events[0], Event::JobFailed { error, .. } if error == "boom (failed 3 of 3 attempts)"),
        "{events:?}"
    );
    assert_eq!(
        fail(&mut s, &id, T0, &mut events),
        Answer::new(AnswerKind::UnknownJobId).into()
    );
}

#[test]
fn attempts_are_configured_per_worker() {
    let policy = Policy {
        attempts_per_worker: HashMap::from([("Once".to_owned(), 1)]),
        ..Policy::default()
    };
    let mut s = State::new(Map::new(), policy);
    let id = add(&mut s, "Once");
    get(&mut s, None).unwrap();
    let mut events = vec![];
    fail(&mut s, &id, T0, &mut events);
    assert!(matches!(&events[..], [Event::JobFailed { error, .. }] if error == "boom"));
}

#[test]
fn an_expired_lease_requeues_the_job_and_a_renewed_one_does_not() {
    let mut s = State::default();
    let a = add(&mut s, "A");
    let b = add(&mut s, "A");
    get(&mut s, None).unwrap();
    get(&mut s, None).unwrap();
    let mut events = vec![];
    let renew = RenewLeases {
        job_ids: vec![b.clone()],
        ..RenewLeases::default()
    };
    assert_eq!(
        s.handle(Request::RenewLeases(renew), T0 + 20_000, &mut events),
        Answer::new(AnswerKind::LeasesRenewed).into()
    );
    s.tick(T0 + 30_000, &mut events);
    assert_eq!(job_state(&mut s, &a), JobState::Queued, "a's lease expired");
    assert_eq!(
        job_state(&mut s, &b),
        JobState::Running,
        "b's lease was renewed"
    );
    assert_eq!(s.job(&a).unwrap().attempts, 1);
    s.tick(T0 + 30_500, &mut events);
    assert_eq!(
        get_at(&mut s, None, T0 + 30_500).unwrap().job_id,
        a,
        "handed out again"
    );
    // The late report of the first holder still counts once; the second holder's is ignored.
    assert_eq!(
        finish(&mut s, &a, &mut events),
        Answer::new(AnswerKind::GoodJob).into()
    );
    assert_eq!(
        finish(&mut s, &a, &mut events),
        Answer::new(AnswerKind::UnknownJobId).into()
    );
}

#[test]
fn an_expired_pipeline_lease_hands_the_pipeline_out_again_with_its_jobs() {
    let mut s = State::default();
    let p = new_pipeline(&mut s);
    assert!(take_pipeline(&mut s, T0).unwrap().submitted_jobs.is_empty());
    let a = add_in(&mut s, "A", Some(&p));
    finish(&mut s, &a, &mut vec![]);
    assert!(take_pipeline(&mut s, T0).is_none());
    let mut events = vec![];
    s.tick(T0 + 30_000, &mut events);
    assert_eq!(events, vec![Event::NewPipeline]);
    // (To our pipeliners, `get pipelines`: the original's get an alias, see
    // a_pipeline_handed_again_to_a_legacy_pipeliner_goes_out_under_a_new_id.)
    let Reply::Pipelines(mut handouts) = s.handle(
        Request::GetPipelines(GetPipelines::new(1)),
        T0 + 30_000,
        &mut events,
    ) else {
        panic!()
    };
    let again = handouts.remove(0);
    assert_eq!(again.pipeline_id, p);
    assert_eq!(
        again.submitted_jobs,
        vec![SubmittedJob {
            job_id: a,
            worker: "A".into(),
            state: JobState::Finished
        }]
    );
}

#[test]
fn ended_pipelines_forget_their_jobs_and_are_remembered_for_the_retention_time() {
    let mut s = State::default();
    let p = new_pipeline(&mut s);
    take_pipeline(&mut s, T0);
    let a = add_in(&mut s, "A", Some(&p));
    let queued = add_in(&mut s, "B", Some(&p));
    finish(&mut s, &a, &mut vec![]);
    assert_eq!(job_state(&mut s, &a), JobState::Finished);
    let done = PipelineFinished {
        pipeline_id: p.clone(),
        duration: WireDuration::from_secs(2.0),
    };
    s.handle(Request::PipelineFinished(done), T0, &mut vec![]);
    assert_eq!(
        (job_state(&mut s, &a), job_state(&mut s, &queued)),
        (JobState::Unknown, JobState::Unknown)
    );
    assert!(
        get(&mut s, None).is_none(),
        "the ended pipeline's queued job is gone"
    );
    assert_eq!(s.job_records(), 0);
    assert_eq!(pipeline_state(&mut s, &p).state, PipelineState::Finished);
    s.tick(T0 + 299_999, &mut vec![]);
    assert_eq!(pipeline_state(&mut s, &p).state, PipelineState::Finished);
    s.tick(T0 + 300_000, &mut vec![]);
    assert_eq!(pipeline_state(&mut s, &p).state, PipelineState::Unknown);
    assert_eq!(s.remembered_pipelines(), 0);
}

fn add_last(state: &mut State, worker: &str, pipeline: &PipelineId, now: u64) -> Answer {
    let job = NewJob::new(worker, json!(null))
        .in_pipeline(pipeline.clone())
        .ending_pipeline(std::time::Duration::from_millis(250));
    match state.handle(Request::AddJob(job), now, &mut vec![]) {
        Reply::Answer(a) => a,
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_pipeline_ends_with_its_last_job_in_the_same_transition() {
    let mut s = State::default();
    let p = new_pipeline(&mut s);
    take_pipeline(&mut s, T0);
    let a = add_in(&mut s, "A", Some(&p));
    finish(&mut s, &a, &mut vec![]);
    let accepted = add_last(&mut s, "B", &p, T0);
    assert!(accepted.ends_pipeline, "{accepted:?}");
    let b = accepted.job_id.unwrap();
    assert_eq!(get(&mut s, None).unwrap().job_id, b);
    let mut events = vec![];
    let done = JobFinished {
        job_id: b.clone(),
        duration: WireDuration::from_secs(0.1),
    };
    s.handle(Request::JobFinished(done), T0 + 1_500, &mut events);
    let shown: Vec<String> = events.iter().map(ToString::to_string).collect();
    assert_eq!(shown.len(), 2, "{shown:?}");
    assert_eq!(shown[0], format!("job finished: {b} duration: 0.1"));
    assert_eq!(
        shown[1],
        format!("pipeline finished: id={p}, duration=1.75"),
        "run time: 0.25 s before its last job was added, then 1.5 s"
    );
    let status = pipeline_state(&mut s, &p);
    assert_eq!(status.state, PipelineState::Finished);
    assert_eq!(status.duration, Some(WireDuration::from_secs(1.75)));
    assert_eq!(s.job_records(), 0, "its jobs are forgotten with it");
    // A pipeliner's own report, if one comes, finds it ended and changes nothing.
    let mut events = vec![];
    let report = PipelineFinished {
        pipeline_id: p.clone(),
        duration: WireDuration::from_secs(2.0),
    };
    let reply = s.handle(Request::PipelineFinished(report), T0, &mut events);
    assert!(matches!(reply, Reply::Answer(a) if a.answer == AnswerKind::UnknownPipelineId));
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(
        pipeline_state(&mut s, &p).duration,
        Some(WireDuration::from_secs(1.75))
    );
}

#[test]
fn a_last_job_that_fails_ends_nothing_and_one_of_no_pending_pipeline_is_refused() {
    let mut s = State::new(
        Map::new(),
        Policy {
            max_attempts: 1,
            ..Policy::default()
        },
    );
    let p = new_pipeline(&mut s);
    take_pipeline(&mut s, T0);
    let b = add_last(&mut s, "B", &p, T0).job_id.unwrap();
    get(&mut s, None).unwrap();
    let mut events = vec![];
    fail(&mut s, &b, T0, &mut events);
    assert_eq!(events.len(), 1, "only the job's failure: {events:?}");
    assert_eq!(
        pipeline_state(&mut s, &p).state,
        PipelineState::Running,
        "the pipeliner reports the failed pipeline"
    );

    // A job may name only a pending pipeline: one that does not exist takes no job.
    let unknown = add_last(&mut s, "C", &PipelineId::from("nope"), T0);
    assert_eq!(unknown.answer, AnswerKind::UnknownPipelineId);
    assert!(
        unknown.job_id.is_none() && unknown.error.is_some(),
        "{unknown:?}"
    );
    assert_eq!(s.queued_jobs(), 0, "nothing was queued");
}

#[test]
fn past_the_cap_the_oldest_outcomes_go_first() {
    let mut s = State::new(
        Map::new(),
        Policy {
            max_remembered: 2,
            ..Policy::default()
        },
    );
    let ids: Vec<PipelineId> = (0..3)
        .map(|_| {
            let p = new_pipeline(&mut s);
            take_pipeline(&mut s, T0);
            let done = PipelineFinished {
                pipeline_id: p.clone(),
                duration: WireDuration::from_secs(1.0),
            };
            s.handle(Request::PipelineFinished(done), T0, &mut vec![]);
            p
        })
        .collect();
    s.tick(T0, &mut vec![]);
    assert_eq!(s.remembered_pipelines(), 2);
    let states: Vec<_> = ids
        .iter()
        .map(|p| pipeline_state(&mut s, p).state)
        .collect();
    assert_eq!(
        states,
        [
            PipelineState::Unknown,
            PipelineState::Finished,
            PipelineState::Finished
        ]
    );
}

#[test]
fn remembered_outcomes_hold_what_is_remembered_under_churn() {
    // 20 times the cap ends, each with a request id: the oldest outcomes leave as new ones
    // come, and every table holds the remembered ones only (B-trees: their memory is what
    // they hold, with no tombstones or spare capacity to grow into).
    let mut s = State::new(
        Map::new(),
        Policy {
            max_remembered: 1_000,
            ..Policy::default()
        },
    );
    for n in 0..20_000 {
        let mut fields = Map::new();
        fields.insert(REQUEST_ID.to_owned(), json!(format!("r{n}")));
        let Reply::Answer(Answer {
            pipeline_id: Some(p),
            ..
        }) = add_pipeline(&mut s, fields)
        else {
            panic!("add pipeline refused")
        };
        take_pipeline(&mut s, T0);
        let done = PipelineFinished {
            pipeline_id: p,
            duration: WireDuration::from_secs(1.0),
        };
        s.handle(Request::PipelineFinished(done), T0, &mut vec![]);
        s.tick(T0, &mut vec![]);
    }
    assert_eq!(s.remembered_pipelines(), 1_000);
    assert_eq!(
        (s.ended.len(), s.request_ids.len(), s.ended_order.len()),
        (1_000, 1_000, 1_000)
    );
}

#[test]
fn a_failed_pipeline_is_reported_with_its_job_and_error() {
    let mut s = State::default();
    let p = new_pipeline(&mut s);
    let a = add_in(&mut s, "A", Some(&p));
    let mut events = vec![];
    let failed = PipelineFailed {
        pipeline_id: p.clone(),
        job_id: a.clone(),
        worker: "A".into(),
        error: "boom".into(),
        duration: None,
    };
    let reply = s.handle(Request::PipelineFailed(failed.clone()), T0, &mut events);
    assert_eq!(reply, Answer::new(AnswerKind::FailureRecorded).into());
    assert_eq!(
        events,
        vec![Event::pipeline_failed(p.clone(), a.clone(), "A", "boom")]
    );
    let status = pipeline_state(&mut s, &p);
    assert_eq!(
        (status.state, status.error.as_deref(), status.job_id),
        (PipelineState::Failed, Some("boom"), Some(a))
    );
    assert_eq!(
        s.handle(Request::PipelineFailed(failed), T0, &mut vec![]),
        Answer::new(AnswerKind::UnknownPipelineId).into()
    );
}

#[test]
fn a_full_queue_refuses_pipelines_until_one_is_taken() {
    let mut s = State::new(
        Map::new(),
        Policy {
            max_queued_pipelines: 2,
            ..Policy::default()
        },
    );
    new_pipeline(&mut s);
    new_pipeline(&mut s);
    let Reply::Answer(a) = add_pipeline(&mut s, Map::new()) else {
        panic!()
    };
    assert_eq!(a.answer, AnswerKind::QueueFull);
    assert!(a.error.unwrap().contains("2 pipelines are queued"));
    take_pipeline(&mut s, T0);
    new_pipeline(&mut s);
}

#[test]
fn a_repeated_request_id_gives_the_same_pipeline() {
    let mut s = State::default();
    let fields: Map<String, Value> = json!({"request id": "r-1"}).as_object().cloned().unwrap();
    let first = add_pipeline(&mut s, fields.clone());
    assert_eq!(add_pipeline(&mut s, fields), first);
    assert_eq!(s.pending_pipelines(), 1);
}

#[test]
fn invalid_pipelines_are_refused_at_add() {
    let mut s = State::default();
    let cyclic = json!([
        [
            "graph",
            [
                [[["worker_name", "A"]], [["worker_name", "B"]]],
                [[["worker_name", "B"]], [["worker_name", "A"]]]
            ]
        ],
        ["data", null]
    ]);
    let reply = s.handle(
        Request::AddPipeline(NewPipeline::new(&cyclic)),
        T0,
        &mut vec![],
    );
    let Reply::Answer(a) = reply else { panic!() };
    assert_eq!(a.answer, AnswerKind::InvalidPipeline);
    assert!(a.error.unwrap().contains("cycle"));
    assert_eq!(s.pending_pipelines(), 0);
}

#[test]
fn restoring_the_records_gives_back_queues_leases_and_backoffs() {
    let mut s = State::default();
    let p = new_pipeline(&mut s);
    let queued = add(&mut s, "A");
    let running = add(&mut s, "B");
    let retrying = add(&mut s, "C");
    let later = add(&mut s, "A");
    get(&mut s, Some(&["B"])).unwrap();
    get(&mut s, Some(&["C"])).unwrap();
    fail(&mut s, &retrying, T0, &mut vec![]);
    let jobs = s.jobs.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let pipelines = s
        .pipelines
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut r = State::restore(Map::new(), Policy::default(), jobs, pipelines, vec![]);
    assert_eq!(get(&mut r, None).unwrap().job_id, queued);
    assert_eq!(get(&mut r, None).unwrap().job_id, later);
    assert!(get(&mut r, None).is_none());
    let mut events = vec![];
    finish(&mut r, &queued, &mut events);
    finish(&mut r, &later, &mut events);
    r.tick(T0 + 500, &mut events);
    assert_eq!(get(&mut r, None).unwrap().job_id, retrying);
    r.tick(T0 + 30_000, &mut events);
    assert!(
        get_at(&mut r, None, T0 + 30_000).is_none(),
        "an expired lease counts as an attempt: back-off"
    );
    r.tick(T0 + 30_500, &mut events);
    let again = get_at(&mut r, None, T0 + 30_500).unwrap();
    assert_eq!(
        again.job_id, running,
        "its lease survived the restart, then expired"
    );
    assert_eq!(take_pipeline(&mut r, T0).unwrap().pipeline_id, p);
    let next = add(&mut r, "Z");
    assert!(r.job(&next).unwrap().seq > s.job(&later).unwrap().seq);
}

fn batch(state: &mut State, requests: &[Request], events: &mut Vec<Event>) -> Vec<Reply> {
    let mut batch = Batch::of(requests);
    batch
        .requests
        .push(serde_json::value::to_raw_value(&json!({"command": "no such command"})).unwrap());
    match state.handle(Request::Batch(batch), T0, events) {
        Reply::Batch(mut replies) => {
            assert_eq!(
                replies.pop(),
                Some(Reply::for_error(
                    &pypelinin_common::protocol::RequestError::UnknownCommand
                ))
            );
            replies
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_batch_is_its_requests_in_order() {
    let mut state = State::default();
    let mut events = vec![];
    let add = |w: &str| Request::AddJob(NewJob::new(w, json!({"w": w})));
    let get = Request::GetJob(GetJob::default());
    let replies = batch(
        &mut state,
        &[add("A"), add("B"), get.clone(), get.clone(), get.clone()],
        &mut events,
    );
    assert_eq!(replies.len(), 5);
    let Reply::Answer(Answer {
        job_id: Some(a), ..
    }) = &replies[0]
    else {
        panic!("{replies:?}")
    };
    let jobs: Vec<_> = replies[2..]
        .iter()
        .map(|r| match r {
            Reply::Job(j) => j.as_ref().map(|j| j.worker.clone()),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(jobs, [Some("A".into()), Some("B".into()), None]);
    assert_eq!(events, [Event::NewJob, Event::NewJob]);
    // A later batch reports on jobs of an earlier one; a second report is refused.
    let done = Request::JobFinished(JobFinished {
        job_id: a.clone(),
        duration: WireDuration::from_secs(0.1),
    });
    let replies = batch(&mut state, &[done.clone(), done], &mut events);
    let answers: Vec<_> = replies
        .iter()
        .map(|r| match r {
            Reply::Answer(a) => a.answer,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(answers, [AnswerKind::GoodJob, AnswerKind::UnknownJobId]);
    assert_eq!(job_state(&mut state, a), JobState::Unknown);
}

#[test]
fn oversized_batches_are_refused_whole() {
    let mut state = State::default();
    let requests = vec![json!({"command": "add job", "worker": "A"}); Batch::MAX_REQUESTS + 1];
    let requests = requests
        .iter()
        .map(|r| serde_json::value::to_raw_value(r).unwrap())
        .collect();
    let reply = state.handle(Request::Batch(Batch { requests }), T0, &mut vec![]);
    assert!(
        matches!(&reply, Reply::Answer(a) if a.answer == AnswerKind::SyntaxError),
        "{reply:?}"
    );
    assert_eq!(state.queued_jobs(), 0);
}

/// One step of a client of the queues: add a job of a worker, or take one (of any worker,
/// or of one worker).
#[derive(Debug, Clone)]
enum Step {
    Add(u8),
    Take(Option<u8>),
}

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    prop_oneof![
        (0u8..3).prop_map(Step::Add),
        proptest::option::of(0u8..3).prop_map(Step::Take),
    ]
}

fn request(step: &Step, n: usize) -> Request {
    match step {
        Step::Add(w) => Request::AddJob(NewJob::new(format!("W{w}"), json!(n))),
        Step::Take(w) => Request::GetJob(GetJob {
            workers: w.map(|w| vec![format!("W{w}")]),
        }),
    }
}

/// What a reply tells, without the random ids.
fn gist(reply: &Reply) -> String {
    match reply {
        Reply::Answer(a) => format!("{:?}", a.answer),
        Reply::Job(j) => format!("{:?}", j.as_ref().map(|j| (&j.worker, j.data()))),
        other => format!("{other:?}"),
    }
}

#[test]
fn asking_for_too_many_at_once_is_refused_and_takes_nothing() {
    let mut s = State::default();
    add(&mut s, "A");
    new_pipeline(&mut s);
    for request in [
        Request::GetJobs(GetJobs::new(None, GetJobs::MAX + 1)),
        Request::GetPipelines(GetPipelines::new(GetJobs::MAX + 1)),
    ] {
        let reply = s.handle(request, T0, &mut vec![]);
        assert!(
            matches!(&reply, Reply::Answer(a) if a.answer == AnswerKind::SyntaxError
                && a.error.as_deref().is_some_and(|e| e.contains("at most 10000"))),
            "{reply:?}"
        );
    }
    assert_eq!(s.queued_jobs(), 1);
    assert!(take_pipeline(&mut s, T0).is_some());
}

proptest::proptest! {
    /// `get jobs` / `get pipelines` with `max` k hand out exactly what k `get job` /
    /// `get pipeline` would: the same jobs and pipelines, in the same FIFO order.
    #[test]
    fn taking_several_at_once_is_taking_one_by_one(
        adds in proptest::collection::vec(0u8..3, 0..40),
        takes in proptest::collection::vec((proptest::option::of(0u8..3), 0usize..6), 1..12),
    ) {
        let mut many = State::default();
        let mut one = State::default();
        for (n, w) in adds.iter().enumerate() {
            for s in [&mut many, &mut one] {
                s.handle(Request::AddJob(NewJob::new(format!("W{w}"), json!(n))), T0, &mut vec![]);
                if n % 4 == 0 {
                    let fields = json!({"n": n}).as_object().cloned().unwrap();
                    add_pipeline(s, fields);
                }
            }
        }
        for (w, k) in &takes {
            let workers = w.map(|w| vec![format!("W{w}")]);
            let got = match many.handle(
                Request::GetJobs(GetJobs::new(workers.clone(), *k)),
                T0,
                &mut vec![],
            ) {
                Reply::Jobs(jobs) => jobs,
                other => panic!("{other:?}"),
            };
            let names: Option<Vec<&str>> =
                workers.as_ref().map(|w| w.iter().map(String::as_str).collect());
            let expected: Vec<_> = (0..*k)
                .filter_map(|_| get(&mut one, names.as_deref()))
                .collect();
            let ids = |jobs: &[JobHandout]| jobs.iter().map(|j| (j.worker.clone(), j.data())).collect::<Vec<_>>();
            proptest::prop_assert_eq!(ids(&got), ids(&expected));
            let got = match many.handle(Request::GetPipelines(GetPipelines::new(*k)), T0, &mut vec![]) {
                Reply::Pipelines(p) => p.into_iter().map(|p| p.fields.value("n").unwrap_or_default()).collect::<Vec<_>>(),
                other => panic!("{other:?}"),
            };
            let expected: Vec<_> = (0..*k)
                .filter_map(|_| take_pipeline(&mut one, T0))
                .map(|p| p.fields["n"].clone())
                .collect();
            proptest::prop_assert_eq!(got, expected);
        }
        proptest::prop_assert_eq!(many.queued_jobs(), one.queued_jobs());
        proptest::prop_assert_eq!(many.pending_pipelines(), one.pending_pipelines());
    }

    /// Batching changes nothing but the number of round trips: every job is handed out
    /// once, in the same FIFO order, and every reply is the one of the lone request.
    #[test]
    fn batches_answer_as_requests_one_by_one(
        steps in proptest::collection::vec(step(), 0..60),
        cuts in proptest::collection::vec(1usize..8, 1..20),
    ) {
        let requests: Vec<_> = steps.iter().enumerate().map(|(n, s)| request(s, n)).collect();
        let mut alone = State::default();
        let expected: Vec<_> = requests
            .iter()
            .map(|r| gist(&alone.handle(r.clone(), T0, &mut vec![])))
            .collect();
        let mut batched = State::default();
        let mut got = Vec::new();
        let mut rest = &requests[..];
        for cut in cuts.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (now, later) = rest.split_at((*cut).min(rest.len()));
            got.extend(batch(&mut batched, now, &mut vec![]).iter().map(gist));
            rest = later;
        }
        proptest::prop_assert_eq!(got, expected);
        proptest::prop_assert_eq!(batched.queued_jobs(), alone.queued_jobs());
    }
}

/// One step of anything that can happen to the router's state.
#[derive(Debug, Clone)]
enum Op {
    AddJob {
        worker: u8,
        pipeline: Option<u8>,
        last: bool,
    },
    GetJobs {
        worker: Option<u8>,
        max: u8,
        wait: bool,
    },
    Finish(u8),
    Fail(u8),
    Renew(u8),
    AddPipeline {
        request_id: Option<u8>,
    },
    GetPipelines {
        max: u8,
        wait: bool,
    },
    PipelineFinished(u8),
    PipelineFailed(u8),
    Cancel(u8),
    TakeBack(u8),
    Advance(u16),
    Restore,
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        3 => (0u8..3, proptest::option::of(any::<u8>()), any::<bool>())
            .prop_map(|(worker, pipeline, last)| Op::AddJob { worker, pipeline, last }),
        3 => (proptest::option::of(0u8..3), 1u8..4, any::<bool>())
            .prop_map(|(worker, max, wait)| Op::GetJobs { worker, max, wait }),
        2 => any::<u8>().prop_map(Op::Finish),
        1 => any::<u8>().prop_map(Op::Fail),
        1 => any::<u8>().prop_map(Op::Renew),
        2 => proptest::option::of(0u8..4).prop_map(|request_id| Op::AddPipeline { request_id }),
        2 => (1u8..3, any::<bool>()).prop_map(|(max, wait)| Op::GetPipelines { max, wait }),
        1 => any::<u8>().prop_map(Op::PipelineFinished),
        1 => any::<u8>().prop_map(Op::PipelineFailed),
        1 => any::<u8>().prop_map(Op::Cancel),
        1 => any::<u8>().prop_map(Op::TakeBack),
        2 => (0u16..3000).prop_map(Op::Advance),
        1 => Just(Op::Restore),
    ]
}

fn pick<T: Clone>(seen: &[T], n: u8) -> Option<T> {
    (!seen.is_empty()).then(|| seen[usize::from(n) % seen.len()].clone())
}

proptest::proptest! {
    /// Whatever happens — requests of every kind, waits, work taken back, time passing
    /// (leases expire, back-offs end, outcomes are forgotten), restarts — the state keeps
    /// its invariants after every step, and a restart restores the same queues, back-offs
    /// and leases.
    #[test]
    fn the_invariants_hold_after_every_step(ops in proptest::collection::vec(op(), 1..120)) {
        let policy = Policy {
            max_attempts: 2,
            retry_backoff_ms: 100,
            job_lease_ms: 1_000,
            pipeline_lease_ms: 1_000,
            retention_ms: 5_000,
            max_remembered: 5,
            ..Policy::default()
        };
        let mut s = State::new(Map::new(), policy);
        let mut now = T0;
        let (mut jobs, mut pipelines): (Vec<JobId>, Vec<PipelineId>) = (vec![], vec![]);
        let mut ticket = 0;
        let mut served = Vec::new();
        for (step, op) in (1u64..).zip(ops) {
            let mut events = Vec::new();
            let request = match op.clone() {
                Op::AddJob { worker, pipeline, last } => {
                    let mut job = NewJob::new(format!("W{worker}"), json!({}));
                    job.pipeline_id = pipeline.and_then(|n| pick(&pipelines, n));
                    if last {
                        job = job.ending_pipeline(std::time::Duration::from_millis(5));
                    }
                    Some(Request::AddJob(job))
                }
                Op::GetJobs { worker, max, wait } => Some(Request::GetJobs(GetJobs {
                    workers: worker.map(|w| vec![format!("W{w}")]),
                    max: usize::from(max),
                    wait_ms: wait.then_some(500),
                    asker: Some(Ask { id: "d".into(), ask: step }),
                })),
                Op::Finish(n) => pick(&jobs, n).map(|job_id| Request::JobFinished(JobFinished {
                    job_id,
                    duration: WireDuration::from_secs(0.1),
                })),
                Op::Fail(n) => pick(&jobs, n).map(|job_id| Request::JobFailed(JobFailed {
                    job_id,
                    error: "boom".into(),
                    duration: None,
                })),
                Op::Renew(n) => Some(Request::RenewLeases(RenewLeases {
                    job_ids: pick(&jobs, n).into_iter().collect(),
                    pipeline_ids: pick(&pipelines, n).into_iter().collect(),
                    peer: None,
                    // Settles the asks of the steps before a random one.
                    asker: (n % 2 == 0).then(|| Settled {
                        id: "d".into(),
                        settled: step.saturating_sub(u64::from(n) % 8),
                    }),
                })),
                Op::AddPipeline { request_id } => {
                    let mut fields = Map::new();
                    if let Some(r) = request_id {
                        fields.insert(REQUEST_ID.into(), format!("r{r}").into());
                    }
                    Some(Request::AddPipeline(NewPipeline::new(&pipeline_json()).with_fields(fields)))
                }
                Op::GetPipelines { max, wait } => Some(Request::GetPipelines(GetPipelines {
                    max: usize::from(max),
                    wait_ms: wait.then_some(500),
                    asker: Some(Ask { id: "d".into(), ask: step }),
                })),
                Op::PipelineFinished(n) => pick(&pipelines, n).map(|pipeline_id| {
                    Request::PipelineFinished(PipelineFinished {
                        pipeline_id,
                        duration: WireDuration::from_secs(1.0),
                    })
                }),
                Op::PipelineFailed(n) => pick(&pipelines, n).map(|pipeline_id| {
                    Request::PipelineFailed(PipelineFailed {
                        pipeline_id,
                        job_id: "j".into(),
                        worker: "W0".into(),
                        error: "boom".into(),
                        duration: None,
                    })
                }),
                Op::Cancel(n) => pick(&pipelines, n)
                    .map(|pipeline_id| Request::CancelPipeline(CancelPipeline { pipeline_id })),
                Op::TakeBack(n) => {
                    let job: Vec<JobId> = pick(&jobs, n).into_iter().collect();
                    let pipeline: Vec<PipelineId> = pick(&pipelines, n).into_iter().collect();
                    s.take_back(&job, &pipeline, &mut events);
                    None
                }
                Op::Advance(ms) => {
                    now += u64::from(ms);
                    s.tick(now, &mut events);
                    None
                }
                Op::Restore => {
                    let r = s.restarted();
                    if let Err(broken) = s.check_restored(&r) {
                        proptest::prop_assert!(false, "{broken}");
                    }
                    // Waiting requests live in memory only: a restart answers none of them.
                    s = r;
                    None
                }
            };
            if let Some(request) = request {
                let reply = s.handle_or_wait(ticket, request, now, &mut events);
                ticket += 1;
                let mut replies: Vec<Reply> = reply.into_iter().collect();
                s.serve_waiting(now, &mut served);
                replies.extend(served.drain(..).map(|w| w.reply));
                for reply in replies {
                    match reply {
                        Reply::Answer(a) => {
                            jobs.extend(a.job_id);
                            pipelines.extend(a.pipeline_id);
                        }
                        Reply::Jobs(js) => jobs.extend(js.into_iter().map(|j| j.job_id)),
                        Reply::Pipelines(ps) => {
                            pipelines.extend(ps.into_iter().map(|p| p.pipeline_id))
                        }
                        _ => {}
                    }
                }
            }
            if let Err(broken) = s.check_invariants() {
                proptest::prop_assert!(false, "after {op:?}: {broken}");
            }
        }
    }
}

fn cluster(state: &mut State, now: u64) -> pypelinin_common::protocol::cluster::ClusterStatus {
    match state.handle(Request::ClusterStatus, now, &mut vec![]) {
        Reply::ClusterStatus(status) => *status,
        other => panic!("{other:?}"),
    }
}

#[test]
fn cluster_status_counts_jobs_pipelines_peers_and_failures() {
    use pypelinin_common::protocol::cluster::{Peer, PeerRole};
    let mut s = State::new(
        Map::new(),
        Policy {
            max_attempts: 2,
            retry_backoff_ms: 100,
            ..Policy::default()
        },
    );
    let mut events = vec![];
    s.tick(T0, &mut events);
    // A: one finished, one running; B: one failed for good after a retry; C: queued.
    let a1 = add(&mut s, "A");
    let a2 = add(&mut s, "A");
    let b = add(&mut s, "B");
    add(&mut s, "C");
    for _ in 0..3 {
        get(&mut s, Some(&["A", "B"]));
    }
    finish(&mut s, &a1, &mut events);
    fail(&mut s, &b, T0, &mut events);
    s.tick(T0 + 200, &mut events);
    get_at(&mut s, Some(&["B"]), T0 + 200).unwrap();
    fail(&mut s, &b, T0 + 300, &mut events);
    // A broker offering A identifies itself; a pipeliner did long ago.
    let mut broker = Peer::new(PeerRole::Broker, vec!["A".into()]);
    broker.id = "broker-1".into();
    let mut pipeliner = Peer::new(PeerRole::Pipeliner, vec![]);
    pipeliner.id = "pipeliner-1".into();
    for (peer, at) in [(pipeliner, T0), (broker, T0 + 20_000)] {
        let renew = RenewLeases {
            peer: Some(Box::new(peer)),
            ..RenewLeases::default()
        };
        s.handle(Request::RenewLeases(renew), at, &mut events);
    }
    let p = new_pipeline(&mut s);
    cancel(&mut s, &p, &mut events);
    new_pipeline(&mut s);

    let status = cluster(&mut s, T0 + 21_000);
    let w = |name: &str| status.workers[name].clone();
    assert_eq!((w("A").finished, w("A").running, w("A").brokers), (1, 1, 1));
    assert_eq!((w("B").failed, w("B").retried, w("B").brokers), (1, 1, 0));
    assert_eq!(w("C").queued, 1);
    assert_eq!(status.pipelines.queued, 1);
    assert_eq!(status.pipelines.cancelled, 1);
    assert_eq!(
        status.recent_failures.len(),
        1,
        "{:?}",
        status.recent_failures
    );
    assert_eq!(status.recent_failures[0].job_id.as_ref(), Some(&b));
    assert!(status.recent_failures[0].error.contains("failed 2 of 2"));
    let gone: Vec<(&str, bool)> = status
        .peers
        .iter()
        .map(|p| (p.peer.id.as_str(), p.gone))
        .collect();
    assert_eq!(gone, [("broker-1", false), ("pipeliner-1", true)]);
    assert_eq!(status.last_minute.jobs_finished, 1);
    assert_eq!(status.last_minute.jobs_failed, 1);
    assert!((status.uptime_secs - 21.0).abs() < 1e-9);
    let commands: HashMap<&str, u64> = s.requests_by_command().into_iter().collect();
    assert_eq!(commands["add job"], 4);
    assert_eq!(commands["renew leases"], 2);
    assert_eq!(commands["cluster status"], 1);
    let _ = a2;
}

#[test]
fn pipeline_details_list_the_submitted_jobs_with_their_state_and_duration() {
    let mut s = State::default();
    let mut events = vec![];
    let p = new_pipeline(&mut s);
    take_pipeline(&mut s, T0).unwrap();
    let a = add_in(&mut s, "A", Some(&p));
    get(&mut s, Some(&["A"])).unwrap();
    let done = JobFinished {
        job_id: a.clone(),
        duration: WireDuration::from_secs(1.5),
    };
    s.handle(Request::JobFinished(done), T0, &mut events);
    let b = add_in(&mut s, "B", Some(&p));
    let q = PipelineStatusQuery {
        pipeline_ids: vec![p.clone()],
        details: true,
    };
    let Reply::Answer(Answer {
        pipelines: Some(all),
        details: Some(mut details),
        ..
    }) = s.handle(Request::PipelineStatus(q), T0, &mut events)
    else {
        panic!()
    };
    assert_eq!(all[&p].state, PipelineState::Running);
    let details = details.remove(&p).unwrap();
    assert_eq!(details.pipeline, pipeline_json());
    let jobs: Vec<_> = details
        .jobs
        .into_iter()
        .map(|j| (j.job_id, j.worker, j.state, j.duration))
        .collect();
    assert_eq!(
        jobs,
        [
            (a, "A".to_owned(), JobState::Finished, Some(1.5)),
            (b, "B".to_owned(), JobState::Queued, None)
        ]
    );
}

#[test]
fn work_taken_by_the_legacy_commands_gets_the_legacy_lease_until_renewed() {
    let mut s = State::new(
        Map::new(),
        Policy {
            job_lease_ms: 1_000,
            pipeline_lease_ms: 1_000,
            legacy_lease_ms: Some(60_000),
            ..Policy::default()
        },
    );
    let mut events = vec![];
    let legacy = add(&mut s, "A");
    let modern = add(&mut s, "A");
    let renewed = add(&mut s, "A");
    // `get job` (what the original broker sends, never renewing): the long lease.
    assert_eq!(get(&mut s, None).unwrap().job_id, legacy);
    // `get jobs` (ours, renewing): the usual one.
    let Reply::Jobs(jobs) = s.handle(Request::GetJobs(GetJobs::new(None, 1)), T0, &mut events)
    else {
        panic!()
    };
    assert_eq!(jobs[0].job_id, modern);
    assert_eq!(get(&mut s, None).unwrap().job_id, renewed);
    // A legacy taker that renews after all is treated as any other: the usual lease from then.
    let renew = RenewLeases {
        job_ids: vec![renewed.clone()],
        ..RenewLeases::default()
    };
    s.handle(Request::RenewLeases(renew), T0 + 500, &mut events);

    s.tick(T0 + 30_000, &mut events);
    assert_eq!(
        job_state(&mut s, &legacy),
        JobState::Running,
        "re-run within its legacy lease"
    );
    assert_eq!(job_state(&mut s, &modern), JobState::Queued);
    assert_eq!(job_state(&mut s, &renewed), JobState::Queued);
    s.tick(T0 + 60_001, &mut events);
    assert_eq!(
        job_state(&mut s, &legacy),
        JobState::Queued,
        "its legacy lease ended"
    );

    // The same for pipelines: `get pipeline` against `get pipelines`.
    let p1 = new_pipeline(&mut s);
    let p2 = new_pipeline(&mut s);
    take_pipeline(&mut s, T0 + 60_001).unwrap();
    s.handle(
        Request::GetPipelines(GetPipelines::new(1)),
        T0 + 60_001,
        &mut events,
    );
    s.tick(T0 + 90_000, &mut events);
    assert_eq!(pipeline_state(&mut s, &p1).state, PipelineState::Running);
    assert_eq!(pipeline_state(&mut s, &p2).state, PipelineState::Queued);
}

#[test]
fn the_router_gives_legacy_takers_six_hours_by_default() {
    let policy = crate::RouterSettings::default().policy();
    assert_eq!(policy.legacy_job_lease_ms(), 6 * 3600 * 1000);
    assert_eq!(policy.legacy_pipeline_lease_ms(), 6 * 3600 * 1000);
    // Never shorter than the usual lease.
    let short = crate::RouterSettings {
        legacy_lease_secs: 1.0,
        ..crate::RouterSettings::default()
    };
    assert_eq!(short.policy().legacy_job_lease_ms(), 30_000);
    let off = crate::RouterSettings {
        legacy_lease_secs: 0.0,
        ..crate::RouterSettings::default()
    };
    assert_eq!(off.policy().legacy_job_lease_ms(), 30_000);
}

#[test]
fn a_legacy_clients_pipeline_that_fails_or_is_cancelled_is_also_broadcast_finished() {
    let mut s = State::new(
        Map::new(),
        Policy {
            legacy_end_broadcast: true,
            ..Policy::default()
        },
    );
    let legacy = new_pipeline(&mut s);
    let mut ours = Map::new();
    ours.insert("request id".into(), json!("r-1"));
    let Reply::Answer(Answer {
        pipeline_id: Some(ours),
        ..
    }) = add_pipeline(&mut s, ours)
    else {
        panic!()
    };
    let cancelled = new_pipeline(&mut s);
    let kinds = |events: &[Event]| -> Vec<String> {
        events
            .iter()
            .map(|e| {
                e.to_string()
                    .split(':')
                    .next()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect()
    };
    for (id, echoed) in [(&legacy, true), (&ours, false)] {
        let mut events = vec![];
        let failed = PipelineFailed {
            pipeline_id: id.clone(),
            job_id: "j".into(),
            worker: "A".into(),
            error: "boom".into(),
            duration: Some(WireDuration::from_secs(1.5)),
        };
        s.handle(Request::PipelineFailed(failed), T0, &mut events);
        let expected: &[&str] = if echoed {
            &["pipeline failed", "pipeline finished"]
        } else {
            &["pipeline failed"]
        };
        assert_eq!(kinds(&events), expected);
        if echoed {
            assert_eq!(
                events[1],
                Event::pipeline_finished(id.clone(), &WireDuration::from_secs(1.5))
            );
        }
        // Its status still says how it ended.
        assert_eq!(pipeline_state(&mut s, id).state, PipelineState::Failed);
    }
    let mut events = vec![];
    cancel(&mut s, &cancelled, &mut events);
    assert_eq!(kinds(&events), ["pipeline cancelled", "pipeline finished"]);
    assert_eq!(
        pipeline_state(&mut s, &cancelled).state,
        PipelineState::Cancelled
    );
}

#[test]
fn a_legacy_job_that_fails_for_good_is_also_broadcast_finished() {
    let mut s = State::new(
        Map::new(),
        Policy {
            max_attempts: 1,
            legacy_end_broadcast: true,
            ..Policy::default()
        },
    );
    let p = new_pipeline(&mut s);
    let legacy = add_legacy(&mut s, "A");
    let ours = add_in(&mut s, "A", Some(&p));
    let ours_alone = add(&mut s, "A");
    for (id, echoed) in [(legacy, true), (ours, false), (ours_alone, false)] {
        assert_eq!(get(&mut s, None).unwrap().job_id, id);
        let mut events = vec![];
        let failed = JobFailed {
            job_id: id.clone(),
            error: "boom".into(),
            duration: None,
        };
        s.handle(Request::JobFailed(failed), T0, &mut events);
        let mut expected = vec![Event::job_failed(id.clone(), "boom")];
        if echoed {
            expected.push(Event::job_finished(id, &WireDuration::from_secs(0.0)));
        }
        assert_eq!(events, expected);
    }
}

/// A state whose legacy ends wait 200 ms after their add.
fn with_grace() -> State {
    State::new(
        Map::new(),
        Policy {
            legacy_subscribe_grace_ms: 200,
            legacy_end_broadcast: true,
            ..Policy::default()
        },
    )
}

fn finish_job(s: &mut State, id: &JobId, now: u64, events: &mut Vec<Event>) {
    let done = JobFinished {
        job_id: id.clone(),
        duration: WireDuration::from_secs(0.001),
    };
    assert_eq!(
        s.handle(Request::JobFinished(done), now, events),
        Answer::new(AnswerKind::GoodJob).into()
    );
}

#[test]
fn the_end_of_a_legacy_job_waits_until_its_adder_can_have_subscribed() {
    let mut s = with_grace();
    let p = new_pipeline(&mut s);
    let legacy = add_legacy(&mut s, "A");
    let ours = add_in(&mut s, "A", Some(&p));
    let late = add_legacy(&mut s, "A");
    let ours_alone = add(&mut s, "A");
    for id in [&legacy, &ours, &late, &ours_alone] {
        get(&mut s, None).unwrap();
        assert_eq!(job_state(&mut s, id), JobState::Running);
    }
    let mut events = vec![];
    // 2 ms after the add: held for the legacy job, at once for ours (their adders subscribed
    // before they added them).
    finish_job(&mut s, &legacy, T0 + 2, &mut events);
    finish_job(&mut s, &ours, T0 + 2, &mut events);
    finish_job(&mut s, &ours_alone, T0 + 2, &mut events);
    assert_eq!(
        events,
        [
            Event::job_finished(ours, &WireDuration::from_secs(0.001)),
            Event::job_finished(ours_alone, &WireDuration::from_secs(0.001))
        ]
    );
    assert_eq!(s.held_broadcasts(), 1);
    // The state is already what the report made it: only the broadcast waits.
    assert_eq!(job_state(&mut s, &legacy), JobState::Unknown);
    let mut events = vec![];
    s.tick(T0 + 199, &mut events);
    assert!(events.is_empty(), "{events:?}");
    s.tick(T0 + 200, &mut events);
    assert_eq!(
        events,
        [Event::job_finished(legacy, &WireDuration::from_secs(0.001))]
    );
    assert_eq!(s.held_broadcasts(), 0);
    // Past the grace nothing waits.
    let mut events = vec![];
    finish_job(&mut s, &late, T0 + 200, &mut events);
    assert_eq!(
        events,
        [Event::job_finished(late, &WireDuration::from_secs(0.001))]
    );
}

#[test]
fn the_end_of_a_legacy_clients_pipeline_waits_for_its_subscription_and_keeps_its_order() {
    let mut s = with_grace();
    let legacy = new_pipeline(&mut s);
    let failed = new_pipeline(&mut s);
    let mut fields = Map::new();
    fields.insert("request id".into(), json!("r-1"));
    let Reply::Answer(Answer {
        pipeline_id: Some(ours),
        ..
    }) = add_pipeline(&mut s, fields)
    else {
        panic!()
    };
    let mut events = vec![];
    for id in [&legacy, &ours] {
        let done = PipelineFinished {
            pipeline_id: id.clone(),
            duration: WireDuration::from_secs(0.002),
        };
        s.handle(Request::PipelineFinished(done), T0 + 2, &mut events);
    }
    let failure = PipelineFailed {
        pipeline_id: failed.clone(),
        job_id: "j".into(),
        worker: "A".into(),
        error: "boom".into(),
        duration: None,
    };
    s.handle(Request::PipelineFailed(failure), T0 + 3, &mut events);
    assert_eq!(
        events,
        [Event::pipeline_finished(
            ours,
            &WireDuration::from_secs(0.002)
        )]
    );
    let mut events = vec![];
    s.tick(T0 + 250, &mut events);
    // Each end once, in the order they happened; a failure still followed by its echo.
    assert_eq!(
        events,
        [
            Event::pipeline_finished(legacy, &WireDuration::from_secs(0.002)),
            Event::pipeline_failed(failed.clone(), "j".into(), "A", "boom"),
            Event::pipeline_finished(failed, &WireDuration::from_secs(0.0)),
        ]
    );
}

#[test]
fn no_grace_sends_every_end_at_once() {
    let mut s = State::default();
    let legacy = add_legacy(&mut s, "A");
    get(&mut s, None).unwrap();
    let mut events = vec![];
    finish_job(&mut s, &legacy, T0 + 1, &mut events);
    assert_eq!(events.len(), 1);
    assert_eq!(s.held_broadcasts(), 0);
    // The router's default holds them for 0.2 s.
    let policy = crate::RouterSettings::default().policy();
    assert_eq!(policy.legacy_subscribe_grace_ms, 200);
}

#[test]
fn a_pipeline_handed_again_to_a_legacy_pipeliner_goes_out_under_a_new_id() {
    let mut s = State::new(
        Map::new(),
        Policy {
            pipeline_lease_ms: 1_000,
            legacy_lease_ms: Some(1_000),
            ..Policy::default()
        },
    );
    let id = new_pipeline(&mut s);
    let first = take_pipeline(&mut s, T0).unwrap();
    assert_eq!(first.pipeline_id, id, "the first time, its own id");
    let mut events = vec![];
    s.tick(T0 + 1_001, &mut events);
    let second = take_pipeline(&mut s, T0 + 1_001).unwrap();
    assert_ne!(second.pipeline_id, id, "the second time, an alias");
    s.check_invariants().unwrap();
    // A restart keeps the alias.
    let restarted = s.restarted();
    s.check_restored(&restarted).unwrap();
    assert_eq!(restarted.resolve(second.pipeline_id.clone()), id);

    // The alias's report ends the pipeline, broadcast under its own id (what its client
    // waits for); the first copy's report is then answered as any late one.
    let mut events = vec![];
    let done = |pipeline_id: &PipelineId| {
        Request::PipelineFinished(PipelineFinished {
            pipeline_id: pipeline_id.clone(),
            duration: WireDuration::from_secs(1.0),
        })
    };
    assert_eq!(
        s.handle(done(&second.pipeline_id), T0 + 1_100, &mut events),
        Answer::new(AnswerKind::GoodJob).into()
    );
    assert_eq!(
        events,
        [Event::pipeline_finished(
            id.clone(),
            &WireDuration::from_secs(1.0)
        )]
    );
    assert_eq!(pipeline_state(&mut s, &id).state, PipelineState::Finished);
    for late in [&id, &second.pipeline_id] {
        assert_eq!(
            s.handle(done(late), T0 + 1_200, &mut vec![]),
            Answer::new(AnswerKind::UnknownPipelineId).into()
        );
    }
    s.check_invariants().unwrap();
    assert!(s.legacy.aliases.is_empty());

    // Our pipeliners (`get pipelines`) always get the pipeline's own id.
    let again = new_pipeline(&mut s);
    take_pipeline(&mut s, T0 + 2_000).unwrap();
    s.tick(T0 + 3_001, &mut events);
    let Reply::Pipelines(handouts) = s.handle(
        Request::GetPipelines(GetPipelines::new(1)),
        T0 + 3_001,
        &mut events,
    ) else {
        panic!()
    };
    assert_eq!(handouts[0].pipeline_id, again);
}

fn list(state: &mut State, list: ListPipelines, now: u64) -> PipelineList {
    match state.handle(Request::ListPipelines(list), now, &mut vec![]) {
        Reply::PipelineList(l) => l,
        other => panic!("{other:?}"),
    }
}

fn listing(state: Option<PipelineState>, prefix: Option<&str>, limit: usize) -> ListPipelines {
    ListPipelines {
        state,
        id_prefix: prefix.map(str::to_owned),
        limit,
    }
}

#[test]
fn pipelines_are_listed_newest_first_by_state_and_id_prefix_within_the_limit() {
    let mut s = State::new(Map::new(), Policy::default());
    let ids: Vec<PipelineId> = (0..6).map(|_| new_pipeline(&mut s)).collect();
    // The two oldest run; the oldest of them then finishes and the other fails; one queued
    // pipeline is cancelled.
    let a = take_pipeline(&mut s, T0).unwrap().pipeline_id;
    let b = take_pipeline(&mut s, T0).unwrap().pipeline_id;
    let c = take_pipeline(&mut s, T0).unwrap().pipeline_id;
    assert_eq!((&a, &b, &c), (&ids[0], &ids[1], &ids[2]));
    let done = Request::PipelineFinished(PipelineFinished {
        pipeline_id: a.clone(),
        duration: WireDuration::from_secs(1.5),
    });
    s.handle(done, T0 + 1_000, &mut vec![]);
    let failed = Request::PipelineFailed(PipelineFailed {
        pipeline_id: b.clone(),
        job_id: "j".into(),
        worker: "B".into(),
        error: "boom".into(),
        duration: None,
    });
    s.handle(failed, T0 + 2_000, &mut vec![]);
    let cancel = Request::CancelPipeline(CancelPipeline {
        pipeline_id: ids[3].clone(),
    });
    s.handle(cancel, T0 + 2_500, &mut vec![]);

    let all = list(&mut s, listing(None, None, 50), T0 + 3_000);
    let order: Vec<&PipelineId> = all.pipelines.iter().map(|p| &p.pipeline_id).collect();
    // Running (c), queued newest first (5, 4), then ended newest first (3 cancelled, b
    // failed, a finished).
    assert_eq!(order, vec![&c, &ids[5], &ids[4], &ids[3], &b, &a]);
    assert!(!all.more);
    let failed = &all.pipelines[4];
    assert_eq!(failed.status.state, PipelineState::Failed);
    assert_eq!(failed.status.error.as_deref(), Some("boom"));
    assert_eq!(failed.ended_secs_ago, Some(1.0));
    assert_eq!(all.pipelines[0].jobs, Some(0));

    let queued = list(&mut s, listing(Some(PipelineState::Queued), None, 50), T0);
    let order: Vec<&PipelineId> = queued.pipelines.iter().map(|p| &p.pipeline_id).collect();
    assert_eq!(order, vec![&ids[5], &ids[4]]);
    let finished = list(&mut s, listing(Some(PipelineState::Finished), None, 50), T0);
    assert_eq!(finished.pipelines.len(), 1);
    assert_eq!(
        finished.pipelines[0].status.duration,
        Some(WireDuration::from_secs(1.5))
    );

    let one = list(&mut s, listing(None, Some(&ids[4].as_str()[..12]), 50), T0);
    assert_eq!(one.pipelines.len(), 1);
    assert_eq!(one.pipelines[0].pipeline_id, ids[4]);

    let page = list(&mut s, listing(None, None, 2), T0);
    assert_eq!(page.pipelines.len(), 2);
    assert!(page.more);
    // The reply's wire form.
    let wire: Value = serde_json::from_slice(&Reply::PipelineList(page).encode()).unwrap();
    assert_eq!(wire["answer"], "pipeline list");
    assert_eq!(wire["pipelines"][0]["state"], "running");
    assert_eq!(wire["more"], true);
}

#[test]
fn large_jobs_and_pipelines_are_handed_out_fewer_at_a_time() {
    let mut s = State::default();
    let pad = "x".repeat(HANDOUT_BYTES * 3 / 8);
    for i in 0..5 {
        let job = NewJob::new("W", json!({"i": i, "pad": pad}));
        s.handle(Request::AddJob(job), T0, &mut vec![]);
        let pipeline = json!([
            ["graph", [[[["worker_name", "A"]], null]]],
            ["data", [["pad", pad]]]
        ]);
        s.handle(
            Request::AddPipeline(NewPipeline::new(&pipeline)),
            T0,
            &mut vec![],
        );
    }
    let mut counts = Vec::new();
    for _ in 0..3 {
        let jobs = match s.handle(Request::GetJobs(GetJobs::new(None, 100)), T0, &mut vec![]) {
            Reply::Jobs(jobs) => jobs.len(),
            other => panic!("{other:?}"),
        };
        let pipelines = match s.handle(
            Request::GetPipelines(GetPipelines::new(100)),
            T0,
            &mut vec![],
        ) {
            Reply::Pipelines(p) => p.len(),
            other => panic!("{other:?}"),
        };
        counts.push((jobs, pipelines));
    }
    // Past HANDOUT_BYTES after the third: three, then the last two, then none.
    assert_eq!(counts, [(3, 3), (2, 2), (0, 0)]);
}

/// `get jobs` of daemon `id`, numbered `ask`; the ids handed out.
fn ask_jobs(state: &mut State, id: &str, ask: u64, max: usize, now: u64) -> Vec<JobId> {
    let get = Request::GetJobs(GetJobs {
        workers: None,
        max,
        wait_ms: None,
        asker: Some(Ask { id: id.into(), ask }),
    });
    match state.handle(get, now, &mut vec![]) {
        Reply::Jobs(jobs) => jobs.into_iter().map(|j| j.job_id).collect(),
        other => panic!("{other:?}"),
    }
}

/// `renew leases` of daemon `id` holding `jobs`, its asks up to `settled` settled.
fn settle(state: &mut State, id: &str, settled: u64, jobs: &[JobId], now: u64) -> Vec<Event> {
    let renew = RenewLeases {
        job_ids: jobs.to_vec(),
        asker: Some(Settled {
            id: id.into(),
            settled,
        }),
        ..RenewLeases::default()
    };
    let mut events = vec![];
    assert_eq!(
        state.handle(Request::RenewLeases(renew), now, &mut events),
        Answer::new(AnswerKind::LeasesRenewed).into()
    );
    events
}

#[test]
fn jobs_handed_out_under_a_settled_ask_and_not_held_are_queued_again_at_once() {
    let mut s = State::default();
    let a = add(&mut s, "A");
    let b = add(&mut s, "A");
    let c = add(&mut s, "A");
    // Ask 1 took a and b, and the daemon holds only b (a was lost somehow). Ask 2 took c and
    // is still out.
    assert_eq!(ask_jobs(&mut s, "d", 1, 2, T0), vec![a.clone(), b.clone()]);
    assert_eq!(ask_jobs(&mut s, "d", 2, 1, T0), vec![c.clone()]);
    let events = settle(&mut s, "d", 1, std::slice::from_ref(&b), T0 + 5_000);
    assert_eq!(
        events,
        vec![Event::NewJob],
        "a is queued again, and said so"
    );
    assert_eq!(job_state(&mut s, &a), JobState::Queued);
    assert_eq!(s.job(&a).unwrap().attempts, 0, "no attempt used");
    assert_eq!(job_state(&mut s, &b), JobState::Running, "held");
    assert_eq!(
        job_state(&mut s, &c),
        JobState::Running,
        "its ask is not settled"
    );
    s.check_invariants().unwrap();
    // Once ask 2 is settled without c, c comes back too; a settled ask is not looked at twice.
    let events = settle(&mut s, "d", 2, std::slice::from_ref(&b), T0 + 6_000);
    assert_eq!(events, vec![Event::NewJob]);
    assert_eq!(job_state(&mut s, &c), JobState::Queued);
    assert_eq!(
        ask_jobs(&mut s, "e", 1, 5, T0 + 6_000),
        vec![a, c],
        "in their old places"
    );
    s.check_invariants().unwrap();
}

#[test]
fn a_settled_ask_gives_back_only_what_is_still_out_under_its_own_hand_out() {
    let policy = Policy {
        job_lease_ms: 1_000,
        ..Policy::default()
    };
    let mut s = State::new(Map::new(), policy);
    let a = add(&mut s, "A");
    let b = add(&mut s, "A");
    assert_eq!(ask_jobs(&mut s, "d", 1, 2, T0), vec![a.clone(), b.clone()]);
    // a's lease runs out and another daemon takes it; b finishes (d reported it).
    let mut events = vec![];
    s.tick(T0 + 1_000, &mut events);
    s.tick(T0 + 2_000, &mut events);
    assert_eq!(ask_jobs(&mut s, "e", 1, 1, T0 + 2_000), vec![a.clone()]);
    finish(&mut s, &b, &mut events);
    // d settles ask 1 holding nothing: a is e's now, and b has ended; nothing changes.
    assert_eq!(settle(&mut s, "d", 1, &[], T0 + 2_100), vec![]);
    assert_eq!(
        job_state(&mut s, &a),
        JobState::Running,
        "e's hand-out is left alone"
    );
    // A daemon that never asked settles nothing.
    assert_eq!(settle(&mut s, "x", 9, &[], T0 + 2_200), vec![]);
    s.check_invariants().unwrap();
}

#[test]
fn pipelines_handed_out_under_a_settled_ask_and_not_held_are_queued_again() {
    let mut s = State::default();
    let p = new_pipeline(&mut s);
    let get = Request::GetPipelines(GetPipelines {
        max: 1,
        wait_ms: None,
        asker: Some(Ask {
            id: "pl".into(),
            ask: 3,
        }),
    });
    assert!(matches!(s.handle(get, T0, &mut vec![]), Reply::Pipelines(p) if p.len() == 1));
    let renew = RenewLeases {
        asker: Some(Settled {
            id: "pl".into(),
            settled: 3,
        }),
        ..RenewLeases::default()
    };
    let mut events = vec![];
    s.handle(Request::RenewLeases(renew), T0 + 10, &mut events);
    assert_eq!(events, vec![Event::NewPipeline]);
    assert_eq!(pipeline_state(&mut s, &p).state, PipelineState::Queued);
    let again = take_pipeline(&mut s, T0 + 20).unwrap();
    assert_eq!(again.pipeline_id, p, "handed out again");
    s.check_invariants().unwrap();
}

#[test]
fn daemons_not_heard_of_for_longer_than_a_lease_are_forgotten() {
    let mut s = State::default();
    add(&mut s, "A");
    ask_jobs(&mut s, "d", 1, 1, T0);
    assert_eq!(s.askers.known(), 1);
    let lease = s.policy.job_lease_ms.max(s.policy.pipeline_lease_ms);
    s.tick(T0 + lease, &mut vec![]);
    assert_eq!(s.askers.known(), 1, "still within a lease");
    s.tick(T0 + lease + 1, &mut vec![]);
    assert_eq!(s.askers.known(), 0);
}
