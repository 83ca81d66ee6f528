//! The bootloader environment: which slot boots next, how many tries it
//! has, and which slots are good, in RAUC's documented variables so that
//! existing boot scripts work unchanged:
//!
//! - U-Boot: `BOOT_ORDER="A B"`, `BOOT_<slot>_LEFT=<tries>`; a slot with no
//!   tries left is bad. The boot script takes the first slot in the order
//!   with tries left and decrements its count before booting it.
//! - GRUB: `ORDER="A B"`, `<slot>_OK`, `<slot>_TRY`; GRUB boots the first
//!   slot with `OK=1` and `TRY=0`, setting `TRY=1` first.
//!
//! One variable of ours beside them: `BOOT_LAST_GOOD` (U-Boot) or
//! `LAST_GOOD` (GRUB) names the last slot whose health check passed. When
//! every slot has used its tries, the boot scripts boot that slot, never
//! one that is half-written or untested.
//!
//! Marking a slot good restores its tries; every change is one
//! [`WritePlan`] whose result is the old environment or the new one, even
//! when the power goes in the middle of it.

pub mod grub;
pub mod plan;
pub mod uboot;

pub use plan::{Step, WritePlan};

use std::collections::BTreeMap;
use std::path::Path;

/// Environment variables, in a stable order.
pub type Vars = BTreeMap<String, String>;

#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error("bootloader environment {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("bootloader environment is corrupt: {0}")]
    Corrupt(String),
    #[error("bootloader environment: {0}")]
    Invalid(String),
    #[error("bootloader configuration: {0}")]
    Config(String),
}

impl EnvError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        EnvError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// One slot as the bootloader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotBoot {
    pub name: String,
    /// The bootloader would still boot it.
    pub good: bool,
    /// Boots left before the bootloader gives up on it (U-Boot), or 1/0
    /// for GRUB's single try.
    pub tries_left: u32,
}

#[derive(Debug, Clone)]
pub enum BootEnv {
    UBoot {
        env: uboot::UBootEnv,
        max_tries: u32,
    },
    Grub {
        env: grub::GrubEnv,
    },
}

impl BootEnv {
    pub fn read(&self) -> Result<Vars, EnvError> {
        match self {
            BootEnv::UBoot { env, .. } => env.read(),
            BootEnv::Grub { env } => env.read(),
        }
    }

    pub fn plan(&self, vars: &Vars) -> Result<WritePlan, EnvError> {
        match self {
            BootEnv::UBoot { env, .. } => env.plan(vars),
            BootEnv::Grub { env } => env.plan(vars),
        }
    }

    fn order_key(&self) -> &'static str {
        match self {
            BootEnv::UBoot { .. } => "BOOT_ORDER",
            BootEnv::Grub { .. } => "ORDER",
        }
    }

    fn last_good_key(&self) -> &'static str {
        match self {
            BootEnv::UBoot { .. } => "BOOT_LAST_GOOD",
            BootEnv::Grub { .. } => "LAST_GOOD",
        }
    }

    /// The last slot whose health check passed, as the environment
    /// records it.
    pub fn last_good(&self, vars: &Vars, slots: &[String]) -> Option<String> {
        vars.get(self.last_good_key())
            .map(|s| s.trim().to_string())
            .filter(|s| slots.contains(s))
    }

    /// The boot order in `vars`, with slots not named there appended.
    pub fn order(&self, vars: &Vars, slots: &[String]) -> Vec<String> {
        let mut order: Vec<String> = vars
            .get(self.order_key())
            .map(|o| o.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default();
        order.retain(|s| slots.contains(s));
        for s in slots {
            if !order.contains(s) {
                order.push(s.clone());
            }
        }
        order
    }

    pub fn slot(&self, vars: &Vars, name: &str) -> SlotBoot {
        let num = |k: String| {
            vars.get(&k)
                .and_then(|v| v.trim().parse::<u32>().ok())
                .unwrap_or(0)
        };
        let (good, tries_left) = match self {
            BootEnv::UBoot { .. } => {
                let left = num(format!("BOOT_{name}_LEFT"));
                (left > 0, left)
            }
            BootEnv::Grub { .. } => {
                let ok = num(format!("{name}_OK")) == 1;
                let tried = num(format!("{name}_TRY")) != 0;
                (ok, u32::from(ok && !tried))
            }
        };
        SlotBoot {
            name: name.to_string(),
            good,
            tries_left,
        }
    }

    /// The slot the bootloader will boot next.
    pub fn primary(&self, vars: &Vars, slots: &[String]) -> Option<String> {
        self.order(vars, slots)
            .into_iter()
            .find(|s| self.slot(vars, s).tries_left > 0)
    }

    /// `vars` with `slot` first in the order and a full set of tries.
    pub fn with_primary(&self, vars: &Vars, slots: &[String], slot: &str) -> Vars {
        let mut out = self.with_good(vars, slot);
        let mut order = self.order(vars, slots);
        order.retain(|s| s != slot);
        order.insert(0, slot.to_string());
        out.insert(self.order_key().into(), order.join(" "));
        out
    }

    /// `vars` with `slot` good and its tries restored.
    pub fn with_good(&self, vars: &Vars, slot: &str) -> Vars {
        let mut out = vars.clone();
        match self {
            BootEnv::UBoot { max_tries, .. } => {
                out.insert(format!("BOOT_{slot}_LEFT"), max_tries.to_string());
            }
            BootEnv::Grub { .. } => {
                out.insert(format!("{slot}_OK"), "1".into());
                out.insert(format!("{slot}_TRY"), "0".into());
            }
        }
        out
    }

    /// `vars` with `slot` good and recorded as the last slot that passed
    /// its health check: the one booted when every slot has used its tries.
    pub fn with_confirmed(&self, vars: &Vars, slot: &str) -> Vars {
        let mut out = self.with_good(vars, slot);
        out.insert(self.last_good_key().into(), slot.to_string());
        out
    }

    /// `vars` with `slot` never to be booted.
    pub fn with_bad(&self, vars: &Vars, slot: &str) -> Vars {
        let mut out = vars.clone();
        match self {
            BootEnv::UBoot { .. } => {
                out.insert(format!("BOOT_{slot}_LEFT"), "0".into());
            }
            BootEnv::Grub { .. } => {
                out.insert(format!("{slot}_OK"), "0".into());
                out.insert(format!("{slot}_TRY"), "0".into());
            }
        }
        out
    }

    /// What the bootloader's own script does at power-on: pick the first
    /// slot with tries left and use one of them, or, when every slot has
    /// used its tries, boot the last good slot without counting. Returns
    /// the slot and the environment after that step. Used by tests; the
    /// real scripts are `buildroot/board/pocketos/boot/{boot.cmd,grub.cfg}`.
    pub fn boot_step(&self, vars: &Vars, slots: &[String]) -> Option<(String, Vars)> {
        let Some(slot) = self.primary(vars, slots) else {
            return self.last_good(vars, slots).map(|slot| (slot, vars.clone()));
        };
        let mut out = vars.clone();
        match self {
            BootEnv::UBoot { .. } => {
                let left = self.slot(vars, &slot).tries_left;
                out.insert(format!("BOOT_{slot}_LEFT"), (left - 1).to_string());
            }
            BootEnv::Grub { .. } => {
                out.insert(format!("{slot}_TRY"), "1".into());
            }
        }
        Some((slot, out))
    }

    /// Applies `change` to the environment in force as one transaction.
    pub fn update<E: From<EnvError>>(
        &self,
        change: impl FnOnce(&Vars) -> Result<Vars, E>,
    ) -> Result<(), E> {
        let vars = self.read()?;
        let next = change(&vars)?;
        if next == vars {
            return Ok(());
        }
        self.plan(&next)?
            .apply()
            .map_err(|e| EnvError::Invalid(format!("writing the environment: {e}")))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots() -> Vec<String> {
        vec!["A".into(), "B".into()]
    }

    fn uboot() -> BootEnv {
        let copy = uboot::EnvCopy {
            path: "/nonexistent".into(),
            offset: 0,
            size: 4096,
        };
        BootEnv::UBoot {
            env: uboot::UBootEnv::new(&[copy.clone(), copy]).unwrap(),
            max_tries: 3,
        }
    }

    #[test]
    fn uboot_counting_falls_back_when_tries_run_out() {
        let env = uboot();
        let vars = env.with_good(&env.with_good(&Vars::new(), "A"), "B");
        let vars = env.with_primary(&vars, &slots(), "B");
        assert_eq!(vars["BOOT_ORDER"], "B A");
        let mut v = vars;
        for _ in 0..3 {
            let (slot, next) = env.boot_step(&v, &slots()).unwrap();
            assert_eq!(slot, "B");
            v = next;
        }
        assert_eq!(env.boot_step(&v, &slots()).unwrap().0, "A");
        assert!(!env.slot(&v, "B").good);
    }

    #[test]
    fn grub_single_try_then_fallback() {
        let env = BootEnv::Grub {
            env: grub::GrubEnv::new(Path::new("/nonexistent")),
        };
        let vars = env.with_good(&Vars::new(), "A");
        let vars = env.with_primary(&vars, &slots(), "B");
        assert_eq!(vars["ORDER"], "B A");
        let (slot, v) = env.boot_step(&vars, &slots()).unwrap();
        assert_eq!(slot, "B");
        assert_eq!(env.boot_step(&v, &slots()).unwrap().0, "A");
        let good = env.with_good(&v, "B");
        assert_eq!(env.primary(&good, &slots()).as_deref(), Some("B"));
        let bad = env.with_bad(&good, "B");
        assert_eq!(env.primary(&bad, &slots()).as_deref(), Some("A"));
    }

    #[test]
    fn every_slot_spent_boots_the_last_good_slot_uncounted() {
        let grub = BootEnv::Grub {
            env: grub::GrubEnv::new(Path::new("/nonexistent")),
        };
        for env in [uboot(), grub] {
            let vars = env.with_confirmed(&Vars::new(), "B");
            assert_eq!(env.last_good(&vars, &slots()).as_deref(), Some("B"));
            // A half-written, B out of tries: B, and nothing counted.
            let spent = env.with_bad(&env.with_bad(&vars, "A"), "B");
            assert_eq!(env.primary(&spent, &slots()), None);
            assert_eq!(
                env.boot_step(&spent, &slots()),
                Some(("B".into(), spent.clone()))
            );
            // Making a slot primary does not make it the last good one.
            let fresh = env.with_primary(&spent, &slots(), "A");
            assert_eq!(env.last_good(&fresh, &slots()).as_deref(), Some("B"));
            // No record of a good slot: nothing to fall back to.
            let mut unknown = spent.clone();
            unknown.remove(env.last_good_key());
            assert_eq!(env.boot_step(&unknown, &slots()), None);
        }
    }
}
