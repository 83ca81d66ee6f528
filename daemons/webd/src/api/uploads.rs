//! Packs and update bundles uploaded from the page: streamed to a file
//! under `uploads/`, bounded, and never left behind.

use super::*;

/// Removes uploads a crash or power cut left behind.
pub fn clear_uploads(data_dir: &std::path::Path) {
    if let Ok(dir) = std::fs::read_dir(data_dir.join("uploads")) {
        for e in dir.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// An upload's file, removed when dropped: whatever ends the request (an
/// error, the client hanging up mid-way, or the daemon that reads it
/// having its descriptor), nothing is left.
struct Upload {
    path: std::path::PathBuf,
}

impl Drop for Upload {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Streams a request body into a new file under `uploads/`, up to the
/// configured limit; on any failure nothing is left behind.
async fn receive_upload(app: &App, body: Body, ext: &str) -> ApiResult<Upload> {
    let mut name = [0u8; 12];
    getrandom::fill(&mut name)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal", e.to_string()))?;
    let path = app
        .cfg
        .data_dir
        .join("uploads")
        .join(format!("{}.{ext}", hex::encode(name)));
    let upload = Upload { path };
    let mut stream = body.into_data_stream();
    match write_upload(app, &mut stream, &upload.path).await {
        Ok(n) => {
            tracing::info!("received an upload of {n} bytes");
            Ok(upload)
        }
        Err(e) => {
            // A client still sending would see its connection reset instead
            // of this answer: read (and drop) a bounded rest of the body
            // first.
            let mut rest = 0usize;
            while rest < REFUSED_UPLOAD_DRAIN {
                match stream.next().await {
                    Some(Ok(chunk)) => rest += chunk.len(),
                    _ => break,
                }
            }
            Err(e)
        }
    }
}

/// How much of a refused upload's remaining body is read before answering.
const REFUSED_UPLOAD_DRAIN: usize = 16 << 20;

async fn write_upload(
    app: &App,
    stream: &mut axum::body::BodyDataStream,
    path: &std::path::Path,
) -> ApiResult<u64> {
    let limit = app.cfg.upload_limit_mb.saturating_mul(1 << 20);
    let io_err = |e: std::io::Error| {
        if e.raw_os_error() == Some(28) {
            ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "DiskFull",
                "not enough space on the box for this upload",
            )
        } else {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Io",
                format!("cannot store the upload: {e}"),
            )
        }
    };
    let mut file = tokio::fs::File::create(path).await.map_err(io_err)?;
    let mut n: u64 = 0;
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::bad_request(format!("the upload was cut off: {e}")))?;
        n += chunk.len() as u64;
        if n > limit {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "TooLarge",
                format!("uploads are limited to {} MiB", app.cfg.upload_limit_mb),
            ));
        }
        file.write_all(&chunk).await.map_err(io_err)?;
    }
    if n == 0 {
        return Err(ApiError::bad_request("the upload is empty"));
    }
    file.flush().await.map_err(io_err)?;
    file.sync_all().await.map_err(io_err)?;
    Ok(n)
}

/// Receives an upload and opens it for the daemon that reads it through
/// the descriptor (until its job ends, a restart of webd included); the
/// name goes now.
async fn receive_open(app: &App, body: Body, ext: &str) -> ApiResult<std::fs::File> {
    let upload = receive_upload(app, body, ext).await?;
    let file = std::fs::File::open(&upload.path);
    drop(upload);
    file.map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "Io", e.to_string()))
}

pub(super) async fn upload_model(
    _a: Admin,
    State(app): AppState,
    body: Body,
) -> ApiResult<Json<Value>> {
    let file = receive_open(&app, body, "pack").await?;
    let job = modeld(&app)
        .await?
        .install_file(zbus::zvariant::Fd::from(&file))
        .await
        .map_err(|e| ApiError::from_bus("modeld", e))?;
    tracing::info!("install from an uploaded pack started");
    Ok(Json(json!({ "job": job_id(&job) })))
}

pub(super) async fn upload_update(
    _a: Admin,
    State(app): AppState,
    body: Body,
) -> ApiResult<Json<Value>> {
    let file = receive_open(&app, body, "bundle").await?;
    let job = otad(&app)
        .await?
        .install_file(zbus::zvariant::Fd::from(&file))
        .await
        .map_err(|e| ApiError::from_bus("otad", e))?;
    tracing::info!("update from an uploaded bundle started");
    Ok(Json(json!({ "job": job_id(&job) })))
}
