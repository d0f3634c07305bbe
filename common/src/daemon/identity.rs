//! How a broker or pipeliner tells the router who it is: a [`Peer`] with its monitoring
//! figures, sent on its `renew leases` every [`IDENTIFY_EVERY`]. The router lists them in
//! `cluster status` and shows a daemon not heard of for `peer_timeout_secs` as gone.

use std::time::Duration;

use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};

use crate::protocol::cluster::{Peer, PeerLoad};

/// How often a daemon identifies itself.
pub const IDENTIFY_EVERY: Duration = Duration::from_secs(2);

/// Samples the figures of [`PeerLoad`]; keep one alive, so CPU percentages have a previous
/// sample to compare with.
pub struct LoadSampler {
    system: System,
    pid: Option<Pid>,
}

impl Default for LoadSampler {
    fn default() -> Self {
        Self::new()
    }
}

impl LoadSampler {
    /// Takes a first sample.
    pub fn new() -> Self {
        let mut sampler = Self {
            system: System::new(),
            pid: sysinfo::get_current_pid().ok(),
        };
        sampler.refresh();
        sampler
    }

    fn refresh(&mut self) {
        self.system.refresh_cpu_usage();
        self.system.refresh_memory();
        if let Some(pid) = self.pid {
            self.system.refresh_processes_specifics(
                ProcessesToUpdate::Some(&[pid]),
                true,
                ProcessRefreshKind::nothing().with_cpu().with_memory(),
            );
        }
    }

    /// The figures now (CPU since the previous sample).
    pub fn sample(&mut self) -> PeerLoad {
        self.refresh();
        let process = self.pid.and_then(|pid| self.system.process(pid));
        PeerLoad {
            cpu_percent: process.map_or(0.0, sysinfo::Process::cpu_usage),
            resident_memory: process.map_or(0, sysinfo::Process::memory),
            host_cpu_percent: self.system.global_cpu_usage(),
            host_memory_used: self.system.used_memory(),
            host_memory_total: self.system.total_memory(),
        }
    }
}

/// A peer and the sampler of its load: what a daemon's machine keeps to identify itself.
pub struct Identity {
    peer: Peer,
    /// Made at the first [`Identity::now`] (a machine that never identifies itself, as in
    /// tests, samples nothing).
    sampler: Option<LoadSampler>,
}

impl Identity {
    /// `peer`, whose load is sampled at each [`Identity::now`].
    pub fn new(peer: Peer) -> Self {
        Self {
            peer,
            sampler: None,
        }
    }

    /// The peer as it stands: `running` of `slots`, offering `workers` (a broker), with its
    /// load sampled now.
    pub fn now(&mut self, running: usize, slots: usize, workers: Vec<String>) -> Peer {
        self.peer.running = running;
        self.peer.workers = workers;
        self.peer.slots = slots;
        self.peer.load = Some(self.sampler.get_or_insert_with(LoadSampler::new).sample());
        self.peer.clone()
    }

    /// The peer's id.
    pub fn id(&self) -> &str {
        &self.peer.id
    }
}
