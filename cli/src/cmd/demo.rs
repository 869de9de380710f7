//! `iukfarm demo`: a whole release matrix on generated sample releases that
//! needs nothing but this binary. It writes each sample release as a
//! Tails-like ISO (system image written by the gensquashfs-exact writer,
//! boot files, Rock Ridge ISO written natively), builds the IUK from every
//! older release to the newest, verifies each IUK by applying it, rebuilds
//! one on a single thread to show the bytes do not change, and writes
//! SHA256SUMS.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use iukfarm_engine::iso_writer::write_iso;
use iukfarm_engine::kit::verify::verify_iuk;
use iukfarm_engine::kit::{BuildOptions, build_iuk, diff_writer_options};
use iukfarm_engine::sqfs::write_image;
use iukfarm_engine::tree::{FileContent, Kind, Meta, Node, Source};
use sha2::{Digest, Sha256};

use super::sqfs::{persist, temp_next_to};
use crate::progress::Reporter;
use crate::samples;

/// The SOURCE_DATE_EPOCH of the sample releases (Tails 6.9's).
const DEMO_SDE: u32 = 1_730_285_444;

#[derive(Parser)]
pub struct Args {
    /// Where to write the sample ISOs, the IUKs and SHA256SUMS.
    #[arg(long, default_value = "iukfarm-demo")]
    output_dir: PathBuf,
    /// Number of sample releases (IUKs: one from each older release to the newest).
    #[arg(long, default_value_t = 4)]
    releases: u64,
    /// Approximate size of each sample system in MiB.
    #[arg(long, default_value_t = 16)]
    scale: u64,
    /// Replace the contents of an existing output directory.
    #[arg(long)]
    force: bool,
    /// Compression threads (default: one per core).
    #[arg(short = 'j', long)]
    threads: Option<usize>,
}

fn sha256(path: &Path) -> Result<String> {
    let mut f = fs::File::open(path)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut HashWriter(&mut h))?;
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

struct HashWriter<'a>(&'a mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn meta(mode: u16) -> Meta {
    Meta {
        mode,
        uid: 0,
        gid: 0,
        mtime: DEMO_SDE,
        xattrs: Vec::new(),
    }
}

fn file(name: &str, data: impl Into<Vec<u8>>) -> Node {
    Node {
        name: name.into(),
        meta: meta(0o444),
        kind: Kind::File(FileContent::from_bytes(data.into())),
    }
}

fn dir(name: &str, children: Vec<Node>) -> Node {
    Node::dir(name, meta(0o555), children)
}

/// The ISO of sample release `rel`: its system image plus boot files; the
/// kernel changes every other release, a boot file goes away in the last.
fn iso_tree(rel: u64, last: bool, image: &Path, image_size: u64) -> Node {
    let kernel = 1 + rel / 2;
    let mut efi_boot = vec![file("bootx64.efi", format!("EFI loader {kernel}\n"))];
    if !last {
        efi_boot.push(file(
            "grubx64.efi",
            "legacy loader, dropped in the newest release\n",
        ));
    }
    dir(
        "",
        vec![
            dir("EFI", vec![dir("BOOT", efi_boot)]),
            dir(
                "isolinux",
                vec![
                    file("isolinux.cfg", "include /isolinux/live.cfg\ndefault live\n"),
                    file(
                        "live.cfg",
                        format!(
                            "label live\n  kernel /live/vmlinuz\n  append initrd=/live/initrd.img # 6.{rel}\n"
                        ),
                    ),
                ],
            ),
            dir(
                "live",
                vec![
                    Node {
                        name: b"filesystem.squashfs".to_vec(),
                        meta: meta(0o444),
                        kind: Kind::File(FileContent {
                            size: image_size,
                            source: Source::Path(image.to_path_buf()),
                        }),
                    },
                    file(
                        "initrd.img",
                        format!("initramfs for kernel {kernel}\n").repeat(2000),
                    ),
                    file("vmlinuz", format!("kernel {kernel}\n").repeat(5000)),
                ],
            ),
            dir(
                "utils",
                vec![
                    dir("linux", vec![file("syslinux", "syslinux installer\n")]),
                    dir("mbr", vec![file("mbr.bin", vec![0u8; 440])]),
                ],
            ),
        ],
    )
}

pub fn run(a: Args) -> Result<ExitCode> {
    ensure!(
        (2..=20).contains(&a.releases),
        "--releases must be between 2 and 20"
    );
    ensure!(
        (1..=4096).contains(&a.scale),
        "--scale must be between 1 and 4096 (MiB)"
    );
    if a.output_dir.exists() && fs::read_dir(&a.output_dir)?.next().is_some() {
        if !a.force {
            bail!(
                "{} exists and is not empty; use --force to replace its contents or choose another --output-dir",
                a.output_dir.display()
            );
        }
        fs::remove_dir_all(&a.output_dir)
            .with_context(|| format!("clearing {}", a.output_dir.display()))?;
    }
    fs::create_dir_all(&a.output_dir)?;
    let threads = a.threads.unwrap_or(0);
    let started = Instant::now();
    let reporter = Reporter::new(false);
    println!(
        "iukfarm demo: {} sample releases of ~{} MiB; IUKs from each older release to the newest",
        a.releases, a.scale
    );

    // The releases, as ISOs.
    let mut isos = Vec::new();
    for rel in 0..a.releases {
        let version = format!("6.{rel}");
        let t = Instant::now();
        let dir = a.output_dir.join(format!("tails-amd64-{version}"));
        fs::create_dir_all(&dir)?;
        let mut system = samples::system_tree(rel, a.scale);
        samples::set_mtime(&mut system, DEMO_SDE);
        let image = tempfile::NamedTempFile::new_in(&dir)?;
        let stats = write_image(
            &system,
            &diff_writer_options(DEMO_SDE, threads),
            image.as_file(),
            &reporter,
        )
        .with_context(|| format!("writing the system image of {version}"))?;
        let iso_path = dir.join(format!("tails-amd64-{version}.iso"));
        let tmp = temp_next_to(&iso_path)?;
        let tree = iso_tree(rel, rel + 1 == a.releases, image.path(), stats.image_size);
        write_iso(
            &tree,
            &format!("TAILS {version}"),
            &mut tmp.as_file().try_clone()?,
        )
        .with_context(|| format!("writing {}", iso_path.display()))?;
        persist(tmp, &iso_path, false)?;
        println!(
            "  release {version}: {:.1} MiB system, {} inodes -> {} in {:.1}s",
            stats.data.bytes_read as f64 / 1048576.0,
            stats.inodes,
            iso_path.display(),
            t.elapsed().as_secs_f64()
        );
        isos.push((version, iso_path));
    }

    // The matrix: every older release to the newest.
    let iuks = a.output_dir.join("iuks");
    fs::create_dir_all(&iuks)?;
    let (new_v, new_iso) = isos.last().cloned().expect("at least two releases");
    let mut sums = Vec::new();
    for (old_v, old_iso) in &isos[..isos.len() - 1] {
        let t = Instant::now();
        let name = format!("Tails_amd64_{old_v}_to_{new_v}.iuk");
        let out = iuks.join(&name);
        let opts = BuildOptions {
            diff_name: format!("{new_v}.squashfs"),
            sde: DEMO_SDE,
            threads,
            diff: Default::default(),
        };
        let kit = temp_next_to(&out)?;
        let scratch = temp_next_to(&out)?;
        let report = build_iuk(
            old_iso,
            &new_iso,
            &opts,
            scratch.as_file(),
            kit.as_file(),
            &reporter,
        )
        .with_context(|| format!("building {name}"))?;
        persist(kit, &out, false)?;
        let built = t.elapsed();
        let t = Instant::now();
        let scratch = temp_next_to(&out)?;
        let v = verify_iuk(old_iso, &new_iso, &out, scratch.as_file(), &reporter)?;
        if !v.differences.is_empty() {
            for d in &v.differences {
                eprintln!("  {d}");
            }
            bail!(
                "{name} does not turn {old_v} into {new_v} ({} differences)",
                v.differences.len()
            );
        }
        let hash = sha256(&out)?;
        println!(
            "  {name}: {} bytes, {} changed files, {} whiteouts, {} kernels, {} deletions; built in {:.1}s, verified by applying in {:.1}s",
            report.kit_size,
            report.diff.changed_files,
            report.diff.whiteouts,
            report.kernels.len(),
            report.delete_files.len(),
            built.as_secs_f64(),
            t.elapsed().as_secs_f64()
        );
        sums.push((hash, name));
    }
    reporter.finish();

    // Reproducibility: the first IUK again, on one thread, must be the same bytes.
    let (old_v, old_iso) = &isos[0];
    let again = tempfile::NamedTempFile::new_in(&iuks)?;
    let scratch = tempfile::NamedTempFile::new_in(&iuks)?;
    let opts = BuildOptions {
        diff_name: format!("{new_v}.squashfs"),
        sde: DEMO_SDE,
        threads: 1,
        diff: Default::default(),
    };
    build_iuk(
        old_iso,
        &new_iso,
        &opts,
        scratch.as_file(),
        again.as_file(),
        &iukfarm_engine::NoProgress,
    )?;
    let h = sha256(again.path())?;
    ensure!(
        h == sums[0].0,
        "rebuilding the {old_v} IUK on one thread gave different bytes"
    );
    println!(
        "  Tails_amd64_{old_v}_to_{new_v}.iuk rebuilt on 1 thread: identical bytes ({})",
        &h[..16]
    );

    let sums_path = iuks.join("SHA256SUMS");
    let mut f = fs::File::create(&sums_path)?;
    for (h, p) in &sums {
        writeln!(f, "{h}  {p}")?;
    }
    println!(
        "done in {:.1}s. ISOs in {}, IUKs and SHA256SUMS in {} (check with: cd {} && sha256sum --check SHA256SUMS)",
        started.elapsed().as_secs_f64(),
        a.output_dir.display(),
        iuks.display(),
        iuks.display()
    );
    Ok(ExitCode::SUCCESS)
}
