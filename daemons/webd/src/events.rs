//! Live updates for the page: the daemons' D-Bus signals (job property
//! changes, completion signals, profile changes) and powerd's telemetry,
//! turned into JSON events that `/api/events` pushes as Server-Sent Events.

use futures_util::StreamExt;
use pocket_proto::{fresh_proxy, models, power, update};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::broadcast;
use zbus::zvariant::OwnedObjectPath;
use zbus::MatchRule;

/// How often telemetry is pushed while a page listens.
const POWER_PERIOD: Duration = Duration::from_secs(1);
/// Progress of one job is pushed at most this often.
const PROGRESS_PERIOD: Duration = Duration::from_millis(150);

#[derive(Clone)]
pub struct Events {
    tx: broadcast::Sender<Arc<str>>,
    rates: Arc<Mutex<HashMap<String, Rate>>>,
}

/// Download speed of a job, smoothed.
struct Rate {
    bytes: u64,
    at: Instant,
    per_sec: f64,
    last_sent: Option<(Instant, String)>,
}

impl Events {
    /// Starts watching the bus; events go to every subscriber. Signals
    /// arrive on a connection of their own: a watcher that reads a job's
    /// properties (on `bus`) while signals queue up must not hold up the
    /// replies it waits for.
    pub async fn start(bus: &zbus::Connection) -> anyhow::Result<Events> {
        let signals = pocket_proto::system_bus()
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach the system bus: {e}"))?;
        let (tx, _) = broadcast::channel(256);
        let ev = Events {
            tx,
            rates: Arc::default(),
        };
        let jobs = [
            (Kind::Model, models::BUS_NAME, models::JOB_PATH_PREFIX),
            (Kind::Update, update::BUS_NAME, update::JOB_PATH_PREFIX),
        ];
        for (kind, sender, prefix) in jobs {
            tokio::spawn(
                ev.clone()
                    .watch_jobs(signals.clone(), bus.clone(), kind, sender, prefix),
            );
        }
        tokio::spawn(ev.clone().watch_power(bus.clone()));
        Ok(ev)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.tx.subscribe()
    }

    pub fn send(&self, event: Value) {
        // No subscriber is fine: nobody has the page open.
        let _ = self.tx.send(event.to_string().into());
    }

    /// One daemon's job progress and completion signals, taken from one
    /// stream so that they reach the page in the order they were sent: a
    /// job's last progress event always comes before its end.
    async fn watch_jobs(
        self,
        signals: zbus::Connection,
        bus: zbus::Connection,
        kind: Kind,
        sender: &'static str,
        prefix: &'static str,
    ) {
        let rule = MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .sender(sender)
            .map(|r| r.build());
        let mut stream = match rule {
            Ok(rule) => {
                match zbus::MessageStream::for_match_rule(rule, &signals, Some(256)).await {
                    Ok(s) => s,
                    Err(e) => return tracing::warn!("cannot watch {sender} jobs: {e}"),
                }
            }
            Err(e) => return tracing::warn!("cannot watch {sender} jobs: {e}"),
        };
        while let Some(msg) = stream.next().await {
            let Ok(msg) = msg else { continue };
            let header = msg.header();
            let (Some(path), Some(member)) = (header.path(), header.member()) else {
                continue;
            };
            if member.as_str() == "PropertiesChanged" && path.as_str().starts_with(prefix) {
                let path = OwnedObjectPath::from(path.to_owned());
                self.send_job(kind, &bus, &path, false).await;
            } else if member.as_str() == "InstallFinished" {
                let Some((path, end)) = kind.finished(&msg) else {
                    continue;
                };
                // The job's last state, whatever progress was skipped.
                self.send_job(kind, &bus, &path, true).await;
                self.send(end);
            }
        }
    }

    /// Reads a job and sends it as a progress event, unless it is too soon
    /// after the last one (see [`Self::with_rate`]).
    async fn send_job(
        &self,
        kind: Kind,
        bus: &zbus::Connection,
        path: &OwnedObjectPath,
        last: bool,
    ) {
        if let Some(job) = kind.job(bus, path).await {
            if let Some(job) = self.with_rate(path, job, last) {
                self.send(json!({ "type": kind.job_event(), "job": job }));
            }
        }
    }

    /// Adds the speed to a job's progress; `None` when it is too
    /// soon after the last event for the same job and phase.
    /// `last` sends it regardless.
    fn with_rate(&self, path: &str, mut job: Value, last: bool) -> Option<Value> {
        let done = job["bytes_done"].as_u64().unwrap_or(0);
        let phase = job["phase"].as_str().unwrap_or("").to_string();
        let now = Instant::now();
        let mut rates = self.rates.lock().unwrap();
        let r = rates.entry(path.to_string()).or_insert(Rate {
            bytes: done,
            at: now,
            per_sec: 0.0,
            last_sent: None,
        });
        let dt = now.duration_since(r.at).as_secs_f64();
        if dt >= 0.1 && done >= r.bytes {
            let sample = (done - r.bytes) as f64 / dt;
            r.per_sec = if r.per_sec == 0.0 {
                sample
            } else {
                0.7 * r.per_sec + 0.3 * sample
            };
            r.bytes = done;
            r.at = now;
        }
        if let Some((at, last_phase)) = &r.last_sent {
            if !last && *last_phase == phase && now.duration_since(*at) < PROGRESS_PERIOD {
                return None;
            }
        }
        r.last_sent = Some((now, phase.clone()));
        job["bytes_per_sec"] = json!(r.per_sec.round());
        if last || phase == "done" || phase == "failed" {
            rates.remove(path);
        }
        Some(job)
    }

    async fn watch_power(self, bus: zbus::Connection) {
        let mut tick = tokio::time::interval(POWER_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if self.tx.receiver_count() == 0 {
                continue;
            }
            if let Ok(p) = power_state(&bus).await {
                self.send(json!({ "type": "power", "power": p }));
            }
        }
    }
}

/// Whose jobs a watcher follows.
#[derive(Clone, Copy)]
enum Kind {
    Model,
    Update,
}

impl Kind {
    fn job_event(self) -> &'static str {
        match self {
            Kind::Model => "model-job",
            Kind::Update => "update-job",
        }
    }

    async fn job(self, bus: &zbus::Connection, path: &OwnedObjectPath) -> Option<Value> {
        match self {
            Kind::Model => model_job(bus, path).await,
            Kind::Update => update_job(bus, path).await,
        }
    }

    /// The job and the page's event for a daemon's `InstallFinished`;
    /// `None` for any other signal or a malformed one.
    fn finished(self, msg: &zbus::Message) -> Option<(OwnedObjectPath, Value)> {
        let (kind, job, name, success, error, message) = match self {
            Kind::Model => {
                let sig = models::InstallFinished::from_message(msg.clone())?;
                let a = sig.args().ok()?;
                let (job, name) = (a.job().to_string(), Some(a.name().to_string()));
                let (e, m) = (short_error(a.error_name()), a.error_message().to_string());
                ("model-finished", job, name, *a.success(), e, m)
            }
            Kind::Update => {
                let sig = update::InstallFinished::from_message(msg.clone())?;
                let a = sig.args().ok()?;
                let (e, m) = (short_error(a.error_name()), a.error_message().to_string());
                let job = a.job().to_string();
                ("update-finished", job, None, *a.success(), e, m)
            }
        };
        let mut event = json!({
            "type": kind,
            "job": job,
            "success": success,
            "error": error,
            "message": message,
        });
        if let Some(name) = name {
            event["name"] = json!(name);
        }
        Some((OwnedObjectPath::try_from(job).ok()?, event))
    }
}

/// The last part of an error's name (`DiskFull` for
/// `org.pocketos.Error.DiskFull`), as the page shows it.
fn short_error(name: &str) -> String {
    name.rsplit('.').next().unwrap_or("").to_string()
}

/// A job as the page shows it: what every job has, then what only its
/// kind has; `None` once it is gone.
async fn job(
    bus: &zbus::Connection,
    service: &'static str,
    path: &OwnedObjectPath,
) -> Option<Value> {
    let job = pocket_proto::job::proxy(bus, service, path).await.ok()?;
    // Progress before the phase: a job enters a phase before it counts
    // bytes in it, so bytes read first never show with the phase before.
    let done = job.bytes_done().await.ok()?;
    let total = job.bytes_total().await.ok()?;
    let eta = job.eta_seconds().await.ok()?;
    let error = short_error(&job.error_name().await.ok()?);
    let message = job.error_message().await.ok()?;
    Some(json!({
        "id": job_id(path),
        "phase": job.phase().await.ok()?,
        "bytes_done": done,
        "bytes_total": total,
        "eta_seconds": eta,
        "error": error,
        "message": message,
    }))
}

/// A model install job as the page shows it; `None` once it is gone.
pub async fn model_job(bus: &zbus::Connection, path: &OwnedObjectPath) -> Option<Value> {
    let mut v = job(bus, models::BUS_NAME, path).await?;
    let install: models::JobProxy = fresh_proxy(bus, Some(path)).await.ok()?;
    v["name"] = json!(install.name().await.ok()?);
    Some(v)
}

/// A system update job as the page shows it; `None` once it is gone.
pub async fn update_job(bus: &zbus::Connection, path: &OwnedObjectPath) -> Option<Value> {
    let mut v = job(bus, update::BUS_NAME, path).await?;
    let update: update::UpdateJobProxy = fresh_proxy(bus, Some(path)).await.ok()?;
    v["version"] = json!(update.version().await.ok()?);
    v["slot"] = json!(update.slot().await.ok()?);
    Some(v)
}

/// The last element of a job's object path: what the page names it by.
pub fn job_id(path: &str) -> String {
    path.rsplit('/').next().unwrap_or("").to_string()
}

/// Profile, budget, watts and temperatures, from powerd.
pub async fn power_state(bus: &zbus::Connection) -> zbus::Result<Value> {
    let ppd: power::PowerProfilesProxy = fresh_proxy(bus, None).await?;
    let p1: power::Power1Proxy = fresh_proxy(bus, None).await?;
    let t = p1.telemetry().await?;
    let watts = |w: f64| if w.is_finite() { json!(w) } else { Value::Null };
    let mut temps: Vec<(String, f64)> = t.temperatures.into_iter().collect();
    temps.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(json!({
        "profile": ppd.active_profile().await?,
        "profiles": ["power-saver", "balanced", "performance"],
        "budget_watts": t.budget_watts,
        "system_watts": watts(t.system_watts),
        "temperatures": temps.into_iter().map(|(zone, c)| json!({"zone": zone, "celsius": c})).collect::<Vec<_>>(),
        "cap_fraction": t.cap_fraction,
        "degraded": t.degraded_reason,
        "status": t.status,
        "board": p1.board().await.unwrap_or_default(),
    }))
}
