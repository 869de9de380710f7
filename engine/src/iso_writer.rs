//! A small ISO 9660 writer with Rock Ridge names, modes, owners and
//! symlinks, for generating sample releases natively (no xorriso). The ISO
//! names are short generated ones in the same order as the Rock Ridge names;
//! readers that use Rock Ridge (ours, libcdio, bsdtar, the kernel) see the
//! real tree. Output depends only on the tree: no clock, no machine facts.

use std::fs::File;
use std::io::{Read, Write};

use crate::error::{Error, Result};
use crate::tree::{Kind, Node};

const SECTOR: u64 = 2048;

fn both16(v: u16) -> [u8; 4] {
    let mut b = [0u8; 4];
    b[..2].copy_from_slice(&v.to_le_bytes());
    b[2..].copy_from_slice(&v.to_be_bytes());
    b
}

fn both32(v: u32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&v.to_le_bytes());
    b[4..].copy_from_slice(&v.to_be_bytes());
    b
}

/// One laid-out entry.
struct Item<'a> {
    node: &'a Node,
    parent: usize,
    iso_name: Vec<u8>,
    children: Vec<usize>,
    /// Sector of the extent (directory listing or file data).
    extent: u32,
    size: u32,
}

fn st_mode(n: &Node) -> u32 {
    let t = match n.kind {
        Kind::Dir(_) => 0o040000,
        Kind::Symlink(_) => 0o120000,
        _ => 0o100000,
    };
    t | n.meta.mode as u32
}

fn system_use(n: &Node, root_dot: bool, name: Option<&[u8]>) -> Result<Vec<u8>> {
    let mut su = Vec::new();
    if root_dot {
        // SUSP in use, and the extension it carries: Rock Ridge (RRIP 1.12).
        su.extend_from_slice(&[b'S', b'P', 7, 1, 0xBE, 0xEF, 0]);
        let (id, des, src): (&[u8], &[u8], &[u8]) = (b"RRIP_1991A", b"ROCK RIDGE", b"IUKFARM");
        su.extend_from_slice(&[b'E', b'R', (8 + id.len() + des.len() + src.len()) as u8, 1]);
        su.extend_from_slice(&[id.len() as u8, des.len() as u8, src.len() as u8, 1]);
        su.extend_from_slice(id);
        su.extend_from_slice(des);
        su.extend_from_slice(src);
    }
    su.extend_from_slice(&[b'P', b'X', 36, 1]);
    su.extend_from_slice(&both32(st_mode(n)));
    su.extend_from_slice(&both32(if n.is_dir() { 2 } else { 1 }));
    su.extend_from_slice(&both32(n.meta.uid));
    su.extend_from_slice(&both32(n.meta.gid));
    if n.meta.mtime != 0 {
        // Modification time (Rock Ridge TF, 7-byte form), as xorriso
        // records a file's time: what Tails' installer compares.
        let t = chrono::DateTime::from_timestamp(i64::from(n.meta.mtime), 0)
            .ok_or_else(|| Error::Invalid(format!("time {} out of range", n.meta.mtime)))?;
        use chrono::{Datelike, Timelike};
        su.extend_from_slice(&[b'T', b'F', 12, 1, 0x02]);
        su.extend_from_slice(&[
            (t.year() - 1900).clamp(0, 255) as u8,
            t.month() as u8,
            t.day() as u8,
            t.hour() as u8,
            t.minute() as u8,
            t.second() as u8,
            0,
        ]);
    }
    if let Some(name) = name {
        if name.len() > 200 {
            return Err(Error::Unsupported(
                "names longer than 200 bytes in generated ISOs".into(),
            ));
        }
        su.extend_from_slice(&[b'N', b'M', 5 + name.len() as u8, 1, 0]);
        su.extend_from_slice(name);
    }
    if let Kind::Symlink(target) = &n.kind {
        let mut comps = Vec::new();
        let abs = target.starts_with(b"/");
        if abs {
            comps.extend_from_slice(&[0x08, 0]);
        }
        for c in target.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
            match c {
                b"." => comps.extend_from_slice(&[0x02, 0]),
                b".." => comps.extend_from_slice(&[0x04, 0]),
                _ => {
                    comps.extend_from_slice(&[0, c.len() as u8]);
                    comps.extend_from_slice(c);
                }
            }
        }
        if comps.len() > 200 {
            return Err(Error::Unsupported(
                "symlink targets longer than 200 bytes in generated ISOs".into(),
            ));
        }
        su.extend_from_slice(&[b'S', b'L', 5 + comps.len() as u8, 1, 0]);
        su.extend_from_slice(&comps);
    }
    Ok(su)
}

fn record(extent: u32, size: u32, dir: bool, iso_name: &[u8], su: &[u8]) -> Result<Vec<u8>> {
    let pad = usize::from(iso_name.len().is_multiple_of(2));
    let len = 33 + iso_name.len() + pad + su.len();
    if len > 255 {
        return Err(Error::Unsupported(
            "directory record too long for a generated ISO".into(),
        ));
    }
    let mut r = vec![len as u8, 0];
    r.extend_from_slice(&both32(extent));
    r.extend_from_slice(&both32(size));
    r.extend_from_slice(&[70, 1, 1, 0, 0, 0, 0]);
    r.push(if dir { 2 } else { 0 });
    r.extend_from_slice(&[0, 0]);
    r.extend_from_slice(&both16(1));
    r.push(iso_name.len() as u8);
    r.extend_from_slice(iso_name);
    if pad == 1 {
        r.push(0);
    }
    r.extend_from_slice(su);
    Ok(r)
}

/// Writes `root` (a directory) as an ISO 9660 image with Rock Ridge.
/// Regular files, directories and symlinks only.
pub fn write_iso(root: &Node, volume_id: &str, out: &mut File) -> Result<u64> {
    root.validate()?;
    let mut items: Vec<Item<'_>> = vec![Item {
        node: root,
        parent: 0,
        iso_name: vec![0],
        children: Vec::new(),
        extent: 0,
        size: 0,
    }];
    // Breadth-first, so the path table (which lists directories in this
    // order) and parents' numbers are simple.
    let mut q = 0;
    while q < items.len() {
        let node = items[q].node;
        let mut kids = Vec::new();
        for (i, c) in node.children().iter().enumerate() {
            match c.kind {
                Kind::Dir(_) | Kind::File(_) | Kind::Symlink(_) => {}
                _ => {
                    return Err(Error::Unsupported(
                        "devices, fifos and sockets in generated ISOs".into(),
                    ));
                }
            }
            let iso_name = if c.is_dir() {
                format!("D{i:06}")
            } else {
                format!("F{i:06}.;1")
            };
            kids.push(items.len());
            items.push(Item {
                node: c,
                parent: q,
                iso_name: iso_name.into_bytes(),
                children: Vec::new(),
                extent: 0,
                size: 0,
            });
        }
        items[q].children = kids;
        q += 1;
    }
    let dirs: Vec<usize> = (0..items.len())
        .filter(|&i| items[i].node.is_dir())
        .collect();

    // Path tables (L and M), then directory listings, then file data.
    let mut path_l = Vec::new();
    let mut path_m = Vec::new();
    let dir_number = |i: usize| dirs.iter().position(|&d| d == i).unwrap() as u16 + 1;
    // 16: volume descriptor, 17: terminator, 18/19: path tables.
    let mut sector: u32 = 20;
    let listing_len = |items: &[Item<'_>], i: usize| -> Result<u32> {
        let mut len = 0u32;
        let mut used_in_sector = 0u32;
        let mut add = |rec_len: u32| {
            if used_in_sector + rec_len > SECTOR as u32 {
                len += SECTOR as u32 - used_in_sector;
                used_in_sector = 0;
            }
            used_in_sector += rec_len;
            len += rec_len;
        };
        let n = items[i].node;
        add(record(0, 0, true, &[0], &system_use(n, i == 0, None)?)?.len() as u32);
        add(record(
            0,
            0,
            true,
            &[1],
            &system_use(items[items[i].parent].node, false, None)?,
        )?
        .len() as u32);
        for &c in &items[i].children {
            let ci = &items[c];
            add(record(
                0,
                0,
                false,
                &ci.iso_name,
                &system_use(ci.node, false, Some(&ci.node.name))?,
            )?
            .len() as u32);
        }
        Ok(len.div_ceil(SECTOR as u32) * SECTOR as u32)
    };
    for &d in &dirs {
        let size = listing_len(&items, d)?;
        items[d].extent = sector;
        items[d].size = size;
        sector += size / SECTOR as u32;
    }
    for it in items.iter_mut() {
        if let Kind::File(f) = &it.node.kind {
            let size = u32::try_from(f.size).map_err(|_| {
                Error::Unsupported("files of 4 GiB or more in generated ISOs".into())
            })?;
            it.extent = if size == 0 { 0 } else { sector };
            it.size = size;
            sector += size.div_ceil(SECTOR as u32);
        }
    }
    for &d in &dirs {
        let name = if d == 0 {
            vec![0u8]
        } else {
            items[d].iso_name.clone()
        };
        let parent = dir_number(items[d].parent);
        for (table, be) in [(&mut path_l, false), (&mut path_m, true)] {
            table.push(name.len() as u8);
            table.push(0);
            let ext = items[d].extent;
            table.extend_from_slice(&if be {
                ext.to_be_bytes()
            } else {
                ext.to_le_bytes()
            });
            table.extend_from_slice(&if be {
                parent.to_be_bytes()
            } else {
                parent.to_le_bytes()
            });
            table.extend_from_slice(&name);
            if name.len() % 2 == 1 {
                table.push(0);
            }
        }
    }
    if path_l.len() > SECTOR as usize {
        return Err(Error::Unsupported(
            "too many directories for a generated ISO".into(),
        ));
    }
    let total = sector;

    let mut pvd = vec![0u8; SECTOR as usize];
    pvd[0] = 1;
    pvd[1..6].copy_from_slice(b"CD001");
    pvd[6] = 1;
    pvd[8..40].fill(b' ');
    let vid = volume_id.as_bytes();
    pvd[40..72].fill(b' ');
    pvd[40..40 + vid.len().min(32)].copy_from_slice(&vid[..vid.len().min(32)]);
    pvd[80..88].copy_from_slice(&both32(total));
    pvd[120..124].copy_from_slice(&both16(1));
    pvd[124..128].copy_from_slice(&both16(1));
    pvd[128..132].copy_from_slice(&both16(SECTOR as u16));
    pvd[132..140].copy_from_slice(&both32(path_l.len() as u32));
    pvd[140..144].copy_from_slice(&18u32.to_le_bytes());
    pvd[148..152].copy_from_slice(&19u32.to_be_bytes());
    let root_rec = record(items[0].extent, items[0].size, true, &[0], &[])?;
    pvd[156..156 + 34].copy_from_slice(&root_rec[..34]);
    pvd[190..813].fill(b' ');
    for field in [813usize, 830, 847, 864] {
        pvd[field..field + 16].fill(b'0');
    }
    // Created and modified when the root was (as xorriso dates a volume
    // from SOURCE_DATE_EPOCH): Tails' release date, which the IUK build checks.
    if root.meta.mtime != 0 {
        let date = crate::iso::format_volume_date(root.meta.mtime as i64);
        pvd[813..829].copy_from_slice(&date);
        pvd[830..846].copy_from_slice(&date);
    }
    pvd[881] = 1;

    let mut term = vec![0u8; SECTOR as usize];
    term[0] = 255;
    term[1..6].copy_from_slice(b"CD001");
    term[6] = 1;
    let padded = |mut v: Vec<u8>| {
        v.resize(v.len().div_ceil(SECTOR as usize) * SECTOR as usize, 0);
        v
    };

    out.set_len(0)?;
    let mut w = std::io::BufWriter::new(&mut *out);
    w.write_all(&vec![0u8; 16 * SECTOR as usize])?;
    w.write_all(&pvd)?;
    w.write_all(&term)?;
    w.write_all(&padded(path_l))?;
    w.write_all(&padded(path_m))?;
    for &d in &dirs {
        let mut listing = Vec::new();
        let mut push = |rec: Vec<u8>| {
            let used = listing.len() % SECTOR as usize;
            if used + rec.len() > SECTOR as usize {
                listing.resize(listing.len() + SECTOR as usize - used, 0);
            }
            listing.extend_from_slice(&rec);
        };
        let it = &items[d];
        let parent = &items[it.parent];
        push(record(
            it.extent,
            it.size,
            true,
            &[0],
            &system_use(it.node, d == 0, None)?,
        )?);
        push(record(
            parent.extent,
            parent.size,
            true,
            &[1],
            &system_use(parent.node, false, None)?,
        )?);
        for &c in &it.children {
            let ci = &items[c];
            let su = system_use(ci.node, false, Some(&ci.node.name))?;
            push(record(
                ci.extent,
                ci.size,
                ci.node.is_dir(),
                &ci.iso_name,
                &su,
            )?);
        }
        let listing = padded(listing);
        debug_assert_eq!(listing.len() as u32, it.size);
        w.write_all(&listing)?;
    }
    for it in &items {
        if let Kind::File(f) = &it.node.kind {
            let mut r = f.open()?;
            let n = std::io::copy(&mut (&mut r).take(f.size), &mut w)?;
            if n != f.size {
                return Err(Error::Invalid(format!(
                    "{}: file shrank while it was written",
                    f.describe()
                )));
            }
            let pad = (SECTOR - f.size % SECTOR) % SECTOR;
            w.write_all(&vec![0u8; pad as usize])?;
        }
    }
    w.flush()?;
    Ok(total as u64 * SECTOR)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iso::Iso;
    use crate::tree::{FileContent, Meta};
    use std::sync::Arc;

    fn meta(mode: u16) -> Meta {
        Meta {
            mode,
            uid: 0,
            gid: 0,
            mtime: 0,
            xattrs: Vec::new(),
        }
    }

    #[test]
    fn round_trip_through_our_reader() {
        let big: Vec<u8> = (0..5000u32).flat_map(|i| i.to_le_bytes()).collect();
        let root = Node::dir(
            "",
            meta(0o755),
            vec![
                Node::dir(
                    "live",
                    meta(0o755),
                    vec![
                        Node {
                            name: b"vmlinuz".to_vec(),
                            meta: meta(0o644),
                            kind: Kind::File(FileContent::from_bytes(big.clone())),
                        },
                        Node {
                            name: b"empty".to_vec(),
                            meta: meta(0o600),
                            kind: Kind::File(FileContent::from_bytes(Vec::new())),
                        },
                    ],
                ),
                Node {
                    name: b"link".to_vec(),
                    meta: meta(0o777),
                    kind: Kind::Symlink(b"../live/vmlinuz".to_vec()),
                },
                Node::dir(
                    "EFI",
                    meta(0o755),
                    vec![Node::dir("BOOT", meta(0o700), vec![])],
                ),
            ],
        );
        let mut f = tempfile::tempfile().unwrap();
        write_iso(&root, "TEST", &mut f).unwrap();
        let iso = Iso::open(Arc::new(f)).unwrap();
        assert_eq!(iso.naming(), crate::iso::Naming::RockRidge);
        let v = iso.lookup(b"live/vmlinuz").unwrap().unwrap();
        assert_eq!(iso.read_file(&v, 1 << 20).unwrap(), big);
        assert_eq!(v.posix.unwrap().0, 0o100644);
        let l = iso.lookup(b"link").unwrap().unwrap();
        assert_eq!(l.symlink.as_deref(), Some(&b"../live/vmlinuz"[..]));
        let boot = iso.lookup(b"EFI/BOOT").unwrap().unwrap();
        assert!(boot.is_dir);
        assert_eq!(boot.posix.unwrap().0, 0o040700);
        let e = iso.lookup(b"live/empty").unwrap().unwrap();
        assert_eq!(iso.read_file(&e, 10).unwrap(), b"");
    }
}
