//! The core room: ONNX Runtime, execution-provider choice, the loaded
//! models within the memory budget, and running them.

use crate::config::Config;
use crate::error::RuntimeError;
use crate::tensor::{self, Slot};
use ort::ep::{self, ExecutionProvider};
use ort::session::Session;
use pocket_proto::runtime::{dtype_size, tensor_offset, LoadedModel, Providers, TensorSpec};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

const MIB: u64 = 1 << 20;

/// Execution providers by our short name: whether the library has them and
/// how to register them on a session.
fn provider_available(short: &str) -> bool {
    let r = match short {
        "cpu" => return true,
        "xnnpack" => ep::XNNPACK::is_available(),
        "qnn" => ep::QNN::is_available(),
        "acl" => ep::ACL::is_available(),
        "rknpu" => ep::RKNPU::is_available(),
        "nnapi" => ep::NNAPI::is_available(),
        _ => Ok(false),
    };
    r.unwrap_or(false)
}

const KNOWN: [&str; 6] = ["qnn", "acl", "rknpu", "nnapi", "xnnpack", "cpu"];

fn dispatch(short: &str) -> Option<ep::ExecutionProviderDispatch> {
    Some(match short {
        "xnnpack" => ep::XNNPACK::default().build(),
        "qnn" => ep::QNN::default().build(),
        "acl" => ep::ACL::default().build(),
        "rknpu" => ep::RKNPU::default().build(),
        "nnapi" => ep::NNAPI::default().build(),
        _ => return None,
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
    /// The names of the inputs' and outputs' dynamic dimensions.
    input_symbols: Vec<Vec<String>>,
    output_symbols: Vec<Vec<String>>,
    /// Whether ONNX Runtime writes this model's outputs into a tensor file
    /// itself; cleared when it refused the shapes worked out for it.
    in_place: AtomicBool,
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
    /// Counts the model as in use until the guard is dropped.
    pub fn in_use(&self) -> InUse<'_> {
        self.busy.fetch_add(1, Ordering::SeqCst);
        InUse(&self.busy)
    }

    fn idle_ms(&self) -> u64 {
        self.last_used
            .lock()
            .expect("not poisoned")
            .elapsed()
            .as_millis() as u64
    }

    pub fn view(&self) -> LoadedModel {
        LoadedModel {
            name: self.record.name.clone(),
            version: self.record.version.clone(),
            provider: self.provider.clone(),
            memory_bytes: self.record.memory_bytes,
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
        let latency = self.run_with(&views, None, |name, dtype, shape, bytes| {
            let bytes = bytes.unwrap_or_default().to_vec();
            out.push((name.to_string(), dtype.to_string(), shape, bytes));
            Ok(())
        })?;
        Ok((out, latency))
    }

    /// Slots from `start` on, one for each output whose shape follows from
    /// the inputs' shapes (its dimensions fixed, or named like a dimension
    /// of an input) and that ends within `limit`, for ONNX Runtime to write
    /// into; none when it refused that for this model before.
    pub fn plan(&self, inputs: &[(&str, &[i64])], start: u64, limit: u64) -> Vec<Slot> {
        if !self.in_place.load(Ordering::Relaxed) {
            return Vec::new();
        }
        let named = |symbol: &str| {
            self.inputs
                .iter()
                .zip(&self.input_symbols)
                .find_map(|(spec, symbols)| {
                    let k = symbols.iter().position(|s| s == symbol)?;
                    let (_, shape) = inputs.iter().find(|(n, _)| *n == spec.name)?;
                    shape.get(k).copied()
                })
        };
        let mut slots = Vec::new();
        let mut offset = start;
        for (spec, symbols) in self.outputs.iter().zip(&self.output_symbols) {
            let shape: Option<Vec<i64>> = (spec.shape.iter().enumerate())
                .map(|(d, &dim)| match dim {
                    0.. => Some(dim),
                    _ => named(symbols.get(d).filter(|s| !s.is_empty())?),
                })
                .collect();
            let len = shape
                .as_ref()
                .zip(dtype_size(&spec.dtype))
                .and_then(|(s, size)| {
                    s.iter()
                        .try_fold(size as u64, |n, &d| n.checked_mul(u64::try_from(d).ok()?))
                });
            let end = len
                .filter(|len| *len > 0)
                .and_then(|len| offset.checked_add(len))
                .filter(|end| *end <= limit);
            if let (Some(shape), Some(end)) = (shape, end) {
                slots.push(Slot {
                    name: spec.name.clone(),
                    dtype: spec.dtype.clone(),
                    shape,
                    offset,
                    len: end - offset,
                });
                offset = tensor_offset(end);
            }
        }
        slots
    }

    /// Runs the model on inputs that borrow their bytes (ONNX Runtime reads
    /// them in place where they are aligned). With `placed`, ONNX Runtime
    /// writes the slots' outputs into the mapping itself. Hands each
    /// output's `(name, dtype, shape, bytes)` to `output` while ONNX
    /// Runtime still holds it, so the caller copies it once, to where it
    /// goes; the bytes are `None` for an output already in its slot.
    /// Returns the run's latency in ms.
    pub fn run_with(
        &self,
        inputs: &[Input<'_>],
        placed: Option<(&pocket_proto::shm::Mapping, &[Slot])>,
        mut output: impl FnMut(&str, &str, Vec<i64>, Option<&[u8]>) -> Result<(), RuntimeError>,
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
            let placed = placed.filter(|(_, slots)| !slots.is_empty());
            let options = placed
                .map(|(map, slots)| tensor::in_place(map, slots))
                .transpose()?;
            if let (Some(options), Some((_, slots))) = (&options, placed) {
                let refused = match session.run_with_options(first, options) {
                    Ok(outputs) => return emit(outputs, slots, start, &mut output),
                    Err(e) => e,
                };
                // ONNX Runtime would not write these outputs in place (their
                // shapes were worked out wrongly): run again the usual way,
                // and for good if that works.
                let outputs = session.run(values()?).map_err(failed)?;
                self.in_place.store(false, Ordering::Relaxed);
                tracing::info!(model = %self.record.name, "outputs are copied from now on: {refused}");
                return emit(outputs, &[], start, &mut output);
            }
            let outputs = session.run(first).map_err(failed)?;
            emit(outputs, &[], start, &mut output)
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
    slots: &[Slot],
    start: Instant,
    output: &mut impl FnMut(&str, &str, Vec<i64>, Option<&[u8]>) -> Result<(), RuntimeError>,
) -> Result<f64, RuntimeError> {
    let latency = start.elapsed().as_secs_f64() * 1000.0;
    for (name, value) in outputs.iter() {
        if let Some(slot) = slots.iter().find(|s| s.name == name) {
            output(name, &slot.dtype, slot.shape.clone(), None)?;
            continue;
        }
        let (dtype, shape, bytes) = tensor::output_bytes(&value)?;
        output(name, &dtype, shape, Some(&bytes))?;
    }
    Ok(latency)
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
    provider: &str,
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
        // Spinning threads burn the power budget while they wait.
        .with_config_entry("session.intra_op.allow_spinning", "0")
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
    library: Vec<String>,
    plugins: Vec<(String, String)>,
    /// Plugin EP libraries that could not be registered, and why.
    plugin_problems: Vec<String>,
    devices: Vec<String>,
    models: Mutex<HashMap<String, Arc<Loaded>>>,
    threads: usize,
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
                rt.library = KNOWN
                    .iter()
                    .filter(|p| provider_available(p))
                    .map(|p| p.to_string())
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
            .map(|m| m.record.memory_bytes)
            .sum()
    }

    /// The provider a load gets: the first of `candidates` the library has,
    /// else CPU when fallback is allowed, said as such.
    fn select(&self, requested: &str) -> Result<String, RuntimeError> {
        let candidates: Vec<String> = if requested.is_empty() {
            self.cfg.providers.clone()
        } else {
            vec![requested.to_string()]
        };
        if let Some(c) = candidates.iter().find(|c| self.library.contains(c)) {
            return Ok(c.clone());
        }
        let wanted = candidates.first().cloned().unwrap_or_else(|| "cpu".into());
        if self.cfg.allow_cpu_fallback {
            return Ok(format!("cpu (fallback from {wanted})"));
        }
        Err(RuntimeError::ProviderUnavailable(format!(
            "execution provider {wanted} is not available on this device (ONNX Runtime offers: {}); CPU fallback is not allowed",
            self.library.join(", ")
        )))
    }

    pub fn providers(&self) -> Providers {
        Providers {
            library: self.library.clone(),
            preferred: self.cfg.providers.clone(),
            plugins: self.plugins.clone(),
            devices: self.devices.clone(),
            selected: match (&self.problem, self.select("")) {
                (Some(_), _) => "none (ONNX Runtime not loaded)".into(),
                (None, Ok(s)) => s,
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
        let provider = self.select(requested)?;
        if let Some(m) = self.get(&record.name) {
            if m.record.version == record.version
                && (requested.is_empty() || m.provider == provider)
            {
                return Ok(m);
            }
            self.unload(&record.name)?;
        }
        self.make_room(&record)?;
        let short = provider.split(' ').next().unwrap_or("cpu");
        let corrupt = |detail: String| RuntimeError::Corrupt {
            name: record.name.clone(),
            detail,
        };
        let env = self.env.as_ref().expect("ready");
        let session =
            build_session(env, self.threads, short, &record.path).map_err(|e| match e {
                SessionError::Provider(e) => RuntimeError::ProviderUnavailable(format!(
                    "execution provider {short} failed to register: {e}"
                )),
                SessionError::Options(e) => RuntimeError::Inference(e),
                SessionError::Model(e) => corrupt(e),
            })?;
        let inputs = session
            .inputs()
            .iter()
            .map(|o| tensor::spec(o.name(), o.dtype()))
            .collect();
        let outputs = session
            .outputs()
            .iter()
            .map(|o| tensor::spec(o.name(), o.dtype()))
            .collect();
        let input_symbols = (session.inputs().iter())
            .map(|o| tensor::symbols(o.dtype()))
            .collect();
        let output_symbols = (session.outputs().iter())
            .map(|o| tensor::symbols(o.dtype()))
            .collect();
        let loaded = Arc::new(Loaded {
            record,
            provider,
            session: Mutex::new(session),
            turn: tokio::sync::Mutex::new(()),
            last_used: Mutex::new(Instant::now()),
            busy: AtomicUsize::new(0),
            inputs,
            outputs,
            input_symbols,
            output_symbols,
            in_place: AtomicBool::new(true),
        });
        tracing::info!(model = %loaded.record.name, provider = %loaded.provider, "loaded");
        self.models
            .lock()
            .expect("not poisoned")
            .insert(loaded.record.name.clone(), loaded.clone());
        Ok(loaded)
    }

    /// Unloads least recently used idle models until `record` fits.
    fn make_room(&self, record: &ModelRecord) -> Result<(), RuntimeError> {
        let budget = self.budget();
        let over = |free: u64| RuntimeError::OverBudget {
            name: record.name.clone(),
            needed: record.memory_bytes.div_ceil(MIB),
            free: free / MIB,
            budget: budget / MIB,
        };
        if record.memory_bytes > budget {
            return Err(over(budget.saturating_sub(self.used())));
        }
        let mut models = self.models.lock().expect("not poisoned");
        loop {
            let used: u64 = models.values().map(|m| m.record.memory_bytes).sum();
            if used + record.memory_bytes <= budget {
                return Ok(());
            }
            let victim = models
                .values()
                .filter(|m| m.busy.load(Ordering::SeqCst) == 0 && m.record.name != record.name)
                .max_by_key(|m| m.idle_ms())
                .map(|m| m.record.name.clone());
            match victim {
                Some(name) => {
                    tracing::info!(model = %name, "unloaded to make room for {}", record.name);
                    models.remove(&name);
                }
                None => return Err(over(budget.saturating_sub(used))),
            }
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
        let idle: Vec<String> = models
            .values()
            .filter(|m| m.busy.load(Ordering::SeqCst) == 0 && m.idle_ms() >= keep)
            .map(|m| m.record.name.clone())
            .collect();
        for n in &idle {
            models.remove(n);
            tracing::info!(model = %n, "unloaded after keep-alive");
        }
        idle
    }
}
