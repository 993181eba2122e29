//! The `mirrordb` binary: installs the one rustls crypto provider
//! (aws-lc-rs), sets up logging, and runs the command (see `cli`). Its
//! allocator is mimalloc: in back-to-back runs on 2 cores it gave the node
//! 6-11 % more durable writes per second than glibc's malloc, whose
//! arenas showed ~11 % of the HTTP server's samples (BENCHMARKS.md).
//! mimalloc returns freed memory to the kernel after 10 s here instead of
//! its default 1 s (`MIMALLOC_PURGE_DELAY` still overrides it): redb
//! allocates a fresh buffer for every page it writes, and memory handed
//! back and faulted in again cost a replay a third of its time in the
//! kernel zeroing pages.

use clap::Parser;
use mirrordb::cli::{self, Cli};
use std::process::ExitCode;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (its `mimalloc.h`, v3: the option
/// between `deprecated_eager_commit_delay` and `use_numa_nodes`, which
/// `libmimalloc-sys` names 14 and 16; the test below checks its default).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// How long freed memory stays with the process before it is purged, in ms.
const PURGE_DELAY_MS: std::ffi::c_long = 10_000;

/// Sets mimalloc's purge delay, unless the environment set it (mimalloc
/// reads its `MIMALLOC_*` variables when the process loads). The one
/// `unsafe` of the project: a call into mimalloc's C options API.
#[allow(unsafe_code)]
fn tune_allocator() {
    // Either name mimalloc reads (the second is its older one).
    let set = ["MIMALLOC_PURGE_DELAY", "MIMALLOC_RESET_DELAY"]
        .iter()
        .any(|v| std::env::var_os(v).is_some());
    if !set {
        // SAFETY: called first in `main`, before any other thread exists
        // (mimalloc's option setters are not thread-safe); the option index
        // is checked by a test.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    }
}

fn main() -> ExitCode {
    tune_allocator();
    // One crypto provider for the whole process (DEPENDENCIES.md pitfalls):
    // installed before anything builds a TLS config.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let args = Cli::parse();
    cli::init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("mirrordb")
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mirrordb: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mirrordb: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(unsafe_code)]
    fn the_purge_delay_option_is_the_one_set() {
        // mimalloc v3's default purge delay is 1000 ms; no other option
        // nearby defaults to it. (Skipped where the environment sets it.)
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        // SAFETY: reads an option; no other thread sets options.
        let default = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(default, 1000, "mi_option_purge_delay is not option 15");
    }
}
