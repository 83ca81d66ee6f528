//! The real `pocket-publish` binary, as a publisher runs it on a build host.

use pocket_tests::*;
use std::path::Path;
use std::process::Command;

fn publish(args: &[&str]) -> std::process::Output {
    Command::new(bin_path("pocket-publish"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = publish(args);
    assert!(
        out.status.success(),
        "pocket-publish {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into()
}

fn key(dir: &Path) -> (String, String) {
    let id = ok(&["keygen", "--out", dir.to_str().unwrap()])
        .trim()
        .to_string();
    let base = dir.join(&id);
    (
        format!("{}.secret", base.display()),
        format!("{}.pub", base.display()),
    )
}

#[test]
fn keygen_keyring_pack_catalog_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = tmp.path().join("keys");
    let (root, root_pub) = key(&keys);
    let (models, models_pub) = key(&keys);
    let (_, updates_pub) = key(&keys);
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&root).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "secret keys are private");
    let ring = tmp.path().join("keyring");
    let r = ring.to_str().unwrap();
    ok(&[
        "keyring",
        "create",
        "--root",
        &root_pub,
        "--models",
        &models_pub,
        "--updates",
        &updates_pub,
        "--threshold",
        "models=1",
        "--key",
        &root,
        "--out",
        r,
    ]);
    // A keyring not signed by its own root is refused at creation.
    let bad = publish(&[
        "keyring",
        "create",
        "--root",
        &root_pub,
        "--models",
        &models_pub,
        "--updates",
        &updates_pub,
        "--key",
        &models,
        "--out",
        tmp.path().join("bad").to_str().unwrap(),
    ]);
    assert!(!bad.status.success());

    let fx = onnx_fixtures();
    let packs = tmp.path().join("packs");
    std::fs::create_dir_all(&packs).unwrap();
    let pack = packs.join("mlp.pack");
    ok(&[
        "model",
        "pack",
        "--name",
        "mlp",
        "--version",
        "1.2.0",
        "--file",
        fx.join("mlp.onnx").to_str().unwrap(),
        "--key",
        &models,
        "--out",
        pack.to_str().unwrap(),
    ]);
    let site = tmp.path().join("site");
    ok(&[
        "catalog",
        "build",
        "--packs",
        packs.to_str().unwrap(),
        "--key",
        &models,
        "--expires",
        "7d",
        "--out",
        site.to_str().unwrap(),
    ]);
    assert!(site.join("packs/mlp-1.2.0.pack").is_file());

    let said = ok(&["verify", pack.to_str().unwrap(), "--keyring", r]);
    assert!(said.contains("model pack mlp 1.2.0 (1 files"), "{said}");
    let said = ok(&[
        "verify",
        site.join("catalog.json").to_str().unwrap(),
        "--keyring",
        r,
    ]);
    assert!(
        said.contains("catalog version") && said.contains("1 model(s)"),
        "{said}"
    );
    let said = ok(&[
        "verify",
        ring.join("keyring.json").to_str().unwrap(),
        "--keyring",
        r,
    ]);
    assert!(said.contains("keyring version 1"), "{said}");

    // One flipped byte anywhere in the pack fails verification.
    let mut bytes = std::fs::read(&pack).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x80;
    let tampered = tmp.path().join("tampered.pack");
    std::fs::write(&tampered, bytes).unwrap();
    let out = publish(&["verify", tampered.to_str().unwrap(), "--keyring", r]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not match its signed sha256"));
}
