//! The xattr table writer, laid out as libsquashfs 1.2.0 lays it out.
//!
//! Keys and values get indices in order of first appearance; each inode's
//! set of pairs is sorted by (key index, value index) and identical sets are
//! stored once. A value used by several pairs is written inline the first
//! time and referenced out of line afterwards when that saves space (more
//! than 8 bytes). Reference counts include pairs of sets that were later
//! found to be duplicates, as in libsquashfs.

use std::collections::HashMap;

use super::compress::Codec;
use super::format::{META_BLOCK_SIZE, NO_XATTR, PutLe, XATTR_OUT_OF_LINE, split_xattr_key};
use super::meta::MetaWriter;
use crate::error::{Error, Result};

#[derive(Default)]
pub struct XattrTable {
    keys: Vec<Vec<u8>>,
    key_index: HashMap<Vec<u8>, u32>,
    values: Vec<Vec<u8>>,
    value_refs: Vec<u64>,
    value_index: HashMap<Vec<u8>, u32>,
    pairs: Vec<u64>,
    set_start: usize,
    sets: Vec<(usize, usize)>,
    set_index: HashMap<Vec<u64>, u32>,
}

impl XattrTable {
    /// Records one inode's xattrs and returns its xattr index
    /// ([`NO_XATTR`] when it has none).
    pub fn add_set(&mut self, xattrs: &[(Vec<u8>, Vec<u8>)]) -> Result<u32> {
        self.set_start = self.pairs.len();
        for (key, value) in xattrs {
            if split_xattr_key(key).is_none() {
                return Err(Error::Unsupported(format!(
                    "xattr '{}' cannot be stored in SquashFS",
                    String::from_utf8_lossy(key)
                )));
            }
            let k = intern(&mut self.keys, &mut self.key_index, key);
            let v = intern(&mut self.values, &mut self.value_index, value);
            if v as usize == self.value_refs.len() {
                self.value_refs.push(0);
            }
            self.value_refs[v as usize] += 1;
            let pair = ((k as u64) << 32) | v as u64;
            let current = &mut self.pairs[self.set_start..];
            if current.contains(&pair) {
                continue;
            }
            if let Some(p) = current.iter_mut().find(|p| (**p >> 32) as u32 == k) {
                let old = (*p & 0xFFFF_FFFF) as usize;
                self.value_refs[old] = self.value_refs[old].saturating_sub(1);
                *p = pair;
                continue;
            }
            self.pairs.push(pair);
        }
        let count = self.pairs.len() - self.set_start;
        if count == 0 {
            return Ok(NO_XATTR);
        }
        self.pairs[self.set_start..].sort_unstable();
        let set = self.pairs[self.set_start..].to_vec();
        if let Some(&idx) = self.set_index.get(&set) {
            self.pairs.truncate(self.set_start);
            return Ok(idx);
        }
        let idx = self.sets.len() as u32;
        self.sets.push((self.set_start, count));
        self.set_index.insert(set, idx);
        Ok(idx)
    }

    pub fn is_empty(&self) -> bool {
        self.sets.is_empty()
    }

    /// Encodes the key/value area, the id table and the table header for
    /// appending at absolute position `at`. Returns the bytes and the
    /// position the superblock's xattr field must point at.
    pub fn encode(&self, cfg: Codec, at: u64) -> Result<(Vec<u8>, u64)> {
        let mut kv = MetaWriter::new(cfg);
        let mut ool: Vec<Option<u64>> = vec![None; self.values.len()];
        let mut set_refs = Vec::with_capacity(self.sets.len());
        for &(start, count) in &self.sets {
            let set_ref = kv.reference();
            let mut size = 0u32;
            for &pair in &self.pairs[start..start + count] {
                let key = &self.keys[(pair >> 32) as usize];
                let vi = (pair & 0xFFFF_FFFF) as usize;
                let value = &self.values[vi];
                let (prefix, name) = split_xattr_key(key).expect("checked in add_set");
                let mut entry = Vec::with_capacity(4 + name.len());
                let out_of_line = ool[vi];
                entry.put_u16(
                    prefix
                        | if out_of_line.is_some() {
                            XATTR_OUT_OF_LINE
                        } else {
                            0
                        },
                );
                entry.put_u16(name.len() as u16);
                entry.extend_from_slice(name);
                kv.append(&entry)?;
                size += entry.len() as u32;
                let mut v = Vec::new();
                match out_of_line {
                    Some(r) => {
                        v.put_u32(8);
                        v.put_u64(r);
                    }
                    None => {
                        let value_ref = kv.reference();
                        v.put_u32(value.len() as u32);
                        v.extend_from_slice(value);
                        if self.value_refs[vi] >= 2 && value.len() > 8 {
                            ool[vi] = Some(value_ref);
                        }
                    }
                }
                kv.append(&v)?;
                size += v.len() as u32;
            }
            set_refs.push((set_ref, count as u32, size));
        }
        let mut out = kv.finish()?;
        let id_start = at + out.len() as u64;

        let mut ids = MetaWriter::new(cfg);
        let mut locations = vec![0u64];
        for (r, count, size) in set_refs {
            let mut e = Vec::with_capacity(16);
            e.put_u64(r);
            e.put_u32(count);
            e.put_u32(size);
            ids.append(&e)?;
            let block = ids.position().0;
            if block != *locations.last().unwrap() {
                locations.push(block);
            }
        }
        // libsquashfs sizes the location list by the table's byte size; a
        // trailing entry for an exactly full last block is not written.
        locations.truncate((self.sets.len() * 16).div_ceil(META_BLOCK_SIZE));
        out.extend_from_slice(&ids.finish()?);
        let header_at = at + out.len() as u64;
        out.put_u64(at);
        out.put_u32(self.sets.len() as u32);
        out.put_u32(0);
        for l in locations {
            out.put_u64(l + id_start);
        }
        Ok((out, header_at))
    }
}

fn intern(list: &mut Vec<Vec<u8>>, index: &mut HashMap<Vec<u8>, u32>, s: &[u8]) -> u32 {
    if let Some(&i) = index.get(s) {
        return i;
    }
    let i = list.len() as u32;
    list.push(s.to_vec());
    index.insert(s.to_vec(), i);
    i
}
