//! The closed-loop budget and thermal controller: pure decisions, no I/O.
//!
//! One number, the cap fraction `f` in `[min_fraction, 1]`, holds every
//! device back together: each device's cap is the highest frequency at or
//! under `f` times its profile's maximum. Each period:
//! - near a passive trip point (within the board's margin) `f` drops 15%;
//! - over the budget it is cut in proportion (`f · budget / power`, a little
//!   under), which lands under the budget in one period when power follows
//!   frequency;
//! - under the budget it rises one frequency step at a time, and only when
//!   the power predicted at that step (all power scaled by the stepping
//!   device's frequency ratio, an overestimate since other devices and idle
//!   power do not scale) stays under the budget by the hysteresis. That prediction is what keeps discrete frequency
//!   steps from oscillating around the budget. It starts from the highest
//!   of the last few readings: an energy counter read just before its
//!   update, or a sensor read mid-change, gives one low reading, and one
//!   low reading must not take a step the steady power would not allow.

/// Why performance is held back; the strings are power-profiles-daemon's
/// `PerformanceDegraded` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    None,
    PowerBudget,
    Thermal,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::None => "",
            Reason::PowerBudget => "power-budget",
            Reason::Thermal => "high-operating-temperature",
        }
    }
}

/// One period's measurements.
#[derive(Debug, Clone)]
pub struct Reading {
    /// System power, when a sensor gives it.
    pub watts: Option<f64>,
    pub budget: f64,
    /// (temperature, passive trip) per zone, °C.
    pub temps: Vec<(f64, Option<f64>)>,
    /// Degrees below a passive trip where capping starts.
    pub margin: f64,
}

/// How many of the latest power readings a step up is predicted from.
const RECENT: usize = 3;

#[derive(Debug, Clone)]
pub struct Controller {
    pub fraction: f64,
    pub min_fraction: f64,
    pub hysteresis: f64,
    thermal: bool,
    /// The latest power readings, newest last, at most [`RECENT`].
    recent: std::collections::VecDeque<f64>,
}

impl Default for Controller {
    fn default() -> Self {
        Controller {
            fraction: 1.0,
            min_fraction: 0.05,
            hysteresis: 0.03,
            thermal: false,
            recent: std::collections::VecDeque::with_capacity(RECENT),
        }
    }
}

impl Controller {
    /// Decides this period's fraction. `next_up(f)` gives the fraction at
    /// which the next device cap above `f` moves up, and where that device
    /// runs now as a fraction of its maximum (`None` when every device is at
    /// its profile's maximum).
    pub fn step(&mut self, r: &Reading, next_up: impl Fn(f64) -> Option<(f64, f64)>) -> Reason {
        let near = |k: f64| {
            r.temps
                .iter()
                .any(|(t, trip)| trip.is_some_and(|p| *t >= p - k * r.margin))
        };
        let (hot, warm) = (near(1.0), near(2.0));
        match r.watts {
            Some(p) => {
                if self.recent.len() == RECENT {
                    self.recent.pop_front();
                }
                self.recent.push_back(p);
            }
            None => self.recent.clear(),
        }
        if hot {
            self.fraction = (self.fraction * 0.85).max(self.min_fraction);
            self.thermal = true;
        } else if let Some(p) = r.watts.filter(|p| *p > r.budget) {
            self.fraction = (self.fraction * r.budget / p * 0.98).max(self.min_fraction);
            self.thermal = false;
        } else if self.fraction < 1.0 && !warm {
            match next_up(self.fraction) {
                None => self.fraction = 1.0,
                Some((up, now)) => {
                    // As if all power scaled with the stepping device:
                    // an overestimate, so the step never crosses the budget.
                    let fits = match self.recent.iter().copied().reduce(f64::max) {
                        Some(p) => p * up / now.max(1e-6) <= r.budget * (1.0 - self.hysteresis),
                        None => true,
                    };
                    if fits {
                        self.fraction = up.min(1.0);
                    }
                }
            }
            if self.fraction >= 1.0 {
                self.thermal = false;
            }
        }
        if self.fraction >= 1.0 {
            Reason::None
        } else if self.thermal || hot {
            Reason::Thermal
        } else {
            Reason::PowerBudget
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device with ten even steps; power = 2 W idle + load · f.
    fn steps(f: f64) -> Option<(f64, f64)> {
        let cur = quantized(f);
        (cur < 1.0).then_some((cur + 0.1, cur))
    }

    fn quantized(f: f64) -> f64 {
        ((f * 10.0 + 1e-9).floor() / 10.0).max(0.1)
    }

    fn reading(watts: f64) -> Reading {
        Reading {
            watts: Some(watts),
            budget: 20.0,
            temps: vec![],
            margin: 5.0,
        }
    }

    #[test]
    fn settles_under_the_budget_and_does_not_oscillate() {
        let mut c = Controller::default();
        let load = 40.0;
        let mut history = Vec::new();
        for _ in 0..30 {
            let p = 2.0 + load * quantized(c.fraction);
            history.push(p);
            c.step(&reading(p), steps);
        }
        assert!(history[0] > 20.0);
        assert!(history[2..].iter().all(|p| *p <= 20.0), "{history:?}");
        let tail = &history[5..];
        assert!(
            tail.windows(2).all(|w| (w[0] - w[1]).abs() < 1e-9),
            "oscillates: {history:?}"
        );
        assert!(tail[0] >= 20.0 * 0.85, "held too far under: {history:?}");
    }

    #[test]
    fn one_low_reading_does_not_take_a_step_the_steady_power_forbids() {
        let mut c = Controller::default();
        let load = 40.0;
        for _ in 0..30 {
            c.step(&reading(2.0 + load * quantized(c.fraction)), steps);
        }
        let (settled, p) = (c.fraction, 2.0 + load * quantized(c.fraction));
        // The next step up would not fit at the steady power...
        let (up, now) = steps(settled).unwrap();
        assert!(p * up / now > 20.0 * (1.0 - c.hysteresis));
        // ...but would at one reading just low enough.
        let low = 20.0 * (1.0 - c.hysteresis) * now / up - 0.1;
        assert_eq!(c.step(&reading(low), steps), Reason::PowerBudget);
        assert_eq!(c.fraction, settled, "stepped up on one low reading");
        // Readings that stay low are real: then it steps up.
        for _ in 0..RECENT {
            c.step(&reading(low), steps);
        }
        assert!(c.fraction > settled);
    }

    #[test]
    fn passive_trip_wins_and_recovery_waits_for_cooling() {
        let mut c = Controller::default();
        let hot = Reading {
            watts: Some(5.0),
            budget: 20.0,
            temps: vec![(82.0, Some(85.0))],
            margin: 5.0,
        };
        assert_eq!(c.step(&hot, steps), Reason::Thermal);
        assert!(c.fraction < 1.0);
        let f = c.fraction;
        let warm = Reading {
            temps: vec![(76.0, Some(85.0))],
            ..hot.clone()
        };
        assert_eq!(c.step(&warm, steps), Reason::Thermal);
        assert_eq!(c.fraction, f, "raised while still warm");
        let cool = Reading {
            temps: vec![(50.0, Some(85.0))],
            ..hot
        };
        for _ in 0..10 {
            c.step(&cool, steps);
        }
        assert_eq!(c.fraction, 1.0);
        assert_eq!(c.step(&reading(5.0), steps), Reason::None);
    }
}
