//! powerd on a simulated RK3588 board (fake sysfs tree plus a plant model),
//! driven by the real `powerprofilesctl` (Debian's power-profiles-daemon
//! package, only its client, on the private bus) and the real pocketctl.

use pocket_tests::*;
use std::process::{Command, Stdio};
use std::time::Duration;

fn ppctl(w: &World, args: &[&str]) -> Output {
    let out = Command::new("powerprofilesctl")
        .args(args)
        .env("DBUS_SYSTEM_BUS_ADDRESS", w.bus.address())
        .stdin(Stdio::null())
        .output()
        .expect("powerprofilesctl is installed (apt-get install power-profiles-daemon)");
    Output {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
}

fn setup(extra: &str) -> (World, SimBoard) {
    let mut w = World::start();
    let board = SimBoard::rk3588(&w.tmp.path().join("sys"));
    w.start_powerd(board.root(), extra);
    (w, board)
}

/// Waits until powerd's status mentions `needle`.
fn wait_status(w: &World, what: &str, needle: &str) {
    wait_for(what, Duration::from_secs(10), || {
        let s = w.ctl(&["power", "status", "--json"]).ok().json();
        s["status"].as_str().unwrap().contains(needle).then_some(())
    });
}

fn wait_file(board: &SimBoard, rel: &str, want: &str) {
    wait_for(&format!("{rel} = {want}"), Duration::from_secs(10), || {
        (board.read(rel) == want).then_some(())
    });
}

#[test]
fn powerprofilesctl_lists_sets_and_holds_and_caps_follow() {
    let (w, board) = setup("");
    let list = ppctl(&w, &["list"]).ok();
    assert!(list.stdout.contains("* balanced:"), "{}", list.stdout);
    assert!(list.stdout.contains("performance:") && list.stdout.contains("power-saver:"));
    assert!(
        list.stdout.contains("Driver:     pocketos"),
        "{}",
        list.stdout
    );

    ppctl(&w, &["set", "performance"]).ok();
    assert_eq!(ppctl(&w, &["get"]).ok().stdout.trim(), "performance");
    wait_file(
        &board,
        "devices/system/cpu/cpufreq/policy4/scaling_governor",
        "performance",
    );
    wait_file(
        &board,
        "devices/system/cpu/cpufreq/policy4/scaling_max_freq",
        "2400000",
    );
    wait_file(&board, "class/devfreq/fdab0000.npu/governor", "performance");

    ppctl(&w, &["set", "power-saver"]).ok();
    // 50% of the big cores' 2.4 GHz: the highest step at or under 1.2 GHz.
    wait_file(
        &board,
        "devices/system/cpu/cpufreq/policy4/scaling_max_freq",
        "1200000",
    );
    wait_file(
        &board,
        "devices/system/cpu/cpufreq/policy4/scaling_governor",
        "schedutil",
    );
    // 60% of the NPU's 1 GHz.
    wait_file(&board, "class/devfreq/fdab0000.npu/max_freq", "600000000");
    assert_eq!(w.ctl(&["power", "get"]).ok().stdout.trim(), "power-saver");

    // A hold wins over the user's choice while its holder runs.
    let mut launch = Command::new("powerprofilesctl")
        .args([
            "launch",
            "-p",
            "performance",
            "-r",
            "running a test",
            "-i",
            "org.pocketos.Test",
            "sleep",
            "3",
        ])
        .env("DBUS_SYSTEM_BUS_ADDRESS", w.bus.address())
        .spawn()
        .unwrap();
    wait_for("the hold", Duration::from_secs(10), || {
        (ppctl(&w, &["get"]).stdout.trim() == "performance").then_some(())
    });
    let holds = ppctl(&w, &["list-holds"]).ok().stdout;
    assert!(
        holds.contains("org.pocketos.Test") && holds.contains("running a test"),
        "{holds}"
    );
    wait_file(
        &board,
        "devices/system/cpu/cpufreq/policy4/scaling_max_freq",
        "2400000",
    );
    assert!(launch.wait().unwrap().success());
    assert_eq!(ppctl(&w, &["get"]).ok().stdout.trim(), "power-saver");
    wait_file(
        &board,
        "devices/system/cpu/cpufreq/policy4/scaling_max_freq",
        "1200000",
    );

    // Only power-saver and performance can be held.
    let bad = ppctl(&w, &["launch", "-p", "balanced", "true"]);
    assert!(!bad.status.success());
}

#[test]
fn holds_go_when_the_holder_leaves_or_the_user_chooses() {
    let (w, _board) = setup("");
    // A holder killed without releasing: its hold goes when it leaves the bus.
    let mut holder = Command::new("powerprofilesctl")
        .args(["launch", "-p", "power-saver", "sleep", "30"])
        .env("DBUS_SYSTEM_BUS_ADDRESS", w.bus.address())
        .spawn()
        .unwrap();
    wait_for("the hold", Duration::from_secs(10), || {
        (ppctl(&w, &["get"]).stdout.trim() == "power-saver").then_some(())
    });
    holder.kill().unwrap();
    holder.wait().unwrap();
    wait_for("release on disconnect", Duration::from_secs(10), || {
        (ppctl(&w, &["get"]).stdout.trim() == "balanced").then_some(())
    });

    // A user's choice releases holds, and the holder hears ProfileReleased.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(20), async {
            use futures_util::StreamExt;
            let conn = w.bus.connect().await;
            let ppd = pocket_proto::power::PowerProfilesProxy::new(&conn)
                .await
                .unwrap();
            let mut released = ppd.inner().receive_signal("ProfileReleased").await.unwrap();
            let cookie = ppd
                .hold_profile("performance", "inference", "org.pocketos.Runtime1")
                .await
                .unwrap();
            let out = ppctl(&w, &["set", "power-saver"]);
            assert!(out.status.success(), "{}", out.stderr);
            let msg = released.next().await.unwrap();
            let got: u32 = msg.body().deserialize().unwrap();
            assert_eq!(got, cookie);
            assert!(ppctl(&w, &["list-holds"]).stdout.trim().is_empty());
        })
        .await
        .expect("in time")
    });
}

#[test]
fn budget_is_enforced_without_oscillation_and_degradation_is_reported() {
    let (w, board) = setup("budget_watts = 20.0");
    ppctl(&w, &["set", "performance"]).ok();
    board.set_load(Load {
        cpu: 1.0,
        npu: 1.0,
        gpu: 1.0,
    });
    // Uncapped, this load draws 1 + 20 + 15.5 + 10.3 = 46.8 W.
    let stepped = board.elapsed();
    wait_for("power under the budget", Duration::from_secs(10), || {
        (board.watts() <= 20.0).then_some(())
    });
    let settle = board.elapsed() - stepped;
    std::thread::sleep(Duration::from_secs(3));
    let tail = board.samples_since(board.elapsed() - Duration::from_secs(2));
    let max = tail.iter().map(|s| s.watts).fold(0.0, f64::max);
    let min = tail.iter().map(|s| s.watts).fold(f64::MAX, f64::min);
    assert!(max <= 20.0, "over the budget after settling: {max} W");
    assert!(
        max - min < 0.5,
        "power oscillates between {min} and {max} W"
    );
    assert!(min > 12.0, "held far under the budget: {min} W");
    assert!(settle < Duration::from_secs(2), "took {settle:?} to settle");
    let status = w.ctl(&["power", "status", "--json"]).ok().json();
    assert_eq!(status["degraded_reason"], "power-budget");
    assert_eq!(status["temperatures"]["board"], 35.0);
    assert!(
        status["rails"]["gpu"].as_f64().unwrap() > 0.0,
        "the energy counter rail reads"
    );
    assert!(status["cap_fraction"].as_f64().unwrap() < 1.0);
    assert!(ppctl(&w, &["list"])
        .ok()
        .stdout
        .contains("Degraded:   yes (power-budget)"));

    // Load drops: caps come back and the degradation clears.
    board.set_load(Load {
        cpu: 0.1,
        npu: 0.0,
        gpu: 0.0,
    });
    wait_for("degradation to clear", Duration::from_secs(15), || {
        let s = w.ctl(&["power", "status", "--json"]).ok().json();
        (s["degraded_reason"] == "").then_some(())
    });
    wait_file(
        &board,
        "devices/system/cpu/cpufreq/policy4/scaling_max_freq",
        "2400000",
    );
    eprintln!("settled under the 20 W budget in {settle:?}; steady {min:.2}-{max:.2} W");
}

#[test]
fn passive_trip_points_are_honoured() {
    let (w, board) = setup("budget_watts = 100.0");
    ppctl(&w, &["set", "performance"]).ok();
    // A hot box: 45 °C ambient, 1.5 °C per watt: full load would reach 115 °C.
    board.set_thermal(45.0, 1.5);
    board.set_load(Load {
        cpu: 1.0,
        npu: 1.0,
        gpu: 0.5,
    });
    wait_for("thermal capping", Duration::from_secs(20), || {
        let s = w.ctl(&["power", "status", "--json"]).ok().json();
        (s["degraded_reason"] == "high-operating-temperature").then_some(())
    });
    std::thread::sleep(Duration::from_secs(6));
    let tail = board.samples_since(board.elapsed() - Duration::from_secs(3));
    let hottest = tail.iter().map(|s| s.temp).fold(0.0, f64::max);
    assert!(
        hottest < 85.0,
        "the 85 °C passive trip was crossed: {hottest:.1} °C"
    );
    assert!(ppctl(&w, &["list"])
        .ok()
        .stdout
        .contains("high-operating-temperature"));
}

#[test]
fn profile_and_budget_persist_across_a_restart() {
    let (mut w, _board) = setup("");
    w.ctl(&["power", "set", "power-saver"]).ok();
    w.ctl(&["power", "budget", "30"]).ok();
    let bus = &w.bus;
    w.powerd.as_mut().unwrap().restart(bus);
    assert_eq!(ppctl(&w, &["get"]).ok().stdout.trim(), "power-saver");
    let s = w.ctl(&["power", "status", "--json"]).ok().json();
    assert_eq!(s["budget_watts"], 30.0);
    w.ctl(&["power", "set", "turbo"])
        .fails_with("no profile \"turbo\"");
    w.ctl(&["power", "budget", "0"])
        .fails_with("not between 1 and 10000 W");
}

#[test]
fn missing_garbage_and_refused_sysfs_degrade_without_crashing() {
    let mut w = World::start();
    let board = SimBoard::rk3588(&w.tmp.path().join("sys"));
    // The GPU's devfreq is missing, the NPU's power sensor reads garbage.
    std::fs::remove_dir_all(board.root().join("class/devfreq/fb000000.gpu")).unwrap();
    w.start_powerd(board.root(), "");
    let s = w.ctl(&["power", "status", "--json"]).ok().json();
    let status = s["status"].as_str().unwrap();
    assert!(status.contains("devfreq fb000000.gpu missing"), "{status}");
    board.set_load(Load {
        cpu: 0.5,
        npu: 0.5,
        gpu: 0.0,
    });
    // Replace the NPU sensor with a directory: a read error, every period.
    let sensor = board.root().join("class/hwmon/hwmon1/power1_input");
    board.freeze("class/hwmon/hwmon1/power1_input");
    std::thread::sleep(Duration::from_millis(100));
    std::fs::remove_file(&sensor).unwrap();
    std::fs::create_dir(&sensor).unwrap();
    wait_status(&w, "the bad sensor in the status", "hwmon1/power1_input");
    std::fs::remove_dir(&sensor).unwrap();
    std::fs::write(&sensor, "garbage\n").unwrap();
    wait_status(&w, "garbage in the status", "not a number: \"garbage\"");
    // A governor the kernel does not offer is refused and reported.
    let gov = board
        .root()
        .join("devices/system/cpu/cpufreq/policy0/scaling_available_governors");
    std::fs::write(&gov, "schedutil").unwrap();
    let _ = &w.powerd.as_mut().unwrap().restart(&w.bus);
    ppctl(&w, &["set", "performance"]).ok();
    wait_status(
        &w,
        "the refused governor in the status",
        "governor \"performance\" is not available",
    );
    ppctl(&w, &["list"]).ok();

    // A write the kernel refuses (a read-only mount): reported, not fatal.
    if root_or_skip("a read-only bind mount") {
        let dir = board.root().join("devices/system/cpu/cpufreq/policy6");
        let ro = ReadOnly::mount(&dir);
        ppctl(&w, &["set", "power-saver"]).ok();
        wait_status(
            &w,
            "the refused write in the status",
            "policy6/scaling_governor: Read-only file system",
        );
        drop(ro);
        ppctl(&w, &["list"]).ok();
    }
}

/// A directory bind-mounted read-only onto itself, for the life of the
/// value.
struct ReadOnly(std::path::PathBuf);

impl ReadOnly {
    fn mount(dir: &std::path::Path) -> ReadOnly {
        let run = |args: &[&str]| {
            assert!(Command::new("mount")
                .args(args)
                .arg(dir)
                .arg(dir)
                .status()
                .unwrap()
                .success())
        };
        run(&["--bind"]);
        let st = Command::new("mount")
            .args(["-o", "remount,ro,bind"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(st.success());
        let _ = run;
        ReadOnly(dir.to_path_buf())
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
