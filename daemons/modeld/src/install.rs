//! The install stream: a pack's bytes go in, verified blobs come out.
//!
//! [`PackWriter`] is fed the pack in order. It verifies the header before
//! keeping any payload, hashes each file while writing it (no second read),
//! and moves a file into the blob store only once its length and sha256
//! match. Its partial directory holds the verified `header` and the file in
//! progress as `<i>.part`, so after a crash [`PackWriter::resume`] knows the
//! exact byte of the pack to continue from.

use crate::error::ModelError;
use crate::store::{fsync_dir, write_atomic, Store};
use pocket_models::{CatalogEntry, PackManifest, PACK_PREFIX_LEN};
use pocket_trust::{Keyring, PayloadVerifier, Signed};
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// What a model may take of this box.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Total memory of the box, when known.
    pub mem_total: Option<u64>,
    /// Space to leave free on the data partition.
    pub reserve_bytes: u64,
}

impl Limits {
    pub fn check_memory(&self, name: &str, needed: u64) -> Result<(), ModelError> {
        match self.mem_total {
            Some(total) if needed > total => Err(ModelError::InsufficientMemory {
                name: name.to_string(),
                needed,
                total,
            }),
            _ => Ok(()),
        }
    }

    pub fn check_disk(&self, store: &Store, needed: u64) -> Result<(), ModelError> {
        let available = store.free_bytes();
        if needed.saturating_add(self.reserve_bytes) > available {
            return Err(ModelError::DiskFull {
                path: store.root().to_path_buf(),
                needed: needed + self.reserve_bytes,
                available,
            });
        }
        Ok(())
    }
}

pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Reads `/proc/meminfo`'s `MemTotal`.
pub fn mem_total(meminfo: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(meminfo).ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Bytes written between two starts of background writeback.
const WRITEBACK_EVERY: u64 = 8 << 20;

struct Current {
    /// Bytes written since writeback was last started.
    unsynced: u64,
    verifier: PayloadVerifier,
    /// `None` when the blob is already stored and the bytes are only checked.
    out: Option<(PathBuf, BufWriter<File>)>,
}

pub struct PackWriter {
    store: Store,
    dir: PathBuf,
    keyring: Keyring,
    expect: Option<CatalogEntry>,
    limits: Limits,
    prefix: Vec<u8>,
    header_len: Option<u64>,
    header: Vec<u8>,
    manifest: Option<Signed<PackManifest>>,
    digest: String,
    index: usize,
    current: Option<Current>,
    pos: u64,
    /// The file whose partial bytes `resume` picked up; if it then fails
    /// its hash, those bytes (not the source) were bad.
    resumed: Option<usize>,
}

const HEADER_FILE: &str = "header";

impl PackWriter {
    pub fn new(
        store: Store,
        dir: PathBuf,
        keyring: Keyring,
        expect: Option<CatalogEntry>,
        limits: Limits,
    ) -> Result<Self, ModelError> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| ModelError::io(format!("creating {}", dir.display()), &dir, e))?;
        Ok(PackWriter {
            store,
            dir,
            keyring,
            expect,
            limits,
            prefix: Vec::with_capacity(PACK_PREFIX_LEN),
            header_len: None,
            header: Vec::new(),
            manifest: None,
            digest: String::new(),
            index: 0,
            current: None,
            pos: 0,
            resumed: None,
        })
    }

    /// Bytes of the pack consumed so far: where a resumed download starts.
    pub fn pos(&self) -> u64 {
        self.pos
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Picks up what an earlier run left in the partial directory.
    pub fn resume(&mut self) -> Result<(), ModelError> {
        let header_path = self.dir.join(HEADER_FILE);
        let Ok(header) = std::fs::read(&header_path) else {
            return Ok(());
        };
        self.pos = PACK_PREFIX_LEN as u64;
        self.header_len = Some(header.len() as u64);
        self.header = header;
        self.accept_header()?;
        self.pos += self.header.len() as u64;
        let files = self.files().to_vec();
        while self.index < files.len() {
            let f = &files[self.index];
            if self.store.has_blob(&f.sha256) {
                self.pos += f.size;
                self.index += 1;
                continue;
            }
            let part = self.part_path(self.index);
            let mut verifier = PayloadVerifier::new(&f.path, f.size, &f.sha256);
            if let Ok(mut file) = File::open(&part) {
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let n = file
                        .read(&mut buf)
                        .map_err(|e| ModelError::io("reading partial download", &part, e))?;
                    if n == 0 || verifier.update(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
            let done = verifier.seen();
            let out = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&part)
                .map_err(|e| ModelError::io("reopening partial download", &part, e))?;
            out.set_len(done)
                .map_err(|e| ModelError::io("trimming partial download", &part, e))?;
            self.pos += done;
            if done > 0 {
                self.resumed = Some(self.index);
            }
            self.current = Some(Current {
                unsynced: 0,
                verifier,
                out: Some((part, BufWriter::with_capacity(1 << 20, out))),
            });
            if done == f.size {
                self.finish_file()?;
            }
            break;
        }
        tracing::info!(dir = %self.dir.display(), offset = self.pos, "resuming install");
        Ok(())
    }

    fn files(&self) -> &[pocket_models::PackFile] {
        &self.manifest.as_ref().expect("header accepted").body.files
    }

    fn part_path(&self, index: usize) -> PathBuf {
        self.dir.join(format!("{index}.part"))
    }

    fn accept_header(&mut self) -> Result<(), ModelError> {
        let now = SystemTime::now();
        if let Some(entry) = &self.expect {
            pocket_models::check_header_bytes(entry, &self.header)?;
        }
        let manifest = pocket_models::verify_header(&self.keyring, &self.header, now)?;
        if let Some(entry) = &self.expect {
            pocket_models::check_against_catalog(entry, &self.header, &manifest)?;
        }
        let env = pocket_trust::Envelope::from_bytes("model pack header", &self.header)?;
        self.digest = env.digest();
        let name = &manifest.body.name;
        self.store
            .floors()
            .check(&format!("model:{name}"), &manifest.version, &self.digest)?;
        self.limits
            .check_memory(name, manifest.body.memory_needed())?;
        let missing: u64 = manifest
            .body
            .files
            .iter()
            .filter(|f| !self.store.has_blob(&f.sha256))
            .map(|f| f.size)
            .sum();
        self.limits.check_disk(&self.store, missing)?;
        self.manifest = Some(manifest);
        Ok(())
    }

    /// Consumes the next bytes of the pack.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), ModelError> {
        while !data.is_empty() {
            let Some(header_len) = self.header_len else {
                let take = (PACK_PREFIX_LEN - self.prefix.len()).min(data.len());
                self.prefix.extend_from_slice(&data[..take]);
                self.advance(&mut data, take);
                if self.prefix.len() == PACK_PREFIX_LEN {
                    let len = pocket_models::parse_prefix(
                        self.prefix.as_slice().try_into().expect("prefix length"),
                    )?;
                    if let Some(e) = &self.expect {
                        if e.pack.header_size != len {
                            return Err(pocket_models::FormatError::CatalogMismatch(
                                "header length differs from the signed catalog".into(),
                            )
                            .into());
                        }
                    }
                    self.header_len = Some(len);
                }
                continue;
            };
            if self.manifest.is_none() {
                let take = (header_len as usize - self.header.len()).min(data.len());
                self.header.extend_from_slice(&data[..take]);
                self.advance(&mut data, take);
                if self.header.len() as u64 == header_len {
                    self.accept_header()?;
                    // Once the header is on disk a collection keeps every
                    // blob it lists; until then, none may run.
                    let store = self.store.clone();
                    let _g = store.guard();
                    write_atomic(&self.dir.join(HEADER_FILE), &self.header)?;
                    self.start_file()?;
                }
                continue;
            }
            let Some(cur) = self.current.as_mut() else {
                return Err(pocket_trust::TrustError::Oversized {
                    what: "model pack".into(),
                    expected: self.pos,
                }
                .into());
            };
            let take = (cur.verifier.remaining() as usize).min(data.len());
            // Hash and write the same bytes; a chunk past the file's end
            // stays in `data` for the next file.
            cur.verifier.update(&data[..take])?;
            if let Some((path, out)) = cur.out.as_mut() {
                out.write_all(&data[..take])
                    .map_err(|e| ModelError::io("writing model", path, e))?;
                cur.unsynced += take as u64;
                if cur.unsynced >= WRITEBACK_EVERY {
                    cur.unsynced = 0;
                    pocket_daemon::start_writeback(out.get_ref(), 0, 0);
                }
            }
            self.advance(&mut data, take);
            if self
                .current
                .as_ref()
                .is_some_and(|c| c.verifier.remaining() == 0)
            {
                self.finish_file()?;
            }
        }
        Ok(())
    }

    fn advance(&mut self, data: &mut &[u8], n: usize) {
        *data = &data[n..];
        self.pos += n as u64;
    }

    /// Opens the file at `self.index`, finishing empty files at once.
    fn start_file(&mut self) -> Result<(), ModelError> {
        loop {
            let Some(f) = self.files().get(self.index).cloned() else {
                self.current = None;
                return Ok(());
            };
            let verifier = PayloadVerifier::new(&f.path, f.size, &f.sha256);
            let out = if self.store.has_blob(&f.sha256) {
                None
            } else {
                let part = self.part_path(self.index);
                let file = File::create(&part)
                    .map_err(|e| ModelError::io("creating partial download", &part, e))?;
                Some((part, BufWriter::with_capacity(1 << 20, file)))
            };
            self.current = Some(Current {
                unsynced: 0,
                verifier,
                out,
            });
            if f.size > 0 {
                return Ok(());
            }
            self.finish_file_inner()?;
        }
    }

    fn finish_file(&mut self) -> Result<(), ModelError> {
        self.finish_file_inner()?;
        self.start_file()
    }

    fn finish_file_inner(&mut self) -> Result<(), ModelError> {
        let cur = self.current.take().expect("a file is open");
        let sha = self.files()[self.index].sha256.clone();
        let verified = cur.verifier.finish();
        if let Some((path, out)) = cur.out {
            if let Err(e) = verified {
                let _ = std::fs::remove_file(&path);
                if self.resumed == Some(self.index) {
                    // Unsynced bytes a power cut tore: fetch the file anew.
                    return Err(ModelError::ResumeDamaged {
                        file: self.files()[self.index].path.clone(),
                    });
                }
                return Err(e.into());
            }
            let file = out
                .into_inner()
                .map_err(|e| ModelError::io("writing model", &path, e.into_error()))?;
            file.sync_all()
                .map_err(|e| ModelError::io("syncing model", &path, e))?;
            self.store.commit_blob(&path, &sha)?;
        } else {
            verified?;
        }
        self.index += 1;
        Ok(())
    }

    /// Flushes the file in progress so a later resume sees every byte fed.
    pub fn flush(&mut self) -> Result<(), ModelError> {
        if let Some(Current {
            out: Some((path, out)),
            ..
        }) = self.current.as_mut()
        {
            out.flush()
                .map_err(|e| ModelError::io("writing model", path, e))?;
        }
        Ok(())
    }

    /// Ends the stream: every file must be complete. Returns the verified
    /// manifest and the digest of its signed metadata.
    pub fn finish(mut self) -> Result<(Signed<PackManifest>, String), ModelError> {
        let complete = self
            .manifest
            .as_ref()
            .is_some_and(|m| self.index == m.body.files.len());
        if !complete {
            self.flush()?;
            if let Some(cur) = self.current.take() {
                // Names the file that came up short.
                cur.verifier.finish()?;
            }
            let expected = self.expect.as_ref().map(|e| e.pack.size).unwrap_or(0);
            return Err(pocket_trust::TrustError::Truncated {
                what: "model pack".into(),
                got: self.pos,
                expected: expected.max(self.pos + 1),
            }
            .into());
        }
        let _ = fsync_dir(self.store.root());
        Ok((self.manifest.take().expect("complete"), self.digest.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_refused_only_beyond_what_the_box_has() {
        let known = Limits {
            mem_total: Some(2 << 30),
            reserve_bytes: 0,
        };
        assert!(known.check_memory("m", 2 << 30).is_ok());
        let e = known.check_memory("m", (2 << 30) + 1).unwrap_err();
        assert_eq!(e.name(), "InsufficientMemory");
        // A box whose memory cannot be read does not refuse.
        let unknown = Limits {
            mem_total: None,
            reserve_bytes: 0,
        };
        assert!(unknown.check_memory("m", u64::MAX).is_ok());
    }

    #[test]
    fn sizes_read_as_a_person_reads_them() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(3 << 30), "3.0 GiB");
    }
}
