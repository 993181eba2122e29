//! The journal: segmented, append-only files of checksummed entries with
//! dense LSNs (DESIGN §3). `format` is the byte layout, `disk` the I/O seam
//! used for fault injection, `scan` verification and reading back, `cursor`
//! sequential reads of the live journal from remembered positions,
//! `prealloc` the zeroed blocks kept ahead of the writer.

pub mod cursor;
pub mod disk;
pub mod format;
pub mod prealloc;
pub mod scan;
pub mod writer;
