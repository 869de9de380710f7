//! iukfarm's gRPC contract (`proto/iukfarm/v1/farm.proto`) and the
//! connection set-up every client of the coordinator shares: address,
//! TLS with a pinned CA, and the bearer token.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

/// The generated messages and services.
pub mod v1 {
    tonic::include_proto!("iukfarm.v1");
}

mod blocks;

/// Bumped on any incompatible change of the contract; workers send theirs.
pub const PROTOCOL_VERSION: u32 = 1;

/// Size of the data chunks of ISO and kit transfers.
pub const CHUNK_SIZE: usize = 1 << 20;

/// At most this many blocks in one offer or one helper's batch: with
/// blocks of at most 1 MiB, a message stays within the 16 MiB that both
/// ends decode.
pub const MAX_BLOCKS_PER_CALL: usize = 8;

/// The coordinator's default port.
pub const DEFAULT_PORT: u16 = 7447;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The reason is in the message, not a source, so that it is not
    /// printed twice.
    #[error("{path}: {err}")]
    Io { path: String, err: std::io::Error },
    #[error("{0}")]
    Config(String),
    #[error("cannot reach the coordinator at {url}: {detail}{hint}")]
    Unreachable {
        url: String,
        detail: String,
        hint: &'static str,
    },
}

/// What a certificate of the release CA lets its holder do, written in
/// its subject's organisational unit. The coordinator believes nothing else
/// about who calls it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Lease, heartbeat, upload and fail its own leases.
    Worker,
    /// The release manager: status, watch, workers, fetch, cancel.
    Rm,
    /// Dashboards: status, watch and workers only.
    Reader,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Worker, Role::Rm, Role::Reader];

    /// The subject OU that carries the role.
    pub fn unit(self) -> &'static str {
        match self {
            Role::Worker => "iukfarm-worker",
            Role::Rm => "iukfarm-rm",
            Role::Reader => "iukfarm-reader",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::Worker => "worker",
            Role::Rm => "rm",
            Role::Reader => "reader",
        }
    }
}

/// The holder of a client certificate, as the certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub role: Role,
    /// The subject's common name: a worker's name in status and manifests.
    pub name: String,
    /// Lower-case hex, as `iukfarm ca revoke` lists it.
    pub serial: String,
    /// When the certificate expires (Unix seconds).
    pub not_after: i64,
    /// SHA-256 of the certificate (DER), lower-case hex: who the holder
    /// is. Names can be issued twice; a certificate is one.
    pub fingerprint: String,
}

/// Reads role, name and serial from a DER certificate (already verified
/// against the release CA by TLS).
pub fn peer_of(der: &[u8]) -> Result<Peer, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("unreadable client certificate: {e}"))?;
    let subject = cert.subject();
    let one = |it: &mut dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue>| {
        let v: Vec<String> = it
            .filter_map(|a| a.as_str().ok().map(str::to_string))
            .collect();
        match v.as_slice() {
            [x] => Some(x.clone()),
            _ => None,
        }
    };
    let name = one(&mut subject.iter_common_name())
        .filter(|n| !n.is_empty() && n.len() <= 64 && !n.chars().any(char::is_control))
        .ok_or("the client certificate has no single, printable common name")?;
    let unit = one(&mut subject.iter_organizational_unit())
        .ok_or("the client certificate has no single organisational unit (its role)")?;
    let role = Role::ALL
        .into_iter()
        .find(|r| r.unit() == unit)
        .ok_or_else(|| format!("the client certificate's role {unit:?} is not an iukfarm role"))?;
    let serial = cert
        .tbs_certificate
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let not_after = cert.validity().not_after.timestamp();
    use sha2::Digest;
    let fingerprint = (sha2::Sha256::digest(der).iter())
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(Peer {
        role,
        name,
        serial,
        not_after,
        fingerprint,
    })
}

/// When the first certificate of a PEM file expires (Unix seconds).
pub fn pem_not_after(pem: &[u8]) -> Result<i64, String> {
    let (_, p) =
        x509_parser::pem::parse_x509_pem(pem).map_err(|e| format!("not a PEM certificate: {e}"))?;
    let cert = p
        .parse_x509()
        .map_err(|e| format!("unreadable certificate: {e}"))?;
    Ok(cert.validity().not_after.timestamp())
}

/// Reads a token file: one line, surrounding whitespace ignored.
pub fn read_token(path: &Path) -> Result<String, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
        path: path.display().to_string(),
        err: e,
    })?;
    let token = text.trim().to_string();
    if token.len() < 16 || token.contains(char::is_whitespace) || !token.is_ascii() {
        return Err(Error::Config(format!(
            "{}: a token must be one line of at least 16 printable ASCII characters \
             (e.g. `openssl rand -hex 32 > {}`)",
            path.display(),
            path.display()
        )));
    }
    Ok(token)
}

/// Client side: adds the bearer token to every call.
#[derive(Clone)]
pub struct AddToken(Option<MetadataValue<tonic::metadata::Ascii>>);

impl Interceptor for AddToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// Server side: refuses calls whose bearer token differs (compared in
/// constant time) or is missing.
#[derive(Clone)]
pub struct CheckToken(Option<Arc<[u8]>>);

impl CheckToken {
    pub fn new(token: Option<&str>) -> Self {
        CheckToken(token.map(|t| Arc::from(format!("Bearer {t}").into_bytes())))
    }
}

impl Interceptor for CheckToken {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        use subtle::ConstantTimeEq;
        let Some(expected) = &self.0 else {
            return Ok(req);
        };
        match req.metadata().get("authorization") {
            Some(v) if bool::from(v.as_bytes().ct_eq(expected)) => Ok(req),
            Some(_) => Err(Status::unauthenticated(
                "wrong token: use the coordinator's token file (--token-file)",
            )),
            None => Err(Status::unauthenticated(
                "this coordinator requires a token: pass --token-file",
            )),
        }
    }
}

pub type FarmClient = v1::farm_client::FarmClient<InterceptedService<Channel, AddToken>>;

/// How to reach the coordinator.
#[derive(Clone, Debug, Default)]
pub struct ClientConfig {
    /// `http://host:port` or `https://host:port`.
    pub url: String,
    /// PEM of the CA that signed the coordinator's certificate (https only).
    pub tls_ca: Option<Vec<u8>>,
    /// This client's certificate and key (PEM), from the release CA.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    pub token: Option<String>,
}

impl ClientConfig {
    /// Builds the config from command-line values, reading the files.
    pub fn from_files(
        url: &str,
        tls_ca: Option<&Path>,
        identity: Option<(&Path, &Path)>,
        token_file: Option<&Path>,
    ) -> Result<Self, Error> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|e| Error::Io {
                path: p.display().to_string(),
                err: e,
            })
        };
        let tls_ca = tls_ca.map(read).transpose()?;
        let identity = identity
            .map(|(c, k)| Ok::<_, Error>((read(c)?, read(k)?)))
            .transpose()?;
        if identity.is_some() && tls_ca.is_none() {
            return Err(Error::Config(
                "--tls-cert/--tls-key need --tls-ca (the release CA) and an https:// address"
                    .into(),
            ));
        }
        let token = token_file.map(read_token).transpose()?;
        Ok(ClientConfig {
            url: url.to_string(),
            tls_ca,
            identity,
            token,
        })
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// The coordinator's address checked against the TLS settings, without
/// connecting: what a daemon checks once at start (a mistake there is not
/// worth retrying).
pub fn check_address(cfg: &ClientConfig) -> Result<Endpoint, Error> {
    let url = cfg.url.trim_end_matches('/').to_string();
    let https = url.starts_with("https://");
    if !https && !url.starts_with("http://") {
        return Err(Error::Config(format!(
            "coordinator address {url:?} must start with http:// or https://"
        )));
    }
    if https != cfg.tls_ca.is_some() {
        return Err(Error::Config(if https {
            format!(
                "{url} uses TLS: pass --tls-ca with the CA certificate that signed the coordinator's"
            )
        } else {
            format!("--tls-ca was given but {url} is plain http: use https://")
        }));
    }
    Endpoint::from_shared(url.clone())
        .map_err(|e| Error::Config(format!("bad coordinator address {url:?}: {e}")))
}

/// Connects to the coordinator (eagerly, so a bad address or a TLS mismatch
/// is reported here, with what to do about it).
pub async fn connect(cfg: &ClientConfig) -> Result<FarmClient, Error> {
    let ep = check_address(cfg)?;
    let url = cfg.url.trim_end_matches('/').to_string();
    let https = url.starts_with("https://");
    let mut ep = ep
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20));
    if let Some(ca) = &cfg.tls_ca {
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        if let Some((cert, key)) = &cfg.identity {
            tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        ep = ep
            .tls_config(tls)
            .map_err(|e| Error::Config(format!("TLS set-up: {}", chain(&e))))?;
    }
    let channel = ep.connect().await.map_err(|e| Error::Unreachable {
        url: url.clone(),
        detail: chain(&e),
        hint: if https {
            " (is the coordinator up, and does --tls-ca hold the CA of its certificate?)"
        } else {
            " (is the coordinator up? if it uses TLS, use an https:// address and --tls-ca)"
        },
    })?;
    let token = cfg
        .token
        .as_deref()
        .map(|t| {
            format!("Bearer {t}")
                .parse()
                .map_err(|_| Error::Config("the token has characters a header cannot carry".into()))
        })
        .transpose()?;
    Ok(
        v1::farm_client::FarmClient::with_interceptor(channel, AddToken(token))
            .max_decoding_message_size(16 << 20),
    )
}

/// Explains a failed call in the terms the operator acts on.
pub fn explain(url: &str, s: &Status) -> String {
    use tonic::Code;
    match s.code() {
        Code::Unauthenticated | Code::FailedPrecondition | Code::InvalidArgument => {
            format!("the coordinator at {url} refused: {}", s.message())
        }
        // The coordinator's own answers.
        Code::NotFound
        | Code::DataLoss
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::ResourceExhausted
        | Code::OutOfRange
        | Code::Aborted => format!("the coordinator at {url}: {}", s.message()),
        // The connection failed: plain text against a TLS listener (or the
        // reverse) surfaces as any of these, with messages that vary with
        // timing; say what to check either way.
        _ => {
            let hint = if url.starts_with("https://") {
                " (is it up, and does --tls-ca hold the CA of its certificate?)"
            } else {
                " (is it up? if it uses TLS, use an https:// address and --tls-ca)"
            };
            let what = if s.message().is_empty() {
                "connection lost"
            } else {
                s.message()
            };
            format!("the coordinator at {url} failed the call: {what}{hint}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(check: &mut CheckToken, header: Option<&str>) -> Result<(), Status> {
        let mut r = Request::new(());
        if let Some(h) = header {
            r.metadata_mut().insert("authorization", h.parse().unwrap());
        }
        check.call(r).map(|_| ())
    }

    #[test]
    fn token_is_checked() {
        let mut c = CheckToken::new(Some("0123456789abcdef"));
        assert!(call(&mut c, Some("Bearer 0123456789abcdef")).is_ok());
        let e = call(&mut c, Some("Bearer 0123456789abcdeX")).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(e.message().contains("wrong token"));
        let e = call(&mut c, None).unwrap_err();
        assert!(e.message().contains("requires a token"));
        let mut open = CheckToken::new(None);
        assert!(call(&mut open, None).is_ok());
    }

    #[test]
    fn transport_failures_say_what_to_check() {
        for s in [
            Status::cancelled("operation was canceled"),
            Status::unknown("transport error"),
            Status::unavailable(""),
        ] {
            let m = explain("http://127.0.0.1:1", &s);
            assert!(m.contains("https:// address and --tls-ca"), "{m}");
        }
        let m = explain("http://h:1", &Status::not_found("no such file"));
        assert!(!m.contains("TLS"), "{m}");
    }

    #[test]
    fn short_tokens_are_refused() {
        let d = tempfile_dir();
        let p = d.join("t");
        std::fs::write(&p, "short\n").unwrap();
        assert!(
            read_token(&p)
                .unwrap_err()
                .to_string()
                .contains("at least 16")
        );
        std::fs::write(&p, "  0123456789abcdef0123\n").unwrap();
        assert_eq!(read_token(&p).unwrap(), "0123456789abcdef0123");
        std::fs::remove_dir_all(d).unwrap();
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("iukfarm-proto-test-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
