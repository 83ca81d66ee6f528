//! The dashboard in a real browser (headless Chromium driven through
//! playwright-core) against the real service and real daemons on a private
//! bus, with a signed catalog on 127.0.0.1: set the admin password, install
//! a model with one click and watch the progress, run it, switch the power
//! profile, and see a tampered pack refused with the reason on the page.
//! Screenshots of the main views go to `POCKET_SCREENSHOTS` (default
//! target/screenshots; docs/screenshots holds the ones the docs show).

use pocket_tests::*;

/// modeld, npud (with `npud_extra`), powerd on a simulated RK3588, otad
/// on a booted A/B box, and the dashboard, whose URL is returned; the
/// board and the box live as long as the caller keeps them.
fn start_daemons(w: &mut World, npud_extra: &str) -> (SimBoard, UpdateBox, String) {
    let board = SimBoard::rk3588(&w.tmp.path().join("sys"));
    w.start_modeld();
    w.start_npud(npud_extra);
    w.start_powerd(board.root(), "");
    let os = Publisher::new(&w.tmp.path().join("os-publisher"));
    let mut updates = UpdateBox::new(&w.tmp.path().join("box"), Loader::Grub, &os, "");
    updates.boot(&w.bus);
    let url = w.start_webd("");
    (board, updates, url)
}

/// Where screenshots go: `POCKET_SCREENSHOTS`, else target/screenshots.
fn screenshots() -> String {
    std::env::var("POCKET_SCREENSHOTS").unwrap_or_else(|_| {
        workspace_root()
            .join("target/screenshots")
            .display()
            .to_string()
    })
}

#[test]
fn a_person_installs_runs_and_switches_power_in_the_browser() {
    let mut w = World::start();
    let (_board, _updates, url) = start_daemons(&mut w, "");
    // Slow enough to watch: about two seconds for the model.
    w.http.throttle(2000);

    let tampered = w.tmp.path().join("attention-tampered.pack");
    let mut pack = std::fs::read(w.site.join("packs/attention-1.0.pack")).unwrap();
    let n = pack.len();
    pack[n - 64] ^= 0x20;
    std::fs::write(&tampered, pack).unwrap();
    let shots = screenshots();

    let seen = browse(
        &url,
        &[
            ("PASSWORD", "a long admin password"),
            ("MODEL", "mlp"),
            ("SCENARIO", "full"),
            ("TAMPERED_PACK", tampered.to_str().unwrap()),
            ("SCREENSHOTS", &shots),
        ],
    );
    let text = |k: &str| {
        seen[k]
            .as_str()
            .unwrap_or_else(|| panic!("{k}: {seen:#}"))
            .to_string()
    };

    assert_eq!(text("login_title"), "Set the admin password");
    // On the box itself the page asks for no setup code.
    assert_eq!(seen["setup_code_asked"], false, "{seen:#}");
    assert_eq!(text("who"), "admin");
    assert_eq!(text("fits"), "yes");
    // Progress showed bytes moving before the end.
    let progress: Vec<String> = seen["progress"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert!(
        progress
            .iter()
            .any(|p| p.starts_with("downloading · ") && p.contains(" of ")),
        "{progress:?}"
    );
    assert!(
        progress.iter().any(|p| p.contains("/s")),
        "no speed shown: {progress:?}"
    );
    assert!(text("install_message").contains("mlp is installed"));
    assert_eq!(text("store_state"), "Installed");
    assert_eq!(w.installed(), vec![("mlp".into(), "1.0".into())]);

    // The provider the page shows is the one npud reports.
    let loaded = w.ctl(&["runtime", "loaded", "--json"]).ok().json();
    let provider = loaded[0]["provider"].as_str().unwrap();
    assert_eq!(text("run_provider"), provider);
    assert_eq!(text("installed_provider"), provider);
    assert!(text("run_latency").ends_with(" ms"));

    // The switch reached powerd.
    assert_eq!(
        w.ctl(&["power", "get", "--json"]).ok().json()["profile"],
        "power-saver"
    );
    assert!(text("temperatures").contains("°C"));
    assert!(text("watts").ends_with(" W"), "{}", text("watts"));

    // The tampered upload: the verifier's reason on the page, nothing
    // installed beside mlp.
    let msg = text("tampered_message");
    assert!(
        msg.starts_with("Install of attention-tampered.pack failed"),
        "{msg}"
    );
    assert!(msg.contains("does not match its signed sha256"), "{msg}");
    assert_eq!(w.installed(), vec![("mlp".into(), "1.0".into())]);

    assert!(
        seen["console_errors"].as_array().unwrap().is_empty(),
        "the page logged errors: {}",
        seen["console_errors"]
    );
    for view in [
        "login",
        "store",
        "install-progress",
        "installed",
        "power",
        "updates",
        "dashboard",
    ] {
        let f = std::path::Path::new(&shots).join(format!("{view}.png"));
        assert!(
            f.metadata().map(|m| m.len() > 1000).unwrap_or(false),
            "{} missing",
            f.display()
        );
    }
}

/// An LLM from the store, one click to a chat: two turns with streamed
/// text and their speed, then Stop in the middle of an answer.
#[test]
fn a_person_installs_an_llm_and_chats_with_it_in_the_browser() {
    let mut w = World::start();
    w.publisher
        .pack_folder(&w.packs, "smollm2-int4", &llm_folder("smollm2-int4"));
    w.republish(&w.packs.clone(), "2");
    let (_board, _updates, url) = start_daemons(&mut w, "memory_budget_mb = 4096");
    let shots = screenshots();
    let seen = browse(
        &url,
        &[
            ("PASSWORD", "a long admin password"),
            ("MODEL", "smollm2-int4"),
            ("SCENARIO", "chat"),
            ("SCREENSHOTS", &shots),
        ],
    );
    let turns = seen["chat"].as_array().expect("two turns");
    let first = turns[0]["answer"].as_str().unwrap();
    assert!(first.contains('4'), "{seen:#}");
    assert!(!turns[1]["answer"].as_str().unwrap().is_empty(), "{seen:#}");
    for t in turns {
        let stats = t["stats"].as_str().unwrap();
        assert!(
            stats.contains("first token") && stats.contains("tokens/s") && stats.contains(" J"),
            "{stats}"
        );
    }
    assert!(
        seen["chat_stopped"].as_str().unwrap().contains("stopped"),
        "{seen:#}"
    );
    assert_eq!(
        seen["send_enabled"], true,
        "the page is ready for the next message"
    );
    assert_eq!(seen["console_errors"], serde_json::json!([]), "{seen:#}");
}
