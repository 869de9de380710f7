//! ISO 9660 reading, in place: directory listings with Rock Ridge names,
//! modes, owners and symlinks (Joliet, then plain ISO names as fallbacks),
//! multi-extent files, and each file's byte extents so that the SquashFS
//! image inside a live ISO can be read without extracting it.
//!
//! Everything read from the image is bounds-checked: directory sizes,
//! continuation areas and nesting depth are capped, and a directory that
//! points back at one of its ancestors is refused.

use std::io;
use std::sync::Arc;

use crate::error::{Error, Result, corrupt};
use crate::io::ReadAt;

const SECTOR: u64 = 2048;
const MAX_DIR_BYTES: u64 = 64 << 20;
const MAX_CONTINUATIONS: usize = 64;
const MAX_DEPTH: usize = 64;

/// Which directory tree names come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    RockRidge,
    Joliet,
    Plain,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsoEntry {
    pub name: Vec<u8>,
    pub is_dir: bool,
    /// (absolute byte offset, length) of each extent, in file order.
    pub extents: Vec<(u64, u64)>,
    pub size: u64,
    /// Rock Ridge POSIX attributes (`st_mode`, nlink, uid, gid) when present.
    pub posix: Option<(u32, u32, u32, u32)>,
    pub symlink: Option<Vec<u8>>,
}

/// An opened ISO image.
pub struct Iso {
    src: Arc<dyn ReadAt>,
    root: Record,
    naming: Naming,
    /// Bytes to skip at the start of each system use area (SUSP "SP").
    susp_skip: usize,
    /// The volume's size as its primary descriptor states it.
    volume_bytes: u64,
    /// The primary descriptor's creation date (else its modification date).
    created: Option<i64>,
}

#[derive(Debug, Clone)]
struct Record {
    extent: u64,
    size: u64,
    flags: u8,
    name: Vec<u8>,
    system_use: Vec<u8>,
}

impl Iso {
    pub fn open(src: Arc<dyn ReadAt>) -> Result<Iso> {
        let len = src.size()?;
        let mut primary = None;
        let mut joliet = None;
        let mut volume_bytes = 0;
        let mut created = None;
        for i in 16..256u64 {
            let mut vd = vec![0u8; SECTOR as usize];
            if (i + 1) * SECTOR > len {
                break;
            }
            src.read_exact_at(&mut vd, i * SECTOR)?;
            if &vd[1..6] != b"CD001" {
                if primary.is_none() {
                    return Err(Error::Invalid(
                        "not an ISO 9660 image (no CD001 volume descriptor)".into(),
                    ));
                }
                break;
            }
            match vd[0] {
                1 if primary.is_none() => {
                    let blocks = u32::from_le_bytes(vd[80..84].try_into().unwrap());
                    let block = u16::from_le_bytes(vd[128..130].try_into().unwrap());
                    volume_bytes = blocks as u64 * block as u64;
                    created = parse_volume_date(&vd[813..830])
                        .or_else(|| parse_volume_date(&vd[830..847]));
                    primary = Some(parse_record(&vd[156..190])?.0)
                }
                2 if matches!(&vd[88..91], b"%/@" | b"%/C" | b"%/E") => {
                    joliet = Some(parse_record(&vd[156..190])?.0)
                }
                255 => break,
                _ => {}
            }
        }
        let Some(root) = primary else {
            return Err(Error::Invalid(
                "not an ISO 9660 image (no primary volume descriptor)".into(),
            ));
        };
        let mut iso = Iso {
            src,
            root: root.clone(),
            naming: Naming::Plain,
            susp_skip: 0,
            volume_bytes,
            created,
        };
        // Rock Ridge announces itself with "SP" in the root's "." record.
        let first = iso.raw_records(&root)?.into_iter().next();
        if let Some(dot) = first
            && dot.system_use.len() >= 7
            && &dot.system_use[..2] == b"SP"
            && dot.system_use[4..6] == [0xBE, 0xEF]
        {
            iso.susp_skip = dot.system_use[6] as usize;
            iso.naming = Naming::RockRidge;
        } else if let Some(j) = joliet {
            iso.root = j;
            iso.naming = Naming::Joliet;
        }
        Ok(iso)
    }

    /// When the volume was made, in seconds since the epoch, as its primary
    /// volume descriptor says (xorriso takes it from SOURCE_DATE_EPOCH, so
    /// for a Tails ISO it is the release's date); `None` if not recorded.
    pub fn created(&self) -> Option<i64> {
        self.created
    }

    pub fn naming(&self) -> Naming {
        self.naming
    }

    /// All records of a directory, including "." and "..", in stored order.
    fn raw_records(&self, dir: &Record) -> Result<Vec<Record>> {
        let end = dir
            .extent
            .checked_mul(SECTOR)
            .and_then(|p| p.checked_add(dir.size));
        if dir.size > MAX_DIR_BYTES || end.is_none_or(|e| e > self.src.size().unwrap_or(0)) {
            corrupt!(
                "directory at sector {} ({} bytes) lies outside the ISO",
                dir.extent,
                dir.size
            );
        }
        let mut data = vec![0u8; dir.size as usize];
        self.read(&mut data, dir.extent * SECTOR, "directory")?;
        let mut out = Vec::new();
        let mut pos = 0usize;
        while pos < data.len() {
            let len = data[pos] as usize;
            if len == 0 {
                // Records never cross a sector boundary; the rest is padding.
                pos = (pos / SECTOR as usize + 1) * SECTOR as usize;
                continue;
            }
            if pos + len > data.len() || len < 34 {
                corrupt!(
                    "directory record at {} overruns its directory",
                    dir.extent * SECTOR + pos as u64
                );
            }
            let (rec, _) = parse_record(&data[pos..pos + len])?;
            out.push(rec);
            pos += len;
        }
        Ok(out)
    }

    fn read(&self, buf: &mut [u8], pos: u64, what: &str) -> Result<()> {
        self.src.read_exact_at(buf, pos).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                Error::corrupt(format!(
                    "{what} at byte {pos} lies beyond the end of the ISO (truncated?)"
                ))
            } else {
                Error::RawIo(e)
            }
        })
    }

    /// Rock Ridge fields of a record: (name, posix, symlink).
    #[allow(clippy::type_complexity)]
    fn rock_ridge(
        &self,
        rec: &Record,
    ) -> Result<(
        Option<Vec<u8>>,
        Option<(u32, u32, u32, u32)>,
        Option<Vec<u8>>,
    )> {
        let mut name: Option<Vec<u8>> = None;
        let mut posix = None;
        let mut link: Option<Vec<u8>> = None;
        let mut link_done = false;
        let mut area = rec.system_use.get(self.susp_skip..).unwrap_or(&[]).to_vec();
        let mut continuations = 0;
        loop {
            let mut next = None;
            let mut p = 0usize;
            while p + 4 <= area.len() {
                let sig = [area[p], area[p + 1]];
                let len = area[p + 2] as usize;
                if len < 4 || p + len > area.len() {
                    break;
                }
                let body = &area[p + 4..p + len];
                match &sig {
                    b"NM" if !body.is_empty() => {
                        let flags = body[0];
                        if flags & 0x06 == 0 {
                            name.get_or_insert_with(Vec::new)
                                .extend_from_slice(&body[1..]);
                        }
                    }
                    b"PX" if body.len() >= 32 => {
                        let le = |o: usize| u32::from_le_bytes(body[o..o + 4].try_into().unwrap());
                        posix = Some((le(0), le(8), le(16), le(24)));
                    }
                    b"SL" if !body.is_empty() && !link_done => {
                        let flags = body[0];
                        let target = link.get_or_insert_with(Vec::new);
                        let mut q = 1;
                        while q + 2 <= body.len() {
                            let cflags = body[q];
                            let clen = body[q + 1] as usize;
                            let comp = body.get(q + 2..q + 2 + clen).unwrap_or(&[]);
                            if !target.is_empty() && !target.ends_with(b"/") {
                                target.push(b'/');
                            }
                            match cflags & 0x0E {
                                0x02 => target.extend_from_slice(b"."),
                                0x04 => target.extend_from_slice(b".."),
                                0x08 => target.push(b'/'),
                                _ => target.extend_from_slice(comp),
                            }
                            q += 2 + clen;
                        }
                        link_done = flags & 1 == 0;
                    }
                    b"CE" if body.len() >= 24 => {
                        let le = |o: usize| {
                            u32::from_le_bytes(body[o..o + 4].try_into().unwrap()) as u64
                        };
                        next = Some((le(0) * SECTOR + le(8), le(16)));
                    }
                    b"ST" => break,
                    _ => {}
                }
                p += len;
            }
            let Some((pos, len)) = next else { break };
            continuations += 1;
            if continuations > MAX_CONTINUATIONS || len > SECTOR {
                corrupt!("Rock Ridge continuation chain too long");
            }
            area = vec![0u8; len as usize];
            self.read(&mut area, pos, "Rock Ridge continuation area")?;
        }
        Ok((name, posix, link))
    }

    fn entry(&self, rec: &Record) -> Result<IsoEntry> {
        let (rr_name, posix, symlink) = if self.naming == Naming::RockRidge {
            self.rock_ridge(rec)?
        } else {
            (None, None, None)
        };
        let name = match (rr_name, self.naming) {
            (Some(n), _) => n,
            (None, Naming::Joliet) => {
                let units: Vec<u16> = rec
                    .name
                    .chunks_exact(2)
                    .map(|c| u16::from_be_bytes([c[0], c[1]]))
                    .collect();
                strip_version(String::from_utf16_lossy(&units).into_bytes())
            }
            (None, _) => strip_version(rec.name.clone()),
        };
        Ok(IsoEntry {
            name,
            is_dir: rec.flags & 0x02 != 0,
            extents: vec![(rec.extent * SECTOR, rec.size)],
            size: rec.size,
            posix,
            symlink,
        })
    }

    /// Lists a directory (by path, `""` or `"/"` for the root); multi-extent
    /// files are merged into one entry.
    pub fn list(&self, path: &[u8]) -> Result<Vec<IsoEntry>> {
        let rec = self.find_dir(path)?;
        self.list_record(&rec)
    }

    fn list_record(&self, dir: &Record) -> Result<Vec<IsoEntry>> {
        let mut out: Vec<IsoEntry> = Vec::new();
        let mut continuing = false;
        for rec in self.raw_records(dir)? {
            if rec.name == [0] || rec.name == [1] {
                continue;
            }
            let e = self.entry(&rec)?;
            if continuing && let Some(last) = out.last_mut() {
                last.extents.push((rec.extent * SECTOR, rec.size));
                last.size += rec.size;
            } else {
                out.push(e);
            }
            continuing = rec.flags & 0x80 != 0;
        }
        Ok(out)
    }

    fn find_dir(&self, path: &[u8]) -> Result<Record> {
        let mut cur = self.root.clone();
        let mut ancestors = vec![cur.extent];
        for comp in path.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
            let mut found = None;
            for rec in self.raw_records(&cur)? {
                if rec.name == [0] || rec.name == [1] {
                    continue;
                }
                if self.entry(&rec)?.name == comp {
                    found = Some(rec);
                    break;
                }
            }
            let rec = found.ok_or_else(|| {
                Error::NotFound(format!("{} in the ISO", String::from_utf8_lossy(path)))
            })?;
            if rec.flags & 0x02 == 0 {
                return Err(Error::Invalid(format!(
                    "{} is not a directory",
                    String::from_utf8_lossy(comp)
                )));
            }
            if ancestors.contains(&rec.extent) || ancestors.len() > MAX_DEPTH {
                corrupt!("directory loop at {}", String::from_utf8_lossy(comp));
            }
            ancestors.push(rec.extent);
            cur = rec;
        }
        Ok(cur)
    }

    /// Looks up a file or directory by path.
    pub fn lookup(&self, path: &[u8]) -> Result<Option<IsoEntry>> {
        let trimmed: Vec<&[u8]> = path
            .split(|&b| b == b'/')
            .filter(|c| !c.is_empty())
            .collect();
        let Some((last, parents)) = trimmed.split_last() else {
            return Ok(Some(self.entry(&self.root)?));
        };
        let parent = parents.join(&b'/');
        let dir = match self.find_dir(&parent) {
            Ok(d) => d,
            Err(Error::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(self
            .list_record(&dir)?
            .into_iter()
            .find(|e| e.name == *last))
    }

    /// Reads every directory and checks that the file holds the whole
    /// volume and every file's extents: a truncated or damaged ISO fails
    /// here rather than midway through the work.
    pub fn check(&self) -> Result<()> {
        let len = self.src.size()?;
        if self.volume_bytes > len {
            corrupt!(
                "truncated: the volume holds {} bytes but the file has {len}",
                self.volume_bytes
            );
        }
        self.walk(b"", &mut |_, e| {
            if !e.is_dir {
                self.file_reader(e)?;
            }
            Ok(())
        })
    }

    /// A positional reader over a file's bytes, for reading in place.
    pub fn file_reader(&self, entry: &IsoEntry) -> Result<Arc<dyn ReadAt>> {
        let len = self.src.size()?;
        for &(off, l) in &entry.extents {
            if off.checked_add(l).is_none_or(|e| e > len) {
                corrupt!(
                    "{} extends beyond the end of the ISO (truncated?)",
                    String::from_utf8_lossy(&entry.name)
                );
            }
        }
        Ok(Arc::new(Extents {
            src: self.src.clone(),
            extents: entry.extents.clone(),
            size: entry.size,
        }))
    }

    /// Reads a whole file of at most `limit` bytes.
    pub fn read_file(&self, entry: &IsoEntry, limit: u64) -> Result<Vec<u8>> {
        if entry.is_dir {
            return Err(Error::Invalid(format!(
                "{} is a directory",
                String::from_utf8_lossy(&entry.name)
            )));
        }
        if entry.size > limit {
            return Err(Error::Invalid(format!(
                "{} has {} bytes, more than the {limit} allowed",
                String::from_utf8_lossy(&entry.name),
                entry.size
            )));
        }
        let r = self.file_reader(entry)?;
        let mut buf = vec![0u8; entry.size as usize];
        r.read_exact_at(&mut buf, 0)?;
        Ok(buf)
    }

    /// Every entry below `path`, depth-first in stored order, with paths
    /// relative to the ISO root.
    pub fn walk(
        &self,
        path: &[u8],
        f: &mut dyn FnMut(&[u8], &IsoEntry) -> Result<()>,
    ) -> Result<()> {
        let dir = self.find_dir(path)?;
        let mut prefix: Vec<u8> = path
            .split(|&b| b == b'/')
            .filter(|c| !c.is_empty())
            .collect::<Vec<_>>()
            .join(&b'/');
        self.walk_rec(&dir, &mut prefix, &mut vec![dir.extent], f)
    }

    fn walk_rec(
        &self,
        dir: &Record,
        path: &mut Vec<u8>,
        ancestors: &mut Vec<u64>,
        f: &mut dyn FnMut(&[u8], &IsoEntry) -> Result<()>,
    ) -> Result<()> {
        let entries = self.list_record(dir)?;
        for e in entries {
            let len = path.len();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(&e.name);
            f(path, &e)?;
            if e.is_dir {
                let extent = e.extents[0].0 / SECTOR;
                if ancestors.contains(&extent) || ancestors.len() > MAX_DEPTH {
                    corrupt!("directory loop at {}", String::from_utf8_lossy(path));
                }
                let rec = Record {
                    extent,
                    size: e.size,
                    flags: 0x02,
                    name: e.name.clone(),
                    system_use: Vec::new(),
                };
                ancestors.push(extent);
                self.walk_rec(&rec, path, ancestors, f)?;
                ancestors.pop();
            }
            path.truncate(len);
        }
        Ok(())
    }
}

/// An ISO 9660 "dec-datetime" (`YYYYMMDDHHMMSScc` and an offset from GMT
/// in 15-minute steps) as seconds since the epoch; `None` when all digits
/// are zero ("not specified") or the field is not a date.
pub fn parse_volume_date(f: &[u8]) -> Option<i64> {
    let digits = std::str::from_utf8(f.get(..14)?).ok()?;
    if !digits.bytes().all(|d| d.is_ascii_digit()) || digits.bytes().all(|d| d == b'0') {
        return None;
    }
    let date = chrono::NaiveDateTime::parse_from_str(digits, "%Y%m%d%H%M%S").ok()?;
    let offset = i64::from(*f.get(16)? as i8);
    Some(date.and_utc().timestamp() - offset * 15 * 60)
}

/// [`parse_volume_date`]'s 16 digits for a time, in GMT (the offset byte
/// after them stays 0).
pub fn format_volume_date(t: i64) -> [u8; 16] {
    chrono::DateTime::from_timestamp(t, 0)
        .and_then(|d| {
            d.format("%Y%m%d%H%M%S00")
                .to_string()
                .into_bytes()
                .try_into()
                .ok()
        })
        .unwrap_or([b'0'; 16])
}

/// libcdio's `iso9660_name_translate` as Tails' `delete_files` sees names:
/// ASCII letters lower-cased, a trailing `;1` or `.;1` dropped, any other
/// `;` turned into `.`.
pub fn cdio_translate(name: &[u8]) -> Vec<u8> {
    let mut n = name.to_vec();
    if n.ends_with(b".;1") {
        n.truncate(n.len() - 3);
    } else if n.ends_with(b";1") {
        n.truncate(n.len() - 2);
    }
    n.iter()
        .map(|&b| match b {
            b';' => b'.',
            _ => b.to_ascii_lowercase(),
        })
        .collect()
}

fn strip_version(mut n: Vec<u8>) -> Vec<u8> {
    if let Some(p) = n.iter().rposition(|&b| b == b';') {
        n.truncate(p);
    }
    if n.ends_with(b".") {
        n.pop();
    }
    n
}

fn parse_record(b: &[u8]) -> Result<(Record, usize)> {
    let len = b[0] as usize;
    if len < 34 || len > b.len() {
        corrupt!("directory record of {len} bytes");
    }
    let ext_attr = b[1] as u64;
    let extent = u32::from_le_bytes(b[2..6].try_into().unwrap()) as u64 + ext_attr;
    let size = u32::from_le_bytes(b[10..14].try_into().unwrap()) as u64;
    let flags = b[25];
    let name_len = b[32] as usize;
    if 33 + name_len > len {
        corrupt!("directory record name overruns the record");
    }
    let name = b[33..33 + name_len].to_vec();
    let su_start = 33 + name_len + (1 - name_len % 2);
    let system_use = b.get(su_start..len).unwrap_or(&[]).to_vec();
    Ok((
        Record {
            extent,
            size,
            flags,
            name,
            system_use,
        },
        len,
    ))
}

/// A file made of one or more extents of the ISO, read as one.
struct Extents {
    src: Arc<dyn ReadAt>,
    extents: Vec<(u64, u64)>,
    size: u64,
}

impl ReadAt for Extents {
    fn read_exact_at(&self, mut buf: &mut [u8], mut pos: u64) -> io::Result<()> {
        if pos
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.size)
        {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the file",
            ));
        }
        let mut base = 0u64;
        for &(off, len) in &self.extents {
            if buf.is_empty() {
                break;
            }
            if pos < base + len {
                let within = pos - base;
                let n = ((len - within) as usize).min(buf.len());
                self.src.read_exact_at(&mut buf[..n], off + within)?;
                buf = &mut buf[n..];
                pos += n as u64;
            }
            base += len;
        }
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_dates_read_as_xorriso_writes_them() {
        // xorriso with SOURCE_DATE_EPOCH=1700000000, GMT.
        assert_eq!(
            parse_volume_date(b"2023111422132000\0"),
            Some(1_700_000_000)
        );
        // Local time with an offset: 12:13:20 at GMT-10:00 is 22:13:20 GMT.
        assert_eq!(
            parse_volume_date(b"2023111412132000\xd8"),
            Some(1_700_000_000)
        );
        assert_eq!(parse_volume_date(b"0000000000000000\0"), None);
        assert_eq!(parse_volume_date(b"2023131422132000\0"), None);
        assert_eq!(parse_volume_date(b"20231114"), None);
        assert_eq!(&format_volume_date(1_730_285_444), b"2024103010504400");
        assert_eq!(
            parse_volume_date(&[&format_volume_date(1_730_285_444)[..], &[0]].concat()),
            Some(1_730_285_444)
        );
    }

    #[test]
    fn translate_like_libcdio() {
        assert_eq!(cdio_translate(b"BOOTX64.EFI"), b"bootx64.efi");
        assert_eq!(cdio_translate(b"FOO.;1"), b"foo");
        assert_eq!(cdio_translate(b"A;B;1"), b"a.b");
        assert_eq!(cdio_translate(b"vmlinuz"), b"vmlinuz");
    }

    #[test]
    fn garbage_is_not_an_iso() {
        let data: Arc<dyn ReadAt> = Arc::new(vec![0u8; 64 * 1024]);
        assert!(Iso::open(data).is_err());
        let short: Arc<dyn ReadAt> = Arc::new(vec![0u8; 100]);
        assert!(Iso::open(short).is_err());
    }
}
