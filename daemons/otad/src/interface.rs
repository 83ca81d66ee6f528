//! The D-Bus surface: `org.pocketos.Update1` and one
//! `org.pocketos.Update1.Job` object per install.

use crate::engine::Engine;
use crate::error::UpdateError;
use crate::install::Job;
use pocket_daemon::access::require_admin;
use pocket_daemon::job::Detail;
use pocket_proto::update::{SlotStatus, UpdateCheck, JOB_PATH_PREFIX, PATH};
use std::sync::Arc;
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
        Ok(pocket_daemon::job::export(conn, &job, self.admin_gid).await?)
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
        Ok(pocket_daemon::job::export(conn, &job, self.admin_gid).await?)
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
            Some(j) => j.path(),
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

/// `org.pocketos.Update1.Job`: what only a system update shows.
pub struct UpdateJob {
    job: Arc<Job>,
}

#[zbus::interface(name = "org.pocketos.Update1.Job")]
impl UpdateJob {
    #[zbus(property)]
    fn source(&self) -> String {
        self.job.detail.source.clone()
    }

    #[zbus(property)]
    fn version(&self) -> String {
        self.job.detail.version.lock().expect("version").clone()
    }

    #[zbus(property)]
    fn slot(&self) -> String {
        self.job.detail.slot.lock().expect("slot").clone()
    }
}

impl Detail for crate::install::Update {
    const PATH_PREFIX: &'static str = JOB_PATH_PREFIX;
    const CANCELLING: &'static str = "cancelling an update";
    type Iface = UpdateJob;

    fn iface(job: &Arc<Job>) -> UpdateJob {
        UpdateJob { job: job.clone() }
    }

    async fn owner_changed(conn: &zbus::Connection) {
        emit_state_changed(conn).await
    }

    async fn finished(
        conn: &zbus::Connection,
        _job: &Job,
        path: ObjectPath<'_>,
        (error, message): (&str, &str),
    ) -> zbus::Result<()> {
        let main = SignalEmitter::new(conn, PATH)?;
        Update::install_finished(&main, path, error.is_empty(), error, message).await
    }
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
