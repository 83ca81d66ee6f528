//! `just bench` (update part): a verified install of a rootfs image from a
//! local bundle file into a file-backed slot through otad, against `dd` of
//! the same image and `dd` followed by `sha256sum`, in the same run. Every
//! contender writes durably (`conv=fsync`; otad syncs at its checkpoints
//! and at the end), and a page-cache-only `dd` is shown for reference.
//!
//! Size: `POCKET_BENCH_MB` (default 512). Runs: `POCKET_BENCH_RUNS` (3).

use pocket_tests::bench::{env_or, median, run, time};
use pocket_tests::*;
use std::process::Command;
use std::time::Duration;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let mb = env_or("POCKET_BENCH_MB", 512);
    let runs = env_or("POCKET_BENCH_RUNS", 3) as usize;
    let bus = DevBus::start();
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let publisher = Publisher::new(&work.join("publisher"));
    let mut b = UpdateBox::new(
        &work.join("box"),
        Loader::UBoot,
        &publisher,
        "checkpoint_bytes = 16777216",
    );
    b.boot(&bus);
    b.wait_health(&bus);
    let files = publisher.bundle_with(
        &work.join("site"),
        "2.0",
        mb << 20,
        COMPATIBLE,
        1,
        pocket_ota::DEFAULT_CHUNK_SIZE,
        std::slice::from_ref(&publisher.updates_key),
        None,
    );
    let image = files.rootfs.to_str().unwrap().to_string();
    let bundle = files.bundle.to_str().unwrap().to_string();
    let out = work.join("dd.out");
    let of = format!("of={}", out.display());
    let dd = |fsync: bool| {
        let mut c = Command::new("dd");
        c.args([
            format!("if={image}").as_str(),
            of.as_str(),
            "bs=4M",
            "status=none",
        ]);
        if fsync {
            c.arg("conv=fsync");
        }
        run(&mut c);
    };
    // Warm the page cache so every contender reads from memory.
    run(Command::new("cat")
        .arg(&image)
        .arg(&bundle)
        .stdout(std::process::Stdio::null()));
    let slot = b.slot_file("B", "rootfs");
    let (mut plain, mut dd_sync, mut dd_sha, mut otad) = (vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        let _ = std::fs::remove_file(&out);
        plain.push(time(|| dd(false)));
        let _ = std::fs::remove_file(&out);
        dd_sync.push(time(|| dd(true)));
        let _ = std::fs::remove_file(&out);
        dd_sha.push(time(|| {
            dd(true);
            run(Command::new("sha256sum").arg(&out));
        }));
        let _ = std::fs::remove_file(&out);
        std::fs::write(&slot, b"").unwrap();
        otad.push(time(|| {
            b.ctl(&bus, &["update", "install", &bundle]).ok();
        }));
    }
    let (p, d, ds, o) = (median(plain), median(dd_sync), median(dd_sha), median(otad));
    let secs = |d: Duration| d.as_secs_f64();
    let mbs = |d: Duration| mb as f64 / secs(d);
    println!("update benchmark: {mb} MiB rootfs from a local bundle into a file-backed slot, median of {runs} runs");
    println!("| contender | seconds | MiB/s | vs dd conv=fsync |");
    println!("|---|---|---|---|");
    println!(
        "| dd bs=4M (page cache only) | {:.3} | {:.0} | {:.2}x |",
        secs(p),
        mbs(p),
        secs(p) / secs(d)
    );
    println!(
        "| dd bs=4M conv=fsync | {:.3} | {:.0} | 1.00x |",
        secs(d),
        mbs(d)
    );
    println!(
        "| dd conv=fsync && sha256sum | {:.3} | {:.0} | {:.2}x |",
        secs(ds),
        mbs(ds),
        secs(ds) / secs(d)
    );
    println!(
        "| pocketctl update install (every chunk verified, synced, slot switched) | {:.3} | {:.0} | {:.2}x |",
        secs(o),
        mbs(o),
        secs(o) / secs(d)
    );
    println!("otad / (dd + sha256sum) = {:.2}", secs(o) / secs(ds));
}
