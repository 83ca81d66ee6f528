use std::path::PathBuf;

/// Every reason a piece of signed material is refused. Messages are written
/// for the person who has to act on them.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} is not valid: {detail}")]
    Malformed { what: String, detail: String },
    #[error("{kind} metadata is signed by {valid} trusted {role} key(s) but needs {threshold}")]
    Threshold {
        kind: String,
        role: String,
        valid: usize,
        threshold: usize,
    },
    #[error("expected {expected} metadata but found {found}")]
    WrongKind { expected: String, found: String },
    #[error("{kind} metadata expired at {expires}; this box's clock says {now}: if the clock is wrong, set it and try again, otherwise the publisher has to sign it anew")]
    Expired {
        kind: String,
        expires: String,
        now: String,
    },
    #[error("{what} version {offered} is older than the accepted version {floor} (downgrade or replay refused)")]
    Downgrade {
        what: String,
        offered: String,
        floor: String,
    },
    #[error(
        "{what} version {version} was already accepted with different contents (replay refused)"
    )]
    VersionReused { what: String, version: String },
    #[error("payload {what} is truncated: {got} of {expected} bytes")]
    Truncated {
        what: String,
        got: u64,
        expected: u64,
    },
    #[error("payload {what} is larger than its signed size of {expected} bytes")]
    Oversized { what: String, expected: u64 },
    #[error("payload {what} does not match its signed sha256 (tampered or corrupt)")]
    HashMismatch { what: String },
    #[error("unknown role {0:?} (expected root, models or updates)")]
    UnknownRole(String),
    #[error("cannot understand expiry {0:?}: give an RFC 3339 time or a duration such as 30d")]
    BadExpiry(String),
    #[error("version {0:?} is not a dotted number such as 1.2.0")]
    BadVersion(String),
    #[error("state database: {0}")]
    Store(String),
}

impl TrustError {
    /// The short `org.pocketos.Error.<name>` a daemon answers with.
    pub fn bus_name(&self) -> &'static str {
        match self {
            TrustError::Expired { .. } => "Expired",
            TrustError::Downgrade { .. } | TrustError::VersionReused { .. } => "Downgrade",
            TrustError::Truncated { .. }
            | TrustError::Oversized { .. }
            | TrustError::HashMismatch { .. } => "Corrupt",
            TrustError::Read { .. } | TrustError::Write { .. } => "Io",
            TrustError::Store(_) => "State",
            _ => "Untrusted",
        }
    }

    pub(crate) fn malformed(what: impl Into<String>, detail: impl ToString) -> Self {
        TrustError::Malformed {
            what: what.into(),
            detail: detail.to_string(),
        }
    }
}
