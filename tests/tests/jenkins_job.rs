//! `dist/jenkins/build_IUKs.yaml`, Tails' `build_IUKs` Jenkins job on the
//! farm: rendered by jenkins-job-builder itself (`jenkins-jobs test`, as
//! Tails' jenkins-jobs are deployed), its parameters, node and publishers
//! checked in the job XML Jenkins would load, and its release step run for
//! real (bash, as Jenkins' shell builder runs it) against a sample archive
//! with a worker on loopback.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use iukfarm_tests::farm::{Archive, run_ci_job};
use iukfarm_tests::{require_tool, run};

/// The job's config.xml as jenkins-job-builder renders it.
fn rendered(out: &Path) -> String {
    require_tool("jenkins-jobs");
    let jobs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/jenkins");
    run(Command::new("jenkins-jobs")
        .args(["--conf", "/dev/null", "test"])
        .arg(&jobs)
        .arg("-o")
        .arg(out));
    fs::read_to_string(out.join("build_IUKs")).unwrap()
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// The text of every `<tag>` element, in order.
fn all(xml: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    xml.split(&open)
        .skip(1)
        .map(|rest| unescape(&rest[..rest.find(&close).unwrap()]))
        .collect()
}

#[test]
fn jenkins_job_builder_renders_a_job_with_build_iuks_parameters() {
    let d = tempfile::tempdir().unwrap();
    let xml = rendered(d.path());
    let params = all(&xml, "name");
    for p in [
        "TAILS_GIT_COMMIT",
        "SOURCE_DATE_EPOCH",
        "NEW_VERSION",
        "SOURCE_VERSIONS",
        "EXTRA_ARGS",
        "IUKFARM_COMMIT",
    ] {
        assert!(params.contains(&p.to_string()), "parameter {p}: {params:?}");
    }
    assert_eq!(all(&xml, "assignedNode"), ["iukfarm-coordinator"]);
    assert_eq!(all(&xml, "testResults"), ["junit.xml"]);
    assert!(all(&xml, "artifacts")[0].contains("release/*"), "{xml}");
    let steps = all(&xml, "command");
    assert_eq!(steps.len(), 2, "{xml}");
    // The engine is pinned to a full commit id, checked before anything.
    assert!(steps[0].contains("IUKFARM_COMMIT must be a full commit id"));
    assert!(steps[0].contains("cargo build --release --locked"));
    for flag in [
        "--new-version \"$NEW_VERSION\"",
        "--source-versions \"$SOURCE_VERSIONS\"",
        "--source-date-epoch \"$SOURCE_DATE_EPOCH\"",
        "--junit \"$WORKSPACE/junit.xml\"",
        "${EXTRA_ARGS:-}",
    ] {
        assert!(steps[1].contains(flag), "{flag}");
    }
}

/// Runs the job's release step as Jenkins' shell builder would.
fn run_step(a: &Archive, workspace: &Path, extra: &str, serves: bool) -> (i32, String) {
    let xml = rendered(&workspace.join("jobs"));
    let step = all(&xml, "command").remove(1);
    let script: PathBuf = workspace.join("step.sh");
    fs::write(&script, step).unwrap();
    let mut c = Command::new("bash");
    c.arg(&script)
        .env("WORKSPACE", workspace)
        .env("TAILS_GIT_COMMIT", "0".repeat(40))
        .env("EXTRA_ARGS", extra)
        .env("OUTPUT_DIR", workspace.join("iuks"));
    run_ci_job(a, workspace, iukfarm_tests::farm::SDE, serves, c)
}

#[test]
fn the_jobs_release_step_runs_a_release_and_maps_its_exit_codes() {
    let a = Archive::make(3);
    let d = tempfile::tempdir().unwrap();
    let ok = d.path().join("ok");
    fs::create_dir_all(&ok).unwrap();
    let (code, out) = run_step(&a, &ok, "--verify-jobs 2", true);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("build_IUKs: every IUK built, verified and signed"),
        "{out}"
    );
    let junit = fs::read_to_string(ok.join("junit.xml")).unwrap();
    assert_eq!(junit.matches("<testcase ").count(), 2, "{junit}");
    for f in ["manifest.json", "manifest.json.asc", "SHA256SUMS"] {
        assert!(ok.join("release").join(f).is_file(), "artifact release/{f}");
    }

    let bad = d.path().join("bad");
    fs::create_dir_all(&bad).unwrap();
    // EXTRA_ARGS reaches the coordinator: a bad value there is refused.
    let (code, out) = run_step(&a, &bad, "--verify-jobs 0", false);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("build_IUKs: bad parameters or inputs"),
        "{out}"
    );
}
