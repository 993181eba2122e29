//! Units of meaning shared by every mirrordb crate: log positions, epochs and
//! node identities. They are newtypes, not aliases, so an LSN can never be
//! passed where an epoch is expected.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A log sequence number: the dense, gap-free position of a journal entry.
/// `Lsn(0)` means "nothing yet"; the first entry of a database is `Lsn(1)`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The position before the first entry.
    pub const ZERO: Lsn = Lsn(0);

    /// The next position. Saturates at `u64::MAX` (never reached in
    /// practice) so that a position taken from the network cannot make
    /// arithmetic panic.
    #[must_use]
    pub fn next(self) -> Lsn {
        Lsn(self.0.saturating_add(1))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The term of a primary. Every promotion increments it; entries carry the
/// epoch of the primary that wrote them, and entries of an older epoch than a
/// node has seen are rejected (fencing).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Epoch(pub u64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A cluster member's name, as written in its certificate (`n1`, `n2`, …).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub String);

impl NodeId {
    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for NodeId {
    fn from(s: &str) -> Self {
        NodeId(s.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_orders_and_advances() {
        assert!(Lsn(1) < Lsn(2));
        assert_eq!(Lsn::ZERO.next(), Lsn(1));
        assert_eq!(Lsn(41).to_string(), "41");
        assert_eq!(Lsn(u64::MAX).next(), Lsn(u64::MAX));
    }

    #[test]
    fn node_id_displays_its_name() {
        assert_eq!(NodeId::from("n2").to_string(), "n2");
    }
}
