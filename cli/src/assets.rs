//! Man pages and shell completions from the clap definitions, for the
//! Debian package (`scripts/deb.sh`): the same bytes on every run.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use clap_complete::Shell;

#[derive(Parser)]
pub struct Args {
    /// Writes man/*.1.gz and completions/{iukfarm.bash,_iukfarm,iukfarm.fish} here.
    dir: PathBuf,
}

pub fn run(a: Args, mut cmd: clap::Command) -> Result<ExitCode> {
    cmd.build();
    let man = a.dir.join("man");
    std::fs::create_dir_all(&man).with_context(|| format!("creating {}", man.display()))?;
    let mut pages = 0;
    man_pages(&cmd, "iukfarm", &man, &mut pages)?;
    let comp = a.dir.join("completions");
    std::fs::create_dir_all(&comp).with_context(|| format!("creating {}", comp.display()))?;
    for (shell, name) in [
        (Shell::Bash, "iukfarm.bash"),
        (Shell::Zsh, "_iukfarm"),
        (Shell::Fish, "iukfarm.fish"),
    ] {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut cmd.clone(), "iukfarm", &mut out);
        write(&comp.join(name), &out)?;
    }
    println!(
        "{pages} man pages in {}, completions in {}",
        man.display(),
        comp.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `iukfarm.1`, `iukfarm-worker.1`, `iukfarm-udf-generate.1`, ...: one
/// page per visible command, gzipped without a timestamp or file name.
fn man_pages(cmd: &clap::Command, name: &str, dir: &Path, pages: &mut usize) -> Result<()> {
    let page = cmd
        .clone()
        .name(name.to_string())
        .version(env!("CARGO_PKG_VERSION"));
    let mut roff = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut roff)
        .context("rendering a man page")?;
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::best());
    gz.write_all(&roff)?;
    write(&dir.join(format!("{name}.1.gz")), &gz.finish()?)?;
    *pages += 1;
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        man_pages(sub, &format!("{name}-{}", sub.get_name()), dir, pages)?;
    }
    Ok(())
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}
