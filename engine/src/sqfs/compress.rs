//! Block compression and decompression.
//!
//! Writing supports xz, with exactly libsquashfs's settings and filter
//! trial so that our blocks are the bytes gensquashfs writes, and zstd,
//! for system images like Tails 7's (inputs, never kits). Reading supports
//! xz, gzip, zstd and lz4, always into a caller-bounded buffer so that a
//! hostile block cannot make us allocate more than one block.

use std::io::Read;

use liblzma_sys as lz;

use super::format::CompressorId;
use crate::error::{Error, Result};

/// xz BCJ filter flags, as stored in the compressor options block.
pub mod xz_flags {
    pub const X86: u32 = 0x0001;
    pub const POWERPC: u32 = 0x0002;
    pub const IA64: u32 = 0x0004;
    pub const ARM: u32 = 0x0008;
    pub const ARMTHUMB: u32 = 0x0010;
    pub const SPARC: u32 = 0x0020;
    pub const EXTREME: u32 = 0x0100;
    pub const ALL: u32 = 0x013F;
}

const FILTER_NAMES: [(&str, u32); 7] = [
    ("x86", xz_flags::X86),
    ("powerpc", xz_flags::POWERPC),
    ("ia64", xz_flags::IA64),
    ("arm", xz_flags::ARM),
    ("armthumb", xz_flags::ARMTHUMB),
    ("sparc", xz_flags::SPARC),
    ("extreme", xz_flags::EXTREME),
];

/// xz encoder settings, with libsquashfs's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct XzConfig {
    pub level: u32,
    pub dict_size: u32,
    pub lc: u32,
    pub lp: u32,
    pub pb: u32,
    /// BCJ filters to try plus [`xz_flags::EXTREME`].
    pub flags: u32,
}

impl XzConfig {
    /// libsquashfs's defaults for a block size: level 6, lc 3, lp 0, pb 2,
    /// dictionary = block size (at least 8 KiB), no filters.
    pub fn for_block_size(block_size: u32) -> Self {
        XzConfig {
            level: 6,
            dict_size: block_size.max(8192),
            lc: 3,
            lp: 0,
            pb: 2,
            flags: 0,
        }
    }

    /// Applies a gensquashfs `--comp-extra` option list such as
    /// `x86,dictsize=1024K`.
    pub fn apply_extra(&mut self, extra: &str, block_size: u32) -> Result<()> {
        for item in extra.split(',').filter(|s| !s.is_empty()) {
            let (key, value) = match item.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (item, None),
            };
            let number = |lo: u32, hi: u32| -> Result<u32> {
                let v = value
                    .ok_or_else(|| Error::Invalid(format!("xz option '{key}' needs a value")))?;
                let n: u32 = v.parse().map_err(|_| {
                    Error::Invalid(format!("xz option '{key}': '{v}' is not a number"))
                })?;
                if !(lo..=hi).contains(&n) {
                    return Err(Error::Invalid(format!(
                        "xz option '{key}' must be in {lo}..={hi}"
                    )));
                }
                Ok(n)
            };
            match key {
                "level" => self.level = number(1, 9)?,
                "lc" => self.lc = number(0, 4)?,
                "lp" => self.lp = number(0, 4)?,
                "pb" => self.pb = number(0, 4)?,
                "dictsize" => {
                    let v = value.ok_or_else(|| {
                        Error::Invalid("xz option 'dictsize' needs a value".into())
                    })?;
                    self.dict_size = parse_size(v, block_size)?;
                }
                _ => match FILTER_NAMES.iter().find(|(n, _)| *n == key) {
                    Some((_, f)) if value.is_none() => self.flags |= f,
                    _ => {
                        return Err(Error::Invalid(format!(
                            "unknown xz option '{item}' (supported: x86, powerpc, ia64, arm, armthumb, sparc, \
                             extreme, level=N, lc=N, lp=N, pb=N, dictsize=SIZE)"
                        )));
                    }
                },
            }
        }
        self.validate()
    }

    pub fn validate(&self) -> Result<()> {
        if !dict_size_valid(self.dict_size) || !(8192..=1 << 30).contains(&self.dict_size) {
            return Err(Error::Invalid(format!(
                "xz dictionary size {} must be 2^n or 2^n + 2^(n-1), between 8 KiB and 1 GiB",
                self.dict_size
            )));
        }
        if self.lc + self.lp > 4 {
            return Err(Error::Invalid("xz lc + lp must not exceed 4".into()));
        }
        Ok(())
    }

    /// For settings received from another machine (work sharing): valid,
    /// and bounded so that compressing with them needs little memory
    /// (dictionary at most 8 MiB; squashfs blocks are at most 1 MiB).
    pub fn validate_shared(&self) -> Result<()> {
        self.validate()?;
        if self.level > 9 || self.pb > 4 || self.flags & !xz_flags::ALL != 0 {
            return Err(Error::Invalid(format!(
                "xz settings out of range: {self:?}"
            )));
        }
        if self.dict_size > 8 << 20 {
            return Err(Error::Invalid(format!(
                "xz dictionary of {} bytes: more than work sharing takes",
                self.dict_size
            )));
        }
        Ok(())
    }

    /// The 8-byte compressor options block payload, if libsquashfs writes one:
    /// only when a filter is set or the dictionary differs from the block size.
    pub fn options_payload(&self, block_size: u32) -> Option<[u8; 8]> {
        if self.flags == 0 && self.dict_size == block_size {
            return None;
        }
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&self.dict_size.to_le_bytes());
        b[4..].copy_from_slice(&(self.flags & xz_flags::ALL & !xz_flags::EXTREME).to_le_bytes());
        Some(b)
    }

    /// Compresses one block the way libsquashfs's xz compressor does: plain
    /// LZMA2 first, then every enabled BCJ filter (and "extreme" variants if
    /// set); the strictly smallest result wins, earlier candidates winning
    /// ties. `None` means the block must be stored uncompressed because no
    /// candidate is smaller than the input.
    pub fn compress(&self, input: &[u8]) -> Result<Option<Vec<u8>>> {
        self.compress_with(input, true)
    }

    /// [`Self::compress`], with the candidates encoded one after another on
    /// the calling thread rather than in parallel on rayon's: for callers
    /// that others wait on, since a thread inside a rayon call may run
    /// (steal) another task, which could be one of the waiters. Same bytes.
    ///
    /// Not threads of their own: those callers already keep every core
    /// busy with a block each, and two encoders sharing a core evict each
    /// other's match-finder tables from its cache (measured: 15 to 20%
    /// more CPU per block than one encoder after the other).
    pub fn compress_here(&self, input: &[u8]) -> Result<Option<Vec<u8>>> {
        self.compress_with(input, false)
    }

    fn compress_with(&self, input: &[u8], rayon: bool) -> Result<Option<Vec<u8>>> {
        let extreme = self.flags & xz_flags::EXTREME != 0;
        // Candidates in trial order; each is independent, so they are
        // encoded in parallel (on the caller's rayon pool, if any) and
        // compared afterwards in the fixed order.
        let mut trials: Vec<(Option<lz::lzma_vli>, bool)> = vec![(None, false)];
        if extreme {
            trials.push((None, true));
        }
        for (bit, filter) in BCJ_FILTERS {
            if self.flags & bit == 0 {
                continue;
            }
            // The x86 filter only rewrites the 4 bytes after an E8/E9 opcode
            // byte. Without one it is the identity, so LZMA2 sees the same
            // bytes and the filtered stream can only be as long or longer
            // (its header names one more filter); the strict comparison
            // would keep the unfiltered result anyway, so skip the work.
            if bit == xz_flags::X86 && !input.iter().any(|&b| b & 0xFE == 0xE8) {
                continue;
            }
            trials.push((Some(filter), false));
            if extreme {
                trials.push((Some(filter), true));
            }
        }
        let results: Vec<Result<Option<Vec<u8>>>> = if trials.len() == 1 || !rayon {
            trials
                .iter()
                .map(|&(filter, ext)| self.encode(filter, ext, input))
                .collect()
        } else {
            use rayon::prelude::*;
            trials
                .par_iter()
                .with_max_len(1)
                .map(|&(filter, ext)| self.encode(filter, ext, input))
                .collect()
        };
        let mut best: Option<Vec<u8>> = None;
        for r in results {
            if let Some(c) = r?
                && best.as_ref().is_none_or(|b| c.len() < b.len())
            {
                best = Some(c);
            }
        }
        Ok(best)
    }

    fn encode(
        &self,
        bcj: Option<lz::lzma_vli>,
        extreme: bool,
        input: &[u8],
    ) -> Result<Option<Vec<u8>>> {
        // SAFETY: lzma_options_lzma is a plain C struct for which all-zero is a
        // valid value; lzma_lzma_preset then fills every field.
        let mut opt: lz::lzma_options_lzma = unsafe { std::mem::zeroed() };
        let preset = self.level | if extreme { lz::LZMA_PRESET_EXTREME } else { 0 };
        // SAFETY: `opt` is a valid, exclusively borrowed options struct.
        if unsafe { lz::lzma_lzma_preset(&mut opt, preset) } != 0 {
            return Err(Error::Compressor(format!("xz preset {preset} rejected")));
        }
        opt.lc = self.lc;
        opt.lp = self.lp;
        opt.pb = self.pb;
        opt.dict_size = self.dict_size;
        let mut filters: Vec<lz::lzma_filter> = Vec::with_capacity(3);
        if let Some(id) = bcj {
            filters.push(lz::lzma_filter {
                id,
                options: std::ptr::null_mut(),
            });
        }
        filters.push(lz::lzma_filter {
            id: lz::LZMA_FILTER_LZMA2,
            options: (&mut opt as *mut lz::lzma_options_lzma).cast(),
        });
        filters.push(lz::lzma_filter {
            id: lz::LZMA_VLI_UNKNOWN,
            options: std::ptr::null_mut(),
        });
        // Only output smaller than the input is useful, so an output buffer
        // of the input's size suffices (LZMA_BUF_ERROR then means "store").
        let mut out = vec![0u8; input.len()];
        let mut written = 0usize;
        // SAFETY: the filter chain is terminated and points at live options;
        // input and output buffers are valid for the given lengths.
        let ret = unsafe {
            lz::lzma_stream_buffer_encode(
                filters.as_mut_ptr(),
                lz::LZMA_CHECK_CRC32,
                std::ptr::null(),
                input.as_ptr(),
                input.len(),
                out.as_mut_ptr(),
                &mut written,
                out.len(),
            )
        };
        match ret {
            lz::LZMA_OK if written < input.len() => {
                out.truncate(written);
                out.shrink_to_fit();
                Ok(Some(out))
            }
            lz::LZMA_OK | lz::LZMA_BUF_ERROR => Ok(None),
            other => Err(Error::Compressor(format!(
                "xz encoder failed with code {other}"
            ))),
        }
    }
}

/// How the writer compresses blocks and metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// gensquashfs's xz: what kits are made of.
    Xz(XzConfig),
    /// zstd at a level (1 to 22), as mksquashfs writes it: Tails 7's
    /// system images are `-comp zstd -Xcompression-level 22`.
    Zstd { level: u32 },
}

/// The level mksquashfs and libsquashfs use when none is given; they write
/// a compressor options block only for another one.
pub const ZSTD_DEFAULT_LEVEL: u32 = 15;

impl Codec {
    pub fn id(&self) -> CompressorId {
        match self {
            Codec::Xz(_) => CompressorId::Xz,
            Codec::Zstd { .. } => CompressorId::Zstd,
        }
    }

    /// The xz settings, when blocks are xz (only those can be cached,
    /// shared with helpers or copied from an image).
    pub fn xz(&self) -> Option<&XzConfig> {
        match self {
            Codec::Xz(x) => Some(x),
            Codec::Zstd { .. } => None,
        }
    }

    pub fn validate(&self) -> Result<()> {
        match self {
            Codec::Xz(x) => x.validate(),
            Codec::Zstd { level } if (1..=22).contains(level) => Ok(()),
            Codec::Zstd { level } => Err(Error::Invalid(format!(
                "zstd level {level} must be between 1 and 22"
            ))),
        }
    }

    /// The compressor options block's payload, if one is written.
    pub fn options_payload(&self, block_size: u32) -> Option<Vec<u8>> {
        match self {
            Codec::Xz(x) => x.options_payload(block_size).map(|b| b.to_vec()),
            Codec::Zstd { level } if *level == ZSTD_DEFAULT_LEVEL => None,
            Codec::Zstd { level } => Some(level.to_le_bytes().to_vec()),
        }
    }

    /// One block's compressed form; `None`: store it, nothing smaller came out.
    pub fn compress(&self, input: &[u8]) -> Result<Option<Vec<u8>>> {
        match self {
            Codec::Xz(x) => x.compress(input),
            Codec::Zstd { level } => zstd_compress(*level, input),
        }
    }

    /// [`Codec::compress`] without using rayon (see [`XzConfig::compress_here`]).
    pub fn compress_here(&self, input: &[u8]) -> Result<Option<Vec<u8>>> {
        match self {
            Codec::Xz(x) => x.compress_here(input),
            Codec::Zstd { level } => zstd_compress(*level, input),
        }
    }
}

impl From<XzConfig> for Codec {
    fn from(x: XzConfig) -> Codec {
        Codec::Xz(x)
    }
}

/// zstd's one-shot compression of a known-size input (what mksquashfs's
/// `ZSTD_compressCCtx` does): a frame with the content size, no checksum.
fn zstd_compress(level: u32, input: &[u8]) -> Result<Option<Vec<u8>>> {
    // Only output smaller than the input is useful (see XzConfig::encode).
    let mut out = vec![0u8; input.len()];
    match zstd::bulk::compress_to_buffer(input, &mut out, level as i32) {
        Ok(n) if n < input.len() => {
            out.truncate(n);
            Ok(Some(out))
        }
        Ok(_) => Ok(None),
        // Most likely "destination too small", which means "store"; an
        // unbounded run tells that apart from a real failure.
        Err(_) => match zstd::bulk::compress(input, level as i32) {
            Ok(c) if c.len() < input.len() => Ok(Some(c)),
            Ok(_) => Ok(None),
            Err(e) => Err(Error::Compressor(format!("zstd encoder failed: {e}"))),
        },
    }
}

const BCJ_FILTERS: [(u32, lz::lzma_vli); 6] = [
    (xz_flags::X86, lz::LZMA_FILTER_X86),
    (xz_flags::POWERPC, lz::LZMA_FILTER_POWERPC),
    (xz_flags::IA64, lz::LZMA_FILTER_IA64),
    (xz_flags::ARM, lz::LZMA_FILTER_ARM),
    (xz_flags::ARMTHUMB, lz::LZMA_FILTER_ARMTHUMB),
    (xz_flags::SPARC, lz::LZMA_FILTER_SPARC),
];

fn dict_size_valid(size: u32) -> bool {
    let x = size & size.wrapping_sub(1);
    x == 0 || size == (x | (x >> 1))
}

/// Parses a size like `1024K`, `1M`, `131072` or `50%` (of `reference`).
pub fn parse_size(s: &str, reference: u32) -> Result<u32> {
    let bad = || Error::Invalid(format!("cannot parse size '{s}'"));
    let (digits, mult) = match s.as_bytes().last() {
        Some(b'k' | b'K') => (&s[..s.len() - 1], 1024u64),
        Some(b'm' | b'M') => (&s[..s.len() - 1], 1024 * 1024),
        Some(b'g' | b'G') => (&s[..s.len() - 1], 1024 * 1024 * 1024),
        Some(b'%') => {
            let p: u64 = s[..s.len() - 1].parse().map_err(|_| bad())?;
            return u32::try_from(reference as u64 * p / 100).map_err(|_| bad());
        }
        _ => (s, 1),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(mult)
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(bad)
}

/// The version of the liblzma linked into this binary; xz output bytes
/// depend on it, so it is part of the engine's fingerprint.
pub fn liblzma_version() -> String {
    // SAFETY: lzma_version_string returns a static NUL-terminated string.
    unsafe { std::ffi::CStr::from_ptr(lz::lzma_version_string()) }
        .to_string_lossy()
        .into_owned()
}

/// Decompresses one block of an image into at most `max_out` bytes.
pub fn decompress(id: CompressorId, input: &[u8], max_out: usize) -> Result<Vec<u8>> {
    let too_big = || Error::corrupt(format!("compressed block expands beyond {max_out} bytes"));
    match id {
        CompressorId::Xz => {
            let mut out = vec![0u8; max_out];
            let mut in_pos = 0usize;
            let mut out_pos = 0usize;
            // Large enough for any dictionary SquashFS allows (1 MiB blocks).
            let mut memlimit: u64 = 256 << 20;
            // SAFETY: buffers are valid for the lengths passed.
            let ret = unsafe {
                lz::lzma_stream_buffer_decode(
                    &mut memlimit,
                    0,
                    std::ptr::null(),
                    input.as_ptr(),
                    &mut in_pos,
                    input.len(),
                    out.as_mut_ptr(),
                    &mut out_pos,
                    out.len(),
                )
            };
            match ret {
                lz::LZMA_OK if in_pos == input.len() => {
                    out.truncate(out_pos);
                    Ok(out)
                }
                lz::LZMA_OK => Err(Error::corrupt("trailing bytes after xz stream")),
                lz::LZMA_BUF_ERROR => Err(too_big()),
                other => Err(Error::corrupt(format!(
                    "xz data corrupt (liblzma code {other})"
                ))),
            }
        }
        CompressorId::Gzip => {
            let mut out = Vec::with_capacity(max_out.min(1 << 20));
            flate2::read::ZlibDecoder::new(input)
                .take(max_out as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| Error::corrupt(format!("gzip data corrupt: {e}")))?;
            if out.len() > max_out {
                return Err(too_big());
            }
            Ok(out)
        }
        CompressorId::Zstd => zstd::bulk::decompress(input, max_out)
            .map_err(|e| Error::corrupt(format!("zstd data corrupt: {e}"))),
        CompressorId::Lz4 => {
            let mut out = vec![0u8; max_out];
            let n = lz4_flex::block::decompress_into(input, &mut out)
                .map_err(|e| Error::corrupt(format!("lz4 data corrupt: {e}")))?;
            out.truncate(n);
            Ok(out)
        }
        CompressorId::Lzo | CompressorId::Lzma => Err(Error::Unsupported(format!(
            "{}-compressed images cannot be read (supported: xz, gzip, zstd, lz4)",
            id.name()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zstd_blocks_that_decompress_past_their_size_are_refused() {
        let big = vec![7u8; 2 << 20];
        let sized = zstd::bulk::compress(&big, 3).unwrap();
        // A frame that does not say its size (a streaming encoder's).
        let streamed = zstd::stream::encode_all(&big[..], 3).unwrap();
        for frame in [&sized, &streamed] {
            assert_eq!(decompress(CompressorId::Zstd, frame, 2 << 20).unwrap(), big);
            let e = decompress(CompressorId::Zstd, frame, 1 << 20).unwrap_err();
            assert!(matches!(e, Error::Corrupt(_)), "{e}");
        }
        // Ours: a level-22 frame round-trips and is no larger than the block.
        let c = Codec::Zstd { level: 22 }.compress(&big).unwrap().unwrap();
        assert_eq!(decompress(CompressorId::Zstd, &c, big.len()).unwrap(), big);
    }

    #[test]
    fn xz_round_trip_and_store_rule() {
        let cfg = XzConfig::for_block_size(131072);
        let text: Vec<u8> = (0..100_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let c = cfg
            .compress(&text)
            .unwrap()
            .expect("compressible data stored raw");
        assert!(c.len() < text.len());
        assert_eq!(decompress(CompressorId::Xz, &c, text.len()).unwrap(), text);
        assert!(
            decompress(CompressorId::Xz, &c, text.len() - 1).is_err(),
            "output bound ignored"
        );

        // Incompressible input is stored.
        let mut x = 0x1234_5678u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(cfg.compress(&noise).unwrap().is_none());
    }

    #[test]
    fn filter_trial_never_loses() {
        let plain = XzConfig::for_block_size(1 << 20);
        let mut bcj = plain;
        bcj.flags = xz_flags::X86;
        let data: Vec<u8> = (0..200_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 & 0x3f)
            .collect();
        let a = plain.compress(&data).unwrap().unwrap();
        let b = bcj.compress(&data).unwrap().unwrap();
        assert!(b.len() <= a.len());
    }

    #[test]
    fn trials_on_rayon_or_one_after_another_give_the_same_bytes() {
        // Calls to one target: relative in the input, the same absolute
        // address after the x86 filter, so the filtered trial wins.
        let mut calls = Vec::new();
        while calls.len() < 200_000 {
            let rel = 0x0010_0000i32 - (calls.len() as i32 + 5);
            calls.push(0xE8);
            calls.extend_from_slice(&rel.to_le_bytes());
            calls.extend_from_slice(b"\x48\x89\xc7");
        }
        let text: Vec<u8> = (0..200_000u32).map(|i| (i % 97) as u8).collect();
        for flags in [xz_flags::X86, xz_flags::X86 | xz_flags::EXTREME] {
            let mut cfg = XzConfig::for_block_size(1 << 20);
            cfg.flags = flags;
            let unfiltered = cfg.encode(None, false, &calls).unwrap().unwrap();
            for data in [&calls, &text] {
                let here = cfg.compress_here(data).unwrap();
                assert_eq!(here, cfg.compress(data).unwrap());
                if data == &calls {
                    assert!(here.unwrap().len() < unfiltered.len(), "x86 trial lost");
                }
            }
        }
    }

    #[test]
    fn skipping_identity_bcj_changes_nothing() {
        // Without E8/E9 bytes the x86 filter is the identity; the shortcut
        // must give exactly what the full trial gives.
        let mut cfg = XzConfig::for_block_size(1 << 20);
        cfg.flags = xz_flags::X86;
        let ascii: Vec<u8> = (0..300_000u32)
            .map(|i| b"abcdefgh \n"[(i * 7 % 10) as usize])
            .collect();
        assert!(!ascii.iter().any(|&b| b & 0xFE == 0xE8));
        let plain = cfg.encode(None, false, &ascii).unwrap();
        let filtered = cfg
            .encode(Some(lz::LZMA_FILTER_X86), false, &ascii)
            .unwrap();
        assert!(filtered.as_ref().unwrap().len() >= plain.as_ref().unwrap().len());
        assert_eq!(cfg.compress(&ascii).unwrap(), plain);
    }

    #[test]
    fn comp_extra_parsing() {
        let mut c = XzConfig::for_block_size(1 << 20);
        c.apply_extra("x86,dictsize=1024K", 1 << 20).unwrap();
        assert_eq!(c.flags, xz_flags::X86);
        assert_eq!(c.dict_size, 1 << 20);
        assert_eq!(
            c.options_payload(1 << 20).unwrap(),
            [0, 0, 16, 0, 1, 0, 0, 0]
        );
        assert!(
            XzConfig::for_block_size(131072)
                .options_payload(131072)
                .is_none()
        );
        assert!(c.apply_extra("bogus", 1 << 20).is_err());
        assert!(c.apply_extra("dictsize=1000000", 1 << 20).is_err());
        assert_eq!(parse_size("50%", 1 << 20).unwrap(), 1 << 19);
    }

    #[test]
    fn corrupt_input_is_an_error() {
        for id in [
            CompressorId::Xz,
            CompressorId::Gzip,
            CompressorId::Zstd,
            CompressorId::Lz4,
        ] {
            assert!(
                decompress(id, b"\x00\x01garbage garbage", 4096).is_err(),
                "{id:?}"
            );
        }
    }
}
