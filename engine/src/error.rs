//! The engine's error type.

use std::io;
use std::path::PathBuf;

/// Everything the engine can fail with. Input images are untrusted, so every
/// malformed structure maps to [`Error::Corrupt`] with a short description of
/// what was wrong and where, never to a panic.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("I/O error: {0}")]
    RawIo(#[from] io::Error),
    #[error("corrupt image: {0}")]
    Corrupt(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("compressor error: {0}")]
    Compressor(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("cancelled")]
    Cancelled,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn corrupt(msg: impl Into<String>) -> Self {
        Error::Corrupt(msg.into())
    }
}

/// Shorthand for `Err(Error::Corrupt(..))` with `format!` arguments.
macro_rules! corrupt {
    ($($arg:tt)*) => {
        return Err($crate::error::Error::Corrupt(format!($($arg)*)))
    };
}
pub(crate) use corrupt;
