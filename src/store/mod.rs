//! The inventory: servers, compute units and the audit log of events.
//!
//! The service reaches it only through [`Inventory`], so a second backend (PostgreSQL, shared by
//! many hosts) is a second implementation of that trait; [`Store`] (SQLite, in `sqlite`) is the
//! default. The values it hands out are typed: CPU lists and port ranges are [`CpuList`] and
//! [`PortRanges`] (serialized as the same strings as before), statuses are the `model` enums.

mod postgres;
mod sqlite;

pub use crate::model::status::{Limits, ServerStatus, UnitStatus};
use crate::model::{CpuList, PortRanges};
pub(crate) use postgres::PgStore;
use serde::{Deserialize, Serialize};
use serde_json::Value;
pub(crate) use sqlite::Store;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

/// Where the inventory lives: a SQLite file (one host) or a PostgreSQL database (a fleet's
/// hubs share it). `--db`/`KLOIGOS_DB`: a value starting with `postgres://` or
/// `postgresql://` is PostgreSQL, anything else a SQLite path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DbTarget {
    Sqlite(PathBuf),
    Postgres(String),
}

impl DbTarget {
    /// Parses a `--db` value (never fails: anything but a PostgreSQL URL is a path).
    pub fn parse(v: &str) -> std::result::Result<DbTarget, std::convert::Infallible> {
        Ok(
            if v.starts_with("postgres://") || v.starts_with("postgresql://") {
                DbTarget::Postgres(v.to_string())
            } else {
                DbTarget::Sqlite(PathBuf::from(v))
            },
        )
    }

    /// The backend's name, as `kloigos doctor` reports it.
    pub fn backend(&self) -> &'static str {
        match self {
            DbTarget::Sqlite(_) => "sqlite",
            DbTarget::Postgres(_) => "postgresql",
        }
    }
}

/// For messages: the path, or the URL without its password.
impl std::fmt::Display for DbTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DbTarget::Sqlite(p) => write!(f, "{}", p.display()),
            DbTarget::Postgres(url) => f.write_str(&postgres::redact(url)),
        }
    }
}

/// For `kloigos doctor`: which backend, and whether it is usable (`Err`: why not). Opens no
/// SQLite file (doctor runs before the first start too) and migrates nothing.
pub fn check(target: &DbTarget) -> std::result::Result<String, String> {
    match target {
        DbTarget::Sqlite(p) => Ok(match std::fs::metadata(p) {
            Ok(m) => format!("sqlite {} ({} bytes)", p.display(), m.len()),
            Err(_) => format!("sqlite {} (created at the first start)", p.display()),
        }),
        DbTarget::Postgres(url) => match PgStore::schema_version(url) {
            Ok((found, known)) if found > known => Err(format!(
                "postgresql {target}: schema version {found} is newer than this kloigos ({known})"
            )),
            Ok((found, known)) if found < known => Ok(format!(
                "postgresql {target}: schema version {found}, migrated to {known} at the next start"
            )),
            Ok((found, _)) => Ok(format!("postgresql {target}: schema version {found}")),
            Err(e) => Err(format!("postgresql {target}: {}", crate::error::Chain(&e))),
        },
    }
}

/// Opens the inventory `target` names and brings its schema up to date.
pub fn open(target: &DbTarget) -> Result<Box<dyn Inventory>> {
    Ok(match target {
        DbTarget::Sqlite(p) => Box::new(Store::open(p)?),
        DbTarget::Postgres(url) => Box::new(PgStore::open(url)?),
    })
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database")]
    Sql(#[from] rusqlite::Error),
    #[error("database migration")]
    Migration(#[from] rusqlite_migration::Error),
    #[error("database")]
    Postgres(#[source] tokio_postgres::Error),
    /// The database was migrated by a newer kloigos.
    #[error(
        "the database schema is at version {found}, newer than this kloigos knows ({known}); \
         upgrade kloigos"
    )]
    SchemaTooNew { found: i64, known: i64 },
    /// A `--db` URL this build cannot use.
    #[error("database URL: {0}")]
    Config(String),
    #[error("corrupt row in the database: {0}")]
    Corrupt(String),
    /// The database cannot be reached (PostgreSQL down, restarting, failing over): the API
    /// answers 503 with a JSON detail, and the caller may retry.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A backend that does not have this capability yet.
    #[error("not supported by this inventory backend: {0}")]
    Unsupported(&'static str),
    #[error("cannot create the directory {}", path.display())]
    Directory {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A reader of [`Inventory::list_units`] stopped reading (its client went away).
    #[error("the reader stopped: {0}")]
    Stopped(String),
    /// A bug: the service asked for a move the unit life cycle forbids.
    #[error("unit {compute_id}: {from} -> {to} is not a transition of the unit life cycle")]
    Transition {
        compute_id: String,
        from: UnitStatus,
        to: UnitStatus,
    },
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// A fresh allocation identity (`Unit::claim`): 128 random bits, hex.
pub(crate) fn new_claim() -> String {
    let mut b = [0u8; 16];
    // getrandom fails only without a kernel RNG; a time-based fallback still never repeats
    // within one process, which is what a claim needs.
    if getrandom::fill(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        b = t.to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Server {
    pub hostname: String,
    pub ip: String,
    pub region: String,
    pub zone: String,
    pub status: ServerStatus,
    pub cpu_ranges: Vec<CpuList>,
    pub port_base: u16,
    pub ports_per_cpu: u16,
    pub uid_base: u32,
    pub limits: Limits,
    /// Recorded explicitly as a server Kloigos does not configure (it never joined); its units
    /// are allocated only to callers that ask for inventory-only units.
    pub inventory_only: bool,
    pub created_at: String,
    pub updated_at: String,
}

/// A compute unit joined with its server's location (also what a hub sends a fleet host,
/// `fleet::DesiredUnit`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Unit {
    pub compute_id: String,
    pub hostname: String,
    pub ip: String,
    pub region: String,
    pub zone: String,
    pub cpu_range: CpuList,
    pub cpu_count: u32,
    pub first_cpu: u32,
    pub uid: u32,
    pub user: String,
    pub ports_range: PortRanges,
    pub status: UnitStatus,
    pub started_at: Option<String>,
    pub tags: Option<Value>,
    pub ssh_public_key: Option<String>,
    /// Who allocated it (the actor of the allocation), for `deallocate your own` rules.
    pub allocated_by: Option<String>,
    pub updated_at: String,
    /// Why the last reconcile could not repair the unit on its host; `None` when it could.
    pub problem: Option<String>,
    /// Identity of the current allocation: a random token set by `claim_free`, cleared with
    /// the owner (`UnitChange::cleared`). A fleet host echoes it in its report, so a hub knows
    /// which allocation the host applied.
    pub claim: Option<String>,
}

/// A unit as the list shows it, borrowed from a database row ([`Inventory::list_units`]).
/// Text columns are as stored (`cpu_range` and `ports_range` in canonical form, `tags` as
/// compact JSON text).
#[derive(Debug, Clone, Copy)]
pub struct UnitRow<'a> {
    pub compute_id: &'a str,
    pub hostname: &'a str,
    pub ip: &'a str,
    pub region: &'a str,
    pub zone: &'a str,
    pub cpu_range: &'a str,
    pub cpu_count: u32,
    pub uid: u32,
    pub user: &'a str,
    pub ports_range: &'a str,
    pub status: &'a str,
    pub started_at: Option<&'a str>,
    pub tags: Option<&'a str>,
    pub allocated_by: Option<&'a str>,
    pub problem: Option<&'a str>,
}

/// [`Inventory::unit_counts`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnitCounts {
    pub total: u64,
    pub allocated: u64,
    /// Servers in the inventory.
    pub servers: u64,
}

/// A unit row as inserted by init_server.
#[derive(Debug, Clone)]
pub struct NewUnit {
    pub compute_id: String,
    pub cpu_range: CpuList,
    pub cpu_count: u32,
    pub first_cpu: u32,
    pub uid: u32,
    pub user: String,
    pub ports_range: PortRanges,
}

#[derive(Debug, Clone, Default)]
pub struct UnitFilter {
    pub compute_id: Option<String>,
    pub hostname: Option<String>,
    pub region: Option<String>,
    pub zone: Option<String>,
    pub cpu_count: Option<i64>,
    pub deployment_id: Option<String>,
    pub status: Option<String>,
}

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Event {
    pub id: i64,
    pub time: String,
    pub actor: String,
    pub operation: String,
    pub compute_id: Option<String>,
    pub hostname: Option<String>,
    /// `ok` or `error`.
    pub result: String,
    pub detail: Option<String>,
    pub before: Option<Value>,
    pub after: Option<Value>,
}

#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub compute_id: Option<String>,
    pub hostname: Option<String>,
    pub operation: Option<String>,
    pub actor: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    /// Return events with id < before (paging backwards from the newest).
    pub before_id: Option<i64>,
    pub limit: u32,
}

/// What an audit record says; `Store::record` adds id and time.
#[derive(Debug, Clone)]
pub struct NewEvent<'a> {
    pub actor: &'a str,
    pub operation: &'a str,
    pub compute_id: Option<&'a str>,
    pub hostname: Option<&'a str>,
    pub result: std::result::Result<(), &'a str>,
    pub before: Option<Value>,
    pub after: Option<Value>,
}

/// The outcome of a compare-and-set on a unit's status.
#[derive(Debug)]
pub enum Transition {
    Done(Box<Unit>),
    NotFound,
    WrongState(UnitStatus),
}

/// Field changes applied together with a status transition.
#[derive(Debug, Clone, Default)]
pub struct UnitChange {
    /// `Some(None)` clears the field.
    pub started_at: Option<Option<String>>,
    pub tags: Option<Option<Value>>,
    pub ssh_public_key: Option<Option<String>>,
    pub allocated_by: Option<Option<String>>,
    pub problem: Option<Option<String>>,
    pub claim: Option<Option<String>>,
}

impl UnitChange {
    /// Everything an owner left on the unit, cleared: what a FREE unit looks like.
    pub fn cleared() -> Self {
        UnitChange {
            started_at: Some(None),
            tags: Some(None),
            ssh_public_key: Some(None),
            allocated_by: Some(None),
            problem: Some(None),
            claim: Some(None),
        }
    }
}

/// What an allocation asks the inventory for (`Inventory::claim_free`).
#[derive(Debug, Clone)]
pub struct Claim<'a> {
    pub cpu_count: u32,
    pub region: Option<&'a str>,
    pub zone: Option<&'a str>,
    pub tags: Option<&'a Value>,
    pub ssh_public_key: &'a str,
    pub actor: &'a str,
    /// Pick only among inventory-only servers (and never among them otherwise).
    pub inventory_only: bool,
    /// The hostname of the process that allocates: its own servers are eligible without
    /// having joined (it applies them itself).
    pub local_hostname: &'a str,
    /// RFC 3339: a joined host whose last report is older is not chosen.
    pub reported_since: &'a str,
    /// Where the pick starts in hostname order, wrapping around (the first FREE unit at or
    /// after this hostname, else the first before it). Callers pass a random server's name so
    /// that allocations spread over the hosts instead of queueing on one; `None` starts at
    /// the lowest hostname. Within a host, units go in CPU order.
    pub start_at: Option<&'a str>,
}

/// A fleet host as a hub knows it: its token, the facts it reported when it joined, and its
/// last report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostRecord {
    pub hostname: String,
    /// SHA-256 (hex) of the host's token; never serialized.
    #[serde(skip)]
    pub token_sha256: String,
    /// What the host reported at `kloigos join` and with each report (`None`: never joined).
    pub facts: Option<Value>,
    /// Where a hub pokes the host (`http://IP:PORT/api/host/poke`).
    pub poke_url: Option<String>,
    pub version: Option<String>,
    pub joined_at: Option<String>,
    pub last_report_at: Option<String>,
    /// The host's last report, as it sent it (see README, "Fleet").
    pub last_report: Option<Value>,
    /// Since when pokes fail, and why; cleared by the next report.
    pub unreachable_since: Option<String>,
    pub unreachable_reason: Option<String>,
    pub created_at: String,
}

/// Everything the service needs from the inventory. Each method is one transaction: changes
/// are atomic, and concurrent writers (threads, processes, hosts) are serialized so that a unit
/// is claimed by exactly one allocation.
pub trait Inventory: Send + Sync {
    fn server(&self, hostname: &str) -> Result<Option<Server>>;
    /// Every server, by hostname.
    fn servers(&self) -> Result<Vec<Server>>;
    /// Registers a server as INITIALIZING with its units UNAVAILABLE, replacing a previous
    /// record only when that one is DECOMMISSIONED or INIT_FAIL. Returns the status of a
    /// blocking previous record instead when there is one.
    fn begin_init(
        &self,
        server: &Server,
        units: &[NewUnit],
    ) -> Result<std::result::Result<(), ServerStatus>>;
    /// Sets a server's status; with `units`, also sets every unit of it, together.
    fn set_server_status(
        &self,
        hostname: &str,
        status: ServerStatus,
        units: Option<UnitStatus>,
    ) -> Result<()>;
    /// Marks a server inventory-only (or not).
    fn set_inventory_only(&self, hostname: &str, on: bool) -> Result<()>;
    /// Deletes a server's units (its record stays, with the status given).
    fn retire_server(&self, hostname: &str, status: ServerStatus) -> Result<()>;
    fn delete_server(&self, hostname: &str) -> Result<()>;
    fn unit(&self, compute_id: &str) -> Result<Option<Unit>>;
    /// Units matching a filter, by hostname and first CPU.
    fn units(&self, f: &UnitFilter) -> Result<Vec<Unit>>;
    /// The units of one server.
    fn units_of(&self, hostname: &str) -> Result<Vec<Unit>> {
        self.units(&UnitFilter {
            hostname: Some(hostname.to_string()),
            ..Default::default()
        })
    }
    /// Servers in one of `statuses`, by hostname.
    fn servers_in(&self, statuses: &[ServerStatus]) -> Result<Vec<Server>>;
    /// Servers of hosts other than `local` that are not inventory-only (what a hub's sweep
    /// looks at), by hostname.
    fn remote_servers(&self, local: &str) -> Result<Vec<Server>>;
    /// Servers of hosts other than `local` that are neither inventory-only nor retired
    /// (DECOMMISSIONED, INIT_FAIL) and whose host never joined: what reconcile marks
    /// inventory-only.
    fn unjoined_servers(&self, local: &str) -> Result<Vec<Server>>;
    /// Units an operation left half-done (ALLOCATING, ALLOCATION_FAIL, DEALLOCATING,
    /// DEALLOCATION_FAIL) or marked with a problem, by hostname and first CPU: what reconcile
    /// looks at beyond the local host's units (an index keeps this cheap at any size).
    fn units_unsettled(&self) -> Result<Vec<Unit>>;
    /// How many units there are, and how many of them are ALLOCATED.
    fn unit_counts(&self) -> Result<UnitCounts>;
    /// The list of units matching `f`, streamed: within one read snapshot, `stamp` is called
    /// first with a text that differs whenever what any list shows may have changed (the
    /// inventory's change counter); when it returns false nothing more is read. Otherwise
    /// `each` is called with every row, in the order of [`Inventory::units`], borrowed from
    /// the database's row (nothing is collected).
    fn list_units(
        &self,
        f: &UnitFilter,
        stamp: &mut dyn FnMut(&str) -> bool,
        each: &mut dyn FnMut(&UnitRow<'_>) -> Result<()>,
    ) -> Result<()>;
    /// Atomically picks a FREE unit without a problem, of a READY server matching the
    /// request, and marks it ALLOCATING with the owner's tags, key, actor and a fresh random
    /// `claim`. Eligible servers: with `inventory_only`, only inventory-only ones; otherwise
    /// not inventory-only, and either `local_hostname`'s or of a host that joined, reported
    /// since `reported_since` and is not unreachable. Lowest hostname and CPU first.
    /// Concurrent claims never wait on each other nor miss a FREE unit another one skipped.
    fn claim_free(&self, c: &Claim<'_>) -> Result<Option<Unit>>;
    /// Records (or with `None` clears) what reconcile could not repair on a unit.
    fn set_problem(&self, compute_id: &str, problem: Option<&str>) -> Result<()>;
    /// Compare-and-set: moves a unit to `to` (with `change`) only if its status is one of
    /// `from`. A move the life cycle forbids ([`UnitStatus::can_become`]) is an error.
    fn transition(
        &self,
        compute_id: &str,
        from: &[UnitStatus],
        to: UnitStatus,
        change: UnitChange,
    ) -> Result<Transition>;
    /// [`Inventory::transition`] that also appends the audit record `event` in the same
    /// transaction, only when the transition is done: the state change and its audit row
    /// commit together or not at all.
    fn transition_logged(
        &self,
        compute_id: &str,
        from: &[UnitStatus],
        to: UnitStatus,
        change: UnitChange,
        event: NewEvent<'_>,
    ) -> Result<Transition>;
    /// Appends an audit record; returns its id.
    fn record(&self, e: NewEvent<'_>) -> Result<i64>;
    /// Removes events older than `before` (RFC 3339) and beyond the newest `keep`; returns
    /// how many.
    fn prune_events(&self, before: Option<&str>, keep: Option<u64>) -> Result<usize>;
    /// Events matching a filter, newest first.
    fn events(&self, f: &EventFilter) -> Result<Vec<Event>>;

    // ---- fleet hosts (hubs) --------------------------------------------------------------

    /// Records a host allowed to join, with its token's hash, or gives a known host a new
    /// token. Returns true when the host is new.
    fn put_host(&self, hostname: &str, token_sha256: &str) -> Result<bool>;
    /// Forgets a host (its token stops working). Returns false when it was not known.
    fn delete_host(&self, hostname: &str) -> Result<bool>;
    fn host(&self, hostname: &str) -> Result<Option<HostRecord>>;
    /// Every known host, by hostname.
    fn hosts(&self) -> Result<Vec<HostRecord>>;
    /// The hostname whose token has this hash.
    fn host_by_token(&self, token_sha256: &str) -> Result<Option<String>>;
    /// Records what a host reported when it joined (sets `joined_at` the first time).
    fn host_joined(
        &self,
        hostname: &str,
        facts: &Value,
        poke_url: Option<&str>,
        version: &str,
    ) -> Result<()>;
    /// Records a host's report (`last_report`, `last_report_at` = now, its version) and
    /// clears its unreachable mark.
    fn host_reported(&self, hostname: &str, report: &Value, version: &str) -> Result<()>;
    /// Marks a host unreachable (keeping the first `since`), or with `None` clears the mark.
    fn host_unreachable(&self, hostname: &str, reason: Option<&str>) -> Result<()>;

    /// Calls `wake` with the hostname whenever any process sharing this inventory records a
    /// report of that host ([`Inventory::host_reported`]), for as long as the store lives, so
    /// a hub waiting on a host hears of reports that reached another hub. Returns the flag
    /// that says whether reports are being heard right now (a caller polls more often while
    /// it is false), or `None` when the backend cannot tell other processes' reports apart
    /// (SQLite: one host, one process; its caller polls).
    fn watch_reports(&self, wake: ReportWake) -> Option<Arc<AtomicBool>> {
        let _ = wake;
        None
    }
}

/// What [`Inventory::watch_reports`] calls with a hostname.
pub type ReportWake = Arc<dyn Fn(&str) + Send + Sync>;
