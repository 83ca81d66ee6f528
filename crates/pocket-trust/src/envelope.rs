use crate::{format_time, KeyId, SecretKey, TrustError, Version};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::time::SystemTime;

const DOMAIN: &[u8] = b"pocketos-signed-v1\0";

/// Signed metadata as it travels: the exact JSON text that was signed, and
/// the signatures over it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub signed: String,
    pub signatures: Vec<Signature>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    pub keyid: KeyId,
    pub sig: String,
}

/// The common header every piece of signed metadata carries, around its
/// kind-specific body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signed<T> {
    pub kind: String,
    pub version: Version,
    /// RFC 3339; `None` for metadata that never expires (a model pack on a
    /// USB stick stays installable).
    pub expires: Option<String>,
    pub body: T,
}

impl<T> Signed<T> {
    pub fn expired(&self, now: SystemTime) -> Result<(), TrustError> {
        let Some(expires) = &self.expires else {
            return Ok(());
        };
        let at = humantime::parse_rfc3339_weak(expires)
            .map_err(|e| TrustError::malformed(format!("{} expiry", self.kind), e))?;
        if now >= at {
            return Err(TrustError::Expired {
                kind: self.kind.clone(),
                expires: expires.clone(),
                now: crate::format_time(now),
            });
        }
        Ok(())
    }
}

pub(crate) fn message(kind: &str, signed: &str) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(DOMAIN);
    h.update(kind.as_bytes());
    h.update([0]);
    h.update(signed.as_bytes());
    h.finalize().to_vec()
}

impl Envelope {
    /// Signs `body` as `kind` metadata with every key in `keys`.
    pub fn sign<T: Serialize>(
        kind: &str,
        version: Version,
        expires: Option<SystemTime>,
        body: T,
        keys: &[SecretKey],
    ) -> Result<Envelope, TrustError> {
        let signed = Signed {
            kind: kind.to_string(),
            version,
            expires: expires.map(format_time),
            body,
        };
        let text = serde_json::to_string(&signed).map_err(|e| TrustError::malformed(kind, e))?;
        let msg = message(kind, &text);
        let signatures = keys
            .iter()
            .map(|k| Signature {
                keyid: k.id().clone(),
                sig: hex::encode(k.sign(&msg)),
            })
            .collect();
        Ok(Envelope {
            signed: text,
            signatures,
        })
    }

    pub fn from_bytes(what: &str, bytes: &[u8]) -> Result<Envelope, TrustError> {
        serde_json::from_slice(bytes).map_err(|e| TrustError::malformed(what, e))
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("an envelope always serialises")
    }

    /// Parses the signed text without checking any signature; only for
    /// showing what a file claims, never for acting on it.
    pub fn peek<T: DeserializeOwned>(&self) -> Result<Signed<T>, TrustError> {
        serde_json::from_str(&self.signed).map_err(|e| TrustError::malformed("metadata", e))
    }

    /// sha256 of the signed text: what a version floor remembers so that a
    /// version cannot be reused for other contents.
    pub fn digest(&self) -> String {
        crate::sha256_hex(self.signed.as_bytes())
    }
}
