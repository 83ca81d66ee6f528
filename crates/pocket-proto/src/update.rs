//! `org.pocketos.Update1`: the A/B updater (otad).

use serde::{Deserialize, Serialize};
use zbus::zvariant::{OwnedObjectPath, Type};

pub const BUS_NAME: &str = "org.pocketos.Update1";
pub const PATH: &str = "/org/pocketos/Update1";
pub const JOB_PATH_PREFIX: &str = "/org/pocketos/Update1/jobs";

/// One rootfs slot and what the box knows about it.
#[derive(Debug, Clone, Serialize, Deserialize, Type, PartialEq, Eq)]
pub struct SlotStatus {
    /// The bootloader's name for it (`A`, `B`).
    pub name: String,
    pub device: String,
    /// Version of the system in it; empty when unknown.
    pub version: String,
    /// `good` or `bad`, as the bootloader sees it.
    pub state: String,
    /// `good` once a boot of it passed the health check, `pending` after
    /// an install until then, `failed` (a boot failed the check or it was
    /// marked bad), `installing`, `incomplete` (an install given up), or
    /// empty (factory).
    pub health: String,
    pub booted: bool,
    pub primary: bool,
    /// Boots left before the bootloader falls back from it.
    pub tries_left: u32,
    pub installed_at: String,
}

/// What `Check` found on the update server.
#[derive(Debug, Clone, Serialize, Deserialize, Type, PartialEq, Eq)]
pub struct UpdateCheck {
    pub available: bool,
    /// Version offered (verified); empty when none could be read.
    pub version: String,
    /// Where it is; pass to `Install`.
    pub source: String,
    pub current_version: String,
}

#[zbus::proxy(
    interface = "org.pocketos.Update1",
    default_service = "org.pocketos.Update1",
    default_path = "/org/pocketos/Update1"
)]
pub trait Update1 {
    /// Installs a bundle from an `http(s)://` URL into the slot that is not
    /// booted; returns the job. Installing the same bundle again after an
    /// interruption resumes it.
    fn install(&self, source: &str) -> zbus::Result<OwnedObjectPath>;
    /// Installs a bundle file the caller opened (a USB stick, an upload):
    /// a regular file, read through the descriptor and never by name.
    fn install_file(&self, bundle: zbus::zvariant::Fd<'_>) -> zbus::Result<OwnedObjectPath>;
    fn slots(&self) -> zbus::Result<Vec<SlotStatus>>;
    /// Reads and verifies the header of the configured update URL.
    fn check(&self) -> zbus::Result<UpdateCheck>;
    /// Marks the booted slot good (what a passing health check does).
    fn mark_good(&self) -> zbus::Result<()>;
    /// Marks a slot bad: the bootloader will not boot it again.
    fn mark_bad(&self, slot: &str) -> zbus::Result<()>;
    /// Makes the other slot primary, when it is good; returns its name. It
    /// runs from the next boot.
    fn rollback(&self) -> zbus::Result<String>;

    /// The one completion signal of an install job.
    #[zbus(signal)]
    fn install_finished(
        &self,
        job: zbus::zvariant::ObjectPath<'_>,
        success: bool,
        error_name: &str,
        error_message: &str,
    ) -> zbus::Result<()>;

    #[zbus(property)]
    fn booted_slot(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn primary_slot(&self) -> zbus::Result<String>;
    /// `idle`, or the running job's phase.
    #[zbus(property)]
    fn operation(&self) -> zbus::Result<String>;
    /// The running (or last) job; `/` when none.
    #[zbus(property)]
    fn job(&self) -> zbus::Result<OwnedObjectPath>;
    #[zbus(property)]
    fn last_error(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn compatible(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn system_version(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn security_version(&self) -> zbus::Result<u64>;
    /// The booted slot's health: `good`, `pending`, `checking`, or
    /// `failed: why`.
    #[zbus(property)]
    fn health(&self) -> zbus::Result<String>;
    /// `ok`, or what is degraded (an unreadable environment, no keyring).
    #[zbus(property)]
    fn status(&self) -> zbus::Result<String>;
}

/// What only a system update job has; its progress, phase, outcome and
/// `Cancel` are on [`crate::job::Job1Proxy`] at the same path.
#[zbus::proxy(
    interface = "org.pocketos.Update1.Job",
    default_service = "org.pocketos.Update1"
)]
pub trait UpdateJob {
    #[zbus(property)]
    fn source(&self) -> zbus::Result<String>;
    /// The bundle's version, once its header is verified.
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
    /// The slot being written, once chosen.
    #[zbus(property)]
    fn slot(&self) -> zbus::Result<String>;
}
