//! Who may call what. With a release CA (`--tls-client-ca`), every caller
//! presents a certificate; its role and name come from the certificate and
//! nothing the caller says. Without one (loopback only), the token is the
//! only check and every caller may do everything.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::SystemTime;

use iukfarm_proto::{Peer, Role};
use tonic::{Request, Status};

/// Serials of revoked certificates (`iukfarm ca revoke`), re-read whenever
/// the file changes, so revoking needs no restart.
pub struct Revoked {
    path: PathBuf,
    cache: Mutex<(Option<SystemTime>, BTreeSet<String>)>,
}

impl Revoked {
    pub fn new(path: PathBuf) -> Result<Revoked, crate::Error> {
        let r = Revoked {
            path,
            cache: Mutex::new((None, BTreeSet::new())),
        };
        // Read once now: a missing or unreadable list fails the start.
        r.contains("")?;
        Ok(r)
    }

    fn contains(&self, serial: &str) -> Result<bool, crate::Error> {
        let mtime = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .map_err(|e| crate::Error::io(&self.path, e))?;
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if c.0 != Some(mtime) {
            let text =
                std::fs::read_to_string(&self.path).map_err(|e| crate::Error::io(&self.path, e))?;
            c.1 = text
                .lines()
                .map(|l| {
                    l.split('#')
                        .next()
                        .unwrap_or("")
                        .trim()
                        .to_ascii_lowercase()
                })
                .filter(|l| !l.is_empty())
                .collect();
            c.0 = Some(mtime);
        }
        Ok(c.1.contains(serial))
    }
}

pub struct Auth {
    /// Client certificates are required (and verified by TLS).
    pub mtls: bool,
    pub revoked: Option<Revoked>,
}

impl Auth {
    /// Whether a caller let in earlier has been revoked since: checked
    /// again during long calls (uploads, watches) and before their result
    /// is used. An unreadable list revokes everyone (fail closed).
    pub fn revoked_since(&self, caller: &Option<Peer>) -> bool {
        match (caller, &self.revoked) {
            (Some(p), Some(r)) => r.contains(&p.serial).unwrap_or(true),
            _ => false,
        }
    }

    /// [`Auth::revoked_since`] for a certificate serial.
    pub fn serial_revoked(&self, serial: &str) -> bool {
        (self.revoked.as_ref()).is_some_and(|r| r.contains(serial).unwrap_or(true))
    }

    /// The caller, if it may do `what` in one of the `allowed` roles
    /// (`None`: no client certificates on this coordinator).
    pub fn check<T>(
        &self,
        req: &Request<T>,
        allowed: &[Role],
        what: &str,
    ) -> Result<Option<Peer>, Status> {
        if !self.mtls {
            return Ok(None);
        }
        let certs = req.peer_certs().unwrap_or_default();
        let Some(cert) = certs.first() else {
            return Err(Status::unauthenticated(
                "this coordinator requires a client certificate of the release CA: \
                 pass --tls-cert and --tls-key (made by `iukfarm ca issue`)",
            ));
        };
        let peer = iukfarm_proto::peer_of(cert).map_err(Status::permission_denied)?;
        if let Some(r) = &self.revoked {
            match r.contains(&peer.serial) {
                Ok(false) => {}
                Ok(true) => {
                    return Err(Status::permission_denied(format!(
                        "the certificate of {} (serial {}) is revoked",
                        peer.name, peer.serial
                    )));
                }
                // Fail closed: an unreadable list revokes everyone.
                Err(e) => return Err(Status::unavailable(format!("revocation list: {e}"))),
            }
        }
        if !allowed.contains(&peer.role) {
            return Err(Status::permission_denied(format!(
                "{} holds a {} certificate, which may not {what}",
                peer.name,
                peer.role.name()
            )));
        }
        Ok(Some(peer))
    }
}
