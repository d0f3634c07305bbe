//! Broadcasts on the router's PUB socket: one plain UTF-8 string per event.

use std::fmt;
use std::str::FromStr;

use super::duration::WireDuration;
use crate::ids::{JobId, PipelineId};

/// A broadcast event, printed exactly as the legacy router printed it.
///
/// ```
/// use pypelinin_common::protocol::{Event, WireDuration};
/// let ev = Event::job_finished("ab12".into(), &WireDuration::from_secs(1.5));
/// assert_eq!(ev.to_string(), "job finished: ab12 duration: 1.5");
/// assert_eq!("job finished: ab12 duration: 1.5".parse::<Event>().unwrap(), ev);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// `new job`: a job was queued.
    NewJob,
    /// `new pipeline`: a pipeline was queued.
    NewPipeline,
    /// `job finished: <id> duration: <d>`.
    JobFinished {
        /// The job.
        job_id: JobId,
        /// The duration as printed (parse it with [`Event::duration_secs`]).
        duration: String,
    },
    /// `pipeline finished: id=<id>, duration=<d>`.
    PipelineFinished {
        /// The pipeline.
        pipeline_id: PipelineId,
        /// The duration as printed.
        duration: String,
    },
    /// Extension, `pipeline failed: id=<id>, job=<job id>, worker=<worker>, error=<text>`
    /// (the text cut as for `job failed`).
    PipelineFailed {
        /// The pipeline.
        pipeline_id: PipelineId,
        /// The job that failed.
        job_id: JobId,
        /// Its worker.
        worker: String,
        /// What went wrong.
        error: String,
    },
    /// Extension, `job failed: <id> error: <text>`: a job failed (the text is cut to
    /// [`Event::MAX_ERROR_BYTES`] and kept on one line; ask the router for the whole of it).
    JobFailed {
        /// The job.
        job_id: JobId,
        /// What went wrong.
        error: String,
    },
    /// Extension, `pipeline cancelled: id=<id>`: a pipeline was cancelled; brokers stop its
    /// running jobs.
    PipelineCancelled {
        /// The pipeline.
        pipeline_id: PipelineId,
    },
    /// Extension, `probe: <token>`: the answer to a `probe` request.
    Probe {
        /// The token the request carried.
        token: String,
    },
}

impl Event {
    /// Prefix of `new job`.
    pub const NEW_JOB: &'static str = "new job";
    /// Prefix of `new pipeline`.
    pub const NEW_PIPELINE: &'static str = "new pipeline";
    /// Prefix of every `job finished` event.
    pub const JOB_FINISHED: &'static str = "job finished: ";
    /// Prefix of every `pipeline finished` event.
    pub const PIPELINE_FINISHED: &'static str = "pipeline finished: ";
    /// Prefix of every `pipeline failed` event.
    pub const PIPELINE_FAILED: &'static str = "pipeline failed: ";
    /// Prefix of every `pipeline cancelled` event.
    pub const PIPELINE_CANCELLED: &'static str = "pipeline cancelled: ";
    /// Prefix of every `job failed` event.
    pub const JOB_FAILED: &'static str = "job failed: ";
    /// The longest error text a `job failed` event carries, in bytes.
    pub const MAX_ERROR_BYTES: usize = 512;
    /// Prefix of every `probe` event.
    pub const PROBE: &'static str = "probe: ";

    /// `job finished` for `job_id`.
    pub fn job_finished(job_id: JobId, duration: &WireDuration) -> Self {
        Event::JobFinished {
            job_id,
            duration: duration.to_string(),
        }
    }

    /// `job failed` for `job_id`, with `error` cut to one line of at most
    /// [`Event::MAX_ERROR_BYTES`].
    pub fn job_failed(job_id: JobId, error: &str) -> Self {
        Event::JobFailed {
            job_id,
            error: one_line(error),
        }
    }

    /// `pipeline failed` for `pipeline_id`, with `error` cut as for [`Event::job_failed`].
    pub fn pipeline_failed(
        pipeline_id: PipelineId,
        job_id: JobId,
        worker: &str,
        error: &str,
    ) -> Self {
        Event::PipelineFailed {
            pipeline_id,
            job_id,
            worker: worker.replace([',', '\n', '\r'], " "),
            error: one_line(error),
        }
    }

    /// The subscription prefix that matches only `pipeline failed` of `pipeline_id`.
    pub fn pipeline_failed_topic(pipeline_id: &PipelineId) -> String {
        format!("{}id={pipeline_id},", Self::PIPELINE_FAILED)
    }

    /// `pipeline finished` for `pipeline_id`.
    pub fn pipeline_finished(pipeline_id: PipelineId, duration: &WireDuration) -> Self {
        Event::PipelineFinished {
            pipeline_id,
            duration: duration.to_string(),
        }
    }

    /// The subscription prefix that matches only `job finished` of `job_id` (the legacy
    /// pipeliner's subscription).
    pub fn job_finished_topic(job_id: &JobId) -> String {
        format!("{}{job_id} ", Self::JOB_FINISHED)
    }

    /// The subscription prefix that matches only `pipeline finished` of `pipeline_id` (the
    /// legacy client's subscription).
    pub fn pipeline_finished_topic(pipeline_id: &PipelineId) -> String {
        format!("{}id={pipeline_id},", Self::PIPELINE_FINISHED)
    }

    /// The duration of a finished event in seconds, read as Python's `float()` would.
    pub fn duration_secs(&self) -> Option<f64> {
        match self {
            Event::JobFinished { duration, .. } | Event::PipelineFinished { duration, .. } => {
                duration.parse().ok()
            }
            _ => None,
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::NewJob => f.write_str(Self::NEW_JOB),
            Event::NewPipeline => f.write_str(Self::NEW_PIPELINE),
            Event::JobFinished { job_id, duration } => {
                write!(f, "{}{job_id} duration: {duration}", Self::JOB_FINISHED)
            }
            Event::PipelineFinished {
                pipeline_id,
                duration,
            } => write!(
                f,
                "{}id={pipeline_id}, duration={duration}",
                Self::PIPELINE_FINISHED
            ),
            Event::PipelineFailed {
                pipeline_id,
                job_id,
                worker,
                error,
            } => write!(
                f,
                "{}id={pipeline_id}, job={job_id}, worker={worker}, error={error}",
                Self::PIPELINE_FAILED
            ),
            Event::JobFailed { job_id, error } => {
                write!(f, "{}{job_id} error: {error}", Self::JOB_FAILED)
            }
            Event::PipelineCancelled { pipeline_id } => {
                write!(f, "{}id={pipeline_id}", Self::PIPELINE_CANCELLED)
            }
            Event::Probe { token } => write!(f, "{}{token}", Self::PROBE),
        }
    }
}

/// `text` on one line, cut to [`Event::MAX_ERROR_BYTES`] on a character boundary.
fn one_line(text: &str) -> String {
    let mut line: String = text.replace(['\n', '\r'], " ");
    if line.len() > Event::MAX_ERROR_BYTES {
        let mut cut = Event::MAX_ERROR_BYTES - 3;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
        line.push_str("...");
    }
    line
}

/// A broadcast string that is no known event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a pypelinin event: {0:?}")]
pub struct EventParseError(pub String);

impl FromStr for Event {
    type Err = EventParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || EventParseError(s.to_owned());
        if s == Self::NEW_JOB {
            return Ok(Event::NewJob);
        }
        if s == Self::NEW_PIPELINE {
            return Ok(Event::NewPipeline);
        }
        if let Some(rest) = s.strip_prefix(Self::JOB_FINISHED) {
            let (id, duration) = rest.split_once(" duration: ").ok_or_else(bad)?;
            return Ok(Event::JobFinished {
                job_id: id.into(),
                duration: duration.to_owned(),
            });
        }
        if let Some(rest) = s.strip_prefix(Self::PIPELINE_FINISHED) {
            let rest = rest.strip_prefix("id=").ok_or_else(bad)?;
            let (id, duration) = rest.split_once(", duration=").ok_or_else(bad)?;
            return Ok(Event::PipelineFinished {
                pipeline_id: id.into(),
                duration: duration.to_owned(),
            });
        }
        if let Some(rest) = s.strip_prefix(Self::PIPELINE_FAILED) {
            let rest = rest.strip_prefix("id=").ok_or_else(bad)?;
            let (id, rest) = rest.split_once(", job=").ok_or_else(bad)?;
            let (job, rest) = rest.split_once(", worker=").ok_or_else(bad)?;
            let (worker, error) = rest.split_once(", error=").ok_or_else(bad)?;
            return Ok(Event::PipelineFailed {
                pipeline_id: id.into(),
                job_id: job.into(),
                worker: worker.to_owned(),
                error: error.to_owned(),
            });
        }
        if let Some(rest) = s.strip_prefix(Self::JOB_FAILED) {
            let (id, error) = rest.split_once(" error: ").ok_or_else(bad)?;
            return Ok(Event::JobFailed {
                job_id: id.into(),
                error: error.to_owned(),
            });
        }
        if let Some(rest) = s.strip_prefix(Self::PIPELINE_CANCELLED) {
            let id = rest.strip_prefix("id=").ok_or_else(bad)?;
            return Ok(Event::PipelineCancelled {
                pipeline_id: id.into(),
            });
        }
        if let Some(token) = s.strip_prefix(Self::PROBE) {
            return Ok(Event::Probe {
                token: token.to_owned(),
            });
        }
        Err(bad())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_strings_are_exact_and_parse_back() {
        let cases = [
            (Event::NewJob, "new job"),
            (Event::NewPipeline, "new pipeline"),
            (
                Event::job_finished(
                    "8e97badfa6d64d0faf032d25a6b0a127".into(),
                    &serde_json::from_str("3").unwrap(),
                ),
                "job finished: 8e97badfa6d64d0faf032d25a6b0a127 duration: 3",
            ),
            (
                Event::pipeline_finished("85d7".into(), &WireDuration::from_secs(2.0)),
                "pipeline finished: id=85d7, duration=2.0",
            ),
            (
                Event::Probe {
                    token: "t-1".into(),
                },
                "probe: t-1",
            ),
            (
                Event::job_failed("j".into(), "bad\nthing"),
                "job failed: j error: bad thing",
            ),
            (
                Event::pipeline_failed("p".into(), "j".into(), "W", "it, broke"),
                "pipeline failed: id=p, job=j, worker=W, error=it, broke",
            ),
            (
                Event::PipelineCancelled {
                    pipeline_id: "85d7".into(),
                },
                "pipeline cancelled: id=85d7",
            ),
        ];
        for (event, text) in cases {
            assert_eq!(event.to_string(), text);
            assert_eq!(text.parse::<Event>().unwrap(), event);
        }
    }

    #[test]
    fn topics_match_their_own_event_only() {
        let ev = Event::pipeline_finished("abc".into(), &WireDuration::from_secs(1.0)).to_string();
        assert!(ev.starts_with(&Event::pipeline_finished_topic(&"abc".into())));
        assert!(!ev.starts_with(&Event::pipeline_finished_topic(&"ab".into())));
        let ev = Event::job_finished("abc".into(), &WireDuration::from_secs(1.0)).to_string();
        assert!(ev.starts_with(&Event::job_finished_topic(&"abc".into())));
        assert!(!ev.starts_with(&Event::job_finished_topic(&"ab".into())));
    }

    #[test]
    fn job_failed_errors_are_cut_on_a_char_boundary() {
        let Event::JobFailed { error, .. } = Event::job_failed("j".into(), &"é".repeat(1000))
        else {
            panic!()
        };
        assert!(error.len() <= Event::MAX_ERROR_BYTES && error.ends_with("..."));
    }

    #[test]
    fn legacy_readers_parse_durations() {
        let ev: Event = "pipeline finished: id=x, duration=0.25".parse().unwrap();
        assert_eq!(ev.duration_secs(), Some(0.25));
        assert!("job finished: x".parse::<Event>().is_err());
        assert!("nonsense".parse::<Event>().is_err());
    }
}
