//! U-Boot's environment format, with redundant copies, read and written
//! the way U-Boot and libubootenv (`fw_printenv`/`fw_setenv`) do:
//!
//! ```text
//! crc32 (u32 LE, over the data) | flags (u8) | "k=v\0k=v\0\0" padded with 0
//! ```
//!
//! The copy with a valid CRC and the newer flags counter wins (255 wraps to
//! 0). A write goes to the other copy with the counter raised, so a power
//! cut in the middle of it leaves a bad CRC there and the old copy in force.
//!
//! A U-Boot built without a redundant environment (QEMU's `qemu_arm64`, in
//! pflash) keeps one copy with no flags byte: `crc32 | data`. [`UBootEnv::single`]
//! reads and writes that format for such boards' tooling; a power cut
//! during its write loses the environment, so otad's configuration insists
//! on two copies.

use super::plan::{Step, WritePlan};
use super::{EnvError, Vars};
use serde::Deserialize;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

/// Where one copy of the environment lives.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EnvCopy {
    pub path: PathBuf,
    #[serde(default)]
    pub offset: u64,
    pub size: u64,
}

const HEADER: usize = 5;
const SINGLE_HEADER: usize = 4;

#[derive(Debug, Clone)]
pub struct UBootEnv {
    /// Two copies (redundant), or one (no flags byte).
    copies: Vec<EnvCopy>,
}

/// The copy in force and its contents.
#[derive(Debug, Clone)]
struct Current {
    index: usize,
    flags: u8,
    vars: Vars,
}

impl UBootEnv {
    pub fn new(copies: &[EnvCopy]) -> Result<Self, EnvError> {
        match copies {
            [a, b] if a.size == b.size && a.size > HEADER as u64 + 2 => Ok(UBootEnv {
                copies: vec![a.clone(), b.clone()],
            }),
            _ => Err(EnvError::Config(
                "the U-Boot environment needs two copies of the same size (redundant \
                 environment); a single copy cannot survive a power cut during a write"
                    .into(),
            )),
        }
    }

    /// A single, non-redundant environment (`crc32 | data`).
    pub fn single(copy: &EnvCopy) -> Result<Self, EnvError> {
        if copy.size <= SINGLE_HEADER as u64 + 2 {
            return Err(EnvError::Config(
                "the U-Boot environment is too small".into(),
            ));
        }
        Ok(UBootEnv {
            copies: vec![copy.clone()],
        })
    }

    fn read_copy(&self, i: usize) -> Result<Option<(u8, Vars)>, EnvError> {
        let c = &self.copies[i];
        let f = std::fs::File::open(&c.path).map_err(|e| EnvError::io(&c.path, e))?;
        let mut buf = vec![0u8; c.size as usize];
        f.read_exact_at(&mut buf, c.offset)
            .map_err(|e| EnvError::io(&c.path, e))?;
        if self.copies.len() == 1 {
            return Ok(decode_single(&buf).map(|vars| (0, vars)));
        }
        Ok(decode_copy(&buf))
    }

    fn current(&self) -> Result<Current, EnvError> {
        if self.copies.len() == 1 {
            let Some((flags, vars)) = self.read_copy(0)? else {
                return Err(EnvError::Corrupt(format!(
                    "the U-Boot environment in {} has no valid CRC",
                    self.copies[0].path.display()
                )));
            };
            return Ok(Current {
                index: 0,
                flags,
                vars,
            });
        }
        let a = self.read_copy(0)?;
        let b = self.read_copy(1)?;
        let pick = |index: usize, (flags, vars): (u8, Vars)| Current { index, flags, vars };
        Ok(match (a, b) {
            (Some(a), Some(b)) => {
                let second_newer = match (a.0, b.0) {
                    (255, 0) => true,
                    (0, 255) => false,
                    (fa, fb) => fb > fa,
                };
                if second_newer {
                    pick(1, b)
                } else {
                    pick(0, a)
                }
            }
            (Some(a), None) => pick(0, a),
            (None, Some(b)) => pick(1, b),
            (None, None) => {
                return Err(EnvError::Corrupt(format!(
                    "neither copy of the U-Boot environment ({} and {}) has a valid CRC",
                    self.copies[0].path.display(),
                    self.copies[1].path.display()
                )))
            }
        })
    }

    pub fn read(&self) -> Result<Vars, EnvError> {
        Ok(self.current()?.vars)
    }

    /// The write that makes `vars` the environment: the copy not in force,
    /// with the next counter, then a sync.
    pub fn plan(&self, vars: &Vars) -> Result<WritePlan, EnvError> {
        let (target, flags) = match self.current() {
            Ok(cur) => (
                (cur.index + 1) % self.copies.len(),
                cur.flags.wrapping_add(1),
            ),
            Err(EnvError::Corrupt(_)) => (0, 1),
            Err(e) => return Err(e),
        };
        let c = &self.copies[target];
        let bytes = if self.copies.len() == 1 {
            encode_single(vars, c.size as usize)?
        } else {
            encode_copy(vars, flags, c.size as usize)?
        };
        Ok(WritePlan {
            steps: vec![
                Step::Write {
                    path: c.path.clone(),
                    offset: c.offset,
                    bytes,
                },
                Step::Sync {
                    path: c.path.clone(),
                },
            ],
        })
    }
}

/// Parses one redundant copy; `None` when its CRC does not match.
pub fn decode_copy(buf: &[u8]) -> Option<(u8, Vars)> {
    if buf.len() < HEADER {
        return None;
    }
    Some((
        buf[4],
        decode_data(buf[..4].try_into().ok()?, &buf[HEADER..])?,
    ))
}

/// Parses a single environment (no flags byte).
pub fn decode_single(buf: &[u8]) -> Option<Vars> {
    if buf.len() < SINGLE_HEADER {
        return None;
    }
    decode_data(buf[..4].try_into().ok()?, &buf[SINGLE_HEADER..])
}

fn decode_data(crc: [u8; 4], data: &[u8]) -> Option<Vars> {
    if crc32(data) != u32::from_le_bytes(crc) {
        return None;
    }
    let mut vars = Vars::new();
    for entry in data.split(|&b| b == 0) {
        if entry.is_empty() {
            break;
        }
        let text = String::from_utf8_lossy(entry);
        if let Some((k, v)) = text.split_once('=') {
            vars.insert(k.to_string(), v.to_string());
        }
    }
    Some(vars)
}

/// Serialises a single environment of `size` bytes.
pub fn encode_single(vars: &Vars, size: usize) -> Result<Vec<u8>, EnvError> {
    let mut out = encode_copy(vars, 0, size + 1)?;
    out.remove(4);
    Ok(out)
}

/// Serialises one redundant copy of `size` bytes.
pub fn encode_copy(vars: &Vars, flags: u8, size: usize) -> Result<Vec<u8>, EnvError> {
    let mut data = Vec::with_capacity(size - HEADER);
    for (k, v) in vars {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(EnvError::Invalid(format!(
                "cannot store {k:?} in the U-Boot environment"
            )));
        }
        data.extend_from_slice(k.as_bytes());
        data.push(b'=');
        data.extend_from_slice(v.as_bytes());
        data.push(0);
    }
    data.push(0);
    if data.len() > size - HEADER {
        return Err(EnvError::Invalid(format!(
            "the U-Boot environment needs {} bytes but holds {}",
            data.len(),
            size - HEADER
        )));
    }
    data.resize(size - HEADER, 0);
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&crc32(&data).to_le_bytes());
    out.push(flags);
    out.extend_from_slice(&data);
    Ok(out)
}

/// The CRC-32 (IEEE 802.3, as zlib) U-Boot puts in front of its environment.
pub fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut c = !0u32;
    for &b in data {
        c = TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn newer_copy_wins_and_counter_wraps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("env");
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        let env = UBootEnv::new(&[
            EnvCopy {
                path: path.clone(),
                offset: 0,
                size: 4096,
            },
            EnvCopy {
                path: path.clone(),
                offset: 4096,
                size: 4096,
            },
        ])
        .unwrap();
        assert!(matches!(env.read(), Err(EnvError::Corrupt(_))));
        for i in 0..300u32 {
            let mut v = Vars::new();
            v.insert("n".into(), i.to_string());
            env.plan(&v).unwrap().apply().unwrap();
            assert_eq!(env.read().unwrap()["n"], i.to_string());
        }
    }
}
