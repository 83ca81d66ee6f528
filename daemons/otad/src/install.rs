//! The install stream: each chunk is read, checked against its signed hash
//! and only then written to the slot. One thread reads; a worker per core
//! checks and writes, so hashing runs on every core. Only the contiguous
//! prefix of written chunks is ever checkpointed. Progress becomes durable (slot
//! synced, then the checkpoint committed) every `checkpoint_bytes`.

use crate::error::UpdateError;
use crate::source::{Reader, Source};
use crate::state::State;
use pocket_ota::{BundleError, BundleManifest};
use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Mutex;

/// What only a system update has beside the common job.
#[derive(Debug)]
pub struct Update {
    /// Where the bundle comes from, as the bus shows it.
    pub source: String,
    /// The bundle's version, once its header is verified.
    pub version: Mutex<String>,
    /// The slot being written, once chosen.
    pub slot: Mutex<String>,
}

impl Update {
    pub fn new(source: &str) -> Update {
        Update {
            source: source.to_string(),
            version: Mutex::new(String::new()),
            slot: Mutex::new(String::new()),
        }
    }
}

/// One install, as the bus sees it.
pub type Job = pocket_daemon::job::Job<Update>;

/// Ends a job with the outcome of its install.
pub fn finish(job: &Job, result: Result<(), &UpdateError>) {
    job.finish(result.map_err(|e| pocket_daemon::job::Failure::new(e.name(), e.to_string())));
}

/// Which chunks of the payload being written are on the slot: everything
/// before `next`, and `finished` beyond it (written out of order by the
/// workers); `since` bytes of the prefix are not yet synced.
struct Progress {
    finished: BTreeSet<u64>,
    next: u64,
    since: u64,
}

/// Everything the stream needs to write a verified bundle into a slot.
pub struct Stream<'a> {
    pub source: &'a Source,
    pub manifest: &'a BundleManifest,
    pub header_len: u64,
    /// One device per payload, in manifest order.
    pub devices: &'a [PathBuf],
    pub state: &'a State,
    pub job: &'a Job,
    pub checkpoint_bytes: u64,
    pub attempts: u32,
}

impl Stream<'_> {
    /// Writes from chunk `chunk` of payload `payload` to the end.
    pub fn run(&self, payload: usize, chunk: u64) -> Result<(), UpdateError> {
        let m = self.manifest;
        let done: u64 = m.payloads[..payload].iter().map(|p| p.size).sum::<u64>()
            + (chunk * m.chunk_size).min(m.payloads.get(payload).map_or(0, |p| p.size));
        self.job
            .begin(pocket_proto::job::Phase::Writing, done, m.total_bytes());
        let spans = m.spans(self.header_len);
        for (pi, (p, span)) in m.payloads.iter().zip(&spans).enumerate().skip(payload) {
            let first = if pi == payload { chunk } else { 0 };
            self.payload(pi, p, span.offset, first)?;
        }
        Ok(())
    }

    fn payload(
        &self,
        pi: usize,
        p: &pocket_ota::Payload,
        offset: u64,
        first: u64,
    ) -> Result<(), UpdateError> {
        let path = &self.devices[pi];
        let dev = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| UpdateError::io(format!("opening slot device {}", path.display()), e))?;
        let n = p.chunks.len() as u64;
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 4));
        let failed = AtomicBool::new(false);
        let progress = Mutex::new(Progress {
            finished: BTreeSet::new(),
            next: first,
            since: 0,
        });
        let (tx, rx) = mpsc::sync_channel::<(u64, Vec<u8>)>(2 * workers);
        let (back_tx, back_rx) = mpsc::channel::<Vec<u8>>();
        let rx = Mutex::new(rx);
        std::thread::scope(|s| {
            let (dev, failed, progress, rx) = (&dev, &failed, &progress, &rx);
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    let back_tx = back_tx.clone();
                    s.spawn(move || {
                        let r = self.verify_and_write(pi, p, dev, path, rx, progress, &back_tx);
                        if r.is_err() {
                            failed.store(true, Ordering::Relaxed);
                        }
                        r
                    })
                })
                .collect();
            drop(back_tx);
            let read = self.read_chunks(p, offset, first, n, tx, back_rx, failed);
            let mut written = Ok(());
            for h in handles {
                let r = h.join().expect("slot writer thread");
                if written.is_ok() {
                    written = r;
                }
            }
            // A failed check or write explains a stopped read better.
            written.and(read)
        })?;
        let wio = |e| UpdateError::io(format!("writing slot device {}", path.display()), e);
        dev.sync_data().map_err(wio)?;
        self.state.checkpoint(pi + 1, 0)
    }

    /// One of the workers: takes chunks as they are read, checks each
    /// against its signed hash, writes it, and makes the contiguous prefix
    /// durable every `checkpoint_bytes`.
    #[allow(clippy::too_many_arguments)]
    fn verify_and_write(
        &self,
        pi: usize,
        p: &pocket_ota::Payload,
        dev: &std::fs::File,
        path: &std::path::Path,
        rx: &Mutex<mpsc::Receiver<(u64, Vec<u8>)>>,
        progress: &Mutex<Progress>,
        back: &mpsc::Sender<Vec<u8>>,
    ) -> Result<(), UpdateError> {
        let m = self.manifest;
        let wio = |e| UpdateError::io(format!("writing slot device {}", path.display()), e);
        loop {
            let next = rx.lock().expect("chunk queue").recv();
            let Ok((idx, buf)) = next else {
                return Ok(());
            };
            pocket_ota::check_chunk(p, idx, &buf)?;
            dev.write_all_at(&buf, idx * m.chunk_size).map_err(wio)?;
            // Writeback starts now, so a checkpoint's sync (and the last
            // one) waits only for what is still in flight.
            pocket_daemon::start_writeback(dev, idx * m.chunk_size, buf.len() as u64);
            self.job.add_done(buf.len() as u64);
            let mut pr = progress.lock().expect("progress");
            pr.finished.insert(idx);
            loop {
                let k = pr.next;
                if !pr.finished.remove(&k) {
                    break;
                }
                pr.next = k + 1;
                pr.since += m.chunk_len(p, k);
            }
            if pr.since >= self.checkpoint_bytes {
                dev.sync_data().map_err(wio)?;
                self.state.checkpoint(pi, pr.next)?;
                pr.since = 0;
            }
            drop(pr);
            let _ = back.send(buf);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn read_chunks(
        &self,
        p: &pocket_ota::Payload,
        offset: u64,
        first: u64,
        n: u64,
        tx: mpsc::SyncSender<(u64, Vec<u8>)>,
        back: mpsc::Receiver<Vec<u8>>,
        failed: &AtomicBool,
    ) -> Result<(), UpdateError> {
        let m = self.manifest;
        let mut attempts_left = self.attempts.max(1);
        let mut reader: Option<Reader> = None;
        let mut idx = first;
        while idx < n {
            if self.job.is_cancelled() {
                return Err(UpdateError::Cancelled);
            }
            if failed.load(Ordering::Relaxed) {
                return Ok(()); // a worker's error is the one to report
            }
            let want = m.chunk_len(p, idx) as usize;
            let mut buf = back.try_recv().unwrap_or_default();
            buf.resize(want, 0);
            let r = match reader.as_mut() {
                Some(r) => r,
                None => reader.insert(self.source.open_at(offset + idx * m.chunk_size)?.0),
            };
            let got = match pocket_ota::read_full(r, &mut buf) {
                Ok(got) => got,
                Err(e) => match self.source {
                    Source::File { name, .. } => {
                        return Err(UpdateError::io(format!("reading {name}"), e))
                    }
                    Source::Http { .. } => {
                        attempts_left -= 1;
                        if attempts_left == 0 {
                            return Err(UpdateError::Network(format!(
                                "fetching {}: {e}",
                                self.source.describe()
                            )));
                        }
                        tracing::warn!(
                            "download broke at payload {} chunk {idx}: {e}; resuming",
                            p.name
                        );
                        reader = None;
                        continue;
                    }
                },
            };
            if got < want {
                if matches!(self.source, Source::Http { .. }) && attempts_left > 1 {
                    attempts_left -= 1;
                    tracing::warn!(
                        "download ended early at payload {} chunk {idx}; resuming",
                        p.name
                    );
                    reader = None;
                    continue;
                }
                return Err(BundleError::Truncated {
                    payload: p.name.clone(),
                    got: idx * m.chunk_size + got as u64,
                    expected: p.size,
                }
                .into());
            }
            if tx.send((idx, buf)).is_err() {
                return Ok(()); // the writer stopped; its error is the one to report
            }
            idx += 1;
        }
        Ok(())
    }
}
