//! Engine tests: one per recovery decision-table row, fault injection, and the write paths.
