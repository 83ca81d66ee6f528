//! The platform room: cpufreq, devfreq, thermal, hwmon and powercap files
//! under a sysfs root. Everything read here may be missing, garbage or
//! unreadable; each such problem becomes a line in the daemon's status,
//! never a crash.

use crate::board::{Board, Setting};
use crate::error::SysfsError;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Reads one value, saying which file and why when it cannot.
pub fn read(path: &Path) -> Result<String, SysfsError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|source| SysfsError::Read {
            path: path.to_path_buf(),
            source,
        })
}

pub fn read_num<T: std::str::FromStr>(path: &Path) -> Result<T, SysfsError> {
    let text = read(path)?;
    text.parse().map_err(|_| SysfsError::NotANumber {
        path: path.to_path_buf(),
        text,
    })
}

fn write(path: &Path, value: &str) -> Result<(), SysfsError> {
    std::fs::write(path, value).map_err(|source| SysfsError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// A frequency-scaled device: a cpufreq policy or a devfreq device.
#[derive(Debug, Clone)]
pub struct Scaled {
    /// `cpu:policy0` or `devfreq:fdab0000.npu`.
    pub id: String,
    dir: PathBuf,
    governor_file: &'static str,
    max_file: &'static str,
    /// Available frequencies, ascending, in the device's own unit (kHz for
    /// cpufreq, Hz for devfreq).
    pub freqs: Vec<u64>,
    pub governors: Vec<String>,
    pub profiles: BTreeMap<String, Setting>,
    /// What was last written, to write only changes.
    pub applied: Option<(String, u64)>,
}

impl Scaled {
    /// The cap for `profile` held back to `fraction`: the highest available
    /// frequency at or under it, never below the lowest.
    pub fn cap(&self, profile: &str, fraction: f64) -> u64 {
        let top = *self.freqs.last().expect("probed devices have frequencies") as f64;
        let pct = self
            .profiles
            .get(profile)
            .map(|s| s.max_percent)
            .unwrap_or(100.0);
        let limit = top * pct / 100.0 * fraction;
        self.freqs
            .iter()
            .rev()
            .find(|f| **f as f64 <= limit + 0.5)
            .copied()
            .unwrap_or(self.freqs[0])
    }

    /// The smallest fraction above `fraction` at which this device's cap
    /// moves up, and where the device runs now as a fraction of its
    /// profile's maximum; `None` when it is at that maximum.
    pub fn next_step_up(&self, profile: &str, fraction: f64) -> Option<(f64, f64)> {
        let top = *self.freqs.last()? as f64;
        let pct = self
            .profiles
            .get(profile)
            .map(|s| s.max_percent)
            .unwrap_or(100.0);
        let profile_max = top * pct / 100.0;
        let cur = self.cap(profile, fraction);
        self.freqs
            .iter()
            .find(|f| **f > cur && **f as f64 <= profile_max + 0.5)
            .map(|f| (*f as f64 / profile_max, cur as f64 / profile_max))
    }

    /// Writes governor and cap when they differ from what was applied.
    pub fn apply(&mut self, profile: &str, fraction: f64) -> Result<bool, SysfsError> {
        let governor = self
            .profiles
            .get(profile)
            .map(|s| s.governor.clone())
            .unwrap_or_default();
        let cap = self.cap(profile, fraction);
        if self.applied.as_ref() == Some(&(governor.clone(), cap)) {
            return Ok(false);
        }
        if !governor.is_empty() && self.applied.as_ref().map(|a| &a.0) != Some(&governor) {
            if !self.governors.is_empty() && !self.governors.contains(&governor) {
                return Err(SysfsError::GovernorUnavailable {
                    device: self.id.clone(),
                    governor,
                    available: self.governors.clone(),
                });
            }
            write(&self.dir.join(self.governor_file), &governor)?;
        }
        write(&self.dir.join(self.max_file), &cap.to_string())?;
        self.applied = Some((governor, cap));
        Ok(true)
    }

    pub fn read_cap(&self) -> Result<u64, SysfsError> {
        read_num(&self.dir.join(self.max_file))
    }

    /// Cap in Hz, whatever the device's unit.
    pub fn cap_hz(&self, cap: u64) -> u64 {
        if self.id.starts_with("cpu:") {
            cap * 1000
        } else {
            cap
        }
    }
}

#[derive(Debug, Clone)]
pub struct Zone {
    pub name: String,
    dir: PathBuf,
    /// The lowest passive trip point, in °C.
    pub passive_c: Option<f64>,
}

impl Zone {
    pub fn temp_c(&self) -> Result<f64, SysfsError> {
        read_num::<f64>(&self.dir.join("temp")).map(|m| m / 1000.0)
    }
}

#[derive(Debug)]
pub enum RailSensor {
    Power(PathBuf),
    Energy {
        path: PathBuf,
        last: Option<(u64, Instant)>,
    },
}

#[derive(Debug)]
pub struct RailProbe {
    pub name: String,
    pub sensor: RailSensor,
}

impl RailProbe {
    /// Watts now: a power sensor's reading, or the energy counter's rise
    /// since the last call (`None` on the first call).
    pub fn watts(&mut self) -> Result<Option<f64>, SysfsError> {
        match &mut self.sensor {
            RailSensor::Power(p) => read_num::<f64>(p).map(|uw| Some(uw / 1e6)),
            RailSensor::Energy { path, last } => {
                let now = Instant::now();
                let uj: u64 = read_num(path)?;
                let w = match last {
                    Some((prev, at)) if uj >= *prev => {
                        let dt = now.duration_since(*at).as_secs_f64();
                        (dt > 0.0).then(|| (uj - *prev) as f64 / 1e6 / dt)
                    }
                    _ => None, // first reading, or the counter wrapped
                };
                *last = Some((uj, now));
                Ok(w)
            }
        }
    }
}

/// What was found at start.
#[derive(Debug, Default)]
pub struct Hardware {
    pub devices: Vec<Scaled>,
    pub zones: Vec<Zone>,
    pub rails: Vec<RailProbe>,
    /// Extra temperature sensors: (name, path of a millidegree file).
    pub temps: Vec<(String, PathBuf)>,
    /// What is missing or unreadable, for the status.
    pub problems: Vec<String>,
}

fn list(path: &Path) -> Result<Vec<String>, SysfsError> {
    Ok(read(path)?.split_whitespace().map(str::to_string).collect())
}

fn freqs(path: &Path) -> Result<Vec<u64>, SysfsError> {
    let mut v = list(path)?
        .into_iter()
        .map(|f| {
            f.parse::<u64>().map_err(|_| SysfsError::NotAFrequency {
                path: path.to_path_buf(),
                text: f,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    v.sort_unstable();
    v.dedup();
    if v.is_empty() {
        return Err(SysfsError::NoFrequencies {
            path: path.to_path_buf(),
        });
    }
    Ok(v)
}

/// The files of one kind of frequency-scaled device.
struct ScaledFiles {
    kind: &'static str,
    id_prefix: &'static str,
    available: &'static str,
    governors: &'static str,
    governor: &'static str,
    max: &'static str,
}

const CPUFREQ: ScaledFiles = ScaledFiles {
    kind: "cpufreq",
    id_prefix: "cpu",
    available: "scaling_available_frequencies",
    governors: "scaling_available_governors",
    governor: "scaling_governor",
    max: "scaling_max_freq",
};

const DEVFREQ: ScaledFiles = ScaledFiles {
    kind: "devfreq",
    id_prefix: "devfreq",
    available: "available_frequencies",
    governors: "available_governors",
    governor: "governor",
    max: "max_freq",
};

fn probe_scaled(
    files: &ScaledFiles,
    dir: PathBuf,
    name: &str,
    profiles: &BTreeMap<String, Setting>,
) -> Result<Scaled, SysfsError> {
    let freqs = freqs(&dir.join(files.available))?;
    let governors = list(&dir.join(files.governors)).unwrap_or_default();
    read(&dir.join(files.max))?;
    Ok(Scaled {
        id: format!("{}:{name}", files.id_prefix),
        dir,
        governor_file: files.governor,
        max_file: files.max,
        freqs,
        governors,
        profiles: profiles.clone(),
        applied: None,
    })
}

/// Probes what the board file names under `root`; whatever is missing is
/// left out and reported.
pub fn probe(root: &Path, board: &Board) -> Hardware {
    let mut hw = Hardware::default();
    let cpu = root.join("devices/system/cpu/cpufreq");
    let devfreq = root.join("class/devfreq");
    let scaled = board
        .cpufreq
        .iter()
        .map(|c| (&CPUFREQ, cpu.join(&c.policy), &c.policy, &c.profiles))
        .chain(
            board
                .devfreq
                .iter()
                .map(|d| (&DEVFREQ, devfreq.join(&d.device), &d.device, &d.profiles)),
        );
    for (files, dir, name, profiles) in scaled {
        match probe_scaled(files, dir, name, profiles) {
            Ok(d) => hw.devices.push(d),
            Err(e) => hw
                .problems
                .push(format!("{} {name} missing: {e}", files.kind)),
        }
    }
    let thermal = root.join("class/thermal");
    let names: Vec<String> = if board.thermal_zones.is_empty() {
        let mut v: Vec<String> = std::fs::read_dir(&thermal)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .filter(|n| n.starts_with("thermal_zone"))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    } else {
        board.thermal_zones.clone()
    };
    for name in names {
        let dir = thermal.join(&name);
        if let Err(e) = read(&dir.join("temp")) {
            hw.problems
                .push(format!("thermal zone {name} unreadable: {e}"));
            continue;
        }
        let mut passive = None::<f64>;
        for i in 0..16 {
            let Ok(kind) = read(&dir.join(format!("trip_point_{i}_type"))) else {
                break;
            };
            if kind == "passive" {
                if let Ok(t) = read_num::<f64>(&dir.join(format!("trip_point_{i}_temp"))) {
                    let c = t / 1000.0;
                    passive = Some(passive.map_or(c, |p| p.min(c)));
                }
            }
        }
        hw.zones.push(Zone {
            name,
            dir,
            passive_c: passive,
        });
    }
    for r in &board.rail {
        let sensor = match (&r.power_uw, &r.energy_uj) {
            (Some(p), _) => RailSensor::Power(root.join(p)),
            (_, Some(e)) => RailSensor::Energy {
                path: root.join(e),
                last: None,
            },
            _ => continue,
        };
        let path = match &sensor {
            RailSensor::Power(p) | RailSensor::Energy { path: p, .. } => p.clone(),
        };
        match read_num::<f64>(&path) {
            Ok(_) => hw.rails.push(RailProbe {
                name: r.name.clone(),
                sensor,
            }),
            Err(e) => hw
                .problems
                .push(format!("power rail {} unreadable: {e}", r.name)),
        }
    }
    for t in &board.temp {
        let path = root.join(&t.path);
        match read_num::<f64>(&path) {
            Ok(_) => hw.temps.push((t.name.clone(), path)),
            Err(e) => hw
                .problems
                .push(format!("temperature {} unreadable: {e}", t.name)),
        }
    }
    if hw.rails.is_empty() {
        hw.problems
            .push("no power sensor: the budget cannot be enforced".into());
    }
    hw
}
