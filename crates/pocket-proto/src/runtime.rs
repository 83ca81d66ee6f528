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
    /// Weights and the KV cache counted for its sequences.
    pub memory_bytes: u64,
    /// Of that, the KV cache (0 for a model that runs in one pass).
    pub kv_bytes_reserved: u64,
    /// Of the KV cache, what holds tokens now: running sequences and the
    /// prefixes kept for reuse.
    pub kv_bytes_used: u64,
    /// An LLM's sequences generating now.
    pub sequences_running: u32,
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
    /// Generates text with an LLM (DESIGN §8): `request` is a
    /// [`crate::generate::GenerateRequest`] as JSON; the answer is the read
    /// end of a stream of newline-delimited [`crate::generate::Event`]s.
    /// Closing it cancels the generation.
    fn generate(&self, model: &str, request: &str) -> zbus::Result<zbus::zvariant::OwnedFd>;

    #[zbus(property)]
    fn status(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn memory_budget(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn memory_used(&self) -> zbus::Result<u64>;
}

/// A tensor file for `InferFd`: a memfd this client writes its inputs
/// into, one after another; npud copies them out before it runs the model
/// and answers with the outputs in a sealed memfd of its own. Reuse one per
/// stream of requests (one request at a time).
#[derive(Debug)]
pub struct TensorFile {
    file: std::fs::File,
}

impl TensorFile {
    pub fn new() -> std::io::Result<TensorFile> {
        use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
        let fd = memfd_create(c"pocket-tensors", MemFdCreateFlag::MFD_CLOEXEC)?;
        Ok(TensorFile {
            file: std::fs::File::from(fd),
        })
    }

    /// Runs `name` on `inputs` (name, tensor) through `InferFd`: outputs,
    /// the provider that ran, latency in ms.
    pub async fn infer(
        &mut self,
        runtime: &Runtime1Proxy<'_>,
        name: &str,
        inputs: &[(&str, &Tensor)],
    ) -> zbus::Result<InferReply> {
        use std::os::fd::AsFd;
        let refs = self.stage(inputs)?;
        let reply = runtime
            .infer_fd(name, refs, zbus::zvariant::Fd::from(self.file.as_fd()))
            .await?;
        read_outputs(reply)
    }

    /// Writes `inputs` into the file, one after another, each at a
    /// [`tensor_offset`], and returns where each one lies.
    fn stage(&mut self, inputs: &[(&str, &Tensor)]) -> zbus::Result<HashMap<String, TensorRef>> {
        use std::os::unix::fs::FileExt;
        let io = |e: std::io::Error| zbus::Error::InputOutput(e.into());
        let mut refs = HashMap::with_capacity(inputs.len());
        let mut offset = 0u64;
        for (n, t) in inputs {
            let len = t.data.len() as u64;
            self.file.write_all_at(&t.data, offset).map_err(io)?;
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
        Ok(refs)
    }
}

/// The outputs of an `InferFd` reply, read out of the file npud answered
/// with.
pub fn read_outputs((refs, fd, provider, latency_ms): InferFdReply) -> zbus::Result<InferReply> {
    use std::os::unix::fs::FileExt;
    let out = std::fs::File::from(std::os::fd::OwnedFd::from(fd));
    let size = out
        .metadata()
        .map_err(|e| zbus::Error::InputOutput(e.into()))?
        .len();
    let mut outputs = HashMap::with_capacity(refs.len());
    for (n, r) in refs {
        if r.offset.checked_add(r.len).is_none_or(|end| end > size) {
            return Err(zbus::Error::Failure(format!(
                "output {n:?} lies outside npud's {size}-byte answer"
            )));
        }
        let mut data = vec![0u8; r.len as usize];
        out.read_exact_at(&mut data, r.offset)
            .map_err(|e| zbus::Error::InputOutput(e.into()))?;
        let (dtype, shape) = (r.dtype, r.shape);
        outputs.insert(n, Tensor { dtype, shape, data });
    }
    Ok((outputs, provider, latency_ms))
}

/// Where a tensor in a tensor file may start at or after `n`: the next
/// multiple of 64 (a cache line, aligned for every element type).
pub fn tensor_offset(n: u64) -> u64 {
    n.div_ceil(64) * 64
}
