//! The HTTP API: upstream Kloigos v0.2's endpoints under `/api` (same paths, same JSON field
//! names and order, FastAPI-style `422 {"detail": [...]}`), plus a few additive endpoints.
//!
//! This module owns the application state ([`App`]), the transport's view of a caller
//! ([`Peer`]) and the router. The rest is split by job:
//! - `schema`: the DTOs the handlers answer with and the OpenAPI document built from them;
//! - `parse`: FastAPI-compatible parsing of bodies and queries into the service's requests,
//!   and [`FieldError`], the 422 item (service errors are mapped to it here, not in the service);
//! - `handlers`: one function per endpoint, plus background upkeep;
//! - `guard`: authentication glue (who is calling, Host/Origin/content-type checks);
//! - `errors`: [`ApiError`] and the middleware that makes every error `{"detail": ...}`.

mod errors;
mod fleet;
mod guard;
mod handlers;
mod host;
mod list;
mod parse;
mod schema;
#[cfg(test)]
mod tests;

pub(crate) use errors::ApiError;
pub(crate) use handlers::housekeeping;
pub use parse::{FieldError, parse_allocate, parse_init_server};
pub(crate) use schema::ApiDoc;

use crate::auth::{Role, Tokens};
use crate::service::Kloigos;
use axum::Router;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use handlers::*;
use std::sync::Arc;
use std::time::Duration;
use utoipa::OpenApi;

/// Who is calling, as the transport tells it.
#[derive(Debug, Clone)]
pub(crate) enum Peer {
    /// Unix socket: the kernel's peer credentials.
    Unix {
        uid: u32,
        gid: u32,
    },
    /// TCP: the peer's address and, for a loopback peer, the uid owning its socket if the
    /// kernel could tell. The uid is for connection caps and audit rate limits only: it never
    /// grants a role, over TCP only the bearer token does.
    Tcp {
        addr: std::net::SocketAddr,
        uid: Option<u32>,
    },
    Unknown,
}

/// Everything a request handler needs.
pub(crate) struct App {
    pub(crate) kloigos: Kloigos,
    pub(crate) tokens: Tokens,
    /// Role of a TCP caller without a token (None: such calls get 401). For playbooks that
    /// cannot send a header; off by default.
    pub(crate) tcp_anonymous: Option<Role>,
    /// Names besides loopback a TCP request's `Host` (and a browser's `Origin`) may carry.
    pub(crate) allowed_hosts: Vec<String>,
    /// How long a request body may take to arrive.
    pub(crate) body_timeout: Duration,
    /// Refusals recorded per source and window (the rest are counted, then summarized).
    pub(crate) denials: std::sync::Mutex<crate::audit::DenialLimiter>,
    /// A host joined to hubs: its pulls (pokes), and writes refused with 409.
    pub(crate) puller: Option<Arc<crate::fleet::Puller>>,
    /// Waits on fleet hosts under way, and the wake-ups of their reports.
    pub(crate) fleet: fleet::Fleet,
    /// Recent list answers (see `list`).
    pub(crate) list_cache: list::ListCache,
}

impl App {
    pub(crate) fn new(kloigos: Kloigos, tokens: Tokens) -> App {
        App {
            kloigos,
            tokens,
            tcp_anonymous: None,
            allowed_hosts: Vec::new(),
            body_timeout: Duration::from_secs(30),
            denials: std::sync::Mutex::new(crate::audit::DenialLimiter::new(
                Duration::from_secs(60),
                crate::audit::DENIALS_PER_WINDOW,
            )),
            puller: None,
            fleet: fleet::Fleet::default(),
            list_cache: list::ListCache::default(),
        }
    }
}

impl std::ops::Deref for App {
    type Target = Kloigos;
    fn deref(&self) -> &Kloigos {
        &self.kloigos
    }
}

pub(crate) type AppState = Arc<App>;

async fn openapi() -> impl IntoResponse {
    let doc = ApiDoc::openapi();
    (
        [(header::CONTENT_TYPE, "application/json")],
        doc.to_json().unwrap_or_else(|_| "{}".into()),
    )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// The largest request body accepted (axum's default, made explicit).
pub(crate) const MAX_BODY: usize = 1024 * 1024;

pub(crate) fn router(state: AppState) -> Router {
    Router::new()
        .route("/api/compute_units/allocate", post(allocate))
        .route(
            "/api/compute_units/deallocate/{compute_id}",
            delete(deallocate),
        )
        .route("/api/compute_units/", get(list_units))
        .route("/api/compute_units", get(list_units))
        .route("/api/compute_units/{compute_id}", get(get_unit))
        .route("/api/admin/init_server", post(init_server))
        .route(
            "/api/admin/decommission_server/{hostname}",
            delete(decommission_server),
        )
        .route("/api/admin/servers", get(list_servers))
        .route(
            "/api/admin/hosts",
            post(fleet::create_host).get(fleet::list_hosts),
        )
        .route("/api/admin/hosts/{hostname}", delete(fleet::delete_host))
        .route("/api/hosts/{hostname}/join", post(fleet::join))
        .route("/api/hosts/{hostname}/state", get(fleet::state))
        .route("/api/hosts/{hostname}/report", post(fleet::report))
        .route("/api/events", get(list_events))
        .route("/api/whoami", get(whoami))
        .route(host::POKE_PATH, post(host::poke))
        .route("/healthz", get(healthz))
        .route("/openapi.json", get(openapi))
        .route(
            "/",
            get(|| async {
                asset(
                    "text/html; charset=utf-8",
                    include_str!("../../web/index.html"),
                )
            }),
        )
        .route(
            "/assets/app.js",
            get(|| async {
                asset(
                    "text/javascript; charset=utf-8",
                    include_str!("../../web/app.js"),
                )
            }),
        )
        .route(
            "/assets/app.css",
            get(|| async { asset("text/css; charset=utf-8", include_str!("../../web/app.css")) }),
        )
        .with_state(state.clone())
        // Interactive docs; swagger-ui's assets come from the swagger-ui-dist crate, built in.
        .merge(swagger_ui_dist::generate_routes(
            swagger_ui_dist::ApiDefinition {
                uri_prefix: "/docs",
                api_definition: swagger_ui_dist::OpenApiSource::Uri("/openapi.json"),
                title: Some("Kloigos API"),
            },
        ))
        .fallback(errors::not_found)
        .method_not_allowed_fallback(errors::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state,
            guard::authenticate,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn(errors::json_errors))
}
