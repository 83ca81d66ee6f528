//! What travels on the bus between PocketOS daemons and their clients:
//! names, proxies and wire types. Clients depend on this crate, never on a
//! daemon.

pub mod generate;
pub mod job;
pub mod models;
pub mod power;
pub mod runtime;
pub mod update;

/// Prefix of every typed PocketOS D-Bus error.
pub const ERROR_PREFIX: &str = "org.pocketos.Error";

/// Connects to the system bus, honouring `DBUS_SYSTEM_BUS_ADDRESS` (zbus
/// reads it) so that tests and development can run on a private bus.
pub async fn system_bus() -> zbus::Result<zbus::Connection> {
    zbus::Connection::system().await
}

/// A proxy that reads every property fresh instead of caching it: for job
/// objects, whose progress changes all the time (a cached error could lag
/// behind the phase that says the job failed), and for clients that read a
/// daemon's state once per request. At `path`, or the interface's default
/// path when `None`.
pub async fn fresh_proxy<P>(
    conn: &zbus::Connection,
    path: Option<&zbus::zvariant::OwnedObjectPath>,
) -> zbus::Result<P>
where
    P: zbus::proxy::Defaults + From<zbus::Proxy<'static>>,
{
    let mut builder =
        zbus::proxy::Builder::<P>::new(conn).cache_properties(zbus::proxy::CacheProperties::No);
    if let Some(path) = path {
        builder = builder.path(path.clone())?;
    }
    builder.build().await
}

/// The short name of a PocketOS error (`DiskFull` for
/// `org.pocketos.Error.DiskFull`), or the full name of any other error.
pub fn short_error_name(name: &str) -> &str {
    name.strip_prefix(ERROR_PREFIX)
        .and_then(|s| s.strip_prefix('.'))
        .unwrap_or(name)
}
