//! `kloigos`: the service and its command line. See `kloigos --help`.

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = kloigos::cli::Cli::parse();
    // systemd's sockets are taken first, before any thread exists (listenfd reads and clears
    // LISTEN_FDS/LISTEN_PID).
    let listeners = if matches!(cli.command, kloigos::cli::Command::Serve { .. }) {
        match kloigos::server::from_systemd() {
            Ok(l) => l,
            Err(e) => {
                eprintln!("kloigos: cannot take the sockets passed by systemd: {e:#}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        Vec::new()
    };
    kloigos::logging::init();
    match kloigos::cli::run(cli, listeners) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Each layer's message says only its own context; the report adds the causes once.
            eprintln!("kloigos: {}", e.report());
            ExitCode::FAILURE
        }
    }
}
