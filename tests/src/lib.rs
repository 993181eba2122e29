//! Shared fixtures for mirrordb's integration tests: starting nodes as child
//! processes, HTTP clients, and seeded randomness that prints its seed.
