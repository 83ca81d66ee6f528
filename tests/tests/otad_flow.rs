//! otad end to end on a private bus: install into the other slot, boot it
//! (the boot script's choice made with the real env tools), health check,
//! a failing update that falls back by itself, rollback, access.

use pocket_tests::*;
use std::time::Duration;

fn assert_slot_holds(b: &UpdateBox, slot: &str, files: &BundleFiles) {
    let rootfs = std::fs::read(&files.rootfs).unwrap();
    let fw = std::fs::read(&files.firmware).unwrap();
    assert!(
        b.slot_bytes(slot, "rootfs", rootfs.len()) == rootfs,
        "slot {slot} rootfs differs"
    );
    assert!(
        b.slot_bytes(slot, "fw", fw.len()) == fw,
        "slot {slot} firmware differs"
    );
}

/// A private bus and a box booted on slot A, its health check passed.
fn booted_box(loader: Loader) -> (DevBus, tempfile::TempDir, Publisher, UpdateBox) {
    let bus = DevBus::start();
    let tmp = tempfile::tempdir().unwrap();
    let publisher = Publisher::new(&tmp.path().join("publisher"));
    let mut b = UpdateBox::new(&tmp.path().join("box"), loader, &publisher, "");
    assert_eq!(b.boot(&bus), "A");
    assert_eq!(b.wait_health(&bus), "good");
    (bus, tmp, publisher, b)
}

/// Makes the next boot's health check wait up to `timeout_secs` for a
/// service that never comes; returns otad's config as it was.
fn wait_for_a_missing_service(b: &UpdateBox, timeout_secs: u64) -> String {
    let cfg = std::fs::read_to_string(&b.otad_config).unwrap();
    std::fs::write(
        &b.otad_config,
        cfg.replace(
            "bus_names = [\"org.pocketos.Update1\"]",
            "bus_names = [\"org.pocketos.Update1\", \"org.pocketos.Missing1\"]",
        )
        .replace(
            "timeout_secs = 5",
            &format!("timeout_secs = {timeout_secs}"),
        ),
    )
    .unwrap();
    cfg
}

fn flow(loader: Loader) {
    let (bus, tmp, publisher, mut b) = booted_box(loader);
    let st = b.status(&bus);
    assert_eq!(st["booted"], "A");
    assert_eq!(st["primary"], "A");
    assert_eq!(st["system_version"], "1.0");
    let status = b.ctl(&bus, &["status", "--json"]).ok().json();
    assert_eq!(status["daemons"]["otad"]["booted_slot"], "A");

    // v2 goes into B and becomes primary only once written.
    let v2 = publisher.bundle(&tmp.path().join("v2"), "2.0");
    let out = b
        .ctl(
            &bus,
            &["update", "install", v2.bundle.to_str().unwrap(), "--json"],
        )
        .ok()
        .json();
    assert_eq!(out["slot"], "B");
    assert_eq!(out["version"], "2.0");
    assert_slot_holds(&b, "B", &v2);
    assert_eq!(b.primary().as_deref(), Some("B"));
    let st = b.status(&bus);
    let slot_b = &st["slots"][1];
    assert_eq!(slot_b["health"], "pending");
    assert_eq!(slot_b["version"], "2.0");

    // Boot B: one try used, then the health check marks it good and the
    // bootloader's tries come back.
    assert_eq!(b.boot(&bus), "B");
    assert_eq!(b.wait_health(&bus), "good");
    let st = b.status(&bus);
    assert_eq!(st["system_version"], "2.0");
    assert_eq!(st["security_version"], 1);
    assert_eq!(st["slots"][1]["health"], "good");
    if loader == Loader::UBoot {
        assert_eq!(b.env()["BOOT_B_LEFT"], "3");
    } else {
        assert_eq!(b.env()["B_TRY"], "0");
    }

    // Rollback runs the previous system from the next boot, and back.
    let out = b.ctl(&bus, &["update", "rollback", "--json"]).ok().json();
    assert_eq!(out["primary"], "A");
    assert_eq!(b.boot(&bus), "A");
    assert_eq!(b.wait_health(&bus), "good");
    assert_eq!(b.status(&bus)["system_version"], "1.0");
    b.ctl(&bus, &["update", "rollback"]).ok();
    assert_eq!(b.boot(&bus), "B");
    assert_eq!(b.wait_health(&bus), "good");
    assert_eq!(b.status(&bus)["system_version"], "2.0");

    // v3 whose health check fails: it is tried once and the box falls
    // back to v2 by itself.
    let v3 = publisher.bundle(&tmp.path().join("v3"), "3.0");
    b.ctl(&bus, &["update", "install", v3.bundle.to_str().unwrap()])
        .ok();
    assert_eq!(b.primary().as_deref(), Some("A"));
    let cfg = wait_for_a_missing_service(&b, 1);
    assert_eq!(b.boot(&bus), "A");
    let health = b.wait_health(&bus);
    assert!(
        health.starts_with("failed") && health.contains("org.pocketos.Missing1"),
        "{health}"
    );
    wait_for("the reboot request", Duration::from_secs(10), || {
        b.reboot_requested().then_some(())
    });
    assert_eq!(b.primary().as_deref(), Some("B"));
    std::fs::write(&b.otad_config, cfg).unwrap();
    assert_eq!(b.boot(&bus), "B");
    assert_eq!(b.wait_health(&bus), "good");
    let st = b.status(&bus);
    assert_eq!(st["system_version"], "2.0");
    assert_eq!(st["slots"][0]["health"], "failed");
    assert_eq!(st["slots"][0]["state"], "bad");

    // Rollback to a slot the bootloader has given up on is refused.
    b.ctl(&bus, &["update", "rollback"]).fails_with("not good");
    assert_eq!(b.primary().as_deref(), Some("B"));
}

#[test]
fn uboot_install_boot_fallback_and_rollback() {
    flow(Loader::UBoot);
}

#[test]
fn grub_install_boot_fallback_and_rollback() {
    flow(Loader::Grub);
}

/// A fresh slot that has not passed its health check is not the box's
/// fallback yet: an install while it runs is refused before anything is
/// written. (Before, a bundle with a corrupt chunk left the other slot,
/// the only one known to work, half-written, and the boot script booted it
/// once the fresh slot's tries ran out.) Once the slot is marked good, it
/// is the last good slot and installs go ahead.
fn unconfirmed_slot_refuses_installs(loader: Loader) {
    let (bus, tmp, publisher, mut b) = booted_box(loader);
    assert_eq!(b.last_good().as_deref(), Some("A"));
    let v2 = publisher.bundle(&tmp.path().join("v2"), "2.0");
    b.ctl(&bus, &["update", "install", v2.bundle.to_str().unwrap()])
        .ok();
    // B's health check waits for a service that is not there yet: B runs,
    // unconfirmed, with tries left.
    wait_for_a_missing_service(&b, 120);
    assert_eq!(b.boot(&bus), "B");
    let v3 = publisher.bundle(&tmp.path().join("v3"), "3.0");
    let mut bytes = std::fs::read(&v3.bundle).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    let corrupt = tmp.path().join("v3-corrupt.bundle");
    std::fs::write(&corrupt, bytes).unwrap();
    let env = b.env();
    let slot_a = std::fs::read(b.slot_file("A", "rootfs")).unwrap();
    for bundle in [&corrupt, &v3.bundle] {
        b.ctl(&bus, &["update", "install", bundle.to_str().unwrap()])
            .fails_with(
                "the booted slot B has not passed its health check yet (the last good slot is A)",
            );
        assert_eq!(b.env(), env, "a refused install changed the environment");
        assert!(
            std::fs::read(b.slot_file("A", "rootfs")).unwrap() == slot_a,
            "a refused install wrote slot A"
        );
    }
    let st = b.status(&bus);
    assert_eq!(st["health"], "checking", "{st:#}");
    assert_eq!(st["slots"][0]["state"], "good", "{st:#}");
    assert_eq!(st["operation"], "idle", "{st:#}");
    assert_eq!(b.last_good().as_deref(), Some("A"));

    // Marked good by hand, B is the last good slot and v3 goes into A.
    b.ctl(&bus, &["update", "mark-good"]).ok();
    assert_eq!(b.last_good().as_deref(), Some("B"));
    b.ctl(&bus, &["update", "install", v3.bundle.to_str().unwrap()])
        .ok();
    assert_slot_holds(&b, "A", &v3);
    assert_eq!(b.primary().as_deref(), Some("A"));
    assert_eq!(b.last_good().as_deref(), Some("B"));
}

#[test]
fn uboot_unconfirmed_slot_refuses_installs() {
    unconfirmed_slot_refuses_installs(Loader::UBoot);
}

#[test]
fn grub_unconfirmed_slot_refuses_installs() {
    unconfirmed_slot_refuses_installs(Loader::Grub);
}

/// A fresh slot whose smoke inference cannot run because npud has no
/// memory for the model is not broken: its health check passes as
/// degraded, it stays good and primary, and the box does not restart into
/// the old system. (Before, the resource error failed the check and rolled
/// the good update back.)
#[test]
fn a_resource_shortage_in_the_health_check_keeps_the_update() {
    let mut w = World::start();
    w.start_modeld();
    // A budget no model fits in: every Load is InsufficientMemory.
    w.start_npud("memory_budget_mb = 0");
    w.ctl(&["model", "install", "mlp"]).ok();
    let publisher = Publisher::new(&w.tmp.path().join("os-publisher"));
    let mut b = UpdateBox::new(
        &w.tmp.path().join("box"),
        Loader::UBoot,
        &publisher,
        "[health]\nbus_names = [\"org.pocketos.Update1\", \"org.pocketos.Models1\", \"org.pocketos.Runtime1\"]\ntimeout_secs = 20\nsmoke_inference = true\n",
    );
    assert_eq!(b.boot(&w.bus), "A");
    let health = b.wait_health(&w.bus);
    assert!(
        health.starts_with("degraded: smoke inference of mlp"),
        "{health}"
    );
    let v2 = publisher.bundle(&w.tmp.path().join("v2"), "2.0");
    b.ctl(&w.bus, &["update", "install", v2.bundle.to_str().unwrap()])
        .ok();
    assert_eq!(b.boot(&w.bus), "B");
    let health = b.wait_health(&w.bus);
    assert!(
        health.starts_with("degraded: smoke inference of mlp")
            && health.contains("InsufficientMemory"),
        "{health}"
    );
    assert!(
        !b.reboot_requested(),
        "a resource shortage restarted the box"
    );
    let st = b.status(&w.bus);
    assert_eq!(st["slots"][1]["health"], "good", "{st:#}");
    assert_eq!(st["slots"][1]["state"], "good", "{st:#}");
    assert_eq!(b.primary().as_deref(), Some("B"));
    assert_eq!(b.last_good().as_deref(), Some("B"));
    assert_eq!(b.env()["BOOT_B_LEFT"], "3");
}

#[test]
fn only_admins_install_mark_or_roll_back() {
    let bus = DevBus::start();
    let tmp = tempfile::tempdir().unwrap();
    let publisher = Publisher::new(&tmp.path().join("publisher"));
    let mut b = UpdateBox::new(&tmp.path().join("box"), Loader::UBoot, &publisher, "");
    b.boot(&bus);
    b.wait_health(&bus);
    let v2 = publisher.bundle(&tmp.path().join("v2"), "2.0");
    let nobody = RunAs::Nobody { extra_gid: None };
    run_pocketctl(&bus, nobody, &["update", "status", "--json"]).ok();
    for args in [
        vec!["update", "install", v2.bundle.to_str().unwrap()],
        vec!["update", "mark-good"],
        vec!["update", "rollback"],
    ] {
        let out = run_pocketctl(&bus, nobody, &args);
        assert!(!out.status.success(), "{args:?} succeeded for nobody");
        assert!(
            out.stderr.contains("AccessDenied")
                || out.stderr.contains("PermissionDenied")
                || out.stderr.contains("denied"),
            "{args:?}: {}",
            out.stderr
        );
    }
    assert_eq!(b.primary().as_deref(), Some("A"));
    assert_eq!(b.status(&bus)["slots"][1]["version"], "");
}

/// Hardening: a slot whose system is below the device's security floor is
/// never booted again, not even by a rollback.
#[test]
fn rollback_below_the_security_floor_is_refused() {
    let (bus, tmp, publisher, mut b) = booted_box(Loader::Grub);
    // v2 fixes a hole: security version 2, above the factory system's 1.
    let v2 = publisher.bundle_with(
        &tmp.path().join("v2"),
        "2.0",
        1 << 20,
        COMPATIBLE,
        2,
        64 << 10,
        std::slice::from_ref(&publisher.updates_key),
        Some("30d"),
    );
    b.ctl(&bus, &["update", "install", v2.bundle.to_str().unwrap()])
        .ok();
    assert_eq!(b.boot(&bus), "B");
    assert_eq!(b.wait_health(&bus), "good");
    assert_eq!(b.status(&bus)["security_version"], 2);
    let refused = b.ctl(&bus, &["update", "rollback"]);
    refused.fails_with("slot A holds security version 1, below this device's 2");
    refused.fails_with("(Downgrade)");
    assert_eq!(b.primary().as_deref(), Some("B"));
    assert_eq!(b.boot(&bus), "B");
}

/// Hardening: a mark-good and a mark-bad at the same moment each land; the
/// environment is read, changed and written under one lock, so neither
/// writes over the other, and both copies stay readable.
#[test]
fn concurrent_environment_changes_lose_nothing() {
    use pocket_proto::update::Update1Proxy;
    let (bus, _tmp, _publisher, b) = booted_box(Loader::UBoot);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (good, bad) = rt.block_on(async {
        let proxy = |conn| async move {
            Update1Proxy::builder(&conn)
                .cache_properties(zbus::proxy::CacheProperties::No)
                .build()
                .await
                .unwrap()
        };
        (
            proxy(bus.connect().await).await,
            proxy(bus.connect().await).await,
        )
    });
    for round in 0..30 {
        // As the bootloader leaves it: A's boot used two of its tries, B
        // good with all three.
        b.set_env(&[("BOOT_A_LEFT", "1"), ("BOOT_B_LEFT", "3")]);
        let (g, m) = rt.block_on(async {
            futures_util::future::join(good.mark_good(), bad.mark_bad("B")).await
        });
        g.unwrap();
        m.unwrap();
        let env = b.env();
        assert_eq!(
            (env["BOOT_A_LEFT"].as_str(), env["BOOT_B_LEFT"].as_str()),
            ("3", "0"),
            "round {round}: {env:?}"
        );
    }
}
