//! What determines the engine's output bytes besides its inputs: the farm
//! refuses workers whose fingerprint differs from the coordinator's.

use std::ffi::CStr;
use std::fmt;

use crate::kit::FORMAT;

/// The engine build's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    pub engine_version: String,
    pub git_commit: String,
    pub liblzma_version: String,
    pub iuk_format: u32,
    /// The gensquashfs versions whose bytes the writer reproduces.
    pub gensquashfs: Vec<String>,
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "iukfarm-engine {} (git {}, liblzma {}, IUK format {}, gensquashfs {})",
            self.engine_version,
            self.git_commit,
            self.liblzma_version,
            self.iuk_format,
            self.gensquashfs.join("/")
        )
    }
}

/// This build's fingerprint.
pub fn fingerprint() -> Fingerprint {
    // SAFETY: liblzma returns a pointer to a static NUL-terminated string.
    let lzma = unsafe { CStr::from_ptr(liblzma_sys::lzma_version_string()) };
    Fingerprint {
        engine_version: env!("CARGO_PKG_VERSION").to_string(),
        git_commit: env!("IUKFARM_GIT_COMMIT").to_string(),
        liblzma_version: lzma.to_string_lossy().into_owned(),
        iuk_format: std::str::from_utf8(FORMAT)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0),
        gensquashfs: crate::sqfs::Gensquashfs::ALL
            .iter()
            .map(|g| g.to_string())
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn fingerprint_names_the_pinned_liblzma() {
        let f = super::fingerprint();
        assert_eq!(f.liblzma_version, "5.8.4");
        assert_eq!(f.iuk_format, 2);
        assert!(f.to_string().contains("liblzma 5.8.4"));
        assert_eq!(f.gensquashfs, ["1.2.0", "1.3.2"]);
    }
}
