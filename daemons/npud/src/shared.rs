//! A client's tensor file kept mapped in npud between its requests: `InferFd`
//! with a memfd the client sealed against shrinking reads its inputs in
//! place (ONNX Runtime gets views of the mapping, no copy) and has ONNX
//! Runtime write the outputs into the same file, so a client that reuses
//! one file per stream of requests moves each tensor once, in. The mapping
//! itself is `pocket_proto::shm::Mapping`, shared with the client side.

use pocket_proto::shm::{self, Mapping};
use std::fs::{File, Metadata};
use std::sync::{Arc, Mutex};

/// The tensor file a client used last, kept mapped for its next request:
/// mapping and unmapping a megabyte costs more than running a small model
/// on it. Each private channel has its own, dropped with the channel; the
/// bus object has one for all its callers. Holding the mapping keeps that
/// one file alive until another takes its place.
#[derive(Default)]
pub struct MapCache(Mutex<Option<Cached>>);

struct Cached {
    key: (u64, u64),
    /// Keeps the file, so its inode is not reused while it is cached.
    _file: File,
    map: Arc<Mapping>,
}

impl MapCache {
    /// A mapping of the first `needed` bytes of `file` (whose metadata is
    /// `meta`) or more, the file grown to `needed` bytes when it is shorter:
    /// the cached one when it is the same file and covers them, else a new
    /// one, cached. `None` when the file is not usable in place or cannot
    /// grow.
    pub fn map(&self, file: &File, meta: &Metadata, needed: u64) -> Option<Arc<Mapping>> {
        use std::os::unix::fs::MetadataExt;
        if !shm::usable(file) {
            return None;
        }
        let key = (meta.dev(), meta.ino());
        let mut slot = self.0.lock().expect("not poisoned");
        if let Some(c) = slot.as_ref() {
            if c.key == key && c.map.size() >= needed {
                return Some(c.map.clone());
            }
        }
        if meta.len() < needed {
            file.set_len(needed).ok()?;
        }
        let map = Arc::new(Mapping::of(file, needed)?);
        *slot = Some(Cached {
            key,
            _file: file.try_clone().ok()?,
            map: map.clone(),
        });
        Some(map)
    }
}
