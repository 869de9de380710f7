//! Any byte string as a SquashFS image: opening, walking, reading every
//! file and xattr must return errors, never panic or allocate unboundedly.
#![no_main]

use std::io::Read;
use std::sync::Arc;

use iukfarm_engine::sqfs::{Archive, InodeKind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(ar) = Archive::open(Arc::new(data.to_vec())) else { return };
    let mut budget: u64 = 64 << 20;
    let _ = ar.walk(&mut |_, inode| {
        let _ = ar.xattrs(inode.xattr);
        if let InodeKind::File(f) = &inode.kind {
            let mut r = ar.open_file(f);
            let mut buf = vec![0u8; 1 << 16];
            while budget > 0 {
                match r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => budget = budget.saturating_sub(n as u64),
                }
            }
        }
        Ok(())
    });
    let _ = ar.to_tree();
});
