//! The `mirrordb` binary: installs the one rustls crypto provider
//! (aws-lc-rs), sets up logging, and runs the command (see `cli`). Its
//! allocator is mimalloc: in back-to-back runs on 2 cores it gave the node
//! 6-11 % more durable writes per second than glibc's malloc, whose
//! arenas showed ~11 % of the HTTP server's samples (BENCHMARKS.md).

use clap::Parser;
use mirrordb::cli::{self, Cli};
use std::process::ExitCode;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
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
