//! The dashboard's API against the real service and real daemons on a
//! private bus: first-boot setup, login and sessions, changes refused
//! without the credential or the CSRF token, an install with live progress
//! over Server-Sent Events, a test run, power, updates, and bad requests
//! answered with clear errors while the service stays up.

use pocket_tests::*;
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

const PASSWORD: &str = "correct horse battery";

/// modeld, npud and powerd (on a simulated RK3588) and the dashboard.
fn world(webd_extra: &str) -> (World, SimBoard, Dash) {
    let mut w = World::start();
    let board = SimBoard::rk3588(&w.tmp.path().join("sys"));
    w.start_modeld();
    w.start_npud("");
    w.start_powerd(board.root(), "");
    let base = w.start_webd(webd_extra);
    (w, board, Dash::new(&base))
}

fn profile(w: &World) -> String {
    w.ctl(&["power", "get", "--json"]).ok().json()["profile"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn first_boot_sets_the_password_then_login_logout_and_restart() {
    let (mut w, _board, mut d) = world("");
    let s = d.get("/api/session").ok();
    assert_eq!(s["setup_needed"], true);
    assert_eq!(s["logged_in"], false);

    // The page loads before anyone logs in, with a strict policy.
    let page = reqwest::blocking::get(format!("{}/", d.base)).unwrap();
    assert_eq!(page.status().as_u16(), 200);
    let csp = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'self'"), "{csp}");
    assert!(page.text().unwrap().contains("Model store"));

    // Setup: the header a cross-site form cannot send is required, and a
    // short password is refused.
    d.post_with(
        "/api/setup",
        Some(json!({"password": PASSWORD})),
        &[("x-csrf-token", "")],
    )
    .fails(403, "CsrfFailed");
    let msg = d
        .post("/api/setup", json!({"password": "short"}))
        .fails(400, "BadRequest");
    assert!(msg.contains("at least 8 characters"), "{msg}");
    let r = d.log_in(PASSWORD, true);
    let cookie = r.set_cookie.clone().expect("cookie");
    r.ok();
    for attr in ["HttpOnly", "SameSite=Strict", "Secure", "Path=/"] {
        assert!(cookie.contains(attr), "{cookie} lacks {attr}");
    }
    assert_eq!(d.get("/api/session").ok()["setup_needed"], false);

    // Stored hashed, readable by root only.
    let cred = w.webd_dir().join("admin.credential");
    let text = std::fs::read_to_string(&cred).unwrap();
    assert!(text.starts_with("$argon2id$"), "{text}");
    assert!(!text.contains(PASSWORD));
    assert_eq!(
        std::fs::metadata(&cred).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // Set once only; a second setup does not replace it.
    let mut other = Dash::new(&d.base);
    other
        .log_in("another password", true)
        .fails(409, "AlreadySet");
    other
        .log_in("wrong password", false)
        .fails(401, "WrongPassword");

    // A session's changes work; after logout the same cookie does not.
    d.post("/api/power/profile", json!({"profile": "performance"}))
        .ok();
    assert_eq!(profile(&w), "performance");
    let old = (d.session.clone(), d.csrf.clone());
    d.post("/api/logout", json!({})).ok();
    d.post("/api/power/profile", json!({"profile": "balanced"}))
        .fails(401, "LoginRequired");
    assert_eq!(profile(&w), "performance");

    // The credential survives a restart; sessions do not.
    d.log_in(PASSWORD, false).ok();
    let live = (d.session.clone(), d.csrf.clone());
    let bus = &w.bus;
    w.webd.as_mut().unwrap().restart(bus);
    wait_for("the dashboard back", Duration::from_secs(10), || {
        (d.get("/api/session").status == 200).then_some(())
    });
    assert_eq!(d.get("/api/session").ok()["setup_needed"], false);
    d.post("/api/power/profile", json!({"profile": "balanced"}))
        .fails(401, "LoginRequired");
    d.log_in(PASSWORD, false).ok();
    d.post("/api/power/profile", json!({"profile": "balanced"}))
        .ok();
    assert_eq!(profile(&w), "balanced");

    // No secret in the log: password, session tokens, CSRF tokens.
    let log = w.webd.as_ref().unwrap().log_text();
    assert!(log.contains("admin logged in"), "{log}");
    let mut secrets = vec![PASSWORD.to_string()];
    for (s, c) in [old, live, (d.session.clone(), d.csrf.clone())] {
        secrets.extend(s);
        secrets.extend(c);
    }
    for secret in secrets {
        assert!(!log.contains(&secret), "the log holds a secret");
    }
}

#[test]
fn changes_without_the_credential_or_csrf_token_are_refused() {
    let (w, _board, mut d) = world("");
    d.log_in(PASSWORD, true).ok();
    let csrf = d.csrf.clone().unwrap();
    let anon = Dash::new(&d.base);

    // Reading is open; changing is not.
    assert!(anon.get("/api/models").ok()["catalog"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["name"] == "mlp"));
    anon.post("/api/power/profile", json!({"profile": "performance"}))
        .fails(401, "LoginRequired");
    anon.post("/api/models/install", json!({"name": "mlp"}))
        .fails(401, "LoginRequired");
    anon.upload("/api/models/upload", vec![1, 2, 3])
        .fails(401, "LoginRequired");
    anon.post("/api/update/rollback", json!({}))
        .fails(401, "LoginRequired");

    // Logged in, but without the session's CSRF token, with another one,
    // or from another site's page.
    d.post_with(
        "/api/power/profile",
        Some(json!({"profile": "performance"})),
        &[("x-csrf-token", "")],
    )
    .fails(403, "CsrfFailed");
    d.post_with(
        "/api/models/install",
        Some(json!({"name": "mlp"})),
        &[("x-csrf-token", &"0".repeat(csrf.len()))],
    )
    .fails(403, "CsrfFailed");
    d.post_with(
        "/api/models/install",
        Some(json!({"name": "mlp"})),
        &[("origin", "http://evil.example")],
    )
    .fails(403, "CrossOrigin");

    // A page under another name (DNS rebinding) is refused, reads too.
    d.post_with(
        "/api/power/profile",
        Some(json!({"profile": "performance"})),
        &[
            ("host", "attacker.example"),
            ("origin", "http://attacker.example"),
        ],
    )
    .fails(403, "BadHost");
    let r = reqwest::blocking::Client::new()
        .get(format!("{}/api/session", d.base))
        .header("host", "attacker.example:80")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    assert!(r.headers().contains_key("content-security-policy"));
    // A loopback address with a name glued after it is not the box.
    for host in [
        "[::1]evil.example",
        "[::1]:80evil.example",
        "localhost:80:80",
    ] {
        let r = reqwest::blocking::Client::new()
            .get(format!("{}/api/session", d.base))
            .header("host", host)
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 403, "{host}");
    }

    // Nothing changed.
    assert_eq!(profile(&w), "balanced");
    w.assert_nothing_installed();
    assert_eq!(
        std::fs::read_dir(w.webd_dir().join("uploads"))
            .unwrap()
            .count(),
        0
    );
    assert!(d.get("/api/models").ok()["jobs"]
        .as_array()
        .unwrap()
        .is_empty());
}

#[test]
fn reading_can_require_a_login() {
    let (_w, _board, mut d) = world("login_to_read = true");
    let anon = Dash::new(&d.base);
    for path in ["/api/models", "/api/power", "/api/update", "/api/events"] {
        anon.get(path).fails(401, "LoginRequired");
    }
    // The page and the session state stay open, to show the login.
    assert_eq!(anon.get("/api/session").ok()["login_to_read"], true);
    d.log_in(PASSWORD, true).ok();
    assert!(d.get("/api/power").ok()["profiles"].is_array());
    d.get("/api/models").ok();
}

#[test]
fn install_with_live_progress_then_run_and_remove() {
    let (w, _board, mut d) = world("");
    d.log_in(PASSWORD, true).ok();
    let events = d.events();
    w.http.throttle(2000);

    let job = d.post("/api/models/install", json!({"name": "mlp"})).ok()["job"]
        .as_str()
        .unwrap()
        .to_string();
    let (done, seen) = wait_event(&events, "mlp installed", Duration::from_secs(60), |e| {
        e["type"] == "model-finished"
    });
    assert_eq!(done["success"], true, "{done}");
    assert_eq!(done["name"], "mlp");
    let progress: Vec<_> = seen
        .iter()
        .filter(|e| e["type"] == "model-job" && e["job"]["id"] == job.as_str())
        .map(|e| &e["job"])
        .collect();
    let partial = progress.iter().find(|j| {
        let (d, t) = (
            j["bytes_done"].as_u64().unwrap(),
            j["bytes_total"].as_u64().unwrap(),
        );
        d > 0 && d < t
    });
    let partial =
        partial.unwrap_or_else(|| panic!("no progress between 0 and done: {progress:#?}"));
    assert_eq!(partial["phase"], "downloading");
    assert!(
        progress
            .iter()
            .any(|j| j["bytes_per_sec"].as_f64().unwrap() > 0.0
                && j["eta_seconds"].as_i64().unwrap() >= 0),
        "no speed or time left: {progress:#?}"
    );
    let dones: Vec<u64> = progress
        .iter()
        .map(|j| j["bytes_done"].as_u64().unwrap())
        .collect();
    assert!(
        dones.windows(2).all(|p| p[0] <= p[1]),
        "progress went back: {dones:?}"
    );

    let models = d.get("/api/models").ok();
    let mlp = &models["installed"][0];
    assert_eq!(mlp["name"], "mlp");
    let entry = models["catalog"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "mlp")
        .unwrap();
    assert_eq!(entry["installed_version"], "1.0");
    assert_eq!(entry["fits_disk"], true);
    assert_eq!(entry["fits_memory"], true);

    // A test run: the provider that ran it, its latency, the outputs.
    let run = d.post("/api/models/mlp/run", json!({})).ok();
    let loaded = w.ctl(&["runtime", "loaded", "--json"]).ok().json();
    let provider = loaded[0]["provider"].as_str().unwrap().to_string();
    assert_eq!(run["provider"], provider.as_str(), "{run}");
    assert!(run["latency_ms"].as_f64().unwrap() > 0.0);
    let out = &run["outputs"][0];
    assert_eq!(out["dtype"], "f32");
    assert!(!out["first"].as_array().unwrap().is_empty());
    let models = d.get("/api/models").ok();
    assert_eq!(models["installed"][0]["loaded"], true);
    assert_eq!(models["installed"][0]["provider"], provider.as_str());

    // Cancel an install half way: it fails as cancelled, nothing stays.
    w.http.throttle(500);
    let job = d
        .post("/api/models/install", json!({"name": "attention"}))
        .ok()["job"]
        .as_str()
        .unwrap()
        .to_string();
    wait_event(
        &events,
        "attention downloading",
        Duration::from_secs(30),
        |e| e["type"] == "model-job" && e["job"]["bytes_done"].as_u64() > Some(0),
    );
    d.post(&format!("/api/models/jobs/{job}/cancel"), json!({}))
        .ok();
    let (end, _) = wait_event(&events, "attention ended", Duration::from_secs(30), |e| {
        e["type"] == "model-finished" && e["name"] == "attention"
    });
    assert_eq!(end["success"], false);
    assert_eq!(end["error"], "Cancelled", "{end}");
    w.http.throttle(0);

    // Remove while loaded: npud unloads it first.
    d.post("/api/models/mlp/remove", json!({})).ok();
    w.assert_nothing_installed();
}

#[test]
fn bad_requests_get_clear_errors_and_lose_nothing() {
    let (mut w, _board, mut d) = world("upload_limit_mb = 1");
    d.log_in(PASSWORD, true).ok();

    let msg = d
        .post_with(
            "/api/models/install",
            None,
            &[("content-type", "application/json")],
        )
        .fails(400, "BadRequest");
    assert!(msg.contains("bad request body"), "{msg}");
    d.post("/api/models/install", json!({"name": 7}))
        .fails(400, "BadRequest");
    d.post("/api/power/profile", json!({"profile": "turbo"}))
        .fails(400, "BadRequest");
    let msg = d
        .post("/api/models/install", json!({"name": "nonesuch"}))
        .fails(404, "NotFound");
    assert!(msg.contains("nonesuch"), "{msg}");
    d.post("/api/models/jobs/..%2Fx/cancel", json!({}))
        .fails(400, "BadRequest");
    d.post("/api/models/jobs/999/cancel", json!({}))
        .fails(404, "NotFound");
    d.get("/api/nothing-here").fails(404, "NotFound");
    let msg = d
        .post("/api/models/nonesuch/run", json!({}))
        .fails(404, "NotFound");
    assert!(msg.contains("nonesuch"), "{msg}");

    // A tampered pack uploaded through the page: the job fails with the
    // verifier's reason, nothing is installed and no upload is left.
    let events = d.events();
    let pack = std::fs::read(w.site.join("packs/mlp-1.0.pack")).unwrap();
    let mut tampered = pack.clone();
    let n = tampered.len();
    tampered[n - 100] ^= 1;
    d.upload("/api/models/upload", tampered).ok();
    let (end, _) = wait_event(&events, "the upload's end", Duration::from_secs(30), |e| {
        e["type"] == "model-finished"
    });
    assert_eq!(end["success"], false);
    assert_eq!(end["error"], "Corrupt", "{end}");
    assert!(
        end["message"]
            .as_str()
            .unwrap()
            .contains("does not match its signed sha256"),
        "{end}"
    );
    w.assert_nothing_installed();

    // Too big for the limit, empty: refused, nothing kept.
    d.upload("/api/models/upload", vec![0u8; 2 << 20])
        .fails(413, "TooLarge");
    d.upload("/api/models/upload", Vec::new())
        .fails(400, "BadRequest");
    let uploads = w.webd_dir().join("uploads");
    assert_eq!(std::fs::read_dir(&uploads).unwrap().count(), 0);

    // A client that hangs up half way through an upload leaves nothing.
    {
        use std::io::Write;
        let addr = d
            .base
            .trim_start_matches("http://")
            .replace("localhost", "127.0.0.1");
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        write!(
            s,
            "POST /api/models/upload HTTP/1.1\r\nHost: {addr}\r\nCookie: pocket_session={}\r\nX-CSRF-Token: {}\r\nContent-Length: 900000\r\n\r\n",
            d.session.clone().unwrap(),
            d.csrf.clone().unwrap()
        )
        .unwrap();
        s.write_all(&[1u8; 300_000]).unwrap();
        wait_for("the upload to start", Duration::from_secs(10), || {
            (std::fs::read_dir(&uploads).unwrap().count() == 1).then_some(())
        });
    }
    wait_for(
        "the cut-off upload removed",
        Duration::from_secs(10),
        || (std::fs::read_dir(&uploads).unwrap().count() == 0).then_some(()),
    );

    // The intact pack installs the same way.
    d.upload("/api/models/upload", pack).ok();
    let (end, _) = wait_event(
        &events,
        "the upload installed",
        Duration::from_secs(30),
        |e| e["type"] == "model-finished",
    );
    assert_eq!(end["success"], true, "{end}");
    assert_eq!(w.installed(), vec![("mlp".into(), "1.0".into())]);

    // A daemon that is gone is named.
    w.npud = None;
    let msg = d
        .post("/api/models/mlp/run", json!({}))
        .fails(503, "Unavailable");
    assert_eq!(msg, "npud is not running");
    assert!(d.get("/api/models").ok()["runtime_status"]
        .as_str()
        .unwrap()
        .contains("npud is not running"));
    w.modeld = None;
    d.get("/api/models").fails(503, "Unavailable");

    // Garbage on the socket does not bring it down.
    use std::io::Write;
    let addr = d
        .base
        .trim_start_matches("http://")
        .replace("localhost", "127.0.0.1");
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    let _ = s.write_all(b"\x00\x01GARBAGE / HTTP/9.9\r\n\r\n");
    drop(s);
    assert_eq!(d.get("/api/session").ok()["logged_in"], true);
}

#[test]
fn updates_from_the_server_and_an_upload_then_rollback() {
    let (w, _board, mut d) = world("");
    let publisher = Publisher::new(&w.tmp.path().join("os-publisher"));
    let site = w.tmp.path().join("os-site");
    std::fs::create_dir_all(&site).unwrap();
    let server = HttpServer::serve(&site);
    let mut b = UpdateBox::new(
        &w.tmp.path().join("box"),
        Loader::Grub,
        &publisher,
        &format!("update_url = \"{}update.bundle\"", server.url()),
    );
    assert_eq!(b.boot(&w.bus), "A");
    assert_eq!(b.wait_health(&w.bus), "good");
    d.log_in(PASSWORD, true).ok();

    let u = d.get("/api/update").ok();
    assert_eq!(u["booted"], "A");
    assert_eq!(u["version"], "1.0");
    assert_eq!(u["health"], "good");
    assert_eq!(u["slots"].as_array().unwrap().len(), 2);

    // Nothing on the server yet: a clear error, not a crash.
    let r = d.post("/api/update/check", json!({}));
    assert!(r.status >= 400, "{}", r.body);
    assert!(!r.body["message"].as_str().unwrap().is_empty());

    // A bundle signed by a stranger is refused and changes nothing.
    let events = d.events();
    let stranger = Publisher::new(&w.tmp.path().join("stranger"));
    let bad = stranger.bundle(&w.tmp.path().join("bad"), "2.0");
    d.upload("/api/update/upload", std::fs::read(&bad.bundle).unwrap())
        .ok();
    let (end, _) = wait_event(
        &events,
        "the bad bundle's end",
        Duration::from_secs(30),
        |e| e["type"] == "update-finished",
    );
    assert_eq!(end["success"], false, "{end}");
    assert_eq!(end["error"], "Untrusted", "{end}");
    assert!(
        end["message"]
            .as_str()
            .unwrap()
            .contains("trusted updates key"),
        "{end}"
    );
    assert_eq!(b.primary().as_deref(), Some("A"));

    // v2 on the update server: Check finds it, Install writes it into B.
    let v2 = publisher.bundle(&w.tmp.path().join("v2"), "2.0");
    std::fs::copy(&v2.bundle, site.join("update.bundle")).unwrap();
    let c = d.post("/api/update/check", json!({})).ok();
    assert_eq!(c["available"], true, "{c}");
    assert_eq!(c["version"], "2.0");
    assert_eq!(c["current_version"], "1.0");
    d.post("/api/update/install", json!({})).ok();
    let (end, seen) = wait_event(&events, "the update's end", Duration::from_secs(60), |e| {
        e["type"] == "update-finished"
    });
    assert_eq!(end["success"], true, "{end}");
    assert!(
        seen.iter()
            .any(|e| e["type"] == "update-job" && e["job"]["slot"] == "B"),
        "no progress event: {seen:#?}"
    );
    assert!(!server.served("update.bundle").is_empty());
    assert_eq!(b.primary().as_deref(), Some("B"));
    let u = d.get("/api/update").ok();
    assert_eq!(u["primary"], "B");
    assert_eq!(u["slots"][1]["version"], "2.0");

    // v3 uploaded through the page replaces it in B.
    let v3 = publisher.bundle(&w.tmp.path().join("v3"), "3.0");
    d.upload("/api/update/upload", std::fs::read(&v3.bundle).unwrap())
        .ok();
    let (end, _) = wait_event(&events, "the upload's end", Duration::from_secs(60), |e| {
        e["type"] == "update-finished"
    });
    assert_eq!(end["success"], true, "{end}");
    assert_eq!(d.get("/api/update").ok()["slots"][1]["version"], "3.0");
    wait_for(
        "the uploaded bundle removed",
        Duration::from_secs(10),
        || {
            (std::fs::read_dir(w.webd_dir().join("uploads"))
                .unwrap()
                .count()
                == 0)
                .then_some(())
        },
    );

    // Boot the new system, then roll back from the page: A boots next.
    assert_eq!(b.boot(&w.bus), "B");
    assert_eq!(b.wait_health(&w.bus), "good");
    let u = d.get("/api/update").ok();
    assert_eq!(
        (u["booted"].as_str(), u["version"].as_str()),
        (Some("B"), Some("3.0"))
    );
    let r = d.post("/api/update/rollback", json!({})).ok();
    assert_eq!(r["primary"], "A");
    assert_eq!(b.primary().as_deref(), Some("A"));
}

#[test]
fn a_full_disk_refuses_the_upload_and_keeps_the_credential() {
    if !root_or_skip("mounting a tmpfs") {
        return;
    }
    let mut w = World::start();
    w.start_modeld();
    let disk = Tmpfs::mount(&w.webd_dir(), "1m");
    let mut d = Dash::new(&w.start_webd(""));
    d.log_in(PASSWORD, true).ok();
    let free = disk.free();

    let msg = d
        .upload("/api/models/upload", vec![7u8; 2 << 20])
        .fails(507, "DiskFull");
    assert!(msg.contains("not enough space"), "{msg}");
    assert_eq!(
        std::fs::read_dir(w.webd_dir().join("uploads"))
            .unwrap()
            .count(),
        0
    );
    assert!(disk.free() >= free, "the space was not given back");
    w.assert_nothing_installed();

    // The credential is intact: a new session logs in with it.
    let mut again = Dash::new(&d.base);
    again.log_in(PASSWORD, false).ok();
    assert_eq!(again.get("/api/session").ok()["logged_in"], true);
}

/// Hardening: a password guesser in a loop slows itself down, not the admin.
/// Its wrong passwords after the first few make it wait, doubling (429 with
/// `Retry-After`, nothing checked), while the admin, from another address,
/// logs in at once every time.
#[test]
fn a_password_guesser_waits_and_the_admin_logs_in_meanwhile() {
    let (_w, _board, mut d) = world("");
    d.log_in(PASSWORD, true).ok();
    let base = d.base.clone();
    let cert = _w.webd_certificate();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let guesser = {
        let (stop, cert) = (stop.clone(), cert.clone());
        std::thread::spawn(move || {
            let mut g = Dash::over_https(&base, "127.0.0.2".parse().unwrap(), &cert);
            let (mut wrong, mut waited) = (0, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = g.log_in("not the password", false);
                match r.status {
                    401 => wrong += 1,
                    429 => {
                        assert_eq!(r.body["error"], "TooManyAttempts", "{}", r.body);
                        waited.push(r.body["message"].as_str().unwrap_or("").to_string());
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    other => panic!("guesser got {other}: {}", r.body),
                }
            }
            (wrong, waited)
        })
    };
    let guessing = std::time::Instant::now();
    for _ in 0..20 {
        let mut admin = Dash::new(&d.base);
        let start = std::time::Instant::now();
        admin.log_in(PASSWORD, false).ok();
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (wrong, waited) = guesser.join().unwrap();
    // Three free guesses, then one after 1 s, 2 s, 4 s...: in T seconds at
    // most 3 + log2(T) + 1 of them are checked.
    let secs = guessing.elapsed().as_secs() + 1;
    let most = 3 + (64 - secs.leading_zeros()) + 1;
    assert!(
        wrong >= 3 && wrong <= most,
        "{wrong} wrong guesses checked in {secs} s"
    );
    assert!(!waited.is_empty());
    assert!(
        waited.iter().all(|m| m.contains("try again in")),
        "{waited:?}"
    );
    // The Retry-After header says the same.
    let r = https_client(&cert)
        .local_address("127.0.0.2".parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap()
        .post(format!(
            "{}/api/login",
            d.base.replacen("http://", "https://", 1)
        ))
        .header("content-type", "application/json")
        .header("x-csrf-token", "none")
        .body(json!({"password": "not the password"}).to_string())
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    let secs: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=300).contains(&secs), "{secs}");
}

/// Greedy clients: 1100 connections from one address, each sending half a
/// request, and 20 event streams from another, while the page keeps
/// answering everyone else. Each address gets its share of connections and
/// streams, and a connection that does not finish its headers is closed
/// after the deadline.
#[test]
fn half_sent_requests_and_open_streams_leave_the_page_answering() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Plain HTTP from other addresses, written by hand: the caps come
    // before any TLS handshake, so they are the same with it.
    let (_w, _board, d) = world("tls = false");
    // This process needs more descriptors than 1100 connections.
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    // Root may raise the hard limit too, where it is low.
    let hard = if hard < 8192 && setrlimit(Resource::RLIMIT_NOFILE, 8192, 8192).is_ok() {
        8192
    } else {
        hard
    };
    setrlimit(Resource::RLIMIT_NOFILE, hard.min(8192), hard).unwrap();
    let server: std::net::SocketAddr = d
        .base
        .trim_start_matches("http://")
        .replace("localhost", "127.0.0.1")
        .parse()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let connect = |from: &str| {
        let from: std::net::SocketAddr = format!("{from}:0").parse().unwrap();
        async move {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.bind(from).unwrap();
            s.connect(server).await.unwrap()
        }
    };
    let started = std::time::Instant::now();
    let mut slow = Vec::new();
    for _ in 0..1100 {
        let mut s = rt.block_on(connect("127.0.0.2"));
        // The request line and one header, never the blank line.
        let _ = rt.block_on(s.write_all(b"GET /api/session HTTP/1.1\r\nHost: 127.0.0.1\r\n"));
        slow.push(s);
    }
    // Event streams: a bounded number per address.
    let mut statuses = Vec::new();
    let mut streams = Vec::new();
    for _ in 0..20 {
        let mut s = rt.block_on(connect("127.0.0.3"));
        rt.block_on(s.write_all(b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"))
            .unwrap();
        let mut head = [0u8; 12];
        rt.block_on(s.read_exact(&mut head)).unwrap();
        statuses.push(String::from_utf8_lossy(&head[9..12]).to_string());
        streams.push(s);
    }
    let open = statuses.iter().filter(|s| *s == "200").count();
    let refused = statuses.iter().filter(|s| *s == "429").count();
    assert_eq!((open, refused), (8, 12), "{statuses:?}");
    // Everyone else is served at once, event stream included.
    for _ in 0..5 {
        let t = std::time::Instant::now();
        assert_eq!(d.get("/api/session").ok()["setup_needed"], true);
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }
    let mut page = rt.block_on(connect("127.0.0.1"));
    rt.block_on(page.write_all(b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"))
        .unwrap();
    let mut head = [0u8; 12];
    rt.block_on(page.read_exact(&mut head)).unwrap();
    assert_eq!(&head[9..12], b"200");
    // Every half-sent request is closed: most at once, the rest at the
    // header deadline.
    rt.block_on(async {
        for (i, s) in slow.iter_mut().enumerate() {
            let mut buf = [0u8; 512];
            loop {
                match tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    // hyper answers an unfinished request with nothing; any
                    // bytes are read past.
                    Ok(Ok(_)) => continue,
                    Err(_) => panic!(
                        "half-sent connection {i} still open {:?} after it started",
                        started.elapsed()
                    ),
                }
            }
        }
    });
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "{:?}",
        started.elapsed()
    );
}

/// First-boot setup from another computer needs the one-time code that the
/// box printed on its console: the first stranger on the network to find
/// the page does not become its admin. Wrong codes count like wrong
/// passwords; on the box itself no code is needed (every other test sets
/// the password from 127.0.0.1).
#[test]
fn setup_from_another_computer_needs_the_console_code() {
    let (w, _board, d) = world("");
    let code = setup_code(&std::fs::read_to_string(w.webd_console()).unwrap());
    let on_box = d.get("/api/session").ok();
    assert_eq!(on_box["setup_code_needed"], false, "{on_box}");

    let cert = w.webd_certificate();
    let stranger = Dash::over_https(&d.base, "127.0.0.2".parse().unwrap(), &cert);
    let s = stranger.get("/api/session").ok();
    assert_eq!(s["setup_needed"], true, "{s}");
    assert_eq!(s["setup_code_needed"], true, "{s}");
    assert!(s["setup_code_hint"].as_str().unwrap().contains("console"));
    let msg = stranger
        .post("/api/setup", json!({ "password": PASSWORD }))
        .fails(403, "SetupCodeNeeded");
    assert!(msg.contains("console and serial log"), "{msg}");
    for guess in ["AAAA-AAAA", "BBBB-BBBB", "CCCC-CCCC"] {
        stranger
            .post(
                "/api/setup",
                json!({ "password": PASSWORD, "setup_code": guess }),
            )
            .fails(403, "WrongSetupCode");
    }
    // Guessing on: refused without a check, even with the right code.
    stranger
        .post(
            "/api/setup",
            json!({ "password": PASSWORD, "setup_code": code }),
        )
        .fails(429, "TooManyAttempts");
    assert_eq!(d.get("/api/session").ok()["setup_needed"], true);

    // The owner, on another computer, reads the code off the console.
    let mut owner = Dash::over_https(&d.base, "127.0.0.3".parse().unwrap(), &cert);
    let r = owner.post(
        "/api/setup",
        json!({ "password": PASSWORD, "setup_code": code.to_lowercase().replace('-', " ") }),
    );
    assert!(r.set_cookie.is_some(), "{}", r.body);
    r.ok();
    assert_eq!(d.get("/api/session").ok()["setup_needed"], false);
    // Set once: the code is spent.
    stranger
        .post(
            "/api/setup",
            json!({ "password": "another password", "setup_code": code }),
        )
        .fails(409, "AlreadySet");
    owner.log_in(PASSWORD, false).ok();
}

/// The page and its password never cross the network in clear: another
/// computer gets HTTPS with the box's own certificate, made at the first
/// start and kept, whose fingerprint the console and the page show; plain
/// HTTP from it is sent to HTTPS (a page load) or refused (anything else).
/// On the box itself plain HTTP still works, and the LLM API keeps plain
/// HTTP for clients that know no other, with HTTPS on the same port.
#[test]
fn another_computer_gets_the_page_over_https_with_the_box_s_certificate() {
    let (mut w, _board, mut d) = world("");
    let cert = w.webd_certificate();
    let printed = certificate_fingerprint(&std::fs::read_to_string(w.webd_console()).unwrap());
    assert_eq!(printed, pem_fingerprint(&cert));
    let lan: std::net::IpAddr = "127.0.0.2".parse().unwrap();

    // Plain HTTP from another computer: a page load moves to HTTPS, a
    // password is not taken.
    let plain = plain_client().local_address(lan).build().unwrap();
    let r = plain.get(format!("{}/?x=1", d.base)).send().unwrap();
    assert_eq!(r.status().as_u16(), 308);
    let https_base = d.base.replacen("http://", "https://", 1);
    assert_eq!(
        r.headers()["location"],
        format!("{https_base}/?x=1").as_str()
    );
    let r = plain
        .post(format!("{}/api/login", d.base))
        .header("content-type", "application/json")
        .header("x-csrf-token", "none")
        .body(json!({ "password": PASSWORD }).to_string())
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    assert_eq!(r.json::<Value>().unwrap()["error"], "HttpsRequired");

    // On the box, plain HTTP: the password is set there.
    d.log_in(PASSWORD, true).ok();

    // Over HTTPS, trusting only the box's certificate: the page, the
    // fingerprint it shows, and a login whose cookie is Secure.
    let mut remote = Dash::over_https(&d.base, lan, &cert);
    let s = remote.get("/api/session").ok();
    assert_eq!(s["tls_fingerprint"], printed.as_str(), "{s}");
    let page = https_client(&cert)
        .local_address(lan)
        .build()
        .unwrap()
        .get(format!("{https_base}/"))
        .send()
        .unwrap();
    assert_eq!(page.status().as_u16(), 200);
    assert!(page.text().unwrap().contains("tls-fingerprint"));
    let r = remote.log_in(PASSWORD, false);
    let cookie = r.set_cookie.clone().expect("a session cookie");
    assert!(
        cookie.contains("; Secure") && cookie.contains("HttpOnly"),
        "{cookie}"
    );
    r.ok();
    remote
        .post("/api/power/profile", json!({ "profile": "power-saver" }))
        .ok();

    // The LLM API: plain HTTP from the network is still the API's (a key
    // is asked for, in its shape), and HTTPS works on the same port.
    let api = w.webd_api.clone().expect("api_listen");
    let r = plain.get(format!("{api}/api/tags")).send().unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = https_client(&cert)
        .local_address(lan)
        .build()
        .unwrap()
        .get(format!(
            "{}/api/tags",
            api.replacen("http://", "https://", 1)
                .replace("127.0.0.1", "localhost")
        ))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);

    // A restart keeps the certificate: the same fingerprint again.
    let bus = &w.bus;
    w.webd.as_mut().unwrap().restart(bus);
    let console = std::fs::read_to_string(w.webd_console()).unwrap();
    assert_eq!(
        console.matches("certificate SHA-256").count(),
        2,
        "{console}"
    );
    assert_eq!(certificate_fingerprint(&console), printed);
    assert_eq!(w.webd_certificate(), cert);
}
