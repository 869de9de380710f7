//! Metadata block writing: 8 KiB units, each compressed on its own and
//! preceded by a 16-bit header; references are `(block start << 16) | offset`.

use super::compress::Codec;
use super::format::{META_BLOCK_SIZE, META_UNCOMPRESSED, PutLe};
use crate::error::Result;

/// Accumulates a metadata stream in memory (compressed). Positions are
/// relative to the stream's start, as SquashFS references are relative to
/// their table's start.
pub struct MetaWriter {
    cfg: Codec,
    current: Vec<u8>,
    out: Vec<u8>,
}

impl MetaWriter {
    pub fn new(cfg: Codec) -> Self {
        MetaWriter {
            cfg,
            current: Vec::with_capacity(META_BLOCK_SIZE),
            out: Vec::new(),
        }
    }

    /// (start of the current block in the compressed stream, offset in it).
    pub fn position(&self) -> (u64, u32) {
        (self.out.len() as u64, self.current.len() as u32)
    }

    pub fn reference(&self) -> u64 {
        let (block, offset) = self.position();
        (block << 16) | offset as u64
    }

    /// Appends bytes, flushing every block as soon as it is full (so a
    /// position taken right after an exactly full block is in the next one).
    pub fn append(&mut self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            let n = (META_BLOCK_SIZE - self.current.len()).min(data.len());
            self.current.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.current.len() == META_BLOCK_SIZE {
                self.flush()?;
            }
        }
        Ok(())
    }

    pub fn flush(&mut self) -> Result<()> {
        if self.current.is_empty() {
            return Ok(());
        }
        match self.cfg.compress(&self.current)? {
            Some(c) => {
                self.out.put_u16(c.len() as u16);
                self.out.extend_from_slice(&c);
            }
            None => {
                self.out
                    .put_u16(self.current.len() as u16 | META_UNCOMPRESSED);
                self.out.extend_from_slice(&self.current);
            }
        }
        self.current.clear();
        Ok(())
    }

    /// Flushes and returns the compressed stream.
    pub fn finish(mut self) -> Result<Vec<u8>> {
        self.flush()?;
        Ok(self.out)
    }
}

/// A lookup table (fragments, ids, export): the entries in metadata blocks,
/// followed by the uncompressed list of those blocks' absolute positions.
/// Returns the bytes to append at `at` and the position of the list, which
/// is what the superblock points to.
pub fn encode_table(cfg: Codec, data: &[u8], at: u64) -> Result<(Vec<u8>, u64)> {
    let mut m = MetaWriter::new(cfg);
    let mut locations = Vec::new();
    for chunk in data.chunks(META_BLOCK_SIZE) {
        locations.push(at + m.position().0);
        m.append(chunk)?;
    }
    let mut out = m.finish()?;
    let list_at = at + out.len() as u64;
    for l in locations {
        out.put_u64(l);
    }
    Ok((out, list_at))
}
