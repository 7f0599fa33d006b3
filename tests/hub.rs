//! The hub side of the fleet, end to end over real HTTP against a real `kloigos serve`: the
//! test plays each fleet host itself with its token (reads its state, posts reports) and runs
//! a tiny listener as the host's poke endpoint.

mod common;

use common::{HOST, Server, alloc_body, ssh_key};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// A stand-in for a host's poke endpoint: counts the POSTs it gets and answers 202.
struct Poke {
    url: String,
    count: Arc<AtomicUsize>,
}

fn poke_listener() -> Poke {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            s.set_read_timeout(Some(Duration::from_secs(2))).ok();
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).unwrap_or(0);
            if buf[..n].starts_with(b"POST /api/host/poke ") {
                c.fetch_add(1, Ordering::SeqCst);
            }
            let body = r#"{"detail":"pull scheduled"}"#;
            let _ = write!(
                s,
                "HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    Poke {
        url: format!("http://127.0.0.1:{port}/api/host/poke"),
        count,
    }
}

/// A poke URL where nothing listens.
fn dead_url() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    format!("http://127.0.0.1:{port}/api/host/poke")
}

fn start(apply_timeout: &str) -> Server {
    // Packed placement: the tests know which host an allocation tries first.
    Server::start_tcp_with_env(&[
        ("KLOIGOS_APPLY_TIMEOUT", apply_timeout),
        ("KLOIGOS_PLACEMENT", "pack"),
    ])
}

/// `POST /api/admin/hosts` as root: the new host's token.
fn add_host(s: &Server, name: &str) -> String {
    let (code, v) = s.call(
        "POST",
        "/api/admin/hosts",
        Some(&json!({"hostname": name}).to_string()),
    );
    assert_eq!(code, 201, "{v}");
    v["token"].as_str().expect("token").to_string()
}

fn facts() -> Value {
    json!({"cpus_online": "0-7", "numa_nodes": {"0": "0-7"}, "ephemeral_ports": [32768, 60999],
           "systemd_version": 252, "socket_bind": true, "kloigos_version": "0.1.0"})
}

fn join(s: &Server, name: &str, token: &str, poke_url: Option<&str>) {
    let body = json!({"facts": facts(), "poke_url": poke_url, "version": "0.1.0"}).to_string();
    let (code, v) = s.tcp_call(
        Some(token),
        "POST",
        &format!("/api/hosts/{name}/join"),
        Some(&body),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(v, json!({"hostname": name}));
}

fn state(s: &Server, name: &str, token: &str) -> Value {
    let (code, v) = s.tcp_call(
        Some(token),
        "GET",
        &format!("/api/hosts/{name}/state"),
        None,
    );
    assert_eq!(code, 200, "{v}");
    v
}

/// How the played host answers for a unit it is asked to own.
#[derive(Clone, Copy, PartialEq)]
enum Answer {
    Apply,
    /// Fails and releases the unit cleanly.
    FailRolledBack,
    /// Fails and cannot release it.
    FailStuck,
}

/// One pull of the played host: reads its state, "applies" it (units it is asked to own get
/// `owned` per `answer`, others are released), reports. Returns the state.
fn pull(s: &Server, name: &str, token: &str, answer: Answer) -> Value {
    let st = state(s, name, token);
    let server = &st["server"];
    let (server_out, units) = if server.is_null() || server["status"] == "DECOMMISSIONING" {
        (Value::Null, vec![])
    } else {
        let units: Vec<Value> = server["units"]
            .as_array()
            .expect("units")
            .iter()
            .map(|u| {
                let wanted = matches!(u["status"].as_str(), Some("ALLOCATING" | "ALLOCATED"));
                let (owned, ok, rolled_back) = match (wanted, answer) {
                    (false, _) | (true, Answer::Apply) => (wanted, true, false),
                    (true, Answer::FailRolledBack) => (false, false, true),
                    (true, Answer::FailStuck) => (true, false, false),
                };
                json!({"compute_id": u["compute_id"], "claim": if owned || !ok { u["claim"].clone() } else { Value::Null },
                       "owned": owned, "ok": ok, "error": if ok { Value::Null } else { json!("useradd failed") },
                       "rolled_back": rolled_back})
            })
            .collect();
        (
            json!({"created_at": server["created_at"], "ok": true, "error": null}),
            units,
        )
    };
    let report = json!({"as_of": st["as_of"], "version": "0.1.0", "facts": facts(),
                        "server": server_out, "units": units, "drift": ["etc/x rewritten"]});
    let (code, v) = s.tcp_call(
        Some(token),
        "POST",
        &format!("/api/hosts/{name}/report"),
        Some(&report.to_string()),
    );
    assert_eq!(code, 200, "{v}");
    st
}

/// Pulls as the host until its state shows a unit in `status` (or a server in `status`).
fn pull_when(s: &Server, name: &str, token: &str, status: &str, answer: Answer) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = state(s, name, token);
        let units = st["server"]["units"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if st["server"]["status"] == status || units.iter().any(|u| u["status"] == status) {
            pull(s, name, token, answer);
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never showed {status}: {st}"
        );
        std::thread::sleep(Duration::from_millis(30));
    }
}

fn init_body(name: &str, ranges: &[&str]) -> String {
    json!({"ip": "192.0.2.20", "region": "eu", "zone": "b", "hostname": name, "cpu_ranges": ranges})
        .to_string()
}

/// A joined, reporting host `name` with a READY server of `ranges`, initialized through the
/// hub (which waits for the host's report).
fn joined_server(s: &Server, name: &str, poke: Option<&str>, ranges: &[&str]) -> String {
    let token = add_host(s, name);
    join(s, name, &token, poke);
    std::thread::scope(|sc| {
        let init = sc.spawn(|| {
            s.call(
                "POST",
                "/api/admin/init_server",
                Some(&init_body(name, ranges)),
            )
        });
        pull_when(s, name, &token, "INITIALIZING", Answer::Apply);
        let (code, v) = init.join().expect("init");
        assert_eq!(code, 200, "{v}");
    });
    token
}

fn unit(s: &Server, id: &str) -> Value {
    let (code, v) = s.get(&format!("/api/compute_units/{id}"));
    assert_eq!(code, 200, "{v}");
    v
}

fn allocate(s: &Server) -> (u16, Value) {
    s.call(
        "POST",
        "/api/compute_units/allocate",
        Some(&alloc_body(json!(2), &ssh_key("t"), Value::Null)),
    )
}

/// Allocates while the played host answers with `answer`.
fn allocate_played(s: &Server, name: &str, token: &str, answer: Answer) -> (u16, Value) {
    std::thread::scope(|sc| {
        let a = sc.spawn(|| allocate(s));
        pull_when(s, name, token, "ALLOCATING", answer);
        a.join().expect("allocate")
    })
}

fn wait_status(s: &Server, id: &str, status: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let u = unit(s, id);
        if u["status"] == status {
            return;
        }
        assert!(Instant::now() < deadline, "{id} never became {status}: {u}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn host_tokens_open_only_their_own_host() {
    let s = start("2");
    let admin = s.token("ops", "admin");
    let reader = s.token("ro", "readonly");
    let t1 = add_host(&s, "h1");
    assert!(t1.starts_with("kh_") && t1.len() == 46, "{t1}");
    let t2 = add_host(&s, "h2");
    join(&s, "h1", &t1, None);

    // A host token is the lowest role: nothing but its own /api/hosts/NAME/....
    for path in [
        "/api/compute_units",
        "/api/admin/servers",
        "/api/admin/hosts",
        "/api/whoami",
    ] {
        assert_eq!(s.tcp_call(Some(&t1), "GET", path, None).0, 403, "{path}");
    }
    assert_eq!(
        s.tcp_call(
            Some(&t1),
            "POST",
            "/api/compute_units/allocate",
            Some(&alloc_body(json!(2), &ssh_key("x"), Value::Null))
        )
        .0,
        403
    );
    // Another host's token: 403 on state, report and join.
    assert_eq!(
        s.tcp_call(Some(&t2), "GET", "/api/hosts/h1/state", None).0,
        403
    );
    let report = json!({"as_of": "2026-11-23T20:00:00Z", "version": "0.1.0", "facts": facts(),
                        "server": null, "units": [], "drift": []})
    .to_string();
    assert_eq!(
        s.tcp_call(Some(&t2), "POST", "/api/hosts/h1/report", Some(&report))
            .0,
        403
    );
    assert_eq!(
        s.tcp_call(Some(&t1), "POST", "/api/hosts/h1/report", Some(&report))
            .0,
        200
    );
    // An admin may read a host's state, not report for it; a reader neither.
    assert_eq!(
        s.tcp_call(Some(&admin), "GET", "/api/hosts/h1/state", None)
            .0,
        200
    );
    assert_eq!(
        s.tcp_call(Some(&admin), "POST", "/api/hosts/h1/report", Some(&report))
            .0,
        403
    );
    assert_eq!(
        s.tcp_call(Some(&reader), "GET", "/api/hosts/h1/state", None)
            .0,
        403
    );
    // Bodies are checked strictly.
    let (code, v) = s.tcp_call(
        Some(&t1),
        "POST",
        "/api/hosts/h1/report",
        Some(r#"{"as_of": 1}"#),
    );
    assert_eq!(
        (code, v["detail"][0]["loc"].clone()),
        (422, json!(["body", "as_of"])),
        "{v}"
    );
    let mut extra: Value = serde_json::from_str(&report).unwrap();
    extra["units"] = json!([{"compute_id": "h1_0-1", "claim": null, "owned": false, "ok": true,
                             "error": null, "rolled_back": false, "sneaky": 1}]);
    let (code, v) = s.tcp_call(
        Some(&t1),
        "POST",
        "/api/hosts/h1/report",
        Some(&extra.to_string()),
    );
    assert_eq!(
        (code, v["detail"][0]["loc"].clone()),
        (422, json!(["body", "units", 0, "sneaky"])),
        "{v}"
    );
    let bad_time = report.replace("2026-11-23T20:00:00Z", "yesterday");
    let (code, v) = s.tcp_call(Some(&t1), "POST", "/api/hosts/h1/report", Some(&bad_time));
    assert_eq!(
        (code, v["detail"][0]["loc"].clone()),
        (422, json!(["body", "as_of"]))
    );
    let bad_poke =
        json!({"facts": facts(), "poke_url": "file:///etc/passwd", "version": "1"}).to_string();
    let (code, v) = s.tcp_call(Some(&t1), "POST", "/api/hosts/h1/join", Some(&bad_poke));
    assert_eq!(
        (code, v["detail"][0]["loc"].clone()),
        (422, json!(["body", "poke_url"]))
    );

    // Hosts as the hub sees them.
    let (code, hosts) = s.tcp_call(Some(&reader), "GET", "/api/admin/hosts", None);
    assert_eq!(code, 200, "{hosts}");
    assert_eq!(hosts[0]["hostname"], "h1");
    assert_eq!(hosts[0]["joined"], true);
    assert_eq!(hosts[0]["stale"], false);
    assert_eq!(hosts[0]["facts"]["cpus_online"], "0-7");
    assert_eq!(hosts[1]["hostname"], "h2");
    assert_eq!(hosts[1]["joined"], false);
    assert!(hosts[0].get("token").is_none() && hosts[0].get("token_sha256").is_none());

    // A known host gets a new token (200) and the old one stops working.
    let (code, v) = s.call("POST", "/api/admin/hosts", Some(r#"{"hostname": "h1"}"#));
    assert_eq!(code, 200, "{v}");
    let t1b = v["token"].as_str().unwrap().to_string();
    assert_eq!(
        s.tcp_call(Some(&t1), "GET", "/api/hosts/h1/state", None).0,
        401
    );
    assert_eq!(
        s.tcp_call(Some(&t1b), "GET", "/api/hosts/h1/state", None).0,
        200
    );
    // Only admins manage hosts; a removed host's token stops working.
    assert_eq!(
        s.tcp_call(Some(&reader), "DELETE", "/api/admin/hosts/h1", None)
            .0,
        403
    );
    assert_eq!(s.call("DELETE", "/api/admin/hosts/h1", None).0, 200);
    assert_eq!(s.call("DELETE", "/api/admin/hosts/h1", None).0, 404);
    assert_eq!(
        s.tcp_call(Some(&t1b), "GET", "/api/hosts/h1/state", None).0,
        401
    );
}

#[test]
fn allocate_and_deallocate_on_a_joined_host_wait_for_its_reports() {
    let s = start("2");
    let poke = poke_listener();
    let token = joined_server(&s, "h1", Some(&poke.url), &["0-1", "2-3"]);
    assert!(
        poke.count.load(Ordering::SeqCst) >= 1,
        "init poked the host"
    );
    let (_, servers) = s.get("/api/admin/servers");
    let h1 = servers
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["hostname"] == "h1")
        .unwrap()
        .clone();
    assert_eq!(h1["status"], "READY");
    assert_eq!(h1["inventory_only"], false);
    assert_eq!(h1["host"]["joined"], true);
    assert_eq!(h1["host"]["drift"], json!(["etc/x rewritten"]));
    // The NUMA layout the host reported (the dashboard's CPU map draws it).
    assert_eq!(h1["numa_nodes"], json!([{"node": 0, "cpus": "0-7"}]));

    // Applied: 200 ALLOCATED, only once the host reported it.
    let before = poke.count.load(Ordering::SeqCst);
    let (code, u) = allocate_played(&s, "h1", &token, Answer::Apply);
    assert_eq!(code, 200, "{u}");
    assert_eq!(u["status"], "ALLOCATED");
    assert_eq!(u["compute_id"], "h1_0-1");
    assert!(
        poke.count.load(Ordering::SeqCst) > before,
        "allocate poked the host"
    );

    // Failed and rolled back by the host: 500, the unit is FREE again.
    let (code, v) = allocate_played(&s, "h1", &token, Answer::FailRolledBack);
    assert_eq!(code, 500, "{v}");
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("failed on host h1: useradd failed"),
        "{v}"
    );
    assert_eq!(unit(&s, "h1_2-3")["status"], "FREE");

    // Failed and not released: ALLOCATION_FAIL, until the host reports it released it.
    let (code, v) = allocate_played(&s, "h1", &token, Answer::FailStuck);
    assert_eq!(code, 500, "{v}");
    assert_eq!(unit(&s, "h1_2-3")["status"], "ALLOCATION_FAIL");
    pull(&s, "h1", &token, Answer::Apply);
    wait_status(&s, "h1_2-3", "FREE", Duration::from_secs(10));

    // No report in time: 504, the unit is FREE, and the host is poked again.
    let (code, v) = allocate(&s);
    assert_eq!(code, 504, "{v}");
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("did not apply the allocation of h1_2-3 within 2 s"),
        "{v}"
    );
    assert_eq!(unit(&s, "h1_2-3")["status"], "FREE");

    // Deallocate: FREE once the host reports the unit released.
    std::thread::scope(|sc| {
        let d = sc.spawn(|| s.call("DELETE", "/api/compute_units/deallocate/h1_0-1", None));
        pull_when(&s, "h1", &token, "DEALLOCATING", Answer::Apply);
        let (code, v) = d.join().unwrap();
        assert_eq!(code, 200, "{v}");
    });
    assert_eq!(unit(&s, "h1_0-1")["status"], "FREE");

    // Deallocate without a report: 504 DEALLOCATION_FAIL; FREE once the host catches up.
    let (code, u) = allocate_played(&s, "h1", &token, Answer::Apply);
    assert_eq!(code, 200, "{u}");
    let id = u["compute_id"].as_str().unwrap().to_string();
    let (code, v) = s.call(
        "DELETE",
        &format!("/api/compute_units/deallocate/{id}"),
        None,
    );
    assert_eq!(code, 504, "{v}");
    assert_eq!(unit(&s, &id)["status"], "DEALLOCATION_FAIL");
    pull(&s, "h1", &token, Answer::Apply);
    wait_status(&s, &id, "FREE", Duration::from_secs(10));

    // Decommission: DECOMMISSIONED once the host reports its server torn down.
    std::thread::scope(|sc| {
        let d = sc.spawn(|| s.call("DELETE", "/api/admin/decommission_server/h1", None));
        pull_when(&s, "h1", &token, "DECOMMISSIONING", Answer::Apply);
        let (code, v) = d.join().unwrap();
        assert_eq!(code, 200, "{v}");
    });
    let (_, servers) = s.get("/api/admin/servers");
    let h1 = servers
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["hostname"] == "h1")
        .unwrap()
        .clone();
    assert_eq!(h1["status"], "DECOMMISSIONED");
    assert!(state(&s, "h1", &token)["server"].is_null());
}

#[test]
fn init_server_reads_the_hosts_facts_and_waits_for_it() {
    let s = start("1");
    // Neither this host nor a joined one: refused unless explicitly inventory-only.
    let (code, v) = s.call(
        "POST",
        "/api/admin/init_server",
        Some(&init_body("nowhere", &["0-1"])),
    );
    assert_eq!(code, 422, "{v}");
    assert_eq!(v["detail"][0]["loc"], json!(["body", "hostname"]));
    assert!(
        v["detail"][0]["msg"]
            .as_str()
            .unwrap()
            .contains("has not joined"),
        "{v}"
    );

    let token = add_host(&s, "h1");
    join(&s, "h1", &token, None);
    // CPUs the host does not have (its facts say 0-7), not this hub's 16.
    let (code, v) = s.call(
        "POST",
        "/api/admin/init_server",
        Some(&init_body("h1", &["6-9"])),
    );
    assert_eq!(code, 422, "{v}");
    assert_eq!(v["detail"][0]["loc"], json!(["body", "cpu_ranges", 0]));
    // Ports beyond the host's ephemeral range start.
    let high = json!({"ip": "192.0.2.20", "region": "eu", "zone": "b", "hostname": "h1",
                      "cpu_ranges": ["0-1"], "port_base": 32000, "ports_per_cpu": 1000})
    .to_string();
    assert_eq!(s.call("POST", "/api/admin/init_server", Some(&high)).0, 422);

    // The host never reports: 504, and the record is gone (the host tears down what it made).
    let (code, v) = s.call(
        "POST",
        "/api/admin/init_server",
        Some(&init_body("h1", &["0-1"])),
    );
    assert_eq!(code, 504, "{v}");
    assert!(
        s.get("/api/admin/servers")
            .1
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x["hostname"] != "h1")
    );

    // The host fails to set it up: 500, record gone.
    std::thread::scope(|sc| {
        let init = sc.spawn(|| {
            s.call(
                "POST",
                "/api/admin/init_server",
                Some(&init_body("h1", &["0-1"])),
            )
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let st = state(&s, "h1", &token);
            if st["server"]["status"] == "INITIALIZING" {
                let report = json!({"as_of": st["as_of"], "version": "0.1.0", "facts": facts(),
                    "server": {"created_at": st["server"]["created_at"], "ok": false, "error": "disk full"},
                    "units": [], "drift": []});
                let (code, _) = s.tcp_call(
                    Some(&token),
                    "POST",
                    "/api/hosts/h1/report",
                    Some(&report.to_string()),
                );
                assert_eq!(code, 200);
                break;
            }
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(30));
        }
        let (code, v) = init.join().unwrap();
        assert_eq!(code, 500, "{v}");
        assert!(v["detail"].as_str().unwrap().contains("disk full"), "{v}");
    });
    assert!(
        s.get("/api/admin/servers")
            .1
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x["hostname"] != "h1")
    );
}

#[test]
fn a_host_that_cannot_be_poked_is_skipped_for_the_next() {
    let s = start("3");
    let poke = poke_listener();
    // h1 sorts first, but nothing listens at its poke URL.
    let t1 = joined_server(&s, "h1", Some(&dead_url()), &["0-1"]);
    let t2 = joined_server(&s, "h2", Some(&poke.url), &["0-1"]);
    pull(&s, "h1", &t1, Answer::Apply); // fresh report: h1 is eligible again
    let (code, u) = allocate_played(&s, "h2", &t2, Answer::Apply);
    assert_eq!(code, 200, "{u}");
    assert_eq!(u["compute_id"], "h2_0-1");
    assert_eq!(
        unit(&s, "h1_0-1")["status"],
        "FREE",
        "h1's claim went back at once"
    );
    let (_, hosts) = s.get("/api/admin/hosts");
    assert!(hosts[0]["unreachable_since"].is_string(), "{hosts}");
    assert!(
        hosts[0]["unreachable_reason"]
            .as_str()
            .unwrap()
            .contains("poke"),
        "{hosts}"
    );
    // Unreachable hosts are not chosen; its next report clears the mark.
    assert_eq!(allocate(&s).0, 409);
    pull(&s, "h1", &t1, Answer::Apply);
    assert!(s.get("/api/admin/hosts").1[0]["unreachable_since"].is_null());
}

#[test]
fn inventory_only_servers_are_explicit_and_picked_only_on_request() {
    let s = start("2");
    s.init(&["0-1"]); // this host's
    let mut body: Value = serde_json::from_str(&init_body("rack9", &["0-1", "2-3"])).unwrap();
    body["inventory_only"] = json!(true);
    let (code, v) = s.call("POST", "/api/admin/init_server", Some(&body.to_string()));
    assert_eq!(code, 200, "{v}");
    let (_, servers) = s.get("/api/admin/servers");
    let r9 = servers
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["hostname"] == "rack9")
        .unwrap()
        .clone();
    assert_eq!(
        (
            r9["status"].clone(),
            r9["inventory_only"].clone(),
            r9["host"].clone()
        ),
        (json!("READY"), json!(true), Value::Null)
    );
    let local = servers
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["hostname"] == HOST)
        .unwrap()
        .clone();
    assert_eq!(local["inventory_only"], false);

    // Without the flag, only this host's unit; then none.
    let (code, u) = allocate(&s);
    assert_eq!((code, u["hostname"].clone()), (200, json!(HOST)), "{u}");
    assert_eq!(allocate(&s).0, 409);
    // With it, only inventory-only units, and nothing is applied anywhere.
    let mut req: Value =
        serde_json::from_str(&alloc_body(json!(2), &ssh_key("t"), Value::Null)).unwrap();
    req["inventory_only"] = json!(true);
    let (code, u) = s.call(
        "POST",
        "/api/compute_units/allocate",
        Some(&req.to_string()),
    );
    assert_eq!(
        (code, u["hostname"].clone(), u["status"].clone()),
        (200, json!("rack9"), json!("ALLOCATED")),
        "{u}"
    );
    assert!(
        u.get("inventory_only").is_none(),
        "unit responses are unchanged"
    );
    req["inventory_only"] = json!("maybe");
    let (code, v) = s.call(
        "POST",
        "/api/compute_units/allocate",
        Some(&req.to_string()),
    );
    assert_eq!(
        (code, v["detail"][0]["loc"].clone()),
        (422, json!(["body", "inventory_only"]))
    );
}

#[test]
fn the_sweep_frees_a_unit_a_killed_hub_left_allocating() {
    let mut s = start("1");
    let token = joined_server(&s, "h1", None, &["0-1"]);
    let socket = s.socket.clone();
    // The allocation waits for a report that never comes; the hub dies mid-wait.
    let waiter = std::thread::spawn(move || {
        let s = std::os::unix::net::UnixStream::connect(&socket);
        if let Ok(mut c) = s {
            let body = alloc_body(json!(2), &ssh_key("t"), Value::Null);
            let _ = write!(
                c,
                "POST /api/compute_units/allocate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let mut out = Vec::new();
            let _ = c.read_to_end(&mut out);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while unit(&s, "h1_0-1")["status"] != "ALLOCATING" {
        assert!(Instant::now() < deadline, "never ALLOCATING");
        std::thread::sleep(Duration::from_millis(20));
    }
    s.kill9();
    let _ = waiter.join();
    s.spawn();
    // Reconcile at start leaves it to the sweep; the sweep frees it after timeout + 5 s.
    assert_eq!(unit(&s, "h1_0-1")["status"], "ALLOCATING");
    wait_status(&s, "h1_0-1", "FREE", Duration::from_secs(20));
    let (_, events) = s.get("/api/events?compute_id=h1_0-1&actor=hub");
    assert!(
        !events.as_array().unwrap().is_empty(),
        "the sweep's move is audited: {events}"
    );
    // The host, pulling later, is asked to own nothing.
    let st = state(&s, "h1", &token);
    assert_eq!(st["server"]["units"][0]["status"], "FREE");
    assert!(st["server"]["units"][0]["claim"].is_null());
}

#[test]
fn the_cli_manages_hosts_and_shows_who_applies_each_server() {
    use std::os::unix::fs::PermissionsExt;
    let s = start("2");
    let out_file = s.dir.path().join("h9.token");
    let out = s.cli(&[
        "host",
        "add",
        "h9",
        "--token-file",
        out_file.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("kh_"),
        "the token is not printed"
    );
    let mode = std::fs::metadata(&out_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let token = std::fs::read_to_string(&out_file)
        .unwrap()
        .trim()
        .to_string();
    join(&s, "h9", &token, None);
    pull(&s, "h9", &token, Answer::Apply);

    let mut body: Value = serde_json::from_str(&init_body("rack9", &["0-1"])).unwrap();
    body["inventory_only"] = json!(true);
    assert_eq!(
        s.call("POST", "/api/admin/init_server", Some(&body.to_string()))
            .0,
        200
    );
    let out = s.cli(&[
        "init-server",
        "--hostname",
        "rack8",
        "--ip",
        "192.0.2.8",
        "--region",
        "eu",
        "--zone",
        "a",
        "0-1",
    ]);
    assert!(
        !out.status.success(),
        "a host that never joined needs --inventory-only"
    );
    let out = s.cli(&[
        "init-server",
        "--inventory-only",
        "--hostname",
        "rack8",
        "--ip",
        "192.0.2.8",
        "--region",
        "eu",
        "--zone",
        "a",
        "0-1",
    ]);
    assert!(out.status.success(), "{out:?}");

    let out = s.cli(&["host", "list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let h9 = text
        .lines()
        .find(|l| l.starts_with("h9"))
        .expect("h9 listed");
    assert!(
        h9.contains("report ")
            && h9.contains("s ago")
            && h9.contains("v0.1.0")
            && h9.contains("drift 1"),
        "{h9}"
    );

    let out = s.cli(&["servers"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let rack9 = text
        .lines()
        .find(|l| l.starts_with("rack9"))
        .expect("rack9 listed");
    assert!(rack9.contains("inventory only"), "{rack9}");

    let key = ssh_key("cli");
    let out = s.cli(&["allocate", "--cpu-count", "2", "--ssh-key", &key]);
    assert!(
        !out.status.success(),
        "no unit without --inventory-only: {out:?}"
    );
    let out = s.cli(&[
        "allocate",
        "--inventory-only",
        "--cpu-count",
        "2",
        "--ssh-key",
        &key,
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("rack8_0-1"));

    let out = s.cli(&["host", "remove", "h9"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        s.tcp_call(Some(&token), "GET", "/api/hosts/h9/state", None)
            .0,
        401
    );
}

/// A second hub on the same inventory: a report that reaches it concludes what the first hub
/// waits for (the waiting hub sees it and answers), and its sweep is as safe as the first's.
#[test]
fn a_report_to_another_hub_concludes_the_wait_of_the_first() {
    let s = start("10");
    let token = joined_server(&s, "h1", None, &["0-1"]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let sock2 = s.dir.path().join("hub2.sock");
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let hub2 = std::process::Command::new(common::bin())
        .args(["serve", "--listen"])
        .arg(&sock2)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--root")
        .arg(s.root())
        .arg("--db")
        .arg(s.db())
        .args(["--templates", "/nonexistent"])
        .arg("--tokens")
        .arg(s.tokens())
        .env("KLOIGOS_LOG", "warn")
        .env("KLOIGOS_APPLY_TIMEOUT", "10")
        .spawn()
        .unwrap();
    let hub2 = KillOnDrop(hub2);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&sock2).is_err() {
        assert!(Instant::now() < deadline, "hub 2 did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The played host talks to hub 2 only.
    let to_hub2 = |method: &str, path: &str, body: Option<&str>| -> (u16, Value) {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let body = body.unwrap_or("");
        write!(
            c,
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut raw = Vec::new();
        c.read_to_end(&mut raw).unwrap();
        common::parse_response(&raw)
    };
    let started = Instant::now();
    let (code, u) = std::thread::scope(|sc| {
        let a = sc.spawn(|| allocate(&s));
        let deadline = Instant::now() + Duration::from_secs(10);
        let st = loop {
            let (code, st) = to_hub2("GET", "/api/hosts/h1/state", None);
            assert_eq!(code, 200, "{st}");
            if st["server"]["units"][0]["status"] == "ALLOCATING" {
                break st;
            }
            assert!(Instant::now() < deadline, "never ALLOCATING");
            std::thread::sleep(Duration::from_millis(30));
        };
        let unit = &st["server"]["units"][0];
        let report = json!({"as_of": st["as_of"], "version": "0.1.0", "facts": facts(),
            "server": {"created_at": st["server"]["created_at"], "ok": true, "error": null},
            "units": [{"compute_id": unit["compute_id"], "claim": unit["claim"], "owned": true,
                       "ok": true, "error": null, "rolled_back": false}], "drift": []});
        let (code, v) = to_hub2("POST", "/api/hosts/h1/report", Some(&report.to_string()));
        assert_eq!(code, 200, "{v}");
        a.join().unwrap()
    });
    drop(hub2);
    assert_eq!(code, 200, "{u}");
    assert_eq!(u["status"], "ALLOCATED");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "hub 1 saw it by polling, not at its timeout"
    );
    // Audited once, as the caller that allocated.
    let (_, events) = s.get("/api/events?compute_id=h1_0-1&operation=allocate");
    let ok: Vec<&Value> = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["result"] == "ok")
        .collect();
    assert_eq!(ok.len(), 1, "{events}");
    assert_eq!(ok[0]["actor"], u["allocated_by"]);
}
