//! Errors as the page sees them: an HTTP status and a JSON body
//! `{"error": "ShortName", "message": "one line for a person"}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub name: String,
    pub message: String,
    /// Seconds a client should wait before it asks again (`Retry-After`).
    pub retry_after: Option<u64>,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(status: StatusCode, name: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            name: name.into(),
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }

    /// A daemon's answer: PocketOS errors keep their name and message; a
    /// daemon that is not on the bus is `503`.
    pub fn from_bus(daemon: &str, e: zbus::Error) -> Self {
        match e {
            zbus::Error::MethodError(name, msg, _) => {
                let full = name.as_str();
                let short = pocket_proto::short_error_name(full).to_string();
                let message = msg.unwrap_or_else(|| short.clone());
                let status = match short.as_str() {
                    "NotFound" => StatusCode::NOT_FOUND,
                    "PermissionDenied" | "AccessDenied" => StatusCode::FORBIDDEN,
                    "Busy" | "Conflict" => StatusCode::CONFLICT,
                    "DiskFull" | "InsufficientMemory" => StatusCode::INSUFFICIENT_STORAGE,
                    _ if full.starts_with("org.freedesktop.DBus.Error.ServiceUnknown")
                        || full.starts_with("org.freedesktop.DBus.Error.NameHasNoOwner") =>
                    {
                        return Self::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "Unavailable",
                            format!("{daemon} is not running"),
                        )
                    }
                    _ if full.starts_with(pocket_proto::ERROR_PREFIX) => StatusCode::BAD_REQUEST,
                    _ => StatusCode::BAD_GATEWAY,
                };
                ApiError::new(status, &short, message)
            }
            zbus::Error::FDO(e)
                if matches!(
                    *e,
                    zbus::fdo::Error::ServiceUnknown(_) | zbus::fdo::Error::NameHasNoOwner(_)
                ) =>
            {
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Unavailable",
                    format!("{daemon} is not running"),
                )
            }
            other => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "Unavailable",
                format!("{daemon}: {other}"),
            ),
        }
    }
}

impl ApiError {
    /// This error's status and `Retry-After` with `body`: each surface
    /// (the page, OpenAI's, Ollama's) gives its own shape of body.
    pub fn respond(&self, body: serde_json::Value) -> Response {
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(secs),
            );
        }
        response
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.respond(serde_json::json!({ "error": self.name, "message": self.message }))
    }
}
