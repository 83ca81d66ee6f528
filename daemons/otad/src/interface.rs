//! The D-Bus surface: `org.pocketos.Update1` and one
//! `org.pocketos.Update1.Job` object per install.

use crate::engine::Engine;
use crate::error::UpdateError;
use crate::install::Job;
use pocket_daemon::access::require_admin;
use pocket_proto::update::{SlotStatus, UpdateCheck, JOB_PATH_PREFIX, PATH};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::zvariant::{ObjectPath, OwnedObjectPath};

#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.pocketos.Error")]
pub enum Error {
    #[zbus(error)]
    ZBus(zbus::Error),
    NotFound(String),
    PermissionDenied(String),
    Untrusted(String),
    Downgrade(String),
    Expired(String),
    Corrupt(String),
    Incompatible(String),
    DiskFull(String),
    Bootloader(String),
    Busy(String),
    Network(String),
    Cancelled(String),
    InvalidArgument(String),
    Io(String),
    State(String),
}

impl From<UpdateError> for Error {
    fn from(e: UpdateError) -> Self {
        let msg = e.to_string();
        match e.name() {
            "Untrusted" => Error::Untrusted(msg),
            "Downgrade" => Error::Downgrade(msg),
            "Expired" => Error::Expired(msg),
            "Corrupt" => Error::Corrupt(msg),
            "Incompatible" => Error::Incompatible(msg),
            "DiskFull" => Error::DiskFull(msg),
            "Bootloader" => Error::Bootloader(msg),
            "Busy" => Error::Busy(msg),
            "Network" => Error::Network(msg),
            "Cancelled" => Error::Cancelled(msg),
            "InvalidArgument" => Error::InvalidArgument(msg),
            "Io" => Error::Io(msg),
            _ => Error::State(msg),
        }
    }
}

impl From<pocket_daemon::access::Denied> for Error {
    fn from(e: pocket_daemon::access::Denied) -> Self {
        Error::PermissionDenied(e.0)
    }
}

pub struct Update {
    engine: Arc<Engine>,
    admin_gid: Option<u32>,
}

impl Update {
    pub fn new(engine: Arc<Engine>, admin_gid: Option<u32>) -> Self {
        Update { engine, admin_gid }
    }
}

pub fn job_path(job: &Job) -> OwnedObjectPath {
    OwnedObjectPath::try_from(format!("{JOB_PATH_PREFIX}/{}", job.id)).expect("valid path")
}

/// Runs blocking engine work (file and environment I/O, HTTP through the
/// runtime) off the bus's executor.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, UpdateError> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::State(format!("worker failed: {e}")))?
        .map_err(Into::into)
}

#[zbus::interface(name = "org.pocketos.Update1")]
impl Update {
    async fn install(
        &self,
        source: &str,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<OwnedObjectPath, Error> {
        require_admin(conn, &hdr, self.admin_gid, "installing an update").await?;
        let job = self.engine.install(source)?;
        track(conn, job.clone()).await?;
        Ok(job_path(&job))
    }

    async fn install_file(
        &self,
        bundle: zbus::zvariant::OwnedFd,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<OwnedObjectPath, Error> {
        require_admin(conn, &hdr, self.admin_gid, "installing an update").await?;
        let fd: std::os::fd::OwnedFd = bundle.into();
        let job = self.engine.install_file(std::fs::File::from(fd))?;
        track(conn, job.clone()).await?;
        Ok(job_path(&job))
    }

    async fn slots(&self) -> Result<Vec<SlotStatus>, Error> {
        let e = self.engine.clone();
        blocking(move || e.slots()).await
    }

    async fn check(&self) -> Result<UpdateCheck, Error> {
        let e = self.engine.clone();
        blocking(move || e.check()).await
    }

    async fn mark_good(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<(), Error> {
        require_admin(conn, &hdr, self.admin_gid, "marking a slot").await?;
        let e = self.engine.clone();
        blocking(move || e.mark_good()).await?;
        spawn_state_changed(conn);
        Ok(())
    }

    async fn mark_bad(
        &self,
        slot: String,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<(), Error> {
        require_admin(conn, &hdr, self.admin_gid, "marking a slot").await?;
        let e = self.engine.clone();
        blocking(move || e.mark_bad(&slot)).await?;
        spawn_state_changed(conn);
        Ok(())
    }

    async fn rollback(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<String, Error> {
        require_admin(conn, &hdr, self.admin_gid, "rolling back").await?;
        let e = self.engine.clone();
        let slot = blocking(move || e.rollback()).await?;
        spawn_state_changed(conn);
        Ok(slot)
    }

    #[zbus(signal)]
    async fn install_finished(
        emitter: &SignalEmitter<'_>,
        job: ObjectPath<'_>,
        success: bool,
        error_name: &str,
        error_message: &str,
    ) -> zbus::Result<()>;

    #[zbus(property)]
    fn booted_slot(&self) -> String {
        self.engine.booted().map(str::to_string).unwrap_or_default()
    }

    #[zbus(property)]
    fn primary_slot(&self) -> String {
        self.engine.primary()
    }

    #[zbus(property)]
    fn operation(&self) -> String {
        self.engine.operation()
    }

    #[zbus(property)]
    fn job(&self) -> OwnedObjectPath {
        match self.engine.job() {
            Some(j) => job_path(&j),
            None => OwnedObjectPath::try_from("/").expect("root path"),
        }
    }

    #[zbus(property)]
    fn last_error(&self) -> String {
        self.engine.last_error()
    }

    #[zbus(property)]
    fn compatible(&self) -> String {
        self.engine.compatible().to_string()
    }

    #[zbus(property)]
    fn system_version(&self) -> String {
        self.engine.system_version()
    }

    #[zbus(property)]
    fn security_version(&self) -> u64 {
        self.engine.security_version()
    }

    #[zbus(property)]
    fn health(&self) -> String {
        self.engine.health()
    }

    #[zbus(property)]
    fn status(&self) -> String {
        self.engine.status()
    }
}

pub struct JobObject {
    job: Arc<Job>,
    admin_gid: Option<u32>,
}

impl JobObject {
    fn outcome_error(&self) -> (String, String) {
        match self.job.outcome().borrow().clone() {
            Some(Err((n, m))) => (format!("{}.{n}", pocket_proto::ERROR_PREFIX), m),
            _ => (String::new(), String::new()),
        }
    }
}

#[zbus::interface(name = "org.pocketos.Update1.Job")]
impl JobObject {
    async fn cancel(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<(), Error> {
        require_admin(conn, &hdr, self.admin_gid, "cancelling an update").await?;
        self.job.cancel();
        Ok(())
    }

    #[zbus(property)]
    fn source(&self) -> String {
        self.job.source.clone()
    }

    #[zbus(property)]
    fn version(&self) -> String {
        self.job.version.lock().expect("version").clone()
    }

    #[zbus(property)]
    fn slot(&self) -> String {
        self.job.slot.lock().expect("slot").clone()
    }

    #[zbus(property)]
    fn phase(&self) -> String {
        self.job.phase().to_string()
    }

    #[zbus(property)]
    fn bytes_done(&self) -> u64 {
        self.job.done.load(Ordering::Relaxed)
    }

    #[zbus(property)]
    fn bytes_total(&self) -> u64 {
        self.job.total.load(Ordering::Relaxed)
    }

    #[zbus(property)]
    fn eta_seconds(&self) -> i64 {
        self.job.eta_seconds()
    }

    #[zbus(property)]
    fn error_name(&self) -> String {
        self.outcome_error().0
    }

    #[zbus(property)]
    fn error_message(&self) -> String {
        self.outcome_error().1
    }
}

/// How long a finished job's object stays on the bus for late readers.
const KEEP_FINISHED: Duration = Duration::from_secs(300);
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// Exports a job's object and forwards its progress and completion to the
/// bus.
pub async fn track(conn: &zbus::Connection, job: Arc<Job>) -> zbus::Result<()> {
    let path = job_path(&job);
    let admin_gid = conn
        .object_server()
        .interface::<_, Update>(PATH)
        .await?
        .get()
        .await
        .admin_gid;
    let obj = JobObject {
        job: job.clone(),
        admin_gid,
    };
    if !conn.object_server().at(&path, obj).await? {
        return Ok(());
    }
    emit_state_changed(conn).await;
    let conn = conn.clone();
    tokio::spawn(async move {
        if let Err(e) = forward(&conn, &job, &path).await {
            tracing::warn!(job = job.id, "progress forwarding stopped: {e}");
        }
        tokio::time::sleep(KEEP_FINISHED).await;
        let _ = conn.object_server().remove::<JobObject, _>(&path).await;
    });
    Ok(())
}

/// Tells watchers that the main object's properties may have changed.
pub async fn emit_state_changed(conn: &zbus::Connection) {
    let Ok(iface) = conn.object_server().interface::<_, Update>(PATH).await else {
        return;
    };
    let emitter = iface.signal_emitter();
    let obj = iface.get().await;
    let _ = obj.operation_changed(emitter).await;
    let _ = obj.job_changed(emitter).await;
    let _ = obj.primary_slot_changed(emitter).await;
    let _ = obj.last_error_changed(emitter).await;
    let _ = obj.health_changed(emitter).await;
    let _ = obj.security_version_changed(emitter).await;
    let _ = obj.system_version_changed(emitter).await;
}

/// From inside a method call the interface is borrowed: emit afterwards.
fn spawn_state_changed(conn: &zbus::Connection) {
    let conn = conn.clone();
    tokio::spawn(async move { emit_state_changed(&conn).await });
}

async fn forward(conn: &zbus::Connection, job: &Job, path: &OwnedObjectPath) -> zbus::Result<()> {
    let iface = conn.object_server().interface::<_, JobObject>(path).await?;
    let mut outcome = job.outcome();
    let (mut last_done, mut last_phase) = (u64::MAX, "");
    loop {
        // The phase before the outcome: a job sets its outcome first, so a
        // terminal phase read here always comes with its outcome.
        let phase = job.phase();
        let finished = outcome.borrow().clone();
        let emitter = iface.signal_emitter();
        let obj = iface.get().await;
        if finished.is_some() {
            obj.error_name_changed(emitter).await?;
            obj.error_message_changed(emitter).await?;
        }
        let done = job.done.load(Ordering::Relaxed);
        if done != last_done {
            obj.bytes_done_changed(emitter).await?;
            obj.eta_seconds_changed(emitter).await?;
            last_done = done;
        }
        if phase != last_phase {
            last_phase = phase;
            obj.phase_changed(emitter).await?;
            obj.version_changed(emitter).await?;
            obj.slot_changed(emitter).await?;
            obj.bytes_total_changed(emitter).await?;
            drop(obj);
            emit_state_changed(conn).await;
        } else {
            drop(obj);
        }
        if let Some(result) = finished {
            let (ok, en, em) = match result {
                Ok(()) => (true, String::new(), String::new()),
                Err((n, m)) => (false, format!("{}.{n}", pocket_proto::ERROR_PREFIX), m),
            };
            emit_state_changed(conn).await;
            let main = SignalEmitter::new(conn, PATH)?;
            Update::install_finished(&main, path.as_ref(), ok, &en, &em).await?;
            return Ok(());
        }
        tokio::select! {
            _ = outcome.changed() => {}
            _ = tokio::time::sleep(PROGRESS_EVERY) => {}
        }
    }
}
