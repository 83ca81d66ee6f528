//! Board files: what a board has and how each profile sets it.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

pub const PROFILES: [&str; 3] = ["power-saver", "balanced", "performance"];

/// How one profile sets one device.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Setting {
    pub governor: String,
    /// Frequency cap as a percentage of the device's highest frequency.
    #[serde(default = "hundred")]
    pub max_percent: f64,
}

fn hundred() -> f64 {
    100.0
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuPolicy {
    /// `policyN` under `devices/system/cpu/cpufreq/`.
    pub policy: String,
    pub profiles: BTreeMap<String, Setting>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevfreqDevice {
    /// Name under `class/devfreq/`.
    pub device: String,
    pub profiles: BTreeMap<String, Setting>,
}

/// A power rail: a sensor in µW or an energy counter in µJ, relative to the
/// sysfs root.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rail {
    pub name: String,
    #[serde(default)]
    pub power_uw: Option<String>,
    #[serde(default)]
    pub energy_uj: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TempSensor {
    pub name: String,
    /// Relative to the sysfs root, e.g. `class/hwmon/hwmon2/temp1_input`.
    pub path: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Board {
    pub name: String,
    #[serde(default)]
    pub cpufreq: Vec<CpuPolicy>,
    #[serde(default)]
    pub devfreq: Vec<DevfreqDevice>,
    #[serde(default)]
    pub rail: Vec<Rail>,
    /// Extra temperature sensors (hwmon `tempN_input`, millidegrees),
    /// reported beside the thermal zones.
    #[serde(default)]
    pub temp: Vec<TempSensor>,
    /// Thermal zones watched (`thermal_zoneN`); empty means every zone.
    #[serde(default)]
    pub thermal_zones: Vec<String>,
    /// Degrees below a passive trip point where capping starts.
    #[serde(default = "default_margin")]
    pub thermal_margin_c: f64,
}

fn default_margin() -> f64 {
    5.0
}

impl Board {
    pub fn load(path: &Path) -> anyhow::Result<Board> {
        let board: Board = pocket_daemon::load_config(path)?;
        for (what, profiles) in board
            .cpufreq
            .iter()
            .map(|c| (&c.policy, &c.profiles))
            .chain(board.devfreq.iter().map(|d| (&d.device, &d.profiles)))
        {
            for p in PROFILES {
                let s = profiles.get(p).ok_or_else(|| {
                    anyhow::anyhow!("board {}: {what} has no {p} profile", path.display())
                })?;
                if !(1.0..=100.0).contains(&s.max_percent) {
                    anyhow::bail!(
                        "board {}: {what} {p}: max_percent must be 1-100",
                        path.display()
                    );
                }
            }
        }
        for r in &board.rail {
            if r.power_uw.is_some() == r.energy_uj.is_some() {
                anyhow::bail!(
                    "board {}: rail {} needs one of power_uw or energy_uj",
                    path.display(),
                    r.name
                );
            }
        }
        Ok(board)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_board_files_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("boards");
        let mut n = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            let b = Board::load(&e.unwrap().path()).unwrap();
            assert!(!b.cpufreq.is_empty() && !b.rail.is_empty(), "{}", b.name);
            n += 1;
        }
        assert!(n >= 2);
    }

    #[test]
    fn a_profile_missing_for_a_device_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.toml");
        std::fs::write(&p, "name = \"x\"\n[[cpufreq]]\npolicy = \"policy0\"\nprofiles.balanced = { governor = \"schedutil\" }\n").unwrap();
        let e = Board::load(&p).unwrap_err().to_string();
        assert!(e.contains("policy0 has no power-saver profile"), "{e}");
    }
}
