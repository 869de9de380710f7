//! The farm over a network: a coordinator and three workers on four
//! simulated hosts (network namespaces joined by a bridge), talking mutual
//! TLS with certificates of a release CA, first on a plain network, then
//! with capped bandwidth (8 Mbit/s: the ISOs two workers stream take
//! seconds), 1% random packet loss on every host and a worker cut off
//! mid-job for longer than its lease.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use iukfarm_tests::farm::{Proc, SDE, archive, gpg, iuks_in, local_builds};
use iukfarm_tests::netns::Net;
use iukfarm_tests::{iukfarm, run};

const LONG: Duration = Duration::from_secs(600);
const LEASE: &str = "5s";

fn ca(dir: &Path, coordinator_addr: &str) {
    run(Command::new(iukfarm())
        .args(["ca", "init", "--dir"])
        .arg(dir));
    run(Command::new(iukfarm())
        .args(["ca", "issue", "--role", "coordinator", "coordinator"])
        .args(["--host", coordinator_addr, "--dir"])
        .arg(dir));
    for (n, role) in [
        ("w1", "worker"),
        ("w2", "worker"),
        ("w3", "worker"),
        ("rm", "rm"),
    ] {
        run(Command::new(iukfarm())
            .args(["ca", "issue", "--role", role, n, "--dir"])
            .arg(dir));
    }
}

/// One release over `net`; returns its wall time.
fn release(net: &Net, ca_dir: &Path, out: &Path, cache: &Path, cut_w1: bool) -> Duration {
    let a = archive();
    let p = |f: &str| ca_dir.join(f).to_str().unwrap().to_string();
    let key = gpg().secret_key.to_str().unwrap().to_string();
    let listen = format!("{}:7447", net.addr("c"));
    let t = Instant::now();
    let mut c = Proc::spawn(
        "coordinator",
        net.cmd("c", &iukfarm())
            .arg("coordinator")
            .args(["--new-version", a.new_version()])
            .args(["--source-versions", &a.sources().join(" ")])
            .args(["--source-date-epoch", SDE, "--lease-timeout", LEASE])
            .args(["--max-attempts", "10", "--signing-key", &key])
            .arg("--iso-root")
            .arg(a.root())
            .arg("--output-dir")
            .arg(out)
            .args(["--listen", &listen])
            .args(["--tls-cert", &p("issued/coordinator.pem")])
            .args(["--tls-key", &p("issued/coordinator.key")])
            .args(["--tls-client-ca", &p("ca.pem")]),
    );
    c.wait_log("listening on", LONG);
    let url = format!("https://{listen}");
    let worker = |w: &str, archive_copy: bool| {
        let mut cmd = net.cmd(w, &iukfarm());
        // Each job holds its lease a while: every worker, w1 included, is
        // busy when the link is cut, whatever the scheduling.
        cmd.args(["worker", "--once", "--coordinator", &url])
            .args(["--test-job-delay", "3s"])
            .args(["--tls-ca", &p("ca.pem")])
            .args(["--tls-cert", &p(&format!("issued/{w}.pem"))])
            .args(["--tls-key", &p(&format!("issued/{w}.key"))])
            .arg("--cache-dir")
            .arg(cache.join(w));
        if archive_copy {
            cmd.arg("--iso-root").arg(a.root());
        }
        Proc::spawn(w, &mut cmd)
    };
    // w1 and w2 stream the ISOs over the network; w3 has its own archive.
    let _w1 = worker("w1", false);
    let _w2 = worker("w2", false);
    let _w3 = worker("w3", true);
    if cut_w1 {
        let t0 = Instant::now();
        loop {
            let o = net
                .cmd("c", &iukfarm())
                .args(["status", "--json", "--coordinator", &url])
                .args(["--tls-ca", &p("ca.pem")])
                .args(["--tls-cert", &p("issued/rm.pem")])
                .args(["--tls-key", &p("issued/rm.key")])
                .output()
                .unwrap();
            let leased = serde_json::from_slice::<serde_json::Value>(&o.stdout).is_ok_and(|s| {
                s["jobs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|j| j["worker"] == "w1" && j["state"] == "leased")
            });
            if leased {
                break;
            }
            let last = String::from_utf8_lossy(&o.stderr);
            assert!(
                c.poll().is_none() && t0.elapsed() < Duration::from_secs(300),
                "w1 never held a job; status: {last}\ncoordinator:\n{}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        net.link("w1", false);
        std::thread::sleep(Duration::from_secs(8));
        net.link("w1", true);
    }
    let code = c.wait(LONG).code();
    assert_eq!(code, Some(0), "{}", c.log());
    let took = t.elapsed();
    assert_eq!(&iuks_in(out), local_builds(), "0 bytes lost, 0 wrong kits");
    if cut_w1 {
        let log = c.log();
        assert!(
            log.contains("worker w1 stopped renewing its lease") || log.contains("upload from w1"),
            "{log}"
        );
    }
    took
}

#[test]
fn a_release_across_four_hosts_survives_a_slow_lossy_network_and_a_partition() {
    let net = Net::new(&["c", "w1", "w2", "w3"]);
    let d = tempfile::tempdir().unwrap();
    let ca_dir = d.path().join("ca");
    ca(&ca_dir, &net.addr("c"));

    let plain = release(
        &net,
        &ca_dir,
        &d.path().join("plain"),
        &d.path().join("cache-plain"),
        false,
    );

    for h in ["c", "w1", "w2", "w3"] {
        net.cap(h, "8mbit");
        net.lose(h, 1);
    }
    let shaped = release(
        &net,
        &ca_dir,
        &d.path().join("shaped"),
        &d.path().join("cache-shaped"),
        true,
    );
    let iso_bytes: u64 = archive()
        .versions
        .iter()
        .map(|v| fs::metadata(archive().iso(v)).unwrap().len())
        .sum();
    eprintln!(
        "release over 4 hosts: plain network {:.1}s; 8 Mbit/s, 1% loss, w1 cut for 8 s: \
         {:.1}s ({:.2}x); ISOs {:.1} MiB",
        plain.as_secs_f64(),
        shaped.as_secs_f64(),
        shaped.as_secs_f64() / plain.as_secs_f64(),
        iso_bytes as f64 / (1 << 20) as f64
    );
}
