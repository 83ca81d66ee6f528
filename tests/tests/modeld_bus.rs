//! The bus surface as shipped: introspection XML and keyring rotation
//! through a catalog source.

use pocket_tests::*;
use std::time::Duration;

fn interface_block(xml: &str, name: &str) -> String {
    let start = xml
        .find(&format!("<interface name=\"{name}\">"))
        .unwrap_or_else(|| panic!("{name} not in introspection"));
    let end = start + xml[start..].find("</interface>").unwrap() + "</interface>".len();
    xml[start..end].to_string()
}

/// The shipped `org.pocketos.Models1.xml` is what the daemon really serves.
/// `POCKET_BLESS=1` rewrites it.
#[test]
fn shipped_introspection_matches_the_daemon() {
    let mut w = World::start();
    w.start_modeld();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (main, job) = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(30), async {
            let conn = w.bus.connect().await;
            let m = pocket_proto::models::Models1Proxy::new(&conn)
                .await
                .unwrap();
            let path = m.install("mlp").await.unwrap();
            let intro = |p: String| {
                let conn = conn.clone();
                async move {
                    zbus::fdo::IntrospectableProxy::builder(&conn)
                        .destination("org.pocketos.Models1")
                        .unwrap()
                        .path(p)
                        .unwrap()
                        .build()
                        .await
                        .unwrap()
                        .introspect()
                        .await
                        .unwrap()
                }
            };
            (
                intro("/org/pocketos/Models1".into()).await,
                intro(path.to_string()).await,
            )
        })
        .await
        .expect("introspection in time")
    });
    let xml = format!(
        "<!DOCTYPE node PUBLIC \"-//freedesktop//DTD D-BUS Object Introspection 1.0//EN\"\n \"http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd\">\n<node>\n  {}\n  {}\n</node>\n",
        interface_block(&main, "org.pocketos.Models1"),
        interface_block(&job, "org.pocketos.Models1.Job")
    );
    let shipped = workspace_root().join("daemons/modeld/data/org.pocketos.Models1.xml");
    if std::env::var_os("POCKET_BLESS").is_some() {
        std::fs::write(&shipped, &xml).unwrap();
    }
    assert_eq!(
        std::fs::read_to_string(&shipped).unwrap_or_default(),
        xml,
        "run with POCKET_BLESS=1 to update"
    );
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
