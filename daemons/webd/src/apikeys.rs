//! API keys for the LLM API: clients outside loopback send one as
//! `Authorization: Bearer <key>`. A key is shown once, when it is made;
//! the box keeps only its SHA-256 (a key is 32 random bytes, so a fast
//! hash is enough) in `<data_dir>/api-keys.json`, mode 0600.

use crate::auth::{random_token, same_secret, write_private};
use crate::error::{ApiError, ApiResult};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::sync::Mutex;

/// Every key starts with this, so that one pasted in the wrong place is
/// recognisable.
const PREFIX: &str = "pk-";
/// Most keys kept.
const MAX_KEYS: usize = 256;
/// Longest key name, in characters.
const MAX_NAME: usize = 64;

/// A key as it is stored and listed: never the key itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KeyInfo {
    pub id: String,
    pub name: String,
    pub created: String,
    /// SHA-256 of the key, hex.
    #[serde(skip_serializing_if = "String::is_empty", default)]
    sha256: String,
}

impl KeyInfo {
    /// The listing a person sees.
    pub fn public(&self) -> KeyInfo {
        KeyInfo {
            sha256: String::new(),
            ..self.clone()
        }
    }
}

pub struct ApiKeys {
    path: PathBuf,
    keys: Mutex<Vec<KeyInfo>>,
}

fn digest(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

fn io_error(what: &str, e: std::io::Error) -> ApiError {
    ApiError::new(
        StatusCode::INSUFFICIENT_STORAGE,
        "Io",
        format!("cannot {what} the API keys: {e}"),
    )
}

impl ApiKeys {
    pub fn open(data_dir: &std::path::Path) -> anyhow::Result<ApiKeys> {
        let path = data_dir.join("api-keys.json");
        let keys = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| anyhow::anyhow!("{} does not parse: {e}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => anyhow::bail!("cannot read {}: {e}", path.display()),
        };
        Ok(ApiKeys {
            path,
            keys: Mutex::new(keys),
        })
    }

    pub fn list(&self) -> Vec<KeyInfo> {
        self.keys
            .lock()
            .unwrap()
            .iter()
            .map(KeyInfo::public)
            .collect()
    }

    /// Makes a key named `name`; returns its listing and the key, which is
    /// not kept.
    pub fn create(&self, name: &str) -> ApiResult<(KeyInfo, String)> {
        let name = name.trim();
        if name.is_empty() || name.chars().count() > MAX_NAME || name.chars().any(char::is_control)
        {
            return Err(ApiError::bad_request(format!(
                "a key's name is 1 to {MAX_NAME} printable characters"
            )));
        }
        let key = format!("{PREFIX}{}", random_token());
        let info = KeyInfo {
            id: random_token()[..12].to_string(),
            name: name.to_string(),
            created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            sha256: digest(&key),
        };
        let mut keys = self.keys.lock().unwrap();
        if keys.len() >= MAX_KEYS {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "TooMany",
                format!("the box keeps at most {MAX_KEYS} API keys; revoke one first"),
            ));
        }
        let mut next = keys.clone();
        next.push(info.clone());
        self.store(&next)?;
        *keys = next;
        Ok((info.public(), key))
    }

    pub fn revoke(&self, id: &str) -> ApiResult<()> {
        let mut keys = self.keys.lock().unwrap();
        let next: Vec<KeyInfo> = keys.iter().filter(|k| k.id != id).cloned().collect();
        if next.len() == keys.len() {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("no API key {id:?}"),
            ));
        }
        self.store(&next)?;
        *keys = next;
        Ok(())
    }

    /// Whether `key` is one of the box's keys.
    pub fn check(&self, key: &str) -> bool {
        if !key.starts_with(PREFIX) {
            return false;
        }
        let d = digest(key);
        // Every stored key is compared, so the time says nothing of which.
        self.keys
            .lock()
            .unwrap()
            .iter()
            .fold(false, |found, k| same_secret(&k.sha256, &d) | found)
    }

    fn store(&self, keys: &[KeyInfo]) -> ApiResult<()> {
        let text = serde_json::to_vec_pretty(keys).map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal", e.to_string())
        })?;
        write_private(&self.path, &text).map_err(|e| io_error("store", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_made_checked_kept_hashed_and_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let keys = ApiKeys::open(dir.path()).unwrap();
        let (info, key) = keys.create("laptop").unwrap();
        assert!(key.starts_with(PREFIX) && key.len() == PREFIX.len() + 64);
        assert!(keys.check(&key));
        assert!(!keys.check(&key[..key.len() - 1]));
        assert!(!keys.check(""));
        let stored = std::fs::read_to_string(dir.path().join("api-keys.json")).unwrap();
        assert!(!stored.contains(&key), "only the hash is kept");
        assert!(stored.contains(&digest(&key)));
        assert_eq!(keys.list(), vec![info.clone()]);
        assert!(keys.list()[0].sha256.is_empty(), "listings carry no hash");
        // Kept across a restart.
        let again = ApiKeys::open(dir.path()).unwrap();
        assert!(again.check(&key));
        again.revoke(&info.id).unwrap();
        assert!(!again.check(&key));
        assert_eq!(again.revoke(&info.id).unwrap_err().name, "NotFound");
        assert!(!ApiKeys::open(dir.path()).unwrap().check(&key));
        assert!(keys.create("").is_err());
        assert!(keys.create("a\nb").is_err());
    }
}
