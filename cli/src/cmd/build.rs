//! `iukfarm build`: one IUK from two ISOs on this machine, the RM's
//! drop-in for `tails-create-iuk`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use super::BadInput;
use anyhow::{Context, Result};
use clap::Parser;
use iukfarm_coordinator::config;
use iukfarm_coordinator::inputs::Authority;
use iukfarm_engine::diff::DiffOptions;
use iukfarm_engine::kit::{BuildOptions, Profile, build_iuk};
use iukfarm_engine::sqfs::Gensquashfs;

use super::{Usage, usage};
use crate::output::{persist, temp_next_to};
use crate::progress::Reporter;

#[derive(Parser)]
#[command(
    after_help = "Exit status: 0 the IUK was written; 1 it could not be built (the \
message names the input and the problem); 2 bad usage or inputs (a missing ISO, one whose \
digest or signature does not match, a name that is not a file name); 130 interrupted. Nothing is left \
behind on failure or interruption: the IUK is written to a temporary file next to its final \
name and renamed only when complete."
)]
pub struct Args {
    /// ISO of the initial install version (the old release).
    #[arg(long, value_name = "ISO")]
    old_iso: PathBuf,
    /// ISO of the new release.
    #[arg(long, value_name = "ISO")]
    new_iso: PathBuf,
    /// Old version (default: from an ISO named tails-amd64-<version>.iso).
    #[arg(long)]
    old_version: Option<String>,
    /// New version (default: from an ISO named tails-amd64-<version>.iso).
    #[arg(long)]
    new_version: Option<String>,
    /// SOURCE_DATE_EPOCH of the new release (default: the environment's).
    #[arg(long, value_name = "SECONDS")]
    source_date_epoch: Option<u32>,
    /// File name of the diff in overlay/live/ (default: <new version>.squashfs).
    #[arg(long)]
    squashfs_diff_name: Option<String>,
    /// The IUK to write (default: Tails_amd64_<old>_to_<new>.iuk in --output-dir).
    #[arg(long, conflicts_with = "output_dir")]
    out: Option<PathBuf>,
    /// Directory for the IUK, made if missing (default: the current directory).
    #[arg(long)]
    output_dir: Option<PathBuf>,
    /// Product name in the IUK's file name.
    #[arg(long, default_value = "Tails")]
    product: String,
    /// Build target in the IUK's file name.
    #[arg(long, default_value = "amd64")]
    build_target: String,
    /// Compression threads (default: one per core). The bytes do not depend on it.
    #[arg(long, value_parser = super::parse_threads)]
    threads: Option<usize>,
    /// The RM's digests of the ISOs (sha256sum output): both must match before the build.
    #[arg(long, value_name = "FILE")]
    iso_sha256sums: Option<PathBuf>,
    /// OpenPGP keyring: both ISOs need a good detached signature <iso>.sig by one of its keys.
    #[arg(long, value_name = "FILE")]
    iso_keyring: Option<PathBuf>,
    /// Leave out files matching this glob whose contents did not change
    /// (tails-create-iuk's --ignore_if_same_content). Repeatable.
    #[arg(long, value_name = "GLOB")]
    ignore_if_same_content: Vec<String>,
    /// `tails`: the bytes tails-create-iuk writes; `fast`: changed files keep the new
    /// image's compressed blocks (reproducible, not tails-create-iuk's bytes).
    #[arg(long, default_value = "tails", value_name = "tails|fast")]
    profile: Profile,
    /// Whose bytes the IUK is: the gensquashfs Tails pins for the new version
    /// [default: 1.3.2 for 7.0 and later, 1.2.0 before].
    #[arg(long, value_name = "1.2.0|1.3.2")]
    gensquashfs: Option<Gensquashfs>,
    /// Look up and keep compressed blocks here (shared with later builds; a hit gives
    /// the very bytes compressing would).
    #[arg(long, value_name = "DIR")]
    block_cache: Option<PathBuf>,
    /// Size cap of --block-cache.
    #[arg(long, value_name = "SIZE", default_value = "8G", value_parser = super::parse_bytes)]
    block_cache_size: u64,
    /// Overwrite an existing IUK.
    #[arg(long)]
    force: bool,
    /// No progress bar.
    #[arg(short, long)]
    quiet: bool,
}

/// `tails-amd64-6.9.iso` -> `6.9` (and `6.0-rc1` -> `6.0~rc1`, as in IUK names).
fn version_from_iso(p: &Path) -> Option<String> {
    let name = p.file_name()?.to_str()?;
    let v = name
        .strip_prefix("tails-")?
        .split_once('-')?
        .1
        .strip_suffix(".iso")?;
    (!v.is_empty()).then(|| v.replace('-', "~"))
}

/// A usage error from the coordinator's shared checks.
fn bad(e: iukfarm_coordinator::Error) -> anyhow::Error {
    anyhow::Error::new(Usage(e.to_string()))
}

/// Same file (device and inode)?
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

pub fn run(a: Args) -> Result<ExitCode> {
    for iso in [&a.old_iso, &a.new_iso] {
        if !iso.is_file() {
            usage!("{}: no such ISO", iso.display());
        }
    }
    let sde = match a.source_date_epoch {
        Some(s) => s,
        None => match super::source_date_epoch()? {
            Some(s) => s,
            None => usage!(
                "no SOURCE_DATE_EPOCH: pass --source-date-epoch or set the variable \
                 (the new release's changelog date, as for tails-create-iuk)"
            ),
        },
    };
    // The coordinator's rules: whatever ends up in a file name is checked.
    config::check_name("product", &a.product).map_err(bad)?;
    config::check_name("build target", &a.build_target).map_err(bad)?;
    let version = |given: &Option<String>, iso: &Path, flag: &str| -> Result<String> {
        let v = match given {
            Some(v) => v.clone(),
            None => match version_from_iso(iso) {
                Some(v) => v,
                None => usage!(
                    "cannot tell the version from {}; pass {flag}",
                    iso.display()
                ),
            },
        };
        config::check_version(v).map_err(bad)
    };
    // Versions are only needed for the names they default.
    let diff_name = match &a.squashfs_diff_name {
        Some(n) => n.clone(),
        None => format!(
            "{}.squashfs",
            version(&a.new_version, &a.new_iso, "--new-version")?
        ),
    };
    config::check_file_name("diff name", &diff_name).map_err(bad)?;
    let gensquashfs = match a.gensquashfs {
        Some(g) => g,
        None => config::resolve_gensquashfs(
            None,
            &version(&a.new_version, &a.new_iso, "--new-version or --gensquashfs")?,
        )
        .map_err(bad)?,
    };
    let out = match &a.out {
        Some(p) => p.clone(),
        None => {
            let old_v = version(&a.old_version, &a.old_iso, "--old-version")?;
            let new_v = version(&a.new_version, &a.new_iso, "--new-version")?;
            a.output_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from("."))
                .join(format!(
                    "{}_{}_{old_v}_to_{new_v}.iuk",
                    a.product, a.build_target
                ))
        }
    };
    // An IUK upgrades from an older release: one "from" its own version
    // is a mistake in the arguments (the coordinator refuses it too).
    let known =
        |given: &Option<String>, iso: &Path| given.clone().or_else(|| version_from_iso(iso));
    if let (Some(o), Some(n)) = (
        known(&a.old_version, &a.old_iso),
        known(&a.new_version, &a.new_iso),
    ) && o == n
    {
        usage!(
            "the old and the new release are both version {n}: an IUK upgrades from an older \
             release (check --old-iso and --new-iso, or --old-version and --new-version)"
        );
    }
    for iso in [&a.old_iso, &a.new_iso] {
        if same_file(iso, &out) {
            usage!(
                "the IUK {} would overwrite the input {}: choose another --out",
                out.display(),
                iso.display()
            );
        }
    }
    if !a.force && out.exists() {
        usage!("{} exists; use --force to overwrite it", out.display());
    }
    if a.iso_sha256sums.is_some() || a.iso_keyring.is_some() {
        let auth =
            Authority::load(a.iso_sha256sums.as_deref(), a.iso_keyring.as_deref()).map_err(bad)?;
        for (what, iso) in [("old", &a.old_iso), ("new", &a.new_iso)] {
            let name = iso
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            auth.precheck(what, iso, &name).map_err(bad)?;
            let open = iukfarm_engine::kit::OpenIso::open(iso)
                .with_context(|| iso.display().to_string())
                .bad_input()?;
            auth.digest(what, &open, &name, None).map_err(bad)?;
        }
    }
    let opts = BuildOptions {
        diff_name,
        sde,
        threads: a.threads.unwrap_or(0),
        diff: DiffOptions {
            ignore_if_same_content: a.ignore_if_same_content.clone(),
        },
        profile: a.profile,
        gensquashfs,
        cache: match &a.block_cache {
            Some(dir) => super::open_block_cache(dir, a.block_cache_size)?,
            None => None,
        },
        shared: None,
    };
    let started = Instant::now();
    let reporter = Reporter::new(a.quiet);
    // Made only now, once every check passed: a refused run leaves nothing.
    if let Some(dir) = a.output_dir.as_ref().filter(|d| !d.exists()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating --output-dir {}", dir.display()))?;
    }
    let kit = temp_next_to(&out)?;
    let scratch = temp_next_to(&out)?;
    let result = build_iuk(
        &a.old_iso,
        &a.new_iso,
        &opts,
        scratch.as_file(),
        kit.as_file(),
        &reporter,
    );
    reporter.finish();
    let report = result
        .map_err(|e| match e {
            // What the inputs and options are (a date, a name, an ISO
            // that is not a release's): exit 2.
            iukfarm_engine::Error::Invalid(m) => anyhow::Error::new(Usage(m)),
            e @ (iukfarm_engine::Error::Corrupt(_)
            | iukfarm_engine::Error::Unsupported(_)
            | iukfarm_engine::Error::NotFound(_)) => anyhow::Error::new(Usage(e.to_string())),
            other => other.into(),
        })
        .with_context(|| format!("building {}", out.display()))?;
    drop(scratch);
    persist(kit, &out, a.force)?;
    if !a.quiet {
        eprintln!(
            "{}: {} bytes, gensquashfs {gensquashfs}'s bytes ({} changed files, {} whiteouts, \
             {} kernels, {} deletions) in {:.1}s",
            out.display(),
            report.kit_size,
            report.diff.changed_files,
            report.diff.whiteouts,
            report.kernels.len(),
            report.delete_files.len(),
            started.elapsed().as_secs_f64()
        );
        let (d, k) = (&report.diff_data, &report.kit_data);
        eprintln!(
            "blocks: {} compressed, {} from the block cache, {} copied from the new image \
             ({} of them fragment blocks), {} stored without trying xz",
            d.compressed_blocks + k.compressed_blocks,
            d.cache_hits + k.cache_hits,
            d.copied_blocks + k.copied_blocks,
            d.adopted_fragment_blocks,
            d.skipped_blocks + k.skipped_blocks
        );
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let (t, s) = (&report.timings, &report.diff);
        eprintln!(
            "time: {:.1}s reading both images, {:.1}s comparing ({} same-size files, {} decided \
             from stored blocks, {} tails in fragment blocks stored alike, {:.1} MiB \
             decompressed and compared; fragment blocks decompressed: {} of {} old, {} of {} new; \
             {:.1}s indexing fragment blocks), {:.1}s writing the diff, {:.1}s writing \
             the kit",
            t.read.as_secs_f64(),
            t.compare.as_secs_f64(),
            s.compared,
            s.decided_from_blocks,
            t.tails_alike,
            mib(s.compared_bytes),
            t.compare_fragments[0].0,
            t.compare_fragments[0].1,
            t.compare_fragments[1].0,
            t.compare_fragments[1].1,
            t.tail_index.as_secs_f64(),
            t.diff_image.as_secs_f64(),
            t.kit.as_secs_f64()
        );
        if opts.cache.is_some() {
            eprintln!(
                "tail digests: {} old and {} new from earlier builds, {} old and {} new hashed",
                t.tails[0].0, t.tails[1].0, t.tails[0].1, t.tails[1].1,
            );
        }
        eprintln!(
            "diff: {:.1} MiB compressed ({:.1} MiB of it in fragment blocks), {:.1} MiB from the \
             block cache, {:.1} MiB copied; kit: {:.1} MiB compressed, {:.1} MiB from the block \
             cache",
            mib(d.compressed_bytes),
            mib(d.fragment_compressed_bytes),
            mib(d.cache_hit_bytes),
            mib(d.copied_bytes),
            mib(k.compressed_bytes),
            mib(k.cache_hit_bytes),
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_from_iso_names() {
        assert_eq!(
            version_from_iso(Path::new("/isos/tails-amd64-6.9.iso")).as_deref(),
            Some("6.9")
        );
        assert_eq!(
            version_from_iso(Path::new("tails-amd64-6.0-rc1.iso")).as_deref(),
            Some("6.0~rc1")
        );
        assert_eq!(version_from_iso(Path::new("debian.iso")), None);
    }
}
