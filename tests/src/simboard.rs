//! A simulated board for powerd: a fake sysfs tree laid out like an
//! RK3588's (three cpufreq policies, NPU and GPU devfreq, a thermal zone with
//! trip points, hwmon power sensors and a powercap energy counter), and a
//! plant model whose power and temperature follow the caps powerd writes and
//! a load the test sets.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const LITTLE_KHZ: [u64; 8] = [
    408000, 600000, 816000, 1008000, 1200000, 1416000, 1608000, 1800000,
];
const BIG_KHZ: [u64; 10] = [
    408000, 600000, 816000, 1008000, 1200000, 1416000, 1608000, 1800000, 2016000, 2400000,
];
const DEV_HZ: [u64; 6] = [
    300000000, 400000000, 500000000, 600000000, 800000000, 1000000000,
];

/// Load per rail, 0 to 1 of what the rail can draw at full speed.
#[derive(Debug, Clone, Copy, Default)]
pub struct Load {
    pub cpu: f64,
    pub npu: f64,
    pub gpu: f64,
}

#[derive(Debug, Clone, Copy)]
struct Plant {
    load: Load,
    /// Ambient temperature, °C.
    ambient: f64,
    /// °C per watt at equilibrium.
    thermal_resistance: f64,
    temp: f64,
    energy_uj: f64,
    watts: f64,
}

/// One plant step, for the test to look back at.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at: Duration,
    pub watts: f64,
    pub temp: f64,
}

#[derive(Debug)]
pub struct SimBoard {
    root: PathBuf,
    plant: Arc<Mutex<Plant>>,
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    /// Files the plant no longer writes, so a test can break them.
    frozen: Arc<Mutex<Vec<String>>>,
}

fn put(path: &Path, value: impl ToString) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, value.to_string()).expect("write sysfs file");
}

fn join(v: &[u64]) -> String {
    v.iter().map(u64::to_string).collect::<Vec<_>>().join(" ")
}

impl SimBoard {
    /// Lays out the tree under `root` and starts the plant (20 ms steps).
    pub fn rk3588(root: &Path) -> SimBoard {
        let cpu = root.join("devices/system/cpu/cpufreq");
        for (policy, freqs) in [
            ("policy0", &LITTLE_KHZ[..]),
            ("policy4", &BIG_KHZ[..]),
            ("policy6", &BIG_KHZ[..]),
        ] {
            let d = cpu.join(policy);
            put(&d.join("scaling_available_frequencies"), join(freqs));
            put(
                &d.join("scaling_available_governors"),
                "conservative ondemand userspace powersave performance schedutil",
            );
            put(&d.join("scaling_governor"), "schedutil");
            put(&d.join("scaling_max_freq"), freqs[freqs.len() - 1]);
            put(&d.join("cpuinfo_max_freq"), freqs[freqs.len() - 1]);
        }
        for dev in ["fdab0000.npu", "fb000000.gpu"] {
            let d = root.join("class/devfreq").join(dev);
            put(&d.join("available_frequencies"), join(&DEV_HZ));
            put(
                &d.join("available_governors"),
                "userspace powersave performance simple_ondemand",
            );
            put(&d.join("governor"), "simple_ondemand");
            put(&d.join("max_freq"), DEV_HZ[DEV_HZ.len() - 1]);
        }
        let z = root.join("class/thermal/thermal_zone0");
        put(&z.join("type"), "soc-thermal");
        put(&z.join("temp"), 40000);
        put(&z.join("trip_point_0_type"), "passive");
        put(&z.join("trip_point_0_temp"), 85000);
        put(&z.join("trip_point_1_type"), "critical");
        put(&z.join("trip_point_1_temp"), 115000);
        put(&root.join("class/hwmon/hwmon0/name"), "cpu_power");
        put(&root.join("class/hwmon/hwmon0/power1_input"), 1_000_000);
        put(&root.join("class/hwmon/hwmon1/name"), "npu_power");
        put(&root.join("class/hwmon/hwmon1/power1_input"), 500_000);
        put(&root.join("class/powercap/gpu/energy_uj"), 0);
        put(&root.join("class/hwmon/hwmon2/name"), "board_temp");
        put(&root.join("class/hwmon/hwmon2/temp1_input"), 35000);
        let plant = Arc::new(Mutex::new(Plant {
            load: Load::default(),
            ambient: 30.0,
            thermal_resistance: 1.0,
            temp: 40.0,
            energy_uj: 0.0,
            watts: 0.0,
        }));
        let board = SimBoard {
            root: root.to_path_buf(),
            plant,
            samples: Arc::new(Mutex::new(Vec::new())),
            stop: Arc::new(AtomicBool::new(false)),
            frozen: Arc::new(Mutex::new(Vec::new())),
        };
        let (root, plant, samples, stop) = (
            board.root.clone(),
            board.plant.clone(),
            board.samples.clone(),
            board.stop.clone(),
        );
        let frozen = board.frozen.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            let period = Duration::from_millis(20);
            // The plant integrates over the time that really passed: on a
            // loaded machine this thread runs late, and an energy counter
            // that counted nominal steps would fall behind the watts it
            // reports.
            let mut last = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let now = Instant::now();
                let dt = now.duration_since(last).max(period);
                last = now;
                let s = step(
                    &root,
                    &plant,
                    dt.as_secs_f64(),
                    &frozen.lock().expect("frozen"),
                );
                samples.lock().expect("samples").push(Sample {
                    at: start.elapsed(),
                    watts: s.0,
                    temp: s.1,
                });
                std::thread::sleep(period);
            }
        });
        board
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Stops the plant from writing `rel`, so the test owns its contents.
    pub fn freeze(&self, rel: &str) {
        self.frozen.lock().expect("frozen").push(rel.to_string());
    }

    pub fn set_load(&self, load: Load) {
        self.plant.lock().expect("plant").load = load;
    }

    /// Makes the box run hot: a higher ambient and thermal resistance.
    pub fn set_thermal(&self, ambient: f64, thermal_resistance: f64) {
        let mut p = self.plant.lock().expect("plant");
        p.ambient = ambient;
        p.thermal_resistance = thermal_resistance;
    }

    pub fn watts(&self) -> f64 {
        self.plant.lock().expect("plant").watts
    }

    pub fn samples_since(&self, at: Duration) -> Vec<Sample> {
        self.samples
            .lock()
            .expect("samples")
            .iter()
            .filter(|s| s.at >= at)
            .copied()
            .collect()
    }

    pub fn elapsed(&self) -> Duration {
        self.samples
            .lock()
            .expect("samples")
            .last()
            .map(|s| s.at)
            .unwrap_or_default()
    }

    /// A file's contents, relative to the root.
    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.root.join(rel))
            .unwrap_or_default()
            .trim()
            .to_string()
    }
}

impl Drop for SimBoard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The fraction of its top frequency a device runs at now.
fn speed(path: &Path, top: u64) -> f64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .map(|f| (f / top as f64).clamp(0.0, 1.0))
        .unwrap_or(1.0)
}

/// One plant step: power follows load and caps (dynamic power roughly
/// linear in frequency at fixed voltage), temperature follows power with a
/// 2 s time constant. Returns (watts, °C).
fn step(root: &Path, plant: &Mutex<Plant>, dt: f64, frozen: &[String]) -> (f64, f64) {
    let cpu = root.join("devices/system/cpu/cpufreq");
    let little = speed(&cpu.join("policy0/scaling_max_freq"), LITTLE_KHZ[7]);
    let big = (speed(&cpu.join("policy4/scaling_max_freq"), BIG_KHZ[9])
        + speed(&cpu.join("policy6/scaling_max_freq"), BIG_KHZ[9]))
        / 2.0;
    let npu = speed(&root.join("class/devfreq/fdab0000.npu/max_freq"), DEV_HZ[5]);
    let gpu = speed(&root.join("class/devfreq/fb000000.gpu/max_freq"), DEV_HZ[5]);
    let mut p = plant.lock().expect("plant");
    let cpu_w = 1.0 + p.load.cpu * (4.0 * little + 16.0 * big);
    let npu_w = 0.5 + p.load.npu * 15.0 * npu;
    let gpu_w = 0.3 + p.load.gpu * 10.0 * gpu;
    p.watts = cpu_w + npu_w + gpu_w;
    p.energy_uj += gpu_w * dt * 1e6;
    let target = p.ambient + p.thermal_resistance * p.watts;
    p.temp += (target - p.temp) * (dt / 2.0).min(1.0);
    let (temp, energy) = (p.temp, p.energy_uj);
    drop(p);
    // Partial writes are what a sysfs reader could see; write whole values.
    let w = |rel: &str, v: String| {
        if frozen.iter().any(|f| f == rel) {
            return;
        }
        let path = root.join(rel);
        let tmp = path.with_extension("tmp");
        if std::fs::write(&tmp, v).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    };
    w(
        "class/hwmon/hwmon0/power1_input",
        format!("{}", (cpu_w * 1e6) as u64),
    );
    w(
        "class/hwmon/hwmon1/power1_input",
        format!("{}", (npu_w * 1e6) as u64),
    );
    w("class/powercap/gpu/energy_uj", format!("{}", energy as u64));
    w(
        "class/thermal/thermal_zone0/temp",
        format!("{}", (temp * 1000.0) as i64),
    );
    (cpu_w + npu_w + gpu_w, temp)
}
