//! `iukfarm demo`: a self-contained run on generated sample releases that
//! needs nothing but this binary: it writes each release's system image
//! with the gensquashfs-exact writer, verifies every image by reading it
//! back entry by entry, proves the bytes do not depend on the thread count,
//! and writes SHA256SUMS.

use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use iukfarm_engine::compare::{CompareOptions, compare_trees};
use iukfarm_engine::sqfs::{Archive, WriterOptions, XzConfig, write_image};
use sha2::{Digest, Sha256};

use super::sqfs::{persist, temp_next_to};
use crate::progress::Reporter;
use crate::samples;

/// The SOURCE_DATE_EPOCH of the sample releases (Tails 6.9's).
const DEMO_SDE: u32 = 1_730_285_444;

#[derive(Parser)]
pub struct Args {
    /// Where to write the sample images and SHA256SUMS.
    #[arg(long, default_value = "iukfarm-demo")]
    output_dir: PathBuf,
    /// Number of sample releases.
    #[arg(long, default_value_t = 3)]
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

fn sha256(path: &std::path::Path) -> Result<String> {
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

pub fn run(a: Args) -> Result<ExitCode> {
    ensure!(
        (1..=20).contains(&a.releases),
        "--releases must be between 1 and 20"
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
    let mut opts = WriterOptions::with_block_size(1 << 20);
    let mut xz = XzConfig::for_block_size(1 << 20);
    xz.apply_extra("x86,dictsize=1024K", 1 << 20)?;
    opts.xz = xz;
    opts.mtime = DEMO_SDE;
    opts.threads = a.threads.unwrap_or(0);

    println!(
        "iukfarm demo: {} sample releases of ~{} MiB, written with the options of the diff inside a Tails IUK",
        a.releases, a.scale
    );
    let reporter = Reporter::new(false);
    let mut sums = Vec::new();
    let started = Instant::now();
    for rel in 0..a.releases {
        let version = format!("6.{rel}");
        let mut tree = samples::system_tree(rel, a.scale);
        samples::set_mtime(&mut tree, DEMO_SDE);
        let dir = a.output_dir.join(format!("tails-amd64-{version}"));
        fs::create_dir_all(&dir)?;
        let image = dir.join("filesystem.squashfs");
        let t = Instant::now();
        let tmp = temp_next_to(&image)?;
        let stats = write_image(&tree, &opts, tmp.as_file(), &reporter)
            .with_context(|| format!("packing {version}"))?;
        persist(tmp, &image, false)?;
        let packed = t.elapsed();

        let t = Instant::now();
        let archive = Archive::open(std::sync::Arc::new(fs::File::open(&image)?))?;
        let read_back = archive.to_tree()?;
        let diffs = compare_trees(
            &tree,
            &read_back,
            CompareOptions {
                mtime: true,
                ..Default::default()
            },
        )?;
        if !diffs.is_empty() {
            for d in &diffs {
                eprintln!("  {d}");
            }
            bail!(
                "{version}: the image does not contain what was packed ({} differences)",
                diffs.len()
            );
        }
        let hash = sha256(&image)?;
        println!(
            "  {version}: {:.1} MiB of files -> {:.1} MiB image, {} inodes, packed in {:.1}s, verified in {:.1}s, sha256 {}",
            stats.data.bytes_read as f64 / 1048576.0,
            stats.image_size as f64 / 1048576.0,
            stats.inodes,
            packed.as_secs_f64(),
            t.elapsed().as_secs_f64(),
            &hash[..16]
        );
        sums.push((hash, format!("tails-amd64-{version}/filesystem.squashfs")));
    }
    reporter.finish();

    // Reproducibility: the first release again on one thread must give the
    // same bytes.
    let mut tree = samples::system_tree(0, a.scale);
    samples::set_mtime(&mut tree, DEMO_SDE);
    let again = tempfile::NamedTempFile::new_in(&a.output_dir)?;
    let mut one = opts.clone();
    one.threads = 1;
    write_image(&tree, &one, again.as_file(), &iukfarm_engine::NoProgress)?;
    let h = sha256(again.path())?;
    ensure!(
        h == sums[0].0,
        "rebuilding 6.0 on one thread gave different bytes: {h} vs {}",
        sums[0].0
    );
    println!("  6.0 rebuilt on 1 thread: identical bytes");

    let sums_path = a.output_dir.join("SHA256SUMS");
    let mut f = fs::File::create(&sums_path)?;
    for (h, p) in &sums {
        writeln!(f, "{h}  {p}")?;
    }
    println!(
        "done in {:.1}s. Images and SHA256SUMS are in {} (check with: cd {} && sha256sum --check SHA256SUMS)",
        started.elapsed().as_secs_f64(),
        a.output_dir.display(),
        a.output_dir.display()
    );
    Ok(ExitCode::SUCCESS)
}
