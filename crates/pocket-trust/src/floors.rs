use crate::{Envelope, Keyring, TrustError, Version};
use redb::{Database, ReadableTable, TableDefinition, WriteTransaction};
use std::sync::Arc;

/// subject -> (highest accepted version, sha256 of the metadata accepted at
/// that version)
const FLOORS: TableDefinition<&str, (&str, &str)> = TableDefinition::new("trust_floors");
/// "current" -> the newest keyring accepted by rotation
const KEYRINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("trust_keyring");

/// Forward-only version floors, kept in the daemon's redb database so that
/// they survive reboots and power cuts: metadata older than what was once
/// accepted is a downgrade or a replay and is refused.
#[derive(Clone)]
pub struct VersionFloors {
    db: Arc<Database>,
}

impl std::fmt::Debug for VersionFloors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VersionFloors")
    }
}

fn store_err(e: impl std::fmt::Display) -> TrustError {
    TrustError::Store(e.to_string())
}

impl VersionFloors {
    pub fn new(db: Arc<Database>) -> Result<Self, TrustError> {
        let txn = db.begin_write().map_err(store_err)?;
        txn.open_table(FLOORS).map_err(store_err)?;
        txn.open_table(KEYRINGS).map_err(store_err)?;
        txn.commit().map_err(store_err)?;
        Ok(VersionFloors { db })
    }

    pub fn floor(&self, subject: &str) -> Result<Option<(Version, String)>, TrustError> {
        let txn = self.db.begin_read().map_err(store_err)?;
        let table = txn.open_table(FLOORS).map_err(store_err)?;
        let Some(v) = table.get(subject).map_err(store_err)? else {
            return Ok(None);
        };
        let (version, digest) = v.value();
        Ok(Some((version.parse()?, digest.to_string())))
    }

    /// Refuses `version` of `subject` when it is older than the floor, or
    /// equal to it with other contents.
    pub fn check(&self, subject: &str, version: &Version, digest: &str) -> Result<(), TrustError> {
        match self.floor(subject)? {
            Some((floor, _)) if *version < floor => Err(TrustError::Downgrade {
                what: subject.to_string(),
                offered: version.to_string(),
                floor: floor.to_string(),
            }),
            Some((floor, d)) if *version == floor && d != digest => {
                Err(TrustError::VersionReused {
                    what: subject.to_string(),
                    version: version.to_string(),
                })
            }
            _ => Ok(()),
        }
    }

    /// Raises the floor inside the caller's transaction, so that it commits
    /// together with whatever was accepted.
    pub fn raise_in(
        txn: &WriteTransaction,
        subject: &str,
        version: &Version,
        digest: &str,
    ) -> Result<(), TrustError> {
        let mut table = txn.open_table(FLOORS).map_err(store_err)?;
        let current = table
            .get(subject)
            .map_err(store_err)?
            .map(|v| v.value().0.to_string());
        if let Some(current) = current {
            if current.parse::<Version>()? >= *version {
                return Ok(());
            }
        }
        let v = version.to_string();
        table
            .insert(subject, (v.as_str(), digest))
            .map_err(store_err)?;
        Ok(())
    }

    /// Checks and raises in one committed transaction (none when the same
    /// metadata was accepted before).
    pub fn accept(&self, subject: &str, version: &Version, digest: &str) -> Result<(), TrustError> {
        self.check(subject, version, digest)?;
        if let Some((floor, d)) = self.floor(subject)? {
            if floor == *version && d == digest {
                return Ok(());
            }
        }
        let txn = self.db.begin_write().map_err(store_err)?;
        Self::raise_in(&txn, subject, version, digest)?;
        txn.commit().map_err(store_err)
    }

    /// The keyring in force: the newest of the one on the read-only rootfs
    /// and the last one accepted by rotation.
    pub fn current_keyring(&self, base: Keyring) -> Result<Keyring, TrustError> {
        let txn = self.db.begin_read().map_err(store_err)?;
        let table = txn.open_table(KEYRINGS).map_err(store_err)?;
        let Some(stored) = table.get("current").map_err(store_err)? else {
            return Ok(base);
        };
        let env = Envelope::from_bytes("stored keyring", stored.value())?;
        let offered = env.peek::<serde_json::Value>()?.version;
        if offered <= *base.version() {
            return Ok(base); // the rootfs (after an update) carries a newer one
        }
        // The stored keyring was chain-verified when it was accepted. If it
        // no longer checks out (expired, damaged), falling back to the older
        // rootfs keyring would bring back keys the rotation revoked: refuse.
        Keyring::anchor(env)
    }

    /// Rotates to `next` when it chains from `current`, and persists it.
    pub fn rotate(&self, current: &Keyring, next: Envelope) -> Result<Keyring, TrustError> {
        let keyring = current.rotate(next)?;
        let txn = self.db.begin_write().map_err(store_err)?;
        {
            let mut table = txn.open_table(KEYRINGS).map_err(store_err)?;
            table
                .insert("current", keyring.envelope().to_bytes().as_slice())
                .map_err(store_err)?;
        }
        txn.commit().map_err(store_err)?;
        Ok(keyring)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        s.parse().unwrap()
    }

    #[test]
    fn floors_move_forward_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            let floors = VersionFloors::new(Arc::new(Database::create(&path).unwrap())).unwrap();
            floors.accept("catalog:a", &v("5"), "aa").unwrap();
            floors.accept("catalog:a", &v("5"), "aa").unwrap();
            assert!(matches!(
                floors.accept("catalog:a", &v("5"), "bb"),
                Err(TrustError::VersionReused { .. })
            ));
            floors.accept("catalog:a", &v("6"), "cc").unwrap();
        }
        let floors = VersionFloors::new(Arc::new(Database::create(&path).unwrap())).unwrap();
        assert!(matches!(
            floors.check("catalog:a", &v("5"), "aa"),
            Err(TrustError::Downgrade { .. })
        ));
        assert_eq!(floors.floor("catalog:a").unwrap().unwrap().0, v("6"));
        assert!(floors.check("catalog:other", &v("1"), "x").is_ok());
    }
}
