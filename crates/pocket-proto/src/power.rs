//! Power: power-profiles-daemon's D-Bus API (`org.freedesktop.UPower.PowerProfiles`),
//! as powerd serves it and as npud holds the `performance` profile.

pub const BUS_NAME: &str = "org.freedesktop.UPower.PowerProfiles";
pub const PATH: &str = "/org/freedesktop/UPower/PowerProfiles";

#[zbus::proxy(
    interface = "org.freedesktop.UPower.PowerProfiles",
    default_service = "org.freedesktop.UPower.PowerProfiles",
    default_path = "/org/freedesktop/UPower/PowerProfiles"
)]
pub trait PowerProfiles {
    fn hold_profile(&self, profile: &str, reason: &str, application_id: &str) -> zbus::Result<u32>;
    fn release_profile(&self, cookie: u32) -> zbus::Result<()>;
    #[zbus(property)]
    fn active_profile(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn set_active_profile(&self, profile: &str) -> zbus::Result<()>;
    #[zbus(property)]
    fn performance_degraded(&self) -> zbus::Result<String>;
}

/// `org.pocketos.Power1`: powerd's own interface.
pub const POWER1_NAME: &str = "org.pocketos.Power1";
pub const POWER1_PATH: &str = "/org/pocketos/Power1";

/// A device's cap now: its governor and frequency cap in Hz.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, zbus::zvariant::Type, PartialEq)]
pub struct Cap {
    pub governor: String,
    pub max_hz: u64,
}

/// One control period's measurements and decisions.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, zbus::zvariant::Type, PartialEq)]
pub struct Telemetry {
    pub profile: String,
    pub budget_watts: f64,
    /// NaN when no power sensor reads.
    pub system_watts: f64,
    pub rails: std::collections::HashMap<String, f64>,
    /// °C per thermal zone.
    pub temperatures: std::collections::HashMap<String, f64>,
    pub caps: std::collections::HashMap<String, Cap>,
    /// How far caps are held back, 1.0 for not at all.
    pub cap_fraction: f64,
    /// `power-budget`, `high-operating-temperature`, or empty.
    pub degraded_reason: String,
    pub status: String,
}

#[zbus::proxy(
    interface = "org.pocketos.Power1",
    default_service = "org.pocketos.Power1",
    default_path = "/org/pocketos/Power1"
)]
pub trait Power1 {
    fn telemetry(&self) -> zbus::Result<Telemetry>;
    fn set_budget(&self, watts: f64) -> zbus::Result<()>;
    #[zbus(property)]
    fn budget_watts(&self) -> zbus::Result<f64>;
    #[zbus(property)]
    fn degraded_reason(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn status(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn board(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
}
