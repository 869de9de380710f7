//! On-disk constants and fixed-size structures of SquashFS 4.0 (little endian).
//!
//! Layout reference: the kernel's `Documentation/filesystems/squashfs.rst`.

use crate::error::{Result, corrupt};

pub const MAGIC: u32 = 0x7371_7368;
pub const SUPERBLOCK_SIZE: usize = 96;
pub const META_BLOCK_SIZE: usize = 8192;
pub const NO_TABLE: u64 = u64::MAX;
pub const NO_FRAGMENT: u32 = 0xFFFF_FFFF;
pub const NO_XATTR: u32 = 0xFFFF_FFFF;
/// Bit 24 of a data block size: the block is stored uncompressed.
pub const BLOCK_UNCOMPRESSED: u32 = 1 << 24;
/// Bit 15 of a metadata block header: the block is stored uncompressed.
pub const META_UNCOMPRESSED: u16 = 0x8000;
pub const MIN_BLOCK_SIZE: u32 = 4096;
pub const MAX_BLOCK_SIZE: u32 = 1 << 20;
pub const MAX_DIR_ENTRIES: usize = 256;

pub mod flags {
    pub const UNCOMPRESSED_INODES: u16 = 0x0001;
    pub const UNCOMPRESSED_DATA: u16 = 0x0002;
    pub const UNCOMPRESSED_FRAGMENTS: u16 = 0x0008;
    pub const NO_FRAGMENTS: u16 = 0x0010;
    pub const ALWAYS_FRAGMENTS: u16 = 0x0020;
    pub const NO_DUPLICATES: u16 = 0x0040;
    pub const EXPORTABLE: u16 = 0x0080;
    pub const UNCOMPRESSED_XATTRS: u16 = 0x0100;
    pub const NO_XATTRS: u16 = 0x0200;
    pub const COMPRESSOR_OPTIONS: u16 = 0x0400;
    pub const UNCOMPRESSED_IDS: u16 = 0x0800;
}

/// Compressor ids as stored in the superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressorId {
    Gzip = 1,
    Lzma = 2,
    Lzo = 3,
    Xz = 4,
    Lz4 = 5,
    Zstd = 6,
}

impl CompressorId {
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Self::Gzip,
            2 => Self::Lzma,
            3 => Self::Lzo,
            4 => Self::Xz,
            5 => Self::Lz4,
            6 => Self::Zstd,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Gzip => "gzip",
            Self::Lzma => "lzma",
            Self::Lzo => "lzo",
            Self::Xz => "xz",
            Self::Lz4 => "lz4",
            Self::Zstd => "zstd",
        }
    }
}

/// Inode types; the extended variants are the basic ones plus 7.
pub mod inode_type {
    pub const DIR: u16 = 1;
    pub const FILE: u16 = 2;
    pub const SYMLINK: u16 = 3;
    pub const BLOCK_DEV: u16 = 4;
    pub const CHAR_DEV: u16 = 5;
    pub const FIFO: u16 = 6;
    pub const SOCKET: u16 = 7;
    pub const EXT_DIR: u16 = 8;
    pub const EXT_FILE: u16 = 9;
    pub const EXT_SYMLINK: u16 = 10;
    pub const EXT_BLOCK_DEV: u16 = 11;
    pub const EXT_CHAR_DEV: u16 = 12;
    pub const EXT_FIFO: u16 = 13;
    pub const EXT_SOCKET: u16 = 14;
}

/// Xattr key prefixes by id; bit 8 of the stored id marks an out-of-line value.
pub const XATTR_PREFIXES: [&[u8]; 3] = [b"user.", b"trusted.", b"security."];
pub const XATTR_OUT_OF_LINE: u16 = 0x100;

/// Splits a full xattr key into its prefix id and the rest, the way the
/// SquashFS xattr table stores it. Keys outside user/trusted/security cannot
/// be stored.
pub fn split_xattr_key(key: &[u8]) -> Option<(u16, &[u8])> {
    XATTR_PREFIXES.iter().enumerate().find_map(|(id, prefix)| {
        (key.len() > prefix.len() && key.starts_with(prefix))
            .then(|| (id as u16, &key[prefix.len()..]))
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub inode_count: u32,
    pub modification_time: u32,
    pub block_size: u32,
    pub fragment_entry_count: u32,
    pub compression_id: u16,
    pub block_log: u16,
    pub flags: u16,
    pub id_count: u16,
    pub version_major: u16,
    pub version_minor: u16,
    pub root_inode_ref: u64,
    pub bytes_used: u64,
    pub id_table_start: u64,
    pub xattr_id_table_start: u64,
    pub inode_table_start: u64,
    pub directory_table_start: u64,
    pub fragment_table_start: u64,
    pub export_table_start: u64,
}

impl Superblock {
    pub fn to_bytes(&self) -> [u8; SUPERBLOCK_SIZE] {
        let mut b = [0u8; SUPERBLOCK_SIZE];
        let mut w = Le::new(&mut b);
        w.u32(MAGIC);
        w.u32(self.inode_count);
        w.u32(self.modification_time);
        w.u32(self.block_size);
        w.u32(self.fragment_entry_count);
        w.u16(self.compression_id);
        w.u16(self.block_log);
        w.u16(self.flags);
        w.u16(self.id_count);
        w.u16(self.version_major);
        w.u16(self.version_minor);
        w.u64(self.root_inode_ref);
        w.u64(self.bytes_used);
        w.u64(self.id_table_start);
        w.u64(self.xattr_id_table_start);
        w.u64(self.inode_table_start);
        w.u64(self.directory_table_start);
        w.u64(self.fragment_table_start);
        w.u64(self.export_table_start);
        b
    }

    /// Parses and sanity-checks a superblock. `image_len` is the number of
    /// bytes available from the start of the image.
    pub fn parse(b: &[u8], image_len: u64) -> Result<Self> {
        if b.len() < SUPERBLOCK_SIZE {
            corrupt!("superblock truncated ({} bytes)", b.len());
        }
        let mut r = Cursor::new(b);
        let magic = r.u32()?;
        if magic != MAGIC {
            corrupt!("bad magic {magic:#010x}: not a SquashFS image (or wrong offset)");
        }
        let sb = Superblock {
            inode_count: r.u32()?,
            modification_time: r.u32()?,
            block_size: r.u32()?,
            fragment_entry_count: r.u32()?,
            compression_id: r.u16()?,
            block_log: r.u16()?,
            flags: r.u16()?,
            id_count: r.u16()?,
            version_major: r.u16()?,
            version_minor: r.u16()?,
            root_inode_ref: r.u64()?,
            bytes_used: r.u64()?,
            id_table_start: r.u64()?,
            xattr_id_table_start: r.u64()?,
            inode_table_start: r.u64()?,
            directory_table_start: r.u64()?,
            fragment_table_start: r.u64()?,
            export_table_start: r.u64()?,
        };
        if (sb.version_major, sb.version_minor) != (4, 0) {
            corrupt!(
                "unsupported SquashFS version {}.{} (only 4.0 is supported)",
                sb.version_major,
                sb.version_minor
            );
        }
        if !sb.block_size.is_power_of_two()
            || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&sb.block_size)
            || 1u32.checked_shl(sb.block_log as u32) != Some(sb.block_size)
        {
            corrupt!(
                "invalid block size {} (log {})",
                sb.block_size,
                sb.block_log
            );
        }
        if sb.bytes_used < SUPERBLOCK_SIZE as u64 || sb.bytes_used > image_len {
            corrupt!(
                "image claims {} bytes but only {} are available (truncated?)",
                sb.bytes_used,
                image_len
            );
        }
        if sb.inode_table_start >= sb.bytes_used
            || sb.directory_table_start >= sb.bytes_used
            || sb.inode_table_start > sb.directory_table_start
        {
            corrupt!("inode/directory table positions out of range");
        }
        if sb.id_count == 0 {
            corrupt!("id table is empty");
        }
        Ok(sb)
    }
}

/// Little-endian writer over a fixed buffer.
pub struct Le<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Le<'a> {
    pub fn new(buf: &'a mut [u8]) -> Self {
        Le { buf, pos: 0 }
    }
    pub fn u16(&mut self, v: u16) {
        self.bytes(&v.to_le_bytes());
    }
    pub fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
    pub fn bytes(&mut self, v: &[u8]) {
        self.buf[self.pos..self.pos + v.len()].copy_from_slice(v);
        self.pos += v.len();
    }
}

/// Appends little-endian integers to a byte vector.
pub trait PutLe {
    fn put_u16(&mut self, v: u16);
    fn put_u32(&mut self, v: u32);
    fn put_u64(&mut self, v: u64);
}

impl PutLe for Vec<u8> {
    fn put_u16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_le_bytes());
    }
}

/// Bounds-checked little-endian reader over a byte slice; running off the
/// end is a [`crate::Error::Corrupt`], never a panic.
pub struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }
    pub fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() - self.pos < n {
            corrupt!(
                "structure truncated (wanted {n} bytes at offset {})",
                self.pos
            );
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    pub fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblock_round_trip() {
        let sb = Superblock {
            inode_count: 3,
            modification_time: 1_700_000_000,
            block_size: 131072,
            fragment_entry_count: 1,
            compression_id: 4,
            block_log: 17,
            flags: flags::NO_XATTRS | flags::NO_DUPLICATES,
            id_count: 1,
            version_major: 4,
            version_minor: 0,
            root_inode_ref: 0x20,
            bytes_used: 4000,
            id_table_start: 3990,
            xattr_id_table_start: NO_TABLE,
            inode_table_start: 200,
            directory_table_start: 300,
            fragment_table_start: 400,
            export_table_start: NO_TABLE,
        };
        let b = sb.to_bytes();
        assert_eq!(Superblock::parse(&b, 4096).unwrap(), sb);
        assert!(
            Superblock::parse(&b, 100).is_err(),
            "truncated image accepted"
        );
        assert!(Superblock::parse(&b[..50], 4096).is_err());
    }

    #[test]
    fn xattr_key_split() {
        assert_eq!(
            split_xattr_key(b"security.capability"),
            Some((2, &b"capability"[..]))
        );
        assert_eq!(
            split_xattr_key(b"trusted.overlay.opaque"),
            Some((1, &b"overlay.opaque"[..]))
        );
        assert_eq!(split_xattr_key(b"user."), None);
        assert_eq!(split_xattr_key(b"system.posix_acl_access"), None);
    }
}
