use serde::Deserialize;
use std::path::PathBuf;

/// `/etc/pocketos/powerd.toml`; see `powerd.toml.example` beside this crate.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the kernel's sysfs is (a fake tree in tests).
    #[serde(default = "default_sysfs")]
    pub sysfs_root: PathBuf,
    /// The board file: devices, profiles, power rails, thermal zones.
    pub board: PathBuf,
    /// The power budget until one is set over the bus.
    #[serde(default = "default_budget")]
    pub budget_watts: f64,
    /// Where the chosen profile and budget are kept.
    #[serde(default = "default_state")]
    pub state_dir: PathBuf,
    /// How often power and temperatures are measured and caps adjusted.
    #[serde(default = "default_period")]
    pub period_ms: u64,
    /// Members of this group may change the profile and the budget.
    #[serde(default = "default_admin_group")]
    pub admin_group: String,
}

fn default_sysfs() -> PathBuf {
    "/sys".into()
}
fn default_budget() -> f64 {
    65.0
}
fn default_state() -> PathBuf {
    "/data/powerd".into()
}
fn default_period() -> u64 {
    1000
}
fn default_admin_group() -> String {
    "pocket".into()
}
