//! A client's tensor file mapped into npud: `InferFd` with a memfd the
//! client sealed against shrinking reads its inputs in place (ONNX Runtime
//! gets views of the mapping, no copy) and writes the outputs into the same
//! file, so a client that reuses one file per stream of requests moves each
//! tensor once each way.
//!
//! The seal is what makes the mapping safe to read: a file that cannot
//! shrink cannot take pages away from under the mapping (which would be a
//! SIGBUS, not an error). A client that writes the file while its request
//! runs gets garbage results, as with any buffer it hands over; npud only
//! ever reads the mapping as plain numbers.

use nix::fcntl::{fcntl, FcntlArg, OFlag, SealFlag};
use std::fs::File;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd};
use std::ptr::NonNull;

/// A read-only shared mapping of a whole file.
pub struct Mapped {
    ptr: NonNull<std::ffi::c_void>,
    len: usize,
}

// SAFETY: the mapping is read-only memory that stays mapped until drop;
// reading it from several threads at once is as sound as reading any
// shared `&[u8]`.
#[allow(unsafe_code)]
unsafe impl Send for Mapped {}
// SAFETY: as above; no method mutates through `&self`.
#[allow(unsafe_code)]
unsafe impl Sync for Mapped {}

impl Mapped {
    /// Whether `file` can be read in place and written back to: sealed
    /// against shrinking, and open for reading and writing.
    pub fn usable(file: &File) -> bool {
        let sealed = fcntl(file.as_raw_fd(), FcntlArg::F_GET_SEALS)
            .is_ok_and(|s| SealFlag::from_bits_truncate(s).contains(SealFlag::F_SEAL_SHRINK));
        let rw = fcntl(file.as_raw_fd(), FcntlArg::F_GETFL)
            .is_ok_and(|m| OFlag::from_bits_truncate(m) & OFlag::O_ACCMODE == OFlag::O_RDWR);
        sealed && rw
    }

    /// Maps all `len` bytes of a [usable](Self::usable) file; `None` when
    /// it is not usable or empty: the caller copies instead.
    pub fn of(file: &File, len: u64) -> Option<Mapped> {
        if !Self::usable(file) {
            return None;
        }
        let len = NonZeroUsize::new(usize::try_from(len).ok()?)?;
        #[allow(unsafe_code)]
        // SAFETY: a fresh mapping chosen by the kernel (no address given),
        // read-only, of a file that cannot shrink below `len` (sealed), so
        // every page of it stays backed until munmap in drop.
        let ptr = unsafe {
            nix::sys::mman::mmap(
                None,
                len,
                nix::sys::mman::ProtFlags::PROT_READ,
                // Populated up front: one call instead of a page fault per page.
                nix::sys::mman::MapFlags::MAP_SHARED | nix::sys::mman::MapFlags::MAP_POPULATE,
                file.as_fd(),
                0,
            )
        }
        .ok()?;
        Some(Mapped {
            ptr,
            len: len.get(),
        })
    }

    /// Bytes mapped (never 0).
    pub fn size(&self) -> u64 {
        self.len as u64
    }

    /// `len` bytes at `offset`, or `None` when they lie outside the file.
    pub fn bytes(&self, offset: u64, len: u64) -> Option<&[u8]> {
        let end = offset.checked_add(len)?;
        if end > self.len as u64 {
            return None;
        }
        #[allow(unsafe_code)]
        // SAFETY: offset..end lies inside the mapping (checked above), which
        // lives as long as `self`, and it is only read.
        Some(unsafe {
            std::slice::from_raw_parts(
                (self.ptr.as_ptr() as *const u8).add(offset as usize),
                len as usize,
            )
        })
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        #[allow(unsafe_code)]
        // SAFETY: ptr and len are the mapping made in `of`, unmapped once;
        // no slice of it outlives `self` (they borrow it).
        let _ = unsafe { nix::sys::mman::munmap(self.ptr, self.len) };
    }
}

/// The tensor file a client used last, kept mapped for its next request:
/// mapping and unmapping a megabyte costs more than running a small model
/// on it. Each private channel has its own, dropped with the channel; the
/// bus object has one for all its callers. Holding the mapping keeps that
/// one file alive until another takes its place.
#[derive(Default)]
pub struct MapCache(std::sync::Mutex<Option<Cached>>);

struct Cached {
    key: (u64, u64),
    /// Keeps the file, so its inode is not reused while it is cached.
    _file: File,
    map: std::sync::Arc<Mapped>,
}

impl MapCache {
    /// A mapping of `file` (now `size` bytes) that covers `needed` bytes:
    /// the cached one when it is the same file, else a new one, cached.
    /// `None` when the file is not usable in place.
    pub fn map(&self, file: &File, size: u64, needed: u64) -> Option<std::sync::Arc<Mapped>> {
        use std::os::unix::fs::MetadataExt;
        if !Mapped::usable(file) {
            return None;
        }
        let meta = file.metadata().ok()?;
        let key = (meta.dev(), meta.ino());
        let mut slot = self.0.lock().expect("not poisoned");
        if let Some(c) = slot.as_ref() {
            if c.key == key && c.map.size() >= needed {
                return Some(c.map.clone());
            }
        }
        let map = std::sync::Arc::new(Mapped::of(file, size)?);
        *slot = Some(Cached {
            key,
            _file: file.try_clone().ok()?,
            map: map.clone(),
        });
        Some(map)
    }
}
