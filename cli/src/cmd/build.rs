//! `iukfarm build`: one IUK from two ISOs on this machine, the RM's
//! drop-in for `tails-create-iuk`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use iukfarm_engine::diff::DiffOptions;
use iukfarm_engine::kit::{BuildOptions, Profile, build_iuk};

use super::sqfs::{persist, temp_next_to};
use crate::progress::Reporter;

#[derive(Parser)]
#[command(
    after_help = "Exit status: 0 the IUK was written; 1 it could not be built (the \
message names the input and the problem); 2 bad usage; 130 interrupted. Nothing is left \
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
    /// Directory for the IUK (default: the current directory).
    #[arg(long)]
    output_dir: Option<PathBuf>,
    /// Product name in the IUK's file name.
    #[arg(long, default_value = "Tails")]
    product: String,
    /// Build target in the IUK's file name.
    #[arg(long, default_value = "amd64")]
    build_target: String,
    /// Compression threads (default: one per core). The bytes do not depend on it.
    #[arg(long)]
    threads: Option<usize>,
    /// Leave out files matching this glob whose contents did not change
    /// (tails-create-iuk's --ignore_if_same_content). Repeatable.
    #[arg(long, value_name = "GLOB")]
    ignore_if_same_content: Vec<String>,
    /// `tails`: the bytes tails-create-iuk writes; `fast`: changed files keep the new
    /// image's compressed blocks (reproducible, not tails-create-iuk's bytes).
    #[arg(long, default_value = "tails", value_name = "tails|fast")]
    profile: Profile,
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

pub fn run(a: Args) -> Result<ExitCode> {
    let sde = match a.source_date_epoch {
        Some(s) => s,
        None => super::source_date_epoch()?.context(
            "no SOURCE_DATE_EPOCH: pass --source-date-epoch or set the variable \
             (the new release's changelog date, as for tails-create-iuk)",
        )?,
    };
    let version = |given: &Option<String>, iso: &Path, flag: &str| -> Result<String> {
        match given {
            Some(v) => Ok(v.clone()),
            None => version_from_iso(iso).with_context(|| {
                format!(
                    "cannot tell the version from {}; pass {flag}",
                    iso.display()
                )
            }),
        }
    };
    let checked = |v: String, what: &str| -> Result<String> {
        if v.is_empty() || v.contains('/') || v.starts_with('.') {
            bail!("invalid {what} version {v:?}");
        }
        Ok(v)
    };
    // Versions are only needed for the names they default.
    let diff_name = match &a.squashfs_diff_name {
        Some(n) => n.clone(),
        None => format!(
            "{}.squashfs",
            checked(version(&a.new_version, &a.new_iso, "--new-version")?, "new")?
        ),
    };
    let out = match &a.out {
        Some(p) => p.clone(),
        None => {
            let old_v = checked(version(&a.old_version, &a.old_iso, "--old-version")?, "old")?;
            let new_v = checked(version(&a.new_version, &a.new_iso, "--new-version")?, "new")?;
            a.output_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from("."))
                .join(format!(
                    "{}_{}_{old_v}_to_{new_v}.iuk",
                    a.product, a.build_target
                ))
        }
    };
    if !a.force && out.exists() {
        bail!("{} exists; use --force to overwrite it", out.display());
    }
    for iso in [&a.old_iso, &a.new_iso] {
        if !iso.is_file() {
            bail!("{}: no such ISO", iso.display());
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
        cache: match &a.block_cache {
            Some(dir) => super::open_block_cache(dir, a.block_cache_size)?,
            None => None,
        },
    };
    let started = Instant::now();
    let reporter = Reporter::new(a.quiet);
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
    let report = result.with_context(|| format!("building {}", out.display()))?;
    drop(scratch);
    persist(kit, &out, a.force)?;
    if !a.quiet {
        eprintln!(
            "{}: {} bytes ({} changed files, {} whiteouts, {} kernels, {} deletions) in {:.1}s",
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
