//! The broker's monitoring record: host, process and running jobs (the legacy layout).

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use sysinfo::{Pid, ProcessesToUpdate, System};

/// Collects monitoring figures; keep one alive so CPU percentages have a previous sample.
pub struct Monitor {
    system: System,
    pid: Option<Pid>,
}

impl Default for Monitor {
    fn default() -> Self {
        Self::new()
    }
}

impl Monitor {
    /// Takes a first sample.
    pub fn new() -> Self {
        let mut system = System::new();
        system.refresh_cpu_usage();
        system.refresh_memory();
        let pid = sysinfo::get_current_pid().ok();
        if let Some(pid) = pid {
            system.refresh_processes(ProcessesToUpdate::Some(&[pid]), true);
        }
        Self { system, pid }
    }

    /// A record: `{"host": ..., "timestamp": ..., "processes": [broker entry]}` where the
    /// broker entry lists `running` jobs (`[{"worker": ..., "job id": ..., "data": ...}]`).
    pub fn record(&mut self, concurrency: usize, running: Vec<Value>) -> Value {
        self.system.refresh_cpu_usage();
        self.system.refresh_memory();
        let load = System::load_average();
        let host = json!({
            "cpu": {
                "number of cpus": self.system.cpus().len(),
                "cpu percent": self.system.global_cpu_usage(),
            },
            "memory": {
                "total": self.system.total_memory(),
                "used": self.system.used_memory(),
                "available": self.system.available_memory(),
            },
            "swap": {
                "total": self.system.total_swap(),
                "used": self.system.used_swap(),
            },
            "load average": [load.one, load.five, load.fifteen],
            "uptime": System::uptime(),
        });
        let mut broker = json!({
            "type": "broker",
            "number of workers": concurrency,
            "active workers": running.len(),
            "running": running,
        });
        if let Some(pid) = self.pid {
            self.system
                .refresh_processes(ProcessesToUpdate::Some(&[pid]), true);
            if let Some(p) = self.system.process(pid) {
                broker["pid"] = json!(pid.as_u32());
                broker["cpu percent"] = json!(p.cpu_usage());
                broker["resident memory"] = json!(p.memory());
                broker["virtual memory"] = json!(p.virtual_memory());
                broker["started at"] = json!(p.start_time());
            }
        }
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        json!({"host": host, "timestamp": timestamp, "processes": [broker]})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_host_process_and_running_jobs() {
        let mut m = Monitor::new();
        let r = m.record(4, vec![json!({"worker": "A", "job id": "j"})]);
        assert!(r["host"]["cpu"]["number of cpus"].as_u64().unwrap() >= 1);
        assert!(r["host"]["memory"]["total"].as_u64().unwrap() > 0);
        let broker = &r["processes"][0];
        assert_eq!(broker["type"], "broker");
        assert_eq!(broker["active workers"], 1);
        assert_eq!(broker["pid"], std::process::id());
        assert!(broker["resident memory"].as_u64().unwrap() > 0);
    }
}
