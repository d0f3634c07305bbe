//! The pipelines a pipeliner walks, without I/O: events in, actions out.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use pypelinin_common::ids::{JobId, PipelineId};
use pypelinin_common::pipeline::{JobIndex, Pipeline, RunState};
use pypelinin_common::protocol::{JobState, PipelineAssignment};
use serde_json::value::RawValue;
use tracing::info;

/// What the pipeliner must tell the router.
#[derive(Debug, Clone)]
pub enum Action {
    /// `add job` for a job of a pipeline.
    Submit {
        /// The pipeline.
        pipeline_id: PipelineId,
        /// The job within it.
        job: JobIndex,
        /// Its worker.
        worker: String,
        /// Its data (its own, or the pipeline's), as JSON text.
        data: Box<RawValue>,
        /// Whether `data` is the pipeline's (the job has none of its own).
        pipeline_data: bool,
        /// When it is the pipeline's last job: how long the pipeline has run. The router is
        /// asked to end the pipeline when the job finishes (`"ends pipeline"`).
        ends_pipeline: Option<Duration>,
    },
    /// `pipeline finished`.
    Finish {
        /// The pipeline.
        pipeline_id: PipelineId,
        /// Since the pipeliner took it.
        duration: Duration,
    },
    /// `pipeline failed`.
    Fail {
        /// The pipeline.
        pipeline_id: PipelineId,
        /// The job that failed.
        job_id: JobId,
        /// Its worker.
        worker: String,
        /// What went wrong.
        error: String,
        /// Since the pipeliner took it.
        duration: Duration,
    },
}

struct Walk {
    pipeline: Pipeline,
    /// The pipeline's data as JSON text, encoded once for all its jobs.
    data: Box<RawValue>,
    run: RunState,
    submitted: HashMap<JobIndex, (JobId, Instant)>,
    started: Instant,
    /// The router accepted to end the pipeline with its last job.
    router_ends: bool,
}

/// Every pipeline being walked, and the jobs awaited.
#[derive(Default)]
pub struct Walks {
    walks: HashMap<PipelineId, Walk>,
    awaiting: HashMap<JobId, (PipelineId, JobIndex)>,
}

impl Walks {
    /// Pipelines being walked.
    pub fn len(&self) -> usize {
        self.walks.len()
    }

    /// Whether no pipeline is being walked.
    pub fn is_empty(&self) -> bool {
        self.walks.is_empty()
    }

    /// The pipelines being walked.
    pub fn ids(&self) -> Vec<PipelineId> {
        self.walks.keys().cloned().collect()
    }

    /// Whether `pipeline_id` is being walked.
    pub fn contains(&self, pipeline_id: &PipelineId) -> bool {
        self.walks.contains_key(pipeline_id)
    }

    /// Jobs awaited that were submitted before `before`.
    pub fn awaited_before(&self, before: Instant) -> Vec<JobId> {
        self.awaiting
            .iter()
            .filter(|(_, (p, j))| {
                self.walks
                    .get(p)
                    .and_then(|w| w.submitted.get(j))
                    .is_some_and(|(_, at)| *at < before)
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Starts (or resumes) walking a pipeline handed out by `get pipeline`.
    pub fn start(&mut self, assignment: PipelineAssignment, now: Instant) -> Vec<Action> {
        let pipeline_id = assignment.pipeline_id;
        let pipeline = match Pipeline::from_legacy(&assignment.pipeline) {
            Ok(p) => p,
            Err(e) => {
                return vec![Action::Fail {
                    pipeline_id,
                    job_id: JobId::from(""),
                    worker: String::new(),
                    error: format!("invalid pipeline: {e}"),
                    duration: Duration::ZERO,
                }]
            }
        };
        let mut walk = Walk {
            run: RunState::new(&pipeline),
            data: json_text(&pipeline.data()),
            pipeline,
            submitted: HashMap::new(),
            started: now,
            router_ends: false,
        };
        // Resume: jobs a previous pipeliner submitted keep their ids and states.
        for job in assignment.submitted_jobs {
            let Some(index) = walk.pipeline.find(&job.worker) else {
                continue;
            };
            match job.state {
                JobState::Finished => {
                    walk.submitted.insert(index, (job.job_id, now));
                    walk.run.finish(&walk.pipeline, index);
                }
                JobState::Queued | JobState::Running => {
                    walk.submitted.insert(index, (job.job_id.clone(), now));
                    self.awaiting
                        .insert(job.job_id, (pipeline_id.clone(), index));
                }
                JobState::Failed => {
                    let worker = job.worker.clone();
                    self.forget(&pipeline_id, &walk);
                    return vec![Action::Fail {
                        pipeline_id,
                        job_id: job.job_id,
                        worker,
                        error: "the job failed before this pipeliner took the pipeline".into(),
                        duration: Duration::ZERO,
                    }];
                }
                JobState::Unknown => {}
            }
        }
        let mut actions = Vec::new();
        if walk.run.is_complete() {
            actions.push(Action::Finish {
                pipeline_id,
                duration: Duration::ZERO,
            });
            return actions;
        }
        let ready: Vec<JobIndex> = walk
            .pipeline
            .jobs()
            .map(|(i, _)| i)
            .filter(|&i| {
                !walk.run.is_finished(i)
                    && !walk.submitted.contains_key(&i)
                    && walk.pipeline.parents(i).all(|p| walk.run.is_finished(p))
            })
            .collect();
        for job in ready {
            actions.push(submit(&pipeline_id, &walk, job, now));
        }
        self.walks.insert(pipeline_id, walk);
        actions
    }

    /// Records the id the router gave a submitted job, and whether the router will end the
    /// pipeline when that job finishes. Returns false when the pipeline is no longer walked
    /// (it failed meanwhile).
    pub fn submitted(
        &mut self,
        pipeline_id: &PipelineId,
        job: JobIndex,
        job_id: JobId,
        router_ends: bool,
        now: Instant,
    ) -> bool {
        let Some(walk) = self.walks.get_mut(pipeline_id) else {
            return false;
        };
        walk.router_ends |= router_ends;
        walk.submitted.insert(job, (job_id.clone(), now));
        self.awaiting.insert(job_id, (pipeline_id.clone(), job));
        true
    }

    /// A job finished: returns the jobs to submit now, and `Finish` once all are done — unless
    /// the router ended the pipeline itself with that job. Jobs not awaited (another
    /// pipeliner's, or finished already) are ignored.
    pub fn job_finished(&mut self, job_id: &JobId, now: Instant) -> Vec<Action> {
        let Some((pipeline_id, index)) = self.awaiting.remove(job_id) else {
            return Vec::new();
        };
        let Some(walk) = self.walks.get_mut(&pipeline_id) else {
            return Vec::new();
        };
        let ready = walk.run.finish(&walk.pipeline, index);
        let mut actions: Vec<Action> = ready
            .into_iter()
            .filter(|j| !walk.submitted.contains_key(j))
            .map(|j| submit(&pipeline_id, walk, j, now))
            .collect();
        if walk.run.is_complete() {
            let duration = now.duration_since(walk.started);
            let router_ends = walk.router_ends;
            self.walks.remove(&pipeline_id);
            if router_ends {
                info!(%pipeline_id, secs = duration.as_secs_f64(), "pipeline finished (ended by the router with its last job)");
            } else {
                actions.push(Action::Finish {
                    pipeline_id,
                    duration,
                });
            }
        }
        actions
    }

    /// A job failed for good: the pipeline fails, nothing more of it is submitted.
    pub fn job_failed(&mut self, job_id: &JobId, error: &str, now: Instant) -> Vec<Action> {
        let Some((pipeline_id, index)) = self.awaiting.remove(job_id) else {
            return Vec::new();
        };
        let Some(walk) = self.walks.remove(&pipeline_id) else {
            return Vec::new();
        };
        self.forget(&pipeline_id, &walk);
        vec![Action::Fail {
            worker: walk.pipeline.job(index).worker.clone(),
            pipeline_id,
            job_id: job_id.clone(),
            error: error.to_owned(),
            duration: now.duration_since(walk.started),
        }]
    }

    /// The router refused to queue a job of `pipeline_id` (its request is malformed or too
    /// large, which sending it again does not change): the pipeline fails with the router's
    /// error, instead of waiting for a job that is never queued.
    pub fn job_refused(
        &mut self,
        pipeline_id: &PipelineId,
        worker: &str,
        error: &str,
        now: Instant,
    ) -> Vec<Action> {
        let Some(walk) = self.walks.remove(pipeline_id) else {
            return Vec::new();
        };
        self.forget(pipeline_id, &walk);
        vec![Action::Fail {
            pipeline_id: pipeline_id.clone(),
            job_id: JobId::from(""),
            worker: worker.to_owned(),
            error: format!("the router refused job {worker}: {error}"),
            duration: now.duration_since(walk.started),
        }]
    }

    /// The router no longer knows a job we await: submit it again.
    pub fn job_lost(&mut self, job_id: &JobId) -> Vec<Action> {
        let Some((pipeline_id, index)) = self.awaiting.remove(job_id) else {
            return Vec::new();
        };
        let Some(walk) = self.walks.get_mut(&pipeline_id) else {
            return Vec::new();
        };
        walk.submitted.remove(&index);
        vec![submit(&pipeline_id, walk, index, Instant::now())]
    }

    /// Stops walking a pipeline the router no longer knows.
    pub fn drop_pipeline(&mut self, pipeline_id: &PipelineId) {
        if let Some(walk) = self.walks.remove(pipeline_id) {
            self.forget(pipeline_id, &walk);
        }
    }

    /// The pipeline of an awaited job.
    pub fn pipeline_of(&self, job_id: &JobId) -> Option<&PipelineId> {
        self.awaiting.get(job_id).map(|(p, _)| p)
    }

    fn forget(&mut self, pipeline_id: &PipelineId, walk: &Walk) {
        for (id, _) in walk.submitted.values() {
            if self.awaiting.get(id).is_some_and(|(p, _)| p == pipeline_id) {
                self.awaiting.remove(id);
            }
        }
    }
}

fn submit(pipeline_id: &PipelineId, walk: &Walk, job: JobIndex, now: Instant) -> Action {
    Action::Submit {
        pipeline_id: pipeline_id.clone(),
        job,
        worker: walk.pipeline.job(job).worker.clone(),
        data: match &walk.pipeline.job(job).data {
            Some(own) => json_text(own),
            None => walk.data.clone(),
        },
        pipeline_data: walk.pipeline.job(job).data.is_none(),
        ends_pipeline: walk
            .run
            .is_last(job)
            .then(|| now.saturating_duration_since(walk.started)),
    }
}

/// `value` as JSON text (its keys are strings: encoding cannot fail).
fn json_text(value: &impl serde::Serialize) -> Box<RawValue> {
    serde_json::value::to_raw_value(value)
        .unwrap_or_else(|_| unreachable!("data of a pipeline encodes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pypelinin_common::protocol::SubmittedJob;
    use serde_json::json;

    fn assignment(
        id: &str,
        pipeline: &Pipeline,
        submitted: Vec<SubmittedJob>,
    ) -> PipelineAssignment {
        PipelineAssignment {
            pipeline_id: id.into(),
            pipeline: pipeline.to_legacy(),
            submitted_jobs: submitted,
            fields: Default::default(),
        }
    }

    fn workers(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .map(|a| match a {
                Action::Submit { worker, .. } => worker.clone(),
                Action::Finish { .. } => "<finish>".into(),
                Action::Fail { .. } => "<fail>".into(),
            })
            .collect()
    }

    /// Submits what `actions` asks, giving each job the id `<worker>-id`, as a router that
    /// does not end pipelines itself.
    fn ack(walks: &mut Walks, actions: &[Action]) {
        ack_as(walks, actions, false)
    }

    /// [`ack`], the router agreeing to end the pipeline with a job flagged as its last when
    /// `router_ends`.
    fn ack_as(walks: &mut Walks, actions: &[Action], router_ends: bool) {
        for a in actions {
            if let Action::Submit {
                pipeline_id,
                job,
                worker,
                ends_pipeline,
                ..
            } = a
            {
                assert!(walks.submitted(
                    pipeline_id,
                    *job,
                    format!("{worker}-id").as_str().into(),
                    router_ends && ends_pipeline.is_some(),
                    Instant::now()
                ));
            }
        }
    }

    #[test]
    fn fan_out_then_fan_in_then_finish() {
        let p = Pipeline::builder()
            .edges("A", ["B", "C"])
            .edge("B", "D")
            .edge("C", "D")
            .data(json!({"doc": 1}))
            .build()
            .unwrap();
        let mut w = Walks::default();
        let now = Instant::now();
        let a = w.start(assignment("p", &p, vec![]), now);
        assert_eq!(workers(&a), ["A"]);
        assert!(matches!(&a[0], Action::Submit { data, .. } if data.get() == r#"{"doc":1}"#));
        ack(&mut w, &a);
        let a = w.job_finished(&"A-id".into(), now);
        assert_eq!(workers(&a), ["B", "C"]);
        ack(&mut w, &a);
        assert!(
            w.job_finished(&"B-id".into(), now).is_empty(),
            "D waits for C"
        );
        assert!(
            w.job_finished(&"B-id".into(), now).is_empty(),
            "a repeated event changes nothing"
        );
        let a = w.job_finished(&"C-id".into(), now);
        assert_eq!(workers(&a), ["D"]);
        assert!(
            matches!(
                &a[0],
                Action::Submit {
                    ends_pipeline: Some(_),
                    ..
                }
            ),
            "D is the last job: {a:?}"
        );
        ack(&mut w, &a);
        let a = w.job_finished(&"D-id".into(), now);
        assert_eq!(
            workers(&a),
            ["<finish>"],
            "the router did not take the pipeline's end: the pipeliner reports it"
        );
        assert!(w.is_empty());
        assert!(w.job_finished(&"unrelated".into(), now).is_empty());
    }

    #[test]
    fn the_last_job_asks_the_router_to_end_the_pipeline() {
        let p = Pipeline::builder().edge("A", "B").build().unwrap();
        let mut w = Walks::default();
        let t0 = Instant::now();
        let a = w.start(assignment("p", &p, vec![]), t0);
        assert!(
            matches!(
                &a[..],
                [Action::Submit {
                    ends_pipeline: None,
                    ..
                }]
            ),
            "A is not the last: {a:?}"
        );
        ack_as(&mut w, &a, true);
        let t1 = t0 + Duration::from_millis(7);
        let a = w.job_finished(&"A-id".into(), t1);
        assert!(
            matches!(&a[..], [Action::Submit { ends_pipeline: Some(d), .. }] if *d == Duration::from_millis(7)),
            "B is, after 7 ms of the pipeline: {a:?}"
        );
        ack_as(&mut w, &a, true);
        let a = w.job_finished(&"B-id".into(), t1);
        assert!(a.is_empty(), "the router ended it: {a:?}");
        assert!(w.is_empty(), "and the walk is over");

        let lone = Pipeline::builder().job("A").build().unwrap();
        let a = w.start(assignment("q", &lone, vec![]), t0);
        assert!(
            matches!(
                &a[..],
                [Action::Submit {
                    ends_pipeline: Some(_),
                    ..
                }]
            ),
            "a one-job pipeline's job is its last: {a:?}"
        );
    }

    #[test]
    fn a_failed_job_fails_the_pipeline_and_stops_it() {
        let p = Pipeline::builder()
            .edges("A", ["B", "C"])
            .edge("B", "D")
            .build()
            .unwrap();
        let mut w = Walks::default();
        let now = Instant::now();
        let a = w.start(assignment("p", &p, vec![]), now);
        ack(&mut w, &a);
        let a = w.job_finished(&"A-id".into(), now);
        ack(&mut w, &a);
        let a = w.job_failed(&"B-id".into(), "boom", now);
        assert!(
            matches!(&a[..], [Action::Fail { worker, error, job_id, .. }] if worker == "B" && error == "boom" && job_id.as_str() == "B-id")
        );
        assert!(w.is_empty());
        assert!(
            w.job_finished(&"C-id".into(), now).is_empty(),
            "nothing more of it runs"
        );
    }

    #[test]
    fn resuming_skips_finished_jobs_and_awaits_running_ones() {
        let p = Pipeline::builder()
            .edges("A", ["B", "C"])
            .edge("B", "D")
            .edge("C", "D")
            .build()
            .unwrap();
        let job = |w: &str, state| SubmittedJob {
            job_id: format!("{w}-id").as_str().into(),
            worker: w.into(),
            state,
        };
        let mut w = Walks::default();
        let now = Instant::now();
        let a = w.start(
            assignment(
                "p",
                &p,
                vec![job("A", JobState::Finished), job("B", JobState::Running)],
            ),
            now,
        );
        assert_eq!(
            workers(&a),
            ["C"],
            "A is done, B runs already: only C is submitted"
        );
        ack(&mut w, &a);
        assert!(w.job_finished(&"B-id".into(), now).is_empty());
        let a = w.job_finished(&"C-id".into(), now);
        assert_eq!(workers(&a), ["D"]);
    }

    #[test]
    fn lost_jobs_are_submitted_again_and_old_ones_are_found_for_resync() {
        let p = Pipeline::builder().job("A").build().unwrap();
        let mut w = Walks::default();
        let t0 = Instant::now();
        let a = w.start(assignment("p", &p, vec![]), t0);
        ack(&mut w, &a);
        assert_eq!(w.awaited_before(t0), vec![]);
        assert_eq!(
            w.awaited_before(t0 + Duration::from_secs(3)),
            vec![JobId::from("A-id")]
        );
        assert_eq!(workers(&w.job_lost(&"A-id".into())), ["A"]);
    }
}
