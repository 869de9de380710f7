//! Packs one large tree with `iukfarm sqfs pack` (1 and N threads),
//! gensquashfs 1.2.0 and mksquashfs 4.5.1, side by side in one run, with the
//! diff options Tails uses, and prints wall time, CPU time, peak memory and
//! the ratios. Each tool runs as a child process and is measured the same
//! way (wall clock around `wait4`, which also reports CPU time and peak RSS).

use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;

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

struct Measure {
    wall: f64,
    cpu: f64,
    max_rss_mib: f64,
}

fn measure(cmd: &mut Command) -> Result<Measure> {
    let start = Instant::now();
    let child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our child; pointers are valid.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    let wall = start.elapsed().as_secs_f64();
    if rc < 0 {
        bail!("wait4: {}", std::io::Error::last_os_error());
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("{cmd:?} failed with status {status}");
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(Measure {
        wall,
        cpu: tv(ru.ru_utime) + tv(ru.ru_stime),
        max_rss_mib: ru.ru_maxrss as f64 / 1024.0,
    })
}

/// Copies regular files (and symlinks) from `sources` in sorted order until
/// `budget` bytes are copied.
fn build_tree(dst: &Path, sources: &[String], budget: u64) -> Result<(u64, u64)> {
    let mut copied = 0u64;
    let mut files = 0u64;
    fn walk(src: &Path, dst: &Path, copied: &mut u64, files: &mut u64, budget: u64) -> Result<()> {
        let mut entries: Vec<_> = match fs::read_dir(src) {
            Ok(r) => r.flatten().collect(),
            Err(_) => return Ok(()),
        };
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            if *copied >= budget {
                return Ok(());
            }
            let p = e.path();
            let md = match fs::symlink_metadata(&p) {
                Ok(m) => m,
                Err(_) => continue,
            };
            let target = dst.join(e.file_name());
            if md.is_dir() {
                fs::create_dir_all(&target)?;
                walk(&p, &target, copied, files, budget)?;
            } else if md.is_file() && md.size() < 64 << 20 {
                if fs::copy(&p, &target).is_ok() {
                    *copied += md.size();
                    *files += 1;
                }
            } else if md.file_type().is_symlink()
                && let Ok(t) = fs::read_link(&p)
            {
                let _ = std::os::unix::fs::symlink(t, &target);
            }
        }
        Ok(())
    }
    for s in sources {
        let name = s.trim_matches('/').replace('/', "_");
        let d = dst.join(name);
        fs::create_dir_all(&d)?;
        walk(Path::new(s), &d, &mut copied, &mut files, budget)?;
    }
    Ok((copied, files))
}

fn sha256(p: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = fs::File::open(p)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

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
