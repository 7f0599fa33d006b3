//! The API's schemas (field order is the JSON order) and the OpenAPI document built from them
//! and from the handlers' `#[utoipa::path]` annotations. Request DTOs describe what `parse`
//! accepts; a test in `api::tests` proves the two agree field by field.

use super::handlers::*;
use crate::store::{Limits, Unit};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use utoipa::{OpenApi, ToSchema};

/// A tag value: a string, an integer or a list of strings.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // described in the document only: `parse` reads tags as JSON values
pub(crate) enum TagValue {
    String(String),
    Integer(i64),
    Strings(Vec<String>),
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ComputeUnitRequest {
    #[schema(default = 4, minimum = 1)]
    pub(crate) cpu_count: Option<i64>,
    pub(crate) region: Option<String>,
    pub(crate) zone: Option<String>,
    /// Free-form tags; `deployment_id` and `owner` are the ones upstream's tools use. At most
    /// 64 tags, values of at most 256 characters, 4096 bytes in all as JSON. Required, as
    /// upstream's: send `null` for none.
    #[schema(required = true)]
    pub(crate) tags: Option<BTreeMap<String, TagValue>>,
    /// One OpenSSH public key (`ssh-ed25519 AAAA... comment`), no options.
    pub(crate) ssh_public_key: String,
    /// Additive: pick among inventory-only servers' units, and only among them (allocation
    /// then changes only the inventory). Default false.
    #[schema(default = false)]
    pub(crate) inventory_only: Option<bool>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct ComputeUnitResponse {
    pub(crate) compute_id: String,
    pub(crate) hostname: String,
    pub(crate) ip: String,
    pub(crate) cpu_count: u32,
    pub(crate) cpu_range: String,
    pub(crate) region: String,
    pub(crate) zone: String,
    pub(crate) status: String,
    /// When the unit was allocated (RFC 3339, UTC); null unless allocated.
    pub(crate) started_at: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub(crate) tags: Option<Value>,
    /// Every CPU of the unit, comma separated.
    pub(crate) cpu_list: String,
    pub(crate) ports_range: Option<String>,
    /// Additive: the unit's Unix user (`ssh <user>@<ip>`).
    pub(crate) user: String,
    /// Additive: the unit's Unix UID.
    pub(crate) uid: u32,
    /// Additive: who allocated it (`token:NAME` or `unix:USER(uid N)`); null unless allocated.
    pub(crate) allocated_by: Option<String>,
    /// Additive: why reconcile could not repair the unit on its host; null when nothing is wrong.
    pub(crate) problem: Option<String>,
}

impl From<&Unit> for ComputeUnitResponse {
    fn from(u: &Unit) -> Self {
        let cpu_list = u
            .cpu_range
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(",");
        ComputeUnitResponse {
            compute_id: u.compute_id.clone(),
            hostname: u.hostname.clone(),
            ip: u.ip.clone(),
            cpu_count: u.cpu_count,
            cpu_range: u.cpu_range.to_string(),
            region: u.region.clone(),
            zone: u.zone.clone(),
            status: u.status.to_string(),
            started_at: u.started_at.clone(),
            tags: u.tags.clone(),
            cpu_list,
            ports_range: Some(u.ports_range.to_string()),
            user: u.user.clone(),
            uid: u.uid,
            allocated_by: u.allocated_by.clone(),
            problem: u.problem.clone(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct InitServerRequest {
    pub(crate) ip: String,
    pub(crate) region: String,
    pub(crate) zone: String,
    pub(crate) hostname: String,
    /// CPU lists, one per compute unit: `0-15`, `0,2,4`, `0-63:2`.
    pub(crate) cpu_ranges: Vec<String>,
    /// Additive: first port of CPU 0's block (default 2000).
    pub(crate) port_base: Option<u16>,
    /// Additive: ports each CPU owns (default 100).
    pub(crate) ports_per_cpu: Option<u16>,
    /// Additive: UID of the unit whose first CPU is 0 (default 20000).
    pub(crate) uid_base: Option<u32>,
    /// Additive: resource limits for every unit of this server.
    pub(crate) limits: Option<Limits>,
    /// Additive: record a server Kloigos does not configure (a host that never joined). A
    /// hostname that is neither this host nor a joined one is refused without it. Default false.
    #[schema(default = false)]
    pub(crate) inventory_only: Option<bool>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ServerResponse {
    pub(crate) hostname: String,
    pub(crate) ip: String,
    pub(crate) region: String,
    pub(crate) zone: String,
    pub(crate) status: String,
    pub(crate) cpu_ranges: Vec<String>,
    pub(crate) port_base: u16,
    pub(crate) ports_per_cpu: u16,
    pub(crate) uid_base: u32,
    pub(crate) limits: Limits,
    pub(crate) created_at: String,
    /// True for the host this Kloigos runs on (its units are applied here).
    pub(crate) local: bool,
    /// NUMA nodes and their CPUs: this host's from its /sys, a joined host's as it reported
    /// them (empty when unknown).
    pub(crate) numa_nodes: Vec<NumaNode>,
    /// Recorded without being configured (a host that never joined).
    pub(crate) inventory_only: bool,
    /// The fleet host's state, for a server of a host known to the hub; null otherwise.
    pub(crate) host: Option<ServerHost>,
}

/// A fleet host's state as `GET /api/admin/servers` shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct ServerHost {
    pub(crate) joined: bool,
    pub(crate) last_report_at: Option<String>,
    pub(crate) version: Option<String>,
    /// No report within `--host-stale-after`: its units are not chosen.
    pub(crate) stale: bool,
    pub(crate) unreachable_since: Option<String>,
    /// What the host repaired at its last pull.
    pub(crate) drift: Vec<String>,
}

/// A fleet host (`GET /api/admin/hosts`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct HostResponse {
    pub(crate) hostname: String,
    pub(crate) joined: bool,
    pub(crate) poke_url: Option<String>,
    pub(crate) version: Option<String>,
    pub(crate) joined_at: Option<String>,
    pub(crate) last_report_at: Option<String>,
    pub(crate) stale: bool,
    pub(crate) unreachable_since: Option<String>,
    pub(crate) unreachable_reason: Option<String>,
    pub(crate) drift: Vec<String>,
    /// `compute_id: error` of each unit the host could not apply at its last pull.
    pub(crate) units_failed: Vec<String>,
    #[schema(value_type = Option<Object>)]
    pub(crate) facts: Option<Value>,
}

/// `POST /api/admin/hosts`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct HostCreateRequest {
    pub(crate) hostname: String,
}

/// A host's token, shown only once.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct HostTokenResponse {
    pub(crate) hostname: String,
    /// `kh_` and 43 base64url characters; give it to `kloigos join --token-file`.
    pub(crate) token: String,
}

/// `POST /api/hosts/{hostname}/join` answers.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct JoinResponse {
    pub(crate) hostname: String,
}

/// The desired state of a fleet host, from the hub's inventory.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct DesiredHostState {
    pub(crate) hostname: String,
    /// The hub's time when it read the inventory (echoed in the host's report).
    pub(crate) as_of: String,
    /// Null when the hub has no server of that hostname, or it is DECOMMISSIONED or INIT_FAIL.
    pub(crate) server: Option<DesiredServer>,
}

/// A server in [`DesiredHostState`]: INITIALIZING/READY is present, DECOMMISSIONING is torn
/// down. A unit ALLOCATING or ALLOCATED is owned (by its `claim` and `ssh_public_key`).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct DesiredServer {
    pub(crate) hostname: String,
    pub(crate) ip: String,
    pub(crate) region: String,
    pub(crate) zone: String,
    pub(crate) status: String,
    pub(crate) cpu_ranges: Vec<String>,
    pub(crate) port_base: u16,
    pub(crate) ports_per_cpu: u16,
    pub(crate) uid_base: u32,
    pub(crate) limits: Limits,
    pub(crate) inventory_only: bool,
    pub(crate) created_at: String,
    pub(crate) updated_at: String,
    /// Every field of each unit as the inventory holds it (`compute_id`, `status`, `claim`,
    /// `ssh_public_key`, `tags`, `allocated_by`, `problem`, ...).
    #[schema(value_type = Vec<Object>)]
    pub(crate) units: Vec<Value>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct NumaNode {
    pub(crate) node: u32,
    /// CPUs of the node, `0-15,32-47`.
    pub(crate) cpus: String,
}

/// The caller, as the API sees it.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct WhoAmI {
    pub(crate) actor: String,
    /// `admin`, `user` or `readonly`.
    pub(crate) role: String,
}

/// One step of a validation error's `loc`: a field name or a list index (FastAPI's shape).
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // described in the document only: `FieldError::loc` holds JSON values
pub(crate) enum LocItem {
    String(String),
    Integer(i64),
}

/// FastAPI's validation error item (the document's view of `service::FieldError`).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ValidationError {
    /// Where: `["body", "tags", "owner"]`, `["body", "cpu_ranges", 0]`, `["query", "limit"]`.
    pub(crate) loc: Vec<LocItem>,
    pub(crate) msg: String,
    #[serde(rename = "type")]
    pub(crate) kind: String,
    /// The offending input, as sent (any JSON value).
    #[schema(value_type = Value)]
    pub(crate) input: Value,
    /// Details of the error, e.g. `{"error": "..."}`.
    #[schema(value_type = Option<Object>)]
    pub(crate) ctx: Option<Value>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct HTTPValidationError {
    pub(crate) detail: Vec<ValidationError>,
}

/// Every other error: `{"detail": "what went wrong"}`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ErrorDetail {
    pub(crate) detail: String,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Κλοηγός / Kloigos API", description = "Compute units cut from Linux hosts with systemd and nftables. Compatible with upstream Kloigos v0.2 under /api."),
    paths(allocate, deallocate, list_units, get_unit, init_server, decommission_server, list_servers, list_events, whoami, healthz,
        super::fleet::create_host, super::fleet::list_hosts, super::fleet::delete_host, super::fleet::join, super::fleet::state, super::fleet::report),
    components(schemas(ComputeUnitRequest, ComputeUnitResponse, InitServerRequest, ServerResponse, ServerHost, NumaNode, WhoAmI, HTTPValidationError, ValidationError, LocItem, ErrorDetail, TagValue, Limits, crate::store::Event,
        HostResponse, HostCreateRequest, HostTokenResponse, JoinResponse, DesiredHostState, DesiredServer,
        crate::service::Facts, crate::service::JoinRequest, crate::service::Report, crate::service::ServerOutcome, crate::service::UnitOutcome)),
    tags((name = "compute_units"), (name = "admin"), (name = "audit"), (name = "fleet")),
    modifiers(&BearerAuth, &CommonErrors),
    security(("bearer" = []))
)]
pub(crate) struct ApiDoc;

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
pub(super) fn common_errors(path: &str, has_body: bool) -> Vec<&'static str> {
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
