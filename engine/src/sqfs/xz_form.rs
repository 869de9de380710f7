//! The exact xz container our writer emits around a block, for checking
//! blocks that someone else compressed (a worker's upload, a helper's form).
//!
//! liblzma's `lzma_stream_buffer_encode` with a CRC32 check writes one
//! stream of one block: stream header, block header (compressed and
//! uncompressed sizes present, the filter chain, the LZMA2 dictionary
//! byte), the LZMA2 data, padding, the CRC32 of the data, an index of one
//! record, stream footer. Everything but the LZMA2 data follows from the
//! settings and the block's contents, so a form is ours exactly when it
//! equals that container rebuilt around its own LZMA2 data. Anything else
//! (another check, such as SHA-256, which the kernel's decoder refuses;
//! padding; several blocks or streams; other sizes or filters) is refused,
//! even if liblzma decompresses it right.

use super::compress::{XzConfig, xz_flags};
use crate::error::{Error, Result};

const MAGIC: [u8; 6] = [0xFD, b'7', b'z', b'X', b'Z', 0];
/// Stream flags: no flags, check type CRC32.
const FLAGS_CRC32: [u8; 2] = [0, 1];
const FILTER_LZMA2: u64 = 0x21;
/// The BCJ filters' ids, by their bit in the compressor options.
const BCJ_IDS: [(u32, u64); 6] = [
    (xz_flags::X86, 0x04),
    (xz_flags::POWERPC, 0x05),
    (xz_flags::IA64, 0x06),
    (xz_flags::ARM, 0x07),
    (xz_flags::ARMTHUMB, 0x08),
    (xz_flags::SPARC, 0x09),
];

fn vli(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads a VLI at `*at`; `None` if malformed or not minimal.
fn read_vli(b: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for i in 0..9 {
        let byte = *b.get(*at)?;
        *at += 1;
        v |= u64::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return (byte != 0 || i == 0).then_some(v);
        }
    }
    None
}

fn crc32(data: &[u8]) -> [u8; 4] {
    crc32fast::hash(data).to_le_bytes()
}

/// The LZMA2 properties byte liblzma writes for a dictionary size: the
/// smallest `b` whose size `(2 | b & 1) << (b / 2 + 11)` holds it.
fn dict_byte(dict_size: u32) -> u8 {
    (0u8..40)
        .find(|&b| (u64::from(2 | (b & 1)) << (b / 2 + 11)) >= u64::from(dict_size))
        .unwrap_or(40)
}

/// The container our writer would make around `lzma2` (the block's LZMA2
/// data) for `uncompressed`, with `bcj` (a filter id) or none before LZMA2.
fn container(cfg: &XzConfig, bcj: Option<u64>, lzma2: &[u8], uncompressed: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(lzma2.len() + 64);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FLAGS_CRC32);
    out.extend_from_slice(&crc32(&FLAGS_CRC32));

    let fields = |compressed: u64| {
        let mut h = vec![0u8, 0xC0 | u8::from(bcj.is_some())];
        vli(&mut h, compressed);
        vli(&mut h, uncompressed.len() as u64);
        if let Some(id) = bcj {
            vli(&mut h, id);
            vli(&mut h, 0);
        }
        vli(&mut h, FILTER_LZMA2);
        vli(&mut h, 1);
        h.push(dict_byte(cfg.dict_size));
        h
    };
    // liblzma sizes the header for the largest LZMA2 data the block could
    // need (`lzma2_bound`: 3 bytes a 64 KiB chunk, 1 for the end), then
    // writes the real size and pads with zeros.
    let bound = uncompressed.len() as u64 + (uncompressed.len() as u64).div_ceil(1 << 16) * 3 + 1;
    let header_len = (fields(bound).len() + 4).next_multiple_of(4);
    let mut header = fields(lzma2.len() as u64);
    header.resize(header_len - 4, 0);
    header[0] = (header_len / 4 - 1) as u8;
    let header_crc = crc32(&header);
    header.extend_from_slice(&header_crc);
    out.extend_from_slice(&header);

    out.extend_from_slice(lzma2);
    out.resize(out.len().next_multiple_of(4), 0);
    out.extend_from_slice(&crc32(uncompressed));

    let unpadded = header.len() + lzma2.len() + 4;
    let mut index = vec![0u8];
    vli(&mut index, 1);
    vli(&mut index, unpadded as u64);
    vli(&mut index, uncompressed.len() as u64);
    index.resize(index.len().next_multiple_of(4), 0);
    let index_crc = crc32(&index);
    index.extend_from_slice(&index_crc);
    out.extend_from_slice(&index);

    let mut footer = ((index.len() / 4 - 1) as u32).to_le_bytes().to_vec();
    footer.extend_from_slice(&FLAGS_CRC32);
    out.extend_from_slice(&crc32(&footer));
    out.extend_from_slice(&footer);
    out.extend_from_slice(b"YZ");
    out
}

/// Checks that `stored`, a block that decompressed to `uncompressed`, is
/// in exactly the form our writer emits with `cfg` (a BCJ filter only if
/// `cfg` enables it). Only the LZMA2 data inside is not checked here.
pub fn check(cfg: &XzConfig, stored: &[u8], uncompressed: &[u8]) -> Result<()> {
    let not_ours = |why: &str| Error::Corrupt(format!("xz block not in our writer's form: {why}"));
    let header = stored.get(12..).ok_or_else(|| not_ours("too short"))?;
    let header_len = (usize::from(*header.first().ok_or_else(|| not_ours("too short"))?) + 1) * 4;
    let flags = *header.get(1).ok_or_else(|| not_ours("too short"))?;
    let mut at = 2;
    let compressed = read_vli(header, &mut at).ok_or_else(|| not_ours("block header"))?;
    let bcj = match flags & 3 {
        0 => None,
        1 => {
            let _uncompressed = read_vli(header, &mut at);
            let id = read_vli(header, &mut at).ok_or_else(|| not_ours("filter chain"))?;
            let allowed = BCJ_IDS
                .iter()
                .any(|&(bit, bcj)| bcj == id && cfg.flags & bit != 0);
            if !allowed {
                return Err(not_ours("a filter the settings do not enable"));
            }
            Some(id)
        }
        _ => return Err(not_ours("filter chain")),
    };
    let start = 12 + header_len;
    let lzma2 = usize::try_from(compressed)
        .ok()
        .and_then(|n| stored.get(start..start.checked_add(n)?))
        .ok_or_else(|| not_ours("compressed size"))?;
    let rebuilt = container(cfg, bcj, lzma2, uncompressed);
    if rebuilt != stored {
        return Err(not_ours(
            "its container differs (check type, sizes, filters, padding, index)",
        ));
    }
    Ok(())
}

/// liblzma's easy encoder (preset 6) with another integrity check: valid
/// xz that liblzma decompresses right, and not our form (for tests).
#[cfg(test)]
pub(crate) fn easy_encode(input: &[u8], check_type: liblzma_sys::lzma_check) -> Vec<u8> {
    let mut out = vec![0u8; input.len() + 1024];
    let mut n = 0usize;
    // SAFETY: valid buffers of the given lengths; the easy encoder takes a
    // preset, no filter pointers.
    let ret = unsafe {
        liblzma_sys::lzma_easy_buffer_encode(
            6,
            check_type,
            std::ptr::null(),
            input.as_ptr(),
            input.len(),
            out.as_mut_ptr(),
            &mut n,
            out.len(),
        )
    };
    assert_eq!(ret, liblzma_sys::LZMA_OK);
    out.truncate(n);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sqfs::compress::decompress;
    use crate::sqfs::format::CompressorId;
    use liblzma_sys as lz;

    fn inputs() -> Vec<Vec<u8>> {
        let mut x = 0x9E37_79B9u32;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        vec![
            b"a".to_vec(),
            b"squashfs ".repeat(50),
            (0..300_000).map(|i| (i % 251) as u8).collect(),
            // x86-like code, which the BCJ filter shrinks.
            (0..200_000)
                .flat_map(|i| {
                    let r = next();
                    if i % 3 == 0 {
                        vec![0xE8, r as u8, (r >> 8) as u8, 0, 0]
                    } else {
                        vec![0x48, 0x89, (r % 7) as u8]
                    }
                })
                .collect(),
        ]
    }

    #[test]
    fn every_form_our_writer_makes_passes() {
        for (flags, dict, block) in [
            (0, 131072, 131072),
            (xz_flags::X86, 1 << 20, 1 << 20),
            (
                xz_flags::X86 | xz_flags::ARM | xz_flags::EXTREME,
                1 << 20,
                1 << 20,
            ),
            (0, 8192, 4096),
            (0, 3 << 19, 1 << 20),
        ] {
            let mut cfg = XzConfig::for_block_size(block);
            cfg.flags = flags;
            cfg.dict_size = dict;
            for input in inputs() {
                let Some(c) = cfg.compress(&input).unwrap() else {
                    continue;
                };
                check(&cfg, &c, &input).unwrap_or_else(|e| panic!("{flags:#x} {dict}: {e}"));
                // And not with the wrong contents or settings.
                let mut other = input.clone();
                other[0] ^= 1;
                assert!(check(&cfg, &c, &other).is_err());
                let mut wider = cfg;
                wider.dict_size = dict * 2;
                assert!(check(&wider, &c, &input).is_err());
            }
        }
    }

    #[test]
    fn forms_that_decompress_right_but_are_not_ours_are_refused() {
        let cfg = XzConfig::for_block_size(131072);
        let input = b"incremental upgrade kit ".repeat(4000);
        let ours = cfg.compress(&input).unwrap().unwrap();
        check(&cfg, &ours, &input).unwrap();
        for (what, form) in [
            (
                "a SHA-256 check",
                easy_encode(&input, lz::LZMA_CHECK_SHA256),
            ),
            ("a CRC64 check", easy_encode(&input, lz::LZMA_CHECK_CRC64)),
            ("no check", easy_encode(&input, lz::LZMA_CHECK_NONE)),
            ("stream padding", [&ours[..], &[0u8; 4]].concat()),
            ("two streams", {
                let (a, b) = input.split_at(input.len() / 2);
                let (a, b) = (
                    cfg.compress(a).unwrap().unwrap(),
                    cfg.compress(b).unwrap().unwrap(),
                );
                [a, b].concat()
            }),
        ] {
            // liblzma takes them all (so does the reader, for inputs).
            if let Ok(d) = decompress(CompressorId::Xz, &form, input.len()) {
                assert_eq!(d, input, "{what}");
            }
            let e = check(&cfg, &form, &input).unwrap_err();
            assert!(
                e.to_string().contains("not in our writer's form"),
                "{what}: {e}"
            );
        }
        // A BCJ filter the settings do not enable.
        let mut x86 = cfg;
        x86.flags = xz_flags::X86;
        let code: Vec<u8> = (0..50_000u32)
            .flat_map(|i| [0xE8, i as u8, (i >> 8) as u8, 0, 0])
            .collect();
        if let Some(c) = x86.compress(&code).unwrap() {
            check(&x86, &c, &code).unwrap();
            if c[12 + 1] & 3 == 1 {
                assert!(check(&cfg, &c, &code).is_err());
            }
        }
    }

    #[test]
    fn dictionary_bytes_are_liblzmas() {
        assert_eq!(dict_byte(4096), 0);
        assert_eq!(dict_byte(8192), 2);
        assert_eq!(dict_byte(131072), 10);
        assert_eq!(dict_byte(3 << 19), 17);
        assert_eq!(dict_byte(1 << 20), 16);
    }
}
