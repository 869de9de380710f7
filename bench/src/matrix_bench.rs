//! A whole release matrix: N sources built by `iukfarm release` with W
//! embedded workers, against the same N IUKs built one after the other by
//! `iukfarm build` (what a single machine without the farm would do).
//! Same inputs, same bytes; measured side by side in one run.
//!
//! The release also hashes every ISO, verifies every IUK by applying it and
//! signs the manifest; so a second sequential row adds `verify-iuk` to each
//! build.

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Result, ensure};
use clap::Parser;
use iukfarm_bench::{measure, sha256, throwaway_key};

#[derive(Parser)]
struct Args {
    /// Source versions (IUKs) in the release.
    #[arg(long, default_value_t = 6)]
    sources: u32,
    /// Embedded worker counts to measure, comma-separated.
    #[arg(long, default_value = "1,2", value_delimiter = ',')]
    workers: Vec<u32>,
    /// Approximate size of each sample system in MiB.
    #[arg(long, default_value_t = 32)]
    scale: u32,
    /// The iukfarm binary (default: the release build next to this one).
    #[arg(long)]
    iukfarm: Option<PathBuf>,
}

const SDE: &str = "1730285444";

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.sources >= 1, "--sources must be at least 1");
    let iukfarm = match args.iukfarm {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("iukfarm"),
    };
    ensure!(
        iukfarm.is_file(),
        "{} not found: cargo build --release first",
        iukfarm.display()
    );
    let tmp = tempfile::tempdir()?;
    let work = tmp.path();
    let isos = work.join("isos");
    let releases = args.sources + 1;
    eprintln!(
        "writing {releases} sample releases of ~{} MiB...",
        args.scale
    );
    let samples = measure(
        Command::new(&iukfarm)
            .args([
                "samples",
                "--releases",
                &releases.to_string(),
                "--scale",
                &args.scale.to_string(),
            ])
            .arg("--output-dir")
            .arg(&isos),
    )?;
    eprintln!("  {:.1}s", samples.wall);
    let versions: Vec<String> = (0..releases).map(|r| format!("7.{r}")).collect();
    let new = versions.last().unwrap().clone();
    let sources = &versions[..versions.len() - 1];
    let iso = |v: &str| isos.join(format!("tails-amd64-{v}/tails-amd64-{v}.iso"));

    let key = throwaway_key(work)?;

    // The matrix one IUK after another, each build using every core.
    let singles = work.join("singles");
    fs::create_dir(&singles)?;
    let (mut wall, mut cpu, mut rss) = (0.0, 0.0, 0.0f64);
    let (mut vwall, mut vcpu, mut vrss) = (0.0, 0.0, 0.0f64);
    let mut expected = Vec::new();
    for v in sources {
        let out = singles.join(format!("Tails_amd64_{v}_to_{new}.iuk"));
        let m = measure(
            Command::new(&iukfarm)
                .args(["build", "--quiet", "--source-date-epoch", SDE, "--old-iso"])
                .arg(iso(v))
                .arg("--new-iso")
                .arg(iso(&new))
                .arg("--out")
                .arg(&out),
        )?;
        let ver = measure(
            Command::new(&iukfarm)
                .args(["verify-iuk", "--quiet", "--old-iso"])
                .arg(iso(v))
                .arg("--new-iso")
                .arg(iso(&new))
                .arg(&out)
                .stdout(std::process::Stdio::null()),
        )?;
        eprintln!(
            "  build {v} -> {new}: {:.1}s, verify-iuk {:.1}s",
            m.wall, ver.wall
        );
        wall += m.wall;
        cpu += m.cpu;
        rss = rss.max(m.max_rss_mib);
        vwall += ver.wall;
        vcpu += ver.cpu;
        vrss = vrss.max(ver.max_rss_mib);
        expected.push(sha256(&out)?);
    }
    let mut rows = vec![
        (format!("{} x iukfarm build", sources.len()), wall, cpu, rss),
        (
            format!("{} x (build + verify-iuk)", sources.len()),
            wall + vwall,
            cpu + vcpu,
            rss.max(vrss),
        ),
    ];

    for &w in &args.workers {
        let out = work.join(format!("release-{w}"));
        let m = measure(
            Command::new(&iukfarm)
                .args(["release", "--plain", "--workers", &w.to_string()])
                .args([
                    "--new-version",
                    &new,
                    "--source-versions",
                    &sources.join(" "),
                ])
                .args(["--source-date-epoch", SDE, "--signing-key"])
                .arg(&key)
                .arg("--iso-root")
                .arg(&isos)
                .arg("--output-dir")
                .arg(&out)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null()),
        )?;
        for (v, want) in sources.iter().zip(&expected) {
            let got = sha256(&out.join(format!("Tails_amd64_{v}_to_{new}.iuk")))?;
            ensure!(
                &got == want,
                "release with {w} workers: {v} differs from iukfarm build"
            );
        }
        eprintln!("  release with {w} workers: {:.1}s", m.wall);
        rows.push((
            format!("iukfarm release, {w} workers"),
            m.wall,
            m.cpu,
            m.max_rss_mib,
        ));
    }

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "\nmatrix: {} sources -> {new}, systems of ~{} MiB, {cores} cores; identical IUK bytes in every row",
        sources.len(),
        args.scale
    );
    println!(
        "{:<32} {:>9} {:>9} {:>10} {:>12} {:>12}",
        "", "wall s", "CPU s", "peak MiB", "vs builds", "vs b+verify"
    );
    for (name, w, c, r) in &rows {
        println!(
            "{name:<32} {w:>9.1} {c:>9.1} {r:>10.1} {:>11.2}x {:>11.2}x",
            rows[0].1 / w,
            rows[1].1 / w
        );
    }
    println!(
        "(the releases also hash {releases} ISOs, verify each IUK by applying it and sign the manifest; \
peak MiB of a release is its one process, coordinator and workers together)"
    );
    Ok(())
}
