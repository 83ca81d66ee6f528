//! Where a bundle comes from: a file on the box (a USB stick, an upload)
//! or an HTTP(S) URL read with Range requests. Either way the installer
//! asks for the header, the bundle's length, and a reader from any offset.

use crate::error::UpdateError;
use futures_util::TryStreamExt;
use pocket_ota::BundleError;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;

pub enum Source {
    File(PathBuf),
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
        let path = PathBuf::from(source);
        if !path.is_absolute() {
            return Err(UpdateError::InvalidArgument(format!(
                "{source:?} is neither an http(s):// URL nor an absolute path"
            )));
        }
        Ok(Source::File(path))
    }

    pub fn describe(&self) -> String {
        match self {
            Source::File(p) => p.display().to_string(),
            Source::Http { url, .. } => url.clone(),
        }
    }

    /// A reader from `offset` to the end of the bundle, and the bundle's
    /// whole length.
    pub fn open_at(&self, offset: u64) -> Result<(Reader, u64), UpdateError> {
        match self {
            Source::File(path) => {
                let io = |e| UpdateError::io(format!("reading {}", path.display()), e);
                let mut f = std::fs::File::open(path).map_err(io)?;
                let len = f.metadata().map_err(io)?.len();
                f.seek(SeekFrom::Start(offset)).map_err(io)?;
                Ok((Box::new(f), len))
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
