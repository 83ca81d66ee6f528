//! The update bundle format.
//!
//! A **bundle** carries a new system from the publisher to the box, as one
//! file on a USB stick or behind an HTTP URL:
//!
//! ```text
//! "PKTBNDL1" | header length (u64 LE) | header | zero padding to 4 KiB
//! payload 1 | zero padding to 4 KiB | payload 2 | ...
//! ```
//!
//! The header is a signed [`Envelope`] of kind `update-bundle` whose body is
//! a [`BundleManifest`]: the device family it is `compatible` with, a
//! forward-only `security_version`, and each payload (the `rootfs` image and
//! optional components such as NPU firmware) with its size, sha256 and the
//! sha256 of every `chunk_size` piece. The chunk list lets a reader verify
//! each chunk before it is written, and resume at any chunk boundary, from a
//! file or from HTTP Range requests alike. Payload offsets follow from the
//! sizes and the 4 KiB alignment, so they are never trusted from the wire.

use pocket_trust::{Envelope, Keyring, Role, SecretKey, Signed, TrustError, Version};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::SystemTime;

pub const BUNDLE_MAGIC: &[u8; 8] = b"PKTBNDL1";
pub const BUNDLE_KIND: &str = "update-bundle";
/// Magic plus the header length.
pub const PREFIX_LEN: u64 = 16;
/// Payloads start on this boundary, so a slot can be written with aligned,
/// page-sized I/O straight from the bundle.
pub const ALIGN: u64 = 4096;
/// Largest header accepted before anything is verified.
pub const MAX_HEADER_LEN: u64 = 4 << 20;
/// The payload every bundle has.
pub const ROOTFS: &str = "rootfs";
pub const DEFAULT_CHUNK_SIZE: u64 = 1 << 20;
const MIN_CHUNK_SIZE: u64 = 4096;
const MAX_CHUNK_SIZE: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error(transparent)]
    Trust(#[from] TrustError),
    #[error("not an update bundle (bad magic)")]
    BadMagic,
    #[error("update bundle header of {0} bytes is larger than the {MAX_HEADER_LEN} allowed")]
    HeaderTooLarge(u64),
    #[error("update bundle is invalid: {0}")]
    Invalid(String),
    #[error("update bundle is for {offered:?}, this device is {device:?}")]
    Incompatible { offered: String, device: String },
    #[error(
        "payload {payload} chunk {index} does not match its signed sha256 (tampered or corrupt)"
    )]
    ChunkMismatch { payload: String, index: u64 },
    #[error("update bundle is truncated: payload {payload} ends at byte {got} of {expected}")]
    Truncated {
        payload: String,
        got: u64,
        expected: u64,
    },
    #[error("update bundle is {size} bytes, more than the {expected} its header describes")]
    Oversized { size: u64, expected: u64 },
    #[error("reading the bundle: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Payload {
    /// `rootfs` or a component name from the device's system.toml.
    pub name: String,
    pub size: u64,
    pub sha256: String,
    /// sha256 of each `chunk_size` piece in order; the last may be shorter.
    pub chunks: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BundleManifest {
    /// Must equal the device's `compatible` (for example
    /// `pocketos-qemu-aarch64`).
    pub compatible: String,
    /// Forward-only: raised on the device once a slot running this bundle
    /// is marked good; bundles below it are refused.
    pub security_version: u64,
    pub chunk_size: u64,
    pub payloads: Vec<Payload>,
}

/// Where a payload lies inside the bundle file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub offset: u64,
    pub size: u64,
}

pub fn align_up(n: u64) -> u64 {
    n.div_ceil(ALIGN) * ALIGN
}

impl BundleManifest {
    /// Structural checks made before anything else is trusted.
    pub fn validate(&self) -> Result<(), BundleError> {
        let bad = |m: String| Err(BundleError::Invalid(m));
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size)
            || !self.chunk_size.is_power_of_two()
        {
            return bad(format!(
                "chunk size {} is not a power of two between 4 KiB and 64 MiB",
                self.chunk_size
            ));
        }
        if self.payloads.first().map(|p| p.name.as_str()) != Some(ROOTFS) {
            return bad("the first payload must be the rootfs".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for p in &self.payloads {
            let name_ok = !p.name.is_empty()
                && p.name.len() <= 64
                && p.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if !name_ok {
                return bad(format!("payload name {:?} is not a plain name", p.name));
            }
            if !seen.insert(p.name.as_str()) {
                return bad(format!("payload {:?} is listed twice", p.name));
            }
            if !is_sha256(&p.sha256) || !p.chunks.iter().all(|c| is_sha256(c)) {
                return bad(format!("payload {:?} has a malformed sha256", p.name));
            }
            if p.chunks.len() as u64 != p.size.div_ceil(self.chunk_size) {
                return bad(format!(
                    "payload {:?} lists {} chunk hashes for {} bytes",
                    p.name,
                    p.chunks.len(),
                    p.size
                ));
            }
        }
        Ok(())
    }

    /// Byte ranges of each payload, for a header of `header_len` bytes.
    pub fn spans(&self, header_len: u64) -> Vec<Span> {
        let mut offset = align_up(PREFIX_LEN + header_len);
        self.payloads
            .iter()
            .map(|p| {
                let s = Span {
                    offset,
                    size: p.size,
                };
                offset = align_up(offset + p.size);
                s
            })
            .collect()
    }

    /// The bundle's size: the end of its last payload.
    pub fn bundle_len(&self, header_len: u64) -> u64 {
        self.spans(header_len)
            .last()
            .map_or(PREFIX_LEN + header_len, |s| s.offset + s.size)
    }

    /// Length of chunk `index` of `payload`.
    pub fn chunk_len(&self, payload: &Payload, index: u64) -> u64 {
        let start = index * self.chunk_size;
        (payload.size - start).min(self.chunk_size)
    }

    pub fn total_bytes(&self) -> u64 {
        self.payloads.iter().map(|p| p.size).sum()
    }
}

/// 64 lower-case hex digits.
pub fn is_sha256(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Verifies one chunk against its signed hash.
pub fn check_chunk(payload: &Payload, index: u64, data: &[u8]) -> Result<(), BundleError> {
    let expected = payload.chunks.get(index as usize).ok_or_else(|| {
        BundleError::Invalid(format!("payload {} has no chunk {index}", payload.name))
    })?;
    if hex::encode(Sha256::digest(data)) != *expected {
        return Err(BundleError::ChunkMismatch {
            payload: payload.name.clone(),
            index,
        });
    }
    Ok(())
}

/// The fixed-size prefix of a bundle with a header of `len` bytes.
pub fn encode_prefix(len: u64) -> [u8; PREFIX_LEN as usize] {
    let mut p = [0u8; PREFIX_LEN as usize];
    p[..8].copy_from_slice(BUNDLE_MAGIC);
    p[8..].copy_from_slice(&len.to_le_bytes());
    p
}

/// The header length from a bundle's prefix.
pub fn parse_prefix(prefix: &[u8]) -> Result<u64, BundleError> {
    if prefix.len() < PREFIX_LEN as usize || &prefix[..8] != BUNDLE_MAGIC {
        return Err(BundleError::BadMagic);
    }
    let len = u64::from_le_bytes(prefix[8..16].try_into().expect("8 bytes"));
    if len > MAX_HEADER_LEN {
        return Err(BundleError::HeaderTooLarge(len));
    }
    Ok(len)
}

/// Reads the prefix and header of a bundle.
pub fn read_header(r: &mut impl Read) -> Result<Vec<u8>, BundleError> {
    let mut prefix = [0u8; PREFIX_LEN as usize];
    r.read_exact(&mut prefix).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => BundleError::BadMagic,
        _ => e.into(),
    })?;
    let len = parse_prefix(&prefix)?;
    let mut header = vec![0u8; len as usize];
    r.read_exact(&mut header)?;
    Ok(header)
}

/// A bundle header whose signatures, kind, expiry and structure checked
/// out. Version floors and compatibility are the device's next step.
#[derive(Debug, Clone)]
pub struct VerifiedHeader {
    pub envelope: Envelope,
    pub signed: Signed<BundleManifest>,
    pub header_len: u64,
}

impl VerifiedHeader {
    pub fn verify(keyring: &Keyring, header: &[u8], now: SystemTime) -> Result<Self, BundleError> {
        let envelope = Envelope::from_bytes("update bundle header", header)?;
        let signed: Signed<BundleManifest> =
            keyring.verify(&envelope, BUNDLE_KIND, Role::Updates, now)?;
        signed.body.validate()?;
        Ok(VerifiedHeader {
            envelope,
            signed,
            header_len: header.len() as u64,
        })
    }

    pub fn manifest(&self) -> &BundleManifest {
        &self.signed.body
    }

    pub fn version(&self) -> &Version {
        &self.signed.version
    }

    pub fn check_compatible(&self, device: &str) -> Result<(), BundleError> {
        if self.signed.body.compatible != device {
            return Err(BundleError::Incompatible {
                offered: self.signed.body.compatible.clone(),
                device: device.to_string(),
            });
        }
        Ok(())
    }

    /// sha256 of the signed metadata: what identifies this bundle.
    pub fn digest(&self) -> String {
        self.envelope.digest()
    }
}

/// What a bundle is built from.
#[derive(Debug, Clone)]
pub struct BundleSpec<'a> {
    pub rootfs: &'a Path,
    /// (name, file) of each extra component.
    pub components: Vec<(String, &'a Path)>,
    pub version: Version,
    pub compatible: String,
    pub security_version: u64,
    pub chunk_size: u64,
    pub expires: Option<SystemTime>,
}

/// Hashes one payload file in a single read: the whole and each chunk.
pub fn hash_payload(name: &str, path: &Path, chunk_size: u64) -> Result<Payload, BundleError> {
    let mut f = std::fs::File::open(path)?;
    let mut whole = Sha256::new();
    let mut chunks = Vec::new();
    let mut buf = vec![0u8; chunk_size as usize];
    let mut size = 0u64;
    loop {
        let n = read_full(&mut f, &mut buf)?;
        if n == 0 {
            break;
        }
        whole.update(&buf[..n]);
        chunks.push(hex::encode(Sha256::digest(&buf[..n])));
        size += n as u64;
        if n < buf.len() {
            break;
        }
    }
    Ok(Payload {
        name: name.to_string(),
        size,
        sha256: hex::encode(whole.finalize()),
        chunks,
    })
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
pub fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Signs and writes a bundle to `out` (through a temporary file, so `out`
/// is either absent or whole); returns its manifest.
pub fn create(
    spec: &BundleSpec<'_>,
    keys: &[SecretKey],
    out: &Path,
) -> Result<BundleManifest, BundleError> {
    let mut files: Vec<(String, &Path)> = vec![(ROOTFS.to_string(), spec.rootfs)];
    files.extend(spec.components.iter().cloned());
    let payloads = files
        .iter()
        .map(|(name, path)| hash_payload(name, path, spec.chunk_size))
        .collect::<Result<Vec<_>, _>>()?;
    let manifest = BundleManifest {
        compatible: spec.compatible.clone(),
        security_version: spec.security_version,
        chunk_size: spec.chunk_size,
        payloads,
    };
    manifest.validate()?;
    let env = Envelope::sign(
        BUNDLE_KIND,
        spec.version.clone(),
        spec.expires,
        &manifest,
        keys,
    )?;
    let header = env.to_bytes();
    let spans = manifest.spans(header.len() as u64);
    let mut tmp_name = out.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = out.with_file_name(tmp_name);
    let mut w = std::fs::File::create(&tmp)?;
    w.write_all(&encode_prefix(header.len() as u64))?;
    w.write_all(&header)?;
    for ((_, path), (span, p)) in files.iter().zip(spans.iter().zip(&manifest.payloads)) {
        w.seek(SeekFrom::Start(span.offset))?;
        let copied = std::io::copy(&mut std::fs::File::open(path)?, &mut w)?;
        if copied != p.size {
            return Err(BundleError::Invalid(format!(
                "{} changed while it was being bundled",
                path.display()
            )));
        }
    }
    w.sync_all()?;
    drop(w);
    std::fs::rename(&tmp, out)?;
    Ok(manifest)
}

/// Verifies a whole bundle file: the header against `keyring`, every chunk
/// and every payload's sha256, and that nothing follows the last payload.
pub fn verify_file(
    path: &Path,
    keyring: &Keyring,
    now: SystemTime,
) -> Result<VerifiedHeader, BundleError> {
    let mut f = std::fs::File::open(path)?;
    let header = read_header(&mut f)?;
    let vh = VerifiedHeader::verify(keyring, &header, now)?;
    let m = vh.manifest();
    let file_len = f.metadata()?.len();
    let expected = m.bundle_len(vh.header_len);
    if file_len > expected {
        return Err(BundleError::Oversized {
            size: file_len,
            expected,
        });
    }
    let mut buf = vec![0u8; m.chunk_size as usize];
    for (p, span) in m.payloads.iter().zip(m.spans(vh.header_len)) {
        f.seek(SeekFrom::Start(span.offset))?;
        let mut whole = Sha256::new();
        for i in 0..p.chunks.len() as u64 {
            let want = m.chunk_len(p, i) as usize;
            let got = read_full(&mut f, &mut buf[..want])?;
            if got < want {
                return Err(BundleError::Truncated {
                    payload: p.name.clone(),
                    got: i * m.chunk_size + got as u64,
                    expected: p.size,
                });
            }
            check_chunk(p, i, &buf[..want])?;
            whole.update(&buf[..want]);
        }
        if hex::encode(whole.finalize()) != p.sha256 {
            return Err(TrustError::HashMismatch {
                what: p.name.clone(),
            }
            .into());
        }
    }
    Ok(vh)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pocket_trust::{KeyringBody, PublicKey};
    use std::collections::BTreeMap;

    fn keyring(root: &SecretKey, updates: &SecretKey) -> Keyring {
        let members: Vec<(Role, Vec<PublicKey>)> = vec![
            (Role::Root, vec![root.public().clone()]),
            (Role::Models, vec![root.public().clone()]),
            (Role::Updates, vec![updates.public().clone()]),
        ];
        let body = KeyringBody::new(&members, &BTreeMap::new()).unwrap();
        let env = Keyring::create(body, "1".parse().unwrap(), std::slice::from_ref(root)).unwrap();
        Keyring::anchor(env).unwrap()
    }

    fn bundle(dir: &Path, rootfs_len: usize, key: &SecretKey) -> std::path::PathBuf {
        let rootfs = dir.join("rootfs.img");
        let fw = dir.join("fw.bin");
        std::fs::write(
            &rootfs,
            (0..rootfs_len)
                .map(|i| (i * 7 % 251) as u8)
                .collect::<Vec<_>>(),
        )
        .unwrap();
        std::fs::write(&fw, b"firmware").unwrap();
        let out = dir.join("b.bundle");
        create(
            &BundleSpec {
                rootfs: &rootfs,
                components: vec![("npu-firmware".into(), fw.as_path())],
                version: "2.0".parse().unwrap(),
                compatible: "pocketos-test".into(),
                security_version: 1,
                chunk_size: 4096,
                expires: None,
            },
            std::slice::from_ref(key),
            &out,
        )
        .unwrap();
        out
    }

    #[test]
    fn round_trip_and_layout() {
        let dir = tempfile::tempdir().unwrap();
        let (root, upd) = (SecretKey::generate(), SecretKey::generate());
        let kr = keyring(&root, &upd);
        let path = bundle(dir.path(), 10_000, &upd);
        let vh = verify_file(&path, &kr, SystemTime::now()).unwrap();
        let m = vh.manifest();
        assert_eq!(m.payloads[0].chunks.len(), 3);
        let spans = m.spans(vh.header_len);
        assert_eq!(spans[0].offset % ALIGN, 0);
        assert_eq!(spans[1].offset, align_up(spans[0].offset + 10_000));
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[spans[1].offset as usize..][..8], b"firmware");
        assert_eq!(bytes.len() as u64, m.bundle_len(vh.header_len));
        vh.check_compatible("pocketos-test").unwrap();
        assert!(matches!(
            vh.check_compatible("other"),
            Err(BundleError::Incompatible { .. })
        ));
    }

    #[test]
    fn refuses_wrong_key_tamper_truncation_and_trailing_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (root, upd) = (SecretKey::generate(), SecretKey::generate());
        let kr = keyring(&root, &upd);
        let path = bundle(dir.path(), 10_000, &upd);
        let good = std::fs::read(&path).unwrap();
        let vh = verify_file(&path, &kr, SystemTime::now()).unwrap();
        let spans = vh.manifest().spans(vh.header_len);

        let other = bundle(
            &dir.path().join("..").join(dir.path().file_name().unwrap()),
            10_000,
            &root,
        );
        assert!(matches!(
            verify_file(&other, &kr, SystemTime::now()),
            Err(BundleError::Trust(TrustError::Threshold { .. }))
        ));

        let mut t = good.clone();
        t[spans[0].offset as usize + 5000] ^= 1;
        std::fs::write(&path, &t).unwrap();
        assert!(matches!(
            verify_file(&path, &kr, SystemTime::now()),
            Err(BundleError::ChunkMismatch { index: 1, .. })
        ));

        std::fs::write(&path, &good[..good.len() - 3]).unwrap();
        assert!(matches!(
            verify_file(&path, &kr, SystemTime::now()),
            Err(BundleError::Truncated { .. })
        ));

        let mut t = good.clone();
        t.extend_from_slice(b"extra");
        std::fs::write(&path, &t).unwrap();
        assert!(matches!(
            verify_file(&path, &kr, SystemTime::now()),
            Err(BundleError::Oversized { .. })
        ));

        let mut t = good.clone();
        t[40] ^= 1; // inside the signed header text
        std::fs::write(&path, &t).unwrap();
        assert!(verify_file(&path, &kr, SystemTime::now()).is_err());
    }
}
