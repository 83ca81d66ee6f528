//! The D-Bus surface: `org.pocketos.Runtime1`.

use crate::error::RuntimeError;
use crate::peers::{self, PerformanceHold};
use crate::runtime::{Loaded, Runtime};
use pocket_proto::runtime::{LoadedModel, Providers, Tensor, TensorRef};
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

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

pub struct RuntimeIface {
    rt: Arc<Runtime>,
    hold: Arc<PerformanceHold>,
}

impl RuntimeIface {
    pub fn new(rt: Arc<Runtime>, hold: Arc<PerformanceHold>) -> Self {
        RuntimeIface { rt, hold }
    }

    async fn ensure_loaded(
        &self,
        conn: &zbus::Connection,
        name: &str,
        provider: &str,
    ) -> Result<Arc<Loaded>, Error> {
        if provider.is_empty() {
            if let Some(m) = self.rt.get(name) {
                return Ok(m);
            }
        }
        let record = peers::model_record(conn, name).await?;
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
        conn: &zbus::Connection,
        name: &str,
        inputs: Vec<(String, String, Vec<i64>, Vec<u8>)>,
    ) -> Result<(Vec<(String, String, Vec<i64>, Vec<u8>)>, String, f64), Error> {
        let model = self.ensure_loaded(conn, name, "").await?;
        self.hold.touch(conn).await;
        // Run on this worker thread, telling the runtime to move its other
        // tasks away: no hand-off to another thread and back.
        let (outputs, latency) = tokio::task::block_in_place(|| model.run(inputs))?;
        Ok((outputs, model.provider.clone(), latency))
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

    async fn load(
        &self,
        name: &str,
        provider: &str,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<String, Error> {
        Ok(self
            .ensure_loaded(conn, name, provider)
            .await?
            .provider
            .clone())
    }

    async fn unload(&self, name: &str) -> Result<(), Error> {
        Ok(self.rt.unload(name)?)
    }

    async fn infer(
        &self,
        name: &str,
        inputs: HashMap<String, Tensor>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<(HashMap<String, Tensor>, String, f64), Error> {
        let inputs = inputs
            .into_iter()
            .map(|(n, t)| (n, t.dtype, t.shape, t.data))
            .collect();
        let (outputs, provider, latency) = self.run(conn, name, inputs).await?;
        let outputs = outputs
            .into_iter()
            .map(|(n, dtype, shape, data)| (n, Tensor { dtype, shape, data }))
            .collect();
        Ok((outputs, provider, latency))
    }

    async fn infer_fd(
        &self,
        name: &str,
        inputs: HashMap<String, TensorRef>,
        data: zbus::zvariant::OwnedFd,
        #[zbus(connection)] conn: &zbus::Connection,
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
        let size = file
            .metadata()
            .map_err(|e| Error::InvalidArgument(format!("input file: {e}")))?
            .len();
        // Check every input against the model before a byte is read, so a
        // request cannot make npud allocate more than the model takes.
        let model = self.ensure_loaded(conn, name, "").await?;
        for (n, r) in &inputs {
            let spec = model.inputs.iter().find(|s| &s.name == n).ok_or_else(|| {
                Error::InvalidArgument(format!("model {name:?} has no input {n:?}"))
            })?;
            crate::tensor::check(spec, &r.dtype, &r.shape, r.len as usize)?;
        }
        let mut read = Vec::new();
        for (n, r) in inputs {
            if r.offset.checked_add(r.len).is_none_or(|end| end > size) {
                return Err(Error::InvalidArgument(format!(
                    "input {n:?}: bytes {}..+{} lie outside the {size}-byte file",
                    r.offset, r.len
                )));
            }
            let mut buf = vec![0u8; r.len as usize];
            file.read_exact_at(&mut buf, r.offset)
                .map_err(|e| Error::InvalidArgument(format!("input {n:?}: {e}")))?;
            read.push((n, r.dtype, r.shape, buf));
        }
        let (outputs, provider, latency) = self.run(conn, name, read).await?;
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
