//! `list pipelines`: the pipelines the router knows, newest first, for the dashboard and the
//! tool. Pending ones come from the pipeline table (running first, then the queue from its
//! newest end), ended ones from the outcomes, newest first; a listing stops at its limit, so
//! the common case (a page of the newest) costs the page, not the table.

use pypelinin_common::protocol::cluster::{ListedPipeline, PipelineList};
use pypelinin_common::protocol::request::ListPipelines;
use pypelinin_common::protocol::{PipelineState, PipelineStatus};

use pypelinin_common::ids::PipelineId;

use super::records::PipelineRecord;
use super::State;

impl State {
    /// The pipelines `list` asks for, at `now`.
    pub(super) fn list_pipelines(&self, list: &ListPipelines, now: u64) -> PipelineList {
        let limit = list.limit.min(ListPipelines::MAX);
        let wants = |state: PipelineState| list.state.is_none_or(|s| s == state);
        let prefix = list.id_prefix.as_deref().unwrap_or("");
        let mut pipelines = Vec::new();
        let mut more = false;
        let mut push = |listed: ListedPipeline| {
            if pipelines.len() < limit {
                pipelines.push(listed);
                true
            } else {
                more = true;
                false
            }
        };
        // A pending pipeline of `state` whose id starts with the prefix, as listed.
        let pending = |id: &PipelineId, record: &PipelineRecord, state| {
            (record.state == state && id.as_str().starts_with(prefix)).then(|| ListedPipeline {
                pipeline_id: id.clone(),
                status: PipelineStatus::of(state),
                jobs: Some(record.jobs.len()),
                ended_secs_ago: None,
            })
        };
        'listing: {
            if wants(PipelineState::Running) {
                // Running pipelines are those with a lease: newest (highest seq) first.
                let mut running: Vec<(u64, ListedPipeline)> = self
                    .pipelines
                    .iter()
                    .filter_map(|(id, r)| Some((r.seq, pending(id, r, PipelineState::Running)?)))
                    .collect();
                running.sort_unstable_by_key(|r| std::cmp::Reverse(r.0));
                for (_, listed) in running {
                    if !push(listed) {
                        break 'listing;
                    }
                }
            }
            if wants(PipelineState::Queued) {
                for id in self.pipeline_queue.values().rev() {
                    let listed = self
                        .pipelines
                        .get(id)
                        .and_then(|r| pending(id, r, PipelineState::Queued));
                    if let Some(listed) = listed {
                        if !push(listed) {
                            break 'listing;
                        }
                    }
                }
            }
            for (at, id) in self.ended_order.iter().rev() {
                let Some(record) = self.ended.get(id) else {
                    continue;
                };
                if record.at != *at
                    || !wants(record.status.state)
                    || !id.as_str().starts_with(prefix)
                {
                    continue;
                }
                let listed = ListedPipeline {
                    pipeline_id: id.clone(),
                    status: record.status.clone(),
                    jobs: None,
                    ended_secs_ago: Some(now.saturating_sub(record.at) as f64 / 1000.0),
                };
                if !push(listed) {
                    break 'listing;
                }
            }
        }
        PipelineList { pipelines, more }
    }
}
