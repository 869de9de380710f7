//! The layout check of [`Archive::open_ours`]: every pointer, count and size
//! of the superblock, and every table, exactly where and as our writer puts
//! them ([`crate::sqfs::writer`]). The kernel follows pointers our reader
//! never needs (an export table, an xattr table the flags disown): a kit
//! that differs from our layout in any of them is refused, whether or not
//! its files read back right.

use std::collections::HashSet;

use super::{Archive, InodeKind};
use crate::error::{Result, corrupt};
use crate::sqfs::format::{
    BLOCK_UNCOMPRESSED, META_BLOCK_SIZE, META_UNCOMPRESSED, NO_TABLE, SUPERBLOCK_SIZE, flags,
};

/// Our writer pads images to this.
const DEV_BLOCK: u64 = 4096;

/// The flags our writer can set; anything else is someone else's image.
const OUR_FLAGS: u16 = flags::NO_FRAGMENTS
    | flags::ALWAYS_FRAGMENTS
    | flags::UNCOMPRESSED_FRAGMENTS
    | flags::NO_XATTRS
    | flags::NO_DUPLICATES
    | flags::COMPRESSOR_OPTIONS;

impl Archive {
    pub(super) fn check_layout(&self) -> Result<()> {
        let sb = &self.sb;
        if sb.flags & !OUR_FLAGS != 0 {
            corrupt!(
                "superblock flags {:#06x} include some our writer never sets",
                sb.flags
            );
        }
        if sb.flags & flags::NO_DUPLICATES == 0 {
            corrupt!("superblock flags lack \"no duplicates\", which our writer always sets");
        }
        if sb.export_table_start != NO_TABLE {
            corrupt!(
                "the superblock points to an export table at {}; our writer writes none",
                sb.export_table_start
            );
        }

        // Compressor options, then the data area.
        let data_start = if sb.flags & flags::COMPRESSOR_OPTIONS != 0 {
            let mut hdr = [0u8; 2];
            super::read_at(&*self.src, &mut hdr, SUPERBLOCK_SIZE as u64, "options")?;
            if u16::from_le_bytes(hdr) != META_UNCOMPRESSED | 8 {
                corrupt!("compressor options are not one stored 8-byte block");
            }
            SUPERBLOCK_SIZE as u64 + 10
        } else {
            SUPERBLOCK_SIZE as u64
        };
        self.check_data_area(data_start)?;

        // The inode table, then the directory table up to the first
        // lookup table block.
        let inodes = self.meta_chain(sb.inode_table_start, sb.directory_table_start, "inode")?;
        if inodes.is_empty() {
            corrupt!("the inode table is empty");
        }
        let mut pos = sb.directory_table_start;
        let fragments = self.fragments.len();
        if (fragments == 0) != (sb.flags & flags::NO_FRAGMENTS != 0)
            || (fragments > 0) != (sb.flags & flags::ALWAYS_FRAGMENTS != 0)
            || (fragments == 0) != (sb.fragment_table_start == NO_TABLE)
            || fragments != sb.fragment_entry_count as usize
        {
            corrupt!("fragment flags, count and table pointer disagree");
        }
        let uncompressed_fragments = fragments > 0
            && self
                .fragments
                .iter()
                .all(|&(_, s)| s & BLOCK_UNCOMPRESSED != 0);
        if uncompressed_fragments != (sb.flags & flags::UNCOMPRESSED_FRAGMENTS != 0) {
            corrupt!("the \"uncompressed fragments\" flag disagrees with the fragment table");
        }
        let first_table_block = if fragments > 0 {
            self.lookup_list(sb.fragment_table_start, fragments * 16, "fragment")?[0]
        } else {
            self.lookup_list(sb.id_table_start, sb.id_count as usize * 4, "id")?[0]
        };
        self.meta_chain(pos, first_table_block, "directory")?;
        pos = first_table_block;
        if fragments > 0 {
            pos =
                self.check_lookup_table(pos, sb.fragment_table_start, fragments * 16, "fragment")?;
        }
        pos = self.check_lookup_table(pos, sb.id_table_start, sb.id_count as usize * 4, "id")?;
        let distinct: HashSet<u32> = self.ids.iter().copied().collect();
        if distinct.len() != self.ids.len() {
            corrupt!("the id table repeats an id");
        }

        // Xattrs: key/value blocks, id blocks, header, block list.
        if (sb.xattr_id_table_start == NO_TABLE) != (sb.flags & flags::NO_XATTRS != 0) {
            corrupt!("the xattr flag and the xattr table pointer disagree");
        }
        if sb.xattr_id_table_start != NO_TABLE {
            if self.xattr_kv_start != pos {
                corrupt!(
                    "xattr values start at {}, not right after the id table ({pos})",
                    self.xattr_kv_start
                );
            }
            let Some(&ids_at) = self.xattr_ids.first() else {
                corrupt!("the xattr table is empty");
            };
            self.meta_chain(pos, ids_at, "xattr value")?;
            let bytes = self.xattr_count as usize * 16;
            let blocks = self.meta_chain(ids_at, sb.xattr_id_table_start, "xattr id")?;
            self.check_full_blocks(&blocks, bytes, "xattr id")?;
            if blocks.iter().map(|b| b.0).collect::<Vec<_>>() != self.xattr_ids {
                corrupt!("the xattr id table's block list is not where its blocks are");
            }
            let mut hdr = [0u8; 16];
            super::read_at(
                &*self.src,
                &mut hdr,
                sb.xattr_id_table_start,
                "xattr header",
            )?;
            if hdr[12..] != [0; 4] {
                corrupt!("the xattr id table header's unused field is set");
            }
            pos = sb.xattr_id_table_start + 16 + 8 * blocks.len() as u64;
        }
        if pos != sb.bytes_used {
            corrupt!(
                "the tables end at {pos}, the superblock says {} bytes",
                sb.bytes_used
            );
        }

        // Zero padding to the device block size, nothing after it.
        let len = self.src.size()?;
        if len != sb.bytes_used.div_ceil(DEV_BLOCK) * DEV_BLOCK {
            corrupt!(
                "the image is {len} bytes; {} used, padded to {DEV_BLOCK}, makes {}",
                sb.bytes_used,
                sb.bytes_used.div_ceil(DEV_BLOCK) * DEV_BLOCK
            );
        }
        let mut pad = vec![0u8; (len - sb.bytes_used) as usize];
        super::read_at(&*self.src, &mut pad, sb.bytes_used, "padding")?;
        if pad.iter().any(|&b| b != 0) {
            corrupt!("the padding after the tables is not zero");
        }
        Ok(())
    }

    /// Metadata blocks from `from` up to exactly `to`: (position, decoded
    /// length) of each; every block but the last holds a full 8 KiB.
    fn meta_chain(&self, from: u64, to: u64, what: &str) -> Result<Vec<(u64, usize)>> {
        if from > to {
            corrupt!("the {what} table starts at {from}, after its end {to}");
        }
        let mut blocks = Vec::new();
        let mut pos = from;
        while pos < to {
            if let Some(&(_, len)) = blocks.last()
                && len != META_BLOCK_SIZE
            {
                corrupt!("a {what} table block before the last holds {len} bytes, not 8 KiB");
            }
            let (block, next) = self.read_meta_block(pos, to)?;
            blocks.push((pos, block.len()));
            pos = next;
        }
        Ok(blocks)
    }

    /// Exactly the blocks `bytes` of table entries take, each full but the last.
    fn check_full_blocks(&self, blocks: &[(u64, usize)], bytes: usize, what: &str) -> Result<()> {
        let want = bytes.div_ceil(META_BLOCK_SIZE);
        let last = bytes - want.saturating_sub(1) * META_BLOCK_SIZE;
        if blocks.len() != want || blocks.last().is_some_and(|b| b.1 != last) {
            corrupt!(
                "the {what} table is {} blocks holding {} bytes; {bytes} bytes of entries make {want}",
                blocks.len(),
                blocks.iter().map(|b| b.1).sum::<usize>()
            );
        }
        Ok(())
    }

    /// The block positions a lookup table's list at `list_at` names.
    fn lookup_list(&self, list_at: u64, bytes: usize, what: &str) -> Result<Vec<u64>> {
        let n = bytes.div_ceil(META_BLOCK_SIZE);
        if n == 0 {
            corrupt!("the {what} table is empty");
        }
        let mut list = vec![0u8; n * 8];
        super::read_at(&*self.src, &mut list, list_at, what)?;
        Ok(list
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect())
    }

    /// A lookup table whose blocks start at `from` and whose list is at
    /// `list_at`; returns where the list ends.
    fn check_lookup_table(&self, from: u64, list_at: u64, bytes: usize, what: &str) -> Result<u64> {
        let blocks = self.meta_chain(from, list_at, what)?;
        self.check_full_blocks(&blocks, bytes, what)?;
        let named = self.lookup_list(list_at, bytes, what)?;
        if blocks.iter().map(|b| b.0).collect::<Vec<_>>() != named {
            corrupt!("the {what} table's block list is not where its blocks are");
        }
        Ok(list_at + 8 * named.len() as u64)
    }

    /// Every data block and fragment block, each once, tiles the data
    /// area from `start` to the inode table without gap or overlap; the
    /// inode numbers are 1 to `inode_count`, each used.
    fn check_data_area(&self, start: u64) -> Result<()> {
        let mut extents: Vec<(u64, u64)> = Vec::new();
        for &(at, size) in &self.fragments {
            extents.push((at, (size & !BLOCK_UNCOMPRESSED) as u64));
        }
        let mut numbers = HashSet::new();
        self.walk(&mut |_, inode| {
            numbers.insert(inode.number);
            if let InodeKind::File(f) = &inode.kind {
                let mut at = f.blocks_start;
                for &b in &f.block_sizes {
                    let size = (b & !BLOCK_UNCOMPRESSED) as u64;
                    if size > 0 {
                        extents.push((at, size));
                    }
                    at = at.saturating_add(size);
                }
            }
            Ok(())
        })?;
        let count = self.sb.inode_count;
        if numbers.len() != count as usize || numbers.iter().any(|&n| n == 0 || n > count) {
            corrupt!("the inode numbers are not 1 to {count}, each used");
        }
        extents.sort_unstable();
        extents.dedup();
        let mut pos = start;
        for (at, size) in extents {
            if at != pos {
                corrupt!(
                    "the data area has {} at {pos} (a block at {at})",
                    if at > pos {
                        "a gap"
                    } else {
                        "overlapping blocks"
                    }
                );
            }
            pos = at + size;
        }
        if pos != self.sb.inode_table_start {
            corrupt!(
                "the data area ends at {pos}, the inode table starts at {}",
                self.sb.inode_table_start
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::unix::fs::FileExt;
    use std::sync::Arc;

    use crate::sqfs::compat::Gensquashfs;
    use crate::sqfs::writer::{WriterOptions, write_image};
    use crate::sqfs::{Archive, format::SUPERBLOCK_SIZE};
    use crate::tree::{FileContent, Kind, Meta, Node};

    fn meta(uid: u32, xattrs: Vec<(Vec<u8>, Vec<u8>)>) -> Meta {
        Meta {
            mode: 0o644,
            uid,
            gid: 0,
            mtime: 0,
            xattrs,
        }
    }

    fn file(name: String, meta: Meta, data: Vec<u8>) -> Node {
        Node {
            name: name.into_bytes(),
            meta,
            kind: Kind::File(FileContent::from_bytes(data)),
        }
    }

    /// Every inode type, tails in fragments, whole blocks, a sparse file,
    /// xattrs, and `files` files in one directory with as many uids and
    /// xattr sets as `distinct` says (enough makes every table span blocks).
    fn tree(files: u32, distinct: u32) -> Node {
        let mut big = Vec::new();
        for i in 0..files {
            let x = (i < distinct).then(|| (b"user.n".to_vec(), i.to_le_bytes().repeat(3)));
            let data = format!("file {i}\n")
                .repeat(1 + i as usize % 7)
                .into_bytes();
            big.push(file(
                format!("f{i:05}"),
                meta(i % distinct.max(1), x.into_iter().collect()),
                data,
            ));
        }
        let d = meta(0, Vec::new());
        let specials = vec![
            Node {
                name: b"link".to_vec(),
                meta: d.clone(),
                kind: Kind::Symlink(b"big/f00001".to_vec()),
            },
            Node {
                name: b"blk".to_vec(),
                meta: d.clone(),
                kind: Kind::BlockDev(0x0801),
            },
            Node {
                name: b"chr".to_vec(),
                meta: d.clone(),
                kind: Kind::CharDev(0),
            },
            Node {
                name: b"fifo".to_vec(),
                meta: d.clone(),
                kind: Kind::Fifo,
            },
            Node {
                name: b"sock".to_vec(),
                meta: d.clone(),
                kind: Kind::Socket,
            },
            file(
                "whole".into(),
                d.clone(),
                (0..400_000u32).map(|i| (i * 7 % 251) as u8).collect(),
            ),
            file("sparse".into(), d.clone(), vec![0; 300_000]),
            file("empty".into(), d.clone(), Vec::new()),
        ];
        let mut top = specials;
        top.push(Node::dir(
            "big",
            meta(0, vec![(b"trusted.overlay.opaque".to_vec(), b"y".to_vec())]),
            big,
        ));
        Node::dir("", d, top)
    }

    fn write(root: &Node, gensquashfs: Gensquashfs) -> (Arc<File>, WriterOptions) {
        let mut opts = WriterOptions::with_block_size(131072);
        opts.gensquashfs = gensquashfs;
        let out = tempfile::tempfile().unwrap();
        write_image(root, &opts, &out, &crate::NoProgress).unwrap();
        (Arc::new(out), opts)
    }

    #[test]
    fn our_writers_images_pass_whatever_their_tables_span() {
        for g in Gensquashfs::ALL {
            for (files, distinct) in [(0, 0), (3, 0), (300, 2), (2_600, 2_200)] {
                let (out, opts) = write(&tree(files, distinct), g);
                let ar = Archive::open_ours(out, opts.xz)
                    .unwrap_or_else(|e| panic!("{g:?}, {files} files: {e}"));
                if files == 2_600 {
                    assert!(ar.ids().len() > 2048, "an id table of two blocks");
                    assert!(ar.xattr_ids.len() > 1, "an xattr id table of two blocks");
                }
            }
            let empty = Node::dir("", meta(0, Vec::new()), Vec::new());
            let (out, opts) = write(&empty, g);
            Archive::open_ours(out, opts.xz).unwrap();
        }
    }

    fn copy(f: &File) -> Vec<u8> {
        let mut v = vec![0u8; f.metadata().unwrap().len() as usize];
        f.read_exact_at(&mut v, 0).unwrap();
        v
    }

    fn open(bytes: &[u8], opts: &WriterOptions) -> crate::Result<Arc<Archive>> {
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(bytes, 0).unwrap();
        Archive::open_ours(Arc::new(f), opts.xz)
    }

    #[test]
    fn any_flipped_bit_of_the_superblock_but_the_date_is_refused() {
        // The superblock's date is the one field nothing points through.
        let (out, opts) = write(&tree(300, 40), Gensquashfs::V1_3_2);
        let good = copy(&out);
        open(&good, &opts).unwrap();
        for byte in (0..SUPERBLOCK_SIZE).filter(|b| !(8..12).contains(b)) {
            for bit in 0..8 {
                let mut bad = good.clone();
                bad[byte] ^= 1 << bit;
                assert!(
                    open(&bad, &opts).is_err(),
                    "bit {bit} of superblock byte {byte} flipped was accepted"
                );
            }
        }
    }

    #[test]
    fn tables_lists_and_padding_are_checked() {
        let (out, opts) = write(&tree(300, 40), Gensquashfs::V1_2_0);
        let good = copy(&out);
        let ar = open(&good, &opts).unwrap();
        let sb = ar.superblock().clone();
        let used = sb.bytes_used as usize;
        // Each lookup table's block list, the xattr header's fields.
        for at in [
            sb.fragment_table_start,
            sb.id_table_start,
            sb.xattr_id_table_start,
            sb.xattr_id_table_start + 8,
            sb.xattr_id_table_start + 12,
            sb.xattr_id_table_start + 16,
        ] {
            let mut bad = good.clone();
            bad[at as usize] ^= 1;
            let e = open(&bad, &opts).unwrap_err();
            assert!(matches!(e, crate::Error::Corrupt(_)), "{at}: {e}");
        }
        // Padding that is not zero, a longer or shorter file.
        let mut bad = good.clone();
        *bad.last_mut().unwrap() = 1;
        let e = open(&bad, &opts).unwrap_err();
        assert!(e.to_string().contains("padding"), "{e}");
        let mut longer = good.clone();
        longer.extend_from_slice(&[0; 4096]);
        let e = open(&longer, &opts).unwrap_err();
        assert!(e.to_string().contains("padded"), "{e}");
        let e = open(&good[..used], &opts).unwrap_err();
        assert!(e.to_string().contains("padded"), "{e}");
        // An export table the kernel would read: pointer and flag set.
        let mut bad = good.clone();
        bad[88..96].copy_from_slice(&sb.id_table_start.to_le_bytes());
        let e = open(&bad, &opts).unwrap_err();
        assert!(e.to_string().contains("export table"), "{e}");
    }

    #[test]
    fn a_gap_in_the_data_area_is_refused() {
        // Eight bytes put between the data and the inode table, with every
        // pointer beyond them moved: a kit that reads back right, and still
        // not what our writer makes.
        let (out, opts) = write(&tree(300, 40), Gensquashfs::V1_3_2);
        let good = copy(&out);
        let ar = open(&good, &opts).unwrap();
        let sb = ar.superblock().clone();
        let at = sb.inode_table_start as usize;
        let mut bad = good[..sb.bytes_used as usize].to_vec();
        bad.splice(at..at, [0u8; 8]);
        let shift = |b: &mut Vec<u8>, pos: usize| {
            let v = u64::from_le_bytes(b[pos..pos + 8].try_into().unwrap());
            b[pos..pos + 8].copy_from_slice(&(v + 8).to_le_bytes());
        };
        let lists = [
            (sb.fragment_table_start, ar.fragment_count() * 16),
            (sb.id_table_start, ar.ids().len() * 4),
        ];
        for (list, bytes) in lists {
            for i in 0..bytes.div_ceil(8192) {
                shift(&mut bad, list as usize + 8 + i * 8);
            }
        }
        let xattr = sb.xattr_id_table_start as usize + 8;
        shift(&mut bad, xattr);
        for i in 0..ar.xattr_ids.len() {
            shift(&mut bad, xattr + 16 + i * 8);
        }
        for field in [40, 48, 56, 64, 72, 80] {
            shift(&mut bad, field);
        }
        bad.resize(bad.len().div_ceil(4096) * 4096, 0);
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(&bad, 0).unwrap();
        let moved = Archive::open(Arc::new(f)).unwrap();
        let (a, b) = (ar.to_tree().unwrap(), moved.to_tree().unwrap());
        let opts_cmp = crate::compare::CompareOptions::default();
        assert!(
            crate::compare::compare_trees(&a, &b, opts_cmp)
                .unwrap()
                .is_empty()
        );
        let e = open(&bad, &opts).unwrap_err();
        assert!(e.to_string().contains("data area ends"), "{e}");
    }
}
