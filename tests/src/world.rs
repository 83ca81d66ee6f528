//! A world for modeld tests and the demo: a private bus, a publisher, a
//! catalog served from 127.0.0.1 and a real modeld with its own data
//! directory.

use crate::*;
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct World {
    pub tmp: tempfile::TempDir,
    pub bus: DevBus,
    pub publisher: Publisher,
    /// What the HTTP server serves (catalog.json, packs/).
    pub site: PathBuf,
    /// Packs the catalog is built from.
    pub packs: PathBuf,
    pub http: HttpServer,
    pub data: PathBuf,
    pub config: PathBuf,
    pub modeld: Option<Daemon>,
    pub npud: Option<Daemon>,
    pub powerd: Option<Daemon>,
    pub webd: Option<Daemon>,
    /// The LLM API's own listener (`api_listen`), once webd runs.
    pub webd_api: Option<String>,
}

impl World {
    /// A catalog offering `mlp` 1.0 and `attention` 1.0.
    pub fn start() -> World {
        Self::with_bus(DevBus::start())
    }

    pub fn with_bus(bus: DevBus) -> World {
        let tmp = tempfile::tempdir().expect("tmp");
        let publisher = Publisher::new(&tmp.path().join("publisher"));
        let fx = onnx_fixtures();
        let packs = tmp.path().join("packs");
        publisher.pack(&packs, "mlp", "1.0", &[("mlp.onnx", &fx.join("mlp.onnx"))]);
        publisher.pack(
            &packs,
            "attention",
            "1.0",
            &[("attention.onnx", &fx.join("attention.onnx"))],
        );
        let site = tmp.path().join("site");
        publisher.catalog(&packs, &site, "1");
        let http = HttpServer::serve(&site);
        let data = tmp.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let config = tmp.path().join("modeld.toml");
        let mut w = World {
            tmp,
            bus,
            publisher,
            site,
            packs,
            http,
            data,
            config,
            modeld: None,
            npud: None,
            powerd: None,
            webd: None,
            webd_api: None,
        };
        w.write_config("");
        w
    }

    /// Writes modeld.toml with the HTTP catalog; `extra` lines add keys or
    /// replace the defaults.
    pub fn write_config(&mut self, extra: &str) {
        let defaults = [
            format!("data_dir = \"{}\"", self.data.display()),
            format!("keyring_dir = \"{}\"", self.publisher.keyring_dir.display()),
            format!("catalogs = [\"{}\"]", self.http.url()),
            "reserve_bytes = 0".to_string(),
            "download_attempts = 3".to_string(),
        ];
        let text = merge_config(&defaults, extra);
        std::fs::write(&self.config, text).unwrap();
    }

    pub fn start_modeld(&mut self) -> &mut Daemon {
        self.modeld = Some(Daemon::start(
            &self.bus,
            "pocket-modeld",
            "org.pocketos.Models1",
            &self.config,
        ));
        self.modeld.as_mut().unwrap()
    }

    /// Starts npud with the pinned ONNX Runtime library, CPU providers and
    /// `extra` config lines (which replace defaults of the same key).
    pub fn start_npud(&mut self, extra: &str) -> &mut Daemon {
        let defaults = [
            format!(
                "onnxruntime_library = \"{}\"",
                onnxruntime_library().display()
            ),
            "providers = [\"xnnpack\", \"cpu\"]".to_string(),
            "memory_budget_mb = 512".to_string(),
            // Tests run several daemons at once on a machine's few cores:
            // session threads that spin between operators would take the
            // cores the others need. The benchmarks run with the shipped
            // default (on).
            "intra_spin = false".to_string(),
        ];
        let path = self.tmp.path().join("npud.toml");
        std::fs::write(&path, merge_config(&defaults, extra)).unwrap();
        self.npud = Some(Daemon::start(
            &self.bus,
            "pocket-npud",
            "org.pocketos.Runtime1",
            &path,
        ));
        self.npud.as_mut().unwrap()
    }

    /// Starts powerd on `sysfs_root` with the shipped RK3588 board file, a
    /// 100 ms control period, its state in this world, and `extra` config.
    pub fn start_powerd(&mut self, sysfs_root: &Path, extra: &str) -> &mut Daemon {
        let defaults = [
            format!("sysfs_root = \"{}\"", sysfs_root.display()),
            format!(
                "board = \"{}\"",
                workspace_root()
                    .join("daemons/powerd/boards/rk3588.toml")
                    .display()
            ),
            format!(
                "state_dir = \"{}\"",
                self.tmp.path().join("powerd-state").display()
            ),
            "period_ms = 100".to_string(),
            "budget_watts = 65.0".to_string(),
        ];
        let path = self.tmp.path().join("powerd.toml");
        std::fs::write(&path, merge_config(&defaults, extra)).unwrap();
        self.powerd = Some(Daemon::start(
            &self.bus,
            "pocket-powerd",
            "org.pocketos.Power1",
            &path,
        ));
        self.powerd.as_mut().unwrap()
    }

    /// Starts the dashboard on a free 127.0.0.1 port with its data in this
    /// world and `extra` config; returns its base URL (`http://localhost:PORT`:
    /// browsers keep `Secure` cookies for localhost).
    pub fn start_webd(&mut self, extra: &str) -> String {
        let port = free_port();
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let api = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
        let defaults = [
            format!("listen = \"{addr}\""),
            format!("api_listen = \"{api}\""),
            format!("data_dir = \"{}\"", self.webd_dir().display()),
            format!("console = \"{}\"", self.webd_console().display()),
        ];
        self.webd_api = Some(format!("http://127.0.0.1:{}", api.port()));
        let path = self.tmp.path().join("webd.toml");
        std::fs::write(&path, merge_config(&defaults, extra)).unwrap();
        self.webd = Some(Daemon::start_listening(
            &self.bus,
            "pocket-webd",
            addr,
            &path,
        ));
        format!("http://localhost:{port}")
    }

    pub fn webd_dir(&self) -> PathBuf {
        self.tmp.path().join("webd")
    }

    /// What webd printed on "the console": the setup code at first start,
    /// the certificate's fingerprint at every start.
    pub fn webd_console(&self) -> PathBuf {
        self.tmp.path().join("console")
    }

    /// The box's certificate (PEM) that webd made at its first start.
    pub fn webd_certificate(&self) -> String {
        std::fs::read_to_string(self.webd_dir().join("tls/cert.pem"))
            .expect("webd made its certificate")
    }

    pub fn modeld(&mut self) -> &mut Daemon {
        self.modeld.as_mut().expect("modeld started")
    }

    pub fn restart_modeld(&mut self) {
        let bus = &self.bus;
        self.modeld.as_mut().expect("started").restart(bus);
    }

    pub fn ctl(&self, args: &[&str]) -> Output {
        run_pocketctl(&self.bus, RunAs::Me, args)
    }

    pub fn installed(&self) -> Vec<(String, String)> {
        let list = self.ctl(&["model", "list", "--json"]).ok().json();
        list.as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["name"].as_str().unwrap().to_string(),
                    m["version"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    pub fn models_dir(&self) -> PathBuf {
        self.data.join("models")
    }

    pub fn count(&self, sub: &str) -> usize {
        std::fs::read_dir(self.models_dir().join(sub))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Nothing installed, no blob stored, no partial download left.
    pub fn assert_nothing_installed(&self) {
        assert!(
            self.installed().is_empty(),
            "a model is listed: {:?}",
            self.installed()
        );
        assert_eq!(self.count("sha256"), 0, "a blob was stored");
        assert_eq!(self.count("partial"), 0, "a partial download was left");
        assert_eq!(self.count("by-name"), 0, "a model is visible by name");
    }

    /// Replaces the served catalog with one built from `packs` at `version`.
    pub fn republish(&self, packs: &Path, version: &str) {
        let _ = std::fs::remove_dir_all(self.site.join("packs"));
        self.publisher.catalog(packs, &self.site, version);
    }
}

/// A TCP port on 127.0.0.1 that nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Config text: `defaults` lines whose key `extra` does not set, then `extra`.
pub fn merge_config(defaults: &[String], extra: &str) -> String {
    let key = |l: &str| l.split('=').next().unwrap_or("").trim().to_string();
    let overridden: Vec<String> = extra.lines().map(key).collect();
    let mut text: String = defaults
        .iter()
        .filter(|l| !overridden.contains(&key(l)))
        .map(|l| format!("{l}\n"))
        .collect();
    text.push_str(extra);
    text.push('\n');
    text
}
