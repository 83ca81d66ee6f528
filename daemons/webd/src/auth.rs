//! The admin credential and login sessions.
//!
//! The credential is set once, from the page, when none exists (the box's
//! first boot), by a client on the box itself or one that gives the setup
//! code the box printed on its console; it is kept as a salted Argon2id hash in
//! `<data_dir>/admin.credential`, mode 0600. A login gives a random session
//! token in an `HttpOnly`, `SameSite=Strict` cookie (`Secure` unless
//! configured off) and a CSRF token that every change must echo in
//! `X-CSRF-Token`. Sessions live in memory: a restart logs everyone out.

use crate::error::{ApiError, ApiResult};
use crate::Config;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use axum::http::StatusCode;
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const COOKIE: &str = "pocket_session";
pub const CSRF_HEADER: &str = "x-csrf-token";
/// Shortest admin password accepted.
pub const MIN_PASSWORD: usize = 8;
/// Longest admin password accepted, in bytes.
const MAX_PASSWORD: usize = 1024;
/// Most sessions kept; the least recently used goes first.
const MAX_SESSIONS: usize = 32;
/// Wrong passwords a client may try before it has to wait.
const FREE_FAILURES: u32 = 3;
/// The longest a client waits between guesses.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Clients whose failures are remembered, at most: the oldest go first.
const MAX_CLIENTS: usize = 4096;

pub struct Auth {
    path: PathBuf,
    hash: Mutex<Option<String>>,
    sessions: Mutex<HashMap<String, Session>>,
    /// One password check at a time, so guesses cannot run in parallel.
    /// Held only while the hash is checked, never while anyone waits.
    gate: tokio::sync::Mutex<()>,
    /// Each client address's failed logins: how many in a row and until
    /// when it must wait; and whether it has a check running now.
    clients: Mutex<HashMap<std::net::IpAddr, Client>>,
    idle: Duration,
    secure: bool,
    /// The one-time code a client other than loopback needs to set the
    /// first password (none once a password is set).
    setup_code: Option<String>,
}

struct Session {
    csrf: String,
    last_used: Instant,
}

#[derive(Clone, Copy)]
struct Client {
    failures: u32,
    wait_until: Instant,
    checking: bool,
}

/// How long a client waits after its `failures`-th wrong password in a row:
/// nothing for the first few, then 1 s, doubling, at most five minutes.
fn backoff(failures: u32) -> Duration {
    match failures.checked_sub(FREE_FAILURES) {
        None => Duration::ZERO,
        Some(n) => Duration::from_secs(1u64 << n.min(16)).min(MAX_BACKOFF),
    }
}

/// A logged-in session: its token and CSRF token.
#[derive(Debug, Clone)]
pub struct SessionKeys {
    pub token: String,
    pub csrf: String,
}

impl Auth {
    pub fn open(cfg: &Config, setup_code: Option<String>) -> anyhow::Result<Auth> {
        let path = credential_path(cfg);
        let hash = match std::fs::read_to_string(&path) {
            Ok(text) => {
                let text = text.trim().to_string();
                PasswordHash::new(&text).map_err(|e| {
                    anyhow::anyhow!("{} is not a password hash: {e}", path.display())
                })?;
                Some(text)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => anyhow::bail!("cannot read {}: {e}", path.display()),
        };
        Ok(Auth {
            path,
            hash: Mutex::new(hash),
            sessions: Mutex::default(),
            gate: tokio::sync::Mutex::new(()),
            clients: Mutex::default(),
            idle: Duration::from_secs(cfg.session_idle_minutes.max(1) * 60),
            secure: cfg.secure_cookies,
            setup_code,
        })
    }

    pub fn has_credential(&self) -> bool {
        self.hash.lock().unwrap().is_some()
    }

    /// Sets the admin password when none is set yet, and logs in. A client
    /// other than the box itself (127.0.0.1 or ::1) must give the setup code that
    /// the box printed on its console: the first stranger on the network to
    /// find the page does not become its admin.
    pub async fn set_initial(
        &self,
        from: std::net::IpAddr,
        password: String,
        code: Option<String>,
    ) -> ApiResult<SessionKeys> {
        check_password_shape(&password)?;
        if self.has_credential() {
            return Err(already_set());
        }
        if !crate::net::on_box(from) {
            let Some(code) = code.filter(|c| !c.trim().is_empty()) else {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "SetupCodeNeeded",
                    SETUP_CODE_HINT,
                ));
            };
            let expected = self.setup_code.clone();
            self.attempt(
                from,
                async move { Ok(expected.as_deref().is_some_and(|e| same_code(e, &code))) },
                || {
                    ApiError::new(
                        StatusCode::FORBIDDEN,
                        "WrongSetupCode",
                        format!("wrong setup code. {SETUP_CODE_HINT}"),
                    )
                },
            )
            .await?;
        }
        let _gate = self.gate.lock().await;
        if self.has_credential() {
            return Err(already_set());
        }
        let hash = tokio::task::spawn_blocking(move || hash_password(&password))
            .await
            .map_err(|e| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal", e.to_string())
            })??;
        let path = self.path.clone();
        let text = hash.clone();
        tokio::task::spawn_blocking(move || write_private(&path, text.as_bytes()))
            .await
            .map_err(|e| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal", e.to_string())
            })?
            .map_err(|e| {
                ApiError::new(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "Io",
                    format!("cannot store the credential: {e}"),
                )
            })?;
        *self.hash.lock().unwrap() = Some(hash);
        tracing::info!("admin credential set");
        Ok(self.new_session())
    }

    /// Checks the password from client `from` and starts a session.
    pub async fn login(&self, from: std::net::IpAddr, password: String) -> ApiResult<SessionKeys> {
        if password.len() > MAX_PASSWORD {
            return Err(ApiError::bad_request(format!(
                "the password is longer than {MAX_PASSWORD} bytes"
            )));
        }
        self.attempt(from, self.check(password), || {
            ApiError::new(StatusCode::UNAUTHORIZED, "WrongPassword", "wrong password")
        })
        .await?;
        tracing::info!("admin logged in");
        Ok(self.new_session())
    }

    /// Runs `check` (a password or setup code check) for client `from`. A
    /// client that guessed wrong too often waits, doubling each time: its
    /// attempts are refused (`TooManyAttempts`, with the wait) without a
    /// check, one at a time, while everyone else goes on as usual.
    async fn attempt(
        &self,
        from: std::net::IpAddr,
        check: impl std::future::Future<Output = ApiResult<bool>>,
        wrong: impl FnOnce() -> ApiError,
    ) -> ApiResult<()> {
        {
            let mut clients = self.clients.lock().unwrap();
            let now = Instant::now();
            let c = clients.entry(from).or_insert(Client {
                failures: 0,
                wait_until: now,
                checking: false,
            });
            if c.checking || now < c.wait_until {
                let wait = c.wait_until.saturating_duration_since(now).as_secs().max(1);
                return Err(ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "TooManyAttempts",
                    format!("too many wrong attempts from this address; try again in {wait} s"),
                )
                .retry_after(wait));
            }
            c.checking = true;
            if clients.len() > MAX_CLIENTS {
                let oldest = clients
                    .iter()
                    .filter(|(ip, c)| **ip != from && !c.checking)
                    .min_by_key(|(_, c)| c.wait_until)
                    .map(|(ip, _)| *ip);
                if let Some(ip) = oldest {
                    clients.remove(&ip);
                }
            }
        }
        let ok = check.await;
        let mut clients = self.clients.lock().unwrap();
        match ok {
            Ok(true) => {
                clients.remove(&from);
                Ok(())
            }
            Ok(false) => {
                let c = clients.get_mut(&from).expect("marked above");
                c.checking = false;
                c.failures = c.failures.saturating_add(1);
                c.wait_until = Instant::now() + backoff(c.failures);
                let e = wrong();
                tracing::warn!(%from, "{}", e.message);
                Err(e)
            }
            Err(e) => {
                if let Some(c) = clients.get_mut(&from) {
                    c.checking = false;
                }
                Err(e)
            }
        }
    }

    /// Whether `password` is the admin's; one check at a time.
    async fn check(&self, password: String) -> ApiResult<bool> {
        let _gate = self.gate.lock().await;
        let Some(hash) = self.hash.lock().unwrap().clone() else {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "SetupNeeded",
                "no admin password is set yet; set one first",
            ));
        };
        Ok(
            tokio::task::spawn_blocking(move || verify_password(&hash, &password))
                .await
                .unwrap_or(false),
        )
    }

    fn new_session(&self) -> SessionKeys {
        let keys = SessionKeys {
            token: random_token(),
            csrf: random_token(),
        };
        let mut sessions = self.sessions.lock().unwrap();
        let idle = self.idle;
        sessions.retain(|_, s| s.last_used.elapsed() < idle);
        while sessions.len() >= MAX_SESSIONS {
            let oldest = sessions
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(k, _)| k.clone())
                .expect("not empty");
            sessions.remove(&oldest);
        }
        sessions.insert(
            keys.token.clone(),
            Session {
                csrf: keys.csrf.clone(),
                last_used: Instant::now(),
            },
        );
        keys
    }

    /// The CSRF token of a live session, which this use keeps alive.
    pub fn session(&self, token: &str) -> Option<String> {
        let mut sessions = self.sessions.lock().unwrap();
        let s = sessions.get_mut(token)?;
        if s.last_used.elapsed() >= self.idle {
            sessions.remove(token);
            return None;
        }
        s.last_used = Instant::now();
        Some(s.csrf.clone())
    }

    /// Whether a session is live, without counting this as a use.
    pub fn is_live(&self, token: &str) -> bool {
        self.sessions
            .lock()
            .unwrap()
            .get(token)
            .is_some_and(|s| s.last_used.elapsed() < self.idle)
    }

    pub fn logout(&self, token: &str) {
        self.sessions.lock().unwrap().remove(token);
    }

    /// `Set-Cookie` for a session token; an empty token clears the cookie.
    pub fn cookie(&self, token: &str) -> String {
        let max_age = if token.is_empty() {
            0
        } else {
            self.idle.as_secs()
        };
        let secure = if self.secure { "; Secure" } else { "" };
        format!("{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}")
    }
}

/// Where the admin credential is kept.
pub fn credential_path(cfg: &Config) -> PathBuf {
    cfg.data_dir.join("admin.credential")
}

fn already_set() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "AlreadySet",
        "the admin password is already set; log in with it",
    )
}

/// Where a person finds the setup code.
pub const SETUP_CODE_HINT: &str = "Setting the admin password from another computer needs the setup code that the box prints on its console and serial log at start (or set it on the box itself, at http://127.0.0.1/).";

/// Letters and digits that cannot be mistaken for one another.
const CODE_ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789";

/// A fresh one-time setup code: eight characters from 32 (40 bits), as
/// `XXXX-XXXX`.
pub fn new_setup_code() -> String {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("the kernel's random source is available");
    let chars: String = bytes
        .iter()
        .map(|b| CODE_ALPHABET[usize::from(*b) % CODE_ALPHABET.len()] as char)
        .collect();
    format!("{}-{}", &chars[..4], &chars[4..])
}

/// Whether `given` is the setup code `expected`, ignoring case, spaces and
/// dashes; in time independent of where they differ.
fn same_code(expected: &str, given: &str) -> bool {
    let norm = |s: &str| -> Vec<u8> {
        s.bytes()
            .filter(|b| !b.is_ascii_whitespace() && *b != b'-')
            .map(|b| b.to_ascii_uppercase())
            .collect()
    };
    let (a, b) = (norm(expected), norm(given));
    a.len() == b.len() && a.iter().zip(&b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

fn check_password_shape(password: &str) -> ApiResult<()> {
    if password.chars().count() < MIN_PASSWORD {
        return Err(ApiError::bad_request(format!(
            "the password needs at least {MIN_PASSWORD} characters"
        )));
    }
    if password.len() > 1024 {
        return Err(ApiError::bad_request(
            "the password is longer than 1024 bytes",
        ));
    }
    Ok(())
}

fn hash_password(password: &str) -> ApiResult<String> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal", e.to_string()))?;
    let salt = SaltString::encode_b64(&salt)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal", e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal", e.to_string()))
}

fn verify_password(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

pub(crate) fn random_token() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the kernel's random source is available");
    hex::encode(bytes)
}

/// Equal without an early exit, so a comparison's time says nothing about
/// how much of a guess was right.
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Writes `path` (mode 0600) through a temporary file, fsynced, renamed
/// into place, directory fsynced: after a power cut it is the old file or
/// the new one.
pub(crate) fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_codes_are_fresh_and_compared_loosely() {
        let a = new_setup_code();
        assert_eq!(a.len(), 9);
        assert!(
            a.bytes().all(|b| b == b'-' || CODE_ALPHABET.contains(&b)),
            "{a}"
        );
        assert_ne!(a, new_setup_code());
        assert!(same_code("ABCD-EF23", "abcd ef23"));
        assert!(same_code("ABCD-EF23", "ABCDEF23"));
        assert!(!same_code("ABCD-EF23", "ABCD-EF24"));
        assert!(!same_code("ABCD-EF23", "ABCD-EF2"));
        assert!(!same_code("ABCD-EF23", ""));
    }

    #[test]
    fn hashes_verify_and_differ() {
        let a = hash_password("correct horse").unwrap();
        let b = hash_password("correct horse").unwrap();
        assert!(a.starts_with("$argon2id$"), "{a}");
        assert_ne!(a, b, "salted");
        assert!(!a.contains("correct horse"));
        assert!(verify_password(&a, "correct horse"));
        assert!(!verify_password(&a, "correct horsf"));
        assert!(!verify_password("not a hash", "correct horse"));
    }

    #[test]
    fn secrets_compare() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "abcd"));
    }
}
