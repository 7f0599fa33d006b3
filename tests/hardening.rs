//! What no unauthenticated or unprivileged caller can do: fill the disk with refused requests,
//! exhaust the service's connections or keep it from its idle exit, or drive it from a web
//! page (cross-site requests, DNS rebinding, anonymous callers freeing each other's units).
//! These run the real binary, as root, and switch uids for the unprivileged clients; without root
//! they are skipped with a message.

mod common;

use common::{Server, parse_response, ssh_key};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// These tests switch uids (setpriv) for clients written in python3.
fn privileged() -> bool {
    common::privileged(&["setpriv", "python3"])
}

/// Lets other uids reach the server's socket (it is 0666 itself).
fn open_dir(s: &Server) {
    std::fs::set_permissions(
        s.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
}

/// A python3 script run as `nobody`.
fn as_nobody(script: &str) -> Command {
    as_user("nobody", "nogroup", script)
}

/// A python3 script run as another user.
fn as_user(user: &str, group: &str, script: &str) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        &format!("--reuid={user}"),
        &format!("--regid={group}"),
        "--clear-groups",
        "/usr/bin/python3",
        "-c",
        script,
    ]);
    c
}

/// Database file and its write-ahead log, in bytes.
fn db_size(s: &Server) -> u64 {
    ["kloigos.db", "kloigos.db-wal"]
        .iter()
        .map(|f| {
            std::fs::metadata(s.dir.path().join(f))
                .map(|m| m.len())
                .unwrap_or(0)
        })
        .sum()
}

fn events(s: &Server, query: &str) -> Vec<Value> {
    let (code, v) = s.get(&format!("/api/events?limit=1000&{query}"));
    assert_eq!(code, 200, "{v}");
    v.as_array().expect("a list").clone()
}

#[test]
fn refused_requests_cost_bounded_disk() {
    if !privileged() {
        return;
    }
    let s = Server::start_tcp();
    open_dir(&s);
    s.init(&["0-1"]);
    let before = db_size(&s);

    // 2,000 forged tokens over TCP, each with a 32 KB path.
    let long = format!("/api/compute_units/{}", "a".repeat(32 * 1024));
    let t0 = Instant::now();
    for _ in 0..2000 {
        assert_eq!(s.tcp_call(Some("klg_forged"), "GET", &long, None).0, 401);
    }
    // 500 refused changes from `nobody` on the unix socket, each with a 16 KB body.
    let script = format!(
        "import socket\nb=('{{\"hostname\": \"' + 'x'*16384 + '\"}}').encode()\ncodes=set()\n\
         for i in range(500):\n  c=socket.socket(socket.AF_UNIX); c.connect({sock:?})\n  \
         c.sendall(b'POST /api/admin/init_server HTTP/1.1\\r\\nHost: x\\r\\nContent-Type: application/json\\r\\nContent-Length: %d\\r\\nConnection: close\\r\\n\\r\\n' % len(b) + b)\n  \
         r=b''\n  while True:\n    d=c.recv(65536)\n    if not d: break\n    r+=d\n  codes.add(r.split(b' ')[1].decode()); c.close()\nprint(sorted(codes))",
        sock = s.socket.display().to_string()
    );
    let out = as_nobody(&script).output().expect("python3 as nobody");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "['403']");
    let grown = db_size(&s).saturating_sub(before);
    eprintln!(
        "2,500 refused requests in {:.1} s grew the database by {grown} bytes",
        t0.elapsed().as_secs_f64()
    );
    assert!(grown < 1024 * 1024, "grew by {grown} bytes");

    // Each source had its first few refusals recorded, clipped; the rest are only counted.
    let auth = events(&s, "operation=authenticate");
    assert_eq!(auth.len(), 5, "{auth:?}");
    let denied: Vec<Value> = events(&s, "operation=init_server")
        .into_iter()
        .filter(|e| e["result"] == "error")
        .collect();
    assert_eq!(denied.len(), 5, "{denied:?}");
    for e in auth.iter().chain(&denied) {
        let d = e["detail"].as_str().expect("detail");
        assert!(d.starts_with("denied: ") && d.len() <= 512, "{d}");
    }
    assert!(
        auth[0]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("GET /api/compute_units/aaaa") && d.ends_with("bytes]")),
        "{:?}",
        auth[0]
    );
    assert!(denied[0]["actor"].as_str().unwrap_or("").contains("nobody"));
}

#[test]
fn suppressed_refusals_are_summarized_once_the_window_is_over() {
    if !privileged() {
        return;
    }
    let s = Server::start_tcp_with_env(&[("KLOIGOS_AUDIT_DENIAL_WINDOW", "1")]);
    for _ in 0..20 {
        assert_eq!(
            s.tcp_call(Some("klg_forged"), "GET", "/api/whoami", None).0,
            401
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let summary = loop {
        let rows = events(&s, "operation=suppressed");
        if let Some(r) = rows.first() {
            break r.clone();
        }
        assert!(Instant::now() < deadline, "no summary row");
        std::thread::sleep(Duration::from_millis(200));
    };
    // A local caller's refusals are counted under its uid (here root's), not the address.
    let me = format!("uid {}", nix::unistd::geteuid());
    assert_eq!(summary["actor"], me.as_str());
    // Every window is over by now.
    std::thread::sleep(Duration::from_millis(2500));
    let detail = summary["detail"].as_str().unwrap_or("");
    // 20 refusals in (at most) a few windows: 5 recorded per window, the rest summarized.
    let recorded = events(&s, "operation=authenticate").len() as u64;
    let suppressed: u64 = events(&s, "operation=suppressed")
        .iter()
        .map(|e| {
            e["detail"]
                .as_str()
                .and_then(|d| d.split(' ').next())
                .and_then(|n| n.parse::<u64>().ok())
                .expect("a count")
        })
        .sum();
    assert!(
        detail.contains(&format!("more refused requests from {me}")),
        "{detail}"
    );
    assert_eq!(recorded + suppressed, 20, "every refusal is accounted for");
}

#[test]
fn slow_connections_from_a_user_do_not_lock_out_admins() {
    if !privileged() {
        return;
    }
    // The open-files limit the issue was found with.
    // (Without the per-user cap, the admin waits for the header timeout: checked.)
    let s = Server::start_limited(&[], None, Some(1024));
    open_dir(&s);
    let script = format!(
        "import resource, socket, sys, time\n\
         soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n\
         resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))\n\
         conns = []\n\
         for i in range(1100):\n  c = socket.socket(socket.AF_UNIX); c.connect({sock:?})\n  \
         try:\n    c.sendall(b'POST /api/compute_units/allocate HTTP/1.1\\r\\nHost: x\\r\\n')\n  \
         except OSError:\n    pass\n  conns.append(c)\n\
         print('ready', len(conns), flush=True)\n\
         time.sleep(60)\n",
        sock = s.socket.display().to_string()
    );
    let mut slow = as_nobody(&script)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 as nobody");
    let mut line = String::new();
    BufReader::new(slow.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    assert_eq!(line.trim(), "ready 1100", "{line}");
    // An admin still gets in at once.
    let t0 = Instant::now();
    let (code, v) = s.get("/api/whoami");
    let took = t0.elapsed();
    let _ = slow.kill();
    let _ = slow.wait();
    assert_eq!((code, v["role"].as_str()), (200, Some("admin")), "{v}");
    assert!(took < Duration::from_secs(2), "admin waited {took:?}");
}

#[test]
fn timeouts_close_slow_connections_and_the_idle_exit_still_happens() {
    if !common::privileged(&[]) {
        return;
    }
    let mut s = Server::start_with_env(&[
        ("KLOIGOS_IDLE_TIMEOUT", "1"),
        ("KLOIGOS_HEADER_TIMEOUT", "1"),
        ("KLOIGOS_BODY_TIMEOUT", "1"),
    ]);
    let connect = || std::os::unix::net::UnixStream::connect(&s.socket).expect("connect");
    // Half-sent headers, and a connection kept alive after a request.
    let mut held = Vec::new();
    for _ in 0..10 {
        let mut c = connect();
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .expect("send");
        held.push(c);
    }
    let mut kept = connect();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("send");
    let mut buf = [0u8; 4096];
    let n = kept.read(&mut buf).expect("read");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    held.push(kept);
    // A body that never finishes: refused once its time is up.
    let mut c = connect();
    c.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let t0 = Instant::now();
    c.write_all(
        b"POST /api/compute_units/allocate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"cpu",
    )
    .expect("send");
    let mut raw = Vec::new();
    let _ = c.read_to_end(&mut raw);
    let (code, v) = parse_response(&raw);
    assert_eq!(code, 408, "{v}");
    assert!(
        v["detail"].as_str().is_some_and(|d| d.contains("1 s")),
        "{v}"
    );
    assert!(t0.elapsed() < Duration::from_secs(5));
    held.push(c);

    // With all of them still open on our side, the service exits once they time out.
    let child = s.child.as_mut().expect("running");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "still running with slow connections open"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}");
    // Our ends see the server hang up.
    for mut h in held {
        h.set_read_timeout(Some(Duration::from_secs(2))).ok();
        let mut rest = Vec::new();
        assert!(h.read_to_end(&mut rest).is_ok(), "closed, not timed out");
    }
}

/// One raw HTTP/1.1 request over TCP (`head` without its final blank line).
fn raw_tcp(port: u16, head: &[u8], body: &str) -> (u16, Value) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let mut req = head.to_vec();
    req.extend_from_slice(
        format!(
            "Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    s.write_all(&req).expect("send");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read");
    parse_response(&raw)
}

#[test]
fn no_web_page_can_drive_it() {
    if !common::privileged(&[]) {
        return;
    }
    let s = Server::start_tcp_with_env(&[
        ("KLOIGOS_TCP_ANONYMOUS_ROLE", "user"),
        (
            "KLOIGOS_ALLOWED_HOSTS",
            "kloigos.example.org, other.example.org",
        ),
    ]);
    s.init(&["0-1", "2-3", "4-5", "6-7"]);
    let port = s.tcp.expect("tcp");
    let admin = s.token("ops", "admin");
    let user = s.token("ci", "user");
    let here = format!("127.0.0.1:{port}");
    let key = ssh_key("page");
    let alloc = json!({"cpu_count": 2, "tags": {}, "ssh_public_key": key}).to_string();
    let allocated = || {
        s.get("/api/compute_units/?status=ALLOCATED")
            .1
            .as_array()
            .map_or(0, Vec::len)
    };

    // The attack as reported: a cross-site text/plain POST, foreign Origin and Host.
    let post = |host: &str, extra: &str| -> Vec<u8> {
        format!("POST /api/compute_units/allocate HTTP/1.1\r\nHost: {host}\r\n{extra}").into_bytes()
    };
    let (code, v) = raw_tcp(
        port,
        &post(
            "evil.example:8000",
            "Origin: http://evil.example:8000\r\nContent-Type: text/plain\r\n",
        ),
        &alloc,
    );
    assert_eq!(code, 403, "{v}");
    assert!(
        v["detail"].as_str().is_some_and(|d| d.contains("Host")),
        "{v}"
    );
    // Rebound to our name, the foreign Origin still refuses the change...
    let (code, v) = raw_tcp(
        port,
        &post(
            &here,
            "Origin: http://evil.example:8000\r\nContent-Type: application/json\r\n",
        ),
        &alloc,
    );
    assert_eq!(code, 403, "{v}");
    assert!(
        v["detail"].as_str().is_some_and(|d| d.contains("Origin")),
        "{v}"
    );
    for origin in ["null", "http://127.0.0.1:1", "http://localhost:8000"] {
        let (code, _) = raw_tcp(
            port,
            &post(
                &here,
                &format!("Origin: {origin}\r\nContent-Type: application/json\r\n"),
            ),
            &alloc,
        );
        assert_eq!(code, 403, "{origin}");
    }
    // ...and a body that is not declared JSON is refused whatever its origin.
    for ct in [
        "Content-Type: text/plain\r\n",
        "Content-Type: application/x-www-form-urlencoded\r\n",
        "",
    ] {
        let (code, v) = raw_tcp(port, &post(&here, ct), &alloc);
        assert_eq!(code, 415, "{ct:?}: {v}");
        assert!(v["detail"].is_string(), "{v}");
    }
    assert_eq!(allocated(), 0, "nothing was allocated");

    // Host: loopback names on any port and the allowed names; nothing else, whatever the path.
    for host in [
        here.as_str(),
        "localhost",
        "localhost:1",
        "[::1]:8000",
        "kloigos.example.org",
        "Other.Example.org:443",
    ] {
        let head = format!("GET /api/whoami HTTP/1.1\r\nHost: {host}\r\n");
        assert_eq!(raw_tcp(port, head.as_bytes(), "").0, 200, "{host}");
    }
    for host in [
        "evil.example",
        "127.0.0.2:8000",
        "kloigos.example.org.evil.example",
        "",
    ] {
        for path in ["/api/whoami", "/", "/healthz"] {
            let head = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n");
            let (code, v) = raw_tcp(port, head.as_bytes(), "");
            assert_eq!(code, 403, "{host} {path}: {v}");
            assert!(v["detail"].is_string());
        }
    }
    assert_eq!(
        raw_tcp(port, b"GET /api/whoami HTTP/1.0\r\n", "").0,
        403,
        "no Host"
    );
    // The unix socket comes from no browser: no Host check there.
    let mut u = std::os::unix::net::UnixStream::connect(&s.socket).expect("connect");
    u.write_all(b"GET /api/whoami HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n")
        .expect("send");
    let mut raw = Vec::new();
    u.read_to_end(&mut raw).expect("read");
    assert_eq!(parse_response(&raw).0, 200);

    // Same-origin pages (the dashboard) and allowed origins may make changes.
    let (code, anon_unit) = raw_tcp(
        port,
        &post(
            &here,
            &format!("Origin: http://{here}\r\nContent-Type: application/json; charset=utf-8\r\n"),
        ),
        &alloc,
    );
    assert_eq!(code, 200, "{anon_unit}");
    assert_eq!(anon_unit["allocated_by"], "anonymous(tcp 127.0.0.1)");
    let anon_unit = anon_unit["compute_id"].as_str().expect("id").to_string();
    let (code, v) = raw_tcp(
        port,
        &post(
            "kloigos.example.org:8000",
            "Origin: https://kloigos.example.org\r\nContent-Type: application/json\r\n",
        ),
        &alloc,
    );
    assert_eq!(code, 200, "{v}");

    // A malformed Authorization header is a 401, never a fall-back to anonymous.
    for auth in [
        &b"Authorization: Bearer\r\n"[..],
        b"Authorization: \r\n",
        b"Authorization: Basic b3BzOnB3\r\n",
        b"Authorization: Bearer klg_\xff\xfe\r\n",
        b"Authorization: Bearer a b\r\n",
    ] {
        let mut head = format!("GET /api/whoami HTTP/1.1\r\nHost: {here}\r\n").into_bytes();
        head.extend_from_slice(auth);
        let (code, v) = raw_tcp(port, &head, "");
        assert_eq!(code, 401, "{}: {v}", String::from_utf8_lossy(auth));
        assert!(v["detail"].is_string());
    }
    let anon = s.tcp_call(None, "GET", "/api/whoami", None);
    assert_eq!((anon.0, anon.1["role"].as_str()), (200, Some("user")));

    // Anonymous callers all look alike: none may free a unit, not even "its own".
    let delete = |unit: &str, auth: Option<&str>, origin: Option<&str>| {
        // As Ansible's uri module sends it: no body, no Content-Type.
        let mut head =
            format!("DELETE /api/compute_units/deallocate/{unit} HTTP/1.1\r\nHost: {here}\r\n");
        if let Some(t) = auth {
            head.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        if let Some(o) = origin {
            head.push_str(&format!("Origin: {o}\r\n"));
        }
        raw_tcp(port, head.as_bytes(), "")
    };
    let (code, v) = delete(&anon_unit, None, None);
    assert_eq!(code, 403, "{v}");
    let (code, mine) = s.tcp_call(
        Some(&user),
        "POST",
        "/api/compute_units/allocate",
        Some(&alloc),
    );
    assert_eq!(code, 200, "{mine}");
    let mine = mine["compute_id"].as_str().expect("id").to_string();
    assert_eq!(
        delete(&mine, None, None).0,
        403,
        "anonymous frees a named user's unit"
    );
    assert_eq!(
        delete(&mine, Some(&user), None).0,
        200,
        "a user frees its own, no body"
    );
    assert_eq!(
        delete(&anon_unit, Some(&admin), Some("http://evil.example")).0,
        403,
        "even an admin's token is refused from a foreign page"
    );
    assert_eq!(delete(&anon_unit, Some(&admin), None).0, 200);
    assert_eq!(allocated(), 1);
}

/// `GET /healthz` over TCP as `daemon`: the raw answer. A connection over its cap is answered
/// at once and closed: the request is sent only if nothing came first (sent into a closed
/// connection, it would reset it before the answer is read).
fn healthz_as_daemon(port: u16) -> (u16, Value) {
    let script = format!(
        "import socket, sys\nc = socket.create_connection(('127.0.0.1', {port}))\n\
         c.settimeout(0.5)\n\
         try:\n  r = c.recv(65536)\n\
         except socket.timeout:\n  r = b''\n  c.settimeout(30)\n  \
         c.sendall(b'GET /healthz HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\nConnection: close\\r\\n\\r\\n')\n\
         while True:\n  d = c.recv(65536)\n  if not d: break\n  r += d\n\
         sys.stdout.buffer.write(r)\n"
    );
    let out = as_user("daemon", "daemon", &script)
        .output()
        .expect("python3 as daemon");
    assert!(out.status.success(), "{out:?}");
    parse_response(&out.stdout)
}

#[test]
fn tcp_connections_are_capped_in_all() {
    if !privileged() {
        return;
    }
    let s = Server::start_tcp_with_env(&[
        ("KLOIGOS_MAX_TCP_CONNECTIONS", "2"),
        ("KLOIGOS_HEADER_TIMEOUT", "60"),
    ]);
    let port = s.tcp.expect("tcp");
    let (mut holder, held, busy) = hold_slow_tcp(port, "nobody", "nogroup", 3);
    assert_eq!((held, busy), (2, 1));
    let (code, v) = healthz_as_daemon(port);
    assert_eq!(code, 503, "{v}");
    assert!(v["detail"].is_string(), "{v}");
    // Root is not counted, over TCP or the unix socket; a freed place is taken again.
    assert_eq!(s.tcp_call(None, "GET", "/healthz", None).0, 200);
    assert_eq!(s.get("/healthz").0, 200);
    let _ = holder.kill();
    let _ = holder.wait();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(healthz_as_daemon(port).0, 200);
}

/// Opens `n` TCP connections as `user` and keeps them open for a minute, sending half a request
/// on those the service kept; returns the process once it said how many were kept and how many
/// got a 503. (Nothing is sent before: sent into a connection the service closes, it would
/// reset it before the 503 is read.)
fn hold_slow_tcp(
    port: u16,
    user: &str,
    group: &str,
    n: usize,
) -> (std::process::Child, usize, usize) {
    let script = format!(
        "import socket, time\n\
         conns = [socket.create_connection(('127.0.0.1', {port})) for i in range({n})]\n\
         time.sleep(2)\n\
         held, busy = [], 0\n\
         for c in conns:\n  c.setblocking(False)\n  \
         try:\n    d = c.recv(64)\n  \
         except BlockingIOError:\n    held.append(c)\n    continue\n  \
         assert d.startswith(b'HTTP/1.1 503 '), d\n  busy += 1\n\
         for c in held:\n  c.sendall(b'GET /api/whoami HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\n')\n\
         print('held', len(held), 'busy', busy, flush=True)\n\
         time.sleep(60)\n"
    );
    let mut p = as_user(user, group, &script)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    BufReader::new(p.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    let words: Vec<&str> = line.split_whitespace().collect();
    match words[..] {
        ["held", held, "busy", busy] => (
            p,
            held.parse().expect("a number"),
            busy.parse().expect("a number"),
        ),
        _ => panic!("{user}: {line:?}"),
    }
}

#[test]
fn tcp_connections_are_capped_per_local_user_and_never_lock_out_root() {
    if !privileged() {
        return;
    }
    let s = Server::start_tcp_with_env(&[
        ("KLOIGOS_MAX_CONNECTIONS_PER_USER", "8"),
        ("KLOIGOS_MAX_TCP_CONNECTIONS", "12"),
        // The held connections must outlive the test, on a busy machine too.
        ("KLOIGOS_HEADER_TIMEOUT", "60"),
    ]);
    let port = s.tcp.expect("tcp");
    let admin = s.token("ansible", "admin");
    // One user holds its 8 places; the rest of its connections get a 503.
    let (mut nobody, held, busy) = hold_slow_tcp(port, "nobody", "nogroup", 30);
    // Another user still gets in, until all non-root connections together are at the cap.
    let (mut daemon, d_held, d_busy) = hold_slow_tcp(port, "daemon", "daemon", 8);
    // Root, with a token, is never locked out by them.
    let t0 = Instant::now();
    let (code, v) = s.tcp_call(Some(&admin), "GET", "/api/whoami", None);
    let took = t0.elapsed();
    for p in [&mut nobody, &mut daemon] {
        let _ = p.kill();
        let _ = p.wait();
    }
    assert_eq!((held, busy), (8, 22), "the per-user cap");
    assert_eq!((d_held, d_busy), (4, 4), "the total cap");
    assert_eq!((code, v["role"].as_str()), (200, Some("admin")), "{v}");
    assert!(took < Duration::from_secs(2), "root waited {took:?}");
    // The uid is for caps only: root without a token is no one over TCP.
    assert_eq!(s.tcp_call(None, "GET", "/api/whoami", None).0, 401);
}

#[test]
fn tcp_refusals_are_rate_limited_per_local_user() {
    if !privileged() {
        return;
    }
    let s = Server::start_tcp_with_env(&[("KLOIGOS_AUDIT_DENIAL_WINDOW", "1")]);
    let port = s.tcp.expect("tcp");
    let script = format!(
        "import socket\ncodes = set()\n\
         for i in range(20):\n  c = socket.create_connection(('127.0.0.1', {port}))\n  \
         c.sendall(b'GET /api/whoami HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\nAuthorization: Bearer klg_forged\\r\\nConnection: close\\r\\n\\r\\n')\n  \
         r = b''\n  while True:\n    d = c.recv(65536)\n    if not d: break\n    r += d\n  \
         codes.add(r.split(b' ')[1].decode()); c.close()\n\
         print(sorted(codes))"
    );
    let out = as_nobody(&script).output().expect("python3 as nobody");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "['401']");
    // Root's refusals right after are its own, not hidden behind nobody's on 127.0.0.1.
    for _ in 0..3 {
        assert_eq!(
            s.tcp_call(Some("klg_forged"), "GET", "/api/whoami", None).0,
            401
        );
    }
    let by = |rows: &[Value], uid: &str| {
        rows.iter()
            .filter(|e| {
                e["actor"]
                    .as_str()
                    .is_some_and(|a| a.starts_with("tcp 127.0.0.1:") && a.ends_with(uid))
            })
            .count() as u64
    };
    let auth = events(&s, "operation=authenticate");
    assert_eq!(by(&auth, "(uid 0)"), 3, "{auth:?}");
    // nobody's: 5 per window recorded, the rest summed up under its uid once the window is over.
    let deadline = Instant::now() + Duration::from_secs(10);
    while events(&s, "operation=suppressed").is_empty() {
        assert!(Instant::now() < deadline, "no summary row");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(2500));
    let summaries = events(&s, "operation=suppressed");
    let mut suppressed = 0;
    for e in &summaries {
        assert_eq!(e["actor"], "uid 65534", "{e}");
        let d = e["detail"].as_str().unwrap_or("");
        assert!(d.contains("more refused requests from uid 65534"), "{d}");
        suppressed += d
            .split(' ')
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .expect("a count");
    }
    let recorded = by(&events(&s, "operation=authenticate"), "(uid 65534)");
    assert!(recorded >= 5, "{recorded}");
    assert_eq!(recorded + suppressed, 20, "every refusal is accounted for");
}

#[test]
fn audit_retention_applies_at_start() {
    if !common::privileged(&[]) {
        return;
    }
    let mut s = Server::start();
    s.init(&["0-1", "2-3"]);
    let key = ssh_key("r");
    for _ in 0..5 {
        let body = json!({"cpu_count": 2, "tags": {}, "ssh_public_key": key}).to_string();
        let (code, u) = s.call("POST", "/api/compute_units/allocate", Some(&body));
        assert_eq!(code, 200, "{u}");
        let id = u["compute_id"].as_str().expect("id").to_string();
        let path = format!("/api/compute_units/deallocate/{id}");
        assert_eq!(s.call("DELETE", &path, None).0, 200);
    }
    // init_server, then per round the claim, the allocation and the deallocation.
    let all = events(&s, "");
    assert_eq!(all.len(), 16);
    s.kill9();
    s.extra_env
        .push(("KLOIGOS_AUDIT_MAX_ROWS".into(), "4".into()));
    s.spawn();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let kept = events(&s, "");
        if kept.len() <= 4 {
            let ids: Vec<&Value> = kept.iter().map(|e| &e["id"]).collect();
            let newest: Vec<&Value> = all.iter().take(4).map(|e| &e["id"]).collect();
            assert_eq!(ids, newest, "the newest rows stay");
            break;
        }
        assert!(Instant::now() < deadline, "not pruned: {} rows", kept.len());
        std::thread::sleep(Duration::from_millis(100));
    }
}
