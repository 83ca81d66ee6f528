//! `just bench` (image part): boot time of the appliance under
//! `qemu-system-aarch64` (TCG) against a bare boot of the same kernel with
//! a BusyBox-only initramfs, in the same run, and each daemon's idle RSS in
//! the guest.
//!
//! - bare: QEMU start to the initramfs's first line (direct kernel boot,
//!   no firmware, no bootloader);
//! - appliance: QEMU start to the shell (UEFI, GRUB, kernel, initramfs,
//!   rcS) and to every daemon on the bus with the boot's health check
//!   passed.
//!
//! Runs: `POCKET_BENCH_RUNS` (3). Needs `just image`.

use pocket_tests::appliance::{image_dir, image_file, Appliance};
use pocket_tests::bench::{env_or, median};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Boots the kernel straight into a BusyBox initramfs that prints a line
/// and powers off; returns the time to that line.
fn bare_boot(dir: &std::path::Path) -> Duration {
    let console = dir.join("bare-console.log");
    let _ = std::fs::remove_file(&console);
    let start = Instant::now();
    let mut qemu = Command::new("qemu-system-aarch64")
        .args([
            "-M",
            "virt",
            "-cpu",
            "max,pauth-impdef=on",
            "-smp",
            "2",
            "-m",
            "1024",
        ])
        .arg("-kernel")
        .arg(image_file("vmlinuz"))
        .arg("-initrd")
        .arg(dir.join("bare.img"))
        .args([
            "-append",
            "console=ttyAMA0 loglevel=4 panic=-1",
            "-no-reboot",
        ])
        .args(["-display", "none", "-monitor", "none", "-nic", "none"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .stdout(Stdio::null())
        .spawn()
        .expect("qemu-system-aarch64");
    loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if text.contains("BARE-UP") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "bare boot: {text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = start.elapsed();
    let _ = qemu.kill();
    let _ = qemu.wait();
    took
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let runs = env_or("POCKET_BENCH_RUNS", 3) as usize;
    let tmp = tempfile::tempdir().unwrap();
    // The bare initramfs: the image's static BusyBox and a one-line init.
    let root = tmp.path().join("bare");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy(
        image_dir().join("work/initramfs/bin/busybox"),
        root.join("bin/busybox"),
    )
    .expect("the image's busybox (just image)");
    std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
    std::fs::write(
        root.join("init"),
        "#!/bin/sh\necho BARE-UP\nexec /bin/busybox poweroff -f\n",
    )
    .unwrap();
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "chmod +x init && find . | cpio --quiet -o -H newc -R 0:0 | gzip -n > {}",
            tmp.path().join("bare.img").display()
        ))
        .current_dir(&root)
        .status()
        .unwrap()
        .success();
    assert!(ok, "cpio");

    let mut bare = Vec::new();
    let mut shell = Vec::new();
    let mut ready = Vec::new();
    let mut rss = String::new();
    for i in 0..runs {
        bare.push(bare_boot(tmp.path()));
        let mut app = Appliance::new();
        let start = Instant::now();
        app.power_on();
        shell.push(start.elapsed());
        app.wait_ready();
        ready.push(start.elapsed());
        if i + 1 == runs {
            // Idle: nothing loaded, no install running.
            std::thread::sleep(Duration::from_secs(5));
            rss = app.ok(
                "for d in dbus-daemon pocket-modeld pocket-npud pocket-powerd pocket-otad; do \
                 printf '%-14s %s\\n' $d \"$(grep VmRSS /proc/$(pidof $d)/status | tr -s ' ' | cut -d' ' -f2-)\"; done",
            );
        }
    }
    let (b, s, r) = (median(bare), median(shell), median(ready));
    println!("boot under qemu-system-aarch64 TCG, 2 vCPUs, 1 GiB, median of {runs}:");
    println!(
        "  bare kernel + BusyBox initramfs (direct kernel boot): {:>6.2} s",
        secs(b)
    );
    println!(
        "  appliance to its shell (UEFI, GRUB, kernel, rcS):    {:>6.2} s  ({:.1}x bare)",
        secs(s),
        secs(s) / secs(b)
    );
    println!(
        "  appliance to every daemon ready and healthy:         {:>6.2} s  ({:.1}x bare)",
        secs(r),
        secs(r) / secs(b)
    );
    println!("idle RSS in the guest:\n{rss}");
}
