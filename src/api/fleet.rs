//! The hub side of the fleet: host tokens (`/api/admin/hosts`), the endpoints a joined host
//! uses (`/api/hosts/{hostname}/join`, `state`, `report`), and the waits of operations on a
//! joined host's server: poke the host (HTTP, 2 s, no lock held), then wait for its report (a
//! wake-up when the report reaches this hub, a poll otherwise) up to the apply timeout. The
//! rules that read a report and the moves they make are the service's (`service::hub`).

use super::errors::{ApiResult, blocking};
use super::parse::err;
use super::schema::{
    DesiredHostState, DesiredServer, HostResponse, HostTokenResponse, JoinResponse, ServerHost,
};
#[allow(unused_imports)] // named by the `#[utoipa::path]` annotations
use super::schema::{ErrorDetail, HTTPValidationError, HostCreateRequest};
use super::{ApiError, App, AppState, FieldError};
use crate::auth::{Caller, Role};
use crate::model::CpuList;
use crate::service::Kloigos;
use crate::service::{Begun, Concluded, JoinRequest, Report, last_report};
use crate::store::{HostRecord, Server, ServerStatus, Unit};
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// How long a poke may take.
const POKE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a waiting hub reads the inventory when it may not hear of its host's reports
/// (one that reaches another hub, while the inventory does not relay them).
const POLL: Duration = Duration::from_millis(100);
/// How often it reads it anyway while the inventory relays every hub's reports
/// (`Inventory::watch_reports`): a safety net for a notification lost in a reconnection.
const POLL_HEARING: Duration = Duration::from_secs(1);
/// How often the sweep runs.
const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// Hosts an allocation tries when pokes fail.
const MAX_HOSTS_TRIED: usize = 3;
/// Caps of what a host sends.
const MAX_UNITS_REPORTED: usize = 65_536;
const MAX_TEXT: usize = 4096;
const MAX_DRIFT: usize = 10_000;

/// What waits of this hub are under way, and the wake-ups of their hosts' reports.
#[derive(Default)]
pub(crate) struct Fleet {
    signals: Arc<Mutex<HashMap<String, Arc<Notify>>>>,
    /// Set while the inventory relays reports that reach other hubs (see [`POLL_HEARING`]).
    hearing: std::sync::OnceLock<Arc<std::sync::atomic::AtomicBool>>,
    /// Compute ids and hostnames this process waits for (the sweep and the report handler
    /// leave them to the waiter, which audits with its caller's name).
    waiting: Mutex<HashMap<String, usize>>,
}

/// Registration of one wait; dropping it ends the wait.
struct Waiting<'a> {
    fleet: &'a Fleet,
    key: String,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut w = self.fleet.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = w.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                w.remove(&self.key);
            }
        }
    }
}

impl Fleet {
    fn signal(&self, host: &str) -> Arc<Notify> {
        self.signals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(host.to_string())
            .or_default()
            .clone()
    }

    fn wake(&self, host: &str) {
        wake_in(&self.signals, host);
    }

    /// Hears of the reports that reach other hubs through the inventory, from now on.
    fn hear_reports(&self, store: &dyn crate::store::Inventory) {
        let signals = self.signals.clone();
        if let Some(flag) = store.watch_reports(Arc::new(move |h: &str| wake_in(&signals, h))) {
            let _ = self.hearing.set(flag);
        }
    }

    /// How long a wait may sleep before it reads the inventory again.
    fn poll(&self) -> Duration {
        match self.hearing.get() {
            Some(f) if f.load(std::sync::atomic::Ordering::Relaxed) => POLL_HEARING,
            _ => POLL,
        }
    }

    fn wait_on(&self, key: &str) -> Waiting<'_> {
        *self
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.to_string())
            .or_default() += 1;
        Waiting {
            fleet: self,
            key: key.to_string(),
        }
    }

    fn waited(&self) -> HashSet<String> {
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }
}

fn wake_in(signals: &Mutex<HashMap<String, Arc<Notify>>>, host: &str) {
    if let Some(n) = signals.lock().unwrap_or_else(|p| p.into_inner()).get(host) {
        n.notify_waiters();
    }
}

/// Pokes a host: `POST poke_url`, no body, within [`POKE_TIMEOUT`]. Any 2xx is a success.
pub(crate) async fn poke(url: &str) -> Result<(), String> {
    match tokio::time::timeout(POKE_TIMEOUT, poke_once(url)).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "poke {url}: no answer within {} s",
            POKE_TIMEOUT.as_secs()
        )),
    }
}

async fn poke_once(url: &str) -> Result<(), String> {
    use http_body_util::{BodyExt, Empty};
    let uri: http::Uri = url.parse().map_err(|e| format!("poke URL {url:?}: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("poke URL {url:?}: not http://"));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| format!("poke URL {url:?}: no host"))?
        .clone();
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = authority.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("poke {url}: {e}"))?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("poke {url}: {e}"))?;
    tokio::spawn(conn);
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let req = hyper::Request::builder()
        .method("POST")
        .uri(path)
        .header(hyper::header::HOST, authority.as_str())
        .header(hyper::header::CONTENT_LENGTH, "0")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("poke {url}: {e}"))?;
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| format!("poke {url}: {e}"))?;
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("poke {url}: HTTP {status}"))
    }
}

/// Pokes a host by name, in the background; a failure marks it unreachable.
fn poke_later(k: &AppState, hostname: String) {
    let k = k.clone();
    tokio::spawn(async move {
        let _ = poke_host(&k, &hostname).await;
    });
}

/// Pokes a host by name (nothing to do without a poke URL); a failure marks it unreachable
/// and is returned.
async fn poke_host(k: &AppState, hostname: &str) -> Result<(), String> {
    let h = hostname.to_string();
    let k2 = k.clone();
    let host = blocking(move || Ok(k2.store.host(&h)?))
        .await
        .ok()
        .flatten();
    let Some(url) = host.and_then(|h| h.poke_url) else {
        return Ok(());
    };
    let r = poke(&url).await;
    if let Err(why) = &r {
        tracing::warn!(hostname, reason = %why, "host unreachable");
        let (k2, h, why) = (k.clone(), hostname.to_string(), why.clone());
        let _ = blocking(move || Ok(k2.store.host_unreachable(&h, Some(&why))?)).await;
    }
    r
}

/// Waits until `check` decides (`Some`) or `deadline` passes (`None`), woken by the host's
/// reports reaching this hub and polling otherwise.
async fn wait_for<T: Send + 'static>(
    k: &AppState,
    host: &str,
    deadline: Instant,
    check: impl Fn(&App) -> crate::service::Result<Concluded<T>> + Send + Sync + 'static,
) -> ApiResult<Option<T>> {
    let signal = k.fleet.signal(host);
    let check = Arc::new(check);
    loop {
        let notified = signal.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let (k2, c) = (k.clone(), check.clone());
        if let Concluded::Done(v) = blocking(move || c(&k2)).await? {
            return Ok(Some(v));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        let _ = tokio::time::timeout(k.fleet.poll().min(deadline - now), notified).await;
    }
}

// ---- operations on a joined host's server ---------------------------------------------------

/// Allocates: on this host (or an inventory-only server) at once; on a joined host claim,
/// poke, wait. A host whose poke fails gets its unit back at once and the next host is tried.
pub(super) async fn allocate(
    k: &AppState,
    req: crate::service::Allocate,
    actor: &str,
) -> ApiResult<Unit> {
    let mut unreachable = Vec::new();
    for _ in 0..MAX_HOSTS_TRIED {
        let (k2, r, a) = (k.clone(), req.clone(), actor.to_string());
        let unit = match blocking(move || k2.allocate_begin(r, &a)).await {
            Ok(Begun::Done(u)) => return Ok(u),
            Ok(Begun::Remote(u)) => u,
            Err(e) if !unreachable.is_empty() && e.0 == StatusCode::CONFLICT => break,
            Err(e) => return Err(e),
        };
        let _w = k.fleet.wait_on(&unit.compute_id);
        let deadline = Instant::now() + k.apply_timeout();
        if let Err(why) = poke_host(k, &unit.hostname).await {
            let (k2, u, w) = (k.clone(), unit.clone(), why.clone());
            blocking(move || k2.remote_allocate_unreachable(&u, &w)).await?;
            unreachable.push(format!("{}: {why}", unit.hostname));
            continue;
        }
        let (u, a) = (unit.clone(), actor.to_string());
        let done = wait_for(k, &unit.hostname, deadline, move |k| {
            k.conclude_remote_allocate(&u, &a)
        })
        .await?;
        if let Some(u) = done {
            return Ok(u);
        }
        let (k2, u, a) = (k.clone(), unit.clone(), actor.to_string());
        let r = blocking(move || k2.remote_allocate_timeout(&u, &a)).await;
        // The host undoes what it may have applied when it pulls: ask it to now.
        poke_later(k, unit.hostname.clone());
        return r;
    }
    Err(ApiError::detail(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "no host could be reached for this allocation ({}); the units were released",
            unreachable.join("; ")
        ),
    ))
}

/// Deallocates: on this host at once; on a joined host DEALLOCATING, poke, wait.
pub(super) async fn deallocate(
    k: &AppState,
    id: &str,
    caller: &Caller,
    check: impl Fn(&Unit) -> crate::service::Result<()> + Send + 'static,
) -> ApiResult<()> {
    let (k2, i, a) = (k.clone(), id.to_string(), caller.actor.clone());
    let unit = match blocking(move || k2.deallocate_begin(&i, &a, &check)).await? {
        Begun::Done(_) => return Ok(()),
        Begun::Remote(u) => u,
    };
    let _w = k.fleet.wait_on(&unit.compute_id);
    let deadline = Instant::now() + k.apply_timeout();
    if let Err(why) = poke_host(k, &unit.hostname).await {
        // The host is down: waiting gains nothing; it releases the unit when it next pulls.
        let (k2, u, a) = (k.clone(), unit.clone(), caller.actor.clone());
        return blocking(move || k2.remote_deallocate_timeout(&u, &a, Some(&why))).await;
    }
    let (u, a) = (unit.clone(), caller.actor.clone());
    let done = wait_for(k, &unit.hostname, deadline, move |k| {
        k.conclude_remote_deallocate(&u, &a)
    })
    .await?;
    if done.is_some() {
        return Ok(());
    }
    let (k2, u, a) = (k.clone(), unit.clone(), caller.actor.clone());
    blocking(move || k2.remote_deallocate_timeout(&u, &a, None)).await
}

/// Initializes a server: this host's or an inventory-only one at once; a joined host's is
/// recorded INITIALIZING, then the host is poked and its report awaited.
pub(super) async fn init_server(
    k: &AppState,
    req: crate::service::InitServer,
    actor: &str,
) -> ApiResult<()> {
    let (k2, a) = (k.clone(), actor.to_string());
    let server = match blocking(move || k2.init_server_begin(req, &a)).await? {
        Begun::Done(_) => return Ok(()),
        Begun::Remote(s) => s,
    };
    // The host undoes a half-done set-up when it next pulls: ask it to now.
    await_server(k, server, actor, Kloigos::conclude_remote_init, true).await
}

/// Decommissions a server: this host's or an inventory-only one at once; a joined host's goes
/// DECOMMISSIONING, then the host is poked and its report awaited.
pub(super) async fn decommission(
    k: &AppState,
    hostname: String,
    force: bool,
    actor: &str,
) -> ApiResult<()> {
    let (k2, a) = (k.clone(), actor.to_string());
    let server = match blocking(move || k2.decommission_begin(&hostname, force, &a)).await? {
        Begun::Done(_) => return Ok(()),
        Begun::Remote(s) => s,
    };
    await_server(
        k,
        server,
        actor,
        Kloigos::conclude_remote_decommission,
        false,
    )
    .await
}

/// What init_server and decommission share once the server is recorded for its host: wait
/// on it, poke it, wait for the report that lets `conclude` decide; past the apply timeout,
/// conclude as timed out (and poke the host again when `poke_after`).
async fn await_server(
    k: &AppState,
    server: Server,
    actor: &str,
    conclude: fn(&Kloigos, &Server, &str, bool) -> crate::service::Result<Concluded<()>>,
    poke_after: bool,
) -> ApiResult<()> {
    let _w = k.fleet.wait_on(&server.hostname);
    let deadline = Instant::now() + k.apply_timeout();
    let _ = poke_host(k, &server.hostname).await;
    let (s, a) = (server.clone(), actor.to_string());
    let done = wait_for(k, &server.hostname, deadline, move |k| {
        conclude(k, &s, &a, false)
    })
    .await?;
    if done.is_some() {
        return Ok(());
    }
    let (k2, s, a) = (k.clone(), server.clone(), actor.to_string());
    let r = blocking(move || conclude(&k2, &s, &a, true).map(|_| ())).await;
    if poke_after {
        poke_later(k, server.hostname.clone());
    }
    r
}

/// The sweep, at start and every [`SWEEP_EVERY`]: concludes what reports settled and what
/// timed out on joined hosts, so a hub killed mid-wait leaves nothing stuck.
pub(crate) async fn sweep_loop(k: AppState) {
    k.fleet.hear_reports(&*k.store);
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    loop {
        tick.tick().await;
        sweep(&k, None).await;
    }
}

async fn sweep(k: &AppState, only: Option<String>) {
    let waited = k.fleet.waited();
    let k2 = k.clone();
    match blocking(move || k2.sweep(only.as_deref(), &waited)).await {
        Ok(hosts) => {
            for h in hosts {
                poke_later(k, h);
            }
        }
        Err(e) => tracing::error!(detail = %e.1, "fleet sweep failed"),
    }
}

// ---- endpoints ------------------------------------------------------------------------------

/// A body as `T`, strictly: a 422 in FastAPI's shape, at the offending field, when it is not.
fn parse_json<T: serde::de::DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    let r: Result<T, _> = serde_path_to_error::deserialize(de);
    r.map_err(|e| {
        use serde_path_to_error::Segment;
        let kind = if e.inner().is_syntax() || e.inner().is_eof() {
            "json_invalid"
        } else {
            "value_error"
        };
        let loc = std::iter::once(json!("body"))
            .chain(e.path().iter().filter_map(|s| match s {
                Segment::Seq { index } => Some(json!(index)),
                Segment::Map { key } => Some(json!(key)),
                Segment::Enum { variant } => Some(json!(variant)),
                Segment::Unknown => None,
            }))
            .collect();
        let input = serde_json::from_slice(body).unwrap_or(Value::Null);
        let msg = e.inner().to_string();
        ApiError::invalid(vec![err(kind, loc, &msg, input)])
    })
}

fn invalid(field: &[&str], input: Value, reason: impl Into<String>) -> ApiError {
    let loc = std::iter::once("body")
        .chain(field.iter().copied())
        .map(|f| json!(f))
        .collect();
    ApiError::invalid(vec![FieldError::value(loc, input, reason)])
}

/// Only the host itself, with its token.
async fn require_host(k: &AppState, caller: &Caller, hostname: &str, op: &str) -> ApiResult<()> {
    if caller.role == Role::Host && caller.host.as_deref() == Some(hostname) {
        return Ok(());
    }
    let detail = format!(
        "{op} of host {hostname} needs that host's token; {} may not",
        caller.actor
    );
    super::handlers::audit_denied(k, caller, op, &detail).await;
    Err(ApiError::detail(StatusCode::FORBIDDEN, detail))
}

fn stale(k: &App, h: &HostRecord) -> bool {
    h.last_report_at
        .as_deref()
        .is_none_or(|t| crate::service::older_than(t, k.host_stale_after()))
}

pub(super) fn server_host(k: &App, h: &HostRecord) -> ServerHost {
    ServerHost {
        joined: h.joined_at.is_some(),
        last_report_at: h.last_report_at.clone(),
        version: h.version.clone(),
        stale: stale(k, h),
        unreachable_since: h.unreachable_since.clone(),
        drift: last_report(h).map(|r| r.drift).unwrap_or_default(),
    }
}

fn host_response(k: &App, h: HostRecord) -> HostResponse {
    let report = last_report(&h);
    HostResponse {
        joined: h.joined_at.is_some(),
        stale: stale(k, &h),
        drift: report.as_ref().map(|r| r.drift.clone()).unwrap_or_default(),
        units_failed: report.map(|r| r.units_failed()).unwrap_or_default(),
        hostname: h.hostname,
        poke_url: h.poke_url,
        version: h.version,
        joined_at: h.joined_at,
        last_report_at: h.last_report_at,
        unreachable_since: h.unreachable_since,
        unreachable_reason: h.unreachable_reason,
        facts: h.facts,
    }
}

/// Allow a fleet host to join (a new one: 201) or give a known one a new token (200; the old
/// one stops working). The token is shown only here.
#[utoipa::path(post, path = "/api/admin/hosts", tag = "fleet",
    request_body = HostCreateRequest,
    responses((status = 201, body = HostTokenResponse), (status = 200, description = "A known host's new token", body = HostTokenResponse), (status = 422, body = HTTPValidationError)))]
pub(super) async fn create_host(
    State(k): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: axum::body::Body,
) -> ApiResult<(StatusCode, Json<HostTokenResponse>)> {
    super::handlers::require(&k, &caller, Role::Admin, "create_host", None).await?;
    let body = super::handlers::read_body(&k, body).await?;
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Req {
        hostname: String,
    }
    let req: Req = parse_json(&body)?;
    if let Err(e) = crate::model::validate::hostname(&req.hostname) {
        return Err(invalid(&["hostname"], json!(req.hostname), e));
    }
    let token = crate::auth::new_host_token()
        .map_err(|e| ApiError::detail(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let (k2, h, hash) = (
        k.clone(),
        req.hostname.clone(),
        crate::auth::sha256_hex(&token),
    );
    let actor = caller.actor.clone();
    let new = blocking(move || {
        let new = k2.store.put_host(&h, &hash)?;
        let what = if new {
            "host added"
        } else {
            "host token replaced"
        };
        k2.record(
            &actor,
            "create_host",
            None,
            Some(&h),
            Ok(()),
            None,
            Some(json!({"detail": what})),
        );
        Ok(new)
    })
    .await?;
    let status = if new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(HostTokenResponse {
            hostname: req.hostname,
            token,
        }),
    ))
}

/// Fleet hosts: joined or not, last report, version, staleness, reachability, drift.
#[utoipa::path(get, path = "/api/admin/hosts", tag = "fleet",
    responses((status = 200, body = Vec<HostResponse>)))]
pub(super) async fn list_hosts(
    State(k): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<Vec<HostResponse>>> {
    super::handlers::require(&k, &caller, Role::Readonly, "list_hosts", None).await?;
    let k2 = k.clone();
    let hosts = blocking(move || Ok(k2.store.hosts()?)).await?;
    Ok(Json(
        hosts.into_iter().map(|h| host_response(&k, h)).collect(),
    ))
}

/// Forget a fleet host: its token stops working (its servers stay in the inventory).
#[utoipa::path(delete, path = "/api/admin/hosts/{hostname}", tag = "fleet",
    params(("hostname" = String, Path)),
    responses((status = 200, body = Object), (status = 404, body = ErrorDetail), (status = 409, description = "The host still has a server: decommission it first", body = ErrorDetail)))]
pub(super) async fn delete_host(
    State(k): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(hostname): Path<String>,
) -> ApiResult<Json<Value>> {
    super::handlers::require(&k, &caller, Role::Admin, "delete_host", Some(&hostname)).await?;
    let (k2, actor) = (k.clone(), caller.actor.clone());
    let h = hostname.clone();
    let found = blocking(move || {
        // Its server would be left with nobody to apply it: decommission first.
        if let Some(s) = k2.store.server(&h)?
            && !matches!(
                s.status,
                crate::store::ServerStatus::Decommissioned | crate::store::ServerStatus::InitFail
            )
            && !s.inventory_only
        {
            return Err(crate::service::OpError::Conflict(format!(
                "host {h} still has server {h} ({}); decommission it first",
                s.status
            )));
        }
        let found = k2.store.delete_host(&h)?;
        if found {
            k2.record(&actor, "delete_host", None, Some(&h), Ok(()), None, None);
        }
        Ok(found)
    })
    .await?;
    if !found {
        return Err(ApiError::detail(
            StatusCode::NOT_FOUND,
            format!("host {hostname:?} not found"),
        ));
    }
    Ok(Json(json!({})))
}

/// A host joins (with its token): its facts, where to poke it, its version.
#[utoipa::path(post, path = "/api/hosts/{hostname}/join", tag = "fleet",
    params(("hostname" = String, Path)),
    request_body = crate::service::JoinRequest,
    responses((status = 200, body = JoinResponse), (status = 422, body = HTTPValidationError)))]
pub(super) async fn join(
    State(k): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(hostname): Path<String>,
    body: axum::body::Body,
) -> ApiResult<Json<JoinResponse>> {
    require_host(&k, &caller, &hostname, "join").await?;
    let body = super::handlers::read_body(&k, body).await?;
    let req: JoinRequest = parse_json(&body)?;
    check_facts(&req.facts, &["facts"])?;
    check_text(&req.version, &["version"], 64)?;
    if let Some(u) = &req.poke_url {
        check_text(u, &["poke_url"], 512)?;
        let ok = u
            .parse::<http::Uri>()
            .is_ok_and(|uri| uri.scheme_str() == Some("http") && uri.authority().is_some());
        if !ok {
            return Err(invalid(
                &["poke_url"],
                json!(u),
                "must be an http:// URL with a host (http://IP:PORT/api/host/poke)",
            ));
        }
    }
    let facts = serde_json::to_value(&req.facts).unwrap_or(Value::Null);
    let (k2, h, a) = (k.clone(), hostname.clone(), caller.actor.clone());
    blocking(move || {
        k2.store
            .host_joined(&h, &facts, req.poke_url.as_deref(), &req.version)?;
        k2.record(
            &a,
            "join",
            None,
            Some(&h),
            Ok(()),
            None,
            Some(json!({"poke_url": req.poke_url, "version": req.version})),
        );
        Ok(())
    })
    .await?;
    Ok(Json(JoinResponse { hostname }))
}

/// The desired state of a host, from the inventory (the host's token; an admin may read it).
#[utoipa::path(get, path = "/api/hosts/{hostname}/state", tag = "fleet",
    params(("hostname" = String, Path)),
    responses((status = 200, body = DesiredHostState)))]
pub(super) async fn state(
    State(k): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(hostname): Path<String>,
) -> ApiResult<Json<DesiredHostState>> {
    if caller.role != Role::Admin {
        require_host(&k, &caller, &hostname, "state").await?;
    }
    let k2 = k.clone();
    let h = hostname.clone();
    let (as_of, server) = blocking(move || {
        // Read before the inventory: a report of this state then proves the host saw every
        // change made before `as_of`.
        let as_of = crate::time::now();
        let server = k2.store.server(&h)?.filter(|s| {
            !matches!(
                s.status,
                ServerStatus::Decommissioned | ServerStatus::InitFail
            )
        });
        let server = match server {
            Some(s) => {
                let units = k2.store.units_of(&h)?;
                Some(DesiredServer {
                    hostname: s.hostname,
                    ip: s.ip,
                    region: s.region,
                    zone: s.zone,
                    status: s.status.to_string(),
                    cpu_ranges: s.cpu_ranges.iter().map(CpuList::to_string).collect(),
                    port_base: s.port_base,
                    ports_per_cpu: s.ports_per_cpu,
                    uid_base: s.uid_base,
                    limits: s.limits,
                    inventory_only: s.inventory_only,
                    created_at: s.created_at,
                    updated_at: s.updated_at,
                    units: units
                        .iter()
                        .map(|u| serde_json::to_value(u).unwrap_or(Value::Null))
                        .collect(),
                })
            }
            None => None,
        };
        Ok((as_of, server))
    })
    .await?;
    Ok(Json(DesiredHostState {
        hostname,
        as_of,
        server,
    }))
}

/// A host reports what it applied (its token only). The report is stored, wakes this hub's
/// waits on the host, and concludes what it settles even when no hub waits.
#[utoipa::path(post, path = "/api/hosts/{hostname}/report", tag = "fleet",
    params(("hostname" = String, Path)),
    request_body = crate::service::Report,
    responses((status = 200, body = Object), (status = 422, body = HTTPValidationError)))]
pub(super) async fn report(
    State(k): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(hostname): Path<String>,
    body: axum::body::Body,
) -> ApiResult<Json<Value>> {
    require_host(&k, &caller, &hostname, "report").await?;
    let body = super::handlers::read_body(&k, body).await?;
    let report: Report = parse_json(&body)?;
    check_report(&report)?;
    let value = serde_json::to_value(&report).unwrap_or(Value::Null);
    let (k2, h) = (k.clone(), hostname.clone());
    blocking(move || Ok(k2.store.host_reported(&h, &value, &report.version)?)).await?;
    k.fleet.wake(&hostname);
    // What the report settles that nobody here waits for, after the host has its answer.
    let k2 = k.clone();
    tokio::spawn(async move { sweep(&k2, Some(hostname)).await });
    Ok(Json(json!({})))
}

fn check_text(s: &str, field: &[&str], max: usize) -> ApiResult<()> {
    if s.len() > max || s.chars().any(char::is_control) {
        return Err(invalid(
            field,
            json!(crate::audit::clip(s, 128)),
            format!("at most {max} bytes, without control characters"),
        ));
    }
    Ok(())
}

fn check_facts(f: &crate::service::Facts, at: &[&str]) -> ApiResult<()> {
    let field = |name: &'static str| -> Vec<&str> { at.iter().copied().chain([name]).collect() };
    if let Some(c) = &f.cpus_online
        && c.parse::<CpuList>().is_err()
    {
        return Err(invalid(&field("cpus_online"), json!(c), "not a CPU list"));
    }
    if let Some(nodes) = &f.numa_nodes {
        if nodes.len() > 1024 {
            return Err(invalid(
                &field("numa_nodes"),
                json!(nodes.len()),
                "too many nodes",
            ));
        }
        for (n, cpus) in nodes {
            if n.parse::<u32>().is_err() || cpus.parse::<CpuList>().is_err() {
                return Err(invalid(
                    &field("numa_nodes"),
                    json!({ n: cpus }),
                    "node numbers to CPU lists",
                ));
            }
        }
    }
    if let Some([lo, hi]) = f.ephemeral_ports
        && lo > hi
    {
        return Err(invalid(
            &field("ephemeral_ports"),
            json!([lo, hi]),
            "[low, high] with low <= high",
        ));
    }
    check_text(&f.kloigos_version, &field("kloigos_version"), 64)
}

fn check_report(r: &Report) -> ApiResult<()> {
    use time::OffsetDateTime;
    use time::format_description::well_known::Rfc3339;
    if OffsetDateTime::parse(&r.as_of, &Rfc3339).is_err() {
        return Err(invalid(&["as_of"], json!(r.as_of), "not an RFC 3339 time"));
    }
    check_text(&r.version, &["version"], 64)?;
    check_facts(&r.facts, &["facts"])?;
    if let Some(s) = &r.server {
        check_text(&s.created_at, &["server", "created_at"], 64)?;
        if let Some(e) = &s.error {
            check_text(e, &["server", "error"], MAX_TEXT)?;
        }
    }
    if r.units.len() > MAX_UNITS_REPORTED {
        return Err(invalid(&["units"], json!(r.units.len()), "too many units"));
    }
    for u in &r.units {
        check_text(&u.compute_id, &["units", "compute_id"], 256)?;
        if let Some(c) = &u.claim {
            check_text(c, &["units", "claim"], 64)?;
        }
        if let Some(e) = &u.error {
            check_text(e, &["units", "error"], MAX_TEXT)?;
        }
    }
    if r.drift.len() > MAX_DRIFT {
        return Err(invalid(
            &["drift"],
            json!(r.drift.len()),
            "too many drift lines",
        ));
    }
    for d in &r.drift {
        check_text(d, &["drift"], MAX_TEXT)?;
    }
    Ok(())
}
