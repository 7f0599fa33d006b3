//! Test support: a real `kloigos serve` process on a unix socket, with a real SQLite file and a
//! temporary root, and a minimal HTTP/1.1 client.

#![allow(dead_code)]

use serde_json::Value;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const HOST: &str = "testhost";

pub struct Server {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub socket: PathBuf,
    pub extra_env: Vec<(String, String)>,
    /// Also listening on 127.0.0.1:<tcp>, with bearer tokens from `dir/tokens`.
    pub tcp: Option<u16>,
    /// Run the server with this open-files limit (soft and hard), through prlimit.
    pub nofile: Option<u64>,
    /// Its own PostgreSQL database (`KLOIGOS_TEST_BACKEND=postgres`), instead of the SQLite
    /// file `db()`.
    pub pg: Option<PgDb>,
}

/// A fresh database on the test cluster of scripts/lib/pg.sh (`KLOIGOS_TEST_PG`, the base URL
/// of a role that may create databases), dropped with the value.
pub struct PgDb {
    base: String,
    pub name: String,
}

impl PgDb {
    /// A new empty database, or `None` when the API suite runs on SQLite.
    pub fn create() -> Option<PgDb> {
        if std::env::var("KLOIGOS_TEST_BACKEND").ok()? != "postgres" {
            return None;
        }
        let base = std::env::var("KLOIGOS_TEST_PG")
            .expect("KLOIGOS_TEST_BACKEND=postgres needs KLOIGOS_TEST_PG (scripts/lib/pg.sh)");
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!(
            "kloigos_t_{}_{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        psql(&base, &format!("CREATE DATABASE {name}"));
        Some(PgDb { base, name })
    }

    /// A new empty database whatever backend the API suite runs on (tests that are about
    /// PostgreSQL itself, like the fleet's). `None` (the test skips) without the cluster of
    /// scripts/lib/pg.sh, which is a failure under `KLOIGOS_REQUIRE_PRIVILEGED=1`.
    pub fn fresh() -> Option<PgDb> {
        let Ok(base) = std::env::var("KLOIGOS_TEST_PG") else {
            let test = std::thread::current().name().unwrap_or("test").to_string();
            let why = format!("SKIP {test}: needs KLOIGOS_TEST_PG (scripts/lib/pg.sh)");
            assert!(
                std::env::var_os("KLOIGOS_REQUIRE_PRIVILEGED").is_none_or(|v| v != "1"),
                "{why} (KLOIGOS_REQUIRE_PRIVILEGED=1)"
            );
            eprintln!("{why}");
            return None;
        };
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!(
            "kloigos_f_{}_{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        psql(&base, &format!("CREATE DATABASE {name}"));
        Some(PgDb { base, name })
    }

    /// The `--db` URL: TCP with TLS, the server's certificate checked against the cluster's
    /// CA (`KLOIGOS_TEST_PG_CA`) when there is one.
    pub fn url(&self) -> String {
        match std::env::var("KLOIGOS_TEST_PG_CA") {
            Ok(ca) => format!(
                "{}/{}?sslmode=verify-full&sslrootcert={ca}",
                self.base, self.name
            ),
            Err(_) => format!("{}/{}", self.base, self.name),
        }
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        psql(
            &self.base,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

/// Runs one SQL command on the test cluster's `postgres` database.
fn psql(base: &str, sql: &str) {
    let out = Command::new("psql")
        .arg(format!("{base}/postgres"))
        .args(["-qAtX", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .expect("run psql");
    assert!(out.status.success(), "psql {sql}: {out:?}");
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_kloigos")
}

impl Server {
    /// A fake host with 16 online CPUs on two NUMA nodes.
    pub fn start() -> Server {
        Self::start_with_env(&[])
    }

    /// Unix socket and TCP, with a token file.
    pub fn start_tcp() -> Server {
        Self::start_tcp_with_env(&[])
    }

    pub fn start_tcp_with_env(env: &[(&str, &str)]) -> Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        Self::start_full(env, Some(port))
    }

    pub fn start_with_env(env: &[(&str, &str)]) -> Server {
        Self::start_full(env, None)
    }

    pub fn start_full(env: &[(&str, &str)], tcp: Option<u16>) -> Server {
        Self::start_limited(env, tcp, None)
    }

    pub fn start_limited(env: &[(&str, &str)], tcp: Option<u16>, nofile: Option<u64>) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        write(&root.join("etc/hostname"), &format!("{HOST}\n"));
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
        let mut s = Server {
            socket: dir.path().join("kloigos.sock"),
            dir,
            child: None,
            extra_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            tcp,
            nofile,
            pg: PgDb::create(),
        };
        s.spawn();
        s
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub fn tokens(&self) -> PathBuf {
        self.dir.path().join("tokens")
    }

    /// `kloigos token create`: the secret of a new token.
    pub fn token(&self, name: &str, role: &str) -> String {
        let out = Command::new(bin())
            .args(["token", "--tokens"])
            .arg(self.tokens())
            .args(["create", "--name", name, "--role", role])
            .output()
            .expect("kloigos token create");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A request over TCP with an optional bearer token.
    pub fn tcp_call(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> (u16, Value) {
        let port = self.tcp.expect("server started with start_tcp");
        let s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(60))).ok();
        exchange(s, token, method, path, body)
    }

    pub fn db(&self) -> PathBuf {
        self.dir.path().join("kloigos.db")
    }

    /// The `--db` argument: the SQLite file, or this server's PostgreSQL database.
    pub fn db_arg(&self) -> std::ffi::OsString {
        match &self.pg {
            Some(pg) => pg.url().into(),
            None => self.db().into(),
        }
    }

    /// A hand-run `kloigos [ARGS...] reconcile` on this server's root and database, as an admin
    /// would run it (built-in templates only).
    pub fn reconcile(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin())
            .args(args)
            .args(["reconcile", "--templates", "/nonexistent", "--root"])
            .arg(self.root())
            .arg("--db")
            .arg(self.db_arg())
            .output()
            .expect("run kloigos reconcile")
    }

    pub fn spawn(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let mut cmd = match self.nofile {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg("--").arg(bin());
                c
            }
            None => Command::new(bin()),
        };
        cmd.args(["serve", "--listen"])
            .arg(&self.socket)
            .arg("--root")
            .arg(self.root())
            .arg("--db")
            .arg(self.db_arg())
            .args(["--templates", "/nonexistent"])
            .arg("--tokens")
            .arg(self.tokens())
            .env("KLOIGOS_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if let Some(port) = self.tcp {
            cmd.args(["--listen", &format!("127.0.0.1:{port}")]);
        }
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("spawn kloigos serve"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&self.socket).is_err() {
            assert!(Instant::now() < deadline, "kloigos serve did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        http(&self.socket, method, path, body)
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        self.call("GET", path, None)
    }

    pub fn init(&self, ranges: &[&str]) {
        let body = serde_json::json!({
            "ip": "192.0.2.10", "region": "eu-west", "zone": "a", "hostname": HOST,
            "cpu_ranges": ranges,
        });
        let (code, v) = self.call("POST", "/api/admin/init_server", Some(&body.to_string()));
        assert_eq!(code, 200, "{v}");
    }

    /// Runs the CLI against this server's unix socket.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin())
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run kloigos")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn write(path: &Path, content: &str) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, content).expect("write");
}

pub fn http(socket: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let s = UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).ok();
    exchange(s, None, method, path, body)
}

/// One HTTP/1.1 request and its whole response on a fresh connection.
fn exchange(
    mut s: impl Read + Write,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, Value) {
    let body = body.unwrap_or("");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("send");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read");
    parse_response(&raw)
}

pub fn parse_response(raw: &[u8]) -> (u16, Value) {
    let text = String::from_utf8_lossy(raw);
    let (head, rest) = text.split_once("\r\n\r\n").expect("http response");
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let payload = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    let v = serde_json::from_str(&payload).unwrap_or(Value::String(payload));
    (code, v)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

/// The body of `POST /api/compute_units/allocate`.
pub fn alloc_body(cpu_count: Value, key: &str, tags: Value) -> String {
    serde_json::json!({"cpu_count": cpu_count, "tags": tags, "ssh_public_key": key}).to_string()
}

pub fn ssh_key(comment: &str) -> String {
    // A syntactically valid ed25519 public key: type string + 32 key bytes.
    use base64::Engine;
    let mut blob = Vec::new();
    blob.extend_from_slice(&11u32.to_be_bytes());
    blob.extend_from_slice(b"ssh-ed25519");
    blob.extend_from_slice(&32u32.to_be_bytes());
    let seed = comment
        .bytes()
        .fold(7u8, |a, b| a.wrapping_mul(31).wrapping_add(b));
    blob.extend((0..32u8).map(|i| i.wrapping_mul(seed)));
    format!(
        "ssh-ed25519 {} {comment}",
        base64::engine::general_purpose::STANDARD.encode(blob)
    )
}

/// Golden comparison of `got` (relative path → text) with the tree in `expected_dir`: a unified
/// diff for each file that differs, a line for each one missing or unexpected, pushed onto
/// `problems`. With `UPDATE_GOLDEN` set it rewrites `expected_dir` from `got` instead and returns
/// false: the caller has nothing more to check.
pub fn golden(
    expected_dir: &Path,
    got: &std::collections::BTreeMap<String, String>,
    problems: &mut Vec<String>,
) -> bool {
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        let _ = std::fs::remove_dir_all(expected_dir);
        for (rel, content) in got {
            let p = expected_dir.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, content).unwrap();
        }
        return false;
    }
    let expected = tree(expected_dir);
    for (p, want) in &expected {
        match got.get(p) {
            None => problems.push(format!("missing {p}")),
            Some(g) if g != want => problems.push(format!(
                "{p} differs:\n{}",
                similar::TextDiff::from_lines(want, g)
                    .unified_diff()
                    .header(&format!("expected/{p}"), &format!("got/{p}"))
            )),
            _ => {}
        }
    }
    for p in got.keys().filter(|p| !expected.contains_key(*p)) {
        problems.push(format!("unexpected {p}"));
    }
    true
}

/// Every file under `base`: relative path → text, sorted by path.
pub fn tree(base: &Path) -> std::collections::BTreeMap<String, String> {
    fn walk(base: &Path, dir: &Path, out: &mut std::collections::BTreeMap<String, String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                let rel = p
                    .strip_prefix(base)
                    .expect("under base")
                    .display()
                    .to_string();
                out.insert(rel, std::fs::read_to_string(&p).unwrap_or_default());
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(base, base, &mut out);
    out
}

/// Every file under `root`, relative, sorted, excluding the fake sysfs and procfs inputs.
pub fn files(root: &Path) -> Vec<String> {
    tree(root)
        .into_keys()
        // run/kloigos/kloigos.lock: the host lock of a PostgreSQL inventory
        .filter(|rel| {
            !rel.starts_with("sys/")
                && !rel.starts_with("proc/")
                && rel != "run/kloigos/kloigos.lock"
        })
        .collect()
}

/// Whether a privileged test can run here: root, and every command of `cmds` on `PATH`. Root,
/// because whatever inits a server needs it even on a temporary root (the service insists that the
/// directories it works below belong to root, as on a host) and only root is admin on the unix
/// socket; and tests that switch uids or load nftables need it anyway. If not,
/// prints `SKIP <test>: needs ...` and returns false, and the test returns early. Set
/// `KLOIGOS_SKIP_PRIVILEGED=1` to skip them all, `KLOIGOS_REQUIRE_PRIVILEGED=1` (scripts/test.sh
/// does, as root) to make a missing requirement a failure instead, so CI never skips silently.
pub fn privileged(cmds: &[&str]) -> bool {
    can_run(true, cmds)
}

/// Like [`privileged`], for a test that needs commands but not root.
pub fn have_commands(cmds: &[&str]) -> bool {
    can_run(false, cmds)
}

fn can_run(root: bool, cmds: &[&str]) -> bool {
    let test = std::thread::current()
        .name()
        .unwrap_or("privileged test")
        .to_string();
    if std::env::var_os("KLOIGOS_SKIP_PRIVILEGED").is_some_and(|v| v == "1") {
        eprintln!("SKIP {test}: KLOIGOS_SKIP_PRIVILEGED=1");
        return false;
    }
    let mut missing: Vec<String> = cmds
        .iter()
        .filter(|c| !on_path(c))
        .map(|c| format!("`{c}`"))
        .collect();
    if root && !nix::unistd::geteuid().is_root() {
        missing.insert(0, "root".into());
    }
    if missing.is_empty() {
        return true;
    }
    let why = format!("SKIP {test}: needs {}", missing.join(", "));
    assert!(
        std::env::var_os("KLOIGOS_REQUIRE_PRIVILEGED").is_none_or(|v| v != "1"),
        "{why} (KLOIGOS_REQUIRE_PRIVILEGED=1)"
    );
    eprintln!("{why}");
    false
}

/// An executable file named `cmd` in a directory of `PATH`, where `Command::new(cmd)` finds it.
fn on_path(cmd: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|dir| {
        std::fs::metadata(dir.join(cmd))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}
