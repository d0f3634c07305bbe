//! Hosts on one machine: Linux network namespaces joined by a bridge, for `netbench`.
//!
//! [`Network::create`] makes a namespace per host and one for the switch: a bridge, and a
//! veth pair from each host's `eth0` to a port of the bridge. Host `i` (in the order given) has
//! address `10.77.0.<i + 1>/24`. Everything lives in namespaces of its own, named after this
//! process's id, so it touches neither the machine's own network nor a run beside it, and is
//! deleted on drop. Needs root and `ip` (iproute2).

use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};

/// A host: a network namespace with `lo` and `eth0`, plugged into the switch.
#[derive(Debug, Clone)]
pub struct Host {
    /// Its role ("router", "broker-1", ...).
    pub role: String,
    /// Its network namespace.
    pub namespace: String,
    /// Its address on the bridge.
    pub address: Ipv4Addr,
    /// Its port: the switch's end of its veth pair.
    port: String,
}

/// Hosts joined by a bridge, each in a network namespace of its own.
#[derive(Debug)]
pub struct Network {
    switch: String,
    hosts: Vec<Host>,
}

/// Runs `ip` with `args`; its error output when it fails.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run `ip` (iproute2)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Network {
    /// Creates a host for each of `roles`, joined by a bridge.
    ///
    /// # Errors
    /// When not run as root, or `ip` fails (the message says which command).
    pub fn create(roles: &[&str]) -> anyhow::Result<Self> {
        if !nix::unistd::geteuid().is_root() {
            bail!("building network namespaces needs root (run it as root or with sudo)");
        }
        let prefix = format!("ppl{}", std::process::id());
        let switch = format!("{prefix}-switch");
        ip(&["netns", "add", &switch])?;
        // From here on, drop deletes what was made.
        let mut network = Self {
            switch,
            hosts: Vec::new(),
        };
        let sw = network.switch.clone();
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        for (i, role) in roles.iter().enumerate() {
            let octet = u8::try_from(i + 1)
                .ok()
                .filter(|o| *o < 255)
                .context("too many hosts")?;
            let host = Host {
                role: (*role).to_owned(),
                namespace: format!("{prefix}-{role}"),
                address: Ipv4Addr::new(10, 77, 0, octet),
                port: format!("port{i}"),
            };
            ip(&["netns", "add", &host.namespace])?;
            network.hosts.push(host.clone());
            let ns = host.namespace.as_str();
            ip(&[
                "-n", &sw, "link", "add", &host.port, "type", "veth", "peer", "name", "eth0",
                "netns", ns,
            ])?;
            ip(&["-n", &sw, "link", "set", &host.port, "master", "br0", "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            let cidr = format!("{}/24", host.address);
            ip(&["-n", ns, "addr", "add", &cidr, "dev", "eth0"])?;
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        }
        Ok(network)
    }

    /// The host of `role`.
    ///
    /// # Panics
    /// When no host has that role (a bug of the caller).
    pub fn host(&self, role: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.role == role)
            .unwrap_or_else(|| panic!("no host {role:?}"))
    }

    /// The program and arguments that run `exe args…` on host `role` (through `ip netns
    /// exec`, which replaces itself with `exe`: the process id is the program's), with `env`
    /// set.
    pub fn command(
        &self,
        role: &str,
        env: &[(&str, String)],
        exe: &Path,
        args: &[String],
    ) -> (std::path::PathBuf, Vec<String>) {
        let mut all = vec![
            "netns".to_owned(),
            "exec".to_owned(),
            self.host(role).namespace.clone(),
        ];
        if !env.is_empty() {
            all.push("env".to_owned());
            all.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
        }
        all.push(exe.display().to_string());
        all.extend(args.iter().cloned());
        ("ip".into(), all)
    }

    /// Sets the link between host `role` and the switch down (a partition: nothing crosses
    /// it either way) or up again.
    ///
    /// # Errors
    /// When `ip` fails.
    pub fn set_link(&self, role: &str, up: bool) -> anyhow::Result<()> {
        let port = self.host(role).port.clone();
        ip(&[
            "-n",
            &self.switch,
            "link",
            "set",
            &port,
            if up { "up" } else { "down" },
        ])
    }

    /// Moves the calling thread into host `role`'s namespace; threads it starts afterwards
    /// are there too. Call it before starting any runtime.
    ///
    /// # Errors
    /// When the namespace cannot be opened or entered.
    pub fn enter(&self, role: &str) -> anyhow::Result<()> {
        let path = format!("/run/netns/{}", self.host(role).namespace);
        let file = std::fs::File::open(&path).with_context(|| format!("cannot open {path}"))?;
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("cannot enter {path}"))?;
        Ok(())
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of each veth pair, and so the pair.
        for host in &self.hosts {
            let _ = ip(&["netns", "del", &host.namespace]);
        }
        let _ = ip(&["netns", "del", &self.switch]);
    }
}
