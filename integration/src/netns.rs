//! A test host in a network namespace, joined to this one by a veth link
//! that a test can cut so that packets vanish (no reset, no ICMP), the way
//! a dropped Wi-Fi or a dead router looks to a gateway.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, bail};

static NEXT: AtomicU32 = AtomicU32::new(0);

pub struct NetNs {
    pub name: String,
    host_if: String,
    peer_if: String,
    /// This side's address.
    pub host_addr: String,
    /// The namespace's address.
    pub addr: String,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl NetNs {
    /// Whether namespaces can be made here (root and iproute2).
    pub fn available() -> bool {
        Command::new("ip")
            .args(["netns", "list"])
            .output()
            .is_ok_and(|o| o.status.success())
            && std::fs::metadata("/var/run").is_ok()
            && Command::new("id")
                .arg("-u")
                .output()
                .is_ok_and(|o| o.stdout.starts_with(b"0"))
    }

    pub fn create() -> anyhow::Result<Self> {
        // Unique per process and per namespace, and short (interface names
        // are at most 15 bytes).
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{:x}{n}", std::process::id() % 0xfffff);
        let octet = (std::process::id() as usize * 7 + n as usize) % 250 + 1;
        let ns = Self {
            name: format!("imz-{tag}"),
            host_if: format!("imzh{tag}"),
            peer_if: format!("imzp{tag}"),
            host_addr: format!("10.77.{octet}.1"),
            addr: format!("10.77.{octet}.2"),
        };
        ip(&["netns", "add", &ns.name])?;
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns.peer_if,
        ])?;
        ip(&["link", "set", &ns.peer_if, "netns", &ns.name])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", ns.host_addr),
            "dev",
            &ns.host_if,
        ])?;
        ip(&["link", "set", &ns.host_if, "up"])?;
        ns.exec_ip(&[
            "addr",
            "add",
            &format!("{}/24", ns.addr),
            "dev",
            &ns.peer_if,
        ])?;
        ns.exec_ip(&["link", "set", &ns.peer_if, "up"])?;
        ns.exec_ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn exec_ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut full = vec!["netns", "exec", &self.name, "ip"];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// The command prefix that runs a program inside the namespace.
    pub fn prefix(&self) -> Vec<String> {
        vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            self.name.clone(),
        ]
    }

    /// Cuts the link: packets in both directions vanish.
    pub fn cut(&self) -> anyhow::Result<()> {
        self.exec_ip(&["link", "set", &self.peer_if, "down"])
    }

    /// Restores the link.
    pub fn heal(&self) -> anyhow::Result<()> {
        self.exec_ip(&["link", "set", &self.peer_if, "up"])
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.host_if]);
    }
}
