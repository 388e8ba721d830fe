//! The `centraldb-mfa` binary: parses the command line and runs it.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    centraldb_mfa::cli::run(centraldb_mfa::cli::parse()).await
}
