//! Append-only journal of finished kits, so that a coordinator killed and
//! restarted with the same arguments neither loses nor rebuilds them.
//!
//! One JSON object per line, written whole and fsynced before the kit is
//! put in place. Only the last line can be cut short (a crash in the
//! middle of an append): it is dropped. Damage anywhere else is not
//! something iukfarm wrote, and the journal refuses to guess. Entries are
//! only trusted when the kit in the output directory still has the
//! recorded size and digest.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
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
    /// The fingerprint of the uploader's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    /// Withdraws the job's earlier entry: it is built again (a helper whose
    /// forms it may hold failed an audit).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retracted: bool,
}

pub struct Journal {
    path: PathBuf,
    file: File,
    /// Bytes of whole, synced lines: where a failed append is cut back to.
    len: u64,
}

impl Journal {
    /// Opens (creating) the journal and returns the entries found in it.
    /// A torn last line is removed; any other unreadable line is an error
    /// naming it.
    pub fn open(path: &Path) -> Result<(Journal, Vec<Entry>), Error> {
        let io = |e| Error::io(path, e);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(io)?;
        let mut data = Vec::new();
        file.read_to_end(&mut data).map_err(io)?;
        let whole = data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let mut entries = Vec::new();
        for (n, line) in data[..whole].split_inclusive(|&b| b == b'\n').enumerate() {
            let line = &line[..line.len() - 1];
            if line.is_empty() {
                continue;
            }
            let e = serde_json::from_slice::<Entry>(line)
                .map_err(|e| e.to_string())
                .and_then(|e| e.check().map(|()| e))
                .map_err(|why| {
                    Error::Config(format!(
                        "{}: line {} is not a journal entry ({why}); iukfarm did not write it. \
                         Remove that line (its kit is then built again) or the whole journal \
                         (every kit is set aside and built again), then run again",
                        path.display(),
                        n + 1
                    ))
                })?;
            entries.push(e);
        }
        if whole < data.len() {
            // A crash mid-append: that kit was never put in place.
            tracing::warn!(
                "{}: dropping a torn last line ({} bytes)",
                path.display(),
                data.len() - whole
            );
            file.set_len(whole as u64).map_err(io)?;
            file.sync_data().map_err(io)?;
        }
        Ok((
            Journal {
                path: path.to_path_buf(),
                file,
                len: whole as u64,
            },
            entries,
        ))
    }

    /// Appends an entry as one write and waits until it is on disk. On
    /// failure the file is cut back to its last whole line, so the next
    /// append does not glue onto a fragment.
    pub fn append(&mut self, e: &Entry) -> Result<(), Error> {
        e.check().map_err(Error::Other)?;
        let mut line = serde_json::to_vec(e).expect("journal entries serialise");
        line.push(b'\n');
        let written = self
            .file
            .write_all(&line)
            .and_then(|_| self.file.sync_data());
        match written {
            Ok(()) => {
                self.len += line.len() as u64;
                Ok(())
            }
            Err(err) => {
                if let Err(e2) = self
                    .file
                    .set_len(self.len)
                    .and_then(|_| self.file.sync_data())
                {
                    tracing::warn!(
                        "{}: cutting back a failed append: {e2}",
                        self.path.display()
                    );
                }
                Err(Error::io(&self.path, err))
            }
        }
    }
}

impl Entry {
    /// What a line must hold to be believed (JSON cannot carry NaN: a
    /// non-finite number would make the line unreadable).
    fn check(&self) -> Result<(), String> {
        if !self.build_seconds.is_finite() || self.build_seconds < 0.0 {
            return Err(format!(
                "build_seconds {} is not a duration",
                self.build_seconds
            ));
        }
        if self.sha256.len() != 64 || !self.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("sha256 is not 64 hex digits".into());
        }
        if self.job.is_empty() || self.name.is_empty() || self.name.contains('/') {
            return Err("no job id or a bad kit name".into());
        }
        Ok(())
    }
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
            certificate: None,
            retracted: false,
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
        // Dropped in place: no fragment is left in the file.
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
        assert!(!text.contains("\"job\":\"c\""), "{text}");
    }

    #[test]
    fn a_retraction_is_written_only_where_there_is_one() {
        let plain = serde_json::to_string(&entry("a")).unwrap();
        assert!(!plain.contains("retracted"), "{plain}");
        let mut r = entry("a");
        r.retracted = true;
        let line = serde_json::to_string(&r).unwrap();
        assert!(line.contains("\"retracted\":true"), "{line}");
        // Journals written before retractions existed still read.
        let old: Entry = serde_json::from_str(&plain).unwrap();
        assert!(!old.retracted);
    }

    #[test]
    fn damage_before_the_last_line_is_an_error_naming_the_line() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("journal");
        let (mut j, _) = Journal::open(&p).unwrap();
        for x in ["a", "b", "c"] {
            j.append(&entry(x)).unwrap();
        }
        drop(j);
        let text = std::fs::read_to_string(&p).unwrap();
        let damaged = text.replacen("\"b.iuk\"", "\"b.iuk", 1);
        std::fs::write(&p, &damaged).unwrap();
        let e = Journal::open(&p).err().unwrap().to_string();
        assert!(e.contains("line 2 is not a journal entry"), "{e}");
        // Nothing was changed by the refusal.
        assert_eq!(std::fs::read_to_string(&p).unwrap(), damaged);
        // A complete last line that does not parse is damage too, not a tear.
        let mut bad = text.clone();
        bad.push_str("{\"job\":1}\n");
        std::fs::write(&p, &bad).unwrap();
        let e = Journal::open(&p).err().unwrap().to_string();
        assert!(e.contains("line 4"), "{e}");
    }

    #[test]
    fn entries_that_json_cannot_carry_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("journal");
        let (mut j, _) = Journal::open(&p).unwrap();
        for bad in [f64::NAN, f64::INFINITY, -1.0] {
            let mut e = entry("a");
            e.build_seconds = bad;
            assert!(j.append(&e).is_err(), "{bad}");
        }
        j.append(&entry("b")).unwrap();
        drop(j);
        let (_, e) = Journal::open(&p).unwrap();
        assert_eq!(e, vec![entry("b")]);
    }
}
