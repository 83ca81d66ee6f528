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
    /// Maps `file` (of `len` bytes) when it can be read in place and
    /// written back to: sealed against shrinking, open for reading and
    /// writing, not empty. `None` otherwise: the caller copies instead.
    pub fn of(file: &File, len: u64) -> Option<Mapped> {
        let seals = fcntl(file.as_raw_fd(), FcntlArg::F_GET_SEALS).ok()?;
        if !SealFlag::from_bits_truncate(seals).contains(SealFlag::F_SEAL_SHRINK) {
            return None;
        }
        let mode = OFlag::from_bits_truncate(fcntl(file.as_raw_fd(), FcntlArg::F_GETFL).ok()?);
        if mode & OFlag::O_ACCMODE != OFlag::O_RDWR {
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
                nix::sys::mman::MapFlags::MAP_SHARED,
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

/// `n` rounded up to a multiple of 64 (a cache line, and aligned for every
/// element type).
pub fn align64(n: u64) -> u64 {
    n.div_ceil(64) * 64
}
