//! A SquashFS writer that produces the bytes gensquashfs 1.2.0 or 1.3.2
//! produces ([`Gensquashfs`] says which).
//!
//! Layout, in file order: superblock, compressor options, data area
//! ([`super::data`]), inode table, directory table, fragment table, id
//! table, xattr table, padding to the device block size. The order of
//! everything inside follows libsquashfs 1.2.0 (1.3.2 differs only where
//! [`Gensquashfs`] is consulted):
//!
//! * inode numbers: for each directory, first its subdirectories are
//!   numbered recursively, then all its entries in name order; the root is
//!   last. Inodes are written in number order, so every directory comes
//!   after its entries, and directory listings are written in that order;
//! * xattr sets are recorded in pre-order (root first), file data is packed
//!   in pre-order;
//! * uid/gid table entries are assigned in inode order, uid before gid;
//! * inode modes are stored without the file type bits; a directory's link
//!   count is 2 plus its number of entries; the root's parent is inode 0;
//! * extended inodes only where needed (xattrs, sparse files, sizes or
//!   positions beyond 32 bits, directories larger than 64 KiB; for 1.3.2
//!   also directories of 256 entries or more), every extended directory
//!   with an index entry per directory header.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::compat::Gensquashfs;
use super::compress::{Codec, XzConfig};
use super::data::{DataStats, DataWriter, FileLayout};
use super::format::{
    MAX_DIR_ENTRIES, META_BLOCK_SIZE, NO_TABLE, NO_XATTR, PutLe, SUPERBLOCK_SIZE, Superblock,
    flags, inode_type,
};
use super::meta::{MetaWriter, encode_table};
use super::xattr_table::XattrTable;
use crate::blockcache::{BlockCache, SharedBlocks};
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::tree::{FileContent, Kind, Node};

/// Writer settings; the defaults are gensquashfs's.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// Whose bytes: gensquashfs 1.2.0's or 1.3.2's.
    pub gensquashfs: Gensquashfs,
    pub block_size: u32,
    pub xz: XzConfig,
    /// Write zstd at this level instead of xz (1 to 22): for system images
    /// like Tails 7's, which are inputs, never kits. Such blocks are
    /// neither cached, shared nor copied.
    pub zstd_level: Option<u32>,
    /// SOURCE_DATE_EPOCH: the superblock's modification time. Inode times
    /// come from the tree (see [`crate::tree::ScanOptions::mtime`]).
    pub mtime: u32,
    /// The image is zero-padded to a multiple of this.
    pub dev_block_size: u32,
    /// Compression threads; 0 means one per available core.
    pub threads: usize,
    /// Where compressed blocks are looked up before compressing; a hit gives
    /// exactly the bytes compressing would.
    pub cache: Option<Arc<BlockCache>>,
    /// Consulted when `cache` misses: blocks other workers of a farm
    /// compressed. Whatever it gives is checked before use.
    pub shared: Option<Arc<dyn SharedBlocks>>,
    /// Fast profile: files read from an image with compatible compressor
    /// settings keep their stored blocks (not gensquashfs's bytes).
    pub copy_image_blocks: bool,
    /// Fast profile: blocks that look incompressible are stored without
    /// trying xz (not gensquashfs's bytes).
    pub skip_incompressible: bool,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            gensquashfs: Gensquashfs::default(),
            block_size: 131072,
            xz: XzConfig::for_block_size(131072),
            zstd_level: None,
            mtime: 0,
            dev_block_size: 4096,
            threads: 0,
            cache: None,
            shared: None,
            copy_image_blocks: false,
            skip_incompressible: false,
        }
    }
}

impl WriterOptions {
    /// Options for a block size with libsquashfs's xz defaults for it.
    pub fn with_block_size(block_size: u32) -> Self {
        WriterOptions {
            block_size,
            xz: XzConfig::for_block_size(block_size),
            ..Default::default()
        }
    }

    pub fn validate(&self) -> Result<()> {
        if !self.block_size.is_power_of_two() || !(4096..=1 << 20).contains(&self.block_size) {
            return Err(Error::Invalid(format!(
                "block size {} must be a power of two between 4 KiB and 1 MiB",
                self.block_size
            )));
        }
        if self.dev_block_size < 1024 {
            return Err(Error::Invalid(
                "device block size must be at least 1024".into(),
            ));
        }
        if self.zstd_level.is_some()
            && (self.cache.is_some() || self.shared.is_some() || self.copy_image_blocks)
        {
            return Err(Error::Invalid(
                "zstd images are written without block cache, helpers or block copying".into(),
            ));
        }
        self.codec().validate()
    }

    /// What compresses blocks and metadata.
    pub fn codec(&self) -> Codec {
        match self.zstd_level {
            Some(level) => Codec::Zstd { level },
            None => Codec::Xz(self.xz),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct WriteStats {
    pub image_size: u64,
    pub bytes_used: u64,
    pub inodes: u32,
    pub data: DataStats,
}

/// One tree node with what the writer computes for it.
struct Entry<'a> {
    node: &'a Node,
    parent: Option<usize>,
    children: Vec<usize>,
    inode_number: u32,
    xattr: u32,
    inode_ref: u64,
    file: Option<usize>,
}

/// Writes `root` (a directory) as a SquashFS image into `out`, which must be
/// empty. Returns statistics; the bytes depend only on the tree, the options
/// and the file contents, never on the thread count.
pub fn write_image(
    root: &Node,
    opts: &WriterOptions,
    out: &File,
    progress: &dyn Progress,
) -> Result<WriteStats> {
    opts.validate()?;
    if !root.is_dir() {
        return Err(Error::Invalid(
            "the root of an image must be a directory".into(),
        ));
    }
    root.validate()?;

    let mut entries = Vec::new();
    flatten(root, None, &mut entries);
    let order = number_inodes(&mut entries)?;

    let mut xattrs = XattrTable::default();
    for e in entries.iter_mut() {
        e.xattr = xattrs.add_set(&e.node.meta.xattrs)?;
    }

    let files: Vec<&FileContent> = entries
        .iter()
        .filter_map(|e| match &e.node.kind {
            Kind::File(c) => Some(c),
            _ => None,
        })
        .collect();
    let mut file_no = 0;
    for e in entries.iter_mut() {
        if matches!(e.node.kind, Kind::File(_)) {
            e.file = Some(file_no);
            file_no += 1;
        }
    }

    let codec = opts.codec();
    let options = codec.options_payload(opts.block_size);
    let mut sb = Superblock {
        inode_count: entries.len() as u32,
        modification_time: opts.mtime,
        block_size: opts.block_size,
        fragment_entry_count: 0,
        compression_id: codec.id() as u16,
        block_log: opts.block_size.trailing_zeros() as u16,
        flags: flags::NO_FRAGMENTS | flags::NO_XATTRS | flags::NO_DUPLICATES,
        id_count: 0,
        version_major: 4,
        version_minor: 0,
        root_inode_ref: 0,
        bytes_used: 0,
        id_table_start: NO_TABLE,
        xattr_id_table_start: NO_TABLE,
        inode_table_start: NO_TABLE,
        directory_table_start: NO_TABLE,
        fragment_table_start: NO_TABLE,
        export_table_start: NO_TABLE,
    };
    out.set_len(0)?;
    out.write_all_at(&sb.to_bytes(), 0)?;
    let mut pos = SUPERBLOCK_SIZE as u64;
    if let Some(payload) = options {
        let mut b = Vec::with_capacity(10);
        b.put_u16(0x8000 | payload.len() as u16);
        b.extend_from_slice(&payload);
        out.write_all_at(&b, pos)?;
        pos += b.len() as u64;
        sb.flags |= flags::COMPRESSOR_OPTIONS;
    }

    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        opts.threads
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("sqfs-compress-{i}"))
        .build()
        .map_err(|e| Error::Compressor(format!("cannot start compression threads: {e}")))?;
    let total: u64 = files.iter().map(|f| f.size).sum();
    progress.phase("compress", total);
    let area = DataWriter {
        out,
        start: pos,
        block_size: opts.block_size,
        cfg: codec,
        cache: opts.cache.clone(),
        shared: opts.shared.clone(),
        copy_image_blocks: opts.copy_image_blocks,
        skip_incompressible: opts.skip_incompressible,
        pool: &pool,
        backlog: 2 * threads + 2,
        progress,
        queue: Default::default(),
    }
    .write(&files)?;
    pos = area.end;

    progress.phase("metadata", 0);
    sb.inode_table_start = pos;
    let mut inodes = MetaWriter::new(codec);
    let mut dirs = MetaWriter::new(codec);
    let mut ids: Vec<u32> = Vec::new();
    for &idx in &order {
        let e = &entries[idx];
        let inode = encode_inode(
            e,
            &entries,
            &area.files,
            opts.gensquashfs,
            &mut dirs,
            &mut ids,
        )?;
        entries[idx].inode_ref = inodes.reference();
        inodes.append(&inode)?;
    }
    sb.root_inode_ref = entries[0].inode_ref;
    let inode_bytes = inodes.finish()?;
    out.write_all_at(&inode_bytes, pos)?;
    pos += inode_bytes.len() as u64;
    sb.directory_table_start = pos;
    let dir_bytes = dirs.finish()?;
    out.write_all_at(&dir_bytes, pos)?;
    pos += dir_bytes.len() as u64;

    if area.fragments.is_empty() {
        sb.fragment_table_start = NO_TABLE;
    } else {
        let mut table = Vec::with_capacity(area.fragments.len() * 16);
        for &(start, size) in &area.fragments {
            table.put_u64(start);
            table.put_u32(size);
            table.put_u32(0);
        }
        let (bytes, at) = encode_table(codec, &table, pos)?;
        out.write_all_at(&bytes, pos)?;
        pos += bytes.len() as u64;
        sb.fragment_table_start = at;
        sb.fragment_entry_count = area.fragments.len() as u32;
        sb.flags &= !flags::NO_FRAGMENTS;
        sb.flags |= flags::ALWAYS_FRAGMENTS;
        if area
            .fragments
            .iter()
            .all(|&(_, s)| s & super::format::BLOCK_UNCOMPRESSED != 0)
        {
            sb.flags |= flags::UNCOMPRESSED_FRAGMENTS;
        }
    }

    let mut table = Vec::with_capacity(ids.len() * 4);
    for id in &ids {
        table.put_u32(*id);
    }
    let (bytes, at) = encode_table(codec, &table, pos)?;
    out.write_all_at(&bytes, pos)?;
    pos += bytes.len() as u64;
    sb.id_table_start = at;
    sb.id_count = ids.len() as u16;

    if !xattrs.is_empty() {
        let (bytes, at) = xattrs.encode(codec, pos)?;
        out.write_all_at(&bytes, pos)?;
        pos += bytes.len() as u64;
        sb.xattr_id_table_start = at;
        sb.flags &= !flags::NO_XATTRS;
    }

    sb.bytes_used = pos;
    out.write_all_at(&sb.to_bytes(), 0)?;
    let dev = opts.dev_block_size as u64;
    let image_size = pos.div_ceil(dev) * dev;
    if image_size > pos {
        out.write_all_at(&vec![0u8; (image_size - pos) as usize], pos)?;
    }
    Ok(WriteStats {
        image_size,
        bytes_used: pos,
        inodes: entries.len() as u32,
        data: area.stats,
    })
}

/// Pre-order flattening: index 0 is the root, and a node's index is smaller
/// than its descendants'.
fn flatten<'a>(node: &'a Node, parent: Option<usize>, out: &mut Vec<Entry<'a>>) -> usize {
    let idx = out.len();
    out.push(Entry {
        node,
        parent,
        children: Vec::new(),
        inode_number: 0,
        xattr: NO_XATTR,
        inode_ref: 0,
        file: None,
    });
    let mut children = Vec::with_capacity(node.children().len());
    for c in node.children() {
        children.push(flatten(c, Some(idx), out));
    }
    out[idx].children = children;
    idx
}

/// Assigns inode numbers the libsquashfs way and returns the entries in
/// inode number order.
fn number_inodes(entries: &mut [Entry<'_>]) -> Result<Vec<usize>> {
    fn go(entries: &mut [Entry<'_>], dir: usize, next: &mut u32, order: &mut Vec<usize>) {
        let children = entries[dir].children.clone();
        for &c in &children {
            if entries[c].node.is_dir() {
                go(entries, c, next, order);
            }
        }
        for &c in &children {
            *next += 1;
            entries[c].inode_number = *next;
            order.push(c);
        }
    }
    if entries.len() > u32::MAX as usize - 1 {
        return Err(Error::Invalid("too many inodes".into()));
    }
    let mut next = 0;
    let mut order = Vec::with_capacity(entries.len());
    go(entries, 0, &mut next, &mut order);
    entries[0].inode_number = next + 1;
    order.push(0);
    Ok(order)
}

fn id_index(ids: &mut Vec<u32>, id: u32) -> Result<u16> {
    if let Some(i) = ids.iter().position(|&x| x == id) {
        return Ok(i as u16);
    }
    if ids.len() == 0x10000 {
        return Err(Error::Invalid("more than 65536 distinct uids/gids".into()));
    }
    ids.push(id);
    Ok((ids.len() - 1) as u16)
}

fn encode_inode(
    e: &Entry<'_>,
    entries: &[Entry<'_>],
    files: &[FileLayout],
    gensquashfs: Gensquashfs,
    dirs: &mut MetaWriter,
    ids: &mut Vec<u32>,
) -> Result<Vec<u8>> {
    let meta = &e.node.meta;
    let has_xattr = e.xattr != NO_XATTR;
    let mut body = Vec::new();
    let ty = match &e.node.kind {
        Kind::Dir(_) => {
            let listing = write_directory(e, entries, dirs)?;
            let nlink = 2 + e.children.len() as u32;
            let parent = e.parent.map_or(0, |p| entries[p].inode_number);
            let size = listing.size + 3;
            // 1.3 indexes every directory of 256 entries or more, so that
            // the kernel's lookups skip ahead; 1.2.0 only the ones it must
            // extend anyway.
            let indexed = gensquashfs
                .dir_index_threshold()
                .is_some_and(|t| e.children.len() >= t);
            if has_xattr || listing.size > 0xFFFF - 3 || indexed {
                body.put_u32(nlink);
                body.put_u32(size);
                body.put_u32(listing.start_block as u32);
                body.put_u32(parent);
                body.put_u16(listing.index.len() as u16);
                body.put_u16(listing.offset);
                body.put_u32(e.xattr);
                for (index, start, name) in &listing.index {
                    body.put_u32(*index);
                    body.put_u32(*start);
                    body.put_u32(name.len() as u32 - 1);
                    body.extend_from_slice(name);
                }
                inode_type::EXT_DIR
            } else {
                body.put_u32(listing.start_block as u32);
                body.put_u32(nlink);
                body.put_u16(size as u16);
                body.put_u16(listing.offset);
                body.put_u32(parent);
                inode_type::DIR
            }
        }
        Kind::File(_) => {
            let f = &files[e.file.expect("file entry")];
            let extended =
                has_xattr || f.sparse > 0 || f.size > 0xFFFF_FFFF || f.blocks_start > 0xFFFF_FFFF;
            if extended {
                body.put_u64(f.blocks_start);
                body.put_u64(f.size);
                body.put_u64(f.sparse);
                body.put_u32(1);
                body.put_u32(f.fragment_index);
                body.put_u32(f.fragment_offset);
                body.put_u32(e.xattr);
            } else {
                body.put_u32(f.blocks_start as u32);
                body.put_u32(f.fragment_index);
                body.put_u32(f.fragment_offset);
                body.put_u32(f.size as u32);
            }
            for s in &f.block_sizes {
                body.put_u32(*s);
            }
            if extended {
                inode_type::EXT_FILE
            } else {
                inode_type::FILE
            }
        }
        Kind::Symlink(target) => {
            body.put_u32(1);
            body.put_u32(target.len() as u32);
            body.extend_from_slice(target);
            if has_xattr {
                body.put_u32(e.xattr);
                inode_type::EXT_SYMLINK
            } else {
                inode_type::SYMLINK
            }
        }
        Kind::BlockDev(dev) | Kind::CharDev(dev) => {
            body.put_u32(1);
            body.put_u32(*dev);
            let block = matches!(e.node.kind, Kind::BlockDev(_));
            match (block, has_xattr) {
                (true, false) => inode_type::BLOCK_DEV,
                (false, false) => inode_type::CHAR_DEV,
                (true, true) => {
                    body.put_u32(e.xattr);
                    inode_type::EXT_BLOCK_DEV
                }
                (false, true) => {
                    body.put_u32(e.xattr);
                    inode_type::EXT_CHAR_DEV
                }
            }
        }
        Kind::Fifo | Kind::Socket => {
            body.put_u32(1);
            let fifo = matches!(e.node.kind, Kind::Fifo);
            if has_xattr {
                body.put_u32(e.xattr);
                if fifo {
                    inode_type::EXT_FIFO
                } else {
                    inode_type::EXT_SOCKET
                }
            } else if fifo {
                inode_type::FIFO
            } else {
                inode_type::SOCKET
            }
        }
    };
    let uid = id_index(ids, meta.uid)?;
    let gid = id_index(ids, meta.gid)?;
    let mut inode = Vec::with_capacity(16 + body.len());
    inode.put_u16(ty);
    inode.put_u16(meta.mode & 0o7777);
    inode.put_u16(uid);
    inode.put_u16(gid);
    inode.put_u32(meta.mtime);
    inode.put_u32(e.inode_number);
    inode.extend_from_slice(&body);
    Ok(inode)
}

struct Listing {
    start_block: u64,
    offset: u16,
    size: u32,
    /// (byte index in the listing, directory block, first name) per header.
    index: Vec<(u32, u32, Vec<u8>)>,
}

fn basic_type(node: &Node) -> u16 {
    match node.kind {
        Kind::Dir(_) => inode_type::DIR,
        Kind::File(_) => inode_type::FILE,
        Kind::Symlink(_) => inode_type::SYMLINK,
        Kind::BlockDev(_) => inode_type::BLOCK_DEV,
        Kind::CharDev(_) => inode_type::CHAR_DEV,
        Kind::Fifo => inode_type::FIFO,
        Kind::Socket => inode_type::SOCKET,
    }
}

/// Writes a directory's entries: runs of at most 256 entries whose inodes
/// share one metadata block and lie within ±32767 inode numbers of the
/// run's first, a run never growing past one metadata block's worth.
fn write_directory(e: &Entry<'_>, entries: &[Entry<'_>], dirs: &mut MetaWriter) -> Result<Listing> {
    let (start_block, offset) = dirs.position();
    let mut listing = Listing {
        start_block,
        offset: offset as u16,
        size: 0,
        index: Vec::new(),
    };
    let kids: Vec<&Entry<'_>> = e.children.iter().map(|&c| &entries[c]).collect();
    let mut i = 0;
    while i < kids.len() {
        let (block, offset) = dirs.position();
        let head = kids[i];
        let mut size = (offset as usize + 12) % META_BLOCK_SIZE;
        let mut count = 0;
        for k in &kids[i..] {
            if k.inode_ref >> 16 != head.inode_ref >> 16 {
                break;
            }
            let diff = k.inode_number as i64 - head.inode_number as i64;
            if !(-32767..=32767).contains(&diff) {
                break;
            }
            size += 8 + k.node.name.len();
            if count > 0 && size > META_BLOCK_SIZE {
                break;
            }
            count += 1;
            if count == MAX_DIR_ENTRIES {
                break;
            }
        }
        let mut hdr = Vec::with_capacity(12);
        hdr.put_u32(count as u32 - 1);
        hdr.put_u32((head.inode_ref >> 16) as u32);
        hdr.put_u32(head.inode_number);
        dirs.append(&hdr)?;
        listing
            .index
            .push((listing.size, block as u32, head.node.name.clone()));
        listing.size += 12;
        for k in &kids[i..i + count] {
            let mut ent = Vec::with_capacity(8 + k.node.name.len());
            ent.put_u16((k.inode_ref & 0xFFFF) as u16);
            ent.put_u16((k.inode_number as i64 - head.inode_number as i64) as i16 as u16);
            ent.put_u16(basic_type(k.node));
            ent.put_u16(k.node.name.len() as u16 - 1);
            ent.extend_from_slice(&k.node.name);
            dirs.append(&ent)?;
            listing.size += ent.len() as u32;
        }
        i += count;
    }
    Ok(listing)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::{CompareOptions, compare_trees};
    use crate::sqfs::Archive;

    /// Files that compress (text), do not (noise) and both, over several blocks.
    fn sample() -> Node {
        let mut x = 0x2545_F491u32;
        let mut noise = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        };
        Node::flat([
            ("text".to_string(), b"zstd system image ".repeat(20_000)),
            ("noise".to_string(), (0..300_000).map(|_| noise()).collect()),
            ("tail".to_string(), b"short".to_vec()),
        ])
    }

    fn write(opts: &WriterOptions) -> (File, Vec<u8>) {
        let out = tempfile::tempfile().unwrap();
        write_image(&sample(), opts, &out, &crate::NoProgress).unwrap();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut out.try_clone().unwrap(), &mut bytes).unwrap();
        (out, bytes)
    }

    #[test]
    fn zstd_images_read_back_the_same_whatever_the_thread_count() {
        let mut opts = WriterOptions::with_block_size(1 << 17);
        opts.zstd_level = Some(22);
        let (out, bytes) = write(&opts);
        opts.threads = 1;
        assert_eq!(write(&opts).1, bytes, "same bytes on one thread");
        let ar = Archive::open(Arc::new(out)).unwrap();
        assert_eq!(ar.compressor(), crate::sqfs::format::CompressorId::Zstd);
        // Level 22 is not mksquashfs's default (15): an options block says so.
        assert_ne!(ar.superblock().flags & flags::COMPRESSOR_OPTIONS, 0);
        assert_eq!(&bytes[96..102], &[0x04, 0x80, 22, 0, 0, 0]);
        let read = ar.to_tree().unwrap();
        assert!(
            compare_trees(&sample(), &read, CompareOptions::default())
                .unwrap()
                .is_empty()
        );
        // The default level writes no options block.
        opts.zstd_level = Some(15);
        let (out, _) = write(&opts);
        let ar = Archive::open(Arc::new(out)).unwrap();
        assert_eq!(ar.superblock().flags & flags::COMPRESSOR_OPTIONS, 0);
    }

    #[test]
    fn zstd_is_refused_with_the_block_cache_helpers_or_block_copying() {
        let mut opts = WriterOptions::with_block_size(1 << 17);
        opts.zstd_level = Some(22);
        opts.copy_image_blocks = true;
        let e = opts.validate().unwrap_err();
        assert!(e.to_string().contains("zstd images"), "{e}");
        opts.copy_image_blocks = false;
        opts.zstd_level = Some(23);
        let e = opts.validate().unwrap_err();
        assert!(e.to_string().contains("between 1 and 22"), "{e}");
    }
}
