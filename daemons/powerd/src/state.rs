//! The settings that survive a restart: the chosen profile, the budget and
//! `BatteryAware`, in redb (each change one committed transaction).

use crate::error::StateError;
use redb::{Database, TableDefinition};
use std::path::Path;

const SETTINGS: TableDefinition<&str, &str> = TableDefinition::new("settings");

pub struct Store {
    db: Database,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

impl Store {
    pub fn open(dir: &Path) -> Result<Store, StateError> {
        std::fs::create_dir_all(dir).map_err(|source| StateError::CreateDir {
            dir: dir.to_path_buf(),
            source,
        })?;
        let db = Database::create(dir.join("powerd.redb"))?;
        let txn = db.begin_write()?;
        txn.open_table(SETTINGS)?;
        txn.commit()?;
        Ok(Store { db })
    }

    pub fn get(&self, key: &str) -> Option<String> {
        let txn = self.db.begin_read().ok()?;
        let t = txn.open_table(SETTINGS).ok()?;
        let v = t.get(key).ok()??;
        Some(v.value().to_string())
    }

    pub fn set(&self, key: &str, value: &str) -> Result<(), StateError> {
        let txn = self.db.begin_write()?;
        txn.open_table(SETTINGS)?.insert(key, value)?;
        txn.commit()?;
        Ok(())
    }
}
