//! The appliance under QEMU: the aarch64 image that `image/build.sh`
//! (`just image`) makes, booted by `image/qemu.sh` on a copy-on-write
//! overlay of it, the serial console logged to a file, and a shell on the
//! virtio console (hvc0) driven through a unix socket.
//!
//! The guest reaches the host only through forwards: `serve` maps
//! 10.0.2.100:80 in the guest to a server on 127.0.0.1 here.

use crate::{onnx_fixtures, workspace_root, HttpServer, Publisher};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long a boot (firmware, GRUB, kernel, every daemon) may take under
/// TCG on a loaded 2-core machine.
pub const BOOT_LIMIT: Duration = Duration::from_secs(300);

/// The image the appliance tests boot: `POCKETOS_IMAGE_DIR` (for example
/// a Buildroot build's `output/images`), else where `just image` puts it.
pub fn image_dir() -> PathBuf {
    match std::env::var_os("POCKETOS_IMAGE_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => workspace_root().join("target/image"),
    }
}

/// The built image's file `name`, or a panic that says how to build it.
pub fn image_file(name: &str) -> PathBuf {
    let path = image_dir().join(name);
    assert!(
        path.exists(),
        "no {} : build the appliance image first (`just image`)",
        path.display()
    );
    path
}

/// The host side of an appliance run: the publisher whose keys the image
/// trusts, a signed catalog offering the `mlp` and `attention` fixture
/// models, and a server for it on 127.0.0.1.
/// The language model [`Host::with_llm`] offers.
pub const LLM: &str = "smollm2-135m-instruct";

pub struct Host {
    pub tmp: tempfile::TempDir,
    pub publisher: Publisher,
    pub site: PathBuf,
    pub http: HttpServer,
}

impl Host {
    pub fn new() -> Host {
        Self::build(false)
    }

    /// [`Host::new`]'s catalog with SmolLM2-135M-Instruct (4-bit) in it too,
    /// as [`LLM`].
    pub fn with_llm() -> Host {
        Self::build(true)
    }

    fn build(llm: bool) -> Host {
        let tmp = tempfile::tempdir().expect("tmp");
        let publisher = Publisher::open(&image_dir().join("dev-keys"));
        let packs = tmp.path().join("packs");
        let site = tmp.path().join("site");
        let fx = onnx_fixtures();
        for name in ["mlp", "attention"] {
            let file = format!("{name}.onnx");
            publisher.pack(&packs, name, "1.0", &[(&file, &fx.join(&file))]);
        }
        if llm {
            publisher.pack_folder(&packs, LLM, &crate::llm_folder("smollm2-int4"));
        }
        publisher.catalog(&packs, &site, "1");
        let http = HttpServer::serve(&site);
        Host {
            tmp,
            publisher,
            site,
            http,
        }
    }
}

impl Default for Host {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Default)]
struct Buffer {
    text: Mutex<String>,
    grew: Condvar,
}

/// One booted (or bootable) appliance with its own disk overlay.
pub struct Appliance {
    dir: tempfile::TempDir,
    forwards: Vec<String>,
    /// U-Boot's environment flash, when the box boots through U-Boot.
    uboot_env: Option<PathBuf>,
    qemu: Option<Child>,
    shell: Option<UnixStream>,
    out: Arc<Buffer>,
    boots: u32,
    next: u64,
}

impl std::fmt::Debug for Appliance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Appliance({})", self.dir.path().display())
    }
}

impl Appliance {
    /// A box with a fresh copy (qcow2 overlay) of the built image's disk
    /// and fresh UEFI variables.
    pub fn new() -> Appliance {
        Appliance::from_disk(&image_file("pocketos.img"))
    }

    /// A box with a fresh copy (qcow2 overlay) of the raw disk image `base`.
    pub fn from_disk(base: &Path) -> Appliance {
        let dir = tempfile::tempdir().expect("tmp");
        let overlay = dir.path().join("disk.qcow2");
        let status = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(base)
            .arg(&overlay)
            .status()
            .expect("run qemu-img");
        assert!(status.success(), "qemu-img create failed");
        Appliance {
            dir,
            forwards: Vec::new(),
            uboot_env: None,
            qemu: None,
            shell: None,
            out: Arc::default(),
            boots: 0,
            next: 0,
        }
    }

    /// Makes `http://10.0.2.100/` in the guest reach `host_url`
    /// (`http://127.0.0.1:PORT/`) here; takes effect at the next power-on.
    pub fn serve(&mut self, host_url: &str) {
        let port = host_url
            .trim_end_matches('/')
            .rsplit(':')
            .next()
            .expect("url with a port");
        self.forwards.push(format!(
            "guestfwd=tcp:10.0.2.100:80-cmd:socat - TCP:127.0.0.1:{port}"
        ));
    }

    /// Makes the guest's TCP `guest_port` reachable here at
    /// `127.0.0.1:<returned port>`; takes effect at the next power-on.
    pub fn forward_to_guest(&mut self, guest_port: u16) -> u16 {
        let port = crate::free_port();
        self.forwards
            .push(format!("hostfwd=tcp:127.0.0.1:{port}-:{guest_port}"));
        port
    }

    /// Boots through Debian's U-Boot (`qemu_arm64`) instead of UEFI and
    /// GRUB from the next power-on; returns its environment flash (64 MiB,
    /// the environment at offset 0), for the caller to write.
    pub fn use_uboot(&mut self) -> PathBuf {
        let flash = self.dir.path().join("uboot-env.flash");
        if !flash.exists() {
            let f = std::fs::File::create(&flash).expect("create the env flash");
            f.set_len(64 << 20).expect("size the env flash");
        }
        self.uboot_env = Some(flash.clone());
        flash
    }

    pub fn disk(&self) -> PathBuf {
        self.dir.path().join("disk.qcow2")
    }

    /// Powers the box on and waits for its shell (rcS has then started
    /// every service).
    pub fn power_on(&mut self) {
        assert!(self.qemu.is_none(), "already running");
        self.boots += 1;
        let console = self.console_path(self.boots);
        let control = self.dir.path().join("control.sock");
        let _ = std::fs::remove_file(&control);
        let mut qemu = Command::new(workspace_root().join("image/qemu.sh"));
        if let Some(env) = &self.uboot_env {
            qemu.env("POCKETOS_FIRMWARE", "uboot")
                .env("POCKETOS_UBOOT_ENV", env);
        }
        let child = qemu
            .env("POCKETOS_DISK", self.disk())
            .env("POCKETOS_EFIVARS", self.dir.path().join("efivars.fd"))
            .env("POCKETOS_CONSOLE", &console)
            .env("POCKETOS_CONTROL", &control)
            .env("POCKETOS_FORWARDS", self.forwards.join(","))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start image/qemu.sh");
        self.qemu = Some(child);
        let stream = crate::wait_for("QEMU's control socket", Duration::from_secs(30), || {
            UnixStream::connect(&control).ok()
        });
        self.out = Arc::default();
        let (mut reader, out) = (stream.try_clone().expect("clone"), self.out.clone());
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = reader.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&chunk[..n]).replace('\r', "");
                out.text.lock().unwrap().push_str(&text);
                out.grew.notify_all();
            }
        });
        self.shell = Some(stream);
        self.wait_shell();
    }

    /// Waits until every daemon is on the bus and otad's boot health check
    /// has decided; returns `pocketctl status --json`.
    pub fn wait_ready(&mut self) -> serde_json::Value {
        let start = Instant::now();
        loop {
            let s = self.ctl_json("status");
            let all_up = ["modeld", "npud", "powerd", "otad"]
                .iter()
                .all(|d| s["daemons"][d]["running"] == true);
            let health = s["daemons"]["otad"]["health"].as_str().unwrap_or("");
            if all_up && !health.is_empty() && health != "pending" && health != "checking" {
                return s;
            }
            assert!(
                start.elapsed() < BOOT_LIMIT,
                "daemons not ready: {s:#}\nconsole:\n{}",
                self.console_tail(30)
            );
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// Pulls the power: QEMU is killed, whatever the guest had not written
    /// to its disk is lost.
    pub fn kill(&mut self) {
        if let Some(mut q) = self.qemu.take() {
            let _ = q.kill();
            let _ = q.wait();
        }
        self.shell = None;
    }

    /// How many boots since power-on reached the end of rcS (the console's
    /// "PocketOS VERSION up: slot X" lines).
    pub fn boots(&self) -> usize {
        self.boot_lines().len()
    }

    /// The console's boot lines, in order.
    pub fn boot_lines(&self) -> Vec<String> {
        self.console()
            .lines()
            .filter(|l| l.starts_with("PocketOS ") && l.contains(" up: slot "))
            .map(str::to_string)
            .collect()
    }

    /// Waits until `n` boots since power-on have come up (the guest
    /// reboots by itself or after `reboot`), then for the last one's shell.
    pub fn wait_boots(&mut self, n: usize) {
        let start = Instant::now();
        let limit = BOOT_LIMIT * n.saturating_sub(self.boots()).max(1) as u32;
        while self.boots() < n {
            if start.elapsed() > limit {
                panic!(
                    "boot {n} did not come up within {limit:?}; console:\n{}",
                    self.console_tail(60)
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        self.wait_shell();
    }

    /// Types `line` into the shell without waiting for it (`reboot`).
    pub fn send_line(&mut self, line: &str) {
        self.send(&format!("{line}\n"));
    }

    /// Probes the shell until it answers.
    fn wait_shell(&mut self) {
        let start = Instant::now();
        loop {
            let n = self.marker();
            // The probe is harmless if a shell of an old boot reads it late.
            self.send(&format!(
                "stty -echo; PS1=; PS2=; printf '__P%s__\\n' {n}\n"
            ));
            if self
                .wait_text(&format!("__P{n}__"), "\n", Duration::from_secs(3))
                .is_some()
            {
                return;
            }
            if start.elapsed() > BOOT_LIMIT {
                panic!(
                    "the appliance's shell did not answer within {BOOT_LIMIT:?}; console:\n{}",
                    self.console_tail(60)
                );
            }
        }
    }

    fn marker(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    fn send(&mut self, text: &str) {
        let shell = self.shell.as_mut().expect("powered on");
        shell.write_all(text.as_bytes()).expect("write to hvc0");
    }

    /// Waits for `start` ... `end` in the shell's output and returns what
    /// is between them.
    fn wait_text(&self, start: &str, end: &str, limit: Duration) -> Option<String> {
        let deadline = Instant::now() + limit;
        let mut text = self.out.text.lock().unwrap();
        loop {
            if let Some(i) = text.find(start) {
                let rest = &text[i + start.len()..];
                if let Some(j) = rest.find(end) {
                    return Some(rest[..j].to_string());
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            text = self.out.grew.wait_timeout(text, deadline - now).unwrap().0;
        }
    }

    /// Runs `cmd` in the guest's shell: (exit status, stdout and stderr).
    pub fn sh_within(&mut self, cmd: &str, limit: Duration) -> (i32, String) {
        let n = self.marker();
        self.send(&format!(
            "printf '__B%s__\\n' {n}; {{ {cmd}\n}} 2>&1; printf '__E%s_%s__\\n' {n} $?\n"
        ));
        let Some(body) = self.wait_text(&format!("__B{n}__\n"), &format!("__E{n}_"), limit) else {
            panic!(
                "`{cmd}` did not finish within {limit:?}; console:\n{}",
                self.console_tail(40)
            );
        };
        let rc = self
            .wait_text(&format!("__E{n}_"), "__", Duration::from_secs(5))
            .and_then(|s| s.parse().ok())
            .expect("exit status");
        (rc, body)
    }

    pub fn sh(&mut self, cmd: &str) -> (i32, String) {
        self.sh_within(cmd, Duration::from_secs(120))
    }

    /// Runs `cmd` and asserts it succeeds; returns its output.
    pub fn ok(&mut self, cmd: &str) -> String {
        let (rc, out) = self.sh(cmd);
        if rc != 0 {
            let logs = self.sh("tail -n 15 /var/log/pocket-*.log").1;
            panic!("`{cmd}` failed ({rc}):\n{out}\nthe daemons' logs:\n{logs}");
        }
        out
    }

    /// `pocketctl ARGS --json` in the guest, parsed.
    pub fn ctl_json(&mut self, args: &str) -> serde_json::Value {
        let out = self.ok(&format!("pocketctl {args} --json"));
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("pocketctl {args} --json gave no JSON ({e}):\n{out}"))
    }

    fn console_path(&self, boot: u32) -> PathBuf {
        self.dir.path().join(format!("console-{boot}.log"))
    }

    /// Everything the serial console printed since the last power-on.
    pub fn console(&self) -> String {
        std::fs::read(self.console_path(self.boots))
            .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
            .unwrap_or_default()
    }

    pub fn console_tail(&self, lines: usize) -> String {
        let text = self.console();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Default for Appliance {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            // Keep the consoles of a failed test for reading.
            let keep = workspace_root().join("target/appliance-failed");
            let _ = std::fs::create_dir_all(&keep);
            for boot in 1..=self.boots {
                let from = self.console_path(boot);
                let name = format!(
                    "{}-console-{boot}.log",
                    std::thread::current().name().unwrap_or("test")
                );
                let _ = std::fs::copy(from, keep.join(name));
            }
            eprintln!("appliance consoles kept in {}", keep.display());
        }
    }
}
