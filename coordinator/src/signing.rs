//! OpenPGP detached, armored signatures of the manifest: made by the RM's
//! `gpg` (so keys on smartcards work) or in process from a key file, and
//! checked in process against a pinned certificate.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use openpgp::Cert;
use openpgp::cert::prelude::*;
use openpgp::parse::Parse;
use openpgp::parse::stream::{
    DetachedVerifierBuilder, MessageLayer, MessageStructure, VerificationHelper,
};
use openpgp::policy::StandardPolicy;
use openpgp::serialize::SerializeInto;
use openpgp::serialize::stream::{Armorer, Message, Signer};
use sequoia_openpgp as openpgp;

use crate::Error;

/// Which key signs the manifest.
#[derive(Clone)]
pub enum SigningKey {
    /// `gpg --local-user KEY` (uses gpg-agent, smartcards, GNUPGHOME).
    Gpg(String),
    /// An unencrypted OpenPGP secret key file (armored or binary).
    KeyFile(PathBuf),
    /// A key held in memory (the demo's throw-away key).
    Cert(Box<Cert>),
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SigningKey::Gpg(k) => write!(f, "gpg key {k}"),
            SigningKey::KeyFile(p) => write!(f, "key file {}", p.display()),
            SigningKey::Cert(c) => write!(f, "key {}", c.fingerprint()),
        }
    }
}

fn pgp(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Signing(format!("{what}: {e}"))
}

impl SigningKey {
    /// Checks up front that the key can sign (and has not expired), and
    /// returns its public certificate (armored), which [`verify`] takes.
    pub fn certificate(&self) -> Result<Vec<u8>, Error> {
        let cert = self.certificate_unchecked()?;
        expiry_warning(&cert, std::time::SystemTime::now())?;
        Ok(cert)
    }

    /// [`SigningKey::certificate`], and a warning to show the RM when the
    /// key, or the (sub)key that signs, expires within
    /// [`EXPIRY_WARNING_DAYS`].
    pub fn certificate_and_warning(&self) -> Result<(Vec<u8>, Option<String>), Error> {
        let cert = self.certificate_unchecked()?;
        let warning = expiry_warning(&cert, std::time::SystemTime::now())?;
        Ok((cert, warning))
    }

    fn certificate_unchecked(&self) -> Result<Vec<u8>, Error> {
        match self {
            SigningKey::Gpg(key) => {
                let out = Command::new("gpg")
                    .args(["--batch", "--armor", "--export", key])
                    .output()
                    .map_err(|e| pgp("running gpg (is gnupg installed?)", e))?;
                if !out.status.success() || out.stdout.is_empty() {
                    return Err(Error::Signing(format!(
                        "gpg has no public key {key:?} (GNUPGHOME={}): {}",
                        std::env::var("GNUPGHOME").unwrap_or_else(|_| "~/.gnupg".into()),
                        String::from_utf8_lossy(&out.stderr).trim()
                    )));
                }
                Ok(out.stdout)
            }
            SigningKey::KeyFile(_) | SigningKey::Cert(_) => {
                let cert = self.load()?;
                signing_keypair(&cert)?;
                cert.armored()
                    .to_vec()
                    .map_err(|e| pgp("serialising the certificate", e))
            }
        }
    }

    fn load(&self) -> Result<Cert, Error> {
        match self {
            SigningKey::KeyFile(p) => {
                let data = std::fs::read(p).map_err(|e| Error::io(p, e))?;
                Cert::from_bytes(&data).map_err(|e| pgp(&p.display().to_string(), e))
            }
            SigningKey::Cert(c) => Ok((**c).clone()),
            SigningKey::Gpg(_) => unreachable!("gpg keys stay in gpg"),
        }
    }

    /// Writes `data`'s detached armored signature to `out`.
    pub fn sign(&self, data_path: &Path, out: &Path) -> Result<(), Error> {
        match self {
            SigningKey::Gpg(key) => {
                let o = Command::new("gpg")
                    .args([
                        "--batch",
                        "--yes",
                        "--armor",
                        "--detach-sign",
                        "--local-user",
                        key,
                    ])
                    .arg("--output")
                    .arg(out)
                    .arg(data_path)
                    .output()
                    .map_err(|e| pgp("running gpg", e))?;
                if !o.status.success() {
                    return Err(Error::Signing(format!(
                        "gpg --detach-sign with key {key:?} failed: {}",
                        String::from_utf8_lossy(&o.stderr).trim()
                    )));
                }
                Ok(())
            }
            _ => {
                let cert = self.load()?;
                let data = std::fs::read(data_path).map_err(|e| Error::io(data_path, e))?;
                let sig = sign_bytes(&cert, &data)?;
                std::fs::write(out, sig).map_err(|e| Error::io(out, e))
            }
        }
    }
}

/// How long before a signing key expires the RM is warned.
pub const EXPIRY_WARNING_DAYS: u64 = 60;

fn day(t: std::time::SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t)
        .format("%Y-%m-%d")
        .to_string()
}

/// Refuses a certificate whose primary key, or every signing (sub)key, has
/// expired or been revoked at `now`; warns when the primary key, or the
/// (sub)key that signs (the newest valid one, as gpg picks), expires
/// within [`EXPIRY_WARNING_DAYS`]. Tails' signing key and all its signing
/// subkeys expire on 2027-01-13: a release signed with it after that date
/// would not verify.
pub fn expiry_warning(cert: &[u8], now: std::time::SystemTime) -> Result<Option<String>, Error> {
    let policy = StandardPolicy::new();
    let mut warnings = Vec::new();
    for cert in parse_certs(cert)? {
        let fpr = cert.fingerprint();
        let vc = cert
            .with_policy(&policy, now)
            .map_err(|e| Error::Signing(format!("key {fpr} is not valid on {}: {e}", day(now))))?;
        let primary_expiry = vc.primary_key().key_expiration_time();
        if vc.alive().is_err() {
            return Err(Error::Signing(format!(
                "key {fpr} expired on {}: extend its expiry (gpg --quick-set-expire) and \
                 export it again",
                primary_expiry.map_or_else(|| "an unknown date".into(), day)
            )));
        }
        let signer = vc
            .keys()
            .supported()
            .alive()
            .revoked(false)
            .for_signing()
            .max_by_key(|k| k.key().creation_time())
            .ok_or_else(|| {
                let expired: Vec<String> = vc
                    .keys()
                    .for_signing()
                    .filter_map(|k| {
                        k.key_expiration_time()
                            .map(|t| format!("{} on {}", k.key().fingerprint(), day(t)))
                    })
                    .collect();
                Error::Signing(format!(
                    "key {fpr} has no valid signing (sub)key on {} (expired: {}): extend the \
                     signing subkey's expiry (gpg --quick-set-expire KEY 1y '*')",
                    day(now),
                    if expired.is_empty() {
                        "none; revoked or unsupported?".into()
                    } else {
                        expired.join(", ")
                    }
                ))
            })?;
        let soon = now + std::time::Duration::from_secs(EXPIRY_WARNING_DAYS * 86_400);
        let mut ends = Vec::new();
        if let Some(t) = primary_expiry.filter(|&t| t <= soon) {
            ends.push((t, format!("key {fpr}")));
        }
        if signer.key().fingerprint() != fpr
            && let Some(t) = signer.key_expiration_time().filter(|&t| t <= soon)
        {
            ends.push((
                t,
                format!("its signing subkey {}", signer.key().fingerprint()),
            ));
        }
        if let Some((t, what)) = ends.into_iter().min_by_key(|(t, _)| *t) {
            let days = t.duration_since(now).map_or(0, |d| d.as_secs() / 86_400);
            warnings.push(format!(
                "{what} expires on {} (in {days} days): signatures made after that will not \
                 verify; extend it (gpg --quick-set-expire) and publish the new certificate",
                day(t)
            ));
        }
    }
    Ok((!warnings.is_empty()).then(|| warnings.join("; ")))
}

fn signing_keypair(cert: &Cert) -> Result<openpgp::crypto::KeyPair, Error> {
    let policy = StandardPolicy::new();
    let key = cert
        .keys()
        .with_policy(&policy, None)
        .supported()
        .alive()
        .revoked(false)
        .for_signing()
        .secret()
        .next()
        .ok_or_else(|| {
            Error::Signing(format!(
                "key {} has no usable secret signing key (a public certificate, expired, or \
                 revoked?)",
                cert.fingerprint()
            ))
        })?;
    key.key().clone().into_keypair().map_err(|_| {
        Error::Signing(format!(
            "the secret key of {} is password-protected: use --gpg-key to sign through gpg",
            cert.fingerprint()
        ))
    })
}

/// A detached, armored signature of `data`.
pub fn sign_bytes(cert: &Cert, data: &[u8]) -> Result<Vec<u8>, Error> {
    let keypair = signing_keypair(cert)?;
    let mut sink = Vec::new();
    {
        let message = Message::new(&mut sink);
        let message = Armorer::new(message)
            .kind(openpgp::armor::Kind::Signature)
            .build()
            .map_err(|e| pgp("armoring", e))?;
        let mut signer = Signer::new(message, keypair)
            .map_err(|e| pgp("signing", e))?
            .detached()
            .build()
            .map_err(|e| pgp("signing", e))?;
        signer.write_all(data).map_err(|e| pgp("signing", e))?;
        signer.finalize().map_err(|e| pgp("signing", e))?;
    }
    Ok(sink)
}

/// A fresh Ed25519 signing key (the demo's throw-away key).
pub fn generate(userid: &str) -> Result<Cert, Error> {
    let (cert, _revocation) = CertBuilder::new()
        .add_userid(userid)
        .add_signing_subkey()
        .generate()
        .map_err(|e| pgp("generating a key", e))?;
    Ok(cert)
}

/// The armored public certificate of `cert`.
pub fn public_armored(cert: &Cert) -> Result<Vec<u8>, Error> {
    cert.armored()
        .to_vec()
        .map_err(|e| pgp("serialising the certificate", e))
}

struct Helper {
    certs: Vec<Cert>,
    signer: Option<String>,
}

impl VerificationHelper for Helper {
    fn get_certs(&mut self, _ids: &[openpgp::KeyHandle]) -> openpgp::Result<Vec<Cert>> {
        Ok(self.certs.clone())
    }

    fn check(&mut self, structure: MessageStructure) -> openpgp::Result<()> {
        for layer in structure {
            if let MessageLayer::SignatureGroup { results } = layer {
                let mut why = Vec::new();
                for r in results {
                    match r {
                        Ok(good) => {
                            self.signer = Some(good.ka.cert().fingerprint().to_hex());
                            return Ok(());
                        }
                        Err(e) => why.push(e.to_string()),
                    }
                }
                return Err(openpgp::Error::BadSignature(why.join("; ")).into());
            }
        }
        Err(openpgp::Error::BadSignature("no signature found".into()).into())
    }
}

/// Checks a detached signature of `data` against the certificates in
/// `certs` (armored or binary, one or several); returns the signer's
/// fingerprint.
pub fn verify(certs: &[u8], data: &[u8], signature: &[u8]) -> Result<String, Error> {
    verify_reader(certs, data, signature)
}

/// The certificates of an armored or binary keyring (at least one).
pub fn parse_certs(data: &[u8]) -> Result<Vec<Cert>, Error> {
    let certs: Vec<Cert> = CertParser::from_bytes(data)
        .map_err(|e| pgp("reading the certificate", e))?
        .collect::<openpgp::Result<_>>()
        .map_err(|e| pgp("reading the certificate", e))?;
    if certs.is_empty() {
        return Err(Error::Signing(
            "the certificate file holds no certificate".into(),
        ));
    }
    Ok(certs)
}

/// [`verify`] over a stream (an ISO), read once to its end.
pub fn verify_reader<R: std::io::Read + Send + Sync>(
    certs: &[u8],
    data: R,
    signature: &[u8],
) -> Result<String, Error> {
    let certs = parse_certs(certs)?;
    let policy = StandardPolicy::new();
    let helper = Helper {
        certs,
        signer: None,
    };
    let mut v = DetachedVerifierBuilder::from_bytes(signature)
        .map_err(|e| pgp("reading the signature", e))?
        .with_policy(&policy, None, helper)
        .map_err(|e| pgp("bad signature", e))?;
    v.verify_reader(data).map_err(|e| pgp("bad signature", e))?;
    Ok(v.into_helper().signer.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key made `age` ago, its primary valid for `primary` and a signing
    /// subkey for `subkey` (None: no expiry).
    fn aged_key(
        age_days: u64,
        primary: Option<u64>,
        subkey: Option<u64>,
    ) -> (Vec<u8>, std::time::SystemTime) {
        use openpgp::types::KeyFlags;
        let day = std::time::Duration::from_secs(86_400);
        let now = std::time::SystemTime::now();
        let (cert, _) = CertBuilder::new()
            .add_userid("aged <a@example.invalid>")
            .set_creation_time(now - day * age_days as u32)
            .set_validity_period(primary.map(|d| day * d as u32))
            .add_subkey(
                KeyFlags::empty().set_signing(),
                subkey.map(|d| day * d as u32),
                None,
            )
            .generate()
            .unwrap();
        (public_armored(&cert).unwrap(), now)
    }

    #[test]
    fn expired_keys_are_refused_and_keys_about_to_expire_named() {
        // Valid for years: nothing to say.
        let (c, now) = aged_key(10, None, Some(3650));
        assert_eq!(expiry_warning(&c, now).unwrap(), None);
        // The primary key expired (as Tails' will on 2027-01-13).
        let (c, now) = aged_key(400, Some(365), None);
        let e = expiry_warning(&c, now).unwrap_err().to_string();
        assert!(
            e.contains("expired on") && e.contains("quick-set-expire"),
            "{e}"
        );
        // The primary is fine, its only signing subkey expired.
        let (c, now) = aged_key(100, None, Some(30));
        let e = expiry_warning(&c, now).unwrap_err().to_string();
        assert!(e.contains("no valid signing (sub)key"), "{e}");
        // The signing subkey expires in 20 days: warned, with the date.
        let (c, now) = aged_key(10, None, Some(30));
        let w = expiry_warning(&c, now).unwrap().expect("a warning");
        let when = day(now + std::time::Duration::from_secs(20 * 86_400));
        assert!(
            w.contains("signing subkey")
                && w.contains(&when)
                && (w.contains("in 19 days") || w.contains("in 20 days")),
            "{w}"
        );
        // The primary expires in 50 days, the subkey never: warned.
        let (c, now) = aged_key(10, Some(60), None);
        let w = expiry_warning(&c, now).unwrap().expect("a warning");
        assert!(w.starts_with("key "), "{w}");
        // 61 days left: not yet.
        let (c, now) = aged_key(0, Some(62), None);
        assert_eq!(expiry_warning(&c, now).unwrap(), None);
    }

    #[test]
    fn sign_and_verify_round_trip() {
        let cert = generate("test <t@example.invalid>").unwrap();
        let public = public_armored(&cert).unwrap();
        let sig = sign_bytes(&cert, b"manifest").unwrap();
        assert!(sig.starts_with(b"-----BEGIN PGP SIGNATURE-----"));
        let who = verify(&public, b"manifest", &sig).unwrap();
        assert_eq!(who, cert.fingerprint().to_hex());
        let e = verify(&public, b"manifesT", &sig).unwrap_err();
        assert!(e.to_string().contains("bad signature"), "{e}");
        let other = public_armored(&generate("other").unwrap()).unwrap();
        assert!(verify(&other, b"manifest", &sig).is_err());
        // A public certificate cannot sign.
        let pubonly = SigningKey::Cert(Box::new(Cert::from_bytes(&public).unwrap()));
        assert!(
            pubonly
                .certificate()
                .unwrap_err()
                .to_string()
                .contains("no usable secret")
        );
    }
}
