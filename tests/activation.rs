//! Socket activation without systemd as PID 1: `systemd-socket-activate` plays the socket unit.
//! The service takes both sockets (unix and TCP) from LISTEN_FDS, reports READY=1 and STATUS=
//! to NOTIFY_SOCKET, serves on both, and exits by itself after the idle timeout.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn socket_activated_ready_status_and_idle_exit() {
    if !common::have_commands(&["systemd-socket-activate"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    common::write(&root.join("etc/hostname"), "acthost\n");
    let sock = dir.path().join("k.sock");
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&sock)
        .arg("-l")
        .arg(format!("127.0.0.1:{port}"))
        .arg(format!("--setenv=NOTIFY_SOCKET={}", notify_path.display()))
        .arg("--setenv=KLOIGOS_LOG=warn")
        .arg(common::bin())
        .args([
            "serve",
            "--idle-timeout",
            "2",
            "--templates",
            "/nonexistent",
            "--root",
        ])
        .arg(&root)
        .arg("--db")
        .arg(dir.path().join("k.db"))
        .stdout(Stdio::null())
        .spawn()
        .expect("systemd-socket-activate (package systemd)");
    // The sockets exist before the service runs; the first connection starts it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "socket never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, health) = common::http(&sock, "GET", "/healthz", None);
    assert_eq!(
        (code, health["hostname"].as_str()),
        (200, Some("acthost")),
        "{health}"
    );
    let mut buf = [0u8; 4096];
    let n = notify.recv(&mut buf).expect("no sd_notify message");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    // Ready as soon as the sockets are served; the counts follow in a second STATUS=.
    assert!(msg.contains("READY=1"), "{msg}");
    assert!(
        msg.contains(&format!("http://127.0.0.1:{port}")) && msg.contains("k.sock"),
        "both sockets taken: {msg}"
    );
    let n = notify.recv(&mut buf).expect("no second sd_notify message");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(
        msg.contains("STATUS=0 units, 0 allocated, host acthost")
            && msg.contains(&format!("http://127.0.0.1:{port}")),
        "{msg}"
    );
    // TCP, the second socket: the API needs a bearer token there; the health check does not.
    let tcp_get = |path: &str| {
        let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(
            tcp,
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut resp = String::new();
        tcp.read_to_string(&mut resp).unwrap();
        resp
    };
    let resp = tcp_get("/api/compute_units/");
    assert!(
        resp.starts_with("HTTP/1.1 401") && resp.contains("www-authenticate: Bearer"),
        "{resp}"
    );
    let resp = tcp_get("/healthz");
    assert!(
        resp.starts_with("HTTP/1.1 200") && resp.contains("\"status\":\"ok\""),
        "{resp}"
    );
    // Idle: no connection for 2 s and it exits cleanly, telling systemd it stops.
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "service did not exit when idle");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}");
    let n = notify.recv(&mut buf).expect("no STOPPING message");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
}
