//! Shared mappings of tensor files: a memfd sealed against shrinking that a
//! client and npud both map, so that tensors are read and written in place
//! instead of being copied through a socket (`InferFd`, `docs/runtime.md`).
//!
//! The seal is what makes a mapping safe to touch: a file that cannot
//! shrink cannot take pages away from under it (that would be a SIGBUS,
//! not an error). Both sides only ever treat the bytes as plain numbers, so
//! a peer that writes at the wrong time gets wrong numbers, never undefined
//! behaviour in the reader's logic.

use nix::fcntl::{fcntl, FcntlArg, OFlag, SealFlag};
use std::fs::File;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd};
use std::ptr::NonNull;

/// Whether `file` can be mapped for reading and writing in place: sealed
/// against shrinking, and open for reading and writing.
pub fn usable(file: &File) -> bool {
    let sealed = fcntl(file.as_raw_fd(), FcntlArg::F_GET_SEALS)
        .is_ok_and(|s| SealFlag::from_bits_truncate(s).contains(SealFlag::F_SEAL_SHRINK));
    let rw = fcntl(file.as_raw_fd(), FcntlArg::F_GETFL)
        .is_ok_and(|m| OFlag::from_bits_truncate(m) & OFlag::O_ACCMODE == OFlag::O_RDWR);
    sealed && rw
}

/// A shared read-write mapping of the first `len` bytes of a
/// [usable](usable) file.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<std::ffi::c_void>,
    len: usize,
}

// SAFETY: the mapping stays mapped until drop and is only reached through
// bounds-checked slices and pointers; sharing it between threads is as
// sound as sharing the file it maps.
#[allow(unsafe_code)]
unsafe impl Send for Mapping {}
// SAFETY: as above; `&self` methods hand out reads, and writes go through
// the raw pointers of `ptr_at`, whose callers keep them disjoint.
#[allow(unsafe_code)]
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `file`; `None` when the file is not usable in
    /// place, shorter than `len`, or `len` is 0.
    pub fn of(file: &File, len: u64) -> Option<Mapping> {
        if !usable(file) || file.metadata().ok()?.len() < len {
            return None;
        }
        let len = NonZeroUsize::new(usize::try_from(len).ok()?)?;
        #[allow(unsafe_code)]
        // SAFETY: a fresh mapping chosen by the kernel (no address given)
        // of bytes the file has (checked above) and cannot lose (sealed
        // against shrinking), so every page stays backed until munmap.
        let ptr = unsafe {
            nix::sys::mman::mmap(
                None,
                len,
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                // Populated up front: one call instead of a fault per page.
                nix::sys::mman::MapFlags::MAP_SHARED | nix::sys::mman::MapFlags::MAP_POPULATE,
                file.as_fd(),
                0,
            )
        }
        .ok()?;
        Some(Mapping {
            ptr,
            len: len.get(),
        })
    }

    /// Bytes mapped (never 0).
    pub fn size(&self) -> u64 {
        self.len as u64
    }

    /// `len` bytes at `offset`, or `None` when they lie outside the mapping.
    pub fn bytes(&self, offset: u64, len: u64) -> Option<&[u8]> {
        let ptr = self.ptr_at(offset, len)?;
        #[allow(unsafe_code)]
        // SAFETY: ptr..ptr+len lies inside the mapping (ptr_at checks),
        // which lives as long as the borrow of `self`.
        Some(unsafe { std::slice::from_raw_parts(ptr, len as usize) })
    }

    /// Copies `bytes` to `offset`; `false` when they would not fit. The
    /// caller makes sure no slice from [`Self::bytes`] covers them.
    pub fn write(&self, offset: u64, bytes: &[u8]) -> bool {
        let Some(dst) = self.ptr_at(offset, bytes.len() as u64) else {
            return false;
        };
        #[allow(unsafe_code)]
        // SAFETY: dst..dst+len lies inside the mapping (ptr_at checks); the
        // source is a Rust slice, which cannot be this shared file mapping
        // range by the caller's contract.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, bytes.len())
        };
        true
    }

    /// A pointer to `len` bytes at `offset`, or `None` when they lie
    /// outside the mapping. Valid while `self` lives.
    pub fn ptr_at(&self, offset: u64, len: u64) -> Option<*mut u8> {
        let end = offset.checked_add(len)?;
        if end > self.len as u64 {
            return None;
        }
        #[allow(unsafe_code)]
        // SAFETY: offset <= end <= len, so the result stays inside (or one
        // past the end of) the mapping.
        Some(unsafe { (self.ptr.as_ptr() as *mut u8).add(offset as usize) })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        #[allow(unsafe_code)]
        // SAFETY: ptr and len are the mapping made in `of`, unmapped once;
        // no slice of it outlives `self` (they borrow it).
        let _ = unsafe { nix::sys::mman::munmap(self.ptr, self.len) };
    }
}
