//! SquashFS 4.0: on-disk format, compression, a reader that works in place
//! at any offset of any file, and a writer whose output is byte-identical
//! to gensquashfs 1.2.0's or 1.3.2's.

mod compat;
pub mod compress;
mod data;
pub mod format;
mod meta;
mod reader;
mod writer;
mod xattr_table;
pub mod xz_form;

pub use compat::Gensquashfs;
pub use compress::XzConfig;
pub use data::DataStats;
pub use reader::{
    Archive, DirEntry, FileInode, FileReader, ImageFile, Inode, InodeKind, TailDigests,
};
pub use writer::{WriteStats, WriterOptions, write_image};
