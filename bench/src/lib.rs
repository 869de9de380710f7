//! Shared pieces of the benchmarks: measuring child processes and building
//! input trees from this machine's /usr.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

/// Wall time, CPU time (user + system, children included) and peak RSS of
/// one child process.
pub struct Measure {
    pub wall: f64,
    pub cpu: f64,
    pub max_rss_mib: f64,
}

/// Runs a command to completion and measures it (wall clock around
/// `wait4`, which reports CPU time and peak memory).
pub fn measure(cmd: &mut Command) -> Result<Measure> {
    let start = Instant::now();
    let child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our child; pointers are valid.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    let wall = start.elapsed().as_secs_f64();
    if rc < 0 {
        bail!("wait4: {}", std::io::Error::last_os_error());
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("{cmd:?} failed with status {status}");
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(Measure {
        wall,
        cpu: tv(ru.ru_utime) + tv(ru.ru_stime),
        max_rss_mib: ru.ru_maxrss as f64 / 1024.0,
    })
}

/// Copies regular files (and symlinks) from `sources` in sorted order until
/// `budget` bytes are copied; returns (bytes, files).
pub fn build_tree(dst: &Path, sources: &[String], budget: u64) -> Result<(u64, u64)> {
    let mut copied = 0u64;
    let mut files = 0u64;
    fn walk(src: &Path, dst: &Path, copied: &mut u64, files: &mut u64, budget: u64) -> Result<()> {
        let mut entries: Vec<_> = match fs::read_dir(src) {
            Ok(r) => r.flatten().collect(),
            Err(_) => return Ok(()),
        };
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            if *copied >= budget {
                return Ok(());
            }
            let p = e.path();
            let md = match fs::symlink_metadata(&p) {
                Ok(m) => m,
                Err(_) => continue,
            };
            let target = dst.join(e.file_name());
            if md.is_dir() {
                fs::create_dir_all(&target)?;
                walk(&p, &target, copied, files, budget)?;
            } else if md.is_file() && md.size() < 64 << 20 {
                if fs::copy(&p, &target).is_ok() {
                    *copied += md.size();
                    *files += 1;
                }
            } else if md.file_type().is_symlink()
                && let Ok(t) = fs::read_link(&p)
            {
                let _ = std::os::unix::fs::symlink(t, &target);
            }
        }
        Ok(())
    }
    for s in sources {
        let name = s.trim_matches('/').replace('/', "_");
        let d = dst.join(name);
        fs::create_dir_all(&d)?;
        walk(Path::new(s), &d, &mut copied, &mut files, budget)?;
    }
    Ok((copied, files))
}

pub fn sha256(p: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = fs::File::open(p)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// A throw-away OpenPGP secret key (for signing a benchmark release's
/// manifest), written under `work`; gpg's agent is stopped afterwards.
pub fn throwaway_key(work: &Path) -> Result<std::path::PathBuf> {
    let gnupg = work.join("gnupg");
    fs::create_dir(&gnupg)?;
    fs::set_permissions(&gnupg, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let gpg = |a: &[&str]| -> Result<Vec<u8>> {
        let o = Command::new("gpg")
            .env("GNUPGHOME", &gnupg)
            .args(["--batch", "--pinentry-mode", "loopback", "--passphrase", ""])
            .args(a)
            .output()
            .context("running gpg (apt-get install gnupg)")?;
        if !o.status.success() {
            bail!("gpg {a:?}: {}", String::from_utf8_lossy(&o.stderr));
        }
        Ok(o.stdout)
    };
    gpg(&[
        "--quick-gen-key",
        "bench <bench@example.invalid>",
        "ed25519",
        "sign",
        "never",
    ])?;
    let key = work.join("key.asc");
    fs::write(&key, gpg(&["--armor", "--export-secret-keys"])?)?;
    let _ = Command::new("gpgconf")
        .env("GNUPGHOME", &gnupg)
        .args(["--kill", "all"])
        .status();
    Ok(key)
}
