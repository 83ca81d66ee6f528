//! Every rejection of DESIGN.md §4 that applies to models and catalogs:
//! each asserts the error a user sees and that nothing was installed.

use pocket_tests::*;
use std::path::Path;

/// Rewrites `path` (breaking any hard link) with `f` applied to its bytes.
fn rewrite(path: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut bytes = std::fs::read(path).unwrap();
    f(&mut bytes);
    std::fs::remove_file(path).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn payload_start(pack: &[u8]) -> usize {
    16 + u64::from_le_bytes(pack[8..16].try_into().unwrap()) as usize
}

fn served_pack(w: &World, name: &str) -> std::path::PathBuf {
    w.site.join(format!("packs/{name}-1.0.pack"))
}

#[test]
fn pack_signed_by_an_unknown_key_is_refused() {
    let mut w = World::start();
    w.start_modeld();
    let (stranger, _) = w.publisher.new_key();
    let out = w.tmp.path().join("stranger.pack");
    let onnx = onnx_fixtures().join("mlp.onnx");
    w.publisher.pack_with(
        "mlp",
        "1.0",
        &[("mlp.onnx", &onnx)],
        &[stranger],
        None,
        &out,
    );
    w.ctl(&["model", "install", "--file", out.to_str().unwrap()])
        .fails_with(
            "model-pack metadata is signed by 0 trusted models key(s) but needs 1 (Untrusted)",
        );
    w.assert_nothing_installed();
}

#[test]
fn catalog_signed_by_an_unknown_key_is_refused() {
    let mut w = World::start();
    let (stranger, _) = w.publisher.new_key();
    w.publisher
        .catalog_with(&w.packs, &w.site, "2", "30d", &[stranger]);
    w.start_modeld();
    w.ctl(&["model", "install", "mlp"])
        .fails_with("catalog metadata is signed by 0 trusted models key(s) but needs 1");
    w.ctl(&["model", "catalog"]).fails_with("no usable catalog");
    let status = w.ctl(&["status", "--json"]).ok().json();
    assert!(status["daemons"]["modeld"]["status"]
        .as_str()
        .unwrap()
        .starts_with("degraded"));
    w.assert_nothing_installed();
}

#[test]
fn too_few_signatures_are_refused() {
    let mut w = World::start();
    // A keyring whose models role needs two of two keys.
    let p = &w.publisher;
    let (k2, k2_pub) = p.new_key();
    let models_pub = p.models_key.with_extension("pub");
    let root_pub = p.root_key.with_extension("pub");
    let strict = w.tmp.path().join("strict-keyring");
    pocket_publish::keyring_create(
        &[
            (pocket_trust::Role::Root, vec![root_pub.clone()]),
            (pocket_trust::Role::Models, vec![models_pub, k2_pub]),
            (pocket_trust::Role::Updates, vec![root_pub]),
        ],
        &["models=2".into()],
        std::slice::from_ref(&p.root_key),
        "1",
        &strict,
    )
    .unwrap();
    let text = std::fs::read_to_string(&w.config).unwrap().replace(
        &p.keyring_dir.display().to_string(),
        &strict.display().to_string(),
    );
    std::fs::write(&w.config, text).unwrap();
    // Catalog signed by both: accepted. The pack inside by one only.
    w.publisher.catalog_with(
        &w.packs,
        &w.site,
        "2",
        "30d",
        &[w.publisher.models_key.clone(), k2],
    );
    w.start_modeld();
    w.ctl(&["model", "catalog"]).ok();
    w.ctl(&["model", "install", "mlp"])
        .fails_with("model-pack metadata is signed by 1 trusted models key(s) but needs 2");
    w.assert_nothing_installed();
}

#[test]
fn tampered_payload_byte_is_refused_over_http_and_from_a_file() {
    let mut w = World::start();
    w.start_modeld();
    let served = served_pack(&w, "mlp");
    rewrite(&served, |b| {
        let at = payload_start(b) + 100;
        b[at] ^= 0x01;
    });
    w.ctl(&["model", "install", "mlp"]).fails_with(
        "payload mlp.onnx does not match its signed sha256 (tampered or corrupt) (Corrupt)",
    );
    w.assert_nothing_installed();
    w.ctl(&["model", "install", "--file", served.to_str().unwrap()])
        .fails_with("does not match its signed sha256");
    w.assert_nothing_installed();
}

#[test]
fn tampered_header_and_catalog_are_refused() {
    let mut w = World::start();
    w.start_modeld();
    let served = served_pack(&w, "mlp");
    let original = std::fs::read(&served).unwrap();
    // A byte of the signed manifest text (the description).
    rewrite(&served, |b| {
        let text = String::from_utf8_lossy(b).to_string();
        let at = text.find("test model").unwrap();
        b[at] = b'T';
    });
    w.ctl(&["model", "install", "mlp"])
        .fails_with("header differs from the signed catalog (Untrusted)");
    w.ctl(&["model", "install", "--file", served.to_str().unwrap()])
        .fails_with("signed by 0 trusted models key(s)");
    w.assert_nothing_installed();
    rewrite(&served, |b| *b = original);
    // A byte of the catalog's signed text.
    rewrite(&w.site.join("catalog.json"), |b| {
        let text = String::from_utf8_lossy(b).to_string();
        let at = text.find("test model").unwrap();
        b[at] = b'T';
    });
    w.ctl(&["model", "install", "mlp"])
        .fails_with("catalog metadata is signed by 0 trusted models key(s)");
    w.assert_nothing_installed();
}

#[test]
fn truncated_and_oversized_packs_are_refused() {
    let mut w = World::start();
    w.start_modeld();
    let served = served_pack(&w, "mlp");
    let original = std::fs::read(&served).unwrap();
    rewrite(&served, |b| b.truncate(b.len() - 10));
    w.ctl(&["model", "install", "mlp"])
        .fails_with("but the signed catalog says");
    w.ctl(&["model", "install", "--file", served.to_str().unwrap()])
        .fails_with("payload mlp.onnx is truncated");
    w.assert_nothing_installed();
    rewrite(&served, |b| {
        *b = original;
        b.extend_from_slice(b"trailing bytes");
    });
    w.ctl(&["model", "install", "mlp"])
        .fails_with("but the signed catalog says");
    w.ctl(&["model", "install", "--file", served.to_str().unwrap()])
        .fails_with("larger than its signed size");
    w.assert_nothing_installed();
}

#[test]
fn downgrade_and_version_reuse_are_refused() {
    let mut w = World::start();
    let onnx = onnx_fixtures().join("mlp.onnx");
    let old_pack = w.packs.join("mlp-1.0.pack");
    let v2 = w.tmp.path().join("packs-v2");
    w.publisher.pack(&v2, "mlp", "2.0", &[("mlp.onnx", &onnx)]);
    w.republish(&v2, "2");
    w.start_modeld();
    w.ctl(&["model", "install", "mlp"]).ok();
    // The publisher (or an attacker with an old signed catalog) offers 1.0.
    let v1 = w.tmp.path().join("packs-v1");
    std::fs::create_dir_all(&v1).unwrap();
    std::fs::copy(&old_pack, v1.join("mlp-1.0.pack")).unwrap();
    w.republish(&v1, "3");
    w.ctl(&["model", "install", "mlp"])
        .fails_with("model:mlp version 1.0 is older than the accepted version 2.0 (downgrade or replay refused) (Downgrade)");
    w.ctl(&["model", "install", "--file", old_pack.to_str().unwrap()])
        .fails_with("older than the accepted version 2.0");
    // Other contents under the version already accepted.
    let other = w.tmp.path().join("other.onnx");
    std::fs::copy(onnx_fixtures().join("attention.onnx"), &other).unwrap();
    let reuse = w.tmp.path().join("reuse");
    let reused = w
        .publisher
        .pack(&reuse, "mlp", "2.0", &[("mlp.onnx", &other)]);
    w.ctl(&["model", "install", "--file", reused.to_str().unwrap()])
        .fails_with("already accepted with different contents");
    assert_eq!(w.installed(), [("mlp".to_string(), "2.0".to_string())]);
    assert_eq!(w.count("partial"), 0);
}

#[test]
fn replayed_old_catalog_is_refused_even_after_restart() {
    let mut w = World::start();
    let old = std::fs::read(w.site.join("catalog.json")).unwrap();
    w.republish(&w.packs.clone(), "2");
    w.start_modeld();
    w.ctl(&["model", "catalog"]).ok();
    w.restart_modeld();
    std::fs::write(w.site.join("catalog.json"), old).unwrap();
    w.ctl(&["model", "catalog"])
        .fails_with("version 1 is older than the accepted version 2");
    w.ctl(&["model", "install", "mlp"])
        .fails_with("older than the accepted version 2");
    w.assert_nothing_installed();
}

#[test]
fn expired_catalog_and_pack_are_refused() {
    let mut w = World::start();
    w.publisher.catalog_with(
        &w.packs,
        &w.site,
        "2",
        "2020-01-01T00:00:00Z",
        &[w.publisher.models_key.clone()],
    );
    w.start_modeld();
    w.ctl(&["model", "install", "mlp"])
        .fails_with("catalog metadata expired at 2020-01-01T00:00:00Z");
    let expired = w.tmp.path().join("expired.pack");
    let onnx = onnx_fixtures().join("mlp.onnx");
    w.publisher.pack_with(
        "mlp",
        "1.0",
        &[("mlp.onnx", &onnx)],
        &[w.publisher.models_key.clone()],
        Some("2020-01-01T00:00:00Z"),
        &expired,
    );
    let out = w.ctl(&["model", "install", "--file", expired.to_str().unwrap()]);
    out.fails_with("model-pack metadata expired at 2020-01-01T00:00:00Z; this box's clock says ");
    out.fails_with("if the clock is wrong, set it and try again");
    out.fails_with("(Expired)");
    w.assert_nothing_installed();
}

#[test]
fn pack_claiming_a_file_outside_its_directory_is_refused() {
    let mut w = World::start();
    w.start_modeld();
    let onnx = std::fs::read(onnx_fixtures().join("mlp.onnx")).unwrap();
    let manifest = pocket_models::PackManifest {
        name: "mlp".into(),
        description: String::new(),
        kind: "onnx".into(),
        entry: "../../etc/evil.onnx".into(),
        memory_bytes: 1,
        llm: None,
        files: vec![pocket_models::PackFile {
            path: "../../etc/evil.onnx".into(),
            size: onnx.len() as u64,
            sha256: pocket_trust::sha256_hex(&onnx),
        }],
    };
    // Signed with the trusted key: only the path is wrong.
    let key = pocket_trust::SecretKey::load(&w.publisher.models_key).unwrap();
    let env = pocket_trust::Envelope::sign(
        pocket_models::PACK_KIND,
        "1.0".parse().unwrap(),
        None,
        &manifest,
        &[key],
    )
    .unwrap();
    let header = env.to_bytes();
    let mut pack = pocket_models::encode_prefix(header.len() as u64).to_vec();
    pack.extend_from_slice(&header);
    pack.extend_from_slice(&onnx);
    let path = w.tmp.path().join("evil.pack");
    std::fs::write(&path, pack).unwrap();
    w.ctl(&["model", "install", "--file", path.to_str().unwrap()])
        .fails_with("file \"../../etc/evil.onnx\" is outside the model's directory");
    w.assert_nothing_installed();
    assert!(!w.data.join("etc").exists() && !w.tmp.path().join("etc").exists());
}

#[test]
fn model_larger_than_memory_is_refused_before_download() {
    let mut w = World::start();
    let meminfo = w.tmp.path().join("meminfo");
    std::fs::write(
        &meminfo,
        "MemTotal:              1 kB\nMemFree:               1 kB\n",
    )
    .unwrap();
    w.write_config(&format!("meminfo = \"{}\"", meminfo.display()));
    w.start_modeld();
    let cat = w.ctl(&["model", "catalog", "--json"]).ok().json();
    assert_eq!(cat[1]["fits_memory"], false);
    w.ctl(&["model", "install", "mlp"])
        .fails_with("of memory but this box has 1.0 KiB (InsufficientMemory)");
    assert!(
        w.http.served(".pack").is_empty(),
        "downloaded before refusing"
    );
    w.assert_nothing_installed();
}
