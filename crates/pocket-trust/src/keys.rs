use crate::TrustError;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use std::path::{Path, PathBuf};

/// A key's name: the first 16 bytes of the sha256 of its public key, in hex.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct KeyId(pub String);

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn key_id(public: &VerifyingKey) -> KeyId {
    KeyId(crate::sha256_hex(public.as_bytes())[..32].to_string())
}

/// A public key as kept in a keyring or a `<keyid>.pub` file (hex text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    id: KeyId,
    key: VerifyingKey,
}

impl PublicKey {
    pub fn from_hex(text: &str) -> Result<Self, TrustError> {
        let bytes: [u8; 32] = hex::decode(text.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| TrustError::malformed("public key", "expected 64 hex digits"))?;
        let key =
            VerifyingKey::from_bytes(&bytes).map_err(|e| TrustError::malformed("public key", e))?;
        Ok(PublicKey {
            id: key_id(&key),
            key,
        })
    }

    pub fn load(path: &Path) -> Result<Self, TrustError> {
        let text = read(path)?;
        Self::from_hex(&text).map_err(|e| TrustError::malformed(path.display().to_string(), e))
    }

    pub fn id(&self) -> &KeyId {
        &self.id
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.key.as_bytes())
    }

    pub(crate) fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        let Ok(sig) = ed25519_dalek::Signature::from_slice(signature) else {
            return false;
        };
        self.key.verify_strict(message, &sig).is_ok()
    }
}

/// A signing key, kept as the hex of its 32-byte seed in `<keyid>.secret`.
pub struct SecretKey {
    key: SigningKey,
    public: PublicKey,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretKey({})", self.public.id)
    }
}

impl SecretKey {
    pub fn generate() -> Self {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).expect("the kernel's random source is available");
        Self::from_seed(seed)
    }

    pub fn from_seed(seed: [u8; 32]) -> Self {
        let key = SigningKey::from_bytes(&seed);
        let verifying = key.verifying_key();
        SecretKey {
            public: PublicKey {
                id: key_id(&verifying),
                key: verifying,
            },
            key,
        }
    }

    pub fn load(path: &Path) -> Result<Self, TrustError> {
        let text = read(path)?;
        let seed: [u8; 32] = hex::decode(text.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| {
                TrustError::malformed(path.display().to_string(), "expected 64 hex digits")
            })?;
        Ok(Self::from_seed(seed))
    }

    /// Writes `<keyid>.secret` (mode 0600) and `<keyid>.pub` into `dir` and
    /// returns their paths.
    pub fn save(&self, dir: &Path) -> Result<(PathBuf, PathBuf), TrustError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(dir).map_err(|source| TrustError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        let secret = dir.join(format!("{}.secret", self.public.id));
        let public = dir.join(format!("{}.pub", self.public.id));
        let write_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TrustError::Write { path, source }
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&secret)
            .map_err(write_err(&secret))?;
        writeln!(f, "{}", hex::encode(self.key.to_bytes())).map_err(write_err(&secret))?;
        std::fs::write(&public, format!("{}\n", self.public.to_hex()))
            .map_err(write_err(&public))?;
        Ok((secret, public))
    }

    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    pub fn id(&self) -> &KeyId {
        &self.public.id
    }

    pub(crate) fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.key.sign(message).to_bytes().to_vec()
    }
}

fn read(path: &Path) -> Result<String, TrustError> {
    std::fs::read_to_string(path).map_err(|source| TrustError::Read {
        path: path.to_path_buf(),
        source,
    })
}
