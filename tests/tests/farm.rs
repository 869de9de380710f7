//! The farm end to end: a real coordinator and real workers, as separate
//! processes on loopback, against `iukfarm build` run locally and against
//! gpg/sqv for the manifest's signature.

use std::fs;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use iukfarm_tests::farm::{
    AgentGuard, Archive, Proc, SDE, archive, builds_of, coordinator, coordinator_cmd,
    coordinator_cmd_dated, coordinator_cmd_for, gpg, iuks_in, leftover_job_files, local_builds,
    start_coordinator, status, tls_files, token_file, wait_until, worker,
};
use iukfarm_tests::{iukfarm, require_tool, run};

const LONG: Duration = Duration::from_secs(600);

fn code(p: &mut Proc) -> i32 {
    p.wait(LONG).code().unwrap_or(-1)
}

#[test]
fn release_over_three_workers_matches_local_builds_and_is_signed() {
    require_tool("sqv");
    let a = archive();
    let g = gpg();
    let _agent = AgentGuard(g);
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("release");
    let junit = d.path().join("junit.xml");
    let token = token_file(d.path(), "0123456789abcdef0123456789abcdef");
    let t = token.to_str().unwrap();
    // The RM's gpg signs (as with a smartcard): the coordinator runs gpg.
    let (mut c, url) = start_coordinator(
        coordinator_cmd(
            a,
            &out,
            &[
                "--gpg-key",
                &g.fingerprint,
                "--token-file",
                t,
                "--junit",
                junit.to_str().unwrap(),
                "--linger",
                "20s",
            ],
        )
        .env("GNUPGHOME", g.home.path()),
    );
    let url = format!("http://{url}");
    let mut watch = Proc::spawn(
        "watch",
        Command::new(iukfarm()).args(["watch", "--coordinator", &url, "--token-file", t]),
    );
    let cache = d.path().join("cache");
    let root = a.root().to_str().unwrap();
    // Two workers have the archive; the third streams the ISOs from the coordinator.
    let mut ws = vec![
        worker(
            "w1",
            &url,
            &cache,
            &["--token-file", t, "--once", "--iso-root", root],
        ),
        worker(
            "w2",
            &url,
            &cache,
            &["--token-file", t, "--once", "--iso-root", root],
        ),
        worker("w3", &url, &cache, &["--token-file", t, "--once"]),
    ];
    let fetched = d.path().join("fetched");
    let mut fetch = Proc::spawn(
        "fetch",
        Command::new(iukfarm())
            .args([
                "fetch",
                "--wait",
                "--coordinator",
                &url,
                "--token-file",
                t,
                "--cert",
            ])
            .arg(&g.cert)
            .arg("--output-dir")
            .arg(&fetched),
    );
    assert_eq!(
        code(&mut watch),
        0,
        "watch mirrors the release:\n{}",
        watch.log()
    );
    assert_eq!(
        code(&mut fetch),
        0,
        "fetch:\n{}\n{}",
        fetch.stdout(),
        fetch.log()
    );
    assert_eq!(code(&mut c), 0, "coordinator:\n{}", c.log());
    for w in &mut ws {
        assert_eq!(
            code(w),
            0,
            "{} with --once ends with the release:\n{}",
            w.name,
            w.log()
        );
    }

    // The same bytes as local builds, in the output and in what fetch got.
    assert_eq!(&iuks_in(&out), local_builds());
    assert_eq!(&iuks_in(&fetched), local_builds());
    assert!(
        ws[2].log().contains("fetching tails-amd64-"),
        "w3 streamed ISOs:\n{}",
        ws[2].log()
    );
    assert!(
        leftover_job_files(&cache).is_empty(),
        "{:?}",
        leftover_job_files(&cache)
    );

    // What the RM checks.
    run(Command::new("sha256sum")
        .args(["--check", "--strict", "SHA256SUMS"])
        .current_dir(&out));
    let v = run(g
        .cmd("gpg")
        .args(["--batch", "--verify"])
        .arg(out.join("manifest.json.asc"))
        .arg(out.join("manifest.json")));
    assert!(String::from_utf8_lossy(&v.stderr).contains("Good signature"));
    run(Command::new("sqv")
        .arg("--keyring")
        .arg(&g.cert)
        .arg(out.join("manifest.json.asc"))
        .arg(out.join("manifest.json")));
    g.sop_verify(&out.join("manifest.json.asc"), &out.join("manifest.json"));
    let ok = run(Command::new(iukfarm())
        .arg("verify")
        .arg(&out)
        .arg("--cert")
        .arg(&g.cert));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("4 IUKs match"));

    let m: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["iuks"].as_array().unwrap().len(), 4);
    assert_eq!(m["inputs"].as_array().unwrap().len(), 5);
    assert_eq!(m["source_date_epoch"], SDE.parse::<u64>().unwrap());
    // A 7.x release: gensquashfs 1.3.2's bytes, as Tails pins, named in the
    // manifest and in every job's options.
    assert_eq!(m["gensquashfs"], "1.3.2");
    assert_eq!(
        m["engine_options"],
        serde_json::json!(["gensquashfs=1.3.2"])
    );
    assert!(
        c.log().contains("gensquashfs 1.3.2's bytes"),
        "the coordinator does not say whose bytes:\n{}",
        c.log()
    );
    let xml = fs::read_to_string(&junit).unwrap();
    assert_eq!(xml.matches("<testcase ").count(), 4, "{xml}");
    assert!(!xml.contains("<failure"), "{xml}");

    // The watch output (plain lines: stderr is not a terminal).
    let w = watch.log();
    assert!(w.contains("release Tails 7.4: running"), "{w}");
    assert!(w.contains("7.0: done"), "{w}");
    assert!(w.contains("release Tails 7.4: succeeded"), "{w}");
    let table = watch.stdout();
    assert!(
        table.contains("SOURCE") && table.matches(" done ").count() == 4,
        "{table}"
    );

    // A tampered kit is named by verify.
    let victim = out.join(&local_builds()[1].0);
    let mut bytes = fs::read(&victim).unwrap();
    bytes[100] ^= 1;
    fs::write(&victim, bytes).unwrap();
    let bad = Command::new(iukfarm())
        .arg("verify")
        .arg(&out)
        .arg("--cert")
        .arg(&g.cert)
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let text = String::from_utf8_lossy(&bad.stdout);
    assert!(
        text.contains(&format!("BAD  {}: sha256", local_builds()[1].0)),
        "{text}"
    );
}

#[test]
fn a_killed_worker_loses_its_job_and_the_release_completes() {
    let a = archive();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("release");
    let key = gpg().secret_key.to_str().unwrap().to_string();
    let (mut c, url) = coordinator(a, &out, &["--signing-key", &key, "--lease-timeout", "3s"]);
    let url = format!("http://{url}");
    let cache = d.path().join("cache");
    let root = a.root().to_str().unwrap();
    // A stuck worker: it takes a job and sits on it until killed.
    let mut stuck = worker(
        "stuck",
        &url,
        &cache,
        &["--once", "--iso-root", root, "--test-job-delay", "600s"],
    );
    wait_until("the stuck worker holds a job", LONG, || {
        status(&url, &[]).is_some_and(|s| {
            s["jobs"]
                .as_array()
                .unwrap()
                .iter()
                .any(|j| j["worker"] == "stuck" && j["state"] == "leased")
        })
    });
    stuck.kill9();
    let mut good = worker("good", &url, &cache, &["--once", "--iso-root", root]);
    assert_eq!(code(&mut c), 0, "{}", c.log());
    assert_eq!(code(&mut good), 0);
    assert_eq!(&iuks_in(&out), local_builds());
    assert!(
        c.log().contains("worker stuck stopped renewing its lease"),
        "{}",
        c.log()
    );
    let m = fs::read_to_string(out.join("manifest.json")).unwrap();
    assert!(!m.contains("\"worker\": \"stuck\""), "{m}");
}

#[test]
fn a_killed_coordinator_resumes_from_its_journal() {
    let a = archive();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("release");
    let key = gpg().secret_key.to_str().unwrap().to_string();
    let args = ["--signing-key", &key, "--lease-timeout", "3s"];
    let (mut c1, url1) = coordinator(a, &out, &args);
    let cache = d.path().join("cache");
    let root = a.root().to_str().unwrap();
    let mut w = worker(
        "w",
        &format!("http://{url1}"),
        &cache,
        &["--iso-root", root, "--test-job-delay", "1s"],
    );
    let journal = out.join(".iukfarm/journal");
    wait_until("a kit is journalled", LONG, || {
        fs::read_to_string(&journal).is_ok_and(|j| j.lines().count() >= 1)
    });
    c1.kill9();
    let journalled = fs::read_to_string(&journal).unwrap();
    // Whole lines only: a torn last one is dropped by the next start.
    let done_before = journalled.matches('\n').count();
    assert!((1..4).contains(&done_before), "the release had not ended");
    // A crash between a kit's journal line and its rename into place
    // (the kill may have landed there too): its verified bytes are still
    // in `incoming`, and are put in place, not built again. A partial
    // upload beside it is removed.
    let incoming = out.join(".iukfarm/incoming");
    let first = journalled.lines().next().unwrap();
    let first: serde_json::Value = serde_json::from_str(first).unwrap();
    let first = first["name"].as_str().unwrap();
    if out.join(first).exists() {
        fs::rename(out.join(first), incoming.join("lease.0123.part")).unwrap();
    }
    fs::write(incoming.join("lease.4567.part"), b"half an upload").unwrap();
    // A kit in place that the journal does not vouch for (a crash between
    // a rename and its journal line, or anyone's file): set aside by the
    // next start, never adopted, never deleted, and built again.
    let stray = a
        .sources()
        .iter()
        .map(|v| format!("Tails_amd64_{v}_to_{}.iuk", a.new_version()))
        .find(|n| !journalled.contains(n.as_str()))
        .unwrap();
    fs::write(out.join(&stray), b"not a kit").unwrap();
    // Same arguments, same port (the worker reconnects there).
    let mut cmd = coordinator_cmd_for(a, a.new_version(), a.sources(), &out, &url1, &args);
    let mut c2 = Proc::spawn("coordinator-2", &mut cmd);
    assert_eq!(code(&mut c2), 0, "{}", c2.log());
    let log = c2.log();
    assert_eq!(
        log.matches("already built and verified (journal)").count(),
        done_before,
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "{first}: already built and verified (journal); put in place"
        )),
        "{log}"
    );
    assert_eq!(fs::read_dir(&incoming).unwrap().count(), 0);
    assert_eq!(
        log.matches(": built by w in").count(),
        4 - done_before,
        "{log}"
    );
    assert_eq!(&iuks_in(&out), local_builds());
    assert!(log.contains(&format!("{stray}: not vouched for")), "{log}");
    let aside: Vec<_> = fs::read_dir(out.join(".iukfarm/set-aside"))
        .unwrap()
        .flatten()
        .map(|e| fs::read(e.path()).unwrap())
        .collect();
    assert_eq!(aside, [b"not a kit".to_vec()]);
    let _ = w.poll();
}

#[test]
fn a_corrupted_upload_is_detected_and_the_kit_built_again() {
    let a = archive();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("release");
    let key = gpg().secret_key.to_str().unwrap().to_string();
    let (mut c, url) = coordinator(a, &out, &["--signing-key", &key]);
    let cache = d.path().join("cache");
    let root = a.root().to_str().unwrap();
    let mut w = worker(
        "flaky",
        &format!("http://{url}"),
        &cache,
        &["--once", "--iso-root", root, "--test-corrupt-uploads", "1"],
    );
    assert_eq!(code(&mut c), 0, "{}", c.log());
    assert_eq!(code(&mut w), 0);
    let log = c.log();
    assert!(log.contains("arrived damaged"), "{log}");
    assert_eq!(log.matches("arrived damaged").count(), 1, "{log}");
    assert_eq!(&iuks_in(&out), local_builds());
    let incoming: Vec<_> = fs::read_dir(out.join(".iukfarm/incoming"))
        .unwrap()
        .collect();
    assert!(incoming.is_empty());
}

/// Sample releases whose IUKs share full blocks (a 2 MiB library changed
/// in every release), with the local builds of their IUKs.
fn shared_blocks_archive() -> &'static (Archive, Vec<(String, String)>) {
    static A: OnceLock<(Archive, Vec<(String, String)>)> = OnceLock::new();
    A.get_or_init(|| {
        let a = Archive::make_with(4, &["--big-file-mib", "2"]);
        iukfarm_tests::remove_at_exit(a.dir.path(), false);
        let b = builds_of(&a, a.new_version(), a.sources());
        (a, b)
    })
}

/// A release of one IUK with a 12 MiB library changed: enough blocks
/// for a job to share with helpers.
fn work_sharing_archive() -> &'static (Archive, Vec<(String, String)>) {
    static A: OnceLock<(Archive, Vec<(String, String)>)> = OnceLock::new();
    A.get_or_init(|| {
        let a = Archive::make_with(2, &["--big-file-mib", "12"]);
        iukfarm_tests::remove_at_exit(a.dir.path(), false);
        let b = builds_of(&a, a.new_version(), a.sources());
        (a, b)
    })
}

/// Runs a lingering coordinator on `archive` with `workers` (name, extra
/// flags), each started once `ready` holds for the status so far, and
/// `kill` (which may SIGKILL a worker, returning its index) on every
/// status while the release runs; returns the final status. The kits must
/// be the local builds' and no store may be left behind.
fn release_with(
    archive: &(Archive, Vec<(String, String)>),
    workers: &[(&str, &[&str])],
    ready: impl FnMut(usize, &serde_json::Value) -> bool,
    kill: impl FnMut(&serde_json::Value, &mut [Proc]) -> Option<usize>,
) -> serde_json::Value {
    release_with_options(archive, &[], workers, ready, kill)
}

/// [`release_with`], the coordinator also given `options`.
fn release_with_options(
    archive: &(Archive, Vec<(String, String)>),
    options: &[&str],
    workers: &[(&str, &[&str])],
    mut ready: impl FnMut(usize, &serde_json::Value) -> bool,
    mut kill: impl FnMut(&serde_json::Value, &mut [Proc]) -> Option<usize>,
) -> serde_json::Value {
    let (a, builds) = archive;
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("release");
    let key = gpg().secret_key.to_str().unwrap().to_string();
    let args = [&["--signing-key", &key, "--linger", "60s"][..], options].concat();
    let (mut c, url) = coordinator(a, &out, &args);
    let url = format!("http://{url}");
    let cache = d.path().join("cache");
    let root = a.root().to_str().unwrap();
    let mut ws = Vec::new();
    // Fails at once, with the logs, if the release fails or ends.
    let mut watch =
        |what: &str, ws: &mut Vec<Proc>, f: &mut dyn FnMut(&serde_json::Value) -> bool| {
            wait_until(what, LONG, || {
                let s = status(&url, &[]);
                if c.poll().is_some() || s.as_ref().is_some_and(|s| s["state"] == "failed") {
                    let logs: Vec<String> = ws.iter().map(|w| w.log()).collect();
                    panic!(
                        "{what}: the release ended:\n{}\n{}",
                        c.log(),
                        logs.join("\n")
                    );
                }
                s.is_some_and(|s| f(&s))
            })
        };
    for (i, (name, extra)) in workers.iter().enumerate() {
        watch("the farm is ready for the next worker", &mut ws, &mut |s| {
            ready(i, s)
        });
        let args = [&["--once", "--iso-root", root][..], extra].concat();
        ws.push(worker(name, &url, &cache, &args));
    }
    let mut killed = None;
    let mut live = ws.split_off(0);
    watch("the release is over", &mut ws, &mut |s| {
        if killed.is_none() {
            killed = kill(s, &mut live);
        }
        s["state"] == "succeeded"
    });
    ws = live;
    let s = status(&url, &[]).unwrap();
    run(Command::new(iukfarm()).args(["cancel", "--coordinator", &url]));
    assert_eq!(code(&mut c), 0, "{}", c.log());
    for (i, w) in ws.iter_mut().enumerate() {
        if killed != Some(i) {
            assert_eq!(code(w), 0, "{}", w.log());
        }
    }
    assert_eq!(&iuks_in(&out), builds);
    assert!(
        !out.join(".iukfarm/blocks").exists(),
        "the store is removed"
    );
    s
}

fn job_blocks(s: &serde_json::Value, field: &str) -> u64 {
    (s["jobs"].as_array().unwrap().iter())
        .map(|j| j["blocks"][field].as_u64().unwrap())
        .sum()
}

#[test]
fn the_farm_compresses_each_block_once_and_takes_no_wrong_block() {
    let any = |_: usize, _: &serde_json::Value| true;
    let none = |_: &serde_json::Value, _: &mut [Proc]| None;
    let a = shared_blocks_archive();
    // One worker: every distinct block of the release compressed once.
    let one = release_with(a, &[("solo", &[])], any, none);
    let distinct = job_blocks(&one, "compressed");
    assert!(job_blocks(&one, "from_cache") >= 4, "{one}");
    assert_eq!(job_blocks(&one, "from_farm"), 0);

    // Two workers with caches of their own, each holding a job before
    // either builds: still once in the farm, the rest from the store.
    let slow = ["--test-job-delay", "2s"];
    let two = release_with(a, &[("w1", &slow), ("w2", &slow)], any, none);
    let store = &two["block_store"];
    assert_eq!(store["duplicates"], 0, "{store}");
    // Compressions: the jobs' own, plus the blocks handed to helpers. Not
    // the kits' "from helpers": two jobs that offer the same block both
    // get the one helper's form, and both count it.
    assert_eq!(
        job_blocks(&two, "compressed") + store["helped"].as_u64().unwrap(),
        distinct,
        "{two}"
    );
    assert!(job_blocks(&two, "from_farm") >= 2, "{two}");
    // A worker left without a job helps the other's: those blocks come
    // from the store too.
    assert_eq!(
        store["served"].as_u64(),
        Some(job_blocks(&two, "from_farm") + job_blocks(&two, "from_helpers")),
        "{two}"
    );

    // A lying worker: its first wrong block is refused, then nothing more is
    // taken from it, and the kits are still the local builds' (checked in
    // `release_with`).
    let lied = release_with(
        a,
        &[("liar", &["--test-lie-blocks"]), ("honest", &[])],
        |i, s| {
            i == 0
                || (s["workers"].as_array().unwrap().iter())
                    .any(|w| w["name"] == "liar" && w["bad_blocks"].as_u64() >= Some(1))
        },
        none,
    );
    let store = &lied["block_store"];
    assert!(store["refused"].as_u64().unwrap() >= 1, "{store}");
    let liar = (lied["workers"].as_array().unwrap().iter())
        .find(|w| w["name"] == "liar")
        .unwrap();
    assert_eq!(liar["bad_blocks"], 1, "{lied}");
}

#[test]
fn idle_workers_compress_a_large_iuks_blocks_and_cannot_fool_it() {
    let a = work_sharing_archive();
    let none = |_: &serde_json::Value, _: &mut [Proc]| None;
    // The builder holds the job before the helper starts.
    let leased = |i: usize, s: &serde_json::Value| i == 0 || s["jobs"][0]["state"] == "leased";
    let builder: &[&str] = &["-j", "1", "--test-job-delay", "2s"];
    let store = |s: &serde_json::Value, k: &str| s["block_store"][k].as_u64().unwrap();

    let s = release_with(
        a,
        &[("builder", builder), ("helper", &["-j", "1"])],
        leased,
        none,
    );
    let helped = job_blocks(&s, "from_helpers");
    eprintln!(
        "work sharing: {helped} blocks by the helper, {} by the builder",
        job_blocks(&s, "compressed")
    );
    assert!(helped > 0, "no block compressed by the helper: {s}");
    assert_eq!(store(&s, "duplicates"), 0, "{s}");
    assert!(store(&s, "helped") >= helped, "{s}");
    assert!(store(&s, "helper_bytes") > 0, "{s}");

    // A lying helper: its first wrong form is refused, it is no longer
    // heard, and the job compresses the blocks itself.
    let s = release_with(
        a,
        &[
            ("builder", builder),
            ("liar", &["-j", "1", "--test-lie-blocks"]),
        ],
        leased,
        none,
    );
    assert_eq!(job_blocks(&s, "from_helpers"), 0, "{s}");
    let liar = (s["workers"].as_array().unwrap().iter())
        .find(|w| w["name"] == "liar")
        .unwrap();
    assert_eq!(liar["bad_blocks"], 1, "{s}");

    // A helper killed with its first batch: the job takes those blocks back.
    let s = release_with(
        a,
        &[("builder", builder), ("doomed", &["-j", "1"])],
        leased,
        |s, ws| {
            (s["block_store"]["helped"].as_u64() > Some(0)).then(|| {
                ws[1].kill9();
                1
            })
        },
    );
    assert_eq!(s["jobs"][0]["state"], "done", "{s}");
}

/// A helper whose forms decompress right and are in our writer's
/// container, but are not what our encoder makes (another xz level), after
/// one honest form: the coordinator's audit compresses the block again and
/// catches it before the form is stored; the helper is banned from sharing,
/// and the job it helped is built again without the store. The kit is the
/// one `iukfarm build` makes (`release_with` compares).
#[test]
fn an_audit_catches_a_helper_whose_forms_are_not_our_encoders() {
    let a = work_sharing_archive();
    let none = |_: &serde_json::Value, _: &mut [Proc]| None;
    let leased = |i: usize, s: &serde_json::Value| i == 0 || s["jobs"][0]["state"] == "leased";
    let builder: &[&str] = &["-j", "1", "--test-job-delay", "2s"];
    let sly: &[&str] = &["-j", "1", "--test-foreign-forms-after", "1"];
    let s = release_with_options(
        a,
        &["--test-audit-every-form"],
        &[("builder", builder), ("sly", sly)],
        leased,
        none,
    );
    let sly = (s["workers"].as_array().unwrap().iter())
        .find(|w| w["name"] == "sly")
        .unwrap();
    assert!(sly["bad_blocks"].as_u64() >= Some(1), "{s}");
    let job = &s["jobs"][0];
    assert!(job["attempts"].as_u64() >= Some(2), "built again: {s}");
    assert_eq!(job["blocks"]["from_helpers"], 0, "without helpers: {s}");
    assert_eq!(job["blocks"]["from_farm"], 0, "without the store: {s}");
}

#[test]
fn reproduce_catches_a_non_deterministic_worker() {
    let a = archive();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("release");
    let junit = d.path().join("junit.xml");
    let key = gpg().secret_key.to_str().unwrap().to_string();
    let (mut c, url) = coordinator(
        a,
        &out,
        &[
            "--signing-key",
            &key,
            "--reproduce",
            "all",
            "--junit",
            junit.to_str().unwrap(),
        ],
    );
    let url = format!("http://{url}");
    let cache = d.path().join("cache");
    let root = a.root().to_str().unwrap();
    let _w1 = worker("honest", &url, &cache, &["--once", "--iso-root", root]);
    let _w2 = worker(
        "sloppy",
        &url,
        &cache,
        &["--once", "--iso-root", root, "--test-perturb"],
    );
    assert_eq!(code(&mut c), 1, "{}", c.log());
    let log = c.log();
    assert!(log.contains("not reproducible: "), "{log}");
    assert!(!out.join("SHA256SUMS").exists() && !out.join("manifest.json").exists());
    let xml = fs::read_to_string(&junit).unwrap();
    assert!(
        xml.contains("<failure") && xml.contains("not reproducible"),
        "{xml}"
    );
}

#[test]
fn refusals_say_why() {
    let a = archive();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("release");
    let key = gpg().secret_key.to_str().unwrap().to_string();
    let good = token_file(d.path(), "the-right-token-0123456789");
    let wrong = token_file(d.path(), "a-wrong-token-0123456789");
    let (cert, tls_key) = tls_files(d.path());
    let (mut c, addr) = coordinator(
        a,
        &out,
        &[
            "--signing-key",
            &key,
            "--token-file",
            good.to_str().unwrap(),
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            tls_key.to_str().unwrap(),
            "--require-engine",
            "9.9.9",
        ],
    );
    let port = addr.rsplit(':').next().unwrap();
    let https = format!("https://localhost:{port}");
    let cache = d.path().join("cache");
    let tls = ["--tls-ca", cert.to_str().unwrap()];

    let mut w = worker(
        "wrong-token",
        &https,
        &cache,
        &[&["--token-file", wrong.to_str().unwrap()][..], &tls].concat(),
    );
    assert_eq!(code(&mut w), 2, "{}", w.log());
    assert!(w.log().contains("wrong token"), "{}", w.log());

    let mut w = worker(
        "old-engine",
        &https,
        &cache,
        &[&["--token-file", good.to_str().unwrap()][..], &tls].concat(),
    );
    assert_eq!(code(&mut w), 2, "{}", w.log());
    assert!(
        w.log()
            .contains("engine fingerprint mismatch: this release requires iukfarm-engine 9.9.9"),
        "{}",
        w.log()
    );

    let plain = Command::new(iukfarm())
        .args([
            "status",
            "--coordinator",
            &format!("http://{addr}"),
            "--token-file",
            good.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(plain.status.code(), Some(1));
    let e = String::from_utf8_lossy(&plain.stderr);
    assert!(
        e.contains("TLS"),
        "plain text against a TLS coordinator: {e}"
    );

    let no_token = Command::new(iukfarm())
        .args(["status", "--coordinator", &https])
        .args(tls)
        .output()
        .unwrap();
    assert_eq!(no_token.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&no_token.stderr).contains("requires a token"));

    let ok = run(Command::new(iukfarm())
        .args([
            "workers",
            "--coordinator",
            &https,
            "--token-file",
            good.to_str().unwrap(),
        ])
        .args(tls));
    assert!(String::from_utf8_lossy(&ok.stdout).starts_with("ID"));

    // The RM ends it.
    run(Command::new(iukfarm())
        .args([
            "cancel",
            "--coordinator",
            &https,
            "--token-file",
            good.to_str().unwrap(),
        ])
        .args(tls));
    assert_eq!(code(&mut c), 130, "{}", c.log());
    assert!(c.log().contains("release cancelled"), "{}", c.log());
}

#[test]
fn bad_isos_fail_the_release_at_once_naming_the_file() {
    let a = archive();
    let key = gpg().secret_key.to_str().unwrap().to_string();
    type Damage<'a> = &'a dyn Fn(&std::path::Path);
    let cases: [(&str, Damage, &str); 5] = [
        ("missing", &|p| fs::remove_file(p).unwrap(), "no such file"),
        (
            "cut at 99%",
            &|p| {
                let f = fs::OpenOptions::new().write(true).open(p).unwrap();
                f.set_len(f.metadata().unwrap().len() / 100 * 99).unwrap();
            },
            "truncated",
        ),
        (
            "truncated",
            &|p| {
                let f = fs::OpenOptions::new().write(true).open(p).unwrap();
                f.set_len(f.metadata().unwrap().len() / 2).unwrap();
            },
            "truncated",
        ),
        (
            "not an ISO",
            &|p| fs::write(p, vec![0x5a; 1 << 20]).unwrap(),
            "ISO",
        ),
        (
            "no squashfs",
            &|p| {
                let bytes = fs::read(p).unwrap();
                // Rename the system image in the directory record (same length).
                let needle = b"filesystem.squashfs";
                let mut out = bytes.clone();
                let mut i = 0;
                while let Some(k) = out[i..].windows(needle.len()).position(|w| w == needle) {
                    out[i + k..i + k + needle.len()].copy_from_slice(b"filesystem.squashfX");
                    i += k + needle.len();
                }
                fs::write(p, out).unwrap();
            },
            "not found",
        ),
    ];
    for (what, damage, expected) in cases {
        let d = tempfile::tempdir().unwrap();
        let small = Archive {
            dir: tempfile::tempdir().unwrap(),
            versions: vec!["7.0".into(), "7.4".into()],
        };
        for v in &small.versions {
            let dst = small.iso(v);
            fs::create_dir_all(dst.parent().unwrap()).unwrap();
            fs::copy(a.iso(v), &dst).unwrap();
        }
        damage(&small.iso("7.0"));
        let out = d.path().join("release");
        let t = std::time::Instant::now();
        let o = Command::new(iukfarm())
            .arg("coordinator")
            .args([
                "--new-version",
                "7.4",
                "--source-versions",
                "7.0",
                "--source-date-epoch",
                SDE,
            ])
            .arg("--iso-root")
            .arg(small.root())
            .arg("--output-dir")
            .arg(&out)
            .args(["--listen", "127.0.0.1:0", "--signing-key", &key])
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{what}: {e}");
        assert!(
            e.contains("tails-amd64-7.0.iso"),
            "{what}: names the file: {e}"
        );
        assert!(e.contains(expected), "{what}: says {expected:?}: {e}");
        assert!(t.elapsed() < Duration::from_secs(30), "{what}: fails fast");
    }
}

#[test]
fn unknown_engine_options_and_missing_keys_are_refused_up_front() {
    let a = archive();
    let d = tempfile::tempdir().unwrap();
    let key = gpg().secret_key.to_str().unwrap().to_string();
    let base = |extra: &[&str]| {
        Command::new(iukfarm())
            .arg("coordinator")
            .args([
                "--new-version",
                a.new_version(),
                "--source-versions",
                "7.0",
                "--source-date-epoch",
                SDE,
            ])
            .arg("--iso-root")
            .arg(a.root())
            .arg("--output-dir")
            .arg(d.path().join("out"))
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .output()
            .unwrap()
    };
    let o = base(&["--signing-key", &key, "--engine-option", "compression=gzip"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("unknown engine option \"compression=gzip\"")
    );
    for bad in [
        &["--gensquashfs", "1.3.1"][..],
        &["--engine-option", "gensquashfs=4.6"],
    ] {
        let o = base(&[&["--signing-key", &key][..], bad].concat());
        assert_eq!(o.status.code(), Some(2), "{bad:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("unknown gensquashfs version") && err.contains("1.2.0 or 1.3.2"),
            "{bad:?}: {err}"
        );
    }
    let o = base(&[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("must be signed"));
    let o = base(&["--signing-key", gpg().cert.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no usable secret signing key"));
}

/// 40 sources over 4 workers: the release completes and the coordinator's
/// memory does not grow with the number of kits it has handled.
#[test]
fn load_forty_sources_over_four_workers() {
    let a = big_archive();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("release");
    let key = gpg().secret_key.to_str().unwrap().to_string();
    let (mut c, url) = coordinator(a, &out, &["--signing-key", &key]);
    let url = format!("http://{url}");
    let cache = d.path().join("cache");
    let root = a.root().to_str().unwrap();
    let mut ws: Vec<Proc> = (1..=4)
        .map(|n| {
            worker(
                &format!("w{n}"),
                &url,
                &cache,
                &["--once", "--iso-root", root, "-j", "1"],
            )
        })
        .collect();
    let mut early = 0;
    wait_until("10 kits are done", LONG, || {
        early = c.peak_rss_kib();
        status(&url, &[]).is_some_and(|s| {
            s["jobs"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|j| j["state"] == "done")
                .count()
                >= 10
        })
    });
    let mut late = early;
    while c.poll().is_none() {
        late = late.max(c.peak_rss_kib());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(code(&mut c), 0, "{}", c.log());
    for w in &mut ws {
        assert_eq!(code(w), 0);
    }
    assert_eq!(iuks_in(&out).len(), 40);
    eprintln!("coordinator peak RSS: {early} KiB after 10 kits, {late} KiB after 40");
    assert!(late < 200 * 1024, "coordinator peak RSS {late} KiB");
    assert!(
        late <= early + 32 * 1024,
        "memory grew from {early} KiB to {late} KiB"
    );
}

/// Releases 7.0 ... 7.40, shared by the load and soak tests.
fn big_archive() -> &'static Archive {
    static A: OnceLock<Archive> = OnceLock::new();
    A.get_or_init(|| {
        let a = Archive::make(41);
        iukfarm_tests::remove_at_exit(a.dir.path(), false);
        a
    })
}

/// xorshift64*: a kill schedule that a seed replays.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

#[test]
fn soak_twenty_sources_while_workers_and_the_coordinator_are_killed_at_random() {
    const WORKERS: usize = 3;
    const KILLS: u32 = 12;
    let seed = std::env::var("IUKFARM_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("soak: seed {seed} (IUKFARM_SOAK_SEED={seed} replays the schedule)");
    let mut rng = Rng(seed);

    let a = big_archive();
    let (new, sources) = (&a.versions[40], &a.versions[20..40]);
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("release");
    let key = gpg().secret_key.to_str().unwrap().to_string();
    let args = [
        "--signing-key",
        &key,
        "--lease-timeout",
        "3s",
        "--max-attempts",
        "30",
    ];
    let t = Instant::now();
    let (mut c, addr) = start_coordinator(&mut coordinator_cmd_for(
        a,
        new,
        sources,
        &out,
        "127.0.0.1:0",
        &args,
    ));
    let url = format!("http://{addr}");
    let cache = d.path().join("cache");
    let root = a.root().to_str().unwrap();
    let start = |n: usize| {
        worker(
            &format!("w{n}"),
            &url,
            &cache,
            &["--once", "--iso-root", root, "--slots", "2", "-j", "1"],
        )
    };
    let mut ws: Vec<Proc> = (0..WORKERS).map(start).collect();
    let journal = out.join(".iukfarm/journal");
    let journalled = || {
        fs::read_to_string(&journal)
            .map(|j| j.lines().count())
            .unwrap_or(0)
    };

    // Kill a random worker every 0.5 to 3 s (SIGKILL, or one time in four
    // SIGTERM) and start it again at once; kill -9 the coordinator once,
    // when a third of the kits are in, and start it again on its port.
    let (mut sigkills, mut sigterms, mut coordinator_kills) = (0, 0, 0);
    let mut logs = Vec::new();
    while sigkills + sigterms < KILLS && c.poll().is_none() && t.elapsed() < LONG {
        std::thread::sleep(Duration::from_millis(500 + rng.below(2500)));
        if coordinator_kills == 0 && journalled() >= sources.len() / 3 {
            c.kill9();
            logs.push(c.log());
            coordinator_kills += 1;
            c = Proc::spawn(
                "coordinator-2",
                &mut coordinator_cmd_for(a, new, sources, &out, &addr, &args),
            );
            c.wait_log("listening on", LONG);
            continue;
        }
        let n = rng.below(WORKERS as u64) as usize;
        if ws[n].poll().is_some() {
            continue;
        }
        if rng.below(4) == 0 {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(ws[n].pid() as i32, libc::SIGTERM) };
            assert_eq!(code(&mut ws[n]), 0, "SIGTERM ends a worker cleanly");
            sigterms += 1;
        } else {
            ws[n].kill9();
            sigkills += 1;
        }
        logs.push(ws[n].log());
        ws[n] = start(n);
    }
    assert_eq!(code(&mut c), 0, "{}", c.log());
    let took = t.elapsed();
    for w in &mut ws {
        assert_eq!(code(w), 0, "{}", w.log());
    }
    logs.push(c.log());
    let lost = logs
        .iter()
        .map(|l| l.matches("stopped renewing its lease").count())
        .sum::<usize>();

    // 0 bytes lost, 0 wrong kits signed.
    assert_eq!(iuks_in(&out), builds_of(a, new, sources));
    run(Command::new(iukfarm())
        .arg("verify")
        .arg(&out)
        .arg("--cert")
        .arg(&gpg().cert));
    let left: Vec<_> = fs::read_dir(out.join(".iukfarm/incoming"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "part files left: {left:?}");
    assert!(
        leftover_job_files(&cache).is_empty(),
        "{:?}",
        leftover_job_files(&cache)
    );
    eprintln!(
        "soak: {} IUKs in {:.1}s with {sigkills} workers SIGKILLed, {sigterms} SIGTERMed, \
         {coordinator_kills} coordinator SIGKILLed, {lost} leases lost; \
         every kit identical to a local build",
        sources.len(),
        took.as_secs_f64()
    );
}

/// SIGTERM during a release cancels it; the coordinator then lingers (the
/// RM may still want its status), and a second SIGTERM or SIGINT ends that
/// at once instead of being ignored for the whole linger.
#[test]
fn a_second_signal_ends_the_linger_at_once() {
    let a = archive();
    let d = tempfile::tempdir().unwrap();
    let key = gpg().secret_key.to_str().unwrap().to_string();
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let out = d.path().join(format!("release-{signal}"));
        // No worker: the release waits for one until it is cancelled.
        let (mut c, _) = start_coordinator(&mut coordinator_cmd(
            a,
            &out,
            &["--signing-key", &key, "--linger", "600s"],
        ));
        // SAFETY: signalling our own child.
        unsafe { libc::kill(c.pid() as i32, signal) };
        c.wait_log("serving status and downloads for", Duration::from_secs(60));
        let t = Instant::now();
        unsafe { libc::kill(c.pid() as i32, signal) };
        c.wait(Duration::from_secs(30));
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "signal {signal}: lingered {:?} after the second signal",
            t.elapsed()
        );
    }
}

/// A SOURCE_DATE_EPOCH not later than a source release's (its ISO's date)
/// is refused at start, naming that release, before anything is written:
/// Tails' installer would keep the old release's same-size files.
#[test]
fn a_release_dated_no_later_than_a_source_is_refused_up_front() {
    let a = archive();
    let d = tempfile::tempdir().unwrap();
    let key = gpg().secret_key.to_str().unwrap().to_string();
    let out = d.path().join("release");
    // 7.3 is dated four weeks before the newest release, 7.4.
    let sde = (SDE.parse::<u32>().unwrap() - 28 * 86_400).to_string();
    let o = coordinator_cmd_dated(
        a,
        a.new_version(),
        a.sources(),
        &sde,
        &out,
        "127.0.0.1:0",
        &["--signing-key", &key],
    )
    .output()
    .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(
        e.contains("is not later than the ISO of 7.3") && e.contains("2024-10-02"),
        "{e}"
    );
    assert!(!out.exists(), "the refused release wrote {}", out.display());
}
