//! `org.pocketos.Job1`: what every long operation (a model install, a
//! system update) shows on the bus, whoever runs it. Each job object also
//! carries its daemon's own small interface (`org.pocketos.Models1.Job`,
//! `org.pocketos.Update1.Job`) for what only that kind of job has.

use std::fmt;
use std::str::FromStr;

pub const INTERFACE: &str = "org.pocketos.Job1";

/// Where a job is. On the bus it is the lower-case word (`downloading`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Accepted, waiting for its turn.
    Queued,
    /// Checking signatures and metadata before anything is written.
    Verifying,
    Downloading,
    /// Writing an image into its slot.
    Writing,
    /// Checking what was written and making it visible.
    Publishing,
    /// Updating the boot environment.
    Finishing,
    Done,
    Failed,
}

impl Phase {
    pub const ALL: [Phase; 8] = [
        Phase::Queued,
        Phase::Verifying,
        Phase::Downloading,
        Phase::Writing,
        Phase::Publishing,
        Phase::Finishing,
        Phase::Done,
        Phase::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Queued => "queued",
            Phase::Verifying => "verifying",
            Phase::Downloading => "downloading",
            Phase::Writing => "writing",
            Phase::Publishing => "publishing",
            Phase::Finishing => "finishing",
            Phase::Done => "done",
            Phase::Failed => "failed",
        }
    }

    /// Whether the job has ended (and its outcome is set).
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Done | Phase::Failed)
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A phase word no daemon sends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown job phase {0:?}")]
pub struct UnknownPhase(pub String);

impl FromStr for Phase {
    type Err = UnknownPhase;

    fn from_str(s: &str) -> Result<Phase, UnknownPhase> {
        Phase::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| UnknownPhase(s.to_string()))
    }
}

#[zbus::proxy(interface = "org.pocketos.Job1")]
pub trait Job1 {
    /// Stops the job; it ends `failed` with `org.pocketos.Error.Cancelled`.
    fn cancel(&self) -> zbus::Result<()>;
    /// A [`Phase`] word.
    #[zbus(property)]
    fn phase(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn bytes_done(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn bytes_total(&self) -> zbus::Result<u64>;
    /// Seconds left at the current rate; -1 when not known yet.
    #[zbus(property)]
    fn eta_seconds(&self) -> zbus::Result<i64>;
    /// Empty until the job fails.
    #[zbus(property)]
    fn error_name(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn error_message(&self) -> zbus::Result<String>;
}

impl Job1Proxy<'_> {
    /// The phase, read as a [`Phase`]; an unknown word is a protocol error.
    pub async fn current_phase(&self) -> zbus::Result<Phase> {
        self.phase()
            .await?
            .parse()
            .map_err(|e: UnknownPhase| zbus::Error::Failure(e.to_string()))
    }
}

/// A proxy for the job at `path` of the daemon `service` that reads every
/// property fresh (see [`crate::fresh_proxy`]).
pub async fn proxy(
    conn: &zbus::Connection,
    service: &'static str,
    path: &zbus::zvariant::OwnedObjectPath,
) -> zbus::Result<Job1Proxy<'static>> {
    Job1Proxy::builder(conn)
        .destination(service)?
        .path(path.clone())?
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_read_back_as_they_are_written() {
        for p in Phase::ALL {
            assert_eq!(p.as_str().parse::<Phase>(), Ok(p));
        }
        assert_eq!(
            "Downloading".parse::<Phase>(),
            Err(UnknownPhase("Downloading".into()))
        );
        let terminal: Vec<_> = Phase::ALL.into_iter().filter(|p| p.is_terminal()).collect();
        assert_eq!(terminal, [Phase::Done, Phase::Failed]);
    }
}
