//! Helpers for the farm's end-to-end tests: a sample ISO archive, OpenPGP
//! and TLS material, and coordinator/worker processes on loopback that are
//! killed when the test ends, whatever happens.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::{iukfarm, run, sha256_file};

/// SOURCE_DATE_EPOCH of the newest of `iukfarm samples`' releases (each
/// older one is dated four weeks before the next).
pub const SDE: &str = "1730285444";

/// A sample ISO archive shared by the tests of one binary: releases
/// 7.0 ... 7.(n-1) (6.x with `--layout 6`), each
/// `tails-amd64-<v>/tails-amd64-<v>.iso`.
pub struct Archive {
    pub dir: tempfile::TempDir,
    pub versions: Vec<String>,
}

impl Archive {
    pub fn make(releases: u32) -> Archive {
        Archive::make_with(releases, &[])
    }

    /// [`Archive::make`] with more `iukfarm samples` options.
    pub fn make_with(releases: u32, extra: &[&str]) -> Archive {
        let dir = tempfile::tempdir().unwrap();
        run(Command::new(iukfarm())
            .args([
                "samples",
                "--releases",
                &releases.to_string(),
                "--scale",
                "1",
                "--output-dir",
            ])
            .arg(dir.path())
            .args(extra));
        let major = match extra.windows(2).find(|w| w[0] == "--layout") {
            Some(w) => w[1],
            None => "7",
        };
        Archive {
            dir,
            versions: (0..releases).map(|r| format!("{major}.{r}")).collect(),
        }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn iso(&self, v: &str) -> PathBuf {
        self.root()
            .join(format!("tails-amd64-{v}/tails-amd64-{v}.iso"))
    }

    pub fn new_version(&self) -> &str {
        self.versions.last().unwrap()
    }

    pub fn sources(&self) -> &[String] {
        &self.versions[..self.versions.len() - 1]
    }
}

/// The five-release archive most farm tests use (4 IUKs to 6.4).
pub fn archive() -> &'static Archive {
    static A: OnceLock<Archive> = OnceLock::new();
    A.get_or_init(|| {
        let a = Archive::make(5);
        crate::remove_at_exit(a.dir.path(), false);
        a
    })
}

/// sha256 of `iukfarm build` run locally for each source of [`archive`].
pub fn local_builds() -> &'static Vec<(String, String)> {
    static B: OnceLock<Vec<(String, String)>> = OnceLock::new();
    B.get_or_init(|| {
        let a = archive();
        builds_of(a, a.new_version(), a.sources())
    })
}

/// Names and sha256 of the IUKs `iukfarm build` makes locally from each
/// of `sources` to `new`, sorted by name.
pub fn builds_of(a: &Archive, new: &str, sources: &[String]) -> Vec<(String, String)> {
    let d = tempfile::tempdir().unwrap();
    let mut v: Vec<(String, String)> = sources
        .iter()
        .map(|v| {
            let name = format!("Tails_amd64_{v}_to_{new}.iuk");
            let out = d.path().join(&name);
            run(Command::new(iukfarm())
                .args(["build", "--quiet", "--source-date-epoch", SDE, "--old-iso"])
                .arg(a.iso(v))
                .arg("--new-iso")
                .arg(a.iso(new))
                .arg("--out")
                .arg(&out));
            (name, sha256_file(&out))
        })
        .collect();
    v.sort();
    v
}

/// `iukfarm release` of `archive`'s newest version from all the others,
/// with workers in process, signed with [`gpg`]'s key, into `out`.
pub fn signed_release(archive: &Archive, out: &Path) {
    run(Command::new(iukfarm())
        .arg("release")
        .args(["--new-version", archive.new_version()])
        .args(["--source-versions", &archive.sources().join(" ")])
        .args(["--source-date-epoch", SDE])
        .arg("--iso-root")
        .arg(archive.root())
        .arg("--output-dir")
        .arg(out)
        .arg("--signing-key")
        .arg(&gpg().secret_key));
}

/// A GnuPG home with an unprotected Ed25519 signing key; its secret key
/// exported to a file (for --signing-key) and its certificate.
pub struct Gpg {
    pub home: tempfile::TempDir,
    pub secret_key: PathBuf,
    pub cert: PathBuf,
    /// `gpg --export-options export-minimal`, as Tails publishes
    /// `tails-signing-minimal.key`.
    pub minimal_cert: PathBuf,
    pub fingerprint: String,
}

impl Gpg {
    pub fn generate() -> Gpg {
        crate::require_tool("gpg");
        let home = tempfile::tempdir().unwrap();
        fs::set_permissions(
            home.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        let g = |args: &[&str]| {
            run(Command::new("gpg")
                .env("GNUPGHOME", home.path())
                .args(["--batch", "--pinentry-mode", "loopback", "--passphrase", ""])
                .args(args))
        };
        g(&[
            "--quick-gen-key",
            "iukfarm test RM <rm@example.invalid>",
            "ed25519",
            "sign",
            "never",
        ]);
        let out = g(&["--with-colons", "--list-keys"]);
        let fingerprint = String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.starts_with("fpr:"))
            .and_then(|l| l.split(':').nth(9))
            .expect("a fingerprint")
            .to_string();
        // Like Tails' key: signatures come from an Ed25519 signing subkey,
        // so that a minimal export must carry it for them to verify.
        g(&["--quick-add-key", &fingerprint, "ed25519", "sign", "never"]);
        let minimal_cert = home.path().join("cert-minimal.asc");
        fs::write(
            &minimal_cert,
            g(&[
                "--armor",
                "--export-options",
                "export-minimal",
                "--export",
                &fingerprint,
            ])
            .stdout,
        )
        .unwrap();
        let secret_key = home.path().join("secret.asc");
        fs::write(
            &secret_key,
            g(&["--armor", "--export-secret-keys", &fingerprint]).stdout,
        )
        .unwrap();
        let cert = home.path().join("cert.asc");
        fs::write(&cert, g(&["--armor", "--export", &fingerprint]).stdout).unwrap();
        let gpg = Gpg {
            home,
            secret_key,
            cert,
            minimal_cert,
            fingerprint,
        };
        // Statics are never dropped: stop the agent key generation started.
        gpg.kill_agent();
        gpg
    }

    /// Stops the gpg-agent of this home (signing starts one); nothing may
    /// outlive the tests.
    pub fn kill_agent(&self) {
        let _ = Command::new("gpgconf")
            .env("GNUPGHOME", self.home.path())
            .args(["--kill", "all"])
            .status();
    }

    /// Checks a detached signature as Tails' CI and Upgrader do (sqopv, the
    /// verify-only Sequoia SOP; here `sqop verify`, the same code), against
    /// the full certificate and the minimal export.
    pub fn sop_verify(&self, signature: &Path, data: &Path) {
        crate::require_tool("sqop");
        for cert in [&self.cert, &self.minimal_cert] {
            let out = Command::new("sqop")
                .arg("verify")
                .arg(signature)
                .arg(cert)
                .stdin(fs::File::open(data).unwrap())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "sqop verify {} against {}: {}",
                signature.display(),
                cert.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("GNUPGHOME", self.home.path());
        c
    }
}

/// Stops the shared key's gpg-agent when a test that signs through gpg ends.
pub struct AgentGuard(pub &'static Gpg);

impl Drop for AgentGuard {
    fn drop(&mut self) {
        self.0.kill_agent();
    }
}

pub fn gpg() -> &'static Gpg {
    static G: OnceLock<Gpg> = OnceLock::new();
    G.get_or_init(|| {
        let g = Gpg::generate();
        crate::remove_at_exit(g.home.path(), true);
        g
    })
}

/// A token file in `dir`.
pub fn token_file(dir: &Path, token: &str) -> PathBuf {
    let p = dir.join(format!("token-{token}"));
    fs::write(&p, format!("{token}\n")).unwrap();
    p
}

/// A self-signed certificate for localhost/127.0.0.1, and its key (PEM).
pub fn tls_files(dir: &Path) -> (PathBuf, PathBuf) {
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    fs::write(&cert, ck.cert.pem()).unwrap();
    fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

/// A child process of the test, with its stderr in a log file; killed on drop.
pub struct Proc {
    pub name: String,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
    status: Option<ExitStatus>,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(fs::File::create(dir.path().join("out")).unwrap())
            .stderr(fs::File::create(&log).unwrap())
            .env("IUKFARM_LOG", "info")
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Proc {
            name: name.into(),
            child,
            log,
            _dir: dir,
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn stdout(&self) -> String {
        fs::read_to_string(self.log.with_file_name("out")).unwrap_or_default()
    }

    /// Exit status, if it has exited.
    pub fn poll(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().unwrap();
        }
        self.status
    }

    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let t = Instant::now();
        loop {
            if let Some(s) = self.poll() {
                return s;
            }
            assert!(
                t.elapsed() < timeout,
                "{} did not finish within {timeout:?}; its log:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kill9(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        self.status = Some(self.child.wait().unwrap());
    }

    /// Waits until the log contains `needle`; panics if the process exits first.
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) -> String {
        let t = Instant::now();
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            if let Some(s) = self.poll() {
                panic!(
                    "{} exited ({s}) before logging {needle:?}:\n{log}",
                    self.name
                );
            }
            assert!(
                t.elapsed() < timeout,
                "{} never logged {needle:?}:\n{log}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Peak resident memory so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.poll().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The `iukfarm coordinator` command for a release of `archive`,
/// listening on an ephemeral loopback port.
pub fn coordinator_cmd(archive: &Archive, out: &Path, extra: &[&str]) -> Command {
    let (new, sources) = (archive.new_version(), archive.sources());
    coordinator_cmd_for(archive, new, sources, out, "127.0.0.1:0", extra)
}

/// The `iukfarm coordinator` command for a release of `new` from
/// `sources`, all of `archive`, listening on `listen`.
pub fn coordinator_cmd_for(
    archive: &Archive,
    new: &str,
    sources: &[String],
    out: &Path,
    listen: &str,
    extra: &[&str],
) -> Command {
    coordinator_cmd_dated(archive, new, sources, SDE, out, listen, extra)
}

/// [`coordinator_cmd_for`] with another SOURCE_DATE_EPOCH.
pub fn coordinator_cmd_dated(
    archive: &Archive,
    new: &str,
    sources: &[String],
    sde: &str,
    out: &Path,
    listen: &str,
    extra: &[&str],
) -> Command {
    let mut cmd = Command::new(iukfarm());
    cmd.arg("coordinator")
        .args(["--new-version", new])
        .args(["--source-versions", &sources.join(" ")])
        .args(["--source-date-epoch", sde])
        .arg("--iso-root")
        .arg(archive.root())
        .arg("--output-dir")
        .arg(out)
        .args(["--listen", listen])
        .args(extra);
    cmd
}

/// Starts a coordinator; returns the process and its address.
pub fn start_coordinator(cmd: &mut Command) -> (Proc, String) {
    let mut p = Proc::spawn("coordinator", cmd);
    let log = p.wait_log("listening on ", Duration::from_secs(120));
    let addr = log
        .lines()
        .find_map(|l| l.split("iukfarm coordinator: listening on ").nth(1))
        .expect("the coordinator prints its address")
        .trim()
        .to_string();
    (p, addr)
}

/// [`start_coordinator`] of [`coordinator_cmd`].
pub fn coordinator(archive: &Archive, out: &Path, extra: &[&str]) -> (Proc, String) {
    start_coordinator(&mut coordinator_cmd(archive, out, extra))
}

/// `iukfarm worker` connecting to `url`.
pub fn worker(name: &str, url: &str, cache: &Path, extra: &[&str]) -> Proc {
    let mut cmd = Command::new(iukfarm());
    cmd.args(["worker", "--name", name, "--coordinator", url])
        .arg("--cache-dir")
        .arg(cache.join(name))
        .args(extra);
    Proc::spawn(name, &mut cmd)
}

/// `iukfarm status --json` as JSON (None while the coordinator is unreachable).
pub fn status(url: &str, extra: &[&str]) -> Option<serde_json::Value> {
    let out = Command::new(iukfarm())
        .args(["status", "--json", "--coordinator", url])
        .args(extra)
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).expect("status --json is JSON"))
}

/// Waits until `f` holds.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < timeout, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The IUKs in `dir` with their digests, sorted by name.
pub fn iuks_in(dir: &Path) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".iuk"))
        .map(|n| (n.clone(), sha256_file(&dir.join(&n))))
        .collect();
    v.sort();
    v
}

/// Files left in the workers' job directories (must be none).
pub fn leftover_job_files(cache: &Path) -> Vec<PathBuf> {
    let mut left = Vec::new();
    if let Ok(workers) = fs::read_dir(cache) {
        for w in workers.flatten() {
            if let Ok(jobs) = fs::read_dir(w.path().join("jobs")) {
                left.extend(jobs.flatten().map(|e| e.path()));
            }
        }
    }
    left
}

/// Runs a CI job's release script (`job`: the shell and its script, with
/// the CI system's own variables set) in `project` as the CI's shell would
/// on the coordinator host: the farm's binary on PATH, a release file for
/// the archive, the parameters NEW_VERSION, SOURCE_VERSIONS and
/// SOURCE_DATE_EPOCH set, and (`serves`: the job is expected to get that
/// far) a worker started once the coordinator listens. Returns the exit
/// code and everything the job printed.
pub fn run_ci_job(
    a: &Archive,
    project: &Path,
    sde: &str,
    serves: bool,
    mut job: Command,
) -> (i32, String) {
    const LONG: Duration = Duration::from_secs(600);
    let g = gpg();
    let release_file = project.join("release.toml");
    fs::write(
        &release_file,
        format!(
            "iso-root = {:?}\nlisten = \"127.0.0.1:0\"\nsigning-key = {:?}\n",
            a.root(),
            g.secret_key
        ),
    )
    .unwrap();
    let bin_dir = iukfarm().parent().unwrap().to_path_buf();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap());
    let mut c = Proc::spawn(
        "build_IUKs",
        job.current_dir(project)
            .env("PATH", path)
            .env("NEW_VERSION", a.new_version())
            .env("SOURCE_VERSIONS", a.sources().join(" "))
            .env("SOURCE_DATE_EPOCH", sde)
            .env("IUKFARM_RELEASE_FILE", &release_file),
    );
    let mut _w = None;
    if serves {
        let log = c.wait_log("listening on ", LONG);
        let addr = log
            .lines()
            .find_map(|l| l.split("iukfarm coordinator: listening on ").nth(1))
            .unwrap()
            .trim()
            .to_string();
        _w = Some(worker(
            "w",
            &format!("http://{addr}"),
            &project.join("cache"),
            &["--once", "--iso-root", a.root().to_str().unwrap()],
        ));
    }
    let code = c.wait(LONG).code().unwrap_or(-1);
    (code, c.stdout() + &c.log())
}
