//! Setting up the admin credential, logging in and out, and the page's
//! event stream.

use super::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Password {
    password: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Setup {
    password: String,
    /// The code the box printed on its console; not needed on the box.
    #[serde(default)]
    setup_code: Option<String>,
}

/// The session bodies, parsed as a request would be (the fuzz target's
/// view).
pub(super) fn parse_bodies(bytes: &Bytes) {
    let _ = body::<Password>(bytes);
    let _ = body::<Setup>(bytes);
}

pub(super) async fn session(
    State(app): AppState,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Json<Value> {
    let token = session_token(&headers).unwrap_or_default();
    let csrf = app.auth.session(&token);
    let setup_needed = !app.auth.has_credential();
    Json(json!({
        "setup_needed": setup_needed,
        "setup_code_needed": setup_needed && !crate::net::on_box(peer.ip()),
        "setup_code_hint": auth::SETUP_CODE_HINT,
        "logged_in": csrf.is_some(),
        "csrf": csrf,
        "login_to_read": app.cfg.login_to_read,
        "min_password": auth::MIN_PASSWORD,
        "tls_fingerprint": app.tls_fingerprint,
    }))
}

fn logged_in(app: &App, keys: SessionKeys) -> Response {
    (
        [(header::SET_COOKIE, app.auth.cookie(&keys.token))],
        Json(json!({ "csrf": keys.csrf })),
    )
        .into_response()
}

pub(super) async fn setup(
    State(app): AppState,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    bytes: Bytes,
) -> ApiResult<Response> {
    let p: Setup = body(&bytes)?;
    let keys = app
        .auth
        .set_initial(peer.ip(), p.password, p.setup_code)
        .await?;
    Ok(logged_in(&app, keys))
}

pub(super) async fn login(
    State(app): AppState,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    bytes: Bytes,
) -> ApiResult<Response> {
    let p: Password = body(&bytes)?;
    let keys = app.auth.login(peer.ip(), p.password).await?;
    Ok(logged_in(&app, keys))
}

pub(super) async fn logout(State(app): AppState, admin: Admin) -> Response {
    app.auth.logout(&admin.token);
    tracing::info!("admin logged out");
    ([(header::SET_COOKIE, app.auth.cookie(""))], Json(json!({}))).into_response()
}

pub(super) async fn events(
    _r: Reader,
    State(app): AppState,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> ApiResult<Sse<impl futures_util::Stream<Item = Result<Event, std::convert::Infallible>>>> {
    // Each stream holds a connection for good: a bounded number per
    // address and in all, held until the stream ends.
    let slot = app.event_streams.take(peer.ip()).ok_or_else(|| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "TooManyStreams",
            "too many event streams are open; close a page and reload",
        )
        .retry_after(5)
    })?;
    let rx = app.events.subscribe();
    // Where reading needs a login, the stream ends with the session (it is
    // checked at every event; powerd's come every second).
    let token = app
        .cfg
        .login_to_read
        .then(|| session_token(&headers).unwrap_or_default());
    let stream = futures_util::stream::unfold(
        (rx, app, token, slot),
        |(mut rx, app, token, slot)| async move {
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
            Some((Ok(event), (rx, app, token, slot)))
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
