//! Raft RPCs over a byte transport. (filled in below)
