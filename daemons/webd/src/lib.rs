//! `pocket-webd`: the box's dashboard. A small web service that serves one
//! page (embedded, so it works offline) and a JSON API over the other
//! daemons' D-Bus interfaces; it holds no state of its own beyond the admin
//! credential and sessions.
//!
//! Reading is open unless `login_to_read` is set; every change needs a
//! logged-in session and its CSRF token. See docs/dashboard.md.

mod api;
pub mod apikeys;
mod auth;
mod error;
mod events;
mod net;
mod serve;
mod tls;

pub use api::parse_request_bodies;
pub use net::is_local_peer;

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_listen")]
    pub listen: String,
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    #[serde(default = "yes")]
    pub local_network_only: bool,
    #[serde(default)]
    pub login_to_read: bool,
    #[serde(default = "yes")]
    pub secure_cookies: bool,
    #[serde(default = "default_idle_minutes")]
    pub session_idle_minutes: u64,
    #[serde(default = "default_upload_limit_mb")]
    pub upload_limit_mb: u64,
    /// Names the box answers to besides its IP addresses, `localhost`, its
    /// host name and `<host name>.local`.
    #[serde(default)]
    pub host_names: Vec<String>,
    /// The system user the dashboard becomes once it listens (started as
    /// root only to listen on port 80); unset, it stays the user it was
    /// started as.
    #[serde(default)]
    pub user: Option<String>,
    /// Where the LLM API listens besides `listen` (Ollama's port by
    /// default, so that clients find the box unchanged); empty for nowhere.
    #[serde(default = "default_api_listen")]
    pub api_listen: String,
    /// Clients on the local network may use the LLM API without a key.
    #[serde(default)]
    pub api_open_to_lan: bool,
    /// Where the first boot's setup code and the certificate's
    /// fingerprint are printed (besides the log): the box's console, which
    /// its serial log shows.
    #[serde(default = "default_console")]
    pub console: PathBuf,
    /// HTTPS on both ports with the box's own certificate: a connection
    /// that opens with a TLS handshake gets HTTPS, any other plain HTTP.
    /// The page then answers plain HTTP only on the box itself and sends
    /// other clients to HTTPS; the LLM API keeps plain HTTP for clients
    /// that know no other.
    #[serde(default = "yes")]
    pub tls: bool,
}

fn default_listen() -> String {
    "0.0.0.0:80".into()
}
fn default_api_listen() -> String {
    "0.0.0.0:11434".into()
}
fn default_console() -> PathBuf {
    "/dev/console".into()
}
fn default_data_dir() -> PathBuf {
    "/data/webd".into()
}
fn yes() -> bool {
    true
}
fn default_idle_minutes() -> u64 {
    720
}
fn default_upload_limit_mb() -> u64 {
    65536
}

/// What every request handler shares.
pub(crate) struct App {
    pub cfg: Config,
    /// What a request's `Host` may name (see [`net::is_own_host`]).
    pub host_names: Vec<String>,
    pub bus: zbus::Connection,
    pub auth: auth::Auth,
    pub events: events::Events,
    pub keys: apikeys::ApiKeys,
    pub metrics: api::Metrics,
    /// The page's event streams open, per client address.
    pub event_streams: Arc<serve::Slots>,
    /// The box's certificate's SHA-256, when webd serves HTTPS.
    pub tls_fingerprint: Option<String>,
}

/// The box's console (`console` in the config), opened once while webd
/// may still open it, and written to after it has dropped root.
struct Console {
    path: PathBuf,
    file: std::io::Result<std::fs::File>,
}

impl Console {
    fn open(path: &std::path::Path) -> Console {
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path);
        Console {
            path: path.to_path_buf(),
            file,
        }
    }

    /// Writes `line` on a line of its own; says why when it cannot.
    fn say(&mut self, line: &str) -> std::io::Result<()> {
        use std::io::Write;
        let line = format!("\r\n{line}\r\n");
        match &mut self.file {
            Ok(f) => f.write_all(line.as_bytes()),
            Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
        }
    }

    fn announce_setup_code(&mut self, code: &str) {
        let said = self.say(&format!(
            "PocketOS setup code: {code} (to set the admin password on the box's page)"
        ));
        // The log holds no secrets: the code is on the console only.
        match said {
            Ok(()) => tracing::info!(
                "no admin password yet: the setup code is on {}",
                self.path.display()
            ),
            Err(e) => tracing::warn!(
                "cannot print the setup code on {}: {e}; set the password from the box itself",
                self.path.display()
            ),
        }
    }

    /// The certificate's fingerprint, every start: what a person compares
    /// with the one their browser shows.
    fn announce_fingerprint(&mut self, port: u16, fingerprint: &str) {
        let line =
            format!("PocketOS page: https://<this box>:{port}/ certificate SHA-256 {fingerprint}");
        if let Err(e) = self.say(&line) {
            tracing::warn!(
                "cannot print the certificate's fingerprint on {}: {e}",
                self.path.display()
            );
        }
        tracing::info!("the box's certificate: SHA-256 {fingerprint}");
    }
}

/// Serves the dashboard until `shutdown` completes.
pub async fn serve(
    cfg: Config,
    shutdown: impl std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
) -> anyhow::Result<()> {
    // Listening is the one thing that may need root: everything after it,
    // the data directory and the bus included, is done as `user`.
    let addr: SocketAddr = cfg
        .listen
        .parse()
        .map_err(|e| anyhow::anyhow!("listen {:?}: {e}", cfg.listen))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    let api_listener = match cfg.api_listen.trim() {
        "" => None,
        a => {
            let addr: SocketAddr = a
                .parse()
                .map_err(|e| anyhow::anyhow!("api_listen {a:?}: {e}"))?;
            Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?,
            )
        }
    };
    // With no admin password yet, a one-time code for setting it from
    // another computer, printed on the console while webd may still open
    // it.
    let mut console = Console::open(&cfg.console);
    let setup_code = (!auth::credential_path(&cfg).exists()).then(|| {
        let code = auth::new_setup_code();
        console.announce_setup_code(&code);
        code
    });
    if let Some(user) = &cfg.user {
        pocket_daemon::run_as(user)?;
    }
    std::fs::create_dir_all(cfg.data_dir.join("uploads"))
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", cfg.data_dir.display()))?;
    // Uploads left by a crash or power cut are not resumable: drop them.
    api::clear_uploads(&cfg.data_dir);
    let host_names = net::host_names(&cfg.host_names);
    let tls = match cfg.tls {
        true => {
            let mut names = host_names.clone();
            names.push("localhost".into());
            let tls = tls::Tls::load_or_create(&cfg.data_dir.join("tls"), &names)?;
            console.announce_fingerprint(listener.local_addr()?.port(), &tls.fingerprint);
            Some(tls)
        }
        false => None,
    };
    drop(console);
    let bus = pocket_proto::system_bus()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the system bus: {e}"))?;
    let auth = auth::Auth::open(&cfg, setup_code)?;
    let events = events::Events::start(&bus).await?;
    let keys = apikeys::ApiKeys::open(&cfg.data_dir)?;
    let app = Arc::new(App {
        keys,
        metrics: Default::default(),
        event_streams: serve::Slots::new(serve::EVENT_STREAMS_PER_ADDRESS, serve::EVENT_STREAMS),
        tls_fingerprint: tls.as_ref().map(|t| t.fingerprint.clone()),
        host_names,
        cfg,
        bus,
        auth,
        events,
    });
    let acceptor = tls.map(|t| t.acceptor);
    tracing::info!(
        "dashboard on {}://{}/ ({})",
        if acceptor.is_some() { "https" } else { "http" },
        listener.local_addr()?,
        if app.auth.has_credential() {
            "admin credential set"
        } else {
            "no admin credential yet: the page asks for one"
        }
    );
    let router = api::router(app.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        if let Err(e) = shutdown.await {
            tracing::warn!("waiting for a stop signal: {e}");
        }
        let _ = stop_tx.send(true);
    });
    let api = match api_listener {
        Some(l) => {
            tracing::info!("LLM API on http://{}/", l.local_addr()?);
            Some(tokio::spawn(serve::serve(
                l,
                api::api_router(app),
                acceptor.clone(),
                stop_rx.clone(),
            )))
        }
        None => None,
    };
    serve::serve(listener, router, acceptor, stop_rx).await;
    if let Some(api) = api {
        api.await?;
    }
    Ok(())
}
