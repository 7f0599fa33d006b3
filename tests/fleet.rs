//! A fleet on loopback: one PostgreSQL, two hubs (`kloigos serve --db postgres://...`) and five
//! hosts, each a `kloigos serve` with its own fake root, hostname, socket and TCP port, joined to
//! both hubs. Everything is real processes talking HTTP; nothing is mocked.
//!
//! Needs root (fake roots must be root-owned) and the PostgreSQL cluster that scripts/test.sh
//! starts (`KLOIGOS_TEST_PG`); without them it skips, unless KLOIGOS_REQUIRE_PRIVILEGED=1.

mod common;

use common::{PgDb, bin, ssh_key, write};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const HOSTS: usize = 5;
const UNITS_PER_HOST: usize = 20;
/// How long hubs wait for a host: long enough for 200 concurrent allocations on a slow
/// machine, short enough to test timeouts.
const APPLY_TIMEOUT: &str = "15";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// One HTTP/1.1 request over TCP; `(0, detail)` when the connection fails.
fn call(
    port: u16,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, json!("connection refused"));
    };
    s.set_read_timeout(Some(Duration::from_secs(90))).ok();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(req.as_bytes()).is_err() {
        return (0, json!("send failed"));
    }
    let mut raw = Vec::new();
    if s.read_to_end(&mut raw).is_err() || raw.is_empty() {
        return (0, json!("no answer"));
    }
    common::parse_response(&raw)
}

/// A `kloigos serve` process we can kill, freeze and restart.
struct Proc {
    name: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    port: u16,
    child: Option<Child>,
}

impl Proc {
    fn spawn(&mut self) {
        let mut cmd = Command::new(bin());
        cmd.args(&self.args)
            .env("KLOIGOS_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("spawn kloigos serve"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "{} did not come up", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Some(c) = &self.child {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig).expect("signal");
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
        self.kill9();
    }
}

struct Host {
    name: String,
    root: PathBuf,
    proc: Proc,
}

/// Dropped in field order: the processes first, then their files and the database.
struct Fleet {
    hubs: Vec<Proc>,
    hosts: Vec<Host>,
    admin: String,
    dir: tempfile::TempDir,
    _db: PgDb,
}

impl Fleet {
    fn hub(&self, i: usize) -> u16 {
        self.hubs[i % self.hubs.len()].port
    }
    fn admin(&self, i: usize, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        call(self.hub(i), Some(&self.admin), method, path, body)
    }
    fn unit(&self, id: &str) -> Value {
        let (code, v) = self.admin(1, "GET", &format!("/api/compute_units/{id}"), None);
        assert_eq!(code, 200, "{v}");
        v
    }
    fn units(&self, query: &str) -> Vec<Value> {
        // Hub 1 is the one that is never killed.
        let (code, v) = self.admin(1, "GET", &format!("/api/compute_units/?{query}"), None);
        assert_eq!(code, 200, "{v}");
        v.as_array().cloned().unwrap_or_default()
    }
    fn host_of(&self, hostname: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == hostname)
            .expect("host")
    }
}

/// Polls `ok` every 200 ms for up to `secs` seconds.
fn wait_for(secs: u64, mut ok: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if ok() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// How many units of a host's root have an authorized key.
fn keys_on(root: &Path) -> usize {
    std::fs::read_dir(root.join("home"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().join(".ssh/authorized_keys").exists())
                .count()
        })
        .unwrap_or(0)
}

/// The authorized key of unit `user` on a host's root, if any.
fn key_on(root: &Path, user: &str) -> Option<String> {
    std::fs::read_to_string(root.join(format!("home/{user}/.ssh/authorized_keys"))).ok()
}

fn fake_root(root: &Path, hostname: &str) {
    write(&root.join("etc/hostname"), &format!("{hostname}\n"));
    write(&root.join("sys/devices/system/cpu/online"), "0-19\n");
    write(
        &root.join("sys/devices/system/node/node0/cpulist"),
        "0-19\n",
    );
    write(
        &root.join("proc/sys/net/ipv4/ip_local_port_range"),
        "32768\t60999\n",
    );
    write(&root.join("etc/skel/.bashrc"), "# skel\n");
}

/// `pg_ctl start|stop` on the test cluster (scripts/lib/pg.sh).
fn pg_ctl(action: &str) {
    let ctl =
        std::env::var("KLOIGOS_TEST_PG_CTL").expect("KLOIGOS_TEST_PG_CTL (scripts/lib/pg.sh)");
    let mut words = ctl.split_whitespace();
    let mut cmd = Command::new(words.next().expect("pg_ctl command"));
    cmd.args(words).arg(action).args(["-w", "-t", "30"]);
    if action == "stop" {
        cmd.args(["-m", "fast"]);
    }
    let out = cmd.output().expect("run pg_ctl");
    assert!(out.status.success(), "pg_ctl {action}: {out:?}");
}

/// Every file of a host's root but its inputs (fake sysfs/procfs) and its lock files.
fn snapshot(root: &Path) -> std::collections::BTreeMap<String, String> {
    common::tree(root)
        .into_iter()
        .filter(|(p, _)| {
            !p.starts_with("sys/") && !p.starts_with("proc/") && !p.starts_with("run/")
        })
        .collect()
}

/// The hub's record of a host (`GET /api/admin/hosts`).
fn host_record(f: &Fleet, name: &str) -> Value {
    let (code, hosts) = f.admin(1, "GET", "/api/admin/hosts", None);
    assert_eq!(code, 200, "{hosts}");
    hosts
        .as_array()
        .and_then(|a| a.iter().find(|h| h["hostname"] == name))
        .cloned()
        .unwrap_or_else(|| panic!("{name} not in {hosts}"))
}

fn start() -> Option<Fleet> {
    if !common::privileged(&[]) {
        return None;
    }
    let pg = PgDb::fresh()?;
    let db = pg.url();
    let dir = tempfile::tempdir().expect("tempdir");
    let tokens = dir.path().join("tokens");
    let out = Command::new(bin())
        .args(["token", "--tokens"])
        .arg(&tokens)
        .args(["create", "--name", "admin", "--role", "admin"])
        .output()
        .expect("kloigos token create");
    assert!(out.status.success(), "{out:?}");
    let admin = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let mut hubs = Vec::new();
    for i in 0..2 {
        let root = dir.path().join(format!("hub{i}"));
        fake_root(&root, &format!("hub{i}"));
        let port = free_port();
        let mut p = Proc {
            name: format!("hub{i}"),
            args: vec![
                "serve".into(),
                "--db".into(),
                db.clone(),
                "--root".into(),
                root.display().to_string(),
                "--hostname".into(),
                format!("hub{i}"),
                "--templates".into(),
                "/nonexistent".into(),
                "--tokens".into(),
                tokens.display().to_string(),
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--listen".into(),
                dir.path()
                    .join(format!("hub{i}.sock"))
                    .display()
                    .to_string(),
                "--apply-timeout".into(),
                APPLY_TIMEOUT.into(),
                "--host-stale-after".into(),
                "60".into(),
            ],
            env: vec![],
            port,
            child: None,
        };
        p.spawn();
        hubs.push(p);
    }
    let mut fleet = Fleet {
        hubs,
        hosts: Vec::new(),
        admin,
        dir,
        _db: pg,
    };
    let dir = fleet.dir.path().to_path_buf();
    for i in 0..HOSTS {
        let name = format!("node{i}");
        let root = dir.join(&name).join("root");
        fake_root(&root, &name);
        let db = dir.join(&name).join("kloigos.db");
        let port = free_port();
        // The hub makes the token; the host keeps it in a file only root reads.
        let (code, v) = fleet.admin(
            i,
            "POST",
            "/api/admin/hosts",
            Some(&json!({"hostname": name})),
        );
        assert_eq!(code, 201, "{v}");
        let token_file = dir.join(&name).join("token");
        write(&token_file, v["token"].as_str().expect("token"));
        let mut proc = Proc {
            name: name.clone(),
            args: vec![
                "serve".into(),
                "--root".into(),
                root.display().to_string(),
                "--db".into(),
                db.display().to_string(),
                "--hostname".into(),
                name.clone(),
                "--templates".into(),
                "/nonexistent".into(),
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--listen".into(),
                dir.join(&name).join("kloigos.sock").display().to_string(),
                "--pull-interval".into(),
                "30".into(),
            ],
            env: vec![],
            port,
            child: None,
        };
        let out = Command::new(bin())
            .args(["join", "--hub"])
            .arg(format!("http://127.0.0.1:{}", fleet.hub(0)))
            .arg("--hub")
            .arg(format!("http://127.0.0.1:{}", fleet.hub(1)))
            .arg("--token-file")
            .arg(&token_file)
            .args([
                "--poke-url",
                &format!("http://127.0.0.1:{port}/api/host/poke"),
            ])
            .arg("--root")
            .arg(&root)
            .arg("--db")
            .arg(&db)
            .args(["--hostname", &name, "--templates", "/nonexistent"])
            .output()
            .expect("kloigos join");
        assert!(out.status.success(), "join {name}: {out:?}");
        // The service learns it is joined when it starts (on a host, `join` restarts it).
        proc.spawn();
        fleet.hosts.push(Host {
            name: name.clone(),
            root,
            proc,
        });
        // Single CPUs: 20 units per host, 100 in all. Each host is its own zone.
        let ranges: Vec<String> = (0..UNITS_PER_HOST).map(|c| c.to_string()).collect();
        let body = json!({"hostname": name, "ip": "127.0.0.1", "region": "loop",
            "zone": format!("z{i}"), "cpu_ranges": ranges, "ports_per_cpu": 10});
        let (code, v) = fleet.admin(i + 1, "POST", "/api/admin/init_server", Some(&body));
        assert_eq!(code, 200, "init_server {name}: {v}");
    }
    Some(fleet)
}

fn dir_of(f: &Fleet, host: &str) -> PathBuf {
    f.dir.path().join(host)
}

/// `POST /api/compute_units/allocate` (upstream requires `tags`: empty unless given).
fn allocate(f: &Fleet, hub: usize, body: &Value) -> (u16, Value) {
    let mut body = body.clone();
    if body.get("tags").is_none() {
        body["tags"] = json!({});
    }
    f.admin(hub, "POST", "/api/compute_units/allocate", Some(&body))
}

#[test]
fn a_fleet_on_loopback() {
    let Some(mut f) = start() else { return };
    let t0 = Instant::now();

    // Every host set up its own units, and only its own.
    for h in &f.hosts {
        let state =
            std::fs::read_to_string(h.root.join("etc/kloigos/host.json")).expect("host.json");
        let state: Value = serde_json::from_str(&state).expect("json");
        assert_eq!(
            state["units"].as_array().map(Vec::len),
            Some(UNITS_PER_HOST),
            "{}",
            h.name
        );
        assert!(state.to_string().contains(&format!("{}_0", h.name)));
        for o in f.hosts.iter().filter(|o| o.name != h.name) {
            assert!(
                !state.to_string().contains(&format!("\"{}_", o.name)),
                "{} has {}'s units",
                h.name,
                o.name
            );
        }
    }

    // 1. An allocation lands on the right host's root only.
    let key = ssh_key("one");
    let (code, u) = allocate(
        &f,
        1,
        &json!({"cpu_count": 1, "zone": "z3", "ssh_public_key": key}),
    );
    assert_eq!(code, 200, "{u}");
    assert_eq!(u["hostname"], "node3");
    let user = format!("u{}", u["cpu_range"].as_str().expect("cpu_range"));
    for h in &f.hosts {
        let k = key_on(&h.root, &user);
        if h.name == "node3" {
            assert!(k.is_some_and(|k| k.contains(&key)), "node3 lacks the key");
        } else {
            assert!(k.is_none(), "{} has node3's unit key", h.name);
        }
    }
    let id = u["compute_id"].as_str().expect("id").to_string();
    let (code, v) = f.admin(
        0,
        "DELETE",
        &format!("/api/compute_units/deallocate/{id}"),
        None,
    );
    assert_eq!(code, 200, "{v}");
    assert!(
        key_on(&f.host_of("node3").root, &user).is_none(),
        "key left after deallocate"
    );
    assert_eq!(f.unit(&id)["status"], "FREE");
    eprintln!("fleet: placement checked after {:?}", t0.elapsed());

    // 2. 200 concurrent allocations over both hubs for 100 free units: exactly 100 succeed,
    //    all distinct; the others are told there is no capacity.
    let t = Instant::now();
    let results: Vec<(u16, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..200)
            .map(|i| {
                let f = &f;
                s.spawn(move || {
                    allocate(
                        f,
                        i,
                        &json!({"cpu_count": 1, "ssh_public_key": ssh_key(&format!("c{i}"))}),
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    let ok: Vec<&Value> = results
        .iter()
        .filter(|(c, _)| *c == 200)
        .map(|(_, v)| v)
        .collect();
    let ids: BTreeSet<&str> = ok.iter().filter_map(|v| v["compute_id"].as_str()).collect();
    let others: Vec<&(u16, Value)> = results.iter().filter(|(c, _)| *c != 200).collect();
    assert_eq!(
        ok.len(),
        100,
        "successes; failures: {:?}",
        others.iter().take(5).collect::<Vec<_>>()
    );
    assert_eq!(ids.len(), 100, "distinct units");
    assert!(
        others.iter().all(|(c, _)| *c == 409),
        "{:?}",
        others.iter().find(|(c, _)| *c != 409)
    );
    eprintln!("fleet: 200 concurrent allocations in {:?}", t.elapsed());
    // Each unit's key is on its own host, and the hub says ALLOCATED.
    for v in &ok {
        let host = f.host_of(v["hostname"].as_str().expect("hostname"));
        let user = format!("u{}", v["cpu_range"].as_str().expect("range"));
        assert!(
            key_on(&host.root, &user).is_some(),
            "{} missing on {}",
            v["compute_id"],
            host.name
        );
    }
    assert_eq!(f.units("status=ALLOCATED").len(), 100);
    // Give them all back, concurrently, through both hubs.
    let codes: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let f = &f;
                s.spawn(move || {
                    f.admin(
                        i,
                        "DELETE",
                        &format!("/api/compute_units/deallocate/{id}"),
                        None,
                    )
                    .0
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    assert!(codes.iter().all(|c| *c == 200), "{codes:?}");
    assert_eq!(f.units("status=FREE").len(), HOSTS * UNITS_PER_HOST);
    for h in &f.hosts {
        let keys = std::fs::read_dir(h.root.join("home"))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().join(".ssh/authorized_keys").exists())
                    .count()
            })
            .unwrap_or(0);
        assert_eq!(keys, 0, "{} still has keys", h.name);
    }

    // 3. A host that stops answering: allocations avoid it, what was claimed on it rolls back,
    //    the others are unaffected; when it comes back it pulls and converges.
    f.hosts[2].proc.kill9();
    let (code, v) = allocate(
        &f,
        0,
        &json!({"cpu_count": 1, "zone": "z2", "ssh_public_key": ssh_key("down")}),
    );
    // The unit claimed on it went back, and no other host has z2: 503, naming the host.
    assert_eq!(
        code, 503,
        "nothing to allocate in z2 while node2 is down: {v}"
    );
    assert!(
        v["detail"].as_str().is_some_and(|d| d.contains("node2")),
        "{v}"
    );
    assert!(
        f.units("zone=z2&status=FREE").len() == UNITS_PER_HOST,
        "claimed z2 unit rolled back"
    );
    let (code, v) = allocate(
        &f,
        1,
        &json!({"cpu_count": 1, "ssh_public_key": ssh_key("elsewhere")}),
    );
    assert_eq!(code, 200, "{v}");
    assert_ne!(v["hostname"], "node2");
    let elsewhere = v["compute_id"].as_str().expect("id").to_string();
    let (code, hosts) = f.admin(1, "GET", "/api/admin/hosts", None);
    assert_eq!(code, 200, "{hosts}");
    let node2 = hosts
        .as_array()
        .and_then(|a| a.iter().find(|h| h["hostname"] == "node2"))
        .cloned()
        .expect("node2");
    assert!(
        !node2["unreachable_since"].is_null(),
        "node2 is shown unreachable: {node2}"
    );
    // Back up: the host pulls at start and reports, and is chosen again.
    f.hosts[2].proc.spawn();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, v) = allocate(
            &f,
            0,
            &json!({"cpu_count": 1, "zone": "z2", "ssh_public_key": ssh_key("back")}),
        );
        if code == 200 {
            assert_eq!(v["hostname"], "node2");
            let user = format!("u{}", v["cpu_range"].as_str().expect("range"));
            assert!(key_on(&f.hosts[2].root, &user).is_some());
            let id = v["compute_id"].as_str().expect("id");
            assert_eq!(
                f.admin(
                    0,
                    "DELETE",
                    &format!("/api/compute_units/deallocate/{id}"),
                    None
                )
                .0,
                200
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node2 never came back: {code} {v}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(
        f.admin(
            0,
            "DELETE",
            &format!("/api/compute_units/deallocate/{elsewhere}"),
            None
        )
        .0,
        200
    );

    // 4. A host that stops answering pokes (frozen): the caller gets 503 naming it, the unit is
    //    FREE again, and the thawed host owns nothing.
    f.hosts[4].proc.signal(nix::sys::signal::Signal::SIGSTOP);
    let (code, v) = allocate(
        &f,
        1,
        &json!({"cpu_count": 1, "zone": "z4", "ssh_public_key": ssh_key("frozen")}),
    );
    assert_eq!(code, 503, "frozen host: {v}");
    assert_eq!(f.units("zone=z4&status=FREE").len(), UNITS_PER_HOST);
    f.hosts[4].proc.signal(nix::sys::signal::Signal::SIGCONT);
    assert!(
        wait_for(20, || keys_on(&f.hosts[4].root) == 0),
        "node4 kept a key of a released claim"
    );

    // 4b. A host that applies the claim but reports too late (it pauses 18 s before its
    //     report; the hubs wait 15 s): 504, the unit is FREE, and the host undoes what it applied.
    let reported = host_record(&f, "node4")["last_report_at"].clone();
    f.hosts[4].proc.kill9();
    f.hosts[4].proc.env = vec![("KLOIGOS_TEST_PAUSE".into(), "report:18".into())];
    f.hosts[4].proc.spawn();
    // Its start-up pull (paused too) must be over first.
    assert!(
        wait_for(40, || host_record(&f, "node4")["last_report_at"]
            != reported),
        "node4 did not report after its start"
    );
    let t = Instant::now();
    let (code, v) = allocate(
        &f,
        0,
        &json!({"cpu_count": 1, "zone": "z4", "ssh_public_key": ssh_key("late")}),
    );
    assert_eq!(code, 504, "late host after {:?}: {v}", t.elapsed());
    assert!(
        t.elapsed() >= Duration::from_secs(14),
        "answered before the apply timeout"
    );
    assert_eq!(f.units("zone=z4&status=FREE").len(), UNITS_PER_HOST);
    assert!(
        keys_on(&f.hosts[4].root) == 1,
        "node4 applied the claim (its report is what was late)"
    );
    assert!(
        wait_for(30, || keys_on(&f.hosts[4].root) == 0),
        "node4 did not undo the released claim"
    );
    f.hosts[4].proc.kill9();
    f.hosts[4].proc.env.clear();
    f.hosts[4].proc.spawn();

    // 5. A hub killed with -9 while it waits for a host (node1 pauses before reporting): the
    //    unit is not stuck; the other hub's sweep settles it, and node1 converges.
    f.hosts[1].proc.kill9();
    f.hosts[1].proc.env = vec![("KLOIGOS_TEST_PAUSE".into(), "report:35".into())];
    f.hosts[1].proc.spawn();
    let port = f.hub(0);
    let admin = f.admin.clone();
    let pending = std::thread::spawn(move || {
        call(
            port,
            Some(&admin),
            "POST",
            "/api/compute_units/allocate",
            Some(
                &json!({"cpu_count": 1, "zone": "z1", "tags": {}, "ssh_public_key": ssh_key("killed")}),
            ),
        )
    });
    assert!(
        wait_for(10, || !f.units("zone=z1&status=ALLOCATING").is_empty()),
        "the allocation never started"
    );
    std::thread::sleep(Duration::from_millis(500));
    f.hubs[0].kill9();
    let (code, _) = pending.join().expect("thread");
    assert_eq!(code, 0, "the killed hub answered");
    assert!(
        wait_for(40, || f.units("zone=z1&status=ALLOCATING").is_empty()),
        "a unit stayed ALLOCATING after its hub died"
    );
    assert_eq!(f.units("zone=z1&status=FREE").len(), UNITS_PER_HOST);
    f.hosts[1].proc.kill9();
    f.hosts[1].proc.env.clear();
    f.hosts[1].proc.spawn();
    assert!(
        wait_for(30, || keys_on(&f.hosts[1].root) == 0),
        "node1 kept the dead hub's claim"
    );
    f.hubs[0].spawn();

    // 6. A forged poke (no token, any Host header) only makes the host pull what it already
    //    has: nothing changes on it, and it has reported again.
    let before = snapshot(&f.hosts[0].root);
    let reported = host_record(&f, "node0")["last_report_at"].clone();
    let port = f.hosts[0].proc.port;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.write_all(b"POST /api/host/poke HTTP/1.1\r\nHost: evil.example\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .expect("poke");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read");
    assert_eq!(common::parse_response(&raw).0, 202);
    let deadline = Instant::now() + Duration::from_secs(10);
    while host_record(&f, "node0")["last_report_at"] == reported {
        assert!(
            Instant::now() < deadline,
            "the poke did not make node0 pull"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        snapshot(&f.hosts[0].root),
        before,
        "a forged poke changed the host"
    );

    // 7. A host token reads and reports only its own hostname, and nothing else.
    let t0_token = std::fs::read_to_string(dir_of(&f, "node0").join("token")).expect("token");
    let t0_token = t0_token.trim();
    let (code, v) = call(
        f.hub(0),
        Some(t0_token),
        "GET",
        "/api/hosts/node1/state",
        None,
    );
    assert_eq!(code, 403, "node0's token read node1's state: {v}");
    let (code, v) = call(
        f.hub(1),
        Some(t0_token),
        "POST",
        "/api/hosts/node1/report",
        Some(
            &json!({"as_of": "2026-01-01T00:00:00Z", "version": "0", "facts": {}, "server": null, "units": [], "drift": []}),
        ),
    );
    assert_eq!(code, 403, "node0's token reported for node1: {v}");
    let (code, _) = call(f.hub(0), Some(t0_token), "GET", "/api/compute_units/", None);
    assert_eq!(code, 403, "a host token reads the inventory");
    let (code, v) = call(
        f.hub(0),
        Some(t0_token),
        "GET",
        "/api/hosts/node0/state",
        None,
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        v["server"]["units"].as_array().map(Vec::len),
        Some(UNITS_PER_HOST)
    );

    // 8. PostgreSQL restarts under load: 503 with a JSON detail while it is down, then
    //    service resumes by itself (no hub restarted).
    let stop = std::sync::atomic::AtomicBool::new(false);
    let seen: std::sync::Mutex<Vec<(u16, Value)>> = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for i in 0..4 {
            let (f, stop, seen) = (&f, &stop, &seen);
            s.spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let r = f.admin(i, "GET", "/api/compute_units/?zone=z0", None);
                    seen.lock().expect("lock").push(r);
                    std::thread::sleep(Duration::from_millis(50));
                }
            });
        }
        std::thread::sleep(Duration::from_millis(500));
        pg_ctl("stop");
        std::thread::sleep(Duration::from_secs(2));
        pg_ctl("start");
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let seen = seen.into_inner().expect("lock");
    let unavailable: Vec<&(u16, Value)> = seen.iter().filter(|(c, _)| *c == 503).collect();
    assert!(!unavailable.is_empty(), "no 503 while PostgreSQL was down");
    for (_, v) in &unavailable {
        assert!(
            v["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with("database unavailable")),
            "503 without a JSON detail: {v}"
        );
    }
    assert!(
        seen.iter().all(|(c, _)| *c == 200 || *c == 503),
        "{:?}",
        seen.iter().find(|(c, _)| *c != 200 && *c != 503)
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, v) = allocate(
            &f,
            1,
            &json!({"cpu_count": 1, "ssh_public_key": ssh_key("after")}),
        );
        if code == 200 {
            let id = v["compute_id"].as_str().expect("id");
            assert_eq!(
                f.admin(
                    0,
                    "DELETE",
                    &format!("/api/compute_units/deallocate/{id}"),
                    None
                )
                .0,
                200
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no service after PostgreSQL came back: {code} {v}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    eprintln!("fleet: done in {:?}", t0.elapsed());
}
