//! The D-Bus surface: `org.pocketos.Runtime1`.

use crate::error::RuntimeError;
use crate::peers::{self, PerformanceHold};
use crate::runtime::{Loaded, Runtime};
use pocket_proto::runtime::{LoadedModel, Providers, Tensor, TensorRef};
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::FileExt;
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
            _ => Error::Inference(msg),
        }
    }
}

/// The runtime's bus surface. Peers (modeld, powerd) are reached on the
/// same bus.
pub struct RuntimeIface {
    rt: Arc<Runtime>,
    hold: Arc<PerformanceHold>,
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
    pub fn new(rt: Arc<Runtime>, hold: Arc<PerformanceHold>) -> Self {
        let input_mib = rt.request_limit().div_ceil(MIB).clamp(1, u32::MAX as u64) as usize;
        RuntimeIface {
            rt,
            hold,
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
        for (n, r) in &inputs {
            let spec = model.inputs.iter().find(|s| &s.name == n).ok_or_else(|| {
                Error::InvalidArgument(format!("model {name:?} has no input {n:?}"))
            })?;
            crate::tensor::check(spec, &r.dtype, &r.shape, r.len as usize)?;
        }
        let needed = inputs
            .values()
            .map(|r| r.offset.saturating_add(r.len))
            .max()
            .unwrap_or(0);
        if needed > size {
            let (n, r) = (inputs.iter())
                .find(|(_, r)| r.offset.saturating_add(r.len) > size)
                .expect("one input ends past the file");
            return Err(Error::InvalidArgument(format!(
                "input {n:?}: bytes {}..+{} lie outside the file ({size} bytes)",
                r.offset, r.len
            )));
        }
        let limit = self.rt.request_limit();
        // Saturating: lengths near 2^64 (a sparse file can be that large)
        // must not wrap around to a small total.
        let total = inputs.values().fold(0u64, |t, r| t.saturating_add(r.len));
        if total > limit {
            return Err(Error::InvalidArgument(format!(
                "the inputs take {total} bytes, over npud's limit of {limit} (max_request_mb)"
            )));
        }
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
