use pocket_models::FormatError;
use pocket_trust::TrustError;
use std::path::PathBuf;

/// Everything that can go wrong in the model manager, each with the D-Bus
/// error name a client sees (`org.pocketos.Error.<name>`).
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("no model named {0:?} in any catalog")]
    NotInCatalog(String),
    #[error("model {0:?} is not installed")]
    NotInstalled(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Untrusted(String),
    #[error("{0}")]
    Downgrade(String),
    #[error("{0}")]
    Expired(String),
    #[error("{0}")]
    Corrupt(String),
    #[error("not enough space on {path}: {needed} bytes needed, {available} available")]
    DiskFull {
        path: PathBuf,
        needed: u64,
        available: u64,
    },
    #[error("{0}")]
    InsufficientMemory(String),
    #[error("{0}")]
    Network(String),
    #[error("the partial download of {0} was damaged; fetching that file again")]
    ResumeDamaged(String),
    #[error("install of {0:?} was cancelled")]
    Cancelled(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("state database: {0}")]
    State(String),
}

impl ModelError {
    /// The short D-Bus error name.
    pub fn name(&self) -> &'static str {
        match self {
            ModelError::NotInCatalog(_) | ModelError::NotInstalled(_) => "NotFound",
            ModelError::PermissionDenied(_) => "PermissionDenied",
            ModelError::Untrusted(_) => "Untrusted",
            ModelError::Downgrade(_) => "Downgrade",
            ModelError::Expired(_) => "Expired",
            ModelError::Corrupt(_) => "Corrupt",
            ModelError::DiskFull { .. } => "DiskFull",
            ModelError::InsufficientMemory(_) => "InsufficientMemory",
            ModelError::Network(_) | ModelError::ResumeDamaged(_) => "Network",
            ModelError::Cancelled(_) => "Cancelled",
            ModelError::InvalidArgument(_) => "InvalidArgument",
            ModelError::Io { .. } => "Io",
            ModelError::State(_) => "State",
        }
    }

    /// An I/O error, turned into `DiskFull` when the disk is full.
    pub fn io(context: impl Into<String>, path: &std::path::Path, source: std::io::Error) -> Self {
        if source.raw_os_error() == Some(nix::libc::ENOSPC) {
            let available = crate::store::free_bytes(path).unwrap_or(0);
            return ModelError::DiskFull {
                path: path.to_path_buf(),
                needed: 0,
                available,
            };
        }
        ModelError::Io {
            context: context.into(),
            source,
        }
    }

    pub fn state(e: impl std::fmt::Display) -> Self {
        ModelError::State(e.to_string())
    }

    /// Whether the partial download should be kept for a later resume.
    pub fn keeps_partial(&self) -> bool {
        matches!(self, ModelError::Network(_) | ModelError::ResumeDamaged(_))
    }
}

impl From<TrustError> for ModelError {
    fn from(e: TrustError) -> Self {
        let msg = e.to_string();
        match e {
            TrustError::Downgrade { .. } | TrustError::VersionReused { .. } => {
                ModelError::Downgrade(msg)
            }
            TrustError::Expired { .. } => ModelError::Expired(msg),
            TrustError::Truncated { .. }
            | TrustError::Oversized { .. }
            | TrustError::HashMismatch { .. } => ModelError::Corrupt(msg),
            TrustError::Read { .. } | TrustError::Write { .. } | TrustError::Store(_) => {
                ModelError::State(msg)
            }
            _ => ModelError::Untrusted(msg),
        }
    }
}

impl From<FormatError> for ModelError {
    fn from(e: FormatError) -> Self {
        match e {
            FormatError::Trust(t) => t.into(),
            FormatError::Io(source) => ModelError::Io {
                context: "reading the pack".into(),
                source,
            },
            FormatError::CatalogMismatch(_) => ModelError::Untrusted(e.to_string()),
            FormatError::BadMagic | FormatError::HeaderTooLarge(_) | FormatError::Invalid(_) => {
                ModelError::Corrupt(e.to_string())
            }
        }
    }
}

impl From<redb::Error> for ModelError {
    fn from(e: redb::Error) -> Self {
        ModelError::state(e)
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for ModelError {
            fn from(e: $t) -> Self {
                ModelError::state(e)
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);
