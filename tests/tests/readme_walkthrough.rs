//! The README's walkthrough ("The whole path on one machine") run as it
//! is, so that what an RM pastes cannot rot: the block after the
//! `<!-- walkthrough -->` marker, with `iukfarm` on PATH, in an empty
//! directory; then what it must have made.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use iukfarm_tests::farm::Proc;
use iukfarm_tests::{iukfarm, require_tool, sha256_file};

/// The fenced block after the marker.
fn walkthrough() -> String {
    let readme = include_str!("../../README.md");
    let after = readme
        .split_once("<!-- walkthrough -->\n```sh\n")
        .expect("the README's walkthrough marker, then a sh block")
        .1;
    after
        .split_once("\n```")
        .expect("the block's end")
        .0
        .to_string()
}

fn files_named(dir: &Path, name: &str, found: &mut Vec<std::path::PathBuf>) {
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            files_named(&p, name, found);
        } else if p.file_name().is_some_and(|n| n == name) {
            found.push(p);
        }
    }
}

/// Kills a process group when dropped: what the script left running goes,
/// however the test ends (a timeout panics).
struct Group(i32);

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: a signal to the process group the script led.
        unsafe { libc::kill(-self.0, libc::SIGKILL) };
    }
}

#[test]
fn the_readme_walkthrough_runs_as_written() {
    require_tool("sqop");
    let d = tempfile::tempdir().unwrap();
    let script = d.path().join("walkthrough.sh");
    fs::write(&script, format!("set -euo pipefail\n{}\n", walkthrough())).unwrap();
    let work = d.path().join("try");
    fs::create_dir(&work).unwrap();
    let bin = iukfarm();
    let path = format!(
        "{}:{}",
        bin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new("bash");
    cmd.arg(&script)
        .current_dir(&work)
        .env("PATH", path)
        .env_remove("IUKFARM_COORDINATOR")
        .env_remove("IUKFARM_TOKEN_FILE")
        .env_remove("IUKFARM_METRICS_LISTEN")
        // Its own process group: whatever it left running goes with it.
        .process_group(0);
    let mut p = Proc::spawn("walkthrough", &mut cmd);
    let group = Group(p.pid() as i32);
    let status = p.wait(Duration::from_secs(900));
    drop(group);
    let log = format!("{}{}", p.stdout(), p.log());
    assert!(status.success(), "the walkthrough failed:\n{log}");

    // The kits: the farm's, fetched, and the RM's own build agrees.
    let mut kits: Vec<String> = fs::read_dir(work.join("iuks"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".iuk"))
        .collect();
    kits.sort();
    assert_eq!(
        kits,
        ["Tails_amd64_7.0_to_7.2.iuk", "Tails_amd64_7.1_to_7.2.iuk"],
        "{log}"
    );
    for f in ["SHA256SUMS", "manifest.json", "manifest.json.asc"] {
        assert!(work.join("iuks").join(f).is_file(), "{f}: {log}");
    }
    let mine = "Tails_amd64_7.1_to_7.2.iuk";
    assert_eq!(
        sha256_file(&work.join("rm-build").join(mine)),
        sha256_file(&work.join("iuks").join(mine))
    );
    // Both builders took part; the UDFs are signed by the RM's key.
    assert!(
        log.contains("builder1") && log.contains("builder2"),
        "{log}"
    );
    let (mut udfs, mut sigs) = (Vec::new(), Vec::new());
    files_named(&work.join("website"), "upgrades.yml", &mut udfs);
    files_named(&work.join("website"), "upgrades.yml.pgp", &mut sigs);
    assert!(
        !udfs.is_empty() && udfs.len() == sigs.len(),
        "{udfs:?} {sigs:?}\n{log}"
    );
}
