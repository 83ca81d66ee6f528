//! Catalog sources (HTTP base URLs and local directories such as a mounted
//! USB stick) and reading bytes from them.

use crate::error::ModelError;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use pocket_daemon::files::{open_regular, read_capped};
use pocket_models::{Catalog, CatalogEntry, CATALOG_FILE};
use pocket_trust::{Envelope, Keyring, VersionFloors, KEYRING_FILE, METADATA_LIMIT};
use std::path::PathBuf;
use std::pin::Pin;
use std::time::SystemTime;

pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, ModelError>> + Send>>;

#[derive(Debug, Clone)]
pub enum Source {
    Http(reqwest::Url),
    Dir(PathBuf),
}

impl Source {
    pub fn parse(text: &str) -> Result<Source, ModelError> {
        if text.starts_with("http://") || text.starts_with("https://") {
            let mut s = text.to_string();
            if !s.ends_with('/') {
                s.push('/');
            }
            reqwest::Url::parse(&s)
                .map(Source::Http)
                .map_err(|source| ModelError::BadCatalogUrl {
                    text: text.to_string(),
                    source,
                })
        } else {
            Ok(Source::Dir(PathBuf::from(
                text.strip_prefix("file://").unwrap_or(text),
            )))
        }
    }

    fn url(&self, base: &reqwest::Url, rel: &str) -> Result<reqwest::Url, ModelError> {
        base.join(rel).map_err(|source| ModelError::BadPath {
            rel: rel.to_string(),
            source,
        })
    }

    /// Reads a small file (at most [`METADATA_LIMIT`] bytes); `None` when the
    /// source does not have it.
    pub async fn read_small(
        &self,
        http: &reqwest::Client,
        rel: &str,
    ) -> Result<Option<Vec<u8>>, ModelError> {
        const LIMIT: u64 = METADATA_LIMIT;
        match self {
            Source::Http(base) => {
                let url = self.url(base, rel)?;
                let resp = http.get(url.clone()).send().await.map_err(net(&url))?;
                if resp.status() == reqwest::StatusCode::NOT_FOUND {
                    return Ok(None);
                }
                let mut resp = resp.error_for_status().map_err(net(&url))?;
                let too_large = || ModelError::TooLarge {
                    what: url.to_string(),
                    limit: LIMIT,
                };
                if resp.content_length().unwrap_or(0) > LIMIT {
                    return Err(too_large());
                }
                // The limit holds while the body streams too (a chunked
                // response has no length up front).
                let mut body = Vec::new();
                while let Some(chunk) = resp.chunk().await.map_err(net(&url))? {
                    if (body.len() + chunk.len()) as u64 > LIMIT {
                        return Err(too_large());
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(Some(body))
            }
            Source::Dir(dir) => {
                let path = dir.join(rel);
                let file = match open_regular(dir, rel) {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => {
                        return Err(ModelError::io(
                            format!("reading {}", path.display()),
                            &path,
                            e,
                        ))
                    }
                };
                let read = tokio::task::spawn_blocking(move || read_capped(file, LIMIT))
                    .await
                    .map_err(|e| ModelError::io("reading", &path, std::io::Error::other(e)))?;
                read.map(Some).map_err(|e| match e.kind() {
                    std::io::ErrorKind::FileTooLarge => ModelError::TooLarge {
                        what: path.display().to_string(),
                        limit: LIMIT,
                    },
                    _ => ModelError::io("reading", &path, e),
                })
            }
        }
    }

    /// Streams `rel` from byte `offset` on (an HTTP Range request). A file
    /// whose total length differs from the signed `size` is refused before
    /// its body is read.
    pub async fn open(
        &self,
        http: &reqwest::Client,
        rel: &str,
        offset: u64,
        size: u64,
    ) -> Result<ByteStream, ModelError> {
        let wrong_size = |what: &str, actual: u64| ModelError::WrongSize {
            what: what.to_string(),
            actual,
            signed: size,
        };
        match self {
            Source::Http(base) => {
                let url = self.url(base, rel)?;
                let mut req = http.get(url.clone());
                if offset > 0 {
                    req = req.header(reqwest::header::RANGE, format!("bytes={offset}-"));
                }
                let resp = req.send().await.map_err(net(&url))?;
                if resp.status() == reqwest::StatusCode::RANGE_NOT_SATISFIABLE {
                    return Err(wrong_size(url.as_str(), offset));
                }
                let resp = resp.error_for_status().map_err(net(&url))?;
                let total = if resp.status() == reqwest::StatusCode::PARTIAL_CONTENT {
                    resp.headers()
                        .get(reqwest::header::CONTENT_RANGE)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.rsplit('/').next())
                        .and_then(|t| t.parse::<u64>().ok())
                } else if offset > 0 {
                    return Err(ModelError::NoRange {
                        url: url.to_string(),
                    });
                } else {
                    resp.content_length()
                };
                if let Some(total) = total.filter(|t| *t != size) {
                    return Err(wrong_size(url.as_str(), total));
                }
                let u = url.clone();
                Ok(Box::pin(
                    resp.bytes_stream().map(move |r| r.map_err(net(&u))),
                ))
            }
            Source::Dir(dir) => {
                use tokio::io::AsyncSeekExt;
                let path = dir.join(rel);
                let mut f = tokio::fs::File::from_std(open_regular(dir, rel).map_err(|e| {
                    ModelError::io(format!("opening {}", path.display()), &path, e)
                })?);
                let total = f
                    .metadata()
                    .await
                    .map_err(|e| ModelError::io("reading", &path, e))?
                    .len();
                if total != size {
                    return Err(wrong_size(&path.display().to_string(), total));
                }
                f.seek(std::io::SeekFrom::Start(offset))
                    .await
                    .map_err(|e| ModelError::io("seeking", &path, e))?;
                Ok(file_stream(f, path))
            }
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Source::Http(u) => u.to_string(),
            Source::Dir(d) => d.display().to_string(),
        }
    }
}

/// Streams a file in large chunks.
pub fn file_stream(f: tokio::fs::File, path: PathBuf) -> ByteStream {
    Box::pin(
        tokio_util::io::ReaderStream::with_capacity(f, 1 << 20)
            .map(move |r| r.map_err(|e| ModelError::io("reading", &path, e))),
    )
}

fn net(url: &reqwest::Url) -> impl Fn(reqwest::Error) -> ModelError + '_ {
    move |source| ModelError::Http {
        url: url.to_string(),
        source,
    }
}

/// The verified catalogs of every configured source.
#[derive(Debug, Default, Clone)]
pub struct Catalogs {
    pub entries: Vec<(Source, CatalogEntry)>,
    /// Sources that could not be used, with the reason.
    pub problems: Vec<String>,
}

impl Catalogs {
    pub fn find(&self, name: &str) -> Option<&(Source, CatalogEntry)> {
        self.entries
            .iter()
            .filter(|(_, e)| e.name == name)
            .max_by(|a, b| a.1.version.cmp(&b.1.version))
    }
}

/// Fetches and verifies each source's catalog, rotating the keyring first
/// when a source offers a newer one that chains from ours.
pub async fn load(
    http: &reqwest::Client,
    sources: &[Source],
    keyring: &mut Keyring,
    floors: &VersionFloors,
) -> Catalogs {
    let mut out = Catalogs::default();
    for source in sources {
        match load_one(http, source, keyring, floors).await {
            Ok(catalog) => out
                .entries
                .extend(catalog.models.into_iter().map(|e| (source.clone(), e))),
            Err(e) => {
                tracing::warn!(source = %source.describe(), "catalog refused: {e}");
                out.problems.push(format!("{}: {e}", source.describe()));
            }
        }
    }
    out
}

async fn load_one(
    http: &reqwest::Client,
    source: &Source,
    keyring: &mut Keyring,
    floors: &VersionFloors,
) -> Result<Catalog, ModelError> {
    let now = SystemTime::now();
    if let Some(bytes) = source.read_small(http, KEYRING_FILE).await? {
        let env = Envelope::from_bytes("keyring", &bytes)?;
        let offered = env.peek::<serde_json::Value>()?.version;
        if offered > *keyring.version() {
            *keyring = floors.rotate(keyring, env)?;
            tracing::info!(version = %keyring.version(), "keyring rotated");
        }
    }
    let bytes = source
        .read_small(http, CATALOG_FILE)
        .await?
        .ok_or_else(|| ModelError::NoCatalog {
            place: source.describe(),
            file: CATALOG_FILE,
        })?;
    let env = Envelope::from_bytes("catalog", &bytes)?;
    let signed = Catalog::verify(keyring, &env, now)?;
    floors.accept(
        &format!("catalog:{}", source.describe()),
        &signed.version,
        &env.digest(),
    )?;
    Ok(signed.body)
}
