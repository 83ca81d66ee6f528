//! otad's decisions, without I/O: whether a verified bundle may be
//! installed, which slot it goes to, whether the booted system may be
//! written over, and whether the other slot may be rolled back to.
//! `engine.rs` gathers the facts (the bundle's header, the state, the
//! bootloader's environment) and acts on the answers.

use crate::error::UpdateError;
use crate::state::SlotRecord;
use pocket_ota::{BundleError, BundleManifest};
use pocket_trust::Version;

/// Whether a bundle whose header verified may be installed: its length is
/// exactly what its manifest says (a short one names the payload it cuts),
/// its security version is not below the device's floor, and its version
/// not below the running system's (when that one is known).
pub fn admit(
    manifest: &BundleManifest,
    header_len: u64,
    len: u64,
    version: &Version,
    floor: u64,
    running: &str,
) -> Result<(), UpdateError> {
    let expected = manifest.bundle_len(header_len);
    if len > expected {
        return Err(BundleError::Oversized {
            size: len,
            expected,
        }
        .into());
    }
    if len < expected {
        let (p, span) = manifest
            .payloads
            .iter()
            .zip(manifest.spans(header_len))
            .find(|(_, s)| s.offset + s.size > len)
            .expect("a payload ends past a short bundle");
        return Err(BundleError::Truncated {
            payload: p.name.clone(),
            got: len.saturating_sub(span.offset),
            expected: p.size,
        }
        .into());
    }
    if manifest.security_version < floor {
        return Err(UpdateError::SecurityFloor {
            offered: manifest.security_version,
            floor,
        });
    }
    if let Ok(rv) = running.parse::<Version>() {
        if *version < rv {
            return Err(UpdateError::Downgrade {
                offered: version.to_string(),
                running: running.to_string(),
            });
        }
    }
    Ok(())
}

/// The slot an install writes: the one not booted.
pub fn other_slot<'a>(slots: impl IntoIterator<Item = &'a String>, booted: &str) -> String {
    slots
        .into_iter()
        .find(|s| *s != booted)
        .cloned()
        .expect("two slots")
}

/// An install writes over the slot the box falls back to unless the booted
/// slot is the last one that passed its health check.
pub fn booted_is_confirmed(booted: &str, last_good: Option<String>) -> Result<(), UpdateError> {
    match last_good {
        Some(good) if good == booted => Ok(()),
        last_good => Err(UpdateError::NotConfirmed {
            booted: booted.to_string(),
            last_good: last_good.unwrap_or_else(|| "none".into()),
        }),
    }
}

/// Whether the box may go back to `slot`: what otad knows of it (`None`
/// for the factory system, which runs at `factory_security`) is a whole
/// system that booted good or waits for its first boot, and not below the
/// security floor (a later system fixed what it lacks). The bootloader's
/// own view of the slot is checked when the environment changes.
pub fn rollback_to(
    slot: &str,
    rec: Option<&SlotRecord>,
    factory_security: u64,
    floor: u64,
) -> Result<(), UpdateError> {
    let offered = rec.map_or(factory_security, |r| r.security_version);
    if offered < floor {
        return Err(UpdateError::SlotBelowFloor {
            slot: slot.to_string(),
            offered,
            floor,
        });
    }
    let usable = rec.is_none_or(|r| r.health == "good" || r.health == "pending");
    if !usable {
        return Err(UpdateError::NotGood(slot.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pocket_ota::Payload;

    fn manifest(security_version: u64, sizes: &[u64]) -> BundleManifest {
        BundleManifest {
            compatible: "pocketos-test".into(),
            security_version,
            chunk_size: 4096,
            payloads: sizes
                .iter()
                .enumerate()
                .map(|(i, &size)| Payload {
                    name: format!("p{i}"),
                    size,
                    sha256: String::new(),
                    chunks: Vec::new(),
                })
                .collect(),
        }
    }

    fn v(s: &str) -> Version {
        s.parse().unwrap()
    }

    #[test]
    fn a_bundle_of_the_right_length_at_or_above_the_floors_is_admitted() {
        let m = manifest(3, &[10_000, 5_000]);
        let len = m.bundle_len(700);
        assert!(admit(&m, 700, len, &v("2.0"), 3, "1.0").is_ok());
        // An unknown running version refuses no version.
        assert!(admit(&m, 700, len, &v("0.1"), 0, "").is_ok());
    }

    #[test]
    fn a_short_bundle_names_the_payload_it_cuts_and_a_long_one_is_refused() {
        let m = manifest(1, &[10_000, 5_000]);
        let spans = m.spans(700);
        let len = m.bundle_len(700);
        match admit(&m, 700, spans[1].offset + 10, &v("2.0"), 0, "1.0") {
            Err(UpdateError::Bundle(BundleError::Truncated {
                payload,
                got,
                expected,
            })) => assert_eq!((payload.as_str(), got, expected), ("p1", 10, 5_000)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            admit(&m, 700, len + 1, &v("2.0"), 0, "1.0"),
            Err(UpdateError::Bundle(BundleError::Oversized { .. }))
        ));
    }

    #[test]
    fn below_the_security_floor_or_the_running_version_is_refused() {
        let m = manifest(2, &[100]);
        let len = m.bundle_len(10);
        assert!(matches!(
            admit(&m, 10, len, &v("9.0"), 3, "1.0"),
            Err(UpdateError::SecurityFloor {
                offered: 2,
                floor: 3
            })
        ));
        let e = admit(&m, 10, len, &v("1.0"), 0, "1.1").unwrap_err();
        assert_eq!(e.name(), "Downgrade");
    }

    #[test]
    fn an_install_goes_to_the_slot_not_booted() {
        let slots = ["A".to_string(), "B".to_string()];
        assert_eq!(other_slot(&slots, "A"), "B");
        assert_eq!(other_slot(&slots, "B"), "A");
    }

    #[test]
    fn only_a_confirmed_boot_may_write_the_other_slot() {
        assert!(booted_is_confirmed("A", Some("A".into())).is_ok());
        match booted_is_confirmed("B", Some("A".into())) {
            Err(UpdateError::NotConfirmed { booted, last_good }) => {
                assert_eq!((booted.as_str(), last_good.as_str()), ("B", "A"))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            booted_is_confirmed("A", None),
            Err(UpdateError::NotConfirmed { last_good, .. }) if last_good == "none"
        ));
    }

    fn record(health: &str, security_version: u64) -> SlotRecord {
        SlotRecord {
            version: "1.0".into(),
            digest: String::new(),
            security_version,
            health: health.into(),
            installed_at: String::new(),
        }
    }

    #[test]
    fn rollback_goes_only_to_a_whole_system_at_or_above_the_floor() {
        assert!(rollback_to("B", None, 1, 1).is_ok());
        assert!(rollback_to("B", Some(&record("good", 2)), 0, 2).is_ok());
        assert!(rollback_to("B", Some(&record("pending", 2)), 0, 2).is_ok());
        for health in ["failed", "incomplete", "installing"] {
            assert!(
                matches!(
                    rollback_to("B", Some(&record(health, 2)), 0, 2),
                    Err(UpdateError::NotGood(_))
                ),
                "{health}"
            );
        }
        assert!(matches!(
            rollback_to("B", Some(&record("good", 1)), 0, 2),
            Err(UpdateError::SlotBelowFloor {
                offered: 1,
                floor: 2,
                ..
            })
        ));
        // The factory system counts at its own security version.
        assert!(matches!(
            rollback_to("A", None, 0, 1),
            Err(UpdateError::SlotBelowFloor { .. })
        ));
    }
}
