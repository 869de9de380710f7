//! Sample Tails-like system trees, generated natively and deterministically
//! (no external tools, nothing downloaded), for the demo and for trying the
//! engine on a fresh machine.
//!
//! Release `n` of the series is release `n - 1` plus point-release churn:
//! some packages updated (binaries and their docs rewritten), some added,
//! some removed, a changed kernel every other release, and a new
//! `/etc/os-release`. Tails 7's layout (the default) also has a zstd
//! system image, a GRUB module directory of 280 files and a library
//! directory of 300 files that all change in every release (so that every
//! diff holds a directory gensquashfs 1.3 indexes); Tails 6's has an xz
//! image. Releases are four weeks apart, the newest dated [`SAMPLE_SDE`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use iukfarm_engine::Progress;
use iukfarm_engine::iso_writer::write_iso;
use iukfarm_engine::kit::diff_writer_options;
use iukfarm_engine::sqfs::{WriterOptions, write_image};
use iukfarm_engine::tree::{FileContent, Kind, Meta, Node, Source};

use crate::output::{persist, temp_next_to};

/// Which Tails a sample series looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Layout {
    /// Tails 7 (trixie): zstd system images (level 22, 1 MiB blocks), a
    /// GRUB module directory, versions 7.x.
    #[default]
    #[value(name = "7")]
    Tails7,
    /// Tails 6 (bookworm): xz system images, versions 6.x.
    #[value(name = "6")]
    Tails6,
}

impl Layout {
    fn major(self) -> u64 {
        match self {
            Layout::Tails7 => 7,
            Layout::Tails6 => 6,
        }
    }
}

/// Deterministic PRNG (xorshift64*).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// x86-like machine code: opcodes with relative calls (E8) and jumps (E9),
/// so that the BCJ filter trial has something to do.
fn binary(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng::new(seed);
    let mut out = Vec::with_capacity(len + 8);
    out.extend_from_slice(b"\x7fELF\x02\x01\x01\0");
    while out.len() < len {
        match r.below(8) {
            0 => {
                out.push(0xE8);
                out.extend_from_slice(&((r.below(4096) as i32 - 2048) as u32).to_le_bytes());
            }
            1 => {
                out.push(0xE9);
                out.extend_from_slice(&((r.below(65536) as u32).wrapping_sub(32768)).to_le_bytes());
            }
            2 => out.extend_from_slice(&[0x48, 0x89, 0xE5]),
            3 => out.extend_from_slice(&[0x48, 0x83, 0xEC, (r.below(16) * 8) as u8]),
            4 => out.extend_from_slice(b"\x55\x53\x41\x54"),
            5 => out.extend_from_slice(&(r.next() as u32).to_le_bytes()),
            _ => out.extend_from_slice(&[0x0F, 0x1F, 0x44, 0x00, 0x00]),
        }
    }
    out.truncate(len);
    out
}

fn text(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: [&str; 16] = [
        "the ",
        "amnesic ",
        "incognito ",
        "live ",
        "system ",
        "tor ",
        "upgrade ",
        "kit ",
        "persistent ",
        "storage ",
        "release ",
        "security ",
        "fix ",
        "package ",
        "\n",
        "# ",
    ];
    let mut r = Rng::new(seed);
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        out.extend_from_slice(WORDS[r.below(16) as usize].as_bytes());
    }
    out.truncate(len);
    out
}

fn meta(mode: u16, uid: u32) -> Meta {
    Meta {
        mode,
        uid,
        gid: uid,
        mtime: 0,
        xattrs: Vec::new(),
    }
}

fn file(name: &str, mode: u16, data: Vec<u8>) -> Node {
    Node {
        name: name.into(),
        meta: meta(mode, 0),
        kind: Kind::File(FileContent::from_bytes(Arc::<[u8]>::from(data))),
    }
}

fn dir(name: &str, children: Vec<Node>) -> Node {
    Node::dir(name, meta(0o755, 0), children)
}

/// Package `p` as it is in release `rel`: its version changes when the
/// package was updated in or before `rel`.
fn package_version(p: u64, rel: u64) -> u64 {
    (0..=rel)
        .filter(|&r| r > 0 && (p * 7 + r * 13).is_multiple_of(11))
        .count() as u64
}

/// The system tree of sample release `rel` (0-based) of a series; `scale`
/// is roughly the size in MiB. With `big_mib`, a library of that many MiB
/// that changes in every release (like Tor Browser's libxul.so): blocks that
/// every IUK of a release carries.
pub fn system_tree(rel: u64, scale: u64, big_mib: u64, layout: Layout) -> Node {
    let packages = 12 * scale.max(1);
    let mut bin = Vec::new();
    let mut lib = Vec::new();
    let mut doc = Vec::new();
    for p in 0..packages {
        // Packages added in later releases, and a few removed.
        let added_in = if p % 17 == 5 { 1 + p % 3 } else { 0 };
        let removed_in = if p % 23 == 7 { 1 + p % 2 } else { u64::MAX };
        if rel < added_in || rel >= removed_in {
            continue;
        }
        let v = package_version(p, rel);
        let seed = p * 1000 + v;
        bin.push(file(
            &format!("tool{p:04}"),
            0o755,
            binary(seed, 8_000 + (p as usize * 997) % 60_000),
        ));
        lib.push(file(
            &format!("libpkg{p:04}.so.{v}"),
            0o644,
            binary(seed ^ 0xABCD, 20_000 + (p as usize * 7919) % 90_000),
        ));
        doc.push(dir(
            &format!("pkg{p:04}"),
            vec![
                file("README", 0o644, text(seed, 3_000 + (p as usize % 7) * 1000)),
                file("changelog.Debian.gz", 0o644, binary(seed ^ 0x77, 1_500)),
            ],
        ));
    }
    let mut ping = file("ping", 0o755, binary(42, 70_000));
    ping.meta.xattrs.push((
        b"security.capability".to_vec(),
        vec![1, 0, 0, 2, 0, 32, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    ));
    bin.push(ping);
    let mut sudo = file("sudo", 0o4755, binary(43, 150_000));
    sudo.meta.gid = 0;
    bin.push(sudo);
    lib.push(Node {
        name: b"libc.so.6".to_vec(),
        meta: meta(0o777, 0),
        kind: Kind::Symlink(b"libc-2.36.so".to_vec()),
    });
    lib.push(file("libc-2.36.so", 0o755, binary(44, 1_900_000)));
    if big_mib > 0 {
        let len = (big_mib << 20) as usize + 12_345;
        lib.push(dir(
            "tor-browser",
            vec![file("libxul.so", 0o755, binary(1_000_000 + rel, len))],
        ));
    }
    let kernel = 1 + rel / 2;
    let v = version(rel, layout);
    let os_release = format!(
        "NAME=\"Tails\"\nID=\"tails\"\nVERSION=\"{v}\"\nTAILS_PRODUCT_NAME=\"Tails\"\nTAILS_VERSION_ID=\"{v}\"\n"
    );
    let kernel_dir = match layout {
        Layout::Tails7 => format!("6.12.{kernel}+deb13-amd64"),
        Layout::Tails6 => format!("6.1.0-{kernel}-amd64"),
    };
    if layout == Layout::Tails7 {
        // Rebuilt in every release (like libraries of a security update).
        lib.push(dir(
            "x86_64-linux-gnu",
            (0..300u64)
                .map(|i| {
                    file(
                        &format!("libwide{i:03}.so.1"),
                        0o644,
                        binary(5_000_000 + i * 100 + rel, 1_000 + (i as usize * 37) % 3_000),
                    )
                })
                .collect(),
        ));
    }
    let mut amnesia = dir("amnesia", vec![file(".bashrc", 0o644, text(7, 3_500))]);
    amnesia.meta.uid = 1000;
    amnesia.meta.gid = 1000;
    amnesia.meta.mode = 0o700;
    let mut tmp = dir("tmp", vec![]);
    tmp.meta.mode = 0o1777;
    Node::dir(
        "",
        meta(0o755, 0),
        vec![
            dir(
                "etc",
                vec![
                    file("os-release", 0o644, os_release.into_bytes()),
                    file("hostname", 0o644, b"amnesia\n".to_vec()),
                ],
            ),
            dir(
                "usr",
                vec![
                    dir("bin", bin),
                    dir("lib", lib),
                    dir("share", vec![dir("doc", doc)]),
                ],
            ),
            dir(
                "lib",
                vec![dir(
                    "modules",
                    vec![dir(
                        &kernel_dir,
                        vec![file("vmlinuz-stub.ko", 0o644, binary(kernel * 31, 400_000))],
                    )],
                )],
            ),
            dir(
                "dev",
                vec![Node {
                    name: b"null".to_vec(),
                    meta: meta(0o666, 0),
                    kind: Kind::CharDev((1 << 8) | 3),
                }],
            ),
            dir("home", vec![amnesia]),
            tmp,
        ],
    )
}

/// Sets every inode's time (as gensquashfs does with SOURCE_DATE_EPOCH).
pub fn set_mtime(n: &mut Node, t: u32) {
    n.meta.mtime = t;
    if let Kind::Dir(c) = &mut n.kind {
        for x in c {
            set_mtime(x, t);
        }
    }
}

/// The SOURCE_DATE_EPOCH of the newest sample release (Tails 6.9's).
pub const SAMPLE_SDE: u32 = 1_730_285_444;

/// Sample releases come out this often.
const RELEASE_INTERVAL: u32 = 28 * 86_400;

/// The SOURCE_DATE_EPOCH of release `rel` of `releases`: its ISO's date
/// and its files' time, as in Tails' builds.
pub fn release_date(rel: u64, releases: u64) -> u32 {
    SAMPLE_SDE - (releases - 1 - rel) as u32 * RELEASE_INTERVAL
}

/// Version of sample release `rel`.
pub fn version(rel: u64, layout: Layout) -> String {
    format!("{}.{rel}", layout.major())
}

fn iso_file(name: &str, data: impl Into<Vec<u8>>, date: u32) -> Node {
    let mut n = file(name, 0o444, data.into());
    n.meta.mtime = date;
    n
}

fn iso_dir(name: &str, children: Vec<Node>, date: u32) -> Node {
    let mut n = dir(name, children);
    n.meta.mode = 0o555;
    n.meta.mtime = date;
    n
}

/// What Tails' installer runs as `utils/linux/syslinux` (through sudo,
/// on the boot device): a stand-in that checks its arguments and does
/// nothing, so that installing a sample kit works.
const SYSLINUX: &str = "#!/bin/sh\n\
# iukfarm sample release: a stand-in for syslinux, which writes nothing.\n\
[ \"$#\" -gt 0 ] || { echo \"usage: syslinux [options] device\" >&2; exit 1; }\n\
exit 0\n";

/// The ISO of sample release `rel`: its system image plus boot files; the
/// kernel changes every other release, a boot file goes away in the last.
fn iso_tree(
    rel: u64,
    last: bool,
    layout: Layout,
    date: u32,
    image: &Path,
    image_size: u64,
) -> Node {
    let kernel = 1 + rel / 2;
    let file = |name: &str, data: Vec<u8>| iso_file(name, data, date);
    let dir = |name: &str, children: Vec<Node>| iso_dir(name, children, date);
    let mut efi_boot = vec![file("bootx64.efi", format!("EFI loader {kernel}\n").into())];
    if !last {
        efi_boot.push(file(
            "grubx64.efi",
            b"legacy loader, dropped in the newest release\n".to_vec(),
        ));
    }
    if layout == Layout::Tails7 {
        // GRUB's modules; a few change in each release.
        let modules = (0..280u64)
            .map(|i| {
                let stamp = if i % 40 == 0 { rel } else { 0 };
                file(
                    &format!("module{i:03}.mod"),
                    binary(7_000_000 + i * 100 + stamp, 200 + (i as usize * 37) % 3_000),
                )
            })
            .collect();
        efi_boot.push(dir("grub", vec![dir("x86_64-efi", modules)]));
    }
    let mut image_node = file("filesystem.squashfs", Vec::new());
    image_node.kind = Kind::File(FileContent {
        size: image_size,
        source: Source::Path(image.to_path_buf()),
    });
    let mut syslinux = file("syslinux", SYSLINUX.into());
    syslinux.meta.mode = 0o555;
    let mut root = dir(
        "",
        vec![
            dir("EFI", vec![dir("BOOT", efi_boot)]),
            dir(
                "isolinux",
                vec![
                    file(
                        "isolinux.cfg",
                        b"include /isolinux/live.cfg\ndefault live\n".to_vec(),
                    ),
                    file(
                        "live.cfg",
                        format!(
                            "label live\n  kernel /live/vmlinuz\n  append initrd=/live/initrd.img # {}\n",
                            version(rel, layout)
                        )
                        .into(),
                    ),
                ],
            ),
            dir(
                "live",
                vec![
                    image_node,
                    file(
                        "initrd.img",
                        format!("initramfs for kernel {kernel}\n").repeat(2000).into(),
                    ),
                    file("vmlinuz", format!("kernel {kernel}\n").repeat(5000).into()),
                ],
            ),
            dir(
                "utils",
                vec![
                    dir("linux", vec![syslinux]),
                    dir("mbr", vec![file("mbr.bin", vec![0u8; 440])]),
                ],
            ),
        ],
    );
    root.meta.mtime = date;
    root
}

/// How sample release images are written: Tails 7's zstd (`auto/build`:
/// level 22, 1 MiB blocks) or Tails 6's xz.
fn image_options(layout: Layout, date: u32, threads: usize) -> WriterOptions {
    let mut o = diff_writer_options(date, threads);
    if layout == Layout::Tails7 {
        o.zstd_level = Some(22);
    }
    o
}

/// What a series of sample releases is like.
#[derive(Debug, Clone, Copy)]
pub struct Series {
    pub layout: Layout,
    pub releases: u64,
    /// Roughly each system's size in MiB.
    pub scale: u64,
    /// A library of this many MiB that changes in every release (0: none).
    pub big_mib: u64,
}

/// Writes a series of sample releases as a Tails-layout ISO archive under
/// `root` (`tails-amd64-<v>/tails-amd64-<v>.iso`); returns (version, ISO).
pub fn write_releases(
    root: &Path,
    series: Series,
    threads: usize,
    progress: &dyn Progress,
    mut said: impl FnMut(String),
) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let Series {
        layout,
        releases,
        scale,
        big_mib,
    } = series;
    let mut isos = Vec::new();
    for rel in 0..releases {
        let version = version(rel, layout);
        let date = release_date(rel, releases);
        let t = Instant::now();
        let dir = root.join(format!("tails-amd64-{version}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut system = system_tree(rel, scale, big_mib, layout);
        set_mtime(&mut system, date);
        let image = tempfile::NamedTempFile::new_in(&dir)?;
        let stats = write_image(
            &system,
            &image_options(layout, date, threads),
            image.as_file(),
            progress,
        )
        .with_context(|| format!("writing the system image of {version}"))?;
        let iso_path = dir.join(format!("tails-amd64-{version}.iso"));
        let tmp = temp_next_to(&iso_path)?;
        let tree = iso_tree(
            rel,
            rel + 1 == releases,
            layout,
            date,
            image.path(),
            stats.image_size,
        );
        write_iso(
            &tree,
            &format!("TAILS {version}"),
            &mut tmp.as_file().try_clone()?,
        )
        .with_context(|| format!("writing {}", iso_path.display()))?;
        persist(tmp, &iso_path, true)?;
        said(format!(
            "release {version}: {:.1} MiB system, {} inodes -> {} in {:.1}s",
            stats.data.bytes_read as f64 / 1048576.0,
            stats.inodes,
            iso_path.display(),
            t.elapsed().as_secs_f64()
        ));
        isos.push((version, iso_path));
    }
    Ok(isos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_differ_but_are_deterministic() {
        let a = system_tree(1, 2, 1, Layout::Tails7);
        let b = system_tree(1, 2, 1, Layout::Tails7);
        let c = system_tree(2, 2, 1, Layout::Tails7);
        use iukfarm_engine::compare::{CompareOptions, compare_trees};
        assert!(
            compare_trees(&a, &b, CompareOptions::default())
                .unwrap()
                .is_empty()
        );
        let d = compare_trees(&a, &c, CompareOptions::default()).unwrap();
        assert!(d.iter().any(|x| x.path == "etc/os-release"), "{d:?}");
        assert!(
            d.iter().any(|x| x.path == "usr/lib/tor-browser/libxul.so"),
            "{d:?}"
        );
        a.validate().unwrap();
        c.validate().unwrap();
    }
}
