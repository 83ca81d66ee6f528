//! What travels on the bus between PocketOS daemons and their clients:
//! names, proxies and wire types. Clients depend on this crate, never on a
//! daemon.

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

/// The short name of a PocketOS error (`DiskFull` for
/// `org.pocketos.Error.DiskFull`), or the full name of any other error.
pub fn short_error_name(name: &str) -> &str {
    name.strip_prefix(ERROR_PREFIX)
        .and_then(|s| s.strip_prefix('.'))
        .unwrap_or(name)
}
