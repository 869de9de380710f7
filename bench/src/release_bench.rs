//! The release benchmark (issue 5): on a corpus of real Debian systems
//! evolving like point releases (`bench/make-corpus.sh`), measures side by
//! side in one run:
//!
//! * the Tails method (the test suite's re-enactment of tails-create-iuk:
//!   loop mounts, overlayfs, `rsync --checksum`, gensquashfs) on the largest
//!   IUK;
//! * `iukfarm build`, tails profile, every IUK (and the largest against the
//!   Tails method's bytes);
//! * `iukfarm build --profile fast`, every IUK, each verified by applying it;
//! * the IUKs one after another sharing one block cache, to split each extra
//!   source's cost into cached data blocks, fragments and the outer kit;
//! * `iukfarm release` with one embedded worker, cold then warm block cache.
//!
//! Prints wall/CPU time, peak memory, IUK sizes and ratios, and writes them
//! to a results file. Needs root (the Tails method mounts).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use iukfarm_bench::{Measure, measure, sha256, throwaway_key};

#[derive(Parser)]
struct Args {
    /// Directory of `tails-amd64-<version>.iso` files (bench/make-corpus.sh).
    #[arg(long, default_value = "target/bench-corpus")]
    corpus: PathBuf,
    /// The iukfarm binary (default: the one next to this one).
    #[arg(long)]
    iukfarm: Option<PathBuf>,
    /// Also write the results here.
    #[arg(long, default_value = "target/release-bench.txt")]
    out: PathBuf,
    /// Leave out the Tails method (no root needed then).
    #[arg(long)]
    skip_tails_method: bool,
    /// Whose bytes `iukfarm` writes; the Tails method runs the gensquashfs
    /// named by $GENSQUASHFS (default: the one on PATH), which must be that
    /// version (bench/run.sh sets both from TAILS).
    #[arg(long, default_value = "1.3.2")]
    gensquashfs: String,
}

/// The release date every build is given: the new ISO's own volume date, as
/// Tails' SOURCE_DATE_EPOCH is the date the new release was built with
/// (iukfarm refuses a date no later than a source release's).
fn source_date_epoch(new_iso: &Path) -> Result<String> {
    let file = fs::File::open(new_iso).with_context(|| format!("{}", new_iso.display()))?;
    let iso = iukfarm_engine::iso::Iso::open(std::sync::Arc::new(file))
        .with_context(|| format!("{}: not an ISO 9660 image", new_iso.display()))?;
    let date = iso
        .created()
        .with_context(|| format!("{}: no volume creation date", new_iso.display()))?;
    Ok(date.to_string())
}

/// The version line of the gensquashfs the Tails method will run.
fn tails_gensquashfs(want: &str) -> Result<String> {
    let bin = std::env::var("GENSQUASHFS").unwrap_or_else(|_| "gensquashfs".into());
    let out = Command::new(&bin)
        .arg("--version")
        .output()
        .with_context(|| format!("running {bin} --version"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next().unwrap_or("").trim().to_string();
    ensure!(
        line.contains(&format!(" {want}")),
        "the Tails method's gensquashfs ({bin}) says {line:?}, not {want}: set GENSQUASHFS \
         (bench/run.sh does, from TAILS)"
    );
    Ok(line)
}

/// `1.10` after `1.9`: numeric components compared as numbers.
fn version_key(v: &str) -> Vec<(u64, String)> {
    v.split(['.', '~', '-'])
        .map(|p| (p.parse().unwrap_or(u64::MAX), p.to_string()))
        .collect()
}

/// What `iukfarm build` says about its blocks, in MiB.
#[derive(Default, Clone, Copy)]
struct Detail {
    diff_compressed: f64,
    diff_fragments_compressed: f64,
    diff_cached: f64,
    diff_copied: f64,
    kit_compressed: f64,
}

fn parse_detail(stderr: &str) -> Result<Detail> {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("diff: "))
        .with_context(|| format!("no block report in iukfarm's output:\n{stderr}"))?;
    let n: Vec<f64> = line
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter_map(|s| s.parse().ok())
        .collect();
    ensure!(n.len() >= 5, "unexpected block report: {line}");
    Ok(Detail {
        diff_compressed: n[0],
        diff_fragments_compressed: n[1],
        diff_cached: n[2],
        diff_copied: n[3],
        kit_compressed: n[4],
    })
}

struct Build {
    m: Measure,
    size: u64,
    sha: String,
    detail: Detail,
}

struct Bench {
    iukfarm: PathBuf,
    corpus: PathBuf,
    work: PathBuf,
    new: String,
    sde: String,
    gensquashfs: String,
}

impl Bench {
    fn iso(&self, v: &str) -> PathBuf {
        self.corpus.join(format!("tails-amd64-{v}.iso"))
    }

    fn build(&self, old: &str, out: &Path, extra: &[&str]) -> Result<Build> {
        let log = self.work.join("build.log");
        let m = measure(
            Command::new(&self.iukfarm)
                .args(["build", "--force", "--source-date-epoch", &self.sde])
                .args(["--gensquashfs", &self.gensquashfs, "--old-iso"])
                .arg(self.iso(old))
                .arg("--new-iso")
                .arg(self.iso(&self.new))
                .arg("--out")
                .arg(out)
                .args(extra)
                .stderr(fs::File::create(&log)?),
        )?;
        let detail = parse_detail(&fs::read_to_string(&log)?)?;
        Ok(Build {
            m,
            size: fs::metadata(out)?.len(),
            sha: sha256(out)?,
            detail,
        })
    }

    fn verify(&self, old: &str, kit: &Path) -> Result<Measure> {
        measure(
            Command::new(&self.iukfarm)
                .args(["verify-iuk", "--quiet", "--old-iso"])
                .arg(self.iso(old))
                .arg("--new-iso")
                .arg(self.iso(&self.new))
                .arg(kit)
                .stdout(Stdio::null()),
        )
    }
}

fn row(name: &str, m: &Measure, size: Option<u64>, note: &str) -> String {
    format!(
        "{name:<40} {:>8.1} {:>8.1} {:>8.0} {:>10} {note}\n",
        m.wall,
        m.cpu,
        m.max_rss_mib,
        size.map_or("-".into(), |s| format!("{:.1}", s as f64 / 1048576.0)),
    )
}

fn main() -> Result<()> {
    let args = Args::parse();
    let iukfarm = match args.iukfarm {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("iukfarm"),
    };
    ensure!(
        iukfarm.exists(),
        "{} not found: cargo build --release first",
        iukfarm.display()
    );
    // SAFETY: geteuid has no preconditions.
    if !args.skip_tails_method && unsafe { libc::geteuid() } != 0 {
        bail!("the Tails method needs root (loop mounts, overlayfs); or pass --skip-tails-method");
    }
    let mut versions: Vec<String> = fs::read_dir(&args.corpus)
        .with_context(|| {
            format!(
                "{}: no corpus; build it with bench/make-corpus.sh",
                args.corpus.display()
            )
        })?
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().into_string().ok()?;
            Some(
                n.strip_prefix("tails-amd64-")?
                    .strip_suffix(".iso")?
                    .to_string(),
            )
        })
        .collect();
    versions.sort_by_key(|v| version_key(v));
    ensure!(
        versions.len() >= 4,
        "the corpus needs 4 releases or more, found {versions:?}"
    );
    let new = versions.pop().expect("non-empty");
    let sources = versions;
    let tmp = tempfile::tempdir_in(args.out.parent().unwrap_or(Path::new(".")))?;
    let corpus = args.corpus.clone();
    let sde = source_date_epoch(&corpus.join(format!("tails-amd64-{new}.iso")))?;
    let tails_gensquashfs = if args.skip_tails_method {
        None
    } else {
        Some(tails_gensquashfs(&args.gensquashfs)?)
    };
    let b = Bench {
        iukfarm,
        corpus,
        work: tmp.path().to_path_buf(),
        new: new.clone(),
        sde,
        gensquashfs: args.gensquashfs.clone(),
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut report = String::new();
    let iso_mib = |v: &str| -> Result<f64> { Ok(fs::metadata(b.iso(v))?.len() as f64 / 1048576.0) };
    report.push_str(&format!(
        "corpus {}: {} -> {new} ({:.0} MiB ISO); {cores} cores\n",
        args.corpus.display(),
        sources.join(", "),
        iso_mib(&new)?
    ));
    report.push_str(&format!(
        "iukfarm writes gensquashfs {}'s bytes; the Tails method runs {}; SOURCE_DATE_EPOCH {}\n",
        b.gensquashfs,
        tails_gensquashfs.as_deref().unwrap_or("-"),
        b.sde
    ));
    report.push_str(&format!(
        "{:<40} {:>8} {:>8} {:>8} {:>10}\n",
        "", "wall s", "CPU s", "peak MiB", "IUK MiB"
    ));
    let largest = &sources[0];
    let name = |v: &str| format!("Tails_amd64_{v}_to_{new}.iuk");

    // The exact profile, every IUK, no cache: the per-IUK baseline.
    let exact_dir = b.work.join("exact");
    fs::create_dir(&exact_dir)?;
    let mut exact = Vec::new();
    for v in &sources {
        eprintln!("iukfarm build {v} -> {new} (tails profile)...");
        let r = b.build(v, &exact_dir.join(name(v)), &[])?;
        report.push_str(&row(
            &format!("build {v}: tails profile"),
            &r.m,
            Some(r.size),
            "",
        ));
        exact.push(r);
    }

    let mut tails_method = None;
    if !args.skip_tails_method {
        eprintln!("the Tails method, {largest} -> {new}...");
        let reference =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/reference/tails-create-iuk.sh");
        let theirs = b.work.join("tails-method.iuk");
        let m = measure(
            Command::new("bash")
                .arg(&reference)
                .arg(b.iso(largest))
                .arg(b.iso(&new))
                .arg(format!("{new}.squashfs"))
                .arg(&theirs)
                .env("SOURCE_DATE_EPOCH", &b.sde),
        )?;
        let same = sha256(&theirs)? == exact[0].sha;
        report.push_str(&row(
            &format!("Tails method {largest}"),
            &m,
            Some(fs::metadata(&theirs)?.len()),
            if same {
                "same bytes as iukfarm"
            } else {
                "DIFFERENT BYTES"
            },
        ));
        fs::remove_file(&theirs)?;
        tails_method = Some((m, same));
    }

    // The fast profile, every IUK, each verified by applying it.
    let fast_dir = b.work.join("fast");
    fs::create_dir(&fast_dir)?;
    let mut fast = Vec::new();
    for v in &sources {
        eprintln!("iukfarm build {v} -> {new} (fast profile)...");
        let kit = fast_dir.join(name(v));
        let r = b.build(v, &kit, &["--profile", "fast"])?;
        let check = b.verify(v, &kit)?;
        report.push_str(&row(
            &format!("build {v}: fast profile"),
            &r.m,
            Some(r.size),
            &format!("verify-iuk OK in {:.1}s", check.wall),
        ));
        fs::remove_file(&kit)?;
        fast.push(r);
    }

    // One build after another sharing a block cache: what each extra
    // source costs once the data blocks are cached.
    let cache = b.work.join("cache");
    let chain_dir = b.work.join("chain");
    fs::create_dir(&chain_dir)?;
    let mut chain = Vec::new();
    for v in &sources {
        eprintln!("iukfarm build {v} -> {new} (shared block cache)...");
        let r = b.build(
            v,
            &chain_dir.join(name(v)),
            &["--block-cache", cache.to_str().context("UTF-8 path")?],
        )?;
        let want = &exact[chain.len()].sha;
        ensure!(&r.sha == want, "{v}: the block cache changed the bytes");
        report.push_str(&row(
            &format!("build {v}: tails, shared cache"),
            &r.m,
            Some(r.size),
            "",
        ));
        chain.push(r);
    }
    fs::remove_dir_all(&cache)?;

    // Whole releases with one embedded worker: cold, then warm cache.
    let key = throwaway_key(&b.work)?;
    let release = |label: &str, cache: &Path| -> Result<Measure> {
        eprintln!("iukfarm release, 1 worker, {label} cache...");
        let out = b.work.join(format!("release-{label}"));
        let m = measure(
            Command::new(&b.iukfarm)
                .args(["release", "--plain", "--workers", "1"])
                .args([
                    "--new-version",
                    &new,
                    "--source-versions",
                    &sources.join(" "),
                ])
                .args(["--source-date-epoch", &b.sde])
                .args(["--gensquashfs", &b.gensquashfs, "--signing-key"])
                .arg(&key)
                .arg("--iso-root")
                .arg(&b.corpus)
                .args(["--iso-pattern", "tails-amd64-{version}.iso"])
                .arg("--output-dir")
                .arg(&out)
                .arg("--block-cache")
                .arg(cache)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )?;
        for (v, r) in sources.iter().zip(&exact) {
            ensure!(
                sha256(&out.join(name(v)))? == r.sha,
                "release ({label} cache): {v} differs from iukfarm build"
            );
        }
        fs::remove_dir_all(&out)?;
        Ok(m)
    };
    let rcache = b.work.join("release-cache");
    let cold = release("cold", &rcache)?;
    let warm = release("warm", &rcache)?;
    report.push_str(&row(
        &format!("release of {}, 1 worker, cold cache", sources.len()),
        &cold,
        None,
        "hash + build + verify + sign",
    ));
    report.push_str(&row(
        &format!("release of {}, 1 worker, warm cache", sources.len()),
        &warm,
        None,
        "",
    ));

    // Ratios and the cost split.
    report.push('\n');
    let big = &exact[0];
    if let Some((m, same)) = &tails_method {
        report.push_str(&format!(
            "tails profile vs the Tails method ({largest}): {:.2}x faster, {}\n",
            m.wall / big.m.wall,
            if *same {
                "identical bytes"
            } else {
                "DIFFERENT bytes"
            }
        ));
    }
    for ((v, e), f) in sources.iter().zip(&exact).zip(&fast) {
        report.push_str(&format!(
            "{v}: fast profile {:.1}x faster than the tails profile, IUK {:+.2}% in size \
             ({:.1} MiB of blocks copied)\n",
            e.m.wall / f.m.wall,
            100.0 * (f.size as f64 / e.size as f64 - 1.0),
            f.detail.diff_copied
        ));
    }
    let sum_exact: f64 = exact.iter().map(|r| r.m.wall).sum();
    report.push_str(&format!(
        "release, 1 worker, cold cache: {:.1}s = {:.2}x the largest single IUK ({:.1}s); \
         the IUKs built one by one without a cache take {:.1}s; warm cache {:.1}s\n",
        cold.wall,
        cold.wall / big.m.wall,
        big.m.wall,
        sum_exact,
        warm.wall
    ));
    let peak = exact
        .iter()
        .chain(&fast)
        .chain(&chain)
        .map(|r| r.m.max_rss_mib)
        .fold(0.0, f64::max);
    report.push_str(&format!("peak memory of one build: {peak:.0} MiB\n"));
    report.push_str(
        "each source's work with a shared cache, in MiB of uncompressed input \
         (xz compresses text-like data faster than binaries):\n",
    );
    for (v, r) in sources.iter().zip(&chain) {
        let d = r.detail;
        report.push_str(&format!(
            "  {v}: {:>6.1}s  diff: data blocks compressed {:>6.1}, fragment blocks compressed \
             {:>6.1}, blocks from the cache {:>6.1}; outer kit compressed {:>6.1}\n",
            r.m.wall,
            d.diff_compressed - d.diff_fragments_compressed,
            d.diff_fragments_compressed,
            d.diff_cached,
            d.kit_compressed
        ));
    }
    print!("{report}");
    if let Some(d) = args.out.parent() {
        fs::create_dir_all(d)?;
    }
    fs::write(&args.out, &report)?;
    Ok(())
}
