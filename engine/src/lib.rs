//! The IUK engine: everything needed to build and check Incremental Upgrade
//! Kits, as a plain synchronous library (no networking, no async).
//!
//! * [`tree`]: the directory tree model and reading a tree from disk;
//! * [`blockcache`]: compressed blocks shared by the images of a release;
//! * [`sqfs`]: SquashFS reading in place and gensquashfs-exact writing;
//! * [`iso`]: ISO 9660 reading in place;
//! * [`compare`]: entry-by-entry comparison of trees (verification);
//! * [`diff`]: the overlay diff of two system trees, as Tails computes it;
//! * [`kit`]: assembling the IUK itself;
//! * [`progress`]: the observer through which long operations report;
//! * [`fingerprint`]: what besides the inputs determines the output bytes.

pub mod blockcache;
pub mod compare;
pub mod diff;
pub mod error;
pub mod fingerprint;
pub mod io;
pub mod iso;
pub mod iso_writer;
pub mod kit;
pub mod progress;
pub mod sqfs;
pub mod tree;

pub use error::{Error, Result};
pub use progress::{NoProgress, Progress};
