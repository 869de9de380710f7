//! Untrusted images: truncated, corrupted and hand-crafted hostile images
//! must give an error (or a valid reading), never a panic, and never make
//! the reader allocate more than a bounded amount of memory.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use iukfarm_engine::Error;
use iukfarm_engine::sqfs::{Archive, InodeKind, WriterOptions, write_image};
use iukfarm_engine::tree::{FileContent, Kind, Meta, Node};

/// Counts live heap bytes and remembers the peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn meta(mode: u16) -> Meta {
    Meta {
        mode,
        uid: 1000,
        gid: 100,
        mtime: 1,
        xattrs: vec![(
            b"user.k".to_vec(),
            b"a value longer than eight bytes".to_vec(),
        )],
    }
}

fn sample_image(zstd: bool) -> Vec<u8> {
    let mut x = 1u64;
    let mut noise = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    let text: Vec<u8> = b"upgrade kit "
        .iter()
        .cycle()
        .take(300_000)
        .copied()
        .collect();
    let mut files = Vec::new();
    for i in 0..40 {
        let data = if i % 3 == 0 {
            noise(5_000 + i * 100)
        } else {
            text[..(7_000 * i + 10)].to_vec()
        };
        files.push(Node {
            name: format!("f{i:02}").into_bytes(),
            meta: meta(0o644),
            kind: Kind::File(FileContent::from_bytes(data)),
        });
    }
    files.push(Node {
        name: b"link".to_vec(),
        meta: meta(0o777),
        kind: Kind::Symlink(b"f01".to_vec()),
    });
    let sub = Node::dir(
        "sub",
        meta(0o755),
        vec![Node {
            name: b"big".to_vec(),
            meta: meta(0o600),
            kind: Kind::File(FileContent::from_bytes(text.clone())),
        }],
    );
    files.push(sub);
    // A directory of 300 entries: gensquashfs 1.3.2 (the writer's default)
    // gives it an extended inode with a directory index, which the
    // mutations below then damage too.
    let wide = (0..300)
        .map(|i| Node {
            name: format!("entry-{i:03}").into_bytes(),
            meta: meta(0o644),
            kind: Kind::File(FileContent::from_bytes(vec![i as u8; i % 7])),
        })
        .collect();
    files.push(Node::dir("wide", meta(0o755), wide));
    let root = Node::dir("", meta(0o755), files);
    let f = tempfile::tempfile().unwrap();
    let mut opts = WriterOptions::with_block_size(65536);
    opts.threads = 2;
    if zstd {
        // As Tails 7's system images are compressed.
        opts.zstd_level = Some(22);
    }
    write_image(&root, &opts, &f, &iukfarm_engine::NoProgress).unwrap();
    let mut out = Vec::new();
    (&f).read_to_end(&mut out).unwrap();
    out
}

/// Reads everything an image offers; errors are fine, panics are not.
fn exercise(data: Vec<u8>) -> Result<u64, Error> {
    let ar = Archive::open(Arc::new(data))?;
    let mut bytes = 0u64;
    ar.walk(&mut |_, inode| {
        ar.xattrs(inode.xattr)?;
        if let InodeKind::File(f) = &inode.kind {
            let mut r = ar.open_file(f);
            let mut buf = vec![0u8; 1 << 16];
            loop {
                match r.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => bytes += n as u64,
                    Err(e) => return Err(Error::Corrupt(e.to_string())),
                }
            }
        }
        Ok(())
    })?;
    ar.to_tree()?;
    Ok(bytes)
}

/// Also on a zstd image (Tails 7's system images), where blocks that claim
/// or produce more than a block's size must be refused too. One test: the
/// allocation counters are global.
#[test]
fn hostile_images_give_errors_with_bounded_memory() {
    hostile(sample_image(false), 3000);
    hostile(sample_image(true), 1500);
}

fn hostile(good: Vec<u8>, rounds: u32) {
    let total = exercise(good.clone()).expect("the intact image reads");
    assert!(total > 300_000);
    let baseline = LIVE.load(Ordering::Relaxed);
    PEAK.store(baseline, Ordering::Relaxed);

    // Every truncation point (in steps) of the used part.
    let mut errors = 0;
    for cut in (0..good.len()).step_by(251) {
        if exercise(good[..cut].to_vec()).is_err() {
            errors += 1;
        }
    }
    assert!(errors > 0);

    // Seeded random corruption: single bytes, runs of 0xFF, and 8-byte
    // values in the superblock.
    let mut x = 0x5EED_u64;
    let mut rnd = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for round in 0..rounds {
        let mut bad = good.clone();
        match round % 3 {
            0 => {
                let i = (rnd() % bad.len() as u64) as usize;
                bad[i] ^= 1 << (rnd() % 8);
            }
            1 => {
                let i = (rnd() % bad.len() as u64) as usize;
                let n = (1 + rnd() % 16) as usize;
                for b in bad.iter_mut().skip(i).take(n) {
                    *b = 0xFF;
                }
            }
            _ => {
                let i = 8 + (rnd() % 88) as usize;
                let v = rnd().to_le_bytes();
                let n = (1 + rnd() % 8) as usize;
                for (k, b) in v.iter().take(n).enumerate() {
                    if i + k < 96 {
                        bad[i + k] = *b;
                    }
                }
            }
        }
        let _ = exercise(bad);
    }
    let peak = PEAK.load(Ordering::Relaxed) - baseline;
    assert!(
        peak < 256 << 20,
        "reading hostile images peaked at {} MiB",
        peak >> 20
    );
}

/// A tiny image builder with uncompressed metadata, for precise hostile
/// structures the real writer never makes.
struct Crafted {
    inodes: Vec<u8>,
    dirs: Vec<u8>,
}

impl Crafted {
    fn new() -> Self {
        Crafted {
            inodes: Vec::new(),
            dirs: Vec::new(),
        }
    }

    fn base(&mut self, ty: u16, mode: u16, number: u32) -> u64 {
        let r = self.inodes.len() as u64;
        for v in [ty, mode, 0, 0] {
            self.inodes.extend(v.to_le_bytes());
        }
        self.inodes.extend(0u32.to_le_bytes());
        self.inodes.extend(number.to_le_bytes());
        r
    }

    /// A basic directory inode with the given (name, inode ref, number, type)
    /// entries; returns its inode reference.
    fn dir(&mut self, number: u32, entries: &[(&[u8], u64, u32, u16)]) -> u64 {
        self.dir_claiming(number, entries, entries.len() as u32)
    }

    /// [`Crafted::dir`] whose header says it holds `claimed` entries.
    fn dir_claiming(
        &mut self,
        number: u32,
        entries: &[(&[u8], u64, u32, u16)],
        claimed: u32,
    ) -> u64 {
        let start = self.dirs.len() as u32;
        let listing = Self::listing(entries, claimed);
        self.dirs.extend_from_slice(&listing);
        let r = self.base(1, 0o755, number);
        self.inodes.extend(0u32.to_le_bytes());
        self.inodes.extend(2u32.to_le_bytes());
        self.inodes.extend((listing.len() as u16 + 3).to_le_bytes());
        self.inodes.extend((start as u16).to_le_bytes());
        self.inodes.extend(0u32.to_le_bytes());
        r
    }

    /// An extended directory inode with one header and the given index
    /// entries (offset in the listing, metadata block, name).
    fn ext_dir(
        &mut self,
        number: u32,
        entries: &[(&[u8], u64, u32, u16)],
        index: &[(u32, u32, &[u8])],
        index_count: u16,
    ) -> u64 {
        let start = self.dirs.len() as u32;
        let listing = Self::listing(entries, entries.len() as u32);
        self.dirs.extend_from_slice(&listing);
        let r = self.base(8, 0o755, number);
        for v in [2u32, listing.len() as u32 + 3, 0, 0] {
            self.inodes.extend(v.to_le_bytes());
        }
        self.inodes.extend(index_count.to_le_bytes());
        self.inodes.extend((start as u16).to_le_bytes());
        self.inodes.extend(u32::MAX.to_le_bytes());
        for (at, block, name) in index {
            for v in [*at, *block, name.len() as u32 - 1] {
                self.inodes.extend(v.to_le_bytes());
            }
            self.inodes.extend_from_slice(name);
        }
        r
    }

    fn listing(entries: &[(&[u8], u64, u32, u16)], claimed: u32) -> Vec<u8> {
        let mut listing = Vec::new();
        if !entries.is_empty() {
            listing.extend((claimed - 1).to_le_bytes());
            listing.extend(0u32.to_le_bytes());
            listing.extend(entries[0].2.to_le_bytes());
            for (name, iref, num, ty) in entries {
                listing.extend((*iref as u16).to_le_bytes());
                listing.extend(((*num as i64 - entries[0].2 as i64) as i16).to_le_bytes());
                listing.extend(ty.to_le_bytes());
                listing.extend((name.len() as u16 - 1).to_le_bytes());
                listing.extend_from_slice(name);
            }
        }
        listing
    }

    fn file(&mut self, number: u32, size: u32, frag: u32) -> u64 {
        let r = self.base(2, 0o644, number);
        for v in [0u32, frag, 0, size] {
            self.inodes.extend(v.to_le_bytes());
        }
        r
    }

    fn image(&self, root: u64, inode_count: u32) -> Vec<u8> {
        fn meta(data: &[u8]) -> Vec<u8> {
            assert!(data.len() <= 8192);
            let mut out = (data.len() as u16 | 0x8000).to_le_bytes().to_vec();
            out.extend_from_slice(data);
            out
        }
        let mut img = vec![0u8; 96];
        let inode_start = img.len() as u64;
        img.extend(meta(&self.inodes));
        let dir_start = img.len() as u64;
        img.extend(meta(&self.dirs));
        let id_block = img.len() as u64;
        img.extend(meta(&0u32.to_le_bytes()));
        let id_start = img.len() as u64;
        img.extend(id_block.to_le_bytes());
        let used = img.len() as u64;
        let mut sb = Vec::new();
        for v in [0x7371_7368u32, inode_count, 0, 4096, 0] {
            sb.extend(v.to_le_bytes());
        }
        for v in [4u16, 12, 0x0010 | 0x0200, 1, 4, 0] {
            sb.extend(v.to_le_bytes());
        }
        for v in [
            root,
            used,
            id_start,
            u64::MAX,
            inode_start,
            dir_start,
            u64::MAX,
            u64::MAX,
        ] {
            sb.extend(v.to_le_bytes());
        }
        img[..96].copy_from_slice(&sb);
        img
    }
}

fn expect_corrupt(img: Vec<u8>, what: &str) {
    match exercise(img) {
        Err(Error::Corrupt(msg)) => assert!(msg.contains(what), "unexpected message: {msg}"),
        other => panic!("expected a corrupt-image error about {what:?}, got {other:?}"),
    }
}

#[test]
fn crafted_structures_are_refused() {
    // The crafted builder itself must make a readable image.
    let mut c = Crafted::new();
    let f = c.file(1, 0, 0xFFFF_FFFF);
    let root = c.dir(2, &[(b"empty", f, 1, 2)]);
    exercise(c.image(root, 2)).expect("a valid crafted image reads");

    // A directory containing its own parent: a loop.
    let mut c = Crafted::new();
    let inner_ref_guess = 32u64; // the root inode is written second, after "a" (32 bytes)
    let a = c.dir(1, &[(b"up", inner_ref_guess, 2, 1)]);
    let root = c.dir(2, &[(b"a", a, 1, 1)]);
    assert_eq!(root, inner_ref_guess);
    expect_corrupt(c.image(root, 2), "reachable twice");

    // A file claiming 4 GiB of blocks in a tiny image.
    let mut c = Crafted::new();
    let f = c.file(1, u32::MAX, 0xFFFF_FFFF);
    let root = c.dir(2, &[(b"huge", f, 1, 2)]);
    expect_corrupt(c.image(root, 2), "outside its table");

    // A fragment that does not exist.
    let mut c = Crafted::new();
    let f = c.file(1, 10, 7);
    let root = c.dir(2, &[(b"tail", f, 1, 2)]);
    expect_corrupt(c.image(root, 2), "fragment 7 does not exist");

    // A name with a slash.
    let mut c = Crafted::new();
    let f = c.file(1, 0, 0xFFFF_FFFF);
    let root = c.dir(2, &[(b"../etc", f, 1, 2)]);
    expect_corrupt(c.image(root, 2), "invalid entry name");

    // A directory header claiming more entries than the listing holds.
    let mut c = Crafted::new();
    let f = c.file(1, 0, 0xFFFF_FFFF);
    let root = c.dir_claiming(2, &[(b"only", f, 1, 2)], 3);
    expect_corrupt(c.image(root, 2), "structure truncated");

    // Extended directories: the index the kernel's lookups follow must
    // match the listing (the header's offset, first name and block).
    let ext = |index: &[(u32, u32, &[u8])], count: u16| {
        let mut c = Crafted::new();
        let a = c.file(1, 0, 0xFFFF_FFFF);
        let b = c.file(2, 0, 0xFFFF_FFFF);
        let root = c.ext_dir(3, &[(b"a", a, 1, 2), (b"b", b, 2, 2)], index, count);
        c.image(root, 3)
    };
    exercise(ext(&[(0, 0, b"a")], 1)).expect("a right index reads");
    exercise(ext(&[], 0)).expect("no index reads");
    for (index, what) in [
        (&[(0, 0, &b"b"[..])][..], "another name"),
        (&[(1, 0, &b"a"[..])][..], "not at a header"),
        (&[(0, 8192, &b"a"[..])][..], "another block"),
    ] {
        match exercise(ext(index, index.len() as u16)) {
            Err(Error::Corrupt(m)) => {
                assert!(m.contains("does not match the listing"), "{what}: {m}")
            }
            other => panic!("{what}: {other:?}"),
        }
    }
    // More entries than a listing of that size has headers.
    expect_corrupt(
        ext(&[(0, 0, b"a"), (0, 0, b"a")], 2),
        "an index of 2 entries",
    );
    expect_corrupt(ext(&[], 60_000), "an index of 60000 entries");

    // An inode number beyond the inode count.
    let mut c = Crafted::new();
    let f = c.file(9, 0, 0xFFFF_FFFF);
    let root = c.dir(2, &[(b"x", f, 9, 2)]);
    expect_corrupt(c.image(root, 2), "inode number 9 out of range");
}
