//! `iukfarm sqfs`: the engine's SquashFS reader and writer for people and scripts.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use iukfarm_engine::io::{ReadAt, Slice};
use iukfarm_engine::iso::Iso;
use iukfarm_engine::sqfs::{
    Archive, Gensquashfs, InodeKind, WriterOptions, XzConfig, compress::parse_size, write_image,
};
use iukfarm_engine::tree::{Kind, Node, ScanOptions, scan_dir};

use super::{BadInput, usage};
use crate::output::{persist, temp_next_to};
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
    /// List an image's contents, like `unsquashfs -lln` (numeric owners, UTC times).
    Ls(LsArgs),
    /// Write a file's contents to standard output.
    Cat(CatArgs),
    /// Show the superblock and tables, like `unsquashfs -s`.
    Info(ImageArgs),
}

/// Where the image is: a file, optionally at an offset or inside an ISO.
#[derive(Parser)]
pub struct ImageArgs {
    /// The image, or a file containing it (see --offset, --in-iso).
    image: PathBuf,
    /// Byte offset of the image inside the file.
    #[arg(short = 'o', long, default_value_t = 0)]
    offset: u64,
    /// IMAGE is an ISO; read the SquashFS file at this path inside it
    /// (e.g. live/filesystem.squashfs) in place.
    #[arg(long = "in-iso", value_name = "PATH")]
    in_iso: Option<String>,
}

#[derive(Parser)]
pub struct LsArgs {
    #[command(flatten)]
    image: ImageArgs,
    /// Also print each entry's inode number and link count.
    #[arg(short = 'i', long)]
    inodes: bool,
    /// Also print extended attributes, one per line, indented.
    #[arg(short = 'x', long)]
    xattrs: bool,
}

#[derive(Parser)]
pub struct CatArgs {
    #[command(flatten)]
    image: ImageArgs,
    /// Path of the file inside the image.
    path: String,
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
    #[arg(short = 'j', long = "num-jobs", value_name = "COUNT", value_parser = super::parse_threads)]
    num_jobs: Option<usize>,
    /// Whose bytes to write: gensquashfs 1.3.2's (Debian trixie, what Tails 7 pins) or
    /// 1.2.0's (Debian bookworm, Tails 6).
    #[arg(long, value_name = "1.2.0|1.3.2", default_value = "1.3.2")]
    gensquashfs: Gensquashfs,
    /// No progress bar.
    #[arg(short = 'q', long)]
    quiet: bool,
}

pub fn run(args: Args) -> Result<ExitCode> {
    match args.command {
        Cmd::Pack(a) => pack(a),
        Cmd::Ls(a) => ls(a).map_err(super::image_error),
        Cmd::Cat(a) => cat(a).map_err(super::image_error),
        Cmd::Info(a) => info(a).map_err(super::image_error),
    }
}

fn open_image(a: &ImageArgs) -> Result<Arc<Archive>> {
    let file = File::open(&a.image)
        .with_context(|| format!("opening {}", a.image.display()))
        .bad_input()?;
    let file: Arc<dyn ReadAt> = Arc::new(file);
    let src: Arc<dyn ReadAt> = match &a.in_iso {
        Some(path) => {
            let iso = Iso::open(file)
                .with_context(|| format!("reading {} as an ISO", a.image.display()))?;
            let Some(entry) = iso.lookup(path.as_bytes())? else {
                usage!("{path} not found in {}", a.image.display());
            };
            let inner = iso.file_reader(&entry)?;
            if a.offset > 0 {
                Arc::new(Slice {
                    len: inner.size()?.saturating_sub(a.offset),
                    inner,
                    offset: a.offset,
                })
            } else {
                inner
            }
        }
        None if a.offset > 0 => {
            let len = file.size()?;
            if a.offset >= len {
                usage!(
                    "offset {} is beyond the end of {} ({len} bytes)",
                    a.offset,
                    a.image.display()
                );
            }
            Arc::new(Slice {
                inner: file,
                offset: a.offset,
                len: len - a.offset,
            })
        }
        None => file,
    };
    Archive::open(src)
        .with_context(|| format!("reading the SquashFS image in {}", a.image.display()))
}

fn ls(a: LsArgs) -> Result<ExitCode> {
    let ar = open_image(&a.image)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    ar.walk(&mut |path, inode| {
        let size = match &inode.kind {
            InodeKind::File(f) => f.size.to_string(),
            InodeKind::Symlink(t) => t.len().to_string(),
            InodeKind::BlockDev(d) | InodeKind::CharDev(d) => {
                let (major, minor) = split_dev(*d);
                format!("{major},{minor:>4}")
            }
            InodeKind::Dir { size, .. } => size.to_string(),
            _ => "0".into(),
        };
        let mut line = Vec::new();
        if a.inodes {
            write!(line, "{:>8} {:>3} ", inode.number, inode.nlink)?;
        }
        write!(
            line,
            "{} {}/{} {:>10} {} /",
            mode_string(inode.st_mode()),
            inode.uid,
            inode.gid,
            size,
            format_time(inode.mtime)
        )?;
        line.extend_from_slice(path);
        if let InodeKind::Symlink(t) = &inode.kind {
            line.extend_from_slice(b" -> ");
            line.extend_from_slice(t);
        }
        line.push(b'\n');
        if a.xattrs {
            for (k, v) in ar.xattrs(inode.xattr)? {
                line.extend_from_slice(b"    ");
                line.extend_from_slice(&k);
                writeln!(line, "=0x{}", hex(&v))?;
            }
        }
        out.write_all(&line)?;
        Ok(())
    })?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn cat(a: CatArgs) -> Result<ExitCode> {
    let ar = open_image(&a.image)?;
    let Some(inode) = ar.lookup(a.path.as_bytes())? else {
        usage!("{} not found in the image", a.path);
    };
    let InodeKind::File(f) = &inode.kind else {
        usage!("{} is not a regular file", a.path);
    };
    let mut reader = ar.open_file(f);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    std::io::copy(&mut reader, &mut out).with_context(|| format!("reading {}", a.path))?;
    Ok(ExitCode::SUCCESS)
}

fn info(a: ImageArgs) -> Result<ExitCode> {
    let ar = open_image(&a)?;
    let sb = ar.superblock();
    println!("compressor: {}", ar.compressor().name());
    if let Some((dict, flags)) = ar.xz_options() {
        println!("xz dictionary size: {dict}");
        println!("xz filter flags: {flags:#x}");
    }
    println!("block size: {}", sb.block_size);
    println!("bytes used: {}", sb.bytes_used);
    println!(
        "modification time: {} ({})",
        sb.modification_time,
        format_time(sb.modification_time)
    );
    println!("inodes: {}", sb.inode_count);
    println!("fragments: {}", sb.fragment_entry_count);
    println!("ids: {}", sb.id_count);
    println!("flags: {:#06x}", sb.flags);
    println!(
        "xattrs: {}",
        if sb.flags & 0x0200 != 0 {
            "none"
        } else {
            "stored"
        }
    );
    println!("exportable: {}", sb.flags & 0x0080 != 0);
    Ok(ExitCode::SUCCESS)
}

/// Major and minor from the kernel's 32-bit device encoding.
fn split_dev(d: u32) -> (u32, u32) {
    ((d >> 8) & 0xfff, (d & 0xff) | ((d >> 12) & 0xfff00))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn mode_string(mode: u32) -> String {
    let t = match mode & 0o170000 {
        0o040000 => 'd',
        0o120000 => 'l',
        0o060000 => 'b',
        0o020000 => 'c',
        0o010000 => 'p',
        0o140000 => 's',
        _ => '-',
    };
    let mut s = String::with_capacity(10);
    s.push(t);
    let bit = |m: u32, c: char| if mode & m != 0 { c } else { '-' };
    let special =
        |x: u32, s_bit: u32, lower: char, upper: char| match (mode & x != 0, mode & s_bit != 0) {
            (true, true) => lower,
            (false, true) => upper,
            (true, false) => 'x',
            (false, false) => '-',
        };
    s.push(bit(0o400, 'r'));
    s.push(bit(0o200, 'w'));
    s.push(special(0o100, 0o4000, 's', 'S'));
    s.push(bit(0o040, 'r'));
    s.push(bit(0o020, 'w'));
    s.push(special(0o010, 0o2000, 's', 'S'));
    s.push(bit(0o004, 'r'));
    s.push(bit(0o002, 'w'));
    s.push(special(0o001, 0o1000, 't', 'T'));
    s
}

/// `YYYY-MM-DD HH:MM` in UTC, so listings do not depend on the machine's zone.
pub fn format_time(t: u32) -> String {
    let days = (t / 86400) as i64;
    let secs = t % 86400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}",
        secs / 3600,
        secs % 3600 / 60
    )
}

fn pack(a: PackArgs) -> Result<ExitCode> {
    if a.compressor != "xz" {
        usage!(
            "compressor '{}' is not supported for writing (only xz, which is what Tails uses)",
            a.compressor
        );
    }
    let block_size = parse_size(&a.block_size, 0)
        .context("--block-size")
        .bad_input()?;
    let mut opts = WriterOptions::with_block_size(block_size);
    opts.gensquashfs = a.gensquashfs;
    opts.dev_block_size = parse_size(&a.dev_block_size, 0)
        .context("--dev-block-size")
        .bad_input()?;
    let mut xz = XzConfig::for_block_size(block_size);
    if let Some(extra) = &a.comp_extra {
        xz.apply_extra(extra, block_size)
            .context("--comp-extra")
            .bad_input()?;
    }
    opts.xz = xz;
    let sde = super::source_date_epoch()?.unwrap_or(0);
    opts.mtime = sde;
    opts.threads = a.num_jobs.unwrap_or(0);
    opts.validate().bad_input()?;
    super::input_dir(&a.pack_dir)?;
    if !a.force && a.output.exists() {
        usage!("{} exists; use --force to overwrite it", a.output.display());
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
    if !a.quiet {
        eprintln!(
            "{}: gensquashfs {}'s bytes",
            a.output.display(),
            a.gensquashfs
        );
    }
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
