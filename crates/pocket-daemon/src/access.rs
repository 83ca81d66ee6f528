//! Who may change things: root and members of the admin group. Each
//! daemon's bus policy says the same; this re-check holds even on a bus with
//! a looser policy.

use zbus::message::Header;
use zbus::names::BusName;

/// Resolves the admin group's id; `None` when the group does not exist
/// (then only root may change anything).
pub fn admin_gid(group: &str) -> Option<u32> {
    nix::unistd::Group::from_name(group)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

/// Why a caller may not do what it asked, as a person can read it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct Denied(pub String);

pub async fn require_admin(
    conn: &zbus::Connection,
    hdr: &Header<'_>,
    admin_gid: Option<u32>,
    action: &str,
) -> Result<(), Denied> {
    let denied = || {
        Denied(format!(
            "{action} needs root or membership of the admin group"
        ))
    };
    let sender = hdr.sender().ok_or_else(denied)?;
    let dbus = zbus::fdo::DBusProxy::new(conn)
        .await
        .map_err(|e| Denied(format!("{action}: cannot ask the bus who is calling: {e}")))?;
    let creds = dbus
        .get_connection_credentials(BusName::Unique(sender.to_owned()))
        .await
        .map_err(|e| Denied(format!("{action}: cannot ask the bus who is calling: {e}")))?;
    if creds.unix_user_id() == Some(0) {
        return Ok(());
    }
    let Some(gid) = admin_gid else {
        return Err(denied());
    };
    let groups: Vec<u32> = match creds.unix_group_ids() {
        Some(g) => g.clone(),
        None => creds.process_id().map(groups_of_pid).unwrap_or_default(),
    };
    if groups.contains(&gid) {
        Ok(())
    } else {
        Err(denied())
    }
}

fn groups_of_pid(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}
