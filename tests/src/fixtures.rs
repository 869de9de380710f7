//! Fixture trees for the SquashFS tests.

use crate::{Rng, Tree, some_binaries};

/// Builds one fixture tree into a directory.
pub type Build = fn(&Tree);

/// Trees covering every feature of the format (they need root: mknod,
/// chown, trusted.* xattrs).
pub fn fixtures() -> Vec<(&'static str, Build)> {
    vec![
        ("empty-root", |_t| {}),
        ("empty-file", |t| {
            t.file("empty", b"");
        }),
        ("exact-blocks", |t| {
            let mut r = Rng::new(1);
            t.file("one-small-block", &r.text(131072));
            t.file("one-big-block", &r.text(1 << 20));
        }),
        ("block-plus-one", |t| {
            let mut r = Rng::new(2);
            t.file("small", &r.text(131073));
            t.file("big", &r.text((1 << 20) + 1));
        }),
        ("many-blocks", |t| {
            let mut r = Rng::new(3);
            let mut d = r.text(2 << 20);
            d.extend(r.bytes(300_000));
            d.extend(r.text(700_001));
            t.file("many", &d);
        }),
        ("zero-block-inside", |t| {
            let mut r = Rng::new(4);
            let mut d = r.text(1 << 20);
            d.extend(vec![0u8; 1 << 20]);
            d.extend(r.text(200_000));
            t.file("holey", &d);
            let mut small = r.text(131072);
            small.extend(vec![0u8; 131072 * 2]);
            small.extend(r.text(5000));
            t.file("holey-small", &small);
        }),
        ("fully-sparse", |t| {
            t.sparse("sparse5m", 5 << 20, 0, b"");
            t.sparse("sparse-odd", (3 << 20) + 12345, 0, b"");
            t.sparse("zero-tail", 131072 + 100, 0, &[1u8; 131072]);
        }),
        ("duplicate-files", |t| {
            let mut r = Rng::new(5);
            let d = r.text(1_500_000);
            for n in ["a", "b", "sub/c", "sub/deeper/d"] {
                t.file(n, &d);
            }
            let small = r.text(999);
            t.file("s1", &small)
                .file("s2", &small)
                .file("sub/s3", &small);
        }),
        ("duplicate-tails", |t| {
            let mut r = Rng::new(6);
            let tail = r.text(7777);
            for i in 0..4 {
                let mut d = r.text(131072 * (i + 1));
                d.extend(&tail);
                t.file(format!("f{i}"), &d);
            }
        }),
        ("block-run-overlap", |t| {
            let mut r = Rng::new(7);
            let x = r.text(131072);
            let y = r.text(131072);
            t.file("a-one", &x);
            t.file("b-two", &[x.clone(), x.clone()].concat());
            t.file("c-prefix", &[x.clone(), y.clone()].concat());
            t.file("d-same", &[x.clone(), y.clone()].concat());
            t.file("e-tail", &[y.clone(), x[..1000].to_vec()].concat());
        }),
        ("five-thousand-small-files", |t| {
            let mut r = Rng::new(8);
            for i in 0..5000 {
                let n = r.below(300) as usize;
                t.file(format!("many/file-{i:05}"), &r.text(n));
            }
        }),
        ("big-directory", |t| {
            for i in 0..6000 {
                t.file(format!("d/a-rather-long-file-name-number-{i:06}"), b"");
            }
        }),
        // libsquashfs 1.3 indexes directories of 256 entries or more: one
        // each side of the threshold, of every inode type, with xattrs on
        // some (the directory's own among them) and hard links across.
        ("dir-255-256-257", |t| {
            for (dir, n) in [("a255", 255), ("b256", 256), ("c257", 257)] {
                for i in 0..n {
                    let p = format!("{dir}/e{i:04}");
                    match i % 7 {
                        0 => {
                            t.dir(&p);
                        }
                        1 => {
                            t.symlink(&p, "target");
                        }
                        2 => {
                            t.node(&p, libc::S_IFCHR, 1, 3);
                        }
                        3 => {
                            t.node(&p, libc::S_IFIFO, 0, 0);
                        }
                        4 if i == 4 => {
                            t.file(&p, b"linked");
                        }
                        4 => {
                            t.hardlink(&p, format!("{dir}/e0004"));
                        }
                        _ => {
                            t.file(&p, format!("{i}").as_bytes());
                        }
                    }
                }
            }
            t.xattr("b256", "user.dir", b"on the directory")
                .xattr("c257/e0005", "user.f", b"on a file")
                .xattr("a255/e0006", "user.f", b"on a file");
        }),
        ("dir-255-only", |t| {
            for i in 0..255 {
                t.file(format!("d/f{i}"), b"");
            }
        }),
        ("twenty-thousand-entries", |t| {
            for i in 0..20000 {
                t.file(format!("d{}/e{i}", i % 7), b"x");
            }
        }),
        ("long-names", |t| {
            t.file(vec![b'n'; 255], b"long")
                .dir([vec![b'd'; 200], b"/".to_vec(), vec![b'e'; 255]].concat());
        }),
        ("non-utf8-names", |t| {
            t.file(b"latin1-\xe9t\xe9", b"x")
                .file(b"\xff\xfe", b"y")
                .dir(b"dir-\x80");
        }),
        ("backslash-names", |t| {
            t.file("system-systemd\\x2dcryptsetup.slice", b"unit")
                .file("a\\b\\\\c", b"z");
        }),
        ("hard-links", |t| {
            let mut r = Rng::new(9);
            t.file("orig", &r.text(200_000))
                .hardlink("link1", "orig")
                .hardlink("sub/link2", "orig");
        }),
        ("symlinks", |t| {
            t.symlink("rel", "../somewhere")
                .symlink("abs", "/usr/lib/x86_64-linux-gnu")
                .symlink("dangling", "nope")
                .symlink("long", "x".repeat(1000))
                .symlink("sub/dir-link", "..");
        }),
        ("devices", |t| {
            t.node("whiteout", libc::S_IFCHR, 0, 0)
                .node("null", libc::S_IFCHR, 1, 3)
                .node("sda", libc::S_IFBLK, 8, 0)
                .node("big-minor", libc::S_IFCHR, 4095, 1_000_000)
                .chmod("whiteout", 0o000);
        }),
        ("fifos-and-sockets", |t| {
            t.node("fifo", libc::S_IFIFO, 0, 0).socket("sock").node(
                "sub/fifo2",
                libc::S_IFIFO,
                0,
                0,
            );
        }),
        ("special-modes", |t| {
            t.file("suid", b"a")
                .chmod("suid", 0o4755)
                .file("sgid", b"b")
                .chmod("sgid", 0o2711)
                .dir("sticky")
                .chmod("sticky", 0o1777)
                .file("none", b"c")
                .chmod("none", 0o000)
                .dir("private")
                .chmod("private", 0o700);
        }),
        ("owners", |t| {
            t.file("www", b"1")
                .chown("www", 33, 33)
                .file("nobody", b"2")
                .chown("nobody", 65534, 65534)
                .dir("mixed")
                .chown("mixed", 1000, 0)
                .symlink("mixed/link", "x")
                .chown("mixed/link", 0, 1000)
                .file("big-id", b"3")
                .chown("big-id", 4_000_000, 123_456);
        }),
        ("xattrs", |t| {
            t.file("f", b"data")
                .xattr("f", "user.one", b"1")
                .xattr("f", "trusted.overlay.opaque", b"y")
                .xattr(
                    "f",
                    "security.capability",
                    &[1, 0, 0, 2, 0, 32, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                )
                .dir("d")
                .xattr("d", "user.dir", b"yes")
                .symlink("l", "f")
                .xattr("l", "trusted.link", b"on a symlink")
                .node("c", libc::S_IFCHR, 1, 5)
                .xattr("c", "trusted.dev", b"on a device")
                .node("p", libc::S_IFIFO, 0, 0)
                .xattr("p", "trusted.fifo", b"on a fifo")
                .file("empty-value", b"")
                .xattr("empty-value", "user.empty", b"");
        }),
        ("xattrs-large-and-shared", |t| {
            let big = vec![b'v'; 3000];
            for i in 0..20 {
                let n = format!("f{i:02}");
                t.file(&n, format!("{i}").as_bytes())
                    .xattr(&n, "user.big", &big)
                    .xattr(&n, "user.small", b"s")
                    .xattr(&n, "trusted.k", format!("v{}", i % 3).as_bytes());
            }
            t.xattr("", "user.root", b"root dir xattr");
        }),
        ("xattrs-many-sets", |t| {
            for i in 0..700 {
                let n = format!("f{i:03}");
                t.file(&n, b"")
                    .xattr(&n, "user.id", format!("value number {i}").as_bytes());
            }
        }),
        ("deep-nesting", |t| {
            let mut p = String::new();
            for i in 0..120 {
                p.push_str(&format!("level{i}/"));
            }
            t.file(format!("{p}leaf"), b"deep");
        }),
        ("empty-dirs", |t| {
            for i in 0..50 {
                t.dir(format!("e{i}/sub"));
            }
        }),
        ("incompressible", |t| {
            let mut r = Rng::new(10);
            t.file("noise", &r.bytes(2_500_000))
                .file("noise-small", &r.bytes(50_000));
        }),
        ("tails-exactly-fill", |t| {
            let mut r = Rng::new(11);
            for i in 0..8 {
                t.file(format!("q{i}"), &r.bytes(131072 / 4));
            }
            t.file("r", &r.bytes((1 << 20) / 2))
                .file("s", &r.bytes((1 << 20) / 2));
        }),
        ("executables", |t| {
            for b in some_binaries() {
                let name = b.file_name().unwrap().to_string_lossy().into_owned();
                t.file(format!("bin/{name}"), &std::fs::read(&b).unwrap());
            }
        }),
        ("random-tree-1", |t| random_tree(t, 101)),
        ("random-tree-2", |t| random_tree(t, 202)),
        ("random-tree-3", |t| random_tree(t, 303)),
    ]
}

/// A seeded random mix of directories, files, symlinks, owners and xattrs.
pub fn random_tree(t: &Tree, seed: u64) {
    let mut r = Rng::new(seed);
    let mut dirs = vec![String::new()];
    for i in 0..400 {
        let parent = dirs[r.below(dirs.len() as u64) as usize].clone();
        let name = format!("{parent}n{i}-{}", r.below(1000));
        match r.below(10) {
            0 => {
                t.dir(&name);
                dirs.push(format!("{name}/"));
            }
            1 => {
                t.symlink(&name, format!("target-{}", r.below(50)));
            }
            2 => {
                let n = r.below(400_000) as usize;
                t.file(&name, &r.bytes(n));
            }
            3 => {
                let n = r.below(300_000) as usize;
                t.file(&name, &vec![0u8; n]);
            }
            _ => {
                let n = r.below(60_000) as usize;
                t.file(&name, &r.text(n));
            }
        }
        if r.below(8) == 0 {
            t.chown(&name, r.below(5) as u32 * 1000, r.below(3) as u32);
        }
        if r.below(6) == 0 {
            t.xattr(&name, "trusted.r", format!("{}", r.below(4)).as_bytes());
        }
    }
}
