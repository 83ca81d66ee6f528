use crate::TrustError;
use sha2::{Digest, Sha256};

/// Checks one payload against its signed length and sha256 while it
/// streams, so nothing is read twice and nothing unverified is used.
#[derive(Debug, Clone)]
pub struct PayloadVerifier {
    what: String,
    expected_len: u64,
    expected_sha256: String,
    seen: u64,
    hasher: Sha256,
}

impl PayloadVerifier {
    pub fn new(what: impl Into<String>, expected_len: u64, expected_sha256: &str) -> Self {
        PayloadVerifier {
            what: what.into(),
            expected_len,
            expected_sha256: expected_sha256.to_ascii_lowercase(),
            seen: 0,
            hasher: Sha256::new(),
        }
    }

    /// Bytes still expected.
    pub fn remaining(&self) -> u64 {
        self.expected_len - self.seen
    }

    pub fn seen(&self) -> u64 {
        self.seen
    }

    pub fn update(&mut self, chunk: &[u8]) -> Result<(), TrustError> {
        if chunk.len() as u64 > self.remaining() {
            return Err(TrustError::Oversized {
                what: self.what.clone(),
                expected: self.expected_len,
            });
        }
        self.seen += chunk.len() as u64;
        self.hasher.update(chunk);
        Ok(())
    }

    pub fn finish(self) -> Result<(), TrustError> {
        if self.seen < self.expected_len {
            return Err(TrustError::Truncated {
                what: self.what,
                got: self.seen,
                expected: self.expected_len,
            });
        }
        if hex::encode(self.hasher.finalize()) != self.expected_sha256 {
            return Err(TrustError::HashMismatch { what: self.what });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn accepts_exact_payload_in_pieces() {
        let mut v = PayloadVerifier::new("x", 3, ABC);
        v.update(b"a").unwrap();
        v.update(b"bc").unwrap();
        v.finish().unwrap();
    }

    #[test]
    fn refuses_truncated_oversized_and_tampered() {
        let mut v = PayloadVerifier::new("x", 3, ABC);
        v.update(b"ab").unwrap();
        assert!(matches!(
            v.finish(),
            Err(TrustError::Truncated { got: 2, .. })
        ));
        let mut v = PayloadVerifier::new("x", 3, ABC);
        assert!(matches!(
            v.update(b"abcd"),
            Err(TrustError::Oversized { .. })
        ));
        let mut v = PayloadVerifier::new("x", 3, ABC);
        v.update(b"abd").unwrap();
        assert!(matches!(v.finish(), Err(TrustError::HashMismatch { .. })));
    }
}
