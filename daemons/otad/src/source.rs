//! Where a bundle comes from: a file on the box (a USB stick, an upload),
//! which the caller opened and passes as a descriptor, or an HTTP(S) URL
//! read with Range requests. Either way the installer asks for the header,
//! the bundle's length, and a reader from any offset.
//!
//! otad never opens a path a caller names: it runs as root, and a path
//! could name a device (`/dev/watchdog`) or a FIFO. A descriptor carries
//! the caller's own right to read, and must be a regular file.

use crate::error::UpdateError;
use futures_util::TryStreamExt;
use pocket_ota::BundleError;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

pub enum Source {
    /// A regular file the caller opened, and what it was called then.
    File {
        file: Arc<std::fs::File>,
        name: String,
    },
    Http {
        url: String,
        client: reqwest::Client,
        rt: tokio::runtime::Handle,
    },
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

pub type Reader = Box<dyn Read + Send>;

fn net(url: &str, e: impl std::fmt::Display) -> UpdateError {
    UpdateError::Network(format!("fetching {url}: {e}"))
}

impl Source {
    /// Must be called inside the tokio runtime (HTTP uses it).
    pub fn parse(source: &str) -> Result<Source, UpdateError> {
        if source.starts_with("http://") || source.starts_with("https://") {
            let client = reqwest::Client::builder()
                .connect_timeout(std::time::Duration::from_secs(15))
                .build()
                .map_err(|e| net(source, e))?;
            return Ok(Source::Http {
                url: source.to_string(),
                client,
                rt: tokio::runtime::Handle::current(),
            });
        }
        Err(UpdateError::InvalidArgument(format!(
            "{source:?} is not an http(s):// URL; a bundle on the box is passed as an open file (InstallFile), as `pocketctl update install PATH` does"
        )))
    }

    /// A bundle file the caller opened: a regular file, read from where
    /// the caller's descriptor points, never reopened by name.
    pub fn file(file: std::fs::File) -> Result<Source, UpdateError> {
        let meta = file
            .metadata()
            .map_err(|e| UpdateError::io("the bundle's descriptor", e))?;
        if !meta.is_file() {
            return Err(UpdateError::InvalidArgument(
                "the bundle's descriptor is not a regular file".into(),
            ));
        }
        use std::os::fd::AsRawFd;
        let name = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "an open file".into());
        Ok(Source::File {
            file: Arc::new(file),
            name,
        })
    }

    pub fn describe(&self) -> String {
        match self {
            Source::File { name, .. } => format!("file {name}"),
            Source::Http { url, .. } => url.clone(),
        }
    }

    /// A reader from `offset` to the end of the bundle, and the bundle's
    /// whole length.
    pub fn open_at(&self, offset: u64) -> Result<(Reader, u64), UpdateError> {
        match self {
            Source::File { file, name } => {
                let len = file
                    .metadata()
                    .map_err(|e| UpdateError::io(format!("reading {name}"), e))?
                    .len();
                Ok((
                    Box::new(FileAt {
                        file: file.clone(),
                        pos: offset,
                    }),
                    len,
                ))
            }
            Source::Http { url, client, rt } => {
                let resp = rt.block_on(
                    client
                        .get(url)
                        .header(reqwest::header::RANGE, format!("bytes={offset}-"))
                        .send(),
                );
                let resp = resp.map_err(|e| net(url, e))?;
                let status = resp.status();
                if !status.is_success() {
                    return Err(net(url, format!("server answered {status}")));
                }
                let partial = status == reqwest::StatusCode::PARTIAL_CONTENT;
                let header = |name| {
                    resp.headers()
                        .get(name)
                        .and_then(|v: &reqwest::header::HeaderValue| v.to_str().ok())
                        .map(str::to_string)
                };
                let total = if partial {
                    header(reqwest::header::CONTENT_RANGE)
                        .and_then(|r| r.rsplit_once('/').and_then(|(_, t)| t.parse().ok()))
                } else {
                    header(reqwest::header::CONTENT_LENGTH).and_then(|l| l.parse().ok())
                };
                let total = total
                    .ok_or_else(|| net(url, "the server does not say how long the bundle is"))?;
                let stream = resp.bytes_stream().map_err(std::io::Error::other);
                let reader = tokio_util::io::StreamReader::new(stream);
                let mut reader: Reader = Box::new(tokio_util::io::SyncIoBridge::new_with_handle(
                    reader,
                    rt.clone(),
                ));
                if !partial && offset > 0 {
                    // The server ignored the range: skip what we have.
                    std::io::copy(&mut (&mut reader).take(offset), &mut std::io::sink())
                        .map_err(|e| net(url, e))?;
                }
                Ok((reader, total))
            }
        }
    }

    /// The bundle's signed header (not yet verified) and its whole length.
    pub fn header(&self) -> Result<(Vec<u8>, u64), UpdateError> {
        let (mut r, len) = self.open_at(0)?;
        let header = pocket_ota::read_header(&mut r).map_err(|e| match (e, self) {
            (BundleError::Io(io), Source::Http { url, .. }) => net(url, io),
            (e, _) => e.into(),
        })?;
        Ok((header, len))
    }
}

/// A reader of a shared file from its own offset (`pread`): readers of one
/// descriptor never move each other's position.
struct FileAt {
    file: Arc<std::fs::File>,
    pos: u64,
}

impl Read for FileAt {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}
