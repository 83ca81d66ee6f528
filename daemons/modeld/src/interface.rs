//! The D-Bus surface: `org.pocketos.Models1` and one
//! `org.pocketos.Models1.Job` object per install.

use crate::engine::{Engine, Install, Job};
use crate::error::ModelError;
use pocket_daemon::access::require_admin;
use pocket_daemon::job::Detail;
use pocket_proto::models::{CatalogModel, ModelInfo, JOB_PATH_PREFIX, PATH};
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
        Ok(pocket_daemon::job::export(conn, &job, self.admin_gid).await?)
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
        Ok(pocket_daemon::job::export(conn, &job, self.admin_gid).await?)
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
        self.engine.jobs().iter().map(|j| j.path()).collect()
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

/// `org.pocketos.Models1.Job`: what only a model install shows.
pub struct InstallJob {
    job: Arc<Job>,
}

#[zbus::interface(name = "org.pocketos.Models1.Job")]
impl InstallJob {
    #[zbus(property)]
    fn name(&self) -> String {
        self.job.detail.name()
    }
}

impl Detail for Install {
    const PATH_PREFIX: &'static str = JOB_PATH_PREFIX;
    const CANCELLING: &'static str = "cancelling an install";
    type Iface = InstallJob;

    fn iface(job: &Arc<Job>) -> InstallJob {
        InstallJob { job: job.clone() }
    }

    async fn owner_changed(conn: &zbus::Connection) {
        if let Ok(iface) = conn.object_server().interface::<_, Models>(PATH).await {
            let _ = iface.get().await.jobs_changed(iface.signal_emitter()).await;
        }
    }

    async fn finished(
        conn: &zbus::Connection,
        job: &Job,
        path: ObjectPath<'_>,
        (error, message): (&str, &str),
    ) -> zbus::Result<()> {
        let main = SignalEmitter::new(conn, PATH)?;
        let (name, ok) = (job.detail.name(), error.is_empty());
        Models::install_finished(&main, path, &name, ok, error, message).await
    }
}
