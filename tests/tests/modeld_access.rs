//! Only root and the `pocket` group may change models: enforced by the
//! shipped bus policy and again by modeld from the caller's credentials.

use pocket_tests::*;

fn pocket_gid() -> Option<u32> {
    static ONCE: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *ONCE.get_or_init(find_or_create_pocket_group)
}

fn find_or_create_pocket_group() -> Option<u32> {
    if let Ok(Some(g)) = nix::unistd::Group::from_name("pocket") {
        return Some(g.gid.as_raw());
    }
    if is_root() {
        let _ = std::process::Command::new("groupadd")
            .args(["-f", "-r", "pocket"])
            .status();
    }
    nix::unistd::Group::from_name("pocket")
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

#[test]
fn shipped_policy_lets_anyone_read_and_only_pocket_change() {
    if !root_or_skip("switching users") {
        return;
    }
    let gid = pocket_gid().expect("the pocket group exists or can be created");
    let mut w = World::start();
    w.start_modeld();
    let nobody = RunAs::Nobody { extra_gid: None };
    run_pocketctl(&w.bus, nobody, &["model", "list", "--json"]).ok();
    run_pocketctl(&w.bus, nobody, &["model", "catalog", "--json"]).ok();
    run_pocketctl(&w.bus, nobody, &["model", "install", "mlp"]).fails_with("AccessDenied");
    w.assert_nothing_installed();

    let member = RunAs::Nobody {
        extra_gid: Some(gid),
    };
    let info = run_pocketctl(&w.bus, member, &["model", "install", "mlp", "--json"])
        .ok()
        .json();
    assert_eq!(info["name"], "mlp");
    run_pocketctl(&w.bus, nobody, &["model", "remove", "mlp"]).fails_with("AccessDenied");
    run_pocketctl(&w.bus, member, &["model", "remove", "mlp"]).ok();
    w.assert_nothing_installed();
}

#[test]
fn modeld_checks_the_caller_even_on_a_permissive_bus() {
    if !root_or_skip("switching users") {
        return;
    }
    let gid = pocket_gid().expect("the pocket group exists or can be created");
    let mut w = World::with_bus(DevBus::start_with(BusPolicy::Permissive));
    w.start_modeld();
    let nobody = RunAs::Nobody { extra_gid: None };
    run_pocketctl(&w.bus, nobody, &["model", "install", "mlp"]).fails_with(
        "installing a model needs root or membership of the admin group (PermissionDenied)",
    );
    run_pocketctl(&w.bus, nobody, &["model", "gc"]).fails_with("(PermissionDenied)");
    w.assert_nothing_installed();
    let member = RunAs::Nobody {
        extra_gid: Some(gid),
    };
    run_pocketctl(&w.bus, member, &["model", "install", "mlp"]).ok();
    assert_eq!(w.installed().len(), 1);
}
