//! Any byte string as an ISO image: listing and walking must return errors,
//! never panic.
#![no_main]

use std::sync::Arc;

use iukfarm_engine::iso::Iso;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(iso) = Iso::open(Arc::new(data.to_vec())) else { return };
    let _ = iso.walk(b"", &mut |_, e| {
        if !e.is_dir {
            let _ = iso.read_file(e, 1 << 20);
        }
        Ok(())
    });
    let _ = iso.lookup(b"live/filesystem.squashfs");
});
