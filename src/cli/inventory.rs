//! `kloigos inventory`: Ansible's script-inventory protocol over the API.
//!
//! Ansible runs an inventory script with `--list` and expects every group (`{"hosts": [...]}`)
//! plus `_meta.hostvars` (then it never runs the script once per host with `--host`). Each unit
//! is one Ansible host named by its compute id. The mapping from the API's units to that JSON is
//! [`inventory`], pure; [`run`] only fetches the units and prints.

use super::client::{explain, query, request_as};
use super::error::{CliError, Result};
use clap::Args;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

#[derive(Args, Debug, Clone)]
#[command(group = clap::ArgGroup::new("mode").required(true).args(["list", "host"]))]
pub struct InventoryArgs {
    /// Print every group and host, with every host's variables under `_meta.hostvars`.
    #[arg(long)]
    pub(crate) list: bool,
    /// Print one host's variables (`{}` for a host not in the inventory).
    #[arg(long, value_name = "COMPUTE_ID")]
    pub(crate) host: Option<String>,
    /// Unit statuses to include, comma separated, or `all`.
    #[arg(long, env = "KLOIGOS_INVENTORY_STATUS", default_value = "ALLOCATED")]
    pub(crate) status: String,
    /// Only units whose `tags.deployment_id` is this.
    #[arg(long, env = "KLOIGOS_INVENTORY_DEPLOYMENT_ID")]
    pub(crate) deployment_id: Option<String>,
    /// Only units in this region.
    #[arg(long, env = "KLOIGOS_INVENTORY_REGION")]
    pub(crate) region: Option<String>,
    /// Only units in this zone.
    #[arg(long, env = "KLOIGOS_INVENTORY_ZONE")]
    pub(crate) zone: Option<String>,
    /// Only units of this server.
    #[arg(long, env = "KLOIGOS_INVENTORY_HOSTNAME")]
    pub(crate) hostname: Option<String>,
    /// File holding the bearer token for `--url` (the variable KLOIGOS_TOKEN may hold the
    /// token itself instead).
    #[arg(long, env = "KLOIGOS_TOKEN_FILE")]
    pub(crate) token_file: Option<PathBuf>,
}

/// Which units become Ansible hosts. `status: None` keeps every status.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Filter {
    pub(crate) status: Option<BTreeSet<String>>,
    pub(crate) deployment_id: Option<String>,
    pub(crate) region: Option<String>,
    pub(crate) zone: Option<String>,
    pub(crate) hostname: Option<String>,
}

impl Filter {
    fn from_args(a: &InventoryArgs) -> Filter {
        let statuses: BTreeSet<String> = a
            .status
            .split(',')
            .map(|s| s.trim().to_ascii_uppercase())
            .filter(|s| !s.is_empty())
            .collect();
        let nonempty = |o: &Option<String>| o.clone().filter(|s| !s.is_empty());
        Filter {
            status: (!statuses.is_empty() && !statuses.contains("ALL")).then_some(statuses),
            deployment_id: nonempty(&a.deployment_id),
            region: nonempty(&a.region),
            zone: nonempty(&a.zone),
            hostname: nonempty(&a.hostname),
        }
    }

    fn keeps(&self, u: &ApiUnit) -> bool {
        let eq = |want: &Option<String>, got: &str| want.as_deref().is_none_or(|w| w == got);
        self.status.as_ref().is_none_or(|s| s.contains(&u.status))
            && eq(&self.region, &u.region)
            && eq(&self.zone, &u.zone)
            && eq(&self.hostname, &u.hostname)
            && self
                .deployment_id
                .as_deref()
                .is_none_or(|w| u.deployment_id().as_deref() == Some(w))
    }
}

/// The fields of a `GET /api/compute_units/` item the inventory reads.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ApiUnit {
    pub(crate) compute_id: String,
    pub(crate) hostname: String,
    pub(crate) ip: String,
    pub(crate) cpu_count: u32,
    pub(crate) cpu_range: String,
    pub(crate) region: String,
    pub(crate) zone: String,
    pub(crate) status: String,
    #[serde(default)]
    pub(crate) tags: Option<Value>,
    #[serde(default)]
    pub(crate) ports_range: Option<String>,
    pub(crate) user: String,
    pub(crate) uid: u32,
}

impl ApiUnit {
    fn tag(&self, key: &str) -> Option<&Value> {
        self.tags.as_ref().and_then(|t| t.get(key))
    }

    /// `tags.deployment_id` as text (tags may hold it as a string or an integer).
    fn deployment_id(&self) -> Option<String> {
        match self.tag("deployment_id")? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }

    /// The names in `tags.groups`: a list of strings (one string is one name).
    fn tag_groups(&self) -> Vec<&str> {
        match self.tag("groups") {
            Some(Value::String(s)) => vec![s.as_str()],
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        }
    }
}

/// Names Ansible gives a meaning of its own (and the protocol's `_meta` key): a `tags.groups`
/// name that sanitizes to one of them is ignored.
const RESERVED_GROUPS: [&str; 3] = ["all", "ungrouped", "_meta"];

/// A valid Ansible group name (`[A-Za-z0-9_]`, not starting with a digit) from any text: every
/// other character becomes `_`, and a leading digit gets a `_` before it (so `1st` → `_1st`,
/// keeping the digit, where Ansible's own transformation would replace it). None for an empty
/// name. Different names can meet (`eu-west` and `eu_west`): their hosts share the group.
pub(crate) fn group_name(raw: &str) -> Option<String> {
    let mut name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() {
        return None;
    }
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        name.insert(0, '_');
    }
    Some(name)
}

/// The groups of one unit, sanitized, without duplicates.
fn groups_of(u: &ApiUnit) -> BTreeSet<String> {
    let mut raw: Vec<String> = vec![
        format!("region_{}", u.region),
        format!("zone_{}", u.zone),
        format!("server_{}", u.hostname),
    ];
    if let Some(d) = u.deployment_id() {
        raw.push(format!("deployment_{d}"));
    }
    raw.extend(u.tag_groups().into_iter().map(String::from));
    raw.iter()
        .filter_map(|r| group_name(r))
        .filter(|g| !RESERVED_GROUPS.contains(&g.as_str()))
        .collect()
}

/// The variables of one host: how to reach it, and what Kloigos knows about the unit.
pub(crate) fn host_vars(u: &ApiUnit) -> Value {
    json!({
        "ansible_host": u.ip,
        "ansible_user": u.user,
        "kloigos_compute_id": u.compute_id,
        "kloigos_cpus": u.cpu_range,
        "kloigos_cpu_count": u.cpu_count,
        "kloigos_ports": u.ports_range,
        "kloigos_uid": u.uid,
        "kloigos_user": u.user,
        "kloigos_region": u.region,
        "kloigos_zone": u.zone,
        "kloigos_hostname": u.hostname,
        "kloigos_status": u.status,
        "kloigos_deployment_id": u.tag("deployment_id").cloned().unwrap_or(Value::Null),
        "kloigos_tags": u.tags.clone().filter(Value::is_object).unwrap_or_else(|| json!({})),
    })
}

/// The `--list` answer for the units `filter` keeps: every group with its hosts (sorted), `all`
/// with every group as a child, and `_meta.hostvars`. No unit gives
/// `{"_meta": {"hostvars": {}}, "all": {"children": ["ungrouped"]}}`.
pub(crate) fn inventory(units: &[ApiUnit], filter: &Filter) -> Value {
    let mut groups: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    let mut hostvars = Map::new();
    let mut kept: Vec<&ApiUnit> = units.iter().filter(|u| filter.keeps(u)).collect();
    kept.sort_by(|a, b| a.compute_id.cmp(&b.compute_id));
    for u in kept {
        for g in groups_of(u) {
            groups.entry(g).or_default().insert(&u.compute_id);
        }
        hostvars.insert(u.compute_id.clone(), host_vars(u));
    }
    let children: Vec<&str> = std::iter::once("ungrouped")
        .chain(groups.keys().map(String::as_str))
        .collect();
    let mut out = Map::new();
    out.insert("_meta".into(), json!({ "hostvars": hostvars }));
    out.insert("all".into(), json!({ "children": children }));
    for (g, hosts) in &groups {
        out.insert(g.clone(), json!({ "hosts": hosts }));
    }
    Value::Object(out)
}

/// The `--host ID` answer: the variables of that unit if `filter` keeps it, else `{}`.
pub(crate) fn host(units: &[ApiUnit], filter: &Filter, compute_id: &str) -> Value {
    units
        .iter()
        .find(|u| u.compute_id == compute_id && filter.keeps(u))
        .map(host_vars)
        .unwrap_or_else(|| json!({}))
}

/// The bearer token for `--url`: `--token-file`/KLOIGOS_TOKEN_FILE, else KLOIGOS_TOKEN, else none.
fn token(file: Option<&Path>) -> Result<Option<String>> {
    if let Some(f) = file {
        let t = std::fs::read_to_string(f).map_err(CliError::io(format!(
            "cannot read the token file {}",
            f.display()
        )))?;
        return Ok(Some(t.trim().to_string()));
    }
    Ok(std::env::var("KLOIGOS_TOKEN")
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty()))
}

/// The list request: the filters the API can apply itself (one status at most) go in the query;
/// [`inventory`] applies them all again.
fn list_path(filter: &Filter, compute_id: Option<&str>) -> String {
    let status = filter
        .status
        .as_ref()
        .filter(|s| s.len() == 1)
        .and_then(|s| s.first().cloned());
    format!(
        "/api/compute_units/{}",
        query(&[
            ("compute_id", &compute_id.map(String::from)),
            ("hostname", &filter.hostname),
            ("region", &filter.region),
            ("zone", &filter.zone),
            ("deployment_id", &filter.deployment_id),
            ("status", &status),
        ])
    )
}

pub(super) fn run(socket: &Path, url: Option<&str>, args: &InventoryArgs) -> Result<()> {
    let filter = Filter::from_args(args);
    // Over the unix socket the peer credentials decide; a token is for TCP only.
    let token = match url {
        Some(_) => token(args.token_file.as_deref())?,
        None => None,
    };
    let path = list_path(&filter, args.host.as_deref());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::io("cannot start the async runtime"))?;
    let reply = rt.block_on(request_as(
        socket,
        url,
        token.as_deref(),
        "GET",
        &path,
        None,
    ))?;
    if !(200..300).contains(&reply.status) {
        return Err(explain(&reply));
    }
    let units: Vec<ApiUnit> =
        serde_json::from_value(reply.body).map_err(|source| CliError::NotJson {
            what: format!("the answer of GET {path} (not a list of compute units)"),
            source,
        })?;
    let out = match &args.host {
        Some(h) => host(&units, &filter, h),
        None => inventory(&units, &filter),
    };
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(id_host: &str, cpus: &str, status: &str, tags: Value) -> ApiUnit {
        serde_json::from_value(json!({
            "compute_id": format!("{id_host}_{cpus}"), "hostname": id_host, "ip": "192.0.2.10",
            "cpu_count": 4, "cpu_range": cpus, "region": "eu-west", "zone": "a",
            "status": status, "started_at": null, "tags": tags, "cpu_list": "0,1,2,3",
            "ports_range": "2000-2399", "user": format!("u{cpus}"), "uid": 20000,
            "allocated_by": null, "problem": null,
        }))
        .expect("a unit as the API serializes it")
    }

    fn allocated() -> Filter {
        Filter {
            status: Some(["ALLOCATED".to_string()].into()),
            ..Filter::default()
        }
    }

    fn hosts(inv: &Value, group: &str) -> Vec<String> {
        inv[group]["hosts"]
            .as_array()
            .unwrap_or_else(|| panic!("no group {group} in {inv}"))
            .iter()
            .map(|h| h.as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn empty_inventory_is_valid() {
        let inv = inventory(&[], &allocated());
        assert_eq!(
            inv,
            json!({"_meta": {"hostvars": {}}, "all": {"children": ["ungrouped"]}})
        );
        // Units that the filter drops give the same.
        let free = [unit("h1", "0-3", "FREE", Value::Null)];
        assert_eq!(inventory(&free, &allocated()), inv);
    }

    #[test]
    fn units_become_hosts_with_groups_and_vars() {
        let units = [
            unit(
                "h1.example.com",
                "0-3",
                "ALLOCATED",
                json!({"deployment_id": "d-42", "groups": ["web", "db-primary"], "owner": "ann"}),
            ),
            unit("h2", "4-7", "ALLOCATED", json!({"deployment_id": 7})),
            unit("h2", "0-3", "FREE", Value::Null),
        ];
        let inv = inventory(&units, &allocated());
        let children: Vec<&str> = inv["all"]["children"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert_eq!(
            children,
            [
                "ungrouped",
                "db_primary",
                "deployment_7",
                "deployment_d_42",
                "region_eu_west",
                "server_h1_example_com",
                "server_h2",
                "web",
                "zone_a",
            ]
        );
        assert_eq!(
            hosts(&inv, "region_eu_west"),
            ["h1.example.com_0-3", "h2_4-7"]
        );
        assert_eq!(hosts(&inv, "zone_a"), ["h1.example.com_0-3", "h2_4-7"]);
        assert_eq!(hosts(&inv, "deployment_d_42"), ["h1.example.com_0-3"]);
        assert_eq!(hosts(&inv, "deployment_7"), ["h2_4-7"]);
        assert_eq!(hosts(&inv, "server_h2"), ["h2_4-7"]);
        assert_eq!(hosts(&inv, "web"), ["h1.example.com_0-3"]);
        assert_eq!(hosts(&inv, "db_primary"), ["h1.example.com_0-3"]);
        let hv = inv["_meta"]["hostvars"].as_object().unwrap();
        assert_eq!(
            hv.keys().collect::<Vec<_>>(),
            ["h1.example.com_0-3", "h2_4-7"]
        );
        assert_eq!(
            hv["h1.example.com_0-3"],
            json!({
                "ansible_host": "192.0.2.10", "ansible_user": "u0-3",
                "kloigos_compute_id": "h1.example.com_0-3", "kloigos_cpus": "0-3",
                "kloigos_cpu_count": 4, "kloigos_ports": "2000-2399", "kloigos_uid": 20000,
                "kloigos_user": "u0-3", "kloigos_region": "eu-west", "kloigos_zone": "a",
                "kloigos_hostname": "h1.example.com", "kloigos_status": "ALLOCATED",
                "kloigos_deployment_id": "d-42",
                "kloigos_tags": {"deployment_id": "d-42", "groups": ["web", "db-primary"], "owner": "ann"},
            })
        );
        assert_eq!(hv["h2_4-7"]["kloigos_deployment_id"], json!(7));
        // No host is left in a group the output does not define.
        for (k, v) in inv.as_object().unwrap() {
            if k != "_meta" && k != "all" {
                assert!(v["hosts"].as_array().is_some_and(|h| !h.is_empty()), "{k}");
            }
        }
    }

    #[test]
    fn host_without_tags_has_empty_tags_and_no_deployment_group() {
        let inv = inventory(&[unit("h1", "0-3", "ALLOCATED", Value::Null)], &allocated());
        let v = &inv["_meta"]["hostvars"]["h1_0-3"];
        assert_eq!(
            (
                v["kloigos_tags"].clone(),
                v["kloigos_deployment_id"].clone()
            ),
            (json!({}), Value::Null)
        );
        assert!(
            !inv.as_object()
                .unwrap()
                .keys()
                .any(|k| k.starts_with("deployment_"))
        );
    }

    #[test]
    fn group_names_follow_ansibles_rules() {
        assert_eq!(group_name("web").as_deref(), Some("web"));
        assert_eq!(group_name("eu-west.1").as_deref(), Some("eu_west_1"));
        assert_eq!(group_name("1st").as_deref(), Some("_1st"));
        assert_eq!(group_name("ελ x").as_deref(), Some("___x"));
        assert_eq!(group_name("_x9").as_deref(), Some("_x9"));
        assert_eq!(group_name(""), None);
        for raw in ["a b", "9", "--", "é", "x.y-z", "0abc"] {
            let g = group_name(raw).unwrap();
            assert!(
                g.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    && !g.starts_with(|c: char| c.is_ascii_digit()),
                "{raw} -> {g}"
            );
        }
    }

    #[test]
    fn tag_groups_are_sanitized_and_reserved_names_ignored() {
        let u = unit(
            "h1",
            "0-3",
            "ALLOCATED",
            json!({"groups": ["all", "ungrouped", "_meta", "", "2nd tier", "web", "web", 5]}),
        );
        let inv = inventory(std::slice::from_ref(&u), &allocated());
        assert_eq!(hosts(&inv, "_2nd_tier"), ["h1_0-3"]);
        assert_eq!(hosts(&inv, "web"), ["h1_0-3"]);
        assert_eq!(
            inv["all"],
            json!({"children": ["ungrouped", "_2nd_tier", "region_eu_west", "server_h1", "web", "zone_a"]})
        );
        assert!(inv.get("ungrouped").is_none());
        assert_eq!(inv["_meta"]["hostvars"].as_object().unwrap().len(), 1);
        // One string is one group.
        let one = unit("h1", "0-3", "ALLOCATED", json!({"groups": "db"}));
        assert_eq!(hosts(&inventory(&[one], &allocated()), "db"), ["h1_0-3"]);
    }

    #[test]
    fn filters_select_units() {
        let mut other = unit("h2", "0-3", "ALLOCATED", json!({"deployment_id": "d2"}));
        other.region = "us".into();
        other.zone = "b".into();
        let units = [
            unit("h1", "0-3", "ALLOCATED", json!({"deployment_id": "d1"})),
            unit(
                "h1",
                "4-7",
                "ALLOCATION_FAIL",
                json!({"deployment_id": "d1"}),
            ),
            unit("h1", "8-11", "FREE", Value::Null),
            other,
        ];
        let ids = |f: &Filter| -> Vec<String> {
            inventory(&units, f)["_meta"]["hostvars"]
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect()
        };
        let args = |status: &str| InventoryArgs {
            list: true,
            host: None,
            status: status.into(),
            deployment_id: None,
            region: None,
            zone: None,
            hostname: None,
            token_file: None,
        };
        assert_eq!(
            ids(&Filter::from_args(&args("ALLOCATED"))),
            ["h1_0-3", "h2_0-3"]
        );
        assert_eq!(
            ids(&Filter::from_args(&args("allocated, allocation_fail"))),
            ["h1_0-3", "h1_4-7", "h2_0-3"]
        );
        assert_eq!(ids(&Filter::from_args(&args("all"))).len(), 4);
        assert_eq!(ids(&Filter::from_args(&args(""))).len(), 4);
        let with = |f: Filter| ids(&Filter { status: None, ..f });
        let d1 = Filter {
            deployment_id: Some("d1".into()),
            ..Filter::default()
        };
        assert_eq!(with(d1), ["h1_0-3", "h1_4-7"]);
        let us = Filter {
            region: Some("us".into()),
            ..Filter::default()
        };
        assert_eq!(with(us), ["h2_0-3"]);
        let zb = Filter {
            zone: Some("b".into()),
            ..Filter::default()
        };
        assert_eq!(with(zb), ["h2_0-3"]);
        let h1 = Filter {
            hostname: Some("h1".into()),
            ..Filter::default()
        };
        assert_eq!(with(h1), ["h1_0-3", "h1_4-7", "h1_8-11"]);
        let none = Filter {
            hostname: Some("h1".into()),
            region: Some("us".into()),
            ..Filter::default()
        };
        assert!(with(none).is_empty());
        // An integer deployment id matches its text.
        let n = [unit("h1", "0-3", "ALLOCATED", json!({"deployment_id": 7}))];
        let f = Filter {
            deployment_id: Some("7".into()),
            ..allocated()
        };
        assert_eq!(
            inventory(&n, &f)["_meta"]["hostvars"]
                .as_object()
                .unwrap()
                .len(),
            1
        );
        // Empty values (an unset KLOIGOS_INVENTORY_* exported as "") filter nothing.
        let mut a = args("ALLOCATED");
        a.region = Some(String::new());
        assert_eq!(Filter::from_args(&a).region, None);
    }

    #[test]
    fn host_answers_vars_or_nothing() {
        let units = [
            unit("h1", "0-3", "ALLOCATED", Value::Null),
            unit("h1", "4-7", "FREE", Value::Null),
        ];
        assert_eq!(
            host(&units, &allocated(), "h1_0-3")["kloigos_cpus"],
            json!("0-3")
        );
        assert_eq!(host(&units, &allocated(), "h1_4-7"), json!({}));
        assert_eq!(host(&units, &allocated(), "nope"), json!({}));
        assert_eq!(
            host(&units, &allocated(), "h1_0-3"),
            inventory(&units, &allocated())["_meta"]["hostvars"]["h1_0-3"]
        );
    }

    #[test]
    fn the_api_gets_the_filters_it_can_apply() {
        let f = Filter {
            status: Some(["ALLOCATED".to_string()].into()),
            deployment_id: Some("d 1".into()),
            region: None,
            zone: Some("a".into()),
            hostname: None,
        };
        assert_eq!(
            list_path(&f, None),
            "/api/compute_units/?zone=a&deployment_id=d%201&status=ALLOCATED"
        );
        let two = Filter {
            status: Some(["ALLOCATED".to_string(), "FREE".to_string()].into()),
            ..Filter::default()
        };
        assert_eq!(
            list_path(&two, Some("h1_0-3")),
            "/api/compute_units/?compute_id=h1_0-3"
        );
        assert_eq!(list_path(&Filter::default(), None), "/api/compute_units/");
    }
}
