//! The PocketOS testbed: the real parts a test or the demo needs, on one
//! machine and on loopback only.
//!
//! - [`DevBus`]: a private `dbus-daemon` with PocketOS's bus policy files,
//!   addressed through `DBUS_SYSTEM_BUS_ADDRESS`;
//! - [`Daemon`]: a real daemon binary started on that bus;
//! - [`Dash`]: a client of the dashboard's HTTP API, with its session
//!   and CSRF token;
//! - [`HttpServer`]: a file server on 127.0.0.1 that can throttle, drop a
//!   connection mid-body and logs what it sent;
//! - [`Publisher`]: keys, keyrings, packs and catalogs made with the real
//!   `pocket-publish` code, and the seeded ONNX fixture models;
//! - [`llm_fixtures`]: SmolLM2 and a tiny llama as onnxruntime-genai
//!   folders, and what onnxruntime-genai, `tokenizers` and `jinja2` make
//!   of them;
//! - [`SimBoard`]: a fake sysfs tree with a plant model for powerd;
//! - [`UpdateBox`]: file-backed A/B slots and a real bootloader
//!   environment for otad.
//! - [`appliance::Appliance`]: the aarch64 appliance image booted under
//!   `qemu-system-aarch64`, driven through a shell on its virtio console.

pub mod appliance;
pub mod bench;
mod bus;
mod daemon;
mod dash;
mod fixtures;
mod http;
mod llm;
mod simboard;
mod updatebox;
mod world;

pub use bus::{BusPolicy, DevBus};
pub use daemon::{bin_path, rss_kib, run_pocketctl, Daemon, Output, RunAs};
pub use dash::{
    browse, certificate_fingerprint, https_client, pem_fingerprint, plain_client, setup_code,
    wait_event, Dash, Reply,
};
pub use fixtures::{
    assert_close, onnx_big_fixture, onnx_fixtures, onnxruntime_library, random_file,
    reference_outputs, seeded_data, Publisher,
};
pub use http::{HttpServer, Served};
pub use llm::{folder_files, llm_fixtures, llm_folder, llm_reference, spawn_python};
pub use simboard::{Load, Sample, SimBoard};
pub use updatebox::{
    fw_printenv, grub_editenv_list, tool, BundleFiles, Loader, UpdateBox, COMPATIBLE,
};
pub use world::{free_port, merge_config, World};

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

/// Polls `f` until it gives `Some`, for at most `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > limit {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether this process may mount and switch users.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// For a test that needs root for `what`: true when it may go on. Without
/// root it fails, unless `POCKET_SKIP_ROOT_TESTS=1` says to skip it (then
/// it says so), so that a run without root never reports these as passed
/// by accident.
pub fn root_or_skip(what: &str) -> bool {
    if is_root() {
        return true;
    }
    if std::env::var_os("POCKET_SKIP_ROOT_TESTS").is_some() {
        eprintln!("skipped: {what} needs root (POCKET_SKIP_ROOT_TESTS is set)");
        return false;
    }
    panic!("{what} needs root: run the tests as root, or set POCKET_SKIP_ROOT_TESTS=1 to skip this one");
}

/// A tmpfs of `size` (`mount -o size=`) mounted on a directory for the
/// life of the value: a small disk that fills up. Needs root.
#[derive(Debug)]
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(dir: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs");
        Tmpfs(dir.to_path_buf())
    }

    /// Bytes an unprivileged writer may still use.
    pub fn free(&self) -> u64 {
        let s = nix::sys::statvfs::statvfs(&self.0).unwrap();
        s.blocks_available() as u64 * s.fragment_size() as u64
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}
