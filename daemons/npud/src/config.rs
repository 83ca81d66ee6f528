use serde::Deserialize;
use std::path::PathBuf;

/// `/etc/pocketos/npud.toml`; see `npud.toml.example` beside this crate.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Path of `libonnxruntime.so`, loaded at start.
    #[serde(default = "default_library")]
    pub onnxruntime_library: PathBuf,
    /// Memory all loaded models together may take.
    #[serde(default = "default_budget")]
    pub memory_budget_mb: u64,
    /// Execution providers in order of preference, by short name: `qnn`,
    /// `acl`, `armnn`, `rknpu`, `nnapi`, `xnnpack`, `cpu`.
    #[serde(default = "default_providers")]
    pub providers: Vec<String>,
    /// Whether a model may run on the CPU when no preferred accelerator is
    /// available; the provider then reads `cpu (fallback from X)`.
    #[serde(default = "default_true")]
    pub allow_cpu_fallback: bool,
    /// Vendor plugin EP libraries registered at start.
    #[serde(default)]
    pub ep_libraries: Vec<EpLibrary>,
    /// A model unused this long is unloaded.
    #[serde(default = "default_keep_alive")]
    pub keep_alive_secs: u64,
    /// The `performance` profile is held on powerd while inference runs and
    /// released this long after the last run.
    #[serde(default = "default_hold")]
    pub performance_hold_secs: u64,
    /// Threads per session; 0 for one per CPU core.
    #[serde(default)]
    pub intra_threads: usize,
    /// The most bytes of one `InferFd` request's file that npud maps or
    /// reads: inputs that reach past it are refused before any is read, and
    /// outputs that would reach past it are written into the file instead
    /// of being mapped.
    #[serde(default = "default_request")]
    pub max_request_mb: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EpLibrary {
    pub name: String,
    pub path: PathBuf,
}

fn default_library() -> PathBuf {
    "/usr/lib/libonnxruntime.so".into()
}
fn default_budget() -> u64 {
    4096
}
fn default_providers() -> Vec<String> {
    vec!["xnnpack".into(), "cpu".into()]
}
fn default_true() -> bool {
    true
}
fn default_keep_alive() -> u64 {
    300
}
fn default_request() -> u64 {
    1024
}
fn default_hold() -> u64 {
    10
}
