//! `dist/gitlab-ci.yml`, Tails' `build_IUKs` job on the farm: parsed as
//! YAML, its parameters and artifacts checked, and its script run for real
//! (bash, as GitLab's shell executor runs it) against a sample archive with
//! a worker on loopback; its exit codes as documented.

use iukfarm_tests::farm::{Archive, run_ci_job};
use std::fs;
use std::path::Path;
use std::process::Command;
use yaml_rust2::{Yaml, YamlLoader};

fn job() -> (Yaml, Yaml) {
    let text =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/gitlab-ci.yml"))
            .unwrap();
    let doc = YamlLoader::load_from_str(&text).unwrap().remove(0);
    (doc["variables"].clone(), doc["build_IUKs"].clone())
}

fn lines(y: &Yaml) -> Vec<String> {
    y.as_vec()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_job_takes_build_iuks_parameters_and_keeps_the_report_and_manifest() {
    let (vars, job) = job();
    for v in [
        "NEW_VERSION",
        "SOURCE_VERSIONS",
        "SOURCE_DATE_EPOCH",
        "IUKFARM_COMMIT",
    ] {
        assert!(!vars[v].is_badvalue(), "parameter {v}");
    }
    assert_eq!(job["artifacts"]["when"].as_str(), Some("always"));
    assert_eq!(
        job["artifacts"]["reports"]["junit"].as_str(),
        Some("junit.xml")
    );
    let paths = lines(&job["artifacts"]["paths"]);
    assert!(paths.contains(&"release/".to_string()), "{paths:?}");
    let script = lines(&job["script"]).join("\n");
    for flag in [
        "--new-version \"$NEW_VERSION\"",
        "--source-versions \"$SOURCE_VERSIONS\"",
        "--source-date-epoch \"$SOURCE_DATE_EPOCH\"",
        "--junit \"$CI_PROJECT_DIR/junit.xml\"",
    ] {
        assert!(script.contains(flag), "{flag}");
    }
    // The engine is pinned to a full commit id.
    let before = lines(&job["before_script"]);
    let check = |commit: &str| {
        Command::new("bash")
            .args(["-eo", "pipefail", "-c", &before[..2].join("\n")])
            .env("NEW_VERSION", "6.2")
            .env("SOURCE_VERSIONS", "6.0 6.1")
            .env("SOURCE_DATE_EPOCH", "1")
            .env("IUKFARM_COMMIT", commit)
            .output()
            .unwrap()
            .status
            .code()
    };
    assert_eq!(check(&"a".repeat(40)), Some(0));
    assert_eq!(check("main"), Some(2));
    assert_eq!(check(""), Some(2));
}

/// Runs the job's script as GitLab's shell executor would, the farm's
/// binary on PATH; returns its exit code and output.
fn run_script(a: &Archive, project: &Path, sde: &str) -> (i32, String) {
    let (_, job) = job();
    let mut c = Command::new("bash");
    c.args(["-eo", "pipefail", "-c", &lines(&job["script"]).join("\n")])
        .env("CI_PROJECT_DIR", project)
        .env("OUTPUT_DIR", project.join("iuks"));
    run_ci_job(a, project, sde, sde.parse::<u32>().is_ok(), c)
}

#[test]
fn the_script_runs_a_release_and_maps_its_exit_codes() {
    let a = Archive::make(3);
    let d = tempfile::tempdir().unwrap();
    let ok = d.path().join("ok");
    fs::create_dir_all(&ok).unwrap();
    let (code, out) = run_script(&a, &ok, iukfarm_tests::farm::SDE);
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
    let (code, out) = run_script(&a, &bad, "yesterday");
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("build_IUKs: bad parameters or inputs"),
        "{out}"
    );
}
