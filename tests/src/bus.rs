use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// Which policy the private bus enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusPolicy {
    /// Exactly the shipped policy files.
    Shipped,
    /// The shipped files plus a mandatory rule letting anyone call PocketOS
    /// daemons, so that the daemons' own permission checks can be tested.
    Permissive,
}

/// A private `dbus-daemon` configured like the box's system bus.
pub struct DevBus {
    child: Child,
    address: String,
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for DevBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DevBus({})", self.address)
    }
}

/// Every bus policy file the daemons ship.
pub fn policy_files() -> Vec<PathBuf> {
    let daemons = crate::workspace_root().join("daemons");
    let mut out = Vec::new();
    for d in std::fs::read_dir(daemons).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(d.path().join("data"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if f.path().extension().is_some_and(|e| e == "conf") {
                out.push(f.path());
            }
        }
    }
    out.sort();
    out
}

impl DevBus {
    pub fn start() -> DevBus {
        Self::start_with(BusPolicy::Shipped)
    }

    pub fn start_with(policy: BusPolicy) -> DevBus {
        let dir = tempfile::Builder::new()
            .prefix("pocket-bus")
            .tempdir()
            .expect("temp dir");
        // Other users (the unprivileged callers in tests) must reach the socket.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod bus dir");
        let socket = dir.path().join("system_bus_socket");
        let template =
            std::fs::read_to_string(crate::workspace_root().join("tests/data/dev-bus.conf.in"))
                .expect("tests/data/dev-bus.conf.in");
        let includes: String = policy_files()
            .iter()
            .map(|p| format!("  <include>{}</include>\n", p.display()))
            .collect();
        let extra = match policy {
            BusPolicy::Shipped => String::new(),
            BusPolicy::Permissive => "  <policy context=\"mandatory\">\n    <allow send_destination=\"*\" send_type=\"method_call\"/>\n  </policy>\n".into(),
        };
        let conf = template
            .replace("@LISTEN@", &format!("unix:path={}", socket.display()))
            .replace("@INCLUDES@", &includes)
            .replace("@EXTRA@", &extra);
        let conf_path = dir.path().join("bus.conf");
        std::fs::write(&conf_path, conf).expect("write bus config");
        let mut child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", conf_path.display()))
            .args(["--nofork", "--nopidfile", "--print-address=1"])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.path().join("dbus.log")).expect("bus log"))
            .spawn()
            .expect("dbus-daemon is installed (apt-get install dbus-daemon)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("dbus-daemon prints its address");
        let address = line.trim().to_string();
        assert!(
            address.starts_with("unix:"),
            "dbus-daemon failed to start: {line:?}"
        );
        DevBus {
            child,
            address,
            dir,
        }
    }

    /// The value for `DBUS_SYSTEM_BUS_ADDRESS`.
    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// A client connection to this bus.
    pub async fn connect(&self) -> zbus::Connection {
        zbus::connection::Builder::address(self.address.as_str())
            .expect("bus address")
            .build()
            .await
            .expect("connect to the private bus")
    }

    /// Whether `name` has an owner, asked with `dbus-send` so that no async
    /// runtime is needed.
    pub fn has_owner(&self, name: &str) -> bool {
        let out = Command::new("dbus-send")
            .args([
                &format!("--bus={}", self.address),
                "--print-reply",
                "--dest=org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus.NameHasOwner",
                &format!("string:{name}"),
            ])
            .output()
            .expect("dbus-send is installed");
        String::from_utf8_lossy(&out.stdout).contains("boolean true")
    }
}

impl Drop for DevBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
