//! What every PocketOS daemon does alike: its whole `main` ([`run`]:
//! command line, logging to stderr, strict TOML config, waiting for SIGTERM
//! or Ctrl-C), the admin check, opening files others placed, and the one
//! job object of long operations.

pub mod access;
pub mod files;
pub mod job;
mod main_loop;
mod user;

pub use main_loop::{run, Daemon, Running};
pub use user::{run_as, RunAsError};

use serde::de::DeserializeOwned;
use std::path::Path;

/// Logs to stderr; `RUST_LOG` overrides `default` (e.g. `info,zbus=warn`).
pub fn init_logging(default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default.into()),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Reads a TOML config; unknown keys are an error when `T` denies them.
pub fn load_config<T: DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))
}

/// Returns when the daemon is asked to stop.
pub async fn shutdown_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}

/// Asks the kernel to start writing `len` bytes at `offset` of `file` (all
/// of it when `len` is 0) to disk now, without waiting, so that a later
/// fsync has only the tail left and the writer is not held up by one long
/// flush. Failure is harmless: the fsync that follows is what is checked.
pub fn start_writeback(file: &std::fs::File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    #[allow(unsafe_code)]
    // SAFETY: sync_file_range only reads its integer arguments; the fd is
    // open for the duration of the call because `file` is borrowed.
    let _ = unsafe {
        nix::libc::sync_file_range(
            file.as_raw_fd(),
            offset as nix::libc::off64_t,
            len as nix::libc::off64_t,
            nix::libc::SYNC_FILE_RANGE_WRITE,
        )
    };
}
