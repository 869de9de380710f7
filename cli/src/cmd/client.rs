//! The RM's client: `status`, `watch`, `workers`, `cancel`, `fetch`.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use iukfarm_coordinator::manifest;
use iukfarm_proto::v1;
use iukfarm_proto::{ClientConfig, FarmClient};
use sha2::{Digest, Sha256};

use super::BadInput;
use crate::exit;

/// Where the coordinator is and how to talk to it.
#[derive(Parser, Clone, Default)]
pub struct Conn {
    /// Coordinator address (http://HOST:PORT, or https:// with --tls-ca).
    #[arg(
        long,
        env = "IUKFARM_COORDINATOR",
        default_value = "http://127.0.0.1:7447"
    )]
    pub coordinator: String,
    /// File holding the coordinator's token.
    #[arg(long, env = "IUKFARM_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// CA certificate (PEM) that signed the coordinator's TLS certificate.
    #[arg(long, env = "IUKFARM_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// This client's certificate from the release CA (`iukfarm ca issue`): who it is.
    #[arg(
        long,
        env = "IUKFARM_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,
    /// The key of --tls-cert.
    #[arg(
        long,
        env = "IUKFARM_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
}

impl Conn {
    /// The connection's settings; a file named that cannot be read is bad
    /// input (exit 2).
    pub fn config(&self) -> Result<ClientConfig> {
        ClientConfig::from_files(
            &self.coordinator,
            self.tls_ca.as_deref(),
            self.tls_cert.as_deref().zip(self.tls_key.as_deref()),
            self.token_file.as_deref(),
        )
        .bad_input()
    }

    /// Connects: a bad address or TLS settings are exit 2, a coordinator
    /// that does not answer is exit 1.
    pub async fn connect(&self) -> Result<FarmClient> {
        match iukfarm_proto::connect(&self.config()?).await {
            Ok(c) => Ok(c),
            Err(e @ iukfarm_proto::Error::Config(_)) => Err(e).bad_input(),
            Err(e) => Err(e.into()),
        }
    }

    /// The release's status now.
    pub async fn status(&self) -> Result<v1::ReleaseStatus> {
        let mut c = self.connect().await?;
        Ok(c.status(v1::StatusRequest {})
            .await
            .map_err(|e| call_err(&self.coordinator, e))?
            .into_inner())
    }
}

fn call_err(url: &str, s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!(iukfarm_proto::explain(url, &s))
}

/// Exit status mirroring a release's final state.
pub fn exit_for(state: &str) -> u8 {
    match state {
        "succeeded" => 0,
        "cancelled" => exit::INTERRUPTED,
        _ => exit::FAILURE,
    }
}

fn human(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1}G", bytes as f64 / (1u64 << 30) as f64)
    } else if bytes >= 1 << 20 {
        format!("{:.1}M", bytes as f64 / (1u64 << 20) as f64)
    } else if bytes >= 1 << 10 {
        format!("{:.1}K", bytes as f64 / 1024.0)
    } else {
        format!("{bytes}B")
    }
}

fn secs(s: f64) -> String {
    if s <= 0.0 {
        "-".into()
    } else if s < 60.0 {
        format!("{s:.0}s")
    } else {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    }
}

fn label(j: &v1::JobStatus) -> String {
    format!(
        "{}{}",
        j.old_version,
        if j.reproduction { " (repro)" } else { "" }
    )
}

fn progress_text(j: &v1::JobStatus) -> String {
    match j.state.as_str() {
        "leased" if j.total > 0 => {
            format!("{} {}%", j.phase, (j.done * 100 / j.total.max(1)).min(100))
        }
        "leased" => j.phase.clone(),
        "done" if j.resumed => "journal".into(),
        _ => String::new(),
    }
}

/// The job table, as `status` prints it.
pub fn table(s: &v1::ReleaseStatus) -> String {
    let mut out = format!(
        "{}: {}{}\n",
        s.release,
        s.state,
        if s.message.is_empty() {
            String::new()
        } else {
            format!(" ({})", s.message)
        }
    );
    out.push_str(&format!(
        "{:<16} {:<10} {:<14} {:<16} {:>8} {:>7} {:>8} {:<16} {:>3} {:>6}\n",
        "SOURCE", "STATE", "WORKER", "PROGRESS", "ELAPSED", "ETA", "SIZE", "SHA256", "TRY", "CACHE"
    ));
    for j in &s.jobs {
        out.push_str(&format!(
            "{:<16} {:<10} {:<14} {:<16} {:>8} {:>7} {:>8} {:<16} {:>3} {:>6}\n",
            label(j),
            j.state,
            j.worker,
            progress_text(j),
            secs(j.elapsed_seconds),
            secs(j.eta_seconds),
            if j.size > 0 {
                human(j.size)
            } else {
                "-".into()
            },
            j.sha256.get(..16).unwrap_or("-"),
            j.attempts,
            j.blocks
                .as_ref()
                .map_or("-".into(), |b| percent(hit_rate(std::slice::from_ref(b)))),
        ));
        if !j.error.is_empty() && j.state != "done" {
            out.push_str(&format!("    {}\n", j.error));
        }
    }
    let counts: Vec<v1::BlockCounts> = s.jobs.iter().filter_map(|j| j.blocks).collect();
    if let Some((hits, all)) = hit_rate(&counts) {
        let farm: u64 = counts.iter().map(|b| b.from_farm).sum();
        out.push_str(&format!(
            "block cache: {hits} of {all} blocks ({}) taken from the workers' caches{}\n",
            percent(Some((hits, all))),
            if farm > 0 {
                format!(" ({farm} of them from the farm's store)")
            } else {
                String::new()
            }
        ));
    }
    if let Some(b) = &s.block_store {
        out.push_str(&format!(
            "block store: {} blocks given to workers, {} stored ({} held now, at most {}), {} compressed twice, {} refused\n",
            b.served,
            b.stored,
            human(b.bytes),
            human(b.cap),
            b.duplicates,
            b.refused
        ));
        if b.offered > 0 {
            let helped: u64 = counts.iter().map(|c| c.from_helpers).sum();
            out.push_str(&format!(
                "work sharing: {} of {} offered blocks taken by helpers ({} sent to them), {} used by finished jobs\n",
                b.helped,
                b.offered,
                human(b.helper_bytes),
                helped
            ));
        }
    }
    for w in s.workers.iter().filter(|w| w.bad_blocks > 0) {
        out.push_str(&format!(
            "worker {} sent {} wrong block(s): none was used, and no more are taken from it\n",
            w.name, w.bad_blocks
        ));
    }
    out
}

/// (blocks not compressed again: from a worker's cache or the farm's store,
/// all of those plus the blocks compressed, by the job or by helpers);
/// `None` when nothing was counted. Blocks copied by the fast profile are neither.
fn hit_rate(counts: &[v1::BlockCounts]) -> Option<(u64, u64)> {
    let hits: u64 = counts.iter().map(|b| b.from_cache + b.from_farm).sum();
    let all: u64 = hits
        + counts
            .iter()
            .map(|b| b.compressed + b.from_helpers)
            .sum::<u64>();
    (all > 0).then_some((hits, all))
}

fn percent(r: Option<(u64, u64)>) -> String {
    match r {
        Some((h, a)) => format!("{:.0}%", 100.0 * h as f64 / a as f64),
        None => "-".into(),
    }
}

fn blocks_json(b: &Option<v1::BlockCounts>) -> serde_json::Value {
    match b {
        None => serde_json::Value::Null,
        Some(b) => serde_json::json!({
            "compressed": b.compressed, "from_cache": b.from_cache, "copied": b.copied,
            "compressed_bytes": b.compressed_bytes, "from_cache_bytes": b.from_cache_bytes,
            "copied_bytes": b.copied_bytes, "from_farm": b.from_farm,
            "from_farm_bytes": b.from_farm_bytes, "from_helpers": b.from_helpers,
            "from_helpers_bytes": b.from_helpers_bytes,
        }),
    }
}

fn job_json(j: &v1::JobStatus) -> serde_json::Value {
    serde_json::json!({
        "job_id": j.job_id, "source_version": j.old_version, "name": j.output_name,
        "state": j.state, "worker": j.worker, "phase": j.phase, "done": j.done,
        "total": j.total, "elapsed_seconds": j.elapsed_seconds, "eta_seconds": j.eta_seconds,
        "size": j.size, "sha256": j.sha256, "attempts": j.attempts, "error": j.error,
        "reproduction": j.reproduction, "resumed": j.resumed, "blocks": blocks_json(&j.blocks),
    })
}

fn worker_json(w: &v1::WorkerStatus) -> serde_json::Value {
    serde_json::json!({
        "id": w.id, "name": w.name, "slots": w.slots, "busy": w.busy,
        "connected": w.connected, "last_seen_seconds": w.last_seen_seconds,
        "jobs_done": w.jobs_done, "memory_bytes": w.memory_bytes, "bad_blocks": w.bad_blocks,
        "certificate_not_after": (w.certificate_not_after != 0).then_some(w.certificate_not_after),
    })
}

/// A worker certificate's expiry within this many seconds is warned about.
const CERT_WARN: i64 = 14 * 86400;

/// When a client certificate expires, counted from `now` (Unix seconds):
/// "-" without one.
fn cert_expiry(not_after: i64, now: i64) -> String {
    let left = not_after - now;
    match () {
        _ if not_after == 0 => "-".into(),
        _ if left <= 0 => "EXPIRED".into(),
        _ if left < 86400 => format!("{}h", (left + 3599) / 3600),
        _ => format!("{}d", left / 86400),
    }
}

#[derive(Parser)]
#[command(
    after_help = "Exit status: 0 the status was printed; 1 the coordinator could not be reached or refused."
)]
pub struct StatusArgs {
    #[command(flatten)]
    conn: Conn,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

pub fn status(a: StatusArgs) -> Result<ExitCode> {
    super::block_on(async {
        let s = a.conn.status().await?;
        if a.json {
            let v = serde_json::json!({
                "release": s.release, "new_version": s.new_version, "state": s.state,
                "message": s.message, "output_dir": s.output_dir, "files": s.files,
                "jobs": s.jobs.iter().map(job_json).collect::<Vec<_>>(),
                "workers": s.workers.iter().map(worker_json).collect::<Vec<_>>(),
                "block_store": s.block_store.as_ref().map(|b| serde_json::json!({
                    "entries": b.entries, "bytes": b.bytes, "cap": b.cap, "served": b.served,
                    "served_bytes": b.served_bytes, "stored": b.stored,
                    "duplicates": b.duplicates, "refused": b.refused, "evicted": b.evicted,
                    "expired_claims": b.expired_claims, "sent_bytes": b.sent_bytes,
                    "received_bytes": b.received_bytes, "offered": b.offered,
                    "helped": b.helped, "given_back": b.given_back,
                    "helper_bytes": b.helper_bytes,
                })),
            });
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            print!("{}", table(&s));
        }
        Ok(ExitCode::SUCCESS)
    })
}

#[derive(Parser)]
#[command(
    after_help = "Exit status: 0 the list was printed; 1 the coordinator could not be reached or refused."
)]
pub struct WorkersArgs {
    #[command(flatten)]
    conn: Conn,
    #[arg(long)]
    json: bool,
}

pub fn workers(a: WorkersArgs) -> Result<ExitCode> {
    super::block_on(async {
        let s = a.conn.status().await?;
        if a.json {
            let v: Vec<_> = s.workers.iter().map(worker_json).collect();
            println!("{}", serde_json::to_string_pretty(&v)?);
            return Ok(ExitCode::SUCCESS);
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        println!(
            "{:<24} {:<20} {:>5} {:>4} {:>5} {:>9} {:>9} {:>8}",
            "ID", "NAME", "SLOTS", "BUSY", "DONE", "MEMORY", "SEEN", "CERT"
        );
        for w in &s.workers {
            println!(
                "{:<24} {:<20} {:>5} {:>4} {:>5} {:>9} {:>9} {:>8}",
                w.id,
                w.name,
                w.slots,
                w.busy,
                w.jobs_done,
                human(w.memory_bytes),
                if w.connected {
                    format!("{:.0}s ago", w.last_seen_seconds)
                } else {
                    "lost".into()
                },
                cert_expiry(w.certificate_not_after, now)
            );
        }
        // Named once per worker, however many times it registered.
        let mut expiring: Vec<(&str, i64)> = (s.workers.iter())
            .filter(|w| w.certificate_not_after != 0 && w.certificate_not_after - now < CERT_WARN)
            .map(|w| (w.name.as_str(), w.certificate_not_after))
            .collect();
        expiring.sort();
        expiring.dedup();
        for (name, t) in expiring {
            eprintln!(
                "warning: the certificate of worker {name} expires in {}: issue a new one \
                 (move <ca>/issued/{name}.* aside, then `iukfarm ca issue --dir <ca> --role worker \
                 {name}`) and install it on the worker",
                cert_expiry(t, now)
            );
        }
        Ok(ExitCode::SUCCESS)
    })
}

#[derive(Parser)]
#[command(
    after_help = "Exit status: 0 the coordinator cancelled the release; 1 it could not be reached or refused."
)]
pub struct CancelArgs {
    #[command(flatten)]
    conn: Conn,
    /// Why (shown in the status and the JUnit report).
    #[arg(long, default_value = "cancelled by the RM")]
    reason: String,
}

pub fn cancel(a: CancelArgs) -> Result<ExitCode> {
    super::block_on(async {
        let mut c = a.conn.connect().await?;
        c.cancel(v1::CancelRequest {
            reason: a.reason.clone(),
        })
        .await
        .map_err(|e| call_err(&a.conn.coordinator, e))?;
        println!("cancelled: {}", a.reason);
        Ok(ExitCode::SUCCESS)
    })
}

#[derive(Parser)]
#[command(
    after_help = "Exit status: mirrors the release: 0 succeeded, 1 failed (or the coordinator \
was lost), 130 cancelled. Progress bars on a terminal; one line per change otherwise (or with --plain)."
)]
pub struct WatchArgs {
    #[command(flatten)]
    conn: Conn,
    /// One line per change instead of progress bars.
    #[arg(long)]
    plain: bool,
}

pub fn watch(a: WatchArgs) -> Result<ExitCode> {
    super::block_on(async {
        let mut c = a.conn.connect().await?;
        let state = follow(&mut c, &a.conn.coordinator, a.plain).await?;
        Ok(ExitCode::from(exit_for(&state)))
    })
}

/// Follows a release until it ends, drawing it (bars on a terminal, else
/// or with `plain`, one line per change); returns the final state.
pub async fn follow(c: &mut FarmClient, url: &str, plain: bool) -> Result<String> {
    let plain = plain || !std::io::stderr().is_terminal();
    let mut stream = c
        .watch(v1::StatusRequest {})
        .await
        .map_err(|e| call_err(url, e))?
        .into_inner();
    let mut view = if plain {
        View::Plain(Default::default())
    } else {
        View::Bars(Bars::new())
    };
    let mut last: Option<v1::ReleaseStatus> = None;
    loop {
        match stream.message().await {
            Ok(Some(s)) => {
                view.show(&s);
                let over = matches!(s.state.as_str(), "succeeded" | "failed" | "cancelled");
                last = Some(s);
                if over {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                view.done();
                return Err(call_err(url, e));
            }
        }
    }
    view.done();
    let Some(s) = last else {
        bail!("the coordinator at {url} sent no status")
    };
    if !matches!(s.state.as_str(), "succeeded" | "failed" | "cancelled") {
        bail!("lost the coordinator at {url} before the release ended");
    }
    let mut out = std::io::stdout().lock();
    write!(out, "{}", table(&s))?;
    Ok(s.state)
}

enum View {
    Plain(std::collections::BTreeMap<String, String>),
    Bars(Bars),
}

struct Bars {
    multi: MultiProgress,
    header: ProgressBar,
    bars: std::collections::BTreeMap<String, ProgressBar>,
}

impl Bars {
    fn new() -> Bars {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let header = multi.add(ProgressBar::new_spinner());
        header.enable_steady_tick(Duration::from_millis(200));
        Bars {
            multi,
            header,
            bars: Default::default(),
        }
    }
}

impl View {
    fn show(&mut self, s: &v1::ReleaseStatus) {
        match self {
            View::Plain(seen) => {
                let mut err = std::io::stderr().lock();
                let head = format!("{} {}", s.state, s.message);
                if seen.get("") != Some(&head) {
                    let _ = writeln!(err, "release {}: {}", s.release, head.trim_end());
                    seen.insert(String::new(), head);
                }
                for j in &s.jobs {
                    let line = format!(
                        "{} {} {}{}",
                        j.state,
                        if j.worker.is_empty() { "-" } else { &j.worker },
                        if j.state == "leased" { &j.phase } else { "" },
                        if j.state == "failed" || (j.state == "pending" && !j.error.is_empty()) {
                            format!(" ({})", j.error)
                        } else if j.state == "done" {
                            format!(
                                " {} bytes sha256 {}{}",
                                j.size,
                                j.sha256,
                                match hit_rate(j.blocks.as_slice()) {
                                    Some(r) => format!(", block cache {}", percent(Some(r))),
                                    None => String::new(),
                                }
                            )
                        } else {
                            String::new()
                        }
                    );
                    let key = j.job_id.clone();
                    if seen.get(&key) != Some(&line) {
                        let _ = writeln!(err, "  {}: {}", label(j), line.trim_end());
                        seen.insert(key, line);
                    }
                }
            }
            View::Bars(b) => {
                b.header.set_message(format!(
                    "{}: {}{}  ({} workers)",
                    s.release,
                    s.state,
                    if s.message.is_empty() {
                        String::new()
                    } else {
                        format!(", {}", s.message)
                    },
                    s.workers.iter().filter(|w| w.connected).count()
                ));
                for j in &s.jobs {
                    let bar = b.bars.entry(j.job_id.clone()).or_insert_with(|| {
                        let bar = b.multi.add(ProgressBar::new(0));
                        bar.set_style(
                            ProgressStyle::with_template(
                                "{prefix:>16} [{bar:30}] {percent:>3}% {msg}",
                            )
                            .expect("static template")
                            .progress_chars("=> "),
                        );
                        bar.set_prefix(label(j));
                        bar
                    });
                    match j.state.as_str() {
                        "done" => {
                            bar.set_length(1);
                            bar.set_position(1);
                        }
                        "leased" => {
                            bar.set_length(j.total.max(1));
                            bar.set_position(j.done.min(j.total));
                        }
                        _ => {
                            bar.set_length(1);
                            bar.set_position(0);
                        }
                    }
                    bar.set_message(format!(
                        "{} {} {}{}",
                        j.state,
                        j.worker,
                        if j.state == "leased" {
                            format!("{} ETA {}", j.phase, secs(j.eta_seconds))
                        } else {
                            String::new()
                        },
                        if !j.error.is_empty() && j.state != "done" {
                            format!(" ({})", j.error)
                        } else {
                            String::new()
                        }
                    ));
                }
            }
        }
    }

    fn done(&mut self) {
        if let View::Bars(b) = self {
            for bar in b.bars.values() {
                bar.finish_and_clear();
            }
            b.header.finish_and_clear();
            let _ = b.multi.clear();
        }
    }
}

#[derive(Parser)]
#[command(
    after_help = "Exit status: 0 every file of the release was downloaded and checked; 1 a file \
failed its check, the release is not over (without --wait), or the coordinator was lost."
)]
pub struct FetchArgs {
    #[command(flatten)]
    conn: Conn,
    /// Where to put the IUKs, SHA256SUMS, manifest.json and its signature.
    #[arg(long, default_value = ".")]
    output_dir: PathBuf,
    /// Wait for the release to end first.
    #[arg(long)]
    wait: bool,
    /// Check the manifest's signature against this certificate.
    #[arg(long, value_name = "FILE")]
    cert: Option<PathBuf>,
}

pub fn fetch(a: FetchArgs) -> Result<ExitCode> {
    super::block_on(async {
        // Read first: a wrong --cert is found before anything is downloaded.
        let certs = a
            .cert
            .as_ref()
            .map(std::fs::read)
            .transpose()
            .context("reading --cert")
            .bad_input()?;
        fetch_into(&a.conn, &a.output_dir, a.wait).await?;
        let check = manifest::check_dir(&a.output_dir, &a.output_dir, certs.as_deref(), false)?;
        report_check(&check, certs.is_some())
    })
}

/// Downloads a succeeded release's files into `dir`, each checked against
/// the size and digest the coordinator gives; a kit already there with
/// them (an earlier, cut fetch) is not downloaded again. The caller checks
/// the result against the signed manifest.
pub async fn fetch_into(conn: &Conn, dir: &Path, wait: bool) -> Result<()> {
    let mut c = conn.connect().await?;
    let url = conn.coordinator.clone();
    if wait {
        follow(&mut c, &url, true).await?;
    }
    let s = c
        .status(v1::StatusRequest {})
        .await
        .map_err(|e| call_err(&url, e))?
        .into_inner();
    if s.state != "succeeded" {
        bail!(
            "the release is {} (not succeeded): nothing signed to fetch yet; use --wait",
            s.state
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for name in &s.files {
        if name.contains('/') || name.starts_with('.') {
            bail!("the coordinator offered a strange file name {name:?}");
        }
        let dst = dir.join(name);
        let expected = s
            .jobs
            .iter()
            .find(|j| &j.output_name == name && !j.reproduction)
            .map(|j| (j.size, j.sha256.as_str()));
        if let Some((size, sha)) = expected
            && std::fs::metadata(&dst).is_ok_and(|m| m.len() == size)
            && iukfarm_coordinator::inputs::sha256_file(&dst).is_ok_and(|h| h == sha)
        {
            eprintln!("already fetched {}", dst.display());
            continue;
        }
        download(&mut c, &url, name, &dst, expected).await?;
        eprintln!("fetched {}", dst.display());
    }
    Ok(())
}

async fn download(
    c: &mut FarmClient,
    url: &str,
    name: &str,
    dst: &Path,
    expected: Option<(u64, &str)>,
) -> Result<()> {
    let dir = dst.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    let mut stream = c
        .download(v1::DownloadRequest {
            name: name.to_string(),
        })
        .await
        .map_err(|e| call_err(url, e))?
        .into_inner();
    let mut h = Sha256::new();
    let mut n = 0u64;
    while let Some(chunk) = stream.message().await.map_err(|e| call_err(url, e))? {
        h.update(&chunk.data);
        n += chunk.data.len() as u64;
        tmp.write_all(&chunk.data)?;
    }
    if let Some((size, sha)) = expected {
        let got: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        if n != size || got != sha {
            bail!("{name} arrived damaged ({n} bytes, sha256 {got}; expected {size}, {sha})");
        }
    }
    crate::output::persist(tmp, dst, true)
}

/// Prints a directory check and gives its exit status.
pub fn report_check(c: &manifest::DirCheck, signature_checked: bool) -> Result<ExitCode> {
    for g in &c.good {
        println!("OK   {g}");
    }
    for p in &c.problems {
        println!("BAD  {p}");
    }
    match &c.signer {
        Some(who) => println!("manifest.json: good signature by {who}"),
        None if !signature_checked => {
            println!("manifest.json: signature NOT checked (pass --cert)")
        }
        None => {}
    }
    if c.problems.is_empty() {
        println!("{} IUKs match the release manifest", c.good.len());
        Ok(ExitCode::SUCCESS)
    } else {
        match c.problems.len() {
            1 => println!("1 problem"),
            n => println!("{n} problems"),
        }
        Ok(ExitCode::from(exit::FAILURE))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_expiry_reads_as_time_left() {
        let now = 1_800_000_000;
        assert_eq!(cert_expiry(0, now), "-");
        assert_eq!(cert_expiry(now, now), "EXPIRED");
        assert_eq!(cert_expiry(now - 5, now), "EXPIRED");
        assert_eq!(cert_expiry(now + 1, now), "1h");
        assert_eq!(cert_expiry(now + 3601, now), "2h");
        assert_eq!(cert_expiry(now + 86400, now), "1d");
        assert_eq!(cert_expiry(now + 365 * 86400 - 60, now), "364d");
    }

    #[test]
    fn table_shows_block_cache_hit_rates() {
        let job = |name: &str, blocks: Option<v1::BlockCounts>| v1::JobStatus {
            job_id: name.into(),
            old_version: name.into(),
            output_name: format!("Tails_amd64_{name}_to_6.3.iuk"),
            state: "done".into(),
            blocks,
            ..Default::default()
        };
        let counts = |compressed, from_cache| v1::BlockCounts {
            compressed,
            from_cache,
            ..Default::default()
        };
        let s = v1::ReleaseStatus {
            release: "Tails 6.3".into(),
            state: "succeeded".into(),
            jobs: vec![
                job("6.0", Some(counts(10, 0))),
                job("6.1", Some(counts(2, 6))),
                job("6.2", None),
            ],
            ..Default::default()
        };
        let t = table(&s);
        let rows: Vec<&str> = t.lines().collect();
        assert!(rows[1].ends_with("CACHE"), "{t}");
        assert!(rows[2].ends_with("  0%"), "{t}");
        assert!(rows[3].ends_with(" 75%"), "{t}");
        assert!(rows[4].ends_with("     -"), "{t}");
        assert!(
            t.contains("block cache: 6 of 18 blocks (33%) taken from the workers' caches"),
            "{t}"
        );
        assert_eq!(hit_rate(&[]), None);
        assert!(!t.contains("block store"), "{t}");
    }

    #[test]
    fn table_shows_the_block_store_and_lying_workers() {
        let s = v1::ReleaseStatus {
            jobs: vec![v1::JobStatus {
                state: "done".into(),
                blocks: Some(v1::BlockCounts {
                    compressed: 2,
                    from_cache: 1,
                    from_farm: 5,
                    from_helpers: 4,
                    ..Default::default()
                }),
                ..Default::default()
            }],
            workers: vec![
                v1::WorkerStatus {
                    name: "honest".into(),
                    ..Default::default()
                },
                v1::WorkerStatus {
                    name: "liar".into(),
                    bad_blocks: 1,
                    ..Default::default()
                },
            ],
            block_store: Some(v1::BlockStoreStatus {
                served: 5,
                stored: 2,
                bytes: 3 << 20,
                cap: 4 << 30,
                refused: 3,
                offered: 9,
                helped: 7,
                helper_bytes: 7 << 20,
                ..Default::default()
            }),
            ..Default::default()
        };
        let t = table(&s);
        assert!(
            t.contains("block cache: 6 of 12 blocks (50%) taken from the workers' caches (5 of them from the farm's store)"),
            "{t}"
        );
        assert!(
            t.contains("block store: 5 blocks given to workers, 2 stored (3.0M held now, at most 4.0G), 0 compressed twice, 3 refused"),
            "{t}"
        );
        assert!(
            t.contains("work sharing: 7 of 9 offered blocks taken by helpers (7.0M sent to them), 4 used by finished jobs"),
            "{t}"
        );
        assert!(
            t.contains("worker liar sent 1 wrong block(s)") && !t.contains("worker honest"),
            "{t}"
        );
    }
}
