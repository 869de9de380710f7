//! The worker's errors: the daemon's own ([`Error`]) and a job's
//! ([`JobError`]), which decides what the coordinator is told.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The coordinator will not take this worker (token, engine, protocol).
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Config(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn io(path: &std::path::Path, source: std::io::Error) -> Error {
        Error::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

#[derive(Debug)]
pub enum JobError {
    /// Running it again will fail the same way (bad ISO, bad option).
    Bad(String),
    /// Worth another attempt (I/O, network).
    Transient(String),
    /// The lease is gone or the worker is stopping.
    Cancelled,
    /// The coordinator refused the upload and already knows why.
    Reported,
}

impl From<iukfarm_engine::Error> for JobError {
    fn from(e: iukfarm_engine::Error) -> Self {
        use iukfarm_engine::Error as E;
        match e {
            E::Cancelled => JobError::Cancelled,
            E::Invalid(_) | E::Corrupt(_) | E::Unsupported(_) | E::NotFound(_) => {
                JobError::Bad(e.to_string())
            }
            other => JobError::Transient(other.to_string()),
        }
    }
}
