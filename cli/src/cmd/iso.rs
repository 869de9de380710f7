//! `iukfarm iso`: read ISO 9660 images in place.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use iukfarm_engine::io::ReadAt;
use iukfarm_engine::iso::{Iso, IsoEntry, cdio_translate};

use super::{BadInput, usage};

#[derive(Parser)]
pub struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List a directory (Rock Ridge names, else Joliet, else ISO names).
    Ls {
        iso: PathBuf,
        /// Directory inside the ISO.
        #[arg(default_value = "/")]
        path: String,
        /// Recurse into subdirectories.
        #[arg(short = 'R', long)]
        recursive: bool,
        /// Print names as libcdio's name_translate does (what Tails'
        /// delete_files compares).
        #[arg(long)]
        cdio: bool,
    },
    /// Print a file's byte extents: "OFFSET LENGTH" per line. A SquashFS
    /// image at such an offset can be read with `iukfarm sqfs ls -o OFFSET`.
    Extent { iso: PathBuf, path: String },
    /// Write a file's contents to standard output.
    Cat { iso: PathBuf, path: String },
}

fn open(path: &Path) -> Result<Iso> {
    let f = File::open(path)
        .with_context(|| format!("opening {}", path.display()))
        .bad_input()?;
    Iso::open(Arc::new(f)).with_context(|| format!("reading {} as an ISO", path.display()))
}

fn find(iso: &Iso, file: &Path, path: &str) -> Result<IsoEntry> {
    match iso.lookup(path.as_bytes())? {
        Some(e) => Ok(e),
        None => usage!("{path} not found in {}", file.display()),
    }
}

pub fn run(args: Args) -> Result<ExitCode> {
    read(args).map_err(super::image_error)
}

fn read(args: Args) -> Result<ExitCode> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    match args.command {
        Cmd::Ls {
            iso: file,
            path,
            recursive,
            cdio,
        } => {
            let iso = open(&file)?;
            let mut print = |p: &[u8], e: &IsoEntry| -> Result<()> {
                let name = if cdio { cdio_translate(p) } else { p.to_vec() };
                let kind = if e.is_dir {
                    'd'
                } else if e.symlink.is_some() {
                    'l'
                } else {
                    '-'
                };
                write!(out, "{kind} {:>12} ", e.size)?;
                out.write_all(&name)?;
                if let Some(t) = &e.symlink {
                    out.write_all(b" -> ")?;
                    out.write_all(t)?;
                }
                out.write_all(b"\n")?;
                Ok(())
            };
            if recursive {
                iso.walk(path.as_bytes(), &mut |p, e| {
                    print(p, e).map_err(|e| {
                        iukfarm_engine::Error::RawIo(std::io::Error::other(e.to_string()))
                    })
                })?;
            } else {
                for e in iso.list(path.as_bytes())? {
                    print(&e.name, &e)?;
                }
            }
        }
        Cmd::Extent { iso: file, path } => {
            let iso = open(&file)?;
            let e = find(&iso, &file, &path)?;
            if e.is_dir {
                usage!("{path} is a directory");
            }
            for (off, len) in &e.extents {
                writeln!(out, "{off} {len}")?;
            }
        }
        Cmd::Cat { iso: file, path } => {
            let iso = open(&file)?;
            let e = find(&iso, &file, &path)?;
            if e.is_dir {
                usage!("{path} is a directory");
            }
            let r = iso.file_reader(&e)?;
            let mut pos = 0u64;
            let mut buf = vec![0u8; 1 << 20];
            let size = r.size()?;
            while pos < size {
                let n = (size - pos).min(buf.len() as u64) as usize;
                r.read_exact_at(&mut buf[..n], pos)?;
                out.write_all(&buf[..n])?;
                pos += n as u64;
            }
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
