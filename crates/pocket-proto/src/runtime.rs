//! `org.pocketos.Runtime1`: the inference runtime (npud).

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use zbus::zvariant::Type;

pub const BUS_NAME: &str = "org.pocketos.Runtime1";
pub const PATH: &str = "/org/pocketos/Runtime1";

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
/// to npud instead of through the bus daemon. Needs a tokio runtime.
pub async fn open_channel(runtime: &Runtime1Proxy<'_>) -> zbus::Result<Runtime1Proxy<'static>> {
    let received: std::os::fd::OwnedFd = runtime.open_channel().await?.into();
    // A copy marked close-on-exec, so a child process started later does
    // not keep the channel open after this client closes it.
    let fd = received
        .try_clone()
        .map_err(|e| zbus::Error::InputOutput(e.into()))?;
    drop(received);
    let stream = std::os::unix::net::UnixStream::from(fd);
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

/// Where a tensor in a tensor file may start at or after `n`: the next
/// multiple of 64 (a cache line, aligned for every element type). Clients
/// lay out inputs so, and npud its outputs after them.
pub fn tensor_offset(n: u64) -> u64 {
    n.div_ceil(64) * 64
}

/// A tensor file for `InferFd`: a memfd sealed against shrinking, which
/// npud maps and reads in place, writing the outputs back into it. Reuse
/// one per stream of requests (one request at a time): after the first
/// request it has room for the outputs too, and each tensor then moves
/// once each way.
#[derive(Debug)]
pub struct TensorFile {
    file: std::fs::File,
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
        Ok(TensorFile {
            file: std::fs::File::from(fd),
        })
    }

    /// Runs `name` on `inputs` (name, tensor) through `InferFd`: outputs,
    /// the provider that ran, latency in ms.
    pub async fn infer(
        &self,
        runtime: &Runtime1Proxy<'_>,
        name: &str,
        inputs: &[(&str, &Tensor)],
    ) -> zbus::Result<(HashMap<String, Tensor>, String, f64)> {
        use std::os::fd::AsFd;
        use std::os::unix::fs::FileExt;
        let io = |e: std::io::Error| zbus::Error::InputOutput(e.into());
        let mut refs = HashMap::with_capacity(inputs.len());
        let mut offset = 0u64;
        for (n, t) in inputs {
            self.file.write_all_at(&t.data, offset).map_err(io)?;
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
        let (out_refs, out_fd, provider, latency) = runtime
            .infer_fd(name, refs, zbus::zvariant::Fd::from(self.file.as_fd()))
            .await?;
        // The same file when npud wrote in place; a new one otherwise.
        let out = std::fs::File::from(std::os::fd::OwnedFd::from(out_fd));
        let mut outputs = HashMap::with_capacity(out_refs.len());
        for (n, r) in out_refs {
            let len = usize::try_from(r.len).map_err(|e| zbus::Error::Failure(e.to_string()))?;
            let mut data = vec![0u8; len];
            out.read_exact_at(&mut data, r.offset).map_err(io)?;
            outputs.insert(
                n,
                Tensor {
                    dtype: r.dtype,
                    shape: r.shape,
                    data,
                },
            );
        }
        Ok((outputs, provider, latency))
    }
}
