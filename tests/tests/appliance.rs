//! End to end on the appliance: the aarch64 image from `image/` (`just
//! image`) booted under `qemu-system-aarch64` (TCG) through UEFI and GRUB,
//! driven through a shell on its virtio console. The only servers are on
//! 127.0.0.1 here, reached from the guest through QEMU's forwards
//! (user networking with restrict=on).

use pocket_tests::appliance::{image_file, Appliance, Host, BOOT_LIMIT, LLM};
use pocket_tests::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

const COMPATIBLE: &str = "pocketos-qemu-aarch64";

fn mlp_inputs() -> Value {
    json!({"x": {"shape": [1, 16], "data": seeded_data(16, 1)}})
}

/// Runs mlp in the guest and checks its outputs against the onnxruntime
/// reference computed here.
fn run_mlp(app: &mut Appliance) -> Value {
    let inputs = mlp_inputs();
    let got = app.ctl_json(&format!("run mlp --input '{inputs}'"));
    let want = reference_outputs(&onnx_fixtures().join("mlp.onnx"), &inputs);
    assert_close(&got, &want, 1e-5);
    got
}

fn installed_models(app: &mut Appliance) -> Vec<String> {
    let list = app.ctl_json("model list");
    list.as_array()
        .expect("a list")
        .iter()
        .map(|m| m["name"].as_str().unwrap_or("").to_string())
        .collect()
}

/// Reads a file in the guest, trimmed.
fn cat(app: &mut Appliance, path: &str) -> String {
    app.ok(&format!("cat {path}")).trim().to_string()
}

/// A fake cpufreq policy and power sensor for the generic board under
/// /run/fakesys, since QEMU's virt board has neither.
const FAKE_SYSFS: &str = "r=/run/fakesys; p=$r/devices/system/cpu/cpufreq/policy0; \
mkdir -p $p $r/class/hwmon/hwmon0 && \
echo '600000 1200000 1800000' > $p/scaling_available_frequencies && \
echo 'schedutil performance' > $p/scaling_available_governors && \
echo schedutil > $p/scaling_governor && echo 1800000 > $p/scaling_max_freq && \
echo 6000000 > $r/class/hwmon/hwmon0/power1_input && \
printf 'sysfs_root = \"/run/fakesys\"\\nboard = \"/etc/pocketos/boards/generic.toml\"\\nbudget_watts = 65.0\\nstate_dir = \"/data/powerd-fake\"\\nperiod_ms = 200\\n' > /run/powerd-fake.toml";
const POLICY: &str = "/run/fakesys/devices/system/cpu/cpufreq/policy0";

fn wait_guest(
    app: &mut Appliance,
    what: &str,
    limit: Duration,
    mut f: impl FnMut(&mut Appliance) -> bool,
) {
    let start = Instant::now();
    while !f(app) {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn the_box_boots_installs_and_runs_a_model_and_governs_power() {
    let h = Host::new();
    let mut app = Appliance::new();
    app.serve(&h.http.url());
    let dashboard = app.forward_to_guest(80);
    app.power_on();

    // 1. Every daemon on the system bus, the booted slot shown.
    let status = app.wait_ready();
    assert_eq!(status["daemons"]["otad"]["booted_slot"], "A", "{status:#}");
    assert_eq!(status["daemons"]["otad"]["health"], "good", "{status:#}");
    let text = app.ok("pocketctl status");
    assert!(text.contains("on slot A"), "{text}");
    // npud, modeld and the dashboard run as their own system users; otad
    // and powerd, which drive devices, as root (docs/security.md).
    let users = app.ok(
        "for n in modeld npud webd otad powerd; do \
         printf '%s %s\\n' $n \"$(awk '/^Uid:/ { print $2 }' /proc/$(pidof pocket-$n)/status)\"; done",
    );
    let ps = app.ok("ps -o user,args | grep '[/]usr/bin/pocket-'");
    let uids: BTreeMap<&str, &str> = users
        .lines()
        .filter_map(|l| l.trim().split_once(' '))
        .collect();
    for (daemon, uid) in [
        ("modeld", "110"),
        ("npud", "111"),
        ("webd", "112"),
        ("otad", "0"),
        ("powerd", "0"),
    ] {
        assert_eq!(
            uids.get(daemon),
            Some(&uid),
            "{daemon} runs as uid {uid}: {users}\n{ps}"
        );
    }
    assert_eq!(
        cat(&mut app, "/etc/passwd")
            .lines()
            .filter(|l| l.starts_with("pocket-"))
            .count(),
        3
    );

    // 2. One-command install from the host's signed catalog, then a run
    // that matches the reference.
    app.ok("pocketctl model install mlp");
    assert_eq!(installed_models(&mut app), ["mlp"]);
    let got = run_mlp(&mut app);
    assert!(
        got["provider"].as_str().unwrap_or("").starts_with("cpu"),
        "{got:#}"
    );
    assert!(
        !h.http.served("mlp-1.0.pack").is_empty(),
        "the pack came from the host"
    );

    // ... and one through the dashboard, in a browser, over the forwarded
    // port: the admin password set on first boot, Install clicked, the
    // progress watched until done, a test run. The pack is a few KiB: it
    // is served at 2 KiB/s, so that there is progress to watch however
    // fast the install would be (on an idle machine it could finish before
    // the page has the job's id, and the page rightly shows no progress
    // for a finished job).
    // The browser is another computer to the box: setting the first
    // password needs the setup code that the box printed on its console.
    let code = setup_code(&app.console());
    // Another computer gets the page over HTTPS, with the certificate the
    // box made at its first boot: plain HTTP moves there, and the
    // fingerprint the page shows is the one on the console.
    let cert = cat(&mut app, "/data/webd/tls/cert.pem").replace('\r', "");
    let fingerprint = certificate_fingerprint(&app.console());
    assert_eq!(pem_fingerprint(&cert), fingerprint);
    let plain = plain_client()
        .build()
        .unwrap()
        .get(format!("http://localhost:{dashboard}/"))
        .send()
        .unwrap();
    assert_eq!(plain.status().as_u16(), 308);
    let pinned = Dash::over_https(
        &format!("http://localhost:{dashboard}"),
        "127.0.0.1".parse().unwrap(),
        &cert,
    );
    assert_eq!(
        pinned.get("/api/session").ok()["tls_fingerprint"],
        fingerprint.as_str()
    );
    h.http.throttle(2 << 10);
    let seen = browse(
        &format!("https://localhost:{dashboard}"),
        &[
            ("PASSWORD", "appliance admin password"),
            ("SETUP_CODE", code.as_str()),
            ("MODEL", "attention"),
            ("SCENARIO", "install"),
            ("STEP_TIMEOUT_MS", "180000"),
        ],
    );
    h.http.throttle(0);
    assert_eq!(seen["login_title"], "Set the admin password", "{seen:#}");
    assert_eq!(seen["tls_fingerprint"], fingerprint.as_str(), "{seen:#}");
    assert_eq!(seen["setup_code_asked"], true, "{seen:#}");
    assert!(
        seen["login_hint"]
            .as_str()
            .unwrap_or("")
            .contains("console and serial log"),
        "{seen:#}"
    );
    assert_eq!(seen["store_state"], "Installed", "{seen:#}");
    assert!(
        seen["run_provider"]
            .as_str()
            .unwrap_or("")
            .starts_with("cpu"),
        "{seen:#}"
    );
    assert_eq!(installed_models(&mut app), ["attention", "mlp"]);
    assert!(!h.http.served("attention-1.0.pack").is_empty());
    let cred = cat(&mut app, "/data/webd/admin.credential");
    assert!(cred.starts_with("$argon2id$"), "{cred}");

    // 3. Power on the real virt board: no cpufreq or sensors, said so, and
    // the profile can still be chosen.
    let p = app.ctl_json("power status");
    assert!(
        p["status"].as_str().unwrap_or("").contains("missing"),
        "powerd should report what the board lacks: {p:#}"
    );
    app.ok("pocketctl power set power-saver");
    assert_eq!(app.ok("pocketctl power get").trim(), "power-saver");

    // ... and against a fake sysfs tree: the profile reaches cpufreq, an
    // inference holds performance, and the hold ends when npud goes idle.
    app.ok(FAKE_SYSFS);
    app.ok("/etc/init.d/S49pocket-powerd stop");
    app.ok("start-stop-daemon -S -b -x /usr/bin/pocket-powerd -- --config /run/powerd-fake.toml");
    wait_guest(
        &mut app,
        "powerd on the fake tree",
        Duration::from_secs(60),
        |a| {
            a.sh("pocketctl power status --json")
                .1
                .contains("\"status\": \"ok\"")
        },
    );
    app.ok("pocketctl power set power-saver");
    wait_guest(&mut app, "power-saver caps", Duration::from_secs(30), |a| {
        let max: u64 = cat(a, &format!("{POLICY}/scaling_max_freq"))
            .parse()
            .unwrap_or(0);
        max < 1_800_000 && cat(a, &format!("{POLICY}/scaling_governor")) == "schedutil"
    });
    run_mlp(&mut app);
    wait_guest(
        &mut app,
        "npud's performance hold",
        Duration::from_secs(30),
        |a| cat(a, &format!("{POLICY}/scaling_governor")) == "performance",
    );
    wait_guest(
        &mut app,
        "the hold's release",
        Duration::from_secs(90),
        |a| cat(a, &format!("{POLICY}/scaling_governor")) == "schedutil",
    );
    assert_eq!(app.ok("pocketctl power get").trim(), "power-saver");
}

/// The image's rootfs with `version` in /etc/pocketos-version and `files`
/// (path in the rootfs, contents) written in, edited with debugfs.
fn rootfs_variant(dir: &Path, version: &str, files: &[(&str, String)]) -> PathBuf {
    let image = dir.join(format!("rootfs-{version}.ext4"));
    std::fs::copy(image_file("rootfs.ext4"), &image).expect("copy rootfs");
    let mut cmds = String::new();
    let mut all = vec![("/etc/pocketos-version", format!("{version}\n"))];
    all.extend(files.iter().map(|(p, c)| (*p, c.clone())));
    for (i, (path, contents)) in all.iter().enumerate() {
        let src = dir.join(format!("file-{version}-{i}"));
        std::fs::write(&src, contents).unwrap();
        let (parent, name) = path.rsplit_once('/').unwrap();
        cmds.push_str(&format!(
            "cd {}\nrm {name}\nwrite {} {name}\n",
            if parent.is_empty() { "/" } else { parent },
            src.display()
        ));
    }
    let script = dir.join(format!("debugfs-{version}"));
    std::fs::write(&script, cmds).unwrap();
    let out = std::process::Command::new("debugfs")
        .args(["-w", "-f"])
        .arg(&script)
        .arg(&image)
        .output()
        .expect("run debugfs");
    assert!(out.status.success(), "debugfs: {out:?}");
    image
}

fn bundle(h: &Host, version: &str, rootfs: &Path) -> PathBuf {
    let out = h.site.join(format!("pocketos-{version}.bundle"));
    pocket_publish::bundle_create(
        &pocket_publish::BundleArgs {
            rootfs: rootfs.to_path_buf(),
            components: Vec::new(),
            version: version.into(),
            compatible: COMPATIBLE.into(),
            security_version: 1,
            chunk_size: pocket_ota::DEFAULT_CHUNK_SIZE,
            expires: Some("30d".into()),
        },
        std::slice::from_ref(&h.publisher.updates_key),
        &out,
        SystemTime::now(),
    )
    .expect("bundle");
    out
}

fn update_status(app: &mut Appliance) -> Value {
    app.ctl_json("update status")
}

fn slot<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["slots"]
        .as_array()
        .expect("slots")
        .iter()
        .find(|s| s["name"] == name)
        .expect("the slot")
}

/// Checks the ESP (the FAT holding grubenv) of the powered-off box with
/// `fsck.vfat`: after a power cut only its dirty bit may be set.
fn assert_esp_consistent(app: &Appliance) {
    let raw = app.dir().join("disk.raw");
    let ok = std::process::Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(app.disk())
        .arg(&raw)
        .status()
        .expect("qemu-img")
        .success();
    assert!(ok, "qemu-img convert");
    // The ESP is the first partition, at 1 MiB.
    let esp = app.dir().join("esp.vfat");
    let disk = std::fs::read(&raw).unwrap();
    std::fs::write(&esp, &disk[1 << 20..33 << 20]).unwrap();
    std::fs::remove_file(&raw).unwrap();
    let out = std::process::Command::new("fsck.vfat")
        .arg("-n")
        .arg(&esp)
        .output()
        .expect("fsck.vfat (dosfstools)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let problems: Vec<&str> = text
        .lines()
        .filter(|l| {
            !(l.starts_with("fsck.fat ")
                || l.contains("Dirty bit is set")
                || l.contains("Automatically removing dirty bit")
                || l.starts_with("Leaving filesystem unchanged")
                || l.trim().is_empty()
                || l.contains(" files, "))
        })
        .collect();
    assert!(
        problems.is_empty(),
        "the ESP is damaged after the power cut:\n{text}"
    );
}

#[test]
fn updates_switch_slots_fall_back_refuse_tampering_and_resume_after_power_loss() {
    let h = Host::new();
    let work = h.tmp.path().join("bundles");
    std::fs::create_dir_all(&work).unwrap();
    let v2 = bundle(&h, "0.2.0", &rootfs_variant(&work, "0.2.0", &[]));
    // v3's health check fails: its smoke test command is `false`.
    let otad_toml =
        std::fs::read_to_string(workspace_root().join("image/rootfs/etc/pocketos/otad.toml"))
            .unwrap();
    let broken = format!("{otad_toml}command = [\"/bin/false\"]\n");
    let v3 = bundle(
        &h,
        "0.3.0",
        &rootfs_variant(&work, "0.3.0", &[("/etc/pocketos/otad.toml", broken)]),
    );
    let v3_len = std::fs::metadata(&v3).unwrap().len();
    // One flipped byte in the middle of v2's payload.
    let mut bytes = std::fs::read(&v2).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(h.site.join("tampered.bundle"), bytes).unwrap();

    let mut app = Appliance::new();
    app.serve(&h.http.url());
    app.power_on();
    app.wait_ready();
    app.ok("pocketctl model install mlp");

    // A tampered bundle is refused and nothing changes.
    let (rc, out) = app.sh("pocketctl update install http://10.0.2.100/tampered.bundle");
    assert_ne!(rc, 0, "{out}");
    assert!(out.contains("chunk") || out.contains("sha256"), "{out}");
    let s = update_status(&mut app);
    assert_eq!(s["primary"], "A", "{s:#}");

    // v2 into slot B, reboot, B runs v2 and is marked good by its health
    // check.
    app.ok("pocketctl update install http://10.0.2.100/pocketos-0.2.0.bundle");
    let s = update_status(&mut app);
    assert_eq!(s["primary"], "B", "{s:#}");
    let boots = app.boots();
    app.send_line("reboot");
    app.wait_boots(boots + 1);
    let st = app.wait_ready();
    assert_eq!(st["daemons"]["otad"]["booted_slot"], "B", "{st:#}");
    assert_eq!(st["daemons"]["otad"]["system_version"], "0.2.0");
    assert_eq!(st["daemons"]["otad"]["health"], "good", "{st:#}");
    assert_eq!(
        installed_models(&mut app),
        ["mlp"],
        "models survive the update"
    );

    // Power is pulled half-way through installing v3; the box still boots
    // v2 and the install resumes from its last verified chunk.
    h.http.throttle(8 << 20);
    app.ok(
        "pocketctl update install http://10.0.2.100/pocketos-0.3.0.bundle >/run/install.log 2>&1 &",
    );
    wait_for("half of v3 fetched", Duration::from_secs(300), || {
        let sent: u64 = h
            .http
            .served("pocketos-0.3.0.bundle")
            .iter()
            .map(|s| s.bytes_sent)
            .sum();
        (sent > v3_len / 2).then_some(())
    });
    app.kill();
    assert_esp_consistent(&app);
    let before = h.http.log().len();
    h.http.throttle(0);
    app.power_on();
    let st = app.wait_ready();
    assert_eq!(st["daemons"]["otad"]["booted_slot"], "B", "{st:#}");
    assert_eq!(st["daemons"]["otad"]["health"], "good", "{st:#}");
    // otad resumes the interrupted install by itself after the boot.
    wait_guest(&mut app, "the resumed install", BOOT_LIMIT, |a| {
        let s = update_status(a);
        s["operation"] == "idle" && s["primary"] == "A"
    });
    let s = update_status(&mut app);
    assert_eq!(slot(&s, "A")["version"], "0.3.0", "{s:#}");
    let refetched: u64 = h.http.log()[before..]
        .iter()
        .filter(|s| s.path.ends_with("pocketos-0.3.0.bundle"))
        .map(|s| s.bytes_sent)
        .sum();
    if refetched >= v3_len {
        let log = app.sh("cat /var/log/pocket-otad.log").1;
        panic!(
            "the resumed install fetched {refetched} of {v3_len} bytes again: {:?}\notad:\n{log}",
            &h.http.log()[before..]
        );
    }
    eprintln!("resumed after power loss: fetched {refetched} of {v3_len} bytes again");

    // v3 boots from A, fails its health check, and the box goes back to v2
    // on B by itself.
    let boots = app.boots();
    app.send_line("reboot");
    // v3 comes up, fails its health check and otad reboots it: two boots.
    app.wait_boots(boots + 2);
    let lines = app.boot_lines();
    assert!(lines[boots].contains("0.3.0 up: slot A"), "{lines:?}");
    assert!(lines[boots + 1].contains("0.2.0 up: slot B"), "{lines:?}");
    let st = app.wait_ready();
    assert_eq!(st["daemons"]["otad"]["booted_slot"], "B", "{st:#}");
    assert_eq!(st["daemons"]["otad"]["system_version"], "0.2.0");
    let s = update_status(&mut app);
    assert_eq!(slot(&s, "A")["state"], "bad", "{s:#}");
    assert_eq!(s["primary"], "B", "{s:#}");

    // Models and state on /data survived all of it.
    assert_eq!(installed_models(&mut app), ["mlp"]);
    run_mlp(&mut app);
}

/// U-Boot's environment on QEMU's `qemu_arm64`: the second flash, offset 0,
/// 256 KiB, one copy.
const UBOOT_ENV_SIZE: u64 = 0x40000;

/// The U-Boot boot script (RAUC's scheme,
/// `buildroot/board/pocketos/boot/boot.cmd`, which every board's image
/// runs as boot.scr), run as U-Boot's `bootcmd` after the virtio disk is
/// found.
fn uboot_bootcmd() -> String {
    let script = pocket_tests::workspace_root().join("buildroot/board/pocketos/boot/boot.cmd");
    let script = std::fs::read_to_string(&script).expect("boot/boot.cmd");
    format!("virtio scan\n{script}")
}

/// Powers the box on, checks which slot the kernel was told it booted,
/// and powers it off again.
fn boot_once(app: &mut Appliance) -> String {
    app.power_on();
    let cmdline = app.ok("cat /proc/cmdline");
    app.kill();
    cmdline
        .split_whitespace()
        .find_map(|a| a.strip_prefix("pocketos.slot="))
        .expect("pocketos.slot= on the command line")
        .to_string()
}

#[test]
fn real_u_boot_boots_the_slots_that_otads_environment_writer_chose() {
    use pocket_otad::bootenv::uboot::{EnvCopy, UBootEnv};
    use pocket_otad::bootenv::BootEnv;
    let mut app = Appliance::new();
    let flash = app.use_uboot();
    let env = BootEnv::UBoot {
        env: UBootEnv::single(&EnvCopy {
            path: flash.clone(),
            offset: 0,
            size: UBOOT_ENV_SIZE,
        })
        .unwrap(),
        max_tries: 3,
    };
    let cfg = app.dir().join("fw_env.config");
    std::fs::write(
        &cfg,
        format!(
            "{} 0x0 {UBOOT_ENV_SIZE:#x} {UBOOT_ENV_SIZE:#x}\n",
            flash.display()
        ),
    )
    .unwrap();
    let slots = ["A".to_string(), "B".to_string()];

    // A fresh box: U-Boot's own settings, the boot script, A primary and
    // B not bootable, written by otad's U-Boot backend.
    let mut vars: BTreeMap<String, String> = [
        ("bootdelay", "0"),
        ("kernel_addr_r", "0x40400000"),
        ("ramdisk_addr_r", "0x44000000"),
        ("devtype", "virtio"),
        ("devnum", "0"),
        ("pocketos_console", "console=ttyAMA0"),
        ("bootcmd", uboot_bootcmd().as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    vars = env.with_primary(&env.with_good(&vars, "A"), &slots, "A");
    vars = env.with_bad(&vars, "B");
    env.plan(&vars).unwrap().apply().unwrap();
    assert_eq!(fw_printenv(&cfg)["BOOT_ORDER"], "A B");

    // U-Boot boots A and saves the try it used; ours and fw_printenv read it.
    assert_eq!(boot_once(&mut app), "A", "{}", app.console_tail(20));
    let seen = env.read().expect("U-Boot's saveenv is readable");
    assert_eq!(seen["BOOT_A_LEFT"], "2", "{seen:?}");
    assert_eq!(fw_printenv(&cfg)["BOOT_A_LEFT"], "2");

    // otad's writer makes B primary: U-Boot boots B.
    let vars = env.with_primary(&seen, &slots, "B");
    env.plan(&vars).unwrap().apply().unwrap();
    assert_eq!(boot_once(&mut app), "B", "{}", app.console_tail(20));
    let seen = env.read().unwrap();
    assert_eq!(seen["BOOT_ORDER"], "B A");
    assert_eq!(seen["BOOT_B_LEFT"], "2", "{seen:?}");

    // B marked bad: U-Boot falls back to A.
    env.plan(&env.with_bad(&seen, "B"))
        .unwrap()
        .apply()
        .unwrap();
    assert_eq!(boot_once(&mut app), "A", "{}", app.console_tail(20));
    assert!(app.console().contains("PocketOS U-Boot: booting slot A"));

    // B was the last slot to pass its health check; A is half-written and
    // B has used its tries: U-Boot boots B, without counting, never A.
    let seen = env.read().unwrap();
    let spent = env.with_bad(&env.with_bad(&env.with_confirmed(&seen, "B"), "A"), "B");
    env.plan(&spent).unwrap().apply().unwrap();
    assert_eq!(boot_once(&mut app), "B", "{}", app.console_tail(20));
    assert!(app
        .console()
        .contains("no slot left to try; booting the last good slot B"));
    let seen = env.read().unwrap();
    assert_eq!(
        (seen["BOOT_A_LEFT"].as_str(), seen["BOOT_B_LEFT"].as_str()),
        ("0", "0"),
        "{seen:?}"
    );
}

/// GRUB (`buildroot/board/pocketos/boot/grub.cfg`) on the appliance's own disk: when every slot has
/// had its try, it boots the slot otad last confirmed good, not the first
/// slot in the order. Here A was installed and tried but never confirmed,
/// and B, the last good slot, was then tried and lost power before its
/// health check passed.
#[test]
fn real_grub_boots_the_last_good_slot_when_every_slot_has_had_its_try() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("pocketos.img");
    tool(
        Command::new("cp")
            .arg("--sparse=always")
            .arg(image_file("pocketos.img"))
            .arg(&disk),
    );
    let grubenv = tmp.path().join("grubenv");
    tool(Command::new("grub-editenv").arg(&grubenv).arg("create"));
    tool(Command::new("grub-editenv").arg(&grubenv).args([
        "set",
        "ORDER=A B",
        "A_OK=1",
        "A_TRY=1",
        "B_OK=1",
        "B_TRY=1",
        "LAST_GOOD=B",
    ]));
    // The ESP is the disk's first partition, at 1 MiB.
    tool(
        Command::new("mcopy")
            .env("MTOOLS_SKIP_CHECK", "1")
            .arg("-o")
            .arg("-i")
            .arg(format!("{}@@1M", disk.display()))
            .arg(&grubenv)
            .arg("::EFI/pocketos/grubenv"),
    );
    let mut app = Appliance::from_disk(&disk);
    assert_eq!(boot_once(&mut app), "B", "{}", app.console_tail(20));
}

/// The box as an LLM appliance: SmolLM2 installed from the signed catalog
/// with one command in the box, then the official `openai` client on this
/// machine streams a chat completion from the box through the forwarded
/// API port, with an API key made in the box; `pocketctl chat` in the box
/// answers too.
#[test]
fn the_box_installs_an_llm_and_answers_an_openai_client_and_pocketctl_chat() {
    let h = Host::with_llm();
    let mut app = Appliance::new();
    app.serve(&h.http.url());
    let api = app.forward_to_guest(11434);
    app.power_on();
    app.wait_ready();
    // A 229 MB pack, checked under emulation: minutes, not seconds.
    let long = Duration::from_secs(900);
    let (rc, out) = app.sh_within(&format!("pocketctl model install {LLM}"), long);
    assert_eq!(rc, 0, "{out}");
    assert_eq!(installed_models(&mut app), [LLM]);

    // Through QEMU's forward, the client is not on the box: it needs a key.
    let made = app.ctl_json("api-key create host-client");
    let key = made["key"].as_str().expect("a key").to_string();
    let script = r#"
import sys, openai
client = openai.OpenAI(base_url=sys.argv[1], api_key=sys.argv[2], max_retries=0, timeout=900)
stream = client.chat.completions.create(model=sys.argv[3], stream=True, temperature=0, max_tokens=16,
    messages=[{"role": "user", "content": "What is 2+2?"}])
print("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
"#;
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            script,
            &format!("http://127.0.0.1:{api}/v1"),
            &key,
            LLM,
        ])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "the openai client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(answer.contains('4'), "{answer}");
    let keyless = std::process::Command::new("python3")
        .args([
            "-c",
            script,
            &format!("http://127.0.0.1:{api}/v1"),
            "pk-wrong",
            LLM,
        ])
        .output()
        .expect("python3");
    assert!(!keyless.status.success(), "a wrong key is refused");

    let (rc, out) = app.sh_within(
        &format!("pocketctl chat {LLM} 'What is 2+2?' --temperature 0 --max-tokens 16 --json"),
        long,
    );
    assert_eq!(rc, 0, "{out}");
    let chat: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert!(
        chat["text"].as_str().unwrap_or("").contains('4'),
        "{chat:#}"
    );
    assert!(
        chat["timings"]["ttft_ms"].as_f64().unwrap_or(0.0) > 0.0,
        "{chat:#}"
    );
}
