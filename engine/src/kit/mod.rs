//! Assembling an IUK (format 2) from two ISOs, as `tails-create-iuk` does
//! (tails-iuk.md §1, §3, §9), without root and without mounting anything:
//!
//! ```text
//! FORMAT                    "2"
//! control.yml               delete_files (YAML::XS bytes)
//! overlay/live/<N>.squashfs the overlay diff of the two system images
//! overlay/live/vmlinuz*     kernels and initrds that are new or changed
//! overlay/EFI/ …            the new ISO's EFI/, utils/ and isolinux/ (renamed
//! overlay/utils/ …          syslinux/, isolinux.cfg → syslinux.cfg and
//! overlay/syslinux/ …       "/isolinux/" → "/syslinux/" in every top-level file)
//! ```
//!
//! Modes are what bsdtar (umask 022) and `chmod -R go+rX` give the ISO's
//! Rock Ridge modes; everything is owned by root and dated
//! SOURCE_DATE_EPOCH in the outer image.

pub mod verify;
pub mod yaml;

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::blockcache::{BlockCache, SharedBlocks};
use crate::diff::{DiffOptions, DiffStats, overlay_diff};
use crate::error::{Error, Result};
use crate::io::{ReadAt, SeqReader};
use crate::iso::{Iso, IsoEntry, cdio_translate};
use crate::progress::Progress;
use crate::sqfs::{Archive, DataStats, Gensquashfs, WriterOptions, XzConfig, write_image};
use crate::tree::{FileContent, Kind, Meta, Node, OpenReader, Source};

/// The content of `FORMAT`.
pub const FORMAT: &[u8] = b"2";

/// ISO directories whose removed entries are listed in `delete_files`, in
/// tails-create-iuk's order.
pub const MONITORED_DIRS: [&str; 16] = [
    "EFI",
    "EFI/BOOT",
    "EFI/BOOT/grub",
    "EFI/BOOT/grub/i386-efi",
    "EFI/BOOT/grub/x86_64-efi",
    "EFI/debian",
    "EFI/debian/grub",
    "EFI/debian/grub/i386-efi",
    "EFI/debian/grub/x86_64-efi",
    "isolinux",
    "live",
    "syslinux",
    "tails",
    "utils",
    "utils/mbr",
    "utils/linux",
];

const SYSTEM_IMAGE: &[u8] = b"live/filesystem.squashfs";
/// Boot files are read whole into memory when rewritten; bound them.
const MAX_BOOT_FILE: u64 = 64 << 20;

/// How a kit's bytes are made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Profile {
    /// Byte for byte what tails-create-iuk (gensquashfs) writes.
    #[default]
    Tails,
    /// Changed files keep the blocks the new image stores them in, and
    /// incompressible blocks of the outer kit are stored without trying xz.
    /// Reproducible for iukfarm, valid for Tails Upgrader, but not the bytes
    /// tails-create-iuk writes.
    Fast,
}

impl Profile {
    pub fn name(self) -> &'static str {
        match self {
            Profile::Tails => "tails",
            Profile::Fast => "fast",
        }
    }
}

impl std::str::FromStr for Profile {
    type Err = Error;

    fn from_str(s: &str) -> Result<Profile> {
        match s {
            "tails" => Ok(Profile::Tails),
            "fast" => Ok(Profile::Fast),
            _ => Err(Error::Invalid(format!(
                "unknown profile '{s}' (expected 'tails' or 'fast')"
            ))),
        }
    }
}

impl std::fmt::Display for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The engine options every farm job carries (see [`parse_options`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineOptions {
    pub diff: DiffOptions,
    pub profile: Profile,
    /// Whose bytes; `None` when not given (the release's version decides:
    /// [`Gensquashfs::for_release`]).
    pub gensquashfs: Option<Gensquashfs>,
}

/// Parses engine options given as `name=value` (how the coordinator passes
/// them to every job), refusing unknown names: `profile=tails|fast`,
/// `gensquashfs=1.2.0|1.3.2` and `ignore-if-same-content=GLOB`
/// (repeatable).
pub fn parse_options(options: &[String]) -> Result<EngineOptions> {
    let mut out = EngineOptions::default();
    for opt in options {
        match opt.split_once('=') {
            Some(("ignore-if-same-content", glob)) if !glob.is_empty() => {
                out.diff.ignore_if_same_content.push(glob.to_string())
            }
            Some(("profile", p)) => out.profile = p.parse()?,
            Some(("gensquashfs", g)) => out.gensquashfs = Some(g.parse()?),
            _ => {
                return Err(Error::Invalid(format!(
                    "unknown engine option {opt:?}; known: profile=tails|fast, \
                     gensquashfs=1.2.0|1.3.2, ignore-if-same-content=GLOB"
                )));
            }
        }
    }
    Ok(out)
}

/// The writer options of the diff inside a kit: `--keep-xattr --comp-extra
/// x86,dictsize=1024K --block-size 1048576`.
pub fn diff_writer_options(sde: u32, threads: usize) -> WriterOptions {
    let mut o = WriterOptions::with_block_size(1 << 20);
    let mut xz = XzConfig::for_block_size(1 << 20);
    xz.flags = crate::sqfs::compress::xz_flags::X86;
    o.xz = xz;
    o.mtime = sde;
    o.threads = threads;
    o
}

/// The writer options of the outer kit: gensquashfs's defaults.
pub fn kit_writer_options(sde: u32, threads: usize) -> WriterOptions {
    let mut o = WriterOptions::with_block_size(131072);
    o.mtime = sde;
    o.threads = threads;
    o
}

fn writer_options(mut o: WriterOptions, opts: &BuildOptions) -> WriterOptions {
    o.gensquashfs = opts.gensquashfs;
    o.cache = opts.cache.clone();
    o.shared = opts.shared.clone();
    if opts.profile == Profile::Fast {
        o.copy_image_blocks = true;
        o.skip_incompressible = true;
    }
    o
}

/// Names in an ISO directory as libcdio's readdir + name_translate give
/// them; a directory the ISO lacks lists as empty.
fn cdio_names(iso: &Iso, dir: &str) -> Result<Vec<Vec<u8>>> {
    match iso.list(dir.as_bytes()) {
        Ok(entries) => Ok(entries.iter().map(|e| cdio_translate(&e.name)).collect()),
        Err(Error::NotFound(_)) | Err(Error::Invalid(_)) => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// `delete_files`: for each monitored directory, the (translated) names
/// present in the old ISO and absent from the new one, sorted.
pub fn delete_files(old: &Iso, new: &Iso) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for dir in MONITORED_DIRS {
        let mut gone: Vec<Vec<u8>> = cdio_names(old, dir)?;
        let now = cdio_names(new, dir)?;
        gone.retain(|n| !now.contains(n));
        gone.sort();
        gone.dedup();
        for n in gone {
            let mut p = dir.as_bytes().to_vec();
            p.push(b'/');
            p.extend_from_slice(&n);
            out.push(p);
        }
    }
    Ok(out)
}

fn is_kernel_name(n: &[u8]) -> bool {
    let digits_then = |rest: &[u8], suffix: &[u8]| {
        rest.strip_suffix(suffix)
            .is_some_and(|d| d.iter().all(u8::is_ascii_digit))
    };
    n.strip_prefix(b"vmlinuz")
        .is_some_and(|r| digits_then(r, b""))
        || n.strip_prefix(b"initrd")
            .is_some_and(|r| digits_then(r, b".img"))
}

/// Kernels and initrds (`live/vmlinuz[0-9]*`, `live/initrd[0-9]*.img`) that
/// are new in the new ISO or differ from the old one's, sorted.
pub fn changed_kernels(old: &Iso, new: &Iso) -> Result<Vec<Vec<u8>>> {
    let find = |iso: &Iso| -> Result<Vec<(Vec<u8>, IsoEntry)>> {
        Ok(match iso.list(b"live") {
            Ok(v) => v
                .into_iter()
                .map(|e| (cdio_translate(&e.name), e))
                .filter(|(n, _)| is_kernel_name(n))
                .collect(),
            Err(Error::NotFound(_)) => Vec::new(),
            Err(e) => return Err(e),
        })
    };
    let (o, n) = (find(old)?, find(new)?);
    let mut out = Vec::new();
    for (name, ne) in &n {
        if ne.is_dir {
            return Err(Error::Invalid(format!(
                "live/{} in the new ISO is a directory",
                String::from_utf8_lossy(name)
            )));
        }
        match o.iter().find(|(x, _)| x == name) {
            None => out.push(name.clone()),
            Some((_, oe)) => {
                if oe.is_dir {
                    return Err(Error::Invalid(format!(
                        "live/{} in the old ISO is a directory",
                        String::from_utf8_lossy(name)
                    )));
                }
                if !same_iso_file(old, oe, new, ne)? {
                    out.push(name.clone());
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

fn same_iso_file(a: &Iso, ea: &IsoEntry, b: &Iso, eb: &IsoEntry) -> Result<bool> {
    if ea.size != eb.size {
        return Ok(false);
    }
    let (ra, rb) = (a.file_reader(ea)?, b.file_reader(eb)?);
    let mut pos = 0u64;
    let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    while pos < ea.size {
        let n = (ea.size - pos).min(x.len() as u64) as usize;
        ra.read_exact_at(&mut x[..n], pos)?;
        rb.read_exact_at(&mut y[..n], pos)?;
        if x[..n] != y[..n] {
            return Ok(false);
        }
        pos += n as u64;
    }
    Ok(true)
}

/// A file of the ISO, streamed when the kit is written.
struct IsoFile(Arc<dyn ReadAt>);

impl OpenReader for IsoFile {
    fn open(&self) -> io::Result<Box<dyn Read + Send + '_>> {
        Ok(Box::new(SeqReader::new(self.0.clone())?))
    }
}

/// Mode bsdtar gives an extracted entry (umask 022), then `chmod go+rX`.
fn extracted_mode(e: &IsoEntry) -> u16 {
    let base = match e.posix {
        Some((mode, ..)) => mode & 0o7777,
        None if e.is_dir => 0o555,
        None => 0o444,
    } as u16;
    let mut m = base & !0o022;
    m |= 0o044;
    if e.is_dir || m & 0o111 != 0 {
        m |= 0o011;
    }
    m
}

fn meta(mode: u16, sde: u32) -> Meta {
    Meta {
        mode,
        uid: 0,
        gid: 0,
        mtime: sde,
        xattrs: Vec::new(),
    }
}

fn iso_node(iso: &Iso, path: &[u8], e: &IsoEntry, sde: u32, depth: usize) -> Result<Node> {
    if depth > 64 {
        return Err(Error::corrupt("ISO directories nested too deep"));
    }
    let kind = if e.is_dir {
        let mut kids = Vec::new();
        for c in iso.list(path)? {
            let p = [path, b"/", &c.name].concat();
            kids.push(iso_node(iso, &p, &c, sde, depth + 1)?);
        }
        Kind::Dir(kids)
    } else if let Some(t) = &e.symlink {
        Kind::Symlink(t.clone())
    } else {
        Kind::File(FileContent {
            size: e.size,
            source: Source::Reader(Arc::new(IsoFile(iso.file_reader(e)?))),
        })
    };
    let mode = if e.symlink.is_some() {
        0o777
    } else {
        extracted_mode(e)
    };
    let mut n = Node {
        name: e.name.clone(),
        meta: meta(mode, sde),
        kind,
    };
    n.sort_children();
    Ok(n)
}

/// A whole directory of the new ISO (EFI, isolinux, utils), which must exist.
fn iso_tree(iso: &Iso, dir: &str, sde: u32) -> Result<Node> {
    let e = iso
        .lookup(dir.as_bytes())?
        .filter(|e| e.is_dir)
        .ok_or_else(|| {
            Error::NotFound(format!(
                "{dir}/ in the new ISO (an IUK needs EFI/, isolinux/ and utils/)"
            ))
        })?;
    iso_node(iso, dir.as_bytes(), &e, sde, 0)
}

/// isolinux/ becomes syslinux/: isolinux.cfg is renamed syslinux.cfg and
/// every top-level file has "/isolinux/" replaced by "/syslinux/" (which
/// rewrites it with mode 0644).
fn to_syslinux(mut isolinux: Node) -> Result<Node> {
    isolinux.name = b"syslinux".to_vec();
    let Kind::Dir(children) = &mut isolinux.kind else {
        return Err(Error::Invalid("isolinux is not a directory".into()));
    };
    let cfg = children
        .iter_mut()
        .find(|c| c.name == b"isolinux.cfg")
        .ok_or_else(|| Error::NotFound("isolinux/isolinux.cfg in the new ISO".into()))?;
    cfg.name = b"syslinux.cfg".to_vec();
    for c in children.iter_mut().filter(|c| !c.name.starts_with(b".")) {
        let Kind::File(f) = &c.kind else {
            return Err(Error::Unsupported(format!(
                "isolinux/{} is not a regular file; tails-create-iuk cannot rewrite it either",
                String::from_utf8_lossy(&c.name)
            )));
        };
        if f.size > MAX_BOOT_FILE {
            return Err(Error::Invalid(format!(
                "isolinux/{} is too large",
                String::from_utf8_lossy(&c.name)
            )));
        }
        let mut data = Vec::with_capacity(f.size as usize);
        f.open()?.read_to_end(&mut data)?;
        let edited = replace_all(&data, b"/isolinux/", b"/syslinux/");
        c.kind = Kind::File(FileContent::from_bytes(edited));
        c.meta.mode = 0o644;
    }
    isolinux.sort_children();
    Ok(isolinux)
}

fn replace_all(data: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    while i < data.len() {
        if data[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(data[i]);
            i += 1;
        }
    }
    out
}

/// What [`build_iuk`] needs besides the two ISOs.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// File name of the diff in `overlay/live/`, e.g. `6.9.squashfs`.
    pub diff_name: String,
    /// SOURCE_DATE_EPOCH of the new release.
    pub sde: u32,
    /// Compression threads (0: one per core).
    pub threads: usize,
    pub diff: DiffOptions,
    pub profile: Profile,
    /// Whose bytes the diff and the kit are: the gensquashfs the release's
    /// Tails pins ([`Gensquashfs::for_release`]).
    pub gensquashfs: Gensquashfs,
    /// Compressed blocks shared with other builds; never changes a byte.
    pub cache: Option<Arc<BlockCache>>,
    /// The farm's shared store, behind `cache`; never changes a byte either.
    pub shared: Option<Arc<dyn SharedBlocks>>,
}

/// What a build did.
#[derive(Debug, Clone)]
pub struct BuildReport {
    pub diff: DiffStats,
    pub diff_size: u64,
    pub kit_size: u64,
    /// How the diff's and the outer kit's blocks were obtained.
    pub diff_data: DataStats,
    pub kit_data: DataStats,
    pub delete_files: Vec<Vec<u8>>,
    pub kernels: Vec<Vec<u8>>,
    /// Where the build's time went (reported, never written).
    pub timings: Timings,
}

/// Wall time of each step of a build.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    /// Opening both ISOs and reading both system images' metadata.
    pub read: Duration,
    /// Comparing the images (contents of same-size files).
    pub compare: Duration,
    /// Writing the diff image (compressing its data).
    pub diff_image: Duration,
    /// Writing the outer kit.
    pub kit: Duration,
    /// Fragment blocks decompressed while comparing, and in the image: old, new.
    pub compare_fragments: [(u64, u64); 2],
    /// Digesting both images' stored fragment blocks; with a block cache,
    /// also loading and keeping their tail digests.
    pub tail_index: Duration,
    /// Same-size pairs whose tails were found equal from fragment blocks
    /// stored alike, decompressing nothing.
    pub tails_alike: u64,
    /// Per image, old and new: (tails whose digest was kept from an earlier
    /// build, tails decompressed and hashed).
    pub tails: [(u64, u64); 2],
}

/// An ISO opened once: every later read goes through this open file, so a
/// file put at its path afterwards changes nothing; the path only names it
/// in messages.
#[derive(Debug, Clone)]
pub struct OpenIso {
    pub file: Arc<File>,
    pub path: PathBuf,
}

impl OpenIso {
    pub fn open(path: &Path) -> Result<OpenIso> {
        let f = File::open(path).map_err(|e| Error::io(path, e))?;
        Ok(OpenIso {
            file: Arc::new(f),
            path: path.to_path_buf(),
        })
    }
}

fn open_iso(iso: &OpenIso) -> Result<Iso> {
    Iso::open(iso.file.clone()).map_err(|e| match e {
        Error::Invalid(m) | Error::Corrupt(m) => {
            Error::Invalid(format!("{}: {m}", iso.path.display()))
        }
        other => other,
    })
}

fn open_system(iso: &Iso, path: &Path) -> Result<Arc<Archive>> {
    let e = iso
        .lookup(SYSTEM_IMAGE)?
        .filter(|e| !e.is_dir)
        .ok_or_else(|| {
            Error::NotFound(format!(
                "SquashFS 'live/filesystem.squashfs' not found in '{}'",
                path.display()
            ))
        })?;
    Archive::open(iso.file_reader(&e)?).map_err(|e| match e {
        Error::Corrupt(m) => {
            Error::Corrupt(format!("{}: live/filesystem.squashfs: {m}", path.display()))
        }
        other => other,
    })
}

/// Checks that `path` is a release ISO the engine can use: an ISO 9660
/// image, whole (not truncated), whose directories and system image's
/// metadata all read (`live/filesystem.squashfs`: every inode, directory,
/// xattr, and data positions within bounds). File data is not
/// decompressed: authenticating the ISO (a digest, a signature) is what
/// proves its data.
pub fn check_iso(file: &OpenIso) -> Result<CheckedIso> {
    let path = file.path.as_path();
    let iso = open_iso(file)?;
    let named = |e: Error| match e {
        Error::Corrupt(m) => Error::Corrupt(format!("{}: {m}", path.display())),
        other => other,
    };
    iso.check().map_err(named)?;
    let system = open_system(&iso, path)?;
    system.check_metadata().map_err(|e| match e {
        Error::Corrupt(m) => {
            Error::Corrupt(format!("{}: live/filesystem.squashfs: {m}", path.display()))
        }
        other => other,
    })?;
    Ok(CheckedIso {
        system_size: system.superblock().bytes_used,
        created: iso.created(),
    })
}

/// What [`check_iso`] found out about an ISO.
#[derive(Debug, Clone, Copy)]
pub struct CheckedIso {
    /// The system image's size.
    pub system_size: u64,
    /// The release's date ([`Iso::created`]).
    pub created: Option<i64>,
}

/// Refuses to date a kit (`sde`, the new release's SOURCE_DATE_EPOCH) no
/// later than its source release (`created`, from that release's ISO).
/// Tails' installer copies the kit onto the boot device with rsync, which
/// skips files whose size and time match what is there: with an equal or
/// older date, files of the old release could stay in place unnoticed.
/// An ISO that records no date cannot be checked and passes.
pub fn check_source_date(sde: u32, created: Option<i64>, source: &str) -> Result<()> {
    match created {
        Some(c) if i64::from(sde) <= c => Err(Error::Invalid(format!(
            "SOURCE_DATE_EPOCH {sde} ({}) is not later than {source}, made {c} ({}): \
             Tails' installer would keep the old release's files wherever size and time match. \
             Use the new release's SOURCE_DATE_EPOCH (the date of its top debian/changelog entry, as Tails computes it)",
            utc(i64::from(sde)),
            utc(c)
        ))),
        _ => Ok(()),
    }
}

fn utc(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0).map_or_else(
        || t.to_string(),
        |d| d.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
    )
}

/// Builds the IUK that upgrades `old_iso`'s system to `new_iso`'s into
/// `kit_out`, using `diff_scratch` (an empty file in the job's directory)
/// for the diff image.
pub fn build_iuk(
    old_iso: &Path,
    new_iso: &Path,
    opts: &BuildOptions,
    diff_scratch: &File,
    kit_out: &File,
    progress: &dyn Progress,
) -> Result<BuildReport> {
    if opts.diff_name.is_empty() || opts.diff_name.contains('/') || opts.diff_name.starts_with('.')
    {
        return Err(Error::Invalid(format!(
            "invalid diff name {:?}",
            opts.diff_name
        )));
    }
    let started = Instant::now();
    let mut timings = Timings::default();
    let old = open_iso(&OpenIso::open(old_iso)?)?;
    check_source_date(
        opts.sde,
        old.created(),
        &format!("the old ISO {}", old_iso.display()),
    )?;
    let new = open_iso(&OpenIso::open(new_iso)?)?;
    // Fail early, before the long work, on what the kit needs from the new ISO.
    let efi = iso_tree(&new, "EFI", opts.sde)?;
    let syslinux = to_syslinux(iso_tree(&new, "isolinux", opts.sde)?)?;
    let utils = iso_tree(&new, "utils", opts.sde)?;
    let delete = delete_files(&old, &new)?;
    let kernels = changed_kernels(&old, &new)?;

    progress.phase("read", 0);
    let (old_system, new_system) = (open_system(&old, old_iso)?, open_system(&new, new_iso)?);
    let old_tree = old_system.to_tree()?;
    let new_tree = new_system.to_tree()?;
    timings.read = started.elapsed();
    // Tails in fragment blocks stored alike in both images are equal
    // without decompressing. With a cache, the other tails are compared by
    // digest, and the digests are kept for the next build that reads either
    // image.
    let step = Instant::now();
    let systems = [&old_system, &new_system];
    let (a, b) = rayon::join(
        || old_system.digest_stored_fragments(),
        || new_system.digest_stored_fragments(),
    );
    a?;
    b?;
    let kept = match &opts.cache {
        Some(cache) => {
            let ids = [
                old_system.fragment_identity()?,
                new_system.fragment_identity()?,
            ];
            for (system, id) in systems.iter().zip(&ids) {
                system.use_tail_digests(cache.tail_digests(id));
            }
            Some((cache, ids))
        }
        None => None,
    };
    timings.tail_index = step.elapsed();
    let step = Instant::now();
    let (diff, stats) = overlay_diff(&old_tree, &new_tree, opts.sde, &opts.diff, progress)?;
    timings.compare = step.elapsed();
    timings.compare_fragments = [old_system.fragment_reads(), new_system.fragment_reads()];
    timings.tails = [
        old_system.tail_digest_counts(),
        new_system.tail_digest_counts(),
    ];
    timings.tails_alike = old_system.tails_stored_alike();
    let step = Instant::now();
    if let Some((cache, ids)) = kept {
        for (system, id) in systems.iter().zip(&ids) {
            if system.tail_digest_counts().1 > 0
                && let Some(d) = system.tail_digests()
            {
                cache.put_tail_digests(id, &d);
            }
        }
    }
    timings.tail_index += step.elapsed();
    let step = Instant::now();
    let diff_written = write_image(
        &diff,
        &writer_options(diff_writer_options(opts.sde, opts.threads), opts),
        diff_scratch,
        progress,
    )?;
    let diff_size = diff_scratch.metadata()?.len();
    timings.diff_image = step.elapsed();
    let step = Instant::now();
    let diff_file: Arc<dyn ReadAt> = Arc::new(diff_scratch.try_clone()?);

    let mut live = vec![Node {
        name: opts.diff_name.as_bytes().to_vec(),
        meta: meta(0o644, opts.sde),
        kind: Kind::File(FileContent {
            size: diff_size,
            source: Source::Reader(Arc::new(IsoFile(diff_file))),
        }),
    }];
    for k in &kernels {
        let path = [b"live/".as_slice(), k].concat();
        let e = new.lookup(&path)?.ok_or_else(|| {
            Error::NotFound(format!("{} in the new ISO", String::from_utf8_lossy(&path)))
        })?;
        live.push(iso_node(&new, &path, &e, opts.sde, 0)?);
    }
    let overlay = Node::dir(
        "overlay",
        meta(0o755, opts.sde),
        vec![
            efi,
            Node::dir("live", meta(0o755, opts.sde), live),
            syslinux,
            utils,
        ],
    );
    let root = Node::dir(
        "",
        meta(0o755, opts.sde),
        vec![
            Node {
                name: b"FORMAT".to_vec(),
                meta: meta(0o644, opts.sde),
                kind: Kind::File(FileContent::from_bytes(FORMAT.to_vec())),
            },
            Node {
                name: b"control.yml".to_vec(),
                meta: meta(0o644, opts.sde),
                kind: Kind::File(FileContent::from_bytes(yaml::control_yml(&delete))),
            },
            overlay,
        ],
    );
    let kit = write_image(
        &root,
        &writer_options(kit_writer_options(opts.sde, opts.threads), opts),
        kit_out,
        progress,
    )?;
    timings.kit = step.elapsed();
    Ok(BuildReport {
        diff: stats,
        diff_size,
        kit_size: kit.image_size,
        diff_data: diff_written.data,
        kit_data: kit.data,
        delete_files: delete,
        kernels,
        timings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_names_like_tails() {
        for ok in [&b"vmlinuz"[..], b"vmlinuz2", b"initrd.img", b"initrd2.img"] {
            assert!(is_kernel_name(ok), "{}", String::from_utf8_lossy(ok));
        }
        for no in [
            &b"vmlinuz.old"[..],
            b"initrd.img.bak",
            b"filesystem.squashfs",
            b"xvmlinuz",
            b"initrd2img",
        ] {
            assert!(!is_kernel_name(no), "{}", String::from_utf8_lossy(no));
        }
    }

    #[test]
    fn modes_as_bsdtar_and_chmod_give_them() {
        let e = |mode: u32, dir: bool| IsoEntry {
            name: b"x".to_vec(),
            is_dir: dir,
            extents: Vec::new(),
            size: 0,
            posix: Some((mode, 1, 0, 0)),
            symlink: None,
        };
        assert_eq!(extracted_mode(&e(0o100444, false)), 0o444);
        assert_eq!(extracted_mode(&e(0o040555, true)), 0o555);
        assert_eq!(extracted_mode(&e(0o100600, false)), 0o644);
        assert_eq!(extracted_mode(&e(0o100700, false)), 0o755);
        assert_eq!(extracted_mode(&e(0o100666, false)), 0o644);
    }

    #[test]
    fn engine_options() {
        let o = |v: &[&str]| parse_options(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let e = o(&[
            "profile=fast",
            "ignore-if-same-content=a/*",
            "gensquashfs=1.2.0",
        ])
        .unwrap();
        assert_eq!(
            (e.diff.ignore_if_same_content, e.profile, e.gensquashfs),
            (
                vec!["a/*".to_string()],
                Profile::Fast,
                Some(Gensquashfs::V1_2_0)
            )
        );
        assert_eq!(o(&[]).unwrap(), EngineOptions::default());
        assert!(o(&["profile=quick"]).is_err());
        assert!(o(&["gensquashfs=4.6"]).is_err());
        assert!(o(&["threads=4"]).is_err());
    }

    #[test]
    fn syslinux_rewrite() {
        assert_eq!(
            replace_all(b"a/isolinux/b /isolinux/", b"/isolinux/", b"/syslinux/"),
            b"a/syslinux/b /syslinux/"
        );
    }
}
