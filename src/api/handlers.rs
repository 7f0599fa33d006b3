//! One function per endpoint (each with its `#[utoipa::path]` for the document), the role
//! check and audit of refusals, and the background upkeep while serving.

use super::errors::{ApiResult, blocking};
use super::parse::{
    Query, decommission_force, event_filter, parse_allocate, parse_init_server, unit_filter,
};
#[allow(unused_imports)] // named by the `#[utoipa::path]` annotations
use super::schema::{ComputeUnitRequest, ErrorDetail, HTTPValidationError, InitServerRequest};
use super::schema::{ComputeUnitResponse, NumaNode, ServerResponse, WhoAmI};
use super::{ApiError, App, AppState, MAX_BODY, Peer};
use crate::auth::{Caller, Role};
use crate::model::CpuList;
use crate::service::OpError;
use crate::store::Server;
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;

pub(super) fn peer_of(ext: &axum::http::Extensions) -> Peer {
    ext.get::<Peer>().cloned().unwrap_or(Peer::Unknown)
}

/// Allocate a FREE compute unit with exactly `cpu_count` CPUs.
#[utoipa::path(post, path = "/api/compute_units/allocate", tag = "compute_units",
    request_body = ComputeUnitRequest,
    responses((status = 200, body = ComputeUnitResponse), (status = 409, description = "No FREE unit matches", body = ErrorDetail), (status = 422, body = HTTPValidationError),
        (status = 504, description = "The joined host did not apply it within the apply timeout; the unit was released", body = ErrorDetail)))]
pub(super) async fn allocate(
    State(k): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: axum::body::Body,
) -> ApiResult<Json<ComputeUnitResponse>> {
    require(&k, &caller, Role::User, "allocate", None).await?;
    super::host::refuse_if_joined(&k)?;
    let body = read_body(&k, body).await?;
    let req = parse_allocate(&body).map_err(ApiError::invalid)?;
    let unit = super::fleet::allocate(&k, req, &caller.actor).await?;
    Ok(Json((&unit).into()))
}

/// Deallocate a unit: its owner's key, processes and files are gone; it is FREE again.
#[utoipa::path(delete, path = "/api/compute_units/deallocate/{compute_id}", tag = "compute_units",
    params(("compute_id" = String, Path)),
    responses((status = 200, body = Object), (status = 404, body = ErrorDetail), (status = 409, description = "Not in a state that can be deallocated", body = ErrorDetail), (status = 422, body = HTTPValidationError),
        (status = 504, description = "The joined host did not release it in time: DEALLOCATION_FAIL until it reports", body = ErrorDetail)))]
pub(super) async fn deallocate(
    State(k): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    require(&k, &caller, Role::User, "deallocate", Some(&id)).await?;
    super::host::refuse_if_joined(&k)?;
    let who = caller.clone();
    let r = super::fleet::deallocate(&k, &id, &caller, move |unit| {
        // A user may give back only what it allocated.
        // Anonymous callers all look alike: none of them owns a unit.
        if who.role >= Role::Admin || who.owns(unit.allocated_by.as_deref()) {
            Ok(())
        } else {
            Err(OpError::Forbidden(format!(
                "{} may only deallocate units it allocated; {} was allocated by {}",
                who.actor,
                unit.compute_id,
                unit.allocated_by.as_deref().unwrap_or("someone else")
            )))
        }
    })
    .await;
    if let Err(ApiError(StatusCode::FORBIDDEN, v)) = &r {
        audit_denied(
            &k,
            &caller,
            "deallocate",
            v["detail"].as_str().unwrap_or("forbidden"),
        )
        .await;
    }
    r?;
    Ok(Json(json!({})))
}

/// List compute units, optionally filtered.
#[utoipa::path(get, path = "/api/compute_units/", tag = "compute_units",
    params(
        ("compute_id" = Option<String>, Query), ("hostname" = Option<String>, Query),
        ("region" = Option<String>, Query), ("zone" = Option<String>, Query),
        ("cpu_count" = Option<i64>, Query), ("deployment_id" = Option<String>, Query, description = "tags.deployment_id"),
        ("status" = Option<String>, Query)),
    responses((status = 200, body = Vec<ComputeUnitResponse>), (status = 422, body = HTTPValidationError)))]
pub(super) async fn list_units(
    State(k): State<AppState>,
    Extension(_caller): Extension<Caller>,
    RawQuery(raw): RawQuery,
    headers: axum::http::HeaderMap,
) -> ApiResult<axum::response::Response> {
    let f = unit_filter(&mut Query::new(raw.as_deref())).map_err(ApiError::invalid)?;
    super::list::answer(k, f, &headers).await
}

/// One compute unit (additive endpoint).
#[utoipa::path(get, path = "/api/compute_units/{compute_id}", tag = "compute_units",
    params(("compute_id" = String, Path)),
    responses((status = 200, body = ComputeUnitResponse), (status = 404, body = ErrorDetail)))]
pub(super) async fn get_unit(
    State(k): State<AppState>,
    Extension(_caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<ComputeUnitResponse>> {
    let unit = blocking(move || k.unit(&id)).await?;
    Ok(Json((&unit).into()))
}

/// Register a server and cut it into compute units; on this host, apply them.
#[utoipa::path(post, path = "/api/admin/init_server", tag = "admin",
    request_body = InitServerRequest,
    responses((status = 200, body = Object), (status = 409, description = "Server already initialized", body = ErrorDetail), (status = 422, body = HTTPValidationError),
        (status = 504, description = "The joined host did not set it up in time; the record was removed", body = ErrorDetail)))]
pub(super) async fn init_server(
    State(k): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: axum::body::Body,
) -> ApiResult<Json<Value>> {
    require(&k, &caller, Role::Admin, "init_server", None).await?;
    super::host::refuse_if_joined(&k)?;
    let body = read_body(&k, body).await?;
    let req = parse_init_server(&body).map_err(ApiError::invalid)?;
    super::fleet::init_server(&k, req, &caller.actor).await?;
    Ok(Json(json!({})))
}

/// Remove a server and everything Kloigos made on it. Refused while units are in use unless
/// `force=true`.
#[utoipa::path(delete, path = "/api/admin/decommission_server/{hostname}", tag = "admin",
    params(("hostname" = String, Path), ("force" = Option<bool>, Query)),
    responses((status = 200, body = Object), (status = 404, body = ErrorDetail), (status = 409, description = "Units still in use", body = ErrorDetail), (status = 422, body = HTTPValidationError),
        (status = 504, description = "The joined host did not tear it down in time; it stays DECOMMISSIONING", body = ErrorDetail)))]
pub(super) async fn decommission_server(
    State(k): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(hostname): Path<String>,
    RawQuery(raw): RawQuery,
) -> ApiResult<Json<Value>> {
    require(&k, &caller, Role::Admin, "decommission_server", None).await?;
    super::host::refuse_if_joined(&k)?;
    let force = decommission_force(&mut Query::new(raw.as_deref())).map_err(ApiError::invalid)?;
    super::fleet::decommission(&k, hostname, force, &caller.actor).await?;
    Ok(Json(json!({})))
}

fn server_response(s: &Server, local: &str) -> ServerResponse {
    ServerResponse {
        hostname: s.hostname.clone(),
        ip: s.ip.clone(),
        region: s.region.clone(),
        zone: s.zone.clone(),
        status: s.status.to_string(),
        cpu_ranges: s.cpu_ranges.iter().map(CpuList::to_string).collect(),
        port_base: s.port_base,
        ports_per_cpu: s.ports_per_cpu,
        uid_base: s.uid_base,
        limits: s.limits.clone(),
        created_at: s.created_at.clone(),
        local: s.hostname == local,
        numa_nodes: Vec::new(),
        inventory_only: s.inventory_only,
        host: None,
    }
}

/// The NUMA nodes a joined host reported (`facts.numa_nodes`: node → CPU list), in node
/// order; what does not parse is left out.
fn reported_numa(h: &crate::store::HostRecord) -> Vec<NumaNode> {
    let Some(nodes) = h
        .facts
        .as_ref()
        .and_then(|f| f.get("numa_nodes"))
        .and_then(Value::as_object)
    else {
        return Vec::new();
    };
    let mut out: Vec<NumaNode> = nodes
        .iter()
        .filter_map(|(node, cpus)| {
            let cpus: CpuList = cpus.as_str()?.parse().ok()?;
            Some(NumaNode {
                node: node.parse().ok()?,
                cpus: cpus.to_ranges(),
            })
        })
        .collect();
    out.sort_by_key(|n| n.node);
    out
}

/// Servers known to this Kloigos (additive endpoint).
#[utoipa::path(get, path = "/api/admin/servers", tag = "admin",
    responses((status = 200, body = Vec<ServerResponse>)))]
pub(super) async fn list_servers(
    State(k): State<AppState>,
    Extension(_caller): Extension<Caller>,
) -> ApiResult<Json<Vec<ServerResponse>>> {
    let k2 = k.clone();
    let (servers, hosts) = blocking(move || Ok((k2.servers()?, k2.store.hosts()?))).await?;
    let hosts: std::collections::HashMap<String, crate::store::HostRecord> =
        hosts.into_iter().map(|h| (h.hostname.clone(), h)).collect();
    let topology: Vec<NumaNode> = crate::model::numa::topology(k.host().root())
        .into_iter()
        .map(|(node, cpus)| NumaNode {
            node,
            cpus: cpus.to_ranges(),
        })
        .collect();
    Ok(Json(
        servers
            .iter()
            .map(|s| {
                let mut r = server_response(s, k.local_hostname());
                let host = hosts.get(&s.hostname);
                if r.local {
                    r.numa_nodes = topology.clone();
                } else if let Some(h) = host {
                    r.numa_nodes = reported_numa(h);
                }
                r.host = host.map(|h| super::fleet::server_host(&k, h));
                r
            })
            .collect(),
    ))
}

/// The audit log, newest first. Page with `before` (an event id) and `limit`.
#[utoipa::path(get, path = "/api/events", tag = "audit",
    params(("compute_id" = Option<String>, Query), ("hostname" = Option<String>, Query),
        ("operation" = Option<String>, Query), ("actor" = Option<String>, Query),
        ("since" = Option<String>, Query, description = "RFC 3339 time, inclusive"),
        ("until" = Option<String>, Query, description = "RFC 3339 time, exclusive"),
        ("before" = Option<i64>, Query), ("limit" = Option<i64>, Query)),
    responses((status = 200, body = Vec<crate::store::Event>), (status = 422, body = HTTPValidationError)))]
pub(super) async fn list_events(
    State(k): State<AppState>,
    Extension(_caller): Extension<Caller>,
    RawQuery(raw): RawQuery,
) -> ApiResult<Json<Vec<crate::store::Event>>> {
    let f = event_filter(&mut Query::new(raw.as_deref())).map_err(ApiError::invalid)?;
    Ok(Json(blocking(move || k.events(&f)).await?))
}

/// Who the API takes the caller for, and its role.
#[utoipa::path(get, path = "/api/whoami", tag = "admin", responses((status = 200, body = WhoAmI), (status = 401, body = ErrorDetail)))]
pub(super) async fn whoami(Extension(caller): Extension<Caller>) -> Json<WhoAmI> {
    Json(WhoAmI {
        actor: caller.actor,
        role: caller.role.to_string(),
    })
}

/// Refuses (403, audited) a caller whose role is below `role`.
pub(super) async fn require(
    k: &AppState,
    caller: &Caller,
    role: Role,
    operation: &str,
    target: Option<&str>,
) -> ApiResult<()> {
    if caller.role >= role {
        return Ok(());
    }
    let detail = format!(
        "{operation}{} needs role {role}; {} has role {}",
        target.map(|t| format!(" of {t}")).unwrap_or_default(),
        caller.actor,
        caller.role
    );
    audit_denied(k, caller, operation, &detail).await;
    Err(ApiError::detail(StatusCode::FORBIDDEN, detail))
}

/// Logs and audits a refusal, clipped, and only the first few per source and window: the
/// rest are counted and summarized in one row when the window is over.
pub(super) async fn audit_denied(k: &AppState, caller: &Caller, operation: &str, detail: &str) {
    use crate::audit::{MAX_NAME, MAX_TEXT, Verdict, clip};
    let (verdict, ended) = k
        .denials
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .check(&caller.source, std::time::Instant::now());
    if verdict == Verdict::Suppress && ended.is_none() {
        tracing::debug!(source = %caller.source, "refusal not recorded (rate limit)");
        return;
    }
    let recorded = (verdict == Verdict::Record).then(|| {
        tracing::warn!(
            actor = %clip(&caller.actor, MAX_NAME),
            source = %caller.source,
            operation,
            detail = %clip(detail, MAX_TEXT),
            "denied"
        );
        (
            caller.actor.clone(),
            operation.to_string(),
            format!("denied: {detail}"),
        )
    });
    let k = k.clone();
    let _ = tokio::task::spawn_blocking(move || {
        if let Some(s) = ended {
            record_suppressed(&k, &s);
        }
        if let Some((actor, operation, detail)) = recorded {
            k.record(&actor, &operation, None, None, Err(&detail), None, None);
        }
    })
    .await;
}

fn record_suppressed(k: &App, s: &crate::audit::Suppressed) {
    let detail = s.detail();
    tracing::warn!(source = %s.source, suppressed = s.count, "{detail}");
    k.record(
        &s.source,
        "suppressed",
        None,
        None,
        Err(&detail),
        None,
        None,
    );
}

/// Background upkeep while serving: summaries of suppressed refusals once their window is
/// over, and the audit log's retention (at start, then hourly).
pub(crate) async fn housekeeping(k: AppState, retention: crate::audit::Retention) {
    let every = k
        .denials
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .window()
        .clamp(Duration::from_secs(1), Duration::from_secs(60));
    // The fleet sweep: at start, then every few seconds.
    tokio::spawn(super::fleet::sweep_loop(k.clone()));
    let mut tick = tokio::time::interval(every);
    let mut last_prune: Option<std::time::Instant> = None;
    loop {
        tick.tick().await;
        let now = std::time::Instant::now();
        k.list_cache.expire();
        let ended = k
            .denials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .expire(now);
        let prune = last_prune.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(3600));
        if prune {
            last_prune = Some(now);
        }
        let k = k.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for s in &ended {
                record_suppressed(&k, s);
            }
            if prune {
                let cutoff = retention.cutoff(time::OffsetDateTime::now_utc());
                match k
                    .store
                    .prune_events(cutoff.as_deref(), retention.max_rows())
                {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(
                        removed = n,
                        days = retention.days,
                        max_rows = retention.max_rows,
                        "audit log pruned"
                    ),
                    Err(e) => tracing::error!(
                        error = %crate::error::Chain(&e),
                        "cannot prune the audit log"
                    ),
                }
            }
        })
        .await;
    }
}

/// Reads a request body, after the role check: no faster than the caller sends it, but no
/// longer than `body_timeout`, and no larger than `MAX_BODY`.
pub(super) async fn read_body(k: &App, body: axum::body::Body) -> ApiResult<Bytes> {
    match tokio::time::timeout(k.body_timeout, axum::body::to_bytes(body, MAX_BODY)).await {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(e)) => {
            let too_large =
                std::iter::successors(Some(&e as &(dyn std::error::Error + 'static)), |e| {
                    e.source()
                })
                .any(|e| e.is::<http_body_util::LengthLimitError>());
            Err(if too_large {
                ApiError::detail(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body larger than {MAX_BODY} bytes"),
                )
            } else {
                ApiError::detail(
                    StatusCode::BAD_REQUEST,
                    format!("cannot read the request body: {e}"),
                )
            })
        }
        Err(_) => Err(ApiError::detail(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {} s",
                k.body_timeout.as_secs_f64()
            ),
        )),
    }
}

/// Liveness: the database answers.
#[utoipa::path(get, path = "/healthz", responses((status = 200, body = Object)))]
pub(super) async fn healthz(State(k): State<AppState>) -> ApiResult<Json<Value>> {
    let k2 = k.clone();
    let counts = blocking(move || k2.unit_counts()).await?;
    Ok(Json(json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "hostname": k.local_hostname(),
        "servers": counts.servers,
    })))
}
