//! `iukfarm demo`: a whole release on generated sample releases, needing
//! nothing but this binary: sample Tails-like ISOs (written natively), the
//! IUK matrix built by a coordinator with two in-process workers (one kit
//! built twice, on both, to show the bytes match), each kit verified by
//! applying it, SHA256SUMS and manifest.json signed with a throw-away key,
//! and the result checked like `iukfarm verify` does.
//!
//! `iukfarm samples` writes just the sample ISO archive, to try a farm.

use std::fs;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use clap::Parser;
use iukfarm_coordinator::config::{self, Config, DEFAULT_ISO_PATTERN, Reproduce};
use iukfarm_coordinator::manifest;
use iukfarm_coordinator::signing::{self, SigningKey};

use super::usage;
use crate::progress::Reporter;
use crate::samples;

#[derive(Parser)]
pub struct Args {
    /// Where to write the sample ISOs, the release and the demo key's certificate.
    #[arg(long, default_value = "iukfarm-demo")]
    output_dir: PathBuf,
    /// Number of sample releases (IUKs: one from each older release to the newest).
    #[arg(long, default_value_t = 4)]
    releases: u64,
    /// Approximate size of each sample system in MiB.
    #[arg(long, default_value_t = 16)]
    scale: u64,
    /// Which Tails the sample releases look like: 7 (zstd system images, a GRUB module
    /// directory, versions 7.x) or 6 (xz, versions 6.x).
    #[arg(long, value_enum, default_value_t)]
    layout: samples::Layout,
    /// In-process workers.
    #[arg(long, default_value_t = 2)]
    workers: u32,
    /// Replace the contents of an existing output directory.
    #[arg(long)]
    force: bool,
    /// One line per change instead of progress bars.
    #[arg(long)]
    plain: bool,
    /// Then the end of the release as the RM does it, on this machine: their own local
    /// build, the upgrade-description files written and signed, the IUKs published to a
    /// local "server" directory (rsync, the same checks and promotion as `iukfarm
    /// publish` over ssh) and checked there against the RM's build. Needs rsync.
    #[arg(long)]
    end_of_release: bool,
}

#[derive(Parser)]
pub struct SamplesArgs {
    /// Root of the ISO archive to write (tails-amd64-<v>/tails-amd64-<v>.iso).
    #[arg(long)]
    output_dir: PathBuf,
    /// Number of sample releases (versions 7.0, 7.1, ... or 6.0, 6.1, ...).
    #[arg(long, default_value_t = 4)]
    releases: u64,
    /// Which Tails the releases look like: 7 (zstd system images with Tails 7's options, a
    /// GRUB module directory, a directory of 300 libraries changed in every release) or 6
    /// (xz system images).
    #[arg(long, value_enum, default_value_t)]
    layout: samples::Layout,
    /// Approximate size of each sample system in MiB.
    #[arg(long, default_value_t = 16)]
    scale: u64,
    /// Add a library of this many MiB that changes in every release (like Tor Browser's
    /// libxul.so): full blocks that every IUK of a release shares.
    #[arg(long, value_name = "MIB", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1024))]
    big_file_mib: u64,
    /// Compression threads (default: one per core).
    #[arg(short = 'j', long, value_parser = super::parse_threads)]
    threads: Option<usize>,
}

fn check_sizes(releases: u64, scale: u64) -> Result<()> {
    if !(2..=60).contains(&releases) {
        usage!("--releases must be between 2 and 60");
    }
    if !(1..=4096).contains(&scale) {
        usage!("--scale must be between 1 and 4096 (MiB)");
    }
    Ok(())
}

/// How to run this binary again: `iukfarm` when that is what PATH finds,
/// else the path it was started by (e.g. `target/release/iukfarm` under
/// `cargo run`), so that pasted hints work.
pub fn this_command() -> String {
    let me = std::env::current_exe().ok();
    let on_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("iukfarm"))
            .find(|c| c.is_file())
    });
    match (me, on_path) {
        (Some(me), Some(found)) if fs::canonicalize(&found).ok() == fs::canonicalize(&me).ok() => {
            "iukfarm".into()
        }
        (Some(me), _) => {
            let cwd = std::env::current_dir().unwrap_or_default();
            me.strip_prefix(&cwd).unwrap_or(&me).display().to_string()
        }
        (None, _) => "iukfarm".into(),
    }
}

/// The sizes of the sample ISOs written, for the user (not a guess from --scale).
fn iso_sizes(isos: &[(String, PathBuf)]) -> String {
    let mib: Vec<u64> = (isos.iter())
        .map(|(_, p)| fs::metadata(p).map_or(0, |m| m.len()).div_ceil(1 << 20))
        .collect();
    match (mib.iter().min(), mib.iter().max()) {
        (Some(lo), Some(hi)) if lo == hi => format!("{lo} MiB each"),
        (Some(lo), Some(hi)) => format!("{lo} to {hi} MiB each"),
        _ => String::new(),
    }
}

pub fn samples(a: SamplesArgs) -> Result<ExitCode> {
    check_sizes(a.releases, a.scale)?;
    if a.output_dir.exists() && !a.output_dir.is_dir() {
        usage!("--output-dir {}: not a directory", a.output_dir.display());
    }
    let reporter = Reporter::new(true);
    let series = samples::Series {
        layout: a.layout,
        releases: a.releases,
        scale: a.scale,
        big_mib: a.big_file_mib,
    };
    let isos = samples::write_releases(
        &a.output_dir,
        series,
        a.threads.unwrap_or(0),
        &reporter,
        |line| eprintln!("  {line}"),
    )?;
    println!(
        "{} sample releases in {} (ISOs of {}; SOURCE_DATE_EPOCH of the newest: {})",
        isos.len(),
        a.output_dir.display(),
        iso_sizes(&isos),
        samples::SAMPLE_SDE
    );
    Ok(ExitCode::SUCCESS)
}

pub fn run(a: Args) -> Result<ExitCode> {
    check_sizes(a.releases, a.scale)?;
    if a.output_dir.exists() && !a.output_dir.is_dir() {
        usage!("--output-dir {}: not a directory", a.output_dir.display());
    }
    if a.output_dir.exists() && fs::read_dir(&a.output_dir)?.next().is_some() {
        if !a.force {
            usage!(
                "{} exists and is not empty (an earlier demo?): `{} demo --force{}{}` starts \
                 again from scratch, replacing its contents, or choose another --output-dir",
                a.output_dir.display(),
                this_command(),
                if a.end_of_release {
                    " --end-of-release"
                } else {
                    ""
                },
                dir_flag(&a.output_dir)
            );
        }
        fs::remove_dir_all(&a.output_dir)
            .with_context(|| format!("clearing {}", a.output_dir.display()))?;
    }
    if a.end_of_release {
        let rsync = std::process::Command::new("rsync")
            .arg("--version")
            .stdout(std::process::Stdio::null())
            .status();
        if !rsync.is_ok_and(|s| s.success()) {
            usage!(
                "--end-of-release publishes with rsync, which is not installed: \
                 apt-get install rsync"
            );
        }
    }
    let isos_dir = a.output_dir.join("isos");
    let release_dir = a.output_dir.join("release");
    fs::create_dir_all(&isos_dir)?;
    let started = Instant::now();
    let reporter = Reporter::new(false);
    println!(
        "iukfarm demo: {} sample releases (systems of about {} MiB); IUKs from each older \
         release to the newest",
        a.releases, a.scale
    );
    let isos = samples::write_releases(
        &isos_dir,
        samples::Series {
            layout: a.layout,
            releases: a.releases,
            scale: a.scale,
            big_mib: 0,
        },
        0,
        &reporter,
        |line| println!("  {line}"),
    )?;
    reporter.finish();
    if iukfarm_engine::Progress::is_cancelled(&reporter) {
        return Err(iukfarm_engine::Error::Cancelled.into());
    }
    println!("  sample ISOs of {}", iso_sizes(&isos));

    // A throw-away signing key: the secret half never touches the disk.
    let key = signing::generate("iukfarm demo key (throw-away) <demo@iukfarm.invalid>")?;
    let cert_path = a.output_dir.join("demo-signing-key.asc");
    fs::write(&cert_path, signing::public_armored(&key)?)?;

    let (new_v, _) = isos.last().cloned().expect("at least two releases");
    let sources: Vec<String> = isos[..isos.len() - 1]
        .iter()
        .map(|(v, _)| v.clone())
        .collect();
    println!(
        "release {new_v} from {}: a coordinator and {} in-process workers",
        sources.join(", "),
        a.workers
    );
    let gensquashfs = config::resolve_gensquashfs(None, &new_v)?;
    let cfg = Config {
        new_version: new_v,
        source_versions: sources,
        source_date_epoch: samples::SAMPLE_SDE,
        iso_root: isos_dir.clone(),
        iso_pattern: DEFAULT_ISO_PATTERN.into(),
        iso_sha256sums: None,
        iso_keyring: None,
        output_dir: release_dir.clone(),
        product: "Tails".into(),
        build_target: "amd64".into(),
        engine_options: vec![format!("gensquashfs={gensquashfs}")],
        require_engine: None,
        listen: "127.0.0.1:0".parse().expect("literal address"),
        tls: None,
        tls_client_ca: None,
        tls_revoked: None,
        token: None,
        signing: SigningKey::Cert(Box::new(key)),
        reproduce: if a.workers >= 2 {
            Reproduce::Some(1)
        } else {
            Reproduce::None
        },
        junit: Some(a.output_dir.join("junit.xml")),
        lease_timeout: Duration::from_secs(30),
        max_attempts: 3,
        linger: Duration::ZERO,
        block_store: 0,
        metrics_listen: None,
        verify_jobs: 1,
        audit_rate: iukfarm_coordinator::audit::RATE,
        kernel_check: iukfarm_kernelcheck::available().is_ok(),
    };
    let website = a.output_dir.join("website");
    let udf = if a.end_of_release {
        fs::create_dir_all(&website)?;
        super::udf::StepArgs {
            udf_dir: Some(website.clone()),
            udf_next_versions: vec![next_version(&cfg.new_version)],
            udf_previous_versions: Vec::new(),
            udf_major_release: true,
            udf_channel: "stable".into(),
            udf_unsigned: false,
        }
        .plan(&cfg)?
    } else {
        None
    };
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    // The Reporter's Ctrl-C handler sets its flag; forward it to the release.
    let watcher = std::thread::spawn(move || {
        while !flag.load(Ordering::SeqCst) {
            if iukfarm_engine::Progress::is_cancelled(&reporter) {
                flag.store(true, Ordering::SeqCst);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let code = super::block_on(super::farm::embedded(
        cfg,
        a.workers,
        None,
        a.plain,
        None,
        super::farm::BlockCacheAt {
            dir: None,
            cap: 8 << 30,
        },
        interrupted.clone(),
    ));
    let was_interrupted = interrupted.swap(true, Ordering::SeqCst);
    let _ = watcher.join();
    let code = code?;
    if was_interrupted {
        return Ok(ExitCode::from(crate::exit::INTERRUPTED));
    }
    if code != ExitCode::SUCCESS {
        return Ok(code);
    }

    // What an RM would run on the result.
    let cert = fs::read(&cert_path)?;
    let check = manifest::check_dir(&release_dir, &release_dir, Some(&cert), false)?;
    ensure!(
        check.problems.is_empty(),
        "the release does not check out: {}",
        check.problems.join("; ")
    );
    println!(
        "done in {:.1}s: {} IUKs built by the farm, verified by applying each, one rebuilt on a \
second worker with identical bytes; manifest signed by {}.",
        started.elapsed().as_secs_f64(),
        check.good.len(),
        check.signer.unwrap_or_default()
    );
    println!("  ISOs:     {}", isos_dir.display());
    println!(
        "  release:  {} (IUKs, SHA256SUMS, manifest.json, manifest.json.asc)",
        release_dir.display()
    );
    println!(
        "  key:      {} (throw-away demo certificate)",
        cert_path.display()
    );
    println!("  JUnit:    {}", a.output_dir.join("junit.xml").display());
    println!(
        "check it:  (cd {} && sha256sum --check --strict SHA256SUMS); {} verify {} --cert {}",
        release_dir.display(),
        this_command(),
        release_dir.display(),
        cert_path.display()
    );
    match udf {
        Some(step) => end_of_release(&a, &release_dir, &cert_path, step, &isos),
        None => {
            println!(
                "the end of the release too (the RM's own build, UDFs, publishing): \
                 {} demo --force --end-of-release{}",
                this_command(),
                dir_flag(&a.output_dir)
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// ` --output-dir DIR` unless DIR is the default.
fn dir_flag(dir: &std::path::Path) -> String {
    if dir == std::path::Path::new("iukfarm-demo") {
        String::new()
    } else {
        format!(" --output-dir {}", dir.display())
    }
}

/// `6.3` → `6.4`: the next version the UDFs announce.
fn next_version(v: &str) -> String {
    match v.rsplit_once('.').map(|(head, n)| (head, n.parse::<u64>())) {
        Some((head, Ok(n))) => format!("{head}.{}", n + 1),
        _ => format!("{v}.1"),
    }
}

/// What the RM does once the farm's release is signed (tails-iuk.md
/// §4.5, §4.6, §5), each step with the command they would run.
fn end_of_release(
    a: &Args,
    release_dir: &std::path::Path,
    cert_path: &std::path::Path,
    udf: super::udf::Step,
    isos: &[(String, PathBuf)],
) -> Result<ExitCode> {
    let started = Instant::now();
    println!();
    println!("the end of the release, as the RM does it:");

    // 1. The RM's own build, on their machine: nothing shared with the farm.
    let rm_dir = a.output_dir.join("rm-build");
    fs::create_dir_all(&rm_dir)?;
    let (new_v, new_iso) = isos.last().expect("at least two releases");
    let mut sums = String::new();
    for (old_v, old_iso) in &isos[..isos.len() - 1] {
        let name = format!("Tails_amd64_{old_v}_to_{new_v}.iuk");
        let out = rm_dir.join(&name);
        let opts = iukfarm_engine::kit::BuildOptions {
            diff_name: format!("{new_v}.squashfs"),
            sde: samples::SAMPLE_SDE,
            threads: 0,
            diff: Default::default(),
            profile: iukfarm_engine::kit::Profile::Tails,
            gensquashfs: config::resolve_gensquashfs(None, new_v)?,
            cache: None,
            shared: None,
        };
        let kit = crate::output::temp_next_to(&out)?;
        let scratch = crate::output::temp_next_to(&out)?;
        iukfarm_engine::kit::build_iuk(
            old_iso,
            new_iso,
            &opts,
            scratch.as_file(),
            kit.as_file(),
            &iukfarm_engine::NoProgress,
        )
        .with_context(|| format!("building {}", out.display()))?;
        drop(scratch);
        crate::output::persist(kit, &out, true)?;
        let sha = iukfarm_coordinator::inputs::sha256_file(&out)?;
        sums.push_str(&format!("{sha}  {name}\n"));
    }
    let rm_sums = rm_dir.join("SHA256SUMS");
    fs::write(&rm_sums, &sums)?;
    println!(
        "1. the RM's own build, on their machine (iukfarm build): {} IUKs in {}",
        isos.len() - 1,
        rm_dir.display()
    );

    // 2. The upgrade-description files, from the signed manifest.
    println!(
        "2. the upgrade-description files, from the signed manifest, signed and checked \
         (iukfarm release --udf-dir, or iukfarm udf generate):"
    );
    udf.run(release_dir)?;

    // 3. Published on a "server" that is a directory here, checked there
    // against the RM's build, promoted.
    let server = fs::canonicalize(&a.output_dir)?.join("server");
    let staging = server.join("srv/tmp");
    let fin = server.join("srv/rsync/tails/tails/stable/iuk/v2");
    let trace = server.join("srv/rsync/tails/tails/project/trace");
    fs::create_dir_all(trace.parent().expect("a parent"))?;
    let s = |p: &std::path::Path| p.to_string_lossy().into_owned();
    println!(
        "3. the IUKs copied to the rsync server, checked there against the RM's build and \
         promoted (iukfarm publish --promote; here the server is a directory):"
    );
    let args = super::publish::Args {
        release_dir: release_dir.to_path_buf(),
        cert: cert_path.to_path_buf(),
        rm_sums: rm_sums.clone(),
        host: "localhost".into(),
        ssh: String::new(),
        staging_dir: s(&staging),
        promote: true,
        final_dir: Some(s(&fin)),
        owner: None,
        trace_file: Some(s(&trace)),
        sudo: false,
        bwlimit: None,
        // As Tails 7's release process verifies: the new version's major only.
        source_version_regexp: new_v
            .split_once('.')
            .map(|(major, _)| format!("{major}[.].*")),
        fetch: false,
        conn: Default::default(),
    };
    let code = super::publish::report(super::publish::publish_release(
        &args,
        &iukfarm_publish::Remote::local(),
    ));
    if code != ExitCode::SUCCESS {
        return Ok(code);
    }
    println!(
        "end of the release done in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    println!("  RM build: {}", rm_dir.display());
    println!(
        "  website:  {} (upgrades.yml and .pgp)",
        a.output_dir.join("website").display()
    );
    println!(
        "  server:   {} (published IUKs, trace file)",
        server.display()
    );
    Ok(ExitCode::SUCCESS)
}
