//! The D-Bus surface: `org.pocketos.Models1` and one
//! `org.pocketos.Models1.Job` object per install.

use crate::engine::{Engine, Job};
use crate::error::ModelError;
use pocket_daemon::access::require_admin;
use pocket_proto::models::{CatalogModel, ModelInfo, JOB_PATH_PREFIX, PATH};
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
    DiskFull(String),
    InsufficientMemory(String),
    Network(String),
    Cancelled(String),
    InvalidArgument(String),
    Io(String),
    State(String),
}

impl From<ModelError> for Error {
    fn from(e: ModelError) -> Self {
        let msg = e.to_string();
        match e.name() {
            "NotFound" => Error::NotFound(msg),
            "PermissionDenied" => Error::PermissionDenied(msg),
            "Untrusted" => Error::Untrusted(msg),
            "Downgrade" => Error::Downgrade(msg),
            "Expired" => Error::Expired(msg),
            "Corrupt" => Error::Corrupt(msg),
            "DiskFull" => Error::DiskFull(msg),
            "InsufficientMemory" => Error::InsufficientMemory(msg),
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

pub struct Models {
    engine: Arc<Engine>,
    admin_gid: Option<u32>,
}

impl Models {
    pub fn new(engine: Arc<Engine>, admin_gid: Option<u32>) -> Self {
        Models { engine, admin_gid }
    }
}

pub fn job_path(job: &Job) -> OwnedObjectPath {
    OwnedObjectPath::try_from(format!("{JOB_PATH_PREFIX}/{}", job.id)).expect("valid path")
}

#[zbus::interface(name = "org.pocketos.Models1")]
impl Models {
    async fn catalog(&self) -> Result<Vec<CatalogModel>, Error> {
        Ok(self.engine.catalog().await?)
    }

    async fn refresh(&self) -> Result<u32, Error> {
        Ok(self.engine.refresh().await? as u32)
    }

    async fn list(&self) -> Result<Vec<ModelInfo>, Error> {
        Ok(self.engine.list()?)
    }

    async fn info(&self, name: &str) -> Result<ModelInfo, Error> {
        Ok(self.engine.info(name)?)
    }

    async fn install(
        &self,
        name: &str,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<OwnedObjectPath, Error> {
        require_admin(conn, &hdr, self.admin_gid, "installing a model").await?;
        let (job, _) = self.engine.install(name).await?;
        track(conn, job.clone()).await?;
        Ok(job_path(&job))
    }

    async fn install_file(
        &self,
        pack: zbus::zvariant::OwnedFd,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<OwnedObjectPath, Error> {
        require_admin(conn, &hdr, self.admin_gid, "installing a model").await?;
        let fd: std::os::fd::OwnedFd = pack.into();
        let job = self.engine.install_file(std::fs::File::from(fd)).await?;
        track(conn, job.clone()).await?;
        Ok(job_path(&job))
    }

    async fn remove(
        &self,
        name: &str,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<(), Error> {
        require_admin(conn, &hdr, self.admin_gid, "removing a model").await?;
        self.engine.info(name)?;
        unload_from_runtime(conn, name).await?;
        Ok(self.engine.remove(name).await?)
    }

    async fn remove_partial(
        &self,
        name: &str,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<u64, Error> {
        require_admin(conn, &hdr, self.admin_gid, "removing a download").await?;
        Ok(self.engine.remove_partial(name).await?)
    }

    async fn gc(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<u64, Error> {
        require_admin(conn, &hdr, self.admin_gid, "collecting garbage").await?;
        Ok(self.engine.gc().await?)
    }

    #[zbus(signal)]
    async fn install_finished(
        emitter: &SignalEmitter<'_>,
        job: ObjectPath<'_>,
        name: &str,
        success: bool,
        error_name: &str,
        error_message: &str,
    ) -> zbus::Result<()>;

    #[zbus(property)]
    async fn jobs(&self) -> Vec<OwnedObjectPath> {
        self.engine.jobs().iter().map(|j| job_path(j)).collect()
    }

    #[zbus(property)]
    async fn status(&self) -> String {
        self.engine.status().await
    }

    #[zbus(property)]
    fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").to_string()
    }
}

/// Asks npud to drop a model before its files go. npud being absent or not
/// having it loaded is fine; any other answer refuses the removal.
async fn unload_from_runtime(conn: &zbus::Connection, name: &str) -> Result<(), Error> {
    let refused = |e: zbus::Error| {
        Error::InvalidArgument(format!(
            "model {name:?} is loaded by the runtime and could not be unloaded: {e}"
        ))
    };
    let rt = pocket_proto::runtime::Runtime1Proxy::builder(conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .map_err(refused)?;
    match rt.unload(name).await {
        Ok(()) => Ok(()),
        Err(zbus::Error::MethodError(err, _, _))
            if err.as_str() == "org.pocketos.Error.NotFound"
                || err.as_str() == "org.freedesktop.DBus.Error.ServiceUnknown"
                || err.as_str() == "org.freedesktop.DBus.Error.NameHasNoOwner" =>
        {
            Ok(())
        }
        Err(e) => Err(refused(e)),
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

#[zbus::interface(name = "org.pocketos.Models1.Job")]
impl JobObject {
    async fn cancel(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<(), Error> {
        require_admin(conn, &hdr, self.admin_gid, "cancelling an install").await?;
        self.job.cancel();
        Ok(())
    }

    #[zbus(property)]
    fn name(&self) -> String {
        self.job.name()
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

/// Exports a job's object (once) and forwards its progress and completion
/// to the bus.
pub async fn track(conn: &zbus::Connection, job: Arc<Job>) -> zbus::Result<()> {
    let path = job_path(&job);
    let admin_gid = conn
        .object_server()
        .interface::<_, Models>(PATH)
        .await?
        .get()
        .await
        .admin_gid;
    let obj = JobObject {
        job: job.clone(),
        admin_gid,
    };
    if !conn.object_server().at(&path, obj).await? {
        return Ok(()); // already tracked
    }
    emit_jobs_changed(conn).await;
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

async fn emit_jobs_changed(conn: &zbus::Connection) {
    if let Ok(iface) = conn.object_server().interface::<_, Models>(PATH).await {
        let _ = iface.get().await.jobs_changed(iface.signal_emitter()).await;
    }
}

async fn forward(conn: &zbus::Connection, job: &Job, path: &OwnedObjectPath) -> zbus::Result<()> {
    let iface = conn.object_server().interface::<_, JobObject>(path).await?;
    let mut outcome = job.outcome();
    let (mut last_done, mut last_phase) = (u64::MAX, String::new());
    loop {
        let finished = outcome.borrow().clone();
        let emitter = iface.signal_emitter();
        let obj = iface.get().await;
        // The error first: a client that sees the final phase can read why
        // at once (otad keeps the same order).
        if finished.is_some() {
            obj.error_name_changed(emitter).await?;
            obj.error_message_changed(emitter).await?;
        }
        let done = job.done.load(Ordering::Relaxed);
        if done != last_done {
            obj.bytes_done_changed(emitter).await?;
            last_done = done;
        }
        if job.phase() != last_phase {
            last_phase = job.phase().to_string();
            obj.phase_changed(emitter).await?;
            obj.name_changed(emitter).await?;
            obj.bytes_total_changed(emitter).await?;
        }
        drop(obj);
        if let Some(result) = finished {
            let (ok, en, em) = match result {
                Ok(()) => (true, String::new(), String::new()),
                Err((n, m)) => (false, format!("{}.{n}", pocket_proto::ERROR_PREFIX), m),
            };
            let main = SignalEmitter::new(conn, PATH)?;
            Models::install_finished(&main, path.as_ref(), &job.name(), ok, &en, &em).await?;
            emit_jobs_changed(conn).await;
            return Ok(());
        }
        tokio::select! {
            _ = outcome.changed() => {}
            _ = tokio::time::sleep(PROGRESS_EVERY) => {}
        }
    }
}
