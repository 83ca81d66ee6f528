//! `/etc/pocketos/otad.toml` (the daemon) and `/etc/pocketos/system.toml`
//! (the device: compatible, slots, bootloader). See the `.example` files
//! beside this crate.

use crate::bootenv::uboot::EnvCopy;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_system")]
    pub system: PathBuf,
    #[serde(default = "default_keyring_dir")]
    pub keyring_dir: PathBuf,
    /// The keyring modeld publishes after a rotation from a catalog. Read
    /// for each install and used when it chains from the keyring otad
    /// trusts, so that a rotation which revokes an updates key reaches
    /// updates too; empty for none.
    #[serde(default = "default_rotated_keyring")]
    pub rotated_keyring: PathBuf,
    /// Where the state database lives (on `/data`).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The booted slot is read from `pocketos.slot=` or `rauc.slot=` here.
    #[serde(default = "default_cmdline")]
    pub cmdline: PathBuf,
    /// Members of this group may install, mark and roll back, as root may.
    #[serde(default = "default_admin_group")]
    pub admin_group: String,
    /// A bundle URL that `Check` looks at for a newer system.
    #[serde(default)]
    pub update_url: Option<String>,
    /// Progress is made durable every this many bytes: the most a power cut
    /// makes the box fetch again.
    #[serde(default = "default_checkpoint")]
    pub checkpoint_bytes: u64,
    /// Attempts at a download whose connection breaks, each resuming at the
    /// last verified chunk.
    #[serde(default = "default_attempts")]
    pub download_attempts: u32,
    /// Run to restart the box when a freshly booted slot fails its health
    /// check, so the bootloader falls back.
    #[serde(default = "default_reboot")]
    pub reboot_command: Vec<String>,
    #[serde(default)]
    pub health: HealthConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Bus names that must all be served before a slot is good.
    #[serde(default = "default_bus_names")]
    pub bus_names: Vec<String>,
    /// How long the daemons get to appear.
    #[serde(default = "default_health_timeout")]
    pub timeout_secs: u64,
    /// Runs one inference of an installed model through npud (when a model
    /// is installed) as part of the check.
    #[serde(default = "default_true")]
    pub smoke_inference: bool,
    /// Extra command that must exit 0.
    #[serde(default)]
    pub command: Vec<String>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            bus_names: default_bus_names(),
            timeout_secs: default_health_timeout(),
            smoke_inference: true,
            command: Vec::new(),
        }
    }
}

/// The device: what it is and where its slots and bootloader live.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct System {
    /// Bundles must name exactly this.
    pub compatible: String,
    /// The running rootfs's version, when the slot was not installed by
    /// otad (the factory image).
    #[serde(default = "default_version_file")]
    pub version_file: PathBuf,
    /// The security version of the system in this rootfs, for a slot that
    /// otad did not install (the factory image): a rollback to it is
    /// refused once the device's security floor is above it.
    #[serde(default)]
    pub security_version: u64,
    /// Where `partlabel:` devices are looked up.
    #[serde(default = "default_sysfs")]
    pub sysfs_root: PathBuf,
    pub bootloader: Bootloader,
    /// Slot name (the bootloader's name: `A`, `B`) -> its devices.
    pub slots: BTreeMap<String, SlotConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, tag = "backend", rename_all = "lowercase")]
pub enum Bootloader {
    Uboot {
        /// Exactly two copies (redundant environment).
        env: Vec<EnvCopy>,
        #[serde(default = "default_tries")]
        max_tries: u32,
    },
    Grub {
        grubenv: PathBuf,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotConfig {
    /// The rootfs device: a path, or `partlabel:NAME`.
    pub rootfs: String,
    /// Extra components (`npu-firmware = "partlabel:fw_a"`).
    #[serde(default)]
    pub components: BTreeMap<String, String>,
}

impl System {
    pub fn load(path: &Path) -> anyhow::Result<System> {
        let sys: System = pocket_daemon::load_config(path)?;
        if sys.slots.len() != 2 {
            anyhow::bail!("{}: exactly two slots are supported", path.display());
        }
        Ok(sys)
    }

    pub fn slot_names(&self) -> Vec<String> {
        self.slots.keys().cloned().collect()
    }
}

fn default_system() -> PathBuf {
    "/etc/pocketos/system.toml".into()
}
fn default_rotated_keyring() -> PathBuf {
    "/data/modeld/keyring.json".into()
}
fn default_keyring_dir() -> PathBuf {
    "/etc/pocketos/keyring".into()
}
fn default_state_dir() -> PathBuf {
    "/data/otad".into()
}
fn default_cmdline() -> PathBuf {
    "/proc/cmdline".into()
}
fn default_admin_group() -> String {
    "pocket".into()
}
fn default_checkpoint() -> u64 {
    16 << 20
}
fn default_attempts() -> u32 {
    4
}
fn default_reboot() -> Vec<String> {
    vec!["reboot".into()]
}
fn default_bus_names() -> Vec<String> {
    [
        pocket_proto::models::BUS_NAME,
        pocket_proto::runtime::BUS_NAME,
        pocket_proto::power::POWER1_NAME,
    ]
    .map(String::from)
    .to_vec()
}
fn default_health_timeout() -> u64 {
    60
}
fn default_true() -> bool {
    true
}
fn default_version_file() -> PathBuf {
    "/etc/pocketos-version".into()
}
fn default_sysfs() -> PathBuf {
    "/sys".into()
}
fn default_tries() -> u32 {
    3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_examples_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let cfg: Config = pocket_daemon::load_config(&dir.join("otad.toml.example")).unwrap();
        assert_eq!(cfg.health.bus_names.len(), 3);
        let sys = System::load(&dir.join("system.toml.example")).unwrap();
        assert_eq!(sys.slot_names(), ["A", "B"]);
        assert!(matches!(sys.bootloader, Bootloader::Uboot { ref env, .. } if env.len() == 2));
    }
}
