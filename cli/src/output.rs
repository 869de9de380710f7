//! Writing outputs atomically: a temporary file next to the final name,
//! renamed into place when complete, with the same mode (0644) whoever runs
//! the command. Temporary files of a killed run are found and removed by
//! the next one: each live one is locked by the process writing it.

use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, Result};

fn dir_of(output: &Path) -> &Path {
    match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn part_prefix(output: &Path) -> String {
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!(".{name}.")
}

/// Locks an open file for this process's lifetime of the descriptor;
/// false when another process holds the lock.
fn try_lock(f: &std::fs::File) -> bool {
    // SAFETY: flock on a descriptor we own.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// A temporary file in the output's directory, removed if dropped.
pub fn temp_next_to(output: &Path) -> Result<tempfile::NamedTempFile> {
    let dir = dir_of(output);
    remove_stale_parts(output);
    let tmp = tempfile::Builder::new()
        .prefix(&part_prefix(output))
        .suffix(".part")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    try_lock(tmp.as_file());
    Ok(tmp)
}

/// Removes the temporary files of `output` that no live process holds (a
/// run killed with SIGKILL leaves them).
fn remove_stale_parts(output: &Path) {
    let prefix = part_prefix(output);
    let Ok(entries) = std::fs::read_dir(dir_of(output)) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !(name.starts_with(&prefix) && name.ends_with(".part")) {
            continue;
        }
        let stale = std::fs::File::open(e.path()).is_ok_and(|f| try_lock(&f));
        if stale && std::fs::remove_file(e.path()).is_ok() {
            tracing::info!("removed {}, left by an interrupted run", e.path().display());
        }
    }
}

/// Renames the finished temporary file to its final name, mode 0644.
pub fn persist(tmp: tempfile::NamedTempFile, output: &Path, overwrite: bool) -> Result<()> {
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))
        .and_then(|_| tmp.as_file().sync_all())
        .context("syncing output")?;
    let res = if overwrite {
        tmp.persist(output).map(|_| ())
    } else {
        tmp.persist_noclobber(output).map(|_| ())
    };
    res.map_err(|e| e.error)
        .with_context(|| format!("renaming the finished file to {}", output.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_parts_go_live_ones_stay() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("x.iuk");
        let stale = d.path().join(".x.iuk.abc123.part");
        std::fs::write(&stale, b"left by kill -9").unwrap();
        let other = d.path().join(".y.iuk.abc123.part");
        std::fs::write(&other, b"another output's").unwrap();
        let live = temp_next_to(&out).unwrap();
        assert!(!stale.exists());
        assert!(other.exists());
        // A second run while the first is alive leaves the first's file.
        let second = temp_next_to(&out).unwrap();
        assert!(live.path().exists());
        std::fs::write(second.path(), b"kit").unwrap();
        persist(second, &out, false).unwrap();
        let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
    }
}
