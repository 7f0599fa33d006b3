//! The endpoint of a joined host: the poke a hub sends to make it pull (see `crate::fleet`),
//! and the refusal of local writes on such a host (its hubs decide).

use super::{ApiError, App, AppState};
use axum::extract::State;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

pub(super) const POKE_PATH: &str = "/api/host/poke";

/// A poke: exempt from the Host-header and token checks (never from the connection caps).
pub(super) fn is_poke(req: &axum::extract::Request) -> bool {
    req.method() == Method::POST && req.uri().path() == POKE_PATH
}

/// `POST /api/host/poke`: schedules a pull (coalesced, rate-limited) and answers at once.
pub(super) async fn poke(State(k): State<AppState>) -> Response {
    match &k.puller {
        None => ApiError::detail(StatusCode::NOT_FOUND, "this host has not joined a hub")
            .into_response(),
        Some(p) => {
            p.request();
            (
                StatusCode::ACCEPTED,
                axum::Json(json!({"detail": "pull scheduled"})),
            )
                .into_response()
        }
    }
}

/// 409 for the write endpoints of a joined host.
pub(super) fn refuse_if_joined(k: &App) -> Result<(), ApiError> {
    match &k.puller {
        None => Ok(()),
        Some(p) => Err(ApiError::detail(
            StatusCode::CONFLICT,
            format!(
                "this host is joined to hub(s) {}; use a hub",
                p.join.hubs.join(", ")
            ),
        )),
    }
}
