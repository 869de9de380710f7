//! The farm over a network: a coordinator and three workers on four
//! simulated hosts (network namespaces joined by a bridge), talking mutual
//! TLS with certificates of a release CA, first on a plain network, then
//! with 50 ms of latency each way (a delaying proxy in front of the
//! coordinator), capped bandwidth (8 Mbit/s: the ISOs two workers stream
//! take seconds), 1% random packet loss on every host, and a worker cut
//! off mid-upload for longer than its lease, then healed.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use iukfarm_tests::farm::{Proc, SDE, archive, gpg, iuks_in, local_builds, wait_until};
use iukfarm_tests::netns::Net;
use iukfarm_tests::{iukfarm, run};

const LONG: Duration = Duration::from_secs(600);
/// Long enough for heartbeats behind an ISO stream on the capped link.
const LEASE: &str = "8s";

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

/// The kits being received by the coordinator writing into `out`.
fn parts(out: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(out.join(".iukfarm/incoming"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".part"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// One release over `net`; returns its wall time. `shaped`: workers reach
/// the coordinator through a proxy adding 50 ms each way, and w1 is cut
/// off in the middle of an upload.
fn release(net: &Net, ca_dir: &Path, out: &Path, cache: &Path, shaped: bool) -> Duration {
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
    let mut _proxy = None;
    let workers_url = if shaped {
        let front = format!("{}:7448", net.addr("c"));
        let mut p = Proc::spawn(
            "delay-proxy",
            net.cmd("c", Path::new(env!("CARGO_BIN_EXE_delay-proxy")))
                .args([&front, &listen, "50"]),
        );
        p.wait_log("listening on", LONG);
        _proxy = Some(p);
        format!("https://{front}")
    } else {
        url.clone()
    };
    let worker = |w: &str, extra: &[&str]| {
        let mut cmd = net.cmd(w, &iukfarm());
        // Each job holds its lease a while: every worker, w1 included, gets
        // a job, whatever the scheduling.
        cmd.args(["worker", "--once", "--coordinator", &workers_url])
            .args(["--test-job-delay", "3s"])
            .args(["--tls-ca", &p("ca.pem")])
            .args(["--tls-cert", &p(&format!("issued/{w}.pem"))])
            .args(["--tls-key", &p(&format!("issued/{w}.key"))])
            .arg("--cache-dir")
            .arg(cache.join(w))
            .args(extra);
        Proc::spawn(w, &mut cmd)
    };
    // w1 and w2 stream the ISOs over the network; w3 has its own archive.
    // w1's first upload stalls after its first chunk: the link goes then.
    let mut w1 = worker(
        "w1",
        if shaped {
            &["--test-upload-pause", "25s"]
        } else {
            &[]
        },
    );
    let _w2 = worker("w2", &[]);
    let _w3 = worker("w3", &["--iso-root", a.root().to_str().unwrap()]);
    if shaped {
        w1.wait_log("upload paused", LONG);
        // The first chunk (the whole of a sample kit) crosses 8 Mbit/s.
        std::thread::sleep(Duration::from_secs(2));
        let receiving = parts(out);
        assert!(!receiving.is_empty(), "w1's upload is not in progress");
        net.link("w1", false);
        let cut = Instant::now();
        c.wait_log("worker w1 stopped renewing its lease", LONG);
        // Its part file goes with its lease, though the stream is still open.
        wait_until("the coordinator drops w1's part file", LONG, || {
            parts(out).iter().all(|f| !receiving.contains(f))
        });
        assert!(
            cut.elapsed() < Duration::from_secs(14),
            "w1's lease outlived the cut"
        );
        std::thread::sleep(Duration::from_secs(14).saturating_sub(cut.elapsed()));
        net.link("w1", true);
    }
    let code = c.wait(LONG).code();
    assert_eq!(code, Some(0), "{}", c.log());
    let took = t.elapsed();
    assert_eq!(&iuks_in(out), local_builds(), "0 bytes lost, 0 wrong kits");
    assert_eq!(parts(out), Vec::<String>::new(), "part files left behind");
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
        "release over 4 hosts: plain network {:.1}s; 50 ms each way, 8 Mbit/s, 1% loss, \
         w1 cut mid-upload for 14 s: {:.1}s ({:.2}x); ISOs {:.1} MiB",
        plain.as_secs_f64(),
        shaped.as_secs_f64(),
        shaped.as_secs_f64() / plain.as_secs_f64(),
        iso_bytes as f64 / (1 << 20) as f64
    );
}
