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
    let primary = creds.unix_user_id().and_then(primary_gid);
    if is_admin(
        creds.unix_user_id(),
        creds.unix_group_ids().map(Vec::as_slice),
        primary,
        admin_gid,
    ) {
        Ok(())
    } else {
        Err(denied())
    }
}

/// The decision, from what the bus says of the caller: root, or a member
/// of the admin group by its groups as the bus reports them or by the
/// primary group of its user's account. A bus that reports no groups
/// admits no one but root: the process behind a connection is not asked
/// (its pid may be reused by then).
fn is_admin(
    uid: Option<u32>,
    groups: Option<&[u32]>,
    primary: Option<u32>,
    admin_gid: Option<u32>,
) -> bool {
    if uid == Some(0) {
        return true;
    }
    let (Some(admin), Some(groups)) = (admin_gid, groups) else {
        return false;
    };
    groups.contains(&admin) || primary == Some(admin)
}

/// The primary group of the account `uid`, from the user database.
fn primary_gid(uid: u32) -> Option<u32> {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.gid.as_raw())
}

#[cfg(test)]
mod tests {
    use super::is_admin;

    #[test]
    fn root_and_members_only_and_no_groups_fails_closed() {
        assert!(is_admin(Some(0), None, None, None));
        assert!(is_admin(Some(1000), Some(&[5, 42]), Some(1000), Some(42)));
        assert!(is_admin(Some(1000), Some(&[]), Some(42), Some(42)));
        assert!(!is_admin(Some(1000), Some(&[5]), Some(1000), Some(42)));
        // No admin group on this system: root only.
        assert!(!is_admin(Some(1000), Some(&[42]), Some(42), None));
        // The bus does not report groups: denied, even for an account whose
        // primary group is the admin group.
        assert!(!is_admin(Some(1000), None, Some(42), Some(42)));
        assert!(!is_admin(None, None, None, Some(42)));
    }
}
