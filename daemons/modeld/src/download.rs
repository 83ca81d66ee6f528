//! The install steps between a source and the [`PackWriter`]: fetch from
//! where the writer stands, resume after a broken connection, give up after
//! the configured number of tries, start a damaged partial file again, and
//! stop on cancel. They run over the [`Fetch`] trait, so the unit tests
//! below drive them with sources that break, lie and stall, and the real
//! writer and store, without a network.

use crate::catalog::{ByteStream, Source};
use crate::engine::{blocking, Job};
use crate::error::ModelError;
use crate::install::{Limits, PackWriter};
use crate::store::Store;
use futures_util::StreamExt;
use pocket_models::CatalogEntry;
use pocket_proto::job::Phase;
use pocket_trust::Keyring;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Where a pack's bytes come from.
pub trait Fetch: Sync {
    /// Streams `rel` from byte `offset` on; a source whose copy is not
    /// `size` bytes long refuses before sending any.
    fn open(
        &self,
        rel: &str,
        offset: u64,
        size: u64,
    ) -> impl Future<Output = Result<ByteStream, ModelError>> + Send;
}

/// A catalog source reached with the daemon's HTTP client.
pub struct Remote<'a> {
    pub http: &'a reqwest::Client,
    pub source: &'a Source,
}

impl Fetch for Remote<'_> {
    fn open(
        &self,
        rel: &str,
        offset: u64,
        size: u64,
    ) -> impl Future<Output = Result<ByteStream, ModelError>> + Send {
        self.source.open(self.http, rel, offset, size)
    }
}

/// How often, and how patiently, a broken download is resumed.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// Tries in all, the first one included.
    pub attempts: u32,
    /// The wait after the first failure; it doubles with each further one,
    /// up to 16 times this.
    pub backoff: Duration,
}

impl Retry {
    fn wait(&self, failures: u32) -> Duration {
        self.backoff * (1 << failures.saturating_sub(1).min(4))
    }
}

/// A writer for `entry`'s pack over the partial directory `dir`, holding
/// whatever an earlier, interrupted run left there.
pub async fn resumed_writer(
    store: Store,
    dir: PathBuf,
    keyring: Keyring,
    entry: CatalogEntry,
    limits: Limits,
) -> Result<PackWriter, ModelError> {
    blocking(move || {
        let mut w = PackWriter::new(store, dir, keyring, Some(entry), limits)?;
        w.resume()?;
        Ok(w)
    })
    .await
}

/// Fetches `entry`'s pack into the writer that `open_writer` gives,
/// resuming from the writer's position after each interruption, with the
/// job in [`Phase::Downloading`]. Returns the writer holding every byte of
/// the pack, ready to finish.
pub async fn fetch_pack<F, W, Fut>(
    fetch: &F,
    entry: &CatalogEntry,
    job: &Job,
    retry: Retry,
    open_writer: W,
) -> Result<PackWriter, ModelError>
where
    F: Fetch,
    W: Fn() -> Fut,
    Fut: Future<Output = Result<PackWriter, ModelError>>,
{
    let size = entry.pack.size;
    let mut writer = open_writer().await?;
    job.begin(Phase::Downloading, writer.pos(), size);
    let mut failures = 0;
    while writer.pos() < size {
        job.set_done(writer.pos());
        let interrupted = match fetch.open(&entry.pack.path, writer.pos(), size).await {
            Ok(stream) => match pump(writer, stream, job).await {
                PumpEnd::Ended(w) => {
                    writer = w;
                    if writer.pos() >= size {
                        break;
                    }
                    ModelError::ClosedEarly {
                        at: writer.pos(),
                        size,
                    }
                }
                PumpEnd::Interrupted(w, e) => {
                    writer = w;
                    e
                }
                // What a power cut left in a partial file did not hash
                // out; that file was dropped and is fetched again.
                PumpEnd::Failed(e @ ModelError::ResumeDamaged { .. }) => {
                    writer = open_writer().await?;
                    e
                }
                PumpEnd::Failed(e) => return Err(e),
            },
            Err(e) if e.keeps_partial() => e,
            Err(e) => return Err(e),
        };
        failures += 1;
        if failures >= retry.attempts {
            return Err(interrupted);
        }
        tracing::warn!(model = %entry.name, "download interrupted ({interrupted}), resuming");
        tokio::select! {
            _ = job.cancelled() => return Err(ModelError::Cancelled { name: entry.name.clone() }),
            _ = tokio::time::sleep(retry.wait(failures)) => {}
        }
    }
    Ok(writer)
}

pub enum PumpEnd {
    /// The stream ended; the writer has every byte it sent.
    Ended(PackWriter),
    /// The connection broke; the writer can continue from its position.
    Interrupted(PackWriter, ModelError),
    Failed(ModelError),
}

/// Moves a byte stream into a writer running on a blocking thread, so that
/// receiving from the network and hashing plus writing overlap.
pub async fn pump(mut writer: PackWriter, mut stream: ByteStream, job: &Job) -> PumpEnd {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(32);
    let done = job.done_counter();
    let handle = tokio::task::spawn_blocking(move || {
        while let Some(chunk) = rx.blocking_recv() {
            writer.feed(&chunk)?;
            done.store(writer.pos(), Ordering::Relaxed);
        }
        writer.flush()?;
        Ok::<_, ModelError>(writer)
    });
    let mut broke = None;
    loop {
        tokio::select! {
            biased;
            _ = job.cancelled() => {
                broke = Some(ModelError::Cancelled {
                    name: job.detail.name(),
                });
                break;
            }
            item = stream.next() => match item {
                None => break,
                Some(Ok(chunk)) => {
                    if tx.send(chunk).await.is_err() {
                        break; // the writer failed; its error is below
                    }
                }
                Some(Err(e)) => {
                    broke = Some(e);
                    break;
                }
            }
        }
    }
    drop(tx);
    match handle.await {
        Ok(Ok(w)) => match broke {
            None => PumpEnd::Ended(w),
            Some(e) if e.keeps_partial() => PumpEnd::Interrupted(w, e),
            Some(e) => PumpEnd::Failed(e),
        },
        Ok(Err(e)) => PumpEnd::Failed(e),
        Err(source) => PumpEnd::Failed(ModelError::Worker {
            what: "the pack writer",
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Install;
    use bytes::Bytes;
    use pocket_models::{Catalog, PACK_PREFIX_LEN};
    use pocket_trust::{Envelope, Role, SecretKey};
    use std::collections::VecDeque;
    use std::path::Path;
    use std::sync::{Arc, Mutex};
    use std::time::{Instant, SystemTime};

    /// What one request to a [`Scripted`] source does.
    #[derive(Debug, Clone, Copy)]
    enum Reply {
        /// Sends the pack from the asked offset to its end.
        Whole,
        /// Sends this many bytes, then closes the connection.
        Cut(usize),
        /// Sends this many bytes, then fails as a broken connection does.
        Break(usize),
        /// Sends this many bytes, then nothing, never ending.
        Stall(usize),
        /// Sends the pack from its first byte whatever was asked.
        FromStart,
        /// Sends the rest of the pack with the byte at this offset changed.
        Flip(usize),
        /// Refuses the request.
        Refuse(fn() -> ModelError),
    }

    /// A source that answers each request as its script says, then sends
    /// whole packs, and remembers the offsets asked for.
    struct Scripted {
        pack: Bytes,
        script: Mutex<VecDeque<Reply>>,
        asked: Mutex<Vec<u64>>,
    }

    impl Scripted {
        fn new(pack: &[u8], script: &[Reply]) -> Scripted {
            Scripted {
                pack: Bytes::copy_from_slice(pack),
                script: Mutex::new(script.iter().cloned().collect()),
                asked: Mutex::new(Vec::new()),
            }
        }

        fn asked(&self) -> Vec<u64> {
            self.asked.lock().unwrap().clone()
        }
    }

    fn chunks(data: Bytes) -> Vec<Result<Bytes, ModelError>> {
        (0..data.len())
            .step_by(4096)
            .map(|i| Ok(data.slice(i..(i + 4096).min(data.len()))))
            .collect()
    }

    impl Fetch for Scripted {
        fn open(
            &self,
            _rel: &str,
            offset: u64,
            size: u64,
        ) -> impl Future<Output = Result<ByteStream, ModelError>> + Send {
            assert_eq!(size, self.pack.len() as u64);
            self.asked.lock().unwrap().push(offset);
            let reply = self.script.lock().unwrap().pop_front();
            let rest = self.pack.slice(offset as usize..);
            let stream: Result<ByteStream, ModelError> = match reply.unwrap_or(Reply::Whole) {
                Reply::Whole => Ok(Box::pin(futures_util::stream::iter(chunks(rest)))),
                Reply::Cut(n) => Ok(Box::pin(futures_util::stream::iter(chunks(
                    rest.slice(..n),
                )))),
                Reply::Break(n) => {
                    let mut items = chunks(rest.slice(..n));
                    items.push(Err(ModelError::ClosedEarly {
                        at: offset + n as u64,
                        size,
                    }));
                    Ok(Box::pin(futures_util::stream::iter(items)))
                }
                Reply::Stall(n) => Ok(Box::pin(
                    futures_util::stream::iter(chunks(rest.slice(..n)))
                        .chain(futures_util::stream::pending()),
                )),
                Reply::FromStart => Ok(Box::pin(futures_util::stream::iter(chunks(
                    self.pack.clone(),
                )))),
                Reply::Flip(at) => {
                    let mut bytes = rest.to_vec();
                    bytes[at - offset as usize] ^= 0x20;
                    Ok(Box::pin(futures_util::stream::iter(chunks(bytes.into()))))
                }
                Reply::Refuse(error) => Err(error()),
            };
            std::future::ready(stream)
        }
    }

    /// A signed pack of two files, its catalog entry, a box's store and
    /// keyring that trust it.
    struct Setup {
        _dir: tempfile::TempDir,
        pack: Vec<u8>,
        entry: CatalogEntry,
        store: Store,
        keyring: Keyring,
        partial: PathBuf,
    }

    fn keygen(dir: &Path) -> (PathBuf, PathBuf) {
        SecretKey::generate().save(dir).unwrap()
    }

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn setup() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let at = |p: &str| dir.path().join(p);
        let (root_key, root_pub) = keygen(&at("keys"));
        let (models_key, models_pub) = keygen(&at("keys"));
        let (_, updates_pub) = keygen(&at("keys"));
        pocket_publish::keyring_create(
            &[
                (Role::Root, vec![root_pub]),
                (Role::Models, vec![models_pub]),
                (Role::Updates, vec![updates_pub]),
            ],
            &[],
            &[root_key],
            "1",
            &at("keyring"),
        )
        .unwrap();
        std::fs::create_dir_all(at("files")).unwrap();
        std::fs::write(at("files/model.onnx"), noise(300_000, 1)).unwrap();
        std::fs::write(at("files/weights.bin"), noise(200_000, 2)).unwrap();
        let spec = pocket_publish::PackSpec {
            name: "tiny".into(),
            version: "1.0".into(),
            description: "a pack for the install steps".into(),
            entry: None,
            memory_bytes: None,
            files: vec![
                ("model.onnx".into(), at("files/model.onnx")),
                ("weights.bin".into(), at("files/weights.bin")),
            ],
            llm: None,
        };
        std::fs::create_dir_all(at("packs")).unwrap();
        let keys = [models_key];
        let now = SystemTime::now();
        pocket_publish::model_pack(&spec, &keys, None, &at("packs/tiny-1.0.pack"), now).unwrap();
        pocket_publish::catalog_build(&at("packs"), &keys, "30d", "1", &at("site"), now).unwrap();
        let catalog = std::fs::read(at("site").join(pocket_models::CATALOG_FILE)).unwrap();
        let entry = Envelope::from_bytes("catalog", &catalog)
            .unwrap()
            .peek::<Catalog>()
            .unwrap()
            .body
            .models
            .remove(0);
        Setup {
            pack: std::fs::read(at("packs/tiny-1.0.pack")).unwrap(),
            entry,
            store: Store::open(&at("data")).unwrap(),
            keyring: Keyring::load_dir(&at("keyring")).unwrap(),
            partial: at("data/partial-tiny"),
            _dir: dir,
        }
    }

    impl Setup {
        /// What the engine's install opens: the box's writer over the
        /// partial directory, with what an earlier run left there.
        fn writer(&self) -> impl Future<Output = Result<PackWriter, ModelError>> {
            let limits = Limits {
                mem_total: None,
                reserve_bytes: 0,
            };
            resumed_writer(
                self.store.clone(),
                self.partial.clone(),
                self.keyring.clone(),
                self.entry.clone(),
                limits,
            )
        }

        /// Where the pack's first file starts.
        fn payload(&self) -> usize {
            PACK_PREFIX_LEN + self.entry.pack.header_size as usize
        }

        async fn fetch(
            &self,
            source: &Scripted,
            job: &Job,
            attempts: u32,
        ) -> Result<(), ModelError> {
            let retry = Retry {
                attempts,
                backoff: Duration::from_millis(1),
            };
            let writer = fetch_pack(source, &self.entry, job, retry, || self.writer()).await?;
            assert_eq!(writer.pos(), self.pack.len() as u64);
            let (manifest, _) = writer.finish()?;
            for f in &manifest.body.files {
                assert!(self.store.has_blob(&f.sha256), "{} is stored", f.path);
            }
            Ok(())
        }

        fn stored_nothing(&self) -> bool {
            self.entry_files()
                .iter()
                .all(|sha| !self.store.has_blob(sha))
        }

        fn entry_files(&self) -> Vec<String> {
            let header = &self.pack[PACK_PREFIX_LEN..self.payload()];
            let env = Envelope::from_bytes("header", header).unwrap();
            env.peek::<pocket_models::PackManifest>()
                .unwrap()
                .body
                .files
                .iter()
                .map(|f| f.sha256.clone())
                .collect()
        }
    }

    fn job() -> Arc<Job> {
        Arc::new(Job::new(1, Phase::Queued, Install::default()))
    }

    #[tokio::test]
    async fn a_pack_arrives_in_one_request() {
        let s = setup();
        let source = Scripted::new(&s.pack, &[]);
        let job = job();
        s.fetch(&source, &job, 3).await.unwrap();
        assert_eq!(source.asked(), [0]);
        assert_eq!(job.phase(), Phase::Downloading);
        assert_eq!(job.total(), s.pack.len() as u64);
    }

    #[tokio::test]
    async fn each_broken_connection_resumes_where_the_writer_stands() {
        let s = setup();
        let p = s.payload();
        // Breaks in the prefix, in the header, in the first file, and one
        // that carries the end of the first file and the start of the second.
        let script = [
            Reply::Cut(5),
            Reply::Break(100),
            Reply::Cut(p - 105 + 50_000),
            Reply::Break(300_000),
        ];
        let source = Scripted::new(&s.pack, &script);
        s.fetch(&source, &job(), 5).await.unwrap();
        assert_eq!(
            source.asked(),
            [0, 5, 105, p as u64 + 50_000, p as u64 + 350_000],
        );
    }

    #[tokio::test]
    async fn the_last_allowed_try_gives_up_and_keeps_what_arrived() {
        let s = setup();
        let p = s.payload();
        let source = Scripted::new(
            &s.pack,
            &[Reply::Cut(p + 1000), Reply::Cut(1000), Reply::Cut(1000)],
        );
        let e = s.fetch(&source, &job(), 3).await.unwrap_err();
        assert!(matches!(e, ModelError::ClosedEarly { .. }), "{e}");
        assert!(e.keeps_partial());
        assert_eq!(source.asked().len(), 3);
        // A later install carries on from the kept bytes.
        let later = Scripted::new(&s.pack, &[]);
        s.fetch(&later, &job(), 1).await.unwrap();
        assert_eq!(later.asked(), [(p + 3000) as u64]);
    }

    #[tokio::test]
    async fn a_source_that_ignores_the_offset_fails_the_install_at_once() {
        let s = setup();
        let p = s.payload();
        let source = Scripted::new(&s.pack, &[Reply::Cut(p + 10), Reply::FromStart]);
        let e = s.fetch(&source, &job(), 5).await.unwrap_err();
        assert!(!e.keeps_partial(), "{e}");
        assert_eq!(e.name(), "Corrupt", "{e}");
        assert_eq!(source.asked().len(), 2, "no further try after bad bytes");
        assert!(s.stored_nothing());
    }

    #[tokio::test]
    async fn a_changed_byte_in_either_file_or_the_header_is_refused() {
        let s = setup();
        let p = s.payload();
        for at in [PACK_PREFIX_LEN + 20, p + 7, p + 300_000 + 199_999] {
            let _ = std::fs::remove_dir_all(&s.partial);
            let source = Scripted::new(&s.pack, &[Reply::Flip(at)]);
            let e = s.fetch(&source, &job(), 5).await.unwrap_err();
            assert!(!e.keeps_partial(), "byte {at}: {e}");
            assert_eq!(source.asked(), [0], "byte {at}: tried once");
        }
        assert!(
            !s.store.has_blob(&s.entry_files()[1]),
            "the file with the changed byte was not stored"
        );
    }

    #[tokio::test]
    async fn a_copy_of_the_wrong_size_is_not_fetched_again() {
        let s = setup();
        let wrong = || ModelError::WrongSize {
            what: "packs/tiny-1.0.pack".into(),
            actual: 1,
            signed: 2,
        };
        let source = Scripted::new(&s.pack, &[Reply::Refuse(wrong)]);
        let e = s.fetch(&source, &job(), 5).await.unwrap_err();
        assert!(matches!(e, ModelError::WrongSize { .. }), "{e}");
        assert_eq!(source.asked(), [0]);
    }

    #[tokio::test]
    async fn a_refused_range_counts_as_a_try() {
        let s = setup();
        let no_range = || ModelError::NoRange {
            url: "http://127.0.0.1/packs/tiny-1.0.pack".into(),
        };
        let script = [Reply::Cut(1000), Reply::Refuse(no_range), Reply::Whole];
        let source = Scripted::new(&s.pack, &script);
        s.fetch(&source, &job(), 3).await.unwrap();
        assert_eq!(source.asked(), [0, 1000, 1000]);
    }

    #[tokio::test]
    async fn cancel_stops_a_stalled_download() {
        let s = setup();
        let source = Scripted::new(&s.pack, &[Reply::Stall(s.payload() + 10)]);
        let job = job();
        let j = job.clone();
        let cancel = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            j.cancel();
        });
        let e = s.fetch(&source, &job, 5).await.unwrap_err();
        cancel.await.unwrap();
        assert!(matches!(e, ModelError::Cancelled { .. }), "{e}");
        assert!(!e.keeps_partial());
    }

    #[tokio::test]
    async fn cancel_ends_the_wait_between_tries() {
        let s = setup();
        let source = Scripted::new(&s.pack, &[Reply::Cut(100)]);
        let job = job();
        let retry = Retry {
            attempts: 5,
            backoff: Duration::from_secs(600),
        };
        let j = job.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            j.cancel();
        });
        let started = Instant::now();
        let e = fetch_pack(&source, &s.entry, &job, retry, || s.writer())
            .await
            .err()
            .unwrap();
        assert!(matches!(e, ModelError::Cancelled { .. }), "{e}");
        assert!(started.elapsed() < Duration::from_secs(60));
        assert_eq!(source.asked(), [0]);
    }

    #[tokio::test]
    async fn a_damaged_partial_file_is_fetched_again_from_its_start() {
        let s = setup();
        let p = s.payload();
        let source = Scripted::new(&s.pack, &[Reply::Cut(p + 5000)]);
        s.fetch(&source, &job(), 1).await.unwrap_err();
        // What a torn write leaves: the right length, a wrong byte.
        let part = s.partial.join("0.part");
        let mut bytes = std::fs::read(&part).unwrap();
        assert_eq!(bytes.len(), 5000);
        bytes[4000] ^= 1;
        std::fs::write(&part, bytes).unwrap();
        let again = Scripted::new(&s.pack, &[]);
        s.fetch(&again, &job(), 3).await.unwrap();
        assert_eq!(again.asked(), [(p + 5000) as u64, p as u64]);
    }

    #[test]
    fn the_wait_between_tries_doubles_up_to_sixteen_times() {
        let retry = Retry {
            attempts: 10,
            backoff: Duration::from_millis(500),
        };
        let waits: Vec<u64> = (1..=7).map(|n| retry.wait(n).as_millis() as u64).collect();
        assert_eq!(waits, [500, 1000, 2000, 4000, 8000, 8000, 8000]);
    }
}
