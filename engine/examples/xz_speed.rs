//! Times the bundled liblzma on one block: `cargo run --release --example xz_speed FILE`.
use iukfarm_engine::sqfs::XzConfig;

fn main() {
    let path = std::env::args().nth(1).expect("usage: xz_speed FILE");
    let mut d = std::fs::read(path).unwrap();
    d.truncate(1 << 20);
    let cfg = XzConfig::for_block_size(1 << 20);
    let t = std::time::Instant::now();
    let mut n = 0;
    for _ in 0..10 {
        n = cfg.compress(&d).unwrap().map_or(0, |c| c.len());
    }
    println!(
        "bundled liblzma {}: {:.3} s per MiB, {n} bytes",
        iukfarm_engine::sqfs::compress::liblzma_version(),
        t.elapsed().as_secs_f64() / 10.0
    );
}
