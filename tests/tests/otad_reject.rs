//! Every way a bundle is refused (DESIGN.md §4), each asserting the error
//! a person sees and that the bootloader environment is untouched: the
//! inactive slot never becomes primary.

use pocket_tests::*;
use std::path::{Path, PathBuf};

fn tampered(src: &Path, dir: &Path, name: &str, f: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut bytes = std::fs::read(src).unwrap();
    f(&mut bytes);
    let out = dir.join(name);
    std::fs::write(&out, bytes).unwrap();
    out
}

fn payload_offsets(bundle: &Path) -> Vec<(u64, u64)> {
    let mut f = std::fs::File::open(bundle).unwrap();
    let header = pocket_ota::read_header(&mut f).unwrap();
    let env = pocket_trust::Envelope::from_bytes("h", &header).unwrap();
    let m = env.peek::<pocket_ota::BundleManifest>().unwrap().body;
    m.spans(header.len() as u64)
        .iter()
        .map(|s| (s.offset, s.size))
        .collect()
}

fn refuse(b: &UpdateBox, bus: &DevBus, bundle: &Path, needle: &str) {
    let before = b.env();
    let slot_b = b.status(bus)["slots"][1].clone();
    let out = b.ctl(bus, &["update", "install", bundle.to_str().unwrap()]);
    out.fails_with(needle);
    assert_eq!(
        b.env(),
        before,
        "a refused bundle changed the bootloader environment"
    );
    assert_eq!(b.primary().as_deref(), Some("A"));
    let st = b.status(bus);
    for key in ["state", "primary", "tries_left"] {
        assert_eq!(
            st["slots"][1][key], slot_b[key],
            "{bundle:?} changed slot B's {key}"
        );
    }
    let health = st["slots"][1]["health"].as_str().unwrap();
    assert!(
        health == slot_b["health"] || health == "incomplete",
        "{bundle:?} left slot B {health}"
    );
    assert!(st["last_error"].as_str().unwrap().contains(needle));
}

#[test]
fn bundles_that_must_be_refused() {
    let bus = DevBus::start();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let p = Publisher::new(&t.join("publisher"));
    let mut b = UpdateBox::new(&t.join("box"), Loader::UBoot, &p, "");
    b.boot(&bus);
    assert_eq!(b.wait_health(&bus), "good");
    let keys = |k: &PathBuf| vec![k.clone()];
    let make =
        |dir: &str, version: &str, compatible: &str, key: &[PathBuf], expires: Option<&str>| {
            p.bundle_with(
                &t.join(dir),
                version,
                1 << 20,
                compatible,
                1,
                64 << 10,
                key,
                expires,
            )
            .bundle
        };
    let good = p.bundle(&t.join("good"), "2.0");

    // Wrong key: signed by the models key, which may not sign updates.
    refuse(
        &b,
        &bus,
        &make("wrongkey", "2.0", COMPATIBLE, &keys(&p.models_key), None),
        "trusted updates key",
    );
    // A byte flipped in the signed metadata.
    let meta = tampered(&good.bundle, t, "meta.bundle", |bytes| {
        let at = bytes
            .windows(13)
            .position(|w| w == b"pocketos-test")
            .unwrap();
        bytes[at + 12] = b'u';
    });
    refuse(&b, &bus, &meta, "trusted updates key");
    // A byte flipped in a rootfs chunk, and in the firmware component.
    let spans = payload_offsets(&good.bundle);
    let chunk = tampered(&good.bundle, t, "chunk.bundle", |bytes| {
        bytes[(spans[0].0 + spans[0].1 / 2) as usize] ^= 0x40;
    });
    refuse(
        &b,
        &bus,
        &chunk,
        "rootfs chunk 32 does not match its signed sha256",
    );
    let fw = tampered(&good.bundle, t, "fw.bundle", |bytes| {
        bytes[(spans[1].0 + spans[1].1 - 1) as usize] ^= 1;
    });
    refuse(&b, &bus, &fw, "npu-firmware chunk 0 does not match");
    // Truncated and oversized.
    let short = tampered(&good.bundle, t, "short.bundle", |bytes| {
        bytes.truncate(bytes.len() - 100)
    });
    refuse(&b, &bus, &short, "truncated");
    let long = tampered(&good.bundle, t, "long.bundle", |bytes| {
        bytes.extend_from_slice(&[0; 4096])
    });
    refuse(&b, &bus, &long, "more than the");
    // Downgrade below the running system, expired metadata, another device.
    refuse(
        &b,
        &bus,
        &make("old", "0.9", COMPATIBLE, &keys(&p.updates_key), None),
        "older than the running system",
    );
    refuse(
        &b,
        &bus,
        &make(
            "expired",
            "2.0",
            COMPATIBLE,
            &keys(&p.updates_key),
            Some("2020-01-01T00:00:00Z"),
        ),
        "expired",
    );
    refuse(
        &b,
        &bus,
        &make(
            "other",
            "2.0",
            "pocketos-otherboard",
            &keys(&p.updates_key),
            None,
        ),
        "is for \"pocketos-otherboard\"",
    );
    // Not a bundle at all.
    refuse(
        &b,
        &bus,
        &p.keyring_dir.join("keyring.json"),
        "not an update bundle",
    );

    // The good bundle installs; afterwards old metadata cannot be replayed,
    // and version 2.0 cannot be reused for other contents.
    b.ctl(&bus, &["update", "install", good.bundle.to_str().unwrap()])
        .ok();
    assert_eq!(b.primary().as_deref(), Some("B"));
    // Back to the factory slot being next, so the replays are judged on
    // their own.
    b.set_env(&[("BOOT_ORDER", "A B"), ("BOOT_B_LEFT", "0")]);
    refuse(
        &b,
        &bus,
        &make("replay-old", "1.5", COMPATIBLE, &keys(&p.updates_key), None),
        "older than the accepted version",
    );
    refuse(
        &b,
        &bus,
        &make("reuse", "2.0", COMPATIBLE, &keys(&p.updates_key), None),
        "already accepted with different contents",
    );
}

#[test]
fn too_few_signatures() {
    let bus = DevBus::start();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let p = Publisher::new(&t.join("publisher"));
    let (root, root_pub) = p.new_key();
    let (_, models_pub) = p.new_key();
    let (u1, u1_pub) = p.new_key();
    let (u2, u2_pub) = p.new_key();
    let kr = t.join("keyring2");
    pocket_publish::keyring_create(
        &[
            (pocket_trust::Role::Root, vec![root_pub]),
            (pocket_trust::Role::Models, vec![models_pub]),
            (pocket_trust::Role::Updates, vec![u1_pub, u2_pub]),
        ],
        &["updates=2".into()],
        &[root],
        "1",
        &kr,
    )
    .unwrap();
    let mut b = UpdateBox::new(
        &t.join("box"),
        Loader::Grub,
        &p,
        &format!("keyring_dir = \"{}\"", kr.display()),
    );
    b.boot(&bus);
    assert_eq!(b.wait_health(&bus), "good");
    let one = p.bundle_with(
        &t.join("one"),
        "2.0",
        1 << 20,
        COMPATIBLE,
        1,
        64 << 10,
        std::slice::from_ref(&u1),
        None,
    );
    refuse(
        &b,
        &bus,
        &one.bundle,
        "signed by 1 trusted updates key(s) but needs 2",
    );
    let two = p.bundle_with(
        &t.join("two"),
        "2.0",
        1 << 20,
        COMPATIBLE,
        1,
        64 << 10,
        &[u1, u2],
        None,
    );
    b.ctl(&bus, &["update", "install", two.bundle.to_str().unwrap()])
        .ok();
    assert_eq!(b.primary().as_deref(), Some("B"));
}

/// otad runs as root and never opens a path a caller names: a FIFO named
/// as a source (which used to leave the job waiting on it, `Busy` for
/// everyone) or a device node is refused at once, and a FIFO passed as a
/// descriptor too. A bundle passed as a descriptor installs even when its
/// name is gone before otad reads it, as an upload's is when webd
/// restarts.
#[test]
fn sources_are_open_files_never_paths() {
    let bus = DevBus::start();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let p = Publisher::new(&t.join("publisher"));
    let mut b = UpdateBox::new(&t.join("box"), Loader::Grub, &p, "");
    b.boot(&bus);
    assert_eq!(b.wait_health(&bus), "good");
    let fifo = t.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let good = p.bundle(&t.join("good"), "2.0");
    let env = b.env();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let conn = bus.connect().await;
        let u = pocket_proto::update::Update1Proxy::new(&conn)
            .await
            .unwrap();
        for path in [fifo.to_str().unwrap(), "/dev/watchdog", "/dev/zero"] {
            let e = tokio::time::timeout(std::time::Duration::from_secs(5), u.install(path))
                .await
                .expect("answered at once")
                .unwrap_err();
            assert!(e.to_string().contains("is not an http(s):// URL"), "{e}");
        }
        use std::os::unix::fs::OpenOptionsExt;
        let fifo_fd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        let e = u
            .install_file(zbus::zvariant::Fd::from(&fifo_fd))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");

        // The bundle's name goes before otad reads a byte of it.
        let copy = t.join("upload.bundle");
        std::fs::copy(&good.bundle, &copy).unwrap();
        let file = std::fs::File::open(&copy).unwrap();
        std::fs::remove_file(&copy).unwrap();
        u.install_file(zbus::zvariant::Fd::from(&file))
            .await
            .unwrap();
    });
    assert_eq!(b.env()["ORDER"], env["ORDER"], "nothing was refused late");
    wait_for("the install", std::time::Duration::from_secs(60), || {
        (b.primary().as_deref() == Some("B")).then_some(())
    });
    let st = b.status(&bus);
    assert_eq!(st["operation"], "idle", "{st:#}");
    assert_eq!(st["slots"][1]["version"], "2.0", "{st:#}");
}
