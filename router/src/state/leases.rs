//! Ids with a deadline each, in deadline order: the leases of jobs and pipelines handed out, and
//! the back-offs of jobs waiting to be retried.

use std::collections::BTreeSet;

/// Ids with a deadline each (ms since the epoch), the soonest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leases<Id: Ord> {
    set: BTreeSet<(u64, Id)>,
}

impl<Id: Ord + Clone> Default for Leases<Id> {
    fn default() -> Self {
        Self {
            set: BTreeSet::new(),
        }
    }
}

impl<Id: Ord + Clone> Leases<Id> {
    /// Adds `id` until `until`.
    pub fn insert(&mut self, until: u64, id: Id) {
        self.set.insert((until, id));
    }

    /// Removes `id`'s entry until `until`; false when there was none.
    pub fn remove(&mut self, until: u64, id: &Id) -> bool {
        self.set.remove(&(until, id.clone()))
    }

    /// Whether `id` is held until `until`.
    pub fn contains(&self, until: u64, id: &Id) -> bool {
        self.set.contains(&(until, id.clone()))
    }

    /// Takes out the entry with the soonest deadline if it is at or before `now`.
    pub fn pop_due(&mut self, now: u64) -> Option<(u64, Id)> {
        match self.set.first() {
            Some((t, _)) if *t <= now => self.set.pop_first(),
            _ => None,
        }
    }

    /// How many ids are held.
    pub fn len(&self) -> usize {
        self.set.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_entries_come_out_soonest_first_and_only_when_due() {
        let mut l = Leases::default();
        l.insert(30, "c");
        l.insert(10, "a");
        l.insert(20, "b");
        assert_eq!(l.pop_due(5), None);
        assert_eq!(l.pop_due(20), Some((10, "a")));
        assert_eq!(l.pop_due(20), Some((20, "b")));
        assert_eq!(l.pop_due(20), None);
        assert!(l.contains(30, &"c") && !l.contains(31, &"c"));
        assert!(l.remove(30, &"c") && !l.remove(30, &"c"));
        assert!(l.is_empty());
    }
}
