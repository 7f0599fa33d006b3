//! Authentication glue: works out the caller of every request (peer credentials on the unix
//! socket, a bearer token over TCP) and refuses, before routing, what needs no caller to be
//! refused (a foreign `Host`, a change from a foreign `Origin`, a body that is not JSON).

use super::handlers::{audit_denied, peer_of};
use super::{ApiError, App, AppState, Peer};
use crate::auth::{Caller, Role};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

fn unauthorized(detail: &str) -> Response {
    let mut r = ApiError::detail(StatusCode::UNAUTHORIZED, detail).into_response();
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        axum::http::HeaderValue::from_static("Bearer"),
    );
    r
}

/// Refusals that need no caller: a TCP request for a host name that is not this service's
/// (DNS rebinding), a change from a foreign web page, a change whose body is not JSON (a
/// cross-site form). Unix-socket requests come from no browser and skip the first two.
fn check_request(k: &App, tcp: bool, req: &axum::extract::Request) -> Result<(), ApiError> {
    let headers = req.headers();
    let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let host = text(header::HOST);
    if tcp && !crate::auth::host_allowed(host, &k.allowed_hosts) {
        return Err(ApiError::detail(
            StatusCode::FORBIDDEN,
            format!(
                "Host {} is not this service's: use localhost, 127.0.0.1 or [::1], or add the name to KLOIGOS_ALLOWED_HOSTS",
                crate::audit::clip(&format!("{:?}", host.unwrap_or_default()), 128)
            ),
        ));
    }
    let change = !req.method().is_safe();
    if tcp
        && change
        && let Some(origin) = headers.get(header::ORIGIN)
    {
        let allowed = origin
            .to_str()
            .is_ok_and(|o| crate::auth::origin_allowed(o, host, &k.allowed_hosts));
        if !allowed {
            return Err(ApiError::detail(
                StatusCode::FORBIDDEN,
                "changes from another web site are refused (Origin does not match this service)",
            ));
        }
    }
    // A request that carries a body must say it is JSON (a cross-site form or `text/plain`
    // POST cannot); one without a body carries no data and goes on to routing (405, 422).
    let has_body = headers.contains_key(header::TRANSFER_ENCODING)
        || text(header::CONTENT_LENGTH).is_some_and(|n| n.trim() != "0");
    if has_body {
        let json = text(header::CONTENT_TYPE)
            .and_then(|ct| ct.split(';').next())
            .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return Err(ApiError::detail(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "send the request body as JSON, with Content-Type: application/json",
            ));
        }
    }
    Ok(())
}

/// Works out the caller of every request: peer credentials on the unix socket, a bearer token
/// over TCP. `/api/...` needs a caller; the dashboard, docs, OpenAPI document and health check
/// do not.
pub(super) async fn authenticate(
    State(k): State<AppState>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    // A poke carries nothing and only makes a joined host pull from the hub it trusts: no
    // caller, no Host check (a hub addresses the host by its IP).
    if super::host::is_poke(&req) {
        return next.run(req).await;
    }
    let needs_caller = req.uri().path().starts_with("/api/") || req.uri().path() == "/api";
    let peer = peer_of(req.extensions());
    if let Err(e) = check_request(&k, matches!(peer, Peer::Tcp { .. }), &req) {
        return e.into_response();
    }
    let caller = match &peer {
        Peer::Unix { uid, gid, .. } => {
            let (uid, gid) = (*uid, *gid);
            tokio::task::spawn_blocking(move || crate::auth::unix_caller(uid, gid))
                .await
                .ok()
        }
        Peer::Tcp { addr, uid } => {
            // A local caller's uid (never its role) keys the refusal rate limit, so one
            // user's noise does not hide other callers' refusals from the same address.
            let source = match uid {
                Some(uid) => format!("uid {uid}"),
                None => addr.ip().to_string(),
            };
            let who = match uid {
                Some(uid) => format!("tcp {addr} (uid {uid})"),
                None => format!("tcp {addr}"),
            };
            let credential = crate::auth::credential(
                req.headers()
                    .get_all(header::AUTHORIZATION)
                    .iter()
                    .map(|v| v.as_bytes()),
            );
            let refused = || Caller {
                actor: who.clone(),
                role: Role::Readonly,
                anonymous: false,
                source: source.clone(),
                host: None,
            };
            let what = format!("{} {}", req.method(), req.uri().path());
            match credential {
                crate::auth::Credential::Bearer(secret) => {
                    // The token file's entries are checked here (a stat, and a parse only
                    // after a change); a host token needs the inventory, off the async threads.
                    let found = match file_caller(&k, &secret) {
                        Ok(None) if secret.trim().starts_with(crate::auth::HOST_TOKEN_PREFIX) => {
                            let k2 = k.clone();
                            tokio::task::spawn_blocking(move || host_caller(&k2, &secret))
                                .await
                                .unwrap_or(Ok(None))
                        }
                        other => other,
                    };
                    match found {
                        Ok(Some(c)) => Some(c),
                        Ok(None) => {
                            let who = refused();
                            audit_denied(
                                &k,
                                &who,
                                "authenticate",
                                &format!("invalid bearer token for {what}"),
                            )
                            .await;
                            return unauthorized("invalid bearer token");
                        }
                        Err(e) => return e.into_response(),
                    }
                }
                crate::auth::Credential::Malformed(reason) => {
                    let who = refused();
                    audit_denied(&k, &who, "authenticate", &format!("{reason} for {what}")).await;
                    return unauthorized(reason);
                }
                crate::auth::Credential::None => k.tcp_anonymous.map(|role| Caller {
                    actor: format!("anonymous(tcp {})", addr.ip()),
                    role,
                    anonymous: true,
                    source: source.clone(),
                    host: None,
                }),
            }
        }
        Peer::Unknown => None,
    };
    match caller {
        // A host token opens only the fleet endpoints (each handler checks the hostname).
        Some(c) if c.role == Role::Host && !req.uri().path().starts_with("/api/hosts/") => {
            let detail = format!(
                "{} is a host token: it may only use /api/hosts/{}/...",
                c.actor,
                c.host.as_deref().unwrap_or_default()
            );
            audit_denied(&k, &c, "authenticate", &detail).await;
            return ApiError::detail(StatusCode::FORBIDDEN, detail).into_response();
        }
        Some(c) => {
            req.extensions_mut().insert(c);
        }
        None if needs_caller => {
            return unauthorized(
                "authentication required: send Authorization: Bearer <token> (see `kloigos token create`)",
            );
        }
        None => {}
    }
    next.run(req).await
}

/// The caller a bearer token of the token file stands for. `Ok(None)`: no such entry.
fn file_caller(k: &App, secret: &str) -> Result<Option<Caller>, ApiError> {
    let secret = secret.trim();
    match k.tokens.verify(secret) {
        // A token is its own source: one noisy client does not hide the refusals of others
        // on the same address.
        Ok(entry) => Ok(entry.map(|entry| Caller {
            actor: format!("token:{}", entry.name),
            role: entry.role,
            anonymous: false,
            source: format!("token:{}", entry.name),
            host: None,
        })),
        Err(e) => {
            tracing::error!(error = %crate::error::Chain(&e), "cannot read the token file");
            Err(ApiError::detail(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot check tokens: {}", crate::error::Chain(&e)),
            ))
        }
    }
}

/// The fleet host whose token hash is in the inventory. `Ok(None)`: no such token.
fn host_caller(k: &App, secret: &str) -> Result<Option<Caller>, ApiError> {
    let secret = secret.trim();
    if !secret.starts_with(crate::auth::HOST_TOKEN_PREFIX) {
        return Ok(None);
    }
    let hash = crate::auth::sha256_hex(secret);
    match k.store.host_by_token(&hash) {
        Ok(Some(host)) => Ok(Some(Caller {
            actor: format!("host:{host}"),
            role: Role::Host,
            anonymous: false,
            source: format!("host:{host}"),
            host: Some(host),
        })),
        Ok(None) => Ok(None),
        Err(e) => Err(ApiError::from(crate::service::OpError::from(e))),
    }
}
