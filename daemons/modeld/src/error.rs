use crate::install::human;
use pocket_models::FormatError;
use pocket_trust::TrustError;
use std::path::PathBuf;

/// Everything that can go wrong in the model manager, with the context a
/// person needs; [`ModelError::name`] is the D-Bus error name a client sees
/// (`org.pocketos.Error.<name>`).
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("no model named {name:?} in any catalog")]
    NotInCatalog { name: String },
    #[error("no model named {name:?} in any usable catalog; refused: {}", .problems.join("; "))]
    CatalogRefused { name: String, problems: Vec<String> },
    #[error("no usable catalog: {}", .problems.join("; "))]
    NoUsableCatalog { problems: Vec<String> },
    #[error("{place} has no {file}")]
    NoCatalog { place: String, file: &'static str },
    #[error("model {name:?} is not installed")]
    NotInstalled { name: String },
    #[error("model {name:?} is being installed; cancel the install first")]
    Installing { name: String },
    #[error("no usable keyring in {}", .dir.display())]
    NoKeyring { dir: PathBuf },
    #[error(transparent)]
    Trust(#[from] TrustError),
    #[error(transparent)]
    Format(FormatError),
    #[error("{what} is larger than {limit} bytes")]
    TooLarge { what: String, limit: u64 },
    #[error(
        "{what} is {actual} bytes but the signed catalog says {signed} (truncated or tampered)"
    )]
    WrongSize {
        what: String,
        actual: u64,
        signed: u64,
    },
    #[error("file {file:?} of model {model:?} is missing from the store")]
    MissingBlob { model: String, file: String },
    #[error("not enough space on {path}: {needed} bytes needed, {available} available")]
    DiskFull {
        path: PathBuf,
        needed: u64,
        available: u64,
    },
    #[error(
        "model {name:?} needs {} of memory but this box has {}",
        human(*.needed),
        human(*.total)
    )]
    InsufficientMemory {
        name: String,
        needed: u64,
        total: u64,
    },
    #[error("{url}: {}", chain(.source))]
    Http { url: String, source: reqwest::Error },
    #[error("cannot set up the HTTP client: {0}")]
    HttpClient(#[source] reqwest::Error),
    #[error("{url} does not support resuming (HTTP Range)")]
    NoRange { url: String },
    #[error("connection closed at byte {at} of {size}")]
    ClosedEarly { at: u64, size: u64 },
    #[error("the partial download of {file} was damaged; fetching that file again")]
    ResumeDamaged { file: String },
    #[error("install of {name:?} was cancelled")]
    Cancelled { name: String },
    #[error("catalog {text:?}: {source}")]
    BadCatalogUrl { text: String, source: UrlError },
    #[error("{rel:?}: {source}")]
    BadPath { rel: String, source: UrlError },
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("state database: {0}")]
    Store(#[source] Box<redb::Error>),
    #[error("state database record: {0}")]
    Record(#[from] serde_json::Error),
    #[error("{what} failed: {source}")]
    Worker {
        what: &'static str,
        source: tokio::task::JoinError,
    },
}

/// Why a URL does not parse.
pub type UrlError = <reqwest::Url as std::str::FromStr>::Err;

/// An error and every error under it, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    msg
}

impl ModelError {
    /// The short D-Bus error name.
    pub fn name(&self) -> &'static str {
        use ModelError::*;
        match self {
            NotInCatalog { .. } | NotInstalled { .. } => "NotFound",
            CatalogRefused { .. } | NoUsableCatalog { .. } | NoKeyring { .. } => "Untrusted",
            Trust(t) => t.bus_name(),
            Format(FormatError::CatalogMismatch(_)) => "Untrusted",
            Format(_) | TooLarge { .. } | WrongSize { .. } | MissingBlob { .. } => "Corrupt",
            DiskFull { .. } => "DiskFull",
            InsufficientMemory { .. } => "InsufficientMemory",
            NoCatalog { .. }
            | Http { .. }
            | HttpClient(_)
            | NoRange { .. }
            | ClosedEarly { .. }
            | ResumeDamaged { .. } => "Network",
            Cancelled { .. } => "Cancelled",
            Installing { .. } | BadCatalogUrl { .. } | BadPath { .. } => "InvalidArgument",
            Io { .. } => "Io",
            Store(_) | Record(_) | Worker { .. } => "State",
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

    /// Whether the partial download should be kept for a later resume.
    pub fn keeps_partial(&self) -> bool {
        self.name() == "Network"
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
            e => ModelError::Format(e),
        }
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for ModelError {
            fn from(e: $t) -> Self {
                ModelError::Store(Box::new(e.into()))
            }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_has_the_bus_name_a_client_acts_on() {
        let name = |s: &str| s.to_string();
        let cases: Vec<(ModelError, &str)> = vec![
            (ModelError::NotInCatalog { name: name("m") }, "NotFound"),
            (ModelError::NotInstalled { name: name("m") }, "NotFound"),
            (
                ModelError::CatalogRefused {
                    name: name("m"),
                    problems: vec![name("bad signature")],
                },
                "Untrusted",
            ),
            (
                TrustError::Downgrade {
                    what: name("model:m"),
                    offered: name("1"),
                    floor: name("2"),
                }
                .into(),
                "Downgrade",
            ),
            (FormatError::BadMagic.into(), "Corrupt"),
            (
                FormatError::CatalogMismatch(name("size")).into(),
                "Untrusted",
            ),
            (ModelError::ClosedEarly { at: 1, size: 2 }, "Network"),
            (ModelError::ResumeDamaged { file: name("w") }, "Network"),
            (ModelError::Cancelled { name: name("m") }, "Cancelled"),
            (
                ModelError::Installing { name: name("m") },
                "InvalidArgument",
            ),
            (
                ModelError::MissingBlob {
                    model: name("m"),
                    file: name("w"),
                },
                "Corrupt",
            ),
        ];
        for (e, want) in cases {
            assert_eq!(e.name(), want, "{e}");
        }
        // The pack's own I/O is an I/O error with its context, not a
        // format error.
        let io: ModelError = FormatError::Io(std::io::Error::other("gone")).into();
        assert_eq!(
            (io.name(), io.to_string().as_str()),
            ("Io", "reading the pack: gone")
        );
    }

    #[test]
    fn only_network_failures_keep_the_partial_download() {
        assert!(ModelError::ClosedEarly { at: 1, size: 2 }.keeps_partial());
        assert!(ModelError::ResumeDamaged { file: "w".into() }.keeps_partial());
        assert!(!ModelError::Cancelled { name: "m".into() }.keeps_partial());
        assert!(!ModelError::from(FormatError::BadMagic).keeps_partial());
    }

    #[test]
    fn messages_carry_the_context() {
        let e = ModelError::InsufficientMemory {
            name: "big".into(),
            needed: 3 << 30,
            total: 2 << 30,
        };
        assert_eq!(
            e.to_string(),
            "model \"big\" needs 3.0 GiB of memory but this box has 2.0 GiB"
        );
        let e = ModelError::NoUsableCatalog {
            problems: vec!["a: expired".into(), "b: bad signature".into()],
        };
        assert_eq!(
            e.to_string(),
            "no usable catalog: a: expired; b: bad signature"
        );
    }
}
