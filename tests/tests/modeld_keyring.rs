//! Keyring rotation through a catalog source.

use pocket_tests::*;

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
            None,
            out,
            std::time::SystemTime::now(),
        )
    };
    // Signed only by the new root: not chained to the box's root, refused.
    let unchained = w.tmp.path().join("unchained");
    rotate(vec![new_root.clone()], "2", &unchained).unwrap();
    std::fs::copy(unchained.join("keyring.json"), w.site.join("keyring.json")).unwrap();
    w.publisher.catalog_with(
        &w.packs,
        &w.site,
        "2",
        "30d",
        std::slice::from_ref(&new_models),
    );
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
