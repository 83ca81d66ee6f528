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
    let catalog_build = |packs: &Path, version: Option<&str>, out: &Path| {
        let mut args = vec![
            "catalog",
            "build",
            "--packs",
            packs.to_str().unwrap(),
            "--key",
            &models,
            "--expires",
            "7d",
            "--out",
            out.to_str().unwrap(),
        ];
        if let Some(v) = version {
            args.extend(["--version", v]);
        }
        publish(&args)
    };
    // A file that is not a pack is left out, and said so.
    std::fs::write(packs.join("mlp.pack.sha256"), "not a pack").unwrap();
    let built = catalog_build(&packs, Some("3"), &site);
    let said = String::from_utf8_lossy(&built.stderr);
    assert!(built.status.success(), "{said}");
    assert!(
        said.contains("left out") && said.contains("mlp.pack.sha256: not a *.pack file"),
        "{said}"
    );
    assert!(said.contains("with 1 model(s)"), "{said}");
    assert!(site.join("packs/mlp-1.2.0.pack").is_file());

    // A directory without a single pack is an error, not an empty catalog.
    let odd = tmp.path().join("odd");
    std::fs::create_dir_all(&odd).unwrap();
    std::fs::copy(&pack, odd.join("mlp.pak")).unwrap();
    let odd_site = tmp.path().join("odd-site");
    let refused = catalog_build(&odd, Some("1"), &odd_site);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{said}");
    assert!(said.contains("holds no model pack (*.pack)"), "{said}");
    assert!(said.contains("mlp.pak"), "{said}");
    assert!(!odd_site.join("catalog.json").exists());

    // The version is the publisher's choice, never the build host's clock.
    let refused = catalog_build(&packs, None, &tmp.path().join("unversioned"));
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--version"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

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
