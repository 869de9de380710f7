//! The coordinator of one release: turns (new version, source versions)
//! into one job per IUK, leases the jobs to pulling workers, collects and
//! verifies the kits, and writes a signed manifest.
//!
//! * [`config`]: the release's parameters and their checks;
//! * [`inputs`]: checking and hashing the input ISOs;
//! * [`jobs`]: the job table (scheduling, leases, retries), pure;
//! * [`journal`]: what survives a killed coordinator;
//! * [`manifest`], [`signing`]: the release's outputs and their check;
//! * [`junit`]: the CI report;
//! * [`release`]: the running coordinator (gRPC service and main loop).

pub mod audit;
mod auth;
pub mod blocks;
pub mod config;
pub mod inputs;
pub mod jobs;
pub mod journal;
pub mod junit;
mod listener;
pub mod manifest;
mod metrics;
mod offers;
mod release;
mod service;
pub mod signing;
mod state;
mod text;

pub use config::Config;
pub use release::{Outcome, Running, start};

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The release's parameters are wrong (exit status 2).
    #[error("{0}")]
    Config(String),
    /// An input is missing or unusable (exit status 2).
    #[error("{0}")]
    BadInput(String),
    #[error("signing: {0}")]
    Signing(String),
    #[error("{0}")]
    Other(String),
}

impl Error {
    pub fn io(path: &Path, source: std::io::Error) -> Error {
        Error::Io {
            path: path.display().to_string(),
            source,
        }
    }

    /// Whether the RM must fix the command line or the inputs.
    pub fn is_usage(&self) -> bool {
        matches!(self, Error::Config(_) | Error::BadInput(_))
    }
}
