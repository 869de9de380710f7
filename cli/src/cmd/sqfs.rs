//! `iukfarm sqfs`: the engine's SquashFS reader and writer for people and scripts.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use iukfarm_engine::sqfs::{WriterOptions, XzConfig, compress::parse_size, write_image};
use iukfarm_engine::tree::{Kind, Node, ScanOptions, scan_dir};

use crate::progress::Reporter;

#[derive(Parser)]
pub struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Pack a directory into a SquashFS image, byte-identical to
    /// `gensquashfs` 1.2.0 with the same options and SOURCE_DATE_EPOCH.
    Pack(PackArgs),
}

/// The options use gensquashfs's names, so that `iukfarm sqfs pack` can
/// replace a gensquashfs call; options we do not implement are refused.
#[derive(Parser)]
#[command(
    after_help = "Every inode's modification time and the image's are set to \
SOURCE_DATE_EPOCH (0 if unset), as gensquashfs does.\n\nExit status: 0 on success, 1 on \
failure, 2 on bad usage, 130 when interrupted; the output is written to a temporary file \
next to OUTPUT and renamed into place only on success."
)]
pub struct PackArgs {
    /// Directory to pack; it becomes the image's root.
    #[arg(short = 'D', long = "pack-dir", value_name = "DIR")]
    pack_dir: PathBuf,
    /// The image to write.
    #[arg(value_name = "OUTPUT")]
    output: PathBuf,
    /// Compressor; only xz is supported for writing.
    #[arg(short = 'c', long, default_value = "xz")]
    compressor: String,
    /// Block size (e.g. 131072, 128K, 1M).
    #[arg(short = 'b', long = "block-size", default_value = "131072")]
    block_size: String,
    /// Pad the image to a multiple of this many bytes.
    #[arg(short = 'B', long = "dev-block-size", default_value = "4096")]
    dev_block_size: String,
    /// Comma-separated xz options: x86, arm, armthumb, powerpc, sparc, ia64,
    /// extreme, level=N, lc=N, lp=N, pb=N, dictsize=SIZE.
    #[arg(short = 'X', long = "comp-extra", value_name = "OPTIONS")]
    comp_extra: Option<String>,
    /// Set every inode's owner to 0:0.
    #[arg(long = "all-root")]
    all_root: bool,
    /// Set every inode's uid.
    #[arg(short = 'u', long = "set-uid", value_name = "UID")]
    set_uid: Option<u32>,
    /// Set every inode's gid.
    #[arg(short = 'g', long = "set-gid", value_name = "GID")]
    set_gid: Option<u32>,
    /// Store extended attributes (user.*, trusted.*, security.*).
    #[arg(short = 'x', long = "keep-xattr")]
    keep_xattr: bool,
    /// Overwrite OUTPUT if it exists.
    #[arg(short = 'f', long)]
    force: bool,
    /// Compression threads (default: one per core). Output does not depend on it.
    #[arg(short = 'j', long = "num-jobs", value_name = "COUNT")]
    num_jobs: Option<usize>,
    /// No progress bar.
    #[arg(short = 'q', long)]
    quiet: bool,
}

pub fn run(args: Args) -> Result<ExitCode> {
    match args.command {
        Cmd::Pack(a) => pack(a),
    }
}

fn pack(a: PackArgs) -> Result<ExitCode> {
    if a.compressor != "xz" {
        bail!(
            "compressor '{}' is not supported for writing (only xz, which is what Tails uses)",
            a.compressor
        );
    }
    let block_size = parse_size(&a.block_size, 0).context("--block-size")?;
    let mut opts = WriterOptions::with_block_size(block_size);
    opts.dev_block_size = parse_size(&a.dev_block_size, 0).context("--dev-block-size")?;
    let mut xz = XzConfig::for_block_size(block_size);
    if let Some(extra) = &a.comp_extra {
        xz.apply_extra(extra, block_size).context("--comp-extra")?;
    }
    opts.xz = xz;
    let sde = super::source_date_epoch()?.unwrap_or(0);
    opts.mtime = sde;
    opts.threads = a.num_jobs.unwrap_or(0);
    opts.validate()?;

    if !a.force && a.output.exists() {
        bail!("{} exists; use --force to overwrite it", a.output.display());
    }
    let mut root = scan_dir(
        &a.pack_dir,
        &ScanOptions {
            keep_xattr: a.keep_xattr,
            mtime: sde,
        },
    )
    .with_context(|| format!("reading {}", a.pack_dir.display()))?;
    let uid = if a.all_root { Some(0) } else { a.set_uid };
    let gid = if a.all_root { Some(0) } else { a.set_gid };
    if uid.is_some() || gid.is_some() {
        force_owner(&mut root, uid, gid);
    }

    let reporter = Reporter::new(a.quiet);
    let tmp = temp_next_to(&a.output)?;
    let result = write_image(&root, &opts, tmp.as_file(), &reporter);
    reporter.finish();
    result.with_context(|| format!("writing {}", a.output.display()))?;
    persist(tmp, &a.output, a.force)?;
    Ok(ExitCode::SUCCESS)
}

fn force_owner(node: &mut Node, uid: Option<u32>, gid: Option<u32>) {
    if let Some(u) = uid {
        node.meta.uid = u;
    }
    if let Some(g) = gid {
        node.meta.gid = g;
    }
    if let Kind::Dir(children) = &mut node.kind {
        for c in children {
            force_owner(c, uid, gid);
        }
    }
}

/// A temporary file in the output's directory, removed if dropped.
pub fn temp_next_to(output: &Path) -> Result<tempfile::NamedTempFile> {
    let dir = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".part")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))
}

/// Renames the finished temporary file to its final name.
pub fn persist(tmp: tempfile::NamedTempFile, output: &Path, overwrite: bool) -> Result<()> {
    tmp.as_file().sync_all().context("syncing output")?;
    let res = if overwrite {
        tmp.persist(output).map(|_| ())
    } else {
        tmp.persist_noclobber(output).map(|_| ())
    };
    res.map_err(|e| e.error)
        .with_context(|| format!("renaming the finished image to {}", output.display()))
}
