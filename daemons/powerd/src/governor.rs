//! The core room: the chosen profile, holds, the budget, and one control
//! period (measure, decide, apply). The bus surfaces in `ppd.rs` and
//! `power1.rs` are thin layers over [`Governor`].

use crate::board::{Board, PROFILES};
use crate::controller::{Controller, Reading, Reason};
use crate::error::GovernorError;
use crate::state::Store;
use crate::sysfs::Hardware;
use std::collections::BTreeMap;

/// The budgets `SetBudget` accepts, in watts.
const BUDGET_WATTS: std::ops::RangeInclusive<f64> = 1.0..=10_000.0;

/// A `HoldProfile` in force.
#[derive(Debug, Clone)]
pub struct Hold {
    pub cookie: u32,
    pub profile: String,
    pub reason: String,
    pub application_id: String,
    /// Unique bus name of the caller; the hold goes when it leaves.
    pub owner: String,
}

/// What the last period measured and set.
#[derive(Debug, Clone, Default)]
pub struct Telemetry {
    pub system_watts: f64,
    pub rails: BTreeMap<String, f64>,
    pub temps: BTreeMap<String, f64>,
    /// device → (governor, cap in Hz)
    pub caps: BTreeMap<String, (String, u64)>,
}

#[derive(Debug)]
pub struct Governor {
    pub board: Board,
    pub hw: Hardware,
    controller: Controller,
    store: Store,
    pub budget: f64,
    pub user_profile: String,
    pub battery_aware: bool,
    pub holds: Vec<Hold>,
    next_cookie: u32,
    pub reason: Reason,
    pub telemetry: Telemetry,
    /// Problems seen in the last period (unreadable sensors, refused
    /// writes), beside those found at start.
    pub runtime_problems: Vec<String>,
}

impl Governor {
    pub fn new(board: Board, hw: Hardware, store: Store, default_budget: f64) -> Governor {
        let user_profile = store
            .get("profile")
            .filter(|p| PROFILES.contains(&p.as_str()))
            .unwrap_or_else(|| "balanced".into());
        let budget = store
            .get("budget_watts")
            .and_then(|b| b.parse().ok())
            .unwrap_or(default_budget);
        let battery_aware = store.get("battery_aware").is_none_or(|b| b == "true");
        let mut g = Governor {
            board,
            hw,
            controller: Controller::default(),
            store,
            budget,
            user_profile,
            battery_aware,
            holds: Vec::new(),
            next_cookie: 1,
            reason: Reason::None,
            telemetry: Telemetry::default(),
            runtime_problems: Vec::new(),
        };
        g.apply();
        g
    }

    /// The profile in force: a power-saver hold wins, then a performance
    /// hold, then the user's choice.
    pub fn active_profile(&self) -> String {
        for p in ["power-saver", "performance"] {
            if self.holds.iter().any(|h| h.profile == p) {
                return p.to_string();
            }
        }
        self.user_profile.clone()
    }

    /// The user picks a profile: it persists, and every hold is released.
    /// Returns the released holds.
    pub fn set_profile(&mut self, profile: &str) -> Result<Vec<Hold>, GovernorError> {
        if !PROFILES.contains(&profile) {
            return Err(GovernorError::UnknownProfile(profile.to_string()));
        }
        self.store.set("profile", profile)?;
        self.user_profile = profile.to_string();
        let released = std::mem::take(&mut self.holds);
        self.apply();
        Ok(released)
    }

    pub fn hold(
        &mut self,
        profile: &str,
        reason: &str,
        app: &str,
        owner: &str,
    ) -> Result<u32, GovernorError> {
        if profile != "power-saver" && profile != "performance" {
            return Err(GovernorError::NotHoldable(profile.to_string()));
        }
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        self.holds.push(Hold {
            cookie,
            profile: profile.into(),
            reason: reason.into(),
            application_id: app.into(),
            owner: owner.into(),
        });
        self.apply();
        Ok(cookie)
    }

    pub fn release(&mut self, cookie: u32) -> Result<Hold, GovernorError> {
        let i = self
            .holds
            .iter()
            .position(|h| h.cookie == cookie)
            .ok_or(GovernorError::NoSuchHold(cookie))?;
        let h = self.holds.remove(i);
        self.apply();
        Ok(h)
    }

    /// Drops the holds of a caller that left the bus.
    pub fn release_owner(&mut self, owner: &str) -> usize {
        let before = self.holds.len();
        self.holds.retain(|h| h.owner != owner);
        let n = before - self.holds.len();
        if n > 0 {
            self.apply();
        }
        n
    }

    pub fn set_budget(&mut self, watts: f64) -> Result<(), GovernorError> {
        if !(watts.is_finite() && BUDGET_WATTS.contains(&watts)) {
            return Err(GovernorError::BudgetOutOfRange {
                watts,
                min: *BUDGET_WATTS.start(),
                max: *BUDGET_WATTS.end(),
            });
        }
        self.store.set("budget_watts", &watts.to_string())?;
        self.budget = watts;
        Ok(())
    }

    pub fn set_battery_aware(&mut self, on: bool) -> Result<(), GovernorError> {
        self.store
            .set("battery_aware", if on { "true" } else { "false" })?;
        self.battery_aware = on;
        Ok(())
    }

    /// Writes every device's governor and cap for the active profile and
    /// the controller's fraction.
    fn apply(&mut self) {
        let profile = self.active_profile();
        let fraction = self.controller.fraction;
        let mut problems = Vec::new();
        let mut caps = BTreeMap::new();
        for d in &mut self.hw.devices {
            if let Err(e) = d.apply(&profile, fraction) {
                problems.push(e.to_string());
            }
            if let Some((g, cap)) = &d.applied {
                caps.insert(d.id.clone(), (g.clone(), d.cap_hz(*cap)));
            }
        }
        self.telemetry.caps = caps;
        self.runtime_problems
            .retain(|p| !p.contains("governor") && !p.contains("max_freq"));
        self.runtime_problems.extend(problems);
    }

    /// One control period: measure, decide, apply. Returns whether the
    /// degradation reason changed.
    pub fn tick(&mut self) -> bool {
        let mut problems = Vec::new();
        let mut rails = BTreeMap::new();
        let mut total = None::<f64>;
        for r in &mut self.hw.rails {
            match r.watts() {
                Ok(Some(w)) => {
                    rails.insert(r.name.clone(), w);
                    *total.get_or_insert(0.0) += w;
                }
                Ok(None) => {}
                Err(e) => problems.push(e.to_string()),
            }
        }
        let mut temps = BTreeMap::new();
        let mut zone_temps = Vec::new();
        for z in &self.hw.zones {
            match z.temp_c() {
                Ok(t) => {
                    temps.insert(z.name.clone(), t);
                    zone_temps.push((t, z.passive_c));
                }
                Err(e) => problems.push(e.to_string()),
            }
        }
        for (name, path) in &self.hw.temps {
            match crate::sysfs::read_num::<f64>(path) {
                Ok(m) => {
                    temps.insert(name.clone(), m / 1000.0);
                }
                Err(e) => problems.push(e.to_string()),
            }
        }
        let reading = Reading {
            watts: total,
            budget: self.budget,
            temps: zone_temps,
            margin: self.board.thermal_margin_c,
        };
        let profile = self.active_profile();
        let devices = &self.hw.devices;
        let next_up = |f: f64| {
            devices
                .iter()
                .filter_map(|d| d.next_step_up(&profile, f))
                .min_by(|a, b| a.0.total_cmp(&b.0))
        };
        let reason = self.controller.step(&reading, next_up);
        self.telemetry.system_watts = total.unwrap_or(f64::NAN);
        self.telemetry.rails = rails;
        self.telemetry.temps = temps;
        self.runtime_problems = problems;
        self.apply();
        // A cap someone else changed behind our back is rewritten.
        for d in &mut self.hw.devices {
            if let (Some((_, cap)), Ok(now)) = (&d.applied, d.read_cap()) {
                if now != *cap {
                    d.applied = None;
                }
            }
        }
        let changed = reason != self.reason;
        self.reason = reason;
        changed
    }

    pub fn fraction(&self) -> f64 {
        self.controller.fraction
    }

    /// `ok`, or every problem found at start and in the last period.
    pub fn status(&self) -> String {
        let all: Vec<&String> = self
            .hw
            .problems
            .iter()
            .chain(&self.runtime_problems)
            .collect();
        if all.is_empty() {
            "ok".into()
        } else {
            format!(
                "degraded: {}",
                all.iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        }
    }
}
