//! `iukfarm ca`: the release CA that says who is who on the farm. The RM
//! creates it once, issues the coordinator's server certificate and one
//! client certificate per worker, RM terminal or dashboard (the role is in
//! the certificate), and revokes a certificate by listing its serial.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use iukfarm_proto::Role;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};

use super::{BadInput, usage};

#[derive(Parser)]
#[command(
    after_help = "Files in DIR: ca.pem (give it to every coordinator, worker and client \
as --tls-ca, and to the coordinator as --tls-client-ca), ca.key (keep it offline; mode 0600), \
revoked (the coordinator's --tls-revoked), issued/NAME.pem and issued/NAME.key (copy them to \
the machine that uses them). Exit status: 0 done; 2 bad usage (an existing file is never \
overwritten); 1 other errors."
)]
pub struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the release CA in DIR.
    Init {
        /// The CA's directory (created).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The CA's name, e.g. "Tails release CA".
        #[arg(long, default_value = "iukfarm release CA")]
        name: String,
        /// Validity in days (1 to 36500).
        #[arg(long, default_value_t = 3650, value_parser = days)]
        days: u32,
    },
    /// Issue a certificate: the coordinator's, or a client's with its role.
    Issue {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// What the holder may do.
        #[arg(long)]
        role: IssueRole,
        /// The holder's name: a worker's name in status and manifests; for the
        /// coordinator, its host name (also the default --host).
        name: String,
        /// Host name or IP address the coordinator is reached at. Repeatable.
        #[arg(long, value_name = "HOST")]
        host: Vec<String>,
        /// Validity in days (1 to 36500).
        #[arg(long, default_value_t = 365, value_parser = days)]
        days: u32,
    },
    /// Revoke the certificate issued to NAME (the coordinator re-reads the list).
    Revoke {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        name: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum IssueRole {
    /// The coordinator's TLS server certificate.
    Coordinator,
    /// A worker: lease, heartbeat, upload and fail its own leases.
    Worker,
    /// The release manager: status, watch, workers, fetch, cancel.
    Rm,
    /// A dashboard: status, watch and workers.
    Reader,
}

/// Writes a new file (never over an existing one) with `mode`.
fn create(path: &Path, mode: u32, data: &[u8]) -> Result<()> {
    let mut f = match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            usage!("{} exists; it is never overwritten", path.display())
        }
        Err(e) => return Err(e).with_context(|| path.display().to_string()),
    };
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .with_context(|| path.display().to_string())
}

fn validity(p: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(days.into());
}

fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("the OS random number generator");
    b[0] &= 0x7f;
    SerialNumber::from_slice(&b)
}

fn check_holder(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if !ok {
        usage!("invalid name {name:?}: use letters, digits and . - _");
    }
    Ok(())
}

/// A validity in days: at least one, at most a hundred years (rcgen's
/// dates end in 9999, and no release CA needs more).
fn days(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(d) if (1..=36_500).contains(&d) => Ok(d),
        _ => Err(format!("{s:?}: use a number of days from 1 to 36500")),
    }
}

pub fn run(a: Args) -> Result<ExitCode> {
    match a.cmd {
        Cmd::Init { dir, name, days } => {
            if dir.join("ca.pem").exists() {
                usage!("{} already holds a CA", dir.display());
            }
            if dir.exists() && !dir.is_dir() {
                usage!("{}: not a directory", dir.display());
            }
            // Everything is made before anything is written.
            let key = KeyPair::generate()?;
            let mut p = CertificateParams::default();
            p.distinguished_name.push(DnType::CommonName, name);
            p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            p.serial_number = Some(random_serial());
            validity(&mut p, days);
            let cert = p.self_signed(&key)?;
            fs::create_dir_all(dir.join("issued"))
                .with_context(|| format!("creating {}", dir.display()))?;
            create(&dir.join("ca.key"), 0o600, key.serialize_pem().as_bytes())?;
            create(&dir.join("ca.pem"), 0o644, cert.pem().as_bytes())?;
            create(
                &dir.join("revoked"),
                0o644,
                b"# serials of revoked certificates (iukfarm ca revoke)\n",
            )?;
            println!("{}: release CA created", dir.display());
        }
        Cmd::Issue {
            dir,
            role,
            name,
            host,
            days,
        } => {
            check_holder(&name)?;
            let ca_pem = fs::read_to_string(dir.join("ca.pem"))
                .with_context(|| format!("{}: no CA (run `iukfarm ca init`)", dir.display()))
                .bad_input()?;
            let ca_key = KeyPair::from_pem(
                &fs::read_to_string(dir.join("ca.key"))
                    .context("reading ca.key")
                    .bad_input()?,
            )
            .context("ca.key")
            .bad_input()?;
            let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)
                .context("ca.pem")
                .bad_input()?;
            let key = KeyPair::generate()?;
            let mut p = CertificateParams::default();
            p.distinguished_name.push(DnType::CommonName, name.clone());
            p.serial_number = Some(random_serial());
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            p.use_authority_key_identifier_extension = true;
            validity(&mut p, days);
            let unit = match role {
                IssueRole::Coordinator => "iukfarm-coordinator",
                IssueRole::Worker => Role::Worker.unit(),
                IssueRole::Rm => Role::Rm.unit(),
                IssueRole::Reader => Role::Reader.unit(),
            };
            p.distinguished_name
                .push(DnType::OrganizationalUnitName, unit);
            if let IssueRole::Coordinator = role {
                let hosts = if host.is_empty() {
                    vec![name.clone()]
                } else {
                    host
                };
                for h in hosts {
                    p.subject_alt_names.push(match h.parse() {
                        Ok(ip) => SanType::IpAddress(ip),
                        Err(_) => SanType::DnsName(
                            h.clone()
                                .try_into()
                                .map_err(|_| anyhow::anyhow!("invalid host name {h:?}"))?,
                        ),
                    });
                }
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            } else {
                if !host.is_empty() {
                    usage!("--host is for the coordinator's certificate");
                }
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }
            let cert = p.signed_by(&key, &issuer)?;
            let issued = dir.join("issued");
            fs::create_dir_all(&issued)?;
            create(
                &issued.join(format!("{name}.key")),
                0o600,
                key.serialize_pem().as_bytes(),
            )?;
            create(
                &issued.join(format!("{name}.pem")),
                0o644,
                cert.pem().as_bytes(),
            )?;
            println!(
                "{}: {unit} certificate for {name}",
                issued.join(format!("{name}.pem")).display()
            );
        }
        Cmd::Revoke { dir, name } => {
            check_holder(&name)?;
            let pem_path = dir.join("issued").join(format!("{name}.pem"));
            let pem = fs::read(&pem_path)
                .with_context(|| format!("{}: no certificate issued to {name}", pem_path.display()))
                .bad_input()?;
            let serial = serial_of(&pem).with_context(|| pem_path.display().to_string())?;
            let list = dir.join("revoked");
            let mut f = fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(&list)
                .with_context(|| list.display().to_string())?;
            writeln!(f, "{serial}  # {name}")
                .and_then(|_| f.sync_all())
                .with_context(|| list.display().to_string())?;
            println!("{name} (serial {serial}) revoked in {}", list.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The serial of a PEM certificate, in hex as the coordinator compares it.
fn serial_of(pem: &[u8]) -> Result<String> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem)
        .map_err(|e| anyhow::anyhow!("not a PEM certificate: {e}"))?;
    let cert = p
        .parse_x509()
        .map_err(|e| anyhow::anyhow!("not a certificate: {e}"))?;
    Ok(cert
        .tbs_certificate
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}
