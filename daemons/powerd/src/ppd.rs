//! power-profiles-daemon's D-Bus API, exactly: the same interface served as
//! `org.freedesktop.UPower.PowerProfiles` and as the legacy
//! `net.hadess.PowerProfiles`, each at its own path, so that
//! `powerprofilesctl`, GNOME and KDE work unchanged.

use crate::board::PROFILES;
use crate::error::GovernorError;
use crate::governor::Governor;
use pocket_daemon::access::require_admin;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::Mutex;
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::zvariant::{OwnedValue, Value};

pub const UPOWER_NAME: &str = "org.freedesktop.UPower.PowerProfiles";
pub const UPOWER_PATH: &str = "/org/freedesktop/UPower/PowerProfiles";
pub const HADESS_NAME: &str = "net.hadess.PowerProfiles";
pub const HADESS_PATH: &str = "/net/hadess/PowerProfiles";
/// The power-profiles-daemon API version this implements.
pub const API_VERSION: &str = "0.30";
const DRIVER: &str = "pocketos";

/// What both interfaces share.
#[derive(Debug, Clone)]
pub struct Shared {
    pub gov: Arc<Mutex<Governor>>,
    pub admin_gid: Option<u32>,
}

fn dict(pairs: &[(&str, &str)]) -> HashMap<String, OwnedValue> {
    pairs
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                OwnedValue::try_from(Value::from(*v)).expect("a string value"),
            )
        })
        .collect()
}

impl Shared {
    pub fn profiles() -> Vec<HashMap<String, OwnedValue>> {
        PROFILES
            .iter()
            .map(|p| {
                dict(&[
                    ("Profile", p),
                    ("Driver", DRIVER),
                    ("CpuDriver", DRIVER),
                    ("PlatformDriver", DRIVER),
                ])
            })
            .collect()
    }

    pub async fn holds(&self) -> Vec<HashMap<String, OwnedValue>> {
        self.gov
            .lock()
            .await
            .holds
            .iter()
            .map(|h| {
                dict(&[
                    ("ApplicationId", &h.application_id),
                    ("Profile", &h.profile),
                    ("Reason", &h.reason),
                ])
            })
            .collect()
    }
}

/// Emits the changed properties on both objects.
pub async fn emit_changed(conn: &zbus::Connection, profile: bool, holds: bool, degraded: bool) {
    macro_rules! each {
        ($ty:ty, $path:expr) => {
            if let Ok(iface) = conn.object_server().interface::<_, $ty>($path).await {
                let e = iface.signal_emitter();
                let obj = iface.get().await;
                if profile {
                    let _ = obj.active_profile_changed(e).await;
                }
                if holds {
                    let _ = obj.active_profile_holds_changed(e).await;
                }
                if degraded {
                    let _ = obj.performance_degraded_changed(e).await;
                }
            }
        };
    }
    each!(UPowerProfiles, UPOWER_PATH);
    each!(HadessProfiles, HADESS_PATH);
}

/// Tells each released hold's owner, as power-profiles-daemon does (the
/// signal goes to the holder only).
async fn profile_released(conn: &zbus::Connection, released: &[crate::governor::Hold]) {
    for h in released {
        for path in [UPOWER_PATH, HADESS_PATH] {
            let Ok(emitter) = SignalEmitter::new(conn, path) else {
                continue;
            };
            let Ok(dest) = zbus::names::BusName::try_from(h.owner.clone()) else {
                continue;
            };
            let emitter = emitter.set_destination(dest);
            let _ = if path == UPOWER_PATH {
                UPowerProfiles::profile_released(&emitter, h.cookie).await
            } else {
                HadessProfiles::profile_released(&emitter, h.cookie).await
            };
        }
    }
}

/// A property set over the bus comes with a header; one set from inside
/// the daemon does not and needs no check.
async fn check_caller(
    conn: &zbus::Connection,
    hdr: Option<&Header<'_>>,
    admin_gid: Option<u32>,
    action: &str,
) -> zbus::fdo::Result<()> {
    match hdr {
        Some(h) => require_admin(conn, h, admin_gid, action)
            .await
            .map_err(|e| zbus::fdo::Error::AccessDenied(e.0)),
        None => Ok(()),
    }
}

/// power-profiles-daemon's answers: a bad argument to a method is
/// `InvalidArgs`; a property that cannot be set is `Failed`.
impl From<GovernorError> for zbus::fdo::Error {
    fn from(e: GovernorError) -> Self {
        let msg = e.to_string();
        match e {
            GovernorError::NotHoldable(_)
            | GovernorError::NoSuchHold(_)
            | GovernorError::BudgetOutOfRange { .. } => zbus::fdo::Error::InvalidArgs(msg),
            GovernorError::UnknownProfile(_) | GovernorError::State(_) => {
                zbus::fdo::Error::Failed(msg)
            }
        }
    }
}

macro_rules! ppd_interface {
    ($ty:ident, $name:literal) => {
        pub struct $ty(pub Shared);

        #[zbus::interface(name = $name)]
        impl $ty {
            async fn hold_profile(
                &self,
                profile: &str,
                reason: &str,
                application_id: &str,
                #[zbus(header)] hdr: Header<'_>,
                #[zbus(connection)] conn: &zbus::Connection,
            ) -> zbus::fdo::Result<u32> {
                let owner = hdr.sender().map(|s| s.to_string()).unwrap_or_default();
                let before = self.0.gov.lock().await.active_profile();
                let cookie =
                    self.0
                        .gov
                        .lock()
                        .await
                        .hold(profile, reason, application_id, &owner)?;
                let after = self.0.gov.lock().await.active_profile();
                tracing::info!(cookie, profile, application_id, reason, "profile held");
                emit_changed(conn, before != after, true, false).await;
                Ok(cookie)
            }

            async fn release_profile(
                &self,
                cookie: u32,
                #[zbus(header)] hdr: Header<'_>,
                #[zbus(connection)] conn: &zbus::Connection,
            ) -> zbus::fdo::Result<()> {
                // Only the holder (or an admin) may release a hold.
                let sender = hdr.sender().map(|s| s.to_string()).unwrap_or_default();
                let owner = self
                    .0
                    .gov
                    .lock()
                    .await
                    .holds
                    .iter()
                    .find(|h| h.cookie == cookie)
                    .map(|h| h.owner.clone());
                if owner.is_some_and(|o| o != sender) {
                    check_caller(
                        conn,
                        Some(&hdr),
                        self.0.admin_gid,
                        "releasing another client's hold",
                    )
                    .await?;
                }
                let before = self.0.gov.lock().await.active_profile();
                self.0.gov.lock().await.release(cookie)?;
                let after = self.0.gov.lock().await.active_profile();
                emit_changed(conn, before != after, true, false).await;
                Ok(())
            }

            async fn set_action_enabled(
                &self,
                action: &str,
                _enabled: bool,
            ) -> zbus::fdo::Result<()> {
                Err(zbus::fdo::Error::InvalidArgs(format!(
                    "no action {action:?}"
                )))
            }

            #[zbus(signal)]
            async fn profile_released(emitter: &SignalEmitter<'_>, cookie: u32)
                -> zbus::Result<()>;

            #[zbus(property)]
            async fn active_profile(&self) -> String {
                self.0.gov.lock().await.active_profile()
            }

            #[zbus(property)]
            async fn set_active_profile(
                &mut self,
                profile: String,
                #[zbus(header)] hdr: Option<Header<'_>>,
                #[zbus(connection)] conn: &zbus::Connection,
            ) -> zbus::fdo::Result<()> {
                check_caller(
                    conn,
                    hdr.as_ref(),
                    self.0.admin_gid,
                    "changing the power profile",
                )
                .await?;
                let released = self.0.gov.lock().await.set_profile(&profile)?;
                tracing::info!(profile, "profile chosen");
                // This setter holds the interface; signals that read it go
                // out once it returns.
                let conn = conn.clone();
                tokio::spawn(async move {
                    profile_released(&conn, &released).await;
                    emit_changed(&conn, true, !released.is_empty(), false).await;
                });
                Ok(())
            }

            #[zbus(property)]
            fn performance_inhibited(&self) -> String {
                String::new()
            }

            #[zbus(property)]
            async fn performance_degraded(&self) -> String {
                self.0.gov.lock().await.reason.as_str().to_string()
            }

            #[zbus(property)]
            fn profiles(&self) -> Vec<HashMap<String, OwnedValue>> {
                Shared::profiles()
            }

            #[zbus(property)]
            fn actions(&self) -> Vec<String> {
                Vec::new()
            }

            #[zbus(property)]
            fn actions_info(&self) -> Vec<HashMap<String, OwnedValue>> {
                Vec::new()
            }

            #[zbus(property)]
            async fn active_profile_holds(&self) -> Vec<HashMap<String, OwnedValue>> {
                self.0.holds().await
            }

            #[zbus(property)]
            fn version(&self) -> String {
                API_VERSION.to_string()
            }

            #[zbus(property)]
            async fn battery_aware(&self) -> bool {
                self.0.gov.lock().await.battery_aware
            }

            #[zbus(property)]
            async fn set_battery_aware(
                &mut self,
                on: bool,
                #[zbus(header)] hdr: Option<Header<'_>>,
                #[zbus(connection)] conn: &zbus::Connection,
            ) -> zbus::fdo::Result<()> {
                check_caller(
                    conn,
                    hdr.as_ref(),
                    self.0.admin_gid,
                    "changing BatteryAware",
                )
                .await?;
                Ok(self.0.gov.lock().await.set_battery_aware(on)?)
            }
        }
    };
}

ppd_interface!(UPowerProfiles, "org.freedesktop.UPower.PowerProfiles");
ppd_interface!(HadessProfiles, "net.hadess.PowerProfiles");
