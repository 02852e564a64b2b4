//! `tollgate`: run a node (`tollgate serve`) or talk to one (`tollgate query`, `pricing`, ...).

use std::process::ExitCode;

fn main() -> ExitCode {
    tollgate::cli::main()
}
