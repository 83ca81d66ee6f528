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
    /// Execution providers in order of preference, by short name (matched
    /// without case): `qnn`, `acl`, `rknpu`, `nnapi`, `xnnpack`, `cpu`.
    /// Any other name is an error at start.
    #[serde(default = "default_providers")]
    pub providers: Vec<Provider>,
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
    /// Whether a session's threads spin a short while for the next piece
    /// of work before they sleep. Spinning keeps an LLM's back-to-back
    /// decode steps from paying a wake-up for every operator (measured in
    /// docs/performance.md); an idle box pays nothing, since the threads
    /// sleep once their spin runs out.
    #[serde(default = "default_true")]
    pub intra_spin: bool,
    /// The most bytes of one `InferFd` request's file that npud maps or
    /// reads: inputs that reach past it are refused before any is read, and
    /// outputs that would reach past it are written into the file instead
    /// of being mapped.
    #[serde(default = "default_request")]
    pub max_request_mb: u64,
    /// LLM sequences that generate at once per model; each has KV cache
    /// for its context counted in the model's memory at load.
    #[serde(default = "default_sequences")]
    pub max_sequences: usize,
    /// Requests that may wait for a sequence per model; beyond them a
    /// request is refused as `Busy`.
    #[serde(default = "default_queue")]
    pub max_queue: usize,
    /// An LLM request's context in tokens unless it asks for another
    /// (`num_ctx`), at most the model's own context length.
    #[serde(default = "default_context")]
    pub default_context: u32,
    /// Prompt tokens fed to the model per step: a long prompt is read in
    /// chunks, so cancelling it takes effect within one chunk.
    #[serde(default = "default_chunk")]
    pub prefill_chunk: usize,
}

/// An execution provider by its short name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum Provider {
    Qnn,
    Acl,
    Rknpu,
    Nnapi,
    Xnnpack,
    Cpu,
}

impl Provider {
    /// Every provider npud knows, most specialised first.
    pub const ALL: [Provider; 6] = [
        Provider::Qnn,
        Provider::Acl,
        Provider::Rknpu,
        Provider::Nnapi,
        Provider::Xnnpack,
        Provider::Cpu,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Provider::Qnn => "qnn",
            Provider::Acl => "acl",
            Provider::Rknpu => "rknpu",
            Provider::Nnapi => "nnapi",
            Provider::Xnnpack => "xnnpack",
            Provider::Cpu => "cpu",
        }
    }
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A provider name npud does not know.
#[derive(Debug, thiserror::Error)]
#[error("unknown execution provider {0:?}; known providers: qnn, acl, rknpu, nnapi, xnnpack, cpu")]
pub struct UnknownProvider(pub String);

impl std::str::FromStr for Provider {
    type Err = UnknownProvider;

    fn from_str(s: &str) -> Result<Provider, UnknownProvider> {
        Provider::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| UnknownProvider(s.to_string()))
    }
}

impl TryFrom<String> for Provider {
    type Error = UnknownProvider;

    fn try_from(s: String) -> Result<Provider, UnknownProvider> {
        s.parse()
    }
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
fn default_providers() -> Vec<Provider> {
    vec![Provider::Xnnpack, Provider::Cpu]
}
fn default_sequences() -> usize {
    4
}
fn default_queue() -> usize {
    16
}
fn default_context() -> u32 {
    2048
}
fn default_chunk() -> usize {
    256
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
    }

    #[test]
    fn provider_names_match_without_case() {
        let cfg = parse(r#"providers = ["CPU", "XnnPack", " qnn "]"#).unwrap();
        assert_eq!(
            cfg.providers,
            [Provider::Cpu, Provider::Xnnpack, Provider::Qnn]
        );
    }

    #[test]
    fn an_unknown_provider_is_an_error_naming_the_known_ones() {
        let e = parse(r#"providers = ["npu", "cpu"]"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown execution provider \"npu\""), "{e}");
        for p in Provider::ALL {
            assert!(e.contains(p.name()), "{e} names {p}");
        }
    }

    #[test]
    fn unknown_keys_are_an_error() {
        let e = parse("provider = [\"cpu\"]").unwrap_err().to_string();
        assert!(e.contains("unknown field"), "{e}");
    }
}
