//! Which gensquashfs's bytes the writer reproduces.
//!
//! Tails pins the writer of its IUKs: squashfs-tools-ng 1.2.0 (Debian
//! bookworm) up to 6.x, 1.3.2-1 (Debian trixie) from 7.0 on. The two write
//! different bytes for the same tree; the rules that differ are listed in
//! ARCHITECTURE.md and applied where the writer decides them.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// A gensquashfs release whose output the writer matches byte for byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Gensquashfs {
    /// squashfs-tools-ng 1.2.0 (Debian bookworm): Tails 6.x and before.
    V1_2_0,
    /// squashfs-tools-ng 1.3.2-1 (Debian trixie): Tails 7.0 and later.
    V1_3_2,
}

impl Gensquashfs {
    pub const ALL: [Gensquashfs; 2] = [Gensquashfs::V1_2_0, Gensquashfs::V1_3_2];

    pub fn as_str(self) -> &'static str {
        match self {
            Gensquashfs::V1_2_0 => "1.2.0",
            Gensquashfs::V1_3_2 => "1.3.2",
        }
    }

    /// The writer Tails pins for a release: 1.3.2 from 7.0 on (its first
    /// pre-releases included), 1.2.0 before. `None` when the version does
    /// not start with a major number.
    pub fn for_release(version: &str) -> Option<Gensquashfs> {
        let digits: &str = &version[..version
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(version.len())];
        let major: u64 = digits.parse().ok()?;
        Some(if major >= 7 {
            Gensquashfs::V1_3_2
        } else {
            Gensquashfs::V1_2_0
        })
    }

    /// libsquashfs 1.3: a directory of this many entries or more gets an
    /// extended inode with a directory index, whatever its size.
    pub(crate) fn dir_index_threshold(self) -> Option<usize> {
        match self {
            Gensquashfs::V1_2_0 => None,
            Gensquashfs::V1_3_2 => Some(256),
        }
    }
}

impl Default for Gensquashfs {
    /// What Tails pins today.
    fn default() -> Self {
        Gensquashfs::V1_3_2
    }
}

impl fmt::Display for Gensquashfs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Gensquashfs {
    type Err = Error;

    fn from_str(s: &str) -> Result<Gensquashfs> {
        match s {
            "1.2.0" => Ok(Gensquashfs::V1_2_0),
            "1.3.2" => Ok(Gensquashfs::V1_3_2),
            _ => Err(Error::Invalid(format!(
                "unknown gensquashfs version '{s}' (expected 1.2.0 or 1.3.2)"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Gensquashfs;

    #[test]
    fn the_release_version_picks_the_writer_tails_pins() {
        for (v, g) in [
            ("6.19", Some(Gensquashfs::V1_2_0)),
            ("5.0", Some(Gensquashfs::V1_2_0)),
            ("7.0~rc1", Some(Gensquashfs::V1_3_2)),
            ("7.0~beta1", Some(Gensquashfs::V1_3_2)),
            ("7.6.1", Some(Gensquashfs::V1_3_2)),
            ("10.2", Some(Gensquashfs::V1_3_2)),
            ("7", Some(Gensquashfs::V1_3_2)),
            ("demo", None),
            ("", None),
            ("99999999999999999999999.1", None),
        ] {
            assert_eq!(Gensquashfs::for_release(v), g, "{v}");
        }
        assert_eq!("1.3.2".parse::<Gensquashfs>().unwrap(), Gensquashfs::V1_3_2);
        assert!("1.3.1".parse::<Gensquashfs>().is_err());
    }
}
