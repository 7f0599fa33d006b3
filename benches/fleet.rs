//! The fleet benchmark (`scripts/bench.sh`, or `cargo bench --bench fleet` with the environment
//! that script sets up). Real processes on loopback, driven through the HTTP API only:
//!
//! 1. **List latency** at 1k, 10k and 100k units, full (`GET /api/compute_units/`) and filtered
//!    (`?status=FREE&region=us-east`, about 20% of the rows), for SQLite on one host and for
//!    PostgreSQL behind two hubs. The inventory is filled through the API in the data shape of
//!    issue 10: inventory-only servers of 8 units, 40% of the units allocated, three regions.
//! 2. **Allocations per second** and their p50/p99 with 64 concurrent clients on a fleet of 50
//!    joined hosts (`kloigos serve --root` on fake roots), until capacity is used up; then the
//!    same for deallocation.
//! 3. **Peak RSS** (`VmHWM`) of the servers after their runs.
//!
//! It prints one markdown table on stdout (progress goes to stderr) and never fails on timing:
//! goals are printed next to the figures. A phase that cannot run (no root, no PostgreSQL, a
//! process that does not come up) is reported in the table and the others still run.
//!
//! Knobs (environment): `KLOIGOS_BENCH_SIZES` (default `1000,10000,100000`),
//! `KLOIGOS_BENCH_RUNS` (list runs per figure, 10), `KLOIGOS_BENCH_HOSTS` (50),
//! `KLOIGOS_BENCH_CPUS` (CPUs, hence single-CPU units, per fleet host, 32),
//! `KLOIGOS_BENCH_CLIENTS` (64), `KLOIGOS_BENCH_FILL_CLIENTS` (parallel fill calls, 16),
//! `KLOIGOS_BENCH_FILL_BUDGET` (seconds of filling per backend before it stops growing, 240),
//! `KLOIGOS_BENCH_PHASES` (`sqlite,pg,fleet`), `KLOIGOS_BENCH_BIN` (the `kloigos` binary).
//! PostgreSQL comes from `KLOIGOS_TEST_PG` (scripts/lib/pg.sh); each phase makes its own
//! database and drops it.

use serde_json::{Value, json};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const REGIONS: [&str; 3] = ["us-east", "us-west", "eu-west"];
const ZONES: [&str; 3] = ["a", "b", "c"];
const UNITS_PER_SERVER: usize = 8;
const FILTER: &str = "status=FREE&region=us-east";

type Res<T> = Result<T, String>;
/// One part of the run: adds its rows to the table, or says why it could not.
type Phase = fn(&mut Table) -> Res<()>;

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

fn say(msg: &str) {
    eprintln!("bench: {msg}");
}

// ---------------------------------------------------------------------------------------------
// HTTP over loopback TCP: one request per connection, the whole answer read.

struct Answer {
    code: u16,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&self.body).into()))
    }
}

fn call(port: u16, token: &str, method: &str, path: &str, body: Option<&Value>) -> Answer {
    let fail = |why: &str| Answer {
        code: 0,
        body: why.as_bytes().to_vec(),
    };
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return fail("connection refused");
    };
    s.set_read_timeout(Some(Duration::from_secs(120))).ok();
    s.set_nodelay(true).ok();
    let body = body.map(Value::to_string).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(req.as_bytes()).is_err() {
        return fail("send failed");
    }
    let mut raw = Vec::new();
    if s.read_to_end(&mut raw).is_err() || raw.is_empty() {
        return fail("no answer");
    }
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return fail("no HTTP head");
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let rest = &raw[split + 4..];
    let body = if head.contains("transfer-encoding: chunked") {
        dechunk(rest)
    } else {
        rest.to_vec()
    };
    Answer { code, body }
}

fn dechunk(mut s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    while let Some(eol) = s.windows(2).position(|w| w == b"\r\n") {
        let size = String::from_utf8_lossy(&s[..eol]);
        let n = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        if n == 0 || eol + 2 + n > s.len() {
            break;
        }
        out.extend_from_slice(&s[eol + 2..eol + 2 + n]);
        s = s.get(eol + 2 + n + 2..).unwrap_or(&[]);
    }
    out
}

/// A syntactically valid ed25519 public key: type string + 32 key bytes.
fn ssh_key(comment: &str) -> String {
    use base64::Engine;
    let mut blob = Vec::new();
    blob.extend_from_slice(&11u32.to_be_bytes());
    blob.extend_from_slice(b"ssh-ed25519");
    blob.extend_from_slice(&32u32.to_be_bytes());
    blob.extend((0..32u8).map(|i| i.wrapping_mul(37).wrapping_add(comment.len() as u8)));
    format!(
        "ssh-ed25519 {} {comment}",
        base64::engine::general_purpose::STANDARD.encode(blob)
    )
}

/// Runs `job(i)` for i in 0..n on `workers` threads; returns what each returned, in order.
fn par<T: Send>(n: usize, workers: usize, job: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let next = AtomicUsize::new(0);
    let out: Mutex<Vec<(usize, T)>> = Mutex::new(Vec::with_capacity(n));
    std::thread::scope(|s| {
        for _ in 0..workers.clamp(1, n.max(1)) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let r = job(i);
                    if let Ok(mut o) = out.lock() {
                        o.push((i, r));
                    }
                }
            });
        }
    });
    let mut v = out.into_inner().unwrap_or_default();
    v.sort_by_key(|(i, _)| *i);
    v.into_iter().map(|(_, t)| t).collect()
}

/// Nearest-rank percentile of sorted durations, in milliseconds.
fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1000.0
}

// ---------------------------------------------------------------------------------------------
// Processes.

fn bin() -> String {
    std::env::var("KLOIGOS_BENCH_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_kloigos").into())
}

/// A free TCP port below the kernel's ephemeral range (32768 and up), so that the many
/// outgoing connections of the run cannot take it between this check and the server's bind.
fn free_port() -> Res<u16> {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let start = (std::process::id() as usize).wrapping_mul(7919) % 20_000;
    for _ in 0..20_000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(10_000 + (start + n) % 20_000).unwrap_or(10_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err("no free port between 10000 and 30000".into())
}

fn write(path: &Path, content: &str) -> Res<()> {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).map_err(|e| format!("mkdir {}: {e}", p.display()))?;
    }
    std::fs::write(path, content).map_err(|e| format!("write {}: {e}", path.display()))
}

fn fake_root(root: &Path, hostname: &str, cpus: usize) -> Res<()> {
    let last = cpus.max(1) - 1;
    write(&root.join("etc/hostname"), &format!("{hostname}\n"))?;
    write(
        &root.join("sys/devices/system/cpu/online"),
        &format!("0-{last}\n"),
    )?;
    write(
        &root.join("sys/devices/system/node/node0/cpulist"),
        &format!("0-{last}\n"),
    )?;
    write(
        &root.join("proc/sys/net/ipv4/ip_local_port_range"),
        "32768\t60999\n",
    )?;
    write(&root.join("etc/skel/.bashrc"), "# skel\n")
}

/// CPU time (user + system, all threads) a process used so far, in ms (`/proc/PID/stat`).
fn cpu_ms(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // After the command's closing parenthesis: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|&t| t > 0)
        .unwrap_or(100) as f64;
    (ticks(14) + ticks(15)) * 1000.0 / hz
}

/// CPU time of every `postgres` process (the benchmark's cluster is the only one), in ms.
fn postgres_cpu_ms() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "postgres")
        })
        .map(cpu_ms)
        .sum()
}

/// The whole machine's busy and total CPU time so far, in ticks (`/proc/stat`).
fn machine_ticks() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: f64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    (total - idle, total)
}

/// Where the CPU went during a phase: the hubs, the hosts, PostgreSQL, this client, and the
/// machine as a whole (other work included).
#[derive(Clone, Copy)]
struct CpuUse {
    hubs: f64,
    hosts: f64,
    pg: f64,
    client: f64,
    busy: f64,
    total: f64,
}

impl CpuUse {
    fn now(hubs: &[Proc], hosts: &[Proc]) -> CpuUse {
        let (busy, total) = machine_ticks();
        CpuUse {
            hubs: hubs.iter().map(|p| cpu_ms(p.child.id())).sum(),
            hosts: hosts.iter().map(|p| cpu_ms(p.child.id())).sum(),
            pg: postgres_cpu_ms(),
            client: cpu_ms(std::process::id()),
            busy,
            total,
        }
    }

    /// Per operation (`n` of them) since `before`: a table value.
    fn per_op(&self, before: &CpuUse, n: usize) -> String {
        let n = n.max(1) as f64;
        let (hubs, hosts, pg, client) = (
            (self.hubs - before.hubs) / n,
            (self.hosts - before.hosts) / n,
            (self.pg - before.pg) / n,
            (self.client - before.client) / n,
        );
        format!(
            "{:.1} ms: hubs {hubs:.1}, hosts {hosts:.1}, PostgreSQL {pg:.1}, client {client:.1}",
            hubs + hosts + pg + client
        )
    }

    /// How busy the machine was since `before`, in percent of all its CPUs.
    fn busy_pct(&self, before: &CpuUse) -> f64 {
        100.0 * (self.busy - before.busy) / (self.total - before.total).max(1.0)
    }
}

/// A `kloigos serve`, killed when dropped.
struct Proc {
    name: String,
    port: u16,
    child: Child,
    dir: PathBuf,
    args: Vec<String>,
}

/// `kloigos serve ARGS` with its log in `dir` (the listeners are the caller's).
fn serve_command(name: &str, dir: &Path, args: &[String]) -> Res<Command> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.log")))
        .map_err(|e| format!("log of {name}: {e}"))?;
    let mut c = Command::new(bin());
    c.arg("serve")
        .args(args)
        .args(["--templates", "/nonexistent"])
        .env("KLOIGOS_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log);
    Ok(c)
}

/// Sends `GET path` every millisecond until it is answered 200; the time that took.
fn first_answer(port: u16, token: &str, path: &str, within: Duration) -> Res<Duration> {
    let t0 = Instant::now();
    loop {
        let a = call(port, token, "GET", path, None);
        if a.code == 200 {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > within {
            return Err(format!(
                "no answer to GET {path} within {within:?}: {}",
                a.code
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Resident set size (`field`: VmRSS, VmHWM) of a process, in MiB.
fn rss_mib(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

impl Proc {
    fn serve(name: &str, dir: &Path, port: u16, args: &[String]) -> Res<Proc> {
        let child = serve_command(name, dir, args)?
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--listen")
            .arg(dir.join(format!("{name}.sock")))
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", bin()))?;
        let mut p = Proc {
            name: name.into(),
            port,
            child,
            dir: dir.to_path_buf(),
            args: args.to_vec(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline || matches!(p.child.try_wait(), Ok(Some(_))) {
                let log =
                    std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
                let _ = p.child.kill();
                return Err(format!("{name} did not come up: {}", log.trim()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(p)
    }

    /// Peak resident set size in MiB (`VmHWM`).
    fn peak_rss_mib(&self) -> Option<f64> {
        rss_mib(self.child.id(), "VmHWM:")
    }

    /// Stops the process and starts it again on the same port and database; returns the
    /// time from the spawn to the first answer of the API (`path`).
    fn restart(&mut self, token: &str, path: &str) -> Res<Duration> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let t0 = Instant::now();
        self.child = serve_command(&self.name, &self.dir, &self.args)?
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", bin()))?;
        first_answer(self.port, token, path, Duration::from_secs(60))?;
        Ok(t0.elapsed())
    }

    /// The same, started by `systemd-socket-activate` on the first connection (as
    /// kloigos.socket does): the time from that connection to its answer. The process is
    /// then this one.
    fn restart_activated(&mut self, token: &str, path: &str) -> Res<Duration> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The activator binds the port and execs kloigos on the first connection, with the
        // socket as fd 3: the same process from then on.
        self.child = Command::new("systemd-socket-activate")
            .arg("-l")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg(bin())
            .args(serve_command(&self.name, &self.dir, &self.args)?.get_args())
            .env("KLOIGOS_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn systemd-socket-activate: {e}"))?;
        // Wait until the activator listens; connecting would activate, so watch /proc.
        let deadline = Instant::now() + Duration::from_secs(10);
        let port_hex = format!(":{:04X} ", self.port);
        loop {
            let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
            if tcp
                .lines()
                .any(|l| l.contains(&port_hex) && l.contains(" 0A "))
            {
                break;
            }
            if Instant::now() > deadline {
                return Err("systemd-socket-activate did not listen".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let t0 = Instant::now();
        let a = call(self.port, token, "GET", path, None);
        if a.code != 200 {
            return Err(format!("socket-activated GET {path}: {}", a.code));
        }
        Ok(t0.elapsed())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn admin_token(dir: &Path) -> Res<(PathBuf, String)> {
    let tokens = dir.join("tokens");
    let out = Command::new(bin())
        .args(["token", "--tokens"])
        .arg(&tokens)
        .args(["create", "--name", "admin", "--role", "admin"])
        .output()
        .map_err(|e| format!("kloigos token: {e}"))?;
    if !out.status.success() {
        return Err(format!("kloigos token create: {out:?}"));
    }
    Ok((tokens, String::from_utf8_lossy(&out.stdout).trim().into()))
}

/// A database of its own on the cluster of `KLOIGOS_TEST_PG`, dropped with this value.
struct PgDb {
    base: String,
    name: String,
}

fn psql(base: &str, sql: &str) -> Res<()> {
    let out = Command::new("psql")
        .arg(format!("{base}/postgres"))
        .args(["-qAtX", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .map_err(|e| format!("psql: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl PgDb {
    fn create(tag: &str) -> Res<PgDb> {
        let base = std::env::var("KLOIGOS_TEST_PG")
            .map_err(|_| "no KLOIGOS_TEST_PG (run scripts/bench.sh)".to_string())?;
        let name = format!("kloigos_bench_{tag}_{}", std::process::id());
        psql(&base, &format!("CREATE DATABASE {name}"))?;
        Ok(PgDb { base, name })
    }
    fn url(&self) -> String {
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
        let _ = psql(
            &self.base,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

/// Two hubs on one PostgreSQL database.
fn hubs(dir: &Path, db: &PgDb, tokens: &Path) -> Res<Vec<Proc>> {
    (0..2)
        .map(|i| {
            let name = format!("hub{i}");
            let root = dir.join(&name);
            fake_root(&root, &name, 4)?;
            Proc::serve(
                &name,
                dir,
                free_port()?,
                &[
                    "--db".into(),
                    db.url(),
                    "--root".into(),
                    root.display().to_string(),
                    "--hostname".into(),
                    name.clone(),
                    "--tokens".into(),
                    tokens.display().to_string(),
                    "--host-stale-after".into(),
                    "3600".into(),
                ],
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Figures.

#[derive(Default)]
struct Table {
    rows: Vec<[String; 3]>,
    notes: Vec<String>,
}

impl Table {
    fn row(&mut self, figure: impl Into<String>, value: impl Into<String>, goal: &str) {
        self.rows.push([figure.into(), value.into(), goal.into()]);
    }
}

fn ms(v: f64) -> String {
    if v.is_nan() {
        "n/a".into()
    } else if v < 10.0 {
        format!("{v:.2} ms")
    } else {
        format!("{v:.0} ms")
    }
}

fn size_label(n: usize) -> String {
    if n >= 1000 && n % 1000 == 0 {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}

// ---------------------------------------------------------------------------------------------
// Phase 1 and 2: fill an inventory through the API and time its lists.

/// Where an inventory-only inventory stands.
struct Filler {
    /// API ports to spread the fill over (one server, or both hubs).
    ports: Vec<u16>,
    token: String,
    servers: usize,
    allocated: usize,
    key: String,
}

impl Filler {
    fn units(&self) -> usize {
        self.servers * UNITS_PER_SERVER
    }

    /// Grows the inventory to `target` units (40% allocated), stopping at `deadline`.
    fn grow(&mut self, target: usize, deadline: Instant, workers: usize) -> Res<()> {
        let want_servers = target.div_ceil(UNITS_PER_SERVER);
        let first = self.servers;
        let cpu_ranges: Vec<String> = (0..UNITS_PER_SERVER)
            .map(|u| format!("{}-{}", u * 4, u * 4 + 3))
            .collect();
        // In batches, so the deadline is checked and the allocations follow the servers.
        let batch = 1000;
        let mut s = first;
        while s < want_servers {
            if Instant::now() > deadline {
                return Ok(());
            }
            let end = (s + batch).min(want_servers);
            let failed = AtomicUsize::new(0);
            let first_error = Mutex::new(None::<String>);
            par(end - s, workers, |k| {
                let i = s + k;
                let body = json!({
                    "hostname": format!("inv{i:06}"),
                    "ip": format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255),
                    "region": REGIONS[i % REGIONS.len()],
                    "zone": ZONES[(i / REGIONS.len()) % ZONES.len()],
                    "cpu_ranges": cpu_ranges,
                    "inventory_only": true,
                });
                let port = self.ports[i % self.ports.len()];
                let a = call(
                    port,
                    &self.token,
                    "POST",
                    "/api/admin/init_server",
                    Some(&body),
                );
                if a.code != 200 {
                    failed.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut e) = first_error.lock() {
                        e.get_or_insert_with(|| format!("init_server: {} {}", a.code, a.json()));
                    }
                }
            });
            if failed.load(Ordering::Relaxed) > 0 {
                let e = first_error.into_inner().ok().flatten().unwrap_or_default();
                return Err(format!(
                    "{} init_server calls failed; first: {e}",
                    failed.into_inner()
                ));
            }
            self.servers = end;
            // 40% of all units allocated, spread over the regions.
            let want_alloc = self.units() * 2 / 5;
            let from = self.allocated;
            let failed = AtomicUsize::new(0);
            let first_error = Mutex::new(None::<String>);
            par(want_alloc - from, workers, |k| {
                let n = from + k;
                let body = json!({
                    "cpu_count": 4,
                    "region": REGIONS[n % REGIONS.len()],
                    "tags": {"bench": "fill"},
                    "ssh_public_key": self.key,
                    "inventory_only": true,
                });
                let port = self.ports[n % self.ports.len()];
                let a = call(
                    port,
                    &self.token,
                    "POST",
                    "/api/compute_units/allocate",
                    Some(&body),
                );
                if a.code != 200 {
                    failed.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut e) = first_error.lock() {
                        e.get_or_insert_with(|| format!("allocate: {} {}", a.code, a.json()));
                    }
                }
            });
            if failed.load(Ordering::Relaxed) > 0 {
                let e = first_error.into_inner().ok().flatten().unwrap_or_default();
                return Err(format!(
                    "{} allocate calls failed; first: {e}",
                    failed.into_inner()
                ));
            }
            self.allocated = want_alloc;
            s = end;
        }
        Ok(())
    }
}

/// Times `runs` GETs of `path` (after one warm-up, which also checks the row count).
fn time_list(
    port: u16,
    token: &str,
    path: &str,
    runs: usize,
) -> Res<(Vec<Duration>, usize, usize)> {
    let a = call(port, token, "GET", path, None);
    if a.code != 200 {
        return Err(format!(
            "GET {path}: {} {}",
            a.code,
            String::from_utf8_lossy(&a.body)
        ));
    }
    let rows = match a.json() {
        Value::Array(v) => v.len(),
        other => {
            return Err(format!(
                "GET {path}: not a list: {:.200}",
                other.to_string()
            ));
        }
    };
    let bytes = a.body.len();
    let mut t = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t0 = Instant::now();
        let a = call(port, token, "GET", path, None);
        t.push(t0.elapsed());
        if a.code != 200 {
            return Err(format!("GET {path}: {}", a.code));
        }
    }
    t.sort();
    Ok((t, rows, bytes))
}

/// `wrk -t2 -c4 -d3s` on `path`: requests per second, or why not.
fn wrk(port: u16, token: &str, path: &str) -> Res<f64> {
    let out = Command::new("wrk")
        .args(["-t2", "-c4", "-d3s", "-H"])
        .arg(format!("Authorization: Bearer {token}"))
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .map_err(|e| format!("wrk: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("Non-2xx") {
        return Err(format!("wrk got errors: {text}"));
    }
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("wrk: no Requests/sec in {text}"))
}

/// The path whose answer counts as "the first answer" of a starting service: one API read
/// (authentication, the database), not a health check.
const FIRST_ANSWER: &str = "/api/compute_units/?compute_id=none";

/// Fills to each size and times the lists on the first process; at the largest size,
/// restarts it for the start-up and memory figures.
fn list_phase(table: &mut Table, backend: &str, procs: &mut [Proc], token: &str) -> Res<()> {
    let ports: Vec<u16> = procs.iter().map(|p| p.port).collect();
    let ports = &ports[..];
    let sizes: Vec<usize> = std::env::var("KLOIGOS_BENCH_SIZES")
        .unwrap_or_else(|_| "1000,10000,100000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let runs = env_num("KLOIGOS_BENCH_RUNS", 10).max(1);
    let workers = env_num("KLOIGOS_BENCH_FILL_CLIENTS", 16);
    let budget = Duration::from_secs(env_num("KLOIGOS_BENCH_FILL_BUDGET", 240) as u64);
    let deadline = Instant::now() + budget;
    let mut f = Filler {
        ports: ports.to_vec(),
        token: token.into(),
        servers: 0,
        allocated: 0,
        key: ssh_key("bench-fill"),
    };
    let mut fill_time = Duration::ZERO;
    for size in sizes {
        let (u0, a0) = (f.units(), f.allocated);
        let t0 = Instant::now();
        f.grow(size, deadline, workers)?;
        let took = t0.elapsed();
        fill_time += took;
        let added = f.units() - u0;
        if added > 0 {
            let calls = (f.servers - u0 / UNITS_PER_SERVER) + (f.allocated - a0);
            say(&format!(
                "{backend}: filled to {} units ({} allocated) in {:.1} s ({:.0} API calls/s)",
                f.units(),
                f.allocated,
                took.as_secs_f64(),
                calls as f64 / took.as_secs_f64().max(1e-9)
            ));
        }
        let reached = f.units();
        if reached == 0 {
            return Err("nothing filled".into());
        }
        let label = if reached < size {
            table.notes.push(format!(
                "{backend}: the fill budget ({} s) ran out at {reached} of {size} units; the \
                 row is measured at {reached}.",
                budget.as_secs()
            ));
            format!("{} (of {})", size_label(reached), size_label(size))
        } else {
            size_label(size)
        };
        let (full, rows, bytes) = time_list(ports[0], token, "/api/compute_units/", runs)?;
        if rows != reached {
            table.notes.push(format!(
                "{backend}: the full list at {label} returned {rows} rows"
            ));
        }
        let goal = if size == 100_000 { "< 50 ms" } else { "" };
        table.row(
            format!(
                "{backend}: full list, {label} units ({:.1} MB), median / p95",
                bytes as f64 / 1e6
            ),
            format!("{} / {}", ms(pct(&full, 50.0)), ms(pct(&full, 95.0))),
            goal,
        );
        let path = format!("/api/compute_units/?{FILTER}");
        let (filt, rows, _) = time_list(ports[0], token, &path, runs)?;
        table.row(
            format!(
                "{backend}: filtered list ({FILTER}), {label} units ({rows} rows), median / p95"
            ),
            format!("{} / {}", ms(pct(&filt, 50.0)), ms(pct(&filt, 95.0))),
            "",
        );
        let wrk_goal = match size {
            1000 => "≥ 10,000 req/s",
            10_000 => "≥ 2,000 req/s",
            _ => "",
        };
        if size <= 10_000 {
            let v = match wrk(ports[0], token, &path) {
                Ok(r) => format!("{r:.0} req/s"),
                Err(e) => {
                    table
                        .notes
                        .push(format!("{backend}: wrk at {label}: {e:.300}"));
                    "n/a".into()
                }
            };
            table.row(
                format!("{backend}: filtered list, {label} units, `wrk -t2 -c4`"),
                v,
                wrk_goal,
            );
        }
        say(&format!(
            "{backend}: {label}: full {} / {}, filtered {} / {}",
            ms(pct(&full, 50.0)),
            ms(pct(&full, 95.0)),
            ms(pct(&filt, 50.0)),
            ms(pct(&filt, 95.0))
        ));
        if reached < size {
            break;
        }
    }
    start_and_memory(
        table,
        backend,
        &mut procs[0],
        token,
        runs,
        &size_label(f.units()),
    )?;
    table.row(
        format!(
            "{backend}: fill through the API ({} units, 40% allocated)",
            f.units()
        ),
        format!(
            "{:.0} s ({:.0} units/s)",
            fill_time.as_secs_f64(),
            f.units() as f64 / fill_time.as_secs_f64().max(1e-9)
        ),
        "",
    );
    Ok(())
}

/// Restarts `p` on its full inventory: the time to its first answer, its idle RSS, its peak
/// RSS over full lists, its RSS once idle again; then the same start through
/// `systemd-socket-activate`.
fn start_and_memory(
    table: &mut Table,
    backend: &str,
    p: &mut Proc,
    token: &str,
    runs: usize,
    label: &str,
) -> Res<()> {
    let mut starts: Vec<Duration> = Vec::new();
    for _ in 0..3 {
        starts.push(p.restart(token, FIRST_ANSWER)?);
    }
    starts.sort();
    table.row(
        format!("{backend}: cold start to the first answer, {label} units (best / worst of 3)"),
        format!("{} / {}", ms(pct(&starts, 0.0)), ms(pct(&starts, 100.0))),
        "< 30 ms",
    );
    std::thread::sleep(Duration::from_secs(1));
    let pid = p.child.id();
    // VmRSS counts the program's code pages mapped from the page cache (shared with every
    // process that runs it, reclaimable); RssAnon is the memory the process holds itself.
    let rss = |pid: u32| match (rss_mib(pid, "VmRSS:"), rss_mib(pid, "RssAnon:")) {
        (Some(r), Some(a)) => format!("{r:.1} MiB ({a:.1} MiB anonymous)"),
        _ => "n/a".into(),
    };
    table.row(
        format!("{backend}: idle RSS after start, {label} units"),
        rss(pid),
        "< 10 MB",
    );
    let (full, _, _) = time_list(p.port, token, "/api/compute_units/", runs)?;
    let peak = rss_mib(pid, "VmHWM:");
    table.row(
        format!(
            "{backend}: peak RSS over {} full lists of {label} units (median {})",
            runs + 1,
            ms(pct(&full, 50.0))
        ),
        peak.map_or("n/a".into(), |m| format!("{m:.1} MiB")),
        "< 100 MB",
    );
    std::thread::sleep(Duration::from_secs(2));
    table.row(
        format!("{backend}: RSS afterwards, idle"),
        rss(pid),
        "< 15 MB",
    );
    let mut act: Vec<Duration> = Vec::new();
    for _ in 0..3 {
        match p.restart_activated(token, FIRST_ANSWER) {
            Ok(d) => act.push(d),
            Err(e) => {
                table.notes.push(format!("{backend}: {e:.300}"));
                break;
            }
        }
    }
    act.sort();
    if !act.is_empty() {
        table.row(
            format!(
                "{backend}: cold start through `systemd-socket-activate`, {label} units \
                 (best / worst of {})",
                act.len()
            ),
            format!("{} / {}", ms(pct(&act, 0.0)), ms(pct(&act, 100.0))),
            "< 30 ms",
        );
    }
    Ok(())
}

fn sqlite_phase(table: &mut Table) -> Res<()> {
    let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let (tokens, token) = admin_token(dir.path())?;
    let root = dir.path().join("root");
    fake_root(&root, "bench-local", 4)?;
    let mut p = Proc::serve(
        "sqlite",
        dir.path(),
        free_port()?,
        &[
            "--db".into(),
            dir.path().join("kloigos.db").display().to_string(),
            "--root".into(),
            root.display().to_string(),
            "--hostname".into(),
            "bench-local".into(),
            "--tokens".into(),
            tokens.display().to_string(),
        ],
    )?;
    let r = list_phase(
        table,
        "SQLite, one host",
        std::slice::from_mut(&mut p),
        &token,
    );
    // For profiling by hand: the filled inventory, its fake root and token file.
    if let Some(keep) = std::env::var_os("KLOIGOS_BENCH_KEEP") {
        drop(p);
        let _ = Command::new("cp")
            .arg("-a")
            .arg(dir.path())
            .arg(&keep)
            .status();
        say(&format!(
            "SQLite inventory kept in {}",
            Path::new(&keep).display()
        ));
    }
    r
}

fn pg_phase(table: &mut Table) -> Res<()> {
    let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let db = PgDb::create("list")?;
    let (tokens, token) = admin_token(dir.path())?;
    let mut hubs = hubs(dir.path(), &db, &tokens)?;
    let r = list_phase(table, "PostgreSQL, two hubs", &mut hubs, &token);
    drop(hubs);
    r
}

// ---------------------------------------------------------------------------------------------
// Phase 3: allocations on a fleet of joined hosts.

fn fleet_phase(table: &mut Table) -> Res<()> {
    let n_hosts = env_num("KLOIGOS_BENCH_HOSTS", 50).max(1);
    let cpus = env_num("KLOIGOS_BENCH_CPUS", 32).max(1);
    let clients = env_num("KLOIGOS_BENCH_CLIENTS", 64).max(1);
    let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let db = PgDb::create("fleet")?;
    let (tokens, admin) = admin_token(dir.path())?;
    let hubs = hubs(dir.path(), &db, &tokens)?;
    let hub = |i: usize| hubs[i % hubs.len()].port;
    let t0 = Instant::now();
    // Hosts: a token from a hub, `kloigos join` to both hubs, then `kloigos serve`.
    let hosts: Vec<Res<Proc>> = par(n_hosts, 8, |i| {
        let name = format!("node{i:03}");
        let hdir = dir.path().join(&name);
        let root = hdir.join("root");
        fake_root(&root, &name, cpus)?;
        let a = call(
            hub(i),
            &admin,
            "POST",
            "/api/admin/hosts",
            Some(&json!({"hostname": name})),
        );
        if a.code != 201 {
            return Err(format!(
                "POST /api/admin/hosts {name}: {} {}",
                a.code,
                a.json()
            ));
        }
        let token_file = hdir.join("token");
        write(&token_file, a.json()["token"].as_str().unwrap_or_default())?;
        let port = free_port()?;
        let db = hdir.join("kloigos.db");
        let out = Command::new(bin())
            .args(["join", "--hub"])
            .arg(format!("http://127.0.0.1:{}", hub(0)))
            .arg("--hub")
            .arg(format!("http://127.0.0.1:{}", hub(1)))
            .arg("--token-file")
            .arg(&token_file)
            .arg("--poke-url")
            .arg(format!("http://127.0.0.1:{port}/api/host/poke"))
            .arg("--root")
            .arg(&root)
            .arg("--db")
            .arg(&db)
            .args(["--hostname", &name, "--templates", "/nonexistent"])
            .output()
            .map_err(|e| format!("kloigos join: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "join {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        // The service listens where the hubs poke it.
        Proc::serve(
            &name,
            &hdir,
            port,
            &[
                "--root".into(),
                root.display().to_string(),
                "--db".into(),
                db.display().to_string(),
                "--hostname".into(),
                name.clone(),
                "--pull-interval".into(),
                "60".into(),
            ],
        )
    });
    let hosts: Vec<Proc> = hosts.into_iter().collect::<Res<_>>()?;
    // Servers, through the hubs, in parallel: each waits for its host to apply and report.
    let ranges: Vec<String> = (0..cpus).map(|c| c.to_string()).collect();
    let inits = par(n_hosts, 16, |i| {
        let body = json!({"hostname": format!("node{i:03}"), "ip": "127.0.0.1",
            "region": REGIONS[i % REGIONS.len()], "zone": ZONES[i % ZONES.len()],
            "cpu_ranges": ranges, "ports_per_cpu": 10});
        let a = call(
            hub(i),
            &admin,
            "POST",
            "/api/admin/init_server",
            Some(&body),
        );
        if a.code == 200 {
            return Ok(());
        }
        let name = format!("node{i:03}");
        let log = |p: PathBuf| {
            let text = std::fs::read_to_string(p).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(5)..].join(" / ")
        };
        Err(format!(
            "init_server {name}: {} {}; its log: {}; hub0's: {}",
            a.code,
            a.json(),
            log(dir.path().join(&name).join(format!("{name}.log"))),
            log(dir.path().join("hub0.log"))
        ))
    });
    inits.into_iter().collect::<Res<Vec<()>>>()?;
    let units = n_hosts * cpus;
    say(&format!(
        "fleet: {n_hosts} hosts joined and initialised ({units} units) in {:.1} s",
        t0.elapsed().as_secs_f64()
    ));

    let key = ssh_key("bench-fleet");
    let key = key.as_str();
    // One client first: the latency of an allocation without queueing behind others.
    let mut solo = Vec::new();
    let mut solo_ids = Vec::new();
    for c in 0..cpus.min(units) {
        let body = json!({"cpu_count": 1, "tags": {"client": "solo"}, "ssh_public_key": key});
        let t = Instant::now();
        let a = call(
            hub(c),
            &admin,
            "POST",
            "/api/compute_units/allocate",
            Some(&body),
        );
        if a.code != 200 {
            return Err(format!("allocate (one client): {} {}", a.code, a.json()));
        }
        solo.push(t.elapsed());
        solo_ids.extend(a.json()["compute_id"].as_str().map(String::from));
    }
    solo.sort();
    table.row(
        format!(
            "Fleet: allocate latency with one client ({} allocations), p50 / p99",
            solo.len()
        ),
        format!("{} / {}", ms(pct(&solo, 50.0)), ms(pct(&solo, 99.0))),
        "",
    );
    // Allocate until capacity is used up: each client stops at its first 409 (nothing FREE).
    let done = AtomicBool::new(false);
    let lat = Mutex::new(Vec::<Duration>::with_capacity(units));
    let ids = Mutex::new(Vec::<String>::with_capacity(units));
    let errors = Mutex::new(Vec::<String>::new());
    let t_alloc = Instant::now();
    let cpu_alloc = CpuUse::now(&hubs, &hosts);
    let admin_ref = admin.as_str();
    std::thread::scope(|s| {
        for c in 0..clients {
            let (done, lat, ids, errors, admin) = (&done, &lat, &ids, &errors, admin_ref);
            s.spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    let body =
                        json!({"cpu_count": 1, "tags": {"client": c}, "ssh_public_key": key});
                    let t = Instant::now();
                    let a = call(
                        hub(c),
                        admin,
                        "POST",
                        "/api/compute_units/allocate",
                        Some(&body),
                    );
                    let took = t.elapsed();
                    match a.code {
                        200 => {
                            if let Ok(mut l) = lat.lock() {
                                l.push(took);
                            }
                            if let (Ok(mut v), Some(id)) =
                                (ids.lock(), a.json()["compute_id"].as_str())
                            {
                                v.push(id.to_string());
                            }
                        }
                        409 => break,
                        _ => {
                            if let Ok(mut e) = errors.lock() {
                                e.push(format!("{} {}", a.code, a.json()));
                                if e.len() > 100 {
                                    done.store(true, Ordering::Relaxed);
                                }
                            }
                        }
                    }
                }
            });
        }
    });
    let alloc_wall = t_alloc.elapsed();
    let cpu_alloc_end = CpuUse::now(&hubs, &hosts);
    let mut lat = lat.into_inner().unwrap_or_default();
    lat.sort();
    let mut ids = ids.into_inner().unwrap_or_default();
    let alloc_errors = errors.into_inner().unwrap_or_default();
    let rate = lat.len() as f64 / alloc_wall.as_secs_f64().max(1e-9);
    say(&format!(
        "fleet: {} allocations in {:.1} s ({rate:.0}/s), p50 {} p99 {}, {} errors",
        lat.len(),
        alloc_wall.as_secs_f64(),
        ms(pct(&lat, 50.0)),
        ms(pct(&lat, 99.0)),
        alloc_errors.len()
    ));
    let what = format!("{n_hosts} hosts, {units} units, {clients} clients");
    table.row(
        format!(
            "Fleet ({what}): allocations until full ({} by the clients after the one-client ones, {} errors)",
            lat.len(),
            alloc_errors.len()
        ),
        format!("{rate:.0} /s"),
        ">= 500 /s",
    );
    table.row(
        "Fleet: allocate latency p50 / p99",
        format!("{} / {}", ms(pct(&lat, 50.0)), ms(pct(&lat, 99.0))),
        "p99 < 100 ms",
    );
    table.row(
        "Fleet: CPU time per allocation (sum over the processes)",
        cpu_alloc_end.per_op(&cpu_alloc, lat.len()),
        "",
    );
    table.row(
        "Fleet: machine busy while allocating (all processes, other work included)",
        format!("{:.0}% of its CPUs", cpu_alloc_end.busy_pct(&cpu_alloc)),
        "",
    );
    if let Some(e) = alloc_errors.first() {
        table
            .notes
            .push(format!("fleet allocate: first error: {e:.300}"));
    }

    // Deallocate everything that was allocated.
    ids.extend(solo_ids);
    let t_dealloc = Instant::now();
    let cpu_dealloc = CpuUse::now(&hubs, &hosts);
    let results = par(ids.len(), clients, |i| {
        let t = Instant::now();
        let a = call(
            hub(i),
            &admin,
            "DELETE",
            &format!("/api/compute_units/deallocate/{}", ids[i]),
            None,
        );
        (
            t.elapsed(),
            a.code,
            (a.code != 200).then(|| format!("{} {}", a.code, a.json())),
        )
    });
    let dealloc_wall = t_dealloc.elapsed();
    let cpu_dealloc_end = CpuUse::now(&hubs, &hosts);
    let mut dl: Vec<Duration> = results.iter().filter(|r| r.1 == 200).map(|r| r.0).collect();
    dl.sort();
    let dealloc_errors: Vec<&String> = results.iter().filter_map(|r| r.2.as_ref()).collect();
    let drate = dl.len() as f64 / dealloc_wall.as_secs_f64().max(1e-9);
    say(&format!(
        "fleet: {} deallocations in {:.1} s ({drate:.0}/s), p50 {} p99 {}, {} errors",
        dl.len(),
        dealloc_wall.as_secs_f64(),
        ms(pct(&dl, 50.0)),
        ms(pct(&dl, 99.0)),
        dealloc_errors.len()
    ));
    table.row(
        format!(
            "Fleet: deallocations of all of them ({} done, {} errors)",
            dl.len(),
            dealloc_errors.len()
        ),
        format!("{drate:.0} /s"),
        "",
    );
    table.row(
        "Fleet: deallocate latency p50 / p99",
        format!("{} / {}", ms(pct(&dl, 50.0)), ms(pct(&dl, 99.0))),
        "",
    );
    table.row(
        "Fleet: CPU time per deallocation (sum over the processes)",
        cpu_dealloc_end.per_op(&cpu_dealloc, dl.len()),
        "",
    );
    if let Some(e) = dealloc_errors.first() {
        table
            .notes
            .push(format!("fleet deallocate: first error: {e:.300}"));
    }
    for h in hubs.iter().take(1) {
        if let Some(m) = h.peak_rss_mib() {
            table.row(
                format!("Fleet {} after the runs: peak RSS (VmHWM)", h.name),
                format!("{m:.0} MiB"),
                "",
            );
        }
    }
    let peaks: Vec<f64> = hosts.iter().filter_map(Proc::peak_rss_mib).collect();
    if let Some(max) = peaks.iter().cloned().reduce(f64::max) {
        table.row(
            format!(
                "Fleet host ({cpus} units) after the runs: peak RSS (VmHWM), largest of {}",
                peaks.len()
            ),
            format!("{max:.0} MiB"),
            "",
        );
    }
    drop(hosts);
    drop(hubs);
    Ok(())
}

// ---------------------------------------------------------------------------------------------

fn machine() -> (String, String, String) {
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kb: f64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0.0);
    let commit = Command::new("git")
        .args([
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "describe",
            "--always",
            "--dirty",
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    (
        date,
        format!(
            "{nproc} CPUs ({model}), {:.0} GB RAM",
            mem_kb / 1024.0 / 1024.0
        ),
        commit,
    )
}

/// The rows and notes of the VM part (`scripts/bench-vm.sh`, run before this program by
/// `scripts/bench.sh`): `row|figure|measured|goal` and `note|text` lines.
fn vm_rows(table: &mut Table) {
    let Ok(path) = std::env::var("KLOIGOS_BENCH_VM_ROWS") else {
        return;
    };
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    for line in text.lines() {
        let mut f = line.split('|');
        match (f.next(), f.next(), f.next(), f.next()) {
            (Some("row"), Some(fig), Some(val), goal) => table.row(fig, val, goal.unwrap_or("")),
            (Some("note"), Some(n), _, _) => table.notes.push(n.to_string()),
            _ => {}
        }
    }
}

fn main() {
    let phases = std::env::var("KLOIGOS_BENCH_PHASES").unwrap_or_else(|_| "sqlite,pg,fleet".into());
    let want = |p: &str| phases.split(',').any(|x| x.trim() == p);
    let (date, host, commit) = machine();
    let mut table = Table::default();
    let started = Instant::now();
    if !nix::unistd::geteuid().is_root() {
        table
            .notes
            .push("not run as root: fake roots must be root-owned; nothing measured".into());
    } else {
        let phases: [(&str, Phase); 3] = [
            ("sqlite", sqlite_phase),
            ("pg", pg_phase),
            ("fleet", fleet_phase),
        ];
        for (name, run) in phases {
            if !want(name) {
                continue;
            }
            say(&format!("phase {name}"));
            let t0 = Instant::now();
            if let Err(e) = run(&mut table) {
                say(&format!("phase {name} failed: {e}"));
                table
                    .notes
                    .push(format!("phase {name} not completed: {e:.400}"));
            }
            say(&format!(
                "phase {name}: {:.0} s",
                t0.elapsed().as_secs_f64()
            ));
        }
    }
    vm_rows(&mut table);
    println!("Kloigos benchmark, {date}; {host}; commit {commit}; release build.");
    println!(
        "Client and servers share the machine's CPUs (with other work on it): the figures are \
         indicative. Whole run: {:.0} s.",
        started.elapsed().as_secs_f64()
    );
    println!();
    println!("| figure | measured | goal |");
    println!("|---|---|---|");
    for [f, v, g] in &table.rows {
        println!("| {f} | {v} | {g} |");
    }
    if !table.notes.is_empty() {
        println!();
        for n in &table.notes {
            println!("- {n}");
        }
    }
}
