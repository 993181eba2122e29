//! The engine: recovery at open, the single writer with group commit, the
//! data file and the read paths.

pub mod error;
pub mod store;

pub use error::{OpenError, ReadError, WriteError};
