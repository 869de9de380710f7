//! `iukfarm udf`: Tails' upgrade-description files, generated as
//! `tails-iuk-generate-upgrade-description-files` writes them, signed as
//! `sign-updated-udfs` signs them, and checked.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow};
use clap::{Parser, Subcommand};
use iukfarm_coordinator::manifest::Manifest;
use iukfarm_coordinator::signing::{self, SigningKey};
use iukfarm_udf::{Channel, Release, Target};

use super::{BadInput, usage};

#[derive(Parser)]
pub struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write every upgrades.yml of a release into the website checkout, as Tails' generator does, and sign them.
    Generate(Box<GenerateArgs>),
    /// Parse UDFs, check every field an Upgrader needs and their signatures (upgrades.yml.pgp).
    Check(CheckArgs),
    /// Sign UDFs written unsigned (on the RM's machine, with Tails' signing key), then check them.
    Sign(SignArgs),
}

#[derive(Parser)]
#[command(
    after_help = "Signs, as Tails' sign-updated-udfs does, each upgrades.yml named or found under a directory named whose upgrades.yml.pgp is missing or not a good signature by this key (armored, detached, written next to it atomically), then checks every one of them as `udf check` does. This is the step that needs Tails' signing key: run it where the key is (gpg-agent and smartcards work), on the UDFs the farm wrote unsigned (--udf-unsigned).

Exit status: 0 all signed and checked; 1 a signing failure or a file that does not check; 2 bad usage or input (no key, a file named that is missing)."
)]
pub struct SignArgs {
    /// UDFs (upgrades.yml), or directories searched for them (a website checkout's
    /// wiki/src/upgrade/v2).
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
    /// Sign with gpg's key KEYID (gpg-agent and smartcards work).
    #[arg(long, value_name = "KEYID", required_unless_present = "signing_key")]
    gpg_key: Option<String>,
    /// Sign with an unencrypted OpenPGP secret key file.
    #[arg(long, value_name = "FILE", conflicts_with = "gpg_key")]
    signing_key: Option<PathBuf>,
}

#[derive(Parser)]
#[command(
    after_help = "Writes RELEASE_CHECKOUT/wiki/src/upgrade/v2/<product>/<version>/\
<build-target>/<channel>/upgrades.yml for the release, its next versions and its previous \
versions, byte for byte as tails-iuk-generate-upgrade-description-files would, and with \
a key, each changed file's upgrades.yml.pgp (armored, detached), every signature checked \
afterwards. Sizes and digests come from the release's signed manifest (no hashing) or \
from the files.

Exit status: 0 written (and signed); 1 an I/O or signing failure; 2 bad usage or input \
(an unreadable existing UDF, a manifest that is not the release's or not signed)."
)]
pub struct GenerateArgs {
    /// The version being released.
    #[arg(long, value_name = "VERSION")]
    version: String,
    /// A version planned after this one (repeat; at least one).
    #[arg(long = "next-version", value_name = "VERSION", required = true)]
    next_versions: Vec<String>,
    /// A version whose UDF gets this release as its upgrade (repeat).
    #[arg(long = "previous-version", value_name = "VERSION")]
    previous_versions: Vec<String>,
    /// Upgrades of type major (Tails' release process always passes it), else minor.
    #[arg(long)]
    major_release: bool,
    /// The channel of this release.
    #[arg(long, default_value = "stable", value_parser = ["stable", "alpha"])]
    channel: String,
    #[arg(long, default_value = "amd64", value_name = "NAME")]
    build_target: String,
    #[arg(long, default_value = "Tails", value_name = "NAME")]
    product_name: String,
    /// Tails' website checkout (the UDFs go under wiki/src/upgrade/v2/).
    #[arg(long, value_name = "DIR")]
    release_checkout: PathBuf,
    /// The new release's ISO (hashed unless the manifest names its digest).
    #[arg(long, value_name = "FILE", required_unless_present = "manifest")]
    iso: Option<PathBuf>,
    /// Directory of the IUKs (<product>_<target>_<previous>_to_<version>.iuk), hashed.
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "manifest",
        conflicts_with = "manifest"
    )]
    iuks: Option<PathBuf>,
    /// The farm's signed manifest.json: sizes and digests of the ISO and IUKs without
    /// hashing (its signature, manifest.json.asc, is checked with --cert).
    #[arg(long, value_name = "FILE", requires = "cert")]
    manifest: Option<PathBuf>,
    /// OpenPGP certificate that signed the manifest.
    #[arg(long, value_name = "FILE")]
    cert: Option<PathBuf>,
    /// Sign each changed UDF with this unencrypted OpenPGP secret key file.
    #[arg(long, value_name = "FILE", conflicts_with = "gpg_key")]
    signing_key: Option<PathBuf>,
    /// Sign each changed UDF with `gpg --local-user KEY` (agent, smartcards).
    #[arg(long, value_name = "KEY")]
    gpg_key: Option<String>,
}

#[derive(Parser)]
#[command(
    after_help = "Exit status: 0 every file is a well-formed, signed UDF; 1 a file \
is not (each is named); 2 bad usage."
)]
pub struct CheckArgs {
    /// upgrades.yml files; each FILE.pgp must hold its detached signature.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// OpenPGP certificate(s) of the signing key.
    #[arg(long, value_name = "FILE")]
    cert: PathBuf,
}

pub fn run(a: Args) -> Result<ExitCode> {
    match a.cmd {
        Cmd::Generate(g) => generate(*g),
        Cmd::Check(c) => check(c),
        Cmd::Sign(a) => sign(a),
    }
}

/// Every upgrades.yml under `p` (or `p` itself), sorted.
fn find_udfs(p: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    if !p.is_dir() {
        out.push(p.to_path_buf());
        return Ok(());
    }
    let mut entries: Vec<_> = std::fs::read_dir(p)
        .with_context(|| format!("reading {}", p.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("reading {}", p.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        if e.file_type()?.is_dir() {
            find_udfs(&path, out)?;
        } else if e.file_name() == "upgrades.yml" {
            out.push(path);
        }
    }
    Ok(())
}

fn sign(a: SignArgs) -> Result<ExitCode> {
    let key = match (&a.signing_key, &a.gpg_key) {
        (Some(p), None) => SigningKey::KeyFile(p.clone()),
        (None, Some(k)) => SigningKey::Gpg(k.clone()),
        _ => usage!("give --gpg-key or --signing-key"),
    };
    let mut files = Vec::new();
    for p in &a.paths {
        if !p.exists() {
            usage!("{}: no such file or directory", p.display());
        }
        find_udfs(p, &mut files)?;
    }
    if files.is_empty() {
        usage!("no upgrades.yml under {}", a.paths[0].display());
    }
    // The key must work, and not be expired, before anything is written.
    let (cert, expiring) = key
        .certificate_and_warning()
        .map_err(|e| anyhow!(super::Usage(e.to_string())))?;
    if let Some(w) = expiring {
        eprintln!("iukfarm: warning: the UDFs' signing key: {w}");
    }
    let mut signed = 0;
    for f in &files {
        let bytes = std::fs::read(f)
            .with_context(|| format!("reading {}", f.display()))
            .bad_input()?;
        let sig = sig_path(f);
        let good = std::fs::read(&sig)
            .ok()
            .is_some_and(|s| signing::verify(&cert, &bytes, &s).is_ok());
        if good {
            println!("{:9} {}", "good", f.display());
            continue;
        }
        let tmp = crate::output::temp_next_to(&sig)?;
        key.sign(f, tmp.path())
            .with_context(|| format!("signing {}", f.display()))?;
        crate::output::persist(tmp, &sig, true)?;
        println!("{:9} {}", "signed", f.display());
        signed += 1;
    }
    for f in &files {
        check_one(f, &cert).with_context(|| format!("checking {}", f.display()))?;
    }
    println!(
        "{} UDFs: {signed} signed, every one well formed and signed by this key",
        files.len()
    );
    Ok(ExitCode::SUCCESS)
}

fn generate(a: GenerateArgs) -> Result<ExitCode> {
    let release = Release {
        version: a.version.clone(),
        next_versions: a.next_versions.clone(),
        previous_versions: a.previous_versions.clone(),
        major: a.major_release,
        channel: Channel::parse(&a.channel).map_err(|e| anyhow!(super::Usage(e.to_string())))?,
        build_target: a.build_target.clone(),
        product_name: a.product_name.clone(),
    };
    precheck(&release, &a.release_checkout)?;
    let key = match (&a.signing_key, &a.gpg_key) {
        (Some(p), None) => Some(SigningKey::KeyFile(p.clone())),
        (None, Some(k)) => Some(SigningKey::Gpg(k.clone())),
        _ => None,
    };
    // The key must work before anything is written.
    let cert = key
        .as_ref()
        .map(|k| {
            let (cert, expiring) = k
                .certificate_and_warning()
                .map_err(|e| anyhow!(super::Usage(e.to_string())))?;
            if let Some(w) = expiring {
                eprintln!("iukfarm: warning: the UDFs' signing key: {w}");
            }
            Ok::<_, anyhow::Error>(cert)
        })
        .transpose()?;
    let (iso, iuks) = match &a.manifest {
        Some(m) => {
            let cert_path = a.cert.as_ref().expect("clap requires --cert");
            super::input_file(m)?;
            let manifest_cert = std::fs::read(cert_path)
                .with_context(|| format!("reading {}", cert_path.display()))
                .bad_input()?;
            from_manifest(&release, m, &manifest_cert, a.iso.as_deref())?
        }
        None => from_files(&a, &release)?,
    };
    write(
        &release,
        &a.release_checkout,
        &iso,
        &iuks,
        key.as_ref().zip(cert.as_deref()),
    )?;
    Ok(ExitCode::SUCCESS)
}

/// What can be checked before any work: the options, the checkout, and
/// that every existing UDF the generator would load is readable.
fn precheck(release: &Release, checkout: &Path) -> Result<()> {
    if let Err(e) = release.check() {
        usage!("{e}");
    }
    if !checkout.is_dir() {
        usage!(
            "{}: not a directory (a Tails website checkout)",
            checkout.display()
        );
    }
    let placeholder = Target {
        sha256: "0".repeat(64),
        size: 0,
    };
    generate_in(release, checkout, &placeholder, &[]).map(|_| ())
}

fn generate_in(
    release: &Release,
    checkout: &Path,
    iso: &Target,
    iuks: &[(String, Target)],
) -> Result<Vec<iukfarm_udf::Written>> {
    let existing = |p: &Path| -> Result<Option<Vec<u8>>, iukfarm_udf::Error> {
        match std::fs::read(checkout.join(p)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(iukfarm_udf::Error::Options(format!(
                "{}: {e}",
                checkout.join(p).display()
            ))),
        }
    };
    let iuk = |name: &str| iuks.iter().find(|(n, _)| n == name).map(|(_, t)| t.clone());
    match iukfarm_udf::generate(release, iso, &iuk, &existing) {
        Ok(w) => Ok(w),
        Err(iukfarm_udf::Error::Invalid { path, why }) => usage!(
            "{}: {why}; Tails' generator would refuse it too: fix or remove it, then run again \
             (nothing was written)",
            checkout.join(path).display()
        ),
        Err(e) => usage!("{e}"),
    }
}

/// Writes the release's UDFs into the checkout and, with a key (and its
/// certificate), signs each changed one and checks every signature.
fn write(
    release: &Release,
    checkout: &Path,
    iso: &Target,
    iuks: &[(String, Target)],
    key: Option<(&SigningKey, &[u8])>,
) -> Result<()> {
    let written = generate_in(release, checkout, iso, iuks)?;
    if release.previous_versions.is_empty() {
        eprintln!("iukfarm: warning: no previous version: no UDF advertises this release");
    }
    let mut signed = 0;
    for w in &written {
        let dest = checkout.join(&w.path);
        let before = std::fs::read(&dest).ok();
        let changed = before.as_deref() != Some(&w.bytes[..]);
        if changed {
            let dir = dest.parent().expect("UDF paths have a directory");
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let mut tmp = crate::output::temp_next_to(&dest)?;
            std::io::Write::write_all(&mut tmp, &w.bytes)
                .with_context(|| format!("writing {}", dest.display()))?;
            crate::output::persist(tmp, &dest, true)?;
        }
        let what = match (changed, before.is_some(), w.updated) {
            (false, _, _) => "unchanged",
            (true, false, _) => "created",
            (true, true, true) => "updated",
            (true, true, false) => "reset",
        };
        println!("{what:9} {}", w.path.display());
        let Some((key, cert)) = key else {
            continue;
        };
        let sig = sig_path(&dest);
        let good = std::fs::read(&sig)
            .ok()
            .is_some_and(|s| signing::verify(cert, &w.bytes, &s).is_ok());
        if changed || !good {
            let tmp = crate::output::temp_next_to(&sig)?;
            key.sign(&dest, tmp.path())
                .with_context(|| format!("signing {}", dest.display()))?;
            crate::output::persist(tmp, &sig, true)?;
            signed += 1;
        }
    }
    match key {
        Some((_, cert)) => {
            for w in &written {
                let dest = checkout.join(&w.path);
                check_one(&dest, cert).with_context(|| "checking what was just signed")?;
            }
            println!(
                "{} UDFs written, {signed} signed; every signature checked",
                written.len()
            );
        }
        None => println!(
            "{} UDFs written, not signed: sign them where Tails' signing key is, with \
             `iukfarm udf sign --gpg-key KEYID {}`",
            written.len(),
            checkout.display()
        ),
    }
    Ok(())
}

fn sig_path(udf: &Path) -> PathBuf {
    let mut s = udf.as_os_str().to_owned();
    s.push(".pgp");
    PathBuf::from(s)
}

/// The ISO's and IUKs' sizes and digests from the farm's manifest, after
/// checking its signature and that it is this release's.
fn from_manifest(
    r: &Release,
    path: &Path,
    cert: &[u8],
    iso_file: Option<&Path>,
) -> Result<(Target, Vec<(String, Target)>)> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let sig = sig_of_manifest(path);
    let sig_bytes = std::fs::read(&sig).with_context(|| format!("reading {}", sig.display()))?;
    if let Err(e) = signing::verify(cert, &data, &sig_bytes) {
        usage!("{}: {e}", sig.display());
    }
    let m: Manifest = match serde_json::from_slice(&data) {
        Ok(m) => m,
        Err(e) => usage!("{}: not a manifest: {e}", path.display()),
    };
    if m.new_version != r.version || m.product != r.product_name || m.build_target != r.build_target
    {
        usage!(
            "{}: the manifest is of {} {} {}, not of {} {} {}",
            path.display(),
            m.product,
            m.build_target,
            m.new_version,
            r.product_name,
            r.build_target,
            r.version
        );
    }
    let Some(input) = m.inputs.iter().find(|i| i.version == r.version) else {
        usage!("{}: names no ISO of {}", path.display(), r.version);
    };
    let iso = Target {
        sha256: input.sha256.clone(),
        size: input.size,
    };
    if let Some(p) = iso_file {
        let meta = std::fs::metadata(p).with_context(|| format!("reading {}", p.display()))?;
        if meta.len() != iso.size {
            usage!(
                "{}: {} bytes, but the manifest's ISO of {} has {}",
                p.display(),
                meta.len(),
                r.version,
                iso.size
            );
        }
    }
    let iuks = m
        .iuks
        .iter()
        .map(|k| {
            (
                k.name.clone(),
                Target {
                    sha256: k.sha256.clone(),
                    size: k.size,
                },
            )
        })
        .collect();
    Ok((iso, iuks))
}

fn sig_of_manifest(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".asc");
    PathBuf::from(s)
}

/// Sizes and digests read from the files, as the generator does: the ISO,
/// and each previous version's IUK that is a regular file in --iuks.
fn from_files(a: &GenerateArgs, r: &Release) -> Result<(Target, Vec<(String, Target)>)> {
    let iso_path = a.iso.as_ref().expect("clap requires --iso");
    if !iso_path.is_file() {
        usage!("--iso {}: not a file", iso_path.display());
    }
    let dir = a.iuks.as_ref().expect("clap requires --iuks");
    if !dir.is_dir() {
        usage!("--iuks {}: not a directory", dir.display());
    }
    let hash = |p: &Path| -> Result<Target> {
        Ok(Target {
            sha256: iukfarm_coordinator::inputs::sha256_file(p)?,
            size: std::fs::metadata(p)
                .with_context(|| format!("reading {}", p.display()))?
                .len(),
        })
    };
    let iso = hash(iso_path)?;
    let mut iuks = Vec::new();
    for prev in &r.previous_versions {
        let name = r.iuk_name(prev);
        let p = dir.join(&name);
        if p.is_file() {
            iuks.push((name, hash(&p)?));
        } else {
            eprintln!(
                "no IUK {name} in {}: its UDF advertises the full upgrade only",
                dir.display()
            );
        }
    }
    Ok((iso, iuks))
}

fn check_one(file: &Path, cert: &[u8]) -> Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    iukfarm_udf::check(file, &bytes)?;
    let sig = sig_path(file);
    let s = std::fs::read(&sig).with_context(|| format!("reading {}", sig.display()))?;
    signing::verify(cert, &bytes, &s).with_context(|| format!("{}", sig.display()))?;
    Ok(())
}

fn check(a: CheckArgs) -> Result<ExitCode> {
    super::input_file(&a.cert)?;
    for f in &a.files {
        super::input_file(f)?;
    }
    let cert = std::fs::read(&a.cert).with_context(|| format!("reading {}", a.cert.display()))?;
    if let Err(e) = signing::parse_certs(&cert) {
        usage!("{}: {e}", a.cert.display());
    }
    let mut bad = 0;
    for f in &a.files {
        if let Err(e) = check_one(f, &cert) {
            eprintln!("iukfarm: {}: {e:#}", f.display());
            bad += 1;
        }
    }
    if bad > 0 {
        eprintln!(
            "iukfarm: {bad} of {} files are not well-formed, signed UDFs",
            a.files.len()
        );
        return Ok(ExitCode::FAILURE);
    }
    println!("All input files are well-formed, signed upgrade-description files.");
    Ok(ExitCode::SUCCESS)
}

/// `--udf-dir` and its options on `coordinator` and `release`: the UDFs
/// written and signed once the release's manifest is, from that manifest.
#[derive(Parser, Clone)]
pub struct StepArgs {
    /// Once the release is signed, write its upgrade-description files into this Tails
    /// website checkout from the manifest (as `iukfarm udf generate --manifest` would),
    /// signed with the manifest's key, every signature checked; with --udf-unsigned, for
    /// `iukfarm udf sign` on the RM's machine.
    #[arg(long, value_name = "DIR", help_heading = "Upgrade-description files")]
    pub(crate) udf_dir: Option<PathBuf>,
    /// Write the UDFs unsigned: Tails' UDFs are signed with Tails' signing key, which stays
    /// on the RM's machine (`iukfarm udf sign --gpg-key KEYID DIR` there), not the farm's.
    #[arg(long, requires = "udf_dir", help_heading = "Upgrade-description files")]
    pub(crate) udf_unsigned: bool,
    /// A version planned after this one (repeat; at least one with --udf-dir).
    #[arg(
        long = "udf-next-version",
        value_name = "VERSION",
        requires = "udf_dir",
        help_heading = "Upgrade-description files"
    )]
    pub(crate) udf_next_versions: Vec<String>,
    /// A version whose UDF gets this release as its upgrade (repeat)
    /// [default: the release's source versions].
    #[arg(
        long = "udf-previous-version",
        value_name = "VERSION",
        requires = "udf_dir",
        help_heading = "Upgrade-description files"
    )]
    pub(crate) udf_previous_versions: Vec<String>,
    /// Upgrades of type major (Tails' release process always passes it).
    #[arg(long, requires = "udf_dir", help_heading = "Upgrade-description files")]
    pub(crate) udf_major_release: bool,
    /// The channel of this release.
    #[arg(
        long,
        default_value = "stable",
        value_parser = ["stable", "alpha"],
        help_heading = "Upgrade-description files"
    )]
    pub(crate) udf_channel: String,
}

/// The UDF step of a release, checked before the release starts.
pub struct Step {
    release: Release,
    checkout: PathBuf,
    key: SigningKey,
    unsigned: bool,
}

impl StepArgs {
    /// Checks the options and the checkout's existing UDFs, so that a
    /// release is not built only to find them unusable at its end.
    pub fn plan(self, cfg: &iukfarm_coordinator::config::Config) -> Result<Option<Step>> {
        let Some(checkout) = self.udf_dir else {
            return Ok(None);
        };
        if self.udf_next_versions.is_empty() {
            usage!("--udf-dir needs at least one --udf-next-version (as Tails' generator does)");
        }
        let release = Release {
            version: cfg.new_version.clone(),
            next_versions: self.udf_next_versions,
            previous_versions: if self.udf_previous_versions.is_empty() {
                cfg.source_versions.clone()
            } else {
                self.udf_previous_versions
            },
            major: self.udf_major_release,
            channel: Channel::parse(&self.udf_channel)
                .map_err(|e| anyhow!(super::Usage(e.to_string())))?,
            build_target: cfg.build_target.clone(),
            product_name: cfg.product.clone(),
        };
        precheck(&release, &checkout).context("--udf-dir")?;
        Ok(Some(Step {
            release,
            checkout,
            key: cfg.signing.clone(),
            unsigned: self.udf_unsigned,
        }))
    }
}

impl Step {
    /// Writes and signs the UDFs of the release signed in `output_dir`,
    /// from its manifest: no kit is hashed again.
    pub fn run(&self, output_dir: &Path) -> Result<()> {
        let cert = self
            .key
            .certificate()
            .context("the signing key's certificate")?;
        let (iso, iuks) = from_manifest(
            &self.release,
            &output_dir.join(iukfarm_coordinator::manifest::MANIFEST),
            &cert,
            None,
        )?;
        // The manifest's key checks the manifest either way; it signs the
        // UDFs only when the farm is trusted with that.
        let key = (!self.unsigned).then_some((&self.key, &cert[..]));
        write(&self.release, &self.checkout, &iso, &iuks, key).with_context(|| {
            format!(
                "the IUKs are built and signed, but the UDFs in {} are not all written: run the \
                 same command again (it resumes from the journal)",
                self.checkout.display()
            )
        })
    }
}
