//! `org.pocketos.Power1`: the budget and live telemetry.

use crate::error::GovernorError;
use crate::governor::Governor;
use pocket_daemon::access::require_admin;
use pocket_proto::power::{Cap, Telemetry};
use std::sync::Arc;
use tokio::sync::Mutex;
use zbus::message::Header;

/// `org.pocketos.Error.*`, as every PocketOS interface answers.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.pocketos.Error")]
pub enum Error {
    #[zbus(error)]
    ZBus(zbus::Error),
    PermissionDenied(String),
    InvalidArgument(String),
}

impl From<GovernorError> for Error {
    fn from(e: GovernorError) -> Self {
        let msg = e.to_string();
        match e {
            // A budget that cannot be saved has always answered
            // InvalidArgument here; callers may match on the name.
            GovernorError::UnknownProfile(_)
            | GovernorError::NotHoldable(_)
            | GovernorError::NoSuchHold(_)
            | GovernorError::BudgetOutOfRange { .. }
            | GovernorError::State(_) => Error::InvalidArgument(msg),
        }
    }
}

pub struct Power1 {
    pub gov: Arc<Mutex<Governor>>,
    pub admin_gid: Option<u32>,
}

pub fn telemetry(g: &Governor) -> Telemetry {
    let t = &g.telemetry;
    Telemetry {
        profile: g.active_profile(),
        budget_watts: g.budget,
        system_watts: t.system_watts,
        rails: t.rails.clone().into_iter().collect(),
        temperatures: t.temps.clone().into_iter().collect(),
        caps: t
            .caps
            .iter()
            .map(|(k, (gov, hz))| {
                (
                    k.clone(),
                    Cap {
                        governor: gov.clone(),
                        max_hz: *hz,
                    },
                )
            })
            .collect(),
        cap_fraction: g.fraction(),
        degraded_reason: g.reason.as_str().to_string(),
        status: g.status(),
    }
}

#[zbus::interface(name = "org.pocketos.Power1")]
impl Power1 {
    async fn telemetry(&self) -> Telemetry {
        telemetry(&*self.gov.lock().await)
    }

    async fn set_budget(
        &self,
        watts: f64,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(signal_emitter)] emitter: zbus::object_server::SignalEmitter<'_>,
    ) -> Result<(), Error> {
        require_admin(conn, &hdr, self.admin_gid, "changing the power budget")
            .await
            .map_err(|e| Error::PermissionDenied(e.0))?;
        self.gov.lock().await.set_budget(watts)?;
        tracing::info!(watts, "budget set");
        self.budget_watts_changed(&emitter).await?;
        Ok(())
    }

    #[zbus(property)]
    async fn budget_watts(&self) -> f64 {
        self.gov.lock().await.budget
    }

    #[zbus(property)]
    async fn degraded_reason(&self) -> String {
        self.gov.lock().await.reason.as_str().to_string()
    }

    #[zbus(property)]
    async fn status(&self) -> String {
        self.gov.lock().await.status()
    }

    #[zbus(property)]
    async fn board(&self) -> String {
        self.gov.lock().await.board.name.clone()
    }

    #[zbus(property)]
    fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").to_string()
    }
}
