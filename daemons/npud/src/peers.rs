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

/// The box's energy as powerd measures it, integrated here from powerd's
/// telemetry: every 100 ms while a generation runs, every second
/// otherwise. A request's joules are the rise over its interval; `None`
/// when powerd is absent or has no sensor that reads.
#[derive(Debug, Default)]
pub struct EnergyMeter {
    state: std::sync::Mutex<Meter>,
    /// Generations running now (the meter polls faster while any does).
    pub running: std::sync::atomic::AtomicUsize,
}

#[derive(Debug, Default)]
struct Meter {
    /// Joules since the meter (re)started, and the watts and time of the
    /// last reading; `None` while readings are missing.
    last: Option<(f64, f64, Instant)>,
    /// Counts restarts: joules from different epochs do not compare.
    epoch: u64,
}

impl EnergyMeter {
    /// The energy counter now, interpolated from the last reading, and
    /// its epoch.
    pub fn joules(&self) -> Option<(f64, u64)> {
        let s = self.state.lock().expect("not poisoned");
        s.last
            .map(|(e, w, t)| (e + w * t.elapsed().as_secs_f64(), s.epoch))
    }

    fn record(&self, watts: Option<f64>) {
        let mut s = self.state.lock().expect("not poisoned");
        let now = Instant::now();
        s.last = match (s.last, watts) {
            (_, None) => None,
            (None, Some(w)) => {
                s.epoch += 1;
                Some((0.0, w, now))
            }
            // Trapezoid between the two readings.
            (Some((e, w0, t)), Some(w)) => {
                Some((e + (w0 + w) / 2.0 * (now - t).as_secs_f64(), w, now))
            }
        };
    }

    /// Reads powerd's telemetry for as long as `conn` lives.
    pub async fn follow(self: std::sync::Arc<Self>, conn: zbus::Connection) {
        use std::sync::atomic::Ordering;
        loop {
            let watts = async {
                let p = pocket_proto::power::Power1Proxy::new(&conn).await.ok()?;
                let t = tokio::time::timeout(Duration::from_millis(500), p.telemetry())
                    .await
                    .ok()?
                    .ok()?;
                t.system_watts.is_finite().then_some(t.system_watts)
            }
            .await;
            self.record(watts);
            let period = match self.running.load(Ordering::SeqCst) {
                0 => Duration::from_secs(1),
                _ => Duration::from_millis(100),
            };
            tokio::time::sleep(period).await;
        }
    }
}

/// A request's energy: the meter at its start, read again at its end.
#[derive(Debug, Clone)]
pub struct EnergySpan {
    meter: std::sync::Arc<EnergyMeter>,
    start: Option<(f64, u64)>,
    at: Instant,
}

impl EnergySpan {
    pub fn start(meter: &std::sync::Arc<EnergyMeter>) -> EnergySpan {
        EnergySpan {
            meter: meter.clone(),
            start: meter.joules(),
            at: Instant::now(),
        }
    }

    /// Joules and average watts since the start, if the meter read
    /// throughout.
    pub fn end(&self) -> (Option<f64>, Option<f64>) {
        match (self.start, self.meter.joules()) {
            (Some((a, ea)), Some((b, eb))) if ea == eb && b >= a => {
                let secs = self.at.elapsed().as_secs_f64();
                let j = b - a;
                (Some(j), (secs > 0.0).then(|| j / secs))
            }
            _ => (None, None),
        }
    }
}
