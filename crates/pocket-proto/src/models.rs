//! `org.pocketos.Models1`: the model manager.

use serde::{Deserialize, Serialize};
use zbus::zvariant::{OwnedObjectPath, Type};

pub const BUS_NAME: &str = "org.pocketos.Models1";
pub const PATH: &str = "/org/pocketos/Models1";
pub const JOB_PATH_PREFIX: &str = "/org/pocketos/Models1/jobs";

/// An installed model.
#[derive(Debug, Clone, Serialize, Deserialize, Type, PartialEq, Eq)]
pub struct ModelInfo {
    pub name: String,
    pub version: String,
    pub description: String,
    /// Bytes on disk, all files together.
    pub size_bytes: u64,
    /// sha256 of the entry file (the graph a runtime loads).
    pub sha256: String,
    /// `installed` once published.
    pub state: String,
    /// Absolute path of the entry file; its sibling files sit beside it.
    pub path: String,
    pub memory_bytes: u64,
    pub installed_at: String,
    pub files: Vec<ModelFile>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Type, PartialEq, Eq)]
pub struct ModelFile {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

/// A model offered by a configured catalog.
#[derive(Debug, Clone, Serialize, Deserialize, Type, PartialEq, Eq)]
pub struct CatalogModel {
    pub name: String,
    pub version: String,
    pub description: String,
    pub size_bytes: u64,
    /// Memory the model's weights take.
    pub memory_bytes: u64,
    /// Beside the weights, an LLM's KV cache for one sequence at the context
    /// the fit check counts; 0 for other models.
    pub kv_bytes: u64,
    /// Version installed now, empty when none.
    pub installed_version: String,
    pub fits_disk: bool,
    pub fits_memory: bool,
    /// The catalog source it comes from.
    pub source: String,
}

#[zbus::proxy(
    interface = "org.pocketos.Models1",
    default_service = "org.pocketos.Models1",
    default_path = "/org/pocketos/Models1"
)]
pub trait Models1 {
    /// Models offered by the configured catalogs, verified.
    fn catalog(&self) -> zbus::Result<Vec<CatalogModel>>;
    /// Fetches and verifies every catalog again; returns how many models
    /// they offer.
    fn refresh(&self) -> zbus::Result<u32>;
    fn list(&self) -> zbus::Result<Vec<ModelInfo>>;
    fn info(&self, name: &str) -> zbus::Result<ModelInfo>;
    /// Starts (or joins) the install of a catalog model; returns the job.
    fn install(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    /// Installs from a pack file the caller opened (a USB stick, a
    /// download); returns the job.
    fn install_file(&self, pack: zbus::zvariant::Fd<'_>) -> zbus::Result<OwnedObjectPath>;
    fn remove(&self, name: &str) -> zbus::Result<()>;
    /// Drops the partial download of a model; returns bytes freed.
    fn remove_partial(&self, name: &str) -> zbus::Result<u64>;
    /// Deletes unreferenced blobs and stale partial downloads; returns bytes
    /// freed.
    fn gc(&self) -> zbus::Result<u64>;

    /// The one completion signal of an install job.
    #[zbus(signal)]
    fn install_finished(
        &self,
        job: zbus::zvariant::ObjectPath<'_>,
        name: &str,
        success: bool,
        error_name: &str,
        error_message: &str,
    ) -> zbus::Result<()>;

    #[zbus(property)]
    fn jobs(&self) -> zbus::Result<Vec<OwnedObjectPath>>;
    /// `ok`, or what is degraded (an unreachable catalog, a bad keyring).
    #[zbus(property)]
    fn status(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
}

/// What only a model install job has; its progress, phase, outcome and
/// `Cancel` are on [`crate::job::Job1Proxy`] at the same path.
#[zbus::proxy(
    interface = "org.pocketos.Models1.Job",
    default_service = "org.pocketos.Models1"
)]
pub trait Job {
    /// The model's name; for a pack file, empty until its metadata is read.
    #[zbus(property)]
    fn name(&self) -> zbus::Result<String>;
}
