//! `pocketctl`: the command line over the PocketOS daemons.

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = pocketctl::Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match rt.block_on(pocketctl::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pocketctl: {}", pocketctl::one_line(&e));
            ExitCode::FAILURE
        }
    }
}
