//! The daemons npud talks to: modeld (where an installed model lives) and
//! powerd (the `performance` hold while inference runs). Both may be absent;
//! npud keeps working.

use crate::error::RuntimeError;
use crate::runtime::ModelRecord;
use pocket_proto::models::Models1Proxy;
use pocket_proto::power::PowerProfilesProxy;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

pub async fn model_record(
    conn: &zbus::Connection,
    name: &str,
) -> Result<ModelRecord, RuntimeError> {
    let unavailable = |e: zbus::Error| RuntimeError::Peer(format!("modeld is not reachable: {e}"));
    let models = Models1Proxy::new(conn).await.map_err(unavailable)?;
    match models.info(name).await {
        Ok(info) => Ok(ModelRecord {
            name: info.name,
            version: info.version,
            path: info.path,
            memory_bytes: info.memory_bytes,
        }),
        Err(zbus::Error::MethodError(n, _, _)) if n.as_str() == "org.pocketos.Error.NotFound" => {
            Err(RuntimeError::NotInstalled(name.to_string()))
        }
        Err(e) => Err(unavailable(e)),
    }
}

/// Holds powerd's `performance` profile while inference runs and releases
/// it once the runtime has been idle for `linger`.
#[derive(Debug)]
pub struct PerformanceHold {
    state: Mutex<HoldState>,
    linger: Duration,
}

#[derive(Debug, Default)]
struct HoldState {
    cookie: Option<u32>,
    last_run: Option<Instant>,
    /// When powerd last refused or was absent, so that it is not asked on
    /// every inference.
    last_failure: Option<Instant>,
}

const RETRY: Duration = Duration::from_secs(30);

impl PerformanceHold {
    pub fn new(linger: Duration) -> Self {
        PerformanceHold {
            state: Mutex::new(HoldState::default()),
            linger,
        }
    }

    /// Called when inference starts.
    pub async fn touch(&self, conn: &zbus::Connection) {
        let mut s = self.state.lock().await;
        s.last_run = Some(Instant::now());
        if s.cookie.is_some() || s.last_failure.is_some_and(|t| t.elapsed() < RETRY) {
            return;
        }
        let hold = async {
            let p = PowerProfilesProxy::new(conn).await?;
            p.hold_profile(
                "performance",
                "running inference",
                pocket_proto::runtime::BUS_NAME,
            )
            .await
        };
        match tokio::time::timeout(Duration::from_secs(2), hold).await {
            Ok(Ok(cookie)) => {
                tracing::debug!(cookie, "holding the performance profile");
                s.cookie = Some(cookie);
            }
            Ok(Err(e)) => {
                tracing::debug!("no performance hold: {e}");
                s.last_failure = Some(Instant::now());
            }
            Err(_) => s.last_failure = Some(Instant::now()),
        }
    }

    /// Releases the hold when idle long enough; called periodically.
    pub async fn release_if_idle(&self, conn: &zbus::Connection) {
        let mut s = self.state.lock().await;
        let idle = s.last_run.is_none_or(|t| t.elapsed() >= self.linger);
        if let (true, Some(cookie)) = (idle, s.cookie) {
            s.cookie = None;
            if let Ok(p) = PowerProfilesProxy::new(conn).await {
                let _ = p.release_profile(cookie).await;
            }
            tracing::debug!(cookie, "released the performance profile");
        }
    }

    pub async fn holding(&self) -> bool {
        self.state.lock().await.cookie.is_some()
    }

    /// Forgets the hold (and a past refusal) because powerd went away or
    /// restarted: a restarted powerd knows no holds, so the next inference
    /// asks again.
    pub async fn powerd_changed(&self) {
        let mut s = self.state.lock().await;
        if let Some(cookie) = s.cookie.take() {
            tracing::debug!(cookie, "powerd changed owner; the hold is gone");
        }
        s.last_failure = None;
    }

    /// Follows the power-profiles bus name for as long as `conn` lives,
    /// calling [`Self::powerd_changed`] whenever its owner changes.
    pub async fn follow_powerd(self: std::sync::Arc<Self>, conn: zbus::Connection) {
        use futures_util::StreamExt;
        let watch = async {
            let dbus = zbus::fdo::DBusProxy::new(&conn).await?;
            dbus.receive_name_owner_changed_with_args(&[(0, POWER_PROFILES)])
                .await
        };
        let mut changes = match watch.await {
            Ok(changes) => changes,
            Err(e) => {
                tracing::warn!("cannot follow powerd on the bus: {e}");
                return;
            }
        };
        while changes.next().await.is_some() {
            self.powerd_changed().await;
        }
    }
}

/// The bus name npud holds profiles on (power-profiles-daemon's, which
/// powerd owns).
const POWER_PROFILES: &str = "org.freedesktop.UPower.PowerProfiles";
