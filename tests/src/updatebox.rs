//! A device for otad tests: two file-backed slots (a rootfs and an NPU
//! firmware component each), a real bootloader environment read and
//! written with the real tools (`fw_printenv`/`fw_setenv` for U-Boot,
//! `grub-editenv` for GRUB), a kernel command line, and the boot script's
//! slot choice carried out with those same tools between "boots".

use crate::{random_file, Daemon, DevBus, Output, Publisher, RunAs};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

pub const COMPATIBLE: &str = "pocketos-test";
/// Size of each U-Boot environment copy.
pub const UBOOT_ENV_SIZE: u64 = 0x2000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loader {
    UBoot,
    Grub,
}

#[derive(Debug)]
pub struct UpdateBox {
    pub dir: PathBuf,
    pub loader: Loader,
    pub otad_config: PathBuf,
    pub otad: Option<Daemon>,
}

/// Runs a real tool, insists that it succeeds, and returns its stdout.
pub fn tool(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `name=value` lines, as `fw_printenv` and `grub-editenv list` print them.
fn parse_env(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The U-Boot environment as the real `fw_printenv -c CONFIG` reads it.
pub fn fw_printenv(config: &Path) -> BTreeMap<String, String> {
    parse_env(&tool(Command::new("fw_printenv").arg("-c").arg(config)))
}

/// A GRUB environment block as the real `grub-editenv FILE list` reads it.
pub fn grub_editenv_list(file: &Path) -> BTreeMap<String, String> {
    parse_env(&tool(Command::new("grub-editenv").arg(file).arg("list")))
}

impl UpdateBox {
    /// A device running factory version 1.0 from slot A; slot B is empty
    /// and marked bad. `extra` lines go into otad.toml.
    pub fn new(dir: &Path, loader: Loader, publisher: &Publisher, extra: &str) -> UpdateBox {
        std::fs::create_dir_all(dir.join("slots")).unwrap();
        let b = UpdateBox {
            dir: dir.to_path_buf(),
            loader,
            otad_config: dir.join("otad.toml"),
            otad: None,
        };
        random_file(&b.slot_file("A", "rootfs"), 1 << 20, 1);
        random_file(&b.slot_file("A", "fw"), 4096, 2);
        std::fs::write(b.slot_file("B", "rootfs"), b"").unwrap();
        std::fs::write(b.slot_file("B", "fw"), b"").unwrap();
        std::fs::write(dir.join("version"), "1.0\n").unwrap();
        b.set_cmdline("A");
        let bootloader = match loader {
            Loader::UBoot => {
                std::fs::write(b.uboot_env(), vec![0u8; 2 * UBOOT_ENV_SIZE as usize]).unwrap();
                std::fs::write(
                    b.fw_config(),
                    format!(
                        "{env} 0x0 {size:#x}\n{env} {size:#x} {size:#x}\n",
                        env = b.uboot_env().display(),
                        size = UBOOT_ENV_SIZE
                    ),
                )
                .unwrap();
                let defaults = dir.join("uboot-default-env");
                std::fs::write(
                    &defaults,
                    "BOOT_ORDER=A B\nBOOT_A_LEFT=3\nBOOT_B_LEFT=0\nBOOT_LAST_GOOD=A\n",
                )
                .unwrap();
                tool(
                    Command::new("fw_setenv")
                        .arg("-c")
                        .arg(b.fw_config())
                        .arg("-f")
                        .arg(&defaults)
                        .args(["bootcmd", "run pocketos_boot"]),
                );
                format!(
                    "[bootloader]\nbackend = \"uboot\"\nmax_tries = 3\nenv = [\n  {{ path = \"{e}\", offset = 0, size = {s} }},\n  {{ path = \"{e}\", offset = {s}, size = {s} }},\n]\n",
                    e = b.uboot_env().display(),
                    s = UBOOT_ENV_SIZE
                )
            }
            Loader::Grub => {
                tool(Command::new("grub-editenv").arg(b.grubenv()).arg("create"));
                tool(Command::new("grub-editenv").arg(b.grubenv()).args([
                    "set",
                    "ORDER=A B",
                    "A_OK=1",
                    "A_TRY=0",
                    "B_OK=0",
                    "B_TRY=0",
                    "LAST_GOOD=A",
                ]));
                format!(
                    "[bootloader]\nbackend = \"grub\"\ngrubenv = \"{}\"\n",
                    b.grubenv().display()
                )
            }
        };
        let mut system = format!(
            "compatible = \"{COMPATIBLE}\"\nversion_file = \"{}\"\nsecurity_version = 1\n{bootloader}\n",
            dir.join("version").display()
        );
        for slot in ["A", "B"] {
            system.push_str(&format!(
                "[slots.{slot}]\nrootfs = \"{}\"\ncomponents = {{ npu-firmware = \"{}\" }}\n",
                b.slot_file(slot, "rootfs").display(),
                b.slot_file(slot, "fw").display()
            ));
        }
        std::fs::write(dir.join("system.toml"), system).unwrap();
        let defaults = [
            format!("system = \"{}\"", dir.join("system.toml").display()),
            format!("keyring_dir = \"{}\"", publisher.keyring_dir.display()),
            format!("state_dir = \"{}\"", dir.join("state").display()),
            format!("cmdline = \"{}\"", dir.join("cmdline").display()),
            "checkpoint_bytes = 1048576".to_string(),
            format!(
                "reboot_command = [\"touch\", \"{}\"]",
                dir.join("reboot-requested").display()
            ),
        ];
        let mut text = crate::world::merge_config(&defaults, extra);
        if !extra.contains("[health]") {
            text.push_str("[health]\nbus_names = [\"org.pocketos.Update1\"]\ntimeout_secs = 5\nsmoke_inference = false\n");
        }
        std::fs::write(&b.otad_config, text).unwrap();
        b
    }

    pub fn slot_file(&self, slot: &str, what: &str) -> PathBuf {
        self.dir
            .join("slots")
            .join(format!("{what}-{}", slot.to_lowercase()))
    }

    pub fn uboot_env(&self) -> PathBuf {
        self.dir.join("uboot.env")
    }

    pub fn fw_config(&self) -> PathBuf {
        self.dir.join("fw_env.config")
    }

    pub fn grubenv(&self) -> PathBuf {
        self.dir.join("grubenv")
    }

    pub fn set_cmdline(&self, slot: &str) {
        std::fs::write(
            self.dir.join("cmdline"),
            format!(
                "console=ttyAMA0 root=PARTLABEL=rootfs-{} ro pocketos.slot={slot}\n",
                slot.to_lowercase()
            ),
        )
        .unwrap();
    }

    /// The environment as the real tool prints it.
    pub fn env(&self) -> BTreeMap<String, String> {
        match self.loader {
            Loader::UBoot => fw_printenv(&self.fw_config()),
            Loader::Grub => grub_editenv_list(&self.grubenv()),
        }
    }

    /// Sets variables with the real tool.
    pub fn set_env(&self, vars: &[(&str, &str)]) {
        match self.loader {
            Loader::UBoot => {
                for (k, v) in vars {
                    tool(
                        Command::new("fw_setenv")
                            .arg("-c")
                            .arg(self.fw_config())
                            .args([k, v]),
                    );
                }
            }
            Loader::Grub => {
                let mut c = Command::new("grub-editenv");
                c.arg(self.grubenv()).arg("set");
                for (k, v) in vars {
                    c.arg(format!("{k}={v}"));
                }
                tool(&mut c);
            }
        }
    }

    fn order(&self, env: &BTreeMap<String, String>) -> Vec<String> {
        let key = match self.loader {
            Loader::UBoot => "BOOT_ORDER",
            Loader::Grub => "ORDER",
        };
        env.get(key)
            .map(|o| o.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default()
    }

    /// The slot the boot script would pick now, without using a try.
    pub fn primary(&self) -> Option<String> {
        let env = self.env();
        self.order(&env)
            .into_iter()
            .find(|s| self.bootable(&env, s))
    }

    /// The slot the boot scripts fall back to when every slot has used its
    /// tries.
    pub fn last_good(&self) -> Option<String> {
        let key = match self.loader {
            Loader::UBoot => "BOOT_LAST_GOOD",
            Loader::Grub => "LAST_GOOD",
        };
        self.env().get(key).cloned()
    }

    fn bootable(&self, env: &BTreeMap<String, String>, slot: &str) -> bool {
        let num = |k: String| env.get(&k).and_then(|v| v.parse::<u32>().ok()).unwrap_or(0);
        match self.loader {
            Loader::UBoot => num(format!("BOOT_{slot}_LEFT")) > 0,
            Loader::Grub => num(format!("{slot}_OK")) == 1 && num(format!("{slot}_TRY")) == 0,
        }
    }

    /// Powers the box on: otad stops (if running), the boot script picks a
    /// slot and uses one of its tries (with the real env tool, as U-Boot's
    /// `setexpr`/`saveenv` or GRUB's `save_env` would), the kernel command
    /// line names that slot, and otad starts. Returns the slot booted.
    pub fn boot(&mut self, bus: &DevBus) -> String {
        self.otad = None;
        let env = self.env();
        let tried = self
            .order(&env)
            .into_iter()
            .find(|s| self.bootable(&env, s));
        let slot = match tried {
            Some(slot) => {
                match self.loader {
                    Loader::UBoot => {
                        let left: u32 = env[&format!("BOOT_{slot}_LEFT")].parse().unwrap();
                        self.set_env(&[(&format!("BOOT_{slot}_LEFT"), &(left - 1).to_string())]);
                    }
                    Loader::Grub => self.set_env(&[(&format!("{slot}_TRY"), "1")]),
                }
                slot
            }
            // Every slot has used its tries: the last good one, uncounted.
            None => self
                .last_good()
                .expect("the environment records a last good slot"),
        };
        self.set_cmdline(&slot);
        let _ = std::fs::remove_file(self.dir.join("reboot-requested"));
        self.start_otad(bus);
        slot
    }

    pub fn start_otad(&mut self, bus: &DevBus) -> &mut Daemon {
        self.otad = Some(Daemon::start(
            bus,
            "pocket-otad",
            "org.pocketos.Update1",
            &self.otad_config,
        ));
        self.otad.as_mut().unwrap()
    }

    pub fn otad(&mut self) -> &mut Daemon {
        self.otad.as_mut().expect("otad started")
    }

    pub fn reboot_requested(&self) -> bool {
        self.dir.join("reboot-requested").exists()
    }

    pub fn status(&self, bus: &DevBus) -> serde_json::Value {
        crate::run_pocketctl(bus, RunAs::Me, &["update", "status", "--json"])
            .ok()
            .json()
    }

    /// Waits until the boot's health check has decided.
    pub fn wait_health(&self, bus: &DevBus) -> String {
        crate::wait_for(
            "the health check",
            std::time::Duration::from_secs(20),
            || {
                let h = self.status(bus)["health"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                (h != "pending" && h != "checking").then_some(h)
            },
        )
    }

    pub fn ctl(&self, bus: &DevBus, args: &[&str]) -> Output {
        crate::run_pocketctl(bus, RunAs::Me, args)
    }

    /// The bytes in a slot's device (its first `len` bytes).
    pub fn slot_bytes(&self, slot: &str, what: &str, len: usize) -> Vec<u8> {
        let mut b = std::fs::read(self.slot_file(slot, what)).unwrap();
        b.truncate(len);
        b
    }
}

/// A rootfs image and firmware for version `version`, and the bundle made
/// of them with the publisher's update key (or `keys`).
#[derive(Debug, Clone)]
pub struct BundleFiles {
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    pub firmware: PathBuf,
}

impl Publisher {
    /// Signs a bundle of a `rootfs_len`-byte image seeded from the version.
    #[allow(clippy::too_many_arguments)]
    pub fn bundle_with(
        &self,
        dir: &Path,
        version: &str,
        rootfs_len: u64,
        compatible: &str,
        security_version: u64,
        chunk_size: u64,
        keys: &[PathBuf],
        expires: Option<&str>,
    ) -> BundleFiles {
        std::fs::create_dir_all(dir).unwrap();
        let seed = version
            .bytes()
            .fold(7u64, |a, b| a.wrapping_mul(31).wrapping_add(b as u64));
        let rootfs = dir.join(format!("rootfs-{version}.img"));
        let firmware = dir.join(format!("npu-fw-{version}.bin"));
        random_file(&rootfs, rootfs_len, seed);
        random_file(&firmware, 8192 + 100, seed + 1);
        let bundle = dir.join(format!("pocketos-{version}.bundle"));
        pocket_publish::bundle_create(
            &pocket_publish::BundleArgs {
                rootfs: rootfs.clone(),
                components: vec![("npu-firmware".into(), firmware.clone())],
                version: version.into(),
                compatible: compatible.into(),
                security_version,
                chunk_size,
                expires: expires.map(str::to_string),
            },
            keys,
            &bundle,
            SystemTime::now(),
        )
        .expect("bundle");
        BundleFiles {
            bundle,
            rootfs,
            firmware,
        }
    }

    /// A bundle for the test device (1 MiB rootfs, 64 KiB chunks) signed
    /// by `keys`, expiring at `expires` or never.
    pub fn bundle_signed(
        &self,
        dir: &Path,
        version: &str,
        keys: &[PathBuf],
        expires: Option<&str>,
    ) -> PathBuf {
        self.bundle_with(
            dir,
            version,
            1 << 20,
            COMPATIBLE,
            1,
            64 << 10,
            keys,
            expires,
        )
        .bundle
    }

    /// A valid bundle for the test device: 4 MiB rootfs, 64 KiB chunks.
    pub fn bundle(&self, dir: &Path, version: &str) -> BundleFiles {
        self.bundle_with(
            dir,
            version,
            4 << 20,
            COMPATIBLE,
            1,
            64 << 10,
            std::slice::from_ref(&self.updates_key),
            Some("30d"),
        )
    }
}
