//! The page and its JSON API. Every response carries a strict content
//! security policy; every request comes from the local network (unless
//! configured otherwise); every change needs a session and its CSRF token.

use crate::auth::{self, SessionKeys};
use crate::error::{ApiError, ApiResult};
use crate::events::{self, job_id};
use crate::App;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequestParts, Path, Request, State};
use axum::http::{header, request::Parts, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use pocket_proto::fresh_proxy;
use pocket_proto::{models, power, runtime, update};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use zbus::zvariant::OwnedObjectPath;

type AppState = State<Arc<App>>;

pub fn router(app: Arc<App>) -> Router {
    let uploads = Router::new()
        .route("/api/models/upload", post(upload_model))
        .route("/api/update/upload", post(upload_update))
        .layer(DefaultBodyLimit::disable());
    Router::new()
        .route("/", get(|| page("text/html; charset=utf-8", PAGE_HTML)))
        .route(
            "/app.js",
            get(|| page("text/javascript; charset=utf-8", PAGE_JS)),
        )
        .route(
            "/style.css",
            get(|| page("text/css; charset=utf-8", PAGE_CSS)),
        )
        .route("/api/session", get(session))
        .route("/api/setup", post(setup))
        .route("/api/login", post(login))
        .route("/api/logout", post(logout))
        .route("/api/events", get(events))
        .route("/api/models", get(models_state))
        .route("/api/models/refresh", post(refresh_catalog))
        .route("/api/models/install", post(install_model))
        .route("/api/models/jobs/{id}/cancel", post(cancel_model_job))
        .route("/api/models/{name}/run", post(run_model))
        .route("/api/models/{name}/remove", post(remove_model))
        .route("/api/power", get(power_state))
        .route("/api/power/profile", post(set_profile))
        .route("/api/power/budget", post(set_budget))
        .route("/api/update", get(update_state))
        .route("/api/update/check", post(check_update))
        .route("/api/update/install", post(install_update))
        .route("/api/update/rollback", post(rollback))
        .route("/api/update/jobs/{id}/cancel", post(cancel_update_job))
        .merge(uploads)
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "NotFound", "no such page or API")
        })
        .layer(middleware::from_fn_with_state(app.clone(), guard))
        .with_state(app)
}

const PAGE_HTML: &str = include_str!("../page/index.html");
const PAGE_JS: &str = include_str!("../page/app.js");
const PAGE_CSS: &str = include_str!("../page/style.css");

async fn page(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// Before any handler: who may connect, under which name, and cross-site
/// requests refused. A change must carry `X-CSRF-Token` (a header a
/// cross-site form cannot send, and a cross-site script cannot without a
/// CORS preflight, which is never granted); handlers that need a session
/// also check its value. Every response, refusals included, carries the
/// security headers.
async fn guard(
    State(app): AppState,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    let mut resp = match admit(&app, peer, &req) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

fn admit(app: &App, peer: SocketAddr, req: &Request) -> ApiResult<()> {
    if app.cfg.local_network_only && !crate::is_local_peer(peer.ip()) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "NotLocal",
            "the dashboard answers only on the box's local network",
        ));
    }
    // A page under another name (DNS rebinding: attacker.example made to
    // point at the box) is a different origin to the browser, and must not
    // be able to talk to the box as if it were the box's own page.
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !crate::net::is_own_host(host, &app.host_names) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "BadHost",
            "open the dashboard by the box's address or name",
        ));
    }
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        same_origin(req.headers())?;
        if !req.headers().contains_key(auth::CSRF_HEADER) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "CsrfFailed",
                "a change needs the X-CSRF-Token header",
            ));
        }
    }
    Ok(())
}

/// An `Origin` header, when a browser sends one, must name this host.
fn same_origin(headers: &HeaderMap) -> ApiResult<()> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, rest)| rest.trim_end_matches('/'));
    match (origin_host, host) {
        (Some(o), Some(h)) if o.eq_ignore_ascii_case(h) => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "CrossOrigin",
            "a change must come from the dashboard's own page",
        )),
    }
}

fn session_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == auth::COOKIE)
        .map(|(_, v)| v.to_string())
}

/// A request from the logged-in admin with the session's CSRF token.
struct Admin {
    token: String,
}

impl FromRequestParts<Arc<App>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> ApiResult<Admin> {
        let token = session_token(&parts.headers).unwrap_or_default();
        let Some(csrf) = app.auth.session(&token) else {
            return Err(login_required());
        };
        let sent = parts
            .headers
            .get(auth::CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !auth::same_secret(sent, &csrf) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "CsrfFailed",
                "the request's CSRF token does not match the session; reload the page",
            ));
        }
        Ok(Admin { token })
    }
}

/// A read: open to anyone on the network, unless `login_to_read`.
struct Reader;

impl FromRequestParts<Arc<App>> for Reader {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> ApiResult<Reader> {
        if app.cfg.login_to_read {
            let token = session_token(&parts.headers).unwrap_or_default();
            app.auth.session(&token).ok_or_else(login_required)?;
        }
        Ok(Reader)
    }
}

fn login_required() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "LoginRequired",
        "log in as admin first",
    )
}

/// A JSON request body, with a clear error when it is not what was asked.
fn body<T: DeserializeOwned>(bytes: &Bytes) -> ApiResult<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("bad request body: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Password {
    password: String,
}

async fn session(State(app): AppState, headers: HeaderMap) -> Json<Value> {
    let token = session_token(&headers).unwrap_or_default();
    let csrf = app.auth.session(&token);
    Json(json!({
        "setup_needed": !app.auth.has_credential(),
        "logged_in": csrf.is_some(),
        "csrf": csrf,
        "login_to_read": app.cfg.login_to_read,
        "min_password": auth::MIN_PASSWORD,
    }))
}

fn logged_in(app: &App, keys: SessionKeys) -> Response {
    (
        [(header::SET_COOKIE, app.auth.cookie(&keys.token))],
        Json(json!({ "csrf": keys.csrf })),
    )
        .into_response()
}

async fn setup(State(app): AppState, bytes: Bytes) -> ApiResult<Response> {
    let p: Password = body(&bytes)?;
    let keys = app.auth.set_initial(p.password).await?;
    Ok(logged_in(&app, keys))
}

async fn login(
    State(app): AppState,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    bytes: Bytes,
) -> ApiResult<Response> {
    let p: Password = body(&bytes)?;
    let keys = app.auth.login(peer.ip(), p.password).await?;
    Ok(logged_in(&app, keys))
}

async fn logout(State(app): AppState, admin: Admin) -> Response {
    app.auth.logout(&admin.token);
    tracing::info!("admin logged out");
    ([(header::SET_COOKIE, app.auth.cookie(""))], Json(json!({}))).into_response()
}

async fn events(
    _r: Reader,
    State(app): AppState,
    headers: HeaderMap,
) -> Sse<impl futures_util::Stream<Item = Result<Event, std::convert::Infallible>>> {
    let rx = app.events.subscribe();
    // Where reading needs a login, the stream ends with the session (it is
    // checked at every event; powerd's come every second).
    let token = app
        .cfg
        .login_to_read
        .then(|| session_token(&headers).unwrap_or_default());
    let stream =
        futures_util::stream::unfold((rx, app, token), |(mut rx, app, token)| async move {
            use tokio::sync::broadcast::error::RecvError;
            let event = match rx.recv().await {
                Ok(text) => Event::default().data(&*text),
                // The page missed some: it reloads everything.
                Err(RecvError::Lagged(_)) => Event::default().data(r#"{"type":"lagged"}"#),
                Err(RecvError::Closed) => return None,
            };
            if token.as_deref().is_some_and(|t| !app.auth.is_live(t)) {
                return None;
            }
            Some((Ok(event), (rx, app, token)))
        });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

// ---- models ----

async fn modeld(app: &App) -> ApiResult<models::Models1Proxy<'static>> {
    fresh_proxy(&app.bus, None)
        .await
        .map_err(|e| ApiError::from_bus("modeld", e))
}

async fn npud(app: &App) -> ApiResult<runtime::Runtime1Proxy<'static>> {
    fresh_proxy(&app.bus, None)
        .await
        .map_err(|e| ApiError::from_bus("npud", e))
}

async fn models_state(_r: Reader, State(app): AppState) -> ApiResult<Json<Value>> {
    let m = modeld(&app).await?;
    let bus_err = |e| ApiError::from_bus("modeld", e);
    let catalog = m.catalog().await.map_err(bus_err)?;
    let installed = m.list().await.map_err(bus_err)?;
    let mut jobs = Vec::new();
    for path in m.jobs().await.map_err(bus_err)? {
        if let Some(j) = events::model_job(&app.bus, &path).await {
            jobs.push(j);
        }
    }
    let (loaded, runtime_status) = match npud(&app).await {
        Ok(rt) => match rt.loaded().await {
            Ok(l) => (l, rt.status().await.unwrap_or_default()),
            Err(e) => (Vec::new(), ApiError::from_bus("npud", e).message),
        },
        Err(e) => (Vec::new(), e.message),
    };
    let installed: Vec<Value> = installed
        .into_iter()
        .map(|i| {
            let l = loaded.iter().find(|l| l.name == i.name);
            json!({
                "name": i.name,
                "version": i.version,
                "description": i.description,
                "size_bytes": i.size_bytes,
                "memory_bytes": i.memory_bytes,
                "installed_at": i.installed_at,
                "loaded": l.is_some(),
                "provider": l.map(|l| l.provider.clone()),
            })
        })
        .collect();
    Ok(Json(json!({
        "catalog": catalog,
        "installed": installed,
        "jobs": jobs,
        "status": m.status().await.unwrap_or_default(),
        "runtime_status": runtime_status,
    })))
}

async fn refresh_catalog(_a: Admin, State(app): AppState) -> ApiResult<Json<Value>> {
    let n = modeld(&app)
        .await?
        .refresh()
        .await
        .map_err(|e| ApiError::from_bus("modeld", e))?;
    tracing::info!("catalogs refreshed from the dashboard");
    Ok(Json(json!({ "models": n })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Name {
    name: String,
}

async fn install_model(_a: Admin, State(app): AppState, bytes: Bytes) -> ApiResult<Json<Value>> {
    let n: Name = body(&bytes)?;
    let path = modeld(&app)
        .await?
        .install(&n.name)
        .await
        .map_err(|e| ApiError::from_bus("modeld", e))?;
    tracing::info!("install of {:?} started from the dashboard", n.name);
    Ok(Json(json!({ "job": job_id(&path) })))
}

/// A job's object path from the id the page has, which must be a plain
/// path element.
fn job_path(prefix: &str, id: &str) -> ApiResult<OwnedObjectPath> {
    let ok = !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    ok.then(|| OwnedObjectPath::try_from(format!("{prefix}/{id}")).ok())
        .flatten()
        .ok_or_else(|| ApiError::bad_request(format!("{id:?} is not a job id")))
}

async fn cancel_model_job(
    _a: Admin,
    State(app): AppState,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let job = job_path(models::JOB_PATH_PREFIX, &id)?;
    cancel_job(
        &app,
        models::BUS_NAME,
        "org.pocketos.Models1.Job",
        &job,
        "modeld",
    )
    .await?;
    tracing::info!("model install job {id} cancelled from the dashboard");
    Ok(Json(json!({})))
}

/// Calls `Cancel` on a daemon's job object; a job that is gone is
/// `NotFound`.
async fn cancel_job(
    app: &App,
    service: &str,
    interface: &str,
    job: &OwnedObjectPath,
    daemon: &str,
) -> ApiResult<()> {
    let proxy = zbus::Proxy::new(&app.bus, service, job.as_str(), interface)
        .await
        .map_err(|e| ApiError::from_bus(daemon, e))?;
    proxy.call::<_, _, ()>("Cancel", &()).await.map_err(|e| {
        let e = ApiError::from_bus(daemon, e);
        if e.name.ends_with("UnknownObject") || e.name.ends_with("UnknownMethod") {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("no job {}", job_id(job)),
            )
        } else {
            e
        }
    })
}

async fn remove_model(
    _a: Admin,
    State(app): AppState,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    modeld(&app)
        .await?
        .remove(&name)
        .await
        .map_err(|e| ApiError::from_bus("modeld", e))?;
    tracing::info!("{name:?} removed from the dashboard");
    app.events.send(json!({ "type": "models-changed" }));
    Ok(Json(json!({})))
}

/// A quick test inference: the model's inputs filled with a fixed pattern,
/// so that a person sees it runs, on which provider, and how fast.
async fn run_model(
    _a: Admin,
    State(app): AppState,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    let rt = npud(&app).await?;
    let bus_err = |e| ApiError::from_bus("npud", e);
    rt.load(&name, "").await.map_err(bus_err)?;
    let spec = rt
        .loaded()
        .await
        .map_err(bus_err)?
        .into_iter()
        .find(|l| l.name == name)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                "Busy",
                format!("{name} was unloaded before it ran; try again"),
            )
        })?;
    let mut inputs = HashMap::new();
    for s in &spec.inputs {
        inputs.insert(s.name.clone(), sample_tensor(s)?);
    }
    let (outputs, provider, latency_ms) = rt.infer(&name, inputs).await.map_err(bus_err)?;
    let mut outs: Vec<Value> = outputs
        .into_iter()
        .map(|(n, t)| json!({ "name": n, "dtype": t.dtype, "shape": t.shape, "first": first_values(&t) }))
        .collect();
    outs.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    app.events.send(json!({ "type": "models-changed" }));
    Ok(Json(json!({
        "name": name,
        "provider": provider,
        "latency_ms": latency_ms,
        "outputs": outs,
    })))
}

/// The most bytes one input of a test run may take.
const SAMPLE_LIMIT: usize = 64 << 20;

/// An input of the model's shape (dynamic dimensions as 1) with a fixed,
/// varied pattern of values.
fn sample_tensor(spec: &runtime::TensorSpec) -> ApiResult<runtime::Tensor> {
    let shape: Vec<i64> = spec
        .shape
        .iter()
        .map(|&d| if d < 1 { 1 } else { d })
        .collect();
    let size = runtime::dtype_size(&spec.dtype).unwrap_or(8);
    let count = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d as usize))
        .filter(|&n| n.saturating_mul(size) <= SAMPLE_LIMIT)
        .ok_or_else(|| {
            ApiError::bad_request(format!("input {} is too large for a test run", spec.name))
        })?;
    let value = |i: usize| ((i % 17) as f64 - 8.0) / 8.0;
    let mut data = Vec::new();
    for i in 0..count {
        match spec.dtype.as_str() {
            "f32" => data.extend_from_slice(&(value(i) as f32).to_le_bytes()),
            "f64" => data.extend_from_slice(&value(i).to_le_bytes()),
            "f16" => data.extend_from_slice(&f16_bits(value(i) as f32).to_le_bytes()),
            "i64" => data.extend_from_slice(&((i % 4) as i64).to_le_bytes()),
            "i32" => data.extend_from_slice(&((i % 4) as i32).to_le_bytes()),
            "i16" | "u16" => data.extend_from_slice(&((i % 4) as u16).to_le_bytes()),
            "i8" | "u8" => data.push((i % 4) as u8),
            "bool" => data.push((i % 2) as u8),
            other => {
                return Err(ApiError::bad_request(format!(
                    "input {} has type {other}, which a test run cannot fill",
                    spec.name
                )))
            }
        }
    }
    Ok(runtime::Tensor {
        dtype: spec.dtype.clone(),
        shape,
        data,
    })
}

/// IEEE half-precision bits of a value in [-1, 1] (normal numbers or zero).
fn f16_bits(v: f32) -> u16 {
    let bits = v.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32 - 127 + 15;
    if v == 0.0 || exp <= 0 {
        return sign;
    }
    sign | ((exp as u16) << 10) | ((bits >> 13) & 0x3ff) as u16
}

/// The first few elements of an output, as numbers.
fn first_values(t: &runtime::Tensor) -> Vec<Value> {
    let n = 6;
    let chunks = |size: usize| t.data.chunks_exact(size).take(n);
    match t.dtype.as_str() {
        "f32" => chunks(4)
            .map(|c| json!(f32::from_le_bytes(c.try_into().unwrap())))
            .collect(),
        "f64" => chunks(8)
            .map(|c| json!(f64::from_le_bytes(c.try_into().unwrap())))
            .collect(),
        "i64" => chunks(8)
            .map(|c| json!(i64::from_le_bytes(c.try_into().unwrap())))
            .collect(),
        "i32" => chunks(4)
            .map(|c| json!(i32::from_le_bytes(c.try_into().unwrap())))
            .collect(),
        "u8" | "bool" => chunks(1).map(|c| json!(c[0])).collect(),
        _ => Vec::new(),
    }
}

// ---- uploads ----

/// Removes uploads a crash or power cut left behind.
pub fn clear_uploads(data_dir: &std::path::Path) {
    if let Ok(dir) = std::fs::read_dir(data_dir.join("uploads")) {
        for e in dir.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// An upload's file, removed when dropped unless kept: whatever ends the
/// request (an error, the client hanging up mid-way), nothing is left.
struct Upload {
    path: std::path::PathBuf,
    keep: bool,
}

impl Upload {
    /// Hands the file over (to a task that removes it later).
    fn keep(mut self) -> std::path::PathBuf {
        self.keep = true;
        self.path.clone()
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
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
    let upload = Upload { path, keep: false };
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

async fn upload_model(_a: Admin, State(app): AppState, body: Body) -> ApiResult<Json<Value>> {
    let upload = receive_upload(&app, body, "pack").await?;
    let file = std::fs::File::open(&upload.path);
    // modeld reads the pack through the descriptor; the name goes now.
    drop(upload);
    let file =
        file.map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "Io", e.to_string()))?;
    let job = modeld(&app)
        .await?
        .install_file(zbus::zvariant::Fd::from(&file))
        .await
        .map_err(|e| ApiError::from_bus("modeld", e))?;
    tracing::info!("install from an uploaded pack started");
    Ok(Json(json!({ "job": job_id(&job) })))
}

// ---- power ----

async fn power_state(_r: Reader, State(app): AppState) -> ApiResult<Json<Value>> {
    events::power_state(&app.bus)
        .await
        .map(Json)
        .map_err(|e| ApiError::from_bus("powerd", e))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Profile {
    profile: String,
}

async fn set_profile(_a: Admin, State(app): AppState, bytes: Bytes) -> ApiResult<Json<Value>> {
    let p: Profile = body(&bytes)?;
    if !["power-saver", "balanced", "performance"].contains(&p.profile.as_str()) {
        return Err(ApiError::bad_request(format!(
            "{:?} is not a profile (power-saver, balanced, performance)",
            p.profile
        )));
    }
    let ppd = power::PowerProfilesProxy::new(&app.bus)
        .await
        .map_err(|e| ApiError::from_bus("powerd", e))?;
    ppd.set_active_profile(&p.profile)
        .await
        .map_err(|e| ApiError::from_bus("powerd", e))?;
    tracing::info!("profile set to {} from the dashboard", p.profile);
    let state = events::power_state(&app.bus)
        .await
        .map_err(|e| ApiError::from_bus("powerd", e))?;
    app.events.send(json!({ "type": "power", "power": state }));
    Ok(Json(state))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Budget {
    watts: f64,
}

async fn set_budget(_a: Admin, State(app): AppState, bytes: Bytes) -> ApiResult<Json<Value>> {
    let b: Budget = body(&bytes)?;
    let p1 = power::Power1Proxy::new(&app.bus)
        .await
        .map_err(|e| ApiError::from_bus("powerd", e))?;
    p1.set_budget(b.watts)
        .await
        .map_err(|e| ApiError::from_bus("powerd", e))?;
    tracing::info!("power budget set to {} W from the dashboard", b.watts);
    let state = events::power_state(&app.bus)
        .await
        .map_err(|e| ApiError::from_bus("powerd", e))?;
    app.events.send(json!({ "type": "power", "power": state }));
    Ok(Json(state))
}

// ---- updates ----

async fn otad(app: &App) -> ApiResult<update::Update1Proxy<'static>> {
    fresh_proxy(&app.bus, None)
        .await
        .map_err(|e| ApiError::from_bus("otad", e))
}

async fn update_state(_r: Reader, State(app): AppState) -> ApiResult<Json<Value>> {
    let u = otad(&app).await?;
    let e = |e| ApiError::from_bus("otad", e);
    let job_path = u.job().await.map_err(e)?;
    let job = if job_path.as_str() == "/" {
        None
    } else {
        events::update_job(&app.bus, &job_path).await
    };
    Ok(Json(json!({
        "booted": u.booted_slot().await.map_err(e)?,
        "primary": u.primary_slot().await.map_err(e)?,
        "version": u.system_version().await.map_err(e)?,
        "operation": u.operation().await.map_err(e)?,
        "health": u.health().await.map_err(e)?,
        "last_error": u.last_error().await.map_err(e)?,
        "status": u.status().await.map_err(e)?,
        "slots": u.slots().await.map_err(e)?,
        "job": job,
    })))
}

async fn check_update(_a: Admin, State(app): AppState) -> ApiResult<Json<Value>> {
    let c = otad(&app)
        .await?
        .check()
        .await
        .map_err(|e| ApiError::from_bus("otad", e))?;
    Ok(Json(json!({
        "available": c.available,
        "version": c.version,
        "current_version": c.current_version,
    })))
}

/// Installs what the update server offers, checked again now.
async fn install_update(_a: Admin, State(app): AppState) -> ApiResult<Json<Value>> {
    let u = otad(&app).await?;
    let e = |e| ApiError::from_bus("otad", e);
    let c = u.check().await.map_err(e)?;
    if !c.available {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "UpToDate",
            format!("no newer system than {} is offered", c.current_version),
        ));
    }
    let job = u.install(&c.source).await.map_err(e)?;
    tracing::info!("update to {} started from the dashboard", c.version);
    Ok(Json(json!({ "job": job_id(&job) })))
}

async fn upload_update(_a: Admin, State(app): AppState, body: Body) -> ApiResult<Json<Value>> {
    let upload = receive_upload(&app, body, "bundle").await?;
    let u = otad(&app).await?;
    let job = u
        .install(&upload.path.to_string_lossy())
        .await
        .map_err(|e| ApiError::from_bus("otad", e))?;
    let path = upload.keep();
    // otad reads the bundle by its path; it goes once the job has ended.
    let bus = app.bus.clone();
    let job_for_cleanup = job.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            match events::update_job(&bus, &job_for_cleanup).await {
                Some(j) if !update::phase::is_terminal(j["phase"].as_str().unwrap_or("")) => {}
                _ => break,
            }
        }
        let _ = tokio::fs::remove_file(&path).await;
    });
    tracing::info!("update from an uploaded bundle started");
    Ok(Json(json!({ "job": job_id(&job) })))
}

async fn rollback(_a: Admin, State(app): AppState) -> ApiResult<Json<Value>> {
    let slot = otad(&app)
        .await?
        .rollback()
        .await
        .map_err(|e| ApiError::from_bus("otad", e))?;
    tracing::info!("rolled back from the dashboard: slot {slot} boots next");
    Ok(Json(json!({ "primary": slot })))
}

async fn cancel_update_job(
    _a: Admin,
    State(app): AppState,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let job = job_path(update::JOB_PATH_PREFIX, &id)?;
    cancel_job(
        &app,
        update::BUS_NAME,
        "org.pocketos.Update1.Job",
        &job,
        "otad",
    )
    .await?;
    tracing::info!("update job {id} cancelled from the dashboard");
    Ok(Json(json!({})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_must_match_host() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("box.local:8080"));
        assert!(same_origin(&h).is_ok(), "no Origin (not a browser)");
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://box.local:8080"),
        );
        assert!(same_origin(&h).is_ok());
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        assert_eq!(same_origin(&h).unwrap_err().name, "CrossOrigin");
        h.insert(header::ORIGIN, HeaderValue::from_static("null"));
        assert!(same_origin(&h).is_err());
    }

    #[test]
    fn job_ids_are_plain() {
        assert!(job_path("/a/jobs", "7").is_ok());
        assert!(job_path("/a/jobs", "../x").is_err());
        assert!(job_path("/a/jobs", "").is_err());
    }

    #[test]
    fn half_floats() {
        assert_eq!(f16_bits(0.0), 0);
        assert_eq!(f16_bits(1.0), 0x3c00);
        assert_eq!(f16_bits(-0.5), 0xb800);
        assert_eq!(f16_bits(0.125), 0x3000);
    }

    #[test]
    fn sample_inputs_fill_the_shape() {
        let spec = runtime::TensorSpec {
            name: "x".into(),
            dtype: "f32".into(),
            shape: vec![-1, 3],
        };
        let t = sample_tensor(&spec).unwrap();
        assert_eq!(t.shape, vec![1, 3]);
        assert_eq!(t.data.len(), 12);
        let huge = runtime::TensorSpec {
            shape: vec![1 << 20, 1 << 20],
            ..spec
        };
        assert!(sample_tensor(&huge).is_err());
    }
}
