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
use pocket_proto::{models as model_bus, power as power_bus, runtime, update as update_bus};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use zbus::zvariant::OwnedObjectPath;

mod keys;
mod llm;
mod models;
mod ollama;
mod openai;
mod power;
mod session;
mod update;
mod uploads;

pub(crate) use llm::Metrics;

pub use uploads::clear_uploads;

type AppState = State<Arc<App>>;

pub fn router(app: Arc<App>) -> Router {
    let uploads = Router::new()
        .route("/api/models/upload", post(uploads::upload_model))
        .route("/api/update/upload", post(uploads::upload_update))
        .layer(DefaultBodyLimit::disable());
    let page = Router::new()
        .route("/", get(|| page("text/html; charset=utf-8", PAGE_HTML)))
        .route(
            "/app.js",
            get(|| page("text/javascript; charset=utf-8", PAGE_JS)),
        )
        .route(
            "/style.css",
            get(|| page("text/css; charset=utf-8", PAGE_CSS)),
        )
        .route("/api/session", get(session::session))
        .route("/api/setup", post(session::setup))
        .route("/api/login", post(session::login))
        .route("/api/logout", post(session::logout))
        .route("/api/events", get(session::events))
        .route("/api/models", get(models::models_state))
        .route("/api/models/refresh", post(models::refresh_catalog))
        .route("/api/models/install", post(models::install_model))
        .route(
            "/api/models/jobs/{id}/cancel",
            post(models::cancel_model_job),
        )
        .route("/api/models/{name}/run", post(models::run_model))
        .route("/api/models/{name}/remove", post(models::remove_model))
        .route("/api/power", get(power::power_state))
        .route("/api/power/profile", post(power::set_profile))
        .route("/api/power/budget", post(power::set_budget))
        .route("/api/update", get(update::update_state))
        .route("/api/update/check", post(update::check_update))
        .route("/api/update/install", post(update::install_update))
        .route("/api/update/rollback", post(update::rollback))
        .route(
            "/api/update/jobs/{id}/cancel",
            post(update::cancel_update_job),
        )
        .route("/api/keys", get(keys::list).post(keys::create))
        .route("/api/keys/{id}/revoke", post(keys::revoke))
        .merge(uploads)
        .layer(middleware::from_fn_with_state(app.clone(), guard));
    page.merge(llm_routes(&app))
        .fallback(not_found)
        .layer(middleware::from_fn(security_headers))
        .with_state(app)
}

/// The LLM API alone, for `api_listen`: `GET /` answers as Ollama's does.
pub fn api_router(app: Arc<App>) -> Router {
    llm_routes(&app)
        .route("/", get(ollama::running).head(ollama::running))
        .fallback(not_found)
        .layer(middleware::from_fn(security_headers))
        .with_state(app)
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "NotFound", "no such page or API")
}

/// The largest LLM API request body.
const API_BODY_LIMIT: usize = 4 << 20;

/// The OpenAI and Ollama routes, behind [`api_guard`].
fn llm_routes(app: &Arc<App>) -> Router<Arc<App>> {
    Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/models", get(openai::list_models))
        .route("/v1/models/{id}", get(openai::get_model))
        .route("/api/chat", post(ollama::chat))
        .route("/api/generate", post(ollama::generate))
        .route("/api/tags", get(ollama::tags).head(ollama::tags))
        .route("/api/show", post(ollama::show))
        .route("/api/ps", get(ollama::ps))
        .route("/api/pull", post(ollama::pull))
        .route("/api/delete", axum::routing::delete(ollama::delete))
        .route("/api/version", get(ollama::version))
        .route("/health", get(llm::health))
        .route("/metrics", get(llm::metrics))
        .layer(DefaultBodyLimit::max(API_BODY_LIMIT))
        .route_layer(middleware::from_fn_with_state(app.clone(), api_guard))
}

const PAGE_HTML: &str = include_str!("../../page/index.html");
const PAGE_JS: &str = include_str!("../../page/app.js");
const PAGE_CSS: &str = include_str!("../../page/style.css");

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

/// Before any page handler: who may connect, under which name, and
/// cross-site requests refused. A change must carry `X-CSRF-Token` (a
/// header a cross-site form cannot send, and a cross-site script cannot
/// without a CORS preflight, which is never granted); handlers that need a
/// session also check its value.
async fn guard(
    State(app): AppState,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    let secure = req
        .extensions()
        .get::<crate::serve::Secure>()
        .is_some_and(|s| s.0);
    // With HTTPS on, the page and its password travel in clear only on
    // the box itself. A client off the local network, or a page under
    // another name, is refused as ever.
    let in_clear = app.tls_fingerprint.is_some() && !secure && !crate::net::on_box(peer.ip());
    match admit(&app, peer, &req) {
        Err(e) if e.name == "NotLocal" || e.name == "BadHost" => e.into_response(),
        _ if in_clear => to_https(&req),
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// The answer to plain HTTP from another computer: a page load goes to
/// the same address over HTTPS; anything else is refused, so that nothing
/// a page sends is repeated over the network in clear.
fn to_https(req: &Request) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_graphic()));
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    match (host, req.method()) {
        (Some(host), &Method::GET | &Method::HEAD) => (
            StatusCode::PERMANENT_REDIRECT,
            [(header::LOCATION, format!("https://{host}{path}"))],
        )
            .into_response(),
        _ => ApiError::new(
            StatusCode::FORBIDDEN,
            "HttpsRequired",
            "the box's page is served over HTTPS: open https:// and this address",
        )
        .into_response(),
    }
}

/// Every response, refusals included, carries the security headers.
async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
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

/// Who called the LLM API: set by [`api_guard`].
#[derive(Clone, Copy)]
struct ApiCaller {
    /// A loopback client or the logged-in admin's page: may delete.
    admin: bool,
}

/// Before any LLM API handler: the network and `Host` checks the page
/// has; a browser page of another origin refused; then a key, unless the
/// client is on loopback, the admin's own page, or the admin opened the
/// API to the local network. Refusals take the surface's error shape, and
/// every answer is counted for `/metrics`.
async fn api_guard(
    State(app): AppState,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    matched: Option<axum::extract::MatchedPath>,
    mut req: Request,
    next: Next,
) -> Response {
    let route = matched.map(|m| m.as_str().to_string()).unwrap_or_default();
    let openai = route.starts_with("/v1/");
    let resp = match api_admit(&app, peer, &req) {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(e) if openai => openai::OpenAiError(e).into_response(),
        Err(e) => ollama::OllamaError(e).into_response(),
    };
    app.metrics.answered(&route, resp.status().as_u16());
    resp
}

fn api_admit(app: &App, peer: SocketAddr, req: &Request) -> ApiResult<ApiCaller> {
    if app.cfg.local_network_only && !crate::is_local_peer(peer.ip()) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "NotLocal",
            "the box answers only on its local network",
        ));
    }
    let headers = req.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !crate::net::is_own_host(host, &app.host_names) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "BadHost",
            "call the box by its address or name",
        ));
    }
    // A browser sends Origin; a page of another site gets nothing.
    same_origin(headers)?;
    let admin_page = || {
        let token = session_token(headers).unwrap_or_default();
        let sent = headers
            .get(auth::CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        app.auth
            .session(&token)
            .is_some_and(|csrf| auth::same_secret(sent, &csrf))
    };
    if crate::net::on_box(peer.ip()) || admin_page() {
        return Ok(ApiCaller { admin: true });
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    if app.cfg.api_open_to_lan || bearer.is_some_and(|k| app.keys.check(k)) {
        return Ok(ApiCaller { admin: false });
    }
    Err(ApiError::new(
        StatusCode::UNAUTHORIZED,
        "Unauthorized",
        match bearer {
            Some(_) => "the API key is not valid (revoked, or mistyped)",
            None => "clients outside the box need an API key: Authorization: Bearer <key> (make one on the dashboard or with pocketctl api-key create)",
        },
    ))
}

/// An LLM API caller allowed to change what is installed.
struct ApiAdmin;

impl FromRequestParts<Arc<App>> for ApiAdmin {
    type Rejection = ollama::OllamaError;

    async fn from_request_parts(
        parts: &mut Parts,
        _app: &Arc<App>,
    ) -> Result<ApiAdmin, ollama::OllamaError> {
        match parts.extensions.get::<ApiCaller>() {
            Some(c) if c.admin => Ok(ApiAdmin),
            _ => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "AdminOnly",
                "only the admin (on the box, or logged in on its page) may delete a model",
            )
            .into()),
        }
    }
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
/// An LLM API request body: JSON of shape `T` within [`API_BODY_LIMIT`],
/// or why not, in the error shape `E` of the surface called.
struct ApiJson<T, E>(T, std::marker::PhantomData<E>);

impl<T, E, S> axum::extract::FromRequest<S> for ApiJson<T, E>
where
    T: DeserializeOwned,
    E: From<ApiError> + IntoResponse,
    S: Send + Sync,
{
    type Rejection = E;

    async fn from_request(req: Request, state: &S) -> Result<Self, E> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            let code = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                "TooLarge"
            } else {
                "BadRequest"
            };
            ApiError::new(
                e.status(),
                code,
                format!(
                    "{} (requests are limited to {} MiB)",
                    e.body_text(),
                    API_BODY_LIMIT >> 20
                ),
            )
        })?;
        Ok(ApiJson(body(&bytes)?, std::marker::PhantomData))
    }
}

/// Parses `data` as every JSON body the API takes, as a request would,
/// and makes npud's requests of the LLM ones, answering nothing: what a
/// LAN peer's bytes reach before any daemon is asked. Errors are the
/// expected outcome; a panic is a bug (the fuzz target for webd).
#[doc(hidden)]
pub fn parse_request_bodies(data: &[u8]) {
    let bytes = Bytes::copy_from_slice(data);
    openai::parse_bodies(&bytes);
    ollama::parse_bodies(&bytes);
    session::parse_bodies(&bytes);
}

fn body<T: DeserializeOwned>(bytes: &Bytes) -> ApiResult<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("bad request body: {e}")))
}

async fn modeld(app: &App) -> ApiResult<model_bus::Models1Proxy<'static>> {
    fresh_proxy(&app.bus, None)
        .await
        .map_err(|e| ApiError::from_bus("modeld", e))
}

async fn npud(app: &App) -> ApiResult<runtime::Runtime1Proxy<'static>> {
    fresh_proxy(&app.bus, None)
        .await
        .map_err(|e| ApiError::from_bus("npud", e))
}

async fn otad(app: &App) -> ApiResult<update_bus::Update1Proxy<'static>> {
    fresh_proxy(&app.bus, None)
        .await
        .map_err(|e| ApiError::from_bus("otad", e))
}

/// A job's object path from the id the page has, which must be a plain
/// path element.
fn job_path(prefix: &str, id: &str) -> ApiResult<OwnedObjectPath> {
    let ok = !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    ok.then(|| OwnedObjectPath::try_from(format!("{prefix}/{id}")).ok())
        .flatten()
        .ok_or_else(|| ApiError::bad_request(format!("{id:?} is not a job id")))
}

/// Calls `Cancel` on a daemon's job object; a job that is gone is
/// `NotFound`.
async fn cancel_job(
    app: &App,
    service: &'static str,
    job: &OwnedObjectPath,
    daemon: &str,
) -> ApiResult<()> {
    let proxy = pocket_proto::job::proxy(&app.bus, service, job)
        .await
        .map_err(|e| ApiError::from_bus(daemon, e))?;
    proxy.cancel().await.map_err(|e| {
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
}
