//! `org.pocketos.Runtime1`: the inference runtime (npud).

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use zbus::zvariant::Type;

pub const BUS_NAME: &str = "org.pocketos.Runtime1";
pub const PATH: &str = "/org/pocketos/Runtime1";
pub const INTERFACE: &str = "org.pocketos.Runtime1";

/// Bytes per element of `dtype`.
pub fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "f64" | "i64" => 8,
        "f32" | "i32" => 4,
        "f16" | "i16" | "u16" => 2,
        "i8" | "u8" | "bool" => 1,
        _ => return None,
    })
}

/// A tensor carried in the message: element type, shape, and its elements
/// as little-endian bytes in row-major order.
#[derive(Debug, Clone, Serialize, Deserialize, Type, PartialEq)]
pub struct Tensor {
    pub dtype: String,
    pub shape: Vec<i64>,
    /// Serialized as one byte string, not byte by byte.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// A tensor carried in a shared memory file (memfd) passed beside the
/// message: its bytes are `len` bytes at `offset`.
#[derive(Debug, Clone, Serialize, Deserialize, Type, PartialEq)]
pub struct TensorRef {
    pub dtype: String,
    pub shape: Vec<i64>,
    pub offset: u64,
    pub len: u64,
}

/// A model held in memory by the runtime.
#[derive(Debug, Clone, Serialize, Deserialize, Type, PartialEq)]
pub struct LoadedModel {
    pub name: String,
    pub version: String,
    /// The execution provider its session runs on, honestly: `cpu (fallback
    /// from qnn)` when it wanted an accelerator it did not get.
    pub provider: String,
    pub memory_bytes: u64,
    /// Milliseconds since it last ran.
    pub idle_ms: u64,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

/// A model input or output: name, element type, shape (`-1` for a dynamic
/// dimension).
#[derive(Debug, Clone, Serialize, Deserialize, Type, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<i64>,
}

/// Execution providers: what the ONNX Runtime library offers, what this
/// device is configured to prefer, and what a load without a request gets.
#[derive(Debug, Clone, Serialize, Deserialize, Type, PartialEq)]
pub struct Providers {
    /// Provider short names the loaded library was built with.
    pub library: Vec<String>,
    /// The configured preference list.
    pub preferred: Vec<String>,
    /// Registered plugin EP libraries (name and path).
    pub plugins: Vec<(String, String)>,
    /// The hardware ONNX Runtime found for its providers, as
    /// `provider: vendor type`, e.g. `CPUExecutionProvider: Intel CPU`.
    pub devices: Vec<String>,
    /// What a load gets now, e.g. `xnnpack` or `cpu (fallback from qnn)`.
    pub selected: String,
    pub allow_cpu_fallback: bool,
}

/// `Infer`'s reply: outputs, the provider that ran, latency in ms.
pub type InferReply = (HashMap<String, Tensor>, String, f64);

/// `InferFd`'s reply: where the outputs lie, the file they lie in, the
/// provider that ran, latency in ms.
pub type InferFdReply = (
    HashMap<String, TensorRef>,
    zbus::zvariant::OwnedFd,
    String,
    f64,
);

/// What one inference returned.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InferOutput {
    pub outputs: HashMap<String, Tensor>,
    pub provider: String,
    pub latency_ms: f64,
}

#[zbus::proxy(
    interface = "org.pocketos.Runtime1",
    default_service = "org.pocketos.Runtime1",
    default_path = "/org/pocketos/Runtime1"
)]
pub trait Runtime1 {
    fn providers(&self) -> zbus::Result<Providers>;
    fn loaded(&self) -> zbus::Result<Vec<LoadedModel>>;
    /// Loads an installed model; `provider` empty for the device's
    /// preference, or a provider the model requires. Returns the provider
    /// its session runs on.
    fn load(&self, name: &str, provider: &str) -> zbus::Result<String>;
    fn unload(&self, name: &str) -> zbus::Result<()>;
    /// Runs a model (loading it first when needed) on tensors carried in the
    /// message. Returns outputs, the provider that ran, and latency in ms.
    fn infer(
        &self,
        name: &str,
        inputs: HashMap<String, Tensor>,
    ) -> zbus::Result<(HashMap<String, Tensor>, String, f64)>;
    /// Like `Infer`, with tensor bytes in memfds: the inputs in `data`, the
    /// outputs in the returned file.
    fn infer_fd(
        &self,
        name: &str,
        inputs: HashMap<String, TensorRef>,
        data: zbus::zvariant::Fd<'_>,
    ) -> zbus::Result<(
        HashMap<String, TensorRef>,
        zbus::zvariant::OwnedFd,
        String,
        f64,
    )>;

    /// A private peer-to-peer channel to npud with the same interface:
    /// see [`open_channel`].
    fn open_channel(&self) -> zbus::Result<zbus::zvariant::OwnedFd>;

    #[zbus(property)]
    fn status(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn memory_budget(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn memory_used(&self) -> zbus::Result<u64>;
}

/// Opens a private channel to npud (`OpenChannel`) and returns a proxy on
/// it: for a client that runs many inferences, each call then goes straight
/// to npud instead of through the bus daemon. Needs a tokio runtime. For
/// the least latency per call from one thread, see [`Channel`].
pub async fn open_channel(runtime: &Runtime1Proxy<'_>) -> zbus::Result<Runtime1Proxy<'static>> {
    let stream = channel_socket(runtime).await?;
    stream
        .set_nonblocking(true)
        .map_err(|e| zbus::Error::InputOutput(e.into()))?;
    let stream =
        tokio::net::UnixStream::from_std(stream).map_err(|e| zbus::Error::InputOutput(e.into()))?;
    let conn = zbus::connection::Builder::unix_stream(stream)
        .p2p()
        .build()
        .await?;
    Runtime1Proxy::builder(&conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
}

/// The client's end of a new private channel.
async fn channel_socket(
    runtime: &Runtime1Proxy<'_>,
) -> zbus::Result<std::os::unix::net::UnixStream> {
    let received: std::os::fd::OwnedFd = runtime.open_channel().await?.into();
    // A copy marked close-on-exec, so a child process started later does
    // not keep the channel open after this client closes it.
    let fd = received
        .try_clone()
        .map_err(|e| zbus::Error::InputOutput(e.into()))?;
    drop(received);
    Ok(std::os::unix::net::UnixStream::from(fd))
}

/// A private channel to npud whose calls block the calling thread, which
/// writes each call and reads its reply itself: the least time per call
/// for a client that runs a model again and again, one request at a time
/// (see [`crate::peer`]). npud serves it like any channel. Open one per
/// thread that calls.
#[derive(Debug)]
pub struct Channel {
    peer: crate::peer::PeerClient,
}

impl Channel {
    /// Opens a channel through `runtime` (on the bus); the rest of its
    /// calls need no async runtime.
    pub async fn open(runtime: &Runtime1Proxy<'_>) -> zbus::Result<Channel> {
        let socket = channel_socket(runtime).await?;
        Ok(Channel {
            peer: crate::peer::PeerClient::handshake(socket)?,
        })
    }

    /// `Infer`.
    pub fn infer(
        &mut self,
        name: &str,
        inputs: &HashMap<String, Tensor>,
    ) -> zbus::Result<InferReply> {
        self.peer.call(PATH, INTERFACE, "Infer", &(name, inputs))
    }

    /// `InferFd` on the tensor file `data`.
    pub fn infer_fd(
        &mut self,
        name: &str,
        inputs: &HashMap<String, TensorRef>,
        data: std::os::fd::BorrowedFd<'_>,
    ) -> zbus::Result<InferFdReply> {
        let body = (name, inputs, zbus::zvariant::Fd::from(data));
        self.peer.call(PATH, INTERFACE, "InferFd", &body)
    }
}

/// Where a tensor in a tensor file may start at or after `n`: the next
/// multiple of 64 (a cache line, aligned for every element type). Clients
/// lay out inputs so, and npud its outputs after them.
pub fn tensor_offset(n: u64) -> u64 {
    n.div_ceil(64) * 64
}

/// A tensor file for `InferFd`: a memfd sealed against shrinking, which
/// this client and npud both map. Inputs are copied into it once, npud
/// reads them in place and has ONNX Runtime write the outputs into it, and
/// [`TensorFile::run`] returns views of them: each tensor moves once, in.
/// Reuse one per stream of requests (one request at a time): after the
/// first request it has room for the outputs too.
#[derive(Debug)]
pub struct TensorFile {
    file: std::fs::File,
    /// The file's (device, inode), to tell it from another file in a reply.
    key: (u64, u64),
    map: Option<crate::shm::Mapping>,
}

/// A tensor returned by [`TensorFile::run`]: its bytes are read in place in
/// the tensor file when npud wrote them there, copied otherwise.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorView<'a> {
    pub dtype: String,
    pub shape: Vec<i64>,
    pub data: std::borrow::Cow<'a, [u8]>,
}

/// What one [`TensorFile::run`] returned.
#[derive(Debug)]
pub struct FileOutputs<'a> {
    pub outputs: HashMap<String, TensorView<'a>>,
    pub provider: String,
    pub latency_ms: f64,
}

impl FileOutputs<'_> {
    /// The outputs copied out of the file: outputs, the provider that ran,
    /// latency in ms.
    pub fn owned(self) -> InferReply {
        let outputs = self
            .outputs
            .into_iter()
            .map(|(n, v)| {
                let data = v.data.into_owned();
                let (dtype, shape) = (v.dtype, v.shape);
                (n, Tensor { dtype, shape, data })
            })
            .collect();
        (outputs, self.provider, self.latency_ms)
    }
}

fn file_key(file: &std::fs::File) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata()?;
    Ok((meta.dev(), meta.ino()))
}

impl TensorFile {
    pub fn new() -> std::io::Result<TensorFile> {
        use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
        let fd = memfd_create(
            c"pocket-tensors",
            MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
        )?;
        use std::os::fd::AsRawFd;
        nix::fcntl::fcntl(
            fd.as_raw_fd(),
            nix::fcntl::FcntlArg::F_ADD_SEALS(nix::fcntl::SealFlag::F_SEAL_SHRINK),
        )?;
        let file = std::fs::File::from(fd);
        Ok(TensorFile {
            key: file_key(&file)?,
            file,
            map: None,
        })
    }

    /// The mapping, covering at least `len` bytes, mapped again whole when
    /// the file has grown (here or in npud) past it. With `grow`, a file
    /// shorter than `len` grows to it; without, that is an error.
    fn mapped(&mut self, len: u64, grow: bool) -> std::io::Result<&crate::shm::Mapping> {
        if self.map.as_ref().is_none_or(|m| m.size() < len) {
            let size = self.file.metadata()?.len();
            if size < len && !grow {
                return Err(std::io::Error::other(format!(
                    "npud answered with bytes up to {len} of a {size}-byte tensor file"
                )));
            }
            if size < len {
                self.file.set_len(len)?;
            }
            self.map = None;
            self.map = crate::shm::Mapping::of(&self.file, size.max(len));
        }
        self.map
            .as_ref()
            .ok_or_else(|| std::io::Error::other("the tensor file cannot be mapped"))
    }

    /// Runs `name` on `inputs` (name, tensor) through `InferFd` and returns
    /// the outputs as views of this file, the provider that ran, and the
    /// latency in ms.
    pub async fn run(
        &mut self,
        runtime: &Runtime1Proxy<'_>,
        name: &str,
        inputs: &[(&str, &Tensor)],
    ) -> zbus::Result<FileOutputs<'_>> {
        use std::os::fd::AsFd;
        let refs = self.stage(inputs)?;
        let reply = runtime
            .infer_fd(name, refs, zbus::zvariant::Fd::from(self.file.as_fd()))
            .await?;
        self.collect(reply)
    }

    /// [`Self::run`] on a blocking [`Channel`].
    pub fn run_on(
        &mut self,
        channel: &mut Channel,
        name: &str,
        inputs: &[(&str, &Tensor)],
    ) -> zbus::Result<FileOutputs<'_>> {
        use std::os::fd::AsFd;
        let refs = self.stage(inputs)?;
        let reply = channel.infer_fd(name, &refs, self.file.as_fd())?;
        self.collect(reply)
    }

    /// Copies `inputs` into the file, one after another, and returns where
    /// each one lies.
    fn stage(&mut self, inputs: &[(&str, &Tensor)]) -> zbus::Result<HashMap<String, TensorRef>> {
        let io = |e: std::io::Error| zbus::Error::InputOutput(e.into());
        let mut refs = HashMap::with_capacity(inputs.len());
        let mut offset = 0u64;
        for (n, t) in inputs {
            let len = t.data.len() as u64;
            refs.insert(
                n.to_string(),
                TensorRef {
                    dtype: t.dtype.clone(),
                    shape: t.shape.clone(),
                    offset,
                    len,
                },
            );
            offset = tensor_offset(offset + len);
        }
        let map = self.mapped(offset.max(1), true).map_err(io)?;
        for (n, t) in inputs {
            map.write(refs[*n].offset, &t.data);
        }
        Ok(refs)
    }

    /// The outputs of npud's answer to `InferFd`: views of this file, or
    /// copies out of the file npud answered with instead.
    fn collect(
        &mut self,
        (out_refs, out_fd, provider, latency_ms): InferFdReply,
    ) -> zbus::Result<FileOutputs<'_>> {
        use std::os::unix::fs::FileExt;
        let io = |e: std::io::Error| zbus::Error::InputOutput(e.into());
        let out = std::fs::File::from(std::os::fd::OwnedFd::from(out_fd));
        let mut outputs = HashMap::with_capacity(out_refs.len());
        if file_key(&out).map_err(io)? != self.key {
            // npud could not write in place: the outputs are in a new file.
            for (n, r) in out_refs {
                let len =
                    usize::try_from(r.len).map_err(|e| zbus::Error::Failure(e.to_string()))?;
                let mut data = vec![0u8; len];
                out.read_exact_at(&mut data, r.offset).map_err(io)?;
                let data = std::borrow::Cow::Owned(data);
                let (dtype, shape) = (r.dtype, r.shape);
                outputs.insert(n, TensorView { dtype, shape, data });
            }
            return Ok(FileOutputs {
                outputs,
                provider,
                latency_ms,
            });
        }
        let end = out_refs
            .values()
            .map(|r| r.offset.saturating_add(r.len))
            .max()
            .unwrap_or(0);
        let map = self.mapped(end.max(1), false).map_err(io)?;
        for (n, r) in out_refs {
            let data = map.bytes(r.offset, r.len).ok_or_else(|| {
                zbus::Error::Failure(format!("output {n:?} lies outside the tensor file"))
            })?;
            let data = std::borrow::Cow::Borrowed(data);
            let (dtype, shape) = (r.dtype, r.shape);
            outputs.insert(n, TensorView { dtype, shape, data });
        }
        Ok(FileOutputs {
            outputs,
            provider,
            latency_ms,
        })
    }

    /// [`Self::run`] with the outputs copied out: outputs, the provider
    /// that ran, latency in ms.
    pub async fn infer(
        &mut self,
        runtime: &Runtime1Proxy<'_>,
        name: &str,
        inputs: &[(&str, &Tensor)],
    ) -> zbus::Result<InferReply> {
        self.run(runtime, name, inputs)
            .await
            .map(FileOutputs::owned)
    }

    /// [`Self::infer`] on a blocking [`Channel`].
    pub fn infer_on(
        &mut self,
        channel: &mut Channel,
        name: &str,
        inputs: &[(&str, &Tensor)],
    ) -> zbus::Result<InferReply> {
        self.run_on(channel, name, inputs).map(FileOutputs::owned)
    }
}
