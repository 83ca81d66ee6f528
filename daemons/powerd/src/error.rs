//! Every way powerd fails, with the context a person needs. The bus
//! surfaces (`ppd.rs`, `power1.rs`) turn [`GovernorError`] into their D-Bus
//! errors, once; sysfs problems never reach the bus and become lines in the
//! daemon's status instead.

use std::path::PathBuf;

/// A file under the sysfs root that is missing, unreadable, garbage or
/// refused a write.
#[derive(Debug, thiserror::Error)]
pub enum SysfsError {
    #[error("{}: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", .path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a number: {text:?}", .path.display())]
    NotANumber { path: PathBuf, text: String },
    #[error("{}: not a frequency: {text:?}", .path.display())]
    NotAFrequency { path: PathBuf, text: String },
    #[error("{}: no frequencies", .path.display())]
    NoFrequencies { path: PathBuf },
    /// A profile asks for a governor the kernel does not offer.
    #[error("{device}: governor {governor:?} is not available ({})", .available.join(" "))]
    GovernorUnavailable {
        device: String,
        governor: String,
        available: Vec<String>,
    },
}

/// The settings database (`state.rs`).
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{}: {source}", .dir.display())]
    CreateDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    // redb's errors are boxed: a `TransactionError` alone is 160 bytes or more,
    // and every `Result` that carries this would be that large.
    #[error("state database: {0}")]
    Open(#[source] Box<redb::DatabaseError>),
    #[error("state database: {0}")]
    Transaction(#[source] Box<redb::TransactionError>),
    #[error("state database: {0}")]
    Table(#[source] Box<redb::TableError>),
    #[error("state database: {0}")]
    Storage(#[source] Box<redb::StorageError>),
    #[error("state database: {0}")]
    Commit(#[source] Box<redb::CommitError>),
}

macro_rules! state_from_redb {
    ($($variant:ident($ty:ty)),* $(,)?) => {
        $(
            impl From<$ty> for StateError {
                fn from(e: $ty) -> Self {
                    StateError::$variant(Box::new(e))
                }
            }
        )*
    };
}

state_from_redb!(
    Open(redb::DatabaseError),
    Transaction(redb::TransactionError),
    Table(redb::TableError),
    Storage(redb::StorageError),
    Commit(redb::CommitError),
);

/// A request to the governor that is refused or cannot be kept.
#[derive(Debug, thiserror::Error)]
pub enum GovernorError {
    #[error("no profile {0:?} (power-saver, balanced, performance)")]
    UnknownProfile(String),
    /// Only power-saver and performance can be held.
    #[error("only power-saver or performance can be held, not {0:?}")]
    NotHoldable(String),
    #[error("no hold with cookie {0}")]
    NoSuchHold(u32),
    #[error("a budget of {watts} W is not between {min} and {max} W")]
    BudgetOutOfRange { watts: f64, min: f64, max: f64 },
    /// The change was valid but could not be saved.
    #[error(transparent)]
    State(#[from] StateError),
}
