//! One job object for every long operation a daemon runs (a model install,
//! a system update): its phase, progress, cancellation and one outcome,
//! and how it is shown on the bus. Each job object serves the common
//! `org.pocketos.Job1` interface and its daemon's own small one ([`Detail`])
//! at one path, and forwards its changes and its completion signal.

use crate::access::{require_admin, Denied};
use pocket_proto::job::Phase;
use std::any::Any;
use std::borrow::Cow;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use zbus::message::Header;
use zbus::object_server::Interface;
use zbus::zvariant::{ObjectPath, OwnedObjectPath};

/// Why a job failed: the short D-Bus error name (`DiskFull`) and a message
/// a person can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub name: String,
    pub message: String,
}

impl Failure {
    pub fn new(name: impl Into<String>, message: impl Into<String>) -> Failure {
        Failure {
            name: name.into(),
            message: message.into(),
        }
    }

    /// The full D-Bus error name, as the bus carries it.
    pub fn bus_name(&self) -> String {
        format!("{}.{}", pocket_proto::ERROR_PREFIX, self.name)
    }
}

/// How a job ended.
pub type Outcome = Result<(), Failure>;

/// One long operation, shared by the daemon that runs it and the bus
/// objects that show it. `D` is what only this kind of job has.
pub struct Job<D: ?Sized = dyn Any + Send + Sync> {
    pub id: u64,
    phase: Mutex<Phase>,
    done: Arc<AtomicU64>,
    total: AtomicU64,
    /// When the rate clock started, and the bytes done then.
    rate_from: Mutex<(Instant, u64)>,
    cancel: CancellationToken,
    outcome: watch::Sender<Option<Outcome>>,
    pub detail: D,
}

impl<D: ?Sized> std::fmt::Debug for Job<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Job({}, {})", self.id, self.phase())
    }
}

impl<D> Job<D> {
    pub fn new(id: u64, phase: Phase, detail: D) -> Job<D> {
        Job {
            id,
            phase: Mutex::new(phase),
            done: Arc::new(AtomicU64::new(0)),
            total: AtomicU64::new(0),
            rate_from: Mutex::new((Instant::now(), 0)),
            cancel: CancellationToken::new(),
            outcome: watch::channel(None).0,
            detail,
        }
    }
}

impl<D: ?Sized> Job<D> {
    pub fn phase(&self) -> Phase {
        *self.phase.lock().expect("not poisoned")
    }

    /// Moves to a phase that is not the end; [`Job::finish`] ends a job.
    pub fn set_phase(&self, phase: Phase) {
        debug_assert!(!phase.is_terminal(), "a job ends through finish()");
        *self.phase.lock().expect("not poisoned") = phase;
    }

    /// Enters `phase` with `done` of `total` bytes already there; the rate
    /// (and so the time left) counts only what is done from here.
    pub fn begin(&self, phase: Phase, done: u64, total: u64) {
        // The phase first: whoever reads the bytes and then the phase never
        // sees this phase's bytes with the phase before it.
        self.set_phase(phase);
        self.done.store(done, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
        *self.rate_from.lock().expect("not poisoned") = (Instant::now(), done);
    }

    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    pub fn set_done(&self, done: u64) {
        self.done.store(done, Ordering::Relaxed);
    }

    pub fn set_total(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
    }

    pub fn add_done(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The progress counter, for a worker that outlives a borrow of the job.
    pub fn done_counter(&self) -> Arc<AtomicU64> {
        self.done.clone()
    }

    /// Seconds left at the rate since [`Job::begin`]; -1 until there is a
    /// rate.
    pub fn eta_seconds(&self) -> i64 {
        let (at, base) = *self.rate_from.lock().expect("not poisoned");
        eta(self.done(), self.total(), base, at.elapsed())
    }

    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Resolves when the job is cancelled.
    pub fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.cancel.cancelled()
    }

    /// The outcome, `None` while the job runs.
    pub fn outcome(&self) -> watch::Receiver<Option<Outcome>> {
        self.outcome.subscribe()
    }

    /// Ends the job. The outcome is set before the terminal phase, so
    /// whoever sees the phase can read why at once.
    pub fn finish(&self, outcome: Outcome) {
        let phase = match outcome {
            Ok(()) => Phase::Done,
            Err(_) => Phase::Failed,
        };
        self.outcome.send_replace(Some(outcome));
        *self.phase.lock().expect("not poisoned") = phase;
    }

    /// The error name and message the bus shows; empty unless it failed.
    fn error(&self) -> (String, String) {
        match &*self.outcome.borrow() {
            Some(Err(f)) => (f.bus_name(), f.message.clone()),
            _ => (String::new(), String::new()),
        }
    }
}

/// Seconds to finish `total` bytes with `done` done, at the rate of the
/// bytes done beyond `base` over `elapsed`; -1 until a rate is known.
fn eta(done: u64, total: u64, base: u64, elapsed: Duration) -> i64 {
    let secs = elapsed.as_secs_f64();
    if done <= base || secs < 0.2 || total == 0 {
        return -1;
    }
    let rate = (done - base) as f64 / secs;
    (total.saturating_sub(done) as f64 / rate).ceil() as i64
}

/// What a daemon adds to its jobs on the bus.
pub trait Detail: Send + Sync + Sized + 'static {
    /// Where the daemon's jobs are (`/org/pocketos/Models1/jobs`).
    const PATH_PREFIX: &'static str;
    /// What cancelling this job is, for a refusal ("cancelling an install").
    const CANCELLING: &'static str;
    /// The daemon's own interface, served beside `org.pocketos.Job1`.
    type Iface: Interface;

    fn iface(job: &Arc<Job<Self>>) -> Self::Iface;

    /// The daemon's main object shows its jobs: one appeared, changed phase
    /// or ended.
    fn owner_changed(conn: &zbus::Connection) -> impl Future<Output = ()> + Send;

    /// The daemon's one completion signal for the job at `path`; the error
    /// name and message are empty when it succeeded.
    fn finished(
        conn: &zbus::Connection,
        job: &Job<Self>,
        path: ObjectPath<'_>,
        error: (&str, &str),
    ) -> impl Future<Output = zbus::Result<()>> + Send;
}

#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.pocketos.Error")]
pub enum JobError {
    #[zbus(error)]
    ZBus(zbus::Error),
    PermissionDenied(String),
}

impl From<Denied> for JobError {
    fn from(e: Denied) -> Self {
        JobError::PermissionDenied(e.0)
    }
}

impl<D: Detail> Job<D> {
    /// The job's object path: `<prefix>/<id>`.
    pub fn path(&self) -> OwnedObjectPath {
        OwnedObjectPath::try_from(format!("{}/{}", D::PATH_PREFIX, self.id))
            .expect("a prefix and a number make a valid path")
    }
}

/// `org.pocketos.Job1` for one job.
pub struct JobObject {
    job: Arc<Job>,
    admin_gid: Option<u32>,
    cancelling: &'static str,
}

#[zbus::interface(name = "org.pocketos.Job1")]
impl JobObject {
    async fn cancel(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<(), JobError> {
        require_admin(conn, &hdr, self.admin_gid, self.cancelling).await?;
        self.job.cancel();
        Ok(())
    }

    #[zbus(property)]
    fn phase(&self) -> String {
        self.job.phase().to_string()
    }

    #[zbus(property)]
    fn bytes_done(&self) -> u64 {
        self.job.done()
    }

    #[zbus(property)]
    fn bytes_total(&self) -> u64 {
        self.job.total()
    }

    #[zbus(property)]
    fn eta_seconds(&self) -> i64 {
        self.job.eta_seconds()
    }

    #[zbus(property)]
    fn error_name(&self) -> String {
        self.job.error().0
    }

    #[zbus(property)]
    fn error_message(&self) -> String {
        self.job.error().1
    }
}

/// How long a finished job's object stays on the bus for late readers.
const KEEP_FINISHED: Duration = Duration::from_secs(300);
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// Serves `job` at its path (once: exporting it again does nothing) and
/// forwards its changes and its end to the bus until it has ended, then
/// keeps it a while for late readers. Returns the path.
pub async fn export<D: Detail>(
    conn: &zbus::Connection,
    job: &Arc<Job<D>>,
    admin_gid: Option<u32>,
) -> zbus::Result<OwnedObjectPath> {
    let (job, path) = (job.clone(), job.path());
    let server = conn.object_server();
    let common = JobObject {
        job: job.clone(),
        admin_gid,
        cancelling: D::CANCELLING,
    };
    if !server.at(&path, common).await? {
        return Ok(path);
    }
    server.at(&path, D::iface(&job)).await?;
    D::owner_changed(conn).await;
    let (conn, exported) = (conn.clone(), path.clone());
    tokio::spawn(async move {
        if let Err(e) = forward(&conn, &job, &path).await {
            tracing::warn!(job = job.id, "progress forwarding stopped: {e}");
        }
        tokio::time::sleep(KEEP_FINISHED).await;
        let server = conn.object_server();
        let _ = server.remove::<D::Iface, _>(&path).await;
        let _ = server.remove::<JobObject, _>(&path).await;
    });
    Ok(exported)
}

/// Emits every property of the daemon's own interface at `path`.
async fn detail_changed<I: Interface>(
    conn: &zbus::Connection,
    path: &OwnedObjectPath,
) -> zbus::Result<()> {
    let server = conn.object_server();
    let iface = server.interface::<_, I>(path).await?;
    let emitter = iface.signal_emitter();
    let all = iface
        .get()
        .await
        .get_all(server, conn, None, emitter)
        .await
        .map_err(zbus::Error::from)?;
    let changed = all
        .iter()
        .map(|(k, v)| (k.as_str(), (**v).clone()))
        .collect();
    zbus::fdo::Properties::properties_changed(emitter, I::name(), changed, Cow::Borrowed(&[])).await
}

/// The order is one for every job: why it failed, then progress, then
/// what only this kind of job has, and the phase last, so that a client
/// that sees a new phase already has everything that came with it.
async fn forward<D: Detail>(
    conn: &zbus::Connection,
    job: &Job<D>,
    path: &OwnedObjectPath,
) -> zbus::Result<()> {
    let iface = conn.object_server().interface::<_, JobObject>(path).await?;
    let mut outcome = job.outcome();
    let (mut last_done, mut last_phase) = (u64::MAX, None);
    loop {
        // The phase before the outcome: `finish` sets the outcome first,
        // so a terminal phase read here always comes with it.
        let phase = job.phase();
        let finished = outcome.borrow_and_update().clone();
        let emitter = iface.signal_emitter();
        {
            let obj = iface.get().await;
            if finished.is_some() {
                obj.error_name_changed(emitter).await?;
                obj.error_message_changed(emitter).await?;
            }
            let done = job.done();
            if done != last_done {
                obj.bytes_done_changed(emitter).await?;
                obj.eta_seconds_changed(emitter).await?;
                last_done = done;
            }
        }
        if last_phase != Some(phase) {
            last_phase = Some(phase);
            detail_changed::<D::Iface>(conn, path).await?;
            let obj = iface.get().await;
            obj.bytes_total_changed(emitter).await?;
            obj.phase_changed(emitter).await?;
            drop(obj);
            D::owner_changed(conn).await;
        }
        if finished.is_some() {
            let (name, message) = job.error();
            return D::finished(conn, job, path.as_ref(), (&name, &message)).await;
        }
        tokio::select! {
            _ = outcome.changed() => {}
            _ = tokio::time::sleep(PROGRESS_EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_time_left_follows_the_rate_since_the_phase_began() {
        let s = Duration::from_secs;
        // No bytes since the start, or too early to tell: unknown.
        assert_eq!(eta(100, 1000, 100, s(5)), -1);
        assert_eq!(eta(200, 1000, 100, Duration::from_millis(100)), -1);
        assert_eq!(eta(200, 0, 0, s(1)), -1);
        // 100 bytes a second from a resumed 100: 800 left is 8 s.
        assert_eq!(eta(200, 1000, 100, s(1)), 8);
        // Partial seconds round up; a finished job has none left.
        assert_eq!(eta(300, 1000, 0, s(1)), 3);
        assert_eq!(eta(1000, 1000, 0, s(1)), 0);
    }

    #[test]
    fn the_outcome_is_there_before_the_terminal_phase() {
        let job = Job::new(7, Phase::Queued, ());
        let rx = job.outcome();
        job.begin(Phase::Downloading, 10, 100);
        assert_eq!(
            (job.phase(), job.done(), job.total()),
            (Phase::Downloading, 10, 100)
        );
        assert_eq!(job.error(), (String::new(), String::new()));
        job.finish(Err(Failure::new("DiskFull", "no room")));
        assert!(rx.has_changed().unwrap());
        assert_eq!(job.phase(), Phase::Failed);
        assert_eq!(
            job.error(),
            ("org.pocketos.Error.DiskFull".into(), "no room".into())
        );
    }

    #[test]
    fn cancelling_is_seen_by_the_worker() {
        let job = Job::new(1, Phase::Writing, "detail");
        assert!(!job.is_cancelled());
        job.cancel();
        assert!(job.is_cancelled());
        assert_eq!(job.detail, "detail");
    }
}
