//! API keys for the LLM API: clients outside loopback send one as
//! `Authorization: Bearer <key>`. A key is shown once, when it is made;
//! the box keeps only its SHA-256 (a key is 32 random bytes, so a fast
//! hash is enough) in `<data_dir>/api-keys.json`, mode 0600, owned by the
//! data directory's owner. The dashboard and `pocketctl api-key` both
//! change the file; webd reads it again whenever it changed.

use crate::auth::{random_token, same_secret, write_private};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("a key's name is 1 to {MAX_NAME} printable characters")]
    BadName,
    #[error("the box keeps at most {MAX_KEYS} API keys; revoke one first")]
    TooMany,
    #[error("no API key {0:?}")]
    NotFound(String),
    #[error("cannot {0} {1}: {2}")]
    Io(&'static str, PathBuf, std::io::Error),
    #[error("{0} does not parse: {1}")]
    Corrupt(PathBuf, serde_json::Error),
}

type KeyResult<T> = Result<T, KeyError>;

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
    keys: Mutex<Loaded>,
}

/// The keys as last read, and the file's state then.
struct Loaded {
    keys: Vec<KeyInfo>,
    stamp: Option<(std::time::SystemTime, u64)>,
}

fn digest(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

impl ApiKeys {
    pub fn open(data_dir: &std::path::Path) -> KeyResult<ApiKeys> {
        let keys = ApiKeys {
            path: data_dir.join("api-keys.json"),
            keys: Mutex::new(Loaded {
                keys: Vec::new(),
                stamp: None,
            }),
        };
        drop(keys.current()?);
        Ok(keys)
    }

    fn stamp(&self) -> KeyResult<Option<(std::time::SystemTime, u64)>> {
        let io = |e| KeyError::Io("read", self.path.clone(), e);
        match std::fs::metadata(&self.path) {
            Ok(m) => Ok(Some((m.modified().map_err(io)?, m.len()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(e)),
        }
    }

    /// The keys, read again when the file changed since the last read.
    fn current(&self) -> KeyResult<std::sync::MutexGuard<'_, Loaded>> {
        let mut loaded = self.keys.lock().unwrap();
        let stamp = self.stamp()?;
        if stamp != loaded.stamp {
            loaded.keys = match std::fs::read(&self.path) {
                Ok(bytes) => serde_json::from_slice(&bytes)
                    .map_err(|e| KeyError::Corrupt(self.path.clone(), e))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(KeyError::Io("read", self.path.clone(), e)),
            };
            loaded.stamp = stamp;
        }
        Ok(loaded)
    }

    pub fn list(&self) -> KeyResult<Vec<KeyInfo>> {
        Ok(self.current()?.keys.iter().map(KeyInfo::public).collect())
    }

    /// Makes a key named `name`; returns its listing and the key, which is
    /// not kept.
    pub fn create(&self, name: &str) -> KeyResult<(KeyInfo, String)> {
        let name = name.trim();
        if name.is_empty() || name.chars().count() > MAX_NAME || name.chars().any(char::is_control)
        {
            return Err(KeyError::BadName);
        }
        let key = format!("{PREFIX}{}", random_token());
        let info = KeyInfo {
            id: random_token()[..12].to_string(),
            name: name.to_string(),
            created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            sha256: digest(&key),
        };
        let mut loaded = self.current()?;
        if loaded.keys.len() >= MAX_KEYS {
            return Err(KeyError::TooMany);
        }
        let mut next = loaded.keys.clone();
        next.push(info.clone());
        self.store(&mut loaded, next)?;
        Ok((info.public(), key))
    }

    pub fn revoke(&self, id: &str) -> KeyResult<()> {
        let mut loaded = self.current()?;
        let next: Vec<KeyInfo> = loaded.keys.iter().filter(|k| k.id != id).cloned().collect();
        if next.len() == loaded.keys.len() {
            return Err(KeyError::NotFound(id.to_string()));
        }
        self.store(&mut loaded, next)
    }

    /// Whether `key` is one of the box's keys.
    pub fn check(&self, key: &str) -> bool {
        if !key.starts_with(PREFIX) {
            return false;
        }
        let d = digest(key);
        let Ok(loaded) = self.current() else {
            // A file that cannot be read admits no one.
            return false;
        };
        // Every stored key is compared, so the time says nothing of which.
        loaded
            .keys
            .iter()
            .fold(false, |found, k| same_secret(&k.sha256, &d) | found)
    }

    /// Writes `keys` (atomically, owned like its directory, so that webd
    /// can read what root wrote) and makes them current.
    fn store(&self, loaded: &mut Loaded, keys: Vec<KeyInfo>) -> KeyResult<()> {
        use std::os::unix::fs::MetadataExt;
        let io = |e| KeyError::Io("store", self.path.clone(), e);
        let text = serde_json::to_vec_pretty(&keys).expect("keys serialize");
        write_private(&self.path, &text).map_err(io)?;
        if let Some(dir) = self.path.parent() {
            let owner = std::fs::metadata(dir).map_err(io)?;
            let file = std::fs::metadata(&self.path).map_err(io)?;
            if (file.uid(), file.gid()) != (owner.uid(), owner.gid()) {
                std::os::unix::fs::chown(&self.path, Some(owner.uid()), Some(owner.gid()))
                    .map_err(io)?;
            }
        }
        loaded.keys = keys;
        loaded.stamp = self.stamp()?;
        Ok(())
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
        assert_eq!(keys.list().unwrap(), vec![info.clone()]);
        assert!(
            keys.list().unwrap()[0].sha256.is_empty(),
            "listings carry no hash"
        );
        // Kept across a restart.
        let again = ApiKeys::open(dir.path()).unwrap();
        assert!(again.check(&key));
        again.revoke(&info.id).unwrap();
        assert!(!again.check(&key));
        assert!(matches!(again.revoke(&info.id), Err(KeyError::NotFound(_))));
        // The first handle sees the other's change.
        assert!(!keys.check(&key));
        assert!(!ApiKeys::open(dir.path()).unwrap().check(&key));
        assert!(keys.create("").is_err());
        assert!(keys.create("a\nb").is_err());
    }
}
