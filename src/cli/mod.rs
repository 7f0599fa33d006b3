//! The `kloigos` command line: the service itself (`serve`, `reconcile`, `render`) and a client
//! for every API operation, over the unix socket by default or TCP with `--url`, printing
//! tables or `--json`.
//!
//! This module owns the clap definitions and the dispatch; `local` runs the commands that act
//! on this host, `client` talks to the API, `output` prints tables safely.

mod client;
mod error;
mod inventory;
mod local;
mod output;

pub use error::CliError;

use crate::service::Config;
use clap::{Args, Parser, Subcommand};
use error::Result;
use std::path::PathBuf;
use std::time::Duration;

pub(crate) const DEFAULT_SOCKET: &str = "/run/kloigos/kloigos.sock";

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
    /// The inventory: a SQLite file, or a PostgreSQL URL (postgres://user:pw@host:port/db?
    /// sslmode=verify-full&sslrootcert=/etc/kloigos/db-ca.pem) shared by a fleet's hubs.
    #[arg(
        long,
        env = "KLOIGOS_DB",
        default_value = "/var/lib/kloigos/kloigos.db",
        value_parser = crate::store::DbTarget::parse
    )]
    pub(crate) db: crate::store::DbTarget,
    /// Root of the host to manage; anything but / renders files there and runs no system tool.
    #[arg(long, env = "KLOIGOS_ROOT", default_value = "/")]
    pub(crate) root: PathBuf,
    /// Template directories, later ones override earlier ones file by file.
    #[arg(long = "templates", env = "KLOIGOS_TEMPLATES", value_delimiter = ':',
          default_values = ["/usr/lib/kloigos/templates", "/etc/kloigos/templates"])]
    pub(crate) templates: Vec<PathBuf>,
    /// Name of this host (default: the system's hostname, or <root>/etc/hostname for a demo root).
    #[arg(long = "hostname", env = "KLOIGOS_HOSTNAME")]
    pub(crate) hostname: Option<String>,
    /// Seconds a deallocated unit's processes get between SIGTERM and SIGKILL.
    #[arg(long, default_value_t = 3.0)]
    pub(crate) kill_grace: f64,
    /// Seconds after its last report a joined host stops being chosen for allocations.
    #[arg(long, env = "KLOIGOS_HOST_STALE_AFTER", default_value_t = 300)]
    pub(crate) host_stale_after: u64,
}

impl Local {
    pub(crate) fn config(&self) -> Config {
        Config {
            db: self.db.clone(),
            root: self.root.clone(),
            templates: self.templates.clone(),
            hostname: self.hostname.clone(),
            kill_grace: Duration::from_secs_f64(self.kill_grace.max(0.0)),
            host_stale_after: Duration::from_secs(self.host_stale_after),
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
    pub(crate) tcp_anonymous_role: Option<crate::auth::Role>,
    /// Host names (besides localhost, 127.0.0.1 and [::1]) TCP requests may be addressed to,
    /// comma separated; also the web origins allowed to make changes.
    #[arg(long, env = "KLOIGOS_ALLOWED_HOSTS", value_delimiter = ',')]
    pub(crate) allowed_hosts: Vec<String>,
    /// Seconds a client has to send a request's headers (also the keep-alive idle limit).
    #[arg(long, env = "KLOIGOS_HEADER_TIMEOUT", default_value_t = 10.0)]
    pub(crate) header_timeout: f64,
    /// Seconds a client has to send a request's body.
    #[arg(long, env = "KLOIGOS_BODY_TIMEOUT", default_value_t = 30.0)]
    pub(crate) body_timeout: f64,
    /// Open connections one local non-admin user may have on the unix socket, and one local
    /// user other than root over loopback TCP.
    #[arg(long, env = "KLOIGOS_MAX_CONNECTIONS_PER_USER", default_value_t = 32)]
    pub(crate) max_connections_per_user: usize,
    /// Open connections all local non-admin users together may have on the unix socket (root
    /// and group kloigos are never capped).
    #[arg(long, env = "KLOIGOS_MAX_USER_CONNECTIONS", default_value_t = 512)]
    pub(crate) max_user_connections: usize,
    /// Open TCP connections in all (root's from loopback are not counted).
    #[arg(long, env = "KLOIGOS_MAX_TCP_CONNECTIONS", default_value_t = 256)]
    pub(crate) max_tcp_connections: usize,
    /// Days audit rows are kept (0: forever). Applied at start and hourly.
    #[arg(long, env = "KLOIGOS_AUDIT_RETENTION_DAYS", default_value_t = 365)]
    pub(crate) audit_retention_days: u32,
    /// Audit rows kept at most, the newest (0: no limit). Applied at start and hourly.
    #[arg(long, env = "KLOIGOS_AUDIT_MAX_ROWS", default_value_t = 100_000)]
    pub(crate) audit_max_rows: u64,
    /// Seconds of the window in which a source's first few refusals are recorded; the rest are
    /// summarized in one row.
    #[arg(long, env = "KLOIGOS_AUDIT_DENIAL_WINDOW", default_value_t = 60)]
    pub(crate) audit_denial_window: u64,
    /// Seconds a hub waits for a joined host to apply an operation and report (then the
    /// operation is rolled back, or finished by the host's next report: see README, "Fleet").
    #[arg(long, env = "KLOIGOS_APPLY_TIMEOUT", default_value_t = 30.0)]
    pub(crate) apply_timeout: f64,
    /// Which host an allocation picks among those with a matching FREE unit: `spread` starts
    /// at a random server (allocations spread over the hosts, and concurrent ones do not
    /// queue on one), `pack` takes the lowest hostname first (fills hosts one after another).
    /// Within a host, units go in CPU order either way.
    #[arg(long, env = "KLOIGOS_PLACEMENT", value_enum, default_value_t = crate::service::Placement::Spread)]
    pub(crate) placement: crate::service::Placement,
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
        /// On a joined host, also pull from the hub every SECS seconds (0: only on pokes and
        /// by kloigos-pull.timer).
        #[arg(long, env = "KLOIGOS_PULL_INTERVAL", default_value_t = 0.0)]
        pull_interval: f64,
        /// Bearer tokens for TCP callers (managed with `kloigos token`).
        #[arg(long, env = "KLOIGOS_TOKENS", default_value = crate::auth::DEFAULT_TOKENS)]
        tokens: PathBuf,
        #[command(flatten)]
        guard: Guard,
    },
    /// Join this host to hub(s): report its facts, keep the hubs and the host token in
    /// /etc/kloigos, enable kloigos-pull.timer, pull once.
    Join {
        #[command(flatten)]
        local: Local,
        /// A hub's URL (http://HOST:PORT); repeatable, tried in order.
        #[arg(long = "hub", required = true)]
        hubs: Vec<String>,
        /// The host token the hub's admin created (`POST /api/admin/hosts`).
        #[arg(long)]
        token_file: PathBuf,
        /// Where hubs poke this host (http://IP:PORT/api/host/poke); without it, the host
        /// pulls only by its timer.
        #[arg(long)]
        poke_url: Option<String>,
        /// Join although this host has servers of its own in its inventory: the hub's state
        /// replaces them, so their units are torn down (users, files, processes) unless the hub
        /// has the same server.
        #[arg(long)]
        force: bool,
    },
    /// Leave the hub(s) this host joined: one last pull (which tears down what the hub no
    /// longer has), then kloigos-pull.timer disabled, the join files removed, the service
    /// restarted standalone. Refused while the hub still has a server for this host.
    Leave {
        #[command(flatten)]
        local: Local,
        /// Leave although the hub still has a server for this host, or no hub answers: the
        /// server as this host last applied it stays, as this host's own (its units keep
        /// their owners and run on; local allocate/deallocate work again). The hub still
        /// lists it until its admin decommissions it and removes the host.
        #[arg(long)]
        force: bool,
    },
    /// Pull this joined host's desired state from its hub, apply it and report (what
    /// kloigos-pull.service runs).
    Pull {
        #[command(flatten)]
        local: Local,
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
        /// The inventory to check (as `serve --db`).
        #[arg(
            long,
            env = "KLOIGOS_DB",
            default_value = "/var/lib/kloigos/kloigos.db",
            value_parser = crate::store::DbTarget::parse
        )]
        db: crate::store::DbTarget,
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
        /// Pick among inventory-only servers' units (and only among them).
        #[arg(long)]
        inventory_only: bool,
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
        /// Record a server Kloigos does not configure (a host that never joined).
        #[arg(long)]
        inventory_only: bool,
    },
    /// Manage the fleet hosts of a hub (their tokens, for `kloigos join`).
    Host {
        #[command(subcommand)]
        action: HostAction,
    },
    /// Remove a server and everything Kloigos made on it.
    Decommission {
        hostname: String,
        /// Also when units are still allocated (their owners lose them).
        #[arg(long)]
        force: bool,
    },
    /// Ansible's script inventory: `--list` (every unit, with `_meta.hostvars`) or `--host ID`.
    /// Ansible runs it with `--list` only: give the filters as KLOIGOS_INVENTORY_* variables.
    Inventory(inventory::InventoryArgs),
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
pub enum HostAction {
    /// Allow a host to join (or give a known one a new token) and print its token, shown only
    /// once; with --token-file, write it there (mode 0600) instead.
    Add {
        name: String,
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
    /// List hosts: joined, last report, version, reachability, drift.
    List,
    /// Forget a host (its token stops working).
    Remove { name: String },
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
            pull_interval,
            tokens,
            guard,
        } => local::serve(
            local,
            listen,
            idle_timeout,
            no_reconcile,
            pull_interval,
            crate::auth::Tokens::new(tokens),
            guard,
            systemd_listeners,
        ),
        Command::Join {
            local,
            hubs,
            token_file,
            poke_url,
            force,
        } => local::join(&local, hubs, &token_file, poke_url, force, cli.json),
        Command::Pull { local } => local::pull(&local, cli.json),
        Command::Leave { local, force } => local::leave(&local, force, cli.json),
        Command::Token { tokens, action } => local::token(&tokens, action, cli.json),
        Command::Reconcile { local } => local::reconcile(&local, cli.json),
        Command::Render { local, out } => local::render(&local, out.as_deref()),
        Command::Doctor { root, db } => local::doctor(&root, &db, cli.json),
        Command::Inventory(args) => inventory::run(&cli.socket, cli.url.as_deref(), &args),
        other => client::client(&cli.socket, cli.url.as_deref(), cli.json, other),
    }
}
