//! otad's state on `/data`, in redb: the install in progress (so it resumes
//! after a crash or power cut at the last durable chunk), what each slot
//! holds, and the forward-only security version.

use crate::error::UpdateError;
use pocket_trust::VersionFloors;
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;

const INSTALL: TableDefinition<&str, &[u8]> = TableDefinition::new("install");
const SLOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("slots");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const SECURITY: &str = "security_version";
/// The version floor's subject for bundle metadata.
pub const BUNDLE_SUBJECT: &str = "update-bundle";

/// An install that has started writing. Everything before
/// (`payload`, `chunk`) is on the slot and synced.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InstallRecord {
    pub source: String,
    pub slot: String,
    pub header: Vec<u8>,
    pub digest: String,
    pub version: String,
    pub payload: usize,
    pub chunk: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SlotRecord {
    pub version: String,
    pub digest: String,
    pub security_version: u64,
    /// `installing`, `incomplete` (an install given up), `pending`
    /// (written, not yet booted good), `good`, `failed` (its boot failed
    /// the health check or it was marked bad).
    pub health: String,
    pub installed_at: String,
}

impl SlotRecord {
    /// Whether the slot holds the whole system it names (not an install
    /// that is running or was given up).
    pub fn holds_system(&self) -> bool {
        self.health != "installing" && self.health != "incomplete"
    }
}

#[derive(Clone)]
pub struct State {
    db: Arc<Database>,
    floors: VersionFloors,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("State")
    }
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("state records serialise")
}

impl State {
    pub fn open(dir: &Path) -> Result<State, UpdateError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| UpdateError::io(format!("creating {}", dir.display()), e))?;
        let db = Arc::new(Database::create(dir.join("otad.redb")).map_err(UpdateError::state)?);
        let txn = db.begin_write().map_err(UpdateError::state)?;
        txn.open_table(INSTALL).map_err(UpdateError::state)?;
        txn.open_table(SLOTS).map_err(UpdateError::state)?;
        txn.open_table(META).map_err(UpdateError::state)?;
        txn.commit().map_err(UpdateError::state)?;
        let floors = VersionFloors::new(db.clone())?;
        Ok(State { db, floors })
    }

    pub fn floors(&self) -> &VersionFloors {
        &self.floors
    }

    pub fn install(&self) -> Result<Option<InstallRecord>, UpdateError> {
        let txn = self.db.begin_read().map_err(UpdateError::state)?;
        let t = txn.open_table(INSTALL).map_err(UpdateError::state)?;
        let Some(v) = t.get("current").map_err(UpdateError::state)? else {
            return Ok(None);
        };
        Ok(serde_json::from_slice(v.value()).ok())
    }

    /// Starts an install: records it, marks its slot as being written and
    /// raises the bundle metadata floor, in one transaction.
    pub fn begin_install(&self, rec: &InstallRecord) -> Result<(), UpdateError> {
        let txn = self.db.begin_write().map_err(UpdateError::state)?;
        {
            let mut t = txn.open_table(INSTALL).map_err(UpdateError::state)?;
            t.insert("current", json(rec).as_slice())
                .map_err(UpdateError::state)?;
            let mut s = txn.open_table(SLOTS).map_err(UpdateError::state)?;
            let slot = SlotRecord {
                version: rec.version.clone(),
                digest: rec.digest.clone(),
                security_version: 0,
                health: "installing".into(),
                installed_at: String::new(),
            };
            s.insert(rec.slot.as_str(), json(&slot).as_slice())
                .map_err(UpdateError::state)?;
        }
        VersionFloors::raise_in(&txn, BUNDLE_SUBJECT, &rec.version.parse()?, &rec.digest)?;
        txn.commit().map_err(UpdateError::state)
    }

    /// Records durable progress.
    pub fn checkpoint(&self, payload: usize, chunk: u64) -> Result<(), UpdateError> {
        let Some(mut rec) = self.install()? else {
            return Ok(());
        };
        rec.payload = payload;
        rec.chunk = chunk;
        let txn = self.db.begin_write().map_err(UpdateError::state)?;
        txn.open_table(INSTALL)
            .map_err(UpdateError::state)?
            .insert("current", json(&rec).as_slice())
            .map_err(UpdateError::state)?;
        txn.commit().map_err(UpdateError::state)
    }

    pub fn clear_install(&self) -> Result<(), UpdateError> {
        let txn = self.db.begin_write().map_err(UpdateError::state)?;
        txn.open_table(INSTALL)
            .map_err(UpdateError::state)?
            .remove("current")
            .map_err(UpdateError::state)?;
        txn.commit().map_err(UpdateError::state)
    }

    pub fn slot(&self, name: &str) -> Result<Option<SlotRecord>, UpdateError> {
        let txn = self.db.begin_read().map_err(UpdateError::state)?;
        let t = txn.open_table(SLOTS).map_err(UpdateError::state)?;
        let Some(v) = t.get(name).map_err(UpdateError::state)? else {
            return Ok(None);
        };
        Ok(serde_json::from_slice(v.value()).ok())
    }

    pub fn set_slot(&self, name: &str, rec: &SlotRecord) -> Result<(), UpdateError> {
        let txn = self.db.begin_write().map_err(UpdateError::state)?;
        txn.open_table(SLOTS)
            .map_err(UpdateError::state)?
            .insert(name, json(rec).as_slice())
            .map_err(UpdateError::state)?;
        txn.commit().map_err(UpdateError::state)
    }

    pub fn security_floor(&self) -> Result<u64, UpdateError> {
        let txn = self.db.begin_read().map_err(UpdateError::state)?;
        let t = txn.open_table(META).map_err(UpdateError::state)?;
        Ok(t.get(SECURITY)
            .map_err(UpdateError::state)?
            .map_or(0, |v| v.value()))
    }

    /// Marks `slot` good and raises the security floor to its bundle's, in
    /// one transaction; the floor never goes down.
    pub fn mark_good(&self, slot: &str) -> Result<(), UpdateError> {
        let txn = self.db.begin_write().map_err(UpdateError::state)?;
        {
            let mut s = txn.open_table(SLOTS).map_err(UpdateError::state)?;
            let rec = s
                .get(slot)
                .map_err(UpdateError::state)?
                .and_then(|v| serde_json::from_slice::<SlotRecord>(v.value()).ok());
            if let Some(mut rec) = rec {
                rec.health = "good".into();
                let sv = rec.security_version;
                s.insert(slot, json(&rec).as_slice())
                    .map_err(UpdateError::state)?;
                let mut m = txn.open_table(META).map_err(UpdateError::state)?;
                let floor = m
                    .get(SECURITY)
                    .map_err(UpdateError::state)?
                    .map_or(0, |v| v.value());
                if sv > floor {
                    m.insert(SECURITY, sv).map_err(UpdateError::state)?;
                }
            }
        }
        txn.commit().map_err(UpdateError::state)
    }
}
