//! FastAPI-compatible parsing: request bodies are parsed by hand from JSON values so that every
//! problem is reported the way FastAPI/pydantic reports it (`422 {"detail": [FieldError...]}`),
//! all at once; query strings the same way. Also the mapping of the service's typed
//! [`Invalid`] problems to [`FieldError`]s: HTTP shapes stay in this layer.

use crate::model::{CpuList, PortPlan, ports, validate};
use crate::render::validate_io_limit;
use crate::service::{self, Allocate, InitServer, Invalid, LocPart};
use crate::store::{EventFilter, Limits, UnitFilter};
use axum::body::Bytes;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;

/// One validation problem, in the shape FastAPI reports (`loc`, `msg`, `type`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FieldError {
    #[serde(rename = "type")]
    pub kind: String,
    pub loc: Vec<Value>,
    pub msg: String,
    pub input: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ctx: Option<Value>,
}

impl FieldError {
    /// A semantic check that failed (pydantic's `value_error`).
    pub(crate) fn value(loc: Vec<Value>, input: Value, reason: impl Into<String>) -> FieldError {
        let reason = reason.into();
        FieldError {
            kind: "value_error".into(),
            loc,
            msg: format!("Value error, {reason}"),
            input,
            ctx: Some(json!({ "error": reason })),
        }
    }

    /// A problem the service found in a request that came as a body.
    pub(crate) fn from_body(e: Invalid) -> FieldError {
        let loc = std::iter::once(json!("body"))
            .chain(e.loc.iter().map(|p| match p {
                LocPart::Field(name) => json!(name),
                LocPart::Index(i) => json!(i),
            }))
            .collect();
        FieldError::value(loc, json!(e.input), e.reason)
    }
}

pub(super) fn err(kind: &str, loc: Vec<Value>, msg: &str, input: Value) -> FieldError {
    FieldError {
        kind: kind.into(),
        loc,
        msg: msg.into(),
        input,
        ctx: None,
    }
}

/// The JSON object of a request body, or the FastAPI errors for a body that is not one.
pub(super) fn json_object(body: &Bytes) -> Result<Map<String, Value>, Vec<FieldError>> {
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

/// The fields of a request body being read, the problems found so far, and every field the
/// parser asked for with whether it had to be there (the OpenAPI document must list exactly
/// those: see `api::tests`).
pub(super) struct Fields<'a> {
    obj: &'a Map<String, Value>,
    errors: Vec<FieldError>,
    pub(super) asked: Vec<(String, bool)>,
}

impl<'a> Fields<'a> {
    pub(super) fn new(obj: &'a Map<String, Value>) -> Fields<'a> {
        Fields {
            obj,
            errors: Vec::new(),
            asked: Vec::new(),
        }
    }

    fn loc(name: &str) -> Vec<Value> {
        vec![json!("body"), json!(name)]
    }

    fn get(&mut self, name: &str, required: bool) -> Option<&'a Value> {
        if !self.asked.iter().any(|(n, _)| n == name) {
            self.asked.push((name.to_string(), required));
        }
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

    /// pydantic's lax boolean: JSON booleans, 0/1, and the strings true/false, yes/no, on/off,
    /// 1/0; absent or null is `false`.
    fn boolean(&mut self, name: &str) -> bool {
        let Some(v) = self.get(name, false) else {
            return false;
        };
        let b = match v {
            Value::Null => Some(false),
            Value::Bool(b) => Some(*b),
            Value::Number(n) if n.as_i64() == Some(0) => Some(false),
            Value::Number(n) if n.as_i64() == Some(1) => Some(true),
            Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" | "t" | "y" => Some(true),
                "false" | "0" | "no" | "off" | "f" | "n" => Some(false),
                _ => None,
            },
            _ => None,
        };
        b.unwrap_or_else(|| {
            self.errors.push(err(
                "bool_parsing",
                Self::loc(name),
                "Input should be a valid boolean",
                v.clone(),
            ));
            false
        })
    }

    /// Adds a semantic error for a field.
    fn check(&mut self, name: &str, input: &str, r: Result<(), String>) {
        if let Err(reason) = r {
            self.errors
                .push(FieldError::value(Self::loc(name), json!(input), reason));
        }
    }
}

pub(super) fn lax_int(v: &Value) -> Result<Option<i64>, Box<FieldError>> {
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
pub(crate) const MAX_TAGS_JSON: usize = 4096;

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

/// An allocate request (`ComputeUnitRequest` in the document).
pub fn parse_allocate(body: &Bytes) -> Result<Allocate, Vec<FieldError>> {
    let obj = json_object(body)?;
    read_allocate(&mut Fields::new(&obj))
}

pub(super) fn read_allocate(f: &mut Fields<'_>) -> Result<Allocate, Vec<FieldError>> {
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
    let tags = parse_tags(f);
    let key = f.string("ssh_public_key", true);
    let inventory_only = f.boolean("inventory_only");
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
            inventory_only,
        }),
        _ => Err(std::mem::take(&mut f.errors)),
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

/// An init_server request (`InitServerRequest` in the document).
pub fn parse_init_server(body: &Bytes) -> Result<InitServer, Vec<FieldError>> {
    let obj = json_object(body)?;
    read_init_server(&mut Fields::new(&obj))
}

pub(super) fn read_init_server(f: &mut Fields<'_>) -> Result<InitServer, Vec<FieldError>> {
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
    let limits = parse_limits(f);
    let inventory_only = f.boolean("inventory_only");
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
            inventory_only,
            limits,
        }),
        _ => Err(std::mem::take(&mut f.errors)),
    }
}

/// Query parameters, FastAPI style: unknown ones ignored (the caller picks what it knows),
/// the last of repeated ones wins, `+` and `%XX` decoded, bad UTF-8 replaced.
pub(super) fn query_map(raw: Option<&str>) -> BTreeMap<String, String> {
    form_urlencoded::parse(raw.unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// A query string being read, the problems found so far, and every parameter asked for with
/// its OpenAPI type (the document must declare exactly those: see `api::tests`).
pub(super) struct Query {
    map: BTreeMap<String, String>,
    errors: Vec<FieldError>,
    pub(super) asked: Vec<(String, &'static str)>,
}

impl Query {
    pub(super) fn new(raw: Option<&str>) -> Query {
        Query {
            map: query_map(raw),
            errors: Vec::new(),
            asked: Vec::new(),
        }
    }

    fn get(&mut self, name: &str, kind: &'static str) -> Option<&String> {
        self.asked.push((name.to_string(), kind));
        self.map.get(name)
    }

    fn string(&mut self, name: &str) -> Option<String> {
        self.get(name, "string").cloned()
    }

    fn int(&mut self, name: &str) -> Option<i64> {
        let v = self.get(name, "integer")?.clone();
        match v.trim().parse::<i64>() {
            Ok(i) => Some(i),
            Err(_) => {
                self.errors.push(err(
                    "int_parsing",
                    vec![json!("query"), json!(name)],
                    "Input should be a valid integer, unable to parse string as an integer",
                    json!(v),
                ));
                None
            }
        }
    }

    fn bool(&mut self, name: &str) -> bool {
        match self.get(name, "boolean").map(|s| s.to_ascii_lowercase()) {
            None => false,
            Some(v) if ["true", "1", "yes", "on", "t", "y"].contains(&v.as_str()) => true,
            Some(v) if ["false", "0", "no", "off", "f", "n"].contains(&v.as_str()) => false,
            Some(v) => {
                self.errors.push(err(
                    "bool_parsing",
                    vec![json!("query"), json!(name)],
                    "Input should be a valid boolean, unable to interpret input",
                    json!(v),
                ));
                false
            }
        }
    }

    fn finish<T>(&mut self, value: T) -> Result<T, Vec<FieldError>> {
        if self.errors.is_empty() {
            Ok(value)
        } else {
            Err(std::mem::take(&mut self.errors))
        }
    }
}

/// The filter of `GET /api/compute_units/`.
pub(super) fn unit_filter(q: &mut Query) -> Result<UnitFilter, Vec<FieldError>> {
    let f = UnitFilter {
        compute_id: q.string("compute_id"),
        hostname: q.string("hostname"),
        region: q.string("region"),
        zone: q.string("zone"),
        cpu_count: q.int("cpu_count"),
        deployment_id: q.string("deployment_id"),
        status: q.string("status"),
    };
    q.finish(f)
}

/// The filter of `GET /api/events`: newest first, at most 1000 (default 100).
pub(super) fn event_filter(q: &mut Query) -> Result<EventFilter, Vec<FieldError>> {
    let f = EventFilter {
        compute_id: q.string("compute_id"),
        hostname: q.string("hostname"),
        operation: q.string("operation"),
        actor: q.string("actor"),
        since: q.string("since"),
        until: q.string("until"),
        before_id: q.int("before"),
        limit: q.int("limit").unwrap_or(100).clamp(1, 1000) as u32,
    };
    q.finish(f)
}

/// `force` of `DELETE /api/admin/decommission_server/{hostname}`.
pub(super) fn decommission_force(q: &mut Query) -> Result<bool, Vec<FieldError>> {
    let force = q.bool("force");
    q.finish(force)
}
