//! Publishing a release's IUKs on the rsync server, the end of Tails'
//! release process (`copy-iuks-to-rsync-server-and-verify`, `publish-iuks`,
//! `update-trace-time`): the kits are copied over ssh into a staging
//! directory with `rsync --partial --inplace` (a cut connection resumes),
//! checked *on the server* against the RM's own build, and then promoted
//! into the final directory with Tails' owner and modes, checked again in
//! the same remote script, so nothing unchecked is ever promoted.
//!
//! Every step is idempotent: a kit already in place with the right digest
//! is not sent again, one already promoted is checked where it is.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad options or inputs: nothing was done.
    #[error("{0}")]
    Usage(String),
    /// The kits differ from the RM's build (or their copies on the server
    /// do): each is named.
    #[error("{} differ from the RM's build: {}", .0.len(), .0.join(", "))]
    Mismatch(Vec<String>),
    /// ssh, rsync or the server failed; running the same command again
    /// resumes.
    #[error("{0}")]
    Remote(String),
}

/// A kit of the release, as the signed manifest names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kit {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

/// The server and how to reach it.
#[derive(Debug, Clone)]
pub struct Remote {
    /// The ssh command and its options, e.g. `["ssh", "-p", "2222"]`;
    /// empty for a "server" that is this machine ([`Remote::local`]).
    pub ssh: Vec<String>,
    /// `user@host`.
    pub host: String,
    /// Run chown, chmod, mv and the trace update through sudo.
    pub sudo: bool,
}

/// Parses a `sha256sum` file (`<hex>  <name>`, or `<hex> *<name>`).
pub fn parse_sums(text: &str) -> Result<BTreeMap<String, String>, Error> {
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = || Error::Usage(format!("line {}: not a sha256sum line: {line:?}", n + 1));
        let (hex, rest) = line.split_once(' ').ok_or_else(bad)?;
        let name = rest
            .strip_prefix(' ')
            .or_else(|| rest.strip_prefix('*'))
            .ok_or_else(bad)?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        // The RM's file may name paths; the kits are compared by name.
        let name = name.rsplit('/').next().unwrap_or(name);
        if out
            .insert(name.to_string(), hex.to_ascii_lowercase())
            .is_some()
        {
            return Err(Error::Usage(format!("{name} is listed twice")));
        }
    }
    Ok(out)
}

/// The RM's build against the release: the same kits, the same digests.
/// Every difference is named.
pub fn compare_with_rm(kits: &[Kit], rm: &BTreeMap<String, String>) -> Result<(), Error> {
    let mut bad = Vec::new();
    for k in kits {
        match rm.get(&k.name) {
            Some(h) if *h == k.sha256 => {}
            Some(h) => bad.push(format!("{} (release {}, RM {h})", k.name, k.sha256)),
            None => bad.push(format!("{} (not in the RM's build)", k.name)),
        }
    }
    for name in rm.keys() {
        if !kits.iter().any(|k| &k.name == name) {
            bad.push(format!("{name} (only in the RM's build)"));
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(Error::Mismatch(bad))
    }
}

/// Names and remote directories end up in shell commands on the server:
/// only what needs no quoting at all.
pub fn check_name(what: &str, s: &str) -> Result<(), Error> {
    let ok = !s.is_empty()
        && !s.starts_with(['.', '-'])
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._~+-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::Usage(format!(
            "{what} {s:?} is not a plain file name"
        )))
    }
}

pub fn check_remote_dir(what: &str, s: &str) -> Result<(), Error> {
    let ok = s.starts_with('/')
        && !s.split('/').any(|c| c == "..")
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._~+-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::Usage(format!(
            "{what} {s:?} must be an absolute path of plain characters"
        )))
    }
}

impl Remote {
    /// This machine as the server: the same scripts and rsync, without
    /// ssh (the demo's "server", and tests).
    pub fn local() -> Remote {
        Remote {
            ssh: Vec::new(),
            host: "localhost".into(),
            sudo: false,
        }
    }

    /// `sh -s` on the server.
    fn shell(&self) -> Command {
        match self.ssh.split_first() {
            Some((ssh, opts)) => {
                let mut c = Command::new(ssh);
                // `--`: whatever the host is, ssh takes it for the host.
                c.args(opts).arg("--").arg(&self.host).args(["sh", "-s"]);
                c
            }
            None => {
                let mut c = Command::new("sh");
                c.arg("-s");
                c
            }
        }
    }

    /// Runs a POSIX shell script on the server; returns its standard output.
    fn script(&self, script: &str) -> Result<(i32, String), Error> {
        let mut child = self
            .shell()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                let what = self.ssh.first().map_or("sh", String::as_str);
                Error::Remote(format!("running {what}: {e}"))
            })?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(script.as_bytes())
            .map_err(|e| Error::Remote(format!("ssh {}: {e}", self.host)))?;
        let out = child
            .wait_with_output()
            .map_err(|e| Error::Remote(format!("ssh {}: {e}", self.host)))?;
        let code = out.status.code().unwrap_or(-1);
        // 255: ssh itself failed (connection refused, cut, host key).
        if code == 255 {
            return Err(Error::Remote(format!(
                "ssh {}: {}",
                self.host,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok((code, String::from_utf8_lossy(&out.stdout).into_owned()))
    }

    fn sudo(&self) -> &'static str {
        if self.sudo { "sudo " } else { "" }
    }
}

/// The check run on the server: each kit found in `dirs` (the first that
/// holds it) hashed with sha256sum; prints `OK name`, `BAD name` or
/// `MISSING name`.
fn check_script(kits: &[Kit], dirs: &[&str]) -> String {
    let mut s = String::from("set -u\n");
    for k in kits {
        let mut find = String::new();
        for d in dirs {
            find.push_str(&format!(
                "if [ -z \"$f\" ] && [ -f {d}/{n} ]; then f={d}/{n}; fi\n",
                n = k.name
            ));
        }
        s.push_str(&format!(
            "f=\n{find}if [ -z \"$f\" ]; then echo MISSING {n}\n\
             elif [ \"$(sha256sum < \"$f\" | cut -d' ' -f1)\" = {h} ]; then echo OK {n}\n\
             else echo BAD {n}; fi\n",
            n = k.name,
            h = k.sha256
        ));
    }
    s
}

/// What the server holds of each kit.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Check {
    pub ok: Vec<String>,
    pub bad: Vec<String>,
    pub missing: Vec<String>,
}

fn parse_check(kits: &[Kit], out: &str) -> Result<Check, Error> {
    let mut c = Check::default();
    for k in kits {
        let said = out.lines().find_map(|l| {
            let (verdict, name) = l.split_once(' ')?;
            (name == k.name).then_some(verdict)
        });
        match said {
            Some("OK") => c.ok.push(k.name.clone()),
            Some("BAD") => c.bad.push(k.name.clone()),
            Some("MISSING") => c.missing.push(k.name.clone()),
            _ => {
                return Err(Error::Remote(format!(
                    "the server's check said nothing of {}",
                    k.name
                )));
            }
        }
    }
    Ok(c)
}

/// Hashes, on the server, the copies of `kits` in `dirs`.
pub fn check(remote: &Remote, kits: &[Kit], dirs: &[&str]) -> Result<Check, Error> {
    let (code, out) = remote.script(&check_script(kits, dirs))?;
    if code != 0 {
        return Err(Error::Remote(format!(
            "the check on {} failed (exit {code})",
            remote.host
        )));
    }
    parse_check(kits, &out)
}

/// Copies `names` from `local_dir` into `staging` on the server, resuming
/// partial copies. `checksum`: compare contents, not size and time, to
/// decide what to send (for copies found damaged).
pub fn upload(
    remote: &Remote,
    local_dir: &Path,
    names: &[String],
    staging: &str,
    bwlimit_kib: Option<u32>,
    checksum: bool,
) -> Result<(), Error> {
    if names.is_empty() {
        return Ok(());
    }
    let mut c = Command::new("rsync");
    c.args(["--partial", "--inplace", "--times", "--chmod=F644"]);
    let target = if remote.ssh.is_empty() {
        format!("{staging}/")
    } else {
        c.arg("--rsh").arg(remote.ssh.join(" "));
        format!("{}:{staging}/", remote.host)
    };
    if checksum {
        c.arg("--checksum");
    }
    if let Some(kib) = bwlimit_kib {
        c.arg(format!("--bwlimit={kib}"));
    }
    c.args(names.iter().map(|n| local_dir.join(n))).arg(target);
    let out = c
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::Remote(format!("running rsync (is it installed?): {e}")))?;
    if !out.status.success() {
        return Err(Error::Remote(format!(
            "rsync to {}:{staging} failed (exit {}): {}; run the same command again: it resumes \
             where the copy stopped",
            remote.host,
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Where promoted kits go and what else changes there.
#[derive(Debug, Clone)]
pub struct Promotion {
    pub final_dir: String,
    /// `user:group` for the kits (Tails: `root:rsync_tails`).
    pub owner: Option<String>,
    /// Gets the time (seconds since the epoch), as `update-trace-time`
    /// writes it.
    pub trace_file: Option<String>,
}

/// Moves the kits from `staging` into the final directory in one remote
/// script that first hashes every kit (in staging, or already in the
/// final directory from an earlier run) and stops before changing anything
/// if one is missing or differs. Returns how many were moved, or the
/// missing and wrong ones (`ok` left empty) when nothing was.
pub fn promote(
    remote: &Remote,
    kits: &[Kit],
    staging: &str,
    p: &Promotion,
) -> Result<Result<usize, Check>, Error> {
    let sudo = remote.sudo();
    let mut s = String::from("set -eu\nwrong=0\n");
    // Check all first, naming every wrong kit: nothing moves unless every
    // kit is right.
    for k in kits {
        s.push_str(&format!(
            "if [ -f {staging}/{n} ]; then f={staging}/{n}; elif [ -f {fin}/{n} ]; then f={fin}/{n}; \
             else f=; fi\n\
             if [ -z \"$f\" ]; then echo MISSING {n}; wrong=1\n\
             elif [ \"$(sha256sum < \"$f\" | cut -d' ' -f1)\" != {h} ]; then echo BAD {n}; wrong=1; fi\n",
            n = k.name,
            h = k.sha256,
            fin = p.final_dir
        ));
    }
    s.push_str("if [ \"$wrong\" -ne 0 ]; then exit 3; fi\nmoved=0\n");
    for k in kits {
        let mut steps = String::new();
        if let Some(o) = &p.owner {
            steps.push_str(&format!("{sudo}chown {o} {staging}/{n}\n", n = k.name));
        }
        steps.push_str(&format!(
            "{sudo}chmod u=rwX,go=rX {staging}/{n}\n{sudo}mv {staging}/{n} {fin}/{n}\nmoved=$((moved+1))\n",
            n = k.name,
            fin = p.final_dir
        ));
        s.push_str(&format!(
            "if [ -f {staging}/{n} ]; then\n{steps}fi\n",
            n = k.name
        ));
    }
    if let Some(t) = &p.trace_file {
        s.push_str(&format!(
            "if [ \"$moved\" -gt 0 ]; then date +%s | {sudo}tee {t}.new > /dev/null && {sudo}mv {t}.new {t}; fi\n"
        ));
    }
    s.push_str("echo MOVED $moved\n");
    let (code, out) = remote.script(&s)?;
    match code {
        0 => out
            .lines()
            .find_map(|l| l.strip_prefix("MOVED ")?.trim().parse().ok())
            .map(Ok)
            .ok_or_else(|| Error::Remote("the promotion script said nothing".into())),
        3 => {
            let named = |v: &str| {
                out.lines()
                    .filter_map(|l| l.strip_prefix(v).map(|n| n.trim().to_string()))
                    .collect::<Vec<_>>()
            };
            Ok(Err(Check {
                ok: Vec::new(),
                bad: named("BAD "),
                missing: named("MISSING "),
            }))
        }
        c => Err(Error::Remote(format!(
            "promoting on {} failed (exit {c}); nothing unchecked was moved",
            remote.host
        ))),
    }
}

/// Creates `dir` on the server (checked with [`check_remote_dir`]).
pub fn mkdir(remote: &Remote, dir: &str) -> Result<(), Error> {
    check_remote_dir("directory", dir)?;
    match remote.script(&format!("mkdir -p {dir}\n"))? {
        (0, _) => Ok(()),
        (c, _) => Err(Error::Remote(format!(
            "mkdir -p {dir} on {} failed (exit {c})",
            remote.host
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kit(n: &str, h: char) -> Kit {
        Kit {
            name: n.into(),
            size: 1,
            sha256: h.to_string().repeat(64),
        }
    }

    #[test]
    fn the_rm_build_is_compared_kit_by_kit() {
        let sums = format!(
            "{}  Tails_amd64_6.0_to_6.2.iuk\n{} *iuks/Tails_amd64_6.1_to_6.2.iuk\n",
            "a".repeat(64),
            "B".repeat(64)
        );
        let rm = parse_sums(&sums).unwrap();
        let kits = [
            kit("Tails_amd64_6.0_to_6.2.iuk", 'a'),
            kit("Tails_amd64_6.1_to_6.2.iuk", 'b'),
        ];
        compare_with_rm(&kits, &rm).unwrap();
        let Err(Error::Mismatch(bad)) =
            compare_with_rm(&[kit("Tails_amd64_6.0_to_6.2.iuk", 'c')], &rm)
        else {
            panic!("a mismatch")
        };
        assert_eq!(bad.len(), 2, "{bad:?}");
        assert!(bad[0].starts_with("Tails_amd64_6.0_to_6.2.iuk (release cc"));
        assert!(bad[1].contains("only in the RM's build"));
        assert!(parse_sums("zz  x\n").is_err());
        assert!(parse_sums(&format!("{}  x\n{}  x\n", "a".repeat(64), "a".repeat(64))).is_err());
    }

    #[test]
    fn nothing_that_needs_quoting_reaches_the_server() {
        check_name("kit", "Tails_amd64_6.0~rc1_to_6.2.iuk").unwrap();
        for bad in ["", "a b", "a;b", "-x", ".x", "a/b", "$(x)", "a'b"] {
            assert!(check_name("kit", bad).is_err(), "{bad:?}");
        }
        check_remote_dir("staging", "/srv/tmp").unwrap();
        for bad in ["srv", "/srv/../etc", "/srv/a b", "/srv/$x"] {
            assert!(check_remote_dir("staging", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn promotion_moves_nothing_unless_every_kit_matches() {
        use sha2::{Digest, Sha256};
        let d = tempfile::tempdir().unwrap();
        let (staging, fin) = (d.path().join("staging"), d.path().join("final"));
        std::fs::create_dir_all(&staging).unwrap();
        std::fs::create_dir_all(&fin).unwrap();
        let kit = |n: &str, bytes: &[u8]| Kit {
            name: n.into(),
            size: bytes.len() as u64,
            sha256: Sha256::digest(bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
        };
        let kits = [kit("a.iuk", b"kit a"), kit("b.iuk", b"kit b")];
        std::fs::write(staging.join("a.iuk"), b"kit a").unwrap();
        std::fs::write(staging.join("b.iuk"), b"kit B").unwrap();
        let p = Promotion {
            final_dir: fin.to_str().unwrap().into(),
            owner: None,
            trace_file: Some(d.path().join("trace").to_str().unwrap().into()),
        };
        let (r, staging) = (Remote::local(), staging.to_str().unwrap());
        let wrong = promote(&r, &kits, staging, &p).unwrap().unwrap_err();
        assert_eq!(
            (wrong.bad, wrong.missing),
            (vec!["b.iuk".to_string()], vec![])
        );
        assert!(
            std::fs::read_dir(&fin).unwrap().next().is_none(),
            "nothing moved"
        );
        assert!(!d.path().join("trace").exists());

        std::fs::write(d.path().join("b.iuk"), b"kit b").unwrap();
        upload(&r, d.path(), &["b.iuk".into()], staging, None, true).unwrap();
        assert_eq!(promote(&r, &kits, staging, &p).unwrap().unwrap(), 2);
        assert_eq!(std::fs::read(fin.join("b.iuk")).unwrap(), b"kit b");
        assert!(d.path().join("trace").exists());
        assert_eq!(promote(&r, &kits, staging, &p).unwrap().unwrap(), 0);
        std::fs::remove_file(fin.join("a.iuk")).unwrap();
        let wrong = promote(&r, &kits, staging, &p).unwrap().unwrap_err();
        assert_eq!(wrong.missing, ["a.iuk"]);
    }

    #[test]
    fn the_server_s_verdicts_are_read_kit_by_kit() {
        let kits = [kit("a.iuk", 'a'), kit("b.iuk", 'b'), kit("c.iuk", 'c')];
        let c = parse_check(&kits, "OK a.iuk\nBAD b.iuk\nMISSING c.iuk\n").unwrap();
        assert_eq!(c.ok, ["a.iuk"]);
        assert_eq!(c.bad, ["b.iuk"]);
        assert_eq!(c.missing, ["c.iuk"]);
        assert!(parse_check(&kits, "OK a.iuk\n").is_err());
        let s = check_script(&kits[..1], &["/s", "/f"]);
        assert!(s.contains("[ -f /s/a.iuk ]") && s.contains("[ -f /f/a.iuk ]"));
    }
}
