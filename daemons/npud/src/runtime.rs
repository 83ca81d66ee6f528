//! The core room: ONNX Runtime, execution-provider choice, the loaded
//! models within the memory budget, and running them.

use crate::config::{Config, Provider};
use crate::error::RuntimeError;
use crate::tensor;
use ort::ep::{self, ExecutionProvider};
use ort::session::Session;
use pocket_proto::runtime::{LoadedModel, Providers, TensorSpec};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// Execution providers by our short name: whether the library has them and
/// how to register them on a session.
fn provider_available(p: Provider) -> bool {
    let r = match p {
        Provider::Cpu => return true,
        Provider::Xnnpack => ep::XNNPACK::is_available(),
        Provider::Qnn => ep::QNN::is_available(),
        Provider::Acl => ep::ACL::is_available(),
        Provider::Rknpu => ep::RKNPU::is_available(),
        Provider::Nnapi => ep::NNAPI::is_available(),
    };
    r.unwrap_or(false)
}

fn dispatch(p: Provider) -> Option<ep::ExecutionProviderDispatch> {
    Some(match p {
        Provider::Cpu => return None,
        Provider::Xnnpack => ep::XNNPACK::default().build(),
        Provider::Qnn => ep::QNN::default().build(),
        Provider::Acl => ep::ACL::default().build(),
        Provider::Rknpu => ep::RKNPU::default().build(),
        Provider::Nnapi => ep::NNAPI::default().build(),
    })
}

/// What modeld says about an installed model.
#[derive(Debug, Clone)]
pub struct ModelRecord {
    pub name: String,
    pub version: String,
    pub path: String,
    pub memory_bytes: u64,
}

/// A model in memory. Its session runs one request at a time (`run` takes
/// `&mut`), so concurrent requests queue on its lock.
pub struct Loaded {
    pub record: ModelRecord,
    pub provider: String,
    session: Mutex<Session>,
    /// A request's turn on the session, awaited without holding a thread:
    /// `run` then finds the session free.
    pub turn: tokio::sync::Mutex<()>,
    last_used: Mutex<Instant>,
    busy: AtomicUsize,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// What an LLM's folder says beside its decoder; `None` for a model
    /// that runs in one pass.
    pub llm: Option<crate::llm::Llm>,
    /// Bytes of KV cache counted for the LLM's sequences (0 otherwise).
    pub kv_bytes: u64,
    /// An LLM's sequences that may generate at once.
    pub sequences: Arc<tokio::sync::Semaphore>,
    /// Requests waiting for or holding a sequence.
    pub waiting: AtomicUsize,
    /// The engine that batches a shared-buffer LLM's sequences.
    pub batcher: Option<crate::llm::batch::Batcher>,
    /// What the LLM's KV cache holds now.
    pub kv_use: KvUse,
    /// Last, so that it runs after everything above is freed.
    _freed: MarkFreed,
}

/// The C allocator's policy for npud, set first thing in `main`:
///
/// - Every allocation of 4 MiB or more is a mapping of its own, given back
///   to the system when freed. glibc raises that threshold (up to 32 MiB)
///   each time a large block is freed; after a model's unload, the next
///   load's buffers then come from the heap, where freed memory stays
///   resident (docs/performance.md). Not lower: the buffers ONNX
///   Runtime's kernels take and free on every run would then be new
///   mappings each time, their pages faulted in anew each decoded token.
/// - One heap for all threads. Models load on a blocking thread, and glibc
///   would give that thread a heap of its own, made of 64 MiB mappings:
///   weights placed there decoded about 5% slower than the same weights
///   on the main heap (17 of 20 alternating rounds, docs/performance.md).
///   npud's threads allocate little in their hot paths (a decode step
///   makes a few small vectors), so sharing one heap's lock costs nothing
///   measurable.
pub fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    #[allow(unsafe_code)]
    // SAFETY: mallopt takes no pointer and only sets the allocator's own
    // policy; it runs before any other thread exists.
    unsafe {
        nix::libc::mallopt(nix::libc::M_MMAP_THRESHOLD, 4 << 20);
        nix::libc::mallopt(nix::libc::M_ARENA_MAX, 1);
    }
}

/// How long a model's freed memory waits for a load to reuse it before it
/// goes back to the system.
const RELEASE_AFTER: Duration = Duration::from_secs(5);

/// When model memory was freed and is still npud's. A session's weights
/// are many mid-sized allocations that glibc keeps on its heap once freed;
/// the next load takes them back from there. Given back to the system at
/// once (`malloc_trim`), a load right after the unload (a model switch, a
/// new version) had to fault in new pages instead: it took about 10%
/// longer, and its model decoded slower (docs/performance.md). Given back
/// after [`RELEASE_AFTER`], a reload finds its pages, and memory that
/// nothing reuses still goes back within seconds.
#[derive(Debug, Default)]
struct Freed {
    since: Mutex<Option<Instant>>,
}

impl Freed {
    fn mark(&self, at: Instant) {
        *self.since.lock().expect("not poisoned") = Some(at);
    }

    /// Whether freed memory has waited [`RELEASE_AFTER`] by `now`; if so,
    /// it counts as given back from here on.
    fn take_due(&self, now: Instant) -> bool {
        let mut since = self.since.lock().expect("not poisoned");
        let due = since.is_some_and(|t| now.saturating_duration_since(t) >= RELEASE_AFTER);
        if due {
            *since = None;
        }
        due
    }
}

/// Marks a model's memory freed when dropped, after everything else the
/// model held.
struct MarkFreed(Arc<Freed>);

impl Drop for MarkFreed {
    fn drop(&mut self) {
        self.0.mark(Instant::now());
    }
}

/// An LLM's sequences and the tokens their KV caches hold, as the batching
/// engine last counted them and as sequences that run alone count
/// themselves.
#[derive(Debug, Default)]
pub struct KvUse {
    batched_rows: AtomicUsize,
    batched_tokens: AtomicU64,
    alone_rows: AtomicUsize,
    alone_tokens: AtomicU64,
}

/// A sequence running alone, counted in its model's [`KvUse`] until
/// dropped.
pub struct AloneSequence<'a> {
    kv: &'a KvUse,
    tokens: u64,
}

impl AloneSequence<'_> {
    /// The sequence's cache holds `tokens` now.
    pub fn holds(&mut self, tokens: u64) {
        let (kv, before) = (&self.kv.alone_tokens, self.tokens);
        if tokens >= before {
            kv.fetch_add(tokens - before, Ordering::Relaxed);
        } else {
            kv.fetch_sub(before - tokens, Ordering::Relaxed);
        }
        self.tokens = tokens;
    }
}

impl Drop for AloneSequence<'_> {
    fn drop(&mut self) {
        self.holds(0);
        self.kv.alone_rows.fetch_sub(1, Ordering::Relaxed);
    }
}

impl KvUse {
    /// What the batching engine holds after a turn: its rows running and
    /// the tokens in its pool (running rows and parked prefixes).
    pub fn batched(&self, rows: usize, tokens: u64) {
        self.batched_rows.store(rows, Ordering::Relaxed);
        self.batched_tokens.store(tokens, Ordering::Relaxed);
    }

    /// Counts a sequence that runs alone, outside the batching engine.
    pub fn alone(&self) -> AloneSequence<'_> {
        self.alone_rows.fetch_add(1, Ordering::Relaxed);
        AloneSequence {
            kv: self,
            tokens: 0,
        }
    }

    /// (sequences running, tokens held).
    pub fn now(&self) -> (usize, u64) {
        (
            self.batched_rows.load(Ordering::Relaxed) + self.alone_rows.load(Ordering::Relaxed),
            self.batched_tokens.load(Ordering::Relaxed) + self.alone_tokens.load(Ordering::Relaxed),
        )
    }
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Loaded({}, {})", self.record.name, self.provider)
    }
}

/// A loaded model counted as in use (not evicted, not idled out) while
/// this lives.
pub struct InUse<'a>(&'a AtomicUsize);

impl Drop for InUse<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Loaded {
    /// Whether a request is running on the model.
    fn is_busy(&self) -> bool {
        self.busy.load(Ordering::SeqCst) > 0
    }

    /// Counts the model as in use until the guard is dropped.
    pub fn in_use(&self) -> InUse<'_> {
        self.busy.fetch_add(1, Ordering::SeqCst);
        InUse(&self.busy)
    }

    /// Memory the model takes: its weights and, for an LLM, the KV cache
    /// of its sequences.
    pub fn footprint(&self) -> u64 {
        self.record.memory_bytes.saturating_add(self.kv_bytes)
    }

    /// Runs `f` with the model's session, counted as a use.
    pub fn with_session<T>(&self, f: impl FnOnce(&mut Session) -> T) -> T {
        let mut session = self.session.lock().expect("not poisoned");
        let r = f(&mut session);
        *self.last_used.lock().expect("not poisoned") = Instant::now();
        r
    }

    fn idle_ms(&self) -> u64 {
        self.last_used
            .lock()
            .expect("not poisoned")
            .elapsed()
            .as_millis() as u64
    }

    pub fn view(&self) -> LoadedModel {
        let (running, tokens) = self.kv_use.now();
        let per_token = self
            .llm
            .as_ref()
            .map_or(0, |l| l.shape.kv_bytes_per_token());
        LoadedModel {
            name: self.record.name.clone(),
            version: self.record.version.clone(),
            provider: self.provider.clone(),
            memory_bytes: self.footprint(),
            kv_bytes_reserved: self.kv_bytes,
            kv_bytes_used: tokens.saturating_mul(per_token).min(self.kv_bytes),
            sequences_running: running as u32,
            idle_ms: self.idle_ms(),
            inputs: self.inputs.clone(),
            outputs: self.outputs.clone(),
        }
    }

    /// Runs the model on `(name, dtype, shape, bytes)` inputs. Returns
    /// outputs as `(name, dtype, shape, bytes)` and the run's latency in ms.
    #[allow(clippy::type_complexity)]
    pub fn run(
        &self,
        inputs: Vec<(String, String, Vec<i64>, Vec<u8>)>,
    ) -> Result<(Vec<(String, String, Vec<i64>, Vec<u8>)>, f64), RuntimeError> {
        let views: Vec<Input<'_>> = inputs
            .iter()
            .map(|(n, d, s, b)| (n.as_str(), d.as_str(), s.as_slice(), b.as_slice()))
            .collect();
        let mut out = Vec::new();
        let latency = self.run_with(&views, |name, dtype, shape, bytes| {
            out.push((name.to_string(), dtype.to_string(), shape, bytes.to_vec()));
            Ok(())
        })?;
        Ok((out, latency))
    }

    /// Runs the model on inputs that borrow their bytes (ONNX Runtime reads
    /// them in place where they are aligned): bytes npud owns, never a
    /// caller's memory, which could change while ONNX Runtime reads it.
    /// Hands each output's `(name, dtype, shape, bytes)` to `output` while
    /// ONNX Runtime still holds it, so the caller copies it once, to where
    /// it goes. Returns the run's latency in ms.
    pub fn run_with(
        &self,
        inputs: &[Input<'_>],
        mut output: impl FnMut(&str, &str, Vec<i64>, &[u8]) -> Result<(), RuntimeError>,
    ) -> Result<f64, RuntimeError> {
        let values =
            || -> Result<Vec<(String, ort::session::SessionInputValue<'_>)>, RuntimeError> {
                let mut values = Vec::with_capacity(inputs.len());
                for &(name, dtype, shape, bytes) in inputs {
                    let spec = self.inputs.iter().find(|s| s.name == name).ok_or_else(|| {
                        let known: Vec<&str> =
                            self.inputs.iter().map(|s| s.name.as_str()).collect();
                        RuntimeError::InvalidInput(format!(
                            "model {:?} has no input {name:?} (its inputs: {})",
                            self.record.name,
                            known.join(", ")
                        ))
                    })?;
                    tensor::check(spec, dtype, shape, bytes.len())?;
                    values.push((name.to_string(), tensor::input_value(dtype, shape, bytes)?));
                }
                Ok(values)
            };
        let first = values()?;
        for spec in &self.inputs {
            if !inputs.iter().any(|(n, ..)| *n == spec.name) {
                return Err(RuntimeError::InvalidInput(format!(
                    "input {:?} ({} {:?}) is missing",
                    spec.name, spec.dtype, spec.shape
                )));
            }
        }
        let failed = |e: ort::Error| RuntimeError::Inference(e.to_string());
        self.busy.fetch_add(1, Ordering::SeqCst);
        let result = (|| {
            let mut session = self.session.lock().expect("not poisoned");
            let start = Instant::now();
            let outputs = session.run(first).map_err(failed)?;
            emit(outputs, start, &mut output)
        })();
        *self.last_used.lock().expect("not poisoned") = Instant::now();
        self.busy.fetch_sub(1, Ordering::SeqCst);
        result
    }
}

/// Hands a run's outputs to `output` (see [`Loaded::run_with`]) and
/// returns the run's latency in ms, counted from `start` to here.
fn emit(
    outputs: ort::session::SessionOutputs<'_>,
    start: Instant,
    output: &mut impl FnMut(&str, &str, Vec<i64>, &[u8]) -> Result<(), RuntimeError>,
) -> Result<f64, RuntimeError> {
    let latency = start.elapsed().as_secs_f64() * 1000.0;
    for (name, value) in outputs.iter() {
        let (dtype, shape, bytes) = tensor::output_bytes(&value)?;
        output(name, &dtype, shape, &bytes)?;
    }
    Ok(latency)
}

/// A decoder graph that does not match its `genai_config.json`.
#[derive(Debug, thiserror::Error)]
enum DecoderMismatch {
    #[error("the decoder has no {what} {name:?}")]
    Missing { what: &'static str, name: String },
    #[error("the decoder's {what} {name:?} is {got}, not {want}")]
    Type {
        what: &'static str,
        name: String,
        got: String,
        want: &'static str,
    },
}

/// Whether a decoder's graph has the inputs and outputs its
/// `genai_config.json` names, with the element types the engine feeds and
/// reads (token ids and masks as i64, an fp32 KV cache and logits).
fn check_decoder(
    s: &crate::llm::config::Shape,
    inputs: &[TensorSpec],
    outputs: &[TensorSpec],
) -> Result<(), DecoderMismatch> {
    let has = |specs: &[TensorSpec], name: &str, want: &'static str, what: &'static str| {
        let name = name.to_string();
        match specs.iter().find(|t| t.name == name) {
            Some(t) if t.dtype == want => Ok(()),
            Some(t) => Err(DecoderMismatch::Type {
                what,
                name,
                got: t.dtype.clone(),
                want,
            }),
            None => Err(DecoderMismatch::Missing { what, name }),
        }
    };
    has(inputs, &s.input_ids, "i64", "input")?;
    has(inputs, &s.attention_mask, "i64", "input")?;
    if let Some(p) = &s.position_ids {
        has(inputs, p, "i64", "input")?;
    }
    has(outputs, &s.logits, "f32", "output")?;
    for l in 0..s.layers {
        has(inputs, &s.past_key[l], "f32", "input")?;
        has(inputs, &s.past_value[l], "f32", "input")?;
        has(outputs, &s.present_key[l], "f32", "output")?;
        has(outputs, &s.present_value[l], "f32", "output")?;
    }
    Ok(())
}

/// An input that borrows its bytes: (name, dtype, shape, bytes).
pub type Input<'a> = (&'a str, &'a str, &'a [i64], &'a [u8]);

enum SessionError {
    Options(String),
    Provider(String),
    Model(String),
}

fn build_session(
    env: &ort::environment::Environment,
    threads: usize,
    spin: bool,
    provider: Provider,
    path: &str,
) -> Result<Session, SessionError> {
    let opt =
        |e: ort::Error<ort::session::builder::SessionBuilder>| SessionError::Options(e.to_string());
    let mut builder = Session::builder(env)
        .map_err(|e| SessionError::Options(e.to_string()))?
        .with_intra_threads(threads)
        .map_err(opt)?
        .with_inter_threads(1)
        .map_err(opt)?
        // Config `intra_spin`: a short spin between an LLM's operators
        // saves a wake-up for each. One inter-op thread: nothing to spin.
        .with_config_entry(
            "session.intra_op.allow_spinning",
            if spin { "1" } else { "0" },
        )
        .map_err(opt)?
        .with_config_entry("session.inter_op.allow_spinning", "0")
        .map_err(opt)?;
    if let Some(d) = dispatch(provider) {
        builder = builder
            .with_execution_providers([d.error_on_failure()])
            .map_err(|e| SessionError::Provider(e.to_string()))?;
    }
    builder
        .commit_from_file(path)
        .map_err(|e| SessionError::Model(e.to_string()))
}

pub struct Runtime {
    cfg: Config,
    /// Why ONNX Runtime cannot be used, if it cannot.
    problem: Option<String>,
    env: Option<ort::environment::Environment>,
    library: Vec<Provider>,
    plugins: Vec<(String, String)>,
    /// Plugin EP libraries that could not be registered, and why.
    plugin_problems: Vec<String>,
    devices: Vec<String>,
    models: Mutex<HashMap<String, Arc<Loaded>>>,
    /// One load at a time: requests that arrive together for a model not
    /// loaded yet wait for the first one's load and share it, instead of
    /// each loading a copy the budget never counted.
    loads: Mutex<()>,
    threads: usize,
    freed: Arc<Freed>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Runtime({:?})", self.problem)
    }
}

impl Runtime {
    /// Loads the ONNX Runtime library. A missing or broken library is not
    /// fatal: the runtime stays up and degraded, and says why.
    pub fn new(cfg: Config) -> Runtime {
        let threads = if cfg.intra_threads > 0 {
            cfg.intra_threads
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        };
        let mut rt = Runtime {
            problem: None,
            env: None,
            library: Vec::new(),
            plugins: Vec::new(),
            plugin_problems: Vec::new(),
            devices: Vec::new(),
            models: Mutex::new(HashMap::new()),
            loads: Mutex::new(()),
            freed: Arc::default(),
            threads,
            cfg,
        };
        let path = rt.cfg.onnxruntime_library.clone();
        let env = if path.is_file() {
            ort::init_from(&path)
                .map_err(|e| format!("{}: {e}", path.display()))
                .and_then(|b| {
                    b.with_name("pocketos-npud")
                        .build()
                        .map_err(|e| e.to_string())
                })
        } else {
            Err(format!("{} does not exist", path.display()))
        };
        match env {
            Ok(env) => {
                for lib in &rt.cfg.ep_libraries {
                    match env.register_ep_library(lib.name.clone(), &lib.path) {
                        Ok(()) => rt
                            .plugins
                            .push((lib.name.clone(), lib.path.display().to_string())),
                        Err(e) => {
                            tracing::warn!(name = %lib.name, "plugin EP library not registered: {e}");
                            rt.plugin_problems.push(format!(
                                "plugin EP library {} ({}) not registered: {e}",
                                lib.name,
                                lib.path.display()
                            ));
                        }
                    }
                }
                rt.devices = env
                    .devices()
                    .map(|d| {
                        let hw = d.hardware_device();
                        format!(
                            "{}: {} {:?}",
                            d.ep().unwrap_or("?"),
                            hw.vendor().unwrap_or("?"),
                            hw.ty()
                        )
                    })
                    .collect();
                rt.library = Provider::ALL
                    .into_iter()
                    .filter(|&p| provider_available(p))
                    .collect();
                tracing::info!(library = %path.display(), providers = ?rt.library, "ONNX Runtime loaded");
                rt.env = Some(env);
            }
            Err(e) => {
                tracing::error!("ONNX Runtime not loaded: {e}");
                rt.problem = Some(e);
            }
        }
        rt
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn status(&self) -> String {
        let mut problems: Vec<String> = self
            .problem
            .iter()
            .map(|p| format!("ONNX Runtime is not available: {p}"))
            .collect();
        problems.extend(self.plugin_problems.iter().cloned());
        if problems.is_empty() {
            "ok".into()
        } else {
            format!("degraded: {}", problems.join("; "))
        }
    }

    fn ready(&self) -> Result<(), RuntimeError> {
        match &self.problem {
            None => Ok(()),
            Some(p) => Err(RuntimeError::LibraryMissing(p.clone())),
        }
    }

    /// The most bytes of one request's tensor file npud maps or reads
    /// (at most 2^62, so that offsets below it never overflow).
    pub fn request_limit(&self) -> u64 {
        self.cfg.max_request_mb.saturating_mul(MIB).min(1 << 62)
    }

    pub fn budget(&self) -> u64 {
        self.cfg.memory_budget_mb * MIB
    }

    pub fn used(&self) -> u64 {
        self.models
            .lock()
            .expect("not poisoned")
            .values()
            .map(|m| m.footprint())
            .sum()
    }

    /// The provider a load gets: the first of `candidates` the library has,
    /// else CPU when fallback is allowed, said as such.
    /// Returns the provider and how it is reported.
    fn select(&self, requested: &str) -> Result<(Provider, String), RuntimeError> {
        let candidates: Vec<Provider> = if requested.is_empty() {
            self.cfg.providers.clone()
        } else {
            vec![requested
                .parse()
                .map_err(|e: crate::config::UnknownProvider| {
                    RuntimeError::InvalidInput(e.to_string())
                })?]
        };
        if let Some(&c) = candidates.iter().find(|c| self.library.contains(c)) {
            return Ok((c, c.to_string()));
        }
        let wanted = candidates.first().copied().unwrap_or(Provider::Cpu);
        if self.cfg.allow_cpu_fallback {
            return Ok((Provider::Cpu, format!("cpu (fallback from {wanted})")));
        }
        Err(RuntimeError::ProviderUnavailable(format!(
            "execution provider {wanted} is not available on this device (ONNX Runtime offers: {}); CPU fallback is not allowed",
            self.library_names().join(", ")
        )))
    }

    fn library_names(&self) -> Vec<String> {
        self.library.iter().map(|p| p.to_string()).collect()
    }

    pub fn providers(&self) -> Providers {
        Providers {
            library: self.library_names(),
            preferred: self.cfg.providers.iter().map(|p| p.to_string()).collect(),
            plugins: self.plugins.clone(),
            devices: self.devices.clone(),
            selected: match (&self.problem, self.select("")) {
                (Some(_), _) => "none (ONNX Runtime not loaded)".into(),
                (None, Ok((_, s))) => s,
                (None, Err(e)) => format!("none ({e})"),
            },
            allow_cpu_fallback: self.cfg.allow_cpu_fallback,
        }
    }

    pub fn get(&self, name: &str) -> Option<Arc<Loaded>> {
        self.models.lock().expect("not poisoned").get(name).cloned()
    }

    pub fn loaded(&self) -> Vec<LoadedModel> {
        let mut v: Vec<LoadedModel> = self
            .models
            .lock()
            .expect("not poisoned")
            .values()
            .map(|m| m.view())
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Loads a model (blocking: call from a blocking thread). A model already
    /// loaded on the same provider is returned as it is.
    pub fn load(&self, record: ModelRecord, requested: &str) -> Result<Arc<Loaded>, RuntimeError> {
        self.ready()?;
        let (short, provider) = self.select(requested)?;
        let _one_load = self.loads.lock().expect("not poisoned");
        if let Some(m) = self.get(&record.name) {
            if m.record.version == record.version
                && (requested.is_empty() || m.provider == provider)
            {
                return Ok(m);
            }
            self.unload(&record.name)?;
        }
        let corrupt = |detail: String| RuntimeError::Corrupt {
            name: record.name.clone(),
            detail,
        };
        let entry = std::path::Path::new(&record.path);
        let mut llm = match crate::llm::is_llm(entry) {
            true => Some(
                crate::llm::Llm::open(entry.parent().expect("a file in a folder"))
                    .map_err(|e| corrupt(e.to_string()))?,
            ),
            false => None,
        };
        let kv_bytes = llm.as_ref().map_or(0, |l| {
            l.kv_bytes(self.cfg.max_sequences, self.context_for(l, None))
        });
        self.make_room(&record, kv_bytes)?;
        let decoder = match &llm {
            Some(l) => l.decoder().display().to_string(),
            None => record.path.clone(),
        };
        let env = self.env.as_ref().expect("ready");
        let session = build_session(env, self.threads, self.cfg.intra_spin, short, &decoder)
            .map_err(|e| match e {
                SessionError::Provider(e) => RuntimeError::ProviderUnavailable(format!(
                    "execution provider {short} failed to register: {e}"
                )),
                SessionError::Options(e) => RuntimeError::Inference(e),
                SessionError::Model(e) => corrupt(e),
            })?;
        let inputs: Vec<TensorSpec> = session
            .inputs()
            .iter()
            .map(|o| tensor::spec(o.name(), o.dtype()))
            .collect();
        let outputs: Vec<TensorSpec> = session
            .outputs()
            .iter()
            .map(|o| tensor::spec(o.name(), o.dtype()))
            .collect();
        if let Some(l) = &mut llm {
            check_decoder(&l.shape, &inputs, &outputs).map_err(|e| corrupt(e.to_string()))?;
            use crate::llm::config::LOGITS_TO_KEEP;
            l.shape.logits_to_keep = session
                .overridable_initializers()
                .iter()
                .any(|i| {
                    // A scalar i64, as npud feeds it; anything else is
                    // left at its default (every position's logits).
                    i.name() == LOGITS_TO_KEEP
                        && matches!(
                            i.dtype(),
                            ort::value::ValueType::Tensor {
                                ty: ort::value::TensorElementType::Int64,
                                shape,
                                ..
                            } if shape.is_empty()
                        )
                })
                .then(|| LOGITS_TO_KEEP.to_string());
        }
        let batched = llm
            .as_ref()
            .filter(|l| l.shape.share_buffer)
            .map(|l| self.context_for(l, None));
        let rows = self.cfg.max_sequences;
        let loaded = Arc::new_cyclic(|model| Loaded {
            record,
            provider,
            session: Mutex::new(session),
            turn: tokio::sync::Mutex::new(()),
            last_used: Mutex::new(Instant::now()),
            busy: AtomicUsize::new(0),
            inputs,
            outputs,
            llm,
            kv_bytes,
            sequences: Arc::new(tokio::sync::Semaphore::new(self.cfg.max_sequences.max(1))),
            waiting: AtomicUsize::new(0),
            kv_use: KvUse::default(),
            batcher: batched
                .map(|capacity| crate::llm::batch::Batcher::start(model.clone(), rows, capacity)),
            _freed: MarkFreed(self.freed.clone()),
        });
        tracing::info!(model = %loaded.record.name, provider = %loaded.provider, "loaded");
        self.models
            .lock()
            .expect("not poisoned")
            .insert(loaded.record.name.clone(), loaded.clone());
        Ok(loaded)
    }

    /// The context a request on `llm` gets: what it asks for or
    /// `default_context`, at most the model's context length.
    pub fn context_for(&self, llm: &crate::llm::Llm, asked: Option<u32>) -> usize {
        (asked.unwrap_or(self.cfg.default_context).max(1) as usize).min(llm.shape.context_length)
    }

    /// Unloads least recently used idle models until `record` fits with
    /// `extra` bytes (an LLM's KV cache) beside its weights.
    fn make_room(&self, record: &ModelRecord, extra: u64) -> Result<(), RuntimeError> {
        let budget = self.budget();
        let needed = record.memory_bytes.saturating_add(extra);
        let mut models = self.models.lock().expect("not poisoned");
        let held = held(&models);
        match crate::budget::make_room(&held, &record.name, needed, budget) {
            Ok(victims) => {
                for name in victims {
                    tracing::info!(model = %name, "unloaded to make room for {}", record.name);
                    models.remove(&name);
                }
                Ok(())
            }
            Err(no) => Err(RuntimeError::OverBudget {
                name: record.name.clone(),
                needed: needed.div_ceil(MIB),
                free: no.free / MIB,
                budget: budget / MIB,
            }),
        }
    }

    pub fn unload(&self, name: &str) -> Result<(), RuntimeError> {
        self.models
            .lock()
            .expect("not poisoned")
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| RuntimeError::NotLoaded(name.to_string()))
    }

    /// Unloads models idle longer than the keep-alive; returns their names.
    pub fn reap_idle(&self) -> Vec<String> {
        let keep = self.cfg.keep_alive_secs * 1000;
        let mut models = self.models.lock().expect("not poisoned");
        let idle = crate::budget::idle_past(&held(&models), keep);
        for n in &idle {
            models.remove(n);
            tracing::info!(model = %n, "unloaded after keep-alive");
        }
        idle
    }

    /// Gives the C heap's free pages back to the system once a model's
    /// freed memory has waited [`RELEASE_AFTER`] ([`Freed`]), at a moment
    /// when no load is under way and no model runs: the trim holds the
    /// heap's lock while it works, and pages it gives back that a running
    /// request takes again would be faulted in anew. Pages that loaded
    /// models hold stay as they are.
    pub fn release_freed(&self) {
        let Ok(_no_load) = self.loads.try_lock() else {
            return;
        };
        let models = self.models.lock().expect("not poisoned");
        if models.values().any(|m| m.is_busy()) || !self.freed.take_due(Instant::now()) {
            return;
        }
        drop(models);
        #[cfg(target_env = "gnu")]
        #[allow(unsafe_code)]
        // SAFETY: malloc_trim takes no pointer and has no precondition; it
        // only returns the allocator's own free pages to the system.
        unsafe {
            nix::libc::malloc_trim(0);
        }
    }
}

/// The loaded models as the budget's decisions see them.
fn held(models: &HashMap<String, Arc<Loaded>>) -> Vec<crate::budget::Held> {
    models
        .values()
        .map(|m| crate::budget::Held {
            name: m.record.name.clone(),
            bytes: m.footprint(),
            busy: m.is_busy(),
            idle_ms: m.idle_ms(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_memory_goes_back_once_it_has_waited() {
        let freed = Freed::default();
        let t = Instant::now();
        assert!(!freed.take_due(t + RELEASE_AFTER), "nothing was freed");
        freed.mark(t);
        assert!(!freed.take_due(t + RELEASE_AFTER - Duration::from_millis(1)));
        assert!(freed.take_due(t + RELEASE_AFTER));
        assert!(!freed.take_due(t + 2 * RELEASE_AFTER), "given back once");
        // Memory freed again starts its own wait.
        freed.mark(t + RELEASE_AFTER);
        assert!(!freed.take_due(t + RELEASE_AFTER + Duration::from_secs(1)));
        assert!(freed.take_due(t + 2 * RELEASE_AFTER));
    }
}
