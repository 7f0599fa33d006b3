//! [`ApiError`]: every error the API answers is JSON `{"detail": ...}`; the service's typed
//! errors are mapped to status codes (and their `Invalid` problems to FastAPI's 422 list) here.
//! Also the middleware that turns any other error response into that shape.

use super::FieldError;
use super::MAX_BODY;
use crate::service::{self, OpError};
use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

pub(crate) struct ApiError(pub StatusCode, pub Value);

impl ApiError {
    pub(crate) fn detail(status: StatusCode, detail: impl Into<String>) -> ApiError {
        ApiError(status, json!({ "detail": detail.into() }))
    }
    pub(crate) fn invalid(errors: Vec<FieldError>) -> ApiError {
        ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({ "detail": errors }),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

impl From<OpError> for ApiError {
    fn from(e: OpError) -> Self {
        match e {
            OpError::Invalid(list) => {
                ApiError::invalid(list.0.into_iter().map(FieldError::from_body).collect())
            }
            OpError::NotFound(m) => ApiError::detail(StatusCode::NOT_FOUND, m),
            OpError::Conflict(m) => ApiError::detail(StatusCode::CONFLICT, m),
            OpError::Forbidden(m) => ApiError::detail(StatusCode::FORBIDDEN, m),
            // The database is down or restarting: the caller may retry.
            OpError::Store(crate::store::StoreError::Unavailable(why)) => {
                tracing::warn!(reason = %why, "database unavailable");
                ApiError::detail(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("database unavailable: {why}"),
                )
            }
            OpError::Timeout(m) => ApiError::detail(StatusCode::GATEWAY_TIMEOUT, m),
            other => {
                tracing::error!(error = %crate::error::Chain(&other), "request failed");
                ApiError::detail(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    crate::error::Chain(&other).to_string(),
                )
            }
        }
    }
}

pub(super) type ApiResult<T> = Result<T, ApiError>;

/// Runs a blocking service call off the async runtime.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> service::Result<T> + Send + 'static,
) -> ApiResult<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(e) => Err(ApiError::detail(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("internal error: {e}"),
        )),
    }
}

/// `{"detail": ...}` for an error response that is not JSON yet (axum's extractor rejections,
/// such as a body over [`MAX_BODY`] while it is read, are plain text), from its text or, when
/// it has none, its status.
pub(super) fn detail_json(status: StatusCode, text: &[u8]) -> Value {
    let text = String::from_utf8_lossy(text);
    let text = text.trim();
    let detail = if text.is_empty() {
        status.canonical_reason().unwrap_or("Error")
    } else {
        text
    };
    json!({ "detail": detail })
}

fn is_json(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"))
}

/// Every error is JSON: refuses an announced body over [`MAX_BODY`] before reading it, and
/// turns any other error response that is not JSON into `{"detail": ...}`. Every answer also
/// forbids framing and content sniffing.
pub(super) async fn json_errors(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if announced.is_some_and(|n| n > MAX_BODY as u64) {
        return ApiError::detail(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body over {MAX_BODY} bytes"),
        )
        .into_response();
    }
    let mut resp = next.run(req).await;
    // No other site may frame the dashboard or the docs (clickjacking a signed-in admin), and
    // no browser may take a JSON answer holding a caller's text for a page.
    for (name, value) in [
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::CONTENT_SECURITY_POLICY, "frame-ancestors 'none'"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ] {
        resp.headers_mut()
            .entry(name)
            .or_insert(axum::http::HeaderValue::from_static(value));
    }
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) || is_json(resp.headers()) {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_default();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    let body = detail_json(status, &text).to_string();
    Response::from_parts(parts, axum::body::Body::from(body))
}

pub(super) async fn not_found() -> ApiError {
    ApiError::detail(StatusCode::NOT_FOUND, "Not Found")
}

pub(super) async fn method_not_allowed() -> ApiError {
    ApiError::detail(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
}
