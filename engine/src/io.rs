//! Positional reads, so that images can be read in place (inside an ISO, at
//! any offset) and from several threads at once.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// A byte source that supports reads at arbitrary positions.
pub trait ReadAt: Send + Sync {
    /// Fills `buf` from `pos`; a short source is an `UnexpectedEof` error.
    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> io::Result<()>;
    /// Total length in bytes.
    fn size(&self) -> io::Result<u64>;
}

impl ReadAt for File {
    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, pos)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
}

impl ReadAt for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> io::Result<()> {
        let start = usize::try_from(pos).ok().filter(|&p| p <= self.len());
        match start.and_then(|s| self.get(s..s.checked_add(buf.len())?)) {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end",
            )),
        }
    }
    fn size(&self) -> io::Result<u64> {
        Ok(<[u8]>::len(self) as u64)
    }
}

impl ReadAt for Vec<u8> {
    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> io::Result<()> {
        self.as_slice().read_exact_at(buf, pos)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.as_slice().len() as u64)
    }
}

impl<T: ReadAt + ?Sized> ReadAt for Arc<T> {
    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> io::Result<()> {
        (**self).read_exact_at(buf, pos)
    }
    fn size(&self) -> io::Result<u64> {
        (**self).size()
    }
}

/// A window `[offset, offset + len)` of another source.
pub struct Slice<R: ReadAt + ?Sized> {
    pub inner: Arc<R>,
    pub offset: u64,
    pub len: u64,
}

impl<R: ReadAt + ?Sized> ReadAt for Slice<R> {
    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> io::Result<()> {
        match pos.checked_add(buf.len() as u64) {
            Some(end) if end <= self.len => self.inner.read_exact_at(buf, self.offset + pos),
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the window",
            )),
        }
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.len)
    }
}

/// Sequential reading of a whole positional source.
pub struct SeqReader {
    src: std::sync::Arc<dyn ReadAt>,
    pos: u64,
    len: u64,
}

impl SeqReader {
    pub fn new(src: std::sync::Arc<dyn ReadAt>) -> io::Result<Self> {
        let len = src.size()?;
        Ok(SeqReader { src, pos: 0, len })
    }
}

impl io::Read for SeqReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (self.len - self.pos).min(buf.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.src.read_exact_at(&mut buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}
