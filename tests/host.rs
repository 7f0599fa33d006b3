//! The host side of the fleet: applying a hub's desired state on a fake root (no HTTP), then
//! `kloigos join`, `kloigos serve` pulling on start and on pokes, and a flood of forged pokes,
//! against a tiny in-test hub serving a state the test controls.

mod common;

use common::{bin, parse_response, write};
use kloigos::fleet::{DesiredHostState, Report};
use kloigos::service::{Config, Kloigos};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const KEY1: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE6npDPLRDfSYzlFjGVwOPiwIAdM3+WhxFH5kEC3SRV0 alice@example";
const KEY2: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBy1ObW1vZ3h0eXZ3c2V5c2V5c2V5c2V5c2V5c2V5c2V5 bob@example";

/// A fake host `h1` with 16 CPUs on two NUMA nodes.
fn fake_root(root: &Path) {
    write(&root.join("etc/hostname"), "h1\n");
    write(&root.join("sys/devices/system/cpu/online"), "0-15\n");
    write(&root.join("sys/devices/system/node/node0/cpulist"), "0-7\n");
    write(
        &root.join("sys/devices/system/node/node1/cpulist"),
        "8-15\n",
    );
    write(
        &root.join("proc/sys/net/ipv4/ip_local_port_range"),
        "32768\t60999\n",
    );
    write(&root.join("etc/skel/.bashrc"), "# skel\n");
}

/// One unit of the hub's state: `owner` is (claim, key) for an ALLOCATED unit.
fn unit(cpus: &str, first: u32, owner: Option<(&str, &str)>) -> Value {
    let port = 2000 + first * 100;
    json!({"compute_id": format!("h1_{cpus}"), "hostname": "h1", "ip": "10.0.0.5",
        "region": "r", "zone": "z", "cpu_range": cpus, "cpu_count": 4, "first_cpu": first,
        "uid": 20000 + first, "user": format!("u{cpus}"),
        "ports_range": format!("{port}-{}", port + 399),
        "status": if owner.is_some() { "ALLOCATED" } else { "FREE" },
        "started_at": owner.map(|_| "2026-11-23T20:00:00Z"),
        "tags": owner.map(|_| json!({"deployment_id": "d1"})),
        "ssh_public_key": owner.map(|o| o.1), "allocated_by": owner.map(|_| "token:a"),
        "updated_at": "t", "problem": null, "claim": owner.map(|o| o.0)})
}

/// The hub's state of h1: a server with units 0-3 (owned by `owner`) and 4-7 (free), or none.
fn state(status: Option<&str>, owner: Option<(&str, &str)>) -> Value {
    let server = status.map(|s| {
        json!({"hostname": "h1", "ip": "10.0.0.5", "region": "r", "zone": "z", "status": s,
            "cpu_ranges": ["0-3", "4-7"], "port_base": 2000, "ports_per_cpu": 100,
            "uid_base": 20000, "limits": {}, "inventory_only": false,
            "created_at": "2026-11-23T19:00:00Z", "updated_at": "2026-11-23T19:00:00Z",
            "units": [unit("0-3", 0, owner), unit("4-7", 4, None)]})
    });
    json!({"hostname": "h1", "as_of": "2026-11-23T20:00:00.123456Z", "server": server})
}

fn apply(k: &Kloigos, s: &Value) -> kloigos::fleet::Applied {
    let s: DesiredHostState = serde_json::from_value(s.clone()).unwrap();
    k.apply_desired(&s).unwrap()
}

fn key_of(root: &Path, user: &str) -> Option<String> {
    std::fs::read_to_string(root.join(format!("home/{user}/.ssh/authorized_keys"))).ok()
}

#[test]
fn applying_a_sequence_of_desired_states() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    fake_root(&root);
    let k = Kloigos::open(&Config {
        db: kloigos::store::DbTarget::Sqlite(tmp.path().join("k.db")),
        root: root.clone(),
        templates: vec![PathBuf::from("/nonexistent")],
        hostname: Some("h1".into()),
        kill_grace: Duration::ZERO,
        host_stale_after: Duration::from_secs(300),
    })
    .unwrap();
    let tmpfiles = root.join("etc/tmpfiles.d/kloigos-c0-3.conf");
    let linger = root.join("var/lib/systemd/linger/u0-3");

    // A new server: every unit set up, nobody's.
    let a = apply(&k, &state(Some("READY"), None));
    let server = a.server.clone().unwrap();
    assert!(server.ok, "{a:?}");
    assert_eq!(server.created_at, "2026-11-23T19:00:00Z");
    assert_eq!(a.units.len(), 2);
    assert!(
        a.units
            .iter()
            .all(|u| u.ok && !u.owned && u.claim.is_none())
    );
    assert!(a.drift.is_empty(), "{a:?}");
    assert!(tmpfiles.exists() && root.join("home/u4-7").is_dir());
    assert!(root.join("var/lib/kloigos/kloigos.nft").exists());
    assert!(key_of(&root, "u0-3").is_none());

    // Claim c1: the owner's key and lingering; the mirror remembers the claim.
    let s1 = state(Some("READY"), Some(("c1", KEY1)));
    let a = apply(&k, &s1);
    let u = &a.units[0];
    assert!(u.ok && u.owned && u.claim.as_deref() == Some("c1"), "{a:?}");
    assert!(!a.units[1].owned);
    assert_eq!(key_of(&root, "u0-3").unwrap().trim(), KEY1);
    assert!(linger.exists());
    let m = k.unit("h1_0-3").unwrap();
    assert_eq!(m.status.to_string(), "ALLOCATED");
    assert_eq!(m.claim.as_deref(), Some("c1"));
    assert_eq!(m.tags, Some(json!({"deployment_id": "d1"})));

    // The same state again changes nothing.
    let before = common::tree(&root);
    let again = apply(&k, &s1);
    assert_eq!(again.units, a.units);
    assert!(again.drift.is_empty(), "{again:?}");
    assert_eq!(common::tree(&root), before);

    // Drift: a removed tmpfiles.d file and key are put back and reported.
    std::fs::remove_file(&tmpfiles).unwrap();
    std::fs::remove_file(root.join("home/u0-3/.ssh/authorized_keys")).unwrap();
    let fixed = apply(&k, &s1);
    assert!(
        fixed.drift.iter().any(|d| d.contains("kloigos-c0-3.conf")),
        "{fixed:?}"
    );
    assert!(
        fixed.drift.iter().any(|d| d.contains("authorized key")),
        "{fixed:?}"
    );
    assert!(tmpfiles.exists());
    assert_eq!(key_of(&root, "u0-3").unwrap().trim(), KEY1);

    // A quick pass (a poke's) applies only what the hub changed: it does not look for drift
    // (the owner stays as applied, nothing is rewritten), the next full pass repairs it.
    let quick = |s: &Value| {
        let s: DesiredHostState = serde_json::from_value(s.clone()).unwrap();
        k.apply_desired_as(&s, kloigos::service::Pass::Quick)
            .unwrap()
    };
    std::fs::remove_file(&tmpfiles).unwrap();
    let q = quick(&s1);
    assert_eq!(q.units, a.units);
    assert!(q.drift.is_empty(), "{q:?}");
    assert!(!tmpfiles.exists(), "a quick pass looked for drift");
    let fixed = apply(&k, &s1);
    assert!(
        fixed.drift.iter().any(|d| d.contains("kloigos-c0-3.conf")),
        "{fixed:?}"
    );
    // ... but what the hub changed, it applies: unit 4-7 for bob, and back.
    let mut s1b = s1.clone();
    s1b["server"]["units"][1] = unit("4-7", 4, Some(("c9", KEY2)));
    let q = quick(&s1b);
    assert!(q.units[1].ok && q.units[1].owned, "{q:?}");
    assert_eq!(key_of(&root, "u4-7").unwrap().trim(), KEY2);
    let q = quick(&s1);
    assert!(q.units[1].ok && !q.units[1].owned, "{q:?}");
    assert!(key_of(&root, "u4-7").is_none());

    // Claim c2 on the same unit: the first owner's files are gone, the new key is there.
    write(&root.join("home/u0-3/secret"), "alice's\n");
    write(&root.join("opt/c0-3/data"), "alice's\n");
    let a = apply(&k, &state(Some("READY"), Some(("c2", KEY2))));
    assert!(a.units[0].owned && a.units[0].claim.as_deref() == Some("c2"));
    assert!(!root.join("home/u0-3/secret").exists());
    assert!(!root.join("opt/c0-3/data").exists());
    assert_eq!(key_of(&root, "u0-3").unwrap().trim(), KEY2);
    assert_eq!(k.unit("h1_0-3").unwrap().claim.as_deref(), Some("c2"));
    write(&root.join("home/u0-3/secret"), "bob's\n");

    // Changed limits: the drop-ins follow, the owner keeps the unit and its files.
    let mut limited = state(Some("READY"), Some(("c2", KEY2)));
    limited["server"]["limits"] = json!({"tasks_max": 512});
    let a = apply(&k, &limited);
    assert!(a.units[0].ok && a.units[0].owned, "{a:?}");
    assert!(a.drift.is_empty(), "{a:?}");
    let slice = root.join("run/systemd/generator/user-20000.slice.d/50-kloigos.conf");
    assert!(
        std::fs::read_to_string(&slice)
            .unwrap()
            .contains("TasksMax=512")
    );
    assert!(root.join("home/u0-3/secret").exists());
    assert_eq!(key_of(&root, "u0-3").unwrap().trim(), KEY2);
    assert!(linger.exists());
    let m = k.unit("h1_0-3").unwrap();
    assert_eq!(
        (m.status.to_string(), m.claim.as_deref()),
        ("ALLOCATED".into(), Some("c2"))
    );
    let before = common::tree(&root);
    assert!(apply(&k, &limited).drift.is_empty());
    assert_eq!(common::tree(&root), before);

    // A unit that cannot be given (its key path is a directory) fails alone and is rolled
    // back; the other unit keeps its owner.
    std::fs::create_dir_all(root.join("home/u4-7/.ssh/authorized_keys")).unwrap();
    let mut s3 = state(Some("READY"), Some(("c2", KEY2)));
    s3["server"]["units"][1] = unit("4-7", 4, Some(("c3", KEY1)));
    let a = apply(&k, &s3);
    let bad = &a.units[1];
    assert!(!bad.ok && !bad.owned && bad.rolled_back, "{a:?}");
    assert_eq!(bad.claim.as_deref(), Some("c3"));
    assert!(
        bad.error
            .as_deref()
            .is_some_and(|e| e.contains("allocation of h1_4-7 failed")),
        "{a:?}"
    );
    assert!(a.units[0].ok && a.units[0].owned);
    assert_eq!(k.unit("h1_4-7").unwrap().status.to_string(), "FREE");
    assert!(!root.join("var/lib/systemd/linger/u4-7").exists());

    // Free: nobody's again.
    let a = apply(&k, &state(Some("READY"), None));
    assert!(
        a.units
            .iter()
            .all(|u| u.ok && !u.owned && u.claim.is_none())
    );
    assert!(key_of(&root, "u0-3").is_none());
    assert!(!linger.exists());
    let m = k.unit("h1_0-3").unwrap();
    assert_eq!(m.status.to_string(), "FREE");
    assert_eq!(m.claim, None);

    // Decommissioning: everything torn down, the mirror's server gone.
    let a = apply(&k, &state(Some("DECOMMISSIONING"), None));
    assert_eq!(a.server, None);
    assert!(a.units.is_empty());
    assert!(!tmpfiles.exists());
    assert!(!root.join("home/u0-3").exists() && !root.join("opt/c4-7").exists());
    assert!(!root.join("var/lib/kloigos/kloigos.nft").exists());
    assert!(!root.join("etc/kloigos/host.json").exists());
    assert!(k.units(&Default::default()).unwrap().is_empty());
    // And again: nothing to do.
    let a = apply(&k, &state(None, None));
    assert_eq!(a, kloigos::fleet::Applied::default());
}

#[test]
fn a_state_for_another_host_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    fake_root(&root);
    let k = Kloigos::open(&Config {
        db: kloigos::store::DbTarget::Sqlite(tmp.path().join("k.db")),
        root: root.clone(),
        templates: vec![PathBuf::from("/nonexistent")],
        hostname: Some("h2".into()),
        kill_grace: Duration::ZERO,
        host_stale_after: Duration::from_secs(300),
    })
    .unwrap();
    let s: DesiredHostState = serde_json::from_value(state(Some("READY"), None)).unwrap();
    assert!(k.apply_desired(&s).is_err());
    assert!(!root.join("etc/tmpfiles.d").exists());
}

// ---- over HTTP, with a tiny hub ------------------------------------------------------------

#[derive(Default)]
struct Hub {
    state: Value,
    joins: Vec<Value>,
    reports: Vec<Report>,
    gets: usize,
    auth: Vec<String>,
}

type Shared = Arc<Mutex<Hub>>;

/// The hub's three endpoints for host h1, on 127.0.0.1; returns its port.
fn start_hub(hub: Shared) -> u16 {
    use axum::routing::{get, post};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let auth = |h: &axum::http::HeaderMap| {
        h.get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let (h1, h2, h3) = (hub.clone(), hub.clone(), hub);
    let app = axum::Router::new()
        .route(
            "/api/hosts/h1/join",
            post(
                move |headers: axum::http::HeaderMap, axum::Json(v): axum::Json<Value>| async move {
                    let mut h = h1.lock().unwrap();
                    h.auth.push(auth(&headers));
                    h.joins.push(v);
                    axum::Json(json!({"hostname": "h1"}))
                },
            ),
        )
        .route(
            "/api/hosts/h1/state",
            get(move |headers: axum::http::HeaderMap| async move {
                let mut h = h2.lock().unwrap();
                h.auth.push(auth(&headers));
                h.gets += 1;
                axum::Json(h.state.clone())
            }),
        )
        .route(
            "/api/hosts/h1/report",
            post(move |axum::Json(r): axum::Json<Report>| async move {
                h3.lock().unwrap().reports.push(r);
                axum::Json(json!({}))
            }),
        );
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(l, app).await.unwrap();
        });
    });
    port
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A raw POST over TCP with the given Host header.
fn post_tcp(port: u16, path: &str, host: &str) -> (u16, Value) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    parse_response(&raw)
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A fake root `h1` with its inventory, an in-test hub serving `state`, and a host token.
struct Fixture {
    tmp: tempfile::TempDir,
    root: PathBuf,
    db: PathBuf,
    hub: Shared,
    hub_port: u16,
    token_file: PathBuf,
}

impl Fixture {
    fn new(state: Value) -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        fake_root(&root);
        let hub: Shared = Arc::default();
        hub.lock().unwrap().state = state;
        let hub_port = start_hub(hub.clone());
        let token_file = tmp.path().join("token");
        write(&token_file, "kh_secret\n");
        Fixture {
            db: tmp.path().join("k.db"),
            tmp,
            root,
            hub,
            hub_port,
            token_file,
        }
    }
}

/// `kloigos CMD` on the fake root and inventory.
fn kloigos_on(root: &Path, db: &Path, cmd: &str) -> std::process::Command {
    let mut c = std::process::Command::new(bin());
    c.arg(cmd)
        .arg("--root")
        .arg(root)
        .arg("--db")
        .arg(db)
        .args(["--templates", "/nonexistent"])
        .env("KLOIGOS_LOG", "warn");
    c
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn join_then_serve_pulls_on_start_and_on_pokes() {
    let Fixture {
        tmp,
        root,
        db,
        hub,
        hub_port,
        token_file,
    } = Fixture::new(state(Some("READY"), None));
    let port = free_port();
    let local = |cmd: &str| kloigos_on(&root, &db, cmd);

    // join: facts sent with the token, files written, one pull done.
    let out = local("join")
        .args(["--hub", &format!("http://127.0.0.1:{hub_port}")])
        .arg("--token-file")
        .arg(&token_file)
        .args([
            "--poke-url",
            &format!("http://127.0.0.1:{port}/api/host/poke"),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    {
        let h = hub.lock().unwrap();
        assert_eq!(h.joins.len(), 1);
        assert_eq!(h.joins[0]["facts"]["cpus_online"], "0-15");
        assert_eq!(h.joins[0]["facts"]["numa_nodes"]["1"], "8-15");
        assert_eq!(
            h.joins[0]["poke_url"],
            format!("http://127.0.0.1:{port}/api/host/poke")
        );
        assert!(
            h.auth.iter().all(|a| a == "Bearer kh_secret"),
            "{:?}",
            h.auth
        );
        assert_eq!(h.reports.len(), 1);
        assert!(h.reports[0].server.as_ref().unwrap().ok);
    }
    let join: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("etc/kloigos/join.json")).unwrap())
            .unwrap();
    assert_eq!(join["hostname"], "h1");
    assert_eq!(
        join["hubs"],
        json!([format!("http://127.0.0.1:{hub_port}")])
    );
    use std::os::unix::fs::PermissionsExt;
    let tok = root.join("etc/kloigos/host-token");
    assert_eq!(
        std::fs::metadata(&tok).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(root.join("etc/tmpfiles.d/kloigos-c0-3.conf").exists());

    // serve: pulls once after the start-up reconcile.
    hub.lock().unwrap().state = state(Some("READY"), Some(("c1", KEY1)));
    let sock = tmp.path().join("k.sock");
    let _serve = Child(
        local("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--listen")
            .arg(&sock)
            .arg("--tokens")
            .arg(tmp.path().join("tokens"))
            .env("KLOIGOS_PULL_MIN_INTERVAL", "0.25")
            .spawn()
            .unwrap(),
    );
    wait_for("the pull on start", || {
        hub.lock().unwrap().reports.len() >= 2
    });
    let r = hub.lock().unwrap().reports[1].clone();
    assert!(
        r.units[0].owned && r.units[0].claim.as_deref() == Some("c1"),
        "{r:?}"
    );
    assert_eq!(key_of(&root, "u0-3").unwrap().trim(), KEY1);
    wait_for("the socket", || sock.exists());

    // Local writes are refused: the hubs decide.
    let (code, v) = common::http(
        &sock,
        "DELETE",
        "/api/compute_units/deallocate/h1_0-3",
        None,
    );
    assert_eq!(code, 409, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("use a hub"), "{v}");
    // Reads work on the mirror.
    let (code, v) = common::http(&sock, "GET", "/api/compute_units/h1_0-3", None);
    assert_eq!((code, v["status"].clone()), (200, json!("ALLOCATED")));

    // A poke (from anywhere, any Host) makes it pull the new state and report.
    hub.lock().unwrap().state = state(Some("READY"), None);
    let (code, v) = post_tcp(port, "/api/host/poke", "evil.example");
    assert_eq!((code, v), (202, json!({"detail": "pull scheduled"})));
    wait_for("the pull after the poke", || {
        hub.lock().unwrap().reports.len() >= 3
    });
    let r = hub.lock().unwrap().reports[2].clone();
    assert!(r.units.iter().all(|u| u.ok && !u.owned), "{r:?}");
    assert!(key_of(&root, "u0-3").is_none());

    // A flood of forged pokes costs bounded work: a burst of 10 pulls (which the service had
    // time to earn back), then pulls at least 0.25 s apart.
    std::thread::sleep(Duration::from_millis(2600));
    let gets_before = hub.lock().unwrap().gets;
    let started = Instant::now();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
                for _ in 0..50 {
                    let (code, _) = post_tcp(port, "/api/host/poke", "localhost");
                    assert!(code == 202 || code == 503, "{code}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let flood = started.elapsed();
    std::thread::sleep(Duration::from_millis(800));
    let pulls = hub.lock().unwrap().gets - gets_before;
    let bound = 10 + 2 + (flood.as_secs_f64() / 0.25).ceil() as usize + 4;
    eprintln!("{pulls} pulls for 400 pokes in {flood:?} (bound {bound})");
    assert!(
        pulls >= 1 && pulls <= bound,
        "{pulls} pulls for 400 pokes in {flood:?} (at most {bound})"
    );

    // The service is still there, and the next poke still pulls.
    hub.lock().unwrap().state = state(Some("READY"), Some(("c2", KEY2)));
    let n = hub.lock().unwrap().reports.len();
    assert_eq!(post_tcp(port, "/api/host/poke", "localhost").0, 202);
    wait_for("the pull after the flood", || {
        hub.lock().unwrap().reports.len() > n
    });
    wait_for("the new owner's key", || {
        key_of(&root, "u0-3").is_some_and(|k| k.trim() == KEY2)
    });
}

#[test]
fn a_host_that_has_not_joined_answers_a_poke_with_404() {
    let s = common::Server::start();
    let (code, v) = s.call("POST", "/api/host/poke", None);
    assert_eq!(
        (code, v),
        (404, json!({"detail": "this host has not joined a hub"}))
    );
    // And its own writes are not refused.
    s.init(&["0-3"]);
}

/// An idle exit (socket activation) waits for the pull under way: its report reaches the hub
/// although the idle timeout passed while the pull waited before reporting.
/// Needs the `test-hooks` feature: the wait before the report is KLOIGOS_TEST_PAUSE.
#[cfg(feature = "test-hooks")]
#[test]
fn an_idle_exit_waits_for_the_pull_under_way() {
    let Fixture {
        tmp: _tmp,
        root,
        db,
        hub,
        hub_port,
        token_file,
    } = Fixture::new(state(Some("READY"), None));
    let port = free_port();
    let local = |cmd: &str| kloigos_on(&root, &db, cmd);
    let out = local("join")
        .args(["--hub", &format!("http://127.0.0.1:{hub_port}")])
        .arg("--token-file")
        .arg(&token_file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(hub.lock().unwrap().reports.len(), 1);

    // The start-up pull waits 3 s before its report; the service is idle after 1 s.
    hub.lock().unwrap().state = state(Some("READY"), Some(("c1", KEY1)));
    let started = Instant::now();
    let mut serve = local("serve")
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .args(["--idle-timeout", "1"])
        .env("KLOIGOS_TEST_PAUSE", "report:3")
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(s) = serve.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = serve.kill();
            panic!("the service did not exit by itself");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "exited after {:?}, before the pull reported",
        started.elapsed()
    );
    let h = hub.lock().unwrap();
    assert_eq!(h.reports.len(), 2, "the start-up pull's report was lost");
    assert!(h.reports[1].units[0].owned, "{:?}", h.reports[1]);
}

/// `kloigos leave`: refused while the hub has a server for the host; after the hub dropped
/// it, the last pull tears it down and the host is standalone; `--force` keeps what the host
/// applied as its own, and its local writes work again.
#[test]
fn leaving_the_hub() {
    let Fixture {
        tmp,
        root,
        db,
        hub,
        hub_port,
        token_file,
    } = Fixture::new(state(Some("READY"), Some(("c1", KEY1))));
    let local = |cmd: &str| kloigos_on(&root, &db, cmd);
    let joined = || root.join("etc/kloigos/join.json").exists();
    let token = root.join("etc/kloigos/host-token");
    let join = || {
        let out = local("join")
            .args(["--hub", &format!("http://127.0.0.1:{hub_port}")])
            .arg("--token-file")
            .arg(&token_file)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    };

    let out = local("leave").output().unwrap();
    assert!(!out.status.success(), "not joined: {out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("has not joined"));

    join();
    assert_eq!(key_of(&root, "u0-3").unwrap().trim(), KEY1);
    // The hub still has the server: refused, nothing changed.
    let out = local("leave").output().unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("decommission it through the hub"),
        "{out:?}"
    );
    assert!(joined() && token.exists());

    // The hub dropped it: the last pull tears it down and reports, then the host leaves.
    hub.lock().unwrap().state = state(None, None);
    let reports = hub.lock().unwrap().reports.len();
    let out = local("leave").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("kloigos host remove h1"),
        "{out:?}"
    );
    assert!(!joined() && !token.exists());
    assert_eq!(hub.lock().unwrap().reports.len(), reports + 1);
    assert!(hub.lock().unwrap().reports[reports].server.is_none());
    assert!(!root.join("etc/tmpfiles.d/kloigos-c0-3.conf").exists());
    assert!(key_of(&root, "u0-3").is_none());
    assert!(!local("pull").output().unwrap().status.success());

    // Joined again, owner c1; the hub is down: --force keeps the server as the host's own.
    hub.lock().unwrap().state = state(Some("READY"), Some(("c1", KEY1)));
    join();
    let dead = free_port();
    let join_file = root.join("etc/kloigos/join.json");
    let text = std::fs::read_to_string(&join_file).unwrap();
    std::fs::write(
        &join_file,
        text.replace(&format!(":{hub_port}"), &format!(":{dead}")),
    )
    .unwrap();
    let out = local("leave").output().unwrap();
    assert!(!out.status.success(), "hub down: {out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    assert!(joined());
    let out = std::process::Command::new(bin())
        .args(["--json", "leave", "--force", "--root"])
        .arg(&root)
        .arg("--db")
        .arg(&db)
        .args(["--templates", "/nonexistent"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["server_kept"], "h1", "{v}");
    assert!(!joined() && !token.exists());
    // Standalone: reconcile is quiet, the owner keeps the unit, and a local deallocate works.
    let out = local("reconcile").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(key_of(&root, "u0-3").unwrap().trim(), KEY1);
    let sock = tmp.path().join("k.sock");
    let _serve = Child(
        local("serve")
            .arg("--listen")
            .arg(&sock)
            .arg("--tokens")
            .arg(tmp.path().join("tokens"))
            .spawn()
            .unwrap(),
    );
    wait_for("the service", || sock.exists());
    let (code, v) = common::http(
        &sock,
        "DELETE",
        "/api/compute_units/deallocate/h1_0-3",
        None,
    );
    assert_eq!(code, 200, "{v}");
    assert!(key_of(&root, "u0-3").is_none());
}
