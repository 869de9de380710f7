//! How often is a block a release image stores byte-identical to what the
//! exact (gensquashfs) writer would store for it with the diff's settings?
//! If always, the tails profile could copy blocks like the fast profile.
//!
//! `cargo run --release -p iukfarm-engine --example block_reuse ISO [SAMPLES]`
//! samples full data blocks evenly across the ISO's live/filesystem.squashfs,
//! decompresses each, compresses it again as the diff writer would, and
//! compares.

use std::io::Read;
use std::sync::Arc;

use iukfarm_engine::iso::Iso;
use iukfarm_engine::kit::diff_writer_options;
use iukfarm_engine::sqfs::Archive;
use iukfarm_engine::tree::{Kind, Node, Source};

fn files(n: &Node, out: &mut Vec<Arc<iukfarm_engine::sqfs::ImageFile>>) {
    match &n.kind {
        Kind::Dir(c) => c.iter().for_each(|x| files(x, out)),
        Kind::File(f) => {
            if let Source::Image(i) = &f.source {
                out.push(i.clone());
            }
        }
        _ => {}
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let iso_path = args.next().ok_or("usage: block_reuse ISO [SAMPLES]")?;
    let samples: usize = args.next().map_or(Ok(300), |s| s.parse())?;
    let iso = Iso::open(Arc::new(std::fs::File::open(&iso_path)?))?;
    let entry = iso
        .lookup(b"live/filesystem.squashfs")?
        .ok_or("no live/filesystem.squashfs")?;
    let ar = Archive::open(iso.file_reader(&entry)?)?;
    let cfg = diff_writer_options(0, 1).xz;
    println!(
        "image: block size {}, xz options {:?}; writer: dict {} flags {:#x}; liblzma {}",
        ar.superblock().block_size,
        ar.xz_options(),
        cfg.dict_size,
        cfg.flags,
        iukfarm_engine::sqfs::compress::liblzma_version()
    );
    let mut all = Vec::new();
    files(&ar.to_tree()?, &mut all);
    let bs = ar.superblock().block_size as u64;
    // Every full, non-sparse block: (file, index, position).
    let mut blocks = Vec::new();
    for f in &all {
        let inode = f.inode();
        let mut pos = inode.blocks_start;
        for (i, &size) in inode.block_sizes.iter().enumerate() {
            let full = (i as u64 + 1) * bs <= inode.size;
            if full && size != 0 {
                blocks.push((f.clone(), i, pos));
            }
            pos += (size & !(1 << 24)) as u64;
        }
    }
    let step = (blocks.len() / samples.max(1)).max(1);
    let (mut same, mut differ, mut n) = (0, 0, 0);
    let t = std::time::Instant::now();
    for (f, i, pos) in blocks.iter().step_by(step) {
        let (field, stored) = f.stored_block(*i, *pos)?;
        let mut data = vec![0u8; bs as usize];
        let mut r = f.open();
        std::io::copy(&mut (&mut r).take(*i as u64 * bs), &mut std::io::sink())?;
        r.read_exact(&mut data)?;
        let ours = cfg.compress(&data)?;
        let equal = match ours {
            Some(c) => field & (1 << 24) == 0 && c == stored,
            None => field & (1 << 24) != 0,
        };
        n += 1;
        if equal {
            same += 1;
        } else {
            differ += 1;
        }
    }
    println!(
        "{n} of {} full blocks sampled: {same} byte-identical, {differ} different ({:.1}s)",
        blocks.len(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
