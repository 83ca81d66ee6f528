//! The D-Bus surface: `org.pocketos.Runtime1`.

use crate::error::RuntimeError;
use crate::llm::generate;
use crate::llm::sample as generate_params;
use crate::peers::{self, PerformanceHold};
use crate::runtime::{Loaded, Runtime};
use pocket_proto::generate::{GenerateRequest, Message};
use pocket_proto::runtime::{LoadedModel, Providers, Tensor, TensorRef};
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

const MIB: u64 = 1 << 20;

#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.pocketos.Error")]
pub enum Error {
    #[zbus(error)]
    ZBus(zbus::Error),
    RuntimeUnavailable(String),
    ProviderUnavailable(String),
    NotFound(String),
    Corrupt(String),
    InsufficientMemory(String),
    InvalidArgument(String),
    Inference(String),
    PeerUnavailable(String),
    ContextTooLong(String),
    Busy(String),
}

impl From<RuntimeError> for Error {
    fn from(e: RuntimeError) -> Self {
        let msg = e.to_string();
        match e.name() {
            "RuntimeUnavailable" => Error::RuntimeUnavailable(msg),
            "ProviderUnavailable" => Error::ProviderUnavailable(msg),
            "NotFound" => Error::NotFound(msg),
            "Corrupt" => Error::Corrupt(msg),
            "InsufficientMemory" => Error::InsufficientMemory(msg),
            "InvalidArgument" => Error::InvalidArgument(msg),
            "PeerUnavailable" => Error::PeerUnavailable(msg),
            "ContextTooLong" => Error::ContextTooLong(msg),
            "Busy" => Error::Busy(msg),
            _ => Error::Inference(msg),
        }
    }
}

/// The runtime's bus surface. Peers (modeld, powerd) are reached on the
/// same bus.
pub struct RuntimeIface {
    rt: Arc<Runtime>,
    hold: Arc<PerformanceHold>,
    meter: Arc<crate::peers::EnergyMeter>,
    bus: Arc<OnceLock<zbus::Connection>>,
    /// Sessions that may run on a runtime worker at once (workers - 1).
    inline: tokio::sync::Semaphore,
    /// MiB of `InferFd` inputs copied out of callers' files and held at
    /// once, for all callers together: `max_request_mb`. A request waits
    /// for its share, in order of arrival, so no caller makes npud hold
    /// more than that however many requests it sends.
    input_mib: tokio::sync::Semaphore,
    input_mib_total: usize,
}

impl RuntimeIface {
    pub fn new(
        rt: Arc<Runtime>,
        hold: Arc<PerformanceHold>,
        meter: Arc<crate::peers::EnergyMeter>,
    ) -> Self {
        let input_mib = rt.request_limit().div_ceil(MIB).clamp(1, u32::MAX as u64) as usize;
        RuntimeIface {
            rt,
            hold,
            meter,
            bus: Arc::default(),
            inline: tokio::sync::Semaphore::new(
                tokio::runtime::Handle::try_current()
                    .map(|h| h.metrics().num_workers())
                    .unwrap_or(1)
                    .saturating_sub(1),
            ),
            input_mib: tokio::sync::Semaphore::new(input_mib),
            input_mib_total: input_mib,
        }
    }

    /// Where the system-bus connection goes once it is built.
    pub fn bus_slot(&self) -> Arc<OnceLock<zbus::Connection>> {
        self.bus.clone()
    }

    fn bus(&self) -> Result<&zbus::Connection, Error> {
        self.bus
            .get()
            .ok_or_else(|| Error::PeerUnavailable("npud is still joining the bus".into()))
    }

    async fn ensure_loaded(&self, name: &str, provider: &str) -> Result<Arc<Loaded>, Error> {
        if provider.is_empty() {
            if let Some(m) = self.rt.get(name) {
                return Ok(m);
            }
        }
        let record = peers::model_record(self.bus()?, name).await?;
        let rt = self.rt.clone();
        let provider = provider.to_string();
        Ok(
            tokio::task::spawn_blocking(move || rt.load(record, &provider))
                .await
                .map_err(|e| Error::Inference(e.to_string()))??,
        )
    }

    #[allow(clippy::type_complexity)]
    async fn run(
        &self,
        name: &str,
        inputs: Vec<(String, String, Vec<i64>, Vec<u8>)>,
    ) -> Result<(Vec<(String, String, Vec<i64>, Vec<u8>)>, String, f64), Error> {
        let model = self.ensure_loaded(name, "").await?;
        let ((outputs, latency), provider) = self.run_model(model, |m| m.run(inputs)).await?;
        Ok((outputs, provider, latency))
    }

    /// Runs `f` on a loaded model when its turn comes; returns what `f`
    /// returned and the provider the model runs on.
    async fn run_model<T>(
        &self,
        model: Arc<Loaded>,
        f: impl FnOnce(&Loaded) -> Result<T, crate::error::RuntimeError>,
    ) -> Result<(T, String), Error> {
        self.run_model_holding(model, 0, f).await
    }

    /// [`Self::run_model`] for a request that copies `input_mib` MiB of
    /// inputs: its share of `max_request_mb` is taken once its turn on the
    /// model has come, so a queue of large requests for one model never
    /// holds up the requests for another.
    async fn run_model_holding<T>(
        &self,
        model: Arc<Loaded>,
        input_mib: u64,
        f: impl FnOnce(&Loaded) -> Result<T, crate::error::RuntimeError>,
    ) -> Result<(T, String), Error> {
        self.hold.touch(self.bus()?).await;
        // Counted as in use while it waits, so it is not evicted between
        // the turns of the requests before it.
        let _in_use = model.in_use();
        let _turn = model.turn.lock().await;
        let _share = match input_mib {
            0 => None,
            n => Some(
                self.input_mib
                    .acquire_many(n.min(self.input_mib_total as u64) as u32)
                    .await
                    .map_err(|e| Error::Inference(e.to_string()))?,
            ),
        };
        // Run on this worker thread: handing the session to another thread
        // (spawn_blocking, or block_in_place's hand-off of the worker) and
        // back costs more than the bus itself. One worker at a time may do
        // so, so another always reads the bus; beyond that, block_in_place.
        let result = match self.inline.try_acquire() {
            Ok(_permit) => f(&model)?,
            Err(_) => tokio::task::block_in_place(|| f(&model))?,
        };
        Ok((result, model.provider.clone()))
    }
}

#[zbus::interface(name = "org.pocketos.Runtime1")]
impl RuntimeIface {
    async fn providers(&self) -> Providers {
        self.rt.providers()
    }

    async fn loaded(&self) -> Vec<LoadedModel> {
        self.rt.loaded()
    }

    async fn load(&self, name: &str, provider: &str) -> Result<String, Error> {
        Ok(self.ensure_loaded(name, provider).await?.provider.clone())
    }

    async fn unload(&self, name: &str) -> Result<(), Error> {
        Ok(self.rt.unload(name)?)
    }

    pub(crate) async fn infer(
        &self,
        name: &str,
        inputs: HashMap<String, Tensor>,
    ) -> Result<(HashMap<String, Tensor>, String, f64), Error> {
        let inputs = inputs
            .into_iter()
            .map(|(n, t)| (n, t.dtype, t.shape, t.data))
            .collect();
        let (outputs, provider, latency) = self.run(name, inputs).await?;
        let outputs = outputs
            .into_iter()
            .map(|(n, dtype, shape, data)| (n, Tensor { dtype, shape, data }))
            .collect();
        Ok((outputs, provider, latency))
    }

    pub(crate) async fn infer_fd(
        &self,
        name: &str,
        inputs: HashMap<String, TensorRef>,
        data: zbus::zvariant::OwnedFd,
    ) -> Result<
        (
            HashMap<String, TensorRef>,
            zbus::zvariant::OwnedFd,
            String,
            f64,
        ),
        Error,
    > {
        let file = std::fs::File::from(std::os::fd::OwnedFd::from(data));
        // A memfd (or another shared-memory file) only: reading it cannot
        // block, as a pipe, a socket or a file on a FUSE mount the caller
        // serves could, while the model's turn is held.
        if nix::fcntl::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            nix::fcntl::FcntlArg::F_GET_SEALS,
        )
        .is_err()
        {
            return Err(Error::InvalidArgument(
                "the tensor file must be a memfd (memfd_create)".into(),
            ));
        }
        let size = file
            .metadata()
            .map_err(|e| Error::InvalidArgument(format!("input file: {e}")))?
            .len();
        // Check every input against the model before a byte is read, so a
        // request cannot make npud allocate more than the model takes.
        let model = self.ensure_loaded(name, "").await?;
        let total = crate::tensor::check_requests(
            name,
            &model.inputs,
            &inputs,
            size,
            self.rt.request_limit(),
        )?;
        // The caller can write its file at any time: its inputs are copied
        // out, once the model's turn has come, and ONNX Runtime reads only
        // the copies. Nothing of the file is mapped, and it never grows.
        let share = total.div_ceil(MIB).max(1);
        let ((outputs, latency), provider) = self
            .run_model_holding(model, share, |m| {
                let mut read = Vec::with_capacity(inputs.len());
                for (n, r) in inputs {
                    // At most max_request_mb in all (checked above).
                    let mut buf = vec![0u8; r.len as usize];
                    file.read_exact_at(&mut buf, r.offset).map_err(|e| {
                        crate::error::RuntimeError::InvalidInput(format!("input {n:?}: {e}"))
                    })?;
                    read.push((n, r.dtype, r.shape, buf));
                }
                m.run(read)
            })
            .await?;
        let (refs, out) = outputs_file(outputs)?;
        Ok((refs, out.into(), provider, latency))
    }

    /// Generates text with an LLM; see DESIGN §8. Errors the request can
    /// be refused with come before the stream; after it starts, the last
    /// event says how it ended.
    async fn generate(&self, model: &str, request: &str) -> Result<zbus::zvariant::OwnedFd, Error> {
        let arrived = std::time::Instant::now();
        let (req, params) = read_request(request)?;
        let loaded = self.ensure_loaded(model, "").await?;
        let Some(llm) = &loaded.llm else {
            return Err(Error::InvalidArgument(format!(
                "model {model:?} is not a language model"
            )));
        };
        let (prompt, constraint) = prompt(llm, &req)?;
        let context = self.rt.context_for(llm, req.num_ctx);
        if let Some(n) = req.num_ctx {
            if n as usize > llm.shape.context_length {
                return Err(Error::InvalidArgument(format!(
                    "num_ctx {n} is over the model's context length of {}",
                    llm.shape.context_length
                )));
            }
            // KV beyond what the load counted must fit in what is free now.
            let counted = self.rt.context_for(llm, None);
            let extra = llm.kv_bytes(1, context.saturating_sub(counted));
            let free = self.rt.budget().saturating_sub(self.rt.used());
            if extra > free {
                return Err(Error::InsufficientMemory(format!(
                    "num_ctx {n} needs {} MiB more KV cache than the {counted} tokens counted at load, but {} MiB of the budget is free",
                    extra.div_ceil(MIB),
                    free / MIB
                )));
            }
        }
        if prompt.len() >= context {
            return Err(crate::error::RuntimeError::ContextTooLong {
                prompt: prompt.len(),
                limit: context,
            }
            .into());
        }
        // More new tokens than the whole context can hold is a mistake,
        // not a wish: say so instead of stopping short of it.
        if let Some(n) = req.max_tokens.filter(|&n| n as usize > context) {
            return Err(Error::InvalidArgument(format!(
                "max_tokens {n} is over the context of {context} tokens"
            )));
        }
        let cfg = self.rt.config();
        let room = cfg.max_sequences.max(1) + cfg.max_queue;
        if loaded.waiting.fetch_add(1, Ordering::SeqCst) >= room {
            loaded.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(Error::Busy(format!(
                "model {model:?} has {} sequences running and {} requests waiting",
                cfg.max_sequences, cfg.max_queue
            )));
        }
        let job = generate::Job {
            max_tokens: req.max_tokens.map_or(usize::MAX, |n| n as usize),
            prompt,
            params,
            seed: req.seed.unwrap_or_else(|| {
                use std::hash::{BuildHasher, Hasher};
                std::collections::hash_map::RandomState::new()
                    .build_hasher()
                    .finish()
            }),
            stop: req.stop,
            context,
            chunk: cfg.prefill_chunk,
            arrived,
            energy: crate::peers::EnergySpan::start(&self.meter),
            constraint,
        };
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| Error::Inference(format!("pipe: {e}")))?;
        let events =
            generate::Events::new(write).map_err(|e| Error::Inference(format!("pipe: {e}")))?;
        let bus = self.bus()?.clone();
        tokio::spawn(run_job(
            loaded,
            job,
            events,
            self.hold.clone(),
            self.meter.clone(),
            bus,
        ));
        Ok(read.into())
    }

    #[zbus(property)]
    async fn status(&self) -> String {
        self.rt.status()
    }

    #[zbus(property)]
    fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").to_string()
    }

    #[zbus(property)]
    fn memory_budget(&self) -> u64 {
        self.rt.budget()
    }

    #[zbus(property)]
    fn memory_used(&self) -> u64 {
        self.rt.used()
    }

    /// Whether the `performance` profile is held on powerd now.
    #[zbus(property)]
    async fn holding_performance(&self) -> bool {
        self.hold.holding().await
    }
}

/// A `Generate` request's JSON and sampling, checked before any model is
/// loaded for it.
pub fn read_request(request: &str) -> Result<(GenerateRequest, generate_params::Params), Error> {
    let req: GenerateRequest = serde_json::from_str(request)
        .map_err(|e| Error::InvalidArgument(format!("request: {e}")))?;
    let params = sampling(&req)?;
    Ok((req, params))
}

/// The prompt `req` makes on `llm` (its messages rendered by the model's
/// chat template, or its raw text), tokenized, and the constraint its
/// `response_format` asks for.
pub fn prompt(
    llm: &crate::llm::Llm,
    req: &GenerateRequest,
) -> Result<(Vec<u32>, Option<crate::llm::structured::Constraint>), Error> {
    let text = match (&req.messages, &req.prompt) {
        (Some(m), None) if !m.is_empty() && !req.raw => llm.text.render(m),
        (None, Some(p)) if req.raw => Ok(p.clone()),
        (None, Some(p)) => llm.text.render(&[Message {
            role: "user".into(),
            content: p.clone(),
        }]),
        _ => {
            return Err(Error::InvalidArgument(
                "a request has either non-empty messages or a prompt (raw only with a prompt)"
                    .into(),
            ))
        }
    }
    .map_err(|e| Error::InvalidArgument(e.to_string()))?;
    let constraint = match &req.response_format {
        Some(f) => Some(
            llm.guidance
                .constraint(llm, f)
                .map_err(|e| Error::InvalidArgument(e.to_string()))?,
        ),
        None => None,
    };
    let prompt = llm
        .text
        .encode(&text)
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
    if prompt.is_empty() {
        return Err(Error::InvalidArgument(
            "the prompt has no tokens: there is nothing to continue".into(),
        ));
    }
    Ok((prompt, constraint))
}

/// The sampling a request asks for, with defaults as Ollama's, checked.
fn sampling(req: &GenerateRequest) -> Result<generate_params::Params, Error> {
    let p = generate_params::Params {
        temperature: req.temperature.unwrap_or(0.8),
        top_k: req.top_k.unwrap_or(40) as usize,
        top_p: req.top_p.unwrap_or(0.9),
        min_p: req.min_p.unwrap_or(0.0),
        repetition_penalty: req.repetition_penalty.unwrap_or(1.0),
        presence_penalty: req.presence_penalty.unwrap_or(0.0),
        frequency_penalty: req.frequency_penalty.unwrap_or(0.0),
    };
    let check = |name: &str, v: f32, ok: bool| match v.is_finite() && ok {
        true => Ok(()),
        false => Err(Error::InvalidArgument(format!(
            "{name} {v} is out of range"
        ))),
    };
    check(
        "temperature",
        p.temperature,
        (0.0..=100.0).contains(&p.temperature),
    )?;
    check("top_p", p.top_p, p.top_p > 0.0 && p.top_p <= 1.0)?;
    check("min_p", p.min_p, (0.0..=1.0).contains(&p.min_p))?;
    check(
        "repetition_penalty",
        p.repetition_penalty,
        p.repetition_penalty > 0.0 && p.repetition_penalty <= 100.0,
    )?;
    check(
        "presence_penalty",
        p.presence_penalty,
        (-100.0..=100.0).contains(&p.presence_penalty),
    )?;
    check(
        "frequency_penalty",
        p.frequency_penalty,
        (-100.0..=100.0).contains(&p.frequency_penalty),
    )?;
    if req.stop.len() > 16 || req.stop.iter().any(|s| s.len() > 256) {
        return Err(Error::InvalidArgument(
            "at most 16 stop strings of at most 256 bytes each".into(),
        ));
    }
    Ok(p)
}

/// Runs a generation, holding the performance profile while it runs: in
/// the model's batching engine when it has one (a shared-buffer model),
/// else alone on a blocking thread once one of the model's sequences is
/// free.
async fn run_job(
    model: Arc<Loaded>,
    job: generate::Job,
    events: generate::Events,
    hold: Arc<PerformanceHold>,
    meter: Arc<crate::peers::EnergyMeter>,
    bus: zbus::Connection,
) {
    let _waiting = Waiting(model.clone());
    meter.running.fetch_add(1, Ordering::SeqCst);
    let _running = Running(meter);
    let in_use = model.clone();
    let _in_use = in_use.in_use();
    let (tx, mut done) = tokio::sync::oneshot::channel();
    let mut _sequence = None;
    match &model.batcher {
        Some(b) => {
            let work = crate::llm::batch::Work {
                job,
                events,
                done: tx,
            };
            if let Err(w) = b.submit(work) {
                let mut s = generate::Stream::new(w.job, w.events, &model.provider);
                s.fail("Inference", "the model's engine has stopped".into());
                s.finish();
                return;
            }
        }
        _ => {
            let Ok(permit) = model.sequences.clone().acquire_owned().await else {
                return;
            };
            _sequence = Some(permit);
            let m = model.clone();
            tokio::task::spawn_blocking(move || {
                let llm = m.llm.as_ref().expect("an LLM");
                let mut counted = m.kv_use.alone();
                let d = generate::run(llm, job, events, &m.provider, |seq, tokens| {
                    let r = m.with_session(|s| seq.forward(s, tokens));
                    counted.holds(seq.tokens.len() as u64);
                    r
                });
                drop(counted);
                let _ = tx.send(d);
            });
        }
    }
    hold.touch(&bus).await;
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            d = &mut done => {
                if let Ok(d) = d {
                    tracing::debug!(model = %model.record.name, reason = ?d.finish_reason,
                        tokens = d.usage.completion_tokens, "generation ended");
                }
                break;
            }
            _ = tick.tick() => hold.touch(&bus).await,
        }
    }
}

/// Counts a generation as running on the energy meter until dropped.
struct Running(Arc<crate::peers::EnergyMeter>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counts a request as waiting for or holding a sequence until dropped.
struct Waiting(Arc<Loaded>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A new memfd holding `outputs` one after another, sealed against any
/// change before the caller gets it; returns where each lies.
#[allow(clippy::type_complexity)]
fn outputs_file(
    outputs: Vec<(String, String, Vec<i64>, Vec<u8>)>,
) -> Result<(HashMap<String, TensorRef>, std::os::fd::OwnedFd), Error> {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    use std::os::fd::AsRawFd;
    let failed = |e: &dyn std::fmt::Display| Error::Inference(format!("outputs file: {e}"));
    let fd = memfd_create(
        c"npud-outputs",
        MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
    )
    .map_err(|e| failed(&e))?;
    let mut file = std::fs::File::from(fd);
    let mut refs = HashMap::new();
    let mut offset = 0u64;
    for (n, dtype, shape, bytes) in outputs {
        file.write_all(&bytes).map_err(|e| failed(&e))?;
        let len = bytes.len() as u64;
        refs.insert(
            n,
            TensorRef {
                dtype,
                shape,
                offset,
                len,
            },
        );
        offset += len;
    }
    let seals = SealFlag::F_SEAL_SHRINK
        | SealFlag::F_SEAL_GROW
        | SealFlag::F_SEAL_WRITE
        | SealFlag::F_SEAL_SEAL;
    fcntl(file.as_raw_fd(), FcntlArg::F_ADD_SEALS(seals)).map_err(|e| failed(&e))?;
    Ok((refs, file.into()))
}
