//! Reading SquashFS 4.0 images in place.
//!
//! Images are untrusted: every position, size and count is checked against
//! the table it must lie in before it is used, decompression is bounded by
//! the block size, directory loops and shared directories are refused, and
//! no structure is allocated larger than what the image can really hold.

use std::collections::HashMap;
use std::io::{self, Read};
use std::sync::{Arc, Mutex};

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use super::compress::{self, XzConfig, xz_flags};
use super::format::{
    BLOCK_UNCOMPRESSED, CompressorId, Cursor, META_BLOCK_SIZE, META_UNCOMPRESSED, NO_FRAGMENT,
    NO_TABLE, NO_XATTR, SUPERBLOCK_SIZE, Superblock, XATTR_OUT_OF_LINE, XATTR_PREFIXES, flags,
    inode_type,
};
use crate::error::{Error, Result, corrupt};
use crate::io::ReadAt;
use crate::tree::{FileContent, Kind, Meta, Node, Source, Xattr};

mod layout;

/// At most this many data blocks per file (64 MiB of block list).
const MAX_FILE_BLOCKS: u64 = 1 << 24;
/// Directory nesting deeper than this is refused.
const MAX_DEPTH: usize = 1024;
/// Decoded metadata blocks kept in memory.
const META_CACHE_BLOCKS: usize = 4096;
/// Data blocks decompressed together when streaming a file.
const READ_AHEAD_BLOCKS: usize = 8;

/// What an inode is, with its type-specific fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InodeKind {
    Dir {
        start_block: u32,
        offset: u16,
        /// Listing size as stored (3 more than the bytes of the listing).
        size: u32,
        parent: u32,
        /// An extended directory's index, which the kernel's lookups
        /// follow ([`Archive::read_dir`] checks it against the listing).
        index: Vec<DirIndexEntry>,
    },
    File(FileInode),
    Symlink(Vec<u8>),
    BlockDev(u32),
    CharDev(u32),
    Fifo,
    Socket,
}

/// One entry of a directory index: where a header of the listing is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirIndexEntry {
    /// Byte offset of the header in the listing.
    pub index: u32,
    /// Start of the metadata block holding it, from the directory table's.
    pub start: u32,
    /// The header's first name.
    pub name: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInode {
    pub blocks_start: u64,
    pub size: u64,
    pub sparse: u64,
    pub fragment_index: u32,
    pub fragment_offset: u32,
    pub block_sizes: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    pub number: u32,
    /// The stored inode type (basic or extended).
    pub raw_type: u16,
    /// Permission bits only.
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u32,
    pub nlink: u32,
    pub xattr: u32,
    pub kind: InodeKind,
}

impl Inode {
    /// `st_mode`-style type and permission bits.
    pub fn st_mode(&self) -> u32 {
        let t = match self.kind {
            InodeKind::Dir { .. } => 0o040000,
            InodeKind::File(_) => 0o100000,
            InodeKind::Symlink(_) => 0o120000,
            InodeKind::BlockDev(_) => 0o060000,
            InodeKind::CharDev(_) => 0o020000,
            InodeKind::Fifo => 0o010000,
            InodeKind::Socket => 0o140000,
        };
        t | (self.mode as u32 & 0o7777)
    }
}

#[derive(Debug, Clone)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub inode_ref: u64,
    pub inode_number: u32,
    pub entry_type: u16,
}

/// Decoded metadata blocks by position, with their on-disk size.
type MetaCache = HashMap<u64, (Arc<Vec<u8>>, u64)>;

/// SHA-256 digests of the file tails an image keeps in fragment blocks, by
/// (fragment index, offset, length). They are a function of the stored
/// fragment blocks alone, which [`Archive::fragment_identity`] names, so they
/// can be kept from one build to the next.
pub type TailDigests = HashMap<(u32, u32, u32), [u8; 32]>;

/// Tails compared by digest (see [`Archive::use_tail_digests`]).
struct TailState {
    /// Kept from earlier builds.
    kept: TailDigests,
    /// Computed by this build.
    known: Mutex<TailDigests>,
    /// Fragment blocks whose every tail has been hashed (or is being).
    blocks_done: Mutex<std::collections::HashSet<u32>>,
    looked_up: std::sync::atomic::AtomicU64,
    hashed: std::sync::atomic::AtomicU64,
}

/// An open SquashFS image.
pub struct Archive {
    src: Arc<dyn ReadAt>,
    sb: Superblock,
    comp: CompressorId,
    xz_options: Option<(u32, u32)>,
    ids: Vec<u32>,
    fragments: Vec<(u64, u32)>,
    xattr_kv_start: u64,
    xattr_ids: Vec<u64>,
    xattr_count: u32,
    export: Option<Vec<u64>>,
    meta_cache: Mutex<MetaCache>,
    /// Recently decoded fragment blocks, most recent first: small files
    /// share them, and files are mostly read in image order.
    frag_cache: Mutex<Vec<(u32, Arc<Vec<u8>>)>>,
    /// Fragment blocks being decompressed now, so that a second thread
    /// asking for one waits for it rather than decompressing it again.
    frag_flights: Mutex<HashMap<u32, Arc<Mutex<()>>>>,
    /// Fragment blocks decompressed so far (a measure, reported by builds).
    frag_decoded: std::sync::atomic::AtomicU64,
    /// Per fragment block, the distinct tails kept in it: (offset, length).
    frag_tails: std::sync::OnceLock<Vec<Vec<(u32, u32)>>>,
    /// Per fragment block, a digest of the block as stored (see
    /// [`Archive::digest_stored_fragments`]).
    frag_stored: std::sync::OnceLock<Vec<[u8; 32]>>,
    /// Pairs of tails found equal because their blocks are stored alike.
    tails_alike: std::sync::atomic::AtomicU64,
    tails: std::sync::OnceLock<TailState>,
    /// Set by [`Archive::open_ours`]: the settings every block must be in
    /// our writer's exact form with.
    form: Option<XzConfig>,
}

impl std::fmt::Debug for Archive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Archive")
            .field("superblock", &self.sb)
            .finish_non_exhaustive()
    }
}

impl Archive {
    /// Opens the image that starts at byte 0 of `src`; wrap `src` in
    /// [`crate::io::Slice`] to read an image inside another file.
    pub fn open(src: Arc<dyn ReadAt>) -> Result<Arc<Archive>> {
        Self::open_with(src, None)
    }

    /// [`Archive::open`] for an image that must be exactly as our writer
    /// makes it with `xz`, whoever made it (a worker's kit, its diff): the
    /// settings declared; every block read, metadata or data, in our
    /// writer's xz container ([`super::xz_form`]); a block stored
    /// uncompressed only if xz cannot shrink it or it looks incompressible
    /// (the fast profile's rule); every superblock pointer, count and
    /// table exactly where our writer puts it ([`layout`]). The kernel is
    /// stricter than liblzma: a block with another integrity check would
    /// read as EIO there, and it follows pointers our reader never needs.
    pub fn open_ours(src: Arc<dyn ReadAt>, xz: XzConfig) -> Result<Arc<Archive>> {
        let ar = Self::open_with(src, Some(xz))?;
        let declared = ar.xz_config().map(|c| (c.dict_size, c.flags));
        let want = (xz.dict_size, xz.flags & xz_flags::ALL & !xz_flags::EXTREME);
        if declared != Some(want) {
            corrupt!(
                "compressor settings {declared:?} are not our writer's {want:?} (dictionary, filters)"
            );
        }
        ar.check_layout()?;
        Ok(ar)
    }

    fn open_with(src: Arc<dyn ReadAt>, form: Option<XzConfig>) -> Result<Arc<Archive>> {
        let len = src.size()?;
        let mut head = [0u8; SUPERBLOCK_SIZE];
        read_at(&*src, &mut head, 0, "superblock")?;
        let sb = Superblock::parse(&head, len)?;
        let comp = CompressorId::from_u16(sb.compression_id).ok_or_else(|| {
            Error::corrupt(format!("unknown compressor id {}", sb.compression_id))
        })?;
        let mut ar = Archive {
            src,
            comp,
            xz_options: None,
            ids: Vec::new(),
            fragments: Vec::new(),
            xattr_kv_start: 0,
            xattr_ids: Vec::new(),
            xattr_count: 0,
            export: None,
            meta_cache: Mutex::new(HashMap::new()),
            frag_cache: Mutex::new(Vec::new()),
            frag_flights: Mutex::new(HashMap::new()),
            frag_decoded: Default::default(),
            frag_tails: std::sync::OnceLock::new(),
            frag_stored: std::sync::OnceLock::new(),
            tails_alike: Default::default(),
            tails: std::sync::OnceLock::new(),
            form,
            sb,
        };
        if form.is_some() && comp != CompressorId::Xz {
            corrupt!("{}-compressed, where our writer writes xz", comp.name());
        }
        if ar.sb.flags & flags::COMPRESSOR_OPTIONS != 0 && comp == CompressorId::Xz {
            let (opts, _) = ar.read_meta_block(SUPERBLOCK_SIZE as u64, ar.sb.inode_table_start)?;
            let mut c = Cursor::new(&opts);
            ar.xz_options = Some((c.u32()?, c.u32()?));
        }
        let id_bytes = ar.sb.id_count as usize * 4;
        let table = ar.read_lookup_table(ar.sb.id_table_start, id_bytes, "id")?;
        ar.ids = table
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();

        if ar.sb.flags & flags::NO_FRAGMENTS == 0
            && ar.sb.fragment_table_start != NO_TABLE
            && ar.sb.fragment_entry_count > 0
        {
            let n = ar.sb.fragment_entry_count as usize;
            if n as u64 * 16 > len {
                corrupt!("fragment count {n} is larger than the image can hold");
            }
            let table = ar.read_lookup_table(ar.sb.fragment_table_start, n * 16, "fragment")?;
            ar.fragments = table
                .chunks_exact(16)
                .map(|c| {
                    (
                        u64::from_le_bytes(c[..8].try_into().unwrap()),
                        u32::from_le_bytes(c[8..12].try_into().unwrap()),
                    )
                })
                .collect();
        }
        if ar.sb.export_table_start != NO_TABLE && ar.sb.flags & flags::EXPORTABLE != 0 {
            let n = ar.sb.inode_count as usize;
            if n as u64 * 8 > len {
                corrupt!("export table larger than the image");
            }
            let table = ar.read_lookup_table(ar.sb.export_table_start, n * 8, "export")?;
            ar.export = Some(
                table
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            );
        }
        if ar.sb.xattr_id_table_start != NO_TABLE && ar.sb.flags & flags::NO_XATTRS == 0 {
            let mut hdr = [0u8; 16];
            read_at(
                &*ar.src,
                &mut hdr,
                ar.sb.xattr_id_table_start,
                "xattr id table header",
            )?;
            ar.xattr_kv_start = u64::from_le_bytes(hdr[..8].try_into().unwrap());
            ar.xattr_count = u32::from_le_bytes(hdr[8..12].try_into().unwrap());
            let blocks = (ar.xattr_count as u64 * 16).div_ceil(META_BLOCK_SIZE as u64);
            if ar.xattr_kv_start >= ar.sb.xattr_id_table_start || blocks * 8 > len {
                corrupt!("xattr id table header out of range");
            }
            let mut list = vec![0u8; blocks as usize * 8];
            read_at(
                &*ar.src,
                &mut list,
                ar.sb.xattr_id_table_start + 16,
                "xattr id table",
            )?;
            ar.xattr_ids = list
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                .collect();
        }
        Ok(Arc::new(ar))
    }

    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    pub fn compressor(&self) -> CompressorId {
        self.comp
    }

    /// The xz settings stored in the image's options block (dictionary
    /// size, filter flags), if any.
    pub fn xz_options(&self) -> Option<(u32, u32)> {
        self.xz_options
    }

    /// The xz configuration the image's options describe, for comparing
    /// with a writer's.
    pub fn xz_config(&self) -> Option<XzConfig> {
        (self.comp == CompressorId::Xz).then(|| {
            let mut c = XzConfig::for_block_size(self.sb.block_size);
            if let Some((dict, f)) = self.xz_options {
                c.dict_size = dict;
                c.flags = f;
            }
            c
        })
    }

    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    pub fn fragment_count(&self) -> usize {
        self.fragments.len()
    }

    /// Inode number -> inode reference, from the export table if the image has one.
    pub fn export_lookup(&self, number: u32) -> Option<u64> {
        let t = self.export.as_ref()?;
        t.get(number.checked_sub(1)? as usize).copied()
    }

    fn decompress(&self, data: &[u8], max: usize) -> Result<Vec<u8>> {
        let out = compress::decompress(self.comp, data, max)?;
        if let Some(xz) = &self.form {
            super::xz_form::check(xz, data, &out)?;
        }
        Ok(out)
    }

    /// With [`Archive::open_ours`]: a block stored uncompressed must be one
    /// our writer stores so.
    fn check_stored_raw(&self, raw: &[u8]) -> Result<()> {
        match &self.form {
            Some(xz)
                if !super::data::looks_incompressible(raw) && xz.compress_here(raw)?.is_some() =>
            {
                corrupt!(
                    "a block of {} bytes stored uncompressed, which our writer compresses",
                    raw.len()
                )
            }
            _ => Ok(()),
        }
    }

    /// Reads the metadata block at absolute position `pos`, which must end
    /// before `limit`. Returns its contents and the position of the next.
    fn read_meta_block(&self, pos: u64, limit: u64) -> Result<(Arc<Vec<u8>>, u64)> {
        if let Some(b) = self.meta_cache.lock().expect("cache lock").get(&pos) {
            let hdr_len = 2 + b.1;
            return Ok((b.0.clone(), pos + hdr_len));
        }
        if pos.checked_add(2).is_none_or(|e| e > limit) {
            corrupt!("metadata block at {pos} lies outside its table");
        }
        let mut hdr = [0u8; 2];
        read_at(&*self.src, &mut hdr, pos, "metadata header")?;
        let h = u16::from_le_bytes(hdr);
        let size = (h & !META_UNCOMPRESSED) as u64;
        if size == 0 || size > META_BLOCK_SIZE as u64 || pos + 2 + size > limit {
            corrupt!("metadata block at {pos} has invalid size {size}");
        }
        let mut raw = vec![0u8; size as usize];
        read_at(&*self.src, &mut raw, pos + 2, "metadata block")?;
        let data = if h & META_UNCOMPRESSED != 0 {
            self.check_stored_raw(&raw)?;
            raw
        } else {
            self.decompress(&raw, META_BLOCK_SIZE)?
        };
        let data = Arc::new(data);
        let mut cache = self.meta_cache.lock().expect("cache lock");
        if cache.len() >= META_CACHE_BLOCKS {
            cache.clear();
        }
        cache.insert(pos, (data.clone(), size));
        Ok((data, pos + 2 + size))
    }

    /// Lookup tables (ids, fragments, export): a list of metadata block
    /// positions at `list_at`, the entries in those blocks.
    fn read_lookup_table(&self, list_at: u64, bytes: usize, what: &str) -> Result<Vec<u8>> {
        let blocks = bytes.div_ceil(META_BLOCK_SIZE);
        if list_at == NO_TABLE
            || list_at
                .checked_add(blocks as u64 * 8)
                .is_none_or(|e| e > self.sb.bytes_used)
        {
            corrupt!("{what} table position out of range");
        }
        let mut list = vec![0u8; blocks * 8];
        read_at(&*self.src, &mut list, list_at, what)?;
        let mut out = Vec::with_capacity(bytes);
        for (i, c) in list.chunks_exact(8).enumerate() {
            let pos = u64::from_le_bytes(c.try_into().unwrap());
            if pos < self.sb.directory_table_start || pos >= list_at {
                corrupt!("{what} table block {i} at {pos} out of range");
            }
            let (block, _) = self.read_meta_block(pos, list_at)?;
            let want = (bytes - out.len()).min(META_BLOCK_SIZE);
            if block.len() < want {
                corrupt!("{what} table block {i} too short");
            }
            out.extend_from_slice(&block[..want]);
        }
        Ok(out)
    }

    fn id(&self, idx: u16) -> Result<u32> {
        match self.ids.get(idx as usize) {
            Some(&v) => Ok(v),
            None => corrupt!(
                "id index {idx} beyond the id table ({} entries)",
                self.ids.len()
            ),
        }
    }

    pub fn root_inode(&self) -> Result<Inode> {
        self.inode(self.sb.root_inode_ref)
    }

    /// Reads the inode at reference `(block << 16) | offset`.
    pub fn inode(&self, iref: u64) -> Result<Inode> {
        let start = self.sb.inode_table_start + (iref >> 16);
        let offset = (iref & 0xFFFF) as usize;
        let limit = self.sb.directory_table_start;
        if start >= limit || offset >= META_BLOCK_SIZE {
            corrupt!("inode reference {iref:#x} out of range");
        }
        let mut reader = MetaStream {
            ar: self,
            pos: start,
            off: offset,
            limit,
            blocks: Vec::new(),
        };
        let base = reader.read(16)?;
        let mut c = Cursor::new(&base);
        let raw_type = c.u16()?;
        let mode = c.u16()? & 0o7777;
        let uid = self.id(c.u16()?)?;
        let gid = self.id(c.u16()?)?;
        let mtime = c.u32()?;
        let number = c.u32()?;
        if number == 0 || number > self.sb.inode_count {
            corrupt!(
                "inode number {number} out of range (image has {})",
                self.sb.inode_count
            );
        }
        let mut xattr = NO_XATTR;
        let u32s = |r: &mut MetaStream<'_>, n: usize| -> Result<Vec<u32>> {
            let b = r.read(n * 4)?;
            Ok(b.chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
                .collect())
        };
        let (nlink, kind) = match raw_type {
            inode_type::DIR | inode_type::EXT_DIR => {
                let mut index = Vec::new();
                let (nlink, size, start_block, parent, offset) = if raw_type == inode_type::DIR {
                    let b = reader.read(16)?;
                    let mut c = Cursor::new(&b);
                    let start_block = c.u32()?;
                    let nlink = c.u32()?;
                    let size = c.u16()? as u32;
                    let offset = c.u16()?;
                    (nlink, size, start_block, c.u32()?, offset)
                } else {
                    let b = reader.read(24)?;
                    let mut c = Cursor::new(&b);
                    let nlink = c.u32()?;
                    let size = c.u32()?;
                    let start_block = c.u32()?;
                    let parent = c.u32()?;
                    let index_count = c.u16()? as u32;
                    let offset = c.u16()?;
                    xattr = c.u32()?;
                    // Each indexed header holds at least one entry: 12 + 8 + 1
                    // bytes of listing (which bounds what is read here).
                    if index_count > size / 21 {
                        corrupt!(
                            "directory inode {number}: an index of {index_count} entries \
                             for a listing of {size} bytes"
                        );
                    }
                    for _ in 0..index_count {
                        let b = reader.read(12)?;
                        let mut c = Cursor::new(&b);
                        let (at, start, name_len) = (c.u32()?, c.u32()?, c.u32()? as usize + 1);
                        if name_len > 256 {
                            corrupt!("directory inode {number}: index name of {name_len} bytes");
                        }
                        index.push(DirIndexEntry {
                            index: at,
                            start,
                            name: reader.read(name_len)?,
                        });
                    }
                    (nlink, size, start_block, parent, offset)
                };
                let kind = InodeKind::Dir {
                    start_block,
                    offset,
                    size,
                    parent,
                    index,
                };
                (nlink, kind)
            }
            inode_type::FILE | inode_type::EXT_FILE => {
                let (blocks_start, size, sparse, nlink, frag, frag_off) =
                    if raw_type == inode_type::FILE {
                        let v = u32s(&mut reader, 4)?;
                        (v[0] as u64, v[3] as u64, 0, 1, v[1], v[2])
                    } else {
                        let b = reader.read(40)?;
                        let mut c = Cursor::new(&b);
                        let bs = c.u64()?;
                        let size = c.u64()?;
                        let sparse = c.u64()?;
                        let nlink = c.u32()?;
                        let frag = c.u32()?;
                        let off = c.u32()?;
                        xattr = c.u32()?;
                        (bs, size, sparse, nlink, frag, off)
                    };
                let bs = self.sb.block_size as u64;
                let count = if frag == NO_FRAGMENT {
                    size.div_ceil(bs)
                } else {
                    size / bs
                };
                if count > MAX_FILE_BLOCKS {
                    corrupt!("inode {number}: file of {size} bytes has too many blocks");
                }
                if frag != NO_FRAGMENT && frag as usize >= self.fragments.len() {
                    corrupt!("inode {number}: fragment {frag} does not exist");
                }
                let block_sizes = u32s(&mut reader, count as usize)?;
                (
                    nlink,
                    InodeKind::File(FileInode {
                        blocks_start,
                        size,
                        sparse,
                        fragment_index: frag,
                        fragment_offset: frag_off,
                        block_sizes,
                    }),
                )
            }
            inode_type::SYMLINK | inode_type::EXT_SYMLINK => {
                let v = u32s(&mut reader, 2)?;
                if v[1] as usize > 4096 {
                    corrupt!("inode {number}: symlink target of {} bytes", v[1]);
                }
                let target = reader.read(v[1] as usize)?;
                if raw_type == inode_type::EXT_SYMLINK {
                    xattr = u32s(&mut reader, 1)?[0];
                }
                (v[0], InodeKind::Symlink(target))
            }
            inode_type::BLOCK_DEV..=inode_type::SOCKET
            | inode_type::EXT_BLOCK_DEV..=inode_type::EXT_SOCKET => {
                // nlink, then the device number for devices, then the xattr
                // index for extended inodes.
                let ext = raw_type >= inode_type::EXT_DIR;
                let basic = if ext { raw_type - 7 } else { raw_type };
                let is_dev = matches!(basic, inode_type::BLOCK_DEV | inode_type::CHAR_DEV);
                let n = 1 + usize::from(is_dev) + usize::from(ext);
                let v = u32s(&mut reader, n)?;
                if ext {
                    xattr = v[n - 1];
                }
                let kind = match basic {
                    inode_type::BLOCK_DEV => InodeKind::BlockDev(v[1]),
                    inode_type::CHAR_DEV => InodeKind::CharDev(v[1]),
                    inode_type::FIFO => InodeKind::Fifo,
                    _ => InodeKind::Socket,
                };
                (v[0], kind)
            }
            other => corrupt!("inode {number}: unknown inode type {other}"),
        };
        if xattr != NO_XATTR && xattr >= self.xattr_count {
            corrupt!("inode {number}: xattr index {xattr} beyond the xattr table");
        }
        Ok(Inode {
            number,
            raw_type,
            mode,
            uid,
            gid,
            mtime,
            nlink,
            xattr,
            kind,
        })
    }

    /// Lists a directory inode's entries in stored order.
    pub fn read_dir(&self, dir: &Inode) -> Result<Vec<DirEntry>> {
        let InodeKind::Dir {
            start_block,
            offset,
            size,
            ref index,
            ..
        } = dir.kind
        else {
            corrupt!("inode {} is not a directory", dir.number);
        };
        if size < 3 {
            corrupt!("directory inode {} has invalid size {size}", dir.number);
        }
        let len = size as usize - 3;
        let start = self.sb.directory_table_start + start_block as u64;
        let limit = self.table_end_after_directories();
        if start >= limit || offset as usize >= META_BLOCK_SIZE {
            corrupt!(
                "directory inode {}: listing position out of range",
                dir.number
            );
        }
        let mut stream = MetaStream {
            ar: self,
            pos: start,
            off: offset as usize,
            limit,
            blocks: Vec::new(),
        };
        let data = stream.read(len)?;
        let mut c = Cursor::new(&data);
        let mut out: Vec<DirEntry> = Vec::new();
        // (offset in the listing, index in `out`) of each header.
        let mut headers = Vec::new();
        while c.remaining() > 0 {
            headers.push((data.len() - c.remaining(), out.len()));
            let count = c.u32()? as usize + 1;
            let block = c.u32()? as u64;
            let base = c.u32()?;
            if count > 256 {
                corrupt!(
                    "directory inode {}: header with {count} entries",
                    dir.number
                );
            }
            for _ in 0..count {
                let off = c.u16()? as u64;
                let diff = c.u16()? as i16;
                let entry_type = c.u16()?;
                let name_len = c.u16()? as usize + 1;
                if name_len > 256 {
                    corrupt!("directory inode {}: name of {name_len} bytes", dir.number);
                }
                let name = c.take(name_len)?.to_vec();
                if name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0) {
                    corrupt!(
                        "directory inode {}: invalid entry name {:?}",
                        dir.number,
                        String::from_utf8_lossy(&name)
                    );
                }
                if off >= META_BLOCK_SIZE as u64 || !(1..=7).contains(&entry_type) {
                    corrupt!("directory inode {}: bad entry", dir.number);
                }
                let number = (base as i64 + diff as i64) as u32;
                out.push(DirEntry {
                    name,
                    inode_ref: (block << 16) | off,
                    inode_number: number,
                    entry_type,
                });
            }
        }
        // The kernel looks names up through the index: each entry must name
        // a header, its first name and the metadata block it starts in, in
        // listing order. (Which headers are indexed is the writer's choice.)
        let mut after = None;
        for e in index {
            let at = e.index as usize;
            let block = (offset as usize + at) / META_BLOCK_SIZE;
            let header = headers.iter().find(|h| h.0 == at);
            let right = header.is_some_and(|&(_, first)| out[first].name == e.name)
                && stream
                    .blocks
                    .get(block)
                    .is_some_and(|&b| b == self.sb.directory_table_start + e.start as u64)
                && after.is_none_or(|a| a < at);
            if !right {
                corrupt!(
                    "directory inode {}: index entry {:?} at {at} does not match the listing",
                    dir.number,
                    String::from_utf8_lossy(&e.name)
                );
            }
            after = Some(at);
        }
        Ok(out)
    }

    fn table_end_after_directories(&self) -> u64 {
        [
            self.sb.fragment_table_start,
            self.sb.export_table_start,
            self.sb.id_table_start,
            self.sb.xattr_id_table_start,
        ]
        .into_iter()
        .filter(|&t| t != NO_TABLE && t > self.sb.directory_table_start)
        .map(|t| t.min(self.sb.bytes_used))
        .min()
        .unwrap_or(self.sb.bytes_used)
    }

    /// The xattrs of an inode, full keys in stored order.
    pub fn xattrs(&self, index: u32) -> Result<Vec<Xattr>> {
        if index == NO_XATTR {
            return Ok(Vec::new());
        }
        if index >= self.xattr_count {
            corrupt!("xattr index {index} out of range");
        }
        let byte = index as usize * 16;
        let block = self
            .xattr_ids
            .get(byte / META_BLOCK_SIZE)
            .copied()
            .unwrap_or(NO_TABLE);
        let limit = self.sb.xattr_id_table_start;
        if block < self.xattr_kv_start || block >= limit {
            corrupt!("xattr id block out of range");
        }
        let e = MetaStream {
            ar: self,
            pos: block,
            off: byte % META_BLOCK_SIZE,
            limit,
            blocks: Vec::new(),
        }
        .read(16)?;
        let mut c = Cursor::new(&e);
        let kv_ref = c.u64()?;
        let count = c.u32()?;
        let _size = c.u32()?;
        if count > 65536 {
            corrupt!("xattr set with {count} entries");
        }
        let mut stream = MetaStream {
            ar: self,
            pos: self.xattr_kv_start + (kv_ref >> 16),
            off: (kv_ref & 0xFFFF) as usize,
            limit,
            blocks: Vec::new(),
        };
        let mut out = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let h = stream.read(4)?;
            let ty = u16::from_le_bytes([h[0], h[1]]);
            let name_len = u16::from_le_bytes([h[2], h[3]]) as usize;
            let prefix = XATTR_PREFIXES
                .get((ty & !XATTR_OUT_OF_LINE) as usize)
                .ok_or_else(|| Error::corrupt(format!("unknown xattr prefix id {ty}")))?;
            let mut key = prefix.to_vec();
            key.extend_from_slice(&stream.read(name_len)?);
            let vlen = u32::from_le_bytes(stream.read(4)?.try_into().unwrap()) as usize;
            let value = if ty & XATTR_OUT_OF_LINE != 0 {
                if vlen != 8 {
                    corrupt!("out-of-line xattr reference of {vlen} bytes");
                }
                let r = u64::from_le_bytes(stream.read(8)?.try_into().unwrap());
                let mut at = MetaStream {
                    ar: self,
                    pos: self.xattr_kv_start + (r >> 16),
                    off: (r & 0xFFFF) as usize,
                    limit,
                    blocks: Vec::new(),
                };
                let n = u32::from_le_bytes(at.read(4)?.try_into().unwrap()) as usize;
                check_xattr_len(n)?;
                at.read(n)?
            } else {
                check_xattr_len(vlen)?;
                stream.read(vlen)?
            };
            out.push((key, value));
        }
        Ok(out)
    }

    /// How many bytes of fragment block `index` the image's files use (each
    /// distinct tail counted once); `None` for a block that does not exist.
    pub fn fragment_usage(&self, index: u32) -> Result<Option<u64>> {
        Ok(self
            .fragment_tails()?
            .get(index as usize)
            .map(|t| t.iter().map(|&(_, len)| len as u64).sum()))
    }

    /// For each fragment block, the distinct tails the image's files keep in
    /// it, as (offset, length) in order. Walks the image's metadata once.
    fn fragment_tails(&self) -> Result<&[Vec<(u32, u32)>]> {
        if let Some(t) = self.frag_tails.get() {
            return Ok(t);
        }
        let bs = self.sb.block_size as u64;
        let mut tails = vec![Vec::new(); self.fragments.len()];
        self.walk(&mut |_, inode| {
            if let InodeKind::File(f) = &inode.kind
                && let Some(t) = tails.get_mut(f.fragment_index as usize)
            {
                t.push((f.fragment_offset, (f.size % bs) as u32));
            }
            Ok(())
        })?;
        for t in &mut tails {
            t.sort_unstable();
            t.dedup();
        }
        Ok(self.frag_tails.get_or_init(|| tails))
    }

    /// A fragment block as stored: its size field and bytes.
    pub fn stored_fragment(&self, index: u32) -> Result<(u32, Vec<u8>)> {
        let &(start, size) = self
            .fragments
            .get(index as usize)
            .ok_or_else(|| Error::corrupt(format!("fragment {index} does not exist")))?;
        Ok((size, self.stored(start, size, "fragment block")?))
    }

    /// (fragment blocks decompressed so far, fragment blocks in the image).
    pub fn fragment_reads(&self) -> (u64, u64) {
        (
            self.frag_decoded.load(std::sync::atomic::Ordering::Relaxed),
            self.fragments.len() as u64,
        )
    }

    /// Reads every fragment block as stored (decompressing nothing) and
    /// keeps a digest of each: its size field and bytes. From then on, when
    /// both images have done this, [`ImageFile::same_stored_content`] finds
    /// two tails at the same offset of blocks stored alike equal without
    /// decompressing either. After a point release most fragment blocks are
    /// stored exactly as before: mksquashfs fills them in order, so a
    /// changed tail moves only the tails after it in its own block, unless
    /// the block's free space is too small to absorb the change.
    pub fn digest_stored_fragments(&self) -> Result<()> {
        if self.frag_stored.get().is_some() {
            return Ok(());
        }
        let blocks: Result<Vec<[u8; 32]>> = self
            .fragments
            .par_iter()
            .map(|&(start, size)| {
                let raw = self.stored(start, size, "fragment block")?;
                let mut h = Sha256::new();
                h.update(size.to_le_bytes());
                h.update(&raw);
                Ok(h.finalize().into())
            })
            .collect();
        let _ = self.frag_stored.set(blocks?);
        Ok(())
    }

    /// Pairs of tails this image found equal to another image's from the
    /// stored fragment blocks alone.
    pub fn tails_stored_alike(&self) -> u64 {
        self.tails_alike.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Names the contents of every fragment block: a digest of the blocks'
    /// stored digests ([`Archive::digest_stored_fragments`]) with what
    /// decides how they decompress (compressor, block size).
    pub fn fragment_identity(&self) -> Result<[u8; 32]> {
        self.digest_stored_fragments()?;
        let blocks = self.frag_stored.get().expect("digested above");
        let mut h = Sha256::new();
        h.update(b"iukfarm fragment blocks 1\0");
        h.update(self.sb.compression_id.to_le_bytes());
        h.update(self.sb.block_size.to_le_bytes());
        h.update((self.fragments.len() as u64).to_le_bytes());
        for b in blocks {
            h.update(b);
        }
        Ok(h.finalize().into())
    }

    /// From now on, [`ImageFile::same_stored_content`] compares this image's
    /// tails by digest (when the other image does too), starting from
    /// `known`: digests kept from an earlier build of an image with the same
    /// [`Archive::fragment_identity`]. A known tail costs a look-up instead of
    /// decompressing its fragment block. Only the first call counts.
    pub fn use_tail_digests(&self, known: TailDigests) {
        let _ = self.tails.set(TailState {
            kept: known,
            known: Mutex::new(TailDigests::new()),
            blocks_done: Default::default(),
            looked_up: Default::default(),
            hashed: Default::default(),
        });
    }

    /// Every tail digest known now (kept and computed), when digests are in use.
    pub fn tail_digests(&self) -> Option<TailDigests> {
        let t = self.tails.get()?;
        let mut all = t.kept.clone();
        all.extend(t.known.lock().expect("tails lock").iter());
        Some(all)
    }

    /// (look-ups answered by digests kept from earlier builds, tails this
    /// build decompressed and hashed).
    pub fn tail_digest_counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.tails.get().map_or((0, 0), |t| {
            (t.looked_up.load(Relaxed), t.hashed.load(Relaxed))
        })
    }

    fn tail_digest(&self, t: &TailState, f: &FileInode, tail: usize) -> Result<[u8; 32]> {
        use std::sync::atomic::Ordering::Relaxed;
        tail_range(f.fragment_offset, tail, self.sb.block_size as usize)?;
        let key = (f.fragment_index, f.fragment_offset, tail as u32);
        if let Some(d) = t.kept.get(&key) {
            t.looked_up.fetch_add(1, Relaxed);
            return Ok(*d);
        }
        if let Some(d) = t.known.lock().expect("tails lock").get(&key) {
            return Ok(*d);
        }
        let block = self.fragment_block(f.fragment_index)?;
        let d: [u8; 32] =
            Sha256::digest(&block[tail_range(f.fragment_offset, tail, block.len())?]).into();
        // The block is decompressed now: hash every tail in it, so that a
        // later build needs none of it whatever pairs it compares.
        let mut found = vec![(key, d)];
        if t.blocks_done
            .lock()
            .expect("tails lock")
            .insert(f.fragment_index)
        {
            let all = self.fragment_tails()?;
            for &(o, l) in all.get(f.fragment_index as usize).into_iter().flatten() {
                let k = (f.fragment_index, o, l);
                if k != key
                    && let Some(b) = block.get(o as usize..o as usize + l as usize)
                {
                    found.push((k, Sha256::digest(b).into()));
                }
            }
        }
        let mut known = t.known.lock().expect("tails lock");
        for (k, v) in found {
            if !t.kept.contains_key(&k) && known.insert(k, v).is_none() {
                t.hashed.fetch_add(1, Relaxed);
            }
        }
        Ok(d)
    }

    /// Reads a fragment block (decompressed).
    fn fragment_block(&self, index: u32) -> Result<Arc<Vec<u8>>> {
        const KEEP: usize = 16;
        let cached = || {
            (self.frag_cache.lock().expect("cache lock").iter())
                .find(|(i, _)| *i == index)
                .map(|(_, b)| b.clone())
        };
        if let Some(b) = cached() {
            return Ok(b);
        }
        let flight = (self.frag_flights.lock().expect("flights lock"))
            .entry(index)
            .or_default()
            .clone();
        let _turn = flight.lock().expect("flight lock");
        // Whoever held the turn before has left the block in the cache.
        if let Some(b) = cached() {
            return Ok(b);
        }
        let result = self.decompress_fragment(index);
        if let Ok(block) = &result {
            let mut cache = self.frag_cache.lock().expect("cache lock");
            cache.insert(0, (index, block.clone()));
            cache.truncate(KEEP);
        }
        self.frag_flights
            .lock()
            .expect("flights lock")
            .remove(&index);
        result
    }

    fn decompress_fragment(&self, index: u32) -> Result<Arc<Vec<u8>>> {
        let &(start, size) = self
            .fragments
            .get(index as usize)
            .ok_or_else(|| Error::corrupt(format!("fragment {index} does not exist")))?;
        let block = Arc::new(self.data_block(start, size, self.sb.block_size as usize)?);
        self.frag_decoded
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(block)
    }

    /// The bytes of a block as stored (`size` is its size field), after
    /// checking that the field is valid and the block lies in the data area.
    fn stored(&self, start: u64, size: u32, what: &str) -> Result<Vec<u8>> {
        let len = (size & !BLOCK_UNCOMPRESSED) as usize;
        if size & !(BLOCK_UNCOMPRESSED | 0x00FF_FFFF) != 0 || len > self.sb.block_size as usize {
            corrupt!("{what} size {size:#x} invalid");
        }
        if start
            .checked_add(len as u64)
            .is_none_or(|e| e > self.sb.inode_table_start)
        {
            corrupt!("{what} at {start} (+{len}) outside the data area");
        }
        let mut raw = vec![0u8; len];
        read_at(&*self.src, &mut raw, start, what)?;
        Ok(raw)
    }

    /// Reads and decompresses one stored data block of at most `max` bytes.
    fn data_block(&self, start: u64, size: u32, max: usize) -> Result<Vec<u8>> {
        let raw = self.stored(start, size, "data block")?;
        if size & BLOCK_UNCOMPRESSED != 0 {
            if raw.len() > max {
                corrupt!("uncompressed data block larger than expected");
            }
            self.check_stored_raw(&raw)?;
            Ok(raw)
        } else {
            self.decompress(&raw, max)
        }
    }

    /// Opens a file inode for sequential reading, with read-ahead blocks
    /// decompressed in parallel.
    pub fn open_file(self: &Arc<Self>, file: &FileInode) -> FileReader {
        FileReader {
            ar: self.clone(),
            file: file.clone(),
            next_block: 0,
            disk_pos: file.blocks_start,
            buf: Vec::new(),
            buf_pos: 0,
            done: 0,
            ahead: Vec::new(),
        }
    }

    /// Reads a whole file into memory (for small files: kernels, configs).
    pub fn read_file(self: &Arc<Self>, file: &FileInode, limit: u64) -> Result<Vec<u8>> {
        if file.size > limit {
            return Err(Error::Invalid(format!(
                "file of {} bytes exceeds the {limit}-byte limit",
                file.size
            )));
        }
        let mut out = Vec::with_capacity(file.size as usize);
        self.open_file(file)
            .read_to_end(&mut out)
            .map_err(unwrap_io)?;
        Ok(out)
    }

    /// Looks up a path (components separated by `/`) from the root.
    pub fn lookup(&self, path: &[u8]) -> Result<Option<Inode>> {
        let mut inode = self.root_inode()?;
        for comp in path.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
            if !matches!(inode.kind, InodeKind::Dir { .. }) {
                return Ok(None);
            }
            let entries = self.read_dir(&inode)?;
            match entries.into_iter().find(|e| e.name == comp) {
                Some(e) => inode = self.inode(e.inode_ref)?,
                None => return Ok(None),
            }
        }
        Ok(Some(inode))
    }

    /// Reads all metadata (every inode, directory and xattr) and checks that
    /// every data block and fragment lies in the data area, without
    /// decompressing file data. Returns the number of entries.
    pub fn check_metadata(&self) -> Result<u64> {
        let data_end = self.sb.inode_table_start;
        for (i, &(start, size)) in self.fragments.iter().enumerate() {
            let end = start.checked_add((size & 0x00FF_FFFF) as u64);
            if end.is_none_or(|e| e > data_end) {
                corrupt!("fragment block {i} lies outside the data area");
            }
        }
        let mut n = 0u64;
        self.walk(&mut |path, inode| {
            n += 1;
            self.xattrs(inode.xattr)?;
            if let InodeKind::File(f) = &inode.kind {
                let stored: u64 = f
                    .block_sizes
                    .iter()
                    .map(|&b| (b & 0x00FF_FFFF) as u64)
                    .sum();
                if f.blocks_start
                    .checked_add(stored)
                    .is_none_or(|e| e > data_end)
                {
                    corrupt!(
                        "the data of {:?} lies outside the data area",
                        String::from_utf8_lossy(path)
                    );
                }
                if f.fragment_index != NO_FRAGMENT
                    && f.fragment_index as usize >= self.fragments.len()
                {
                    corrupt!(
                        "{:?} names fragment {} of {}",
                        String::from_utf8_lossy(path),
                        f.fragment_index,
                        self.fragments.len()
                    );
                }
            }
            Ok(())
        })?;
        Ok(n)
    }

    /// Visits every entry depth-first in stored order with its path (`""`
    /// for the root). Refuses directory loops and directories reachable
    /// twice, and stops after `inode_count` entries times two.
    pub fn walk(&self, f: &mut dyn FnMut(&[u8], &Inode) -> Result<()>) -> Result<()> {
        let root = self.root_inode()?;
        let mut seen_dirs = std::collections::HashSet::new();
        seen_dirs.insert(self.sb.root_inode_ref);
        let mut visited = 0u64;
        let budget = self.sb.inode_count as u64 * 2 + 16;
        self.walk_at(
            &mut Vec::new(),
            &root,
            0,
            &mut seen_dirs,
            &mut visited,
            budget,
            f,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn walk_at(
        &self,
        path: &mut Vec<u8>,
        inode: &Inode,
        depth: usize,
        seen_dirs: &mut std::collections::HashSet<u64>,
        visited: &mut u64,
        budget: u64,
        f: &mut dyn FnMut(&[u8], &Inode) -> Result<()>,
    ) -> Result<()> {
        *visited += 1;
        if *visited > budget {
            corrupt!("more entries than the image has inodes (directory cycle?)");
        }
        f(path, inode)?;
        if !matches!(inode.kind, InodeKind::Dir { .. }) {
            return Ok(());
        }
        if depth >= MAX_DEPTH {
            corrupt!("directories nested deeper than {MAX_DEPTH}");
        }
        let mut entries = self.read_dir(inode)?;
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(w) = entries.windows(2).find(|w| w[0].name == w[1].name) {
            corrupt!(
                "duplicate entry {:?} in a directory",
                String::from_utf8_lossy(&w[0].name)
            );
        }
        for e in entries {
            let child = self.inode(e.inode_ref)?;
            if child.number != e.inode_number {
                corrupt!(
                    "directory entry inode number {} disagrees with inode {}",
                    e.inode_number,
                    child.number
                );
            }
            if matches!(child.kind, InodeKind::Dir { .. }) && !seen_dirs.insert(e.inode_ref) {
                corrupt!(
                    "directory {:?} is reachable twice (loop)",
                    String::from_utf8_lossy(&e.name)
                );
            }
            let len = path.len();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(&e.name);
            self.walk_at(path, &child, depth + 1, seen_dirs, visited, budget, f)?;
            path.truncate(len);
        }
        Ok(())
    }

    /// The whole image as a tree whose files read from the image. Hard
    /// links become independent files with the same content.
    pub fn to_tree(self: &Arc<Self>) -> Result<Node> {
        let mut stack: Vec<Node> = Vec::new();
        let mut depths: Vec<usize> = Vec::new();
        let mut root: Option<Node> = None;
        self.walk(&mut |path, inode| {
            let depth = if path.is_empty() {
                0
            } else {
                path.iter().filter(|&&b| b == b'/').count() + 1
            };
            while depths.last().is_some_and(|&d| d >= depth) {
                let done = stack.pop().expect("paired");
                depths.pop();
                push_child(&mut stack, &mut root, done);
            }
            let name = path.rsplit(|&b| b == b'/').next().unwrap_or(b"").to_vec();
            let node = self.node_for(name, inode)?;
            stack.push(node);
            depths.push(depth);
            Ok(())
        })?;
        while let Some(done) = stack.pop() {
            push_child(&mut stack, &mut root, done);
        }
        let mut root = root.ok_or_else(|| Error::corrupt("empty image"))?;
        root.sort_children();
        Ok(root)
    }

    fn node_for(self: &Arc<Self>, name: Vec<u8>, inode: &Inode) -> Result<Node> {
        let kind = match &inode.kind {
            InodeKind::Dir { .. } => Kind::Dir(Vec::new()),
            InodeKind::File(f) => Kind::File(FileContent {
                size: f.size,
                source: Source::Image(Arc::new(ImageFile {
                    ar: self.clone(),
                    file: f.clone(),
                })),
            }),
            InodeKind::Symlink(t) => Kind::Symlink(t.clone()),
            InodeKind::BlockDev(d) => Kind::BlockDev(*d),
            InodeKind::CharDev(d) => Kind::CharDev(*d),
            InodeKind::Fifo => Kind::Fifo,
            InodeKind::Socket => Kind::Socket,
        };
        Ok(Node {
            name,
            meta: Meta {
                mode: inode.mode,
                uid: inode.uid,
                gid: inode.gid,
                mtime: inode.mtime,
                xattrs: self.xattrs(inode.xattr)?,
            },
            kind,
        })
    }
}

fn push_child(stack: &mut [Node], root: &mut Option<Node>, done: Node) {
    match stack.last_mut() {
        Some(parent) => {
            if let Kind::Dir(children) = &mut parent.kind {
                children.push(done);
            }
        }
        None => *root = Some(done),
    }
}

fn check_xattr_len(n: usize) -> Result<()> {
    if n > 1 << 20 {
        corrupt!("xattr value of {n} bytes");
    }
    Ok(())
}

fn read_at(src: &dyn ReadAt, buf: &mut [u8], pos: u64, what: &str) -> Result<()> {
    src.read_exact_at(buf, pos).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Error::corrupt(format!(
                "{what} at {pos} lies beyond the end of the image (truncated?)"
            ))
        } else {
            Error::RawIo(e)
        }
    })
}

fn unwrap_io(e: io::Error) -> Error {
    match e.into_inner() {
        Some(inner) => match inner.downcast::<Error>() {
            Ok(engine) => *engine,
            Err(other) => Error::RawIo(io::Error::other(other)),
        },
        None => Error::RawIo(io::Error::other("read failed")),
    }
}

/// Sequential reads through a metadata stream.
struct MetaStream<'a> {
    ar: &'a Archive,
    pos: u64,
    off: usize,
    limit: u64,
    /// Where each block read so far starts, in order.
    blocks: Vec<u64>,
}

impl MetaStream<'_> {
    fn read(&mut self, len: usize) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(len.min(META_BLOCK_SIZE));
        while out.len() < len {
            if self.blocks.last() != Some(&self.pos) {
                self.blocks.push(self.pos);
            }
            let (block, next) = self.ar.read_meta_block(self.pos, self.limit)?;
            if self.off > block.len() {
                corrupt!(
                    "metadata offset {} beyond a {}-byte block",
                    self.off,
                    block.len()
                );
            }
            let n = (block.len() - self.off).min(len - out.len());
            out.extend_from_slice(&block[self.off..self.off + n]);
            self.off += n;
            if self.off == block.len() {
                self.pos = next;
                self.off = 0;
            }
        }
        Ok(out)
    }
}

/// A file inside an image, as a tree content source.
pub struct ImageFile {
    ar: Arc<Archive>,
    file: FileInode,
}

impl ImageFile {
    pub fn open(&self) -> FileReader {
        self.ar.open_file(&self.file)
    }

    pub fn inode(&self) -> &FileInode {
        &self.file
    }

    /// Whether this file's stored blocks can be copied into an image written
    /// with `block_size` and `xz`: same compressor, block size and
    /// dictionary, no filter the writer does not declare.
    pub fn blocks_copyable(&self, block_size: u32, xz: &XzConfig) -> bool {
        let ar = &self.ar;
        ar.sb.block_size == block_size
            && ar
                .xz_config()
                // The same dictionary: a block's container names it, and
                // verification wants our writer's.
                .is_some_and(|c| c.dict_size == xz.dict_size && c.flags & !xz.flags == 0)
    }

    /// The stored form of full block `index`: its size field (with the
    /// uncompressed bit; 0 for a sparse block) and its bytes as stored.
    pub fn stored_block(&self, index: usize, pos: u64) -> Result<(u32, Vec<u8>)> {
        let size = *self
            .file
            .block_sizes
            .get(index)
            .ok_or_else(|| Error::corrupt("block index beyond the block list"))?;
        let len = (size & !BLOCK_UNCOMPRESSED) as usize;
        if size & !(BLOCK_UNCOMPRESSED | 0x00FF_FFFF) != 0 || len > self.ar.sb.block_size as usize {
            corrupt!("data block size {size:#x} invalid");
        }
        if pos
            .checked_add(len as u64)
            .is_none_or(|e| e > self.ar.sb.inode_table_start)
        {
            corrupt!("data block at {pos} (+{len}) outside the data area");
        }
        let mut raw = vec![0u8; len];
        read_at(&*self.ar.src, &mut raw, pos, "data block")?;
        Ok((size, raw))
    }

    pub fn archive(&self) -> &Arc<Archive> {
        &self.ar
    }

    /// The file's tail kept in a fragment block, decompressed (empty when
    /// the file has no fragment).
    pub fn fragment_tail(&self) -> Result<Vec<u8>> {
        let f = &self.file;
        if f.fragment_index == NO_FRAGMENT {
            return Ok(Vec::new());
        }
        let bs = self.ar.sb.block_size as u64;
        if f.size.div_ceil(bs) != f.block_sizes.len() as u64 + 1 {
            corrupt!("file with a fragment has a block list of the wrong length");
        }
        let tail = f.size - f.block_sizes.len() as u64 * bs;
        let block = self.ar.fragment_block(f.fragment_index)?;
        Ok(block[tail_range(f.fragment_offset, tail as usize, block.len())?].to_vec())
    }

    /// Decides whether two files have the same contents by comparing how
    /// they are stored, without decompressing data blocks: when both images
    /// use the same compressor settings and block size and the files have
    /// the same block list, equal stored bytes mean equal contents. Returns
    /// `None` when the stored forms cannot decide (different settings or
    /// block lists), so the caller must compare the decompressed data.
    /// Tails kept in fragment blocks are compared decompressed, or by
    /// digest when both images use them ([`Archive::use_tail_digests`]).
    pub fn same_stored_content(&self, other: &ImageFile) -> Result<Option<bool>> {
        let (a, b) = (&self.file, &other.file);
        if a.size != b.size {
            return Ok(Some(false));
        }
        let same_settings = self.ar.comp == other.ar.comp
            && self.ar.sb.block_size == other.ar.sb.block_size
            && self.ar.xz_options == other.ar.xz_options;
        if !same_settings
            || a.block_sizes != b.block_sizes
            || (a.fragment_index == NO_FRAGMENT) != (b.fragment_index == NO_FRAGMENT)
        {
            return Ok(None);
        }
        let stored: u64 = a
            .block_sizes
            .iter()
            .map(|s| (s & !BLOCK_UNCOMPRESSED) as u64)
            .sum();
        let mut done = 0u64;
        let chunk = stored.min(1 << 20) as usize;
        let (mut x, mut y) = (vec![0u8; chunk], vec![0u8; chunk]);
        while done < stored {
            let n = (stored - done).min(x.len() as u64) as usize;
            for (ar, start, buf) in [
                (&self.ar, a.blocks_start, &mut x),
                (&other.ar, b.blocks_start, &mut y),
            ] {
                let pos = start + done;
                if pos
                    .checked_add(n as u64)
                    .is_none_or(|e| e > ar.sb.inode_table_start)
                {
                    corrupt!("file data at {pos} outside the data area");
                }
                read_at(&*ar.src, &mut buf[..n], pos, "data blocks")?;
            }
            if x[..n] != y[..n] {
                return Ok(Some(false));
            }
            done += n as u64;
        }
        if a.fragment_index == NO_FRAGMENT {
            return Ok(Some(true));
        }
        let tail = (a.size % self.ar.sb.block_size as u64) as usize;
        if let (Some(sa), Some(sb)) = (self.ar.frag_stored.get(), other.ar.frag_stored.get())
            && a.fragment_offset == b.fragment_offset
            && let (Some(da), Some(db)) = (
                sa.get(a.fragment_index as usize),
                sb.get(b.fragment_index as usize),
            )
            && da == db
        {
            // Blocks stored alike under the same settings decompress alike.
            tail_range(a.fragment_offset, tail, self.ar.sb.block_size as usize)?;
            self.ar
                .tails_alike
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(Some(true));
        }
        if let (Some(ta), Some(tb)) = (self.ar.tails.get(), other.ar.tails.get()) {
            return Ok(Some(
                self.ar.tail_digest(ta, a, tail)? == other.ar.tail_digest(tb, b, tail)?,
            ));
        }
        let fa = self.ar.fragment_block(a.fragment_index)?;
        let fb = other.ar.fragment_block(b.fragment_index)?;
        let ra = tail_range(a.fragment_offset, tail, fa.len())?;
        let rb = tail_range(b.fragment_offset, tail, fb.len())?;
        Ok(Some(fa[ra] == fb[rb]))
    }
}

/// Where a file's tail of `len` bytes at `offset` lies in a fragment block of
/// `limit` bytes; the inode that says so is untrusted.
fn tail_range(offset: u32, len: usize, limit: usize) -> Result<std::ops::Range<usize>> {
    let start = offset as usize;
    match start.checked_add(len) {
        Some(end) if end <= limit => Ok(start..end),
        _ => corrupt!("file tail lies outside its fragment block"),
    }
}

/// Streams a file's bytes; errors carry [`Error`] inside `io::Error`.
pub struct FileReader {
    ar: Arc<Archive>,
    file: FileInode,
    next_block: usize,
    disk_pos: u64,
    buf: Vec<u8>,
    buf_pos: usize,
    done: u64,
    ahead: Vec<Vec<u8>>,
}

impl FileReader {
    fn fill(&mut self) -> Result<()> {
        let bs = self.ar.sb.block_size as u64;
        if self.ahead.is_empty() && self.next_block < self.file.block_sizes.len() {
            let end = (self.next_block + READ_AHEAD_BLOCKS).min(self.file.block_sizes.len());
            let mut jobs = Vec::new();
            for i in self.next_block..end {
                let size = self.file.block_sizes[i];
                let expect = (self.file.size - i as u64 * bs).min(bs) as usize;
                jobs.push((self.disk_pos, size, expect));
                self.disk_pos += (size & !BLOCK_UNCOMPRESSED) as u64;
            }
            self.next_block = end;
            let ar = &self.ar;
            let blocks: Vec<Result<Vec<u8>>> = jobs
                .into_par_iter()
                .map(|(pos, size, expect)| {
                    if size == 0 {
                        return Ok(vec![0u8; expect]);
                    }
                    let b = ar.data_block(pos, size, bs as usize)?;
                    if b.len() != expect {
                        corrupt!("data block decodes to {} bytes, expected {expect}", b.len());
                    }
                    Ok(b)
                })
                .collect();
            self.ahead = blocks.into_iter().rev().collect::<Result<Vec<_>>>()?;
        }
        if let Some(b) = self.ahead.pop() {
            self.buf = b;
            self.buf_pos = 0;
            return Ok(());
        }
        let remaining = self.file.size - self.done;
        if remaining > 0 && self.file.fragment_index != NO_FRAGMENT {
            let frag = self.ar.fragment_block(self.file.fragment_index)?;
            let range = tail_range(self.file.fragment_offset, remaining as usize, frag.len())?;
            self.buf = frag[range].to_vec();
            self.buf_pos = 0;
            return Ok(());
        }
        if remaining > 0 {
            corrupt!("file data ends {remaining} bytes early");
        }
        Ok(())
    }
}

impl Read for FileReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.done >= self.file.size || out.is_empty() {
            return Ok(0);
        }
        if self.buf_pos >= self.buf.len() {
            self.buf.clear();
            self.fill().map_err(io::Error::other)?;
            if self.buf.is_empty() {
                return Ok(0);
            }
        }
        let n = (self.buf.len() - self.buf_pos)
            .min(out.len())
            .min((self.file.size - self.done) as usize);
        out[..n].copy_from_slice(&self.buf[self.buf_pos..self.buf_pos + n]);
        self.buf_pos += n;
        self.done += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sqfs::{WriterOptions, write_image};

    #[test]
    fn threads_asking_for_one_fragment_block_at_once_decompress_it_once() {
        // 40 tails of 1,000 bytes: one fragment block.
        let root = Node::flat((0..40u32).map(|i| {
            let data = (0..1000u32).map(|j| ((j ^ (i << 12)).wrapping_mul(2654435761) >> 13) as u8);
            (format!("f{i:02}"), data.collect())
        }));
        let out = tempfile::tempfile().unwrap();
        let opts = WriterOptions::with_block_size(65536);
        write_image(&root, &opts, &out, &crate::NoProgress).unwrap();
        let ar = Archive::open(Arc::new(out)).unwrap();
        assert_eq!(ar.fragment_reads(), (0, 1));
        let start = std::sync::Barrier::new(8);
        let blocks: Vec<Arc<Vec<u8>>> = std::thread::scope(|s| {
            let asks: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        start.wait();
                        ar.fragment_block(0).unwrap()
                    })
                })
                .collect();
            asks.into_iter().map(|a| a.join().unwrap()).collect()
        });
        assert_eq!(blocks[0].len(), 40_000);
        assert!(blocks.iter().all(|b| b == &blocks[0]));
        assert_eq!(ar.fragment_reads(), (1, 1));
        assert!(ar.frag_flights.lock().unwrap().is_empty());
        assert!(
            ar.fragment_block(1).is_err(),
            "a fragment that does not exist"
        );
        assert!(ar.frag_flights.lock().unwrap().is_empty());
    }

    #[test]
    fn open_ours_wants_our_writers_settings_and_codec() {
        let root = Node::flat((0..6u32).map(|i| {
            let data = (0..150_000u32).map(|j| ((j * (i + 1)) % 253) as u8);
            (format!("f{i}"), data.collect())
        }));
        let write = |opts: &WriterOptions| {
            let out = tempfile::tempfile().unwrap();
            write_image(&root, opts, &out, &crate::NoProgress).unwrap();
            Arc::new(out)
        };
        let kit = WriterOptions::with_block_size(131072);
        let ar = Archive::open_ours(write(&kit), kit.xz).unwrap();
        let mut n = 0;
        for e in ar.read_dir(&ar.root_inode().unwrap()).unwrap() {
            if let InodeKind::File(f) = ar.inode(e.inode_ref).unwrap().kind {
                n += ar.read_file(&f, u64::MAX).unwrap().len();
            }
        }
        assert_eq!(n, 6 * 150_000);
        let mut other = kit.xz;
        other.flags = xz_flags::X86;
        let e = Archive::open_ours(write(&kit), other).unwrap_err();
        assert!(e.to_string().contains("not our writer's"), "{e}");
        let mut zstd = kit.clone();
        zstd.zstd_level = Some(3);
        let e = Archive::open_ours(write(&zstd), kit.xz).unwrap_err();
        assert!(e.to_string().contains("zstd-compressed"), "{e}");
    }

    #[test]
    fn a_tail_must_lie_inside_its_block() {
        assert_eq!(tail_range(10, 5, 15).unwrap(), 10..15);
        assert_eq!(tail_range(0, 0, 0).unwrap(), 0..0);
        for (offset, len, limit) in [(10, 6, 15), (u32::MAX, usize::MAX, usize::MAX), (16, 0, 15)] {
            let e = tail_range(offset, len, limit).unwrap_err();
            assert!(e.to_string().contains("outside its fragment block"), "{e}");
        }
    }
}
