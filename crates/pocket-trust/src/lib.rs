//! One framework for everything PocketOS signs: keyrings, model catalogs,
//! model packs and update bundles.
//!
//! Metadata is JSON carried as text inside an [`Envelope`]; each signature is
//! an ed25519 signature over `sha256(domain || kind || 0 || text)`, so the
//! bytes that were signed are the bytes that are parsed and no canonical JSON
//! is needed. A [`Keyring`] names the keys of each [`Role`] and how many of
//! them must sign. [`VersionFloors`] keep accepted versions moving forward
//! across reboots, and [`PayloadVerifier`] checks a payload's length and hash
//! while it streams.

mod envelope;
mod error;
mod floors;
mod keyring;
mod keys;
mod stream;
mod version;

pub use envelope::{Envelope, Signature, Signed};
pub use error::TrustError;
pub use floors::VersionFloors;
pub use keyring::{Keyring, KeyringBody, RoleKeys, KEYRING_FILE};
pub use keys::{KeyId, PublicKey, SecretKey};
pub use stream::PayloadVerifier;
pub use version::Version;

/// The most bytes of a catalog or keyring file a daemon reads, from a
/// server, a USB stick or another daemon's directory alike.
pub const METADATA_LIMIT: u64 = 16 << 20;

use std::time::SystemTime;

/// Who may sign a kind of metadata.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Signs keyrings, including the next keyring on rotation.
    Root,
    /// Signs model catalogs and model packs.
    Models,
    /// Signs update bundles.
    Updates,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Root, Role::Models, Role::Updates];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Root => "root",
            Role::Models => "models",
            Role::Updates => "updates",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = TrustError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "root" => Ok(Role::Root),
            "models" => Ok(Role::Models),
            "updates" => Ok(Role::Updates),
            other => Err(TrustError::UnknownRole(other.to_string())),
        }
    }
}

/// Parses an expiry given either as an RFC 3339 time or as a duration from
/// `now` such as `30d` or `12h`.
pub fn parse_expiry(text: &str, now: SystemTime) -> Result<SystemTime, TrustError> {
    if let Ok(t) = humantime::parse_rfc3339_weak(text) {
        return Ok(t);
    }
    humantime::parse_duration(text)
        .map(|d| now + d)
        .map_err(|_| TrustError::BadExpiry(text.to_string()))
}

/// Formats a time as RFC 3339 in UTC, to the second.
pub fn format_time(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}
