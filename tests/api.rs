//! End-to-end API tests: a real `kloigos serve` on a unix socket (and TCP), a real SQLite file, and
//! a temporary root standing in for the host. The command line is in `cli.rs`, crashes and repairs
//! in `recovery.rs`.

mod common;

use common::{HOST, Server, alloc_body, files, ssh_key};
use serde_json::{Value, json};
use std::collections::BTreeSet;

fn detail_types(v: &Value) -> Vec<(String, Value)> {
    v["detail"]
        .as_array()
        .unwrap_or_else(|| panic!("detail is not a list: {v}"))
        .iter()
        .map(|d| {
            assert!(d["msg"].is_string(), "{d}");
            (
                d["type"].as_str().unwrap_or_default().to_string(),
                d["loc"].clone(),
            )
        })
        .collect()
}
#[test]
fn full_lifecycle_over_the_api() {
    if !common::privileged(&[]) {
        return;
    }
    let s = Server::start();
    s.init(&["0-3", "4-7", "8-11", "12-15"]);

    // init_server twice is a conflict.
    let body = json!({"ip": "192.0.2.10", "region": "eu-west", "zone": "a", "hostname": HOST, "cpu_ranges": ["0-3"]});
    let (code, v) = s.call("POST", "/api/admin/init_server", Some(&body.to_string()));
    assert_eq!(code, 409, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("already"), "{v}");

    let (code, units) = s.get("/api/compute_units/");
    assert_eq!(code, 200);
    let units = units.as_array().unwrap().clone();
    assert_eq!(units.len(), 4);
    let first = &units[0];
    // Upstream's fields, in upstream's order, then ours.
    let keys: Vec<&str> = first
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "compute_id",
            "hostname",
            "ip",
            "cpu_count",
            "cpu_range",
            "region",
            "zone",
            "status",
            "started_at",
            "tags",
            "cpu_list",
            "ports_range",
            "user",
            "uid",
            "allocated_by",
            "problem"
        ]
    );
    assert_eq!(first["compute_id"], "testhost_0-3");
    assert_eq!(first["cpu_list"], "0,1,2,3");
    assert_eq!(first["ports_range"], "2000-2399");
    assert_eq!(first["user"], "u0-3");
    assert_eq!(first["status"], "FREE");
    assert_eq!(first["started_at"], Value::Null);
    // Without trailing slash too (FastAPI would redirect).
    assert_eq!(s.get("/api/compute_units").1.as_array().unwrap().len(), 4);

    // Every unit's files exist under the root; NUMA nodes follow the CPUs.
    let slice = std::fs::read_to_string(
        s.root()
            .join("run/systemd/generator/user-20008.slice.d/50-kloigos.conf"),
    )
    .unwrap();
    assert!(slice.contains("AllowedCPUs=8-11\n"), "{slice}");
    assert!(slice.contains("AllowedMemoryNodes=1\n"), "{slice}");
    assert!(s.root().join("etc/tmpfiles.d/kloigos-c12-15.conf").exists());
    assert!(
        s.root().join("home/u12-15/.bashrc").exists(),
        "skeleton copied"
    );
    let nft = std::fs::read_to_string(s.root().join("var/lib/kloigos/kloigos.nft")).unwrap();
    assert!(nft.contains("20012 . 3200-3599"), "{nft}");

    // Allocate.
    let key = ssh_key("alice@laptop");
    let (code, a) = s.call(
        "POST",
        "/api/compute_units/allocate",
        Some(&alloc_body(
            json!(4),
            &key,
            json!({"deployment_id": "dep-1", "owner": "alice", "n": 3, "l": ["x", "y"]}),
        )),
    );
    assert_eq!(code, 200, "{a}");
    assert_eq!(a["status"], "ALLOCATED");
    assert_eq!(a["compute_id"], "testhost_0-3");
    assert!(a["started_at"].as_str().unwrap().ends_with('Z'), "{a}");
    assert_eq!(a["tags"]["owner"], "alice");
    let ak = std::fs::read_to_string(s.root().join("home/u0-3/.ssh/authorized_keys")).unwrap();
    assert_eq!(ak, format!("{key}\n"));
    assert!(s.root().join("var/lib/systemd/linger/u0-3").exists());
    assert!(
        std::fs::read_to_string(s.root().join("etc/tmpfiles.d/kloigos-c0-3.conf"))
            .unwrap()
            .contains("linger/u0-3")
    );

    // Filters.
    for (q, n) in [
        ("deployment_id=dep-1", 1),
        ("deployment_id=nope", 0),
        ("status=ALLOCATED", 1),
        ("status=FREE", 3),
        ("cpu_count=4", 4),
        ("cpu_count=2", 0),
        ("hostname=testhost", 4),
        ("hostname=other", 0),
        ("region=eu-west&zone=a", 4),
        ("zone=b", 0),
        ("compute_id=testhost_4-7", 1),
        ("unknown_param=1", 4),
    ] {
        let (code, v) = s.get(&format!("/api/compute_units/?{q}"));
        assert_eq!(code, 200, "{q}");
        assert_eq!(v.as_array().unwrap().len(), n, "{q}: {v}");
    }
    let (code, v) = s.get("/api/compute_units/?cpu_count=abc");
    assert_eq!(code, 422);
    assert_eq!(
        detail_types(&v),
        vec![("int_parsing".into(), json!(["query", "cpu_count"]))]
    );
    // An integer tag filters too.
    let (code, b) = s.call(
        "POST",
        "/api/compute_units/allocate",
        Some(&alloc_body(
            json!("4"),
            &ssh_key("bob"),
            json!({"deployment_id": 42}),
        )),
    );
    assert_eq!(code, 200, "{b}");
    assert_eq!(
        s.get("/api/compute_units/?deployment_id=42")
            .1
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // One unit.
    let (code, v) = s.get("/api/compute_units/testhost_0-3");
    assert_eq!((code, v["status"].clone()), (200, json!("ALLOCATED")));
    let (code, v) = s.get("/api/compute_units/testhost_99");
    assert_eq!(code, 404);
    assert!(v["detail"].is_string());

    // No capacity: a standard code with a detail.
    let (code, v) = s.call(
        "POST",
        "/api/compute_units/allocate",
        Some(&alloc_body(json!(3), &key, Value::Null)),
    );
    assert_eq!(code, 409, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("cpu_count=3"), "{v}");

    // Deallocate: unknown, wrong state, then for real.
    assert_eq!(
        s.call("DELETE", "/api/compute_units/deallocate/testhost_77", None)
            .0,
        404
    );
    let (code, v) = s.call(
        "DELETE",
        "/api/compute_units/deallocate/testhost_8-11",
        None,
    );
    assert_eq!(code, 409, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("FREE"), "{v}");
    // The owner leaves things behind.
    common::write(&s.root().join("opt/c0-3/app/bin/server"), "#!/bin/sh\n");
    common::write(&s.root().join("mnt/c0-3/data.db"), "data");
    common::write(&s.root().join("home/u0-3/.config/x"), "x");
    common::write(
        &s.root().join("var/spool/cron/crontabs/u0-3"),
        "* * * * * evil\n",
    );
    std::os::unix::fs::symlink("/etc", s.root().join("home/u0-3/etc-link")).unwrap();
    let uid = s.get("/api/compute_units/testhost_0-3").1["uid"]
        .as_u64()
        .expect("uid") as u32;
    let queue = s.root().join("dev/mqueue/q");
    common::write(&queue, "");
    std::os::unix::fs::chown(&queue, Some(uid), Some(uid)).unwrap();
    let (code, v) = s.call("DELETE", "/api/compute_units/deallocate/testhost_0-3", None);
    assert_eq!((code, v), (200, json!({})));
    assert!(!queue.exists(), "message queue left");
    // The old trees were moved aside, then removed before the answer.
    for parent in ["home", "opt", "mnt"] {
        let aside: Vec<_> = std::fs::read_dir(s.root().join(parent))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(aside.is_empty(), "{parent}: {aside:?}");
    }
    assert!(!s.root().join("home/u0-3/.ssh/authorized_keys").exists());
    assert!(!s.root().join("var/lib/systemd/linger/u0-3").exists());
    assert!(!s.root().join("var/spool/cron/crontabs/u0-3").exists());
    assert_eq!(
        std::fs::read_dir(s.root().join("opt/c0-3"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(
        std::fs::read_dir(s.root().join("mnt/c0-3"))
            .unwrap()
            .count(),
        0
    );
    let home: BTreeSet<String> = std::fs::read_dir(s.root().join("home/u0-3"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        home,
        BTreeSet::from([".bashrc".to_string(), ".ssh".to_string()])
    );
    assert!(
        std::path::Path::new("/etc/hostname").exists()
            || std::path::Path::new("/etc/passwd").exists()
    );
    let (_, v) = s.get("/api/compute_units/testhost_0-3");
    assert_eq!(
        (
            v["status"].clone(),
            v["tags"].clone(),
            v["started_at"].clone()
        ),
        (json!("FREE"), Value::Null, Value::Null)
    );
    // Deallocating again is a wrong state.
    assert_eq!(
        s.call("DELETE", "/api/compute_units/deallocate/testhost_0-3", None)
            .0,
        409
    );

    // The audit log knows who did what.
    let (code, ev) = s.get("/api/events?compute_id=testhost_0-3");
    assert_eq!(code, 200);
    let ops: Vec<&str> = ev
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["operation"].as_str().unwrap())
        .collect();
    // The claim's row was written with the claim, in its transaction.
    assert_eq!(ops, ["deallocate", "allocate", "claim"]);
    assert_eq!(ev[2]["after"]["status"], "ALLOCATING");
    assert_eq!(ev[2]["actor"], ev[1]["actor"]);
    assert!(ev[0]["actor"].as_str().unwrap().contains("uid"), "{ev}");
    assert_eq!(ev[0]["before"]["status"], "ALLOCATED");
    assert_eq!(ev[0]["after"]["status"], "FREE");
    // Time and actor filters.
    let t0 = ev[2]["time"].as_str().unwrap();
    let (_, since) = s.get(&format!("/api/events?compute_id=testhost_0-3&since={t0}"));
    assert_eq!(
        since.as_array().unwrap().len(),
        3,
        "since is inclusive: {since}"
    );
    let (_, until) = s.get(&format!("/api/events?compute_id=testhost_0-3&until={t0}"));
    assert_eq!(until, json!([]), "until is exclusive");
    let actor = ev[0]["actor"]
        .as_str()
        .unwrap()
        .replace(' ', "%20")
        .replace('(', "%28")
        .replace(')', "%29");
    let (_, by) = s.get(&format!("/api/events?actor={actor}&operation=allocate"));
    assert!(by.as_array().unwrap().len() >= 2, "{by}");
    let (_, none) = s.get("/api/events?actor=token:nobody");
    assert_eq!(none, json!([]));
    let (_, page) = s.get(&format!("/api/events?limit=1&before={}", ev[0]["id"]));
    assert_eq!(page.as_array().unwrap().len(), 1);
    assert!(page[0]["id"].as_i64() < ev[0]["id"].as_i64());

    // Decommission: refused while a unit is allocated, then forced.
    let (code, v) = s.call(
        "DELETE",
        &format!("/api/admin/decommission_server/{HOST}"),
        None,
    );
    assert_eq!(code, 409, "{v}");
    assert!(
        v["detail"].as_str().unwrap().contains("testhost_4-7"),
        "{v}"
    );
    assert_eq!(
        s.call("DELETE", "/api/admin/decommission_server/nohost", None)
            .0,
        404
    );
    let (code, v) = s.call(
        "DELETE",
        &format!("/api/admin/decommission_server/{HOST}?force=maybe"),
        None,
    );
    assert_eq!(code, 422, "{v}");
    let (code, v) = s.call(
        "DELETE",
        &format!("/api/admin/decommission_server/{HOST}?force=true"),
        None,
    );
    assert_eq!((code, v), (200, json!({})));
    assert_eq!(s.get("/api/compute_units/").1, json!([]));
    let left = files(&s.root());
    assert_eq!(
        left,
        ["etc/hostname", "etc/skel/.bashrc"],
        "everything Kloigos made is gone"
    );
    for d in ["opt/c0-3", "mnt/c4-7", "home/u8-11"] {
        assert!(!s.root().join(d).exists(), "{d}");
    }
    let (_, servers) = s.get("/api/admin/servers");
    assert_eq!(servers[0]["status"], "DECOMMISSIONED");
    // And it can be initialized again.
    s.init(&["0-7", "8-15"]);
    assert_eq!(
        s.get("/api/compute_units/?cpu_count=8")
            .1
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn validation_errors_have_fastapi_shape() {
    if !common::privileged(&[]) {
        return;
    }
    let s = Server::start();
    let post = |path: &str, body: &str| s.call("POST", path, Some(body));

    let (code, v) = post("/api/admin/init_server", "{}");
    assert_eq!(code, 422);
    let missing: Vec<_> = detail_types(&v)
        .into_iter()
        .map(|(t, l)| (t, l[1].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(
        missing,
        ["ip", "region", "zone", "hostname", "cpu_ranges"]
            .map(|f| ("missing".to_string(), f.to_string()))
    );
    assert_eq!(v["detail"][0]["msg"], "Field required");

    let (code, v) = post("/api/admin/init_server", "{not json");
    assert_eq!(code, 422);
    assert_eq!(detail_types(&v)[0].0, "json_invalid");
    let (code, v) = post("/api/admin/init_server", "[]");
    assert_eq!(
        (code, detail_types(&v)[0].0.as_str()),
        (422, "model_attributes_type")
    );
    let (code, v) = post("/api/admin/init_server", "");
    assert_eq!(
        (code, detail_types(&v)),
        (422, vec![("missing".into(), json!(["body"]))])
    );

    let base = json!({"ip": "192.0.2.10", "region": "eu", "zone": "a", "hostname": HOST, "cpu_ranges": ["0-3"]});
    let with = |k: &str, val: Value| {
        let mut b = base.clone();
        b[k] = val;
        b.to_string()
    };
    for (k, val, typ, loc) in [
        (
            "cpu_ranges",
            json!("0-3"),
            "list_type",
            json!(["body", "cpu_ranges"]),
        ),
        (
            "cpu_ranges",
            json!([1]),
            "string_type",
            json!(["body", "cpu_ranges", 0]),
        ),
        (
            "cpu_ranges",
            json!(["0-3", "3-5"]),
            "value_error",
            json!(["body", "cpu_ranges", 1]),
        ),
        (
            "cpu_ranges",
            json!(["14-17"]),
            "value_error",
            json!(["body", "cpu_ranges", 0]),
        ),
        (
            "cpu_ranges",
            json!(["5-3"]),
            "value_error",
            json!(["body", "cpu_ranges", 0]),
        ),
        (
            "cpu_ranges",
            json!([]),
            "value_error",
            json!(["body", "cpu_ranges"]),
        ),
        (
            "hostname",
            json!("Bad_Host"),
            "value_error",
            json!(["body", "hostname"]),
        ),
        (
            "hostname",
            json!("h\nx"),
            "value_error",
            json!(["body", "hostname"]),
        ),
        (
            "ip",
            json!("300.1.1.1"),
            "value_error",
            json!(["body", "ip"]),
        ),
        (
            "region",
            json!("eu{{x}}"),
            "value_error",
            json!(["body", "region"]),
        ),
        ("zone", json!(5), "string_type", json!(["body", "zone"])),
        (
            "port_base",
            json!(0),
            "value_error",
            json!(["body", "port_base"]),
        ),
        (
            "uid_base",
            json!(500),
            "value_error",
            json!(["body", "uid_base"]),
        ),
        (
            "limits",
            json!({"io_read_bandwidth_max": ["/dev/vda 5M\nx"]}),
            "value_error",
            json!(["body", "limits"]),
        ),
        (
            "limits",
            json!({"nope": 1}),
            "value_error",
            json!(["body", "limits"]),
        ),
    ] {
        let (code, v) = post("/api/admin/init_server", &with(k, val.clone()));
        assert_eq!(code, 422, "{k}={val}: {v}");
        assert_eq!(detail_types(&v), vec![(typ.to_string(), loc)], "{k}={val}");
    }
    // Ports beyond the kernel's ephemeral range are refused.
    let (code, v) = post("/api/admin/init_server", &with("port_base", json!(32500)));
    assert_eq!(code, 422, "{v}");
    // Nothing was created by any of that.
    assert_eq!(s.get("/api/admin/servers").1, json!([]));
    assert_eq!(files(&s.root()), ["etc/hostname", "etc/skel/.bashrc"]);

    s.init(&["0-3", "4-7"]);
    let key = ssh_key("k");
    for (body, typ, loc) in [
        (
            json!({"tags": null}),
            "missing",
            json!(["body", "ssh_public_key"]),
        ),
        (
            json!({"ssh_public_key": key}),
            "missing",
            json!(["body", "tags"]),
        ),
        (
            json!({"tags": null, "ssh_public_key": 5}),
            "string_type",
            json!(["body", "ssh_public_key"]),
        ),
        (
            json!({"tags": null, "ssh_public_key": "ssh-ed25519 AAAA"}),
            "value_error",
            json!(["body", "ssh_public_key"]),
        ),
        (
            json!({"tags": null, "ssh_public_key": format!("command=\"/bin/sh\" {key}")}),
            "value_error",
            json!(["body", "ssh_public_key"]),
        ),
        (
            json!({"tags": null, "ssh_public_key": format!("{key}\n{key}")}),
            "value_error",
            json!(["body", "ssh_public_key"]),
        ),
        (
            json!({"tags": [], "ssh_public_key": key}),
            "dict_type",
            json!(["body", "tags"]),
        ),
        (
            json!({"tags": {"k": {"x": 1}}, "ssh_public_key": key}),
            "value_error",
            json!(["body", "tags", "k"]),
        ),
        (
            json!({"tags": {"k": "a\nb"}, "ssh_public_key": key}),
            "value_error",
            json!(["body", "tags", "k"]),
        ),
        (
            json!({"cpu_count": "four", "tags": null, "ssh_public_key": key}),
            "int_parsing",
            json!(["body", "cpu_count"]),
        ),
        (
            json!({"cpu_count": 2.5, "tags": null, "ssh_public_key": key}),
            "int_from_float",
            json!(["body", "cpu_count"]),
        ),
        (
            json!({"cpu_count": 0, "tags": null, "ssh_public_key": key}),
            "value_error",
            json!(["body", "cpu_count"]),
        ),
        (
            json!({"region": "a b", "tags": null, "ssh_public_key": key}),
            "value_error",
            json!(["body", "region"]),
        ),
    ] {
        let (code, v) = post("/api/compute_units/allocate", &body.to_string());
        assert_eq!(code, 422, "{body}: {v}");
        assert_eq!(detail_types(&v), vec![(typ.to_string(), loc)], "{body}");
    }
    // Several problems are reported together.
    let (code, v) = post("/api/compute_units/allocate", r#"{"cpu_count": "x"}"#);
    assert_eq!(code, 422);
    assert_eq!(detail_types(&v).len(), 3, "{v}");
    // None of it allocated anything.
    assert_eq!(
        s.get("/api/compute_units/?status=FREE")
            .1
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert!(
        s.get("/api/events?operation=allocate")
            .1
            .as_array()
            .unwrap()
            .is_empty()
    );

    // Unknown paths and methods, FastAPI style.
    assert_eq!(s.get("/api/nope"), (404, json!({"detail": "Not Found"})));
    assert_eq!(
        s.call("PUT", "/api/compute_units/allocate", Some("{}")),
        (405, json!({"detail": "Method Not Allowed"}))
    );
}

#[test]
fn openapi_and_health() {
    let s = Server::start_tcp();
    let port = s.tcp.expect("tcp");
    let token = s.token("doc", "admin");
    let (code, doc) = s.get("/openapi.json");
    assert_eq!(code, 200);
    assert_eq!(doc["openapi"], "3.1.0");
    for p in [
        "/api/compute_units/allocate",
        "/api/compute_units/deallocate/{compute_id}",
        "/api/compute_units/",
        "/api/admin/init_server",
        "/api/admin/decommission_server/{hostname}",
    ] {
        assert!(doc["paths"][p].is_object(), "missing {p}");
    }
    let schema = &doc["components"]["schemas"]["ComputeUnitRequest"];
    let required: BTreeSet<&str> = schema["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert!(required.contains("ssh_public_key"), "{schema}");
    // A validation error's loc is a list of field names and indices, as FastAPI sends it.
    let loc = &doc["components"]["schemas"]["ValidationError"]["properties"]["loc"];
    assert_eq!(
        loc["items"]["$ref"], "#/components/schemas/LocItem",
        "{loc}"
    );
    let kinds: BTreeSet<&str> = doc["components"]["schemas"]["LocItem"]["oneOf"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, BTreeSet::from(["string", "integer"]));
    // Every API operation declares the errors it can give.
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let codes: BTreeSet<&str> = op["responses"]
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            // 403 (a refused Host or Origin over TCP) and 503 (connection caps) for all.
            let mut want = BTreeSet::from(["200", "403", "500", "503"]);
            if path.starts_with("/api/") {
                want.insert("401");
            }
            if op.get("requestBody").is_some() {
                want.extend(["408", "413", "415", "422"]);
            }
            assert!(codes.is_superset(&want), "{method} {path}: {codes:?}");
            // And what the service really answers to those refusals is what is declared.
            let url = path
                .replace("{compute_id}", "nope_0-1")
                .replace("{hostname}", "nope");
            let verb = method.to_uppercase();
            let auth = format!("Authorization: Bearer {token}\r\n");
            let mut refusals = vec![(
                format!(
                    "{verb} {url} HTTP/1.1\r\nHost: evil.example\r\n{auth}Content-Length: 0\r\n\r\n"
                ),
                vec![],
                403,
            )];
            if verb != "GET" {
                refusals.push((
                    format!("{verb} {url} HTTP/1.1\r\nHost: localhost\r\nOrigin: http://evil.example\r\n{auth}Content-Length: 0\r\n\r\n"),
                    vec![],
                    403,
                ));
            }
            if op.get("requestBody").is_some() {
                refusals.push((
                    format!("{verb} {url} HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Type: text/plain\r\nContent-Length: 2\r\n\r\n"),
                    b"{}".to_vec(),
                    415,
                ));
            }
            for (head, sent, status) in refusals {
                let stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
                let writer = stream.try_clone().unwrap();
                let (code, _, v) = raw_exchange(stream, writer, head.as_bytes(), sent);
                assert_eq!(code, status, "{head}{v}");
                assert!(
                    codes.contains(code.to_string().as_str()),
                    "{method} {path} answers {code}, undeclared"
                );
            }
        }
    }
    for (code, words) in [
        ("403", "Host"),
        ("403", "Origin"),
        ("408", "body"),
        ("415", "JSON"),
        ("503", "connections"),
    ] {
        let d = doc["components"]["responses"][format!("E{code}")]["description"]
            .as_str()
            .unwrap_or_default();
        assert!(d.contains(words), "E{code}: {d:?}");
    }
    // No page of another site may frame the dashboard or the docs, nor sniff an answer.
    for path in ["/", "/docs/", "/openapi.json", "/api/nope"] {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(
            c,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut raw = Vec::new();
        c.read_to_end(&mut raw).unwrap();
        let text = String::from_utf8_lossy(&raw).to_ascii_lowercase();
        let head = text.split("\r\n\r\n").next().unwrap_or_default();
        for h in [
            "x-frame-options: deny",
            "content-security-policy: frame-ancestors 'none'",
            "x-content-type-options: nosniff",
        ] {
            assert!(head.contains(h), "{path}: no {h} in {head}");
        }
    }
    let (code, h) = s.get("/healthz");
    assert_eq!(
        (code, h["status"].clone(), h["hostname"].clone()),
        (200, json!("ok"), json!(HOST))
    );
}

/// Sends `head`, then `body` from another thread (ignoring a server that stops reading it),
/// and reads one response: status, lower-cased head, and the body parsed as JSON.
fn raw_exchange(
    mut reader: impl std::io::Read,
    mut writer: impl std::io::Write + Send + 'static,
    head: &[u8],
    body: Vec<u8>,
) -> (u16, String, Value) {
    // A server that answers early (431 for an oversized head) may close before all of it is
    // sent: the answer is what counts.
    let _ = writer.write_all(head);
    let sender = std::thread::spawn(move || {
        let _ = writer.write_all(&body);
    });
    let mut raw = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => panic!("no whole response: {}", String::from_utf8_lossy(&raw)),
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
        let text = String::from_utf8_lossy(&raw).to_string();
        let Some((head, rest)) = text.split_once("\r\n\r\n") else {
            continue;
        };
        let head = head.to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no content-length: {head}"));
        if rest.len() >= length {
            let code = head
                .split(' ')
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            let json = serde_json::from_str(&rest[..length])
                .unwrap_or_else(|e| panic!("{e}: not JSON: {text}"));
            drop(reader);
            let _ = sender.join();
            return (code, head, json);
        }
    }
}

#[test]
fn every_error_is_json_on_unix_and_tcp() {
    if !common::privileged(&[]) {
        return;
    }
    let s = Server::start_tcp();
    let port = s.tcp.unwrap();
    let token = s.token("raw", "admin");
    let long_url = format!("/api/compute_units/{}", "a".repeat(70 * 1024));
    let big_header = format!("X-Big: {}\r\n", "b".repeat(8 * 1024));
    let huge_header = format!("X-Big: {}\r\n", "h".repeat(500 * 1024));
    let chunk = format!("{:x}\r\n{}\r\n", 1 << 20, "x".repeat(1 << 20));
    // (what, method, path, extra headers, body, status); over TCP with an admin token.
    let cases = vec![
        (
            "bad header line",
            "GET",
            "/healthz",
            "Bad Header: x\r\n",
            vec![],
            400,
        ),
        ("70 KB URL", "GET", long_url.as_str(), "", vec![], 414),
        // An 8 KB header is fine; 500 KB is over hyper's buffer.
        (
            "8 KB header",
            "GET",
            "/api/nope",
            big_header.as_str(),
            vec![],
            404,
        ),
        (
            "500 KB header",
            "GET",
            "/healthz",
            &huge_header,
            vec![],
            431,
        ),
        (
            "3 MB body",
            "POST",
            "/api/compute_units/allocate",
            "Content-Type: application/json\r\nContent-Length: 3000000\r\n",
            vec![b'{'; 3_000_000],
            413,
        ),
        (
            "3 MB chunked body",
            "POST",
            "/api/compute_units/allocate",
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n",
            format!("{}0\r\n\r\n", chunk.repeat(3)).into_bytes(),
            413,
        ),
        ("unknown route", "GET", "/api/nope", "", vec![], 404),
        (
            "wrong method",
            "PUT",
            "/api/whoami",
            "Content-Length: 0\r\n",
            vec![],
            405,
        ),
        (
            "path not UTF-8",
            "GET",
            "/api/compute_units/%ff",
            "",
            vec![],
            400,
        ),
    ];
    let mut requests: Vec<(String, Vec<u8>, Vec<u8>, u16)> = vec![(
        "garbage request line".into(),
        b"GARBAGE\r\n\r\n".to_vec(),
        vec![],
        400,
    )];
    for (what, method, path, extra, body, status) in cases {
        let head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n{extra}");
        requests.push((
            what.into(),
            format!("{head}\r\n").into_bytes(),
            body.clone(),
            status,
        ));
        let auth = format!("Authorization: Bearer {token}\r\n");
        requests.push((
            format!("{what} over TCP"),
            format!("{head}{auth}\r\n").into_bytes(),
            body,
            status,
        ));
    }
    for (what, head, body, want) in requests {
        let (code, head_seen, v) = if what.ends_with("over TCP") {
            let stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            let writer = stream.try_clone().unwrap();
            raw_exchange(stream, writer, &head, body)
        } else {
            let stream = std::os::unix::net::UnixStream::connect(&s.socket).unwrap();
            let writer = stream.try_clone().unwrap();
            raw_exchange(stream, writer, &head, body)
        };
        assert_eq!(code, want, "{what}: {head_seen}\n{v}");
        assert!(
            head_seen.contains("\r\ncontent-type: application/json\r\n"),
            "{what}: {head_seen}"
        );
        assert!(v["detail"].is_string(), "{what}: {v}");
    }
    // A garbage request over TCP too, and the server is still there.
    let stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let writer = stream.try_clone().unwrap();
    let (code, _, v) = raw_exchange(stream, writer, b"\x16\x03\x01 TLS?\r\n\r\n", vec![]);
    assert_eq!((code, v["detail"].is_string()), (400, true), "{v}");
    assert_eq!(s.get("/healthz").0, 200);
}

#[test]
fn fifty_concurrent_allocations_on_ten_units() {
    if !common::privileged(&[]) {
        return;
    }
    let s = Server::start();
    s.init(
        &(0..10)
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let results: Vec<(u16, Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..50)
            .map(|i| {
                let s = &s;
                scope.spawn(move || {
                    s.call(
                        "POST",
                        "/api/compute_units/allocate",
                        Some(&alloc_body(
                            json!(1),
                            &ssh_key(&format!("user{i}")),
                            json!({"owner": format!("user{i}")}),
                        )),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok: Vec<&Value> = results
        .iter()
        .filter(|(c, _)| *c == 200)
        .map(|(_, v)| v)
        .collect();
    let conflicts = results.iter().filter(|(c, _)| *c == 409).count();
    assert_eq!((ok.len(), conflicts), (10, 40), "{results:?}");
    let ids: BTreeSet<&str> = ok
        .iter()
        .map(|v| v["compute_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 10, "every allocation got its own unit");
    // Each unit's key is the one of the owner the API said it went to.
    for v in ok {
        let owner = v["tags"]["owner"].as_str().unwrap();
        let key = std::fs::read_to_string(s.root().join(format!(
            "home/{}/.ssh/authorized_keys",
            v["user"].as_str().unwrap()
        )))
        .unwrap();
        assert!(key.trim_end().ends_with(owner), "{key} vs {owner}");
    }
    assert_eq!(
        s.get("/api/compute_units/?status=ALLOCATED")
            .1
            .as_array()
            .unwrap()
            .len(),
        10
    );
}

/// One GET on a fresh connection with extra header lines: status, lower-cased head, and the
/// body's bytes (de-chunked).
fn get_raw(socket: &std::path::Path, path: &str, headers: &str) -> (u16, String, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .ok();
    let req =
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{headers}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).expect("send");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read");
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("http response");
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    let mut rest = &raw[end + 4..];
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    let body = if head.contains("transfer-encoding: chunked") {
        let mut out = Vec::new();
        loop {
            let eol = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .expect("chunk size");
            let n = usize::from_str_radix(std::str::from_utf8(&rest[..eol]).unwrap().trim(), 16)
                .expect("chunk size");
            if n == 0 {
                break;
            }
            out.extend_from_slice(&rest[eol + 2..eol + 2 + n]);
            rest = &rest[eol + 2 + n + 2..];
        }
        out
    } else {
        rest.to_vec()
    };
    (code, head, body)
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .map(str::trim)
}

/// The list streams (a body of many chunks), revalidates with ETag/If-None-Match, answers an
/// unchanged inventory from its cache, follows every change (its own, and a change another
/// process made to the database), and compresses when asked: same JSON either way.
#[test]
fn lists_stream_revalidate_and_follow_every_change() {
    let s = Server::start();
    // 30 inventory-only servers of 8 units: a list of about 100 kB, several chunks.
    for n in 0..30 {
        let body = json!({"ip": format!("192.0.2.{n}"), "region": if n % 2 == 0 { "us-east" } else { "eu-west" },
            "zone": "a", "hostname": format!("inv{n:02}"), "inventory_only": true,
            "cpu_ranges": ["0-3", "4-7", "8-11", "12-15", "16-19", "20-23", "24-27", "28-31"]});
        let (code, v) = s.call("POST", "/api/admin/init_server", Some(&body.to_string()));
        assert_eq!(code, 200, "{v}");
    }
    let list = "/api/compute_units/";
    let (code, head, body) = get_raw(&s.socket, list, "");
    assert_eq!(code, 200, "{head}");
    assert!(body.len() > 64 * 1024, "{} bytes", body.len());
    let units: Vec<Value> = serde_json::from_slice(&body).expect("the streamed list is JSON");
    assert_eq!(units.len(), 240);
    // In hostname and CPU order, every one of them.
    let ids: Vec<&str> = units
        .iter()
        .map(|u| u["compute_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids[0], "inv00_0-3");
    assert_eq!(ids[8], "inv01_0-3");
    assert_eq!(ids[239], "inv29_28-31");
    assert_eq!(header(&head, "content-type"), Some("application/json"));
    let etag = header(&head, "etag").expect("an etag").to_string();

    // Filtered the same way as before the stream.
    let (_, _, east) = get_raw(
        &s.socket,
        "/api/compute_units/?region=us-east&status=FREE",
        "",
    );
    let east: Vec<Value> = serde_json::from_slice(&east).unwrap();
    assert_eq!(east.len(), 120);
    assert!(east.iter().all(|u| u["region"] == "us-east"));

    // Unchanged: 304 without a body, or the same bytes and ETag again (from the cache).
    // (On PostgreSQL the counter names the rows only when no transaction of the cluster is
    // in progress at the read, and the tests of other databases share this cluster: a few
    // tries; on SQLite the first.)
    let tries = if s.pg.is_some() { 20 } else { 1 };
    let mut etag = etag;
    let mut body = body;
    for n in 1..=tries {
        let (code, h, _) = get_raw(&s.socket, list, &format!("If-None-Match: {etag}\r\n"));
        if code == 304 {
            break;
        }
        assert!(n < tries, "no 304 for an unchanged inventory: {h}");
        std::thread::sleep(std::time::Duration::from_millis(100));
        let (_, h, b) = get_raw(&s.socket, list, "");
        etag = header(&h, "etag").unwrap().to_string();
        body = b;
    }
    let inm = format!("If-None-Match: {etag}\r\n");
    let (code, head304, empty) = get_raw(&s.socket, list, &inm);
    assert_eq!(code, 304, "{head304}");
    assert!(empty.is_empty());
    assert_eq!(header(&head304, "etag"), Some(etag.as_str()));
    let (code, head2, again) = get_raw(&s.socket, list, "");
    assert_eq!(code, 200);
    assert_eq!(again, body);
    assert_eq!(header(&head2, "etag"), Some(etag.as_str()));

    // gzip when asked: another ETag, the same JSON once inflated.
    let (code, gzhead, gz) = get_raw(&s.socket, list, "Accept-Encoding: gzip, br\r\n");
    assert_eq!(code, 200);
    assert_eq!(header(&gzhead, "content-encoding"), Some("gzip"));
    let gz_etag = header(&gzhead, "etag").unwrap().to_string();
    assert_ne!(gz_etag, etag);
    assert!(gz.len() < body.len() / 4, "{} of {}", gz.len(), body.len());
    let mut inflated = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut inflated)
        .expect("gunzip");
    assert_eq!(inflated, body);
    let (code, _, _) = get_raw(
        &s.socket,
        list,
        &format!("Accept-Encoding: gzip\r\nIf-None-Match: {gz_etag}\r\n"),
    );
    assert!(code == 304 || s.pg.is_some(), "{code}");

    // A change through the API: the old ETag no longer matches, the list shows it.
    let alloc = json!({"cpu_count": 4, "ssh_public_key": ssh_key("x"), "tags": {"deployment_id": "d1"},
        "inventory_only": true});
    let (code, v) = s.call(
        "POST",
        "/api/compute_units/allocate",
        Some(&alloc.to_string()),
    );
    assert_eq!(code, 200, "{v}");
    let (code, head3, changed) = get_raw(&s.socket, list, &inm);
    assert_eq!(code, 200);
    let etag3 = header(&head3, "etag").unwrap().to_string();
    assert_ne!(etag3, etag);
    let changed: Vec<Value> = serde_json::from_slice(&changed).unwrap();
    let mine = changed
        .iter()
        .find(|u| u["compute_id"] == v["compute_id"])
        .unwrap();
    assert_eq!(mine["status"], "ALLOCATED");
    assert_eq!(mine["tags"], json!({"deployment_id": "d1"}));
    let (_, _, d1) = get_raw(&s.socket, "/api/compute_units/?deployment_id=d1", "");
    assert_eq!(serde_json::from_slice::<Vec<Value>>(&d1).unwrap().len(), 1);

    // A change another process made to the database (an admin's hand, another kloigos): seen
    // at once, not served from the cache.
    let sql = "UPDATE compute_units SET problem = 'marked by hand' WHERE compute_id = 'inv05_4-7'";
    match &s.pg {
        None => {
            let db = rusqlite::Connection::open(s.db()).expect("open the database");
            db.execute(sql, []).expect("update");
        }
        Some(pg) => {
            let out = std::process::Command::new("psql")
                .arg(pg.url())
                .args(["-qAtX", "-v", "ON_ERROR_STOP=1", "-c", sql])
                .output()
                .expect("psql");
            assert!(out.status.success(), "{out:?}");
        }
    }
    let (code, head4, marked) = get_raw(&s.socket, list, &format!("If-None-Match: {etag3}\r\n"));
    assert_eq!(code, 200, "{head4}");
    assert_ne!(header(&head4, "etag"), Some(etag3.as_str()));
    let marked: Vec<Value> = serde_json::from_slice(&marked).unwrap();
    let u = marked
        .iter()
        .find(|u| u["compute_id"] == "inv05_4-7")
        .unwrap();
    assert_eq!(u["problem"], "marked by hand");
}

/// A list larger than what the cache keeps in memory is kept in an unnamed file (nothing
/// appears in the database's directory) and answered from it, byte for byte, until a change.
#[test]
fn large_lists_are_cached_in_unnamed_files() {
    let s = Server::start_with_env(&[("KLOIGOS_LIST_CACHE_MEMORY", "20000")]);
    for n in 0..10 {
        let body = json!({"ip": format!("192.0.2.{n}"), "region": "r", "zone": "a",
            "hostname": format!("inv{n:02}"), "inventory_only": true,
            "cpu_ranges": ["0-3", "4-7", "8-11", "12-15", "16-19", "20-23", "24-27", "28-31"]});
        let (code, v) = s.call("POST", "/api/admin/init_server", Some(&body.to_string()));
        assert_eq!(code, 200, "{v}");
    }
    let before = common::files(s.dir.path());
    let list = "/api/compute_units/";
    let (code, h1, first) = get_raw(&s.socket, list, "");
    assert_eq!(code, 200);
    assert!(first.len() > 20000, "{}", first.len());
    for _ in 0..3 {
        let (code, h, again) = get_raw(&s.socket, list, "");
        assert_eq!(code, 200);
        assert_eq!(again, first);
        // (On PostgreSQL, a transaction of another test's database in flight at the read
        // makes the stamp the snapshot: the same rows, another ETag.)
        if s.pg.is_none() {
            assert_eq!(header(&h, "etag"), header(&h1, "etag"));
        }
    }
    let (_, _, gz1) = get_raw(&s.socket, list, "Accept-Encoding: gzip\r\n");
    let (_, _, gz2) = get_raw(&s.socket, list, "Accept-Encoding: gzip\r\n");
    assert_eq!(gz1, gz2);
    assert_eq!(
        common::files(s.dir.path()),
        before,
        "no named file was left"
    );
    let alloc =
        json!({"cpu_count": 4, "ssh_public_key": ssh_key("x"), "tags": {}, "inventory_only": true});
    let (code, v) = s.call(
        "POST",
        "/api/compute_units/allocate",
        Some(&alloc.to_string()),
    );
    assert_eq!(code, 200, "{v}");
    let (_, h2, changed) = get_raw(&s.socket, list, "");
    assert_ne!(header(&h2, "etag"), header(&h1, "etag"));
    let changed: Vec<Value> = serde_json::from_slice(&changed).unwrap();
    assert!(
        changed
            .iter()
            .any(|u| u["compute_id"] == v["compute_id"] && u["status"] == "ALLOCATED")
    );
}
