//! The whole of a daemon's `main`: one command line (`--config PATH`,
//! `--version`, `--help`), logging, the strict config, and running until
//! SIGTERM or Ctrl-C.

use serde::de::DeserializeOwned;
use std::future::Future;
use std::path::PathBuf;

/// Who a daemon is, for its command line and its logs: made by
/// [`crate::daemon!`] from the daemon's own package.
#[derive(Debug, Clone, Copy)]
pub struct Daemon {
    /// The program's name (`pocket-modeld`); its config is
    /// `/etc/pocketos/modeld.toml` unless `--config` says otherwise.
    pub name: &'static str,
    /// One line for `--help`: the package's description.
    pub about: &'static str,
    pub version: &'static str,
    /// The log filter unless `RUST_LOG` says otherwise.
    pub log: &'static str,
}

impl Daemon {
    /// Another log filter than `info,zbus=warn`.
    pub fn log(self, log: &'static str) -> Daemon {
        Daemon { log, ..self }
    }

    /// The config's path when `--config` is not given.
    pub fn default_config(&self) -> String {
        let short = self.name.strip_prefix("pocket-").unwrap_or(self.name);
        format!("/etc/pocketos/{short}.toml")
    }
}

/// The [`Daemon`] of the binary being built, from its package.
#[macro_export]
macro_rules! daemon {
    () => {
        $crate::Daemon {
            name: env!("CARGO_BIN_NAME"),
            about: env!("CARGO_PKG_DESCRIPTION"),
            version: env!("CARGO_PKG_VERSION"),
            log: "info,zbus=warn",
        }
    };
}

/// What a daemon's `serve` hands back: how it goes on until it is asked to
/// stop.
pub trait Running {
    fn until_stopped(self, daemon: &Daemon) -> impl Future<Output = anyhow::Result<()>>;
}

/// A daemon on the bus serves for as long as its connection lives.
impl Running for zbus::Connection {
    async fn until_stopped(self, daemon: &Daemon) -> anyhow::Result<()> {
        tracing::info!("{} serving on the bus", daemon.name);
        crate::shutdown_signal().await?;
        drop(self);
        Ok(())
    }
}

/// A daemon whose `serve` returns only once it was stopped.
impl Running for () {
    async fn until_stopped(self, _: &Daemon) -> anyhow::Result<()> {
        Ok(())
    }
}

/// Runs a daemon: parses the command line, starts logging, reads the config
/// and calls `serve` with it on a multi-threaded runtime.
pub fn run<C, F, Fut, R>(daemon: Daemon, serve: F) -> anyhow::Result<()>
where
    C: DeserializeOwned,
    F: FnOnce(C) -> Fut,
    Fut: Future<Output = anyhow::Result<R>>,
    R: Running,
{
    let args = clap::Command::new(daemon.name)
        .version(daemon.version)
        .about(daemon.about)
        .arg(
            clap::Arg::new("config")
                .long("config")
                .value_name("PATH")
                .help(format!(
                    "the daemon's TOML config [default: {}]",
                    daemon.default_config()
                ))
                .value_parser(clap::value_parser!(PathBuf)),
        )
        .get_matches();
    crate::init_logging(daemon.log);
    let path = args
        .get_one::<PathBuf>("config")
        .cloned()
        .unwrap_or_else(|| daemon.default_config().into());
    let cfg: C = crate::load_config(&path)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async { serve(cfg).await?.until_stopped(&daemon).await })
}
