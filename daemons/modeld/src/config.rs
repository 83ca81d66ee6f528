use serde::Deserialize;
use std::path::PathBuf;

/// `/etc/pocketos/modeld.toml`; see `modeld.toml.example` beside this crate.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where models, partial downloads and the state database live.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// The trusted keyring (on the read-only rootfs).
    #[serde(default = "default_keyring_dir")]
    pub keyring_dir: PathBuf,
    /// Catalog sources: `http(s)://` base URLs and local directories.
    #[serde(default)]
    pub catalogs: Vec<String>,
    /// Members of this group may install and remove, as root may.
    #[serde(default = "default_admin_group")]
    pub admin_group: String,
    /// Space left free on the data partition after any install.
    #[serde(default = "default_reserve")]
    pub reserve_bytes: u64,
    /// Where the box's memory size is read (`MemTotal`).
    #[serde(default = "default_meminfo")]
    pub meminfo: PathBuf,
    /// Attempts at a download whose connection breaks, each resuming where
    /// the last stopped.
    #[serde(default = "default_attempts")]
    pub download_attempts: u32,
}

fn default_data_dir() -> PathBuf {
    "/data/modeld".into()
}
fn default_keyring_dir() -> PathBuf {
    "/etc/pocketos/keyring".into()
}
fn default_admin_group() -> String {
    "pocket".into()
}
fn default_reserve() -> u64 {
    64 << 20
}
fn default_meminfo() -> PathBuf {
    "/proc/meminfo".into()
}
fn default_attempts() -> u32 {
    4
}
