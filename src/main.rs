//! `loraops`: the one binary. Parses the command line and maps errors to exit codes.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = loraops::cli::Cli::parse();
    match loraops::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(loraops::cli::exit_code(&e))
        }
    }
}
