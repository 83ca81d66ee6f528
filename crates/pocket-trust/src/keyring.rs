use crate::envelope::message;
use crate::{Envelope, KeyId, PublicKey, Role, SecretKey, Signed, TrustError, Version};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::SystemTime;

/// The file name of a keyring inside a keyring directory.
pub const KEYRING_FILE: &str = "keyring.json";
const KIND: &str = "keyring";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RoleKeys {
    pub keyids: Vec<KeyId>,
    pub threshold: usize,
}

/// What a keyring says: every key, and for each role which keys count and
/// how many of them must sign.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyringBody {
    pub keys: BTreeMap<KeyId, String>,
    pub roles: BTreeMap<Role, RoleKeys>,
}

impl KeyringBody {
    /// Builds a keyring body from the keys of each role and optional
    /// thresholds (default 1).
    pub fn new(
        members: &[(Role, Vec<PublicKey>)],
        thresholds: &BTreeMap<Role, usize>,
    ) -> Result<Self, TrustError> {
        let mut keys = BTreeMap::new();
        let mut roles = BTreeMap::new();
        for role in Role::ALL {
            let pubs: Vec<&PublicKey> = members
                .iter()
                .filter(|(r, _)| *r == role)
                .flat_map(|(_, k)| k.iter())
                .collect();
            let threshold = thresholds.get(&role).copied().unwrap_or(1);
            if pubs.is_empty() {
                return Err(TrustError::malformed(
                    "keyring",
                    format!("no {role} keys given"),
                ));
            }
            let ids: BTreeSet<KeyId> = pubs.iter().map(|k| k.id().clone()).collect();
            if threshold == 0 || threshold > ids.len() {
                return Err(TrustError::malformed(
                    "keyring",
                    format!(
                        "{role} threshold {threshold} must be between 1 and {}",
                        ids.len()
                    ),
                ));
            }
            for k in pubs {
                keys.insert(k.id().clone(), k.to_hex());
            }
            roles.insert(
                role,
                RoleKeys {
                    keyids: ids.into_iter().collect(),
                    threshold,
                },
            );
        }
        Ok(KeyringBody { keys, roles })
    }
}

/// A verified keyring: the trust anchor every signature is checked against.
#[derive(Debug, Clone)]
pub struct Keyring {
    envelope: Envelope,
    version: Version,
    keys: BTreeMap<KeyId, PublicKey>,
    roles: BTreeMap<Role, RoleKeys>,
}

impl Keyring {
    /// Signs a new keyring. For a first keyring `keys` are its own root keys;
    /// for a rotation they must also include a threshold of the current
    /// root keys. A keyring never expires: a box whose clock is wrong, or
    /// that was off for a year, must still trust its root; keys are
    /// revoked by rotation.
    pub fn create(
        body: KeyringBody,
        version: Version,
        keys: &[SecretKey],
    ) -> Result<Envelope, TrustError> {
        Envelope::sign(KIND, version, None, body, keys)
    }

    /// Accepts a keyring by placement (it came from the read-only rootfs),
    /// after checking that it is well formed and signed by a threshold of
    /// its own root keys.
    pub fn anchor(envelope: Envelope) -> Result<Keyring, TrustError> {
        let signed: Signed<KeyringBody> = serde_json::from_str(&envelope.signed)
            .map_err(|e| TrustError::malformed("keyring", e))?;
        let keyring = Self::from_signed(envelope, signed)?;
        keyring.check_signatures(&keyring.envelope, KIND, Role::Root)?;
        keyring.verify_signed::<KeyringBody>(&keyring.envelope, KIND, Role::Root)?;
        Ok(keyring)
    }

    /// Loads `dir/keyring.json` as the trust anchor.
    pub fn load_dir(dir: &Path) -> Result<Keyring, TrustError> {
        let path = dir.join(KEYRING_FILE);
        let bytes = std::fs::read(&path).map_err(|source| TrustError::Read {
            path: path.clone(),
            source,
        })?;
        Self::anchor(Envelope::from_bytes("keyring", &bytes)?).map_err(|e| match e {
            TrustError::Malformed { detail, .. } => {
                TrustError::malformed(path.display().to_string(), detail)
            }
            other => other,
        })
    }

    fn from_signed(envelope: Envelope, signed: Signed<KeyringBody>) -> Result<Keyring, TrustError> {
        if signed.kind != KIND {
            return Err(TrustError::WrongKind {
                expected: KIND.into(),
                found: signed.kind,
            });
        }
        let mut keys = BTreeMap::new();
        for (id, hex) in &signed.body.keys {
            let key = PublicKey::from_hex(hex)?;
            if key.id() != id {
                return Err(TrustError::malformed(
                    "keyring",
                    format!("key {id} does not match its id"),
                ));
            }
            keys.insert(id.clone(), key);
        }
        for role in Role::ALL {
            let rk = signed
                .body
                .roles
                .get(&role)
                .ok_or_else(|| TrustError::malformed("keyring", format!("no {role} role")))?;
            if rk.threshold == 0 || rk.threshold > rk.keyids.len() {
                return Err(TrustError::malformed(
                    "keyring",
                    format!("bad {role} threshold"),
                ));
            }
            if let Some(missing) = rk.keyids.iter().find(|id| !keys.contains_key(*id)) {
                return Err(TrustError::malformed(
                    "keyring",
                    format!("{role} names unknown key {missing}"),
                ));
            }
        }
        Ok(Keyring {
            envelope,
            version: signed.version,
            keys,
            roles: signed.body.roles,
        })
    }

    pub fn version(&self) -> &Version {
        &self.version
    }

    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    pub fn role(&self, role: Role) -> &RoleKeys {
        &self.roles[&role]
    }

    /// Checks `envelope` as `kind` metadata signed by `role`, and that it has
    /// not expired. Version floors are the caller's next step.
    pub fn verify<T: DeserializeOwned>(
        &self,
        envelope: &Envelope,
        kind: &str,
        role: Role,
        now: SystemTime,
    ) -> Result<Signed<T>, TrustError> {
        let signed = self.verify_signed::<T>(envelope, kind, role)?;
        signed.expired(now)?;
        Ok(signed)
    }

    /// [`Keyring::verify`] without the expiry: for keyrings, which never
    /// expire (an expiry an earlier signer put in one is not enforced, so
    /// a box holding such a keyring is never locked out by its clock).
    fn verify_signed<T: DeserializeOwned>(
        &self,
        envelope: &Envelope,
        kind: &str,
        role: Role,
    ) -> Result<Signed<T>, TrustError> {
        self.check_signatures(envelope, kind, role)?;
        let signed: Signed<T> = serde_json::from_str(&envelope.signed)
            .map_err(|e| TrustError::malformed(format!("{kind} metadata"), e))?;
        if signed.kind != kind {
            return Err(TrustError::WrongKind {
                expected: kind.into(),
                found: signed.kind,
            });
        }
        Ok(signed)
    }

    fn check_signatures(
        &self,
        envelope: &Envelope,
        kind: &str,
        role: Role,
    ) -> Result<(), TrustError> {
        let rk = self.role(role);
        let msg = message(kind, &envelope.signed);
        let mut good = BTreeSet::new();
        for s in &envelope.signatures {
            if !rk.keyids.contains(&s.keyid) {
                continue;
            }
            let Some(key) = self.keys.get(&s.keyid) else {
                continue;
            };
            let Ok(sig) = hex::decode(&s.sig) else {
                continue;
            };
            if key.verify(&msg, &sig) {
                good.insert(s.keyid.clone());
            }
        }
        if good.len() < rk.threshold {
            return Err(TrustError::Threshold {
                kind: kind.into(),
                role: role.to_string(),
                valid: good.len(),
                threshold: rk.threshold,
            });
        }
        Ok(())
    }

    /// Accepts the next keyring: it must be newer, signed by a threshold of
    /// this keyring's root keys (the chain) and by a threshold of its own
    /// root keys (its new owners agree).
    pub fn rotate(&self, next: Envelope) -> Result<Keyring, TrustError> {
        let signed: Signed<KeyringBody> = self.verify_signed(&next, KIND, Role::Root)?;
        if signed.version <= self.version {
            return Err(TrustError::Downgrade {
                what: "keyring".into(),
                offered: signed.version.to_string(),
                floor: self.version.to_string(),
            });
        }
        let keyring = Self::from_signed(next, signed)?;
        keyring.check_signatures(&keyring.envelope, KIND, Role::Root)?;
        Ok(keyring)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SecretKey {
        SecretKey::from_seed([n; 32])
    }

    fn ring(
        root: &[&SecretKey],
        models: &[&SecretKey],
        th: usize,
        version: &str,
        sign: &[SecretKey],
    ) -> Envelope {
        let pubs = |ks: &[&SecretKey]| ks.iter().map(|k| k.public().clone()).collect::<Vec<_>>();
        let body = KeyringBody::new(
            &[
                (Role::Root, pubs(root)),
                (Role::Models, pubs(models)),
                (Role::Updates, pubs(models)),
            ],
            &BTreeMap::from([(Role::Models, th)]),
        )
        .unwrap();
        Keyring::create(body, version.parse().unwrap(), sign).unwrap()
    }

    fn now() -> SystemTime {
        SystemTime::now()
    }

    #[test]
    fn metadata_needs_threshold_of_role_keys() {
        let (r, m1, m2, other) = (key(1), key(2), key(3), key(4));
        let kr = Keyring::anchor(ring(&[&r], &[&m1, &m2], 2, "1", &[key(1)])).unwrap();
        let one = Envelope::sign("catalog", "1".parse().unwrap(), None, 5u32, &[key(2)]).unwrap();
        let err = kr
            .verify::<u32>(&one, "catalog", Role::Models, now())
            .unwrap_err();
        assert!(
            matches!(
                err,
                TrustError::Threshold {
                    valid: 1,
                    threshold: 2,
                    ..
                }
            ),
            "{err}"
        );
        // The same key twice still counts once.
        let twice = Envelope::sign(
            "catalog",
            "1".parse().unwrap(),
            None,
            5u32,
            &[key(2), key(2)],
        )
        .unwrap();
        assert!(kr
            .verify::<u32>(&twice, "catalog", Role::Models, now())
            .is_err());
        // A root key or an unknown key does not count for the models role.
        let wrong = Envelope::sign(
            "catalog",
            "1".parse().unwrap(),
            None,
            5u32,
            &[key(2), key(1), other],
        )
        .unwrap();
        assert!(kr
            .verify::<u32>(&wrong, "catalog", Role::Models, now())
            .is_err());
        let two = Envelope::sign(
            "catalog",
            "1".parse().unwrap(),
            None,
            5u32,
            &[key(2), key(3)],
        )
        .unwrap();
        assert_eq!(
            kr.verify::<u32>(&two, "catalog", Role::Models, now())
                .unwrap()
                .body,
            5
        );
    }

    #[test]
    fn tampered_text_and_wrong_kind_are_refused() {
        let r = key(1);
        let kr = Keyring::anchor(ring(&[&r], &[&key(2)], 1, "1", &[key(1)])).unwrap();
        let mut env =
            Envelope::sign("catalog", "1".parse().unwrap(), None, 5u32, &[key(2)]).unwrap();
        assert!(kr
            .verify::<u32>(&env, "model-pack", Role::Models, now())
            .is_err());
        env.signed = env.signed.replace(":5", ":6");
        assert!(matches!(
            kr.verify::<u32>(&env, "catalog", Role::Models, now()),
            Err(TrustError::Threshold { valid: 0, .. })
        ));
    }

    #[test]
    fn expired_metadata_is_refused() {
        let kr = Keyring::anchor(ring(&[&key(1)], &[&key(2)], 1, "1", &[key(1)])).unwrap();
        let past = now() - std::time::Duration::from_secs(10);
        let env =
            Envelope::sign("catalog", "1".parse().unwrap(), Some(past), 5u32, &[key(2)]).unwrap();
        assert!(matches!(
            kr.verify::<u32>(&env, "catalog", Role::Models, now()),
            Err(TrustError::Expired { .. })
        ));
    }

    #[test]
    fn rotation_needs_old_and_new_root_threshold() {
        let kr = Keyring::anchor(ring(&[&key(1)], &[&key(2)], 1, "1", &[key(1)])).unwrap();
        // New root key 9 signs alone: not chained to the current root.
        let alone = ring(&[&key(9)], &[&key(8)], 1, "2", &[key(9)]);
        assert!(matches!(
            kr.rotate(alone),
            Err(TrustError::Threshold { .. })
        ));
        // Old root signs but the new root does not agree.
        let unagreed = ring(&[&key(9)], &[&key(8)], 1, "2", &[key(1)]);
        assert!(matches!(
            kr.rotate(unagreed),
            Err(TrustError::Threshold { .. })
        ));
        // Both sign, but the version does not move forward.
        let same = ring(&[&key(9)], &[&key(8)], 1, "1", &[key(1), key(9)]);
        assert!(matches!(kr.rotate(same), Err(TrustError::Downgrade { .. })));
        let next = kr
            .rotate(ring(&[&key(9)], &[&key(8)], 1, "2", &[key(1), key(9)]))
            .unwrap();
        let by_new = Envelope::sign("catalog", "1".parse().unwrap(), None, 1u8, &[key(8)]).unwrap();
        assert!(next
            .verify::<u8>(&by_new, "catalog", Role::Models, now())
            .is_ok());
        assert!(kr
            .verify::<u8>(&by_new, "catalog", Role::Models, now())
            .is_err());
    }

    /// A keyring that an earlier signer gave an expiry still anchors and
    /// rotates once that date is past: a box is never locked out of its
    /// own root by the calendar or a wrong clock.
    #[test]
    fn keyrings_never_expire() {
        let body = KeyringBody::new(
            &[
                (Role::Root, vec![key(1).public().clone()]),
                (Role::Models, vec![key(2).public().clone()]),
                (Role::Updates, vec![key(2).public().clone()]),
            ],
            &BTreeMap::new(),
        )
        .unwrap();
        let past = now() - std::time::Duration::from_secs(365 * 86400);
        let old = Envelope::sign(KIND, "1".parse().unwrap(), Some(past), body, &[key(1)]).unwrap();
        let kr = Keyring::anchor(old).unwrap();
        let next = kr
            .rotate(ring(&[&key(9)], &[&key(8)], 1, "2", &[key(1), key(9)]))
            .unwrap();
        assert_eq!(next.version().to_string(), "2");
        assert!(
            next.envelope().signed.contains("\"expires\":null"),
            "{}",
            next.envelope().signed
        );
    }

    #[test]
    fn anchor_must_be_self_signed() {
        let env = ring(&[&key(1)], &[&key(2)], 1, "1", &[key(2)]);
        assert!(matches!(
            Keyring::anchor(env),
            Err(TrustError::Threshold { .. })
        ));
    }
}
