use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    centraldb_mfa::cli::run(centraldb_mfa::cli::Cli::parse()).await
}
