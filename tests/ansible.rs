//! Debian's ansible-core reads `kloigos inventory` (through the packaged wrapper script) from a
//! real `kloigos serve`: hosts, groups and variables as Ansible sees them, filters from the
//! environment, a token over TCP, and an ad-hoc command over every unit (a controller-side
//! module: nothing here needs SSH; the VM test runs a real play).

mod common;

use common::{Server, alloc_body, bin, ssh_key};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn wrapper() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/ansible/kloigos-inventory")
}

/// An Ansible command with the wrapper as its inventory, `kloigos` on PATH, and a private home.
fn ansible(s: &Server, program: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let bin_dir = Path::new(bin()).parent().expect("bin dir");
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let home = s.dir.path().join("ansible-home");
    std::fs::create_dir_all(&home).expect("ansible home");
    let mut cmd = Command::new(program);
    cmd.arg("-i")
        .arg(wrapper())
        .args(args)
        .env("PATH", path)
        .env("HOME", &home)
        .env("LC_ALL", "C.UTF-8")
        .env("ANSIBLE_LOCAL_TEMP", home.join("tmp"))
        .env("ANSIBLE_NOCOLOR", "1")
        // A script that fails is an error, not a warning and an empty inventory.
        .env("ANSIBLE_INVENTORY_UNPARSED_FAILED", "1")
        .env("KLOIGOS_SOCKET", &s.socket)
        .env_remove("KLOIGOS_URL");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run ansible")
}

fn json_of(out: &Output) -> Value {
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

fn sorted(v: &Value) -> Vec<String> {
    let mut hosts: Vec<String> = v
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|h| h.as_str().expect("a host name").to_string())
        .collect();
    hosts.sort();
    hosts
}

#[test]
fn ansible_reads_the_inventory() {
    if !common::privileged(&["ansible-inventory", "ansible"]) {
        return;
    }
    let s = Server::start_tcp();
    s.init(&["0-3", "4-7", "8-11", "12-15"]);
    let allocate = |name: &str, tags: Value| -> String {
        let (code, v) = s.call(
            "POST",
            "/api/compute_units/allocate",
            Some(&alloc_body(json!(4), &ssh_key(name), tags)),
        );
        assert_eq!(code, 200, "{v}");
        v["compute_id"].as_str().expect("compute_id").to_string()
    };
    let web = allocate(
        "web",
        json!({"deployment_id": "d-1", "groups": ["web", "1st tier"]}),
    );
    let db = allocate("db", json!({"deployment_id": "d-1"}));
    let other = allocate("other", json!({"deployment_id": 2}));
    let mut allocated = vec![web.clone(), db.clone(), other.clone()];
    allocated.sort();
    let (_, units) = s.get("/api/compute_units/");
    let unit = |id: &str| -> Value {
        units
            .as_array()
            .expect("units")
            .iter()
            .find(|u| u["compute_id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("no unit {id}"))
    };

    // What Ansible makes of `--list`: the allocated units only, in their groups, with their vars.
    let inv = json_of(&ansible(&s, "ansible-inventory", &["--list"], &[]));
    let hostvars = inv["_meta"]["hostvars"].as_object().expect("hostvars");
    let mut hosts: Vec<String> = hostvars.keys().cloned().collect();
    hosts.sort();
    assert_eq!(hosts, allocated, "{inv}");
    for id in &allocated {
        let u = unit(id);
        let v = &hostvars[id.as_str()];
        assert_eq!(v["ansible_host"], json!("192.0.2.10"), "{v}");
        assert_eq!(v["ansible_user"], u["user"], "{v}");
        assert_eq!(v["kloigos_user"], u["user"], "{v}");
        assert_eq!(v["kloigos_uid"], u["uid"], "{v}");
        assert_eq!(v["kloigos_cpus"], u["cpu_range"], "{v}");
        assert_eq!(v["kloigos_ports"], u["ports_range"], "{v}");
        assert_eq!(v["kloigos_cpu_count"], json!(4), "{v}");
        assert_eq!(v["kloigos_hostname"], json!(common::HOST), "{v}");
        assert_eq!(v["kloigos_status"], json!("ALLOCATED"), "{v}");
        assert_eq!(v["kloigos_tags"], u["tags"], "{v}");
    }
    assert_eq!(
        hostvars[web.as_str()]["kloigos_deployment_id"],
        json!("d-1")
    );
    assert_eq!(hostvars[other.as_str()]["kloigos_deployment_id"], json!(2));
    let group = |g: &str| sorted(&inv[g]["hosts"]);
    let mut d1 = vec![web.clone(), db.clone()];
    d1.sort();
    assert_eq!(group("deployment_d_1"), d1);
    assert_eq!(group("deployment_2"), vec![other.clone()]);
    assert_eq!(group("web"), vec![web.clone()]);
    assert_eq!(group("_1st_tier"), vec![web.clone()]);
    assert_eq!(group("region_eu_west"), allocated);
    assert_eq!(group("zone_a"), allocated);
    assert_eq!(group("server_testhost"), allocated);
    let children = sorted(&inv["all"]["children"]);
    for g in ["deployment_d_1", "web", "region_eu_west", "ungrouped"] {
        assert!(children.contains(&g.to_string()), "{g} not in {children:?}");
    }

    // Filters come from the environment, as Ansible passes only --list.
    let inv = json_of(&ansible(
        &s,
        "ansible-inventory",
        &["--list"],
        &[("KLOIGOS_INVENTORY_DEPLOYMENT_ID", "d-1")],
    ));
    let mut hosts: Vec<String> = inv["_meta"]["hostvars"]
        .as_object()
        .expect("hostvars")
        .keys()
        .cloned()
        .collect();
    hosts.sort();
    assert_eq!(hosts, d1);
    let inv = json_of(&ansible(
        &s,
        "ansible-inventory",
        &["--list"],
        &[("KLOIGOS_INVENTORY_STATUS", "FREE")],
    ));
    assert_eq!(
        inv["_meta"]["hostvars"].as_object().map(|h| h.len()),
        Some(1),
        "{inv}"
    );

    // An empty inventory is a valid one.
    let inv = json_of(&ansible(
        &s,
        "ansible-inventory",
        &["--list"],
        &[("KLOIGOS_INVENTORY_HOSTNAME", "elsewhere")],
    ));
    assert_eq!(inv["_meta"]["hostvars"], json!({}), "{inv}");

    // An ad-hoc command runs once over every unit, each with its own variables.
    let out = ansible(
        &s,
        "ansible",
        &[
            "all",
            "-c",
            "local",
            "-m",
            "ansible.builtin.debug",
            "-a",
            "var=kloigos_cpus",
        ],
        &[],
    );
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("| SUCCESS =>").count(), 3, "{text}");
    for id in &allocated {
        let cpus = unit(id)["cpu_range"]
            .as_str()
            .expect("cpu_range")
            .to_string();
        let head = format!("{id} | SUCCESS => {{\n    \"kloigos_cpus\": \"{cpus}\"\n}}");
        assert!(text.contains(&head), "{head:?} not in {text}");
    }
    // A playbook sees the same variables and groups (controller-side tasks: no SSH).
    let play = s.dir.path().join("play.yml");
    std::fs::write(
        &play,
        r#"- hosts: all
  gather_facts: false
  tasks:
    - ansible.builtin.assert:
        that:
          - inventory_hostname == kloigos_compute_id
          - ansible_user == kloigos_user
          - ansible_host == "192.0.2.10"
          - "'server_testhost' in group_names"
          - "'region_eu_west' in group_names"
          - "('deployment_' ~ kloigos_deployment_id) | regex_replace('-', '_') in group_names"
- hosts: web
  gather_facts: false
  tasks:
    - ansible.builtin.assert:
        that:
          - "'_1st_tier' in group_names"
          - kloigos_tags.groups == ["web", "1st tier"]
"#,
    )
    .expect("playbook");
    let out = ansible(
        &s,
        "ansible-playbook",
        &[play.to_str().expect("utf-8 path")],
        &[],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(text.matches("failed=0").count(), 3, "{text}");
    assert!(
        text.contains(&format!("{web} ")) && text.contains("ok=2"),
        "{text}"
    );

    let out = ansible(&s, "ansible", &["deployment_d_1", "--list-hosts"], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("hosts (2):"),
        "{out:?}"
    );

    // --host, as Ansible would call it without _meta.
    let out = s.cli(&["inventory", "--host", &web]);
    assert_eq!(json_of(&out), hostvars_of(&s, &web));
    let out = s.cli(&["inventory", "--host", "testhost_nope"]);
    assert_eq!(json_of(&out), json!({}));

    // Over TCP: a token from KLOIGOS_TOKEN_FILE; without one the API's refusal, and a failure.
    let port = s.tcp.expect("tcp");
    let token_file = s.dir.path().join("inventory-token");
    std::fs::write(&token_file, format!("{}\n", s.token("ansible", "readonly"))).expect("token");
    let url = format!("http://127.0.0.1:{port}");
    let tcp = |env: &[(&str, &Path)]| {
        let mut c = Command::new(bin());
        c.args(["--url", &url, "inventory", "--list"])
            .env_remove("KLOIGOS_TOKEN")
            .env_remove("KLOIGOS_TOKEN_FILE");
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().expect("run kloigos inventory")
    };
    let inv = json_of(&tcp(&[("KLOIGOS_TOKEN_FILE", &token_file)]));
    assert_eq!(
        inv["_meta"]["hostvars"].as_object().map(|h| h.len()),
        Some(3),
        "{inv}"
    );
    let out = tcp(&[]);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("HTTP 401"),
        "{out:?}"
    );
}

/// The unit's variables in `kloigos inventory --list`.
fn hostvars_of(s: &Server, id: &str) -> Value {
    let inv = json_of(&s.cli(&["inventory", "--list"]));
    inv["_meta"]["hostvars"][id].clone()
}
