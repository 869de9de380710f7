//! Builds one IUK with `iukfarm build` and with the Tails method (the test
//! suite's reference re-enactment of tails-create-iuk: loop mounts,
//! overlayfs on tmpfs, `rsync --checksum`, gensquashfs) on the same
//! generated release pair, side by side in one run, for two kinds of pair:
//! a big diff (most of the system changed) and a point release (a few files
//! changed). Prints wall time, CPU time, peak memory and the ratios, and
//! checks that both IUKs are the same bytes. Needs root.
//!
//! `--tails 7` (the default) makes Tails 7 releases: zstd system images
//! (level 22, 1 MiB blocks, no export table), a GRUB module directory of 280
//! files, versions 7.x, and the Tails method runs trixie's gensquashfs 1.3.2
//! (`scripts/trixie-sqfs-tools.sh`); `--tails 6`: xz images, versions 6.x,
//! bookworm's gensquashfs 1.2.0.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::Parser;
use iukfarm_bench::{Measure, build_tree, measure, sha256};

#[derive(Parser)]
struct Args {
    /// Size of the generated system in MiB.
    #[arg(long, default_value_t = 200)]
    size_mb: u64,
    /// The iukfarm binary (default: the one next to this one).
    #[arg(long)]
    iukfarm: Option<PathBuf>,
    /// Which Tails' releases and toolchain: 7 (zstd images, gensquashfs 1.3.2) or 6 (xz,
    /// gensquashfs 1.2.0).
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u8).range(6..=7))]
    tails: u8,
    /// Also write the results here.
    #[arg(long, default_value = "target/iuk-bench.txt")]
    out: PathBuf,
}

fn run(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

fn make_iso(work: &Path, tails: u8, version: &str, sys: &Path, kernel: &[u8]) -> Result<PathBuf> {
    let cd = work.join(format!("cd-{version}"));
    for d in ["live", "EFI/BOOT", "isolinux", "utils/linux"] {
        fs::create_dir_all(cd.join(d))?;
    }
    if tails >= 7 {
        let grub = cd.join("EFI/BOOT/grub/x86_64-efi");
        fs::create_dir_all(&grub)?;
        for i in 0..280usize {
            let mut body = format!("GRUB module {i} ").repeat(20 + i % 50).into_bytes();
            body.extend_from_slice(kernel);
            fs::write(grub.join(format!("module{i:03}.mod")), body)?;
        }
    }
    fs::write(cd.join("live/vmlinuz"), kernel)?;
    fs::write(cd.join("EFI/BOOT/bootx64.efi"), b"efi")?;
    fs::write(
        cd.join("isolinux/isolinux.cfg"),
        b"kernel /live/vmlinuz\nappend /isolinux/x\n",
    )?;
    fs::write(cd.join("utils/linux/syslinux"), b"")?;
    // Tails 7's auto/build, or Tails 6's.
    let comp: &[&str] = if tails >= 7 {
        &["-comp", "zstd", "-Xcompression-level", "22", "-no-exports"]
    } else {
        &["-comp", "xz", "-Xbcj", "x86", "-Xdict-size", "1M"]
    };
    run(Command::new("mksquashfs")
        .arg(sys)
        .arg(cd.join("live/filesystem.squashfs"))
        .args(["-noappend", "-no-progress", "-quiet", "-b", "1M"])
        .args(comp))?;
    let iso = work.join(format!("tails-amd64-{version}.iso"));
    run(Command::new("xorriso")
        // Dated before the kits, as a Tails build dates its ISO.
        .env("SOURCE_DATE_EPOCH", "1729075844")
        .args(["-as", "mkisofs", "-quiet", "-R", "-r", "-J", "-o"])
        .arg(&iso)
        .arg(&cd))?;
    fs::remove_dir_all(&cd)?;
    Ok(iso)
}

/// Rewrites every `every`-th regular file below `dir` (appending a marker,
/// so contents and sizes change).
fn touch_files(dir: &Path, every: usize, counter: &mut usize, changed: &mut u64) -> Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir)?.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let ft = e.file_type()?;
        if ft.is_dir() {
            touch_files(&e.path(), every, counter, changed)?;
        } else if ft.is_file() {
            *counter += 1;
            if (*counter).is_multiple_of(every) {
                let mut f = fs::OpenOptions::new().append(true).open(e.path())?;
                f.write_all(b"\nupdated by a security release\n")?;
                *changed += e.metadata()?.len();
            }
        }
    }
    Ok(())
}

struct Row {
    pair: String,
    ours: Measure,
    tails: Measure,
    size: u64,
    same: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the Tails method needs root (loop mounts, overlayfs)");
    }
    let iukfarm = match args.iukfarm {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("iukfarm"),
    };
    let reference =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/reference/tails-create-iuk.sh");
    // The gensquashfs Tails pins for these releases.
    let gensquashfs = if args.tails >= 7 {
        let dir = std::env::var_os("IUKFARM_TRIXIE_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/cache/iukfarm-tests/trixie/bin"));
        let g = dir.join("gensquashfs");
        if !g.is_file() {
            bail!(
                "{} is missing: run scripts/trixie-sqfs-tools.sh (trixie's gensquashfs 1.3.2)",
                g.display()
            );
        }
        g
    } else {
        PathBuf::from("gensquashfs")
    };
    let major = args.tails;
    let tmp = tempfile::tempdir()?;
    let work = tmp.path();
    let old_sys = work.join("old");
    fs::create_dir(&old_sys)?;
    let sources = vec!["/usr/lib".to_string(), "/usr/share".to_string()];
    let (bytes, files) = build_tree(&old_sys, &sources, args.size_mb << 20)?;
    eprintln!("system: {files} files, {:.1} MiB", bytes as f64 / 1048576.0);
    let old_iso = make_iso(work, major, &format!("{major}.0"), &old_sys, b"kernel 1")?;

    let mut rows = Vec::new();
    for (pair, every) in [("point release", 200usize), ("big diff", 1usize)] {
        let new_sys = work.join(format!("new-{every}"));
        run(Command::new("cp").arg("-a").arg(&old_sys).arg(&new_sys))?;
        let (mut counter, mut changed) = (0, 0);
        touch_files(&new_sys, every, &mut counter, &mut changed)?;
        eprintln!(
            "{pair}: {:.1} MiB in changed files",
            changed as f64 / 1048576.0
        );
        let new_iso = make_iso(
            work,
            major,
            &format!("{major}.{every}"),
            &new_sys,
            b"kernel 2",
        )?;
        fs::remove_dir_all(&new_sys)?;
        let theirs = work.join("tails.iuk");
        let ours = work.join("ours.iuk");
        eprintln!("{pair}: running the Tails method...");
        let tails = measure(
            Command::new("bash")
                .arg(&reference)
                .arg(&old_iso)
                .arg(&new_iso)
                .arg("6.1.squashfs")
                .arg(&theirs)
                .env("GENSQUASHFS", &gensquashfs)
                .env("SOURCE_DATE_EPOCH", "1730285444"),
        )?;
        eprintln!("{pair}: running iukfarm build...");
        let us = measure(
            Command::new(&iukfarm)
                .args([
                    "build",
                    "-q",
                    "--squashfs-diff-name",
                    "6.1.squashfs",
                    "--old-iso",
                ])
                .arg(&old_iso)
                .arg("--new-iso")
                .arg(&new_iso)
                .arg("--out")
                .arg(&ours)
                .env("SOURCE_DATE_EPOCH", "1730285444"),
        )?;
        rows.push(Row {
            pair: pair.into(),
            ours: us,
            tails,
            size: fs::metadata(&ours)?.len(),
            same: sha256(&ours)? == sha256(&theirs)?,
        });
        fs::remove_file(&ours)?;
        fs::remove_file(&theirs)?;
        fs::remove_file(&new_iso)?;
    }

    let mut report = format!(
        "Tails {major} releases (gensquashfs {}): system {:.1} MiB, {files} files; {} cores\n{:<14} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9} {:>12} {:>5}\n",
        if major >= 7 { "1.3.2" } else { "1.2.0" },
        bytes as f64 / 1048576.0,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        "pair",
        "tails s",
        "ours s",
        "tails cpu",
        "ours cpu",
        "tails MiB",
        "ours MiB",
        "IUK bytes",
        "same"
    );
    for r in &rows {
        report.push_str(&format!(
            "{:<14} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>9.0} {:>9.0} {:>12} {:>5}\n",
            r.pair,
            r.tails.wall,
            r.ours.wall,
            r.tails.cpu,
            r.ours.cpu,
            r.tails.max_rss_mib,
            r.ours.max_rss_mib,
            r.size,
            r.same
        ));
    }
    for r in &rows {
        report.push_str(&format!(
            "{}: {:.1}x faster than the Tails method (whose upper directory also holds the diff in tmpfs RAM, not counted above)\n",
            r.pair,
            r.tails.wall / r.ours.wall
        ));
    }
    print!("{report}");
    if let Some(d) = args.out.parent() {
        fs::create_dir_all(d)?;
    }
    fs::write(&args.out, &report)?;
    if rows.iter().any(|r| !r.same) {
        bail!("iukfarm build and the Tails method gave different bytes");
    }
    Ok(())
}
