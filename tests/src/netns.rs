//! Simulated hosts for the farm's multi-host tests: Linux network
//! namespaces joined by veth pairs to a bridge that lives in a namespace of
//! its own, so nothing is added to the machine's own network and no packet
//! can leave it. Addresses exist only on those veths; everything is torn
//! down when the [`Net`] is dropped.

use std::process::Command;

use crate::{require_root, require_tool, run};

pub struct Net {
    tag: String,
    /// `10.203.N`: the hosts' /24.
    prefix: String,
    hosts: Vec<String>,
}

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

impl Net {
    /// Namespaces named `<tag>-<host>` for each host, host `i` at
    /// `10.203.N.(i+1)`.
    pub fn new(hosts: &[&str]) -> Net {
        require_root("creates network namespaces");
        require_tool("ip");
        require_tool("tc");
        let pid = std::process::id();
        let tag = format!("ik{}", pid % 100_000);
        let net = Net {
            prefix: format!("10.203.{}", pid % 250),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            tag,
        };
        let hub = net.ns("hub");
        ip(&["netns", "add", &hub]);
        net.exec_ok("hub", &["ip", "link", "add", "br0", "type", "bridge"]);
        net.exec_ok("hub", &["ip", "link", "set", "br0", "up"]);
        for (i, h) in hosts.iter().enumerate() {
            let ns = net.ns(h);
            ip(&["netns", "add", &ns]);
            let (a, b) = (format!("{}h{i}", net.tag), format!("{}p{i}", net.tag));
            net.exec_ok(
                "hub",
                &["ip", "link", "add", &a, "type", "veth", "peer", "name", &b],
            );
            net.exec_ok("hub", &["ip", "link", "set", &b, "netns", &ns]);
            net.exec_ok("hub", &["ip", "link", "set", &a, "master", "br0", "up"]);
            net.exec_ok(h, &["ip", "link", "set", "lo", "up"]);
            net.exec_ok(h, &["ip", "link", "set", &b, "name", "eth0"]);
            net.exec_ok(
                h,
                &[
                    "ip",
                    "addr",
                    "add",
                    &format!("{}/24", net.addr(h)),
                    "dev",
                    "eth0",
                ],
            );
            net.exec_ok(h, &["ip", "link", "set", "eth0", "up"]);
        }
        net
    }

    pub fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.tag)
    }

    pub fn addr(&self, host: &str) -> String {
        let i = self
            .hosts
            .iter()
            .position(|h| h == host)
            .expect("a host of this net");
        format!("{}.{}", self.prefix, i + 1)
    }

    /// A command run inside `host`'s namespace.
    pub fn cmd(&self, host: &str, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(host)]).arg(program);
        c
    }

    fn exec_ok(&self, host: &str, args: &[&str]) {
        run(Command::new("ip")
            .args(["netns", "exec", &self.ns(host)])
            .args(args));
    }

    /// Caps `host`'s link at `rate` (e.g. `50mbit`) both ways.
    pub fn cap(&self, host: &str, rate: &str) {
        let i = self.hosts.iter().position(|h| h == host).unwrap();
        let tbf = [
            "root", "tbf", "rate", rate, "burst", "64kb", "latency", "200ms",
        ];
        let mut out = vec!["tc", "qdisc", "add", "dev", "eth0"];
        out.extend(tbf);
        self.exec_ok(host, &out);
        let dev = format!("{}h{i}", self.tag);
        let mut back = vec!["tc", "qdisc", "add", "dev", dev.as_str()];
        back.extend(tbf);
        self.exec_ok("hub", &back);
    }

    /// Drops `percent`% of the packets `host` receives, at random.
    pub fn lose(&self, host: &str, percent: u32) {
        require_tool("nft");
        let pct = percent.to_string();
        self.exec_ok(host, &["nft", "add", "table", "inet", "iukloss"]);
        self.exec_ok(
            host,
            &[
                "nft",
                "add",
                "chain",
                "inet",
                "iukloss",
                "input",
                "{ type filter hook input priority 0; }",
            ],
        );
        self.exec_ok(
            host,
            &[
                "nft", "add", "rule", "inet", "iukloss", "input", "numgen", "random", "mod", "100",
                "<", &pct, "drop",
            ],
        );
    }

    /// Cuts (`false`) or restores `host`'s link.
    pub fn link(&self, host: &str, up: bool) {
        let i = self.hosts.iter().position(|h| h == host).unwrap();
        let dev = format!("{}h{i}", self.tag);
        self.exec_ok(
            "hub",
            &["ip", "link", "set", &dev, if up { "up" } else { "down" }],
        );
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of each veth, and the peer.
        for h in self.hosts.iter().chain(std::iter::once(&"hub".to_string())) {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(h)])
                .status();
        }
    }
}
