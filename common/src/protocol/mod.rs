//! The router's wire protocol: requests, replies and broadcast events.
//!
//! Every process speaks it through these types; none matches on raw JSON. Requests and replies
//! are single-frame UTF-8 JSON objects, in the spelling of the legacy Python pypelinin 0.1.1
//! (`{"command": "add job", ...}`, `{"answer": "job accepted", "job id": ...}`). Broadcasts are
//! plain strings with a fixed prefix each, so subscribers can filter by prefix
//! (`job finished: <id> duration: <d>`).
//!
//! Extensions of the legacy protocol are new commands or optional fields that legacy clients
//! never send and never see unless they ask for them; every legacy answer is unchanged.
//! `docs/protocol.md` lists them all with examples.
//!
//! Layout:
//! - [`request`]: [`Request`] and [`decode_request`], which keeps the legacy error classes
//!   (`undefined command`, `unknown command`, `syntax error`) apart from malformed input.
//! - [`reply`]: [`Reply`] and the typed answers, encoding for the router, decoding for clients.
//! - [`event`]: [`Event`], the broadcasts, with `Display`/`FromStr` for their exact text.
//! - [`cluster`]: what the router knows of the cluster as a whole (`cluster status`, the
//!   daemons that identify themselves, a pipeline's jobs).
//! - [`duration`]: [`WireDuration`], durations printed as the Python 2 router printed them.
//! - [`raw`]: [`RawFields`], the keys the router keeps and hands back as the JSON text they
//!   came as (`data` and any other keys of `add job` and `add pipeline`).

pub mod cluster;
pub mod duration;
pub mod event;
pub mod raw;
pub mod reply;
pub mod request;

pub use duration::WireDuration;
pub use event::{Event, EventParseError};
pub use raw::RawFields;
pub use reply::{
    Answer, AnswerKind, JobAssignment, JobHandout, JobState, PipelineAssignment, PipelineHandout,
    PipelineState, PipelineStatus, Reply, ReplyError, SubmittedJob,
};
pub use request::{
    decode_request, decode_request_with_token, Batch, Limits, Request, RequestError, RequestFrame,
};
