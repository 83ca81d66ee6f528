//! The box's clock a year early and a year late, on the real daemons
//! (libfaketime moves their wall clock): installs and updates go on where
//! nothing has expired, what has expired is refused saying that the clock
//! may be wrong, and nothing is refused for good: with the clock right
//! again, the same catalog and bundles install.

use pocket_tests::*;

#[test]
fn a_year_early_or_late_the_box_installs_or_says_the_clock_may_be_wrong() {
    let mut w = World::start();
    w.start_modeld();

    // A year early: the catalog and packs, signed now, are valid.
    w.modeld
        .as_mut()
        .unwrap()
        .restart_with_clock(&w.bus, Some("-365d"));
    w.ctl(&["model", "install", "mlp"]).ok();
    // A year late: the catalog (valid for 30 days) has expired.
    w.modeld
        .as_mut()
        .unwrap()
        .restart_with_clock(&w.bus, Some("+365d"));
    let out = w.ctl(&["model", "install", "attention"]);
    out.fails_with("catalog metadata expired at");
    out.fails_with("if the clock is wrong, set it and try again");
    assert_eq!(w.installed(), [("mlp".to_string(), "1.0".to_string())]);
    // The clock set right: the same catalog installs; no floor moved.
    w.modeld.as_mut().unwrap().restart_with_clock(&w.bus, None);
    w.ctl(&["model", "install", "attention"]).ok();

    // otad, a year late: a bundle valid for 30 days is refused saying so,
    // one without an expiry installs; a year early, the next one too.
    let t = w.tmp.path().to_path_buf();
    let mut b = UpdateBox::new(&t.join("box"), Loader::Grub, &w.publisher, "");
    b.boot(&w.bus);
    assert_eq!(b.wait_health(&w.bus), "good");
    let expiring = w.publisher.bundle(&t.join("expiring"), "2.0");
    b.otad().restart_with_clock(&w.bus, Some("+365d"));
    let out = b.ctl(
        &w.bus,
        &["update", "install", expiring.bundle.to_str().unwrap()],
    );
    out.fails_with("update-bundle metadata expired at");
    out.fails_with("if the clock is wrong, set it and try again");
    assert_eq!(b.primary().as_deref(), Some("A"));
    let updates = std::slice::from_ref(&w.publisher.updates_key);
    let lasting = w
        .publisher
        .bundle_signed(&t.join("lasting"), "2.1", updates, None);
    b.ctl(&w.bus, &["update", "install", lasting.to_str().unwrap()])
        .ok();
    assert_eq!(b.primary().as_deref(), Some("B"));
    b.otad().restart_with_clock(&w.bus, Some("-365d"));
    let next = w
        .publisher
        .bundle_signed(&t.join("next"), "2.2", updates, None);
    b.ctl(&w.bus, &["update", "install", next.to_str().unwrap()])
        .ok();
    // The clock set right: the bundle refused a year late installs now.
    b.otad().restart_with_clock(&w.bus, None);
    let fresh = w.publisher.bundle(&t.join("fresh"), "2.3");
    b.ctl(
        &w.bus,
        &["update", "install", fresh.bundle.to_str().unwrap()],
    )
    .ok();
    assert_eq!(b.status(&w.bus)["slots"][1]["version"], "2.3");
}
