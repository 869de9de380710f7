//! `iukfarm verify-iuk`: apply a kit in memory to the old release and
//! compare the result with the new one; then, where it can, read the kit
//! through the Linux kernel and compare that with our reading.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use iukfarm_engine::compare::Difference;
use iukfarm_engine::kit::verify::verify_iuk;

use super::BadInput;
use crate::output::temp_next_to;
use crate::progress::Reporter;

#[derive(Parser)]
#[command(
    after_help = "Exit status: 0 the kit turns the old release into exactly the new one; \
1 differences were found (each is printed), or the kit could not be read or applied, or the \
Linux kernel reads it otherwise or not at all; 2 bad usage, or a file missing, or an ISO that is \
not a release ISO, or --kernel-check on where the check cannot run."
)]
pub struct Args {
    /// ISO of the release the kit upgrades from.
    #[arg(long, value_name = "ISO")]
    old_iso: PathBuf,
    /// ISO of the release the kit upgrades to.
    #[arg(long, value_name = "ISO")]
    new_iso: PathBuf,
    /// The IUK to check.
    kit: PathBuf,
    /// No progress bar.
    #[arg(short, long)]
    quiet: bool,
    /// Once the kit applies right, mount it and its diff read-only and read every file
    /// through the Linux kernel's squashfs (root and loop devices): auto (where it can,
    /// saying so where it cannot), on (exit 2 where it cannot), off.
    #[arg(long, value_name = "auto|on|off", default_value = "auto")]
    kernel_check: iukfarm_kernelcheck::Mode,
}

pub fn run(a: Args) -> Result<ExitCode> {
    // The ISOs are what the kit is checked against: one missing or not a
    // release ISO is bad input (exit 2); a kit that does not read or
    // apply is a failed check (exit 1).
    for f in [&a.old_iso, &a.new_iso, &a.kit] {
        super::input_file(f)?;
    }
    let kernel = a
        .kernel_check
        .resolve()
        .context("--kernel-check on")
        .bad_input()?;
    // Opened once: checked, then verified against, the same files.
    let mut open = Vec::new();
    for iso in [&a.old_iso, &a.new_iso] {
        let o = iukfarm_engine::kit::OpenIso::open(iso)
            .with_context(|| iso.display().to_string())
            .bad_input()?;
        iukfarm_engine::kit::check_iso(&o)
            .with_context(|| format!("{}: not a release ISO", iso.display()))
            .bad_input()?;
        open.push(o);
    }
    let reporter = Reporter::new(a.quiet);
    // The diff is copied next to the kit while it is checked, then removed.
    let scratch = temp_next_to(&a.kit)?;
    let result = verify_iuk(
        &open[0],
        &open[1],
        &a.kit,
        scratch.as_file(),
        &reporter,
        None,
    );
    reporter.finish();
    let v = result.with_context(|| format!("verifying {}", a.kit.display()))?;
    if !v.differences.is_empty() {
        return Ok(differences(&a.kit, "after applying it", &v.differences));
    }
    println!(
        "OK: {} turns {} into {} (diff {}, {} deletions)",
        a.kit.display(),
        a.old_iso.display(),
        a.new_iso.display(),
        v.diffs_applied.join(", "),
        v.delete_files.len()
    );
    match kernel {
        Err(why) => {
            println!("not read through the kernel: {why}");
            Ok(ExitCode::SUCCESS)
        }
        Ok(()) => read_by_kernel(&a.kit),
    }
}

/// The kernel check of a kit that applied right; mount points go next to it.
fn read_by_kernel(kit: &Path) -> Result<ExitCode> {
    let work = kit.parent().filter(|p| !p.as_os_str().is_empty());
    match iukfarm_kernelcheck::check_kit(kit, work.unwrap_or(Path::new("."))) {
        Ok(r) if r.differences.is_empty() => {
            println!(
                "OK: the Linux kernel reads it as we do ({} entries, {:.1} MiB)",
                r.entries,
                r.bytes as f64 / (1 << 20) as f64
            );
            Ok(ExitCode::SUCCESS)
        }
        Ok(r) => Ok(differences(
            kit,
            "as the Linux kernel reads it",
            &r.differences,
        )),
        Err(iukfarm_kernelcheck::Error::Refused(m)) => {
            println!("{}: the Linux kernel cannot read it: {m}", kit.display());
            Ok(ExitCode::from(crate::exit::FAILURE))
        }
        Err(e) => Err(e).context("the kernel check"),
    }
}

fn differences(kit: &Path, when: &str, diffs: &[Difference]) -> ExitCode {
    println!("{}: {} differences {when}:", kit.display(), diffs.len());
    for d in diffs {
        println!("  {d}");
    }
    ExitCode::from(crate::exit::FAILURE)
}
