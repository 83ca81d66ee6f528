//! Setting up the admin credential, logging in and out, and the page's
//! event stream.

use super::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Password {
    password: String,
}

pub(super) async fn session(State(app): AppState, headers: HeaderMap) -> Json<Value> {
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

pub(super) async fn setup(State(app): AppState, bytes: Bytes) -> ApiResult<Response> {
    let p: Password = body(&bytes)?;
    let keys = app.auth.set_initial(p.password).await?;
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
