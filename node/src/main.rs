//! `tollgate`: run a node (`tollgate serve`) or talk to one (`tollgate query`, `pricing`, ...).

use std::process::ExitCode;

/// mimalloc instead of glibc's malloc: allocation was a quarter of the node's CPU under ingest
/// load (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    tollgate::cli::main()
}
