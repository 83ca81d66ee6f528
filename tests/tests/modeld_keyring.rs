//! Keyring rotation through a catalog source.

use pocket_tests::*;

/// Puts the keyring in `dir` on the catalog site, with the catalog signed
/// anew (version 2) by `models_key`.
fn offer_keyring(w: &World, dir: &std::path::Path, models_key: &std::path::Path) {
    std::fs::copy(dir.join("keyring.json"), w.site.join("keyring.json")).unwrap();
    w.publisher
        .catalog_with(&w.packs, &w.site, "2", "30d", &[models_key.to_path_buf()]);
}

#[test]
fn keyring_rotation_from_a_catalog_source_is_chained_and_persists() {
    let mut w = World::start();
    w.start_modeld();
    w.ctl(&["model", "catalog"]).ok();
    let p = &w.publisher;
    let (new_root, new_root_pub) = p.new_key();
    let (new_models, new_models_pub) = p.new_key();
    let rotate = |keys: Vec<std::path::PathBuf>, version: &str, out: &std::path::Path| {
        pocket_publish::keyring_create(
            &[
                (pocket_trust::Role::Root, vec![new_root_pub.clone()]),
                (pocket_trust::Role::Models, vec![new_models_pub.clone()]),
                (pocket_trust::Role::Updates, vec![new_root_pub.clone()]),
            ],
            &[],
            &keys,
            version,
            out,
        )
    };
    // Signed only by the new root: not chained to the box's root, refused.
    let unchained = w.tmp.path().join("unchained");
    rotate(vec![new_root.clone()], "2", &unchained).unwrap();
    offer_keyring(&w, &unchained, &new_models);
    w.ctl(&["model", "install", "mlp"])
        .fails_with("keyring metadata is signed by 0 trusted root key(s)");
    w.assert_nothing_installed();

    // Signed by the old root and the new: accepted, and the new models key
    // now signs catalogs and packs.
    let chained = w.tmp.path().join("chained");
    rotate(vec![p.root_key.clone(), new_root.clone()], "2", &chained).unwrap();
    std::fs::copy(chained.join("keyring.json"), w.site.join("keyring.json")).unwrap();
    let packs2 = w.tmp.path().join("packs-new-key");
    std::fs::create_dir_all(&packs2).unwrap();
    w.publisher.pack_with(
        "mlp",
        "1.1",
        &[("mlp.onnx", &onnx_fixtures().join("mlp.onnx"))],
        std::slice::from_ref(&new_models),
        None,
        &packs2.join("mlp.pack"),
    );
    let _ = std::fs::remove_dir_all(w.site.join("packs"));
    w.publisher.catalog_with(
        &packs2,
        &w.site,
        "3",
        "30d",
        std::slice::from_ref(&new_models),
    );
    w.ctl(&["model", "install", "mlp"]).ok();

    // The rotation survives a restart even when the source stops offering
    // the keyring: the old models key is no longer trusted.
    std::fs::remove_file(w.site.join("keyring.json")).unwrap();
    w.restart_modeld();
    w.ctl(&["model", "catalog"]).ok();
    let old_signed = w.tmp.path().join("old-signed.pack");
    w.publisher.pack_with(
        "attention",
        "1.0",
        &[("attention.onnx", &onnx_fixtures().join("attention.onnx"))],
        std::slice::from_ref(&w.publisher.models_key),
        None,
        &old_signed,
    );
    w.ctl(&["model", "install", "--file", old_signed.to_str().unwrap()])
        .fails_with("signed by 0 trusted models key(s)");
    assert_eq!(w.installed(), [("mlp".to_string(), "1.1".to_string())]);
}

/// A rotation that a catalog brings (new root, models and updates keys; the
/// old ones revoked) reaches otad: modeld publishes the keyring in force,
/// and otad, which checks that it chains from its own, uses it for the
/// next install. A bundle signed by the revoked updates key is refused,
/// one signed by the new key installs. (Before, otad trusted the revoked
/// key until a new rootfs shipped.)
#[test]
fn a_rotation_that_revokes_an_updates_key_reaches_otad() {
    let mut w = World::start();
    w.start_modeld();
    let p = &w.publisher;
    let (new_root, new_root_pub) = p.new_key();
    let (new_models, new_models_pub) = p.new_key();
    let (new_updates, new_updates_pub) = p.new_key();
    let rotated = w.tmp.path().join("rotated");
    pocket_publish::keyring_create(
        &[
            (pocket_trust::Role::Root, vec![new_root_pub]),
            (pocket_trust::Role::Models, vec![new_models_pub]),
            (pocket_trust::Role::Updates, vec![new_updates_pub]),
        ],
        &[],
        &[p.root_key.clone(), new_root],
        "2",
        &rotated,
    )
    .unwrap();
    offer_keyring(&w, &rotated, &new_models);

    let mut b = UpdateBox::new(
        &w.tmp.path().join("box"),
        Loader::UBoot,
        &w.publisher,
        &format!(
            "rotated_keyring = \"{}\"",
            w.data.join("keyring.json").display()
        ),
    );
    assert_eq!(b.boot(&w.bus), "A");
    assert_eq!(b.wait_health(&w.bus), "good");
    let bundle = |dir: &str, key: &std::path::Path| {
        w.publisher
            .bundle_signed(&w.tmp.path().join(dir), "2.0", &[key.to_path_buf()], None)
    };
    let old_signed = bundle("old-key", &w.publisher.updates_key);
    let new_signed = bundle("new-key", &new_updates);
    // Before the rotation reaches the box, the new key is a stranger.
    b.ctl(&w.bus, &["update", "install", new_signed.to_str().unwrap()])
        .fails_with("signed by 0 trusted updates key(s)");

    // modeld reads the catalog and rotates; otad follows at its next install.
    w.ctl(&["model", "catalog"]).ok();
    b.ctl(&w.bus, &["update", "install", old_signed.to_str().unwrap()])
        .fails_with("signed by 0 trusted updates key(s)");
    assert_eq!(b.primary().as_deref(), Some("A"));
    b.ctl(&w.bus, &["update", "install", new_signed.to_str().unwrap()])
        .ok();
    assert_eq!(b.primary().as_deref(), Some("B"));

    // otad keeps the rotation even when modeld's copy goes away or is
    // replaced by something that does not chain.
    std::fs::write(w.data.join("keyring.json"), b"{ not a keyring").unwrap();
    b.boot(&w.bus);
    b.wait_health(&w.bus);
    let again = w.publisher.bundle_signed(
        &w.tmp.path().join("old-key-3"),
        "3.0",
        std::slice::from_ref(&w.publisher.updates_key),
        None,
    );
    b.ctl(&w.bus, &["update", "install", again.to_str().unwrap()])
        .fails_with("signed by 0 trusted updates key(s)");
}
