//! One-command installs through the real modeld and pocketctl.

use pocket_tests::*;

#[test]
fn install_from_http_catalog_lists_and_removes() {
    let mut w = World::start();
    w.start_modeld();

    let cat = w.ctl(&["model", "catalog", "--json"]).ok().json();
    let names: Vec<&str> = cat
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["attention", "mlp"]);
    assert_eq!(cat[1]["fits_memory"], true);

    let info = w.ctl(&["model", "install", "mlp", "--json"]).ok().json();
    assert_eq!(info["name"], "mlp");
    assert_eq!(info["version"], "1.0");
    assert_eq!(info["state"], "installed");
    let onnx = onnx_fixtures().join("mlp.onnx");
    let (size, sha) = pocket_publish::hash_file(&onnx).unwrap();
    assert_eq!(info["size_bytes"], size);
    assert_eq!(info["sha256"], sha.as_str());
    // The file the runtime will load is the model, byte for byte.
    assert_eq!(
        std::fs::read(info["path"].as_str().unwrap()).unwrap(),
        std::fs::read(&onnx).unwrap()
    );
    assert!(w.models_dir().join("sha256").join(&sha).is_file());
    assert!(w.models_dir().join("manifests/mlp.json").is_file());

    let list = w.ctl(&["model", "list", "--json"]).ok().json();
    for key in ["name", "version", "size_bytes", "sha256", "state"] {
        assert!(list[0].get(key).is_some(), "list lacks {key}");
    }
    assert_eq!(w.installed(), [("mlp".to_string(), "1.0".to_string())]);
    let status = w.ctl(&["status", "--json"]).ok().json();
    assert_eq!(status["daemons"]["modeld"]["running"], true);
    assert_eq!(status["daemons"]["modeld"]["status"], "ok");

    // Installing again is a no-op that succeeds.
    w.ctl(&["model", "install", "mlp"]).ok();
    assert_eq!(
        w.http.served("mlp-1.0.pack").len(),
        1,
        "the pack was downloaded twice"
    );

    w.ctl(&["model", "remove", "mlp"]).ok();
    w.assert_nothing_installed();
    w.ctl(&["model", "info", "mlp"]).fails_with("not installed");
}

#[test]
fn install_from_a_pack_file_and_a_usb_catalog() {
    let mut w = World::start();
    // A second source: the same catalog on a "USB stick" directory.
    let usb = w.tmp.path().join("usb");
    w.publisher.catalog(&w.packs, &usb, "1");
    w.write_config(&format!("catalogs = [\"{}\"]", usb.display()));
    w.start_modeld();

    let info = w
        .ctl(&["model", "install", "attention", "--json"])
        .ok()
        .json();
    assert_eq!(info["name"], "attention");
    assert!(w.http.log().is_empty(), "the USB install used the network");

    let pack = w.packs.join("mlp-1.0.pack");
    let info = w
        .ctl(&[
            "model",
            "install",
            "--file",
            pack.to_str().unwrap(),
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(info["name"], "mlp");
    assert_eq!(w.installed().len(), 2);
    assert_eq!(w.count("partial"), 0);
}

#[test]
fn concurrent_file_installs_keep_apart() {
    let mut w = World::start();
    w.start_modeld();
    let children: Vec<_> = ["mlp", "attention"]
        .iter()
        .map(|m| {
            let pack = w.packs.join(format!("{m}-1.0.pack"));
            std::process::Command::new(bin_path("pocketctl"))
                .args([
                    "model",
                    "install",
                    "--file",
                    pack.to_str().unwrap(),
                    "--json",
                ])
                .env("DBUS_SYSTEM_BUS_ADDRESS", w.bus.address())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(w.installed().len(), 2);
    for m in ["mlp", "attention"] {
        let info = w.ctl(&["model", "info", m, "--json"]).ok().json();
        let (_, sha) =
            pocket_publish::hash_file(std::path::Path::new(info["path"].as_str().unwrap()))
                .unwrap();
        assert_eq!(
            info["sha256"],
            sha.as_str(),
            "{m} on disk is not what was signed"
        );
    }
    assert_eq!(w.count("partial"), 0);
}

/// Hardening: a USB stick's catalog directory is anyone's to write. A
/// `keyring.json` that links to `/dev/zero`, a `catalog.json` that is a
/// FIFO or a link to a good catalog elsewhere, a `packs` directory that
/// links elsewhere: each is refused with the reason, at once, for any
/// caller (here `nobody`), and modeld keeps serving the good source.
#[test]
fn a_usb_stick_of_links_and_fifos_is_refused_without_hanging_modeld() {
    let mut w = World::start();
    let good = w.tmp.path().join("good");
    w.publisher.catalog(&w.packs, &good, "1");
    let zero = w.tmp.path().join("zero");
    std::fs::create_dir_all(&zero).unwrap();
    std::os::unix::fs::symlink("/dev/zero", zero.join("keyring.json")).unwrap();
    std::os::unix::fs::symlink(good.join("catalog.json"), zero.join("catalog.json")).unwrap();
    let fifo = w.tmp.path().join("fifo");
    std::fs::create_dir_all(&fifo).unwrap();
    nix::unistd::mkfifo(
        &fifo.join("catalog.json"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    // A catalog that links to a good one, on its own.
    let alias = w.tmp.path().join("alias");
    std::fs::create_dir_all(&alias).unwrap();
    std::os::unix::fs::symlink(good.join("catalog.json"), alias.join("catalog.json")).unwrap();
    // A catalog directory that is itself a link.
    let whole = w.tmp.path().join("whole");
    std::os::unix::fs::symlink(&good, &whole).unwrap();
    let linked = w.tmp.path().join("linked");
    std::fs::create_dir_all(&linked).unwrap();
    std::fs::copy(good.join("catalog.json"), linked.join("catalog.json")).unwrap();
    std::os::unix::fs::symlink(good.join("packs"), linked.join("packs")).unwrap();
    w.write_config(&format!(
        "catalogs = [\"{}\", \"{}\", \"{}\", \"{}\", \"{}\"]",
        zero.display(),
        fifo.display(),
        alias.display(),
        whole.display(),
        linked.display()
    ));
    w.start_modeld();
    let pid = w.modeld.as_ref().unwrap().pid();
    let start = std::time::Instant::now();
    let out = run_pocketctl(
        &w.bus,
        RunAs::Nobody { extra_gid: None },
        &["model", "catalog", "--json"],
    )
    .ok()
    .json();
    assert!(start.elapsed() < std::time::Duration::from_secs(10));
    // Only the directory whose catalog is a plain file is listed.
    let sources: Vec<&str> = out
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["source"].as_str().unwrap())
        .collect();
    assert!(!sources.is_empty());
    assert!(
        sources.iter().all(|s| *s == linked.to_str().unwrap()),
        "{sources:?}"
    );
    let log = w.modeld.as_ref().unwrap().log_text();
    assert!(log.contains("keyring.json is a symbolic link"), "{log}");
    assert!(log.contains("catalog.json is not a regular file"), "{log}");
    assert!(
        log.contains("alias/catalog.json is a symbolic link"),
        "{log}"
    );
    assert!(log.contains("whole is not a directory"), "{log}");
    // A pack behind a linked directory is refused, and nothing is installed.
    w.ctl(&["model", "install", "mlp"])
        .fails_with("packs is not a directory");
    assert!(w.installed().is_empty());
    let rss = rss_kib(pid);
    assert!(rss < 200 * 1024, "modeld holds {rss} KiB");
}
