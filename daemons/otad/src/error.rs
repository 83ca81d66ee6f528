use crate::bootenv::EnvError;
use pocket_ota::BundleError;
use pocket_trust::TrustError;

/// Every way an update operation fails, with the context a person needs.
/// [`UpdateError::name`] is the short D-Bus error name.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Env(#[from] EnvError),
    #[error(
        "bundle version {offered} is older than the running system {running} (downgrade refused)"
    )]
    Downgrade { offered: String, running: String },
    #[error("bundle security version {offered} is below this device's {floor} (refused)")]
    SecurityFloor { offered: u64, floor: u64 },
    #[error("slot {slot} holds security version {offered}, below this device's {floor}: a later system fixed what it lacks, so it is not booted again")]
    SlotBelowFloor {
        slot: String,
        offered: u64,
        floor: u64,
    },
    #[error("bundle payload {payload} of {size} bytes does not fit slot {slot}'s {device} ({capacity} bytes)")]
    TooLarge {
        payload: String,
        size: u64,
        slot: String,
        device: String,
        capacity: u64,
    },
    #[error("bundle carries component {0:?}, which this device does not have")]
    UnknownComponent(String),
    #[error("slot {0:?} does not exist (this device has {1})")]
    NoSuchSlot(String, String),
    #[error("cannot tell which slot is booted: no pocketos.slot= or rauc.slot= in {0}")]
    BootedUnknown(String),
    #[error("an update is already running ({0})")]
    Busy(String),
    #[error("the booted slot {booted} has not passed its health check yet (the last good slot is {last_good}): an install would write over the slot the box falls back to; let the health check pass (pocketctl update mark-good) or boot slot {last_good} first")]
    NotConfirmed { booted: String, last_good: String },
    #[error("slot {0} is not good; rolling back to it would not boot")]
    NotGood(String),
    #[error("no update URL is configured")]
    NoUpdateUrl,
    #[error("{0}")]
    Network(String),
    #[error("install cancelled")]
    Cancelled,
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("the trusted keyring cannot be used: {0}")]
    Keyring(TrustError),
    #[error("state database: {0}")]
    State(String),
    #[error("{0}")]
    InvalidArgument(String),
}

impl UpdateError {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        UpdateError::Io {
            what: what.into(),
            source,
        }
    }

    pub fn state(e: impl std::fmt::Display) -> Self {
        UpdateError::State(e.to_string())
    }

    /// The short D-Bus error name (`org.pocketos.Error.<name>`).
    pub fn name(&self) -> &'static str {
        match self {
            UpdateError::Bundle(b) => match b {
                BundleError::Trust(t) => t.bus_name(),
                BundleError::Incompatible { .. } => "Incompatible",
                BundleError::Io(_) => "Io",
                _ => "Corrupt",
            },
            UpdateError::Env(_) => "Bootloader",
            UpdateError::Downgrade { .. }
            | UpdateError::SecurityFloor { .. }
            | UpdateError::SlotBelowFloor { .. } => "Downgrade",
            UpdateError::TooLarge { .. } => "DiskFull",
            UpdateError::UnknownComponent(_) => "Incompatible",
            UpdateError::NoSuchSlot(..) | UpdateError::InvalidArgument(_) => "InvalidArgument",
            UpdateError::BootedUnknown(_)
            | UpdateError::NotGood(_)
            | UpdateError::NotConfirmed { .. }
            | UpdateError::NoUpdateUrl => "State",
            UpdateError::Busy(_) => "Busy",
            UpdateError::Network(_) => "Network",
            UpdateError::Cancelled => "Cancelled",
            UpdateError::Io { .. } => "Io",
            UpdateError::Keyring(_) => "Untrusted",
            UpdateError::State(_) => "State",
        }
    }

    /// Whether the same install can pick up where it stopped.
    pub fn resumable(&self) -> bool {
        matches!(self, UpdateError::Network(_))
    }
}

impl From<TrustError> for UpdateError {
    fn from(t: TrustError) -> Self {
        UpdateError::Bundle(BundleError::Trust(t))
    }
}
