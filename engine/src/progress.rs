//! Progress reporting and cancellation for long engine operations.
//!
//! The engine pushes progress into a caller-provided observer instead of
//! logging or drawing anything itself: the CLI draws a bar, the worker
//! forwards it over the network, tests record it. Callbacks may come from
//! several threads.

/// Observer of a long-running operation.
pub trait Progress: Sync {
    /// A new phase starts; `total` is its amount of work in bytes (0 if unknown).
    fn phase(&self, _name: &str, _total: u64) {}
    /// `bytes` more of the current phase are done.
    fn advance(&self, _bytes: u64) {}
    /// Polled between units of work: returning true stops the operation
    /// with [`crate::Error::Cancelled`].
    fn is_cancelled(&self) -> bool {
        false
    }
}

/// Ignores all progress and never cancels.
pub struct NoProgress;

impl Progress for NoProgress {}
