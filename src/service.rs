//! The operations of Kloigos: init_server (`init`), allocate and deallocate (`allocate`),
//! decommission (`decommission`) and reconcile (`reconcile`).
//! Each one validates, records its intent in the store, applies it to the host through
//! `apply::Host`, then records the outcome, so a crash at any point leaves a state that
//! `reconcile` finishes or rolls back. Host-changing operations hold an exclusive file lock, so
//! the service and a `kloigos reconcile` run by hand never interleave.

use crate::apply::{ApplyError, ApplyReport, ErrorList, Host, Scope, converge};
use crate::model::{self, CpuList, PortPlan, validate::SshKey};
use crate::plan::{self, Desired};
use crate::render::{HostFacts, RenderError, RenderedFile, Renderer, UnitPlan};
use crate::store::{
    Event, EventFilter, Inventory, Limits, NewEvent, Server, StoreError, Transition, Unit,
    UnitChange, UnitFilter, UnitStatus,
};
use serde_json::{Value, json};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tracing::{error, info, warn};

mod allocate;
mod decommission;
mod fleet;
pub use fleet::Pass;
mod hub;
mod init;
mod reconcile;

pub(crate) use hub::older_than;
pub use hub::{
    Begun, Concluded, Facts, JoinRequest, Report, ServerOutcome, UnitOutcome, last_report,
};

/// One step of the path to an invalid part of a request: a field or a list index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocPart {
    Field(&'static str),
    Index(usize),
}

/// One semantic problem with a request: where (`cpu_ranges[2]`), the offending input as the
/// caller gave it, and why. The API turns these into FastAPI's 422 `loc` lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub loc: Vec<LocPart>,
    pub input: String,
    pub reason: String,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, part) in self.loc.iter().enumerate() {
            match part {
                LocPart::Field(name) if i == 0 => f.write_str(name)?,
                LocPart::Field(name) => write!(f, ".{name}")?,
                LocPart::Index(n) => write!(f, "[{n}]")?,
            }
        }
        write!(f, " ({:?}): {}", self.input, self.reason)
    }
}

/// The problems of a request, all of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidList(pub Vec<Invalid>);

impl std::fmt::Display for InvalidList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("invalid request")?;
        for (i, e) in self.0.iter().enumerate() {
            f.write_str(if i == 0 { ": " } else { "; " })?;
            e.fmt(f)?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("{0}")]
    Invalid(InvalidList),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Failed(String),
    /// A joined host did not report in time (HTTP 504).
    #[error("{0}")]
    Timeout(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Render(#[from] RenderError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    Teardown(#[from] ErrorList),
    #[error("lock {}", path.display())]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, OpError>;

/// A validated init_server request.
#[derive(Debug, Clone)]
pub struct InitServer {
    pub hostname: String,
    pub ip: String,
    pub region: String,
    pub zone: String,
    pub cpu_ranges: Vec<CpuList>,
    pub ports: PortPlan,
    pub uid_base: u32,
    pub limits: Limits,
    /// Record the server without configuring it (a host that never joined).
    pub inventory_only: bool,
}

pub const DEFAULT_UID_BASE: u32 = 20000;

/// A validated allocate request.
#[derive(Debug, Clone)]
pub struct Allocate {
    pub cpu_count: u32,
    pub region: Option<String>,
    pub zone: Option<String>,
    pub tags: Option<Value>,
    pub ssh_key: SshKey,
    /// Pick among inventory-only servers' units (and only among them).
    pub inventory_only: bool,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub db: crate::store::DbTarget,
    pub root: PathBuf,
    pub templates: Vec<PathBuf>,
    /// The name of the host this process runs on; units of other hosts are inventory only.
    pub hostname: Option<String>,
    /// How long deallocation lets processes handle SIGTERM before SIGKILL.
    pub kill_grace: Duration,
    /// A joined host whose last report is older is not chosen for allocations.
    pub host_stale_after: Duration,
}

/// What reconcile did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ReconcileReport {
    pub files_changed: Vec<String>,
    pub files_removed: Vec<String>,
    pub units_fixed: Vec<String>,
    pub servers_fixed: Vec<String>,
    /// Units reconcile could not repair (`id: why`); each is marked (`problem`) and audited,
    /// and the others are served.
    pub units_failed: Vec<String>,
}

impl ReconcileReport {
    pub fn is_clean(&self) -> bool {
        self.files_changed.is_empty()
            && self.files_removed.is_empty()
            && self.units_fixed.is_empty()
            && self.servers_fixed.is_empty()
            && self.units_failed.is_empty()
    }
}

/// All or nothing, for operations that must set up every unit (init_server, decommission).
fn all_ok(report: ApplyReport) -> Result<()> {
    if report.failed.is_empty() {
        Ok(())
    } else {
        let msgs: Vec<String> = report
            .failed
            .iter()
            .map(|(id, e)| format!("{id}: {e}"))
            .collect();
        Err(OpError::Failed(msgs.join("; ")))
    }
}

/// Who does what to which unit or server, for [`Kloigos::conclude`].
struct Op<'a> {
    actor: &'a str,
    operation: &'static str,
    compute_id: Option<&'a str>,
    hostname: &'a str,
    before: Option<Value>,
}

pub struct Kloigos {
    pub store: Box<dyn Inventory>,
    host: Host,
    renderer: Renderer,
    local: String,
    lock_path: PathBuf,
    kill_grace: Duration,
    facts: HostFacts,
    host_stale_after: Duration,
    /// How long a hub waits for a joined host's report (`--apply-timeout`).
    apply_timeout: Duration,
    /// How allocations pick a host.
    placement: Placement,
    /// The servers' hostnames, sorted, as of when: where spread allocations start their pick.
    spread_from: std::sync::Mutex<Option<(std::time::Instant, Vec<String>)>>,
}

/// How an allocation picks a host among those with a matching FREE unit (`--placement`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Placement {
    /// From a random server on, in hostname order: allocations spread over the hosts.
    Spread,
    /// The lowest hostname first: hosts fill one after another.
    Pack,
}

/// The hostname of the machine (or of the fake root's /etc/hostname).
fn local_hostname(root: &Path, live: bool) -> String {
    if !live && let Ok(h) = std::fs::read_to_string(root.join("etc/hostname")) {
        return h.trim().to_string();
    }
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

/// An exclusive lock on `path` (created if missing), held until the guard is dropped.
fn lock_file(path: &Path) -> Result<nix::fcntl::Flock<File>> {
    let lock_err = |source: std::io::Error| OpError::Lock {
        path: path.to_path_buf(),
        source,
    };
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(lock_err)?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| lock_err(e.into()))
}

/// A unit's concluding move (see [`Kloigos::conclude_move`]).
struct Move {
    from: &'static [UnitStatus],
    to: UnitStatus,
    change: UnitChange,
}

/// The JSON an audit record keeps of a unit.
pub(crate) fn unit_json(u: &Unit) -> Value {
    json!({
        "compute_id": u.compute_id,
        "status": u.status,
        "started_at": u.started_at,
        "tags": u.tags,
        "allocated_by": u.allocated_by,
    })
}

/// Seconds to sleep at pause point `point`, given the value of `KLOIGOS_TEST_PAUSE`
/// (`allocate:5` sleeps 5 s mid-allocation; points: allocate, init_server, and report: a
/// fleet host's pull between applying and reporting). Test builds only:
/// without the `test-hooks` feature there is no pause, whatever the environment says.
#[cfg(feature = "test-hooks")]
fn pause_secs(point: &str, setting: Option<&str>) -> Option<u64> {
    let (p, secs) = setting?.split_once(':')?;
    if p == point { secs.parse().ok() } else { None }
}

#[cfg(not(feature = "test-hooks"))]
fn pause_secs(_point: &str, _setting: Option<&str>) -> Option<u64> {
    None
}

/// A crash window for the tests: sleeps at `point` when `KLOIGOS_TEST_PAUSE` names it. The
/// variable is read only in builds with the `test-hooks` feature (the release binary has not
/// even the name).
fn test_pause(point: &str) {
    if let Some(d) = test_pause_for(point) {
        std::thread::sleep(d);
    }
}

/// How long to pause at `point` (see [`test_pause`]), for async code that sleeps itself.
pub(crate) fn test_pause_for(point: &str) -> Option<Duration> {
    #[cfg(feature = "test-hooks")]
    let setting = std::env::var("KLOIGOS_TEST_PAUSE").ok();
    #[cfg(not(feature = "test-hooks"))]
    let setting: Option<String> = None;
    let secs = pause_secs(point, setting.as_deref())?;
    warn!(point, secs, "test pause point");
    Some(Duration::from_secs(secs))
}

impl Kloigos {
    pub fn open(cfg: &Config) -> Result<Kloigos> {
        let store = crate::store::open(&cfg.db)?;
        let host = Host::new(&cfg.root);
        let renderer = Renderer::load(&cfg.templates)?;
        let local = cfg
            .hostname
            .clone()
            .unwrap_or_else(|| local_hostname(&cfg.root, host.is_live()));
        // The host lock: next to a SQLite file, or under the root's run/kloigos for PostgreSQL.
        let lock_path: PathBuf = match &cfg.db {
            crate::store::DbTarget::Sqlite(p) => {
                let mut l = p.clone().into_os_string();
                l.push(".lock");
                l.into()
            }
            crate::store::DbTarget::Postgres(_) => {
                let dir = cfg.root.join("run/kloigos");
                std::fs::create_dir_all(&dir).map_err(|source| StoreError::Directory {
                    path: dir.clone(),
                    source,
                })?;
                dir.join("kloigos.lock")
            }
        };
        let facts = HostFacts {
            hostname: local.clone(),
            socket_bind: host.socket_bind_supported(),
        };
        Ok(Kloigos {
            store,
            host,
            renderer,
            local,
            lock_path,
            kill_grace: cfg.kill_grace,
            facts,
            host_stale_after: cfg.host_stale_after,
            placement: Placement::Spread,
            spread_from: std::sync::Mutex::new(None),
            apply_timeout: Duration::from_secs(30),
        })
    }

    /// A joined host whose last report is older is not chosen for allocations.
    pub(crate) fn host_stale_after(&self) -> Duration {
        self.host_stale_after
    }

    pub(crate) fn local_hostname(&self) -> &str {
        &self.local
    }

    /// Overrides the detected `socket_bind` host fact (whether systemd enforces
    /// `SocketBindAllow=`), e.g. for a fake root standing in for a host with BPF.
    pub fn set_socket_bind(&mut self, on: bool) {
        self.facts.socket_bind = on;
    }

    pub(crate) fn host(&self) -> &Host {
        &self.host
    }

    fn lock(&self) -> Result<nix::fcntl::Flock<File>> {
        lock_file(&self.lock_path)
    }

    /// Serializes the whole pulls of a joined host (fetch, apply, report) across processes,
    /// so a state fetched later is never applied before one fetched earlier. A lock of its
    /// own: the apply takes the host lock inside it.
    pub fn pull_lock(&self) -> Result<nix::fcntl::Flock<File>> {
        let mut path = self.lock_path.clone().into_os_string();
        path.push(".pull");
        lock_file(Path::new(&path))
    }

    fn is_local(&self, hostname: &str) -> bool {
        hostname == self.local
    }

    fn plan(&self, server: &Server, unit: &Unit) -> Result<UnitPlan> {
        let topology = model::numa::topology(self.host.root());
        Ok(UnitPlan::new(server, unit, &topology)?)
    }

    #[allow(clippy::too_many_arguments)] // mirrors NewEvent, with the error logged here
    pub(crate) fn record(
        &self,
        actor: &str,
        operation: &str,
        compute_id: Option<&str>,
        hostname: Option<&str>,
        result: std::result::Result<(), &str>,
        before: Option<Value>,
        after: Option<Value>,
    ) {
        if let Err(e) = self.store.record(NewEvent {
            actor,
            operation,
            compute_id,
            hostname,
            result,
            before,
            after,
        }) {
            error!(operation, error = %crate::error::Chain(&e), "cannot write the audit log");
        }
    }

    /// The end of the skeleton allocate, deallocate and decommission share. They take the
    /// host lock and record their intent in the store (`ALLOCATING`, `DEALLOCATING`,
    /// `DECOMMISSIONING`), apply it to the host, then come here with the result: `done`
    /// records the outcome of a success, `failed` rolls back or marks the failure and says
    /// why; either way the operation is logged and audited once.
    fn conclude<T>(
        &self,
        op: Op<'_>,
        applied: Result<()>,
        done: impl FnOnce() -> Result<(T, Option<Value>)>,
        failed: impl FnOnce(&OpError) -> Result<(String, Option<Value>)>,
    ) -> Result<T> {
        let Op {
            actor,
            operation,
            compute_id,
            hostname,
            before,
        } = op;
        match applied {
            Ok(()) => {
                let (value, after) = done()?;
                info!(compute_id, hostname, operation, actor, "done");
                self.record(
                    actor,
                    operation,
                    compute_id,
                    Some(hostname),
                    Ok(()),
                    before,
                    after,
                );
                Ok(value)
            }
            Err(e) => {
                error!(compute_id, hostname, operation, error = %crate::error::Chain(&e), "failed on the host");
                let (msg, after) = failed(&e)?;
                self.record(
                    actor,
                    operation,
                    compute_id,
                    Some(hostname),
                    Err(&msg),
                    before,
                    after,
                );
                Err(OpError::Failed(msg))
            }
        }
    }

    /// [`Kloigos::conclude`] for an operation that ends with one move of `unit` (allocate,
    /// deallocate): the move and its audit row commit together (`transition_logged`), so the
    /// audit never says what did not happen, nor misses what did. `done` is the move of a
    /// success; `failed` cleans up and returns the move of a failure and why. A unit someone
    /// else moved meanwhile is not moved; the outcome is then audited on its own.
    fn conclude_move(
        &self,
        op: Op<'_>,
        unit: &Unit,
        applied: Result<()>,
        done: Move,
        failed: impl FnOnce(&OpError) -> Result<(String, Move)>,
    ) -> Result<Unit> {
        let id = unit.compute_id.as_str();
        let hostname = op.hostname;
        let (mv, outcome) = match &applied {
            Ok(()) => (done, Ok(())),
            Err(e) => {
                error!(compute_id = id, hostname, operation = op.operation, error = %crate::error::Chain(e), "failed on the host");
                let (msg, mv) = failed(e)?;
                (mv, Err(msg))
            }
        };
        let after = unit_json(&hub::changed(unit, mv.to, &mv.change));
        let event = NewEvent {
            actor: op.actor,
            operation: op.operation,
            compute_id: op.compute_id,
            hostname: Some(hostname),
            result: outcome.as_ref().map(|_| ()).map_err(String::as_str),
            before: op.before.clone(),
            after: Some(after),
        };
        let moved = self
            .store
            .transition_logged(id, mv.from, mv.to, mv.change, event)?;
        let moved = match moved {
            Transition::Done(u) => Some(*u),
            _ => {
                self.record(
                    op.actor,
                    op.operation,
                    op.compute_id,
                    Some(hostname),
                    outcome.as_ref().map(|_| ()).map_err(String::as_str),
                    op.before,
                    None,
                );
                None
            }
        };
        match (outcome, moved) {
            (Ok(()), Some(u)) => {
                info!(
                    compute_id = id,
                    hostname,
                    operation = op.operation,
                    actor = op.actor,
                    "done"
                );
                Ok(u)
            }
            (Ok(()), None) => Err(OpError::Failed(format!("{id} changed state under us"))),
            (Err(msg), _) => Err(OpError::Failed(msg)),
        }
    }

    // ---- reads -------------------------------------------------------------------------

    pub fn units(&self, f: &UnitFilter) -> Result<Vec<Unit>> {
        Ok(self.store.units(f)?)
    }

    pub fn unit(&self, id: &str) -> Result<Unit> {
        self.store
            .unit(id)?
            .ok_or_else(|| OpError::NotFound(format!("compute unit {id:?} not found")))
    }

    /// How many units there are, and how many are ALLOCATED (counted by the database).
    pub(crate) fn unit_counts(&self) -> Result<crate::store::UnitCounts> {
        Ok(self.store.unit_counts()?)
    }

    /// [`crate::store::Inventory::list_units`].
    pub(crate) fn list_units(
        &self,
        f: &UnitFilter,
        stamp: &mut dyn FnMut(&str) -> bool,
        each: &mut dyn FnMut(&crate::store::UnitRow<'_>) -> crate::store::Result<()>,
    ) -> Result<()> {
        Ok(self.store.list_units(f, stamp, each)?)
    }

    pub(crate) fn servers(&self) -> Result<Vec<Server>> {
        Ok(self.store.servers()?)
    }

    pub(crate) fn events(&self, f: &EventFilter) -> Result<Vec<Event>> {
        Ok(self.store.events(f)?)
    }

    /// The inventory rows of this host's servers, optionally leaving out one server, and with
    /// the unit `released` seen as FREE (its release is under way).
    fn rows(
        &self,
        except: Option<&str>,
        released: Option<&str>,
    ) -> Result<Vec<(Server, Vec<Unit>)>> {
        let mut rows = Vec::new();
        // Only this host's server is planned here: one row, whatever the inventory's size.
        if let Some(server) = self.store.server(&self.local)?
            && plan::is_planned(&server, &self.local)
            && Some(server.hostname.as_str()) != except
        {
            let mut units = self.store.units_of(&server.hostname)?;
            for u in &mut units {
                if Some(u.compute_id.as_str()) == released {
                    u.status = UnitStatus::Free;
                }
            }
            rows.push((server, units));
        }
        Ok(rows)
    }

    /// The desired state of this host (see `plan::desired`).
    fn desired(&self, except: Option<&str>, released: Option<&str>) -> Result<Desired> {
        let topology = model::numa::topology(self.host.root());
        let rows = self.rows(except, released)?;
        Ok(plan::desired(
            &self.renderer,
            &self.facts,
            &topology,
            &rows,
        )?)
    }

    /// Brings the host in line with the inventory's local units (optionally leaving out one
    /// server's): users, state file and generator drop-ins, tmpfiles.d, directories, the
    /// nftables table. One broken unit does not stop the others: it is in `failed`.
    fn apply_local(&self, except: Option<&str>) -> Result<ApplyReport> {
        Ok(converge(
            &self.host,
            &self.desired(except, None)?,
            Scope::Full,
        )?)
    }

    /// Every file Kloigos would write for the local units, for `kloigos render`: the state
    /// file, the drop-ins the generator makes of it (under `run/systemd/generator`), the
    /// tmpfiles.d files and the nftables table.
    pub(crate) fn render_all(&self) -> Result<Vec<RenderedFile>> {
        let d = self.desired(None, None)?;
        let mut files: Vec<RenderedFile> = d.state_file.into_iter().collect();
        files.extend(d.dropins.into_iter().map(|mut f| {
            f.path = std::path::Path::new(plan::GENERATOR_DIR).join(&f.path);
            f
        }));
        files.extend(d.tmpfiles);
        files.extend(d.nft);
        Ok(files)
    }

    pub(crate) fn template_sources(&self) -> &[(String, String)] {
        &self.renderer.sources
    }
}

#[cfg(test)]
mod tests {
    use super::pause_secs;

    #[cfg(not(feature = "test-hooks"))]
    #[test]
    fn without_test_hooks_the_pause_setting_is_ignored() {
        assert_eq!(pause_secs("allocate", Some("allocate:5")), None);
        assert_eq!(pause_secs("init_server", Some("init_server:30")), None);
    }

    #[cfg(feature = "test-hooks")]
    #[test]
    fn with_test_hooks_the_pause_setting_names_a_point() {
        assert_eq!(pause_secs("allocate", Some("allocate:5")), Some(5));
        assert_eq!(pause_secs("init_server", Some("allocate:5")), None);
        assert_eq!(pause_secs("allocate", Some("allocate:x")), None);
        assert_eq!(pause_secs("allocate", Some("allocate")), None);
        assert_eq!(pause_secs("allocate", None), None);
    }
}
