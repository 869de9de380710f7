//! Packs one large tree with `iukfarm sqfs pack` (1 and N threads),
//! gensquashfs 1.2.0 and mksquashfs 4.5.1, side by side in one run, with the
//! diff options Tails uses, and prints wall time, CPU time, peak memory and
//! the ratios. Each tool runs as a child process and is measured the same
//! way (wall clock around `wait4`, which also reports CPU time and peak RSS).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Result, bail};
use clap::Parser;
use iukfarm_bench::{Measure, build_tree, measure, sha256};

#[derive(Parser)]
struct Args {
    /// Size of the generated input tree in MiB.
    #[arg(long, default_value_t = 300)]
    size_mb: u64,
    /// Directories whose files are copied into the tree (real binaries and
    /// text, like a live system's /usr).
    #[arg(long, default_values_t = ["/usr/lib".to_string(), "/usr/bin".to_string(), "/usr/share".to_string()])]
    from: Vec<String>,
    /// The iukfarm binary (default: the release build next to this one).
    #[arg(long)]
    iukfarm: Option<PathBuf>,
    /// Also write the results here.
    #[arg(long, default_value = "target/sqfs-bench.txt")]
    out: PathBuf,
    /// Repetitions per tool (the median is reported).
    #[arg(long, default_value_t = 1)]
    runs: usize,
}

/// Builds the command that writes one image to the given path.
type MakeCommand<'a> = Box<dyn Fn(&Path) -> Command + 'a>;

fn median(mut v: Vec<Measure>) -> Measure {
    v.sort_by(|a, b| a.wall.total_cmp(&b.wall));
    v.swap_remove(v.len() / 2)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let iukfarm = match args.iukfarm {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("iukfarm"),
    };
    if !iukfarm.is_file() {
        bail!(
            "{} not found; run `cargo build --release` first",
            iukfarm.display()
        );
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("tree");
    fs::create_dir(&src)?;
    let (bytes, files) = build_tree(&src, &args.from, args.size_mb << 20)?;
    eprintln!("input: {files} files, {:.1} MiB", bytes as f64 / 1048576.0);

    let opts = [
        "--keep-xattr",
        "--comp-extra",
        "x86,dictsize=1024K",
        "--block-size",
        "1048576",
    ];
    let sde = "1730285444";
    let out = |name: &str| tmp.path().join(format!("{name}.sqfs"));
    let mut rows: Vec<(String, Measure, u64)> = Vec::new();
    let cores_s = cores.to_string();
    let variants: Vec<(String, MakeCommand)> = vec![
        (
            "iukfarm -j 1".into(),
            Box::new(|o: &Path| {
                let mut c = Command::new(&iukfarm);
                c.env("SOURCE_DATE_EPOCH", sde)
                    .args(["sqfs", "pack", "-q", "-j", "1"])
                    .args(opts);
                c.arg("--pack-dir").arg(&src).arg(o);
                c
            }),
        ),
        (
            format!("iukfarm -j {cores}"),
            Box::new(|o: &Path| {
                let mut c = Command::new(&iukfarm);
                c.env("SOURCE_DATE_EPOCH", sde)
                    .args(["sqfs", "pack", "-q", "-j", &cores_s])
                    .args(opts);
                c.arg("--pack-dir").arg(&src).arg(o);
                c
            }),
        ),
        (
            "gensquashfs".into(),
            Box::new(|o: &Path| {
                let mut c = Command::new("gensquashfs");
                c.env("SOURCE_DATE_EPOCH", sde).arg("--quiet").args(opts);
                c.arg("--pack-dir").arg(&src).arg(o);
                c
            }),
        ),
        (
            "mksquashfs".into(),
            Box::new(|o: &Path| {
                let mut c = Command::new("mksquashfs");
                c.env("SOURCE_DATE_EPOCH", sde).arg(&src).arg(o);
                c.args([
                    "-noappend",
                    "-no-progress",
                    "-quiet",
                    "-comp",
                    "xz",
                    "-Xbcj",
                    "x86",
                    "-b",
                    "1M",
                ]);
                c.args(["-Xdict-size", "1M"]);
                c
            }),
        ),
    ];
    for (name, make) in &variants {
        let mut ms = Vec::new();
        let o = out(&name.replace(' ', "_"));
        for _ in 0..args.runs.max(1) {
            let _ = fs::remove_file(&o);
            eprintln!("running {name}...");
            ms.push(measure(&mut make(&o))?);
        }
        rows.push((name.clone(), median(ms), fs::metadata(&o)?.len()));
    }
    let ours = sha256(&out(&format!("iukfarm_-j_{cores}")))?;
    let ours1 = sha256(&out("iukfarm_-j_1"))?;
    let gen_hash = sha256(&out("gensquashfs"))?;

    let mut report = String::new();
    report.push_str(&format!(
        "input: {files} files, {:.1} MiB; {cores} cores; diff options (xz, x86 BCJ trial, 1 MiB blocks)\n",
        bytes as f64 / 1048576.0
    ));
    report.push_str(&format!(
        "{:<16} {:>9} {:>9} {:>10} {:>12}\n",
        "tool", "wall s", "cpu s", "peak MiB", "image bytes"
    ));
    for (name, m, size) in &rows {
        report.push_str(&format!(
            "{name:<16} {:>9.2} {:>9.2} {:>10.1} {size:>12}\n",
            m.wall, m.cpu, m.max_rss_mib
        ));
    }
    let get = |n: &str| {
        rows.iter()
            .find(|r| r.0 == n)
            .map(|r| &r.1)
            .expect("measured")
    };
    let par = get(&format!("iukfarm -j {cores}"));
    let one = get("iukfarm -j 1");
    let gen_m = get("gensquashfs");
    let mk = get("mksquashfs");
    report.push_str(&format!(
        "speed-up vs gensquashfs: {:.2}x wall; vs mksquashfs: {:.2}x wall\n",
        gen_m.wall / par.wall,
        mk.wall / par.wall
    ));
    report.push_str(&format!(
        "scaling 1 -> {cores} threads: {:.2}x; CPU per image vs gensquashfs: {:.2}x\n",
        one.wall / par.wall,
        par.cpu / gen_m.cpu
    ));
    report.push_str(&format!(
        "peak memory vs gensquashfs: {:.2}x; vs mksquashfs: {:.2}x\n",
        par.max_rss_mib / gen_m.max_rss_mib,
        par.max_rss_mib / mk.max_rss_mib
    ));
    report.push_str(&format!(
        "identical bytes to gensquashfs: {} (threads 1 and {cores} identical: {})\n",
        ours == gen_hash,
        ours == ours1
    ));
    print!("{report}");
    if let Some(dir) = args.out.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::File::create(&args.out)?.write_all(report.as_bytes())?;
    eprintln!("written to {}", args.out.display());
    if ours != gen_hash || ours != ours1 {
        bail!("output differs from gensquashfs or between thread counts");
    }
    Ok(())
}
