//! One contract for exit codes, whatever the subcommand: 2 for a usage
//! error or bad input (a file named that is missing, a file that is not
//! what the command needs, a bad value), found before any work and leaving
//! nothing behind; 1 for work that failed; a closed pipe ends a listing
//! quietly.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use iukfarm_tests::{iukfarm, run};

/// Exit code and stderr of `iukfarm ARGS` run in `dir`, killed (and the
/// test failed) if it does not end within a minute: a refusal is immediate.
fn code(dir: &Path, args: &[&str]) -> (i32, String) {
    let mut child = Command::new(iukfarm())
        .args(args)
        .current_dir(dir)
        .env_remove("SOURCE_DATE_EPOCH")
        .env_remove("IUKFARM_COORDINATOR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            let code = status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap());
            return (code, err);
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("iukfarm {args:?} still running after a minute");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every file under `dir`, to show that a refused command wrote nothing.
fn listing(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            out.push(p.strip_prefix(dir).unwrap().display().to_string());
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn every_subcommand_answers_bad_input_with_2_and_writes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let w = d.path();
    // Two small sample releases: real ISOs for the cases that need one.
    run(Command::new(iukfarm()).args([
        "samples",
        "--output-dir",
        w.join("isos").to_str().unwrap(),
        "--releases",
        "2",
        "--scale",
        "1",
    ]));
    let iso70 = "isos/tails-amd64-7.0/tails-amd64-7.0.iso";
    let iso71 = "isos/tails-amd64-7.1/tails-amd64-7.1.iso";
    fs::write(w.join("wrong.txt"), "hello\n").unwrap();
    fs::create_dir(w.join("empty")).unwrap();
    let https = ["--coordinator", "https://127.0.0.1:9"];

    // (what is wrong, the arguments)
    let cases: &[(&str, &[&str])] = &[
        // build
        (
            "missing ISO",
            &[
                "build",
                "--old-iso",
                "nope.iso",
                "--new-iso",
                iso71,
                "--source-date-epoch",
                "1800000000",
                "--out",
                "k.iuk",
            ],
        ),
        (
            "not an ISO",
            &[
                "build",
                "--old-iso",
                "wrong.txt",
                "--new-iso",
                iso71,
                "--old-version",
                "7.0",
                "--source-date-epoch",
                "1800000000",
                "--out",
                "k.iuk",
            ],
        ),
        (
            "same version",
            &[
                "build",
                "--old-iso",
                iso71,
                "--new-iso",
                iso71,
                "--source-date-epoch",
                "1800000000",
                "--output-dir",
                "made-by-build",
            ],
        ),
        (
            "bad date",
            &[
                "build",
                "--old-iso",
                iso70,
                "--new-iso",
                iso71,
                "--source-date-epoch",
                "soon",
                "--out",
                "k.iuk",
            ],
        ),
        // verify-iuk
        (
            "missing kit",
            &[
                "verify-iuk",
                "--old-iso",
                iso70,
                "--new-iso",
                iso71,
                "nope.iuk",
            ],
        ),
        (
            "not an ISO",
            &[
                "verify-iuk",
                "--old-iso",
                "wrong.txt",
                "--new-iso",
                iso71,
                "wrong.txt",
            ],
        ),
        // coordinator and release
        (
            "missing release file",
            &["coordinator", "--release-file", "nope.toml"],
        ),
        (
            "not a release file",
            &["coordinator", "--release-file", "wrong.txt"],
        ),
        ("bad duration", &["coordinator", "--lease-timeout", "soon"]),
        (
            "missing release file",
            &["release", "--release-file", "nope.toml"],
        ),
        (
            "not a release file",
            &["release", "--release-file", "wrong.txt"],
        ),
        ("bad count", &["release", "--workers", "many"]),
        // worker
        (
            "missing CA",
            &[
                "worker",
                "--coordinator",
                "https://127.0.0.1:9",
                "--tls-ca",
                "nope.pem",
            ],
        ),
        (
            "not a token",
            &[
                "worker",
                "--coordinator",
                "http://127.0.0.1:9",
                "--token-file",
                "wrong.txt",
            ],
        ),
        ("bad address", &["worker", "--coordinator", "nonsense"]),
        // ca
        (
            "missing CA",
            &["ca", "issue", "--dir", "nope", "--role", "worker", "w1"],
        ),
        ("not a directory", &["ca", "init", "--dir", "wrong.txt"]),
        ("bad days", &["ca", "init", "--dir", "newca", "--days", "0"]),
        ("missing CA", &["ca", "revoke", "--dir", "nope", "w1"]),
        // the RM's clients
        (
            "missing CA",
            &["status", https[0], https[1], "--tls-ca", "nope.pem"],
        ),
        ("not a token", &["status", "--token-file", "wrong.txt"]),
        ("bad address", &["status", "--coordinator", "nonsense"]),
        (
            "missing CA",
            &["watch", https[0], https[1], "--tls-ca", "nope.pem"],
        ),
        ("bad address", &["watch", "--coordinator", "nonsense"]),
        ("not a token", &["workers", "--token-file", "wrong.txt"]),
        ("bad address", &["workers", "--coordinator", "nonsense"]),
        (
            "missing CA",
            &[
                "cancel", https[0], https[1], "--tls-ca", "nope.pem", "--reason", "x",
            ],
        ),
        (
            "bad address",
            &["cancel", "--coordinator", "nonsense", "--reason", "x"],
        ),
        (
            "missing certificate",
            &["fetch", "--output-dir", "fetched", "--cert", "nope.asc"],
        ),
        (
            "bad address",
            &[
                "fetch",
                "--coordinator",
                "nonsense",
                "--output-dir",
                "fetched",
            ],
        ),
        // verify, publish, udf
        ("missing directory", &["verify", "nope", "--no-signature"]),
        (
            "not a directory",
            &["verify", "wrong.txt", "--no-signature"],
        ),
        (
            "missing certificate",
            &["verify", "empty", "--cert", "nope.asc"],
        ),
        (
            "missing sums",
            &[
                "publish",
                "empty",
                "--cert",
                "wrong.txt",
                "--rm-sums",
                "nope",
                "--host",
                "h",
                "--staging-dir",
                "/s",
            ],
        ),
        (
            "missing release",
            &[
                "publish",
                "nope",
                "--cert",
                "wrong.txt",
                "--rm-sums",
                "wrong.txt",
                "--host",
                "h",
                "--staging-dir",
                "/s",
            ],
        ),
        (
            "option-like host",
            &[
                "publish",
                "empty",
                "--cert",
                "wrong.txt",
                "--rm-sums",
                "wrong.txt",
                "--host",
                "-oProxyCommand=x",
                "--staging-dir",
                "/s",
            ],
        ),
        (
            "missing ISO",
            &[
                "udf",
                "generate",
                "--version",
                "7.1",
                "--next-version",
                "7.2",
                "--release-checkout",
                "empty",
                "--iso",
                "nope.iso",
                "--iuks",
                "empty",
            ],
        ),
        (
            "not a checkout",
            &[
                "udf",
                "generate",
                "--version",
                "7.1",
                "--next-version",
                "7.2",
                "--release-checkout",
                "wrong.txt",
                "--iso",
                iso71,
                "--iuks",
                "empty",
            ],
        ),
        (
            "bad channel",
            &[
                "udf",
                "generate",
                "--version",
                "7.1",
                "--next-version",
                "7.2",
                "--channel",
                "beta",
                "--release-checkout",
                "empty",
                "--iso",
                iso71,
                "--iuks",
                "empty",
            ],
        ),
        (
            "missing UDF",
            &["udf", "check", "--cert", "wrong.txt", "nope.yml"],
        ),
        (
            "not a certificate",
            &["udf", "check", "--cert", "wrong.txt", "wrong.txt"],
        ),
        // demo and samples
        ("not a directory", &["demo", "--output-dir", "wrong.txt"]),
        ("an earlier demo", &["demo", "--output-dir", "isos"]),
        (
            "bad scale",
            &["demo", "--output-dir", "demo", "--scale", "0"],
        ),
        ("not a directory", &["samples", "--output-dir", "wrong.txt"]),
        (
            "bad count",
            &["samples", "--output-dir", "s", "--releases", "1"],
        ),
        // sqfs and iso
        (
            "missing directory",
            &["sqfs", "pack", "-D", "nope", "out.sqfs"],
        ),
        (
            "not a directory",
            &["sqfs", "pack", "-D", "wrong.txt", "out.sqfs"],
        ),
        (
            "bad block size",
            &["sqfs", "pack", "-D", "empty", "-b", "3", "out.sqfs"],
        ),
        ("missing image", &["sqfs", "ls", "nope.sqfs"]),
        ("not an image", &["sqfs", "ls", "wrong.txt"]),
        (
            "offset past the end",
            &["sqfs", "info", "-o", "4096", "wrong.txt"],
        ),
        ("not an image", &["sqfs", "info", "wrong.txt"]),
        (
            "not in the image",
            &[
                "sqfs",
                "cat",
                "--in-iso",
                "live/filesystem.squashfs",
                iso71,
                "nope",
            ],
        ),
        (
            "not in the ISO",
            &["sqfs", "ls", "--in-iso", "nope.squashfs", iso71],
        ),
        ("missing ISO", &["iso", "ls", "nope.iso"]),
        ("not an ISO", &["iso", "ls", "wrong.txt"]),
        ("not in the ISO", &["iso", "cat", iso71, "nope"]),
        ("a directory", &["iso", "extent", iso71, "live"]),
    ];
    let before = listing(w);
    let mut wrong = Vec::new();
    for (what, args) in cases {
        let (c, err) = code(w, args);
        let said = err.lines().find(|l| l.contains("error")).unwrap_or("");
        if c != 2 || said.is_empty() || err.contains("panicked") {
            wrong.push(format!("{what}: iukfarm {args:?}: exit {c}\n{err}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert_eq!(
        listing(w),
        before,
        "a refused command wrote or removed a file"
    );

    // Work that fails is exit 1: a kit that is not one, checked against
    // real ISOs.
    let (c, err) = code(
        w,
        &[
            "verify-iuk",
            "--old-iso",
            iso70,
            "--new-iso",
            iso71,
            "wrong.txt",
        ],
    );
    assert_eq!(c, 1, "{err}");
}

#[test]
fn a_listing_whose_reader_goes_away_ends_quietly() {
    let d = tempfile::tempdir().unwrap();
    let tree = d.path().join("tree");
    fs::create_dir(&tree).unwrap();
    for i in 0..5000 {
        fs::write(tree.join(format!("f{i:05}")), i.to_string()).unwrap();
    }
    let img = d.path().join("big.sqfs");
    run(Command::new(iukfarm())
        .args(["sqfs", "pack", "-q", "-D"])
        .arg(&tree)
        .arg(&img));
    for args in [vec!["sqfs", "ls"], vec!["sqfs", "cat", "f00001"]] {
        let mut args: Vec<String> = args.into_iter().map(String::from).collect();
        args.insert(2, img.display().to_string());
        // `| head -1`: one line read, then the pipe closed.
        let mut child = Command::new(iukfarm())
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        let quiet = out.status.code() == Some(0) || out.status.signal() == Some(libc::SIGPIPE);
        assert!(
            quiet,
            "{args:?}: {} after the reader left:\n{err}",
            out.status
        );
        assert!(err.is_empty(), "{args:?}: {err}");
        assert!(!first.is_empty());
    }
}
