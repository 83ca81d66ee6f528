//! The core room: catalogs, jobs and the decisions of the model manager.
//! The D-Bus surface in `interface.rs` is a thin layer over [`Engine`].

use crate::catalog::{self, Catalogs, Source};
use crate::config::Config;
use crate::download::{fetch_pack, pump, resumed_writer, PumpEnd, Remote, Retry};
use crate::error::ModelError;
use crate::install::{Limits, PackWriter};
use crate::store::{InstalledModel, Pending, Store};
use pocket_daemon::job::Failure;
use pocket_models::CatalogEntry;
use pocket_proto::job::Phase;
use pocket_proto::models::{CatalogModel, ModelFile, ModelInfo};
use pocket_trust::Keyring;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// What only a model install has beside the common job.
#[derive(Debug, Default)]
pub struct Install {
    /// The model's name; for a pack file, empty until it is published.
    name: Mutex<String>,
    /// The partial download it is writing, which GC must leave alone.
    partial: Mutex<Option<PathBuf>>,
}

impl Install {
    pub fn name(&self) -> String {
        self.name.lock().expect("not poisoned").clone()
    }
}

/// One install in progress, shared by everyone who asked for it.
pub type Job = pocket_daemon::job::Job<Install>;

pub struct Engine {
    cfg: Config,
    store: Store,
    http: reqwest::Client,
    sources: Vec<Source>,
    keyring: tokio::sync::Mutex<Option<Keyring>>,
    start_problem: Mutex<Option<String>>,
    catalogs: tokio::sync::Mutex<Catalogs>,
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    limits: Limits,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Engine({:?})", self.store)
    }
}

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ModelError> + Send + 'static,
) -> Result<T, ModelError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|source| ModelError::Worker {
            what: "a worker",
            source,
        })?
}

impl Engine {
    pub fn new(cfg: Config) -> Result<Arc<Engine>, ModelError> {
        let store = Store::open(&cfg.data_dir)?;
        let mut start_problem = None;
        if let Err(e) = store.reconcile() {
            // Installed models stay listed; what cannot be rebuilt is said.
            tracing::error!("model store not fully consistent: {e}");
            start_problem = Some(format!("model store: {e}"));
        }
        for p in store.file_partials()? {
            crate::store::remove_partial(&p);
        }
        let sources = cfg
            .catalogs
            .iter()
            .map(|s| Source::parse(s))
            .collect::<Result<Vec<_>, _>>()?;
        let keyring = Keyring::load_dir(&cfg.keyring_dir)
            .and_then(|base| store.floors().current_keyring(base));
        let (keyring, problem) = match keyring {
            Ok(k) => (Some(k), None),
            Err(e) => {
                tracing::error!("no usable keyring, installs are refused: {e}");
                (None, Some(format!("keyring: {e}")))
            }
        };
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(15))
            .read_timeout(Duration::from_secs(60))
            .build()
            .map_err(ModelError::HttpClient)?;
        let limits = Limits {
            mem_total: crate::install::mem_total(&cfg.meminfo),
            reserve_bytes: cfg.reserve_bytes,
        };
        let engine = Arc::new(Engine {
            cfg,
            store,
            http,
            sources,
            keyring: tokio::sync::Mutex::new(keyring.clone()),
            start_problem: Mutex::new(problem.or(start_problem)),
            catalogs: tokio::sync::Mutex::new(Catalogs::default()),
            jobs: Mutex::new(HashMap::new()),
            limits,
            next_id: AtomicU64::new(1),
        });
        if let Some(k) = &keyring {
            engine.publish_keyring(k);
        }
        Ok(engine)
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Leaves the keyring in force at `<data_dir>/keyring.json` for otad,
    /// which checks that it chains from its own before it uses it (a
    /// rotation that revokes an updates key reaches updates too).
    fn publish_keyring(&self, keyring: &Keyring) {
        let path = self.cfg.data_dir.join(pocket_trust::KEYRING_FILE);
        let bytes = keyring.envelope().to_bytes();
        if std::fs::read(&path).ok().as_deref() == Some(bytes.as_slice()) {
            return;
        }
        match crate::store::write_atomic(&path, &bytes) {
            Ok(()) => {
                tracing::info!(version = %keyring.version(), "keyring published at {}", path.display())
            }
            Err(e) => tracing::warn!("cannot publish the keyring at {}: {e}", path.display()),
        }
    }

    async fn keyring(&self) -> Result<Keyring, ModelError> {
        self.keyring
            .lock()
            .await
            .clone()
            .ok_or_else(|| ModelError::NoKeyring {
                dir: self.cfg.keyring_dir.clone(),
            })
    }

    /// `ok`, or what is degraded.
    pub async fn status(&self) -> String {
        let mut problems: Vec<String> = self.catalogs.lock().await.problems.clone();
        if let Some(p) = self.start_problem.lock().expect("not poisoned").clone() {
            problems.insert(0, p);
        }
        if problems.is_empty() {
            "ok".into()
        } else {
            format!("degraded: {}", problems.join("; "))
        }
    }

    /// Fetches and verifies every catalog again.
    pub async fn refresh(&self) -> Result<usize, ModelError> {
        let mut guard = self.keyring.lock().await;
        let Some(keyring) = guard.as_mut() else {
            drop(guard);
            return Err(self.keyring().await.unwrap_err());
        };
        let before = keyring.version().clone();
        let loaded = catalog::load(&self.http, &self.sources, keyring, self.store.floors()).await;
        if *keyring.version() != before {
            self.publish_keyring(keyring);
        }
        drop(guard);
        let n = loaded.entries.len();
        *self.catalogs.lock().await = loaded;
        Ok(n)
    }

    pub async fn catalog(&self) -> Result<Vec<CatalogModel>, ModelError> {
        self.refresh().await?;
        let catalogs = self.catalogs.lock().await.clone();
        if catalogs.entries.is_empty() && !catalogs.problems.is_empty() {
            return Err(ModelError::NoUsableCatalog {
                problems: catalogs.problems,
            });
        }
        let installed = self.store.installed()?;
        let free = self.store.free_bytes();
        Ok(catalogs
            .entries
            .iter()
            .map(|(source, e)| {
                let have = installed.iter().find(|m| m.name == e.name);
                CatalogModel {
                    name: e.name.clone(),
                    version: e.version.to_string(),
                    description: e.description.clone(),
                    size_bytes: e.size_bytes,
                    memory_bytes: e.memory_bytes,
                    kv_bytes: e.llm.as_ref().map_or(0, |l| l.fit_kv_bytes()),
                    installed_version: have.map(|m| m.version.to_string()).unwrap_or_default(),
                    fits_disk: e.size_bytes + self.limits.reserve_bytes <= free,
                    fits_memory: self.limits.check_memory(&e.name, e.memory_needed()).is_ok(),
                    source: source.describe(),
                }
            })
            .collect())
    }

    pub fn list(&self) -> Result<Vec<ModelInfo>, ModelError> {
        Ok(self
            .store
            .installed()?
            .iter()
            .map(|m| self.info_of(m))
            .collect())
    }

    pub fn info(&self, name: &str) -> Result<ModelInfo, ModelError> {
        let m = self
            .store
            .get(name)?
            .ok_or_else(|| ModelError::NotInstalled {
                name: name.to_string(),
            })?;
        Ok(self.info_of(&m))
    }

    fn info_of(&self, m: &InstalledModel) -> ModelInfo {
        ModelInfo {
            name: m.name.clone(),
            version: m.version.to_string(),
            description: m.description.clone(),
            size_bytes: m.size_bytes(),
            sha256: m
                .files
                .iter()
                .find(|f| f.path == m.entry)
                .map(|f| f.sha256.clone())
                .unwrap_or_default(),
            state: "installed".into(),
            path: self.store.entry_path(m).display().to_string(),
            memory_bytes: m.memory_bytes,
            installed_at: m.installed_at.clone(),
            files: m
                .files
                .iter()
                .map(|f| ModelFile {
                    path: f.path.clone(),
                    size: f.size,
                    sha256: f.sha256.clone(),
                })
                .collect(),
        }
    }

    pub fn jobs(&self) -> Vec<Arc<Job>> {
        self.jobs
            .lock()
            .expect("not poisoned")
            .values()
            .cloned()
            .collect()
    }

    fn new_job(&self, name: &str) -> Arc<Job> {
        let install = Install {
            name: Mutex::new(name.to_string()),
            partial: Mutex::new(None),
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        Arc::new(Job::new(id, Phase::Queued, install))
    }

    /// Starts the install of a catalog model, or joins the one under way.
    /// Returns the job and whether it is new.
    pub async fn install(self: &Arc<Self>, name: &str) -> Result<(Arc<Job>, bool), ModelError> {
        if let Some(job) = self.jobs.lock().expect("not poisoned").get(name) {
            return Ok((job.clone(), false));
        }
        self.refresh().await?;
        let (source, entry) = {
            let catalogs = self.catalogs.lock().await;
            match catalogs.find(name) {
                Some(found) => found.clone(),
                None if catalogs.problems.is_empty() => {
                    return Err(ModelError::NotInCatalog {
                        name: name.to_string(),
                    })
                }
                // Say why a catalog that may list it was refused.
                None => {
                    return Err(ModelError::CatalogRefused {
                        name: name.to_string(),
                        problems: catalogs.problems.clone(),
                    })
                }
            }
        };
        self.precheck(&entry)?;
        let job = {
            let mut jobs = self.jobs.lock().expect("not poisoned");
            if let Some(job) = jobs.get(name) {
                return Ok((job.clone(), false));
            }
            let job = self.new_job(name);
            jobs.insert(name.to_string(), job.clone());
            job
        };
        job.set_total(entry.pack.size);
        let up_to_date = self
            .store
            .get(name)?
            .is_some_and(|m| m.version == entry.version);
        if up_to_date {
            job.set_done(entry.pack.size);
            self.finish(&job, Ok(()));
            return Ok((job, true));
        }
        self.store.set_pending(&Pending {
            source: source.describe(),
            entry: entry.clone(),
        })?;
        self.spawn_catalog_job(job.clone(), source, entry);
        Ok((job, true))
    }

    /// Checks made before a single byte is downloaded.
    fn precheck(&self, entry: &CatalogEntry) -> Result<(), ModelError> {
        self.limits
            .check_memory(&entry.name, entry.memory_needed())?;
        let subject = format!("model:{}", entry.name);
        if let Some((floor, _)) = self.store.floors().floor(&subject)? {
            if entry.version < floor {
                return Err(pocket_trust::TrustError::Downgrade {
                    what: subject,
                    offered: entry.version.to_string(),
                    floor: floor.to_string(),
                }
                .into());
            }
        }
        let dir = self
            .store
            .partial_dir(&entry.name, &entry.pack.header_sha256);
        let have: u64 = std::fs::read_dir(&dir)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0);
        self.limits
            .check_disk(&self.store, entry.pack.size.saturating_sub(have))
    }

    /// Resumes catalog installs that a crash or reboot interrupted.
    pub fn resume_pending(self: &Arc<Self>) -> Result<Vec<Arc<Job>>, ModelError> {
        let mut started = Vec::new();
        for p in self.store.pending()? {
            let source = Source::parse(&p.source)?;
            let job = {
                let mut jobs = self.jobs.lock().expect("not poisoned");
                if jobs.contains_key(&p.entry.name) {
                    continue; // already under way
                }
                let job = self.new_job(&p.entry.name);
                jobs.insert(p.entry.name.clone(), job.clone());
                job
            };
            job.set_total(p.entry.pack.size);
            tracing::info!(model = %p.entry.name, "resuming interrupted install");
            self.spawn_catalog_job(job.clone(), source, p.entry);
            started.push(job);
        }
        Ok(started)
    }

    fn spawn_catalog_job(self: &Arc<Self>, job: Arc<Job>, source: Source, entry: CatalogEntry) {
        let this = self.clone();
        tokio::spawn(async move {
            let dir = this
                .store
                .partial_dir(&entry.name, &entry.pack.header_sha256);
            *job.detail.partial.lock().expect("not poisoned") = Some(dir.clone());
            let result = this.run_catalog(&job, &source, &entry, dir.clone()).await;
            if let Err(e) = &result {
                if !e.keeps_partial() {
                    crate::store::remove_partial(&dir);
                    // Give back what this install stored.
                    let _ = this.store.gc_blobs();
                }
                let _ = this.store.clear_pending(&entry.name);
            }
            this.finish(&job, result);
        });
    }

    async fn run_catalog(
        &self,
        job: &Arc<Job>,
        source: &Source,
        entry: &CatalogEntry,
        dir: PathBuf,
    ) -> Result<(), ModelError> {
        let keyring = self.keyring().await?;
        let open_writer = || {
            resumed_writer(
                self.store.clone(),
                dir.clone(),
                keyring.clone(),
                entry.clone(),
                self.limits,
            )
        };
        let retry = Retry {
            attempts: self.cfg.download_attempts,
            backoff: Duration::from_millis(500),
        };
        let fetch = Remote {
            http: &self.http,
            source,
        };
        let writer = fetch_pack(&fetch, entry, job, retry, open_writer).await?;
        self.publish(job, writer, &source.describe()).await
    }

    async fn publish(&self, job: &Job, writer: PackWriter, source: &str) -> Result<(), ModelError> {
        job.set_done(writer.pos());
        job.set_phase(Phase::Publishing);
        let store = self.store.clone();
        let source = source.to_string();
        let dir = writer.dir().to_path_buf();
        let name = blocking(move || {
            let (manifest, digest) = writer.finish()?;
            let model = InstalledModel {
                name: manifest.body.name.clone(),
                version: manifest.version.clone(),
                description: manifest.body.description.clone(),
                entry: manifest.body.entry.clone(),
                memory_bytes: manifest.body.memory_bytes,
                files: manifest.body.files.clone(),
                installed_at: pocket_trust::format_time(SystemTime::now()),
                source,
            };
            store.publish(&model, &digest)?;
            crate::store::remove_partial(&dir);
            // Blobs of a replaced version are no longer referenced.
            store.gc_blobs()?;
            tracing::info!(model = %model.name, version = %model.version, "installed");
            Ok(model.name)
        })
        .await?;
        *job.detail.name.lock().expect("not poisoned") = name;
        Ok(())
    }

    /// Installs from a pack file the caller opened.
    pub async fn install_file(
        self: &Arc<Self>,
        file: std::fs::File,
    ) -> Result<Arc<Job>, ModelError> {
        let keyring = self.keyring().await?;
        let size = file
            .metadata()
            .map_err(|e| ModelError::io("reading the pack", self.store.root(), e))?
            .len();
        let job = self.new_job("");
        job.set_total(size);
        let dir = self.store.file_partial_dir(job.id);
        *job.detail.partial.lock().expect("not poisoned") = Some(dir.clone());
        self.jobs
            .lock()
            .expect("not poisoned")
            .insert(format!("/file/{}", job.id), job.clone());
        let this = self.clone();
        let j = job.clone();
        tokio::spawn(async move {
            let result = this.run_file(&j, file, keyring, dir.clone()).await;
            crate::store::remove_partial(&dir);
            if result.is_err() {
                let _ = this.store.gc_blobs();
            }
            this.finish(&j, result);
        });
        Ok(job)
    }

    async fn run_file(
        &self,
        job: &Arc<Job>,
        file: std::fs::File,
        keyring: Keyring,
        dir: PathBuf,
    ) -> Result<(), ModelError> {
        let (store, limits) = (self.store.clone(), self.limits);
        let writer = blocking(move || PackWriter::new(store, dir, keyring, None, limits)).await?;
        job.begin(Phase::Downloading, 0, job.total());
        let stream = catalog::file_stream(tokio::fs::File::from_std(file), "pack".into());
        match pump(writer, stream, job).await {
            PumpEnd::Ended(w) => self.publish(job, w, "file").await,
            PumpEnd::Interrupted(_, e) | PumpEnd::Failed(e) => Err(e),
        }
    }

    fn finish(&self, job: &Job, result: Result<(), ModelError>) {
        let outcome = result.map_err(|e| {
            tracing::warn!(job = job.id, model = %job.detail.name(), "install failed: {e}");
            Failure::new(e.name(), e.to_string())
        });
        self.jobs
            .lock()
            .expect("not poisoned")
            .retain(|_, j| j.id != job.id);
        job.finish(outcome);
    }

    fn active_partials(&self) -> Vec<PathBuf> {
        self.jobs()
            .iter()
            .filter_map(|j| j.detail.partial.lock().expect("not poisoned").clone())
            .collect()
    }

    pub async fn remove(&self, name: &str) -> Result<(), ModelError> {
        if self.jobs.lock().expect("not poisoned").contains_key(name) {
            return Err(ModelError::Installing {
                name: name.to_string(),
            });
        }
        let store = self.store.clone();
        let name = name.to_string();
        blocking(move || {
            store.unpublish(&name)?;
            store.gc_blobs()?;
            Ok(())
        })
        .await
    }

    pub async fn remove_partial(&self, name: &str) -> Result<u64, ModelError> {
        pocket_models::validate_name(name)?;
        if self.jobs.lock().expect("not poisoned").contains_key(name) {
            return Err(ModelError::Installing {
                name: name.to_string(),
            });
        }
        self.store.clear_pending(name)?;
        Ok(self
            .store
            .partials_of(name)?
            .iter()
            .map(|p| crate::store::remove_partial(p))
            .sum())
    }

    pub async fn gc(&self) -> Result<u64, ModelError> {
        let store = self.store.clone();
        let active = self.active_partials();
        blocking(move || store.gc(&active)).await
    }
}
