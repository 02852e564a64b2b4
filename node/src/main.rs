//! `tollgate`: run a node (`tollgate serve`) or talk to one (`tollgate query`, `pricing`, ...).

use std::process::ExitCode;

/// mimalloc instead of glibc's malloc: allocation was a quarter of the node's CPU under ingest
/// load (docs/benchmarks-history.md, step 3).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    if let Err(error) = tollgate::os::disable_transparent_huge_pages() {
        eprintln!("tollgate: cannot turn transparent huge pages off ({error}); going on with them");
    }
    tollgate::cli::main()
}
