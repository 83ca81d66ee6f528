//! The model pack and catalog formats.
//!
//! A **pack** is one file that carries a model from the publisher to the
//! box, over HTTP or on a USB stick:
//!
//! ```text
//! "PKTPACK1" | header length (u64 LE) | header | file 1 | file 2 | ...
//! ```
//!
//! The header is a signed [`Envelope`] of kind `model-pack` whose body is a
//! [`PackManifest`]; the files follow in manifest order, each exactly
//! `size` bytes with the manifest's sha256. A **catalog** is a signed
//! envelope of kind `catalog` listing [`CatalogEntry`]s; each entry binds the
//! pack's header by length and sha256, so one hash per byte is enough to trust
//! a pack fetched through a catalog.

use pocket_trust::{Envelope, Keyring, Role, Signed, TrustError, Version};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::time::SystemTime;

pub const PACK_MAGIC: &[u8; 8] = b"PKTPACK1";
/// Magic plus the header length.
pub const PACK_PREFIX_LEN: usize = 16;
pub const PACK_KIND: &str = "model-pack";
pub const CATALOG_KIND: &str = "catalog";
/// The catalog's file name inside a catalog directory or under a base URL.
pub const CATALOG_FILE: &str = "catalog.json";
/// Largest header accepted, so that a hostile stream cannot make the box
/// buffer without bound before anything is verified.
pub const MAX_HEADER_LEN: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error(transparent)]
    Trust(#[from] TrustError),
    #[error("not a model pack (bad magic)")]
    BadMagic,
    #[error("model pack header of {0} bytes is larger than the {MAX_HEADER_LEN} allowed")]
    HeaderTooLarge(u64),
    #[error("model pack is invalid: {0}")]
    Invalid(String),
    #[error("model pack does not match the catalog: {0}")]
    CatalogMismatch(String),
    #[error("reading the pack: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PackFile {
    /// Relative path inside the model's directory, `/`-separated.
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

/// Tokens of KV cache counted for an LLM before it is downloaded: one
/// sequence of this many tokens (or the model's context, if shorter).
/// npud counts its own configured sequences and context at load.
pub const FIT_CONTEXT: u64 = 2048;

/// What the memory checks need to know of a language model: its KV cache
/// per token follows from these.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LlmInfo {
    pub context_length: u64,
    pub layers: u64,
    pub kv_heads: u64,
    pub head_size: u64,
    /// `f32` or `f16`.
    pub kv_dtype: String,
}

impl LlmInfo {
    fn validate(&self) -> Result<(), FormatError> {
        let ok = (1..=1 << 20).contains(&self.context_length)
            && (1..=1024).contains(&self.layers)
            && (1..=1024).contains(&self.kv_heads)
            && (1..=4096).contains(&self.head_size)
            && matches!(self.kv_dtype.as_str(), "f32" | "f16");
        match ok {
            true => Ok(()),
            false => Err(FormatError::Invalid(format!(
                "implausible LLM shape {self:?}"
            ))),
        }
    }

    /// Bytes of KV cache one token takes in one sequence.
    pub fn kv_bytes_per_token(&self) -> u64 {
        let elem = if self.kv_dtype == "f16" { 2 } else { 4 };
        2 * self.layers * self.kv_heads * self.head_size * elem
    }

    /// KV bytes of one sequence of [`FIT_CONTEXT`] tokens (or the context).
    pub fn fit_kv_bytes(&self) -> u64 {
        self.kv_bytes_per_token() * self.context_length.min(FIT_CONTEXT)
    }
}

fn default_kind() -> String {
    "onnx".into()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PackManifest {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// `onnx` (a model run in one pass) or `llm` (an onnxruntime-genai
    /// folder, with `llm` set).
    #[serde(default = "default_kind")]
    pub kind: String,
    /// The file a runtime loads (the `.onnx` graph).
    pub entry: String,
    /// Memory the model needs when loaded, in bytes (an LLM's weights; its
    /// KV cache is counted from `llm`).
    pub memory_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub llm: Option<LlmInfo>,
    pub files: Vec<PackFile>,
}

impl PackManifest {
    pub fn size_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// Memory to check before a download: the weights and, for an LLM,
    /// one sequence's KV cache ([`LlmInfo::fit_kv_bytes`]).
    pub fn memory_needed(&self) -> u64 {
        self.memory_bytes
            .saturating_add(self.llm.as_ref().map_or(0, LlmInfo::fit_kv_bytes))
    }

    /// Structural checks every consumer makes before trusting a manifest:
    /// a sane name, paths that stay inside the model's directory, no
    /// duplicates, and an entry that is one of the files.
    pub fn validate(&self) -> Result<(), FormatError> {
        validate_name(&self.name)?;
        let mut seen = std::collections::BTreeSet::new();
        for f in &self.files {
            validate_path(&f.path)?;
            if !seen.insert(f.path.as_str()) {
                return Err(FormatError::Invalid(format!(
                    "file {:?} is listed twice",
                    f.path
                )));
            }
            if !is_sha256(&f.sha256) {
                return Err(FormatError::Invalid(format!(
                    "file {:?} has a bad sha256",
                    f.path
                )));
            }
        }
        // A file cannot also be a directory of another ("a" and "a/b").
        for f in &self.files {
            let dir = format!("{}/", f.path);
            if let Some(other) = self.files.iter().find(|g| g.path.starts_with(&dir)) {
                return Err(FormatError::Invalid(format!(
                    "file {:?} is also the directory of {:?}",
                    f.path, other.path
                )));
            }
        }
        if !seen.contains(self.entry.as_str()) {
            return Err(FormatError::Invalid(format!(
                "entry {:?} is not one of the files",
                self.entry
            )));
        }
        match (self.kind.as_str(), &self.llm) {
            ("onnx", None) => Ok(()),
            ("llm", Some(info)) => info.validate(),
            (kind, _) => Err(FormatError::Invalid(format!(
                "kind {kind:?} with{} LLM shape",
                if self.llm.is_some() { "" } else { "out" }
            ))),
        }
    }
}

/// 64 lower-case hex digits.
pub fn is_sha256(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A model name: lower-case letters, digits, `.`, `_` and `-`, starting with
/// a letter or digit.
pub fn validate_name(name: &str) -> Result<(), FormatError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(FormatError::Invalid(format!(
            "model name {name:?} must be 1-64 of a-z, 0-9, '.', '_', '-'"
        )))
    }
}

/// A file path inside a pack: relative, no `..`, no empty or `.` parts.
pub fn validate_path(path: &str) -> Result<(), FormatError> {
    let bad = path.is_empty()
        || path.starts_with('/')
        || path.contains('\\')
        || path.contains('\0')
        || path
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..");
    if bad {
        Err(FormatError::Invalid(format!(
            "file {path:?} is outside the model's directory"
        )))
    } else {
        Ok(())
    }
}

/// Where a catalog finds a pack and what its header must be.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PackRef {
    /// Relative to the catalog's base URL or directory.
    pub path: String,
    /// Total length of the pack file.
    pub size: u64,
    pub header_size: u64,
    pub header_sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CatalogEntry {
    pub name: String,
    pub version: Version,
    #[serde(default)]
    pub description: String,
    /// Bytes the model takes on disk once installed.
    pub size_bytes: u64,
    pub memory_bytes: u64,
    /// A language model's shape, as its pack's manifest says (checked
    /// against it at install).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub llm: Option<LlmInfo>,
    pub pack: PackRef,
}

impl CatalogEntry {
    /// Memory to check before a download (see [`PackManifest::memory_needed`]).
    pub fn memory_needed(&self) -> u64 {
        self.memory_bytes
            .saturating_add(self.llm.as_ref().map_or(0, LlmInfo::fit_kv_bytes))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    pub models: Vec<CatalogEntry>,
}

impl Catalog {
    pub fn verify(
        keyring: &Keyring,
        envelope: &Envelope,
        now: SystemTime,
    ) -> Result<Signed<Catalog>, FormatError> {
        let signed: Signed<Catalog> = keyring.verify(envelope, CATALOG_KIND, Role::Models, now)?;
        for e in &signed.body.models {
            validate_name(&e.name)?;
            validate_path(&e.pack.path)?;
            if !is_sha256(&e.pack.header_sha256) {
                return Err(FormatError::Invalid(format!(
                    "catalog entry {:?} has a bad header sha256",
                    e.name
                )));
            }
        }
        Ok(signed)
    }

    pub fn get(&self, name: &str) -> Option<&CatalogEntry> {
        self.models
            .iter()
            .filter(|e| e.name == name)
            .max_by(|a, b| a.version.cmp(&b.version))
    }
}

/// Reads the pack prefix and returns the header length it announces.
pub fn parse_prefix(prefix: &[u8; PACK_PREFIX_LEN]) -> Result<u64, FormatError> {
    if &prefix[..8] != PACK_MAGIC {
        return Err(FormatError::BadMagic);
    }
    let len = u64::from_le_bytes(prefix[8..].try_into().expect("8 bytes"));
    if len > MAX_HEADER_LEN {
        return Err(FormatError::HeaderTooLarge(len));
    }
    Ok(len)
}

pub fn encode_prefix(header_len: u64) -> [u8; PACK_PREFIX_LEN] {
    let mut p = [0u8; PACK_PREFIX_LEN];
    p[..8].copy_from_slice(PACK_MAGIC);
    p[8..].copy_from_slice(&header_len.to_le_bytes());
    p
}

/// Verifies a pack header: signed by the models role, not expired, and a
/// well-formed manifest.
pub fn verify_header(
    keyring: &Keyring,
    header: &[u8],
    now: SystemTime,
) -> Result<Signed<PackManifest>, FormatError> {
    let env = Envelope::from_bytes("model pack header", header)?;
    let signed: Signed<PackManifest> = keyring.verify(&env, PACK_KIND, Role::Models, now)?;
    signed.body.validate()?;
    Ok(signed)
}

/// Checks that a pack header is byte for byte the one a catalog entry
/// promised; cheaper than a signature check, so it comes first.
pub fn check_header_bytes(entry: &CatalogEntry, header: &[u8]) -> Result<(), FormatError> {
    if header.len() as u64 != entry.pack.header_size
        || pocket_trust::sha256_hex(header) != entry.pack.header_sha256
    {
        return Err(FormatError::CatalogMismatch(
            "header differs from the signed catalog".into(),
        ));
    }
    Ok(())
}

/// Checks that a verified pack header is the one a catalog entry promised.
pub fn check_against_catalog(
    entry: &CatalogEntry,
    header: &[u8],
    manifest: &Signed<PackManifest>,
) -> Result<(), FormatError> {
    check_header_bytes(entry, header)?;
    if manifest.body.name != entry.name || manifest.version != entry.version {
        return Err(FormatError::CatalogMismatch(format!(
            "pack is {} {} but the catalog lists {} {}",
            manifest.body.name, manifest.version, entry.name, entry.version
        )));
    }
    if manifest.body.llm != entry.llm {
        return Err(FormatError::CatalogMismatch(format!(
            "the pack's LLM shape {:?} is not the catalog's {:?}",
            manifest.body.llm, entry.llm
        )));
    }
    Ok(())
}

/// Builds a pack header envelope for `manifest` signed by `keys`.
pub fn sign_pack(
    manifest: &PackManifest,
    version: Version,
    expires: Option<SystemTime>,
    keys: &[pocket_trust::SecretKey],
) -> Result<Envelope, FormatError> {
    manifest.validate()?;
    Ok(Envelope::sign(PACK_KIND, version, expires, manifest, keys)?)
}

/// Reads a whole pack from `reader`, verifying everything, and calls `sink`
/// with each file's bytes as they stream. Used by `pocket-publish verify`;
/// modeld has its own resumable, storing reader.
pub fn read_pack(
    keyring: &Keyring,
    mut reader: impl Read,
    now: SystemTime,
    mut sink: impl FnMut(&PackFile, &[u8]) -> std::io::Result<()>,
) -> Result<Signed<PackManifest>, FormatError> {
    let mut prefix = [0u8; PACK_PREFIX_LEN];
    read_exact_or_truncated(&mut reader, &mut prefix, "pack prefix")?;
    let len = parse_prefix(&prefix)?;
    let mut header = vec![0u8; len as usize];
    read_exact_or_truncated(&mut reader, &mut header, "pack header")?;
    let manifest = verify_header(keyring, &header, now)?;
    let mut buf = vec![0u8; 1 << 20];
    for f in &manifest.body.files {
        let mut v = pocket_trust::PayloadVerifier::new(&f.path, f.size, &f.sha256);
        while v.remaining() > 0 {
            let want = (v.remaining() as usize).min(buf.len());
            let n = reader.read(&mut buf[..want])?;
            if n == 0 {
                break;
            }
            v.update(&buf[..n])?;
            sink(f, &buf[..n])?;
        }
        v.finish()?;
    }
    if reader.read(&mut buf[..1])? != 0 {
        return Err(TrustError::Oversized {
            what: "model pack".into(),
            expected: PACK_PREFIX_LEN as u64 + len + manifest.body.size_bytes(),
        }
        .into());
    }
    Ok(manifest)
}

fn read_exact_or_truncated(
    reader: &mut impl Read,
    buf: &mut [u8],
    what: &str,
) -> Result<(), FormatError> {
    reader.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => FormatError::Trust(TrustError::Truncated {
            what: what.into(),
            got: 0,
            expected: buf.len() as u64,
        }),
        _ => FormatError::Io(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_outside_the_model_are_refused() {
        for bad in [
            "../x",
            "/etc/passwd",
            "a/../../b",
            "a//b",
            "./a",
            "",
            "a\\b",
        ] {
            assert!(validate_path(bad).is_err(), "{bad:?}");
        }
        for good in ["model.onnx", "weights/part1.bin", "a.b/c-d_e"] {
            validate_path(good).unwrap();
        }
    }

    #[test]
    fn names_are_plain() {
        assert!(validate_name("mlp-tiny").is_ok());
        assert!(validate_name("Mlp").is_err());
        assert!(validate_name("-x").is_err());
        assert!(validate_name("a/b").is_err());
    }

    #[test]
    fn prefix_round_trips_and_bounds_header() {
        assert_eq!(parse_prefix(&encode_prefix(42)).unwrap(), 42);
        assert!(matches!(
            parse_prefix(&encode_prefix(MAX_HEADER_LEN + 1)),
            Err(FormatError::HeaderTooLarge(_))
        ));
        let mut p = encode_prefix(1);
        p[0] = b'X';
        assert!(matches!(parse_prefix(&p), Err(FormatError::BadMagic)));
    }
}

#[cfg(test)]
mod catalog_tests {
    use super::*;
    use pocket_trust::{KeyringBody, SecretKey};

    #[test]
    fn a_header_hash_that_is_not_hex_is_refused() {
        let root = SecretKey::from_seed([1; 32]);
        let models = SecretKey::from_seed([2; 32]);
        let body = KeyringBody::new(
            &[
                (Role::Root, vec![root.public().clone()]),
                (Role::Models, vec![models.public().clone()]),
                (Role::Updates, vec![root.public().clone()]),
            ],
            &Default::default(),
        )
        .unwrap();
        let env = Keyring::create(body, "1".parse().unwrap(), std::slice::from_ref(&root)).unwrap();
        let keyring = Keyring::anchor(env).unwrap();
        let entry = |sha: &str| CatalogEntry {
            name: "m".into(),
            version: "1".parse().unwrap(),
            description: String::new(),
            size_bytes: 1,
            memory_bytes: 1,
            llm: None,
            pack: PackRef {
                path: "packs/m.pack".into(),
                size: 10,
                header_size: 5,
                header_sha256: sha.into(),
            },
        };
        let sign = |sha: &str| {
            Envelope::sign(
                CATALOG_KIND,
                "1".parse().unwrap(),
                None,
                Catalog {
                    models: vec![entry(sha)],
                },
                std::slice::from_ref(&models),
            )
            .unwrap()
        };
        let now = SystemTime::now();
        assert!(Catalog::verify(&keyring, &sign(&"ab".repeat(32)), now).is_ok());
        for bad in ["x/../../../../..", "é", &"AB".repeat(32)] {
            assert!(
                Catalog::verify(&keyring, &sign(bad), now).is_err(),
                "{bad:?}"
            );
        }
    }
}
