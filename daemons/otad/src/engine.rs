//! otad's core: which slot to write, whether a bundle may be installed,
//! the order in which an install touches the slot, the state database and
//! the bootloader, and what a boot's health check decides.
//!
//! The order is what keeps the box bootable: the target slot is marked bad
//! in the bootloader before its first byte is written; the install and the
//! raised metadata floor commit together; chunks are verified before they
//! are written and checkpoints follow synced data; and the slot becomes
//! primary only after its last byte is synced, in one environment
//! transaction.

use crate::bootenv::{uboot::UBootEnv, BootEnv, Vars};
use crate::config::{Bootloader, Config, System};
use crate::error::UpdateError;
use crate::install::{Job, Stream, Update};
use crate::source::Source;
use crate::state::{InstallRecord, SlotRecord, State, BUNDLE_SUBJECT};
use pocket_ota::VerifiedHeader;
use pocket_proto::job::Phase;
use pocket_proto::update::{SlotStatus, UpdateCheck};
use pocket_trust::{Keyring, Version};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

pub struct Engine {
    cfg: Config,
    system: System,
    env: BootEnv,
    /// Held from reading the environment to writing its change: a mark-bad,
    /// a mark-good, a rollback and an install never write over each other.
    env_lock: Mutex<()>,
    state: State,
    /// The keyring on the rootfs, or why it cannot be used.
    base_keyring: Result<Keyring, Arc<pocket_trust::TrustError>>,
    /// The booted slot, or why it is not known.
    booted: Result<String, Arc<UpdateError>>,
    job: Mutex<Option<Arc<Job>>>,
    next_id: AtomicU64,
    last_error: Mutex<String>,
    health: Mutex<String>,
}

/// Reads the keyring modeld published: a regular file, not through a
/// symbolic link, at most [`pocket_trust::METADATA_LIMIT`] bytes (modeld's user owns the
/// directory; otad is root). `None` when there is none.
fn read_rotated_keyring(path: &std::path::Path) -> std::io::Result<Option<pocket_trust::Envelope>> {
    let invalid = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidData, why);
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok(None);
    };
    let file = match pocket_daemon::files::open_regular(dir, &name.to_string_lossy()) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let bytes = pocket_daemon::files::read_capped(file, pocket_trust::METADATA_LIMIT)?;
    pocket_trust::Envelope::from_bytes("rotated keyring", &bytes)
        .map(Some)
        .map_err(|e| invalid(e.to_string()))
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Engine")
    }
}

impl Engine {
    pub fn new(cfg: Config) -> anyhow::Result<Arc<Engine>> {
        let system = System::load(&cfg.system)?;
        let env = match &system.bootloader {
            Bootloader::Uboot { env, max_tries } => BootEnv::UBoot {
                env: UBootEnv::new(env)?,
                max_tries: *max_tries,
            },
            Bootloader::Grub { grubenv } => BootEnv::Grub {
                env: crate::bootenv::grub::GrubEnv::new(grubenv),
            },
        };
        let state = State::open(&cfg.state_dir)?;
        let base_keyring = Keyring::load_dir(&cfg.keyring_dir).map_err(Arc::new);
        let booted = match std::fs::read_to_string(&cfg.cmdline) {
            Ok(text) => crate::slots::booted_from_cmdline(&text)
                .filter(|s| system.slots.contains_key(s))
                .ok_or_else(|| UpdateError::BootedUnknown(cfg.cmdline.display().to_string())),
            Err(e) => Err(UpdateError::io(
                format!("cannot read {}", cfg.cmdline.display()),
                e,
            )),
        }
        .map_err(Arc::new);
        Ok(Arc::new(Engine {
            cfg,
            system,
            env,
            env_lock: Mutex::new(()),
            state,
            base_keyring,
            booted,
            job: Mutex::new(None),
            next_id: AtomicU64::new(1),
            last_error: Mutex::new(String::new()),
            health: Mutex::new("pending".into()),
        }))
    }

    pub fn compatible(&self) -> &str {
        &self.system.compatible
    }

    pub fn booted(&self) -> Result<&str, UpdateError> {
        self.booted
            .as_deref()
            .map_err(|_| UpdateError::BootedUnknown(self.cfg.cmdline.display().to_string()))
    }

    fn other_slot(&self, slot: &str) -> String {
        crate::plan::other_slot(self.system.slots.keys(), slot)
    }

    pub fn primary(&self) -> String {
        self.env
            .read()
            .ok()
            .and_then(|v| self.env.primary(&v, &self.system.slot_names()))
            .unwrap_or_default()
    }

    /// Reads the bootloader environment, decides its change and writes it,
    /// under one lock.
    fn change_env(
        &self,
        change: impl FnOnce(&Vars) -> Result<Vars, UpdateError>,
    ) -> Result<(), UpdateError> {
        let _one_at_a_time = self.env_lock.lock().expect("env lock");
        self.env.update(change)
    }

    pub fn security_version(&self) -> u64 {
        self.state.security_floor().unwrap_or(0)
    }

    pub fn last_error(&self) -> String {
        self.last_error.lock().expect("last_error").clone()
    }

    pub fn health(&self) -> String {
        self.health.lock().expect("health").clone()
    }

    pub fn job(&self) -> Option<Arc<Job>> {
        self.job.lock().expect("job").clone()
    }

    pub fn operation(&self) -> String {
        match self.job() {
            Some(j) if !j.phase().is_terminal() => j.phase().to_string(),
            _ => "idle".into(),
        }
    }

    /// What is degraded, or `ok`.
    pub fn status(&self) -> String {
        let mut problems = Vec::new();
        if let Err(e) = &self.booted {
            problems.push(e.to_string());
        }
        if let Err(e) = self.env.read() {
            problems.push(e.to_string());
        }
        if let Err(e) = &self.base_keyring {
            problems.push(format!("keyring: {e}"));
        }
        if problems.is_empty() {
            "ok".into()
        } else {
            problems.join("; ")
        }
    }

    /// The running system's version: what otad installed into the booted
    /// slot, else the rootfs's own version file.
    pub fn system_version(&self) -> String {
        if let Ok(slot) = self.booted() {
            if let Ok(Some(rec)) = self.state.slot(slot) {
                if rec.holds_system() {
                    return rec.version;
                }
            }
        }
        std::fs::read_to_string(&self.system.version_file)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    }

    fn keyring(&self) -> Result<Keyring, UpdateError> {
        let base = self
            .base_keyring
            .clone()
            .map_err(|e| UpdateError::InvalidArgument(format!("no trusted keyring: {e}")))?;
        let floors = self.state.floors();
        let current = floors.current_keyring(base).map_err(UpdateError::Keyring)?;
        let path = &self.cfg.rotated_keyring;
        let offered = match read_rotated_keyring(path) {
            Ok(Some(env)) => env,
            Ok(None) => return Ok(current),
            Err(e) => {
                tracing::warn!("rotated keyring {}: {e}", path.display());
                return Ok(current);
            }
        };
        let newer = offered
            .peek::<serde_json::Value>()
            .is_ok_and(|s| s.version > *current.version());
        if !newer {
            return Ok(current);
        }
        match floors.rotate(&current, offered) {
            Ok(k) => {
                tracing::info!(version = %k.version(), "keyring rotated from {}", path.display());
                Ok(k)
            }
            Err(e) => {
                tracing::warn!("rotated keyring {} not used: {e}", path.display());
                Ok(current)
            }
        }
    }

    pub fn slots(&self) -> Result<Vec<SlotStatus>, UpdateError> {
        let vars = self.env.read()?;
        let names = self.system.slot_names();
        let primary = self.env.primary(&vars, &names);
        let booted = self.booted().ok();
        names
            .iter()
            .map(|name| {
                let boot = self.env.slot(&vars, name);
                let rec = self.state.slot(name)?;
                let is_booted = booted == Some(name.as_str());
                let version = match &rec {
                    Some(r) if r.holds_system() => r.version.clone(),
                    _ if is_booted => self.system_version(),
                    _ => String::new(),
                };
                let mut health = rec.as_ref().map(|r| r.health.clone()).unwrap_or_default();
                if is_booted && health.is_empty() && self.health() == "good" {
                    health = "good".into();
                }
                Ok(SlotStatus {
                    name: name.clone(),
                    device: self.system.slots[name].rootfs.clone(),
                    version,
                    state: if boot.good { "good" } else { "bad" }.into(),
                    health,
                    booted: is_booted,
                    primary: primary.as_deref() == Some(name.as_str()),
                    tries_left: boot.tries_left,
                    installed_at: rec.map(|r| r.installed_at).unwrap_or_default(),
                })
            })
            .collect()
    }

    /// Starts an install (or resumes the interrupted install of the same
    /// bundle) on a worker thread; returns its job at once.
    pub fn install(self: &Arc<Self>, source: &str) -> Result<Arc<Job>, UpdateError> {
        self.install_from(Source::parse(source)?)
    }

    /// Starts an install from a bundle file the caller opened.
    pub fn install_file(self: &Arc<Self>, file: std::fs::File) -> Result<Arc<Job>, UpdateError> {
        self.install_from(Source::file(file)?)
    }

    fn install_from(self: &Arc<Self>, parsed: Source) -> Result<Arc<Job>, UpdateError> {
        let source = parsed.describe();
        let source = source.as_str();
        self.booted_is_confirmed(&self.env.read()?)?;
        let job = {
            let mut cur = self.job.lock().expect("job");
            if let Some(j) = cur.as_ref() {
                if !j.phase().is_terminal() {
                    return Err(UpdateError::Busy(format!("installing {}", j.detail.source)));
                }
            }
            let job = Arc::new(Job::new(
                self.next_id.fetch_add(1, Ordering::Relaxed),
                Phase::Verifying,
                Update::new(source),
            ));
            *cur = Some(job.clone());
            job
        };
        let (engine, j) = (self.clone(), job.clone());
        tokio::task::spawn_blocking(move || {
            let result = engine.run_install(&j, &parsed);
            match &result {
                Ok(()) => {
                    tracing::info!(source = %j.detail.source, "installed into slot {}", j.detail.slot.lock().expect("slot"));
                    engine.last_error.lock().expect("last_error").clear();
                }
                Err(e) => {
                    tracing::warn!(source = %j.detail.source, "install failed: {e}");
                    *engine.last_error.lock().expect("last_error") = e.to_string();
                }
            }
            crate::install::finish(&j, result.as_ref().map(|_| ()));
        });
        Ok(job)
    }

    /// Restarts an install that a crash or power cut interrupted.
    pub fn resume_pending(self: &Arc<Self>) -> Option<Arc<Job>> {
        let rec = self.state.install().ok().flatten()?;
        tracing::info!(source = %rec.source, "resuming the interrupted install at payload {} chunk {}", rec.payload, rec.chunk);
        match self.install(&rec.source) {
            Ok(job) => Some(job),
            Err(e) => {
                tracing::warn!("cannot resume the interrupted install: {e}");
                *self.last_error.lock().expect("last_error") = e.to_string();
                None
            }
        }
    }

    /// Verifies a bundle header and decides whether this device may take
    /// it; returns the header and the slot it would go to.
    fn admit(&self, header: &[u8], len: u64) -> Result<(VerifiedHeader, String), UpdateError> {
        let vh = VerifiedHeader::verify(&self.keyring()?, header, SystemTime::now())?;
        vh.check_compatible(&self.system.compatible)?;
        crate::plan::admit(
            vh.manifest(),
            vh.header_len,
            len,
            vh.version(),
            self.state.security_floor()?,
            &self.system_version(),
        )?;
        let target = self.other_slot(self.booted()?);
        Ok((vh, target))
    }

    fn run_install(&self, job: &Job, source: &Source) -> Result<(), UpdateError> {
        let (header, len) = source.header()?;
        let (vh, target) = self.admit(&header, len)?;
        let m = vh.manifest();
        *job.detail.version.lock().expect("version") = vh.version().to_string();
        *job.detail.slot.lock().expect("slot") = target.clone();
        let devices = m
            .payloads
            .iter()
            .map(|p| crate::slots::device(&self.system, &target, &p.name))
            .collect::<Result<Vec<_>, _>>()?;
        for (p, dev) in m.payloads.iter().zip(&devices) {
            if let Some(capacity) = crate::slots::capacity(dev)? {
                if p.size > capacity {
                    return Err(UpdateError::TooLarge {
                        payload: p.name.clone(),
                        size: p.size,
                        slot: target.clone(),
                        device: dev.display().to_string(),
                        capacity,
                    });
                }
            }
        }
        let digest = vh.digest();
        let resume = self
            .state
            .install()?
            .filter(|r| r.digest == digest && r.slot == target);
        let (payload, chunk) = match &resume {
            Some(r) => (r.payload, r.chunk),
            None => {
                self.state
                    .floors()
                    .check(BUNDLE_SUBJECT, vh.version(), &digest)?;
                // Never leave a half-written slot bootable, and never write
                // over the slot the box falls back to.
                self.change_env(|v| {
                    self.booted_is_confirmed(v)?;
                    Ok(self.env.with_bad(v, &target))
                })?;
                self.state.begin_install(&InstallRecord {
                    source: job.detail.source.clone(),
                    slot: target.clone(),
                    header: header.clone(),
                    digest: digest.clone(),
                    version: vh.version().to_string(),
                    payload: 0,
                    chunk: 0,
                })?;
                (0, 0)
            }
        };
        let stream = Stream {
            source,
            manifest: m,
            header_len: vh.header_len,
            devices: &devices,
            state: &self.state,
            job,
            checkpoint_bytes: self.cfg.checkpoint_bytes.max(m.chunk_size),
            attempts: self.cfg.download_attempts,
        };
        if let Err(e) = stream.run(payload, chunk) {
            if !e.resumable() {
                self.abandon(&target)?;
            }
            return Err(e);
        }
        job.set_phase(Phase::Finishing);
        self.state.set_slot(
            &target,
            &SlotRecord {
                version: vh.version().to_string(),
                digest,
                security_version: m.security_version,
                health: "pending".into(),
                installed_at: pocket_trust::format_time(SystemTime::now()),
            },
        )?;
        let slots = self.system.slot_names();
        self.change_env(|v| Ok(self.env.with_primary(v, &slots, &target)))?;
        self.state.clear_install()
    }

    /// An install writes the slot that is not booted, so the booted one
    /// must be the box's fallback: the last slot that passed its health
    /// check. A fresh slot that has not passed it yet may fail and be
    /// left; the other slot is then the only one known to work.
    fn booted_is_confirmed(&self, vars: &Vars) -> Result<(), UpdateError> {
        let last_good = self.env.last_good(vars, &self.system.slot_names());
        crate::plan::booted_is_confirmed(self.booted()?, last_good)
    }

    /// Gives up an install that cannot succeed: the slot stays unbootable.
    fn abandon(&self, slot: &str) -> Result<(), UpdateError> {
        self.state.clear_install()?;
        if let Some(mut rec) = self.state.slot(slot)? {
            rec.health = "incomplete".into();
            self.state.set_slot(slot, &rec)?;
        }
        Ok(())
    }

    /// Reads the header at the update URL and says whether it is newer.
    pub fn check(&self) -> Result<UpdateCheck, UpdateError> {
        let url = self
            .cfg
            .update_url
            .clone()
            .ok_or(UpdateError::NoUpdateUrl)?;
        let source = Source::parse(&url)?;
        let (header, _) = source.header()?;
        let vh = VerifiedHeader::verify(&self.keyring()?, &header, SystemTime::now())?;
        vh.check_compatible(&self.system.compatible)?;
        let running = self.system_version();
        let newer = match running.parse::<Version>() {
            Ok(rv) => *vh.version() > rv,
            Err(_) => true,
        };
        let allowed = vh.manifest().security_version >= self.state.security_floor()?
            && self
                .state
                .floors()
                .check(BUNDLE_SUBJECT, vh.version(), &vh.digest())
                .is_ok();
        Ok(UpdateCheck {
            available: newer && allowed,
            version: vh.version().to_string(),
            source: url,
            current_version: running,
        })
    }

    /// Marks the booted slot good: the bootloader restores its tries and
    /// the security floor rises to its bundle's.
    pub fn mark_good(&self) -> Result<String, UpdateError> {
        let slot = self.booted()?.to_string();
        self.change_env(|v| Ok(self.env.with_confirmed(v, &slot)))?;
        self.state.mark_good(&slot)?;
        *self.health.lock().expect("health") = "good".into();
        Ok(slot)
    }

    pub fn mark_bad(&self, slot: &str) -> Result<(), UpdateError> {
        if !self.system.slots.contains_key(slot) {
            return Err(UpdateError::NoSuchSlot(
                slot.into(),
                self.system.slot_names().join(", "),
            ));
        }
        self.change_env(|v| Ok(self.env.with_bad(v, slot)))?;
        if let Some(mut rec) = self.state.slot(slot)? {
            rec.health = "failed".into();
            self.state.set_slot(slot, &rec)?;
        }
        Ok(())
    }

    /// Makes the other slot primary when the bootloader still has it good
    /// and no install is writing it.
    pub fn rollback(&self) -> Result<String, UpdateError> {
        let other = self.other_slot(self.booted()?);
        if self.operation() != "idle" {
            return Err(UpdateError::Busy(
                "an install is writing the other slot".into(),
            ));
        }
        let rec = self.state.slot(&other)?;
        crate::plan::rollback_to(
            &other,
            rec.as_ref(),
            self.system.security_version,
            self.state.security_floor()?,
        )?;
        let slots = self.system.slot_names();
        self.change_env(|vars| {
            if !self.env.slot(vars, &other).good {
                return Err(UpdateError::NotGood(other.clone()));
            }
            Ok(self.env.with_primary(vars, &slots, &other))
        })?;
        Ok(other)
    }

    /// Runs the boot's health check and acts on it: good marks the booted
    /// slot good; a failed fresh slot is marked bad and the box restarted,
    /// so the bootloader falls back to the slot that last worked.
    pub async fn boot_health(&self, conn: &zbus::Connection) {
        let Ok(slot) = self.booted().map(str::to_string) else {
            *self.health.lock().expect("health") = "failed: booted slot unknown".into();
            return;
        };
        *self.health.lock().expect("health") = "checking".into();
        match crate::health::check(conn, &self.cfg.health).await {
            Ok(report) => match self.mark_good() {
                Ok(_) => match report.degraded {
                    None => tracing::info!("slot {slot} is good: {}", report.passed),
                    Some(why) => {
                        tracing::warn!("slot {slot} is good, degraded: {why} ({})", report.passed);
                        *self.health.lock().expect("health") = format!("degraded: {why}");
                    }
                },
                Err(e) => {
                    tracing::warn!(
                        "slot {slot} passed its health check but cannot be marked good: {e}"
                    );
                    *self.health.lock().expect("health") = format!("failed: {e}");
                }
            },
            Err(why) => {
                tracing::warn!("slot {slot} failed its health check: {why}");
                *self.health.lock().expect("health") = format!("failed: {why}");
                let fresh = matches!(self.state.slot(&slot), Ok(Some(r)) if r.health == "pending");
                let other = self.other_slot(&slot);
                let other_good = self
                    .env
                    .read()
                    .map(|v| self.env.slot(&v, &other).good)
                    .unwrap_or(false);
                if fresh && other_good {
                    if let Err(e) = self.mark_bad(&slot) {
                        tracing::warn!("cannot mark slot {slot} bad: {e}");
                        return;
                    }
                    self.reboot();
                }
            }
        }
    }

    fn reboot(&self) {
        let Some((prog, args)) = self.cfg.reboot_command.split_first() else {
            return;
        };
        tracing::warn!("restarting so the bootloader falls back");
        if let Err(e) = std::process::Command::new(prog).args(args).status() {
            tracing::warn!("cannot run {prog}: {e}");
        }
    }
}
