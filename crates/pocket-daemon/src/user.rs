//! Giving up root: a daemon that needs root only to start (the dashboard,
//! to listen on port 80) takes what it needs, then becomes its own system
//! user for good.

use nix::unistd::{Gid, Uid, User};

#[derive(Debug, thiserror::Error)]
pub enum RunAsError {
    #[error("user {0:?} does not exist")]
    NoSuchUser(String),
    #[error("looking up user {user:?}: {source}")]
    Lookup { user: String, source: nix::Error },
    #[error("becoming user {user:?}: {step}: {source}")]
    Switch {
        user: String,
        step: &'static str,
        source: nix::Error,
    },
    #[error("still able to regain root after becoming {0:?}")]
    Regained(String),
}

/// Becomes `name` (its uid, its primary group and its groups from the group
/// database) for the rest of the process's life, in every thread. Nothing
/// to do when the process already runs as `name`.
pub fn run_as(name: &str) -> Result<(), RunAsError> {
    let user = User::from_name(name)
        .map_err(|source| RunAsError::Lookup {
            user: name.into(),
            source,
        })?
        .ok_or_else(|| RunAsError::NoSuchUser(name.into()))?;
    if Uid::current() == user.uid && Uid::effective() == user.uid {
        return Ok(());
    }
    let switch = |step: &'static str| {
        move |source| RunAsError::Switch {
            user: name.into(),
            step,
            source,
        }
    };
    let cname = std::ffi::CString::new(name).map_err(|_| RunAsError::NoSuchUser(name.into()))?;
    // Groups first, while still allowed to change them; glibc applies each
    // change to every thread of the process.
    nix::unistd::initgroups(&cname, user.gid).map_err(switch("initgroups"))?;
    nix::unistd::setresgid(user.gid, user.gid, user.gid).map_err(switch("setresgid"))?;
    nix::unistd::setresuid(user.uid, user.uid, user.uid).map_err(switch("setresuid"))?;
    if nix::unistd::setuid(Uid::from_raw(0)).is_ok()
        || nix::unistd::setgid(Gid::from_raw(0)).is_ok()
    {
        return Err(RunAsError::Regained(name.into()));
    }
    Ok(())
}
