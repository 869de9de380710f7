pub mod build;
pub mod ca;
pub mod client;
pub mod demo;
pub mod farm;
pub mod iso;
pub mod publish;
pub mod release_file;
pub mod sqfs;
pub mod udf;
pub mod verify;
pub mod verify_iuk;

use anyhow::{Context, Result};

/// A mistake in the command line or its inputs, which the user must fix:
/// exit status 2 wherever it is found.
#[derive(Debug)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// `Err(Usage(..))` with `format!` arguments.
macro_rules! usage {
    ($($arg:tt)*) => {
        return Err(anyhow::Error::new($crate::cmd::Usage(format!($($arg)*))))
    };
}
pub(crate) use usage;

/// Turns an error about what the user gave (a file that is missing,
/// unreadable or not what the command needs) into a [`Usage`] error: exit
/// status 2, with the whole message kept.
pub trait BadInput<T> {
    fn bad_input(self) -> Result<T>;
}

impl<T, E: Into<anyhow::Error>> BadInput<T> for std::result::Result<T, E> {
    fn bad_input(self) -> Result<T> {
        self.map_err(|e| {
            let e: anyhow::Error = e.into();
            anyhow::Error::new(Usage(format!("{e:#}")))
        })
    }
}

/// A file named on the command line must exist and be readable: checked
/// before any work, so that a typo is exit 2 and leaves nothing behind.
pub fn input_file(path: &std::path::Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.metadata())
        .and_then(|m| {
            if m.is_dir() {
                Err(std::io::Error::other("a directory, not a file"))
            } else {
                Ok(())
            }
        })
        .with_context(|| format!("{}", path.display()))
        .bad_input()
}

/// For the commands whose input is an image to read: an image that is not
/// what it should be (damaged, unsupported, a path not in it) is bad input,
/// exit 2, wherever the reading finds it; I/O errors stay failures.
pub fn image_error(e: anyhow::Error) -> anyhow::Error {
    use iukfarm_engine::Error as E;
    let bad = e.chain().any(|c| {
        matches!(
            c.downcast_ref::<E>(),
            Some(E::Corrupt(_) | E::Unsupported(_) | E::Invalid(_) | E::NotFound(_))
        )
    });
    if bad && !e.chain().any(|c| c.is::<Usage>()) {
        anyhow::Error::new(Usage(format!("{e:#}")))
    } else {
        e
    }
}

/// A directory named on the command line must exist.
pub fn input_dir(path: &std::path::Path) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => usage!("{}: not a directory", path.display()),
        Err(e) => usage!("{}: {e}", path.display()),
    }
}

/// More compression threads than this only costs memory.
pub const MAX_THREADS: usize = 256;

/// A thread count: 0 (automatic) to [`MAX_THREADS`] (for clap).
pub fn parse_threads(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n <= MAX_THREADS => Ok(n),
        _ => Err(format!(
            "{s:?}: use a number of threads from 0 (one per core) to {MAX_THREADS}"
        )),
    }
}

/// SOURCE_DATE_EPOCH from the environment: `None` when unset or empty.
pub fn source_date_epoch() -> Result<Option<u32>> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(e) => usage!("SOURCE_DATE_EPOCH: {e}"),
        Ok(s) if s.is_empty() => Ok(None),
        Ok(s) => match s.parse::<u32>() {
            Ok(n) => Ok(Some(n)),
            Err(_) => {
                usage!("SOURCE_DATE_EPOCH={s:?} is not a number of seconds that fits in 32 bits")
            }
        },
    }
}

/// Runs the networked subcommands on a tokio runtime.
pub fn block_on<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(f)
}

/// A size such as `8G`, `500M`, `4096` or `0` (for clap).
/// An ADDRESS:PORT option's value.
pub fn parse_listen(flag: &str, s: &str) -> Result<std::net::SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("{flag} {s:?}: expected ADDRESS:PORT, e.g. 127.0.0.1:9447"))
}

pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("{s:?}: unknown unit (use K, M, G or T)")),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("{s:?} is not a size such as 8G, 500M or 0"))
}

/// Opens the compressed-block cache, or none for a cap of 0.
pub fn open_block_cache(
    dir: &std::path::Path,
    cap: u64,
) -> Result<Option<std::sync::Arc<iukfarm_engine::blockcache::BlockCache>>> {
    if cap == 0 {
        return Ok(None);
    }
    let cache = iukfarm_engine::blockcache::BlockCache::open(dir, cap)
        .with_context(|| format!("block cache {}", dir.display()))?;
    Ok(Some(std::sync::Arc::new(cache)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn thread_counts_are_bounded() {
        assert_eq!(super::parse_threads("0"), Ok(0));
        assert_eq!(super::parse_threads("256"), Ok(256));
        assert!(super::parse_threads("100000").is_err());
        assert!(super::parse_threads("-1").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(super::parse_bytes("8G"), Ok(8 << 30));
        assert_eq!(super::parse_bytes("500m"), Ok(500 << 20));
        assert_eq!(super::parse_bytes("0"), Ok(0));
        assert!(super::parse_bytes("8X").is_err());
        assert!(super::parse_bytes("G").is_err());
        assert!(super::parse_bytes("99999999999T").is_err());
    }
}
