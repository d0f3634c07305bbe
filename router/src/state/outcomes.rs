//! Outcomes of ended pipelines, remembered for the retention time (and at most
//! `max_remembered`), so a client that asks late still gets the answer, and the request ids
//! of their `add pipeline`, so a retried request gets the same pipeline.

use pypelinin_common::ids::PipelineId;
use pypelinin_common::protocol::PipelineStatus;

use super::records::EndedRecord;
use super::State;

impl State {
    /// Remembers how pipeline `id` ended.
    pub(super) fn remember(
        &mut self,
        id: PipelineId,
        status: PipelineStatus,
        now: u64,
        request_id: Option<String>,
    ) {
        self.ended.insert(
            id.clone(),
            EndedRecord {
                status,
                at: now,
                request_id,
            },
        );
        self.ended_order.push_back((now, id.clone()));
        self.changes.ended.insert(id);
    }

    /// Forgets the outcomes older than the retention time, and the oldest past
    /// `max_remembered`.
    pub(super) fn forget_old_outcomes(&mut self, now: u64) {
        while let Some((at, _)) = self.ended_order.front() {
            if now.saturating_sub(*at) < self.policy.retention_ms
                && self.ended_order.len() <= self.policy.max_remembered
            {
                break;
            }
            if let Some((_, id)) = self.ended_order.pop_front() {
                if let Some(record) = self.ended.remove(&id) {
                    if let Some(r) = record.request_id {
                        self.request_ids.remove(&r);
                    }
                }
                self.changes.ended.insert(id);
            }
        }
    }
}
