//! The D-Bus surface: `org.pocketos.Runtime1`.

use crate::error::RuntimeError;
use crate::peers::{self, PerformanceHold};
use crate::runtime::{Loaded, Runtime};
use crate::tensor::Slot;
use pocket_proto::runtime::{tensor_offset, LoadedModel, Providers, Tensor, TensorRef};
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

/// Private channels (`OpenChannel`) open at once, at most.
pub const MAX_CHANNELS: usize = 64;

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
    /// Too many private channels are open.
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
            _ => Error::Inference(msg),
        }
    }
}

/// The runtime's bus surface. The same object serves the system bus and
/// every private channel; peers (modeld, powerd) are always reached on the
/// system bus.
#[derive(Clone)]
pub struct RuntimeIface {
    rt: Arc<Runtime>,
    hold: Arc<PerformanceHold>,
    bus: Arc<OnceLock<zbus::Connection>>,
    channels: Arc<AtomicUsize>,
    /// On a private channel: the user at its other end.
    peer_uid: Option<u32>,
    /// Sessions that may run on a runtime worker at once (workers - 1).
    inline: Arc<tokio::sync::Semaphore>,
    /// The last tensor file used through this object (or this channel).
    tensor_file: Arc<crate::shared::MapCache>,
    /// Serving a channel on the channel's own thread, which runs the
    /// model itself.
    dedicated: bool,
}

impl RuntimeIface {
    pub fn new(rt: Arc<Runtime>, hold: Arc<PerformanceHold>) -> Self {
        RuntimeIface {
            rt,
            hold,
            bus: Arc::default(),
            channels: Arc::default(),
            peer_uid: None,
            tensor_file: Arc::default(),
            dedicated: false,
            inline: Arc::new(tokio::sync::Semaphore::new(
                tokio::runtime::Handle::try_current()
                    .map(|h| h.metrics().num_workers())
                    .unwrap_or(1)
                    .saturating_sub(1),
            )),
        }
    }

    /// The same object for serving on npud's runtime (a channel's other
    /// calls).
    pub fn shared(&self) -> RuntimeIface {
        RuntimeIface {
            dedicated: false,
            ..self.clone()
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

    /// The user who called, on the bus or on a channel.
    async fn caller_uid(&self, header: &zbus::message::Header<'_>) -> Result<u32, Error> {
        if let Some(uid) = self.peer_uid {
            return Ok(uid);
        }
        let sender = header
            .sender()
            .ok_or_else(|| Error::InvalidArgument("a call without a sender".into()))?;
        zbus::fdo::DBusProxy::new(self.bus()?)
            .await?
            .get_connection_unix_user(sender.clone().into())
            .await
            .map_err(|e| Error::PeerUnavailable(format!("the bus does not know the caller: {e}")))
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
        self.hold.touch(self.bus()?).await;
        // Counted as in use while it waits, so it is not evicted between
        // the turns of the requests before it.
        let _in_use = model.in_use();
        let _turn = model.turn.lock().await;
        // Run on this worker thread: handing the session to another thread
        // (spawn_blocking, or block_in_place's hand-off of the worker) and
        // back costs more than the bus itself. One worker at a time may do
        // so, so another always reads the bus; beyond that, block_in_place.
        // A channel's own thread serves nothing else: it runs the model
        // itself.
        let result = if self.dedicated {
            f(&model)?
        } else {
            match self.inline.try_acquire() {
                Ok(_permit) => f(&model)?,
                Err(_) => tokio::task::block_in_place(|| f(&model))?,
            }
        };
        Ok((result, model.provider.clone()))
    }

    /// `InferFd` on a file npud can map: inputs read in place, outputs
    /// written into the same file past the inputs' `end`: by ONNX Runtime
    /// itself into their `slots`, the rest copied after those.
    async fn infer_in_place(
        &self,
        model: Arc<Loaded>,
        inputs: &HashMap<String, TensorRef>,
        end: u64,
        slots: Vec<Slot>,
        file: &std::fs::File,
        map: &pocket_proto::shm::Mapping,
    ) -> Result<(HashMap<String, TensorRef>, String, f64), Error> {
        let mut views = Vec::with_capacity(inputs.len());
        for (n, r) in inputs {
            let bytes = map.bytes(r.offset, r.len).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "input {n:?}: bytes {}..+{} lie outside the file",
                    r.offset, r.len
                ))
            })?;
            views.push((n.as_str(), r.dtype.as_str(), r.shape.as_slice(), bytes));
        }
        let ((refs, latency), provider) = self
            .run_model(model, |m| {
                let mut refs = HashMap::new();
                let mut offset = tensor_offset(slots.last().map_or(end, |s| s.offset + s.len));
                let latency =
                    m.run_with(&views, Some((map, &slots)), |n, dtype, shape, bytes| {
                        let (at, len) = match bytes {
                            // Written there by ONNX Runtime.
                            None => (slots.iter().find(|s| s.name == n))
                                .map(|s| (s.offset, s.len))
                                .ok_or_else(|| {
                                    crate::error::RuntimeError::Inference(format!(
                                        "output {n:?} has no slot"
                                    ))
                                })?,
                            Some(bytes) => {
                                if !map.write(offset, bytes) {
                                    file.write_all_at(bytes, offset).map_err(|e| {
                                        crate::error::RuntimeError::Inference(format!(
                                            "writing output {n:?} to the tensor file: {e}"
                                        ))
                                    })?;
                                }
                                let at = offset;
                                offset = tensor_offset(offset + bytes.len() as u64);
                                (at, bytes.len() as u64)
                            }
                        };
                        let dtype = dtype.to_string();
                        let offset = at;
                        refs.insert(
                            n.to_string(),
                            TensorRef {
                                dtype,
                                shape,
                                offset,
                                len,
                            },
                        );
                        Ok(())
                    })?;
                Ok((refs, latency))
            })
            .await?;
        Ok((refs, provider, latency))
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
        let meta = file
            .metadata()
            .map_err(|e| Error::InvalidArgument(format!("input file: {e}")))?;
        let size = meta.len();
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
        if needed > limit {
            return Err(Error::InvalidArgument(format!(
                "the inputs span {needed} bytes of the file, over npud's limit of {limit} (max_request_mb)"
            )));
        }
        // Outputs whose shapes are known before the run go into the file
        // right after the inputs, written there by ONNX Runtime.
        let shapes: Vec<(&str, &[i64])> = (inputs.iter())
            .map(|(n, r)| (n.as_str(), r.shape.as_slice()))
            .collect();
        let mut slots = model.plan(&shapes, tensor_offset(needed), limit);
        let mut map = None;
        if let Some(end) = slots.last().map(|s| s.offset + s.len) {
            map = self.tensor_file.map(&file, &meta, end);
        }
        if map.is_none() {
            slots.clear();
            map = self.tensor_file.map(&file, &meta, needed);
        }
        if let Some(map) = map {
            let (refs, provider, latency) = self
                .infer_in_place(model, &inputs, needed, slots, &file, &map)
                .await?;
            let fd = std::os::fd::OwnedFd::from(
                file.try_clone()
                    .map_err(|e| Error::Inference(format!("tensor file: {e}")))?,
            );
            return Ok((refs, fd.into(), provider, latency));
        }
        // Any other file: its inputs are read out, the outputs go into a
        // new memfd.
        let mut read = Vec::new();
        for (n, r) in inputs {
            let mut buf = vec![0u8; r.len as usize];
            file.read_exact_at(&mut buf, r.offset)
                .map_err(|e| Error::InvalidArgument(format!("input {n:?}: {e}")))?;
            read.push((n, r.dtype, r.shape, buf));
        }
        let ((outputs, latency), provider) = self.run_model(model, |m| m.run(read)).await?;
        let out = nix::sys::memfd::memfd_create(
            c"npud-outputs",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .map_err(|e| Error::Inference(format!("memfd: {e}")))?;
        let mut file = std::fs::File::from(out);
        let mut refs = HashMap::new();
        let mut offset = 0u64;
        for (n, dtype, shape, bytes) in outputs {
            file.write_all(&bytes)
                .map_err(|e| Error::Inference(format!("memfd: {e}")))?;
            refs.insert(
                n,
                TensorRef {
                    dtype,
                    shape,
                    offset,
                    len: bytes.len() as u64,
                },
            );
            offset += bytes.len() as u64;
        }
        let fd: std::os::fd::OwnedFd = file.into();
        Ok((refs, fd.into(), provider, latency))
    }

    /// A private channel to this object for a client that runs many
    /// inferences: the returned socket speaks D-Bus peer to peer (npud is
    /// the server side) and carries the same interface at the same path,
    /// without the bus daemon's hop in each direction. It lasts until the
    /// client closes it.
    async fn open_channel(
        &self,
        #[zbus(header)] header: zbus::message::Header<'_>,
    ) -> Result<zbus::zvariant::OwnedFd, Error> {
        let uid = self.caller_uid(&header).await?;
        let slot = ChannelSlot::take(&self.channels).ok_or_else(|| {
            Error::Busy(format!(
                "{MAX_CHANNELS} private channels are open already; close one first"
            ))
        })?;
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()
            .map_err(|e| Error::Inference(format!("channel socket: {e}")))?;
        let mut iface = self.clone();
        iface.peer_uid = Some(uid);
        iface.tensor_file = Arc::default();
        iface.dedicated = true;
        let handle = tokio::runtime::Handle::current();
        std::thread::Builder::new()
            .name("npud-channel".into())
            .spawn(move || {
                let _slot = slot;
                if let Err(e) = crate::channel::serve(iface, handle, ours, uid) {
                    tracing::debug!("private channel: {e}");
                }
            })
            .map_err(|e| Error::Inference(format!("channel thread: {e}")))?;
        Ok(std::os::fd::OwnedFd::from(theirs).into())
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

/// One of the [`MAX_CHANNELS`] private channels, given back when dropped.
struct ChannelSlot(Arc<AtomicUsize>);

impl ChannelSlot {
    fn take(open: &Arc<AtomicUsize>) -> Option<ChannelSlot> {
        if open.fetch_add(1, Ordering::SeqCst) >= MAX_CHANNELS {
            open.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(ChannelSlot(open.clone()))
    }
}

impl Drop for ChannelSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
