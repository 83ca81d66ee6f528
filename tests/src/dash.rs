//! A client of the dashboard's HTTP API, as the page uses it: a session
//! cookie and the CSRF token it was given, sent with every change.

use serde_json::Value;
use std::io::BufRead;
use std::sync::mpsc;
use std::time::Duration;

#[derive(Debug)]
pub struct Dash {
    pub base: String,
    client: reqwest::blocking::Client,
    /// The session cookie's value, once logged in.
    pub session: Option<String>,
    /// The session's CSRF token, once logged in.
    pub csrf: Option<String>,
}

/// A response: status, `Set-Cookie` (if any) and the JSON body (`Null`
/// when not JSON).
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub set_cookie: Option<String>,
    pub body: Value,
}

impl Reply {
    /// Asserts a 2xx status; returns the body.
    pub fn ok(self) -> Value {
        assert!(
            (200..300).contains(&self.status),
            "status {}: {}",
            self.status,
            self.body
        );
        self.body
    }

    /// Asserts an error reply with this status and short error name;
    /// returns its message.
    pub fn fails(self, status: u16, name: &str) -> String {
        assert_eq!(self.status, status, "{}", self.body);
        assert_eq!(self.body["error"], name, "{}", self.body);
        let msg = self.body["message"].as_str().unwrap_or("").to_string();
        assert!(!msg.is_empty(), "no message: {}", self.body);
        msg
    }
}

/// The first-boot setup code that webd printed on `console`.
pub fn setup_code(console: &str) -> String {
    console
        .split("PocketOS setup code: ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no setup code on the console: {console:?}"))
        .to_string()
}

/// The fingerprint of the box's certificate that webd printed on
/// `console` last (it prints it at every start).
pub fn certificate_fingerprint(console: &str) -> String {
    console
        .rsplit_once("certificate SHA-256 ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no certificate fingerprint on the console: {console:?}"))
        .to_string()
}

/// SHA-256 of the certificate in a PEM file, as webd prints it.
pub fn pem_fingerprint(pem: &str) -> String {
    use rustls_pki_types::pem::PemObject;
    use sha2::Digest;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("a PEM certificate");
    sha2::Sha256::digest(&der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl Dash {
    pub fn new(base: &str) -> Dash {
        Self::with_client(base, reqwest::blocking::Client::builder())
    }

    /// A client whose connections come from `ip` (another loopback address,
    /// say: another machine, as the dashboard sees it).
    pub fn from_address(base: &str, ip: std::net::IpAddr) -> Dash {
        Self::with_client(base, reqwest::blocking::Client::builder().local_address(ip))
    }

    /// A client on another computer (`ip`) that opens the page over HTTPS
    /// and trusts only the box's own certificate (`cert`, PEM): `base`'s
    /// `http://` becomes `https://` on the same port.
    pub fn over_https(base: &str, ip: std::net::IpAddr, cert: &str) -> Dash {
        let base = base.replacen("http://", "https://", 1);
        Self::with_client(&base, https_client(cert).local_address(ip))
    }

    fn with_client(base: &str, builder: reqwest::blocking::ClientBuilder) -> Dash {
        Dash {
            base: base.trim_end_matches('/').to_string(),
            client: builder
                .timeout(Duration::from_secs(120))
                .build()
                .expect("http client"),
            session: None,
            csrf: None,
        }
    }

    /// A read, with the session cookie when logged in.
    pub fn get(&self, path: &str) -> Reply {
        let mut req = self.client.get(self.url(path));
        if let Some(s) = &self.session {
            req = req.header("cookie", format!("pocket_session={s}"));
        }
        self.send(req)
    }

    /// A change with a JSON body, the session and its CSRF token.
    pub fn post(&self, path: &str, body: Value) -> Reply {
        self.post_with(path, Some(body), &[])
    }

    /// A change with extra (or replaced) headers: `("x-csrf-token", "")`
    /// leaves the token out.
    pub fn post_with(&self, path: &str, body: Option<Value>, headers: &[(&str, &str)]) -> Reply {
        let mut req = self.client.post(self.url(path));
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        self.send(self.with_session(req, headers))
    }

    /// Uploads raw bytes as the page's file forms do.
    pub fn upload(&self, path: &str, bytes: Vec<u8>) -> Reply {
        let req = self
            .client
            .post(self.url(path))
            .header("content-type", "application/octet-stream")
            .body(bytes);
        self.send(self.with_session(req, &[]))
    }

    fn with_session(
        &self,
        mut req: reqwest::blocking::RequestBuilder,
        headers: &[(&str, &str)],
    ) -> reqwest::blocking::RequestBuilder {
        if let Some(s) = &self.session {
            req = req.header("cookie", format!("pocket_session={s}"));
        }
        let csrf = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("x-csrf-token"))
            .map(|(_, v)| v.to_string())
            .unwrap_or_else(|| self.csrf.clone().unwrap_or_else(|| "none".into()));
        if !csrf.is_empty() {
            req = req.header("x-csrf-token", csrf);
        }
        for (k, v) in headers {
            if !k.eq_ignore_ascii_case("x-csrf-token") {
                req = req.header(*k, *v);
            }
        }
        req
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn send(&self, req: reqwest::blocking::RequestBuilder) -> Reply {
        let resp = req.send().expect("the dashboard answers");
        let status = resp.status().as_u16();
        let set_cookie = resp
            .headers()
            .get("set-cookie")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let text = resp.text().unwrap_or_default();
        Reply {
            status,
            set_cookie,
            body: serde_json::from_str(&text).unwrap_or(Value::Null),
        }
    }

    /// Sets the first admin password (`/api/setup`) or logs in with it, and
    /// keeps the session.
    pub fn log_in(&mut self, password: &str, first: bool) -> Reply {
        let path = if first { "/api/setup" } else { "/api/login" };
        let r = self.post(path, serde_json::json!({ "password": password }));
        if r.status == 200 {
            let cookie = r.set_cookie.as_deref().expect("a session cookie");
            let value = cookie
                .split(';')
                .next()
                .and_then(|kv| kv.strip_prefix("pocket_session="))
                .expect("pocket_session cookie");
            self.session = Some(value.to_string());
            self.csrf = r.body["csrf"].as_str().map(str::to_string);
        }
        r
    }

    /// Listens to `/api/events`: each event's JSON arrives on the receiver.
    pub fn events(&self) -> mpsc::Receiver<Value> {
        let (tx, rx) = mpsc::channel();
        let resp = reqwest::blocking::Client::new()
            .get(self.url("/api/events"))
            .send()
            .expect("the event stream opens");
        assert_eq!(resp.status().as_u16(), 200);
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(resp).lines() {
                let Ok(line) = line else { break };
                if let Some(data) = line.strip_prefix("data:") {
                    if let Ok(v) = serde_json::from_str(data.trim()) {
                        if tx.send(v).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        rx
    }
}

/// Receives events until one satisfies `f`; returns it and every event
/// seen before it.
pub fn wait_event(
    rx: &mpsc::Receiver<Value>,
    what: &str,
    limit: Duration,
    f: impl Fn(&Value) -> bool,
) -> (Value, Vec<Value>) {
    let deadline = std::time::Instant::now() + limit;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(v) if f(&v) => return (v, seen),
            Ok(v) => seen.push(v),
            Err(_) => panic!("no event {what} within {limit:?}; saw {seen:#?}"),
        }
    }
}

/// Runs the browser walk-through `tests/browser/dashboard.mjs` in headless
/// Chromium against `url` with `vars` (see the script's header); returns
/// what it saw. Needs node, Debian's chromium and `npm ci` in
/// tests/browser (tests/install-deps.sh does all three).
pub fn browse(url: &str, vars: &[(&str, &str)]) -> Value {
    let dir = crate::workspace_root().join("tests/browser");
    assert!(
        dir.join("node_modules/playwright-core").exists(),
        "playwright-core is not installed: run tests/install-deps.sh (npm ci in tests/browser)"
    );
    let out = std::process::Command::new("node")
        .arg(dir.join("dashboard.mjs"))
        .env("DASHBOARD_URL", url)
        .envs(vars.iter().copied())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("node is installed (tests/install-deps.sh)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the browser walk-through failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_str(stdout.trim().lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("the walk-through printed no JSON ({e}): {stdout}"));
    eprintln!("browser walk-through, ms since start: {}", seen["steps"]);
    seen
}

/// A plain-HTTP client that follows no redirect, to see where the box
/// sends it.
pub fn plain_client() -> reqwest::blocking::ClientBuilder {
    reqwest::blocking::Client::builder().redirect(reqwest::redirect::Policy::none())
}

/// A client that trusts the box's certificate (`cert`, PEM) and nothing
/// else, and follows no redirect.
pub fn https_client(cert: &str) -> reqwest::blocking::ClientBuilder {
    reqwest::blocking::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(
            reqwest::Certificate::from_pem(cert.as_bytes()).expect("a PEM certificate"),
        )
        .redirect(reqwest::redirect::Policy::none())
}
