use crate::{wait_for, DevBus};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A binary built by this workspace (`cargo build --workspace --bins` first;
/// `just test` does).
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is not built; run `cargo build --workspace --bins`",
        p.display()
    );
    p
}

/// libfaketime's multi-threaded library (package `libfaketime`), which
/// gives a process a wall clock that is off by a set amount.
fn libfaketime() -> PathBuf {
    let found = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("faketime/libfaketimeMT.so.1"))
        .find(|p| p.exists());
    found.expect(
        "libfaketimeMT.so.1 under /usr/lib/*/faketime (tests/install-deps.sh installs libfaketime)",
    )
}

/// A process's resident memory in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("the process is running")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// A real daemon on a private bus. Killed when dropped.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    ready: Ready,
    bin: String,
    args: Vec<String>,
    address: String,
    log: PathBuf,
    /// How far the daemon's clock is off (libfaketime's `FAKETIME`, such
    /// as `-365d`), when it runs with a wrong clock.
    clock: Option<String>,
}

/// What says a daemon is up.
#[derive(Debug, Clone)]
enum Ready {
    /// It owns this bus name.
    BusName(String),
    /// It accepts TCP connections here.
    Listening(std::net::SocketAddr),
}

impl Daemon {
    /// Starts `bin` with `--config config` and waits until it owns
    /// `bus_name`.
    pub fn start(bus: &DevBus, bin: &str, bus_name: &str, config: &Path) -> Daemon {
        Self::start_with(bus, bin, Ready::BusName(bus_name.into()), config)
    }

    /// Starts `bin` with `--config config` and waits until it accepts
    /// connections on `addr`.
    pub fn start_listening(
        bus: &DevBus,
        bin: &str,
        addr: std::net::SocketAddr,
        config: &Path,
    ) -> Daemon {
        Self::start_with(bus, bin, Ready::Listening(addr), config)
    }

    fn start_with(bus: &DevBus, bin: &str, ready: Ready, config: &Path) -> Daemon {
        let mut d = Daemon {
            child: None,
            ready,
            bin: bin.into(),
            args: vec!["--config".into(), config.display().to_string()],
            address: bus.address().into(),
            log: config.with_extension("log"),
            clock: None,
        };
        d.spawn(bus);
        d
    }

    fn spawn(&mut self, bus: &DevBus) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("daemon log");
        let mut cmd = Command::new(bin_path(&self.bin));
        cmd.args(&self.args)
            .env("DBUS_SYSTEM_BUS_ADDRESS", &self.address)
            .env("RUST_LOG", "info,zbus=warn")
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(offset) = &self.clock {
            // The wall clock only: timers and timeouts run as usual.
            cmd.env("LD_PRELOAD", libfaketime())
                .env("FAKETIME", offset)
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
                .env("FAKETIME_DONT_RESET", "1");
        }
        let child = cmd.spawn().expect("spawn daemon");
        self.child = Some(child);
        let ready = self.ready.clone();
        wait_for(
            &format!("{} to be up ({ready:?})", self.bin),
            Duration::from_secs(30),
            || {
                if let Some(status) = self
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten())
                {
                    panic!("{} exited with {status}: {}", self.bin, self.log_text());
                }
                match &ready {
                    Ready::BusName(name) => bus.has_owner(name),
                    Ready::Listening(addr) => std::net::TcpStream::connect(addr).is_ok(),
                }
                .then_some(())
            },
        );
    }

    /// What the daemon wrote to stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// `kill -9`: no chance to clean up, as in a power cut of the process.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self, bus: &DevBus) {
        self.kill9();
        self.spawn(bus);
    }

    /// Restarts the daemon with its wall clock `offset` off (`-365d`,
    /// `+365d`; libfaketime's syntax), or right again with `None`.
    pub fn restart_with_clock(&mut self, bus: &DevBus, offset: Option<&str>) {
        self.clock = offset.map(str::to_string);
        self.restart(bus);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Who runs a client command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunAs {
    /// This process's user (root in CI).
    Me,
    /// An unprivileged user (`nobody`), optionally with one extra group.
    Nobody { extra_gid: Option<u32> },
}

#[derive(Debug)]
pub struct Output {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", self.stdout, self.stderr))
    }

    pub fn ok(self) -> Self {
        assert!(
            self.status.success(),
            "command failed: {}\n{}",
            self.stderr,
            self.stdout
        );
        self
    }

    /// Asserts failure with a one-line error mentioning `needle`.
    pub fn fails_with(&self, needle: &str) {
        assert!(
            !self.status.success(),
            "expected failure, got: {}",
            self.stdout
        );
        let err = self.stderr.trim();
        assert!(
            err.contains(needle),
            "error {err:?} does not mention {needle:?}"
        );
        assert_eq!(err.lines().count(), 1, "error is not one line: {err:?}");
    }
}

/// Runs the real `pocketctl` against the private bus.
pub fn run_pocketctl(bus: &DevBus, who: RunAs, args: &[&str]) -> Output {
    let mut cmd = match who {
        RunAs::Me => Command::new(bin_path("pocketctl")),
        RunAs::Nobody { extra_gid } => {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534"]);
            match extra_gid {
                Some(g) => c.arg(format!("--groups={g}")),
                None => c.arg("--clear-groups"),
            };
            c.arg("--").arg(bin_path("pocketctl"));
            c
        }
    };
    let out = cmd
        .args(args)
        .env("DBUS_SYSTEM_BUS_ADDRESS", bus.address())
        .stdin(Stdio::null())
        .output()
        .expect("run pocketctl");
    Output {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
}
