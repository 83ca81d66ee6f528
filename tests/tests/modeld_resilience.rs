//! Crash safety, resume, shared downloads, cancel, disk full and GC.

use pocket_proto::models::{JobProxy, Models1Proxy};
use pocket_tests::*;
use std::process::{Command, Stdio};
use std::time::Duration;

const MIB: u64 = 1 << 20;

/// A world whose catalog also offers `big` (an 8 MiB ONNX model).
fn world_with_big() -> (World, u64) {
    let w = World::start();
    let big = onnx_big_fixture(8);
    let pack = w
        .publisher
        .pack(&w.packs, "big", "1.0", &[("big.onnx", &big)]);
    w.publisher.catalog(&w.packs, &w.site, "2");
    let size = std::fs::metadata(pack).unwrap().len();
    (w, size)
}

fn bytes_served(w: &World, suffix: &str) -> u64 {
    w.http.served(suffix).iter().map(|s| s.bytes_sent).sum()
}

fn spawn_install(w: &World, name: &str) -> std::process::Child {
    Command::new(bin_path("pocketctl"))
        .args(["model", "install", name, "--json"])
        .env("DBUS_SYSTEM_BUS_ADDRESS", w.bus.address())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn assert_big_installed(w: &World) {
    let info = w.ctl(&["model", "info", "big", "--json"]).ok().json();
    let (_, sha) = pocket_publish::hash_file(&onnx_big_fixture(8)).unwrap();
    assert_eq!(info["sha256"], sha.as_str());
    let (_, on_disk) =
        pocket_publish::hash_file(std::path::Path::new(info["path"].as_str().unwrap())).unwrap();
    assert_eq!(on_disk, sha);
    assert_eq!(w.count("partial"), 0);
}

#[test]
fn kill_9_during_download_then_restart_resumes_without_refetching() {
    let (mut w, size) = world_with_big();
    w.start_modeld();
    w.http.throttle(2 * MIB);
    let mut client = spawn_install(&w, "big");
    wait_for("a third of the pack", Duration::from_secs(30), || {
        (bytes_served(&w, "big-1.0.pack") > size / 3).then_some(())
    });
    w.modeld().kill9();
    let before_kill = bytes_served(&w, "big-1.0.pack");
    let _ = client.kill();
    let _ = client.wait();
    w.http.throttle(0);
    w.restart_modeld();
    // The restarted daemon resumes on its own; the client joins the job.
    let info = w.ctl(&["model", "install", "big", "--json"]).ok().json();
    assert_eq!(info["name"], "big");
    assert_big_installed(&w);
    let requests = w.http.served("big-1.0.pack");
    assert!(requests.len() >= 2, "{requests:?}");
    let after: u64 = requests[1..].iter().map(|s| s.bytes_sent).sum();
    assert!(
        requests[1].start > 0 && requests[1].status == 206,
        "{requests:?}"
    );
    assert!(
        after < size,
        "re-downloaded {after} of {size} bytes after the restart"
    );
    eprintln!("pack {size} bytes; served {before_kill} before kill -9, {after} after restart");
}

#[test]
fn dropped_connection_resumes_with_a_range_request() {
    let (mut w, size) = world_with_big();
    w.start_modeld();
    w.http.drop_next_body_after(".pack", 3 * MIB);
    w.ctl(&["model", "install", "big"]).ok();
    assert_big_installed(&w);
    let requests = w.http.served("big-1.0.pack");
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_eq!(requests[0].bytes_sent, 3 * MIB);
    assert_eq!(requests[1].status, 206);
    assert!(requests[1].start > 0 && requests[1].start <= 3 * MIB);
    assert_eq!(requests[1].start + requests[1].bytes_sent, size);
}

#[test]
fn two_requests_share_one_download_and_cancel_gives_space_back() {
    let (mut w, _) = world_with_big();
    w.start_modeld();
    w.http.throttle(4 * MIB);
    let a = spawn_install(&w, "big");
    wait_for("download start", Duration::from_secs(20), || {
        (!w.http.served("big-1.0.pack").is_empty()).then_some(())
    });
    let b = spawn_install(&w, "big");
    for c in [a, b] {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        w.http.served("big-1.0.pack").len(),
        1,
        "two downloads for one model"
    );
    w.ctl(&["model", "remove", "big"]).ok();

    // Cancel through the job object.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(60), async {
            let conn = w.bus.connect().await;
            let m = Models1Proxy::new(&conn).await.unwrap();
            let p1 = m.install("big").await.unwrap();
            let p2 = m.install("big").await.unwrap();
            assert_eq!(p1, p2, "the same model gave two jobs");
            let install = JobProxy::builder(&conn)
                .path(p1.clone())
                .unwrap()
                .build()
                .await
                .unwrap();
            assert_eq!(install.name().await.unwrap(), "big");
            let job = pocket_proto::job::proxy(&conn, "org.pocketos.Models1", &p1)
                .await
                .unwrap();
            while job.bytes_done().await.unwrap() == 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let mut finished = m.receive_install_finished().await.unwrap();
            let props = zbus::fdo::PropertiesProxy::builder(&conn)
                .destination("org.pocketos.Models1")
                .unwrap()
                .path(job.inner().path().clone())
                .unwrap()
                .build()
                .await
                .unwrap();
            let mut changes = props.receive_properties_changed().await.unwrap();
            job.cancel().await.unwrap();
            use futures_util::StreamExt;
            let sig = finished.next().await.unwrap();
            let args = sig.args().unwrap();
            assert!(!args.success);
            assert_eq!(args.error_name, "org.pocketos.Error.Cancelled");
            assert_eq!(job.phase().await.unwrap(), "failed");
            // A client that sees the job fail can read why at once: the
            // error's name changes before (or with) the phase.
            let mut seen = Vec::new();
            while let Ok(Some(change)) =
                tokio::time::timeout(Duration::from_secs(5), changes.next()).await
            {
                let args = change.args().unwrap();
                let mut names: Vec<String> = args
                    .changed_properties()
                    .keys()
                    .map(|k| k.to_string())
                    .collect();
                names.sort();
                let failed = args
                    .changed_properties()
                    .get("Phase")
                    .is_some_and(|v| v.downcast_ref::<&str>().ok() == Some("failed"));
                seen.extend(names);
                if failed {
                    break;
                }
            }
            let error_at = seen.iter().position(|n| n == "ErrorName");
            let failed_at = seen.iter().rposition(|n| n == "Phase");
            assert!(
                error_at.is_some() && failed_at.is_some() && error_at < failed_at,
                "ErrorName must change before Phase: {seen:?}"
            );
        })
        .await
        .expect("cancel finished in time");
    });
    w.assert_nothing_installed();
}

#[test]
fn remove_partial_and_gc_free_what_an_interrupted_install_left() {
    let (mut w, size) = world_with_big();
    w.write_config("download_attempts = 1");
    w.start_modeld();
    w.http.drop_next_body_after(".pack", 2 * MIB);
    w.ctl(&["model", "install", "big"]).fails_with("(Network)");
    assert_eq!(
        w.count("partial"),
        1,
        "the partial download is kept for a resume"
    );
    // A later install resumes from it.
    w.http.drop_next_body_after(".pack", 5 * MIB);
    w.ctl(&["model", "install", "big"]).fails_with("(Network)");
    let r = w.http.served("big-1.0.pack");
    assert!(r[1].start > 0, "{r:?}");
    let freed = w
        .ctl(&["model", "remove", "big", "--partial", "--json"])
        .ok()
        .json();
    assert!(freed["freed_bytes"].as_u64().unwrap() > MIB);
    w.assert_nothing_installed();

    // A stale partial and an orphan blob go at the next collection.
    w.http.drop_next_body_after(".pack", 2 * MIB);
    w.ctl(&["model", "install", "big"]).fails_with("(Network)");
    std::fs::write(
        w.models_dir().join("sha256").join("0".repeat(64)),
        b"orphan",
    )
    .unwrap();
    let gc = w.ctl(&["model", "gc", "--json"]).ok().json();
    assert!(
        gc["freed_bytes"].as_u64().unwrap() >= 2 * MIB - 64 * 1024
            && gc["freed_bytes"].as_u64().unwrap() < size
    );
    w.assert_nothing_installed();
}

#[test]
fn disk_full_is_a_clear_error_and_gives_the_space_back() {
    if !root_or_skip("mounting a tmpfs") {
        return;
    }
    let (mut w, size) = world_with_big();
    // Too small from the start: refused before any byte is fetched.
    let small = Tmpfs::mount(&w.data, "4m");
    w.start_modeld();
    w.ctl(&["model", "install", "big"]).fails_with("(DiskFull)");
    assert!(w.http.served("big-1.0.pack").is_empty());
    w.assert_nothing_installed();
    w.modeld().kill9();
    drop(small);

    // Big enough at the start, full in the middle of the download.
    let fs = Tmpfs::mount(&w.data, "14m");
    w.start_modeld();
    w.http.throttle(2 * MIB);
    let free_before = fs.free();
    let client = spawn_install(&w, "big");
    wait_for("download start", Duration::from_secs(20), || {
        (bytes_served(&w, "big-1.0.pack") > MIB).then_some(())
    });
    let filler = w.data.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    while std::io::Write::write_all(&mut f, &chunk).is_ok() {}
    drop(f);
    let out = client.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not enough space") && err.contains("(DiskFull)"),
        "{err}"
    );
    w.assert_nothing_installed();
    std::fs::remove_file(&filler).unwrap();
    let free_after = fs.free();
    assert!(
        free_after + 256 * 1024 >= free_before,
        "space not given back: {free_before} before, {free_after} after (pack {size})"
    );
    // With room again the same install succeeds.
    w.http.throttle(0);
    w.ctl(&["model", "install", "big"]).ok();
    assert_big_installed(&w);
}

#[test]
fn a_partial_file_damaged_by_a_power_cut_is_fetched_again() {
    let (mut w, _size) = world_with_big();
    w.start_modeld();
    w.http.throttle(2 * MIB);
    let mut client = spawn_install(&w, "big");
    wait_for("a third of the pack", Duration::from_secs(30), || {
        (bytes_served(&w, "big-1.0.pack") > 3 * MIB).then_some(())
    });
    w.modeld().kill9();
    let _ = client.kill();
    let _ = client.wait();
    // What a cut can leave of unsynced data: bytes that are not what was
    // received. Damage the middle of the partial file.
    let partial = std::fs::read_dir(w.models_dir().join("partial"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let part = partial.join("0.part");
    let mut bytes = std::fs::read(&part).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&part, bytes).unwrap();
    w.http.throttle(0);
    w.restart_modeld();
    let info = w.ctl(&["model", "install", "big", "--json"]).ok().json();
    assert_eq!(info["name"], "big");
    assert_big_installed(&w);
    assert!(
        w.modeld()
            .log_text()
            .contains("was damaged; fetching that file again"),
        "{}",
        w.modeld().log_text()
    );
}
