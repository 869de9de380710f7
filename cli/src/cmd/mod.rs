pub mod build;
pub mod client;
pub mod demo;
pub mod farm;
pub mod iso;
pub mod sqfs;
pub mod verify;
pub mod verify_iuk;

use anyhow::{Context, Result, bail};

/// SOURCE_DATE_EPOCH from the environment: `None` when unset or empty.
pub fn source_date_epoch() -> Result<Option<u32>> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(e) => bail!("SOURCE_DATE_EPOCH: {e}"),
        Ok(s) if s.is_empty() => Ok(None),
        Ok(s) => s.parse::<u32>().map(Some).with_context(|| {
            format!("SOURCE_DATE_EPOCH={s:?} is not a number of seconds that fits in 32 bits")
        }),
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
