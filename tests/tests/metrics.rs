//! What sysadmins monitor: the coordinator's and a worker's `/metrics`
//! during a real release, held to `promtool check metrics` and scraped by a
//! real Prometheus server; the numbers must agree with what happened (bytes
//! one side sent are the bytes the other received, kits counted are the
//! kits on disk), and certificate expiry shows in `iukfarm workers`.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use iukfarm_tests::farm::{Proc, archive, coordinator, gpg, iuks_in, wait_until, worker};
use iukfarm_tests::{iukfarm, require_tool, run};

const LONG: Duration = Duration::from_secs(600);

/// `GET path` over HTTP/1.0: the status code and the body.
fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut page = String::new();
    s.read_to_string(&mut page).ok()?;
    let (head, body) = page.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

/// The samples of a text-format page: `name{labels}` to value.
fn samples(page: &str) -> BTreeMap<String, f64> {
    page.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn scrape(addr: &str) -> BTreeMap<String, f64> {
    let (code, body) = http_get(addr, "/metrics").expect("the metrics endpoint answers");
    assert_eq!(code, 200, "{body}");
    samples(&body)
}

fn get(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    *m.get(key)
        .unwrap_or_else(|| panic!("no {key} in {:#?}", m.keys().collect::<Vec<_>>()))
}

/// `promtool check metrics` on the page: the format and Prometheus' naming
/// rules (units, `_total` on counters, help on every metric).
fn promtool_accepts(addr: &str) {
    let (_, page) = http_get(addr, "/metrics").unwrap();
    let mut p = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    p.stdin.take().unwrap().write_all(page.as_bytes()).unwrap();
    let o = p.wait_with_output().unwrap();
    assert!(
        o.status.success() && o.stdout.is_empty() && o.stderr.is_empty(),
        "promtool: {}{}\n{page}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The address a daemon's log says it serves metrics on.
fn metrics_addr(p: &mut Proc) -> String {
    let log = p.wait_log("metrics at http://", Duration::from_secs(120));
    log.lines()
        .find_map(|l| l.split("metrics at http://").nth(1))
        .and_then(|r| r.split('/').next())
        .expect("the metrics address")
        .to_string()
}

/// A loopback port nobody listens on now (Prometheus takes a port, not 0).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn the_farm_shows_prometheus_what_it_does() {
    require_tool("promtool");
    require_tool("prometheus");
    let a = archive();
    let d = tempfile::tempdir().unwrap();
    let ca = d.path().join("ca");
    let p = |f: &str| ca.join(f).to_str().unwrap().to_string();
    run(Command::new(iukfarm())
        .args(["ca", "init", "--dir"])
        .arg(&ca));
    run(Command::new(iukfarm())
        .args(["ca", "issue", "--role", "coordinator", "localhost"])
        .args(["--host", "127.0.0.1", "--days", "365", "--dir"])
        .arg(&ca));
    // A worker certificate about to expire: the RM and Prometheus see it.
    run(Command::new(iukfarm())
        .args([
            "ca", "issue", "--role", "worker", "w1", "--days", "10", "--dir",
        ])
        .arg(&ca));
    run(Command::new(iukfarm())
        .args(["ca", "issue", "--role", "rm", "rm", "--dir"])
        .arg(&ca));

    let out = d.path().join("release");
    let key = gpg().secret_key.to_str().unwrap().to_string();
    let (mut c, addr) = coordinator(
        a,
        &out,
        &[
            "--signing-key",
            &key,
            "--tls-cert",
            &p("issued/localhost.pem"),
            "--tls-key",
            &p("issued/localhost.key"),
            "--tls-client-ca",
            &p("ca.pem"),
            "--metrics-listen",
            "127.0.0.1:0",
            // The worker is still "connected" when the release ends.
            "--lease-timeout",
            "300s",
            "--linger",
            "300s",
        ],
    );
    let c_metrics = metrics_addr(&mut c);
    let before = scrape(&c_metrics);
    assert_eq!(
        get(
            &before,
            r#"iukfarm_coordinator_kits_total{outcome="accepted"}"#
        ),
        0.0
    );
    assert_eq!(
        get(&before, r#"iukfarm_coordinator_workers{state="connected"}"#),
        0.0
    );
    let days = get(&before, "iukfarm_coordinator_certificate_expiry_seconds") / 86400.0;
    assert!((364.0..=365.0).contains(&days), "{days}");

    // No --iso-root: the worker fetches the ISOs from the coordinator.
    let url = format!("https://127.0.0.1:{}", addr.rsplit(':').next().unwrap());
    let cache = d.path().join("cache");
    let mut w = worker(
        "w1",
        &url,
        &cache,
        &[
            "--tls-ca",
            &p("ca.pem"),
            "--tls-cert",
            &p("issued/w1.pem"),
            "--tls-key",
            &p("issued/w1.key"),
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let w_metrics = metrics_addr(&mut w);
    let rm = |args: &[&str]| {
        Command::new(iukfarm())
            .args(args)
            .args(["--coordinator", &url, "--tls-ca", &p("ca.pem")])
            .args([
                "--tls-cert",
                &p("issued/rm.pem"),
                "--tls-key",
                &p("issued/rm.key"),
            ])
            .output()
            .unwrap()
    };
    wait_until("the release succeeded", LONG, || {
        let o = rm(&["status", "--json"]);
        serde_json::from_slice::<serde_json::Value>(&o.stdout)
            .is_ok_and(|s| s["state"] == "succeeded")
    });

    let kits = iuks_in(&out);
    let n = a.sources().len() as f64;
    assert_eq!(kits.len() as f64, n);
    let kit_bytes: u64 = kits
        .iter()
        .map(|(name, _)| fs::metadata(out.join(name)).unwrap().len())
        .sum();
    let cm = scrape(&c_metrics);
    let wm = scrape(&w_metrics);
    let g = |m: &BTreeMap<String, f64>, k: &str| get(m, k);
    // The coordinator's side.
    assert_eq!(
        g(&cm, r#"iukfarm_coordinator_phase{phase="succeeded"}"#),
        1.0
    );
    assert_eq!(g(&cm, r#"iukfarm_coordinator_phase{phase="running"}"#), 0.0);
    assert_eq!(g(&cm, r#"iukfarm_coordinator_jobs{state="done"}"#), n);
    assert_eq!(g(&cm, r#"iukfarm_coordinator_jobs{state="failed"}"#), 0.0);
    assert_eq!(
        g(&cm, r#"iukfarm_coordinator_kits_total{outcome="accepted"}"#),
        n
    );
    assert_eq!(
        g(&cm, r#"iukfarm_coordinator_kits_total{outcome="wrong"}"#),
        0.0
    );
    assert_eq!(g(&cm, "iukfarm_coordinator_verify_seconds_count"), n);
    assert_eq!(g(&cm, "iukfarm_coordinator_lease_losses_total"), 0.0);
    assert_eq!(
        g(
            &cm,
            r#"iukfarm_coordinator_received_bytes_total{what="kit"}"#
        ),
        kit_bytes as f64
    );
    assert_eq!(
        g(&cm, r#"iukfarm_coordinator_workers{state="connected"}"#),
        1.0
    );
    assert_eq!(
        g(&cm, r#"iukfarm_coordinator_worker_jobs_done{worker="w1"}"#),
        n
    );
    let w1_days = g(
        &cm,
        r#"iukfarm_coordinator_worker_certificate_expiry_seconds{worker="w1"}"#,
    ) / 86400.0;
    assert!((9.0..=10.0).contains(&w1_days), "{w1_days}");
    // The worker's side, and both sides agree on the bytes.
    assert_eq!(
        g(&wm, r#"iukfarm_worker_jobs_total{outcome="delivered"}"#),
        n
    );
    assert_eq!(
        g(&wm, r#"iukfarm_worker_jobs_total{outcome="failed"}"#),
        0.0
    );
    assert_eq!(g(&wm, "iukfarm_worker_jobs_running"), 0.0);
    assert_eq!(g(&wm, "iukfarm_worker_build_seconds_count"), n);
    assert_eq!(g(&wm, "iukfarm_worker_lease_losses_total"), 0.0);
    assert_eq!(
        g(&wm, r#"iukfarm_worker_sent_bytes_total{what="kit"}"#),
        kit_bytes as f64
    );
    let isos = g(&wm, r#"iukfarm_worker_received_bytes_total{what="iso"}"#);
    let all_isos: u64 = std::iter::once(a.new_version().to_string())
        .chain(a.sources().iter().cloned())
        .map(|v| fs::metadata(a.iso(&v)).unwrap().len())
        .sum();
    assert_eq!(isos, all_isos as f64, "every ISO fetched once");
    assert_eq!(
        g(&cm, r#"iukfarm_coordinator_sent_bytes_total{what="iso"}"#),
        isos
    );
    let hits = g(
        &wm,
        r#"iukfarm_worker_block_cache_lookups_total{result="hit"}"#,
    );
    let misses = g(
        &wm,
        r#"iukfarm_worker_block_cache_lookups_total{result="miss"}"#,
    );
    assert!(hits + misses > 0.0, "the block cache was used");
    assert!(g(&wm, "iukfarm_worker_block_cache_bytes") > 0.0);
    let days = g(&wm, "iukfarm_worker_certificate_expiry_seconds") / 86400.0;
    assert!((9.0..=10.0).contains(&days), "{days}");
    promtool_accepts(&c_metrics);
    promtool_accepts(&w_metrics);

    // The RM sees the expiry too, with what to do.
    let o = rm(&["workers"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "{stderr}");
    let row = stdout
        .lines()
        .find(|l| l.contains(" w1 "))
        .expect("w1 listed");
    assert!(row.trim_end().ends_with(" 9d"), "{stdout}");
    assert!(
        stderr.contains("the certificate of worker w1 expires in 9d")
            && stderr.contains("iukfarm ca issue"),
        "{stderr}"
    );

    // A real Prometheus scrapes both.
    let prom_port = free_port();
    let prom = d.path().join("prometheus");
    fs::create_dir(&prom).unwrap();
    fs::write(
        prom.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: iukfarm\n    \
             static_configs:\n      - targets: ['{c_metrics}', '{w_metrics}']\n"
        ),
    )
    .unwrap();
    let mut server = Proc::spawn(
        "prometheus",
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                prom.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                prom.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}")),
    );
    let query = |q: &str| -> Option<serde_json::Value> {
        let (code, body) = http_get(
            &format!("127.0.0.1:{prom_port}"),
            &format!("/api/v1/query?query={q}"),
        )?;
        (code == 200).then(|| serde_json::from_str(&body).ok())?
    };
    let value = |r: &serde_json::Value| -> f64 {
        r["value"][1]
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    wait_until(
        "Prometheus scraped both endpoints",
        Duration::from_secs(180),
        || {
            query("up").is_some_and(|v| {
                let r = v["data"]["result"].as_array().cloned().unwrap_or_default();
                r.len() == 2 && r.iter().all(|s| value(s) == 1.0)
            })
        },
    );
    // URL-encoded: iukfarm_worker_jobs_total{outcome="delivered"}
    let delivered = "iukfarm_worker_jobs_total%7Boutcome%3D%22delivered%22%7D";
    wait_until(
        "Prometheus has the worker's jobs",
        Duration::from_secs(60),
        || {
            query(delivered).is_some_and(|v| {
                v["data"]["result"]
                    .as_array()
                    .is_some_and(|r| r.len() == 1 && value(&r[0]) == n)
            })
        },
    );
    server.kill9();
    w.kill9();
    c.kill9();
}

/// A metrics address that cannot be had is bad configuration (exit 2),
/// found before the daemon does anything; so is one that is no address.
#[test]
fn a_metrics_address_in_use_or_malformed_is_refused() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let at = taken.local_addr().unwrap().to_string();
    let d = tempfile::tempdir().unwrap();
    for (value, says) in [
        (at.as_str(), "cannot listen on"),
        ("nonsense", "expected ADDRESS:PORT"),
    ] {
        let o = Command::new(iukfarm())
            .args(["worker", "--coordinator", "http://127.0.0.1:9", "--once"])
            .arg("--cache-dir")
            .arg(d.path().join("cache"))
            .args(["--metrics-listen", value])
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{value}: {e}");
        assert!(e.contains(says), "{value}: {e}");
    }
}
