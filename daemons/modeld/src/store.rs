//! The platform room: the model store on the data partition.
//!
//! ```text
//! <data_dir>/modeld.redb              installed models, pending installs, version floors
//! <data_dir>/models/sha256/<hex>      content-addressed blobs (read-only files)
//! <data_dir>/models/partial/<key>/    a download in progress: `header`, `<i>.part`
//! <data_dir>/models/trees/<name>-<v>/ each model's files as hard links to its blobs
//! <data_dir>/models/by-name/<name>    symlink to the model's tree
//! <data_dir>/models/manifests/<name>.json
//! ```
//!
//! The redb commit is the one moment a model becomes installed; trees,
//! links and manifest files are derived from the database and rebuilt at
//! start, so a power cut at any point leaves the old state or the new one.

use crate::error::ModelError;
use pocket_models::{CatalogEntry, PackFile};
use pocket_trust::{Version, VersionFloors};
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const INSTALLED: TableDefinition<&str, &[u8]> = TableDefinition::new("installed");
const PENDING: TableDefinition<&str, &[u8]> = TableDefinition::new("pending");

/// An installed model as recorded in the state database.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstalledModel {
    pub name: String,
    pub version: Version,
    pub description: String,
    pub entry: String,
    pub memory_bytes: u64,
    pub files: Vec<PackFile>,
    pub installed_at: String,
    pub source: String,
}

impl InstalledModel {
    pub fn size_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// A catalog install that was under way; resumed at start.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pending {
    pub source: String,
    pub entry: CatalogEntry,
}

#[derive(Clone)]
pub struct Store {
    models: PathBuf,
    db: Arc<Database>,
    floors: VersionFloors,
    /// Held while the set of needed blobs changes or is collected:
    /// publishing, removing, reconciling, collecting, and a writer deciding
    /// which blobs it can reuse. Without it a collection could delete a
    /// blob an install has just decided not to write again.
    lock: Arc<std::sync::Mutex<()>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.models.display())
    }
}

fn io<'a>(context: &str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ModelError + 'a {
    let context = format!("{context} {}", path.display());
    move |e| ModelError::io(context, path, e)
}

impl Store {
    pub fn open(data_dir: &Path) -> Result<Store, ModelError> {
        let models = data_dir.join("models");
        for sub in ["sha256", "partial", "trees", "by-name", "manifests"] {
            let p = models.join(sub);
            std::fs::create_dir_all(&p).map_err(io("creating", &p))?;
        }
        let db = Arc::new(Database::create(data_dir.join("modeld.redb"))?);
        let txn = db.begin_write()?;
        txn.open_table(INSTALLED)?;
        txn.open_table(PENDING)?;
        txn.commit()?;
        let floors = VersionFloors::new(db.clone())?;
        Ok(Store {
            models,
            db,
            floors,
            lock: Arc::new(std::sync::Mutex::new(())),
        })
    }

    pub fn floors(&self) -> &VersionFloors {
        &self.floors
    }

    pub fn root(&self) -> &Path {
        &self.models
    }

    pub fn blob_path(&self, sha256: &str) -> PathBuf {
        self.models.join("sha256").join(sha256)
    }

    pub fn has_blob(&self, sha256: &str) -> bool {
        self.blob_path(sha256).is_file()
    }

    /// Where a download of the pack with this header hash keeps its bytes.
    pub fn partial_dir(&self, name: &str, header_sha256: &str) -> PathBuf {
        // Both parts were validated (a model name, 64 hex digits) before
        // they get here, so the path stays inside `partial/`.
        self.models
            .join("partial")
            .join(format!("{name}@{header_sha256}"))
    }

    /// Where the install of a local pack file (job `id`) keeps its bytes.
    pub fn file_partial_dir(&self, id: u64) -> PathBuf {
        self.models.join("partial").join(format!("file-{id}"))
    }

    /// Partial directories of local-file installs; they cannot resume (the
    /// caller's file is gone), so they are dropped at start.
    pub fn file_partials(&self) -> Result<Vec<PathBuf>, ModelError> {
        Ok(read_dir(&self.models.join("partial"))?
            .into_iter()
            .filter(|e| e.file_name().to_string_lossy().starts_with("file-"))
            .map(|e| e.path())
            .collect())
    }

    /// Moves a verified, synced file into the blob store.
    pub fn commit_blob(&self, file: &Path, sha256: &str) -> Result<(), ModelError> {
        let dest = self.blob_path(sha256);
        if dest.exists() {
            std::fs::remove_file(file).map_err(io("removing", file))?;
            return Ok(());
        }
        let mut perms = std::fs::metadata(file)
            .map_err(io("reading", file))?
            .permissions();
        perms.set_readonly(true);
        std::fs::set_permissions(file, perms).map_err(io("protecting", file))?;
        std::fs::rename(file, &dest).map_err(io("storing", &dest))?;
        fsync_dir(&self.models.join("sha256"))
    }

    pub fn installed(&self) -> Result<Vec<InstalledModel>, ModelError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(INSTALLED)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (_, v) = row?;
            out.push(decode(v.value())?);
        }
        Ok(out)
    }

    pub fn get(&self, name: &str) -> Result<Option<InstalledModel>, ModelError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(INSTALLED)?;
        let v = t.get(name)?;
        v.map(|v| decode(v.value())).transpose()
    }

    pub fn pending(&self) -> Result<Vec<Pending>, ModelError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(PENDING)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (_, v) = row?;
            out.push(decode(v.value())?);
        }
        Ok(out)
    }

    pub fn set_pending(&self, p: &Pending) -> Result<(), ModelError> {
        let txn = self.db.begin_write()?;
        txn.open_table(PENDING)?
            .insert(p.entry.name.as_str(), encode(p).as_slice())?;
        txn.commit()?;
        Ok(())
    }

    pub fn clear_pending(&self, name: &str) -> Result<(), ModelError> {
        let txn = self.db.begin_write()?;
        txn.open_table(PENDING)?.remove(name)?;
        txn.commit()?;
        Ok(())
    }

    /// Publishes a model whose blobs are all stored: one redb transaction
    /// records it, raises its version floor and clears its pending install.
    /// Serialises changes to which blobs are needed (see `lock`).
    pub fn guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn publish(&self, model: &InstalledModel, digest: &str) -> Result<(), ModelError> {
        let _g = self.guard();
        if let Some(f) = model.files.iter().find(|f| !self.has_blob(&f.sha256)) {
            return Err(ModelError::MissingBlob {
                model: model.name.clone(),
                file: f.path.clone(),
            });
        }
        let subject = format!("model:{}", model.name);
        self.floors.check(&subject, &model.version, digest)?;
        let txn = self.db.begin_write()?;
        txn.open_table(INSTALLED)?
            .insert(model.name.as_str(), encode(model).as_slice())?;
        txn.open_table(PENDING)?.remove(model.name.as_str())?;
        VersionFloors::raise_in(&txn, &subject, &model.version, digest)?;
        txn.commit()?;
        self.materialize(model)
    }

    /// Forgets a model; its blobs go at the next collection.
    pub fn unpublish(&self, name: &str) -> Result<InstalledModel, ModelError> {
        let _g = self.guard();
        let txn = self.db.begin_write()?;
        let old = txn
            .open_table(INSTALLED)?
            .remove(name)?
            .map(|v| decode::<InstalledModel>(v.value()))
            .transpose()?
            .ok_or_else(|| ModelError::NotInstalled {
                name: name.to_string(),
            })?;
        txn.commit()?;
        self.reconcile_locked()?;
        Ok(old)
    }

    fn tree_dir(&self, m: &InstalledModel) -> PathBuf {
        self.models
            .join("trees")
            .join(format!("{}-{}", m.name, m.version))
    }

    /// Path of a model's entry file, through its `by-name` link.
    pub fn entry_path(&self, m: &InstalledModel) -> PathBuf {
        self.models.join("by-name").join(&m.name).join(&m.entry)
    }

    /// Builds a model's tree, `by-name` link and manifest file from its
    /// record; each step is idempotent and atomic.
    fn materialize(&self, m: &InstalledModel) -> Result<(), ModelError> {
        let tree = self.tree_dir(m);
        for f in &m.files {
            let dest = tree.join(&f.path);
            if dest.exists() {
                continue;
            }
            let parent = dest.parent().expect("tree paths have a parent");
            std::fs::create_dir_all(parent).map_err(io("creating", parent))?;
            std::fs::hard_link(self.blob_path(&f.sha256), &dest).map_err(io("linking", &dest))?;
        }
        let link = self.models.join("by-name").join(&m.name);
        let target = Path::new("../trees").join(tree.file_name().expect("named"));
        if std::fs::read_link(&link).ok().as_deref() != Some(target.as_path()) {
            let tmp = self.models.join("by-name").join(format!(".{}.tmp", m.name));
            let _ = std::fs::remove_file(&tmp);
            std::os::unix::fs::symlink(&target, &tmp).map_err(io("linking", &tmp))?;
            std::fs::rename(&tmp, &link).map_err(io("linking", &link))?;
            fsync_dir(&self.models.join("by-name"))?;
        }
        let manifest = self
            .models
            .join("manifests")
            .join(format!("{}.json", m.name));
        // Unchanged files are left alone: a collection after every install
        // rebuilds every model's view, which must cost no writes.
        let text = serde_json::to_vec_pretty(m).expect("serialisable");
        if std::fs::read(&manifest).ok().as_deref() != Some(text.as_slice()) {
            write_atomic(&manifest, &text)?;
        }
        Ok(())
    }

    /// Makes the files agree with the database after a crash: rebuilds what
    /// installed models need, removes what no installed model owns.
    pub fn reconcile(&self) -> Result<(), ModelError> {
        let _g = self.guard();
        self.reconcile_locked()
    }

    fn reconcile_locked(&self) -> Result<(), ModelError> {
        let installed = self.installed()?;
        for m in &installed {
            self.materialize(m)?;
        }
        let keep_trees: Vec<PathBuf> = installed.iter().map(|m| self.tree_dir(m)).collect();
        let names: Vec<&str> = installed.iter().map(|m| m.name.as_str()).collect();
        for entry in read_dir(&self.models.join("by-name"))? {
            let n = entry.file_name().to_string_lossy().to_string();
            if !names.contains(&n.as_str()) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        for entry in read_dir(&self.models.join("manifests"))? {
            let n = entry.file_name().to_string_lossy().to_string();
            let name = n.strip_suffix(".json").unwrap_or(&n);
            if !names.contains(&name) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        for entry in read_dir(&self.models.join("trees"))? {
            if !keep_trees.contains(&entry.path()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        for entry in read_dir(&self.models.join("sha256"))? {
            if entry.file_name().to_string_lossy().ends_with(".tmp") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    /// Deletes partial downloads that are neither pending nor in `active`,
    /// then blobs nothing references. Returns bytes freed.
    pub fn gc(&self, active: &[PathBuf]) -> Result<u64, ModelError> {
        let _g = self.guard();
        let pending: Vec<PathBuf> = self
            .pending()?
            .iter()
            .map(|p| self.partial_dir(&p.entry.name, &p.entry.pack.header_sha256))
            .collect();
        let mut freed = 0;
        for entry in read_dir(&self.models.join("partial"))? {
            let p = entry.path();
            if !pending.contains(&p) && !active.contains(&p) {
                freed += remove_partial(&p);
            }
        }
        Ok(freed + self.gc_blobs_locked()?)
    }

    /// Deletes blobs that neither an installed model nor a partial download
    /// (whose verified header lists what it is storing) references.
    pub fn gc_blobs(&self) -> Result<u64, ModelError> {
        let _g = self.guard();
        self.gc_blobs_locked()
    }

    fn gc_blobs_locked(&self) -> Result<u64, ModelError> {
        self.reconcile_locked()?;
        let mut referenced: std::collections::BTreeSet<String> = self
            .installed()?
            .into_iter()
            .flat_map(|m| m.files.into_iter().map(|f| f.sha256))
            .collect();
        for entry in read_dir(&self.models.join("partial"))? {
            let Ok(header) = std::fs::read(entry.path().join("header")) else {
                continue;
            };
            let manifest = pocket_trust::Envelope::from_bytes("header", &header)
                .and_then(|e| e.peek::<pocket_models::PackManifest>());
            if let Ok(m) = manifest {
                referenced.extend(m.body.files.into_iter().map(|f| f.sha256));
            }
        }
        let mut freed = 0;
        for entry in read_dir(&self.models.join("sha256"))? {
            let n = entry.file_name().to_string_lossy().to_string();
            if !referenced.contains(&n) {
                freed += entry.metadata().map(|m| m.len()).unwrap_or(0);
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(freed)
    }

    /// Partial download directories of `name`.
    pub fn partials_of(&self, name: &str) -> Result<Vec<PathBuf>, ModelError> {
        let prefix = format!("{name}@");
        Ok(read_dir(&self.models.join("partial"))?
            .into_iter()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .map(|e| e.path())
            .collect())
    }

    pub fn free_bytes(&self) -> u64 {
        free_bytes(&self.models).unwrap_or(0)
    }
}

/// Removes a partial download directory and returns the bytes it held.
pub fn remove_partial(dir: &Path) -> u64 {
    let bytes = read_dir(dir)
        .unwrap_or_default()
        .iter()
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .sum();
    let _ = std::fs::remove_dir_all(dir);
    bytes
}

fn read_dir(dir: &Path) -> Result<Vec<std::fs::DirEntry>, ModelError> {
    match std::fs::read_dir(dir) {
        Ok(rd) => Ok(rd.filter_map(Result::ok).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(ModelError::io(format!("listing {}", dir.display()), dir, e)),
    }
}

/// Bytes an unprivileged writer may still use on the filesystem of `path`.
pub fn free_bytes(path: &Path) -> Option<u64> {
    let s = nix::sys::statvfs::statvfs(path).ok()?;
    Some(s.blocks_available() as u64 * s.fragment_size() as u64)
}

pub fn fsync_dir(dir: &Path) -> Result<(), ModelError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("syncing", dir))
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ModelError> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io("writing", &tmp))?;
    f.write_all(bytes).map_err(io("writing", &tmp))?;
    f.sync_all().map_err(io("syncing", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("renaming", path))?;
    fsync_dir(path.parent().expect("has a parent"))
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("serialisable")
}

fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, ModelError> {
    Ok(serde_json::from_slice(b)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(store: &Store, bytes: &[u8]) -> PackFile {
        let sha = pocket_trust::sha256_hex(bytes);
        let tmp = store.root().join("sha256").join("x.part");
        std::fs::write(&tmp, bytes).unwrap();
        store.commit_blob(&tmp, &sha).unwrap();
        PackFile {
            path: "model.onnx".into(),
            size: bytes.len() as u64,
            sha256: sha,
        }
    }

    fn model(files: Vec<PackFile>) -> InstalledModel {
        InstalledModel {
            name: "m".into(),
            version: "1".parse().unwrap(),
            description: String::new(),
            entry: "model.onnx".into(),
            memory_bytes: 1,
            files,
            installed_at: String::new(),
            source: "test".into(),
        }
    }

    #[test]
    fn a_power_cut_before_the_commit_leaves_nothing_visible() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let f = blob(&store, b"weights");
        // Stale derived files, as if a removal was cut short.
        std::fs::create_dir_all(store.root().join("trees/m-1")).unwrap();
        std::os::unix::fs::symlink("../trees/m-1", store.root().join("by-name/m")).unwrap();
        std::fs::write(store.root().join("manifests/m.json"), b"{}").unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        store.reconcile().unwrap();
        assert!(store.installed().unwrap().is_empty());
        assert!(!store.root().join("by-name/m").exists());
        assert!(!store.root().join("manifests/m.json").exists());
        assert!(!store.root().join("trees/m-1").exists());
        assert_eq!(store.gc_blobs().unwrap(), 7);
        assert!(!store.has_blob(&f.sha256));
    }

    #[test]
    fn a_power_cut_after_the_commit_is_completed_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let f = blob(&store, b"weights");
        store.publish(&model(vec![f.clone()]), "digest").unwrap();
        // Lose every derived file, as if the cut came right after the commit.
        std::fs::remove_dir_all(store.root().join("trees")).unwrap();
        std::fs::remove_file(store.root().join("by-name/m")).unwrap();
        std::fs::remove_file(store.root().join("manifests/m.json")).unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        store.reconcile().unwrap();
        let m = store.get("m").unwrap().unwrap();
        assert_eq!(std::fs::read(store.entry_path(&m)).unwrap(), b"weights");
        assert!(store.root().join("manifests/m.json").is_file());
        assert_eq!(store.gc_blobs().unwrap(), 0);
    }
}
