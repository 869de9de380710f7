//! `iukfarm verify`: check a directory of IUKs (the farm's, or the RM's
//! own local builds) against a release's SHA256SUMS, manifest and signature.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use iukfarm_coordinator::manifest;

use super::BadInput;

#[derive(Parser)]
#[command(
    after_help = "Exit status: 0 every IUK matches and the signature is good; 1 a mismatch \
(each is named), a bad signature, or an unreadable file; 2 bad usage, or DIR, --release-dir \
or --cert missing."
)]
pub struct Args {
    /// Directory holding the IUKs to check.
    dir: PathBuf,
    /// Directory holding SHA256SUMS, manifest.json and manifest.json.asc
    /// (default: the same directory).
    #[arg(long, value_name = "DIR")]
    release_dir: Option<PathBuf>,
    /// OpenPGP certificate(s) of the release's signing key.
    #[arg(long, value_name = "FILE", required_unless_present = "no_signature")]
    cert: Option<PathBuf>,
    /// Do not check the signature.
    #[arg(long)]
    no_signature: bool,
    /// Only check the IUKs that are in DIR (e.g. the few built locally).
    #[arg(long)]
    partial: bool,
}

pub fn run(a: Args) -> Result<ExitCode> {
    let release_dir = a.release_dir.clone().unwrap_or_else(|| a.dir.clone());
    super::input_dir(&a.dir)?;
    super::input_dir(&release_dir)?;
    let certs = a
        .cert
        .as_ref()
        .map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display())))
        .transpose()
        .bad_input()?;
    let check = manifest::check_dir(&a.dir, &release_dir, certs.as_deref(), a.partial)?;
    super::client::report_check(&check, certs.is_some())
}
