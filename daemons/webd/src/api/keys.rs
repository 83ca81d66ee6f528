//! API keys, made and revoked by the admin on the page.

use super::*;
use crate::apikeys::KeyError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKey {
    name: String,
}

/// The keys' names and ids (never the keys): for the logged-in admin.
pub(super) async fn list(State(app): AppState, headers: HeaderMap) -> ApiResult<Json<Value>> {
    let token = session_token(&headers).unwrap_or_default();
    app.auth.session(&token).ok_or_else(login_required)?;
    Ok(Json(json!({ "keys": app.keys.list().map_err(key_error)? })))
}

/// Makes a key; the answer is the only time the key is shown.
pub(super) async fn create(
    _a: Admin,
    State(app): AppState,
    bytes: Bytes,
) -> ApiResult<Json<Value>> {
    let n: NewKey = body(&bytes)?;
    let (info, key) = app.keys.create(&n.name).map_err(key_error)?;
    tracing::info!(
        "API key {} ({:?}) made from the dashboard",
        info.id,
        info.name
    );
    Ok(Json(json!({ "key": key, "info": info })))
}

pub(super) async fn revoke(
    _a: Admin,
    State(app): AppState,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    app.keys.revoke(&id).map_err(key_error)?;
    tracing::info!("API key {id} revoked from the dashboard");
    Ok(Json(json!({})))
}

fn key_error(e: KeyError) -> ApiError {
    let (status, name) = match &e {
        KeyError::BadName => (StatusCode::BAD_REQUEST, "BadRequest"),
        KeyError::TooMany => (StatusCode::CONFLICT, "TooMany"),
        KeyError::NotFound(_) => (StatusCode::NOT_FOUND, "NotFound"),
        KeyError::Io(..) | KeyError::Corrupt(..) => (StatusCode::INSUFFICIENT_STORAGE, "Io"),
    };
    ApiError::new(status, name, e.to_string())
}
