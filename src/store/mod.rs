//! The inventory: servers, compute units and the audit log of events.
//!
//! The service reaches it only through [`Inventory`], so a second backend (PostgreSQL, shared by
//! many hosts) is a second implementation of that trait; [`Store`] (SQLite, in `sqlite`) is the
//! default. The values it hands out are typed: CPU lists and port ranges are [`CpuList`] and
//! [`PortRanges`] (serialized as the same strings as before), statuses are the `model` enums.

mod sqlite;

pub use crate::model::status::{Limits, ServerStatus, UnitStatus};
use crate::model::{CpuList, PortRanges};
use serde::{Deserialize, Serialize};
use serde_json::Value;
pub(crate) use sqlite::Store;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database")]
    Sql(#[from] rusqlite::Error),
    #[error("database migration")]
    Migration(#[from] rusqlite_migration::Error),
    #[error("corrupt row in the database: {0}")]
    Corrupt(String),
    #[error("cannot create the directory {}", path.display())]
    Directory {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A bug: the service asked for a move the unit life cycle forbids.
    #[error("unit {compute_id}: {from} -> {to} is not a transition of the unit life cycle")]
    Transition {
        compute_id: String,
        from: UnitStatus,
        to: UnitStatus,
    },
}

pub type Result<T> = std::result::Result<T, StoreError>;

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
    pub created_at: String,
    pub updated_at: String,
}

/// A compute unit joined with its server's location.
#[derive(Debug, Clone, PartialEq, Serialize)]
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
        }
    }
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
    /// Atomically picks a FREE unit of a READY server matching the request and marks it
    /// ALLOCATING with the owner's tags and key. Lowest hostname and CPU first.
    fn claim_free(
        &self,
        cpu_count: u32,
        region: Option<&str>,
        zone: Option<&str>,
        tags: Option<&Value>,
        ssh_public_key: &str,
        actor: &str,
    ) -> Result<Option<Unit>>;
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
    /// Appends an audit record; returns its id.
    fn record(&self, e: NewEvent<'_>) -> Result<i64>;
    /// Removes events older than `before` (RFC 3339) and beyond the newest `keep`; returns
    /// how many.
    fn prune_events(&self, before: Option<&str>, keep: Option<u64>) -> Result<usize>;
    /// Events matching a filter, newest first.
    fn events(&self, f: &EventFilter) -> Result<Vec<Event>>;
}
