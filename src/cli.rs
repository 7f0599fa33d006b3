//! The `kloigos` command line: the service itself (`serve`, `reconcile`, `render`) and a client
//! for every API operation, over the unix socket by default or TCP with `--url`, printing
//! tables or `--json`.

use crate::service::{Config, Kloigos};
use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::Duration;

pub const DEFAULT_SOCKET: &str = "/run/kloigos/kloigos.sock";

#[derive(Parser, Debug)]
#[command(
    name = "kloigos",
    version,
    about = "VM-like compute units cut from one Linux host with systemd and nftables"
)]
pub struct Cli {
    /// Unix socket of the API (client commands).
    #[arg(long, global = true, env = "KLOIGOS_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Talk to the API over TCP instead, e.g. http://127.0.0.1:8000.
    #[arg(long, global = true, env = "KLOIGOS_URL")]
    pub url: Option<String>,
    /// Print raw JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct Local {
    /// SQLite database of the inventory.
    #[arg(
        long,
        env = "KLOIGOS_DB",
        default_value = "/var/lib/kloigos/kloigos.db"
    )]
    pub db: PathBuf,
    /// Root of the host to manage; anything but / renders files there and runs no system tool.
    #[arg(long, env = "KLOIGOS_ROOT", default_value = "/")]
    pub root: PathBuf,
    /// Template directories, later ones override earlier ones file by file.
    #[arg(long = "templates", env = "KLOIGOS_TEMPLATES", value_delimiter = ':',
          default_values = ["/usr/lib/kloigos/templates", "/etc/kloigos/templates"])]
    pub templates: Vec<PathBuf>,
    /// Name of this host (default: the system's hostname, or <root>/etc/hostname for a demo root).
    #[arg(long = "hostname", env = "KLOIGOS_HOSTNAME")]
    pub hostname: Option<String>,
    /// Seconds a deallocated unit's processes get between SIGTERM and SIGKILL.
    #[arg(long, default_value_t = 3.0)]
    pub kill_grace: f64,
}

impl Local {
    pub fn config(&self) -> Config {
        Config {
            db: self.db.clone(),
            root: self.root.clone(),
            templates: self.templates.clone(),
            hostname: self.hostname.clone(),
            kill_grace: Duration::from_secs_f64(self.kill_grace.max(0.0)),
        }
    }
}

/// What keeps callers from exhausting the service or driving it from a web page.
#[derive(Args, Debug, Clone)]
pub struct Guard {
    /// Role of a TCP caller without a token (admin, user or readonly). Unset: 401. Only for
    /// clients that cannot send a header, on hosts where every local user is trusted. Such
    /// callers all look alike: none of them may deallocate a unit unless the role is admin.
    #[arg(long, env = "KLOIGOS_TCP_ANONYMOUS_ROLE")]
    pub tcp_anonymous_role: Option<crate::auth::Role>,
    /// Host names (besides localhost, 127.0.0.1 and [::1]) TCP requests may be addressed to,
    /// comma separated; also the web origins allowed to make changes.
    #[arg(long, env = "KLOIGOS_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,
    /// Seconds a client has to send a request's headers (also the keep-alive idle limit).
    #[arg(long, env = "KLOIGOS_HEADER_TIMEOUT", default_value_t = 10.0)]
    pub header_timeout: f64,
    /// Seconds a client has to send a request's body.
    #[arg(long, env = "KLOIGOS_BODY_TIMEOUT", default_value_t = 30.0)]
    pub body_timeout: f64,
    /// Open connections one local non-admin user may have on the unix socket, and one local
    /// user other than root over loopback TCP.
    #[arg(long, env = "KLOIGOS_MAX_CONNECTIONS_PER_USER", default_value_t = 32)]
    pub max_connections_per_user: usize,
    /// Open connections all local non-admin users together may have on the unix socket (root
    /// and group kloigos are never capped).
    #[arg(long, env = "KLOIGOS_MAX_USER_CONNECTIONS", default_value_t = 512)]
    pub max_user_connections: usize,
    /// Open TCP connections in all (root's from loopback are not counted).
    #[arg(long, env = "KLOIGOS_MAX_TCP_CONNECTIONS", default_value_t = 256)]
    pub max_tcp_connections: usize,
    /// Days audit rows are kept (0: forever). Applied at start and hourly.
    #[arg(long, env = "KLOIGOS_AUDIT_RETENTION_DAYS", default_value_t = 365)]
    pub audit_retention_days: u32,
    /// Audit rows kept at most, the newest (0: no limit). Applied at start and hourly.
    #[arg(long, env = "KLOIGOS_AUDIT_MAX_ROWS", default_value_t = 100_000)]
    pub audit_max_rows: u64,
    /// Seconds of the window in which a source's first few refusals are recorded; the rest are
    /// summarized in one row.
    #[arg(long, env = "KLOIGOS_AUDIT_DENIAL_WINDOW", default_value_t = 60)]
    pub audit_denial_window: u64,
}

fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s.max(0.001)).unwrap_or(Duration::from_secs(3600))
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve the API (sockets from systemd, or --listen).
    Serve {
        #[command(flatten)]
        local: Local,
        /// Listen on ADDR (host:port or a unix socket path); repeatable. Without it, the
        /// sockets come from systemd.
        #[arg(long)]
        listen: Vec<String>,
        /// Exit after this many seconds without a connection (0: never).
        #[arg(long, env = "KLOIGOS_IDLE_TIMEOUT", default_value_t = 0)]
        idle_timeout: u64,
        /// Skip the reconcile pass at start.
        #[arg(long)]
        no_reconcile: bool,
        /// Bearer tokens for TCP callers (managed with `kloigos token`).
        #[arg(long, env = "KLOIGOS_TOKENS", default_value = crate::auth::DEFAULT_TOKENS)]
        tokens: PathBuf,
        #[command(flatten)]
        guard: Guard,
    },
    /// Manage the bearer tokens of TCP clients (run as root on the host).
    Token {
        #[arg(long, env = "KLOIGOS_TOKENS", default_value = crate::auth::DEFAULT_TOKENS)]
        tokens: PathBuf,
        #[command(subcommand)]
        action: TokenAction,
    },
    /// Re-render everything from the database, repair drift, finish half-done operations.
    Reconcile {
        #[command(flatten)]
        local: Local,
    },
    /// Print (or write under --out) every file Kloigos renders for this host, changing nothing.
    Render {
        #[command(flatten)]
        local: Local,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Check that this host gives the isolation what it needs: SSH logins land in the unit's
    /// slice (sshd UsePAM, pam_systemd in sshd's session stack), cgroup v2 with cpuset, nft,
    /// logind. Exits non-zero with the list of problems.
    Doctor {
        /// Root of the host to check.
        #[arg(long, env = "KLOIGOS_ROOT", default_value = "/")]
        root: PathBuf,
    },
    /// List compute units.
    Units {
        #[arg(long)]
        compute_id: Option<String>,
        #[arg(long)]
        hostname: Option<String>,
        #[arg(long)]
        region: Option<String>,
        #[arg(long)]
        zone: Option<String>,
        #[arg(long)]
        cpu_count: Option<String>,
        #[arg(long)]
        deployment_id: Option<String>,
        #[arg(long)]
        status: Option<String>,
    },
    /// Show one compute unit.
    Unit { compute_id: String },
    /// Allocate a FREE compute unit.
    Allocate {
        #[arg(long, default_value_t = 4)]
        cpu_count: i64,
        #[arg(long)]
        region: Option<String>,
        #[arg(long)]
        zone: Option<String>,
        /// KEY=VALUE (a string), or KEY:=JSON (an integer or a list of strings); repeatable.
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// The owner's public key: a file, `-` for stdin, or the key itself.
        #[arg(long)]
        ssh_key: String,
    },
    /// Deallocate a compute unit.
    Deallocate { compute_id: String },
    /// List servers.
    Servers,
    /// Register a server and cut it into compute units.
    InitServer {
        #[arg(long)]
        hostname: String,
        #[arg(long)]
        ip: String,
        #[arg(long)]
        region: String,
        #[arg(long)]
        zone: String,
        /// CPU lists, one per unit (`0-3 4-7`, `0-15:2`).
        #[arg(required = true)]
        cpu_ranges: Vec<String>,
        #[arg(long)]
        port_base: Option<u16>,
        #[arg(long)]
        ports_per_cpu: Option<u16>,
        #[arg(long)]
        uid_base: Option<u32>,
        /// Limits as JSON, e.g. '{"tasks_max": 512, "memory_max_per_cpu": 1073741824}'.
        #[arg(long)]
        limits: Option<String>,
    },
    /// Remove a server and everything Kloigos made on it.
    Decommission {
        hostname: String,
        /// Also when units are still allocated (their owners lose them).
        #[arg(long)]
        force: bool,
    },
    /// The audit log, newest first.
    Events {
        #[arg(long)]
        compute_id: Option<String>,
        #[arg(long)]
        hostname: Option<String>,
        #[arg(long)]
        operation: Option<String>,
        #[arg(long)]
        actor: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenAction {
    /// Create a token and print its secret (shown only once).
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        role: crate::auth::Role,
    },
    /// List tokens (names, roles, creation times; never secrets).
    List,
    /// Revoke a token by name.
    Revoke { name: String },
}

/// Runs a command; the listeners of `serve` must already be taken (see main).
pub fn run(cli: Cli, systemd_listeners: Vec<crate::server::Listener>) -> Result<()> {
    match cli.command {
        Command::Serve {
            local,
            listen,
            idle_timeout,
            no_reconcile,
            tokens,
            guard,
        } => serve(
            local,
            listen,
            idle_timeout,
            no_reconcile,
            crate::auth::Tokens::new(tokens),
            guard,
            systemd_listeners,
        ),
        Command::Token { tokens, action } => {
            let t = crate::auth::Tokens::new(&tokens);
            match action {
                TokenAction::Create { name, role } => println!("{}", t.create(&name, role)?),
                TokenAction::List => {
                    let entries = t.list()?;
                    if cli.json {
                        println!("{}", serde_json::to_string_pretty(&entries)?);
                    } else {
                        print_table(
                            &["NAME", "ROLE", "CREATED"],
                            entries
                                .iter()
                                .map(|e| {
                                    vec![e.name.clone(), e.role.to_string(), e.created.clone()]
                                })
                                .collect(),
                        );
                    }
                }
                TokenAction::Revoke { name } => {
                    if !t.revoke(&name)? {
                        bail!("no token named {name:?} in {}", tokens.display());
                    }
                    println!("token {name} revoked");
                }
            }
            Ok(())
        }
        Command::Reconcile { local } => {
            let k = Kloigos::open(&local.config())?;
            let report = k.reconcile(&actor())?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else if report.is_clean() {
                println!("reconcile: nothing to do");
            } else {
                for (what, items) in [
                    ("written", &report.files_changed),
                    ("removed", &report.files_removed),
                    ("unit", &report.units_fixed),
                    ("server", &report.servers_fixed),
                    ("FAILED", &report.units_failed),
                ] {
                    for i in items {
                        println!("{what}: {}", printable(i));
                    }
                }
            }
            if !report.units_failed.is_empty() {
                bail!(
                    "{} unit(s) could not be repaired (marked with a problem; see above)",
                    report.units_failed.len()
                );
            }
            Ok(())
        }
        Command::Render { local, out } => {
            let k = Kloigos::open(&local.config())?;
            let files = k.render_all()?;
            match out {
                Some(dir) => {
                    let host = crate::apply::Host::new(&dir);
                    for f in &files {
                        host.write(f, None)?;
                        println!("{}", host.path(&f.path).display());
                    }
                }
                None => {
                    for (name, source) in k.template_sources() {
                        println!("# template {name}: {source}");
                    }
                    for f in &files {
                        println!("==> /{} <==\n{}", f.path.display(), f.content);
                    }
                }
            }
            Ok(())
        }
        Command::Doctor { root } => doctor(&root, cli.json),
        other => client(&cli.socket, cli.url.as_deref(), cli.json, other),
    }
}

fn doctor(root: &std::path::Path, as_json: bool) -> Result<()> {
    let live = crate::apply::Host::new(root).is_live();
    let sshd_t = if live {
        crate::doctor::sshd_effective_config()
    } else {
        None
    };
    let checks = crate::doctor::checks(root, sshd_t.as_deref());
    if as_json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        for c in &checks {
            println!(
                "{} {}: {}",
                if c.ok { "ok  " } else { "FAIL" },
                c.name,
                c.detail
            );
        }
    }
    let failed: Vec<&str> = checks.iter().filter(|c| !c.ok).map(|c| c.name).collect();
    if !failed.is_empty() {
        bail!("{} problem(s): {}", failed.len(), failed.join(", "));
    }
    Ok(())
}

/// The audit log's name for whoever runs a local command, as the API would name them.
fn actor() -> String {
    let caller = crate::auth::unix_caller(
        nix::unistd::getuid().as_raw(),
        nix::unistd::getgid().as_raw(),
    );
    format!("{} cli", caller.actor)
}

fn serve(
    local: Local,
    listen: Vec<String>,
    idle_timeout: u64,
    no_reconcile: bool,
    tokens: crate::auth::Tokens,
    guard: Guard,
    systemd_listeners: Vec<crate::server::Listener>,
) -> Result<()> {
    crate::server::raise_fd_limit();
    let mut listeners = systemd_listeners;
    for addr in &listen {
        listeners
            .push(crate::server::bind(addr).with_context(|| format!("cannot listen on {addr}"))?);
    }
    if listeners.is_empty() {
        bail!("no socket to serve on: pass --listen ADDR, or start through kloigos.socket");
    }
    let k = Kloigos::open(&local.config())
        .with_context(|| format!("cannot open the inventory {}", local.db.display()))?;
    if !no_reconcile {
        // Whatever reconcile could not repair is reported (and units marked and audited);
        // the API stays up so an admin can see and fix it.
        match k.reconcile("kloigos serve (start)") {
            Ok(report) if !report.units_failed.is_empty() => {
                tracing::error!(?report, "reconciled at start; some units need an admin");
            }
            Ok(report) if !report.is_clean() => tracing::info!(?report, "reconciled at start"),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "reconcile at start failed; serving anyway"),
        }
    }
    let units = k.units(&Default::default())?;
    let allocated = units
        .iter()
        .filter(|u| u.status == crate::store::UnitStatus::Allocated)
        .count();
    let status = format!(
        "{} units, {allocated} allocated, host {} (root {})",
        units.len(),
        k.local_hostname(),
        local.root.display()
    );
    let mut app = crate::api::App::new(k, tokens);
    app.tcp_anonymous = guard.tcp_anonymous_role;
    app.allowed_hosts = guard
        .allowed_hosts
        .iter()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .collect();
    app.body_timeout = secs(guard.body_timeout);
    app.denials = std::sync::Mutex::new(crate::audit::DenialLimiter::new(
        Duration::from_secs(guard.audit_denial_window.max(1)),
        crate::audit::DENIALS_PER_WINDOW,
    ));
    let state = std::sync::Arc::new(app);
    let retention = crate::audit::Retention {
        days: guard.audit_retention_days,
        max_rows: guard.audit_max_rows,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.spawn(crate::api::housekeeping(state.clone(), retention));
    rt.block_on(crate::server::serve(
        listeners,
        crate::api::router(state),
        crate::server::ServeOptions {
            idle_timeout: (idle_timeout > 0).then(|| Duration::from_secs(idle_timeout)),
            status,
            header_timeout: secs(guard.header_timeout),
            caps: crate::server::Caps {
                per_user: guard.max_connections_per_user.max(1),
                users: guard.max_user_connections.max(1),
                tcp: guard.max_tcp_connections.max(1),
            },
        },
    ))?;
    Ok(())
}

// ---- the client --------------------------------------------------------------------------

struct Reply {
    status: u16,
    body: Value,
}

async fn request(
    socket: &std::path::Path,
    url: Option<&str>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<Reply> {
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let (host, send) = match url {
        Some(u) => {
            let rest = u
                .strip_prefix("http://")
                .ok_or_else(|| anyhow!("--url must start with http:// (got {u})"))?;
            let authority = rest.split('/').next().unwrap_or(rest).to_string();
            let stream = tokio::net::TcpStream::connect(&authority)
                .await
                .with_context(|| format!("cannot connect to {authority}"))?;
            let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            (authority, send)
        }
        None => {
            let stream = tokio::net::UnixStream::connect(socket)
                .await
                .with_context(|| {
                    format!(
                        "cannot connect to {} (is kloigos.socket running? or use --url)",
                        socket.display()
                    )
                })?;
            let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            ("localhost".to_string(), send)
        }
    };
    let mut send = send;
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, host)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(payload)))?;
    let resp = send.send_request(req).await?;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await?.to_bytes();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Ok(Reply { status, body })
}

fn query(pairs: &[(&str, &Option<String>)]) -> String {
    let q: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v))))
        .collect();
    if q.is_empty() {
        String::new()
    } else {
        format!("?{}", q.join("&"))
    }
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Explains an error reply on stderr.
fn explain(reply: &Reply) -> anyhow::Error {
    match reply.body.get("detail") {
        Some(Value::Array(items)) => {
            let lines: Vec<String> = items
                .iter()
                .map(|i| {
                    let loc: Vec<String> = i["loc"]
                        .as_array()
                        .map(|l| {
                            l.iter()
                                .map(|p| {
                                    p.as_str()
                                        .map(String::from)
                                        .unwrap_or_else(|| p.to_string())
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    format!(
                        "  {}: {}",
                        printable(&loc.join(".")),
                        printable(i["msg"].as_str().unwrap_or("invalid"))
                    )
                })
                .collect();
            anyhow!(
                "invalid request (HTTP {}):\n{}",
                reply.status,
                lines.join("\n")
            )
        }
        Some(Value::String(d)) => anyhow!("{} (HTTP {})", printable(d), reply.status),
        _ => anyhow!("HTTP {}: {}", reply.status, reply.body),
    }
}

fn read_key(arg: &str) -> Result<String> {
    if arg == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
        return Ok(s);
    }
    let looks_like_key = ["ssh-", "ecdsa-", "sk-"].iter().any(|p| arg.starts_with(p));
    if looks_like_key {
        return Ok(arg.to_string());
    }
    std::fs::read_to_string(arg).with_context(|| format!("cannot read the key file {arg}"))
}

fn parse_tags(tags: &[String]) -> Result<Value> {
    let mut out = serde_json::Map::new();
    for t in tags {
        if let Some((k, v)) = t.split_once(":=") {
            let v: Value =
                serde_json::from_str(v).with_context(|| format!("--tag {t}: not JSON"))?;
            out.insert(k.to_string(), v);
        } else if let Some((k, v)) = t.split_once('=') {
            out.insert(k.to_string(), Value::String(v.to_string()));
        } else {
            bail!("--tag {t}: expected KEY=VALUE or KEY:=JSON");
        }
    }
    Ok(Value::Object(out))
}

fn client(socket: &std::path::Path, url: Option<&str>, as_json: bool, cmd: Command) -> Result<()> {
    let (method, path, body) = match &cmd {
        Command::Units {
            compute_id,
            hostname,
            region,
            zone,
            cpu_count,
            deployment_id,
            status,
        } => (
            "GET",
            format!(
                "/api/compute_units/{}",
                query(&[
                    ("compute_id", compute_id),
                    ("hostname", hostname),
                    ("region", region),
                    ("zone", zone),
                    ("cpu_count", cpu_count),
                    ("deployment_id", deployment_id),
                    ("status", status),
                ])
            ),
            None,
        ),
        Command::Unit { compute_id } => (
            "GET",
            format!("/api/compute_units/{}", encode(compute_id)),
            None,
        ),
        Command::Allocate {
            cpu_count,
            region,
            zone,
            tags,
            ssh_key,
        } => (
            "POST",
            "/api/compute_units/allocate".to_string(),
            Some(json!({
                "cpu_count": cpu_count,
                "region": region,
                "zone": zone,
                "tags": if tags.is_empty() { Value::Null } else { parse_tags(tags)? },
                "ssh_public_key": read_key(ssh_key)?.trim(),
            })),
        ),
        Command::Deallocate { compute_id } => (
            "DELETE",
            format!("/api/compute_units/deallocate/{}", encode(compute_id)),
            None,
        ),
        Command::Servers => ("GET", "/api/admin/servers".to_string(), None),
        Command::InitServer {
            hostname,
            ip,
            region,
            zone,
            cpu_ranges,
            port_base,
            ports_per_cpu,
            uid_base,
            limits,
        } => {
            let mut body = json!({
                "ip": ip, "region": region, "zone": zone, "hostname": hostname, "cpu_ranges": cpu_ranges,
            });
            for (k, v) in [
                ("port_base", port_base.map(u32::from)),
                ("ports_per_cpu", ports_per_cpu.map(u32::from)),
                ("uid_base", *uid_base),
            ] {
                if let Some(v) = v {
                    body[k] = json!(v);
                }
            }
            if let Some(l) = limits {
                body["limits"] = serde_json::from_str(l).context("--limits: not JSON")?;
            }
            ("POST", "/api/admin/init_server".to_string(), Some(body))
        }
        Command::Decommission { hostname, force } => (
            "DELETE",
            format!(
                "/api/admin/decommission_server/{}{}",
                encode(hostname),
                if *force { "?force=true" } else { "" }
            ),
            None,
        ),
        Command::Events {
            compute_id,
            hostname,
            operation,
            actor,
            limit,
        } => (
            "GET",
            format!(
                "/api/events{}",
                query(&[
                    ("compute_id", compute_id),
                    ("hostname", hostname),
                    ("operation", operation),
                    ("actor", actor),
                    ("limit", &Some(limit.to_string())),
                ])
            ),
            None,
        ),
        Command::Serve { .. }
        | Command::Reconcile { .. }
        | Command::Render { .. }
        | Command::Doctor { .. }
        | Command::Token { .. } => {
            unreachable!("local commands are handled by run()")
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let reply = rt.block_on(request(socket, url, method, &path, body))?;
    if !(200..300).contains(&reply.status) {
        return Err(explain(&reply));
    }
    if as_json {
        println!("{}", serde_json::to_string_pretty(&reply.body)?);
        return Ok(());
    }
    match cmd {
        Command::Units { .. } => {
            print_units(reply.body.as_array().map(Vec::as_slice).unwrap_or(&[]))
        }
        Command::Unit { .. } | Command::Allocate { .. } => {
            print_units(std::slice::from_ref(&reply.body))
        }
        Command::Servers => print_table(
            &[
                "HOSTNAME",
                "IP",
                "REGION",
                "ZONE",
                "STATUS",
                "CPU RANGES",
                "LOCAL",
            ],
            reply
                .body
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or(&[])
                .iter()
                .map(|s| {
                    vec![
                        text(&s["hostname"]),
                        text(&s["ip"]),
                        text(&s["region"]),
                        text(&s["zone"]),
                        text(&s["status"]),
                        s["cpu_ranges"]
                            .as_array()
                            .map(|a| a.iter().map(text).collect::<Vec<_>>().join(" "))
                            .unwrap_or_default(),
                        text(&s["local"]),
                    ]
                })
                .collect(),
        ),
        Command::Events { .. } => print_table(
            &[
                "ID",
                "TIME",
                "ACTOR",
                "OPERATION",
                "TARGET",
                "RESULT",
                "DETAIL",
            ],
            reply
                .body
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or(&[])
                .iter()
                .map(|e| {
                    let target = if e["compute_id"].is_string() {
                        text(&e["compute_id"])
                    } else {
                        text(&e["hostname"])
                    };
                    vec![
                        text(&e["id"]),
                        text(&e["time"]),
                        text(&e["actor"]),
                        text(&e["operation"]),
                        target,
                        text(&e["result"]),
                        text(&e["detail"]),
                    ]
                })
                .collect(),
        ),
        Command::Deallocate { compute_id } => println!("{compute_id} deallocated"),
        Command::InitServer { hostname, .. } => println!("server {hostname} initialized"),
        Command::Decommission { hostname, .. } => println!("server {hostname} decommissioned"),
        _ => {}
    }
    Ok(())
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn print_units(units: &[Value]) {
    print_table(
        &[
            "COMPUTE_ID",
            "STATUS",
            "CPUS",
            "CPU_RANGE",
            "PORTS",
            "USER",
            "IP",
            "REGION-ZONE",
            "STARTED_AT",
            "TAGS",
        ],
        units
            .iter()
            .map(|u| {
                vec![
                    text(&u["compute_id"]),
                    text(&u["status"]),
                    text(&u["cpu_count"]),
                    text(&u["cpu_range"]),
                    text(&u["ports_range"]),
                    text(&u["user"]),
                    text(&u["ip"]),
                    format!("{}-{}", text(&u["region"]), text(&u["zone"])),
                    text(&u["started_at"]),
                    if u["tags"].is_null() {
                        "-".into()
                    } else {
                        u["tags"].to_string()
                    },
                ]
            })
            .collect(),
    );
}

/// `s` safe to print on a terminal: control characters (newlines, escape sequences, C1 codes)
/// and bidirectional overrides, which a tenant can put in a file name that reaches an error or
/// a `user` caller in a tag, are shown escaped (`\n`, `\u{1b}`) instead of acting.
fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    let bad = |c: char| {
        c.is_control()
            || matches!(c, '\u{200e}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !s.chars().any(bad) {
        return s.into();
    }
    s.chars()
        .map(|c| {
            if bad(c) {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

fn print_table(headers: &[&str], rows: Vec<Vec<String>>) {
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|r| r.iter().map(|c| printable(c).into_owned()).collect())
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn printable_escapes_what_a_terminal_would_act_on() {
        assert_eq!(printable("plain ascii, ελληνικά"), "plain ascii, ελληνικά");
        assert_eq!(
            printable("x\n2026-01-01 forged line\x1b]0;title\x07\u{9b}2J\u{202e}txt.exe"),
            "x\\n2026-01-01 forged line\\u{1b}]0;title\\u{7}\\u{9b}2J\\u{202e}txt.exe"
        );
        assert!(!printable("\r\t\x7f").chars().any(char::is_control));
    }
}
