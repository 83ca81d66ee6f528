//! An environment write as a list of steps, so that what reaches the disk
//! can be reasoned about (and cut short at any byte in tests) apart from how
//! the new contents were computed.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Writes `bytes` at `offset` of an existing file or device.
    Write {
        path: PathBuf,
        offset: u64,
        bytes: Vec<u8>,
    },
    /// Overwrites one sector (512 bytes) of an existing file in place.
    /// Storage writes a sector whole or not at all (the assumption GRUB's
    /// own `save_env` makes), so a cut leaves the old sector or the new.
    WriteSector {
        path: PathBuf,
        offset: u64,
        bytes: Vec<u8>,
    },
    /// Creates (or truncates) `path` and writes `bytes` into it.
    Create { path: PathBuf, bytes: Vec<u8> },
    /// Flushes a file's data to stable storage.
    Sync { path: PathBuf },
    /// Atomically replaces `to` with `from`, then syncs the directory.
    Rename { from: PathBuf, to: PathBuf },
}

/// The steps of one environment transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WritePlan {
    pub steps: Vec<Step>,
}

impl WritePlan {
    /// Bytes the plan writes, all steps together.
    pub fn bytes(&self) -> u64 {
        self.steps
            .iter()
            .map(|s| match s {
                Step::Write { bytes, .. }
                | Step::WriteSector { bytes, .. }
                | Step::Create { bytes, .. } => bytes.len() as u64,
                _ => 0,
            })
            .sum()
    }

    pub fn apply(&self) -> std::io::Result<()> {
        self.apply_until(u64::MAX)
    }

    /// Carries out the plan as a power cut would leave it: the first
    /// `budget` written bytes reach the disk and nothing after them
    /// (no later write, sync or rename). `apply` is `apply_until(u64::MAX)`.
    pub fn apply_until(&self, mut budget: u64) -> std::io::Result<()> {
        for step in &self.steps {
            match step {
                Step::Write {
                    path,
                    offset,
                    bytes,
                } => {
                    let n = (bytes.len() as u64).min(budget) as usize;
                    let f = OpenOptions::new().write(true).open(path)?;
                    f.write_all_at(&bytes[..n], *offset)?;
                    budget -= n as u64;
                    if n < bytes.len() {
                        return Ok(());
                    }
                }
                Step::WriteSector {
                    path,
                    offset,
                    bytes,
                } => {
                    if budget < bytes.len() as u64 {
                        return Ok(());
                    }
                    let f = OpenOptions::new().write(true).open(path)?;
                    f.write_all_at(bytes, *offset)?;
                    budget -= bytes.len() as u64;
                }
                Step::Create { path, bytes } => {
                    let n = (bytes.len() as u64).min(budget) as usize;
                    let mut f = std::fs::File::create(path)?;
                    f.write_all(&bytes[..n])?;
                    budget -= n as u64;
                    if n < bytes.len() {
                        return Ok(());
                    }
                }
                Step::Sync { path } => {
                    OpenOptions::new().write(true).open(path)?.sync_data()?;
                }
                Step::Rename { from, to } => {
                    std::fs::rename(from, to)?;
                    if let Some(dir) = to.parent() {
                        let dir = if dir.as_os_str().is_empty() {
                            std::path::Path::new(".")
                        } else {
                            dir
                        };
                        std::fs::File::open(dir)?.sync_all()?;
                    }
                }
            }
        }
        Ok(())
    }
}
