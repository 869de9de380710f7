//! Append-only journal of finished kits, so that a coordinator killed and
//! restarted with the same arguments neither loses nor rebuilds them.
//!
//! One JSON object per line, fsynced before the kit counts as done. A line
//! cut short by a crash is ignored; entries are only trusted when the kit
//! in the output directory still has the recorded size and digest.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Error;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    pub job: String,
    pub name: String,
    pub sha256: String,
    pub size: u64,
    pub worker: String,
    pub build_seconds: f64,
    /// A reproduction of `job` (same digest, nothing stored).
    #[serde(default)]
    pub reproduction: bool,
}

pub struct Journal {
    path: PathBuf,
    file: File,
}

impl Journal {
    /// Opens (creating) the journal and returns the entries found in it.
    pub fn open(path: &Path) -> Result<(Journal, Vec<Entry>), Error> {
        let mut entries = Vec::new();
        if path.exists() {
            let f = File::open(path).map_err(|e| Error::io(path, e))?;
            for line in BufReader::new(f).split(b'\n') {
                let line = line.map_err(|e| Error::io(path, e))?;
                if let Ok(e) = serde_json::from_slice::<Entry>(&line) {
                    entries.push(e);
                }
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        // A crash mid-line leaves a fragment: start on a fresh line.
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut j = Journal {
            path: path.to_path_buf(),
            file,
        };
        if len > 0 && !ends_with_newline(path)? {
            j.file.write_all(b"\n").map_err(|e| Error::io(path, e))?;
        }
        Ok((j, entries))
    }

    /// Appends an entry and waits until it is on disk.
    pub fn append(&mut self, e: &Entry) -> Result<(), Error> {
        let mut line = serde_json::to_vec(e).expect("journal entries serialise");
        line.push(b'\n');
        self.file
            .write_all(&line)
            .and_then(|_| self.file.sync_data())
            .map_err(|err| Error::io(&self.path, err))
    }
}

fn ends_with_newline(path: &Path) -> Result<bool, Error> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    f.seek(SeekFrom::End(-1)).map_err(|e| Error::io(path, e))?;
    let mut b = [0u8];
    f.read_exact(&mut b).map_err(|e| Error::io(path, e))?;
    Ok(b[0] == b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(job: &str) -> Entry {
        Entry {
            job: job.into(),
            name: format!("{job}.iuk"),
            sha256: "ab".repeat(32),
            size: 42,
            worker: "w1".into(),
            build_seconds: 1.5,
            reproduction: false,
        }
    }

    #[test]
    fn survives_a_torn_last_line() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("journal");
        let (mut j, e) = Journal::open(&p).unwrap();
        assert!(e.is_empty());
        j.append(&entry("a")).unwrap();
        j.append(&entry("b")).unwrap();
        drop(j);
        // A crash in the middle of the third line.
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"{\"job\":\"c\",\"na").unwrap();
        drop(f);
        let (mut j, e) = Journal::open(&p).unwrap();
        assert_eq!(e, vec![entry("a"), entry("b")]);
        j.append(&entry("d")).unwrap();
        drop(j);
        let (_, e) = Journal::open(&p).unwrap();
        assert_eq!(e, vec![entry("a"), entry("b"), entry("d")]);
    }
}
