//! GRUB's environment block (`grubenv`), as `grub-editenv` and GRUB's
//! `load_env`/`save_env` read it: exactly 1024 bytes, a fixed first line,
//! `name=value` lines, `#` padding.
//!
//! GRUB keeps no checksum, so a block must never be torn. An existing
//! block is updated in place, the way GRUB's `save_env` does it: only its
//! first 512-byte sector changes (all variables must fit there), written
//! as one sector and synced, so a power cut leaves the old block or the new
//! one and the file system's metadata is never touched. That matters on the
//! FAT of an ESP, where a new file renamed over the old one is not
//! crash-safe: a power cut after the rename can leave the file pointing at
//! a cluster the FAT still has free. Only a missing or malformed block is
//! written whole, beside the old one and renamed over it.

use super::plan::{Step, WritePlan};
use super::{EnvError, Vars};
use std::path::{Path, PathBuf};

pub const BLOCK_SIZE: usize = 1024;
/// What storage writes whole: the part of the block updated in place.
const SECTOR: usize = 512;
const SIGNATURE: &str = "# GRUB Environment Block\n";

#[derive(Debug, Clone)]
pub struct GrubEnv {
    path: PathBuf,
}

impl GrubEnv {
    pub fn new(path: &Path) -> Self {
        GrubEnv {
            path: path.to_path_buf(),
        }
    }

    pub fn read(&self) -> Result<Vars, EnvError> {
        let bytes = std::fs::read(&self.path).map_err(|e| EnvError::io(&self.path, e))?;
        decode(&bytes).ok_or_else(|| {
            EnvError::Corrupt(format!(
                "{} is not a GRUB environment block",
                self.path.display()
            ))
        })
    }

    pub fn plan(&self, vars: &Vars) -> Result<WritePlan, EnvError> {
        let new = encode(vars)?;
        if let Ok(old) = std::fs::read(&self.path) {
            if decode(&old).is_some() {
                if new[SECTOR..] != old[SECTOR..] {
                    return Err(EnvError::Invalid(format!(
                        "the GRUB environment needs {} bytes; an update in place holds {}",
                        BLOCK_SIZE - new.iter().rev().take_while(|&&b| b == b'#').count(),
                        SECTOR
                    )));
                }
                let mut steps = Vec::new();
                if new[..SECTOR] != old[..SECTOR] {
                    steps.push(Step::WriteSector {
                        path: self.path.clone(),
                        offset: 0,
                        bytes: new[..SECTOR].to_vec(),
                    });
                    steps.push(Step::Sync {
                        path: self.path.clone(),
                    });
                }
                return Ok(WritePlan { steps });
            }
        }
        let mut name = self.path.file_name().unwrap_or_default().to_os_string();
        name.push(".new");
        let tmp = self.path.with_file_name(name);
        Ok(WritePlan {
            steps: vec![
                Step::Create {
                    path: tmp.clone(),
                    bytes: new,
                },
                Step::Sync { path: tmp.clone() },
                Step::Rename {
                    from: tmp,
                    to: self.path.clone(),
                },
            ],
        })
    }
}

pub fn decode(bytes: &[u8]) -> Option<Vars> {
    if bytes.len() != BLOCK_SIZE || !bytes.starts_with(SIGNATURE.as_bytes()) {
        return None;
    }
    let text = std::str::from_utf8(&bytes[SIGNATURE.len()..]).ok()?;
    let mut vars = Vars::new();
    for line in text.split('\n') {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (k, v) = line.split_once('=')?;
        vars.insert(k.to_string(), v.replace("\\\\", "\\"));
    }
    Some(vars)
}

pub fn encode(vars: &Vars) -> Result<Vec<u8>, EnvError> {
    let mut out = String::from(SIGNATURE);
    for (k, v) in vars {
        if k.is_empty() || k.contains(['=', '\n', '#']) || v.contains(['\n', '\\']) {
            return Err(EnvError::Invalid(format!(
                "cannot store {k:?} in a GRUB environment block"
            )));
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
        out.push('\n');
    }
    if out.len() > BLOCK_SIZE {
        return Err(EnvError::Invalid(format!(
            "the GRUB environment needs {} bytes but a block holds {BLOCK_SIZE}",
            out.len()
        )));
    }
    let mut bytes = out.into_bytes();
    bytes.resize(BLOCK_SIZE, b'#');
    Ok(bytes)
}
