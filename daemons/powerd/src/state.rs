//! The settings that survive a restart: the chosen profile, the budget and
//! `BatteryAware`, in redb (each change one committed transaction).

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

fn err(e: impl std::fmt::Display) -> String {
    format!("state database: {e}")
}

impl Store {
    pub fn open(dir: &Path) -> Result<Store, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let db = Database::create(dir.join("powerd.redb")).map_err(err)?;
        let txn = db.begin_write().map_err(err)?;
        txn.open_table(SETTINGS).map_err(err)?;
        txn.commit().map_err(err)?;
        Ok(Store { db })
    }

    pub fn get(&self, key: &str) -> Option<String> {
        let txn = self.db.begin_read().ok()?;
        let t = txn.open_table(SETTINGS).ok()?;
        let v = t.get(key).ok()??;
        Some(v.value().to_string())
    }

    pub fn set(&self, key: &str, value: &str) -> Result<(), String> {
        let txn = self.db.begin_write().map_err(err)?;
        txn.open_table(SETTINGS)
            .map_err(err)?
            .insert(key, value)
            .map_err(err)?;
        txn.commit().map_err(err)
    }
}
