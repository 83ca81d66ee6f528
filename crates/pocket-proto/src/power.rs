//! power-profiles-daemon's D-Bus API (`org.freedesktop.UPower.PowerProfiles`),
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
}
