//! The HTTP API: upstream Kloigos v0.2's endpoints under `/api` (same paths, same JSON field
//! names and order, FastAPI-style `422 {"detail": [...]}`), plus a few additive endpoints.
//! Request bodies are parsed by hand from JSON values so that every problem is reported the
//! way FastAPI/pydantic reports it, all at once.

use crate::auth::{Caller, Role, Tokens};
use crate::model::{CpuList, PortPlan, ports, validate};
use crate::render::validate_io_limit;
use crate::service::{self, Allocate, FieldError, InitServer, Kloigos, OpError};
use crate::store::{EventFilter, Limits, Server, Unit, UnitFilter};
use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde::Serialize;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use utoipa::{OpenApi, ToSchema};

/// Who is calling, as the transport tells it.
#[derive(Debug, Clone)]
pub enum Peer {
    /// Unix socket: the kernel's peer credentials.
    Unix {
        uid: u32,
        gid: u32,
        pid: Option<i32>,
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
pub struct App {
    pub kloigos: Kloigos,
    pub tokens: Tokens,
    /// Role of a TCP caller without a token (None: such calls get 401). For playbooks that
    /// cannot send a header; off by default.
    pub tcp_anonymous: Option<Role>,
    /// Names besides loopback a TCP request's `Host` (and a browser's `Origin`) may carry.
    pub allowed_hosts: Vec<String>,
    /// How long a request body may take to arrive.
    pub body_timeout: Duration,
    /// Refusals recorded per source and window (the rest are counted, then summarized).
    pub denials: std::sync::Mutex<crate::audit::DenialLimiter>,
}

impl App {
    pub fn new(kloigos: Kloigos, tokens: Tokens) -> App {
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
        }
    }
}

impl std::ops::Deref for App {
    type Target = Kloigos;
    fn deref(&self) -> &Kloigos {
        &self.kloigos
    }
}

pub type AppState = Arc<App>;

// ---- schemas (for the OpenAPI document; field order is the JSON order) -------------------

/// A tag value: a string, an integer or a list of strings.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(untagged)]
pub enum TagValue {
    String(String),
    Integer(i64),
    Strings(Vec<String>),
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ComputeUnitRequest {
    #[schema(default = 4, minimum = 1)]
    pub cpu_count: Option<i64>,
    pub region: Option<String>,
    pub zone: Option<String>,
    /// Free-form tags; `deployment_id` and `owner` are the ones upstream's tools use. At most
    /// 64 tags, values of at most 256 characters, 4096 bytes in all as JSON.
    pub tags: Option<BTreeMap<String, TagValue>>,
    /// One OpenSSH public key (`ssh-ed25519 AAAA... comment`), no options.
    pub ssh_public_key: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ComputeUnitResponse {
    pub compute_id: String,
    pub hostname: String,
    pub ip: String,
    pub cpu_count: u32,
    pub cpu_range: String,
    pub region: String,
    pub zone: String,
    pub status: String,
    /// When the unit was allocated (RFC 3339, UTC); null unless allocated.
    pub started_at: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub tags: Option<Value>,
    /// Every CPU of the unit, comma separated.
    pub cpu_list: String,
    pub ports_range: Option<String>,
    /// Additive: the unit's Unix user (`ssh <user>@<ip>`).
    pub user: String,
    /// Additive: the unit's Unix UID.
    pub uid: u32,
    /// Additive: who allocated it (`token:NAME` or `unix:USER(uid N)`); null unless allocated.
    pub allocated_by: Option<String>,
    /// Additive: why reconcile could not repair the unit on its host; null when nothing is wrong.
    pub problem: Option<String>,
}

impl From<&Unit> for ComputeUnitResponse {
    fn from(u: &Unit) -> Self {
        let cpu_list = u
            .cpu_range
            .parse::<CpuList>()
            .map(|c| {
                c.iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        ComputeUnitResponse {
            compute_id: u.compute_id.clone(),
            hostname: u.hostname.clone(),
            ip: u.ip.clone(),
            cpu_count: u.cpu_count,
            cpu_range: u.cpu_range.clone(),
            region: u.region.clone(),
            zone: u.zone.clone(),
            status: u.status.to_string(),
            started_at: u.started_at.clone(),
            tags: u.tags.clone(),
            cpu_list,
            ports_range: Some(u.ports_range.clone()),
            user: u.user.clone(),
            uid: u.uid,
            allocated_by: u.allocated_by.clone(),
            problem: u.problem.clone(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InitServerRequest {
    pub ip: String,
    pub region: String,
    pub zone: String,
    pub hostname: String,
    /// CPU lists, one per compute unit: `0-15`, `0,2,4`, `0-63:2`.
    pub cpu_ranges: Vec<String>,
    /// Additive: first port of CPU 0's block (default 2000).
    pub port_base: Option<u16>,
    /// Additive: ports each CPU owns (default 100).
    pub ports_per_cpu: Option<u16>,
    /// Additive: UID of the unit whose first CPU is 0 (default 20000).
    pub uid_base: Option<u32>,
    /// Additive: resource limits for every unit of this server.
    pub limits: Option<Limits>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ServerResponse {
    pub hostname: String,
    pub ip: String,
    pub region: String,
    pub zone: String,
    pub status: String,
    pub cpu_ranges: Vec<String>,
    pub port_base: u16,
    pub ports_per_cpu: u16,
    pub uid_base: u32,
    pub limits: Limits,
    pub created_at: String,
    /// True for the host this Kloigos runs on (its units are applied here).
    pub local: bool,
    /// NUMA nodes and their CPUs (the local host only; empty when unknown).
    pub numa_nodes: Vec<NumaNode>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct NumaNode {
    pub node: u32,
    /// CPUs of the node, `0-15,32-47`.
    pub cpus: String,
}

/// The caller, as the API sees it.
#[derive(Debug, Serialize, ToSchema)]
pub struct WhoAmI {
    pub actor: String,
    /// `admin`, `user` or `readonly`.
    pub role: String,
}

/// One step of a validation error's `loc`: a field name or a list index (FastAPI's shape).
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum LocItem {
    String(String),
    Integer(i64),
}

/// FastAPI's validation error item (the document's view of `service::FieldError`).
#[derive(Debug, Serialize, ToSchema)]
pub struct ValidationError {
    /// Where: `["body", "tags", "owner"]`, `["body", "cpu_ranges", 0]`, `["query", "limit"]`.
    pub loc: Vec<LocItem>,
    pub msg: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// The offending input, as sent (any JSON value).
    #[schema(value_type = Value)]
    pub input: Value,
    /// Details of the error, e.g. `{"error": "..."}`.
    #[schema(value_type = Option<Object>)]
    pub ctx: Option<Value>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HTTPValidationError {
    pub detail: Vec<ValidationError>,
}

/// Every other error: `{"detail": "what went wrong"}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    pub detail: String,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Κλοηγός / Kloigos API", description = "Compute units cut from Linux hosts with systemd and nftables. Compatible with upstream Kloigos v0.2 under /api."),
    paths(allocate, deallocate, list_units, get_unit, init_server, decommission_server, list_servers, list_events, whoami, healthz),
    components(schemas(ComputeUnitRequest, ComputeUnitResponse, InitServerRequest, ServerResponse, NumaNode, WhoAmI, HTTPValidationError, ValidationError, LocItem, ErrorDetail, TagValue, Limits, crate::store::Event)),
    tags((name = "compute_units"), (name = "admin"), (name = "audit")),
    modifiers(&BearerAuth, &CommonErrors),
    security(("bearer" = []))
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The error responses that any operation of a kind can give, declared on each of them (so a
/// client generated from the document knows them): every `/api` call may get 401 (no or a bad
/// token); every operation 403 (over TCP: a `Host` that is not this service's, or a change from
/// a foreign `Origin`; on `/api`, a role too low for a change), 500, and 503 (the connection
/// caps are reached: written before routing); one with a path parameter 400 (not UTF-8); one
/// with a body 408 (it arrived too slowly), 413 (over 1 MiB) and 415 (not JSON). All are
/// `ErrorDetail`.
struct CommonErrors;

const COMMON_ERRORS: [(&str, &str); 8] = [
    ("400", "The URL could not be decoded"),
    ("401", "Authentication required, or an invalid bearer token"),
    (
        "403",
        "Refused: over TCP, a Host header that is not this service's (add the name to KLOIGOS_ALLOWED_HOSTS) or a change sent from another web site's Origin; or the caller's role does not allow this",
    ),
    ("408", "The request body did not arrive in time"),
    ("413", "Request body over 1 MiB"),
    (
        "415",
        "A request body that is not declared as JSON (send Content-Type: application/json)",
    ),
    ("500", "Internal error"),
    (
        "503",
        "Too many connections (in all, from this user, or over TCP); retry later. Sent before the request is read",
    ),
];

/// Which of [`COMMON_ERRORS`] an operation can give.
fn common_errors(path: &str, has_body: bool) -> Vec<&'static str> {
    let api = path.starts_with("/api/");
    let mut out = Vec::new();
    if path.contains('{') {
        out.push("400");
    }
    if api {
        out.push("401");
    }
    out.push("403");
    if has_body {
        out.extend(["408", "413", "415"]);
    }
    out.extend(["500", "503"]);
    out
}

impl utoipa::Modify for CommonErrors {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
        let components = openapi.components.get_or_insert_with(Default::default);
        for (code, description) in COMMON_ERRORS {
            let content = ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorDetail")))
                .build();
            components.responses.insert(
                format!("E{code}"),
                RefOr::T(
                    ResponseBuilder::new()
                        .description(description)
                        .content("application/json", content)
                        .build(),
                ),
            );
        }
        for (path, item) in openapi.paths.paths.iter_mut() {
            for op in [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.delete,
            ] {
                let Some(op) = op else { continue };
                for code in common_errors(path, op.request_body.is_some()) {
                    op.responses
                        .responses
                        .entry(code.to_string())
                        .or_insert_with(|| {
                            RefOr::Ref(Ref::new(format!("#/components/responses/E{code}")))
                        });
                }
            }
        }
    }
}

// ---- errors ------------------------------------------------------------------------------

pub struct ApiError(pub StatusCode, pub Value);

impl ApiError {
    pub fn detail(status: StatusCode, detail: impl Into<String>) -> ApiError {
        ApiError(status, json!({ "detail": detail.into() }))
    }
    pub fn invalid(errors: Vec<FieldError>) -> ApiError {
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
            OpError::Invalid(errors) => ApiError::invalid(errors),
            OpError::NotFound(m) => ApiError::detail(StatusCode::NOT_FOUND, m),
            OpError::Conflict(m) => ApiError::detail(StatusCode::CONFLICT, m),
            OpError::Forbidden(m) => ApiError::detail(StatusCode::FORBIDDEN, m),
            other => {
                tracing::error!(error = %other, "request failed");
                ApiError::detail(StatusCode::INTERNAL_SERVER_ERROR, other.to_string())
            }
        }
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Runs a blocking service call off the async runtime.
async fn blocking<T: Send + 'static>(
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

// ---- FastAPI-style parsing ---------------------------------------------------------------

fn err(kind: &str, loc: Vec<Value>, msg: &str, input: Value) -> FieldError {
    FieldError {
        kind: kind.into(),
        loc,
        msg: msg.into(),
        input,
        ctx: None,
    }
}

/// The JSON object of a request body, or the FastAPI errors for a body that is not one.
fn json_object(body: &Bytes) -> Result<Map<String, Value>, Vec<FieldError>> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(vec![err(
            "missing",
            vec![json!("body")],
            "Field required",
            Value::Null,
        )]);
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(vec![err(
            "model_attributes_type",
            vec![json!("body")],
            "Input should be a valid dictionary or object to extract fields from",
            other,
        )]),
        Err(e) => {
            // FastAPI reports the byte offset of the error.
            let offset = body
                .split(|&b| b == b'\n')
                .take(e.line().saturating_sub(1))
                .map(|l| l.len() + 1)
                .sum::<usize>()
                + e.column().saturating_sub(1);
            let mut fe = err(
                "json_invalid",
                vec![json!("body"), json!(offset)],
                "JSON decode error",
                json!({}),
            );
            fe.ctx = Some(json!({ "error": e.to_string() }));
            Err(vec![fe])
        }
    }
}

struct Fields<'a> {
    obj: &'a Map<String, Value>,
    errors: Vec<FieldError>,
}

impl<'a> Fields<'a> {
    fn loc(name: &str) -> Vec<Value> {
        vec![json!("body"), json!(name)]
    }

    fn get(&mut self, name: &str, required: bool) -> Option<&'a Value> {
        match self.obj.get(name) {
            Some(v) => Some(v),
            None => {
                if required {
                    self.errors.push(err(
                        "missing",
                        Self::loc(name),
                        "Field required",
                        Value::Object(self.obj.clone()),
                    ));
                }
                None
            }
        }
    }

    fn string(&mut self, name: &str, required: bool) -> Option<String> {
        match self.get(name, required)? {
            Value::String(s) => Some(s.clone()),
            Value::Null if !required => None,
            other => {
                self.errors.push(err(
                    "string_type",
                    Self::loc(name),
                    "Input should be a valid string",
                    other.clone(),
                ));
                None
            }
        }
    }

    /// pydantic's lax integer: JSON integers, floats without a fraction, numeric strings.
    fn int(&mut self, name: &str) -> Option<i64> {
        let v = self.get(name, false)?;
        match lax_int(v) {
            Ok(i) => i,
            Err(e) => {
                self.errors.push(FieldError {
                    loc: Self::loc(name),
                    ..*e
                });
                None
            }
        }
    }

    /// Adds a semantic error for a field.
    fn check(&mut self, name: &str, input: &str, r: Result<(), String>) {
        if let Err(reason) = r {
            self.errors
                .push(FieldError::value(Self::loc(name), json!(input), reason));
        }
    }
}

fn lax_int(v: &Value) -> Result<Option<i64>, Box<FieldError>> {
    match v {
        Value::Null => Ok(None),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Ok(Some(i))
            } else if let Some(f) = n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15) {
                Ok(Some(f as i64))
            } else {
                Err(Box::new(err(
                    "int_from_float",
                    vec![],
                    "Input should be a valid integer, got a number with a fractional part",
                    v.clone(),
                )))
            }
        }
        Value::String(s) => s.trim().parse::<i64>().map(Some).map_err(|_| {
            Box::new(err(
                "int_parsing",
                vec![],
                "Input should be a valid integer, unable to parse string as an integer",
                v.clone(),
            ))
        }),
        other => Err(Box::new(err(
            "int_type",
            vec![],
            "Input should be a valid integer",
            other.clone(),
        ))),
    }
}

const MAX_TAGS: usize = 64;
const MAX_TAG_TEXT: usize = 256;
/// Largest tags object, as JSON. Tags are kept with the unit and twice in every audit row of
/// its allocation and release (before and after): without a cap on the whole, a `user` caller
/// could make each row ~1 MiB and fill the disk within the row limit.
pub const MAX_TAGS_JSON: usize = 4096;

fn parse_tags(f: &mut Fields<'_>) -> Option<Value> {
    let v = f.get("tags", true)?;
    let obj = match v {
        Value::Null => return None,
        Value::Object(o) => o,
        other => {
            f.errors.push(err(
                "dict_type",
                Fields::loc("tags"),
                "Input should be a valid dictionary",
                other.clone(),
            ));
            return None;
        }
    };
    if obj.len() > MAX_TAGS {
        f.errors.push(FieldError::value(
            Fields::loc("tags"),
            v.clone(),
            format!("at most {MAX_TAGS} tags"),
        ));
        return None;
    }
    let mut out = Map::new();
    for (k, val) in obj {
        let loc = vec![json!("body"), json!("tags"), json!(k)];
        if let Err(reason) = validate::tag_key(k) {
            f.errors
                .push(FieldError::value(loc.clone(), json!(k), reason));
            continue;
        }
        let text_ok = |s: &str| validate::free_text(s, MAX_TAG_TEXT);
        let ok = match val {
            Value::String(s) => text_ok(s),
            Value::Number(n) if n.is_i64() => Ok(()),
            Value::Array(items) => items
                .iter()
                .map(|i| match i {
                    Value::String(s) => text_ok(s),
                    _ => Err("list items must be strings".into()),
                })
                .collect::<Result<Vec<_>, _>>()
                .and_then(|_| {
                    (items.len() <= MAX_TAGS)
                        .then_some(())
                        .ok_or_else(|| format!("at most {MAX_TAGS} items"))
                }),
            _ => Err("a tag value must be a string, an integer or a list of strings".into()),
        };
        match ok {
            Ok(()) => {
                out.insert(k.clone(), val.clone());
            }
            Err(reason) => f.errors.push(FieldError::value(loc, val.clone(), reason)),
        }
    }
    let out = Value::Object(out);
    let size = out.to_string().len();
    if size > MAX_TAGS_JSON {
        f.errors.push(FieldError::value(
            Fields::loc("tags"),
            v.clone(),
            format!("tags take {size} bytes as JSON, at most {MAX_TAGS_JSON} are allowed"),
        ));
        return None;
    }
    Some(out)
}

pub fn parse_allocate(body: &Bytes) -> Result<Allocate, Vec<FieldError>> {
    let obj = json_object(body)?;
    let mut f = Fields {
        obj: &obj,
        errors: Vec::new(),
    };
    let cpu_count = f.int("cpu_count").unwrap_or(4);
    if cpu_count < 1 || cpu_count > i64::from(crate::model::cpulist::MAX_CPU) + 1 {
        f.errors.push(FieldError::value(
            Fields::loc("cpu_count"),
            json!(cpu_count),
            "cpu_count must be at least 1",
        ));
    }
    let region = f.string("region", false);
    if let Some(r) = &region {
        f.check("region", r, validate::label(r));
    }
    let zone = f.string("zone", false);
    if let Some(z) = &zone {
        f.check("zone", z, validate::label(z));
    }
    let tags = parse_tags(&mut f);
    let key = f.string("ssh_public_key", true);
    let ssh_key = key
        .as_ref()
        .and_then(|k| match validate::ssh_public_key(k) {
            Ok(key) => Some(key),
            Err(reason) => {
                f.errors.push(FieldError::value(
                    Fields::loc("ssh_public_key"),
                    json!(k),
                    reason,
                ));
                None
            }
        });
    match (f.errors.is_empty(), ssh_key) {
        (true, Some(ssh_key)) => Ok(Allocate {
            cpu_count: cpu_count as u32,
            region,
            zone,
            tags,
            ssh_key,
        }),
        _ => Err(f.errors),
    }
}

fn parse_limits(f: &mut Fields<'_>) -> Limits {
    let Some(v) = f.get("limits", false) else {
        return Limits::default();
    };
    if v.is_null() {
        return Limits::default();
    }
    match serde_json::from_value::<Limits>(v.clone()) {
        Ok(l) => {
            for e in l
                .io_read_bandwidth_max
                .iter()
                .chain(&l.io_write_bandwidth_max)
            {
                f.check("limits", e, validate_io_limit(e));
            }
            if l.io_weight.is_some_and(|w| !(1..=10000).contains(&w)) {
                f.check(
                    "limits",
                    "io_weight",
                    Err("io_weight must be 1..=10000".into()),
                );
            }
            if l.tasks_max == Some(0) {
                f.check(
                    "limits",
                    "tasks_max",
                    Err("tasks_max must be at least 1".into()),
                );
            }
            l
        }
        Err(e) => {
            f.errors.push(FieldError::value(
                Fields::loc("limits"),
                v.clone(),
                e.to_string(),
            ));
            Limits::default()
        }
    }
}

pub fn parse_init_server(body: &Bytes) -> Result<InitServer, Vec<FieldError>> {
    let obj = json_object(body)?;
    let mut f = Fields {
        obj: &obj,
        errors: Vec::new(),
    };
    let ip = f.string("ip", true);
    let region = f.string("region", true);
    let zone = f.string("zone", true);
    let hostname = f.string("hostname", true);
    if let Some(ip) = &ip {
        let r = ip
            .parse::<std::net::IpAddr>()
            .map(|_| ())
            .map_err(|_| format!("{ip:?} is not an IPv4 or IPv6 address"));
        f.check("ip", ip, r);
    }
    for (name, v) in [("region", &region), ("zone", &zone)] {
        if let Some(v) = v {
            f.check(name, v, validate::label(v));
        }
    }
    if let Some(h) = &hostname {
        f.check("hostname", h, validate::hostname(h));
    }
    let mut cpu_ranges = Vec::new();
    match f.get("cpu_ranges", true) {
        None => {}
        Some(Value::Array(items)) => {
            if items.is_empty() {
                f.errors.push(FieldError::value(
                    Fields::loc("cpu_ranges"),
                    json!([]),
                    "at least one CPU range is needed",
                ));
            }
            for (i, item) in items.iter().enumerate() {
                let loc = vec![json!("body"), json!("cpu_ranges"), json!(i)];
                match item {
                    Value::String(s) => match s.parse::<CpuList>() {
                        Ok(c) => cpu_ranges.push(c),
                        Err(e) => {
                            f.errors
                                .push(FieldError::value(loc, item.clone(), e.to_string()))
                        }
                    },
                    other => f.errors.push(err(
                        "string_type",
                        loc,
                        "Input should be a valid string",
                        other.clone(),
                    )),
                }
            }
        }
        Some(other) => f.errors.push(err(
            "list_type",
            Fields::loc("cpu_ranges"),
            "Input should be a valid list",
            other.clone(),
        )),
    }
    let mut small = |name: &str, default: i64, max: i64| -> i64 {
        match f.int(name) {
            None => default,
            Some(v) if (1..=max).contains(&v) => v,
            Some(v) => {
                f.errors.push(FieldError::value(
                    Fields::loc(name),
                    json!(v),
                    format!("{name} must be between 1 and {max}"),
                ));
                default
            }
        }
    };
    let port_base = small("port_base", ports::DEFAULT_BASE.into(), 65535);
    let per_cpu = small("ports_per_cpu", ports::DEFAULT_PER_CPU.into(), 65535);
    let uid_base = small("uid_base", service::DEFAULT_UID_BASE.into(), 1_999_000_000);
    if (1..1000).contains(&uid_base) {
        f.errors.push(FieldError::value(
            Fields::loc("uid_base"),
            json!(uid_base),
            "uid_base below 1000 would collide with system users",
        ));
    }
    let limits = parse_limits(&mut f);
    let plan = PortPlan::new(port_base as u16, per_cpu as u16);
    if let Err(e) = &plan {
        f.errors.push(FieldError::value(
            Fields::loc("port_base"),
            json!(port_base),
            e.to_string(),
        ));
    }
    match (f.errors.is_empty(), ip, region, zone, hostname, plan) {
        (true, Some(ip), Some(region), Some(zone), Some(hostname), Ok(ports)) => Ok(InitServer {
            hostname,
            ip,
            region,
            zone,
            cpu_ranges,
            ports,
            uid_base: uid_base as u32,
            limits,
        }),
        _ => Err(f.errors),
    }
}

/// Query parameters, FastAPI style: unknown ones ignored, bad integers reported.
fn query_map(raw: Option<&str>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        out.insert(percent_decode(k), percent_decode(v));
    }
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_int(
    q: &BTreeMap<String, String>,
    name: &str,
    errors: &mut Vec<FieldError>,
) -> Option<i64> {
    let v = q.get(name)?;
    match v.trim().parse::<i64>() {
        Ok(i) => Some(i),
        Err(_) => {
            errors.push(err(
                "int_parsing",
                vec![json!("query"), json!(name)],
                "Input should be a valid integer, unable to parse string as an integer",
                json!(v),
            ));
            None
        }
    }
}

fn query_bool(q: &BTreeMap<String, String>, name: &str, errors: &mut Vec<FieldError>) -> bool {
    match q.get(name).map(|s| s.to_ascii_lowercase()) {
        None => false,
        Some(v) if ["true", "1", "yes", "on", "t", "y"].contains(&v.as_str()) => true,
        Some(v) if ["false", "0", "no", "off", "f", "n"].contains(&v.as_str()) => false,
        Some(v) => {
            errors.push(err(
                "bool_parsing",
                vec![json!("query"), json!(name)],
                "Input should be a valid boolean, unable to interpret input",
                json!(v),
            ));
            false
        }
    }
}

// ---- handlers ----------------------------------------------------------------------------

fn peer_of(ext: &axum::http::Extensions) -> Peer {
    ext.get::<Peer>().cloned().unwrap_or(Peer::Unknown)
}

/// Allocate a FREE compute unit with exactly `cpu_count` CPUs.
#[utoipa::path(post, path = "/api/compute_units/allocate", tag = "compute_units",
    request_body = ComputeUnitRequest,
    responses((status = 200, body = ComputeUnitResponse), (status = 409, description = "No FREE unit matches", body = ErrorDetail), (status = 422, body = HTTPValidationError)))]
async fn allocate(
    State(k): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: axum::body::Body,
) -> ApiResult<Json<ComputeUnitResponse>> {
    require(&k, &caller, Role::User, "allocate", None).await?;
    let body = read_body(&k, body).await?;
    let req = parse_allocate(&body).map_err(ApiError::invalid)?;
    let actor = caller.actor.clone();
    let unit = blocking(move || k.allocate(req, &actor)).await?;
    Ok(Json((&unit).into()))
}

/// Deallocate a unit: its owner's key, processes and files are gone; it is FREE again.
#[utoipa::path(delete, path = "/api/compute_units/deallocate/{compute_id}", tag = "compute_units",
    params(("compute_id" = String, Path)),
    responses((status = 200, body = Object), (status = 404, body = ErrorDetail), (status = 409, description = "Not in a state that can be deallocated", body = ErrorDetail), (status = 422, body = HTTPValidationError)))]
async fn deallocate(
    State(k): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    require(&k, &caller, Role::User, "deallocate", Some(&id)).await?;
    let k2 = k.clone();
    let who = caller.clone();
    let r = blocking(move || {
        k2.deallocate(&id, &who.actor, &|unit| {
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
async fn list_units(
    State(k): State<AppState>,
    Extension(_caller): Extension<Caller>,
    RawQuery(raw): RawQuery,
) -> ApiResult<Json<Vec<ComputeUnitResponse>>> {
    let q = query_map(raw.as_deref());
    let mut errors = Vec::new();
    let cpu_count = query_int(&q, "cpu_count", &mut errors);
    if !errors.is_empty() {
        return Err(ApiError::invalid(errors));
    }
    let f = UnitFilter {
        compute_id: q.get("compute_id").cloned(),
        hostname: q.get("hostname").cloned(),
        region: q.get("region").cloned(),
        zone: q.get("zone").cloned(),
        cpu_count,
        deployment_id: q.get("deployment_id").cloned(),
        status: q.get("status").cloned(),
    };
    let units = blocking(move || k.units(&f)).await?;
    Ok(Json(units.iter().map(ComputeUnitResponse::from).collect()))
}

/// One compute unit (additive endpoint).
#[utoipa::path(get, path = "/api/compute_units/{compute_id}", tag = "compute_units",
    params(("compute_id" = String, Path)),
    responses((status = 200, body = ComputeUnitResponse), (status = 404, body = ErrorDetail)))]
async fn get_unit(
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
    responses((status = 200, body = Object), (status = 409, description = "Server already initialized", body = ErrorDetail), (status = 422, body = HTTPValidationError)))]
async fn init_server(
    State(k): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: axum::body::Body,
) -> ApiResult<Json<Value>> {
    require(&k, &caller, Role::Admin, "init_server", None).await?;
    let body = read_body(&k, body).await?;
    let actor = caller.actor.clone();
    let req = parse_init_server(&body).map_err(ApiError::invalid)?;
    blocking(move || k.init_server(req, &actor)).await?;
    Ok(Json(json!({})))
}

/// Remove a server and everything Kloigos made on it. Refused while units are in use unless
/// `force=true`.
#[utoipa::path(delete, path = "/api/admin/decommission_server/{hostname}", tag = "admin",
    params(("hostname" = String, Path), ("force" = Option<bool>, Query)),
    responses((status = 200, body = Object), (status = 404, body = ErrorDetail), (status = 409, description = "Units still in use", body = ErrorDetail), (status = 422, body = HTTPValidationError)))]
async fn decommission_server(
    State(k): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(hostname): Path<String>,
    RawQuery(raw): RawQuery,
) -> ApiResult<Json<Value>> {
    require(&k, &caller, Role::Admin, "decommission_server", None).await?;
    let q = query_map(raw.as_deref());
    let mut errors = Vec::new();
    let force = query_bool(&q, "force", &mut errors);
    if !errors.is_empty() {
        return Err(ApiError::invalid(errors));
    }
    let actor = caller.actor.clone();
    blocking(move || k.decommission(&hostname, force, &actor)).await?;
    Ok(Json(json!({})))
}

fn server_response(s: &Server, local: &str) -> ServerResponse {
    ServerResponse {
        hostname: s.hostname.clone(),
        ip: s.ip.clone(),
        region: s.region.clone(),
        zone: s.zone.clone(),
        status: s.status.to_string(),
        cpu_ranges: s.cpu_ranges.clone(),
        port_base: s.port_base,
        ports_per_cpu: s.ports_per_cpu,
        uid_base: s.uid_base,
        limits: s.limits.clone(),
        created_at: s.created_at.clone(),
        local: s.hostname == local,
        numa_nodes: Vec::new(),
    }
}

/// Servers known to this Kloigos (additive endpoint).
#[utoipa::path(get, path = "/api/admin/servers", tag = "admin",
    responses((status = 200, body = Vec<ServerResponse>)))]
async fn list_servers(
    State(k): State<AppState>,
    Extension(_caller): Extension<Caller>,
) -> ApiResult<Json<Vec<ServerResponse>>> {
    let k2 = k.clone();
    let servers = blocking(move || k2.servers()).await?;
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
                if r.local {
                    r.numa_nodes = topology.clone();
                }
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
async fn list_events(
    State(k): State<AppState>,
    Extension(_caller): Extension<Caller>,
    RawQuery(raw): RawQuery,
) -> ApiResult<Json<Vec<crate::store::Event>>> {
    let q = query_map(raw.as_deref());
    let mut errors = Vec::new();
    let before_id = query_int(&q, "before", &mut errors);
    let limit = query_int(&q, "limit", &mut errors).unwrap_or(100);
    if !errors.is_empty() {
        return Err(ApiError::invalid(errors));
    }
    let f = EventFilter {
        compute_id: q.get("compute_id").cloned(),
        hostname: q.get("hostname").cloned(),
        operation: q.get("operation").cloned(),
        actor: q.get("actor").cloned(),
        since: q.get("since").cloned(),
        until: q.get("until").cloned(),
        before_id,
        limit: limit.clamp(1, 1000) as u32,
    };
    Ok(Json(blocking(move || k.events(&f)).await?))
}

/// Who the API takes the caller for, and its role.
#[utoipa::path(get, path = "/api/whoami", tag = "admin", responses((status = 200, body = WhoAmI), (status = 401, body = ErrorDetail)))]
async fn whoami(Extension(caller): Extension<Caller>) -> Json<WhoAmI> {
    Json(WhoAmI {
        actor: caller.actor,
        role: caller.role.to_string(),
    })
}

/// Refuses (403, audited) a caller whose role is below `role`.
async fn require(
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
async fn audit_denied(k: &AppState, caller: &Caller, operation: &str, detail: &str) {
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
pub async fn housekeeping(k: AppState, retention: crate::audit::Retention) {
    let every = k
        .denials
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .window()
        .clamp(Duration::from_secs(1), Duration::from_secs(60));
    let mut tick = tokio::time::interval(every);
    let mut last_prune: Option<std::time::Instant> = None;
    loop {
        tick.tick().await;
        let now = std::time::Instant::now();
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
                    Err(e) => tracing::error!(error = %e, "cannot prune the audit log"),
                }
            }
        })
        .await;
    }
}

/// Reads a request body, after the role check: no faster than the caller sends it, but no
/// longer than `body_timeout`, and no larger than `MAX_BODY`.
async fn read_body(k: &App, body: axum::body::Body) -> ApiResult<Bytes> {
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
async fn authenticate(
    State(k): State<AppState>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
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
            };
            let what = format!("{} {}", req.method(), req.uri().path());
            match credential {
                crate::auth::Credential::Bearer(secret) => {
                    let tokens = k.tokens.clone();
                    match tokio::task::spawn_blocking(move || tokens.verify(&secret)).await {
                        // A token is its own source: one noisy client does not
                        // hide the refusals of others on the same address.
                        Ok(Ok(Some(entry))) => Some(Caller {
                            actor: format!("token:{}", entry.name),
                            role: entry.role,
                            anonymous: false,
                            source: format!("token:{}", entry.name),
                        }),
                        Ok(Ok(None)) => {
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
                        Ok(Err(e)) => {
                            tracing::error!(error = %e, "cannot read the token file");
                            return ApiError::detail(
                                StatusCode::INTERNAL_SERVER_ERROR,
                                format!("cannot check tokens: {e}"),
                            )
                            .into_response();
                        }
                        Err(_) => None,
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
                }),
            }
        }
        Peer::Unknown => None,
    };
    match caller {
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

/// Liveness: the database answers.
#[utoipa::path(get, path = "/healthz", responses((status = 200, body = Object)))]
async fn healthz(State(k): State<AppState>) -> ApiResult<Json<Value>> {
    let k2 = k.clone();
    let servers = blocking(move || k2.servers()).await?;
    Ok(Json(json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "hostname": k.local_hostname(),
        "servers": servers.len(),
    })))
}

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
pub const MAX_BODY: usize = 1024 * 1024;

/// `{"detail": ...}` for an error response that is not JSON yet (axum's extractor rejections,
/// such as a body over [`MAX_BODY`] while it is read, are plain text), from its text or, when
/// it has none, its status.
fn detail_json(status: StatusCode, text: &[u8]) -> Value {
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
async fn json_errors(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
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

async fn not_found() -> ApiError {
    ApiError::detail(StatusCode::NOT_FOUND, "Not Found")
}

async fn method_not_allowed() -> ApiError {
    ApiError::detail(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
}

pub fn router(state: AppState) -> Router {
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
        .route("/api/events", get(list_events))
        .route("/api/whoami", get(whoami))
        .route("/healthz", get(healthz))
        .route("/openapi.json", get(openapi))
        .route(
            "/",
            get(|| async {
                asset(
                    "text/html; charset=utf-8",
                    include_str!("../web/index.html"),
                )
            }),
        )
        .route(
            "/assets/app.js",
            get(|| async {
                asset(
                    "text/javascript; charset=utf-8",
                    include_str!("../web/app.js"),
                )
            }),
        )
        .route(
            "/assets/app.css",
            get(|| async { asset("text/css; charset=utf-8", include_str!("../web/app.css")) }),
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
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state, authenticate))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn(json_errors))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert_eq!(percent_decode("h1_0-15"), "h1_0-15");
        assert_eq!(percent_decode("0%2C2"), "0,2");
        assert_eq!(percent_decode("bad%zz"), "bad%zz");
        assert_eq!(percent_decode("trail%2"), "trail%2");
        assert_eq!(percent_decode("%"), "%");
    }

    #[test]
    fn lax_integers() {
        assert_eq!(lax_int(&json!(4)).unwrap(), Some(4));
        assert_eq!(lax_int(&json!(4.0)).unwrap(), Some(4));
        assert_eq!(lax_int(&json!("8")).unwrap(), Some(8));
        assert_eq!(lax_int(&json!(null)).unwrap(), None);
        assert_eq!(lax_int(&json!(4.5)).unwrap_err().kind, "int_from_float");
        assert_eq!(lax_int(&json!("x")).unwrap_err().kind, "int_parsing");
        assert_eq!(lax_int(&json!([1])).unwrap_err().kind, "int_type");
    }

    #[test]
    fn plain_error_bodies_become_detail() {
        assert_eq!(
            detail_json(
                StatusCode::PAYLOAD_TOO_LARGE,
                b"Failed to buffer the request body: length limit exceeded\n"
            ),
            json!({"detail": "Failed to buffer the request body: length limit exceeded"})
        );
        assert_eq!(
            detail_json(StatusCode::BAD_REQUEST, b"  "),
            json!({"detail": "Bad Request"})
        );
        assert_eq!(
            detail_json(StatusCode::BAD_REQUEST, b"\xff bad"),
            json!({"detail": "\u{fffd} bad"})
        );
    }

    #[test]
    fn which_operations_declare_which_errors() {
        assert_eq!(
            common_errors("/api/compute_units/allocate", true),
            ["401", "403", "408", "413", "415", "500", "503"]
        );
        assert_eq!(
            common_errors("/api/compute_units/{compute_id}", false),
            ["400", "401", "403", "500", "503"]
        );
        assert_eq!(
            common_errors("/api/admin/decommission_server/{hostname}", false),
            ["400", "401", "403", "500", "503"]
        );
        assert_eq!(common_errors("/healthz", false), ["403", "500", "503"]);
    }

    /// What the API sends as a validation error matches what the document declares.
    #[test]
    fn field_errors_match_the_validation_error_schema() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let schema = &doc["components"]["schemas"]["ValidationError"];
        let declared: Vec<&str> = schema["properties"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let required: Vec<&str> = schema["required"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let errors = parse_init_server(&Bytes::from_static(
            br#"{"ip": "x", "cpu_ranges": ["0-3", 7], "limits": {"io_weight": 0}}"#,
        ))
        .unwrap_err();
        assert!(errors.len() > 3, "{errors:?}");
        for e in serde_json::to_value(&errors).unwrap().as_array().unwrap() {
            let sent = e.as_object().unwrap();
            for k in sent.keys() {
                assert!(declared.contains(&k.as_str()), "{k} not declared: {schema}");
            }
            for k in &required {
                assert!(sent.contains_key(*k), "{k} missing from {e}");
            }
            for step in e["loc"].as_array().unwrap() {
                assert!(step.is_string() || step.is_i64(), "{step} in {e}");
            }
        }
        let item_types: Vec<&str> = doc["components"]["schemas"]["LocItem"]["oneOf"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|t| t["type"].as_str())
            .collect();
        assert_eq!(item_types, ["string", "integer"]);
    }

    #[test]
    fn tags_are_bounded_as_a_whole() {
        let key =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICWwemBpMBrDPybmEWyrw0JNlYbamL5YU3v8ozcLKi2u k";
        let body = |tags: Value| {
            Bytes::from(json!({"cpu_count": 2, "ssh_public_key": key, "tags": tags}).to_string())
        };
        let mut big = Map::new();
        for i in 0..20 {
            big.insert(format!("t{i}"), json!("x".repeat(250)));
        }
        let errors = parse_allocate(&body(Value::Object(big.clone()))).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].loc, vec![json!("body"), json!("tags")]);
        assert!(errors[0].msg.contains("4096"), "{}", errors[0].msg);
        big.retain(|k, _| k.len() == 2 && k.as_str() < "t9");
        let ok = parse_allocate(&body(Value::Object(big))).map(|a| a.tags);
        assert!(
            matches!(ok, Ok(Some(Value::Object(ref m))) if m.len() == 9),
            "{ok:?}"
        );
    }

    #[test]
    fn body_errors_have_fastapi_shape() {
        let e = json_object(&Bytes::from_static(b"")).unwrap_err();
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            json!([{"type": "missing", "loc": ["body"], "msg": "Field required", "input": null}])
        );
        let e = json_object(&Bytes::from_static(b"{\"a\": }")).unwrap_err();
        assert_eq!(e[0].kind, "json_invalid");
        assert_eq!(e[0].loc, vec![json!("body"), json!(6)]);
        let e = json_object(&Bytes::from_static(b"[1]")).unwrap_err();
        assert_eq!(e[0].kind, "model_attributes_type");
    }
}
