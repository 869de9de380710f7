//! `iukfarm publish`: the release's IUKs onto the rsync server, checked
//! there against the RM's own build, then promoted.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use iukfarm_coordinator::manifest::{self, Manifest};
use iukfarm_publish::{self as publish, Error, Kit, Promotion, Remote};

use super::usage;

/// A kit differs from the RM's build (also when its copy on the server does).
pub const MISMATCH: u8 = 3;

#[derive(Parser)]
#[command(
    after_help = "Steps, each idempotent (run the same command again after any \
failure: it resumes):
  0. with --fetch, the release is downloaded from the running coordinator into \
RELEASE_DIR, each kit checked against the coordinator's digest (kits already there are kept);
  1. the release directory is checked against its signed manifest (--cert), and the \
manifest's kits against the RM's own build (--rm-sums: the sha256sum of their `iukfarm \
build` or `iukfarm release`): the same names, the same digests;
  2. the kits missing or different on the server are copied into --staging-dir \
(rsync --partial --inplace over --ssh);
  3. every copy is hashed on the server, once; a damaged or missing one is sent again \
once. With --promote that hashing is done by the promotion script itself, which moves \
nothing unless every kit matches, and only then sets --owner and Tails' modes \
(u=rwX,go=rX), moves them into --final-dir and writes the time to --trace-file.

Exit status: 0 done; 1 ssh, rsync or the server failed, or the release directory does \
not match its manifest (nothing unchecked was promoted; rerun to resume); 2 bad usage; \
3 a kit differs from the RM's build, or its copy on the server does after being sent \
again (each is named; nothing is promoted)."
)]
pub struct Args {
    /// The release: its IUKs, manifest.json, manifest.json.asc and SHA256SUMS (the
    /// coordinator's output directory, what `iukfarm fetch` downloaded, or where --fetch
    /// downloads it).
    pub(crate) release_dir: PathBuf,
    /// OpenPGP certificate that signed the manifest.
    #[arg(long, value_name = "FILE")]
    pub(crate) cert: PathBuf,
    /// The RM's own build: `sha256sum` of the IUKs they built locally.
    #[arg(long, value_name = "FILE")]
    pub(crate) rm_sums: PathBuf,
    /// The rsync server.
    #[arg(long, value_name = "USER@HOST", value_parser = host)]
    pub(crate) host: String,
    /// The ssh command and its options, split on spaces (also used by rsync).
    #[arg(long, value_name = "COMMAND", default_value = "ssh")]
    pub(crate) ssh: String,
    /// Where the kits are copied and checked on the server (Tails: /srv/tmp).
    #[arg(long, value_name = "DIR")]
    pub(crate) staging_dir: String,
    /// Move the checked kits into --final-dir.
    #[arg(long, requires = "final_dir")]
    pub(crate) promote: bool,
    /// Where published kits live (Tails: /srv/rsync/tails/tails/<dist>/iuk/v2).
    #[arg(long, value_name = "DIR")]
    pub(crate) final_dir: Option<String>,
    /// Owner of promoted kits (Tails: root:rsync_tails).
    #[arg(long, value_name = "USER:GROUP")]
    pub(crate) owner: Option<String>,
    /// The mirrors' trace file, given the time when kits were promoted
    /// (Tails: /srv/rsync/tails/tails/project/trace).
    #[arg(long, value_name = "FILE")]
    pub(crate) trace_file: Option<String>,
    /// Run chown, chmod, mv and the trace update through sudo on the server.
    #[arg(long)]
    pub(crate) sudo: bool,
    /// Cap the copy's bandwidth (KiB/s).
    #[arg(long, value_name = "KIB")]
    pub(crate) bwlimit: Option<u32>,
    /// Only the IUKs whose source version matches this regular expression (whole
    /// version), as copy-iuks-to-rsync-server-and-verify's option: Tails 7's release
    /// process passes "${VERSION%%.*}[.].*" (the same major). The others, and their
    /// lines in --rm-sums, are left alone.
    #[arg(long, value_name = "REGEXP")]
    pub(crate) source_version_regexp: Option<String>,
    /// First download the release from the running coordinator (--coordinator and its
    /// credentials) into RELEASE_DIR, as `iukfarm fetch` does; kits already there are kept.
    #[arg(long)]
    pub(crate) fetch: bool,
    #[command(flatten)]
    pub(crate) conn: super::client::Conn,
}

/// `[USER@]HOST`: never something ssh or rsync would take for an option or
/// a path.
fn host(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && !s.starts_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"@.-_".contains(&b));
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not a host: use [USER@]HOST (letters, digits and . - _ @, not starting with -)"
        ))
    }
}

pub fn run(a: Args) -> Result<ExitCode> {
    let ssh: Vec<String> = a.ssh.split_whitespace().map(String::from).collect();
    if ssh.is_empty() {
        usage!("--ssh is empty");
    }
    super::input_file(&a.cert)?;
    super::input_file(&a.rm_sums)?;
    if !a.fetch {
        super::input_dir(&a.release_dir)?;
    }
    let remote = Remote {
        ssh,
        host: a.host.clone(),
        sudo: a.sudo,
    };
    if a.fetch {
        let fetched = super::block_on(super::client::fetch_into(&a.conn, &a.release_dir, false));
        if let Err(e) = fetched {
            eprintln!(
                "iukfarm: error: fetching the release from {}: {e:#}",
                a.conn.coordinator
            );
            return Ok(ExitCode::from(crate::exit::FAILURE));
        }
    }
    Ok(report(publish_release(&a, &remote)))
}

/// Exit status and messages of a publication.
pub fn report(r: Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = match e.downcast_ref::<Error>() {
                Some(Error::Mismatch(bad)) => {
                    for b in bad {
                        eprintln!("iukfarm: differs from the RM's build: {b}");
                    }
                    eprintln!(
                        "iukfarm: {} IUKs do not match yours: nothing was promoted",
                        bad.len()
                    );
                    return ExitCode::from(MISMATCH);
                }
                Some(Error::Usage(_)) => crate::exit::USAGE,
                _ => crate::exit::FAILURE,
            };
            eprintln!("iukfarm: error: {e:#}");
            ExitCode::from(code)
        }
    }
}

/// The steps of `iukfarm publish` (its help lists them) on `remote`.
pub fn publish_release(a: &Args, remote: &Remote) -> Result<()> {
    publish::check_remote_dir("--staging-dir", &a.staging_dir)?;
    if let Some(f) = &a.final_dir {
        publish::check_remote_dir("--final-dir", f)?;
    }
    if let Some(t) = &a.trace_file {
        publish::check_remote_dir("--trace-file", t)?;
    }
    if let Some(o) = &a.owner {
        let (u, g) = o.split_once(':').unwrap_or((o, "x"));
        publish::check_name("--owner user", u)?;
        publish::check_name("--owner group", g)?;
    }

    // 1. What the RM signed, on disk, and the RM's own build.
    let cert = std::fs::read(&a.cert).with_context(|| format!("reading {}", a.cert.display()))?;
    let c = manifest::check_dir(&a.release_dir, &a.release_dir, Some(&cert), false)?;
    if !c.problems.is_empty() {
        anyhow::bail!(
            "{} does not match its signed manifest: {}; fetch the release again",
            a.release_dir.display(),
            c.problems.join("; ")
        );
    }
    let path = a.release_dir.join(manifest::MANIFEST);
    let m: Manifest = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("{}", path.display()))?;
    let filter = match &a.source_version_regexp {
        Some(r) => Some(
            regex::Regex::new(&format!("^(?:{r})$"))
                .map_err(|e| Error::Usage(format!("--source-version-regexp {r:?}: {e}")))?,
        ),
        None => None,
    };
    let (iuks, left_out): (Vec<_>, Vec<_>) = m.iuks.iter().partition(|k| {
        filter
            .as_ref()
            .is_none_or(|f| f.is_match(&k.source_version))
    });
    if let Some(r) = &a.source_version_regexp {
        if iuks.is_empty() {
            return Err(Error::Usage(format!(
                "--source-version-regexp {r:?} matches none of the release's source versions ({})",
                m.iuks
                    .iter()
                    .map(|k| k.source_version.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
            .into());
        }
        println!(
            "{} IUKs from source versions matching {r:?}; {} left alone",
            iuks.len(),
            left_out.len()
        );
    }
    let kits: Vec<Kit> = iuks
        .iter()
        .map(|k| Kit {
            name: k.name.clone(),
            size: k.size,
            sha256: k.sha256.clone(),
        })
        .collect();
    for k in &kits {
        publish::check_name("kit", &k.name)?;
    }
    let rm_text = std::fs::read_to_string(&a.rm_sums)
        .with_context(|| format!("reading {}", a.rm_sums.display()))?;
    let mut rm = publish::parse_sums(&rm_text).map_err(|e| match e {
        Error::Usage(why) => Error::Usage(format!("{}: {why}", a.rm_sums.display())),
        other => other,
    })?;
    for k in &left_out {
        rm.remove(&k.name);
    }
    publish::compare_with_rm(&kits, &rm)?;
    println!(
        "{} IUKs of {} match the RM's build and the manifest signed by {}",
        kits.len(),
        m.new_version,
        c.signer.as_deref().unwrap_or("?")
    );

    // 2. and 3. The copies, checked on the server.
    let staging = a.staging_dir.as_str();
    let mut dirs = vec![staging];
    if let Some(f) = &a.final_dir {
        dirs.push(f);
    }
    publish::mkdir(remote, staging)?;
    let before = publish::check(remote, &kits, &dirs)?;
    let mut send = before.missing.clone();
    send.extend(before.bad.iter().cloned());
    if !send.is_empty() {
        println!("copying {} IUKs to {}:{staging}", send.len(), a.host);
    }
    publish::upload(
        remote,
        &a.release_dir,
        &before.missing,
        staging,
        a.bwlimit,
        false,
    )?;
    publish::upload(
        remote,
        &a.release_dir,
        &before.bad,
        staging,
        a.bwlimit,
        true,
    )?;
    // 3. and 4. Every copy hashed once on the server: by the promotion
    // script itself when promoting (it moves nothing unless all match),
    // else by a check. A damaged or missing copy is sent again once.
    let promotion = match (a.promote, &a.final_dir) {
        (true, Some(f)) => {
            publish::mkdir(remote, f)?;
            Some(Promotion {
                final_dir: f.clone(),
                owner: a.owner.clone(),
                trace_file: a.trace_file.clone(),
            })
        }
        _ => None,
    };
    let hash_on_server = || -> Result<Result<usize, publish::Check>, Error> {
        match &promotion {
            Some(p) => publish::promote(remote, &kits, staging, p),
            None => {
                let c = publish::check(remote, &kits, &dirs)?;
                Ok(if c.bad.is_empty() && c.missing.is_empty() {
                    Ok(0)
                } else {
                    Err(c)
                })
            }
        }
    };
    let mut verdict = hash_on_server()?;
    if let Err(wrong) = &verdict {
        let again: Vec<String> = wrong.bad.iter().chain(&wrong.missing).cloned().collect();
        eprintln!(
            "iukfarm: {} copies on the server are damaged or missing ({}): sending them again",
            again.len(),
            again.join(", ")
        );
        publish::upload(remote, &a.release_dir, &again, staging, a.bwlimit, true)?;
        verdict = hash_on_server()?;
    }
    let moved = match verdict {
        Ok(moved) => moved,
        Err(wrong) => {
            let mut bad = wrong.bad;
            bad.extend(
                wrong
                    .missing
                    .iter()
                    .map(|n| format!("{n} (missing on the server)")),
            );
            return Err(Error::Mismatch(bad).into());
        }
    };
    println!(
        "{} IUKs on {}: every copy hashed on the server matches the RM's build",
        kits.len(),
        a.host
    );
    match &promotion {
        Some(p) if moved == 0 => println!("already published in {}", p.final_dir),
        Some(p) => println!(
            "published {moved} IUKs in {}{}",
            p.final_dir,
            if p.trace_file.is_some() {
                "; trace file updated"
            } else {
                ""
            }
        ),
        None => println!("not promoted (--promote --final-dir DIR publishes them)"),
    }
    Ok(())
}
