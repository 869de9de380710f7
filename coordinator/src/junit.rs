//! `--junit FILE`: one test case per IUK, so a CI job that launches the
//! coordinator shows each kit as passed or failed, with its log.

use std::path::Path;
use std::time::Duration;

use quick_junit::{NonSuccessKind, Report, TestCase, TestCaseStatus, TestSuite};

use crate::Error;
use crate::jobs::{Job, JobState};

pub fn write(path: &Path, suite_name: &str, jobs: &[Job]) -> Result<(), Error> {
    let mut suite = TestSuite::new(suite_name.to_string());
    for j in jobs {
        let status = match j.state {
            JobState::Done => TestCaseStatus::success(),
            JobState::Cancelled => {
                let mut s = TestCaseStatus::skipped();
                s.set_message(j.error.clone());
                s
            }
            _ => {
                let mut s = TestCaseStatus::non_success(NonSuccessKind::Failure);
                s.set_message(if j.error.is_empty() {
                    format!("ended {}", j.state.name())
                } else {
                    j.error.clone()
                });
                s
            }
        };
        let name = if j.reproduction_of.is_some() {
            format!("{} (reproduction)", j.output_name)
        } else {
            j.output_name.clone()
        };
        let mut tc = TestCase::new(name, status);
        tc.set_classname(suite_name.to_string());
        if let Some(b) = &j.built {
            tc.set_time(Duration::from_secs_f64(b.build_seconds.max(0.0)));
        }
        tc.set_system_out(j.log.join("\n"));
        suite.add_test_case(tc);
    }
    let mut report = Report::new("iukfarm");
    report.add_test_suite(suite);
    let xml = report
        .to_string()
        .map_err(|e| Error::Config(format!("JUnit report: {e}")))?;
    let tmp = path.with_extension("xml.tmp");
    std::fs::write(&tmp, xml)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| Error::io(path, e))
}
