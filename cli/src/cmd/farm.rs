//! `iukfarm coordinator`, `iukfarm release` (coordinator plus in-process
//! workers) and `iukfarm worker`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use iukfarm_coordinator::config::{self, Config, Reproduce};
use iukfarm_coordinator::signing::SigningKey;
use iukfarm_coordinator::{Outcome, Running};
use iukfarm_proto::ClientConfig;
use iukfarm_worker::TestHooks;
use tokio::sync::watch;
use tracing::error;

use super::BadInput;
use crate::exit;

const EXIT_HELP: &str = "Exit status: 0 every IUK was built, verified by applying it, and the \
manifest signed (with --udf-dir, the UDFs written, signed and checked too); 1 some IUKs failed \
(each is named, also in the JUnit report), or the UDFs could not be written; 2 bad input or \
configuration (a missing or unusable ISO, an unknown option, no signing key), found before any \
work starts; 130 interrupted (SIGINT, SIGTERM or `iukfarm cancel`). Finished IUKs are journalled: \
run the same command again to resume.";

/// A release's parameters; a `--release-file` (TOML, the long options'
/// names) gives settings that options override (release_file.rs).
#[derive(Parser, Clone)]
pub struct ReleaseArgs {
    /// TOML file with any of this command's options, without their dashes (e.g.
    /// new-version = "7.4"; a list for a repeatable one); the command line overrides it.
    #[arg(long, value_name = "FILE")]
    release_file: Option<PathBuf>,
    /// The version being released.
    #[arg(long)]
    new_version: Option<String>,
    /// Versions to build IUKs from, separated by spaces or commas.
    #[arg(long, value_name = "VERSIONS")]
    source_versions: Option<String>,
    /// SOURCE_DATE_EPOCH of the new release (default: the environment's).
    #[arg(long, value_name = "SECONDS")]
    source_date_epoch: Option<u32>,
    /// Root of the ISO archive.
    #[arg(long, value_name = "DIR")]
    iso_root: Option<PathBuf>,
    /// Path of an ISO under the root; {version} is replaced
    /// [default: tails-amd64-{version}/tails-amd64-{version}.iso].
    #[arg(long, value_name = "PATTERN")]
    iso_pattern: Option<String>,
    /// The RM's digests of the ISOs (sha256sum output); each ISO must match before any work.
    #[arg(long, value_name = "FILE")]
    iso_sha256sums: Option<PathBuf>,
    /// OpenPGP keyring: each ISO must have a good detached signature <iso>.sig by one of its keys.
    #[arg(long, value_name = "FILE")]
    iso_keyring: Option<PathBuf>,
    /// Where the IUKs, SHA256SUMS, manifest.json and its signature go.
    #[arg(long, value_name = "DIR")]
    output_dir: Option<PathBuf>,
    /// Product name in IUK names [default: Tails].
    #[arg(long)]
    product: Option<String>,
    /// Build target in IUK names [default: amd64].
    #[arg(long)]
    build_target: Option<String>,
    /// `tails`: byte for byte what tails-create-iuk writes; `fast`: changed files keep the
    /// new image's compressed blocks (reproducible, not tails-create-iuk's bytes) [default: tails].
    #[arg(long, value_name = "tails|fast")]
    profile: Option<String>,
    /// Whose bytes the IUKs are: the gensquashfs Tails pins for the new version
    /// [default: 1.3.2 for 7.0 and later, 1.2.0 before].
    #[arg(long, value_name = "1.2.0|1.3.2")]
    gensquashfs: Option<iukfarm_engine::sqfs::Gensquashfs>,
    /// Engine option for every job, e.g. ignore-if-same-content=GLOB. Repeatable.
    #[arg(
        long = "engine-option",
        alias = "engine-options",
        value_name = "NAME=VALUE"
    )]
    engine_options: Vec<String>,
    /// Engine workers must run: VERSION or VERSION@COMMIT [default: this build's].
    #[arg(long, value_name = "VERSION[@COMMIT]")]
    require_engine: Option<String>,
    /// TLS certificate (PEM) of the coordinator.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) of the coordinator.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The release CA (`iukfarm ca init`): every worker and client must present a
    /// certificate it issued; roles and names come from those certificates.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Revoked client certificates (`iukfarm ca revoke`), re-read when it changes.
    #[arg(long, value_name = "FILE", requires = "tls_client_ca")]
    tls_revoked: Option<PathBuf>,
    /// File holding the token every worker and client must present.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Sign the manifest with an unencrypted OpenPGP secret key file.
    #[arg(long, value_name = "FILE", conflicts_with = "gpg_key")]
    signing_key: Option<PathBuf>,
    /// Sign the manifest with gpg's key KEYID (gpg-agent and smartcards work).
    #[arg(long, value_name = "KEYID")]
    gpg_key: Option<String>,
    /// Build N IUKs (or `all`) a second time on another worker; different bytes fail the release.
    #[arg(long, value_name = "N|all")]
    reproduce: Option<String>,
    /// Write a JUnit XML report (one test case per IUK).
    #[arg(long, value_name = "FILE")]
    junit: Option<PathBuf>,
    /// A worker silent for this long loses its job to another.
    #[arg(long, default_value = "30s", value_parser = config::parse_duration)]
    lease_timeout: Duration,
    /// Attempts per IUK after transient failures.
    #[arg(long, default_value_t = 4)]
    max_attempts: u32,
    /// Keep serving status and downloads this long after the end.
    #[arg(long, default_value = "0s", value_parser = config::parse_duration)]
    linger: Duration,
    /// IUKs verified by applying them at the same time (1 to 64).
    #[arg(long, default_value_t = 1)]
    verify_jobs: usize,
    /// After applying each kit, mount it and its diff read-only and read every file through
    /// the Linux kernel's squashfs (root and loop devices): auto (where it can, saying so
    /// where it cannot), on (or refuse to start), off.
    #[arg(long, value_name = "auto|on|off", default_value = "auto")]
    kernel_check: iukfarm_kernelcheck::Mode,
    /// Audit every form helpers send, not a sample (for the tests).
    #[arg(long, hide = true)]
    test_audit_every_form: bool,
    /// Size cap of the farm's block store in <output-dir>/.iukfarm/blocks, where each block
    /// one worker compressed waits for the others, so that the farm compresses it once
    /// (0: none) [default: 4G for `coordinator`; none for `release`, whose workers share a cache].
    #[arg(long, value_name = "SIZE", value_parser = super::parse_bytes)]
    block_store_size: Option<u64>,
    /// Serve Prometheus metrics at http://ADDRESS:PORT/metrics (plain HTTP, no
    /// authentication: bind it to the monitoring network) [default: not served].
    #[arg(long, value_name = "ADDRESS:PORT")]
    metrics_listen: Option<String>,
}

fn need<T>(v: Option<T>, flag: &str) -> Result<T, iukfarm_coordinator::Error> {
    v.ok_or_else(|| {
        iukfarm_coordinator::Error::Config(format!("missing {flag} (or its key in --release-file)"))
    })
}

impl ReleaseArgs {
    /// Flags over the release file over defaults.
    pub fn config(
        self,
        listen: Option<String>,
        default_listen: &str,
        default_store: u64,
    ) -> Result<Config, iukfarm_coordinator::Error> {
        use iukfarm_coordinator::Error as E;
        // The release file's settings are options already (release_file.rs).
        let source_versions =
            config::parse_versions(&need(self.source_versions, "--source-versions")?)?;
        let sde = match self.source_date_epoch {
            Some(s) => s,
            None => super::source_date_epoch()
                .map_err(|e| E::Config(e.to_string()))?
                .ok_or_else(|| {
                    E::Config("missing --source-date-epoch (or SOURCE_DATE_EPOCH)".into())
                })?,
        };
        let listen_s = listen.unwrap_or_else(|| default_listen.to_string());
        let listen: SocketAddr = listen_s.parse().map_err(|_| {
            E::Config(format!(
                "--listen {listen_s:?}: expected ADDRESS:PORT, e.g. 0.0.0.0:7447"
            ))
        })?;
        let token = self
            .token_file
            .map(|p| iukfarm_proto::read_token(&p))
            .transpose()
            .map_err(|e| E::Config(e.to_string()))?;
        let tls = match (self.tls_cert, self.tls_key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => return Err(E::Config("--tls-cert and --tls-key go together".into())),
        };
        let signing = match (self.signing_key, self.gpg_key) {
            (Some(p), None) => SigningKey::KeyFile(p),
            (None, Some(k)) => SigningKey::Gpg(k),
            (Some(_), Some(_)) => {
                return Err(E::Config(
                    "give --signing-key or --gpg-key, not both".into(),
                ));
            }
            (None, None) => {
                return Err(E::Config(
                    "the manifest must be signed: pass --gpg-key KEYID or --signing-key FILE"
                        .into(),
                ));
            }
        };
        let reproduce = match self.reproduce {
            Some(r) => r.parse::<Reproduce>().map_err(E::Config)?,
            None => Reproduce::None,
        };
        let mut engine_options = self.engine_options;
        // The profile travels as an engine option: it is part of every job's
        // id and of the manifest. Only a non-default one is written out.
        if let Some(p) = self.profile {
            let p: iukfarm_engine::kit::Profile = p
                .parse()
                .map_err(|e: iukfarm_engine::Error| E::Config(e.to_string()))?;
            engine_options.retain(|o| !o.starts_with("profile="));
            if p != iukfarm_engine::kit::Profile::Tails {
                engine_options.push(format!("profile={p}"));
            }
        }
        let new_version = config::check_version(need(self.new_version, "--new-version")?)?;
        // The writer travels as an engine option too, always written out, so
        // that every job of the release, its id and the manifest name it.
        let given = iukfarm_engine::kit::parse_options(&engine_options)
            .map_err(|e| E::Config(e.to_string()))?
            .gensquashfs;
        let chosen = self.gensquashfs.or(given);
        let gensquashfs = config::resolve_gensquashfs(chosen, &new_version)?;
        engine_options.retain(|o| !o.starts_with("gensquashfs="));
        engine_options.push(format!("gensquashfs={gensquashfs}"));
        Ok(Config {
            new_version,
            source_versions,
            source_date_epoch: sde,
            iso_root: need(self.iso_root, "--iso-root")?,
            iso_pattern: self
                .iso_pattern
                .unwrap_or_else(|| config::DEFAULT_ISO_PATTERN.into()),
            iso_sha256sums: self.iso_sha256sums,
            iso_keyring: self.iso_keyring,
            output_dir: need(self.output_dir, "--output-dir")?,
            product: self.product.unwrap_or_else(|| "Tails".into()),
            build_target: self.build_target.unwrap_or_else(|| "amd64".into()),
            engine_options,
            require_engine: self.require_engine,
            listen,
            tls,
            tls_client_ca: self.tls_client_ca,
            tls_revoked: self.tls_revoked,
            token,
            signing,
            reproduce,
            junit: self.junit,
            lease_timeout: self.lease_timeout,
            max_attempts: self.max_attempts,
            linger: self.linger,
            verify_jobs: self.verify_jobs,
            audit_rate: if self.test_audit_every_form {
                1024
            } else {
                iukfarm_coordinator::audit::RATE
            },
            kernel_check: match self.kernel_check.resolve() {
                Ok(Ok(())) => true,
                Ok(Err(why)) => {
                    eprintln!("iukfarm: kits are not read through the kernel: {why}");
                    false
                }
                Err(e) => return Err(E::Config(format!("--kernel-check on: {e}"))),
            },
            block_store: self.block_store_size.unwrap_or(default_store),
            metrics_listen: self
                .metrics_listen
                .as_deref()
                .map(|m| super::parse_listen("--metrics-listen", m))
                .transpose()
                .map_err(E::Config)?,
        })
    }
}

#[derive(Parser)]
#[command(after_help = EXIT_HELP, args_override_self = true)]
pub struct CoordinatorArgs {
    #[command(flatten)]
    release: ReleaseArgs,
    #[command(flatten)]
    udf: super::udf::StepArgs,
    /// Address to listen on (workers and clients connect here) [default: 127.0.0.1:7447,
    /// this machine only; 0.0.0.0:7447 for workers elsewhere].
    #[arg(long, value_name = "ADDRESS:PORT")]
    listen: Option<String>,
}

/// Exit status and message for a coordinator error.
fn failed(e: iukfarm_coordinator::Error) -> ExitCode {
    eprintln!("iukfarm: error: {e}");
    ExitCode::from(if e.is_usage() {
        exit::USAGE
    } else {
        exit::FAILURE
    })
}

fn outcome(o: Outcome) -> ExitCode {
    match o {
        Outcome::Succeeded => ExitCode::SUCCESS,
        Outcome::Failed(why) => {
            eprintln!("iukfarm: {} IUKs failed:", why.len());
            for w in why {
                eprintln!("  {w}");
            }
            ExitCode::from(exit::FAILURE)
        }
        Outcome::Cancelled(r) => {
            eprintln!("iukfarm: release cancelled: {r}");
            ExitCode::from(exit::INTERRUPTED)
        }
    }
}

/// Turns every SIGINT/SIGTERM into `cancel`: the first cancels the
/// release, one during the linger ends it (without this, the handlers would
/// swallow every later signal).
fn on_signal(cancel: impl Fn(&str) + Send + Sync + 'static) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(e) => {
                    error!("cannot watch SIGTERM: {e}");
                    return;
                }
            };
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => cancel("interrupted (SIGINT)"),
                _ = term.recv() => cancel("terminated (SIGTERM)"),
            }
        }
    });
}

/// The coordinator's block store by default: about the compressed new
/// blocks of Tails' largest IUK, three times over.
const DEFAULT_BLOCK_STORE: u64 = 4 << 30;

pub fn coordinator(a: CoordinatorArgs) -> Result<ExitCode> {
    let cfg = match a.release.config(
        a.listen,
        &format!("127.0.0.1:{}", iukfarm_proto::DEFAULT_PORT),
        DEFAULT_BLOCK_STORE,
    ) {
        Ok(c) => c,
        Err(e) => return Ok(failed(e)),
    };
    let udf = a.udf.plan(&cfg)?;
    let output_dir = cfg.output_dir.clone();
    let code = super::block_on(async move {
        let gensquashfs = cfg.gensquashfs();
        let running = match iukfarm_coordinator::start(cfg, None).await {
            Ok(r) => r,
            Err(e) => return Ok(failed(e)),
        };
        // Scripts read the address from this line: it ends with it.
        eprintln!("iukfarm coordinator: listening on {}", running.addr());
        if let Ok(g) = gensquashfs {
            eprintln!("iukfarm coordinator: IUKs with gensquashfs {g}'s bytes");
        }
        on_signal(running.canceller());
        Ok(match running.wait().await {
            Ok(o) => outcome(o),
            Err(e) => failed(e),
        })
    })?;
    after_release(code, udf, &output_dir)
}

/// The steps after a signed release: the UDFs, when asked for.
fn after_release(
    code: ExitCode,
    udf: Option<super::udf::Step>,
    output_dir: &std::path::Path,
) -> Result<ExitCode> {
    match udf {
        Some(step) if code == ExitCode::SUCCESS => match step.run(output_dir) {
            Ok(()) => Ok(code),
            Err(e) => {
                eprintln!("iukfarm: error: {e:#}");
                Ok(ExitCode::from(exit::FAILURE))
            }
        },
        _ => Ok(code),
    }
}

#[derive(Parser)]
#[command(after_help = EXIT_HELP, args_override_self = true)]
pub struct ReleaseCmdArgs {
    #[command(flatten)]
    release: ReleaseArgs,
    #[command(flatten)]
    udf: super::udf::StepArgs,
    /// In-process workers.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    workers: u32,
    /// Compression threads per worker (default: the cores shared among the workers).
    #[arg(short = 'j', long, value_parser = super::parse_threads)]
    threads: Option<usize>,
    /// Also serve status and downloads here (needs --token-file unless loopback)
    /// [default: not served].
    #[arg(long, value_name = "ADDRESS:PORT")]
    listen: Option<String>,
    /// One line per change instead of progress bars.
    #[arg(long)]
    plain: bool,
    /// Keep the workers' compressed-block cache here, for later releases
    /// [default: a temporary one, removed at the end].
    #[arg(long, value_name = "DIR")]
    block_cache: Option<PathBuf>,
    /// Size cap of the block cache (0: no cache).
    #[arg(long, value_name = "SIZE", default_value = "8G", value_parser = super::parse_bytes)]
    block_cache_size: u64,
}

pub fn release(a: ReleaseCmdArgs) -> Result<ExitCode> {
    let workers = a.workers;
    let block_cache = BlockCacheAt {
        dir: a.block_cache.clone(),
        cap: a.block_cache_size,
    };
    let threads = a.threads;
    let plain = a.plain;
    let serves_clients = a.listen.is_some();
    let cfg = match a.release.config(a.listen, "127.0.0.1:0", 0) {
        Ok(c) => c,
        Err(e) => return Ok(failed(e)),
    };
    if serves_clients && cfg.token.is_none() {
        return Ok(failed(iukfarm_coordinator::Error::Config(
            "--listen serves clients: pass --token-file too (they need the token)".into(),
        )));
    }
    let udf = a.udf.plan(&cfg)?;
    let output_dir = cfg.output_dir.clone();
    let code = super::block_on(async move {
        let interrupted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        embedded(cfg, workers, threads, plain, None, block_cache, interrupted).await
    })?;
    after_release(code, udf, &output_dir)
}

/// Where in-process workers keep their shared block cache (`None`: in the
/// release's scratch directory, removed at the end) and its cap (0: none).
pub struct BlockCacheAt {
    pub dir: Option<PathBuf>,
    pub cap: u64,
}

/// Runs a release with `workers` in-process workers over loopback, the
/// same code paths as a farm; follows it on stderr. `interrupted` (e.g. a
/// Ctrl-C flag set elsewhere) cancels it.
pub async fn embedded(
    mut cfg: Config,
    workers: u32,
    threads: Option<usize>,
    plain: bool,
    demo_token: Option<String>,
    block_cache: BlockCacheAt,
    interrupted: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<ExitCode> {
    use std::sync::atomic::Ordering;
    if workers == 0 {
        return Ok(failed(iukfarm_coordinator::Error::Config(
            "--workers must be at least 1".into(),
        )));
    }
    if workers < 2 && cfg.reproduce != Reproduce::None {
        return Ok(failed(iukfarm_coordinator::Error::Config(
            "--reproduce needs a second worker: pass --workers 2 or more".into(),
        )));
    }
    // In-process workers authenticate like remote ones.
    let token = cfg
        .token
        .clone()
        .or(demo_token)
        .unwrap_or_else(random_token);
    cfg.token = Some(token.clone());
    let cache_root = cfg.output_dir.join(".iukfarm").join("workers");
    let iso_root = cfg.iso_root.clone();
    if cfg.tls.is_some() {
        return Ok(failed(iukfarm_coordinator::Error::Config(
            "in-process workers talk over loopback: TLS applies to `iukfarm coordinator`".into(),
        )));
    }
    let gensquashfs = cfg.gensquashfs();
    let running: Running = match iukfarm_coordinator::start(cfg, None).await {
        Ok(r) => r,
        Err(e) => return Ok(failed(e)),
    };
    if let Ok(g) = gensquashfs {
        eprintln!("iukfarm release: IUKs with gensquashfs {g}'s bytes");
    }
    let addr = running.addr();
    let url = format!("http://127.0.0.1:{}", addr.port());
    let cancel = running.canceller();
    on_signal(running.canceller());
    let flag = interrupted.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if flag.load(Ordering::SeqCst) {
                cancel("interrupted (SIGINT)");
                return;
            }
        }
    });
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_worker = threads.unwrap_or((cores / workers as usize).max(1));
    let (stop_tx, stop_rx) = watch::channel(false);
    let client = ClientConfig {
        url: url.clone(),
        tls_ca: None,
        identity: None,
        token: Some(token),
    };
    // One cache for every in-process worker: they share the machine.
    let dir = block_cache.dir.unwrap_or_else(|| cache_root.join("blocks"));
    let blocks = match super::open_block_cache(&dir, block_cache.cap) {
        Ok(b) => b,
        Err(e) => {
            return Ok(failed(iukfarm_coordinator::Error::Config(format!("{e:#}"))));
        }
    };
    let mut handles = Vec::new();
    for n in 1..=workers {
        let wcfg = iukfarm_worker::Config {
            client: client.clone(),
            name: format!("local-{n}"),
            iso_root: Some(iso_root.clone()),
            cache_dir: cache_root.join(format!("local-{n}")),
            slots: 1,
            threads: per_worker,
            memory: iukfarm_worker::available_memory(),
            once: true,
            metrics_listen: None,
            blocks: blocks.clone(),
            test: TestHooks::default(),
        };
        handles.push(tokio::spawn(iukfarm_worker::run(wcfg, stop_rx.clone())));
    }
    let follower = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut c = iukfarm_proto::connect(&client).await?;
            super::client::follow(&mut c, &client.url, plain).await
        })
    };
    let result = running.wait().await;
    let _ = stop_tx.send(true);
    for h in handles {
        match h.await {
            Ok(Err(e)) => eprintln!("iukfarm: worker: {e}"),
            Err(e) => eprintln!("iukfarm: worker task: {e}"),
            Ok(Ok(())) => {}
        }
    }
    let _ = std::fs::remove_dir_all(&cache_root);
    match follower.await {
        Ok(Err(e)) => eprintln!("iukfarm: {e:#}"),
        Err(e) => eprintln!("iukfarm: {e}"),
        Ok(Ok(_)) => {}
    }
    Ok(match result {
        Ok(o) => outcome(o),
        Err(e) => failed(e),
    })
}

fn random_token() -> String {
    let mut b = [0u8; 24];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[derive(Parser)]
#[command(
    after_help = "Exit status: 0 stopped (SIGINT/SIGTERM, or with --once after a release); \
2 refused by the coordinator (wrong token, engine fingerprint, protocol) or bad configuration; \
1 other errors. Waits, retrying with backoff, while no coordinator is up."
)]
pub struct WorkerArgs {
    #[command(flatten)]
    conn: super::client::Conn,
    /// Name shown in status and manifests [default: the host name].
    #[arg(long)]
    name: Option<String>,
    /// Local copy of the ISO archive (files are used when their sha256 matches).
    #[arg(long, value_name = "DIR")]
    iso_root: Option<PathBuf>,
    /// ISOs fetched from coordinators and the jobs' directories.
    #[arg(long, value_name = "DIR", default_value = "/var/cache/iukfarm")]
    cache_dir: PathBuf,
    /// Jobs at once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    slots: u32,
    /// Compression threads per job (default: the cores shared among the slots).
    #[arg(short = 'j', long, default_value_t = 0, value_parser = super::parse_threads)]
    threads: usize,
    /// Memory to advertise in MiB [default: MemAvailable].
    #[arg(long, value_name = "MIB")]
    memory: Option<u64>,
    /// Exit when the release is over instead of waiting for the next coordinator.
    #[arg(long)]
    once: bool,
    /// Serve Prometheus metrics at http://ADDRESS:PORT/metrics (plain HTTP, no
    /// authentication: bind it to the monitoring network) [default: not served].
    #[arg(
        long,
        env = "IUKFARM_METRICS_LISTEN",
        value_name = "ADDRESS:PORT",
        value_parser = |s: &str| super::parse_listen("--metrics-listen", s)
    )]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Size cap of the compressed-block cache in <cache-dir>/blocks (0: no cache). Jobs
    /// of a release share most changed blocks; a hit gives the very bytes a miss would.
    #[arg(long, value_name = "SIZE", default_value = "8G", value_parser = super::parse_bytes)]
    block_cache_size: u64,
    #[arg(long, hide = true, default_value_t = 0)]
    test_corrupt_uploads: u32,
    #[arg(long, hide = true)]
    test_perturb: bool,
    #[arg(long, hide = true, default_value = "0s", value_parser = config::parse_duration)]
    test_job_delay: Duration,
    #[arg(long, hide = true, default_value = "0s", value_parser = config::parse_duration)]
    test_upload_pause: Duration,
    #[arg(long, hide = true)]
    test_lie_blocks: bool,
    #[arg(long, hide = true)]
    test_foreign_forms_after: Option<u64>,
}

pub fn worker(a: WorkerArgs) -> Result<ExitCode> {
    let client = match a.conn.config().and_then(|c| {
        iukfarm_proto::check_address(&c).bad_input()?;
        Ok(c)
    }) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("iukfarm: error: {e:#}");
            return Ok(ExitCode::from(exit::USAGE));
        }
    };
    let blocks = match super::open_block_cache(&a.cache_dir.join("blocks"), a.block_cache_size) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("iukfarm: error: {e:#}");
            return Ok(ExitCode::from(exit::USAGE));
        }
    };
    let cfg = iukfarm_worker::Config {
        client,
        name: a.name.unwrap_or_else(iukfarm_worker::hostname),
        blocks,
        iso_root: a.iso_root,
        cache_dir: a.cache_dir,
        slots: a.slots,
        threads: a.threads,
        memory: a
            .memory
            .map(|m| m << 20)
            .unwrap_or_else(iukfarm_worker::available_memory),
        once: a.once,
        metrics_listen: a.metrics_listen,
        test: TestHooks {
            corrupt_uploads: a.test_corrupt_uploads,
            perturb: a.test_perturb,
            job_delay: a.test_job_delay,
            upload_pause: a.test_upload_pause,
            lie_blocks: a.test_lie_blocks,
            foreign_forms_after: a.test_foreign_forms_after,
        },
    };
    super::block_on(async move {
        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(async move {
            let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                return;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            let _ = stop_tx.send(true);
        });
        match iukfarm_worker::run(cfg, stop_rx).await {
            Ok(()) => Ok(ExitCode::SUCCESS),
            Err(e @ (iukfarm_worker::Error::Refused(_) | iukfarm_worker::Error::Config(_))) => {
                eprintln!("iukfarm: error: {e}");
                Ok(ExitCode::from(exit::USAGE))
            }
            Err(e) => Err(anyhow::Error::new(e).context("worker")),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Defaults that live in code rather than in clap are still in --help,
    /// and say what the code does.
    #[test]
    fn help_names_the_defaults_the_code_applies() {
        let help = CoordinatorArgs::command().render_long_help().to_string();
        for default in [
            config::DEFAULT_ISO_PATTERN.to_string(),
            format!("127.0.0.1:{}", iukfarm_proto::DEFAULT_PORT),
            "[default: tails]".into(),
            "[default: Tails]".into(),
        ] {
            assert!(help.contains(&default), "{default} not in:\n{help}");
        }
    }
}
